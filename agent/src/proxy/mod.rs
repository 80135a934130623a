//! The service proxy: Services + EndpointSlices into the pinned BPF maps of
//! the socket-level load balancer in `ebpf/`, replacing kube-proxy.
//!
//! `model` turns objects into frontends (pure), `dataplane` owns the kernel
//! objects and writes differences, `manifests` and `watch` are the two
//! sources. `run` wires a source to the dataplane; `list` prints what the
//! pinned maps hold.

pub mod dataplane;
pub mod manifests;
pub mod model;
pub mod terminate;
pub mod watch;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch as signal;
use tracing::{error, info, warn};

pub use dataplane::{Dataplane, DataplaneError, Tables};
pub use model::{Catalog, Frontend, NodeView, ServiceError};

/// Where the proxy reads Services and EndpointSlices from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests, reread when it changes.
    Manifests(PathBuf),
    /// An apiserver, through the usual kubeconfig lookup.
    Kube,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub node: NodeView,
    pub source: Source,
    /// How often the manifest directory is checked for changes.
    pub poll: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Manifests(#[from] manifests::ManifestError),
    #[error("connecting to the apiserver: {0}")]
    Kube(#[from] kube::Error),
    #[error("watching the apiserver: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
    #[error(transparent)]
    NoClient(#[from] crate::role::NoClient),
}

fn report(errors: &[ServiceError]) {
    for e in errors {
        error!(error = %e, "service skipped");
    }
}

impl crate::role::Role for ProxyConfig {
    type Error = ProxyError;

    fn name(&self) -> &'static str {
        "proxy"
    }

    async fn run(
        &self,
        ctx: crate::role::NodeContext,
        shutdown: crate::role::Shutdown,
    ) -> Result<(), ProxyError> {
        let client = match self.source {
            Source::Kube => Some(ctx.client("proxy")?),
            Source::Manifests(_) => None,
        };
        run(self.clone(), client, shutdown).await
    }
}

/// Runs the proxy until `shutdown` turns true. The programs stay attached
/// after it returns (their links are pinned). Map writes are blocking
/// kernel work: they run in `block_in_place`, so the other roles' tasks
/// move to another worker meanwhile (a multi-threaded runtime is needed).
pub async fn run(
    cfg: ProxyConfig,
    client: Option<kube::Client>,
    mut shutdown: signal::Receiver<bool>,
) -> Result<(), ProxyError> {
    use tokio::task::block_in_place;
    let mut dp = block_in_place(|| Dataplane::install(&cfg.pin_dir, &cfg.cgroup))?;
    match &cfg.source {
        Source::Manifests(dir) => {
            let mut last = None;
            loop {
                let sig = manifests::signature(dir)?;
                if last.as_ref() != Some(&sig) {
                    let started = Instant::now();
                    let (catalog, errors) = manifests::load(dir)?;
                    for e in &errors {
                        error!(error = %e, "manifest skipped");
                    }
                    let (desired, bad) = catalog.desired(&cfg.node);
                    report(&bad);
                    let (changed, taken) = block_in_place(|| dp.sync_all(&desired))?;
                    report(&taken);
                    info!(
                        services = desired.len(),
                        frontends = dp.programmed().len(),
                        changed,
                        skipped = bad.len() + taken.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "programmed"
                    );
                    last = Some(sig);
                }
                tokio::select! {
                    _ = tokio::time::sleep(cfg.poll) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        Source::Kube => {
            let client = client.ok_or(crate::role::NoClient { role: "proxy" })?;
            let node = cfg.node.clone();
            let reconcile = |store: &watch::Store, dirty: watch::Dirty| {
                let started = Instant::now();
                let result = block_in_place(|| {
                    if dirty.all {
                        let (desired, bad) = store.catalog.desired(&node);
                        report(&bad);
                        dp.sync_all(&desired)
                    } else {
                        sync_dirty(&mut dp, &store.catalog, &node, &dirty.services)
                    }
                });
                match result {
                    Ok((changed, errors)) => {
                        report(&errors);
                        if changed > 0 {
                            info!(
                                changed,
                                frontends = dp.programmed().len(),
                                elapsed_us = started.elapsed().as_micros() as u64,
                                "programmed"
                            );
                        }
                    }
                    Err(e) => error!(error = %e, "programming failed"),
                }
            };
            tokio::select! {
                r = watch::run(client, reconcile) => r?,
                _ = shutdown.changed() => {}
            }
        }
    }
    info!("proxy stopped; programs stay attached");
    Ok(())
}

/// Reprograms the named services from the catalog. A service that became
/// invalid loses its frontends (kube-proxy drops such a service too).
fn sync_dirty(
    dp: &mut Dataplane,
    catalog: &Catalog,
    node: &NodeView,
    services: &std::collections::BTreeSet<String>,
) -> Result<(usize, Vec<ServiceError>), DataplaneError> {
    let mut changed = 0;
    let mut errors = Vec::new();
    for name in services {
        let frontends = catalog.frontends_of(name, node).unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        });
        let (n, e) = dp.sync_service(name, &frontends)?;
        changed += n;
        errors.extend(e);
    }
    Ok((changed, errors))
}

/// One frontend as `proxy list` prints it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListedFrontend {
    pub frontend: String,
    pub id: u32,
    pub affinity_timeout: u32,
    pub backends: Vec<String>,
}

/// What the pinned maps hold, in frontend order.
pub fn list(pin_dir: &std::path::Path) -> Result<Vec<ListedFrontend>, DataplaneError> {
    let tables = Tables::open_pinned(pin_dir)?;
    Ok(tables
        .read()?
        .programmed
        .iter()
        .map(|(k, p)| ListedFrontend {
            frontend: model::frontend_string(k),
            id: p.value.id,
            affinity_timeout: p.value.affinity_timeout,
            backends: p
                .backends
                .iter()
                .map(|(_, b)| model::backend_string(b))
                .collect(),
        })
        .collect())
}

/// Local addresses to serve NodePorts on when none are given: every
/// address of this network namespace except loopback and link-local ones.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out: BTreeMap<String, IpAddr> = BTreeMap::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                let ip = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                let link_local = match ip {
                    IpAddr::V4(v4) => v4.is_link_local(),
                    IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                };
                if !ip.is_loopback() && !link_local {
                    out.insert(ip.to_string(), ip);
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot list local addresses for NodePorts"),
    }
    out.into_values().collect()
}
