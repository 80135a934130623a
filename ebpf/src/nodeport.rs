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
//! and no flow is SNATed: the backend sees the client's address.
//!
//! IPv4 only for now; fragments after the first are not translated.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibParams, bpf_redir_neigh},
    btf_maps::{Array, HashOfMaps},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{btf_map, classifier, map},
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use skiff_ebpf_common::{
    BACKEND_LOCAL, DEFAULT_MAGLEV_SIZE, EXT_AFFINITY, EXT_LOCAL, ExtBackend, ExternalValue,
    FAMILY_V4, FLOW_CLOSING, FlowKey, FlowValue, MAGLEV_INNER_FLAGS, MAX_EXT_BACKENDS,
    MAX_EXTERNAL, MAX_FLOWS, MAX_MAGLEV_TABLES, PROTO_TCP, PROTO_UDP, RevFlowValue, ServiceKey,
    flow_hash,
};

use crate::BPF_F_NO_PREALLOC;

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

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "REV_FLOWS")]
static REV_FLOWS: LruHashMap<FlowKey, RevFlowValue> = LruHashMap::pinned(MAX_FLOWS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP: usize = ETH_HLEN;
const IP_CSUM: usize = IP + 10;
const IP_SADDR: usize = IP + 12;
const IP_DADDR: usize = IP + 16;
const AF_INET: u8 = 2;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;
const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const NS_PER_SEC: u64 = 1_000_000_000;
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
    let ethertype: u16 = ctx.load(12).ok()?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let vihl: u8 = ctx.load(IP).ok()?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag: u16 = ctx.load(IP + 6).ok()?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(IP + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = IP + ihl;
    let tcp_flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
    };
    Some(Packet {
        proto,
        tcp_flags,
        saddr: ctx.load(IP_SADDR).ok()?,
        daddr: ctx.load(IP_DADDR).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        l4,
    })
}

fn l4_flags(p: &Packet) -> u64 {
    if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    }
}

/// Rewrites the source (`src`) or destination address, with both checksums.
#[inline(always)]
fn set_addr(ctx: &TcContext, p: &Packet, src: bool, old: u32, new: u32) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        p.csum_off(),
        u64::from(old),
        u64::from(new),
        BPF_F_PSEUDO_HDR | l4_flags(p) | 4,
    )?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)?;
    let off = if src { IP_SADDR } else { IP_DADDR };
    ctx.store(off, &new, 0)
}

/// Rewrites the source or destination port, with the L4 checksum.
#[inline(always)]
fn set_port(ctx: &TcContext, p: &Packet, src: bool, old: u16, new: u16) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        p.csum_off(),
        u64::from(old),
        u64::from(new),
        l4_flags(p) | 2,
    )?;
    let off = if src { p.l4 } else { p.l4 + 2 };
    ctx.store(off, &new, 0)
}

/// Forwarding: one hop less. False when the packet has none left.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<bool, i64> {
    // TTL and protocol as one 16-bit word, as it sits in the header.
    let word: u16 = ctx.load(IP + 8)?;
    let ttl = word.to_ne_bytes()[0];
    if ttl <= 1 {
        return Ok(false);
    }
    let mut bytes = word.to_ne_bytes();
    bytes[0] = ttl - 1;
    let new = u16::from_ne_bytes(bytes);
    ctx.l3_csum_replace(IP_CSUM, u64::from(word), u64::from(new), 2)?;
    ctx.store(IP + 8, &bytes[0], 0)?;
    Ok(true)
}

/// Sends the (rewritten) packet out of `ifindex` towards `nexthop`, the
/// kernel's neighbour table filling in the link-layer addresses.
#[inline(always)]
fn redirect(ctx: &TcContext, ifindex: u32, nexthop: u32) -> i32 {
    match decrement_ttl(ctx) {
        Ok(true) => {}
        _ => return TC_ACT_SHOT,
    }
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: nexthop },
    };
    // SAFETY: nh lives for the call; the size is its own.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}

/// The route the kernel would take to `dst`: (interface, next hop, source
/// address it would use).
#[inline(always)]
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
    let key = ServiceKey {
        addr: v4(p.daddr),
        port: p.dport,
        proto: p.proto,
        family: FAMILY_V4,
    };
    // SAFETY: copied out at once (BPF_F_NO_PREALLOC).
    if let Some(svc) = unsafe { EXTERNAL.get(&key) } {
        let svc = *svc;
        return forward(&ctx, &p, &svc).unwrap_or(TC_ACT_SHOT);
    }
    reply_of_snat(&ctx, &p).unwrap_or(TC_ACT_OK)
}

