//! The overlay's fast path: the `skiff-overlay` programs wrap and unwrap
//! pod traffic in TC (vxlan) or route it (host-gw) (see
//! `ebpf/src/overlay.rs`), next to the kernel's VTEP and routes, which stay
//! as they are and carry whatever the programs pass on.
//!
//! Here: `OVERLAY_LOCAL` describes this node, `OVERLAY_PEERS` holds one
//! entry per peer lease (the same leases, through the same
//! [`backend::entries`](super::backend::entries), that make the kernel's
//! entries) and `OVERLAY_PEERS6` its IPv6 subnet on a dual-stack network,
//! `OVERLAY_PODS` and `OVERLAY_PODS6` this node's pods as the CNI plugin
//! recorded them, the decap program goes first on the underlay interface and the
//! encap program on the pods' bridge once the CNI plugin has made it.
//!
//! The links are held by this process, not pinned: when the agent stops
//! or dies they go with it, and the kernel's path carries the traffic
//! until the next agent attaches again. Nothing is left behind to go stale.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError};
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use ipnetwork::Ipv4Network;
use skiff_ebpf_common::{
    OVERLAY_HOST_GW, OverlayLocal, OverlayPeer, OverlayPeer6, PEER_ONLINK, maps as names,
};
use tracing::{info, warn};

use super::backend::Entries;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-overlay"));

const ENCAP: &str = "skiff_vxlan_encap";
const DECAP: &str = "skiff_vxlan_decap";

#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("loading the overlay's programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the overlay's object has no {0}")]
    Missing(&'static str),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> FastPathError {
    move |source| FastPathError::Map { map, source }
}

/// What the fast path needs to know of this node.
#[derive(Clone, Debug)]
pub struct Local {
    /// host-gw: packets are routed as they are; else wrapped in VXLAN.
    pub host_gw: bool,
    pub public_ip: Ipv4Addr,
    pub subnet: Ipv4Network,
    pub underlay: String,
    pub underlay_index: u32,
    pub vni: u32,
    pub port: u16,
    pub vtep_mac: [u8; 6],
    /// The pods' bridge, as the CNI config names it.
    pub bridge: String,
    /// Where `skiff-cni` records this node's pods (`<dataDir>/<network>`).
    pub cni_records: PathBuf,
}

/// Pods are read again this often even when their records did not change
/// (a veth is made after its address is recorded). For [`PODS_PENDING`]
/// after a read found a recorded veth missing, they are read at every call.
const PODS_RECHECK: Duration = Duration::from_secs(2);
/// How long a missing veth is looked for at every call: a pod being made
/// has its veth within this; a record left of a pod gone never will.
const PODS_PENDING: Duration = Duration::from_secs(10);

pub struct FastPath {
    ebpf: Ebpf,
    local_map: Array<MapData, OverlayLocal>,
    peers: LpmTrie<MapData, u32, OverlayPeer>,
    peers6: LpmTrie<MapData, [u32; 4], OverlayPeer6>,
    pods: HashMap<MapData, u32, u32>,
    pods6: HashMap<MapData, [u32; 4], u32>,
    local: OverlayLocal,
    bridge: String,
    /// The bridge's index and the encap link on it.
    bridge_link: Option<(u32, SchedClassifierLinkId)>,
    /// What `peers` holds, by (network address, prefix).
    held: Mirror<(Ipv4Addr, u8), OverlayPeer>,
    /// What `peers6` holds.
    held6: Mirror<(Ipv6Addr, u8), OverlayPeer6>,
    cni_records: PathBuf,
    /// How the kernel reaches each vxlan peer's VTEP; a peer not here is
    /// left to the kernel's VTEP.
    vteps: BTreeMap<Ipv4Addr, VtepWay>,
    /// What `pods` and `pods6` hold: address to host veth (ifindex).
    pods_held: Mirror<u32, u32>,
    pods6_held: Mirror<[u32; 4], u32>,
    /// The records' directory as last read (modified time) and when.
    pods_read: Option<(Option<SystemTime>, Instant)>,
    /// Since when reads have found a record whose veth was not there.
    pods_pending: Option<Instant>,
}

/// What this process wrote into one BPF map, so that a sync writes only
/// what changed (and the map is never read back). `write(k, Some(v))`
/// puts an entry in the map, `write(k, None)` deletes it.
struct Mirror<K, V>(BTreeMap<K, V>);

