//! The overlay's fast path: VXLAN in TC, in Flannel's wire format (the
//! kernel's VXLAN: UDP port, VNI, and the inner frame addressed from VTEP
//! MAC to VTEP MAC), so a node with it and a node without talk as before.
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
//! tunnel's socket, the VTEP, the node's IP stack and the bridge. Being
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
    bindings::TC_ACT_SHOT,
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use skiff_ebpf_common::{
    MAX_OVERLAY_PEERS, MAX_OVERLAY_PODS, OVERLAY_HOST_GW, OverlayLocal, OverlayPeer, csum,
};

mod packet;
mod runtime;

use packet::{at, fold_sum, redirect_neigh, take_hop};

#[map(name = "OVERLAY_PEERS")]
static PEERS: LpmTrie<u32, OverlayPeer> = LpmTrie::with_max_entries(MAX_OVERLAY_PEERS, 1);

/// Pods of this node (address, network byte order) to the host end of
/// their veth.
#[map(name = "OVERLAY_PODS")]
static PODS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_OVERLAY_PODS, 0);

#[map(name = "OVERLAY_LOCAL")]
static LOCAL: Array<OverlayLocal> = Array::with_max_entries(1, 0);

/// tcx: on to the next program (the kernel's path when none is left).
const TC_NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_HLEN: usize = 20;
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

/// Takes one hop off the IPv4 header at `ip` (checksum too). False when
/// the packet has none left: the kernel's path answers it.
///
/// # Safety
/// `ip + 12` must be within the packet's checked bounds.
#[inline(always)]
unsafe fn hop(ip: usize) -> bool {
    // SAFETY: the caller checked the bounds (the checksum's too).
    unsafe {
        let Some(diff) = take_hop(ip) else {
            return false;
        };
        let sum = (ip + 10) as *mut u16;
        core::ptr::write_unaligned(sum, csum::apply(core::ptr::read_unaligned(sum), diff));
    }
    true
}

