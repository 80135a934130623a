//! Traffic from other hosts (TC programs on the node's own interfaces):
//! NodePort, externalIPs and LoadBalancer ingress IPs.
//!
//! `skiff_ingress` runs on packets arriving on the node's interfaces. A
//! packet to an `EXTERNAL` frontend belongs to a flow in `FLOWS` or starts
//! one: its backend comes from the frontend's Maglev table, so every node
//! picks the same backend for a flow. The destination is rewritten to the
//! backend (DNAT). A local backend is then reached through the stack; a
//! remote one also gets the node's address as source (SNAT, the address
//! the kernel would use towards the backend) and is redirected straight to
//! the interface towards it. Replies of SNATed flows come back to the
//! node, match `REV_FLOWS` here and are redirected to the client with the
//! frontend as source. Replies of local backends pass through the stack
//! and are rewritten by `skiff_egress` as they leave, unless the backend
//! is routed through a pod-facing interface carrying `skiff_from_pods`
//! (`EXT_POD_DEVS`): then its flow is redirected straight to that
//! interface, and the replies, caught there, straight to the client, so
//! that neither way goes through the node's forwarding path (as a remote
//! backend's flow does not).
//!
//! Under `externalTrafficPolicy: Local` the table holds local backends only
//! and no flow is SNATed: the backend sees the client's address. When one
//! client port reaches one backend through two frontends at once, the
//! second flow's port is remapped (the address kept), as conntrack does, so
//! that the backend never sees one tuple for two connections.
//!
//! ICMP errors about a tracked flow (port unreachable, fragmentation
//! needed, time exceeded) are translated too: the packet they quote and
//! their own addresses, so that the client's socket gets them. A packet
//! too big for the way to a remote backend (the overlay's tunnel is
//! narrower than the underlay) is answered here as a router would answer
//! it, with the MTU, since a redirect skips the forwarding path's check.
//!
//! Fragmented datagrams are translated fragment by fragment, as
//! conntrack's defragmentation would not be here: a first fragment that
//! belongs to one of our flows leaves its ports in `FRAGS` under the
//! datagram's identification, and the later fragments (which have no L4
//! header) find their flow by them. A later fragment that arrives before
//! its first is not translated.
//!
//! IPv4 and IPv6, each through its own copy of the code (`crate::ip`).
//! IPv6 packets with extension headers other than a fragment header are
//! not translated.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashOfMaps},
    helpers::{bpf_check_mtu, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail},
    macros::{btf_map, classifier, map},
    maps::{Array as PlainArray, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use skiff_ebpf_common::{
    BACKEND_LOCAL, Bucket, DEFAULT_MAGLEV_SIZE, EXT_AFFINITY, EXT_LOCAL, EXT_REJECT, ExtBackend,
    ExtClientKey, ExtClientValue, ExtMember, ExternalValue, FAMILY_V6, FLOW_CLOSING,
    FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_RESET, FlowKey, FlowValue, MAGLEV_INNER_FLAGS,
    MAX_EXT_BACKENDS, MAX_EXT_CLIENTS, MAX_EXT_MEMBERS, MAX_EXT_POD_DEVS, MAX_EXTERNAL, MAX_FLOWS,
    MAX_MAGLEV_TABLES, PROTO_TCP, PROTO_UDP, RevFlowValue, ServiceKey, csum, flow_hash, mix,
};

use crate::BPF_F_NO_PREALLOC;
use crate::ip::{Frag, Header, IP, Ip, Part, V4, V6, csum_of, route};
use crate::packet::at;

/// Port unreachables sent per client, and overall (below): the kernel's
/// limits on the ICMP errors it sends, which kube-proxy's REJECT is under.
#[map(name = "REJECT_PEERS")]
static REJECT_PEERS: LruHashMap<[u32; 5], Bucket> = LruHashMap::with_max_entries(16_384, 0);

#[map(name = "REJECT_ALL")]
static REJECT_ALL: PlainArray<Bucket> = PlainArray::with_max_entries(1, 0);

/// A fragmented datagram, by what its fragments share.
#[repr(C)]
#[derive(Clone, Copy)]
struct FragKey {
    saddr: [u32; 4],
    daddr: [u32; 4],
    id: u32,
    proto: u8,
    family: u8,
    pad: u16,
}

/// The ports of fragmented datagrams (source, destination), from their
/// first fragments, for the later ones. Pinned like the flows: a datagram
/// whose first fragment came before an agent restart still finds its
/// ports after it.
#[map(name = "FRAGS")]
static FRAGS: LruHashMap<FragKey, [u16; 2]> = LruHashMap::pinned(8_192, 0);

/// `icmp_ratelimit`: one a second to each client, after a burst of six
/// (the kernel's XRLIM_BURST_FACTOR).
const PEER_INTERVAL_NS: u64 = NS_PER_SEC;
const PEER_BURST_NS: u64 = 6 * NS_PER_SEC;
/// `icmp_msgs_per_sec` and `icmp_msgs_burst`: 1 000 a second overall,
/// after a burst of 50.
const ALL_INTERVAL_NS: u64 = NS_PER_SEC / 1000;
const ALL_BURST_NS: u64 = 50 * ALL_INTERVAL_NS;

#[map(name = "EXTERNAL")]
static EXTERNAL: HashMap<ServiceKey, ExternalValue> =
    HashMap::pinned(MAX_EXTERNAL, BPF_F_NO_PREALLOC);

#[map(name = "EXT_BACKENDS")]
static EXT_BACKENDS: HashMap<u32, ExtBackend> =
    HashMap::pinned(MAX_EXT_BACKENDS, BPF_F_NO_PREALLOC);

/// ClientIP affinity: each client's backend per frontend and when its last
/// new flow started, as kube-proxy's `recent` match keeps it. Honoured
/// while younger than the Service's timeout and while the backend is still
/// the set's (`EXT_MEMBERS`), so adding backends moves no client.
#[map(name = "EXT_CLIENTS")]
static EXT_CLIENTS: LruHashMap<ExtClientKey, ExtClientValue> =
    LruHashMap::pinned(MAX_EXT_CLIENTS, 0);

#[map(name = "EXT_MEMBERS")]
static EXT_MEMBERS: HashMap<ExtMember, u8> = HashMap::pinned(MAX_EXT_MEMBERS, BPF_F_NO_PREALLOC);

/// Pod-facing interfaces with `skiff_from_pods` on their ingress. A local
/// backend routed through one of them gets its flow's packets sent there
/// directly, and its replies are sent back from there: both ways skip the
/// node's forwarding path (and its netfilter hooks, which then see neither
/// way, as for SNATed flows). Through any other interface the node
/// forwards both ways.
#[map(name = "EXT_POD_DEVS")]
static EXT_POD_DEVS: HashMap<u32, u8> = HashMap::pinned(MAX_EXT_POD_DEVS, 0);

/// Maglev tables: backend ids, `size` of them (the agent creates each
/// inner array at the configured size; the template's size is only the
/// default).
#[btf_map(name = "MAGLEV")]
static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { DEFAULT_MAGLEV_SIZE as usize }, { MAGLEV_INNER_FLAGS as usize }>,
    { MAX_MAGLEV_TABLES as usize },
> = HashOfMaps::new();

/// Room for a new flow's two entries, built here and inserted from here,
/// and for the keys its lookups use: too big for the stack beside the
/// callers' frames (an IPv6 flow's keys above all).
#[repr(C)]
struct NewEntries {
    flow: FlowValue,
    rev: RevFlowValue,
    key: FlowKey,
    frontend: ServiceKey,
    /// The frontend and client of a new flow under ClientIP affinity.
    client: ExtClientKey,
}

#[map(name = "NEW_ENTRIES")]
static NEW_ENTRIES: PerCpuArray<NewEntries> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "REV_FLOWS")]
static REV_FLOWS: LruHashMap<FlowKey, RevFlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

