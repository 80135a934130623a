//! The overlay: this node's slice of the cluster network, leased in etcd in
//! Flannel's format, and routes to every other node's slice over `vxlan` or
//! `host-gw`.
//!
//! Start: read `<prefix>/config`, set up the VTEP (vxlan), take or reuse the
//! lease, reconcile every route, neighbour and FDB entry we own against all
//! leases (so entries of peers that left while we were down go), then write
//! subnet.env: the CNI plugin may wire pods from then on. Run: follow the
//! watch (with previous values) entry by entry, renew the lease at a third
//! of its TTL, re-take it if it was lost, and re-check the kernel every
//! resync period. Stop: keep the lease and the routes, so a restart changes
//! nothing; `leave` gives the lease back.

pub mod backend;
pub mod fastpath;
pub mod kube;
pub mod lease;
pub mod masq;
pub mod network;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use skiff_cni_lib::subnet_env::SubnetEnv;
use skiff_netlink::{Link, Netlink, SKIFF_ROUTE_PROTOCOL, VxlanSpec};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use backend::Dataplane;
use lease::{Event, Held, Lease, LeaseError, Registry};
use network::{BackendType, LeaseAttrs, NetworkConfig, VXLAN_OVERHEAD, VxlanData, format_mac};

pub const DEFAULT_SUBNET_FILE: &str = "/run/skiff/subnet.env";

#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub etcd: Vec<String>,
    /// For an etcd behind mutual TLS.
    pub etcd_tls: Option<lease::EtcdTls>,
    pub prefix: String,
    /// The underlay interface (default: the first up, non-loopback
    /// interface with an IPv4 address).
    pub iface: Option<String>,
    /// The address peers reach this node at (default: the interface's
    /// first IPv4 address).
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub lease_ttl: Duration,
    pub ip_masq: bool,
    pub resync: Duration,
    /// Kubernetes subnet-manager mode: the subnet is the Node's podCIDR,
    /// peers are found on Nodes, and the network config is this file
    /// (`etcd` and `prefix` are then unused).
    pub kube_subnet_mgr: Option<PathBuf>,
    /// Carry pod traffic between nodes in TC (`fastpath`: vxlan wrapped
    /// and unwrapped, host-gw routed), the kernel's VTEP and routes
    /// carrying only what the programs pass on.
    pub fast_path: bool,
    /// The pods' bridge, as the CNI config names it (the fast path's
    /// encap program goes on it).
    pub bridge: String,
    /// Where the CNI plugin records the node's pods (`<dataDir>/<network>`
    /// of its config): the fast path delivers to them by their veths.
    pub cni_records: PathBuf,
}

/// Where subnets are leased and peers found. One per overlay run, behind
/// an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    /// Flannel's etcd layout.
    Etcd(Registry),
    /// Nodes' podCIDRs and annotations.
    Kube(kube::KubeSubnets),
}

/// The point a list was read at, where its watch starts.
enum Since {
    Revision(i64),
    Nodes(kube::WatchFrom),
}

impl Source {
    async fn open(
        cfg: &OverlayConfig,
        ctx: &crate::role::NodeContext,
    ) -> Result<Self, OverlayError> {
        Ok(match &cfg.kube_subnet_mgr {
            Some(path) => {
                let client = ctx.client("overlay")?;
                Source::Kube(kube::KubeSubnets::new(client, &ctx.node_name, path))
            }
            None => Source::Etcd(
                Registry::connect(&cfg.etcd, &cfg.prefix, cfg.etcd_tls.as_ref()).await?,
            ),
        })
    }

    fn describe(&self, cfg: &OverlayConfig) -> String {
        match self {
            Source::Etcd(_) => format!("{}/config in etcd", cfg.prefix),
            Source::Kube(k) => k.config_path().display().to_string(),
        }
    }

    async fn config(&self) -> Result<NetworkConfig, LeaseError> {
        match self {
            Source::Etcd(r) => r.config().await,
            Source::Kube(k) => k.config().await,
        }
    }

    async fn list(&self) -> Result<(BTreeMap<Ipv4Network, Lease>, Since), LeaseError> {
        match self {
            Source::Etcd(r) => {
                let (all, rev) = r.list().await?;
                let leases = all.into_iter().map(|(k, (l, _, _))| (k, l)).collect();
                Ok((leases, Since::Revision(rev)))
            }
            Source::Kube(k) => {
                let (leases, from) = k.list().await?;
                Ok((leases, Since::Nodes(from)))
            }
        }
    }

