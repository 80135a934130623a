//! The `#[repr(C)]` types that the kernel programs in `skiff-ebpf` and the
//! agent's `proxy` module both read and write, and the names and sizes of the
//! maps they live in.
//!
//! Layout of the service tables (one lookup chain per connect/sendmsg):
//! `SERVICES[ServiceKey] -> ServiceValue { id, count, generation, inline }`,
//! then, for a slot beyond the first `INLINE_SLOTS` that `inline` carries,
//! `SLOTS[SlotKey { id, generation, slot }] -> SlotValue { backend, id, flags }`.
//! `BACKENDS[id] -> Backend` holds the live backends, for validating
//! affinity entries (which remember a backend id). The agent writes a
//! service's new slots under the generation that is not live, then flips the
//! generation in one `SERVICES` update, so a program sees either the old or
//! the new backend set, never a mix. `ORIGINS[backend] -> frontend` names
//! the one frontend per TCP backend whose connects need no per-socket
//! record (its slots carry `SLOT_ORIGIN`).
#![no_std]

/// Address family markers in keys (not the kernel's AF_* values, which differ
/// in width).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `AffinityKey::scope` for ClientIP session affinity: the key's cookie is the
/// client's network-namespace cookie (the client identity available at
/// connect time for local clients).
pub const SCOPE_CLIENT: u32 = 0;
/// `AffinityKey::scope` for an unconnected UDP socket: its datagrams to one
/// service keep going to the backend picked for its first one.
pub const SCOPE_SOCKET: u32 = 1;

pub const MAX_SERVICES: u32 = 262_144;
pub const MAX_SLOTS: u32 = 1_048_576;
pub const MAX_BACKENDS: u32 = 524_288;
pub const MAX_AFFINITY: u32 = 131_072;
pub const MAX_REVNAT: u32 = 262_144;
/// Connections marked for termination at once (socket termination runs
/// per change, with the backends that just left).
pub const MAX_DOOMED: u32 = 16_384;
/// TCP backends with an origin frontend (`maps::ORIGINS`). Entries outlive
/// their backend for a while, so the table is sized for the addresses a
/// cluster's pods cycle through; when it is full a new backend simply gets
/// no origin and its connects keep a `PEERS` record.
pub const MAX_ORIGINS: u32 = 262_144;

/// Largest number of backends one service can have (slot numbers are u16).
pub const MAX_SLOTS_PER_SERVICE: u32 = 65_535;

/// Frontends served to traffic from other hosts (TC path), and the Maglev
/// tables behind them (one per backend set, shared by its frontends).
pub const MAX_EXTERNAL: u32 = 262_144;
pub const MAX_MAGLEV_TABLES: u32 = 65_536;
pub const MAX_EXT_BACKENDS: u32 = 524_288;
/// Clients remembered under ClientIP affinity on the TC path (LRU).
pub const MAX_EXT_CLIENTS: u32 = 65_536;
/// (set, backend) pairs: every set's backends together.
pub const MAX_EXT_MEMBERS: u32 = 524_288;
/// Tracked flows of the TC path (each has a forward and a reverse entry).
pub const MAX_FLOWS: u32 = 262_144;
/// Pod-facing interfaces `skiff_from_pods` is attached to.
pub const MAX_EXT_POD_DEVS: u32 = 256;
/// Maglev table size unless configured: a prime, so that every backend's
/// permutation visits every slot.
pub const DEFAULT_MAGLEV_SIZE: u32 = 16_381;
/// Inner Maglev arrays may differ in size from the template (they are
/// created at the configured size) and are written through mmap.
pub const MAGLEV_INNER_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
pub const BPF_F_INNER_MAP: u32 = 1 << 12;

/// `ExternalValue::flags`: externalTrafficPolicy Local (local backends only,
/// the client's address kept).
pub const EXT_LOCAL: u32 = 1;
/// `ExternalValue::flags`: ClientIP session affinity (the Maglev hash is
/// of the client's address alone).
pub const EXT_AFFINITY: u32 = 2;
/// `ExternalValue::flags`: the Service has no endpoints at all, so a
/// packet to it is answered with ICMP port unreachable (kube-proxy's
/// REJECT) rather than dropped (which a table without local endpoints
/// under `externalTrafficPolicy: Local` is).
pub const EXT_REJECT: u32 = 4;

