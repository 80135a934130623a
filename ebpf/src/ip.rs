//! The two IP families as the TC programs see them: header layout, address
//! width, checksums, route lookups and next-hop redirects. Code written
//! once over `Ip` is compiled for each family, so the verifier checks two
//! straight paths instead of one that branches on the family everywhere.

use aya_ebpf::{
    EbpfContext as _, bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup,
    programs::TcContext,
};
use skiff_ebpf_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, csum};

use crate::packet::{IP_MF, IP_OFFSET, IPV6_FRAGMENT, apply_ip_csum, at, fold_sum, take_hop6};

pub const ETH_HLEN: usize = 14;
/// Offset of the network header.
pub const IP: usize = ETH_HLEN;

const BPF_FIB_LOOKUP_SKIP_NEIGH: u32 = 1 << 2;
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// What a family's network header says about a packet the TC path may
/// translate.
pub struct Header<A> {
    pub proto: u8,
    pub saddr: A,
    pub daddr: A,
    /// Offset of the L4 header (in a later fragment, where it would be).
    pub l4: usize,
    pub frag: Frag,
}

/// Where a packet stands among the fragments of its datagram, and the
/// datagram's identification (IPv4's 16 bits, IPv6's 32; 0 when not
/// fragmented), which with the addresses and protocol names it while it
/// is in flight. (A struct, not an enum with the id inside: a variant
/// without it would leave a register undefined that the verifier then
/// refuses to see spilled.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    pub id: u32,
    pub part: Part,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Not fragmented.
    Whole,
    /// The first fragment: it holds the L4 header.
    First,
    /// A fragment after the first: no L4 header.
    Later,
}

impl Frag {
    pub const WHOLE: Frag = Frag {
        id: 0,
        part: Part::Whole,
    };
}

/// The fragment a fragment offset (in 8-byte units) and "more fragments"
/// flag describe, of the datagram `id`.
#[inline(always)]
fn frag(offset: u16, more: bool, id: u32) -> Frag {
    let part = if offset != 0 {
        Part::Later
    } else if more {
        Part::First
    } else {
        return Frag::WHOLE;
    };
    Frag { id, part }
}

/// IPv6's fragment header's length.
const IPV6_FRAG_HLEN: usize = 8;

