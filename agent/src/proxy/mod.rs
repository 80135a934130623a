//! The service proxy: Services + EndpointSlices into the pinned BPF maps of
//! the socket-level load balancer in `ebpf/` (local clients) and of its TC
//! path (clients on other hosts), replacing kube-proxy.
//!
//! `model` turns objects into a plan per Service (pure), `dataplane` owns
//! the socket path's kernel objects and `external` the TC path's, each
//! writing differences; `health` serves healthCheckNodePorts; `manifests`
//! and `watch` are the two sources. `run` wires a source to them; `list`
//! prints what the pinned maps hold.

pub mod dataplane;
pub mod external;
pub mod health;
pub mod maglev;
pub mod manifests;
pub mod model;
pub mod origins;
pub mod sys;
pub mod terminate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt as _};
use serde::Serialize;
use tokio::sync::watch as signal;
use tracing::{debug, error, info, warn};

pub use dataplane::{Dataplane, DataplaneError, Tables};
pub use external::{External, ExternalConfig, Interfaces};
pub use model::{Catalog, Frontend, NodeView, ServiceError, ServicePlan};

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
    /// The TC path for traffic from other hosts.
    pub external: ExternalConfig,
}

/// How often interfaces are rescanned for the TC path.
const RESCAN: Duration = Duration::from_secs(2);

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
        run(self.clone(), client, ctx.telemetry.clone(), shutdown).await
    }
}