impl<K: Ord + Copy, V: PartialEq + Copy> Mirror<K, V> {
    fn new() -> Self {
        Self(BTreeMap::new())
    }

    /// `k` holds `v` (written unless it already does), or nothing (deleted
    /// if it was written; already gone is fine).
    fn set(
        &mut self,
        k: K,
        v: Option<V>,
        write: &mut impl FnMut(K, Option<V>) -> Result<(), MapError>,
    ) -> Result<(), MapError> {
        if self.0.get(&k) == v.as_ref() {
            return Ok(());
        }
        match (write(k, v), v) {
            (Ok(()), Some(v)) => {
                self.0.insert(k, v);
            }
            (Ok(()) | Err(MapError::KeyNotFound), None) => {
                self.0.remove(&k);
            }
            (Err(e), _) => return Err(e),
        }
        Ok(())
    }

    /// Exactly `want`: what is not in it deleted, the rest set.
    fn sync(
        &mut self,
        want: BTreeMap<K, V>,
        mut write: impl FnMut(K, Option<V>) -> Result<(), MapError>,
    ) -> Result<(), MapError> {
        let gone: Vec<K> = self
            .0
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in gone {
            self.set(k, None, &mut write)?;
        }
        for (k, v) in want {
            self.set(k, Some(v), &mut write)?;
        }
        Ok(())
    }
}

/// Writes `OVERLAY_PEERS6` for a [`Mirror`].
fn peers6_writer(
    peers: &mut LpmTrie<MapData, [u32; 4], OverlayPeer6>,
) -> impl FnMut((Ipv6Addr, u8), Option<OverlayPeer6>) -> Result<(), MapError> + '_ {
    move |(addr, prefix), v| {
        let k = Key::new(u32::from(prefix), words6(addr));
        match v {
            Some(peer) => peers.insert(&k, peer, 0),
            None => peers.remove(&k),
        }
    }
}

/// An IPv6 address as the maps hold it (network byte order).
fn words6(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Writes `OVERLAY_PEERS` for a [`Mirror`].
fn peers_writer(
    peers: &mut LpmTrie<MapData, u32, OverlayPeer>,
) -> impl FnMut((Ipv4Addr, u8), Option<OverlayPeer>) -> Result<(), MapError> + '_ {
    move |k, v| match v {
        Some(peer) => peers.insert(&key(k), peer, 0),
        None => peers.remove(&key(k)),
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, FastPathError> {
    ebpf.program_mut(program)
        .ok_or(FastPathError::Missing(program))?
        .try_into()
        .map_err(|source| FastPathError::Program { program, source })
}

/// Puts `program` on `interface`'s TC ingress (a tcx link at `order`,
/// held by this process).
fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    interface: &str,
    order: LinkOrder,
) -> Result<SchedClassifierLinkId, FastPathError> {
    classifier(ebpf, program)?
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(order),
        )
        .map_err(|source| FastPathError::Attach {
            program,
            interface: interface.to_string(),
            source,
        })
}

/// The peer entry a lease's kernel entries stand for (none for our own
/// lease, one of another backend, one without a VTEP MAC, or a vxlan peer
/// whose VTEP the kernel does not reach out of the underlay); `vteps`: how
/// it reaches each.
fn peer_of(
    e: &Entries,
    vteps: &BTreeMap<Ipv4Addr, VtepWay>,
) -> Option<((Ipv4Addr, u8), OverlayPeer)> {
    let route = e.route.as_ref()?;
    // vxlan: the peer's address and VTEP MAC are in the FDB entry; host-gw:
    // the route's gateway is the peer.
    let (node_ip, vtep_mac, flags) = match &e.fdb {
        Some(f) => (f.dst, f.mac, vtep_flags(f.dst, vteps)?),
        None => (route.gateway?, [0; 6], 0),
    };
    Some((
        (route.dst, route.prefix),
        OverlayPeer {
            node_ip: u32::from_ne_bytes(node_ip.octets()),
            vtep_mac,
            flags,
        },
    ))
}

