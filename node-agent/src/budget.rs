//! The CPU budget of scans: how many threads hash (`--threads`; by default
//! what the container's cgroup CPU quota allows), and the low CPU and I/O
//! priority they run at, so that a scan never competes with the node's
//! workloads. The real-time path (watch events) keeps its normal priority.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::OnceLock;

/// The nice value of scan threads (the lowest CPU priority).
pub const SCAN_NICE: i32 = 19;

static THREADS: OnceLock<usize> = OnceLock::new();

/// Sets the threads of every scan of this process (`--threads`), or leaves
/// the default ([`default_threads`]); returns the number in force. The first
/// call decides.
pub fn configure(threads: Option<usize>) -> usize {
    *THREADS.get_or_init(|| threads.map_or_else(default_threads, |t| t.max(1)))
}

/// The threads of a scan: as configured, else [`default_threads`].
pub fn threads() -> usize {
    configure(None)
}

/// Threads a scan may use when none is configured: the CPUs the agent's own
/// cgroup (v2) quota allows, rounded down so the scan is never throttled by
/// it, at least 1; without a quota, every available CPU.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let quota = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|own| cgroup_cpus(Path::new("/sys/fs/cgroup"), &own));
    threads_for(quota, cores)
}

/// Threads for a quota of `cpus` CPUs (`None`: unlimited) on `cores` cores.
pub fn threads_for(cpus: Option<f64>, cores: usize) -> usize {
    let cores = cores.max(1);
    match cpus {
        Some(q) if q.is_finite() && q > 0.0 => (q.floor() as usize).clamp(1, cores),
        _ => cores,
    }
}

/// CPUs a cgroup v2 `cpu.max` file allows: `"150000 100000"` is 1.5, `"max
/// 100000"` (no limit) and anything unreadable is `None`.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    Some(quota / period)
}

/// The smallest CPU quota on the way from the agent's own cgroup up to the
/// cgroup v2 mount `mount` (a parent's quota binds its children too).
/// `proc_self_cgroup` is the text of `/proc/self/cgroup`; its `0::` line names
/// the cgroup (v1-only hosts have none: no quota known).
pub fn cgroup_cpus(mount: &Path, proc_self_cgroup: &str) -> Option<f64> {
    let own = proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .trim_start_matches('/');
    let mut dir = mount.join(own);
    let mut least: Option<f64> = None;
    loop {
        if let Some(cpus) = std::fs::read_to_string(dir.join("cpu.max"))
            .ok()
            .and_then(|t| parse_cpu_max(&t))
        {
            least = Some(least.map_or(cpus, |l| l.min(cpus)));
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            return least;
        }
    }
}

/// The CPU priority of scan threads (`--scan-priority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScanPriority {
    /// Nice 19 (weight 15 against a normal task's 1024).
    Nice,
    /// `SCHED_IDLE` as well (weight 3; a normal task waking preempts it at
    /// once): the scan runs on what the rest leaves idle, and on a host busy
    /// all the time takes many times longer.
    Idle,
}

static PRIORITY: OnceLock<ScanPriority> = OnceLock::new();

/// Sets the priority of scan threads of this process; the first call
/// decides (default [`ScanPriority::Nice`]).
pub fn configure_priority(priority: Option<ScanPriority>) -> ScanPriority {
    *PRIORITY.get_or_init(|| priority.unwrap_or(ScanPriority::Nice))
}

/// Lowers the calling thread's CPU and I/O priority for the rest of its life
/// (nice 19, and `SCHED_IDLE` with `--scan-priority idle`; best-effort I/O at
/// its lowest level: idle I/O could starve a scan on a disk that is never
/// idle). Errors are returned for logging: a scan at normal priority still
/// works.
pub fn lower_this_thread() -> std::io::Result<()> {
    let tid = rustix::thread::gettid();
    rustix::process::setpriority_process(Some(tid), SCAN_NICE)?;
    if configure_priority(None) == ScanPriority::Idle {
        crate::sys::sched_idle_this_thread()?;
    }
    crate::sys::ioprio_lowest_best_effort()
}

/// Milliseconds after which the allocator returns freed memory to the
/// system: sooner than its default (10), so that a scan's peak memory stays
/// what it uses at once (about 3 MB less at a million files).
const ALLOCATOR_PURGE_DELAY_MS: i64 = 1;

/// Tunes the memory allocator for flat memory. Call first thing in `main`.
pub fn tune_allocator() {
    crate::sys::allocator_purge_delay(ALLOCATOR_PURGE_DELAY_MS);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_formats() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(
            parse_cpu_max("200000"),
            Some(2.0),
            "period defaults to 100ms"
        );
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cpu_max("lots 100000"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
    }

    #[test]
    fn threads_follow_the_quota_rounded_down_at_least_one() {
        assert_eq!(threads_for(None, 8), 8);
        assert_eq!(threads_for(Some(1.5), 8), 1);
        assert_eq!(threads_for(Some(2.0), 8), 2);
        assert_eq!(threads_for(Some(0.25), 8), 1);
        assert_eq!(threads_for(Some(16.0), 8), 8, "never more than the cores");
        assert_eq!(threads_for(None, 0), 1);
    }

    #[test]
    fn the_smallest_quota_from_the_own_cgroup_up() {
        let mount = tempfile::tempdir().unwrap();
        let pod = mount.path().join("kubepods/pod1");
        let own = pod.join("ctr");
        std::fs::create_dir_all(&own).unwrap();
        let cgroup = "0::/kubepods/pod1/ctr\n";
        // No cpu.max anywhere (the file is missing): no quota.
        assert_eq!(cgroup_cpus(mount.path(), cgroup), None);
        std::fs::write(mount.path().join("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(own.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_cpus(mount.path(), cgroup), None);
        std::fs::write(own.join("cpu.max"), "300000 100000\n").unwrap();
        assert_eq!(cgroup_cpus(mount.path(), cgroup), Some(3.0));
        // A parent's tighter quota binds.
        std::fs::write(pod.join("cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(cgroup_cpus(mount.path(), cgroup), Some(1.5));
        // Inside a cgroup namespace the own cgroup is the mount itself.
        std::fs::write(mount.path().join("cpu.max"), "100000 100000\n").unwrap();
        assert_eq!(cgroup_cpus(mount.path(), "0::/\n"), Some(1.0));
        // cgroup v1 only: nothing known.
        assert_eq!(cgroup_cpus(mount.path(), "4:cpu,cpuacct:/x\n"), None);
    }
}
