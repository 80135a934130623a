//! The overlay's fast path: VXLAN in TC, in Flannel's wire format (the
//! kernel's VXLAN: UDP port, VNI, and the inner frame addressed from VTEP
//! MAC to VTEP MAC), so a node with it and a node without talk as before.
//! Pods' IPv4 and IPv6 packets both take it (the tunnel itself is IPv4;
//! host-gw routes IPv6 to the peer's IPv6 next hop).
//!
//! `skiff_vxlan_encap` runs on the pods' bridge, for packets pods send to
//! the bridge to be routed. One to a peer's subnet is wrapped here (outer
//! Ethernet, IP, UDP, VXLAN, inner Ethernet) and handed to the underlay
//! interface with the next hop's MAC filled in, instead of going through
//! the node's IP stack, the VTEP and the kernel's UDP tunnel.
//!
//! `skiff_vxlan_decap` runs on the underlay interface, before anything
//! else there. A VXLAN packet for this node's VTEP whose inner destination
//! is one of this node's pods (`OVERLAY_PODS`: address to host-side veth,
//! from the CNI plugin's records) is unwrapped here and put straight into
//! the pod's namespace (`bpf_redirect_peer`), instead of going through the
//! tunnel's socket, the VTEP, the node's IP stack and the bridge. A
//! congestion mark (CE) on the outer header is carried to the inner one
//! (RFC 6040), as the kernel's VXLAN does. Being
//! delivered rather than sent, a GRO aggregate stays whole: sent out of the
//! bridge it would be cut into segments again, as the kernel marks
//! unwrapped aggregates for checking and the veth does not take those.
//!
//! Anything else (and anything these programs cannot do: no known peer, a
//! last hop, a destination on the node itself) goes on unchanged to the
//! kernel's path, which Flannel's routes, neighbours and FDB entries keep
//! working; both programs return "next" so that programs after them in
//! the interface's chain still see what they pass. The inner TTL loses one
//! hop at each end, as the two routers the kernel's path goes through take
//! one each.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::TC_ACT_SHOT,
    helpers::{bpf_check_mtu, bpf_get_hash_recalc, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use skiff_ebpf_common::{
    MAX_OVERLAY_PEERS, MAX_OVERLAY_PODS, OVERLAY_HOST_GW, OverlayLocal, OverlayPeer, OverlayPeer6,
    PEER_ONLINK, csum,
    ecn::{self, Decap},
};

mod packet;
mod runtime;

use packet::{
    IP_MF, IP_OFFSET, IPV6_FRAGMENT, apply_ip_csum, at, fold_sum, redirect_neigh, redirect_neigh6,
    take_hop, take_hop6,
};

#[map(name = "OVERLAY_PEERS")]
static PEERS: LpmTrie<u32, OverlayPeer> = LpmTrie::with_max_entries(MAX_OVERLAY_PEERS, 1);

/// Pods of this node (address, network byte order) to the host end of
/// their veth.
#[map(name = "OVERLAY_PODS")]
static PODS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_OVERLAY_PODS, 0);

#[map(name = "OVERLAY_PEERS6")]
static PEERS6: LpmTrie<[u32; 4], OverlayPeer6> = LpmTrie::with_max_entries(MAX_OVERLAY_PEERS, 1);

/// Pods of this node by IPv6 address.
#[map(name = "OVERLAY_PODS6")]
static PODS6: HashMap<[u32; 4], u32> = HashMap::with_max_entries(MAX_OVERLAY_PODS, 0);

#[map(name = "OVERLAY_LOCAL")]
static LOCAL: Array<OverlayLocal> = Array::with_max_entries(1, 0);

/// tcx: on to the next program (the kernel's path when none is left).
const TC_NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// Outer IP, UDP, VXLAN and the inner Ethernet header: what wrapping adds
/// after the outer Ethernet header.
const ENCAP_LEN: usize = IP_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
/// The outer IP header, right after the outer Ethernet header.
const OUTER: usize = ETH_HLEN;
const UDP: usize = OUTER + IP_HLEN;
const VXLAN: usize = UDP + UDP_HLEN;
const INNER_ETH: usize = VXLAN + VXLAN_HLEN;
const INNER: usize = INNER_ETH + ETH_HLEN;