/// Runs the proxy until `shutdown` turns true. The programs stay attached
/// after it returns (their links are pinned). Map writes are blocking
/// kernel work: they run in `block_in_place`, so the other roles' tasks
/// move to another worker meanwhile (a multi-threaded runtime is needed).
pub async fn run(
    cfg: ProxyConfig,
    client: Option<kube::Client>,
    telemetry: Arc<crate::telemetry::Telemetry>,
    mut shutdown: signal::Receiver<bool>,
) -> Result<(), ProxyError> {
    use tokio::task::block_in_place;
    let dp = block_in_place(|| Dataplane::install(&cfg.pin_dir, &cfg.cgroup))?;
    // Map fills and program run times change with traffic, not only with
    // programming: read a second after the first programming pass ends
    // (or after MAP_REFRESH if none has), then every so often while the
    // proxy runs.
    let programmed = Arc::new(tokio::sync::Notify::new());
    let refresh = {
        let (telemetry, pin_dir) = (telemetry.clone(), cfg.pin_dir.clone());
        let programmed = programmed.clone();
        crate::role::AbortOnDrop(tokio::spawn(async move {
            let _ = tokio::time::timeout(MAP_REFRESH, programmed.notified()).await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            loop {
                let (t, p) = (telemetry.clone(), pin_dir.clone());
                let _ = tokio::task::spawn_blocking(move || record_maps(&t.proxy, &p)).await;
                tokio::time::sleep(MAP_REFRESH).await;
            }
        }))
    };
    let auto = external::auto_interfaces().await;
    let ext = block_in_place(|| External::install(&cfg.pin_dir, cfg.external.clone(), &auto))?;
    let mut paths = Paths {
        dp,
        ext: Arc::new(Mutex::new(ext)),
        health: health::HealthServers::default(),
        health_of: BTreeMap::new(),
    };
    let ext = paths.ext.clone();
    let fixed_interfaces =
        !cfg.external.interfaces.is_empty() && !cfg.external.pod_interfaces.is_empty();
    let rescan = async move {
        if fixed_interfaces {
            // Named interfaces are attached once, at install.
            return std::future::pending().await;
        }
        // A new bridge is attached as soon as the kernel tells of it, so
        // that the first flows to its first pods already go there directly;
        // addresses (which make node interfaces) are polled.
        // A stream that ends (or never started) leaves the poll alone.
        let mut events = match skiff_netlink::link_events() {
            Ok(s) => s.chain(futures::stream::pending()).boxed(),
            Err(e) => {
                warn!(error = %e, "rescanning interfaces every {RESCAN:?} only");
                futures::stream::pending().boxed()
            }
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(RESCAN) => {}
                Some(()) = events.next() => {
                    // A burst (a pod's veth, its bridge port) makes one scan.
                    while let Some(Some(())) = events.next().now_or_never() {}
                }
            }
            let auto = external::auto_interfaces().await;
            let r = block_in_place(|| match ext.lock() {
                Ok(mut e) => e.attach_interfaces(&auto),
                Err(_) => Ok(0),
            });
            if let Err(e) = r {
                warn!(error = %e, "attaching the TC programs failed");
            }
        }
    };
    tokio::pin!(rescan);
    // kube-proxy's rule: unhealthy while a change waits longer than twice
    // its sync period (30 s) to be programmed.
    let health = telemetry.check(
        "proxy",
        crate::telemetry::Watch::Sync(Duration::from_secs(60)),
    );
    match &cfg.source {
        Source::Manifests(dir) => {
            let mut last = None;
            loop {
                let sig = manifests::signature(dir)?;
                if last.as_ref() != Some(&sig) {
                    health.queued();
                    let started = Instant::now();
                    let (catalog, errors) = manifests::load(dir)?;
                    for e in &errors {
                        error!(error = %e, "manifest skipped");
                    }
                    let (desired, bad) = catalog.desired(&cfg.node);
                    report(&bad);
                    let services = desired.len();
                    match block_in_place(|| paths.sync_all(desired)) {
                        Ok((changed, taken)) => {
                            report(&taken);
                            record_sync(&telemetry.proxy, &paths, started, &programmed);
                            health.synced();
                            info!(
                                services,
                                frontends = paths.dp.programmed().len(),
                                changed,
                                skipped = bad.len() + taken.len(),
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "programmed"
                            );
                            last = Some(sig);
                        }
                        // Tried again at the next poll.
                        Err(e) => error!(error = %e, "programming failed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(cfg.poll) => {}
                    _ = &mut rescan => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        Source::Kube => {
            let client = client.ok_or(crate::role::NoClient { role: "proxy" })?;
            let node = cfg.node.clone();
            let reconcile = |store: &crate::catalog::watch::Store,
                             dirty: crate::catalog::watch::Dirty| {
                health.queued();
                let started = Instant::now();
                let result = block_in_place(|| {
                    if dirty.all {
                        let (desired, bad) = store.catalog.desired(&node);
                        report(&bad);
                        paths.sync_all(desired)
                    } else {
                        paths.sync_dirty(&store.catalog, &node, &dirty.services)
                    }
                });
                match result {
                    Ok((changed, errors)) => {
                        report(&errors);
                        record_sync(&telemetry.proxy, &paths, started, &programmed);
                        health.synced();
                        if changed > 0 {
                            info!(
                                changed,
                                frontends = paths.dp.programmed().len(),
                                elapsed_us = started.elapsed().as_micros() as u64,
                                "programmed"
                            );
                        }
                    }
                    Err(e) => error!(error = %e, "programming failed"),
                }
            };
            tokio::select! {
                r = crate::catalog::watch::run(client, reconcile) => r?,
                _ = &mut rescan => {}
                _ = shutdown.changed() => {}
            }
        }
    }
    drop(refresh);
    info!("proxy stopped; programs stay attached");
    Ok(())
}

/// How often map fills and program run times are read again. Counting a
/// map walks its keys one syscall each: a full 262 144-entry LRU takes
/// about a third of a second of CPU.
const MAP_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// A programming pass ended (it started at `started`); `programmed` wakes
/// the first read of the map fills.
fn record_sync(
    m: &crate::telemetry::Proxy,
    paths: &Paths,
    started: Instant,
    programmed: &tokio::sync::Notify,
) {
    programmed.notify_one();
    m.sync_duration.observe(started.elapsed().as_secs_f64());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    m.last_sync.set(now);
    let programmed = paths.dp.programmed();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.services.set(count(programmed.len()));
    m.endpoints
        .set(count(programmed.values().map(|p| p.backends.len()).sum()));
}

/// Reads each pinned map's fill and each program's run totals.
fn record_maps(m: &crate::telemetry::Proxy, pin_dir: &std::path::Path) {
    use crate::telemetry::{MapLabel, ProgramLabel};
    match dataplane::map_fill(pin_dir) {
        Ok(fill) => {
            for f in fill {
                let label = MapLabel { map: f.name };
                m.map_entries
                    .get_or_create(&label)
                    .set(i64::try_from(f.entries).unwrap_or(i64::MAX));
                m.map_max_entries
                    .get_or_create(&label)
                    .set(i64::from(f.max_entries));
            }
        }
        Err(e) => debug!(error = %e, "reading the map fills"),
    }
    for (program, took, runs) in dataplane::program_stats(pin_dir) {
        let label = ProgramLabel { program };
        m.program_runs
            .get_or_create(&label)
            .set(i64::try_from(runs).unwrap_or(i64::MAX));
        m.program_seconds
            .get_or_create(&label)
            .set(took.as_secs_f64());
    }
}

/// Both paths, and the health check servers with what each Service's
/// answers.
struct Paths {
    dp: Dataplane,
    ext: Arc<Mutex<External>>,
    health: health::HealthServers,
    health_of: BTreeMap<String, model::Health>,
}

impl Paths {
    fn sync_all(
        &mut self,
        desired: BTreeMap<String, ServicePlan>,
    ) -> Result<(usize, Vec<ServiceError>), ProxyError> {
        let mut socket = BTreeMap::new();
        let mut external = BTreeMap::new();
        let mut health_of = BTreeMap::new();
        for (name, plan) in desired {
            if let Some(h) = plan.health {
                health_of.insert(name.clone(), h);
            }
            external.insert(name.clone(), plan.external);
            socket.insert(name, plan.socket);
        }
        let (mut changed, errors) = self.dp.sync_all(&socket)?;
        // A set the TC path could not write is left as it was; the health
        // checks are still brought up to date before the error is told.
        let mut failed = None;
        if let Ok(mut ext) = self.ext.lock() {
            match ext.sync_all(&external) {
                Ok(n) => changed += n,
                Err(e) => failed = Some(e),
            }
        }
        if health_of != self.health_of || !self.health.serves_all() {
            self.health_of = health_of;
            self.serve_health();
        }
        failed.map_or(Ok((changed, errors)), |e| Err(e.into()))
    }

    /// Reprograms the named services from the catalog. A service that
    /// became invalid loses its frontends (kube-proxy drops such a service
    /// too).
    fn sync_dirty(
        &mut self,
        catalog: &Catalog,
        node: &NodeView,
        services: &BTreeSet<String>,
    ) -> Result<(usize, Vec<ServiceError>), ProxyError> {
        let mut changed = 0;
        let mut errors = Vec::new();
        let mut health_changed = false;
        let mut failed = None;
        for name in services {
            let plan = catalog.plan_of(name, node).unwrap_or_else(|e| {
                errors.push(e);
                ServicePlan::default()
            });
            let (n, e) = self.dp.sync_service(name, &plan.socket)?;
            changed += n;
            errors.extend(e);
            if let Ok(mut ext) = self.ext.lock() {
                match ext.sync_service(name, &plan.external) {
                    Ok(n) => changed += n,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            let old = match plan.health {
                Some(h) => self.health_of.insert(name.clone(), h),
                None => self.health_of.remove(name),
            };
            health_changed |= old.as_ref() != self.health_of.get(name);
        }
        if health_changed || !self.health.serves_all() {
            self.serve_health();
        }
        failed.map_or(Ok((changed, errors)), |e| Err(e.into()))
    }

    fn serve_health(&mut self) {
        let wanted = self
            .health_of
            .values()
            .map(|h| (h.port, h.clone()))
            .collect();
        self.health.set(wanted);
    }
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
