//! Packet access and redirects shared by the TC programs.

use aya_ebpf::{
    bindings::{bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::bpf_redirect_neigh,
    programs::TcContext,
};

/// A header field at `off`: read in place when it is in the linear part of
/// the packet (the common case), else through the helper (headers a
/// driver left in fragments). Fields of at least two bytes: for one byte
/// the compiler turns the bounds check into a form the verifier does not
/// take as one, so single bytes are read as part of their 16-bit word.
#[inline(always)]
pub fn at<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: bounds checked against data_end just above.
        return Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load(off).ok()
}

/// IPv4's flags-and-offset word (host order): "more fragments", and the
/// fragment offset; a packet with either is a fragment.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;
/// IPv6's fragment header (next header 44).
pub const IPV6_FRAGMENT: u8 = 44;

/// Sends the packet out of `ifindex` to the IPv4 next hop `nexthop`
/// (network byte order): see `redirect_to`.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32, nexthop: u32) -> i32 {
    const AF_INET: u32 = 2;
    redirect_to(
        ifindex,
        bpf_redir_neigh {
            nh_family: AF_INET,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: nexthop },
        },
    )
}

/// Sends the packet out of `ifindex` to the IPv6 next hop `nexthop`
/// (network byte order): see `redirect_to`.
#[inline(always)]
pub fn redirect_neigh6(ifindex: u32, nexthop: [u32; 4]) -> i32 {
    const AF_INET6: u32 = 10;
    redirect_to(
        ifindex,
        bpf_redir_neigh {
            nh_family: AF_INET6,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv6_nh: nexthop },
        },
    )
}

/// Sends the packet out of `ifindex` to the next hop `nh`, its MAC filled
/// in (and resolved if need be) by the kernel: TC_ACT_REDIRECT, or
/// TC_ACT_SHOT when it cannot.
#[inline(always)]
fn redirect_to(ifindex: u32, mut nh: bpf_redir_neigh) -> i32 {
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

/// Takes one hop off the TTL of the IPv4 header at `ip`, in place, and
/// returns the difference its checksum must take in (the caller applies
/// it, alone or with others); None, and nothing written, when the packet
/// has no hop left.
///
/// # Safety
/// `ip + 10` must be within the packet's checked bounds.
#[inline(always)]
pub unsafe fn take_hop(ip: usize) -> Option<u32> {
    // TTL and protocol as one 16-bit word, as the checksum sees it.
    let word = (ip + 8) as *mut u16;
    // SAFETY: the caller checked the bounds.
    unsafe {
        let old = core::ptr::read_unaligned(word);
        let mut bytes = old.to_ne_bytes();
        if bytes[0] <= 1 {
            return None;
        }
        bytes[0] -= 1;
        let new = u16::from_ne_bytes(bytes);
        core::ptr::write_unaligned(word, new);
        Some(skiff_ebpf_common::csum::diff(
            u32::from(old),
            u32::from(new),
        ))
    }
}

/// Takes `diff` (see `csum::diff`) into the checksum of the IPv4 header
/// at `ip`, in place.
///
/// # Safety
/// `ip + 12` must be within the packet's checked bounds.
#[inline(always)]
pub unsafe fn apply_ip_csum(ip: usize, diff: u32) {
    let sum = (ip + 10) as *mut u16;
    // SAFETY: the caller checked the bounds.
    unsafe {
        core::ptr::write_unaligned(
            sum,
            skiff_ebpf_common::csum::apply(core::ptr::read_unaligned(sum), diff),
        )
    };
}

/// Takes one hop off the limit of the IPv6 header at `ip`, in place;
/// false, and nothing written, when the packet has none left.
///
/// # Safety
/// `ip + 7` must be within the packet's checked bounds.
#[inline(always)]
pub unsafe fn take_hop6(ip: usize) -> bool {
    let limit = (ip + 7) as *mut u8;
    // SAFETY: the caller checked the bounds.
    unsafe {
        let left = core::ptr::read_unaligned(limit);
        if left <= 1 {
            return false;
        }
        core::ptr::write_unaligned(limit, left - 1);
    }
    true
}

/// The Internet checksum of `words` 16-bit words at `at` (whose own
/// checksum field is zero).
///
/// # Safety
/// `at` must point at `words` readable 16-bit words.
#[inline(always)]
pub unsafe fn fold_sum(at: *const u16, words: usize) -> u16 {
    let mut s = 0u32;
    let mut i = 0;
    while i < words {
        // SAFETY: within the caller's bounds.
        s += u32::from(unsafe { core::ptr::read_unaligned(at.add(i)) });
        i += 1;
    }
    skiff_ebpf_common::csum::fold(s)
}