#[inline(always)]
fn encap(ctx: &TcContext) -> Option<i32> {
    let ethertype: u16 = at(ctx, 12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let daddr: u32 = at(ctx, ETH_HLEN + 16)?;
    let peer = *PEERS.get(Key::new(32, daddr))?;
    let me = local()?;
    if me.flags & OVERLAY_HOST_GW != 0 {
        // host-gw: routed as it is, to the peer on the underlay (on its
        // segment, as host-gw's routes require). A last hop is left to
        // the kernel's path, which answers it.
        let (start, end) = (ctx.data(), ctx.data_end());
        // SAFETY: within ETH_HLEN + IP_HLEN, checked first.
        if start + ETH_HLEN + IP_HLEN > end || !unsafe { hop(start + ETH_HLEN) } {
            return None;
        }
        return Some(redirect_neigh(me.underlay_ifindex, peer.node_ip));
    }
    // Checked before anything is written: the kernel's path answers a
    // last hop.
    let ttl_proto: u16 = at(ctx, ETH_HLEN + 8)?;
    if ttl_proto.to_ne_bytes()[0] <= 1 {
        return None;
    }
    let tos = at::<u16>(ctx, ETH_HLEN)?.to_ne_bytes()[1];
    // The outer header carries the inner ECN field (congestion marked
    // inside stays capable outside), as the kernel's tunnels do.
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
    if start + INNER + IP_HLEN > end {
        return Some(TC_ACT_SHOT);
    }
    let total = (ENCAP_LEN + inner_len) as u16;
    let udp_len = total - IP_HLEN as u16;
    // SAFETY: every write below is within INNER + IP_HLEN, checked above.
    unsafe {
        if !hop(start + INNER) {
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
        w32(OUTER + 16, peer.node_ip);
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
        mac(INNER_ETH, peer.vtep_mac);
        mac(INNER_ETH + 6, me.vtep_mac);
        w16(INNER_ETH + 12, ETH_P_IP.to_be());
    }
    // The kernel routes the outer destination and fills in the next hop's
    // MAC (resolving it if need be).
    // SAFETY: plain helper call on this packet; no parameters.
    Some(unsafe { bpf_redirect_neigh(me.underlay_ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

/// host-gw: a packet routed to one of our pods goes straight into its
/// namespace.
#[inline(always)]
fn deliver_routed(ctx: &TcContext, me: &OverlayLocal) -> Option<i32> {
    let daddr: u32 = at(ctx, ETH_HLEN + 16)?;
    if daddr & me.subnet_mask != me.subnet {
        return None;
    }
    // SAFETY: copied out at once.
    let host_veth = unsafe { *PODS.get(&daddr)? };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IP_HLEN > end {
        return None;
    }
    // SAFETY: within ETH_HLEN + IP_HLEN, checked above.
    if !unsafe { hop(start + ETH_HLEN) } {
        return None;
    }
    // SAFETY: plain helper call on this packet.
    Some(unsafe { bpf_redirect_peer(host_veth, 0) } as i32)
}

#[inline(always)]
fn decap(ctx: &TcContext) -> Option<i32> {
    let ethertype: u16 = at(ctx, 12)?;
    if ethertype != ETH_P_IP.to_be() {
        return None;
    }
    let me = local()?;
    if me.flags & OVERLAY_HOST_GW != 0 {
        return deliver_routed(ctx, &me);
    }
    // IPv4 without options, not a fragment, UDP to our port and address.
    let vihl = at::<u16>(ctx, OUTER)?.to_ne_bytes()[0];
    let frag: u16 = at(ctx, OUTER + 6)?;
    let proto = at::<u16>(ctx, OUTER + 8)?.to_ne_bytes()[1];
    if vihl != 0x45 || u16::from_be(frag) & 0x3fff != 0 || proto != PROTO_UDP {
        return None;
    }
    if at::<u32>(ctx, OUTER + 16)? != me.node_ip || at::<u16>(ctx, UDP + 2)? != me.port {
        return None;
    }
    let flags: u32 = at(ctx, VXLAN)?;
    if flags.to_ne_bytes()[0] & VXLAN_I == 0 || at::<u32>(ctx, VXLAN + 4)? != me.vni_word {
        return None;
    }
    // A frame for our VTEP, of IPv4, to a pod of ours.
    if at::<[u8; 6]>(ctx, INNER_ETH)? != me.vtep_mac
        || at::<u16>(ctx, INNER_ETH + 12)? != ETH_P_IP.to_be()
    {
        return None;
    }
    let daddr: u32 = at(ctx, INNER + 16)?;
    if daddr & me.subnet_mask != me.subnet {
        return None;
    }
    // SAFETY: copied out at once.
    let host_veth = unsafe { *PODS.get(&daddr)? };
    let ttl_proto: u16 = at(ctx, INNER + 8)?;
    if ttl_proto.to_ne_bytes()[0] <= 1 {
        return None;
    }
    // A GRO aggregate stays one packet: the tunnel's GSO state goes with
    // the headers where the kernel can clear it, and the pod's stack
    // takes it whole either way (it is delivered, not sent).
    if ctx
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .is_err()
    {
        ctx.adjust_room(
            -(ENCAP_LEN as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_FIXED_GSO,
        )
        .ok()?;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH_HLEN + IP_HLEN > end {
        return Some(TC_ACT_SHOT);
    }
    // SAFETY: within ETH_HLEN + IP_HLEN, checked above.
    if !unsafe { hop(start + ETH_HLEN) } {
        return Some(TC_ACT_SHOT);
    }
    // Straight into the pod's namespace, as if its veth had received it:
    // no bridge, no transmit path.
    // SAFETY: plain helper call on this packet.
    Some(unsafe { bpf_redirect_peer(host_veth, 0) } as i32)
}