/// The entry of a lease's IPv6 subnet (dual stack): the same VTEP as its
/// IPv4 subnet (vxlan), or the route's IPv6 next hop (host-gw).
fn peer6_of(
    e: &Entries,
    vteps: &BTreeMap<Ipv4Addr, VtepWay>,
) -> Option<((Ipv6Addr, u8), OverlayPeer6)> {
    let route = e.route6.as_ref()?;
    let peer = match &e.fdb {
        Some(f) => OverlayPeer6 {
            node_ip: u32::from_ne_bytes(f.dst.octets()),
            vtep_mac: f.mac,
            flags: vtep_flags(f.dst, vteps)?,
            nexthop: [0; 4],
        },
        None => OverlayPeer6 {
            node_ip: 0,
            vtep_mac: [0; 6],
            flags: 0,
            nexthop: words6(route.gateway?),
        },
    };
    Some(((route.dst, route.prefix), peer))
}

/// How the kernel reaches a vxlan peer's VTEP, as the fast path follows
/// it (a VTEP reached otherwise is left to the kernel's VTEP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VtepWay {
    /// Out of the underlay with no gateway: the VTEP is the next hop.
    Direct,
    /// Out of the underlay through a gateway, which the FIB picks.
    Gateway,
}

/// The way the route `to` (what `ip route get` answered for a VTEP, None
/// for no unicast route) gives, for an underlay of index `underlay`: None
/// where the kernel would send it elsewhere, which the fast path must not
/// second-guess.
pub fn way_of(to: Option<skiff_netlink::RouteTo>, underlay: u32) -> Option<VtepWay> {
    let to = to?;
    if to.oif != Some(underlay) {
        return None;
    }
    Some(match to.gateway {
        None => VtepWay::Direct,
        Some(_) => VtepWay::Gateway,
    })
}

/// A vxlan peer's flags: `PEER_ONLINK` when the kernel reaches its VTEP
/// `dst` directly; None when the fast path must not send to it.
fn vtep_flags(dst: Ipv4Addr, vteps: &BTreeMap<Ipv4Addr, VtepWay>) -> Option<u16> {
    Some(match vteps.get(&dst)? {
        VtepWay::Direct => PEER_ONLINK,
        VtepWay::Gateway => 0,
    })
}

fn key((addr, prefix): (Ipv4Addr, u8)) -> Key<u32> {
    Key::new(u32::from(prefix), u32::from_ne_bytes(addr.octets()))
}

fn subnet_words(subnet: Ipv4Network) -> (u32, u32) {
    (
        u32::from_ne_bytes(subnet.network().octets()),
        u32::from_ne_bytes(subnet.mask().octets()),
    )
}

impl FastPath {
    /// Loads the programs, describes this node to them and puts the decap
    /// program first on the underlay interface. The encap program follows
    /// once the bridge exists ([`FastPath::ensure_bridge`]).
    pub fn start(l: &Local) -> Result<Self, FastPathError> {
        let mut ebpf = Ebpf::load(OBJECT)?;
        for program in [ENCAP, DECAP] {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| FastPathError::Program { program, source })?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(FastPathError::Missing(name));
        let local_map =
            Array::try_from(take(names::OVERLAY_LOCAL)?).map_err(map_err(names::OVERLAY_LOCAL))?;
        let peers = LpmTrie::try_from(take(names::OVERLAY_PEERS)?)
            .map_err(map_err(names::OVERLAY_PEERS))?;
        let peers6 = LpmTrie::try_from(take(names::OVERLAY_PEERS6)?)
            .map_err(map_err(names::OVERLAY_PEERS6))?;
        let pods =
            HashMap::try_from(take(names::OVERLAY_PODS)?).map_err(map_err(names::OVERLAY_PODS))?;
        let pods6 = HashMap::try_from(take(names::OVERLAY_PODS6)?)
            .map_err(map_err(names::OVERLAY_PODS6))?;
        let (subnet, subnet_mask) = subnet_words(l.subnet);
        let local = OverlayLocal {
            node_ip: u32::from_ne_bytes(l.public_ip.octets()),
            subnet,
            subnet_mask,
            underlay_ifindex: l.underlay_index,
            vni_word: OverlayLocal::vni_word(l.vni),
            flags: if l.host_gw { OVERLAY_HOST_GW } else { 0 },
            port: l.port.to_be(),
            vtep_mac: l.vtep_mac,
        };
        let mut fp = Self {
            ebpf,
            local_map,
            peers,
            peers6,
            pods,
            pods6,
            local,
            bridge: l.bridge.clone(),
            bridge_link: None,
            held: Mirror::new(),
            held6: Mirror::new(),
            cni_records: l.cni_records.clone(),
            vteps: BTreeMap::new(),
            pods_held: Mirror::new(),
            pods6_held: Mirror::new(),
            pods_read: None,
            pods_pending: None,
        };
        fp.write_local()?;
        attach(&mut fp.ebpf, DECAP, &l.underlay, LinkOrder::first())?;
        fp.ensure_bridge()?;
        info!(underlay = %l.underlay, bridge = %fp.bridge, "overlay fast path loaded");
        Ok(fp)
    }

