//! Processes started inside a network namespace and (optionally) a cgroup,
//! killed on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{Cgroup, Netns};

/// A command to start in a namespace and cgroup.
pub struct Spawn {
    cmd: Command,
    netns: Option<File>,
    mntns: Option<File>,
    cgroup_procs: Option<File>,
    log: Option<PathBuf>,
    die_with_parent: bool,
}

/// A running process; SIGKILLed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub log: Option<PathBuf>,
}

impl Spawn {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            cmd: Command::new(program),
            netns: None,
            mntns: None,
            cgroup_procs: None,
            log: None,
            die_with_parent: false,
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn arg_path(mut self, p: &Path) -> Self {
        self.cmd.arg(p);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn netns(self, ns: &Netns) -> Self {
        self.netns_path(Some(&ns.path()))
    }

    /// Runs in the namespace at `path` (a bind mount under /run/netns), if any.
    pub fn netns_path(mut self, path: Option<&str>) -> Self {
        if let Some(path) = path {
            let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            self.netns = Some(f);
        }
        self
    }

    /// Runs in the mount namespace at `path` (`/proc/<pid>/ns/mnt`), if any.
    pub fn mntns_path(mut self, path: Option<&Path>) -> Self {
        if let Some(path) = path {
            let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            self.mntns = Some(f);
        }
        self
    }

    pub fn cgroup(mut self, cg: &Cgroup) -> Self {
        let p = cg.path.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        self.cgroup_procs = Some(f);
        self
    }

    /// Starts the process as the leader of a process group of its own, so
    /// that [`Proc::kill_group`] takes it with every process it forks (a
    /// server's workers, which outlive a killed master).
    pub fn own_group(mut self) -> Self {
        use std::os::unix::process::CommandExt as _;
        self.cmd.process_group(0);
        self
    }

    /// Has the kernel kill the process when the thread that started it
    /// ends, even if this process is killed before it can clean up. Only
    /// for processes owned by one test's thread (a shared one started by
    /// the first test to need it would die with that test).
    pub fn die_with_parent(mut self) -> Self {
        self.die_with_parent = true;
        self
    }

    /// Sends stdout and stderr to `path` (read it with `Proc::log_text`).
    pub fn log_to(mut self, path: &Path) -> Self {
        self.log = Some(path.to_path_buf());
        self
    }

    fn prepare(&mut self) {
        let netns = self.netns.as_ref().map(|f| f.as_raw_fd());
        let mntns = self.mntns.as_ref().map(|f| f.as_raw_fd());
        let procs = self.cgroup_procs.as_ref().map(|f| f.as_raw_fd());
        let die = self.die_with_parent;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (prctl, setns, write) on fds opened
        // before the fork.
        unsafe {
            self.cmd.pre_exec(move || {
                if die && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = procs {
                    // cgroup v2: writing "0" moves the writing process.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = mntns
                    && libc::setns(fd, libc::CLONE_NEWNS) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Starts the process with piped stdin/stdout unless logging to a file.
    pub fn start(mut self) -> Proc {
        self.prepare();
        if let Some(log) = &self.log {
            let f = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let f2 = f.try_clone().unwrap_or_else(|e| panic!("dup log: {e}"));
            self.cmd.stdout(f).stderr(f2).stdin(Stdio::null());
        } else {
            self.cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
        }
        let child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.cmd.get_program()));
        Proc {
            child,
            log: self.log,
        }
    }

    /// Runs to completion and returns stdout, or a message with its exit
    /// status and output.
    pub fn try_output(mut self) -> Result<String, String> {
        self.prepare();
        let out = self
            .cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {:?}: {e}", self.cmd.get_program()))?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed ({}): {}{}",
                self.cmd,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Spawns with `input` written to stdin (then closed) and stdout piped.
    fn spawn_fed(&mut self, input: &[u8], stderr: Stdio) -> std::process::Child {
        use std::io::Write as _;
        self.prepare();
        let mut child = self
            .cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.cmd.get_program()));
        if let Some(mut stdin) = child.stdin.take() {
            // A program that exits without reading (a plugin refusing its
            // environment) closes the pipe: not an error here.
            let _ = stdin.write_all(input);
        }
        child
    }

    /// Runs to completion feeding `input` on stdin; returns the whole
    /// output whatever the exit status.
    pub fn run_with_input(mut self, input: &[u8]) -> std::process::Output {
        self.spawn_fed(input, Stdio::piped())
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait {:?}: {e}", self.cmd.get_program()))
    }

    /// Starts the process fed `input`, stdout piped, for callers that want
    /// to kill it midway.
    pub fn start_with_input(mut self, input: &[u8]) -> Proc {
        let child = self.spawn_fed(input, Stdio::null());
        Proc { child, log: None }
    }

    /// Runs to completion and returns stdout; panics on failure.
    pub fn output(self) -> String {
        self.try_output().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Sends a line on stdin and reads one line of stdout.
    pub fn ask(&mut self, line: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").unwrap_or_else(|e| panic!("write to child: {e}"));
        stdin.flush().unwrap_or_else(|e| panic!("flush: {e}"));
        let stdout = self.child.stdout.as_mut().expect("piped stdout");
        // One byte at a time: a BufReader would keep bytes past the line.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            use std::io::Read as _;
            match stdout.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) => buf.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process; its exit code (None if killed by a signal)
    /// and what it wrote on a piped stdout.
    pub fn finish(&mut self) -> (Option<i32>, String) {
        use std::io::Read as _;
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let code = self.child.wait().ok().and_then(|s| s.code());
        (code, out)
    }

    /// SIGKILLs the process group the process leads ([`Spawn::own_group`])
    /// and reaps the process.
    pub fn kill_group(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
