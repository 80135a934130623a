//! The `ingress` role (off by default): the node serves HTTP and HTTPS
//! for every Ingress of its class (`--ingress-class`, default `skiff`), on
//! `--ingress-http-address` (default `0.0.0.0:80`) and
//! `--ingress-https-address` (default `0.0.0.0:443`).
//!
//! It watches Ingresses, IngressClasses, Services and EndpointSlices, and
//! each Secret an Ingress of its class names for TLS (one watch by name
//! each, which the Node authorizer allows for such Secrets alone). Each
//! batch of changes rebuilds the routing table ([`routes`]), the ready
//! endpoints of every backend and the certificates ([`tls`]), swapped in
//! whole, so a request sees one consistent state. Requests go straight to
//! a ready endpoint, never through the ClusterIP (see [`serve`]), on worker
//! threads of their own ([`workers`]: one per core, each with its own
//! listeners and connections to endpoints, as nginx's workers).
//!
//! Each Ingress served lists this node's address in
//! `status.loadBalancer.ingress` (the others' stay: each node adds and
//! removes its own), and the address leaves when the role stops. Status
//! and Warning Events are written by a task of their own, so a rebuild
//! never waits on the apiserver.

mod pool;
pub mod routes;
mod serve;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::catalog;
use routes::{Backend, PortRef, Table};

/// The ingress role's configuration.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    /// The IngressClass this node serves.
    pub class: String,
    /// Where plain HTTP is served.
    pub http: SocketAddr,
    /// Where HTTPS is served.
    pub https: SocketAddr,
    /// The address this node adds to the status of each Ingress it serves
    /// (`status.loadBalancer.ingress`).
    pub address: IpAddr,
    /// The node's name, as the source of its Events.
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    NoClient(#[from] crate::role::NoClient),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the node's own certificate: {0}")]
    Tls(String),
    #[error("starting the ingress workers: {0}")]
    Workers(std::io::Error),
}

/// The ready endpoints of backends: by namespace, Service and port, so that
/// a request looks them up by reference, with no key made.
pub type ByBackend = HashMap<String, HashMap<String, Vec<(PortRef, Endpoints)>>>;

/// What requests are routed by: swapped whole on each change.
#[derive(Default)]
pub struct State {
    pub table: Table,
    /// The ready endpoints of each backend of the table whose Service
    /// exists.
    pub endpoints: ByBackend,
    /// The certificates served by SNI.
    pub certs: tls::Certs,
}

/// The current [`State`], swapped whole on each change.
#[derive(Default)]
pub struct Current {
    state: RwLock<Arc<State>>,
}

impl Current {
    /// The state as it is now (shared).
    pub fn get(&self) -> Arc<State> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, next: State) {
        let next = Arc::new(next);
        match self.state.write() {
            Ok(mut s) => *s = next,
            Err(p) => *p.into_inner() = next,
        }
    }
}

/// A backend's ready endpoints, and how they are spoken to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Each address, with its URI authority made once.
    pub addrs: Vec<(SocketAddr, http::uri::Authority)>,
    /// HTTP/2 with prior knowledge (the Service port's `appProtocol` is
    /// `kubernetes.io/h2c`), not HTTP/1.1.
    pub h2c: bool,
}

/// The `appProtocol` of a Service port spoken to as HTTP/2 in clear text.
pub const H2C: &str = "kubernetes.io/h2c";

impl State {
    /// The ready endpoints of `b`; None when its Service does not exist.
    pub fn endpoints_of(&self, b: &Backend) -> Option<&Endpoints> {
        let ports = self.endpoints.get(&b.namespace)?.get(&b.service)?;
        ports.iter().find(|(p, _)| *p == b.port).map(|(_, e)| e)
    }
}

