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
//! and are rewritten by `skiff_egress` as they leave.
//!
//! Under `externalTrafficPolicy: Local` the table holds local backends only
//! and no flow is SNATed: the backend sees the client's address. When one
//! client port reaches one backend through two frontends at once, the
//! second flow's port is remapped (the address kept), as conntrack does, so
//! that the backend never sees one tuple for two connections.
//!
//! ICMP errors about a tracked flow (port unreachable, fragmentation
//! needed, time exceeded) are translated too: the packet they quote and
//! their own addresses, so that the client's socket gets them.
//!
//! IPv4 only for now; fragments after the first are not translated.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams},
    btf_maps::{Array, HashOfMaps},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail},
    macros::{btf_map, classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use skiff_ebpf_common::{
    BACKEND_LOCAL, DEFAULT_MAGLEV_SIZE, EXT_AFFINITY, EXT_LOCAL, EXT_REJECT, ExtBackend,
    ExternalValue, FAMILY_V4, FLOW_CLOSING, FlowKey, FlowValue, MAGLEV_INNER_FLAGS,
    MAX_EXT_BACKENDS, MAX_EXTERNAL, MAX_FLOWS, MAX_MAGLEV_TABLES, PROTO_TCP, PROTO_UDP,
    RevFlowValue, ServiceKey, csum, flow_hash,
};

use crate::BPF_F_NO_PREALLOC;
use crate::packet::{at, fold_sum};

#[map(name = "EXTERNAL")]
static EXTERNAL: HashMap<ServiceKey, ExternalValue> =
    HashMap::pinned(MAX_EXTERNAL, BPF_F_NO_PREALLOC);

#[map(name = "EXT_BACKENDS")]
static EXT_BACKENDS: HashMap<u32, ExtBackend> =
    HashMap::pinned(MAX_EXT_BACKENDS, BPF_F_NO_PREALLOC);

/// Maglev tables: backend ids, `size` of them (the agent creates each
/// inner array at the configured size; the template's size is only the
/// default).
#[btf_map(name = "MAGLEV")]
static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { DEFAULT_MAGLEV_SIZE as usize }, { MAGLEV_INNER_FLAGS as usize }>,
    { MAX_MAGLEV_TABLES as usize },
> = HashOfMaps::new();

/// Room for a new flow's two entries, built here and inserted from here:
/// too big for the stack beside the callers' frames.
#[repr(C)]
struct NewEntries {
    flow: FlowValue,
    rev: RevFlowValue,
}

#[map(name = "NEW_ENTRIES")]
static NEW_ENTRIES: PerCpuArray<NewEntries> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "REV_FLOWS")]
static REV_FLOWS: LruHashMap<FlowKey, RevFlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP: usize = ETH_HLEN;
const IP_SADDR: usize = IP + 12;
const IP_DADDR: usize = IP + 16;
const AF_INET: u8 = 2;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const BPF_ADJ_ROOM_MAC: u32 = 1;
/// An ICMP error's own headers (IP without options, ICMP).
const ICMP_HEADERS: usize = 28;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

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
struct Packet {
    proto: u8,
    tcp_flags: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// Offset of the L4 header.
    l4: usize,
}