const BPF_ADJ_ROOM_MAC: u32 = 1;

/// `bpf_check_mtu`: the packet is larger than the device's MTU.
const BPF_MTU_CHK_RET_FRAG_NEEDED: i64 = 1;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS_PER_SEC: u64 = 1_000_000_000;
/// skb mark bit of packets `skiff_ingress` translated and redirected (the
/// mark does not leave the node: it is scrubbed when the packet crosses
/// into another namespace or onto the wire).
const TRANSLATED_MARK: u32 = 0x0010_0000;
/// `last_ns` is refreshed at most this often (a write per packet would
/// bounce the entry's cache line between CPUs).
const REFRESH_NS: u64 = NS_PER_SEC;
/// A SNAT tuple is free again this long after its flow went quiet: closed
/// TCP flows (longer than TIME_WAIT) and UDP.
const REUSE_CLOSED_NS: u64 = 60 * NS_PER_SEC;
/// ... and, when none of a new flow's candidate tuples is free, one whose
/// TCP flow closed both ways (or was reset) this long ago: its last ACK
/// is through. Had the backend closed first, its TIME_WAIT socket takes a
/// new SYN on the tuple (a later sequence number or timestamp), or it is
/// reset by the client's answer to its ACK and the SYN's retry gets
/// through: a delayed connection rather than none. Without it, a node's
/// flows to one backend could not start more often than its address has
/// ports (65 536) per minute, and far less often when clients' ports
/// repeat, as one client's do.
const REUSE_SHUT_NS: u64 = NS_PER_SEC;
/// ... and an established TCP flow that went silent.
const REUSE_IDLE_TCP_NS: u64 = 6 * 3600 * NS_PER_SEC;
/// Ports a SNAT source is taken from when the client's own is not free:
/// above the kernel's default ephemeral range, so node sockets do not
/// collide with them.
const SNAT_PORT_MIN: u32 = 61_000;
const SNAT_PORT_SPAN: u32 = 65_536 - SNAT_PORT_MIN;
const SNAT_TRIES: u32 = 8;

/// The header fields one translation reads and writes.
#[derive(Clone, Copy)]
struct Packet<F: Ip> {
    proto: u8,
    tcp_flags: u8,
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
    /// Offset of the L4 header.
    l4: usize,
    frag: Frag,
}