/// The endpoints of Service port `port` of `svc`, from `slices` (the
/// Service's own EndpointSlices), as kube-proxy chooses them
/// ([`catalog::Readiness`]): the ready ones, or, when none is, those still
/// serving while they terminate.
fn ready_endpoints(svc: &Service, port: &PortRef, slices: &[&EndpointSlice]) -> Endpoints {
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    let Some(sp) = ports.and_then(|ps| {
        ps.iter().find(|p| match port {
            PortRef::Number(n) => p.port == *n,
            PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
        })
    }) else {
        return Endpoints::default();
    };
    let h2c = sp.app_protocol.as_deref() == Some(H2C);
    let name = sp.name.as_deref().unwrap_or_default();
    let (mut ready, mut fallback) = (Vec::new(), Vec::new());
    for slice in slices {
        let Some(number) = slice.ports.iter().flatten().find_map(|p| {
            (p.name.as_deref().unwrap_or_default() == name
                && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .then_some(p.port)
                .flatten()
        }) else {
            continue;
        };
        let Ok(number) = u16::try_from(number) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let state = catalog::Readiness::of(ep);
            let into = if state.ready {
                &mut ready
            } else if state.serving_terminating {
                &mut fallback
            } else {
                continue;
            };
            into.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, number)),
            );
        }
    }
    let mut out = if ready.is_empty() { fallback } else { ready };
    out.sort();
    out.dedup();
    let addrs = out
        .into_iter()
        .filter_map(|a| {
            http::uri::Authority::try_from(a.to_string())
                .ok()
                .map(|auth| (a, auth))
        })
        .collect();
    Endpoints { addrs, h2c }
}

/// Whether the IngressClass `class` is marked the cluster's default.
fn is_default_class(classes: &[Arc<IngressClass>], class: &str) -> bool {
    classes.iter().any(|c| {
        c.metadata.name.as_deref() == Some(class)
            && c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(routes::DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true")
    })
}

/// What the role's watches hold.
pub struct Objects<'a> {
    pub ingresses: &'a [Arc<Ingress>],
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub secrets: &'a HashMap<tls::SecretKey, tls::Loaded>,
}

/// The state for the objects the watches hold (`is_default`: this class
/// is the cluster's default), reusing the certificates in `parsed`.
pub fn build(
    o: &Objects<'_>,
    class: &str,
    is_default: bool,
    parsed: &mut tls::Parsed,
) -> (State, Vec<routes::Skipped>) {
    let Objects {
        ingresses,
        services,
        slices,
        secrets,
    } = *o;
    let (table, skipped) = Table::build(ingresses.iter().map(AsRef::as_ref), class, is_default);
    let svcs: HashMap<String, &Service> = services
        .iter()
        .map(|s| (catalog::service_key(s), s.as_ref()))
        .collect();
    let mut by_service: HashMap<String, Vec<&EndpointSlice>> = HashMap::new();
    for s in slices {
        if let Some(owner) = catalog::slice_owner(s) {
            by_service.entry(owner).or_default().push(s.as_ref());
        }
    }
    let mut endpoints = ByBackend::new();
    let mut skipped = skipped;
    for b in table.backends() {
        let k = format!("{}/{}", b.namespace, b.service);
        match svcs.get(&k) {
            Some(svc) => {
                let ports = endpoints
                    .entry(b.namespace.clone())
                    .or_default()
                    .entry(b.service.clone())
                    .or_default();
                // Several rules may share a backend: its endpoints once.
                if !ports.iter().any(|(p, _)| *p == b.port) {
                    let slices = by_service.get(&k).map_or(&[][..], Vec::as_slice);
                    ports.push((b.port.clone(), ready_endpoints(svc, &b.port, slices)));
                }
            }
            None => {
                let missing = routes::Skipped {
                    ingress: b.ingress.clone(),
                    reason: "ServiceNotFound",
                    why: format!("service {k} not found"),
                };
                if !skipped.contains(&missing) {
                    skipped.push(missing);
                }
            }
        }
    }
    let (certs, bad_tls) = tls::certs(table.tls(), secrets, parsed);
    skipped.extend(bad_tls);
    (
        State {
            table,
            endpoints,
            certs,
        },
        skipped,
    )
}

