//! The `dns` role: cluster DNS on every node, per the Kubernetes DNS
//! specification, answered from memory and forwarded upstream for the rest.
//!
//! - `zone`: the cluster domain's records, replaced a Service at a time
//!   (pure);
//! - `server`: the UDP and TCP server around it;
//! - `forward`: the node's upstream resolvers;
//! - `cache`: their answers, kept for their TTL (pure);
//! - `view`: what the zone needs of Services and EndpointSlices (pure);
//! - `ready`: replies kept encoded, the hot path (pure);
//! - `publish`: this node's endpoint of the `kube-dns` Service.
//!
//! How pods reach it: their nameserver is the `kube-dns` Service's
//! ClusterIP, which `skiff-control` creates with no selector and
//! `trafficDistribution: PreferSameNode` (dual-stack when the service
//! range is). Each node's dns role writes the Service an EndpointSlice per
//! address family it listens on, `kube-system/kube-dns-<node>` (and
//! `-v6`), naming only itself, once it has read the zone; the node's proxy
//! then sends the ClusterIP to this server and nowhere else, so questions
//! never leave the node.
//!
//! How it fails over: when the role stops, fails or cannot listen, it
//! withdraws its slices, and the node's proxy, having no endpoint of its
//! own left, sends its pods' questions to the other nodes' servers until
//! the role (restarted with back-off) publishes itself again. The slices are
//! owned by the Node, so they go with a deleted node. What this does not
//! cover: the whole agent killed at once leaves the pinned dataplane
//! pointing at the node's own address until the agent is back (its
//! service manager restarts it), as a crashed kube-proxy leaves its rules.

pub mod cache;
pub mod forward;
pub mod publish;
pub mod ready;
pub mod server;
pub mod view;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tracing::info;

use crate::catalog::watch::{Dirty, Store};
use forward::Forwarder;
use server::{Limits, Resolver};
use view::Views;
use zone::{Zone, records_of};

/// The cluster DNS Service, as `skiff-control` creates it.
pub const SERVICE_NAMESPACE: &str = "kube-system";
pub const SERVICE_NAME: &str = "kube-dns";

