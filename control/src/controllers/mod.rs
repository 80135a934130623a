//! The controllers. Each follows kube-rs's shape: watchers feed reflector
//! stores, and a reconcile pass reads the stores and makes the API match
//! the desired state. Passes are idempotent and run whenever a watched
//! kind changes (bursts coalesced) and on a resync period, so a missed or
//! failed step is retried, never assumed done.

pub mod autoscaler;
pub mod certificates;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod gc;
pub mod job;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod quota;
pub mod replicaset;
pub mod serviceaccount;
pub mod statefulset;
pub mod volume;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tracing::warn;

#[derive(Clone, Debug)]
pub struct Settings {
    pub node_grace: Duration,
    pub eviction_timeout: Duration,
    /// The cluster CA: signs approved client certificates, and its
    /// certificate is published in every namespace (`kube-root-ca.crt`).
    pub signer: Option<Arc<certificates::Signer>>,
    /// Node IPAM: the pod network whose ranges Nodes get as podCIDR.
    pub node_cidrs: Option<nodeipam::NodeCidrs>,
    /// How often each HorizontalPodAutoscaler is evaluated.
    pub hpa_sync_period: Duration,
}

/// Runs every controller until dropped. Dropping it (as a replica that
/// lost its lease does) stops them all at once, their watches and helper
/// tasks with them.
pub async fn run_all(client: Client, settings: Settings) {
    let ca_pem = settings.signer.as_ref().map(|s| s.ca_cert_pem.clone());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(cidrs) = settings.node_cidrs {
        tasks.spawn(nodeipam::run(client.clone(), cidrs));
    }
    tasks.spawn(certificates::run(client.clone(), settings.signer.clone()));
    tasks.spawn(replicaset::run(client.clone()));
    tasks.spawn(deployment::run(client.clone()));
    tasks.spawn(daemonset::run(client.clone()));
    tasks.spawn(statefulset::run(client.clone()));
    tasks.spawn(job::run(client.clone()));
    tasks.spawn(cronjob::run(client.clone()));
    tasks.spawn(autoscaler::run(client.clone(), settings.hpa_sync_period));
    tasks.spawn(endpointslice::run(client.clone()));
    tasks.spawn(gc::run(client.clone()));
    tasks.spawn(volume::run(client.clone()));
    tasks.spawn(quota::run(client.clone()));
    tasks.spawn(nodelifecycle::run(client.clone(), settings));
    tasks.spawn(serviceaccount::run(client, ca_pem));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            warn!(error = %e, "a controller ended");
        }
    }
}