    fn write_local(&mut self) -> Result<(), FastPathError> {
        self.local_map
            .set(0, self.local, 0)
            .map_err(map_err(names::OVERLAY_LOCAL))
    }

    /// Attaches the encap program to the bridge when it appears (or was
    /// made again).
    pub fn ensure_bridge(&mut self) -> Result<(), FastPathError> {
        let now = nix::net::if_::if_nametoindex(self.bridge.as_str()).ok();
        if now == self.bridge_link.as_ref().map(|(i, _)| *i) {
            return Ok(());
        }
        if let Some((_, link)) = self.bridge_link.take() {
            // Gone with its bridge already, most likely.
            let _ = classifier(&mut self.ebpf, ENCAP)?.detach(link);
        }
        if let Some(index) = now {
            let link = attach(&mut self.ebpf, ENCAP, &self.bridge, LinkOrder::default())?;
            self.bridge_link = Some((index, link));
            info!(bridge = %self.bridge, ifindex = index, "overlay fast path on the bridge");
        }
        Ok(())
    }

    /// This node's pods as `skiff-cni` recorded them, each with the index
    /// of its host-side veth, into `OVERLAY_PODS` (and `OVERLAY_PODS6`):
    /// read when the records
    /// changed and every [`PODS_RECHECK`] (a pod whose veth is not there
    /// yet, or any more, is left to the kernel's path).
    pub fn sync_pods(&mut self) -> Result<(), FastPathError> {
        let modified = std::fs::metadata(&self.cni_records)
            .and_then(|m| m.modified())
            .ok();
        if let Some((seen, at)) = self.pods_read
            && seen == modified
            && self.pods_pending.is_none_or(|p| p.elapsed() > PODS_PENDING)
            && at.elapsed() < PODS_RECHECK
        {
            return Ok(());
        }
        let changed = self.pods_read.is_none_or(|(seen, _)| seen != modified);
        self.pods_read = Some((modified, Instant::now()));
        let mut missing = false;
        let (mut want, mut want6) = (BTreeMap::new(), BTreeMap::new());
        for (ip, veth) in
            skiff_cni_lib::attachments::host_veths(&self.cni_records).unwrap_or_default()
        {
            let Ok(index) = nix::net::if_::if_nametoindex(veth.as_str()) else {
                missing = true;
                continue;
            };
            match ip {
                IpAddr::V4(v4) => want.insert(u32::from_ne_bytes(v4.octets()), index),
                IpAddr::V6(v6) => want6.insert(words6(v6), index),
            };
        }
        // A new record restarts the search (a leftover's does not hold
        // back a pod being made now).
        self.pods_pending = match (missing, self.pods_pending) {
            (false, _) => None,
            (true, Some(since)) if !changed => Some(since),
            (true, _) => Some(Instant::now()),
        };
        let pods = &mut self.pods;
        self.pods_held
            .sync(want, |ip, index| match index {
                Some(index) => pods.insert(ip, index, 0),
                None => pods.remove(&ip),
            })
            .map_err(map_err(names::OVERLAY_PODS))?;
        let pods6 = &mut self.pods6;
        self.pods6_held
            .sync(want6, |ip, index| match index {
                Some(index) => pods6.insert(ip, index, 0),
                None => pods6.remove(&ip),
            })
            .map_err(map_err(names::OVERLAY_PODS6))
    }

    /// The underlay interface's index: a vxlan peer's VTEP the kernel
    /// reaches out of it is sent to by the fast path.
    pub fn underlay_index(&self) -> u32 {
        self.local.underlay_ifindex
    }

