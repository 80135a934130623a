//! A local etcd for a one-command control plane: Debian's `etcd` binary,
//! listening on loopback ports picked at start, data kept in the control
//! plane's data directory, stopped when the control plane stops. It
//! serves over mutual TLS with a CA of its own (see [`crate::storage::etcd_pki`]):
//! no local process without the control plane's client certificate can
//! read what it stores.
//!
//! The child dies with its parent: it gets SIGTERM from the kernel
//! (`PR_SET_PDEATHSIG`) when the control plane exits, even by SIGKILL. A
//! restart first replaces whatever etcd still runs on the same data
//! directory (one that was SIGKILLed together with a parent before the
//! signal could land, or one started by an older build), because two
//! etcds on one data directory wait on each other's file lock forever.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tracing::warn;

use crate::storage::etcd_pki::{self, ClientFiles, MemberFiles};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("picking a free loopback port: {0}")]
    Port(std::io::Error),
    #[error("etcd exited before it was ready at {url} (log: {log})")]
    Exited { url: String, log: PathBuf },
    #[error("etcd did not become ready at {url} within {secs} s (log: {log})")]
    NotReady {
        url: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("an earlier etcd (pid {pid}) still holds {data_dir} and would not stop")]
    Leftover { pid: i32, data_dir: PathBuf },
    #[error("etcd's certificates: {0}")]
    Pki(#[from] crate::pki::PkiError),
}

pub struct LocalEtcd {
    pid: i32,
    /// Reports the child's exit; the thread that spawned it waits on it, so
    /// the parent-death signal is tied to a thread that outlives the child.
    exited: oneshot::Receiver<std::io::Result<ExitStatus>>,
    pub url: String,
    /// What a client needs to be let in.
    pub client: ClientFiles,
}

fn free_port() -> Result<u16, EtcdError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(EtcdError::Port)?;
    Ok(l.local_addr().map_err(EtcdError::Port)?.port())
}

/// The `--data-dir=` argument an etcd of ours runs with.
fn data_dir_arg(data_dir: &Path) -> String {
    format!("--data-dir={}", data_dir.display())
}