const PROTO_UDP: u8 = 17;
/// VXLAN flags: the VNI is valid.
const VXLAN_I: u8 = 0x08;
/// Source ports of the outer UDP header, spread by the inner flow's hash
/// (the kernel's VXLAN takes the ephemeral range).
const SPORT_MIN: u32 = 32_768;
const SPORT_SPAN: u32 = 61_000 - SPORT_MIN;
const OUTER_TTL: u8 = 64;
const IP_DF: u16 = 0x4000;

const BPF_ADJ_ROOM_MAC: u32 = 1;
const BPF_F_ADJ_ROOM_FIXED_GSO: u64 = 1 << 0;
const BPF_F_ADJ_ROOM_ENCAP_L3_IPV4: u64 = 1 << 1;
const BPF_F_ADJ_ROOM_ENCAP_L4_UDP: u64 = 1 << 4;
const BPF_F_ADJ_ROOM_ENCAP_L2_ETH: u64 = 1 << 6;
const BPF_ADJ_ROOM_ENCAP_L2_SHIFT: u64 = 56;
/// The pod's MTU already leaves room for the headers: segments keep their
/// size, and the kernel learns where the inner headers start.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH
    | ((ETH_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// Unwrapping: segments keep their size, and the tunnel's GSO type goes
/// with its headers (BPF_F_ADJ_ROOM_DECAP_L4_UDP; kernels without it
/// refuse the flag, and the call is made again without).
const DECAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L4_UDP;
const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
const BPF_F_ADJ_ROOM_DECAP_L3_IPV6: u64 = 1 << 8;

#[classifier]
pub fn skiff_vxlan_encap(ctx: TcContext) -> i32 {
    encap(&ctx).unwrap_or(TC_NEXT)
}

#[classifier]
pub fn skiff_vxlan_decap(ctx: TcContext) -> i32 {
    decap(&ctx).unwrap_or(TC_NEXT)
}

/// This node, when set up.
#[inline(always)]
fn local() -> Option<OverlayLocal> {
    let l = *LOCAL.get(0)?;
    (l.node_ip != 0).then_some(l)
}

/// Takes one hop off the IPv4 header at `ip` (checksum too), or the IPv6
/// one when `V6`. False when the packet has none left: the kernel's path
/// answers it.
///
/// # Safety
/// The fixed header at `ip` must be within the packet's checked bounds.
#[inline(always)]
unsafe fn hop<const V6: bool>(ip: usize) -> bool {
    // SAFETY: the caller checked the bounds (the checksum's too).
    unsafe {
        if V6 {
            return take_hop6(ip);
        }
        let Some(diff) = take_hop(ip) else {
            return false;
        };
        apply_ip_csum(ip, diff);
    }
    true
}

/// The network header's fixed length.
const fn hlen<const V6: bool>() -> usize {
    if V6 { IP6_HLEN } else { IP_HLEN }
}

/// The hops an IP packet at `ip` has left (TTL or hop limit).
#[inline(always)]
fn hops_left<const V6: bool>(ctx: &TcContext, ip: usize) -> Option<u8> {
    if V6 {
        Some(at::<u16>(ctx, ip + 6)?.to_ne_bytes()[1])
    } else {
        Some(at::<u16>(ctx, ip + 8)?.to_ne_bytes()[0])
    }
}

#[inline(always)]
fn encap(ctx: &TcContext) -> Option<i32> {
    let ethertype: u16 = at(ctx, 12)?;
    if ethertype == ETH_P_IP.to_be() {
        let daddr: u32 = at(ctx, ETH_HLEN + 16)?;
        let peer = *PEERS.get(Key::new(32, daddr))?;
        let me = local()?;
        if !fits(ctx, &me) {
            return None;
        }
        if me.flags & OVERLAY_HOST_GW != 0 {
            // host-gw: routed as it is, to the peer on the underlay (on
            // its segment, as host-gw's routes require). A last hop is
            // left to the kernel's path, which answers it.
            if !take_routed_hop::<false>(ctx) {
                return None;
            }
            return Some(redirect_neigh(me.underlay_ifindex, peer.node_ip));
        }
        let tos = at::<u16>(ctx, ETH_HLEN)?.to_ne_bytes()[1];
        wrap::<false>(ctx, &me, peer.node_ip, peer.vtep_mac, peer.flags, tos)
    } else if ethertype == ETH_P_IPV6.to_be() {
        let daddr: [u32; 4] = at(ctx, ETH_HLEN + 24)?;
        let peer = *PEERS6.get(Key::new(128, daddr))?;
        let me = local()?;
        if !fits(ctx, &me) {
            return None;
        }
        if me.flags & OVERLAY_HOST_GW != 0 {
            if !take_routed_hop::<true>(ctx) {
                return None;
            }
            return Some(redirect_neigh6(me.underlay_ifindex, peer.nexthop));
        }
        // The traffic class straddles the first two bytes.
        let [b0, b1] = at::<u16>(ctx, ETH_HLEN)?.to_ne_bytes();
        let tclass = (b0 << 4) | (b1 >> 4);
        wrap::<true>(ctx, &me, peer.node_ip, peer.vtep_mac, peer.flags, tclass)
    } else {
        None
    }
}

/// Whether the packet fits the underlay once wrapped (vxlan) or as it is
/// (host-gw). One that does not is a datagram the bridge's netfilter put
/// together from its fragments (conntrack gathers them before the bridge
/// passes them up): the kernel's path cuts it up again on the way out,
/// which a redirect would not. A GRO aggregate passes (its segments are
/// what is sent).
#[inline(always)]
fn fits(ctx: &TcContext, me: &OverlayLocal) -> bool {
    let grow = if me.flags & OVERLAY_HOST_GW != 0 {
        0
    } else {
        ENCAP_LEN as i32
    };
    let mut len = 0u32;
    // SAFETY: plain helper call on this packet; `len` lives for it.
    unsafe { bpf_check_mtu(ctx.as_ptr(), me.underlay_ifindex, &mut len, grow, 0) == 0 }
}

/// host-gw: one hop off a packet routed as it is (false, and nothing
/// changed, when it has none left or is too short).
#[inline(always)]
fn take_routed_hop<const V6: bool>(ctx: &TcContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    // SAFETY: within the fixed header, checked first.
    start + ETH_HLEN + hlen::<V6>() <= end && unsafe { hop::<V6>(start + ETH_HLEN) }
}

/// Wraps the IPv4 (or, `V6`, IPv6) packet for the peer VTEP `node_ip` /
/// `vtep_mac` (`flags`: the peer's `PEER_ONLINK`); `tos` is its TOS or
/// traffic class, whose ECN field the outer header carries (congestion
/// marked inside stays capable outside), as the kernel's tunnels do.
#[inline(always)]
fn wrap<const V6: bool>(
    ctx: &TcContext,
    me: &OverlayLocal,
    node_ip: u32,
    vtep_mac: [u8; 6],
    flags: u16,
    tos: u8,
) -> Option<i32> {
    // Checked before anything is written: the kernel's path answers a
    // last hop.
    if hops_left::<V6>(ctx, ETH_HLEN)? <= 1 {
        return None;
    }
    let ecn = match tos & 3 {
        3 => 2,
        e => e,
    };
    let inner_len = ctx.len() as usize - ETH_HLEN;
    // SAFETY: the context is an skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = (SPORT_MIN + ((u64::from(hash) * u64::from(SPORT_SPAN)) >> 32) as u32) as u16;

    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .ok()?;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + INNER + hlen::<V6>() > end {
        return Some(TC_ACT_SHOT);
    }
    let total = (ENCAP_LEN + inner_len) as u16;
    let udp_len = total - IP_HLEN as u16;
    let inner_type = if V6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY: every write below is within INNER + the inner fixed header,
    // checked above.
    unsafe {
        if !hop::<V6>(start + INNER) {
            return Some(TC_ACT_SHOT);
        }
        let w16 = |off: usize, v: u16| core::ptr::write_unaligned((start + off) as *mut u16, v);
        let w32 = |off: usize, v: u32| core::ptr::write_unaligned((start + off) as *mut u32, v);
        let mac =
            |off: usize, m: [u8; 6]| core::ptr::write_unaligned((start + off) as *mut [u8; 6], m);
        // Outer IP, its checksum over what was written.
        w16(OUTER, u16::from_ne_bytes([0x45, ecn]));
        w16(OUTER + 2, total.to_be());
        w16(OUTER + 4, 0);
        w16(OUTER + 6, IP_DF.to_be());
        w16(OUTER + 8, u16::from_ne_bytes([OUTER_TTL, PROTO_UDP]));
        w16(OUTER + 10, 0);
        w32(OUTER + 12, me.node_ip);
        w32(OUTER + 16, node_ip);
        w16(
            OUTER + 10,
            fold_sum((start + OUTER) as *const u16, IP_HLEN / 2),
        );
        // UDP, without a checksum (VXLAN over IPv4 may leave it out; the
        // inner packet carries its own).
        w16(UDP, sport.to_be());
        w16(UDP + 2, me.port);
        w16(UDP + 4, udp_len.to_be());
        w16(UDP + 6, 0);
        // VXLAN.
        w32(VXLAN, u32::from_ne_bytes([VXLAN_I, 0, 0, 0]));
        w32(VXLAN + 4, me.vni_word);
        // The inner frame: from our VTEP to the peer's.
        mac(INNER_ETH, vtep_mac);
        mac(INNER_ETH + 6, me.vtep_mac);
        w16(INNER_ETH + 12, inner_type.to_be());
    }
    // A peer on the underlay's own subnet is the next hop itself; else the
    // kernel routes the outer destination. Either way it fills in the next
    // hop's MAC (resolving it if need be).
    if flags & PEER_ONLINK != 0 {
        return Some(redirect_neigh(me.underlay_ifindex, node_ip));
    }
    // SAFETY: plain helper call on this packet; no parameters.
    Some(unsafe { bpf_redirect_neigh(me.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// The host-side veth of our pod an IPv4 (or, `V6`, IPv6) header at `ip`
/// is addressed to, if it has a hop left and is not a fragment. Fragments
/// are left to the kernel's path, all of them: it may be holding some to
/// put the datagram together (conntrack does), as it must for those too
/// big for the tunnel, which came in fragments of the outer packet, and a
/// datagram whose fragments took both ways would never be whole there.
#[inline(always)]
fn pod_of<const V6: bool>(ctx: &TcContext, me: &OverlayLocal, ip: usize) -> Option<u32> {
    if fragment::<V6>(ctx, ip)? {
        return None;
    }
    // SAFETY (both lookups): copied out at once.
    let host_veth = if V6 {
        let daddr: [u32; 4] = at(ctx, ip + 24)?;
        unsafe { *PODS6.get(&daddr)? }
    } else {
        let daddr: u32 = at(ctx, ip + 16)?;
        if daddr & me.subnet_mask != me.subnet {
            return None;
        }
        unsafe { *PODS.get(&daddr)? }
    };
    (hops_left::<V6>(ctx, ip)? > 1).then_some(host_veth)
}

/// Whether the IPv4 (or, `V6`, IPv6) packet at `ip` is a fragment (IPv6:
/// its first extension header is a fragment header).
#[inline(always)]
fn fragment<const V6: bool>(ctx: &TcContext, ip: usize) -> Option<bool> {
    if V6 {
        Some(at::<u16>(ctx, ip + 6)?.to_ne_bytes()[0] == IPV6_FRAGMENT)
    } else {
        Some(u16::from_be(at(ctx, ip + 6)?) & (IP_MF | IP_OFFSET) != 0)
    }
}

/// Takes the hop off the (now outermost) network header, marks it CE
/// when `ce`, and puts the packet into the pod's namespace, as if its veth
/// had received it: no bridge, no transmit path. Dropped when that cannot
/// be done, as it is only called once the packet was changed.
#[inline(always)]
fn into_pod<const V6: bool>(ctx: &TcContext, host_veth: u32, ce: bool) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + hlen::<V6>() > end {
        return TC_ACT_SHOT;
    }
    // SAFETY: within the fixed header, checked above.
    if !unsafe { hop::<V6>(start + ETH_HLEN) } {
        return TC_ACT_SHOT;
    }
    if ce {
        // SAFETY: as above.
        unsafe { set_ce::<V6>(start + ETH_HLEN) };
    }
    // SAFETY: plain helper call on this packet.
    unsafe { bpf_redirect_peer(host_veth, 0) as i32 }
}

/// host-gw: a packet routed to one of our pods goes straight into its
/// namespace.
#[inline(always)]
fn deliver_routed(ctx: &TcContext, me: &OverlayLocal, ethertype: u16) -> Option<i32> {
    if ethertype == ETH_P_IP.to_be() {
        let host_veth = pod_of::<false>(ctx, me, ETH_HLEN)?;
        Some(into_pod::<false>(ctx, host_veth, false))
    } else if ethertype == ETH_P_IPV6.to_be() {
        let host_veth = pod_of::<true>(ctx, me, ETH_HLEN)?;
        Some(into_pod::<true>(ctx, host_veth, false))
    } else {
        None
    }
}

#[inline(always)]
fn decap(ctx: &TcContext) -> Option<i32> {
    let ethertype: u16 = at(ctx, 12)?;
    let me = local()?;
    if me.flags & OVERLAY_HOST_GW != 0 {
        return deliver_routed(ctx, &me, ethertype);
    }
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    // IPv4 without options, not a fragment, UDP to our port and address.
    let [vihl, outer_tos] = at::<u16>(ctx, OUTER)?.to_ne_bytes();
    let proto = at::<u16>(ctx, OUTER + 8)?.to_ne_bytes()[1];
    if vihl != 0x45 || fragment::<false>(ctx, OUTER)? || proto != PROTO_UDP {
        return None;
    }
    if at::<u32>(ctx, OUTER + 16)? != me.node_ip || at::<u16>(ctx, UDP + 2)? != me.port {
        return None;
    }
    let flags: u32 = at(ctx, VXLAN)?;
    if flags.to_ne_bytes()[0] & VXLAN_I == 0 || at::<u32>(ctx, VXLAN + 4)? != me.vni_word {
        return None;
    }
    // A frame for our VTEP, to a pod of ours.
    if at::<[u8; 6]>(ctx, INNER_ETH)? != me.vtep_mac {
        return None;
    }
    let inner_type: u16 = at(ctx, INNER_ETH + 12)?;
    if inner_type == ETH_P_IP.to_be() {
        let host_veth = pod_of::<false>(ctx, &me, INNER)?;
        let ce = inner_ce::<false>(ctx, outer_tos)?;
        unwrap::<false>(ctx)?;
        Some(into_pod::<false>(ctx, host_veth, ce))
    } else if inner_type == ETH_P_IPV6.to_be() {
        let host_veth = pod_of::<true>(ctx, &me, INNER)?;
        let ce = inner_ce::<true>(ctx, outer_tos)?;
        unwrap::<true>(ctx)?;
        Some(into_pod::<true>(ctx, host_veth, ce))
    } else {
        None
    }
}

/// Whether the inner packet must be marked CE, for an outer header whose
/// TOS is `outer_tos` (RFC 6040); None when it cannot be (outer CE on a
/// packet that is not ECN-capable inside), which the kernel's path drops
/// and counts, as it does without this program.
#[inline(always)]
fn inner_ce<const V6: bool>(ctx: &TcContext, outer_tos: u8) -> Option<bool> {
    let b1 = at::<u16>(ctx, INNER)?.to_ne_bytes()[1];
    let inner = if V6 { b1 >> 4 } else { b1 };
    match ecn::decap(outer_tos, inner) {
        Decap::Keep => Some(false),
        Decap::MarkCe => Some(true),
        Decap::Drop => None,
    }
}

/// Marks the network header at `ip` CE (IPv4: its checksum too).
///
/// # Safety
/// The fixed header at `ip` must be within the packet's checked bounds.
#[inline(always)]
unsafe fn set_ce<const V6: bool>(ip: usize) {
    // Version and TOS (IPv4), or the traffic class's low half and the
    // flow label's top (IPv6), as one 16-bit word.
    let word = ip as *mut u16;
    // SAFETY: the caller checked the bounds.
    unsafe {
        let old = core::ptr::read_unaligned(word);
        let [b0, b1] = old.to_ne_bytes();
        let b1 = if V6 {
            b1 | (ecn::CE << 4)
        } else {
            b1 | ecn::CE
        };
        let new = u16::from_ne_bytes([b0, b1]);
        core::ptr::write_unaligned(word, new);
        if !V6 {
            apply_ip_csum(ip, csum::diff(u32::from(old), u32::from(new)));
        }
    }
}

/// Takes the outer headers off. A GRO aggregate stays one packet: the
/// tunnel's GSO state goes with the headers where the kernel can clear it,
/// and the pod's stack takes it whole either way (it is delivered, not
/// sent). An IPv6 packet inside has the packet's protocol changed with
/// them: the pod's stack picks its input by it.
#[inline(always)]
fn unwrap<const V6: bool>(ctx: &TcContext) -> Option<()> {
    let l3 = if V6 { BPF_F_ADJ_ROOM_DECAP_L3_IPV6 } else { 0 };
    if ctx
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS | l3)
        .is_err()
    {
        ctx.adjust_room(
            -(ENCAP_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_FIXED_GSO | l3,
        )
        .ok()?;
    }
    Some(())
}