    /// How the kernel reaches every vxlan peer's VTEP, as looked up now;
    /// the next [`FastPath::sync`] writes the peers by it.
    pub fn set_vtep_ways(&mut self, ways: BTreeMap<Ipv4Addr, VtepWay>) {
        if ways != self.vteps {
            let count = |w: VtepWay| ways.values().filter(|v| **v == w).count();
            info!(
                direct = count(VtepWay::Direct),
                gateway = count(VtepWay::Gateway),
                "vxlan peer routes changed; the rest go by the kernel's VTEP"
            );
            self.vteps = ways;
        }
    }

    /// How the kernel reaches one peer's VTEP (None: not out of the
    /// underlay, so the kernel's VTEP sends to it), before its lease is put.
    pub fn set_vtep_way(&mut self, vtep: Ipv4Addr, way: Option<VtepWay>) {
        match way {
            Some(w) => self.vteps.insert(vtep, w),
            None => self.vteps.remove(&vtep),
        };
    }

    /// Our subnet changed (the lease was lost and another taken).
    pub fn set_subnet(&mut self, subnet: Ipv4Network) -> Result<(), FastPathError> {
        (self.local.subnet, self.local.subnet_mask) = subnet_words(subnet);
        self.write_local()
    }

    /// A peer's lease came (`old` None) or changed: its entries were
    /// `old` and are `new`. What only `old` named is taken out.
    pub fn put(&mut self, old: Option<&Entries>, new: &Entries) -> Result<(), FastPathError> {
        let on = &self.vteps;
        // The old entry's keys whatever its VTEP's way is now.
        let old_k = old
            .and_then(|o| o.route.as_ref())
            .map(|r| (r.dst, r.prefix));
        replace(
            &mut self.held,
            old_k,
            peer_of(new, on),
            peers_writer(&mut self.peers),
        )
        .map_err(map_err(names::OVERLAY_PEERS))?;
        let old_k6 = old
            .and_then(|o| o.route6.as_ref())
            .map(|r| (r.dst, r.prefix));
        replace(
            &mut self.held6,
            old_k6,
            peer6_of(new, on),
            peers6_writer(&mut self.peers6),
        )
        .map_err(map_err(names::OVERLAY_PEERS6))
    }

    /// A peer's lease went; its entries were `old`.
    pub fn remove(&mut self, old: &Entries) -> Result<(), FastPathError> {
        self.put(Some(old), &Entries::default())
    }

    /// Makes the peers exactly those of `all` (each lease's entries).
    pub fn sync(&mut self, all: impl Iterator<Item = Entries>) -> Result<(), FastPathError> {
        let (mut want, mut want6) = (BTreeMap::new(), BTreeMap::new());
        for e in all {
            want.extend(peer_of(&e, &self.vteps));
            want6.extend(peer6_of(&e, &self.vteps));
        }
        self.held
            .sync(want, peers_writer(&mut self.peers))
            .map_err(map_err(names::OVERLAY_PEERS))?;
        self.held6
            .sync(want6, peers6_writer(&mut self.peers6))
            .map_err(map_err(names::OVERLAY_PEERS6))
    }
}

/// `held` goes from an entry at `old` to `new`: `old` is deleted when no
/// entry takes its place at the same key.
fn replace<K: Ord + Copy, V: PartialEq + Copy>(
    held: &mut Mirror<K, V>,
    old: Option<K>,
    new: Option<(K, V)>,
    mut write: impl FnMut(K, Option<V>) -> Result<(), MapError>,
) -> Result<(), MapError> {
    if let Some(old) = old.filter(|old| new.is_none_or(|(k, _)| k != *old)) {
        held.set(old, None, &mut write)?;
    }
    if let Some((k, v)) = new {
        held.set(k, Some(v), &mut write)?;
    }
    Ok(())
}

