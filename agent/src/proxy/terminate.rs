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
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::{Btf, BtfError};
use skiff_ebpf_common::{MAX_DOOMED, PeerValue, maps as names};
use tracing::{debug, info};

use super::sys::{BPF_ITER_CREATE, BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd, insn, put32, put64};

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

const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_STORAGE_GET: i32 = 107;

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
            // SAFETY: the instructions, the license and the log outlive
            // the call; the kernel writes at most the log's length to it.
            unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
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
        // SAFETY: link create only reads the descriptor in `attr`.
        let link = unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
            .map_err(sys("attach the socket iterator"))?;
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
                    // SAFETY: iterator create only reads the link's descriptor.
                    let iter = unsafe { bpf_fd(BPF_ITER_CREATE, &mut attr) }
                        .map_err(sys("start the iterator"))?;
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