/// `ExtBackend::flags`: the endpoint runs on this node (reached through the
/// stack, no SNAT); otherwise the flow is SNATed and redirected.
pub const BACKEND_LOCAL: u8 = 1;

/// `FlowValue::flags` / `RevFlowValue::flags`: a FIN or RST was seen.
pub const FLOW_CLOSING: u32 = 1;
/// `RevFlowValue::flags`: a FIN from the client's side was seen, one from
/// the backend's, an RST either way. A flow closed both ways (or reset)
/// gives up its tuple sooner than one only half closed.
pub const FLOW_FIN_CLIENT: u32 = 2;
pub const FLOW_FIN_BACKEND: u32 = 4;
pub const FLOW_RESET: u32 = 8;

/// Seed of the Maglev flow hash and table permutations, the same on every
/// node so that any node picks the same backend for a flow.
pub const MAGLEV_SEED: u32 = 0x5a1f_f00d;

/// The hash the TC program maps a flow to a Maglev slot with: of the
/// client's address, port, the frontend port and protocol (not the node
/// address, which differs between the nodes a flow may arrive at), or of
/// the client's address alone under ClientIP affinity. Values as they sit
/// in the packet (network byte order).
#[inline(always)]
pub fn flow_hash(saddr: u32, sport: u16, dport: u16, proto: u8, affinity: bool) -> u32 {
    let mut h = mix(saddr ^ MAGLEV_SEED);
    if !affinity {
        h = mix(h ^ ((u32::from(sport) << 16) | u32::from(dport)));
        h = mix(h ^ u32::from(proto));
    }
    h
}

/// murmur3's 32-bit finaliser.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// A frontend: the address a client dials. IPv4 addresses use `addr[0]` and
/// leave the rest zero. Address and port are in network byte order, exactly
/// as the kernel hands them to a sock_addr program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// How many of a set's slots its `SERVICES` entry carries itself: a connect
/// that picks one of them needs no `SLOTS` lookup, whose cost is mostly a
/// cache miss on the bucket and one on the element (the two lookups' bucket
/// walks were 45 % of the connect program's profile samples at 1 000
/// services), and most sets are this small.
pub const INLINE_SLOTS: usize = 4;

/// A frontend's live backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of the service frontend; keys its slots and affinity entries.
    pub id: u32,
    /// Number of selectable backends in the live generation; 0 means refuse.
    pub count: u32,
    /// Which of the two slot generations (0 or 1) is live.
    pub generation: u32,
    /// ClientIP affinity timeout in seconds; 0 turns affinity off.
    pub affinity_timeout: u32,
    /// Slots `0..min(count, INLINE_SLOTS)` of the live generation, as
    /// `SLOTS` holds them; the rest zeroed. Written in the same update as
    /// the generation, so they always agree with it.
    pub inline: [SlotValue; INLINE_SLOTS],
}

/// One slot of a service's backend set: `slot` runs from 0 to `count - 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service: u32,
    pub generation: u16,
    pub slot: u16,
}

/// A slot: the backend itself (so the connect path needs no third lookup)
/// and its id (for affinity entries, which `BACKENDS` validates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotValue {
    pub backend: Backend,
    pub id: u32,
    /// `SLOT_ORIGIN`, or 0.
    pub flags: u32,
}

/// `SlotValue::flags`: this frontend is the backend's origin (`ORIGINS`),
/// so a TCP connect through it writes no `PEERS` record. Stable for the
/// slot's life: an origin does not change while any frontend uses it.
pub const SLOT_ORIGIN: u32 = 1;

/// A backend (endpoint address and target port), network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// Key of the affinity LRU: a client (or a socket, see the scopes) and a
/// service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub cookie: u64,
    pub service: u32,
    pub scope: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: u32,
    pub pad: u32,
    /// `bpf_ktime_get_ns` at the last connection that used this entry.
    pub last_used_ns: u64,
}

/// Reverse translation for an unconnected UDP socket: one entry per backend
/// it sent datagrams to (LRU; connected sockets use `PeerValue` instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

/// The frontend a socket's peer is shown as (recvmsg, getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u8; 6],
}

/// What a connected socket (UDP after connect, or TCP not through its
/// backend's origin: see `maps::ORIGINS`) was sent to, kept in the socket's
/// own storage: freed with the socket, no table to fill. A TCP socket
/// connected straight to a backend's address has one naming that address
/// as both, so getpeername leaves it alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerValue {
    /// The frontend the application dialled.
    pub frontend: [u32; 4],
    /// The backend it was sent to.
    pub backend: [u32; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
    pub pad: u32,
}