/// Starts the fast path, or says why the kernel's path alone carries the
/// traffic.
pub fn try_start(l: &Local) -> Option<FastPath> {
    match FastPath::start(l) {
        Ok(fp) => Some(fp),
        Err(e) => {
            warn!(error = %e, "overlay fast path unavailable; the kernel's VXLAN carries all traffic");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_writes_only_what_changed_and_takes_gone_entries_as_deleted() {
        let mut m: Mirror<u32, u32> = Mirror::new();
        let mut writes = Vec::new();
        let mut write = |k, v| {
            writes.push((k, v));
            Ok(())
        };
        m.sync(BTreeMap::from([(1, 10), (2, 20)]), &mut write)
            .unwrap();
        // The same again writes nothing; a change writes one entry and
        // deletes the one that left.
        m.sync(BTreeMap::from([(1, 10), (2, 20)]), &mut write)
            .unwrap();
        m.sync(BTreeMap::from([(1, 11)]), &mut write).unwrap();
        assert_eq!(
            writes,
            vec![(1, Some(10)), (2, Some(20)), (2, None), (1, Some(11))]
        );
        // A deletion of what the map lost already is done; a failed write
        // leaves the mirror as it was, so the next sync tries again.
        m.set(1, None, &mut |_, _| Err(MapError::KeyNotFound))
            .unwrap();
        assert!(m.0.is_empty());
        let failed = m.set(3, Some(30), &mut |_, _| Err(MapError::KeyNotFound));
        assert!(failed.is_err() && m.0.is_empty());
    }

    #[test]
    fn a_changed_peer_takes_its_old_key_out_only_when_the_key_moved() {
        let mut m: Mirror<u32, u32> = Mirror::new();
        let mut writes = Vec::new();
        let mut step = |m: &mut Mirror<u32, u32>, old, new| {
            replace(m, old, new, |k, v| {
                writes.push((k, v));
                Ok(())
            })
            .unwrap();
        };
        step(&mut m, None, Some((1, 10)));
        // The same key with another value: overwritten, not deleted.
        step(&mut m, Some(1), Some((1, 11)));
        // Another key: the old one goes.
        step(&mut m, Some(1), Some((2, 20)));
        // No entry any more (the lease went).
        step(&mut m, Some(2), None);
        assert_eq!(
            writes,
            vec![
                (1, Some(10)),
                (1, Some(11)),
                (1, None),
                (2, Some(20)),
                (2, None)
            ]
        );
        assert!(m.0.is_empty());
    }

    #[test]
    fn a_vtep_is_sent_to_directly_through_a_gateway_or_left_to_the_kernel_as_its_route_says() {
        use skiff_netlink::RouteTo;
        let underlay = 3;
        let gw = Some(Ipv4Addr::new(192, 168, 5, 1));
        let direct = RouteTo {
            oif: Some(underlay),
            gateway: None,
        };
        assert_eq!(way_of(Some(direct), underlay), Some(VtepWay::Direct));
        let routed = RouteTo {
            gateway: gw,
            ..direct
        };
        assert_eq!(way_of(Some(routed), underlay), Some(VtepWay::Gateway));
        // A more specific route or a rule that sends it out of another
        // device, or no unicast route: the kernel's VTEP decides.
        let elsewhere = RouteTo {
            oif: Some(underlay + 1),
            gateway: gw,
        };
        assert_eq!(way_of(Some(elsewhere), underlay), None);
        assert_eq!(way_of(None, underlay), None);
    }

    #[test]
    fn a_vxlan_peer_is_flagged_by_its_vteps_way_and_left_out_without_one() {
        let vxlan = |dst: [u8; 4]| Entries {
            route: Some(skiff_netlink::Route {
                dst: Ipv4Addr::new(10, 244, 1, 0),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 244, 1, 0)),
                oif: Some(7),
                onlink: true,
                protocol: 0,
            }),
            fdb: Some(skiff_netlink::FdbEntry {
                mac: [2, 0, 0, 0, 0, 1],
                dst: Ipv4Addr::from(dst),
            }),
            ..Entries::default()
        };
        let vteps = BTreeMap::from([
            (Ipv4Addr::new(192, 168, 5, 20), VtepWay::Direct),
            (Ipv4Addr::new(192, 168, 6, 20), VtepWay::Gateway),
        ]);
        let flags = |e: &Entries| peer_of(e, &vteps).map(|(_, p)| p.flags);
        assert_eq!(flags(&vxlan([192, 168, 5, 20])), Some(PEER_ONLINK));
        assert_eq!(flags(&vxlan([192, 168, 6, 20])), Some(0));
        // A VTEP whose way is not known (or not the underlay): no entry.
        assert_eq!(flags(&vxlan([192, 168, 7, 20])), None);
        // host-gw peers are next hops already: no flag, no lookup.
        let host_gw = Entries {
            fdb: None,
            route: Some(skiff_netlink::Route {
                gateway: Some(Ipv4Addr::new(192, 168, 5, 20)),
                onlink: false,
                ..vxlan([0; 4]).route.unwrap()
            }),
            ..Entries::default()
        };
        assert_eq!(flags(&host_gw), Some(0));
    }
}