/// How many worker threads serve requests: one per core.
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl crate::role::Role for IngressConfig {
    type Error = IngressError;

    fn name(&self) -> &'static str {
        "ingress"
    }

    async fn run(
        &self,
        ctx: crate::role::NodeContext,
        mut shutdown: crate::role::Shutdown,
    ) -> Result<(), IngressError> {
        let client = ctx.client("ingress")?;
        let threads = workers();
        let bind = |addr: SocketAddr| {
            serve::bind_each(addr, threads).map_err(|source| IngressError::Bind { addr, source })
        };
        let listeners = bind(self.http)?
            .into_iter()
            .zip(bind(self.https)?)
            .collect();
        let state = Arc::new(Current::default());
        let fallback = tls::self_signed(vec![self.address.to_string(), self.node_name.clone()])
            .map_err(IngressError::Tls)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls::server_config(state.clone(), fallback).map_err(IngressError::Tls)?,
        );
        let mut workers =
            serve::Workers::start(state.clone(), self.https.port(), listeners, acceptor)
                .map_err(IngressError::Workers)?;
        let health = ctx.telemetry.check(
            "ingress",
            crate::telemetry::Watch::Sync(std::time::Duration::from_secs(60)),
        );
        info!(http = %self.http, https = %self.https, class = %self.class, threads, "ingress serving");
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        tokio::select! {
            why = workers.ended() => warn!(why, "an ingress worker ended"),
            () = follow(client.clone(), self, state, health, published.clone()) => {}
            () = crate::role::stopped(&mut shutdown) => {}
        }
        workers.stop().await;
        // This node serves them no more: its address leaves their status.
        let served = std::mem::take(
            &mut *published
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (ns, name) in served {
            let api: Api<Ingress> = Api::namespaced(client.clone(), &ns);
            if let Ok(i) = api.get_status(&name).await {
                publish(&api, &i, self.address, false).await;
            }
        }
        Ok(())
    }
}

/// A Warning Event on the Ingress `i` for what of it is not served.
async fn warn_event(client: &Client, node: &str, i: &Ingress, s: &routes::Skipped) {
    use k8s_openapi::api::core::v1::Event;
    let ns = i.metadata.namespace.clone().unwrap_or_default();
    let name = i.metadata.name.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let ev = serde_json::json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}."), "namespace": ns},
        "involvedObject": {"kind": "Ingress", "apiVersion": "networking.k8s.io/v1",
            "name": name, "namespace": ns, "uid": i.metadata.uid},
        "type": "Warning", "reason": s.reason, "message": s.why,
        "source": {"component": "skiff-ingress", "host": node},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1});
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    match serde_json::from_value::<Event>(ev) {
        Ok(ev) => {
            if let Err(e) = api.create(&Default::default(), &ev).await {
                warn!(error = %e, "event not recorded");
            }
        }
        Err(e) => warn!(error = %e, "event not made"),
    }
}

/// Adds (`serve`) or removes this node's `address` in `i`'s
/// `status.loadBalancer.ingress`, if it is not so already; the other
/// entries (other nodes', hostnames) stay as they are. Each write is
/// conditional on the resourceVersion read: when another node wrote first,
/// the status is read again and the write retried.
async fn publish(api: &Api<Ingress>, i: &Ingress, address: IpAddr, serve: bool) {
    let ip = address.to_string();
    let name = i.metadata.name.as_deref().unwrap_or_default();
    let ours = |e: &serde_json::Value| {
        e.get("ip").and_then(serde_json::Value::as_str) == Some(ip.as_str())
    };
    let mut current = std::borrow::Cow::Borrowed(i);
    for _ in 0..5 {
        let mut entries: Vec<serde_json::Value> = current
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .map(|v| {
                v.iter()
                    .filter_map(|e| serde_json::to_value(e).ok())
                    .collect()
            })
            .unwrap_or_default();
        if entries.iter().any(ours) == serve {
            return;
        }
        if serve {
            entries.push(serde_json::json!({"ip": ip}));
        } else {
            entries.retain(|e| !ours(e));
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": {"loadBalancer": {"ingress": entries}},
        });
        let written = api
            .patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await;
        match written {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_status(name).await {
                Ok(fresh) => current = std::borrow::Cow::Owned(fresh),
                Err(e) => {
                    tracing::debug!(ingress = name, error = %e, "status not read again");
                    return;
                }
            },
            Err(e) => {
                tracing::debug!(ingress = name, error = %e, "status not written; the next change retries");
                return;
            }
        }
    }
}

