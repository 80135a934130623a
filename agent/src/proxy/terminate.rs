//! Socket termination: when a backend leaves a UDP Service, connected
//! sockets of the cgroup's clients that were sent to it are destroyed, so
//! the application sees `ECONNABORTED` and connects again (to a live
//! backend) instead of talking to a gone endpoint forever. kube-proxy gets
//! this by flushing conntrack; a socket-level proxy must end the socket.
//!
//! The kernel's `bpf_sock_destroy` kfunc (6.5+) may only be called from a
//! socket iterator. Our iterator (`iter/udp`) looks each socket up in the
//! `PEERS` socket storage the connect hook fills (so it only ever sees
//! sockets of the cgroup that went through a Service) and destroys it when
//! its (frontend, backend) pair is in `DOOMED`. aya cannot relocate kfunc
//! calls, so the program is assembled here, 18 instructions, and loaded
//! with the raw `bpf(2)` calls. A socket iterator walks one network
//! namespace: it runs once in each namespace the cgroup's processes use.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::{Btf, BtfError};
use skiff_ebpf_common::{MAX_DOOMED, PeerValue, maps as names};
use tracing::{debug, info};

#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the verifier refused the socket iterator: {source}\n{log}")]
    Refused {
        #[source]
        source: std::io::Error,
        log: String,
    },
}

type Result<T> = std::result::Result<T, TerminateError>;

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TerminateError {
    let what = what.into();
    move |source| TerminateError::Sys { what, source }
}

const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_GET: u32 = 7;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_ITER_CREATE: u32 = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_STORAGE_GET: i32 = 107;

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