/// A frontend served to traffic from other hosts: NodePort (per node
/// address), externalIPs and LoadBalancer ingress IPs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExternalValue {
    /// Key of its Maglev table in `MAGLEV` (and of its members in
    /// `EXT_MEMBERS`), the same for the set while it exists.
    pub table: u32,
    /// Size of that table; 0 means no backend (packets are dropped).
    pub size: u32,
    /// `EXT_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (with `EXT_AFFINITY`).
    pub affinity_timeout: u32,
}

/// Key of `EXT_CLIENTS`: a client of a frontend under ClientIP affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtClientKey {
    pub frontend: ServiceKey,
    pub client: [u32; 4],
}

/// The backend a client under ClientIP affinity was last sent to, and when
/// its last new flow started.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtClientValue {
    /// An `EXT_BACKENDS` id.
    pub backend: u32,
    pub pad: u32,
    pub last_ns: u64,
}

/// Key of `EXT_MEMBERS`: a backend of a set, by its table and backend ids,
/// so that an affinity entry is honoured only while its backend is still
/// one of the set's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtMember {
    pub table: u32,
    pub backend: u32,
}

/// A backend as the TC path reaches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtBackend {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    /// `BACKEND_*` bits.
    pub flags: u8,
}

/// A flow as the TC path tracks it: the packet's addresses and ports as
/// they sit in the header (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

/// Forward state of a flow (client to frontend): where it goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: [u32; 4],
    /// Source address after SNAT (remote backends); for a local backend,
    /// the client's own when its port had to be remapped (`snat_port`
    /// then non-zero), else zero.
    pub snat: [u32; 4],
    /// Next hop towards the backend (remote backends).
    pub nexthop: [u32; 4],
    pub backend_port: u16,
    pub snat_port: u16,
    /// Interface towards the backend; 0 for a local backend (the stack
    /// delivers it).
    pub ifindex: u32,
    pub last_ns: u64,
    pub flags: u32,
    /// For a local backend behind a pod-facing interface (`EXT_POD_DEVS`):
    /// that interface, the packet sent there directly (towards `nexthop`)
    /// instead of through the node's forwarding path; 0 otherwise.
    pub local_ifindex: u32,
}

/// Reverse state of a flow, keyed by the reply's (backend -> client or
/// SNAT address) tuple: what the reply is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevFlowValue {
    pub frontend: [u32; 4],
    pub client: [u32; 4],
    /// Next hop towards the client (SNATed flows, whose replies are
    /// redirected).
    pub nexthop: [u32; 4],
    pub frontend_port: u16,
    pub client_port: u16,
    /// Interface towards the client for SNATed flows; 0 for a local
    /// backend (the reply is rewritten on egress).
    pub ifindex: u32,
    pub last_ns: u64,
    pub flags: u32,
    /// For a local backend's flow sent directly (see
    /// `FlowValue::local_ifindex`): the interface towards the client, where
    /// `skiff_from_pods` sends the reply (towards `nexthop`); 0 otherwise.
    pub local_ifindex: u32,
}

/// Peer subnets the overlay's fast path knows (one per node).
pub const MAX_OVERLAY_PEERS: u32 = 65_536;
/// Pods of this node the overlay's fast path delivers to.
pub const MAX_OVERLAY_PODS: u32 = 4_096;

/// The overlay's fast path (`skiff-overlay`): where a peer node's pods
/// are, keyed in an LPM trie by the peer's subnet (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayPeer {
    /// The peer's underlay address (network byte order).
    pub node_ip: u32,
    /// The peer's VTEP MAC: the destination of the frame inside.
    pub vtep_mac: [u8; 6],
    /// `PEER_ONLINK`, or 0.
    pub flags: u16,
}

/// `OverlayPeer::flags` (vxlan): the peer's address is in a subnet of the
/// underlay interface's own, so the wrapped packet goes straight to it as
/// its next hop, with no route lookup per packet. Without it, the kernel
/// routes each wrapped packet (a peer behind a router).
pub const PEER_ONLINK: u16 = 1;