/// Pids of running processes whose command line holds `arg` exactly.
fn processes_with_arg(arg: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); its state in /proc says it is gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Stops every etcd still running on `data_dir`: SIGTERM (so it closes
/// its WAL), then SIGKILL after 10 s.
async fn replace_leftovers(data_dir: &Path) -> Result<(), EtcdError> {
    let arg = data_dir_arg(data_dir);
    for pid in processes_with_arg(&arg) {
        warn!(pid, data_dir = %data_dir.display(), "stopping an etcd left by an earlier run");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let start = Instant::now();
        while alive(pid) {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if start.elapsed() > Duration::from_secs(15) {
                return Err(EtcdError::Leftover {
                    pid,
                    data_dir: data_dir.to_path_buf(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Starts `cmd` from a thread of its own that then waits for it, with
/// SIGTERM as its parent-death signal. Returns its pid and its exit.
fn spawn_tied(
    mut cmd: Command,
) -> std::io::Result<(i32, oneshot::Receiver<std::io::Result<ExitStatus>>)> {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as i32;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("local-etcd".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = pid_tx.send(Ok(child.id() as i32));
                let _ = exit_tx.send(child.wait());
            }
            Err(e) => {
                let _ = pid_tx.send(Err(e));
            }
        })?;
    let pid = pid_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawning thread died"))??;
    Ok((pid, exit_rx))
}

impl LocalEtcd {
    /// Starts etcd with its data under `dir/etcd` and waits until it answers.
    /// Its ports are picked free just before it starts, so another process
    /// may take one first: an etcd that exits before it is ready is started
    /// again on other ports (three tries).
    pub async fn start(binary: &str, dir: &Path) -> Result<Self, EtcdError> {
        let data_dir = dir.join("etcd");
        replace_leftovers(&data_dir).await?;
        let pki = etcd_pki::ensure(&dir.join("pki"), &[], &[])?;
        let mut tries = 1;
        loop {
            match Self::start_once(binary, dir, &data_dir, &pki).await {
                Err(EtcdError::Exited { url, log }) if tries < 3 => {
                    warn!(%url, log = %log.display(), "etcd exited at start; trying other ports");
                    tries += 1;
                }
                done => return done,
            }
        }
    }

    async fn start_once(
        binary: &str,
        dir: &Path,
        data_dir: &Path,
        pki: &MemberFiles,
    ) -> Result<Self, EtcdError> {
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("https://127.0.0.1:{client}");
        let peer_url = format!("https://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let spawn_err = |source| EtcdError::Spawn {
            binary: binary.into(),
            source,
        };
        let log_file = std::fs::File::create(&log).map_err(spawn_err)?;
        let mut cmd = Command::new(binary);
        cmd.arg("--name=skiff")
            .arg(data_dir_arg(data_dir))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=skiff={peer_url}"))
            .args(pki.etcd_args())
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let (pid, exited) = spawn_tied(cmd).map_err(spawn_err)?;
        let mut etcd = Self {
            pid,
            exited,
            url,
            client: pki.apiserver.clone(),
        };
        if let Err(e) = etcd.wait_ready(Duration::from_secs(20), log).await {
            etcd.terminate().await;
            return Err(e);
        }
        Ok(etcd)
    }

    async fn wait_ready(&mut self, within: Duration, log: PathBuf) -> Result<(), EtcdError> {
        let start = Instant::now();
        let opts = etcd_client::ConnectOptions::new().with_tls(self.client.tls()?);
        while start.elapsed() < within {
            if let Ok(mut c) =
                etcd_client::Client::connect([self.url.as_str()], Some(opts.clone())).await
                && c.status().await.is_ok()
            {
                return Ok(());
            }
            if self.exited.try_recv().is_ok() {
                return Err(EtcdError::Exited {
                    url: self.url.clone(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(EtcdError::NotReady {
            url: self.url.clone(),
            secs: within.as_secs(),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid as u32)
    }

    async fn terminate(&mut self) {
        // SIGTERM first so etcd closes its WAL cleanly. The pid is ours
        // until the waiting thread reports the exit.
        if matches!(
            self.exited.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(5), &mut self.exited)
                .await
                .is_err()
            {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                let _ = (&mut self.exited).await;
            }
        }
    }

    pub async fn stop(mut self) {
        self.terminate().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_etcd_that_exits_at_start_is_reported_at_once_after_its_tries() {
        let dir = crate::testutil::TempDir::new("skiff-etcd-exits");
        // Exited (each try seen to end), not NotReady (a try waited out).
        let err = LocalEtcd::start("false", &dir.0).await.err();
        assert!(
            matches!(err, Some(EtcdError::Exited { .. })),
            "{:?}",
            err.map(|e| e.to_string())
        );
    }

    #[tokio::test]
    async fn a_leftover_on_the_same_data_dir_is_stopped() {
        let dir = std::env::temp_dir().join(format!("skiff-etcd-test-{}", std::process::id()));
        let arg = data_dir_arg(&dir);
        // A stand-in for an orphaned etcd: a process holding the argument.
        // It waits on a builtin (`read`), not a child: a forked `sleep`
        // shows the shell's command line until it has exec'd, and was
        // taken for a second holder now and then.
        let mut orphan = Command::new("sh")
            .args(["-c", "read _", "etcd", &arg])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let other = data_dir_arg(&dir.join("other"));
        // Until it has exec'd, the child's command line is still ours.
        let deadline = Instant::now() + Duration::from_secs(5);
        while processes_with_arg(&arg).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(processes_with_arg(&arg), vec![orphan.id() as i32]);
        assert!(processes_with_arg(&other).is_empty());
        replace_leftovers(&dir).await.expect("replaced");
        let status = orphan.wait().expect("reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        assert!(processes_with_arg(&arg).is_empty());
    }
}