    async fn watch(&self, since: Since, tx: mpsc::Sender<Vec<Event>>) -> Result<(), LeaseError> {
        match (self, since) {
            (Source::Etcd(r), Since::Revision(rev)) => r.watch(rev, tx).await,
            (Source::Kube(k), Since::Nodes(from)) => k.watch(from, tx).await,
            _ => Err(LeaseError::WatchEnded("a list of another source".into())),
        }
    }

    async fn acquire(
        &self,
        net: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: Option<Ipv4Network>,
        ttl: Duration,
    ) -> Result<Held, LeaseError> {
        match self {
            Source::Etcd(r) => r.acquire(net, attrs, previous, ttl.as_secs() as i64).await,
            Source::Kube(k) => k.acquire(net, attrs).await,
        }
    }

    /// Keeps the lease; `false` when it was lost.
    async fn renew(&self, held: &Held, attrs: &LeaseAttrs) -> Result<bool, LeaseError> {
        match self {
            // The key can go while its etcd lease lives on (deleted by
            // hand): check both.
            Source::Etcd(r) => {
                Ok(r.renew(held).await?
                    && r.still_ours(held, attrs.public_ip).await.unwrap_or(true))
            }
            Source::Kube(k) => k.still_ours(held, attrs).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Netlink(#[from] skiff_netlink::Error),
    #[error(transparent)]
    Masq(#[from] masq::MasqError),
    #[error(transparent)]
    NoClient(#[from] crate::role::NoClient),
    #[error("underlay: {0}")]
    Underlay(String),
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The VTEP's name: Flannel's, so its tooling and docs apply.
pub fn vtep_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

async fn underlay(nl: &Netlink, cfg: &OverlayConfig) -> Result<(Link, Ipv4Addr), OverlayError> {
    let link = match &cfg.iface {
        Some(name) => nl
            .link(name)
            .await?
            .ok_or_else(|| OverlayError::Underlay(format!("--iface {name}: no such interface")))?,
        None => {
            let mut found = None;
            for l in nl.links().await? {
                if l.name == "lo" || !l.up || l.name.starts_with("flannel.") {
                    continue;
                }
                if !nl.addresses(l.index).await?.is_empty() {
                    found = Some(l);
                    break;
                }
            }
            found.ok_or_else(|| {
                OverlayError::Underlay("no up interface with an IPv4 address: pass --iface".into())
            })?
        }
    };
    let ip = match cfg.public_ip {
        Some(ip) => ip,
        None => nl
            .addresses(link.index)
            .await?
            .first()
            .map(|a| a.0)
            .ok_or_else(|| OverlayError::Underlay(format!("{} has no IPv4 address", link.name)))?,
    };
    Ok((link, ip))
}

async fn wait_for_config(reg: &Source, cfg: &OverlayConfig) -> Result<NetworkConfig, OverlayError> {
    let mut warned = false;
    loop {
        match reg.config().await {
            Ok(c) => return Ok(c),
            Err(e @ (LeaseError::NoConfig { .. } | LeaseError::NoConfigFile { .. })) => {
                if !warned {
                    warn!(config = %reg.describe(cfg), error = %e, "waiting for the network config");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn enable_forwarding(ipv6: bool) -> Result<(), OverlayError> {
    let mut paths = vec!["/proc/sys/net/ipv4/ip_forward"];
    if ipv6 {
        paths.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for path in paths {
        std::fs::write(path, "1").map_err(|source| OverlayError::File {
            path: path.into(),
            source,
        })?;
    }
    Ok(())
}

/// Where host-gw peers route our IPv6 subnet: our IPv6 address on the
/// underlay, a routable one if it has one, else its link-local one (enough
/// between L2 neighbours, which host-gw peers are).
async fn underlay_ipv6(nl: &Netlink, under: &Link) -> Result<Ipv6Addr, OverlayError> {
    let v6: Vec<Ipv6Addr> = nl
        .all_addresses(under.index)
        .await?
        .into_iter()
        .filter_map(|(a, _)| match a {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        })
        .collect();
    v6.iter()
        .find(|a| !a.is_unicast_link_local())
        .or_else(|| v6.first())
        .copied()
        .ok_or_else(|| {
            OverlayError::Underlay(format!(
                "{} has no IPv6 address (not even a link-local one) for host-gw peers to route IPv6 to",
                under.name
            ))
        })
}

/// Everything the running overlay holds.
struct Node {
    reg: Arc<Source>,
    cfg: OverlayConfig,
    net: NetworkConfig,
    attrs: LeaseAttrs,
    dp: Dataplane,
    held: Held,
    leases: BTreeMap<Ipv4Network, Lease>,
    mtu: u32,
    fast: Option<fastpath::FastPath>,
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// Routes follow the leases within a minute.
    health: Arc<crate::telemetry::Check>,
}

impl Node {
    /// The routes gauge, from the leases held.
    fn count_routes(&self) {
        let others = self
            .leases
            .keys()
            .filter(|s| **s != self.held.subnet)
            .count();
        self.telemetry
            .overlay
            .routes
            .set(i64::try_from(others).unwrap_or(i64::MAX));
    }

    async fn relist(&mut self) -> Result<Since, OverlayError> {
        self.health.queued();
        let started = std::time::Instant::now();
        let (all, since) = self.reg.list().await?;
        self.leases = all;
        let changed = self.dp.resync(self.leases.values()).await?;
        self.health.synced();
        self.follow_vtep_routes().await;
        self.sync_fast_path();
        self.telemetry
            .overlay
            .reconcile
            .observe(started.elapsed().as_secs_f64());
        self.count_routes();
        info!(
            leases = self.leases.len(),
            added = changed.added,
            removed = changed.removed,
            "routes reconciled"
        );
        Ok(since)
    }

    /// Asks the kernel again how it reaches each vxlan peer's VTEP (`ip
    /// route get`): an address, route or rule added or removed since
    /// changes which peers the fast path sends to directly, through a
    /// gateway, or leaves to the kernel's VTEP. Applied by the
    /// `sync_fast_path` that follows.
    async fn follow_vtep_routes(&mut self) {
        let Some(underlay) = self.fast.as_ref().map(|f| f.underlay_index()) else {
            return;
        };
        let vteps: BTreeSet<Ipv4Addr> = self
            .leases
            .values()
            .filter_map(|l| self.dp.entries_for(l).fdb.map(|f| f.dst))
            .collect();
        let mut ways = BTreeMap::new();
        for vtep in vteps {
            if let Some(w) = vtep_way(&self.dp.nl, underlay, vtep).await {
                ways.insert(vtep, w);
            }
        }
        if let Some(f) = self.fast.as_mut() {
            f.set_vtep_ways(ways);
        }
    }

    /// The fast path's peers as the leases say (a failure is repaired at
    /// the next resync; the kernel's path is right meanwhile).
    fn sync_fast_path(&mut self) {
        if let Some(f) = self.fast.as_mut() {
            let all = self.leases.values().map(|l| self.dp.entries_for(l));
            if let Err(e) = f.sync(all) {
                warn!(error = %e, "overlay fast path: syncing peers failed");
            }
        }
    }

    fn write_subnet_env(&self) -> Result<(), OverlayError> {
        let mut env = SubnetEnv::for_subnet(
            self.net.network,
            self.held.subnet,
            self.mtu,
            self.cfg.ip_masq,
        );
        if let (Some(six), Some(own6)) = (
            self.net.ipv6,
            self.net
                .ipv6_subnet_for(self.held.subnet, self.held.ipv6_subnet),
        ) {
            env = env.with_ipv6(six.network, own6);
        }
        env.write(&self.cfg.subnet_file)
            .map_err(|source| OverlayError::File {
                path: self.cfg.subnet_file.display().to_string(),
                source,
            })
    }

    /// Takes a lease again after ours expired or was deleted, preferring
    /// the same subnet.
    async fn reacquire(&mut self) -> Result<(), OverlayError> {
        let before = self.held.subnet;
        self.held = self
            .reg
            .acquire(&self.net, &self.attrs, Some(before), self.cfg.lease_ttl)
            .await?;
        if self.held.subnet != before {
            warn!(old = %before, new = %self.held.subnet, "lease lost and a different subnet taken: pods must be re-created");
            self.dp.own = self.held.subnet;
            if let Some(f) = self.fast.as_mut()
                && let Err(e) = f.set_subnet(self.held.subnet)
            {
                warn!(error = %e, "overlay fast path: the new subnet was not written");
            }
            self.write_subnet_env()?;
        }
        Ok(())
    }

    async fn apply(&mut self, ev: Event) -> Result<bool, OverlayError> {
        match ev {
            Event::Put(l) => {
                // The same lease again (a Node's status heartbeat in kube
                // mode): the kernel already holds it; the resync repairs.
                if self.leases.get(&l.subnet) == Some(&l) {
                    return Ok(false);
                }
                if l.subnet == self.held.subnet && l.attrs.public_ip != self.attrs.public_ip {
                    error!(subnet = %l.subnet, other = %l.attrs.public_ip, "our subnet was written by another node");
                }
                let new = self.dp.entries_for(&l);
                let old = self.leases.get(&l.subnet).map(|o| self.dp.entries_for(o));
                if let Some(old) = old.as_ref().filter(|old| **old != new) {
                    self.dp.remove(old).await?;
                }
                self.dp.install(&new).await?;
                if let (Some(f), Some(fdb)) = (self.fast.as_ref(), new.fdb.as_ref()) {
                    let way = vtep_way(&self.dp.nl, f.underlay_index(), fdb.dst).await;
                    if let Some(f) = self.fast.as_mut() {
                        f.set_vtep_way(fdb.dst, way);
                    }
                }
                if let Some(f) = self.fast.as_mut()
                    && let Err(e) = f.put(old.as_ref(), &new)
                {
                    warn!(subnet = %l.subnet, error = %e, "overlay fast path: writing a peer failed");
                }
                self.leases.insert(l.subnet, l);
            }
            Event::Delete(s) => {
                if let Some(old) = self.leases.remove(&s) {
                    let old = self.dp.entries_for(&old);
                    self.dp.remove(&old).await?;
                    if let Some(f) = self.fast.as_mut()
                        && let Err(e) = f.remove(&old)
                    {
                        warn!(subnet = %s, error = %e, "overlay fast path: removing a peer failed");
                    }
                    info!(subnet = %s, "lease gone; routes removed");
                }
                if s == self.held.subnet {
                    warn!(subnet = %s, "our own lease was removed; taking it again");
                    self.reacquire().await?;
                }
            }
            Event::Resync => return Ok(true),
        }
        Ok(false)
    }
}

fn start_watch(reg: &Arc<Source>, since: Since) -> mpsc::Receiver<Vec<Event>> {
    let (tx, rx) = mpsc::channel(64);
    let reg = Arc::clone(reg);
    tokio::spawn(async move {
        let tx2 = tx.clone();
        if let Err(e) = reg.watch(since, tx).await {
            warn!(error = %e, "lease watch ended");
            let _ = tx2.send(vec![Event::Resync]).await;
        }
    });
    rx
}

impl crate::role::Role for OverlayConfig {
    type Error = OverlayError;

    fn name(&self) -> &'static str {
        "overlay"
    }

    async fn run(
        &self,
        ctx: crate::role::NodeContext,
        mut shutdown: crate::role::Shutdown,
    ) -> Result<(), OverlayError> {
        run(self.clone(), &ctx, crate::role::stopped(&mut shutdown)).await
    }
}

/// Runs the overlay until `shutdown` completes.
pub async fn run(
    mut cfg: OverlayConfig,
    ctx: &crate::role::NodeContext,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), OverlayError> {
    tokio::pin!(shutdown);
    let reg = Arc::new(Source::open(&cfg, ctx).await?);
    let net = tokio::select! {
        c = wait_for_config(&reg, &cfg) => c?,
        _ = &mut shutdown => return Ok(()),
    };
    let nl = Netlink::open()?;
    if let Source::Kube(k) = &*reg
        && cfg.iface.is_none()
        && cfg.public_ip.is_none()
    {
        // Peers reach the node at the address the kubelet reports.
        cfg.public_ip = k.internal_ip().await?;
        cfg.iface = match cfg.public_ip {
            Some(ip) => interface_with(&nl, ip).await?,
            None => None,
        };
    }
    let (under, public_ip) = underlay(&nl, &cfg).await?;
    let (mtu, route_dev, backend_data, vtep_mac) = match net.backend {
        BackendType::Vxlan => {
            let mtu = under.mtu.saturating_sub(VXLAN_OVERHEAD);
            let vtep = nl
                .ensure_vxlan(&VxlanSpec {
                    name: vtep_name(net.vni),
                    vni: net.vni,
                    local: public_ip,
                    underlay_index: under.index,
                    port: net.port,
                    mtu,
                })
                .await?;
            let mac = vtep
                .mac
                .ok_or_else(|| OverlayError::Underlay(format!("{} has no MAC", vtep.name)))?;
            let data = serde_json::to_value(VxlanData {
                vni: net.vni,
                vtep_mac: format_mac(&mac),
            })
            .ok();
            (mtu, vtep.index, data, Some(mac))
        }
        BackendType::HostGw => (under.mtu, under.index, None, None),
    };
    let public_ipv6 = if net.ipv6.is_some() && net.backend == BackendType::HostGw {
        Some(underlay_ipv6(&nl, &under).await?.to_string())
    } else {
        None
    };
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6,
        backend_type: net.backend.as_str().into(),
        backend_data,
    };
    let previous = SubnetEnv::read(&cfg.subnet_file)
        .ok()
        .map(|e| e.subnet_network());
    let held = reg.acquire(&net, &attrs, previous, cfg.lease_ttl).await?;
    if net.backend == BackendType::Vxlan {
        let mut own = vec![(IpAddr::V4(held.subnet.network()), 32)];
        if let Some(own6) = net.ipv6_subnet_for(held.subnet, held.ipv6_subnet) {
            own.push((IpAddr::V6(own6.network()), 128));
        }
        nl.ensure_addresses(route_dev, &own).await?;
    }
    enable_forwarding(net.ipv6.is_some())?;
    let fast = if cfg.fast_path {
        fastpath::try_start(&fastpath::Local {
            host_gw: net.backend == BackendType::HostGw,
            public_ip,
            subnet: held.subnet,
            underlay: under.name.clone(),
            underlay_index: under.index,
            vni: net.vni,
            port: net.port,
            vtep_mac: vtep_mac.unwrap_or_default(),
            bridge: cfg.bridge.clone(),
            cni_records: cfg.cni_records.clone(),
        })
    } else {
        None
    };
    let mut node = Node {
        reg: Arc::clone(&reg),
        dp: Dataplane {
            nl: nl.clone(),
            net: net.clone(),
            route_dev,
            own: held.subnet,
        },
        cfg,
        net,
        attrs,
        held,
        leases: BTreeMap::new(),
        mtu,
        fast,
        telemetry: ctx.telemetry.clone(),
        health: ctx.telemetry.check(
            "overlay",
            crate::telemetry::Watch::Sync(std::time::Duration::from_secs(60)),
        ),
    };
    let since = node.relist().await?;
    if node.cfg.ip_masq {
        masq::install(node.net.network, node.net.ipv6.map(|six| six.network))?;
    } else {
        let _ = masq::remove();
    }
    node.write_subnet_env()?;
    info!(subnet = %node.held.subnet, public_ip = %public_ip, backend = node.net.backend.as_str(), mtu, file = %node.cfg.subnet_file.display(), "overlay ready");

    let mut events = start_watch(&reg, since);
    let renew_every = (node.cfg.lease_ttl / 3).max(Duration::from_secs(1));
    let mut renew = tokio::time::interval(renew_every);
    renew.tick().await;
    let mut resync = tokio::time::interval(node.cfg.resync);
    resync.tick().await;
    // The CNI plugin makes the bridge with the first pod, and records
    // every pod: look often (an ioctl and a stat) so that a new pod's
    // traffic takes the fast path within moments.
    let mut pods = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!(subnet = %node.held.subnet, "overlay stopping; the lease and routes stay for the restart");
                return Ok(());
            }
            batch = events.recv() => {
                let mut relist = batch.is_none();
                for ev in batch.into_iter().flatten() {
                    match node.apply(ev).await {
                        Ok(r) => {
                            relist |= r;
                            node.count_routes();
                        }
                        Err(e) => {
                            warn!(error = %e, "applying a lease change failed; listing again");
                            relist = true;
                        }
                    }
                }
                // etcd may be away for a while: keep the kernel as it is
                // and retry, rather than exit and take routes' upkeep down.
                while relist {
                    match node.relist().await {
                        Ok(since) => {
                            events = start_watch(&reg, since);
                            relist = false;
                        }
                        Err(e) => {
                            warn!(error = %e, "listing leases failed; retrying in 1 s");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = &mut shutdown => return Ok(()),
                            }
                        }
                    }
                }
            }
            _ = renew.tick() => {
                let (lost, result) = match node.reg.renew(&node.held, &node.attrs).await {
                    Ok(kept) => (!kept, if kept { "renewed" } else { "lost" }),
                    Err(e) => {
                        warn!(error = %e, "renewing the lease failed; retrying");
                        (false, "error")
                    }
                };
                node.telemetry
                    .overlay
                    .renewals
                    .get_or_create(&crate::telemetry::ResultLabel { result })
                    .inc();
                if lost {
                    warn!(subnet = %node.held.subnet, "lease lost; taking it again");
                    if let Err(e) = node.reacquire().await {
                        warn!(error = %e, "taking the lease again failed; retrying at the next renewal");
                    }
                }
            }
            _ = pods.tick(), if node.fast.is_some() => {
                if let Some(f) = node.fast.as_mut() {
                    if let Err(e) = f.ensure_bridge() {
                        warn!(error = %e, "overlay fast path: attaching to the bridge failed");
                    }
                    if let Err(e) = f.sync_pods() {
                        warn!(error = %e, "overlay fast path: writing pods failed");
                    }
                }
            }
            _ = resync.tick() => {
                node.health.queued();
                let started = std::time::Instant::now();
                node.follow_vtep_routes().await;
                node.sync_fast_path();
                let done = node.dp.resync(node.leases.values()).await;
                node.telemetry
                    .overlay
                    .reconcile
                    .observe(started.elapsed().as_secs_f64());
                if done.is_ok() {
                    node.health.synced();
                }
                match done {
                    Ok(changed) if changed != backend::Changed::default() => {
                        info!(added = changed.added, removed = changed.removed, "resync repaired routes");
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "resync failed"),
                }
            }
        }
    }
}

/// How the kernel reaches the VTEP `vtep` now, for an underlay of index
/// `underlay` (None: not out of the underlay, or the lookup failed; the
/// kernel's VTEP then sends to it).
async fn vtep_way(nl: &Netlink, underlay: u32, vtep: Ipv4Addr) -> Option<fastpath::VtepWay> {
    match nl.route_to(vtep).await {
        Ok(to) => fastpath::way_of(to, underlay),
        Err(e) => {
            warn!(%vtep, error = %e, "looking up the route to a VTEP failed; the kernel's VTEP sends to it");
            None
        }
    }
}

/// The interface holding `ip`, if any.
async fn interface_with(nl: &Netlink, ip: Ipv4Addr) -> Result<Option<String>, OverlayError> {
    for l in nl.links().await? {
        if nl.addresses(l.index).await?.iter().any(|a| a.0 == ip) {
            return Ok(Some(l.name));
        }
    }
    Ok(None)
}

/// Gives this node's subnet back and removes what the overlay installed
/// here: the VTEP (with its neighbour and FDB entries), our routes, the
/// masquerade table and subnet.env.
pub async fn leave(cfg: &OverlayConfig) -> Result<Option<Ipv4Network>, OverlayError> {
    let nl = Netlink::open()?;
    let mut released = None;
    let net = if let Some(path) = &cfg.kube_subnet_mgr {
        // The subnet is the Node's podCIDR: it stays with the Node.
        std::fs::read(path)
            .ok()
            .and_then(|t| NetworkConfig::parse(&t).ok())
    } else {
        let reg = Registry::connect(&cfg.etcd, &cfg.prefix, cfg.etcd_tls.as_ref()).await?;
        let subnet = match SubnetEnv::read(&cfg.subnet_file) {
            Ok(e) => Some(e.subnet_network()),
            Err(_) => {
                let (_, ip) = underlay(&nl, cfg).await?;
                let (all, _) = reg.list().await?;
                all.into_values()
                    .find(|(l, _, _)| l.attrs.public_ip == ip)
                    .map(|(l, _, _)| l.subnet)
            }
        };
        if let Some(s) = subnet
            && reg.release(&s).await?
        {
            info!(subnet = %s, "lease released");
            released = Some(s);
        }
        reg.config().await.ok()
    };
    if let Some(net) = net {
        nl.delete_link_named(&vtep_name(net.vni)).await?;
    }
    for r in nl.routes(Some(SKIFF_ROUTE_PROTOCOL)).await? {
        let _ = nl.delete_route(&r).await;
    }
    let _ = masq::remove();
    match std::fs::remove_file(&cfg.subnet_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(OverlayError::File {
                path: cfg.subnet_file.display().to_string(),
                source: e,
            });
        }
        _ => {}
    }
    Ok(released)
}
