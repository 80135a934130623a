//! What a test or bench process named (see [`crate::unique`]) and its
//! `Drop` guards remove, found and removed by a later process when the one
//! that made it did not get to: a run killed by a timeout, SIGKILL or an
//! abort leaves its namespaces, temp directories (with the mounts of its
//! nodes' containers and pods under them), pin directories and cgroups.
//!
//! Every name holds its process's id (`sk<what><pid>x<n>`, the pid modulo
//! 100 000), so what a process left is told from what a live one is using:
//! a name whose pid matches no live process is left over. The first name a
//! process takes ([`crate::unique`]) runs [`sweep_dead`] first; a process
//! stopping on a signal removes its own with [`remove_owned_by`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::cgroup::CGROUP2_ROOT;

/// The kinds of names that stand for something to remove.
const NETNS: &str = "ns";
const TEMP: &str = "tmp";
const PINS: &str = "pin";
const CGROUP: &str = "cg";
/// A kubelet node: its runc cgroups are `skiff-test/<name>` in every
/// hierarchy.
const NODE: &str = "node";

/// What the names [`crate::unique`]`(what)` gives in the process `pid`
/// start with (a counter follows).
pub fn prefix(what: &str, pid: u32) -> String {
    format!("sk{what}{}x", name_pid(pid))
}

/// A process id as names hold it (interface names are limited to 15
/// bytes).
pub fn name_pid(pid: u32) -> u32 {
    pid % 100_000
}

/// The pid part of `name` when [`crate::unique`]`(what)` made it: the
/// inverse of [`prefix`].
pub fn owner(name: &str, what: &str) -> Option<u32> {
    let rest = name.strip_prefix("sk")?.strip_prefix(what)?;
    let (pid, n) = rest.split_once('x')?;
    if pid.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Pids (modulo 100 000, as names hold them) of every other process alive
/// now, zombies included.
fn live_owners() -> BTreeSet<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .map(name_pid)
        .collect()
}

/// Removes what processes that are gone named. With `own`, names under
/// this process's pid too: [`crate::unique`] asks for that before this
/// process names anything, when such names are an earlier process's
/// (unless another live process shares the pid modulo 100 000). Returns
/// how many things it removed.
pub fn sweep_dead(own: bool) -> usize {
    let mut live = live_owners();
    if !own {
        live.insert(name_pid(std::process::id()));
    }
    let removed = remove_owned_by(|pid| !live.contains(&pid));
    if removed > 0 {
        eprintln!("removed {removed} namespaces, directories and cgroups that ended runs left");
    }
    removed
}

/// Removes what this process named (a process stopping on a signal).
pub fn remove_own() -> usize {
    let me = name_pid(std::process::id());
    remove_owned_by(|pid| pid == me)
}

/// Removes every namespace, temp directory, pin directory and cgroup whose
/// name's pid `dead` picks, after killing the processes still using them.
/// Returns how many it removed.
pub fn remove_owned_by(dead: impl Fn(u32) -> bool) -> usize {
    let is = |name: &str, what: &str| owner(name, what).is_some_and(&dead);
    let named = |dir: &Path, what: &str| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| is(n, what)))
            .map(|e| e.path())
            .collect()
    };
    let temps = named(&std::env::temp_dir(), TEMP);
    let pins = named(Path::new("/sys/fs/bpf"), PINS);
    let cgroups = named(Path::new(CGROUP2_ROOT), CGROUP);
    let node_cgroups: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|h| named(&h.path().join("skiff-test"), NODE))
        .collect();
    let netns: Vec<String> = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| is(n, NETNS))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();

    // Processes first: those started with a path under a left directory
    // (containerd's shims, say, which outlive containerd by design) and
    // those in a left cgroup (containers).
    kill_using(&temps);
    for cg in cgroups.iter().chain(&node_cgroups) {
        kill_in_tree(cg);
    }
    let mut removed = 0;
    for name in &netns {
        // Quiet: a thread of this process unwinding may remove it first.
        let gone = std::process::Command::new("ip")
            .args(["netns", "delete", name])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        removed += usize::from(gone);
    }
    for dir in temps.iter().chain(&pins) {
        // Never delete through a mount (a container's rootfs, a bound host
        // path) left under a dead run's directory.
        crate::node::unmount_under(dir);
        removed += usize::from(std::fs::remove_dir_all(dir).is_ok());
    }
    // Killed processes take a moment to leave their cgroups.
    let mut left: Vec<&PathBuf> = cgroups.iter().chain(&node_cgroups).collect();
    for _ in 0..50 {
        left.retain(|cg| !remove_cgroup_tree(cg));
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    removed + cgroups.len() + node_cgroups.len() - left.len()
}

/// Kills every process with an argument or working directory under one of
/// `dirs`.
fn kill_using(dirs: &[PathBuf]) {
    if dirs.is_empty() {
        return;
    }
    let me = std::process::id();
    let under = |p: &Path| dirs.iter().any(|d| p.starts_with(d));
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me);
    for pid in pids {
        let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let by_arg = args
            .split(|b| *b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .any(|a| {
                // `--data-dir=/tmp/...` as well as `/tmp/...`.
                let path = a.split_once('=').map_or(a, |(_, v)| v);
                path.starts_with('/') && under(Path::new(path))
            });
        let by_cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|p| under(&p));
        if by_arg || by_cwd {
            kill(pid);
        }
    }
}

fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the processes of a cgroup and of the cgroups below it.
fn kill_in_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            kill_in_tree(&e.path());
        }
    }
    for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
    {
        kill(pid);
    }
}

/// Removes a cgroup and those below it, deepest first (the kernel refuses
/// one that still has processes); whether it is gone.
pub fn remove_cgroup_tree(dir: &Path) -> bool {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            remove_cgroup_tree(&e.path());
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_tells_its_owner() {
        assert_eq!(owner("skns4242x0", "ns"), Some(4242));
        assert_eq!(owner("sktmp17x123", "tmp"), Some(17));
        assert_eq!(owner("skcg9x1", "cg"), Some(9));
        // Another kind, or not one of ours.
        assert_eq!(owner("skcg9x1", "c"), None);
        assert_eq!(owner("sknode9x1", "ns"), None);
        assert_eq!(owner("skns9x", "ns"), None);
        assert_eq!(owner("sknsx1", "ns"), None);
        assert_eq!(owner("skns9x1a", "ns"), None);
        assert_eq!(owner("cni0", "ns"), None);
    }

    /// A run that "crashed" (a shell that named things with its own pid,
    /// as `unique` does, and left a process behind, then was killed) and
    /// one still running: the sweep removes the first's namespace, temp
    /// directory (with a mount inside), pin directory and cgroup, and
    /// kills its stray processes; the live run keeps everything.
    #[test]
    fn what_a_killed_run_left_is_removed_and_a_live_runs_is_kept() {
        struct Run {
            shell: std::process::Child,
            strays: Vec<u32>,
        }
        let tmp = std::env::temp_dir();
        let start = || {
            let script = r#"set -e
p=$$
ip netns add skns${p}x0
mkdir -p "$TMP/sktmp${p}x0/rootfs" /sys/fs/bpf/skpin${p}x0 "$CG/skcg${p}x0"
mount -t tmpfs none "$TMP/sktmp${p}x0/rootfs"
cd "$TMP/sktmp${p}x0" && sleep 600 </dev/null >/dev/null 2>&1 &
a=$!
sh -c 'echo $$ > "$1/cgroup.procs"; exec sleep 600' - "$CG/skcg${p}x0" </dev/null >/dev/null 2>&1 &
b=$!
until grep -q . "$CG/skcg${p}x0/cgroup.procs"; do sleep 0.01; done
echo "$a $b"
exec sleep 600 >/dev/null"#;
            let mut shell = std::process::Command::new("sh")
                .args(["-c", script])
                .env("TMP", &tmp)
                .env("CG", CGROUP2_ROOT)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("sh: {e}"));
            let mut line = String::new();
            let out = shell.stdout.take().unwrap_or_else(|| panic!("no stdout"));
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
                .unwrap_or_else(|e| panic!("reading the run's pids: {e}"));
            let strays: Vec<u32> = line
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            assert_eq!(strays.len(), 2, "the run's stray pids: {line:?}");
            Run { shell, strays }
        };
        let (mut dead, mut live) = (start(), start());
        struct Cleanup(Vec<u32>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                for pid in &self.0 {
                    kill(*pid);
                }
                let pids: Vec<u32> = self.0.iter().copied().map(name_pid).collect();
                remove_owned_by(|p| pids.contains(&p));
            }
        }
        let _cleanup = Cleanup(
            [dead.shell.id(), live.shell.id()]
                .into_iter()
                .chain(dead.strays.iter().copied())
                .chain(live.strays.iter().copied())
                .collect(),
        );
        let left = |run: &Run| {
            let p = run.shell.id();
            let netns = std::process::Command::new("ip")
                .args(["netns", "list"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let dir = tmp.join(format!("sktmp{p}x0"));
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let alive = |pid: &u32| i32::try_from(*pid).is_ok_and(crate::alive);
            [
                netns
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(&format!("skns{p}x0"))),
                dir.exists(),
                mounts.contains(&dir.join("rootfs").display().to_string()),
                Path::new(&format!("/sys/fs/bpf/skpin{p}x0")).exists(),
                Path::new(CGROUP2_ROOT).join(format!("skcg{p}x0")).exists(),
                run.strays.iter().all(alive),
            ]
        };
        assert_eq!(left(&dead), [true; 6], "the first run set up");
        kill(dead.shell.id());
        let _ = dead.shell.wait();
        // Its namespace, directories and cgroup (and anything else ended
        // runs left).
        let removed = sweep_dead(false);
        assert!(
            removed >= 4,
            "the dead run's four things: {removed} removed"
        );
        // The strays were reparented: their exit is reaped by init.
        let gone = crate::wait_until(std::time::Duration::from_secs(5), || {
            left(&dead) == [false; 6]
        });
        assert!(gone, "left by the killed run: {:?}", left(&dead));
        assert_eq!(left(&live), [true; 6], "the live run keeps what it has");
        let _ = live.shell.kill();
        let _ = live.shell.wait();
    }
}