pub trait Ip: Copy + 'static {
    type Addr: Copy + PartialEq;
    /// EtherType, as the frame holds it.
    const ETH_P: u16;
    /// `FAMILY_V4` / `FAMILY_V6`, as the maps key addresses.
    const FAMILY: u8;
    /// `AF_INET` / `AF_INET6`, as the fib lookup takes it.
    const AF: u8;
    /// This family's ICMP protocol number.
    const ICMP: u8;
    /// The network header's fixed length (IPv4 without options).
    const HLEN: usize;
    /// An ICMP error's own headers (network header without options, ICMP).
    const ICMP_HEADERS: usize;
    /// The checksum of this family's ICMP covers a pseudo-header (ICMPv6).
    const ICMP_PSEUDO: bool;
    /// Offsets in the network header of the protocol (next header) byte
    /// and of the source and destination addresses.
    const PROTO_AT: usize;
    const SADDR: usize;
    const DADDR: usize;

    /// The address as the maps hold it (IPv4 in the first word).
    fn wide(a: Self::Addr) -> [u32; 4];
    fn narrow(a: &[u32; 4]) -> Self::Addr;
    /// One word standing for the address in flow hashes.
    fn hash_word(a: Self::Addr) -> u32;
    /// What replacing `old` by `new` adds to a checksum over it.
    fn diff(old: Self::Addr, new: Self::Addr) -> u32;

    /// The protocol of the packet, the length of the headers between the
    /// network header and the L4 header (IPv6: a fragment header, the one
    /// extension header read; with any other the next header is not taken
    /// for TCP or UDP) and where it stands among fragments.
    fn proto_of(ctx: &TcContext) -> Option<(u8, usize, Frag)>;

    /// The header of a packet the TC path may translate: TCP, UDP or this
    /// family's ICMP (not fragmented), and (IPv6) with no extension header
    /// but a fragment header.
    #[inline(always)]
    fn header(ctx: &TcContext) -> Option<Header<Self::Addr>> {
        let hlen = Self::hlen_of(at::<u16>(ctx, IP)?.to_ne_bytes()[0])?;
        let (proto, ext, frag) = Self::proto_of(ctx)?;
        let l4_proto = proto == PROTO_TCP || proto == PROTO_UDP;
        if !(l4_proto || proto == Self::ICMP && frag.part == Part::Whole) {
            return None;
        }
        Some(Header {
            proto,
            saddr: at(ctx, IP + Self::SADDR)?,
            daddr: at(ctx, IP + Self::DADDR)?,
            l4: IP + hlen + ext,
            frag,
        })
    }

    /// Writes the addresses into the header at `ip`, takes a hop off when
    /// `hop`, and keeps the header's own checksum (IPv4) right; `addrs` is
    /// the addresses' checksum difference. False, and the hop count not
    /// changed, when no hop is left.
    ///
    /// # Safety
    /// The whole fixed header at `ip` must be within checked bounds.
    unsafe fn write(ip: usize, saddr: Self::Addr, daddr: Self::Addr, addrs: u32, hop: bool)
    -> bool;

    /// Whether an ICMP message of type `ty` is an error quoting a packet.
    fn icmp_error(ty: u8) -> bool;

    /// The length of a network header whose first byte is `first`, if it
    /// is this family's.
    fn hlen_of(first: u8) -> Option<usize>;

    /// The quoted header of an ICMP error at `ip`: its protocol, addresses
    /// and the offset of its L4 header (TCP or UDP only).
    #[inline(always)]
    fn quoted(ctx: &TcContext, ip: usize) -> Option<Header<Self::Addr>> {
        let hlen = Self::hlen_of(ctx.load(ip).ok()?)?;
        let proto: u8 = ctx.load(ip + Self::PROTO_AT).ok()?;
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        Some(Header {
            proto,
            saddr: ctx.load(ip + Self::SADDR).ok()?,
            daddr: ctx.load(ip + Self::DADDR).ok()?,
            l4: ip + hlen,
            frag: Frag::WHOLE,
        })
    }

    /// Stores a quoted address (`src` or destination) and updates the
    /// checksums that cover it: the quoted header's own (IPv4) and the
    /// ICMP message's.
    fn set_quoted_addr(
        ctx: &TcContext,
        icmp: usize,
        ip: usize,
        src: bool,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), i64>;

    /// Sends the packet out of `ifindex` to `nexthop`, its link-layer
    /// addresses filled in (and resolved if need be) by the kernel:
    /// TC_ACT_REDIRECT, or TC_ACT_SHOT when it cannot.
    fn redirect_neigh(ifindex: u32, nexthop: Self::Addr) -> i32;

    /// Writes the network header of an ICMP port unreachable of `len`
    /// bytes after it, from `saddr` to `daddr`, at `ip`, and returns the
    /// pseudo-header's part of the ICMP checksum (0 for IPv4).
    ///
    /// # Safety
    /// `Self::ICMP_HEADERS` bytes at `ip` must be within checked bounds.
    unsafe fn write_icmp_header(ip: usize, saddr: Self::Addr, daddr: Self::Addr, len: usize)
    -> u32;
    /// The ICMP header of "port unreachable".
    const PORT_UNREACHABLE: [u8; 8];

    /// The ICMP header of "fragmentation needed" (IPv4) or "packet too
    /// big" (IPv6) for a next hop of `mtu` bytes.
    fn too_big(mtu: u32) -> [u8; 8];

    /// Whether routers may not fragment the packet (IPv4: DF set; IPv6
    /// packets are never fragmented on the way).
    fn dont_fragment(ctx: &TcContext) -> bool;
}

#[derive(Clone, Copy)]
pub struct V4;

#[derive(Clone, Copy)]
pub struct V6;