/// A peer's IPv6 subnet for the overlay's fast path, keyed in its own LPM
/// trie (`OVERLAY_PEERS6`) by the subnet's 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayPeer6 {
    /// vxlan: the peer's VTEP, as for IPv4 (the tunnel itself is IPv4).
    pub node_ip: u32,
    pub vtep_mac: [u8; 6],
    /// As `OverlayPeer::flags`.
    pub flags: u16,
    /// host-gw: the peer's IPv6 address on the underlay (global or
    /// link-local), the route's next hop.
    pub nexthop: [u32; 4],
}

/// This node as the overlay's fast path sees it (slot 0 of
/// `OVERLAY_LOCAL`). Addresses, port and VNI word are in network byte
/// order; a zero `node_ip` means "not set up": every packet takes the
/// kernel's path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayLocal {
    pub node_ip: u32,
    pub subnet: u32,
    pub subnet_mask: u32,
    /// Where encapsulated packets leave.
    pub underlay_ifindex: u32,
    /// The VXLAN header's second word: the VNI shifted past its reserved
    /// byte.
    pub vni_word: u32,
    /// `OVERLAY_HOST_GW`: packets are routed as they are, not wrapped.
    pub flags: u32,
    pub port: u16,
    pub vtep_mac: [u8; 6],
}

/// `OverlayLocal::flags`: the host-gw backend.
pub const OVERLAY_HOST_GW: u32 = 1;

impl OverlayLocal {
    /// The VXLAN header's second word for `vni`.
    pub fn vni_word(vni: u32) -> u32 {
        (vni << 8).to_be()
    }
}

/// Map names, shared so that the agent opens exactly what the programs
/// declare (and pins them under these names).
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const REVNAT: &str = "REVNAT";
    /// `PeerValue -> u8`: connected sockets whose (frontend, backend) pair
    /// is in it are destroyed by the socket iterator (the backend left).
    pub const DOOMED: &str = "DOOMED";
    /// Socket storage of `PeerValue`: a connected socket's frontend and
    /// backend (getpeername, recvmsg, socket termination), where `ORIGINS`
    /// does not already tell them.
    pub const PEERS: &str = "PEERS";
    /// `ServiceKey (a TCP backend) -> RevNatValue (a frontend)`: the
    /// frontend a TCP socket connected to that backend without a `PEERS`
    /// record is shown as. A connect through that frontend writes no
    /// record (the socket-storage allocation is most of a connect's cost);
    /// a connect through any other frontend, or straight to the backend's
    /// address, does. The agent sets a backend's origin once, when it first
    /// appears, and never changes it while it may be in use.
    pub const ORIGINS: &str = "ORIGINS";
    /// `ServiceKey -> ExternalValue`: frontends of the TC path.
    pub const EXTERNAL: &str = "EXTERNAL";
    /// `u32 -> inner array of backend ids`: Maglev tables.
    pub const MAGLEV: &str = "MAGLEV";
    /// `u32 -> ExtBackend`: the backends Maglev tables name.
    pub const EXT_BACKENDS: &str = "EXT_BACKENDS";
    /// `ExtClientKey -> ExtClientValue`: ClientIP affinity of the TC path.
    pub const EXT_CLIENTS: &str = "EXT_CLIENTS";
    /// `ExtMember -> u8`: which backends each set has.
    pub const EXT_MEMBERS: &str = "EXT_MEMBERS";
    /// `ifindex -> u8`: the pod-facing interfaces `skiff_from_pods` is
    /// attached to, where local backends' flows are sent directly.
    pub const EXT_POD_DEVS: &str = "EXT_POD_DEVS";
    /// `FlowKey -> FlowValue`: tracked flows, forward.
    pub const FLOWS: &str = "FLOWS";
    /// `FlowKey -> RevFlowValue`: tracked flows, reverse.
    pub const REV_FLOWS: &str = "REV_FLOWS";
    /// `LPM(subnet) -> OverlayPeer`: peers of the overlay's fast path.
    pub const OVERLAY_PEERS: &str = "OVERLAY_PEERS";
    /// `u32 -> u32`: this node's pods (address) to their host-side veth
    /// (ifindex), for the overlay's fast path.
    pub const OVERLAY_PODS: &str = "OVERLAY_PODS";
    /// `LPM(IPv6 subnet) -> OverlayPeer6`: peers' IPv6 subnets.
    pub const OVERLAY_PEERS6: &str = "OVERLAY_PEERS6";
    /// `[u32; 4] -> u32`: this node's pods' IPv6 addresses to their
    /// host-side veth.
    pub const OVERLAY_PODS6: &str = "OVERLAY_PODS6";
    /// `0 -> OverlayLocal`: this node, for the overlay's fast path.
    pub const OVERLAY_LOCAL: &str = "OVERLAY_LOCAL";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are plain `#[repr(C)]` integers and arrays with
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for PeerValue {}
    unsafe impl aya::Pod for ExternalValue {}
    unsafe impl aya::Pod for ExtClientKey {}
    unsafe impl aya::Pod for ExtClientValue {}
    unsafe impl aya::Pod for ExtMember {}
    unsafe impl aya::Pod for ExtBackend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for RevFlowValue {}
    unsafe impl aya::Pod for OverlayPeer {}
    unsafe impl aya::Pod for OverlayPeer6 {}
    unsafe impl aya::Pod for OverlayLocal {}
}

