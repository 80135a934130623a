//! The one test harness every crate's privileged tests, the demo and the
//! benchmarks share: network namespaces, cgroups, processes started inside
//! them, and pinned-BPF directories, each removed by a `Drop` guard so that a
//! failing test leaves nothing behind.
//!
//! Names are unique per process and call (`sk<what><pid>x<n>`), so tests
//! run in parallel. Nothing here routes out of the namespaces it creates.

pub mod browser;
pub mod cgroup;
pub mod cluster;
pub mod cni;
pub mod control;
pub mod ecn;
pub mod images;
pub mod kubelet;
pub mod netns;
pub mod node;
pub mod overlay;
pub mod process;
pub mod resolver;
pub mod sweep;

pub use cgroup::Cgroup;
pub use netns::Netns;
pub use process::{Proc, Spawn};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static HALTED: AtomicBool = AtomicBool::new(false);

/// A name no other test in any process uses at the same time. Kept short:
/// interface names are limited to 15 bytes. The first call removes what
/// processes that are gone left under such names ([`sweep::sweep_dead`]).
/// After [`halt_names`] the calling thread waits here for good.
pub fn unique(what: &str) -> String {
    // Before this process takes its first name: what ended runs left.
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        sweep::sweep_dead(true);
    });
    while names_halted() {
        std::thread::park();
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", unique_prefix(what))
}

/// From now on no thread of this process gets a new name: one that asks
/// for one stops there. A process tearing down on a signal calls this
/// first, so that its other threads cannot create a namespace or a
/// directory after it listed what to remove.
pub fn halt_names() {
    HALTED.store(true, Ordering::SeqCst);
}

/// Whether [`halt_names`] was called.
pub fn names_halted() -> bool {
    HALTED.load(Ordering::SeqCst)
}

/// What every name [`unique`] gives for `what` in this process starts
/// with (a counter follows), so a process can find what it made.
pub fn unique_prefix(what: &str) -> String {
    sweep::prefix(what, std::process::id())
}

/// The directory holding the workspace's built binaries (`target/debug` or
/// `target/release`), found from the running executable: test binaries sit
/// in `target/<profile>/deps/`, other binaries in `target/<profile>/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with the command to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` (cargo xtask test does)",
        p.display()
    );
    p
}

/// A bpffs directory for one proxy instance; removing its pins detaches the
/// programs and frees the maps.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self {
            path: PathBuf::from("/sys/fs/bpf").join(unique("pin")),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        for sub in ["links", "maps"] {
            if let Ok(entries) = std::fs::read_dir(self.path.join(sub)) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(self.path.join(sub));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique("tmp"));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The CPUs the calling thread may run on, in order (empty if that cannot
/// be read).
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let Ok(set) = sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .collect()
}

/// CLOCK_MONOTONIC in nanoseconds. Every process on the machine reads the
/// same clock (network namespaces do not change it), so one process can
/// tell others an instant to start at.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Pids of live (not zombie) processes, other than this one, whose command
/// line holds `arg` exactly.
pub fn pids_with_arg(arg: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let live = |pid: &i32| alive(*pid);
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me && live(pid))
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// Polls `f` until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}