/// How long one upstream is given to answer.
const UPSTREAM_ATTEMPT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// TTL of the zone's records and of its negative answers.
    pub ttl: u32,
    /// Addresses the server listens on; the first of each family is
    /// published as the node's endpoint of `kube-dns`.
    pub listen: Vec<IpAddr>,
    pub port: u16,
    /// Where other names are asked (none: they are refused).
    pub upstreams: Vec<SocketAddr>,
    /// Tasks receiving on each UDP socket.
    pub udp_workers: usize,
    /// The cache of upstream answers.
    pub cache: cache::CacheConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Domain(#[from] zone::BadDomain),
    #[error(transparent)]
    NoClient(#[from] crate::role::NoClient),
    #[error("dns: no address to listen on")]
    NoListen,
    #[error("dns: listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dns: watching the apiserver: {0}")]
    Watch(#[from] kube::runtime::watcher::Error),
}

impl crate::role::Role for DnsConfig {
    type Error = DnsError;

    fn name(&self) -> &'static str {
        "dns"
    }

    async fn run(
        &self,
        ctx: crate::role::NodeContext,
        mut shutdown: crate::role::Shutdown,
    ) -> Result<(), DnsError> {
        run(self, &ctx, crate::role::stopped(&mut shutdown)).await
    }
}

/// Serves until `shutdown` completes, then withdraws the node's endpoint.
pub async fn run(
    cfg: &DnsConfig,
    ctx: &crate::role::NodeContext,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DnsError> {
    let client = ctx.client("dns")?;
    let zone = Zone::new(&cfg.domain, cfg.ttl)?;
    let apex = zone.apex().clone();
    let resolver = Arc::new(
        Resolver::new(
            zone,
            Forwarder::new(cfg.upstreams.clone(), UPSTREAM_ATTEMPT),
            Limits::default(),
            cfg.cache,
        )
        .counted(server::Counters::new(&ctx.telemetry.dns)),
    );
    if cfg.listen.is_empty() {
        return Err(DnsError::NoListen);
    }
    let publisher = publish::Publisher::new(client.clone(), &ctx.node_name, &cfg.listen, cfg.port);
    // Dropped (aborting every server task) when the role ends.
    let mut servers = tokio::task::JoinSet::new();
    for ip in &cfg.listen {
        let addr = SocketAddr::new(*ip, cfg.port);
        let bound = async {
            let udp = Arc::new(UdpSocket::bind(addr).await?);
            Ok::<_, std::io::Error>((udp, TcpListener::bind(addr).await?))
        };
        let (udp, tcp) = match bound.await {
            Ok(b) => b,
            Err(source) => {
                // An endpoint a crashed run left must not draw this
                // node's questions to a server that is not there.
                publisher.withdraw().await;
                return Err(DnsError::Bind { addr, source });
            }
        };
        // Workers share one socket: each takes the next packet, so the
        // load spreads evenly (SO_REUSEPORT hashes a few busy clients
        // onto one socket, and measured slower).
        for _ in 0..cfg.udp_workers.max(1) {
            servers.spawn(resolver.clone().serve_udp(udp.clone()));
        }
        servers.spawn(resolver.clone().serve_tcp(tcp));
    }
    info!(
        listen = ?cfg.listen, port = cfg.port, domain = %apex,
        upstreams = ?cfg.upstreams, "dns serving"
    );
    let (synced_tx, synced_rx) = tokio::sync::watch::channel(false);
    // Ready once the zone was read, as CoreDNS's kubernetes plugin.
    let health = ctx.telemetry.check(
        "dns",
        crate::telemetry::Watch::Sync(std::time::Duration::from_secs(60)),
    );
    let reconcile = {
        let resolver = resolver.clone();
        move |store: &Store<Views>, dirty: Dirty| {
            health.queued();
            let relisted = dirty.all;
            update(&resolver, &apex, store, dirty);
            health.synced();
            if relisted {
                // A relist's buffers (the list bodies, the replaced
                // catalog and zone) are free now: give them back.
                crate::memory::release_free();
            }
            if !resolver.synced() {
                resolver.set_synced();
                let _ = synced_tx.send(true);
                info!("dns zone read from the apiserver");
            }
        }
    };
    let result = tokio::select! {
        r = crate::catalog::watch::run(client, reconcile) => r.map_err(DnsError::from),
        () = publisher.keep(synced_rx) => Ok(()),
        () = shutdown => Ok(()),
    };
    publisher.withdraw().await;
    drop(servers);
    info!("dns stopped");
    result
}

/// Services rebuilt per change of the zone on a relist: few enough that
/// their records, built before the lock is taken, stay small, and reuse
/// the same memory chunk after chunk instead of piling up between the
/// zone's own allocations.
const CHUNK: usize = 256;

/// Brings the zone up to the catalog: every Service after a relist, else
/// the ones that changed. Records are built before the lock is taken.
fn update(resolver: &Resolver, apex: &hickory_proto::rr::Name, store: &Store<Views>, dirty: Dirty) {
    let catalog = &store.catalog;
    let build = |key: &str| {
        catalog
            .services
            .get(key)
            .map(|svc| records_of(apex, key, svc, catalog.slices.get(key)))
            .unwrap_or_default()
    };
    let keys: Vec<String> = if dirty.all {
        let zone = resolver.zone();
        let mut all: Vec<String> = catalog
            .services
            .keys()
            .map(|k| String::from(&**k))
            .chain(zone.services().map(String::from))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    } else {
        dirty.services.into_iter().collect()
    };
    for chunk in keys.chunks(CHUNK) {
        let built: Vec<(&str, zone::ServiceRecords)> =
            chunk.iter().map(|k| (k.as_str(), build(k))).collect();
        resolver.edit_zone(|zone| {
            for (key, records) in built {
                zone.set_service(key, records);
            }
        });
    }
}