/// Ones' complement checksum arithmetic for rewriting header fields in
/// place (RFC 1624), as the kernel's `csum_add` and `csum_replace_by_diff`
/// do it. Values are raw header words (as they sit in the packet).
pub mod csum {
    /// Ones' complement addition.
    #[inline(always)]
    pub fn add(a: u32, b: u32) -> u32 {
        let (sum, carry) = a.overflowing_add(b);
        sum.wrapping_add(u32::from(carry))
    }

    /// What replacing `old` by `new` adds to a checksum.
    #[inline(always)]
    pub fn diff(old: u32, new: u32) -> u32 {
        add(!old, new)
    }

    /// A 16-bit header checksum after a change whose difference is `diff`.
    #[inline(always)]
    pub fn apply(sum: u16, diff: u32) -> u16 {
        fold(add(diff, !u32::from(sum)))
    }

    /// The 16-bit checksum of a 32-bit ones' complement sum.
    #[inline(always)]
    pub fn fold(mut s: u32) -> u16 {
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}

/// A token bucket kept in nanoseconds of credit, as the kernel limits the
/// ICMP errors it sends (`icmp_ratelimit` per peer, `icmp_msgs_per_sec`
/// and `icmp_msgs_burst` overall): a message costs `interval` of credit,
/// and credit builds up with time to at most `burst`. A new (zeroed)
/// bucket holds a full burst at its first use, the clock (time since
/// boot) being past `burst` by then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl Bucket {
    /// Whether a message may go at `now`; its cost is taken if so.
    #[inline(always)]
    pub fn take(&mut self, now: u64, interval: u64, burst: u64) -> bool {
        let elapsed = now.saturating_sub(self.last_ns);
        let credit = self.credit_ns.saturating_add(elapsed).min(burst);
        self.last_ns = self.last_ns.max(now);
        if credit >= interval {
            self.credit_ns = credit - interval;
            true
        } else {
            self.credit_ns = credit;
            false
        }
    }
}

/// ECN across the tunnel's end (RFC 6040, as the kernel's tunnels apply
/// it): a congestion mark an underlay router put on the outer header must
/// reach the inner packet, or the flow sees loss later instead of the mark.
pub mod ecn {
    /// The ECN field's values (the low two bits of TOS / traffic class).
    pub const NOT_ECT: u8 = 0;
    pub const CE: u8 = 3;

