//! A bench stopped by a signal (Ctrl-C, a timeout's SIGTERM, a closed
//! terminal) takes what it started with it: every process below it
//! (etcd, skiff-control, agents, unbound, dnsperf...) is killed and the
//! network namespaces, pin directories, temp directories and cgroups it
//! named are removed. Without this, a stopped bench left them running, and
//! the next run competed with them for the same cores.
//!
//! The signal handler only writes a byte to a pipe (all it may do); a
//! thread waiting on the pipe does the work, then exits with 130.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is static.
        unsafe {
            libc::write(fd, b"!".as_ptr().cast(), 1);
        }
    }
}

/// From here on, SIGINT, SIGTERM and SIGHUP reap what this process made.
pub fn on_signals() -> Result<()> {
    let (read, write) = nix::unistd::pipe().context("a pipe for signals")?;
    PIPE.store(write.into_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only calls write(2).
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handling {signal}"))?;
    }
    std::thread::spawn(move || {
        let mut pipe = std::fs::File::from(read);
        let mut byte = [0u8; 1];
        if pipe.read_exact(&mut byte).is_ok() {
            eprintln!("stopped: killing what this bench started and removing its namespaces");
            reap();
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Each process's parent, from /proc.
pub(crate) fn parents() -> HashMap<i32, i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name (in parentheses) may hold spaces.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The processes below `root`.
pub(crate) fn descendants(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, parent) in parents {
            if *parent == p && !out.contains(child) {
                out.push(*child);
                frontier.push(*child);
            }
        }
    }
    out
}

/// Parks the calling thread for good once a signal started the reaping
/// (whose thread exits the process); returns at once otherwise.
pub fn wait_if_reaping() {
    // The reaping starts by halting new names.
    while skiff_tests::names_halted() {
        std::thread::park();
    }
}

fn reap() {
    // The bench's own threads keep running meanwhile: from here on they
    // stop at their next new name instead of making one more namespace.
    skiff_tests::halt_names();
    let me = std::process::id() as i32;
    // Twice: a child may have started one more while the first pass ran.
    for _ in 0..2 {
        for pid in descendants(me, &parents()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Twice as well: a name taken just before the halt may have become a
    // namespace or a directory only after the first pass listed them.
    for _ in 0..2 {
        skiff_tests::sweep::remove_own();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_children_and_theirs() {
        let parents: HashMap<i32, i32> = [(2, 1), (3, 2), (4, 3), (5, 1), (6, 9)]
            .into_iter()
            .collect();
        let mut d = descendants(1, &parents);
        d.sort_unstable();
        assert_eq!(d, [2, 3, 4, 5]);
    }

    #[test]
    fn this_process_is_its_parents_child() {
        let me = std::process::id() as i32;
        let parents = parents();
        let parent = parents.get(&me).copied().expect("in /proc");
        assert!(descendants(parent, &parents).contains(&me));
    }
}