/// `bpf(2)` for a command that answers with a new file descriptor.
fn bpf(cmd: u32, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: the commands used here (object get, program load, link and
    // iterator create) only read the buffers `attr` points to, which
    // outlive the call, and write at most the verifier log of the length
    // given with it.
    let r = unsafe { sys_bpf(cmd, attr)? };
    // SAFETY: these commands return a new file descriptor we now own.
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

/// The iterator: for each UDP socket, its PEERS record looked up in DOOMED;
/// a hit is destroyed.
pub fn program(peers_fd: i32, doomed_fd: i32, sock_destroy_btf_id: u32) -> Vec<u64> {
    const LDX_DW: u8 = 0x79;
    const JEQ_K: u8 = 0x15;
    const LD_IMM64: u8 = 0x18;
    const MOV_X: u8 = 0xbf;
    const MOV_K: u8 = 0xb7;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    vec![
        // r6 = ctx->udp_sk (struct bpf_iter__udp: meta, udp_sk, ...)
        insn(LDX_DW, 6, 1, 8, 0),
        // 1: the last call of an iteration has no socket
        insn(JEQ_K, 6, 0, 14, 0),
        // 2: r0 = bpf_sk_storage_get(PEERS, sk, NULL, 0)
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, peers_fd),
        0,
        insn(MOV_X, 2, 6, 0, 0),
        insn(MOV_K, 3, 0, 0, 0),
        insn(MOV_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SK_STORAGE_GET),
        // 8: not translated by our connect hook
        insn(JEQ_K, 0, 0, 7, 0),
        // 9: r0 = bpf_map_lookup_elem(DOOMED, record)
        insn(MOV_X, 2, 0, 0, 0),
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, doomed_fd),
        0,
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        // 13: its backend is still there
        insn(JEQ_K, 0, 0, 2, 0),
        // 14: bpf_sock_destroy(sk)
        insn(MOV_X, 1, 6, 0, 0),
        insn(
            CALL,
            0,
            BPF_PSEUDO_KFUNC_CALL,
            0,
            sock_destroy_btf_id as i32,
        ),
        // 16: out
        insn(MOV_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The loaded iterator and the map that arms it.
pub struct Terminator {
    link: OwnedFd,
    doomed: HashMap<MapData, PeerValue, u8>,
    cgroup: PathBuf,
}

/// `struct bpf_link_info` of the link behind `fd`, as far as a cgroup
/// link's goes: type, id, prog_id, then (at 16) the cgroup's id.
fn link_info(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<[u8; 32]> {
    let mut info = [0u8; 32];
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, fd.as_raw_fd() as u32);
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    // SAFETY: `info` outlives the call; the kernel writes at most info_len
    // bytes to it.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// Opens the BPF object (map, program or link) pinned at `path`.
pub fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut attr = [0u8; 16];
    put64(&mut attr, 0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr)
}

/// The id of the program running behind the pinned link `link`.
pub fn link_program_id(link: &Path) -> Result<u32> {
    let fd = open_pinned(link).map_err(sys(format!("open {}", link.display())))?;
    let info = link_info(fd.as_fd()).map_err(sys("link info"))?;
    Ok(u32::from_ne_bytes([info[8], info[9], info[10], info[11]]))
}

/// The id of the cgroup the cgroup link `link` is attached to: 0 once the
/// kernel detached it (its cgroup was removed).
pub fn link_cgroup_id(link: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    let info = link_info(link)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&info[16..24]);
    Ok(u64::from_ne_bytes(id))
}

/// Puts the program `prog` into the link `link` in place of the one it
/// runs (`BPF_LINK_UPDATE`): the kernel swaps it in one step.
pub fn update_link(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, link.as_raw_fd() as u32);
    put32(&mut attr, 4, prog.as_raw_fd() as u32);
    // SAFETY: a link update only reads the two descriptors in `attr`.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

impl Terminator {
    /// Loads the iterator against the maps pinned under `pin_dir` and the
    /// programs attached through its links; `cgroup` holds the clients.
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let btf = Btf::from_sys_fs()?;
        let iter_udp = btf.id_by_type_name_kind("bpf_iter_udp", aya_obj::btf::BtfKind::Func)?;
        let destroy = btf.id_by_type_name_kind("bpf_sock_destroy", aya_obj::btf::BtfKind::Func)?;
        let peers_path = pin_dir.join("maps").join(names::PEERS);
        let peers = MapData::from_pin(&peers_path).map_err(|source| TerminateError::Map {
            map: names::PEERS,
            source,
        })?;
        let doomed_path = pin_dir.join("maps").join(names::DOOMED);
        let map_err = |source| TerminateError::Map {
            map: names::DOOMED,
            source,
        };
        let doomed_data = MapData::from_pin(&doomed_path).map_err(map_err)?;
        let insns = program(
            peers.fd().as_fd().as_raw_fd(),
            doomed_data.fd().as_fd().as_raw_fd(),
            destroy,
        );
        let license = c"GPL";
        let load = |log: &mut [u8], level: u32| {
            let mut attr = [0u8; 144];
            put32(&mut attr, 0, BPF_PROG_TYPE_TRACING);
            put32(&mut attr, 4, insns.len() as u32);
            put64(&mut attr, 8, insns.as_ptr() as u64);
            put64(&mut attr, 16, license.as_ptr() as u64);
            if level > 0 {
                put32(&mut attr, 24, level);
                put32(&mut attr, 28, log.len() as u32);
                put64(&mut attr, 32, log.as_mut_ptr() as u64);
            }
            let name = b"skiff_sock_term";
            attr[48..48 + name.len()].copy_from_slice(name);
            put32(&mut attr, 68, BPF_TRACE_ITER);
            put32(&mut attr, 108, iter_udp);
            bpf(BPF_PROG_LOAD, &mut attr)
        };
        let prog = match load(&mut [], 0) {
            Ok(p) => p,
            // Again with the verifier's log, to say why.
            Err(_) => {
                let mut log = vec![0u8; 64 * 1024];
                load(&mut log, 1).map_err(|source| {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    TerminateError::Refused {
                        source,
                        log: String::from_utf8_lossy(&log[..end]).into_owned(),
                    }
                })?
            }
        };
        let mut attr = [0u8; 32];
        put32(&mut attr, 0, prog.as_raw_fd() as u32);
        put32(&mut attr, 8, BPF_TRACE_ITER);
        let link = bpf(BPF_LINK_CREATE, &mut attr).map_err(sys("attach the socket iterator"))?;
        let doomed = HashMap::try_from(Map::HashMap(doomed_data)).map_err(map_err)?;
        info!("socket termination ready (bpf_sock_destroy)");
        Ok(Self {
            link,
            doomed,
            cgroup: cgroup.to_path_buf(),
        })
    }

    /// Destroys the connected UDP sockets of the cgroup's clients that are
    /// sent to one of `pairs` (frontend, backend). Returns how many network
    /// namespaces were walked.
    pub fn terminate(&mut self, pairs: &[PeerValue]) -> Result<usize> {
        if pairs.is_empty() {
            return Ok(0);
        }
        let mut walked = 0;
        // At most what DOOMED holds at once; what was armed is always
        // disarmed, so no entry outlives its walk.
        for chunk in pairs.chunks(MAX_DOOMED as usize) {
            let armed = chunk
                .iter()
                .try_for_each(|p| self.doomed.insert(p, 1, 0))
                .map_err(|source| TerminateError::Map {
                    map: names::DOOMED,
                    source,
                });
            let result = armed.and_then(|()| self.walk());
            for p in chunk {
                let _ = self.doomed.remove(p);
            }
            walked = result?;
        }
        debug!(
            pairs = pairs.len(),
            namespaces = walked,
            "sockets to gone backends terminated"
        );
        Ok(walked)
    }

    /// Runs the iterator once in each network namespace of the cgroup's
    /// processes, on a thread of its own (setns changes only its thread).
    fn walk(&self) -> Result<usize> {
        let namespaces = namespaces_of(&self.cgroup);
        let link = self.link.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut walked = 0;
                for ns in namespaces.values() {
                    // A process that exited meanwhile took its path with it.
                    let Ok(f) = fs::File::open(ns) else { continue };
                    // SAFETY: setns on this thread only, with an open fd.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        continue;
                    }
                    let mut attr = [0u8; 8];
                    put32(&mut attr, 0, link as u32);
                    let iter =
                        bpf(BPF_ITER_CREATE, &mut attr).map_err(sys("start the iterator"))?;
                    let mut file = fs::File::from(iter);
                    let mut sink = [0u8; 256];
                    // The program prints nothing: reading to the end runs it
                    // over every socket.
                    while file.read(&mut sink).map_err(sys("run the iterator"))? > 0 {}
                    walked += 1;
                }
                Ok(walked)
            })
            .join()
            .unwrap_or_else(|_| Err(sys("iterator thread")(std::io::Error::other("panicked"))))
        })
    }
}

