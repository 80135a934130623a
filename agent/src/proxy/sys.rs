//! The raw `bpf(2)` calls the proxy makes where aya has no API (link
//! update, a link's cgroup, programs assembled by hand), shared with the
//! lab and the tests: the system call, attribute-block writers, one
//! instruction's encoding, and the few commands built on them.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

pub const BPF_MAP_CREATE: u32 = 0;
pub const BPF_PROG_LOAD: u32 = 5;
pub const BPF_OBJ_PIN: u32 = 6;
pub const BPF_OBJ_GET: u32 = 7;
pub const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
pub const BPF_LINK_CREATE: u32 = 28;
pub const BPF_LINK_UPDATE: u32 = 29;
pub const BPF_ITER_CREATE: u32 = 33;

/// `bpf(2)`: command `cmd` with `attr` as its attribute block, written
/// back in place (counts, tokens); its return value, or the errno.
///
/// # Safety
/// Every pointer written into `attr` must be valid for what `cmd` does
/// with it: read for its whole length, or written for as many bytes as the
/// kernel may write there.
pub unsafe fn sys_bpf(cmd: u32, attr: &mut [u8]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live buffer of the length given; the pointers in
    // it are the caller's to vouch for.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// `bpf(2)` for a command that answers with a new file descriptor
/// (object get, map create, program load, link and iterator create).
///
/// # Safety
/// As [`sys_bpf`]; `cmd` must be one that answers with a descriptor.
pub unsafe fn bpf_fd(cmd: u32, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller vouches for the pointers in `attr`.
    let r = unsafe { sys_bpf(cmd, attr)? };
    // SAFETY: the command answered with a new descriptor, now ours.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

pub fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// One `struct bpf_insn`.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// Opens the BPF object (map, program or link) pinned at `path`.
pub fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut attr = [0u8; 16];
    put64(&mut attr, 0, c.as_ptr() as u64);
    // SAFETY: `c` outlives the call, which only reads it.
    unsafe { bpf_fd(BPF_OBJ_GET, &mut attr) }
}

/// The kernel's `bpf_*_info` of the object behind `fd`: its first `N`
/// bytes (a map's: type, id, key size, value size, max entries, flags; a
/// link's: type, id, prog_id, then at 16 a cgroup link's cgroup id).
pub fn object_info<const N: usize>(fd: BorrowedFd<'_>) -> std::io::Result<[u8; N]> {
    let mut info = [0u8; N];
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, fd.as_raw_fd() as u32);
    put32(&mut attr, 4, N as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    // SAFETY: `info` outlives the call; the kernel writes at most info_len
    // bytes to it.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// The id of the program running behind the pinned link `link`.
pub fn link_program_id(link: &Path) -> std::io::Result<u32> {
    let fd = open_pinned(link)?;
    let info = object_info::<16>(std::os::fd::AsFd::as_fd(&fd))?;
    Ok(u32::from_ne_bytes([info[8], info[9], info[10], info[11]]))
}

/// The id of the cgroup the cgroup link `link` is attached to: 0 once the
/// kernel detached it (its cgroup was removed).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> std::io::Result<u64> {
    let info = object_info::<32>(link)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    Ok(u64::from_ne_bytes(id))
}

/// Puts the program `prog` into the link `link` in place of the one it
/// runs (`BPF_LINK_UPDATE`): the kernel swaps it in one step.
pub fn update_link(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    put32(&mut attr, 4, prog.as_raw_fd() as u32);
    // SAFETY: a link update only reads the two descriptors in `attr`.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}