/// The route the kernel would take to `dst`: its interface (0 when there
/// is none), with the next hop and (if asked) the source address the
/// kernel would use written where given (in the maps' form; straight into
/// a map value, as the callers' stack has no room for them).
#[inline(never)]
pub fn route<F: Ip>(
    ctx: &TcContext,
    proto: u8,
    dst: F::Addr,
    nexthop: &mut [u32; 4],
    src: Option<&mut [u32; 4]>,
) -> u32 {
    // SAFETY: plain integers; all-zero is a valid request to fill in.
    let mut f: FibParams = unsafe { core::mem::zeroed() };
    f.family = F::AF;
    f.l4_protocol = proto;
    // A length that fits any MTU: the route alone is asked for. Without
    // one the helper checks this packet against the route's device and
    // answers "fragmentation needed" for one too big for it, where the
    // caller wants the route to answer the client with its MTU.
    f.__bindgen_anon_1.tot_len = F::HLEN as u16;
    // SAFETY: the context is an skb; ifindex is readable.
    f.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The IPv4 members are the first word of the IPv6 ones, and the
    // request's other words stay zero: both read back in the maps' form.
    f.__bindgen_anon_4.ipv6_dst = F::wide(dst);
    // SAFETY: f lives for the call; the size is its own.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut f,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return 0;
    }
    // SAFETY: the helper filled the members of the family.
    unsafe {
        *nexthop = f.__bindgen_anon_4.ipv6_dst;
        if let Some(src) = src {
            *src = f.__bindgen_anon_3.ipv6_src;
        }
    }
    f.ifindex
}

/// The ones' complement sum of `len` bytes at `at` (a multiple of 4, at
/// most 512) added to `seed`, unfolded, computed by the kernel
/// (`bpf_csum_diff`): a loop here would be unrolled with spills the stack
/// has no room for. 0 when the kernel refuses.
///
/// # Safety
/// `at` must point at `len` readable bytes of the packet or the stack.
#[inline(always)]
pub unsafe fn csum_of(at: *const u8, len: u32, seed: u32) -> u32 {
    // SAFETY: the caller's bounds.
    let s = unsafe {
        aya_ebpf::helpers::bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len, seed)
    };
    if s < 0 { 0 } else { s as u32 }
}

impl Ip for V4 {
    type Addr = u32;
    const ETH_P: u16 = 0x0800_u16.to_be();
    const FAMILY: u8 = FAMILY_V4;
    const AF: u8 = 2;
    const ICMP: u8 = 1;
    const HLEN: usize = 20;
    const ICMP_HEADERS: usize = 28;
    const ICMP_PSEUDO: bool = false;
    const PROTO_AT: usize = 9;
    const SADDR: usize = 12;
    const DADDR: usize = 16;
    const PORT_UNREACHABLE: [u8; 8] = [3, 3, 0, 0, 0, 0, 0, 0];

    #[inline(always)]
    fn too_big(mtu: u32) -> [u8; 8] {
        let [hi, lo] = (mtu as u16).to_be_bytes();
        [3, 4, 0, 0, 0, 0, hi, lo]
    }

    #[inline(always)]
    fn dont_fragment(ctx: &TcContext) -> bool {
        at::<u16>(ctx, IP + 6).is_some_and(|f| u16::from_be(f) & 0x4000 != 0)
    }

    #[inline(always)]
    fn wide(a: u32) -> [u32; 4] {
        [a, 0, 0, 0]
    }

    #[inline(always)]
    fn narrow(a: &[u32; 4]) -> u32 {
        a[0]
    }

    #[inline(always)]
    fn hash_word(a: u32) -> u32 {
        a
    }

    #[inline(always)]
    fn diff(old: u32, new: u32) -> u32 {
        csum::diff(old, new)
    }

    #[inline(always)]
    fn proto_of(ctx: &TcContext) -> Option<(u8, usize, Frag)> {
        // Identification, then flags and fragment offset.
        let [id, flags]: [u16; 2] = at(ctx, IP + 4)?;
        let flags = u16::from_be(flags);
        let frag = frag(flags & IP_OFFSET, flags & IP_MF != 0, u32::from(id));
        // TTL and protocol as one word.
        Some((at::<u16>(ctx, IP + 8)?.to_ne_bytes()[1], 0, frag))
    }