/// Keeps `state` in step with the apiserver, and the served Ingresses'
/// status with this node's address (`published`: those it is in).
async fn follow(
    client: Client,
    cfg: &IngressConfig,
    state: Arc<Current>,
    health: Arc<crate::telemetry::Check>,
    published: Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    let class = cfg.class.clone();
    let (ingresses, w1) = reflector::store::<Ingress>();
    let (classes, w2) = reflector::store::<IngressClass>();
    let (services, w3) = reflector::store::<Service>();
    let (slices, w4) = reflector::store::<EndpointSlice>();
    let s1 = reflected(&client, w1, ingress_changes());
    let s2 = reflected(&client, w2, |_| true);
    let s3 = reflected(&client, w3, |_| true);
    let s4 = reflected(&client, w4, |_| true);
    // The Secrets named for TLS, each watched by name; a change of one
    // comes in as an event of its own.
    let secrets: SecretStore = Arc::default();
    let mut watching: HashMap<tls::SecretKey, crate::role::AbortOnDrop> = HashMap::new();
    let (changed, s5) = futures::channel::mpsc::unbounded::<()>();
    let mut parsed = tls::Parsed::new();
    let mut events = stream::select_all([s1, s2, s3, s4, s5.boxed()]).ready_chunks(1024);
    let mut last_skipped: Vec<routes::Skipped> = Vec::new();
    // The latest state for the status; every warning, in order.
    let (report, reports) = tokio::sync::watch::channel(None);
    let (warn_tx, warnings) = tokio::sync::mpsc::unbounded_channel();
    let _reporter = crate::role::AbortOnDrop(tokio::spawn(reporter(
        Reporter {
            client: client.clone(),
            class: class.clone(),
            address: cfg.address,
            node_name: cfg.node_name.clone(),
            published,
        },
        reports,
        warnings,
    )));
    while events.next().await.is_some() {
        // Routes are built once each kind has been listed.
        if !(listed(&ingresses) && listed(&classes) && listed(&services) && listed(&slices)) {
            continue;
        }
        health.queued();
        let is_default = is_default_class(&classes.state(), &class);
        let all = ingresses.state();
        let known = lock(&secrets).clone();
        let (next, skipped) = build(
            &Objects {
                ingresses: &all,
                services: &services.state(),
                slices: &slices.state(),
                secrets: &known,
            },
            &class,
            is_default,
            &mut parsed,
        );
        // Watch the Secrets the table names now, and those alone.
        let wanted: std::collections::HashSet<tls::SecretKey> = next
            .table
            .tls()
            .iter()
            .map(|t| (t.namespace.clone(), t.secret.clone()))
            .collect();
        watching.retain(|k, _| wanted.contains(k));
        lock(&secrets).retain(|k, _| wanted.contains(k));
        for k in wanted {
            if let std::collections::hash_map::Entry::Vacant(e) = watching.entry(k) {
                let k = e.key().clone();
                lock(&secrets).insert(k.clone(), tls::Loaded::Pending);
                let task = watch_secret(client.clone(), k, secrets.clone(), changed.clone());
                e.insert(crate::role::AbortOnDrop(task));
            }
        }
        for s in skipped.iter().filter(|s| !last_skipped.contains(s)) {
            warn!(ingress = %s.ingress, why = %s.why, "ingress rule not served");
            let found = all.iter().find(|i| routes::key(i) == s.ingress);
            if let Some(i) = found {
                let _ = warn_tx.send((i.clone(), s.clone()));
            }
        }
        last_skipped = skipped;
        let rules = next.table.len();
        state.set(next);
        health.synced();
        tracing::debug!(rules, "ingress routes rebuilt");
        // Status and Events are written by a task of their own: the next
        // rebuild never waits on the apiserver.
        report.send_replace(Some(Arc::new(Report {
            ingresses: all,
            is_default,
        })));
    }
}

/// The state whose Ingresses' status the reporting task writes.
struct Report {
    ingresses: Vec<Arc<Ingress>>,
    is_default: bool,
}

/// What the reporting task writes as.
struct Reporter {
    client: Client,
    class: String,
    address: IpAddr,
    node_name: String,
    /// The Ingresses whose status lists this node.
    published: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

/// Writes the Warning Events, and each [`Report`] (the latest when several
/// came while it wrote one): this node's address in the status of the
/// Ingresses it serves and out of the others'.
async fn reporter(
    r: Reporter,
    mut reports: tokio::sync::watch::Receiver<Option<Arc<Report>>>,
    mut warnings: tokio::sync::mpsc::UnboundedReceiver<(Arc<Ingress>, routes::Skipped)>,
) {
    loop {
        tokio::select! {
            w = warnings.recv() => match w {
                Some((i, s)) => warn_event(&r.client, &r.node_name, &i, &s).await,
                None => return,
            },
            changed = reports.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(report) = reports.borrow_and_update().clone() else {
                    continue;
                };
                let mut served = Vec::new();
                for i in &report.ingresses {
                    let ns = i.metadata.namespace.clone().unwrap_or_default();
                    let ours = routes::of_class(i, &r.class, report.is_default);
                    if ours {
                        served.push((ns.clone(), i.metadata.name.clone().unwrap_or_default()));
                    }
                    publish(&Api::namespaced(r.client.clone(), &ns), i, r.address, ours).await;
                }
                *lock(&r.published) = served;
            }
        }
    }
}

