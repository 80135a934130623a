//! A local etcd for a one-command control plane: Debian's `etcd` binary,
//! listening on loopback ports picked at start, data kept in the control
//! plane's data directory, stopped when the control plane stops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("picking a free loopback port: {0}")]
    Port(std::io::Error),
    #[error("etcd did not become ready at {url} within {secs} s (log: {log})")]
    NotReady {
        url: String,
        secs: u64,
        log: PathBuf,
    },
}

pub struct LocalEtcd {
    child: Child,
    pub url: String,
}

fn free_port() -> Result<u16, EtcdError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(EtcdError::Port)?;
    Ok(l.local_addr().map_err(EtcdError::Port)?.port())
}

impl LocalEtcd {
    /// Starts etcd with its data under `dir/etcd` and waits until it answers.
    pub async fn start(binary: &str, dir: &Path) -> Result<Self, EtcdError> {
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let log_file = std::fs::File::create(&log).map_err(|source| EtcdError::Spawn {
            binary: binary.into(),
            source,
        })?;
        let child = Command::new(binary)
            .arg("--name=skiff")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=skiff={peer_url}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EtcdError::Spawn {
                binary: binary.into(),
                source,
            })?;
        let etcd = Self { child, url };
        etcd.wait_ready(Duration::from_secs(20), log).await?;
        Ok(etcd)
    }

    async fn wait_ready(&self, within: Duration, log: PathBuf) -> Result<(), EtcdError> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(mut c) = etcd_client::Client::connect([self.url.as_str()], None).await
                && c.status().await.is_ok()
            {
                return Ok(());
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
        self.child.id()
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM first so etcd closes its WAL cleanly.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
