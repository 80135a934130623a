//! The controllers: each is watch → store → reconcile against the
//! apiserver through kube-rs.

use std::time::Duration;

use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub node_grace: Duration,
    pub eviction_timeout: Duration,
}

pub fn spawn_all(_client: kube::Client, _settings: Settings) -> Vec<JoinHandle<()>> {
    Vec::new()
}