/// The Secrets named for TLS, as their watches have them.
type SecretStore = Arc<std::sync::Mutex<HashMap<tls::SecretKey, tls::Loaded>>>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Follows the Secret `key` by name into `secrets`, telling `changed` of
/// each change, until aborted.
fn watch_secret(
    client: Client,
    key: tls::SecretKey,
    secrets: SecretStore,
    changed: futures::channel::mpsc::UnboundedSender<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Secret> = Api::namespaced(client, &key.0);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", key.1));
        let mut w = watcher(api, cfg).default_backoff().boxed();
        // What a (re)list has brought so far.
        let mut listing: Option<Arc<Secret>> = None;
        while let Some(ev) = w.next().await {
            let now = match ev {
                Ok(watcher::Event::Init) => {
                    listing = None;
                    continue;
                }
                Ok(watcher::Event::InitApply(s)) => {
                    listing = Some(Arc::new(s));
                    continue;
                }
                Ok(watcher::Event::InitDone) => listing
                    .take()
                    .map_or(tls::Loaded::Missing, tls::Loaded::Present),
                Ok(watcher::Event::Apply(s)) => tls::Loaded::Present(Arc::new(s)),
                Ok(watcher::Event::Delete(_)) => tls::Loaded::Missing,
                Err(e) => {
                    warn!(secret = %format!("{}/{}", key.0, key.1), error = %e, "watching a TLS secret");
                    continue;
                }
            };
            lock(&secrets).insert(key.clone(), now);
            let _ = changed.unbounded_send(());
        }
    })
}

/// Every kind `K` in the cluster, kept in `writer`'s store: a stream that
/// yields once per event that `matters` keeps (the store takes every one).
fn reflected<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
    mut matters: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
) -> futures::stream::BoxStream<'static, ()>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .filter_map(move |ev| {
        let keep = ev.as_ref().map_or(true, &mut matters);
        futures::future::ready(keep.then_some(()))
    })
    .boxed()
}

/// Whether an Ingress event changes what is routed: its spec (by
/// generation) or annotations, its coming or going. The status this role
/// writes itself changes neither, so a thousand status writes do not
/// rebuild the table a thousand times.
fn ingress_changes() -> impl FnMut(&watcher::Event<Ingress>) -> bool + Send + 'static {
    type Seen = (
        Option<i64>,
        Option<std::collections::BTreeMap<String, String>>,
    );
    let mut seen: HashMap<String, Seen> = HashMap::new();
    move |ev| {
        let key = routes::key;
        let now = |i: &Ingress| (i.metadata.generation, i.metadata.annotations.clone());
        match ev {
            watcher::Event::Apply(i) => seen.insert(key(i), now(i)) != Some(now(i)),
            watcher::Event::InitApply(i) => {
                seen.insert(key(i), now(i));
                false
            }
            watcher::Event::Delete(i) => {
                seen.remove(&key(i));
                true
            }
            watcher::Event::Init => {
                seen.clear();
                true
            }
            watcher::Event::InitDone => true,
        }
    }
}

/// Whether `store` has had its first list.
fn listed<K>(store: &reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
        .expect("a slice")
    }

    #[test]
    fn endpoints_are_the_ready_ones_or_else_those_still_serving() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 80, "appProtocol": H2C}]},
        }))
        .expect("a Service");
        let port = PortRef::Number(80);
        let addrs =
            |e: &Endpoints| -> Vec<String> { e.addrs.iter().map(|(a, _)| a.to_string()).collect() };
        let mixed = slice(json!([
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
        ]));
        let e = ready_endpoints(&svc, &port, &[&mixed]);
        assert_eq!(addrs(&e), ["10.0.0.1:8080"]);
        assert!(e.h2c);
        assert_eq!(e.addrs[0].1.as_str(), "10.0.0.1:8080");
        // None ready: a terminating endpoint that still serves takes the
        // requests, as kube-proxy sends them.
        let draining = slice(json!([
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        assert_eq!(
            addrs(&ready_endpoints(&svc, &port, &[&draining])),
            ["10.0.0.2:8080"]
        );
        assert!(
            ready_endpoints(&svc, &PortRef::Name("grpc".into()), &[&mixed])
                .addrs
                .is_empty()
        );
    }
}
