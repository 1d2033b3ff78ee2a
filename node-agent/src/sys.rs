//! The few fanotify, file-handle and I/O priority system calls that neither
//! rustix nor the standard library wrap, and the one allocator option the agent
//! sets. Everything else (reading events, parsing them, /proc) is safe code;
//! this file is the only `unsafe` of the agent.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `fanotify_init(2)`. Returns the notification group's descriptor.
pub fn fanotify_init(flags: u32, event_f_flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments; a non-negative result
    // is a new descriptor that nothing else owns, so OwnedFd may take it.
    let fd = unsafe { libc::fanotify_init(flags, event_f_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` on `path` (absolute).
pub fn fanotify_mark(group: BorrowedFd<'_>, flags: u32, mask: u64, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `group` is a live descriptor borrowed for the call, `c` is a
    // NUL-terminated string that outlives it; the kernel only reads it.
    let rc =
        unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, libc::AT_FDCWD, c.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Size of the handle buffer: MAX_HANDLE_SZ in the kernel.
const MAX_HANDLE_SZ: usize = 128;

/// `name_to_handle_at(2)` of a directory: (handle type, handle bytes), the
/// same bytes fanotify reports in a DFID record for that directory.
pub fn dir_handle(dir: BorrowedFd<'_>) -> io::Result<(i32, Vec<u8>)> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }
    // laid out in a u32 buffer so that the header is aligned.
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    let empty = c"";
    // SAFETY: `buf` is large enough for the header and MAX_HANDLE_SZ bytes, as
    // its `handle_bytes` says; `mount_id` and `empty` are valid for the call;
    // AT_EMPTY_PATH makes the kernel use `dir` itself.
    let rc = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            empty.as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (buf[0] as usize).min(MAX_HANDLE_SZ);
    let handle_type = buf[1] as i32;
    let bytes: Vec<u8> = buf[2..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(len)
        .collect();
    Ok((handle_type, bytes))
}

/// The file system id (`statfs.f_fsid`) of the file system holding `fd`, as
/// fanotify reports it in FID records.
pub fn fsid(fd: BorrowedFd<'_>) -> io::Result<[i32; 2]> {
    let mut st = std::mem::MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: `st` is a writable statfs64 the kernel fills; `fd` is live.
    let rc = unsafe { libc::fstatfs64(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and filled by a successful fstatfs64; fsid_t is
    // `struct { int __val[2]; }` (repr C, 8 bytes, every bit pattern valid),
    // libc only hides the field.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [i32; 2]>(st.assume_init().f_fsid) })
}

/// Takes ownership of a descriptor the kernel installed for this process in
/// an event (a pidfd), so that it is closed; `None` for the negative values
/// that mean "no descriptor" (FAN_NOFD, FAN_NOPIDFD, FAN_EPIDFD).
pub fn own_fd(raw: i32) -> Option<OwnedFd> {
    if raw < 0 {
        return None;
    }
    // SAFETY: the kernel created this descriptor in our table while handing
    // us the event; nothing else knows it, so this is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `ioprio_set(2)` of the calling thread: best-effort class, lowest level (7).
/// Best effort rather than idle, so that a scan on a disk that is never idle
/// still finishes.
pub fn ioprio_lowest_best_effort() -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    let prio = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7;
    // SAFETY: plain system call with integer arguments; who = 0 is the
    // calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            prio,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sched_setscheduler(2)` of the calling thread to `SCHED_IDLE`: it runs
/// only when nothing else wants the CPU (weight 3 against a normal task's
/// 1024, and any normal task waking preempts it).
pub fn sched_idle_this_thread() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the allocator (mimalloc) return memory freed to the system after
/// `ms` milliseconds (its default: 10).
pub fn allocator_purge_delay(ms: i64) {
    // `mi_option_purge_delay` of mimalloc.h; libmimalloc-sys (pinned by the
    // lock file) does not name it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: a setter of one of the allocator's global options, read
    // atomically wherever it is used.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms as std::ffi::c_long) };
}