#[classifier]
pub fn skiff_egress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx) else {
        return TC_ACT_OK;
    };
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
    let (frontend, frontend_port) = (rv.frontend[0], rv.frontend_port);
    let ok = set_addr(&ctx, &p, true, p.saddr, frontend).is_ok()
        && set_port(&ctx, &p, true, p.sport, frontend_port).is_ok();
    if ok { TC_ACT_OK } else { TC_ACT_SHOT }
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
/// the frontend.
#[inline(always)]
fn reply_of_snat(ctx: &TcContext, p: &Packet) -> Option<i32> {
    let rkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let r = REV_FLOWS.get_ptr_mut(&rkey)?;
    // SAFETY: see skiff_egress.
    let rv = unsafe { &mut *r };
    if rv.ifindex == 0 {
        return None;
    }
    touch_rev(rv, p);
    let rv = *rv;
    set_addr(ctx, p, true, p.saddr, rv.frontend[0]).ok()?;
    set_port(ctx, p, true, p.sport, rv.frontend_port).ok()?;
    set_addr(ctx, p, false, p.daddr, rv.client[0]).ok()?;
    set_port(ctx, p, false, p.dport, rv.client_port).ok()?;
    Some(redirect(ctx, rv.ifindex, rv.nexthop[0]))
}

/// A packet to an external frontend: its flow's backend, or a new flow.
#[inline(always)]
fn forward(ctx: &TcContext, p: &Packet, svc: &ExternalValue) -> Option<i32> {
    let fkey = flow_key(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let t = now();
    let flow = match FLOWS.get_ptr_mut(&fkey) {
        // A new connection on a tuple whose last one closed starts over.
        Some(f) if !(p.opening() && unsafe { (*f).flags } & FLOW_CLOSING != 0) => {
            // SAFETY: see skiff_egress.
            let fv = unsafe { &mut *f };
            if p.closing() {
                fv.flags |= FLOW_CLOSING;
                fv.last_ns = t;
                mark_rev_closing(p, fv);
            } else if t.wrapping_sub(fv.last_ns) > REFRESH_NS {
                fv.last_ns = t;
            }
            *fv
        }
        _ => {
            if svc.size == 0 {
                return Some(TC_ACT_SHOT);
            }
            new_flow(ctx, p, svc, &fkey, t)?
        }
    };
    set_addr(ctx, p, false, p.daddr, flow.backend[0]).ok()?;
    set_port(ctx, p, false, p.dport, flow.backend_port).ok()?;
    if flow.ifindex == 0 {
        return Some(TC_ACT_OK);
    }
    set_addr(ctx, p, true, p.saddr, flow.snat[0]).ok()?;
    set_port(ctx, p, true, p.sport, flow.snat_port).ok()?;
    Some(redirect(ctx, flow.ifindex, flow.nexthop[0]))
}

#[inline(always)]
fn mark_rev_closing(p: &Packet, fv: &FlowValue) {
    let (daddr, dport) = if fv.ifindex == 0 {
        (p.saddr, p.sport)
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
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    p: &Packet,
    svc: &ExternalValue,
    fkey: &FlowKey,
    t: u64,
) -> Option<FlowValue> {
    let h = flow_hash(
        p.saddr,
        p.sport,
        p.dport,
        p.proto,
        svc.flags & EXT_AFFINITY != 0,
    );
    let slot = h % svc.size;
    // SAFETY: inner arrays are never written while a program reads them
    // (the agent swaps in a new table).
    let id = unsafe { *MAGLEV.get_value(&svc.table, &slot)? };
    // SAFETY: copied out at once.
    let b = unsafe { *EXT_BACKENDS.get(&id)? };

    let mut flow = FlowValue {
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
    let mut rev = RevFlowValue {
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
        flow_key(b.addr[0], p.saddr, b.port, p.sport, p.proto)
    } else {
        let (out_if, nexthop, src) = route(ctx, p, b.addr[0])?;
        let (back_if, back_nh, _) = route(ctx, p, p.saddr)?;
        let (rkey, port) = snat_tuple(p, &b, src, t)?;
        flow.snat = v4(src);
        flow.snat_port = port;
        flow.ifindex = out_if;
        flow.nexthop = v4(nexthop);
        rev.ifindex = back_if;
        rev.nexthop = v4(back_nh);
        rkey
    };
    REV_FLOWS.insert(&rkey, &rev, 0).ok()?;
    FLOWS.insert(fkey, &flow, 0).ok()?;
    Some(flow)
}

/// A free (backend, SNAT address, port) tuple: the client's own port if it
/// is, else one from the SNAT range.
#[inline(always)]
fn snat_tuple(p: &Packet, b: &ExtBackend, src: u32, t: u64) -> Option<(FlowKey, u16)> {
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
            None => return Some((rkey, port)),
            Some(r) => {
                // SAFETY: copied out at once.
                let r = unsafe { *r };
                let same_client = r.client[0] == p.saddr && r.client_port == p.sport;
                let idle = t.wrapping_sub(r.last_ns);
                let free = if p.proto == PROTO_UDP || r.flags & FLOW_CLOSING != 0 {
                    idle > REUSE_CLOSED_NS
                } else {
                    idle > REUSE_IDLE_TCP_NS
                };
                if same_client || free {
                    return Some((rkey, port));
                }
            }
        }
    }
    None
}
