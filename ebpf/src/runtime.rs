//! What every kernel object of Skiff carries: its license (GPL-compatible,
//! for the helpers that need it) and a panic handler (the verifier sees to
//! it that none is reached).

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
