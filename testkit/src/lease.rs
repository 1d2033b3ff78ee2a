//! A write lease on a file (`fcntl(F_SETLEASE, F_WRLCK)`), held by the test
//! process as an attacker's process would hold one: while it is held, every
//! other open of the file blocks, or fails with `EWOULDBLOCK` when opened
//! non-blocking; the kernel breaks it only after `/proc/sys/fs/lease-break-time`
//! (45 s by default), and the holder may take it again. Needs the file's
//! owner or `CAP_LEASE` (root).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Once;

/// A write lease, released when dropped.
#[derive(Debug)]
pub struct Lease(File);

impl Lease {
    /// Takes a write lease on `path` (no other process may have it open).
    pub fn take(path: &Path) -> Lease {
        static IGNORE_SIGIO: Once = Once::new();
        // The kernel asks the holder to give the lease up with SIGIO, whose
        // default action ends the process: the holder ignores it.
        IGNORE_SIGIO.call_once(|| {
            // SAFETY: setting a signal's disposition to "ignore" touches no memory.
            unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        });
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: fcntl on a descriptor this function owns, with integer arguments.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        assert_eq!(
            r,
            0,
            "F_SETLEASE on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Lease(file)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // SAFETY: as in `take`.
        unsafe { libc::fcntl(self.0.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}