    #[inline(always)]
    unsafe fn write(ip: usize, saddr: u32, daddr: u32, addrs: u32, hop: bool) -> bool {
        let mut ip_diff = addrs;
        // SAFETY: the caller checked the header's bounds.
        unsafe {
            if hop {
                match crate::packet::take_hop(ip) {
                    Some(d) => ip_diff = csum::add(ip_diff, d),
                    None => return false,
                }
            }
            core::ptr::write_unaligned((ip + Self::SADDR) as *mut u32, saddr);
            core::ptr::write_unaligned((ip + Self::DADDR) as *mut u32, daddr);
            apply_ip_csum(ip, ip_diff);
        }
        true
    }

    #[inline(always)]
    fn icmp_error(ty: u8) -> bool {
        // Destination unreachable, time exceeded, parameter problem.
        ty == 3 || ty == 11 || ty == 12
    }

    #[inline(always)]
    fn hlen_of(first: u8) -> Option<usize> {
        let ihl = usize::from(first & 0x0f) * 4;
        (first >> 4 == 4 && ihl >= 20).then_some(ihl)
    }

    #[inline(always)]
    fn set_quoted_addr(
        ctx: &TcContext,
        icmp: usize,
        ip: usize,
        src: bool,
        old: u32,
        new: u32,
    ) -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        let sum = ip + 10;
        let old_sum: u16 = ctx.load(sum)?;
        ctx.l3_csum_replace(sum, u64::from(old), u64::from(new), 4)?;
        let new_sum: u16 = ctx.load(sum)?;
        ctx.store(ip + if src { Self::SADDR } else { Self::DADDR }, &new, 0)?;
        ctx.l4_csum_replace(icmp + 2, u64::from(old), u64::from(new), 4)?;
        ctx.l4_csum_replace(icmp + 2, u64::from(old_sum), u64::from(new_sum), 2)
    }

    #[inline(always)]
    fn redirect_neigh(ifindex: u32, nexthop: u32) -> i32 {
        crate::packet::redirect_neigh(ifindex, nexthop)
    }

    #[inline(always)]
    unsafe fn write_icmp_header(ip: usize, saddr: u32, daddr: u32, len: usize) -> u32 {
        let ip = ip as *mut u8;
        let header: [u8; 12] = [
            0x45,
            0,
            0,
            (20 + len) as u8,
            0,
            0,
            0,
            0,
            64,
            Self::ICMP,
            0,
            0,
        ];
        // SAFETY: the caller checked the bounds.
        unsafe {
            core::ptr::write_unaligned(ip as *mut [u8; 12], header);
            core::ptr::write_unaligned(ip.add(12) as *mut u32, saddr);
            core::ptr::write_unaligned(ip.add(16) as *mut u32, daddr);
            let ip_sum = fold_sum(ip as *const u16, 10);
            core::ptr::write_unaligned(ip.add(10) as *mut u16, ip_sum);
        }
        0
    }
}

/// The IPv6 fixed header. Packets with extension headers are not
/// translated: TCP, UDP and ICMPv6 are read right after it.
const IPV6_HLEN: usize = 40;

impl Ip for V6 {
    type Addr = [u32; 4];
    const ETH_P: u16 = 0x86dd_u16.to_be();
    const FAMILY: u8 = FAMILY_V6;
    const AF: u8 = 10;
    const ICMP: u8 = 58;
    const HLEN: usize = IPV6_HLEN;
    const ICMP_HEADERS: usize = IPV6_HLEN + 8;
    const ICMP_PSEUDO: bool = true;
    const PROTO_AT: usize = 6;
    const SADDR: usize = 8;
    const DADDR: usize = 24;
    const PORT_UNREACHABLE: [u8; 8] = [1, 4, 0, 0, 0, 0, 0, 0];

    #[inline(always)]
    fn too_big(mtu: u32) -> [u8; 8] {
        let [a, b, c, d] = mtu.to_be_bytes();
        [2, 0, 0, 0, a, b, c, d]
    }

    #[inline(always)]
    fn dont_fragment(_ctx: &TcContext) -> bool {
        true
    }