/// One path per network namespace used by a process in `cgroup` or below,
/// keyed by the namespace's (device, inode).
fn namespaces_of(cgroup: &Path) -> BTreeMap<(u64, u64), PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter(|l| !l.is_empty() && *l != "0") {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(m) = fs::metadata(&ns) {
                    out.entry((m.dev(), m.ino())).or_insert(ns);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_encoded_as_the_kernel_reads_them() {
        let p = program(7, 8, 1234);
        assert_eq!(p.len(), 18);
        // r6 = *(u64 *)(r1 + 8)
        assert_eq!(p[0].to_le_bytes(), [0x79, 0x16, 8, 0, 0, 0, 0, 0]);
        // ld_imm64 r1, map fd 7
        assert_eq!(p[2].to_le_bytes(), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        // the kfunc call: src_reg 2, imm = its BTF id
        assert_eq!(p[15].to_le_bytes(), [0x85, 0x20, 0, 0, 0xd2, 0x04, 0, 0]);
        // Every jump lands on `r0 = 0; exit`.
        for (at, off) in [(1usize, 14i16), (8, 7), (13, 2)] {
            let b = p[at].to_le_bytes();
            assert_eq!(i16::from_le_bytes([b[2], b[3]]), off);
            assert_eq!(at as i16 + 1 + off, 16);
        }
    }
}