    /// What unwrapping does to the inner packet.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Decap {
        /// The inner field stays as it is.
        Keep,
        /// The inner packet is marked CE.
        MarkCe,
        /// Outer CE on a packet that is not ECN-capable inside: the mark
        /// cannot be passed on, and the packet is dropped (the kernel's
        /// path does it and counts it).
        Drop,
    }

    /// The rule for an outer ECN field `outer` and an inner one `inner`
    /// (each two bits).
    #[inline(always)]
    pub fn decap(outer: u8, inner: u8) -> Decap {
        match (outer & 3, inner & 3) {
            (CE, NOT_ECT) => Decap::Drop,
            (CE, CE) => Decap::Keep,
            (CE, _) => Decap::MarkCe,
            _ => Decap::Keep,
        }
    }
}

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::{Bucket, csum, ecn};

    /// The IPv4 header checksum of `h` computed from scratch (its checksum
    /// field taken as zero), over raw 16-bit words.
    fn full(h: &[u8; 20]) -> u16 {
        let mut s: u32 = 0;
        for (i, w) in h.chunks(2).enumerate() {
            if i != 5 {
                s += u32::from(u16::from_ne_bytes([w[0], w[1]]));
            }
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    fn header(saddr: [u8; 4], daddr: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, ttl, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&saddr);
        h[16..20].copy_from_slice(&daddr);
        let c = full(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    fn word32(h: &[u8; 20], at: usize) -> u32 {
        u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    }

    #[test]
    fn an_incremental_update_matches_a_full_recompute() {
        let cases = [
            (
                [192, 168, 1, 9],
                [10, 0, 0, 1],
                [172, 31, 0, 1],
                [10, 244, 1, 7],
                64,
            ),
            (
                [255, 255, 255, 255],
                [0, 0, 0, 0],
                [0, 0, 0, 0],
                [255, 255, 255, 255],
                2,
            ),
            ([1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4], [8, 7, 6, 5], 255),
            ([0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0], 1),
        ];
        for (s0, d0, s1, d1, ttl) in cases {
            let before = header(s0, d0, ttl);
            let after = header(s1, d1, ttl - 1);
            let mut diff = csum::diff(word32(&before, 12), word32(&after, 12));
            diff = csum::add(diff, csum::diff(word32(&before, 16), word32(&after, 16)));
            let ttl_word = |h: &[u8; 20]| u32::from(u16::from_ne_bytes([h[8], h[9]]));
            diff = csum::add(diff, csum::diff(ttl_word(&before), ttl_word(&after)));
            let old = u16::from_ne_bytes([before[10], before[11]]);
            let want = u16::from_ne_bytes([after[10], after[11]]);
            let got = csum::apply(old, diff);
            // 0x0000 and 0xffff are the same number in ones' complement;
            // a header sum is never all-zero, so the update must match.
            assert_eq!(got, want, "{s0:?}->{s1:?} {d0:?}->{d1:?} ttl {ttl}");
        }
    }

    #[test]
    fn replacing_a_word_by_itself_changes_nothing() {
        for v in [0u32, 1, 0xffff, 0xffff_ffff, 0x0a00_0001] {
            assert_eq!(csum::apply(0x1234, csum::diff(v, v)), 0x1234);
        }
    }

    /// RFC 6040's decapsulation table, as far as the kernel's tunnels
    /// apply it: only a CE mark outside changes what is inside.
    #[test]
    fn a_congestion_mark_outside_reaches_an_ecn_capable_packet_inside() {
        use ecn::Decap::{Drop, Keep, MarkCe};
        // Rows: inner Not-ECT, ECT(1), ECT(0), CE; columns: outer the same.
        let want = [
            [Keep, Keep, Keep, Drop],
            [Keep, Keep, Keep, MarkCe],
            [Keep, Keep, Keep, MarkCe],
            [Keep, Keep, Keep, Keep],
        ];
        for (inner, row) in want.iter().enumerate() {
            for (outer, w) in row.iter().enumerate() {
                assert_eq!(
                    ecn::decap(outer as u8, inner as u8),
                    *w,
                    "outer {outer}, inner {inner}"
                );
                // The other TOS bits (DSCP) do not matter.
                assert_eq!(ecn::decap(0xb8 | outer as u8, 0x28 | inner as u8), *w);
            }
        }
    }

    /// One per second after a burst of six, as the kernel answers one
    /// peer: six at once, then one more for each second that passes, and
    /// credit never builds up past the burst.
    #[test]
    fn a_bucket_lets_a_burst_through_then_one_per_interval() {
        const S: u64 = 1_000_000_000;
        let (interval, burst) = (S, 6 * S);
        // Boot time read an hour after boot.
        let t0 = 3600 * S;
        let mut b = Bucket::default();
        let first: usize = (0..20).filter(|_| b.take(t0, interval, burst)).count();
        assert_eq!(first, 6, "six at once from a new bucket");
        assert!(
            !b.take(t0 + S / 2, interval, burst),
            "half an interval later"
        );
        assert!(b.take(t0 + S, interval, burst), "a whole interval later");
        assert!(!b.take(t0 + S, interval, burst));
        // An hour later: a full burst again, not an hour's worth.
        let later = t0 + 3600 * S;
        let n: usize = (0..20).filter(|_| b.take(later, interval, burst)).count();
        assert_eq!(n, 6);
        // A clock that appears to go back (another CPU's older reading)
        // gives no credit and takes none away.
        assert!(!b.take(later - S, interval, burst));
    }
}