    #[inline(always)]
    fn wide(a: [u32; 4]) -> [u32; 4] {
        a
    }

    #[inline(always)]
    fn narrow(a: &[u32; 4]) -> [u32; 4] {
        *a
    }

    #[inline(always)]
    fn hash_word(a: [u32; 4]) -> u32 {
        a[0] ^ a[1] ^ a[2] ^ a[3]
    }

    #[inline(always)]
    fn diff(old: [u32; 4], new: [u32; 4]) -> u32 {
        let mut d = 0;
        let mut i = 0;
        while i < 4 {
            if old[i] != new[i] {
                d = csum::add(d, csum::diff(old[i], new[i]));
            }
            i += 1;
        }
        d
    }

    #[inline(always)]
    fn proto_of(ctx: &TcContext) -> Option<(u8, usize, Frag)> {
        // Next header and hop limit as one word.
        let next = at::<u16>(ctx, IP + 6)?.to_ne_bytes()[0];
        if next != IPV6_FRAGMENT {
            return Some((next, 0, Frag::WHOLE));
        }
        // Next header and reserved, offset and flags, identification.
        let at_frag = IP + IPV6_HLEN;
        let next = at::<u16>(ctx, at_frag)?.to_ne_bytes()[0];
        let flags = u16::from_be(at(ctx, at_frag + 2)?);
        let id: u32 = at(ctx, at_frag + 4)?;
        Some((next, IPV6_FRAG_HLEN, frag(flags >> 3, flags & 1 != 0, id)))
    }

    #[inline(always)]
    unsafe fn write(ip: usize, saddr: [u32; 4], daddr: [u32; 4], _addrs: u32, hop: bool) -> bool {
        // SAFETY: the caller checked the header's bounds.
        unsafe {
            if hop && !take_hop6(ip) {
                return false;
            }
            core::ptr::write_unaligned((ip + Self::SADDR) as *mut [u32; 4], saddr);
            core::ptr::write_unaligned((ip + Self::DADDR) as *mut [u32; 4], daddr);
        }
        true
    }

    #[inline(always)]
    fn icmp_error(ty: u8) -> bool {
        // Destination unreachable, packet too big, time exceeded,
        // parameter problem.
        (1..=4).contains(&ty)
    }

    #[inline(always)]
    fn hlen_of(first: u8) -> Option<usize> {
        (first >> 4 == 6).then_some(IPV6_HLEN)
    }

    #[inline(always)]
    fn set_quoted_addr(
        ctx: &TcContext,
        icmp: usize,
        ip: usize,
        src: bool,
        old: [u32; 4],
        new: [u32; 4],
    ) -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        ctx.store(ip + if src { Self::SADDR } else { Self::DADDR }, &new, 0)?;
        ctx.l4_csum_replace(icmp + 2, 0, u64::from(Self::diff(old, new)), 0)
    }

    #[inline(always)]
    fn redirect_neigh(ifindex: u32, nexthop: [u32; 4]) -> i32 {
        crate::packet::redirect_neigh6(ifindex, nexthop)
    }

    #[inline(always)]
    unsafe fn write_icmp_header(ip: usize, saddr: [u32; 4], daddr: [u32; 4], len: usize) -> u32 {
        let ip = ip as *mut u8;
        let len16 = (len as u16).to_be_bytes();
        let header: [u8; 8] = [0x60, 0, 0, 0, len16[0], len16[1], Self::ICMP, 64];
        // SAFETY: the caller checked the bounds.
        unsafe {
            core::ptr::write_unaligned(ip as *mut [u8; 8], header);
            core::ptr::write_unaligned(ip.add(8) as *mut [u32; 4], saddr);
            core::ptr::write_unaligned(ip.add(24) as *mut [u32; 4], daddr);
            // Pseudo-header: both addresses, the upper-layer length and
            // the next header (as 16-bit words in network order).
            csum_of(
                ip.add(8),
                32,
                u32::from(u16::from_ne_bytes(len16))
                    + u32::from(u16::from_ne_bytes([0, Self::ICMP])),
            )
        }
    }
}
