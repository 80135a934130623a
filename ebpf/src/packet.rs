//! Packet access shared by the TC programs.

use aya_ebpf::programs::TcContext;

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