impl Packet {
    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    fn closing(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// A TCP SYN without ACK: the start of a connection.
    fn opening(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype: u16 = at(ctx, 12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let vihl = at::<u16>(ctx, IP)?.to_ne_bytes()[0];
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = at(ctx, IP + 6)?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let proto = at::<u16>(ctx, IP + 8)?.to_ne_bytes()[1];
    let l4 = IP + ihl;
    let saddr = at(ctx, IP_SADDR)?;
    let daddr = at(ctx, IP_DADDR)?;
    if proto == PROTO_ICMP {
        return Some(Packet {
            proto,
            tcp_flags: 0,
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            l4,
        });
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let tcp_flags = if proto == PROTO_TCP {
        at::<u16>(ctx, l4 + 12)?.to_ne_bytes()[1]
    } else {
        0
    };
    Some(Packet {
        proto,
        tcp_flags,
        saddr,
        daddr,
        sport: at(ctx, l4)?,
        dport: at(ctx, l4 + 2)?,
        l4,
    })
}

/// What a translated packet's addresses and ports become.
#[derive(Clone, Copy)]
struct Tuple {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// Rewrites the packet's addresses and ports to `to` (and takes one hop off
/// its TTL when `hop`): the fields and the IP checksum are written in
/// place; the L4 checksum is updated by the kernel (it knows whether the
/// packet's checksum is complete or partial), once for the addresses and
/// once for the ports. An ICMP packet has no ports and its checksum covers
/// no pseudo-header: only its addresses change. False when the packet
/// cannot be translated (or has no hop left).
#[inline(always)]
fn translate(ctx: &TcContext, p: &Packet, to: &Tuple, hop: bool) -> bool {
    let mut addrs = 0u32;
    if to.saddr != p.saddr {
        addrs = csum::add(addrs, csum::diff(p.saddr, to.saddr));
    }
    if to.daddr != p.daddr {
        addrs = csum::add(addrs, csum::diff(p.daddr, to.daddr));
    }
    let mut ports = 0u32;
    if to.sport != p.sport {
        ports = csum::add(ports, csum::diff(u32::from(p.sport), u32::from(to.sport)));
    }
    if to.dport != p.dport {
        ports = csum::add(ports, csum::diff(u32::from(p.dport), u32::from(to.dport)));
    }
    let need = p.l4 + 4;
    if ctx.data() + need > ctx.data_end() && ctx.pull_data(need as u32).is_err() {
        return false;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP + 20 > end || start + p.l4 + 4 > end {
        return false;
    }
    let ip = start + IP;
    let l4 = start + p.l4;
    // SAFETY: both headers are bounds checked against data_end above.
    unsafe {
        let mut ip_diff = addrs;
        if hop {
            match crate::packet::take_hop(ip) {
                Some(d) => ip_diff = csum::add(ip_diff, d),
                None => return false,
            }
        }
        core::ptr::write_unaligned((ip + 12) as *mut u32, to.saddr);
        core::ptr::write_unaligned((ip + 16) as *mut u32, to.daddr);
        let csum = (ip + 10) as *mut u16;
        core::ptr::write_unaligned(csum, csum::apply(core::ptr::read_unaligned(csum), ip_diff));
        if p.proto == PROTO_ICMP {
            return true;
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

fn l4_flags(p: &Packet) -> u64 {
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

/// Sends the (rewritten, TTL already decremented) packet out of `ifindex`
/// towards `nexthop`, the kernel's neighbour table filling in the
/// link-layer addresses. The packet is marked so that the egress program
/// lets it pass unread.
#[inline(always)]
fn redirect(ctx: &TcContext, ifindex: u32, nexthop: u32) -> i32 {
    mark_translated(ctx);
    crate::packet::redirect_neigh(ifindex, nexthop)
}

/// The route the kernel would take to `dst`: (interface, next hop, source
/// address it would use).
#[inline(never)]
fn route(ctx: &TcContext, p: &Packet, dst: u32) -> Option<(u32, u32, u32)> {
    // SAFETY: plain integers; all-zero is a valid request to fill in.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    // SAFETY: the context is an skb; ifindex is readable.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: fib lives for the call; the size is its own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    // SAFETY: the helper filled the IPv4 members.
    unsafe {
        Some((
            fib.ifindex,
            fib.__bindgen_anon_4.ipv4_dst,
            fib.__bindgen_anon_3.ipv4_src,
        ))
    }
}

fn v4(a: u32) -> [u32; 4] {
    [a, 0, 0, 0]
}

fn flow_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        saddr: v4(saddr),
        daddr: v4(daddr),
        sport,
        dport,
        proto,
        family: FAMILY_V4,
        pad: 0,
    }
}

#[classifier]
pub fn skiff_ingress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    if p.proto == PROTO_ICMP {
        return icmp_of_snat(&ctx, &p).unwrap_or(TC_ACT_OK);
    }
    let key = ServiceKey {
        addr: v4(p.daddr),
        port: p.dport,
        proto: p.proto,
        family: FAMILY_V4,
    };
    // SAFETY: copied out at once (BPF_F_NO_PREALLOC).
    if let Some(svc) = unsafe { EXTERNAL.get(&key) } {
        let svc = *svc;
        // The flow's entries are made here, not inside `forward`, so that
        // the two frames are never on the stack together.
        return match forward(&ctx, &p) {
            NEW_FLOW if svc.size > 0 && new_flow(&ctx, &p, &svc) => match forward(&ctx, &p) {
                NEW_FLOW => TC_ACT_SHOT,
                verdict => verdict,
            },
            NEW_FLOW if svc.size == 0 && svc.flags & EXT_REJECT != 0 => reject(&ctx, &p),
            NEW_FLOW => TC_ACT_SHOT,
            verdict => verdict,
        };
    }
    reply_of_snat(&ctx, &p)
}

/// `forward`'s answer when the packet starts a flow.
const NEW_FLOW: i32 = i32::MIN;

#[classifier]
pub fn skiff_egress(ctx: TcContext) -> i32 {
    // SAFETY: the context is an skb; mark is readable.
    if unsafe { (*ctx.skb.skb).mark } & TRANSLATED_MARK != 0 {
        return TC_ACT_OK;
    }
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    if p.proto == PROTO_ICMP {
        return icmp_of_local(&ctx, &p).unwrap_or(TC_ACT_OK);
    }
    let rkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let Some(r) = REV_FLOWS.get_ptr_mut(&rkey) else {
        return TC_ACT_OK;
    };
    // SAFETY: LRU entry, read and updated in place (a racing update only
    // loses a timestamp).
    let rv = unsafe { &mut *r };
    if rv.ifindex != 0 {
        // A SNATed flow's reply is handled on ingress.
        return TC_ACT_OK;
    }
    touch_rev(rv, &p);
    let (frontend, frontend_port, client_port) = (rv.frontend[0], rv.frontend_port, rv.client_port);
    // The client's port comes back too where the flow's was remapped.
    let to = Tuple {
        saddr: frontend,
        daddr: p.daddr,
        sport: frontend_port,
        dport: client_port,
    };
    if translate(&ctx, &p, &to, false) {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn touch_rev(rv: &mut RevFlowValue, p: &Packet) {
    let t = now();
    if p.closing() {
        rv.flags |= FLOW_CLOSING;
        rv.last_ns = t;
    } else if t.wrapping_sub(rv.last_ns) > REFRESH_NS {
        rv.last_ns = t;
    }
}

/// A reply of a SNATed flow (backend -> node): back to the client, from
/// the frontend. Anything else passes.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn reply_of_snat(ctx: &TcContext, p: &Packet) -> i32 {
    snat_reply(ctx, p).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn snat_reply(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let rkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let r = REV_FLOWS.get_ptr_mut(&rkey)?;
    // SAFETY: see skiff_egress.
    let rv = unsafe { &mut *r };
    if rv.ifindex == 0 {
        return None;
    }
    touch_rev(rv, p);
    let to = Tuple {
        saddr: rv.frontend[0],
        daddr: rv.client[0],
        sport: rv.frontend_port,
        dport: rv.client_port,
    };
    let (ifindex, nexthop) = (rv.ifindex, rv.nexthop[0]);
    if !translate(ctx, p, &to, true) {
        return Some(TC_ACT_SHOT);
    }
    Some(redirect(ctx, ifindex, nexthop))
}

/// A packet to an external frontend: its flow's backend, or a new flow.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn forward(ctx: &TcContext, p: &Packet) -> i32 {
    forward_known(ctx, p).unwrap_or(TC_ACT_SHOT)
}

#[inline(always)]
fn forward_known(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let fkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let t = now();
    let f = match FLOWS.get_ptr_mut(&fkey) {
        // A new connection on a tuple whose last one closed starts over.
        Some(f) if !(p.opening() && unsafe { (*f).flags } & FLOW_CLOSING != 0) => f,
        _ => return Some(NEW_FLOW),
    };
    // SAFETY: see skiff_egress.
    let fv = unsafe { &mut *f };
    if p.closing() {
        fv.flags |= FLOW_CLOSING;
        fv.last_ns = t;
        mark_rev_closing(p, fv);
    } else if t.wrapping_sub(fv.last_ns) > REFRESH_NS {
        fv.last_ns = t;
    }
    // Fields read one at a time (no copy of the whole value on the stack).
    let (backend, backend_port, ifindex) = (fv.backend[0], fv.backend_port, fv.ifindex);
    let (snat, snat_port, nexthop) = (fv.snat[0], fv.snat_port, fv.nexthop[0]);
    let mut to = Tuple {
        saddr: p.saddr,
        daddr: backend,
        sport: p.sport,
        dport: backend_port,
    };
    if snat_port != 0 {
        to.sport = snat_port;
    }
    if ifindex == 0 {
        return translate(ctx, p, &to, false).then_some(TC_ACT_OK);
    }
    to.saddr = snat;
    if !translate(ctx, p, &to, true) {
        return None;
    }
    Some(redirect(ctx, ifindex, nexthop))
}

#[inline(always)]
fn mark_rev_closing(p: &Packet, fv: &FlowValue) {
    let (daddr, dport) = if fv.ifindex == 0 {
        // Local: the client's address, and its port unless remapped.
        let port = if fv.snat_port != 0 {
            fv.snat_port
        } else {
            p.sport
        };
        (p.saddr, port)
    } else {
        (fv.snat[0], fv.snat_port)
    };
    let rkey = flow_key(fv.backend[0], daddr, fv.backend_port, dport, p.proto);
    if let Some(r) = REV_FLOWS.get_ptr_mut(&rkey) {
        // SAFETY: see skiff_egress.
        unsafe {
            (*r).flags |= FLOW_CLOSING;
            (*r).last_ns = fv.last_ns;
        }
    }
}

/// Picks the flow's backend from the Maglev table and records both
/// directions.
#[inline(never)]
fn new_flow(ctx: &TcContext, p: &Packet, svc: &ExternalValue) -> bool {
    new_flow_entries(ctx, p, svc, now()).is_some()
}

#[inline(always)]
fn new_flow_entries(ctx: &TcContext, p: &Packet, svc: &ExternalValue, t: u64) -> Option<()> {
    let h = flow_hash(
        p.saddr,
        p.sport,
        p.dport,
        p.proto,
        svc.flags & EXT_AFFINITY != 0,
    );
    let slot = h.checked_rem(svc.size)?;
    // SAFETY: inner arrays are never written while a program reads them
    // (the agent swaps in a new table).
    let id = unsafe { *MAGLEV.get_value(&svc.table, &slot)? };
    // SAFETY: copied out at once.
    let b = unsafe { *EXT_BACKENDS.get(&id)? };

    let e = NEW_ENTRIES.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot (programs run with migration disabled and
    // TC programs do not nest on one CPU).
    let e = unsafe { &mut *e };
    e.flow = FlowValue {
        backend: b.addr,
        snat: [0; 4],
        nexthop: [0; 4],
        backend_port: b.port,
        snat_port: 0,
        ifindex: 0,
        last_ns: t,
        flags: 0,
        pad: 0,
    };
    e.rev = RevFlowValue {
        frontend: v4(p.daddr),
        client: v4(p.saddr),
        nexthop: [0; 4],
        frontend_port: p.dport,
        client_port: p.sport,
        ifindex: 0,
        last_ns: t,
        flags: 0,
        pad: 0,
    };
    let local = b.flags & BACKEND_LOCAL != 0 || svc.flags & EXT_LOCAL != 0;
    let rkey = if local {
        // The backend sees the client's own tuple. If another flow of this
        // client already holds it (the same client port to another
        // frontend of this backend, still open or closing), only the port
        // is changed, as conntrack does; the client's address stays.
        let port = snat_port(p, &b, p.saddr, t);
        if port == 0 {
            return None;
        }
        let port = port as u16;
        if port != p.sport {
            e.flow.snat = v4(p.saddr);
            e.flow.snat_port = port;
        }
        flow_key(b.addr[0], p.saddr, b.port, port, p.proto)
    } else {
        let (out_if, nexthop, src) = route(ctx, p, b.addr[0])?;
        let (back_if, back_nh, _) = route(ctx, p, p.saddr)?;
        let port = snat_port(p, &b, src, t);
        if port == 0 {
            return None;
        }
        let port = port as u16;
        e.flow.snat = v4(src);
        e.flow.snat_port = port;
        e.flow.ifindex = out_if;
        e.flow.nexthop = v4(nexthop);
        e.rev.ifindex = back_if;
        e.rev.nexthop = v4(back_nh);
        flow_key(b.addr[0], src, b.port, port, p.proto)
    };
    REV_FLOWS.insert(&rkey, &e.rev, 0).ok()?;
    let fkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    FLOWS.insert(&fkey, &e.flow, 0).ok()?;
    Some(())
}

/// A port that makes (backend, `src`, port) a free tuple: the client's own
/// if it is, else one from the SNAT range; 0 when none is. `src` is the
/// SNAT address, or the client's own for flows that keep it.
#[inline(never)]
fn snat_port(p: &Packet, b: &ExtBackend, src: u32, t: u64) -> u32 {
    let start = flow_hash(p.saddr, p.sport, b.port, p.proto, false) % SNAT_PORT_SPAN;
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
        let as_frontend = ServiceKey {
            addr: v4(src),
            port,
            proto: p.proto,
            family: FAMILY_V4,
        };
        if unsafe { EXTERNAL.get(&as_frontend) }.is_some() {
            continue;
        }
        let rkey = flow_key(b.addr[0], src, b.port, port, p.proto);
        match REV_FLOWS.get_ptr(&rkey) {
            None => return u32::from(port),
            Some(r) => {
                // SAFETY: copied out at once.
                let r = unsafe { *r };
                // This very flow starting over (a new connection on its
                // tuple) takes its own entry back.
                let same_flow = r.client[0] == p.saddr
                    && r.client_port == p.sport
                    && r.frontend[0] == p.daddr
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
            }
        }
    }
    0
}

/// The packet an ICMP error quotes (its first bytes, as the sender got it).
struct Quoted {
    /// Offset of the quoted IP header.
    ip: usize,
    /// Offset of its L4 header.
    l4: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// The flow an ICMP error at `icmp` is about, if it is an error about TCP
/// or UDP.
#[inline(always)]
fn quoted(ctx: &TcContext, icmp: usize) -> Option<Quoted> {
    let ty: u8 = ctx.load(icmp).ok()?;
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED && ty != ICMP_PARAMETERPROB {
        return None;
    }
    let ip = icmp + 8;
    let vihl: u8 = ctx.load(ip).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto: u8 = ctx.load(ip + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = ip + ihl;
    Some(Quoted {
        ip,
        l4,
        proto,
        saddr: ctx.load(ip + 12).ok()?,
        daddr: ctx.load(ip + 16).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
    })
}

/// Rewrites an address of the quoted packet: its IP checksum, and the
/// ICMP checksum over both changes. (The quoted L4 checksum is left: the
/// receiving stack does not check it.)
#[inline(always)]
fn set_quoted_addr(
    ctx: &TcContext,
    icmp: usize,
    q: &Quoted,
    src: bool,
    old: u32,
    new: u32,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let csum = q.ip + 10;
    let old_sum: u16 = ctx.load(csum)?;
    ctx.l3_csum_replace(csum, u64::from(old), u64::from(new), 4)?;
    let new_sum: u16 = ctx.load(csum)?;
    ctx.store(q.ip + if src { 12 } else { 16 }, &new, 0)?;
    ctx.l4_csum_replace(icmp + 2, u64::from(old), u64::from(new), 4)?;
    ctx.l4_csum_replace(icmp + 2, u64::from(old_sum), u64::from(new_sum), 2)
}

#[inline(always)]
fn set_quoted_port(
    ctx: &TcContext,
    icmp: usize,
    q: &Quoted,
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
fn flow_of_quoted(q: &Quoted) -> Option<RevFlowValue> {
    let rkey = flow_key(q.daddr, q.saddr, q.dport, q.sport, q.proto);
    // SAFETY: copied out at once.
    REV_FLOWS.get_ptr(&rkey).map(|r| unsafe { *r })
}

/// Egress: an ICMP error about a flow to a local backend (the quoted packet
/// went client -> backend) leaves as one about client -> frontend, from
/// the frontend if the backend sent it.
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn icmp_of_local(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let q = quoted(ctx, p.l4)?;
    let rv = flow_of_quoted(&q)?;
    if rv.ifindex != 0 {
        return None;
    }
    set_quoted_addr(ctx, p.l4, &q, false, q.daddr, rv.frontend[0]).ok()?;
    set_quoted_port(ctx, p.l4, &q, false, q.dport, rv.frontend_port).ok()?;
    set_quoted_port(ctx, p.l4, &q, true, q.sport, rv.client_port).ok()?;
    if p.saddr == q.daddr {
        let to = Tuple {
            saddr: rv.frontend[0],
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
fn icmp_of_snat(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let q = quoted(ctx, p.l4)?;
    let rv = flow_of_quoted(&q)?;
    if rv.ifindex == 0 {
        return None;
    }
    set_quoted_addr(ctx, p.l4, &q, true, q.saddr, rv.client[0]).ok()?;
    set_quoted_port(ctx, p.l4, &q, true, q.sport, rv.client_port).ok()?;
    set_quoted_addr(ctx, p.l4, &q, false, q.daddr, rv.frontend[0]).ok()?;
    set_quoted_port(ctx, p.l4, &q, false, q.dport, rv.frontend_port).ok()?;
    let to = Tuple {
        saddr: rv.frontend[0],
        daddr: rv.client[0],
        sport: 0,
        dport: 0,
    };
    if !translate(ctx, p, &to, true) {
        return Some(TC_ACT_SHOT);
    }
    Some(redirect(ctx, rv.ifindex, rv.nexthop[0]))
}

/// A packet to a frontend whose Service has no endpoints at all, answered
/// as kube-proxy's REJECT answers it: ICMP port unreachable from the
/// frontend, sent back out of the interface the packet came in on. (Not
/// rate limited, unlike the kernel's own ICMP errors.)
// Out of line: its stack frame is not added to the others'.
#[inline(never)]
fn reject(ctx: &TcContext, p: &Packet) -> i32 {
    if port_unreachable(ctx, p).is_some() {
        // SAFETY: the context is an skb; ifindex is readable.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        mark_translated(ctx);
        // SAFETY: plain helper call on this packet.
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    } else {
        TC_ACT_SHOT
    }
}

/// Turns the packet into its own ICMP port unreachable: cut to its IP
/// header and the start of its L4 header, room made for the new headers in
/// front, addresses and link-layer addresses swapped.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, p: &Packet) -> Option<()> {
    // Headers with options are not quoted here (the packet is dropped).
    if p.l4 != IP + 20 {
        return None;
    }
    // TCP quotes its 20-byte header: a packet the stack sent with its
    // checksum still to fill in (over a veth) cannot be cut inside it.
    if p.proto == PROTO_TCP {
        build_unreachable::<{ 20 + 20 }>(ctx, p)
    } else {
        build_unreachable::<{ 20 + 8 }>(ctx, p)
    }
}

#[inline(always)]
fn build_unreachable<const QUOTE: usize>(ctx: &TcContext, p: &Packet) -> Option<()> {
    // SAFETY: plain helper call on this packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (IP + QUOTE) as u32, 0) } != 0 {
        return None;
    }
    ctx.adjust_room(ICMP_HEADERS as i32, BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP + ICMP_HEADERS + QUOTE > end {
        return None;
    }
    // SAFETY: the whole reply is bounds checked against data_end above.
    unsafe {
        let eth = start as *mut [u8; 6];
        let dst = core::ptr::read_unaligned(eth);
        let src = core::ptr::read_unaligned(eth.add(1));
        core::ptr::write_unaligned(eth, src);
        core::ptr::write_unaligned(eth.add(1), dst);
        let ip = (start + IP) as *mut u8;
        let header: [u8; 12] = [
            0x45,
            0,
            0,
            (ICMP_HEADERS + QUOTE) as u8,
            0,
            0,
            0,
            0,
            64,
            PROTO_ICMP,
            0,
            0,
        ];
        core::ptr::write_unaligned(ip as *mut [u8; 12], header);
        core::ptr::write_unaligned(ip.add(12) as *mut u32, p.daddr);
        core::ptr::write_unaligned(ip.add(16) as *mut u32, p.saddr);
        let icmp = ip.add(20);
        core::ptr::write_unaligned(
            icmp as *mut [u8; 8],
            [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0],
        );
        let ip_sum = fold_sum(ip as *const u16, 10);
        core::ptr::write_unaligned(ip.add(10) as *mut u16, ip_sum);
        let icmp_sum = fold_sum(icmp as *const u16, (8 + QUOTE) / 2);
        core::ptr::write_unaligned(icmp.add(2) as *mut u16, icmp_sum);
    }
    Some(())
}