impl<F: Ip> Packet<F> {
    /// The packet holds its L4 header (it is not a later fragment).
    fn has_l4(&self) -> bool {
        self.frag.part != Part::Later
    }

    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else if self.proto == PROTO_UDP {
            self.l4 + 6
        } else {
            self.l4 + 2
        }
    }

    fn closing(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// The `RevFlowValue` flags this closing packet adds, sent by the
    /// client or by the backend.
    fn closing_flags(&self, from_client: bool) -> u32 {
        FLOW_CLOSING
            | if self.tcp_flags & TCP_RST != 0 {
                FLOW_RESET
            } else if from_client {
                FLOW_FIN_CLIENT
            } else {
                FLOW_FIN_BACKEND
            }
    }

    /// A TCP SYN without ACK: the start of a connection.
    fn opening(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

#[inline(always)]
fn parse<F: Ip>(ctx: &TcContext) -> Option<Packet<F>> {
    let h = F::header(ctx)?;
    if h.proto == F::ICMP {
        return Some(Packet {
            proto: h.proto,
            tcp_flags: 0,
            saddr: h.saddr,
            daddr: h.daddr,
            sport: 0,
            dport: 0,
            l4: h.l4,
            frag: Frag::WHOLE,
        });
    }
    let (sport, dport, tcp_flags) = match h.frag.part {
        Part::Later => {
            let [sport, dport] = frag_ports::<F>(&h)?;
            (sport, dport, 0)
        }
        _ => {
            let tcp_flags = if h.proto == PROTO_TCP {
                at::<u16>(ctx, h.l4 + 12)?.to_ne_bytes()[1]
            } else {
                0
            };
            (at(ctx, h.l4)?, at(ctx, h.l4 + 2)?, tcp_flags)
        }
    };
    Some(Packet {
        proto: h.proto,
        tcp_flags,
        saddr: h.saddr,
        daddr: h.daddr,
        sport,
        dport,
        l4: h.l4,
        frag: h.frag,
    })
}

fn frag_key<F: Ip>(saddr: F::Addr, daddr: F::Addr, proto: u8, id: u32) -> FragKey {
    FragKey {
        saddr: F::wide(saddr),
        daddr: F::wide(daddr),
        id,
        proto,
        family: F::FAMILY,
        pad: 0,
    }
}

/// The ports of the datagram a later fragment belongs to, as its first
/// fragment carried them; None when that has not been seen.
// Out of line: the key's frame is not added to the callers'.
#[inline(never)]
fn frag_ports<F: Ip>(h: &Header<F::Addr>) -> Option<[u16; 2]> {
    let key = frag_key::<F>(h.saddr, h.daddr, h.proto, h.frag.id);
    // SAFETY: copied out at once.
    FRAGS.get_ptr(&key).map(|v| unsafe { *v })
}

/// Keeps a first fragment's ports for the datagram's later fragments,
/// once the fragment was found to belong to a flow of ours: other traffic
/// (to the node itself, or routed through it) leaves no entry behind.
/// Called for every translated packet: the test is inline, the map write
/// (for first fragments only) out of line.
#[inline(always)]
fn keep_frag_ports<F: Ip>(p: &Packet<F>) {
    if p.frag.part == Part::First {
        store_frag_ports(p);
    }
}

// Out of line: the key's frame is not added to the callers'.
#[inline(never)]
fn store_frag_ports<F: Ip>(p: &Packet<F>) {
    let key = frag_key::<F>(p.saddr, p.daddr, p.proto, p.frag.id);
    let _ = FRAGS.insert(&key, &[p.sport, p.dport], 0);
}

/// What a translated packet's addresses and ports become.
#[derive(Clone, Copy)]
struct Tuple<F: Ip> {
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
}

/// Rewrites the packet's addresses and ports to `to` (and takes one hop off
/// its TTL or hop limit when `hop`): the fields and the IPv4 checksum are
/// written in place; the L4 checksum is updated by the kernel (it knows
/// whether the packet's checksum is complete or partial), once for the
/// addresses and once for the ports. An ICMP packet has no ports; its
/// checksum covers the addresses only for IPv6. False when the packet
/// cannot be translated (or has no hop left).
#[inline(always)]
fn translate<F: Ip>(ctx: &TcContext, p: &Packet<F>, to: &Tuple<F>, hop: bool) -> bool {
    let mut addrs = 0u32;
    if to.saddr != p.saddr {
        addrs = csum::add(addrs, F::diff(p.saddr, to.saddr));
    }
    if to.daddr != p.daddr {
        addrs = csum::add(addrs, F::diff(p.daddr, to.daddr));
    }
    let mut ports = 0u32;
    if to.sport != p.sport {
        ports = csum::add(ports, csum::diff(u32::from(p.sport), u32::from(to.sport)));
    }
    if to.dport != p.dport {
        ports = csum::add(ports, csum::diff(u32::from(p.dport), u32::from(to.dport)));
    }
    // A later fragment has no L4 header: its addresses alone change (the
    // first fragment's L4 checksum covers the whole datagram).
    let has_l4 = p.has_l4();
    let need = if has_l4 { p.l4 + 4 } else { IP + F::HLEN };
    if ctx.data() + need > ctx.data_end() && ctx.pull_data(need as u32).is_err() {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP + F::HLEN > end {
        return false;
    }
    // SAFETY: the network header is bounds checked against data_end above.
    if !unsafe { F::write(start + IP, to.saddr, to.daddr, addrs, hop) } {
        return false;
    }
    if !has_l4 {
        return true;
    }
    if start + p.l4 + 4 > end {
        return false;
    }
    let l4 = start + p.l4;
    // SAFETY: the L4 header's first bytes are bounds checked above.
    unsafe {
        if p.proto == F::ICMP {
            return !F::ICMP_PSEUDO
                || addrs == 0
                || ctx
                    .l4_csum_replace(p.csum_off(), 0, u64::from(addrs), BPF_F_PSEUDO_HDR)
                    .is_ok();
        }
        core::ptr::write_unaligned(l4 as *mut u16, to.sport);
        core::ptr::write_unaligned((l4 + 2) as *mut u16, to.dport);
    }
    let addrs_ok = to.saddr == p.saddr && to.daddr == p.daddr
        || ctx
            .l4_csum_replace(
                p.csum_off(),
                0,
                u64::from(addrs),
                BPF_F_PSEUDO_HDR | l4_flags(p),
            )
            .is_ok();
    let ports_ok = to.sport == p.sport && to.dport == p.dport
        || ctx
            .l4_csum_replace(p.csum_off(), 0, u64::from(ports), l4_flags(p))
            .is_ok();
    addrs_ok && ports_ok
}

fn l4_flags<F: Ip>(p: &Packet<F>) -> u64 {
    if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// Marks a packet this program sent on, so that the egress program lets it
/// pass unread.
#[inline(always)]
fn mark_translated(ctx: &TcContext) {
    // SAFETY: the context is an skb; mark is readable.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | TRANSLATED_MARK);
}

/// Sends the (rewritten, hop already taken) packet out of `ifindex`
/// towards `nexthop`, the kernel's neighbour table filling in the
/// link-layer addresses. The packet is marked so that the egress program
/// lets it pass unread.
#[inline(always)]
fn redirect<F: Ip>(ctx: &TcContext, ifindex: u32, nexthop: F::Addr) -> i32 {
    mark_translated(ctx);
    F::redirect_neigh(ifindex, nexthop)
}

fn flow_key<F: Ip>(saddr: F::Addr, daddr: F::Addr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        saddr: F::wide(saddr),
        daddr: F::wide(daddr),
        sport,
        dport,
        proto,
        family: F::FAMILY,
        pad: 0,
    }
}

/// The frame's family: each is translated by its own copy of the code.
#[inline(always)]
fn ethertype(ctx: &TcContext) -> u16 {
    at(ctx, 12).unwrap_or(0)
}

#[classifier]
pub fn skiff_ingress(ctx: TcContext) -> i32 {
    match ethertype(&ctx) {
        t if t == V4::ETH_P => ingress::<V4>(&ctx),
        t if t == V6::ETH_P => ingress::<V6>(&ctx),
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn ingress<F: Ip>(ctx: &TcContext) -> i32 {
    let Some(p) = parse::<F>(ctx) else {
        return TC_ACT_OK;
    };
    if p.proto == F::ICMP {
        return icmp_of_snat(ctx, &p).unwrap_or(TC_ACT_OK);
    }
    let key = ServiceKey {
        addr: F::wide(p.daddr),
        port: p.dport,
        proto: p.proto,
        family: F::FAMILY,
    };
    // SAFETY: copied out at once (BPF_F_NO_PREALLOC).
    if let Some(svc) = unsafe { EXTERNAL.get(&key) } {
        let svc = *svc;
        // The flow's entries are made here, not inside `forward`, so that
        // the two frames are never on the stack together.
        let verdict = match forward(ctx, &p) {
            NEW_FLOW if svc.size > 0 && new_flow(ctx, &p, &key, &svc) => match forward(ctx, &p) {
                NEW_FLOW => TC_ACT_SHOT,
                verdict => verdict,
            },
            // Refused: no flow, so its later fragments are not followed.
            NEW_FLOW if svc.size == 0 && svc.flags & EXT_REJECT != 0 => return reject(ctx, &p),
            NEW_FLOW => TC_ACT_SHOT,
            verdict => verdict,
        };
        // Answered from here, not inside `forward`, for the same reason.
        if verdict >= TOO_BIG {
            return answer_too_big(ctx, &p, (verdict & 0xffff) as u32);
        }
        // Anything else `forward` passes on was translated along a flow.
        if verdict != TC_ACT_SHOT {
            keep_frag_ports(&p);
        }
        return verdict;
    }
    reply_of_snat(ctx, &p)
}

/// `forward`'s answer when the packet starts a flow.
const NEW_FLOW: i32 = i32::MIN;
/// `forward`'s answer, with the MTU in its low 16 bits, when the packet
/// is too big for the way to its backend and routers may not fragment it
/// (above every TC verdict).
const TOO_BIG: i32 = 0x4000_0000;

#[classifier]
pub fn skiff_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context is an skb; mark is readable.
    if unsafe { (*ctx.skb.skb).mark } & TRANSLATED_MARK != 0 {
        return TC_ACT_OK;
    }
    match ethertype(&ctx) {
        t if t == V4::ETH_P => egress::<V4>(&ctx),
        t if t == V6::ETH_P => egress::<V6>(&ctx),
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn egress<F: Ip>(ctx: &TcContext) -> i32 {
    let Some(p) = parse::<F>(ctx) else {
        return TC_ACT_OK;
    };
    if p.proto == F::ICMP {
        return icmp_of_local(ctx, &p).unwrap_or(TC_ACT_OK);
    }
    // A SNATed flow's reply is handled on ingress.
    let Some(rv) = reply_entry(&p, false) else {
        return TC_ACT_OK;
    };
    // The client's port comes back too where the flow's was remapped.
    let to = Tuple {
        saddr: F::narrow(&rv.frontend),
        daddr: p.daddr,
        sport: rv.frontend_port,
        dport: rv.client_port,
    };
    if translate(ctx, &p, &to, false) {
        keep_frag_ports(&p);
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// `tcx` verdict: on to the interface's next program, or the stack.
const TC_NEXT: i32 = -1;

/// On the ingress of pod-facing interfaces (`EXT_POD_DEVS`): a local
/// backend's reply to a flow sent directly, rewritten to come from the
/// frontend and sent straight to the client. Everything else goes on
/// untouched (to the interface's next program, the overlay's say).
#[classifier]
pub fn skiff_from_pods(ctx: TcContext) -> i32 {
    match ethertype(&ctx) {
        t if t == V4::ETH_P => from_pods::<V4>(&ctx),
        t if t == V6::ETH_P => from_pods::<V6>(&ctx),
        _ => TC_NEXT,
    }
}

#[inline(always)]
fn from_pods<F: Ip>(ctx: &TcContext) -> i32 {
    let Some(p) = parse::<F>(ctx) else {
        return TC_NEXT;
    };
    if p.proto == F::ICMP {
        return TC_NEXT;
    }
    let Some(rv) = reply_entry(&p, false) else {
        return TC_NEXT;
    };
    if rv.local_ifindex == 0 {
        return TC_NEXT;
    }
    // Every reply of the flow goes this way, fragments too (each
    // translated on its own), so that the stack, whose netfilter never saw
    // the flow, sees none of it: it would take a reply for a new
    // connection (and masquerade it). One too big for the way out is left
    // to the stack.
    if too_big_for::<F>(ctx, rv.local_ifindex).is_some() {
        return TC_NEXT;
    }
    reply_straight(ctx, &p, rv, p.daddr, rv.local_ifindex)
}

/// A reply `p` of the flow whose reverse entry is `rv`, rewritten to come
/// from the frontend and go to the client (at `client`), redirected to
/// `ifindex`, towards `rv`'s next hop.
#[inline(always)]
fn reply_straight<F: Ip>(
    ctx: &TcContext,
    p: &Packet<F>,
    rv: &RevFlowValue,
    client: F::Addr,
    ifindex: u32,
) -> i32 {
    let to = Tuple {
        saddr: F::narrow(&rv.frontend),
        daddr: client,
        sport: rv.frontend_port,
        dport: rv.client_port,
    };
    let nexthop = F::narrow(&rv.nexthop);
    if !translate(ctx, p, &to, true) {
        return TC_ACT_SHOT;
    }
    keep_frag_ports(p);
    redirect::<F>(ctx, ifindex, nexthop)
}

fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The reverse entry of the flow `p` replies to, refreshed, if the flow
/// is of the kind asked for: SNATed to a remote backend (`snat`, replies
/// come back to this node) or to a local backend (rewritten as they
/// leave).
#[inline(always)]
fn reply_entry<F: Ip>(p: &Packet<F>, snat: bool) -> Option<&'static mut RevFlowValue> {
    let rkey = flow_key::<F>(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let r = REV_FLOWS.get_ptr_mut(&rkey)?;
    // SAFETY: LRU entry, read and updated in place (a racing update only
    // loses a timestamp).
    let rv = unsafe { &mut *r };
    if (rv.ifindex != 0) != snat {
        return None;
    }
    let t = now();
    if p.closing() {
        rv.flags |= p.closing_flags(false);
        rv.last_ns = t;
    } else if t.wrapping_sub(rv.last_ns) > REFRESH_NS {
        rv.last_ns = t;
    }
    Some(rv)
}

/// A reply of a SNATed flow (backend -> node): back to the client, from
/// the frontend. Anything else passes.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn reply_of_snat<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> i32 {
    snat_reply(ctx, p).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn snat_reply<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> Option<i32> {
    let rv = reply_entry(p, true)?;
    Some(reply_straight(
        ctx,
        p,
        rv,
        F::narrow(&rv.client),
        rv.ifindex,
    ))
}

/// A packet to an external frontend: its flow's backend, or a new flow.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn forward<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> i32 {
    forward_known(ctx, p).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn forward_known<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> Option<i32> {
    let fkey = flow_key::<F>(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let t = now();
    let f = match FLOWS.get_ptr_mut(&fkey) {
        // A new connection on a tuple whose last one closed starts over.
        Some(f) if !(p.opening() && unsafe { (*f).flags } & FLOW_CLOSING != 0) => f,
        _ => return Some(NEW_FLOW),
    };
    // SAFETY: see reply_entry.
    let fv = unsafe { &mut *f };
    if p.closing() {
        fv.flags |= FLOW_CLOSING;
        fv.last_ns = t;
        mark_rev_closing(p, fv);
    } else if t.wrapping_sub(fv.last_ns) > REFRESH_NS {
        fv.last_ns = t;
    }
    // Fields read one at a time (no copy of the whole value on the stack).
    let (backend, backend_port, ifindex) = (F::narrow(&fv.backend), fv.backend_port, fv.ifindex);
    let (snat, snat_port, nexthop) = (F::narrow(&fv.snat), fv.snat_port, F::narrow(&fv.nexthop));
    let mut to = Tuple {
        saddr: p.saddr,
        daddr: backend,
        sport: p.sport,
        dport: backend_port,
    };
    if snat_port != 0 {
        to.sport = snat_port;
    }
    let out = if ifindex != 0 {
        // One that routers may fragment (IPv4 without DF, fragments among
        // them) goes on: the overlay's VXLAN device carries it in
        // fragments of the outer packet, which the backend's node puts
        // together again.
        if let Some(mtu) = too_big_for::<F>(ctx, ifindex)
            && F::dont_fragment(ctx)
        {
            return Some(TOO_BIG | mtu.min(0xffff) as i32);
        }
        to.saddr = snat;
        ifindex
    } else if fv.local_ifindex != 0
        && p.frag.part == Part::Whole
        && too_big_for::<F>(ctx, fv.local_ifindex).is_none()
    {
        // A local backend's flow sent directly (its source stays). Not a
        // fragment: the stack may be holding some of its datagram to put
        // it together (conntrack does), and one that took the other way
        // would never come. Not one too big for the pod's interface
        // either: the stack fragments it, or answers it.
        fv.local_ifindex
    } else {
        return translate(ctx, p, &to, false).then_some(TC_ACT_OK);
    };
    if !translate(ctx, p, &to, true) {
        return None;
    }
    Some(redirect::<F>(ctx, out, nexthop))
}

/// The MTU of `ifindex` when the packet does not fit it: the overlay's
/// tunnel is narrower than the underlay the client sent on. Redirected,
/// such a packet would be lost without a word, as a redirect skips the
/// forwarding path's MTU check. The packet's network-layer length is
/// what is compared, whatever the link-layer header of `ifindex` (none on
/// an L3 tunnel); a GRO aggregate passes (TCP, whose segments the
/// backend's MSS keeps small enough).
#[inline(always)]
fn too_big_for<F: Ip>(ctx: &TcContext, ifindex: u32) -> Option<u32> {
    let mut len = ctx.len().saturating_sub(IP as u32);
    // SAFETY: plain helper call on this packet; `len` lives for it.
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut len, 0, 0) };
    (rc == BPF_MTU_CHK_RET_FRAG_NEEDED).then_some(len)
}

/// A packet too big for the way to its backend that routers may not
/// fragment, answered as a router answers it: "fragmentation needed"
/// (IPv4, DF set) or "packet too big" (IPv6) with the next hop's MTU, from
/// the frontend, quoting the packet as the client sent it, so that its
/// path MTU drops and it sends smaller packets. (An IPv6 fragment after
/// the first is dropped unanswered: the first one's answer tells.)
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn answer_too_big<F: Ip>(ctx: &TcContext, p: &Packet<F>, mtu: u32) -> i32 {
    answer(ctx, p, F::too_big(mtu))
}

#[inline(always)]
fn mark_rev_closing<F: Ip>(p: &Packet<F>, fv: &FlowValue) {
    let (daddr, dport) = if fv.ifindex == 0 {
        // Local: the client's address, and its port unless remapped.
        let port = if fv.snat_port != 0 {
            fv.snat_port
        } else {
            p.sport
        };
        (p.saddr, port)
    } else {
        (F::narrow(&fv.snat), fv.snat_port)
    };
    let rkey = flow_key::<F>(
        F::narrow(&fv.backend),
        daddr,
        fv.backend_port,
        dport,
        p.proto,
    );
    if let Some(r) = REV_FLOWS.get_ptr_mut(&rkey) {
        // SAFETY: see reply_entry.
        unsafe {
            (*r).flags |= p.closing_flags(true);
            (*r).last_ns = fv.last_ns;
        }
    }
}

/// The backend the client in `e.client` was sent to through its frontend,
/// if that was within the affinity timeout and the backend is still one of
/// the set's; its entry is refreshed in place (a new flow starts now).
#[inline(always)]
fn kept_backend(svc: &ExternalValue, t: u64, e: &NewEntries) -> Option<u32> {
    let kept = EXT_CLIENTS.get_ptr_mut(&e.client)?;
    // SAFETY: LRU entries are read and written in place at once; a racing
    // eviction at worst loses this refresh.
    let (backend, last_ns) = unsafe { ((*kept).backend, (*kept).last_ns) };
    let member = ExtMember {
        table: svc.table,
        backend,
    };
    let fresh = t.wrapping_sub(last_ns) <= u64::from(svc.affinity_timeout) * NS_PER_SEC;
    if !fresh || EXT_MEMBERS.get_ptr(&member).is_none() {
        return None;
    }
    // SAFETY: as above.
    unsafe { (*kept).last_ns = t };
    Some(backend)
}

/// Picks the flow's backend from the Maglev table and records both
/// directions. Its steps are called one after the other from here, not
/// from each other, so that their frames are never on the stack together.
#[inline(always)]
fn new_flow<F: Ip>(
    ctx: &TcContext,
    p: &Packet<F>,
    frontend: &ServiceKey,
    svc: &ExternalValue,
) -> bool {
    let Some(e) = NEW_ENTRIES.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot (programs run with migration disabled and
    // TC programs do not nest on one CPU).
    let e = unsafe { &mut *e };
    if svc.flags & EXT_AFFINITY != 0 {
        e.client = ExtClientKey {
            frontend: *frontend,
            client: F::wide(p.saddr),
        };
    }
    let t = now();
    match plan_flow(ctx, p, svc, t, e) {
        None => return false,
        // Called from here, after `plan_flow`, so that their frames are
        // never on the stack together.
        Some(true) => plan_local(ctx, p, e),
        Some(false) => {}
    }
    let port = snat_port(p, t, e);
    if port == 0 {
        return false;
    }
    record_flow(p, port as u16, e).is_some()
}

/// The flow's backend, and for a remote one the routes both ways and the
/// SNAT address, written into `e`. A local backend is left with
/// `e.flow.ifindex` 0. Whether the backend is one of this node's (see
/// `plan_local`).
#[inline(never)]
fn plan_flow<F: Ip>(
    ctx: &TcContext,
    p: &Packet<F>,
    svc: &ExternalValue,
    t: u64,
    e: &mut NewEntries,
) -> Option<bool> {
    plan(ctx, p, svc, t, e)
}

#[inline(always)]
fn plan<F: Ip>(
    ctx: &TcContext,
    p: &Packet<F>,
    svc: &ExternalValue,
    t: u64,
    e: &mut NewEntries,
) -> Option<bool> {
    let sticky = svc.flags & EXT_AFFINITY != 0;
    let id = match sticky.then(|| kept_backend(svc, t, e)).flatten() {
        Some(id) => id,
        None => {
            let h = flow_hash(F::hash_word(p.saddr), p.sport, p.dport, p.proto, sticky);
            let slot = h.checked_rem(svc.size)?;
            // SAFETY: inner arrays are never written while a program reads
            // them (the agent swaps in a new table).
            let id = unsafe { *MAGLEV.get_value(&svc.table, &slot)? };
            if sticky {
                let v = ExtClientValue {
                    backend: id,
                    pad: 0,
                    last_ns: t,
                };
                let _ = EXT_CLIENTS.insert(&e.client, &v, 0);
            }
            id
        }
    };
    // SAFETY: copied out at once.
    let b = unsafe { *EXT_BACKENDS.get(&id)? };
    e.flow = FlowValue {
        backend: b.addr,
        snat: [0; 4],
        nexthop: [0; 4],
        backend_port: b.port,
        snat_port: 0,
        ifindex: 0,
        last_ns: t,
        flags: 0,
        local_ifindex: 0,
    };
    e.rev = RevFlowValue {
        frontend: F::wide(p.daddr),
        client: F::wide(p.saddr),
        nexthop: [0; 4],
        frontend_port: p.dport,
        client_port: p.sport,
        ifindex: 0,
        last_ns: t,
        flags: 0,
        local_ifindex: 0,
    };
    if b.flags & BACKEND_LOCAL != 0 || svc.flags & EXT_LOCAL != 0 {
        // The backend sees the client's own tuple.
        return Some(b.flags & BACKEND_LOCAL != 0);
    }
    e.flow.ifindex = route::<F>(
        ctx,
        p.proto,
        F::narrow(&b.addr),
        &mut e.flow.nexthop,
        Some(&mut e.flow.snat),
    );
    e.rev.ifindex = route::<F>(ctx, p.proto, p.saddr, &mut e.rev.nexthop, None);
    (e.flow.ifindex != 0 && e.rev.ifindex != 0).then_some(false)
}

/// A local backend's flow is sent directly both ways when the backend is
/// routed through a pod-facing interface (`EXT_POD_DEVS`) and the client
/// has a route: the two interfaces and next hops, written into `e`. Else
/// its `local_ifindex`es stay 0 and the node forwards it.
#[inline(never)]
fn plan_local<F: Ip>(ctx: &TcContext, p: &Packet<F>, e: &mut NewEntries) {
    let to_pod = route::<F>(
        ctx,
        p.proto,
        F::narrow(&e.flow.backend),
        &mut e.flow.nexthop,
        None,
    );
    // SAFETY: only whether the key is there is read.
    if to_pod == 0 || unsafe { EXT_POD_DEVS.get(&to_pod) }.is_none() {
        return;
    }
    let to_client = route::<F>(ctx, p.proto, p.saddr, &mut e.rev.nexthop, None);
    if to_client != 0 {
        e.flow.local_ifindex = to_pod;
        e.rev.local_ifindex = to_client;
    }
}

/// The flow's source on the backend's side: the SNAT address of a remote
/// backend's flow, the client's own for a local one.
#[inline(always)]
fn source<F: Ip>(p: &Packet<F>, e: &NewEntries) -> F::Addr {
    if e.flow.ifindex == 0 {
        p.saddr
    } else {
        F::narrow(&e.flow.snat)
    }
}

/// Inserts both directions of the planned flow, its backend-side source
/// port being `port`.
#[inline(always)]
fn record_flow<F: Ip>(p: &Packet<F>, port: u16, e: &mut NewEntries) -> Option<()> {
    let src = source(p, e);
    if e.flow.ifindex != 0 || port != p.sport {
        // A remote flow is always SNATed; a local one changes only the
        // port, and only when the client's own is taken (see snat_port).
        e.flow.snat = F::wide(src);
        e.flow.snat_port = port;
    }
    e.key = flow_key::<F>(
        F::narrow(&e.flow.backend),
        src,
        e.flow.backend_port,
        port,
        p.proto,
    );
    REV_FLOWS.insert(&e.key, &e.rev, 0).ok()?;
    e.key = flow_key::<F>(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    FLOWS.insert(&e.key, &e.flow, 0).ok()?;
    Some(())
}

/// A port that makes (backend, source, port) a free tuple for the planned
/// flow in `e`: the client's own if it is, else one from the SNAT range; 0
/// when none is. The source is the SNAT address, or the client's own for
/// flows that keep it: if another flow of this client already holds its
/// tuple (the same client port to another frontend of this backend, still
/// open or closing), only the port is changed, as conntrack does. A tuple
/// is free when no flow holds it or its flow has long gone quiet; failing
/// that, the first one whose TCP flow closed (`REUSE_SHUT_NS`) is taken.
/// The SNAT range's candidates depend on the frontend's port and the
/// backend too, so that one client port reused towards many NodePorts
/// spreads over it.
/// The lookups' keys are built in `e`.
#[inline(never)]
fn snat_port<F: Ip>(p: &Packet<F>, t: u64, e: &mut NewEntries) -> u32 {
    let src = source(p, e);
    let backend_port = e.flow.backend_port;
    let start = flow_hash(
        F::hash_word(p.saddr) ^ mix(F::hash_word(F::narrow(&e.flow.backend))),
        p.sport,
        p.dport,
        p.proto,
        false,
    ) % SNAT_PORT_SPAN;
    let mut shut = 0;
    let mut i = 0;
    while i <= SNAT_TRIES {
        let port = if i == 0 {
            p.sport
        } else {
            ((SNAT_PORT_MIN + (start + i * 613) % SNAT_PORT_SPAN) as u16).to_be()
        };
        i += 1;
        // A port that is a frontend on the SNAT address would make the
        // replies look like new external flows.
        e.frontend = ServiceKey {
            addr: F::wide(src),
            port,
            proto: p.proto,
            family: F::FAMILY,
        };
        if unsafe { EXTERNAL.get(&e.frontend) }.is_some() {
            continue;
        }
        e.key = flow_key::<F>(F::narrow(&e.flow.backend), src, backend_port, port, p.proto);
        match REV_FLOWS.get_ptr(&e.key) {
            None => return u32::from(port),
            Some(r) => {
                // SAFETY: an LRU entry, read field by field (a copy of the
                // whole value would not fit beside the callers' frames).
                let r = unsafe { &*r };
                // This very flow starting over (a new connection on its
                // tuple) takes its own entry back.
                let same_flow = F::narrow(&r.client) == p.saddr
                    && r.client_port == p.sport
                    && F::narrow(&r.frontend) == p.daddr
                    && r.frontend_port == p.dport;
                let idle = t.wrapping_sub(r.last_ns);
                let free = if p.proto == PROTO_UDP || r.flags & FLOW_CLOSING != 0 {
                    idle > REUSE_CLOSED_NS
                } else {
                    idle > REUSE_IDLE_TCP_NS
                };
                if same_flow || free {
                    return u32::from(port);
                }
                let closed = r.flags & FLOW_RESET != 0
                    || r.flags & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND)
                        == FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
                if shut == 0 && p.proto == PROTO_TCP && closed && idle > REUSE_SHUT_NS {
                    shut = u32::from(port);
                }
            }
        }
    }
    shut
}

/// The packet an ICMP error quotes (its first bytes, as the sender got it).
struct Quoted<F: Ip> {
    /// Offset of the quoted network header.
    ip: usize,
    /// Offset of its L4 header.
    l4: usize,
    proto: u8,
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
}

/// The flow an ICMP error at `icmp` is about, if it is an error about TCP
/// or UDP.
#[inline(always)]
fn quoted<F: Ip>(ctx: &TcContext, icmp: usize) -> Option<Quoted<F>> {
    let ty: u8 = ctx.load(icmp).ok()?;
    if !F::icmp_error(ty) {
        return None;
    }
    let ip = icmp + 8;
    let h = F::quoted(ctx, ip)?;
    Some(Quoted {
        ip,
        l4: h.l4,
        proto: h.proto,
        saddr: h.saddr,
        daddr: h.daddr,
        sport: ctx.load(h.l4).ok()?,
        dport: ctx.load(h.l4 + 2).ok()?,
    })
}

/// Rewrites a port of the quoted packet, and the ICMP checksum over it.
/// (The quoted L4 checksum is left: the receiving stack does not check
/// it.)
#[inline(always)]
fn set_quoted_port<F: Ip>(
    ctx: &TcContext,
    icmp: usize,
    q: &Quoted<F>,
    src: bool,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.store(q.l4 + if src { 0 } else { 2 }, &new, 0)?;
    ctx.l4_csum_replace(icmp + 2, u64::from(old), u64::from(new), 2)
}

/// The reverse entry of the flow a quoted packet (as the backend side saw
/// it) belongs to.
#[inline(always)]
fn flow_of_quoted<F: Ip>(q: &Quoted<F>) -> Option<RevFlowValue> {
    let rkey = flow_key::<F>(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    // SAFETY: copied out at once.
    REV_FLOWS.get_ptr(&rkey).map(|r| unsafe { *r })
}

/// Egress: an ICMP error about a flow to a local backend (the quoted packet
/// went client -> backend) leaves as one about client -> frontend, from
/// the frontend if the backend sent it.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn icmp_of_local<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> Option<i32> {
    let q = quoted::<F>(ctx, p.l4)?;
    let rv = flow_of_quoted(&q)?;
    if rv.ifindex != 0 {
        return None;
    }
    let frontend = F::narrow(&rv.frontend);
    F::set_quoted_addr(ctx, p.l4, q.ip, false, q.daddr, frontend).ok()?;
    set_quoted_port(ctx, p.l4, &q, false, q.dport, rv.frontend_port).ok()?;
    set_quoted_port(ctx, p.l4, &q, true, q.sport, rv.client_port).ok()?;
    if p.saddr == q.daddr {
        let to = Tuple {
            saddr: frontend,
            daddr: p.daddr,
            sport: 0,
            dport: 0,
        };
        if !translate(ctx, p, &to, false) {
            return Some(TC_ACT_SHOT);
        }
    }
    Some(TC_ACT_OK)
}

/// Ingress: an ICMP error about a SNATed flow (the quoted packet went
/// node -> backend) goes to the client as one about client -> frontend,
/// from the frontend.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn icmp_of_snat<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> Option<i32> {
    let q = quoted::<F>(ctx, p.l4)?;
    let rv = flow_of_quoted(&q)?;
    if rv.ifindex == 0 {
        return None;
    }
    let (client, frontend) = (F::narrow(&rv.client), F::narrow(&rv.frontend));
    F::set_quoted_addr(ctx, p.l4, q.ip, true, q.saddr, client).ok()?;
    set_quoted_port(ctx, p.l4, &q, true, q.sport, rv.client_port).ok()?;
    F::set_quoted_addr(ctx, p.l4, q.ip, false, q.daddr, frontend).ok()?;
    set_quoted_port(ctx, p.l4, &q, false, q.dport, rv.frontend_port).ok()?;
    let to = Tuple {
        saddr: frontend,
        daddr: client,
        sport: 0,
        dport: 0,
    };
    if !translate(ctx, p, &to, true) {
        return Some(TC_ACT_SHOT);
    }
    Some(redirect::<F>(ctx, rv.ifindex, F::narrow(&rv.nexthop)))
}

/// A packet to a frontend whose Service has no endpoints at all, answered
/// as kube-proxy's REJECT answers it: ICMP port unreachable from the
/// frontend, sent back out of the interface the packet came in on, under
/// the same limits as the kernel's.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn reject<F: Ip>(ctx: &TcContext, p: &Packet<F>) -> i32 {
    if may_refuse::<F>(p.saddr) {
        answer(ctx, p, F::PORT_UNREACHABLE)
    } else {
        TC_ACT_SHOT
    }
}

/// Whether a port unreachable may go to `client` now, within the kernel's
/// limits (a packet over them is dropped unanswered, as the kernel drops
/// it). Buckets are updated without locks: CPUs racing on one may let a
/// message more or fewer through.
#[inline(always)]
fn may_refuse<F: Ip>(client: F::Addr) -> bool {
    let t = now();
    let w = F::wide(client);
    let key = [w[0], w[1], w[2], w[3], u32::from(F::FAMILY)];
    let to_client = match REJECT_PEERS.get_ptr_mut(&key) {
        // SAFETY: this client's bucket, written in place.
        Some(b) => unsafe { (*b).take(t, PEER_INTERVAL_NS, PEER_BURST_NS) },
        None => {
            let mut b = Bucket::default();
            let sent = b.take(t, PEER_INTERVAL_NS, PEER_BURST_NS);
            let _ = REJECT_PEERS.insert(&key, &b, 0);
            sent
        }
    };
    if !to_client {
        return false;
    }
    match REJECT_ALL.get_ptr_mut(0) {
        // SAFETY: the one overall bucket, written in place.
        Some(b) => unsafe { (*b).take(t, ALL_INTERVAL_NS, ALL_BURST_NS) },
        None => true,
    }
}

/// Turns the packet into an ICMP error about it (`icmp`: the 8-byte ICMP
/// header) and sends it back out of the interface it came in on.
#[inline(always)]
fn answer<F: Ip>(ctx: &TcContext, p: &Packet<F>, icmp: [u8; 8]) -> i32 {
    if icmp_error(ctx, p, icmp).is_some() {
        // SAFETY: the context is an skb; ifindex is readable.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        mark_translated(ctx);
        // SAFETY: plain helper call on this packet.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    } else {
        TC_ACT_SHOT
    }
}

/// Turns the packet into its own ICMP error: cut to its network header and
/// the start of its L4 header, room made for the new headers in front,
/// addresses and link-layer addresses swapped.
#[inline(always)]
fn icmp_error<F: Ip>(ctx: &TcContext, p: &Packet<F>, icmp: [u8; 8]) -> Option<()> {
    // The quote reaches into the L4 header, so that the client's stack
    // finds the socket: a later fragment, which has none, is not answered.
    if !p.has_l4() {
        return None;
    }
    // TCP quotes its 20-byte header: a packet the stack sent with its
    // checksum still to fill in (over a veth) cannot be cut inside it.
    // An IPv6 first fragment quotes its fragment header too; IPv4 headers
    // with options are not quoted here (the packet is dropped).
    let tcp = p.proto == PROTO_TCP;
    match p.l4 - (IP + F::HLEN) {
        0 if tcp => build_icmp_error::<F, 20>(ctx, p, icmp),
        0 => build_icmp_error::<F, 8>(ctx, p, icmp),
        8 if tcp && F::FAMILY == FAMILY_V6 => build_icmp_error::<F, 28>(ctx, p, icmp),
        8 if F::FAMILY == FAMILY_V6 => build_icmp_error::<F, 16>(ctx, p, icmp),
        _ => None,
    }
}

#[inline(always)]
fn build_icmp_error<F: Ip, const L4: usize>(
    ctx: &TcContext,
    p: &Packet<F>,
    header: [u8; 8],
) -> Option<()> {
    let quote = F::HLEN + L4;
    // SAFETY: plain helper call on this packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (IP + quote) as u32, 0) } != 0 {
        return None;
    }
    ctx.adjust_room(F::ICMP_HEADERS as i32, BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP + F::ICMP_HEADERS + quote > end {
        return None;
    }
    // The ICMP message: its 8-byte header and the quote.
    let len = 8 + quote;
    // SAFETY: the whole reply is bounds checked against data_end above.
    unsafe {
        let eth = start as *mut [u8; 6];
        let dst = core::ptr::read_unaligned(eth);
        let src = core::ptr::read_unaligned(eth.add(1));
        core::ptr::write_unaligned(eth, src);
        core::ptr::write_unaligned(eth.add(1), dst);
        let pseudo = F::write_icmp_header(start + IP, p.daddr, p.saddr, len);
        let icmp = (start + IP + F::HLEN) as *mut u8;
        core::ptr::write_unaligned(icmp as *mut [u8; 8], header);
        let icmp_sum = csum::fold(csum_of(icmp, len as u32, pseudo));
        core::ptr::write_unaligned(icmp.add(2) as *mut u16, icmp_sum);
    }
    Some(())
}
