//! cgroup v2 directories for clients whose sockets the proxy translates.
//! Never the root: a program there would rewrite every process's sockets.

use std::path::PathBuf;
use std::time::Duration;

use crate::unique;

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let path = PathBuf::from(CGROUP2_ROOT).join(unique("cg"));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Kill what is left, then remove the (empty) directory; the kernel
        // refuses rmdir while a process remains.
        for _ in 0..100 {
            let procs = self.procs();
            for pid in &procs {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
