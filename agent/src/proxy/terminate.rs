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
//! calls, so the program is assembled here, 18 instructions, and run by
//! `iter` in each network namespace the cgroup's processes use.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use skiff_ebpf_common::{MAX_DOOMED, PeerValue, maps as names};
use tracing::{debug, info};

use super::btf::Btf;
use super::iter::{BPF_PSEUDO_MAP_FD, Result, SocketIter, map_err};
use super::sys::insn;

const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// The iterator: for each UDP socket, its PEERS record looked up in DOOMED;
/// a hit is destroyed.
pub fn program(peers_fd: i32, doomed_fd: i32, sock_destroy_btf_id: u32) -> Vec<u64> {
    use super::sys::op::*;
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
    iter: SocketIter,
    doomed: HashMap<MapData, PeerValue, u8>,
}

impl Terminator {
    /// Loads the iterator against the maps pinned under `pin_dir` and the
    /// programs attached through its links; `cgroup` holds the clients.
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let btf = Btf::kernel()?;
        let iter_udp = btf.func_id("bpf_iter_udp")?;
        let destroy = btf.func_id("bpf_sock_destroy")?;
        let peers_path = pin_dir.join("maps").join(names::PEERS);
        let peers = MapData::from_pin(&peers_path).map_err(map_err(names::PEERS))?;
        let doomed_path = pin_dir.join("maps").join(names::DOOMED);
        let doomed_data = MapData::from_pin(&doomed_path).map_err(map_err(names::DOOMED))?;
        let insns = program(
            peers.fd().as_fd().as_raw_fd(),
            doomed_data.fd().as_fd().as_raw_fd(),
            destroy,
        );
        let iter = SocketIter::load("skiff_sock_term", &insns, iter_udp, cgroup)?;
        let doomed =
            HashMap::try_from(Map::HashMap(doomed_data)).map_err(map_err(names::DOOMED))?;
        info!("socket termination ready (bpf_sock_destroy)");
        Ok(Self { iter, doomed })
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
                .map_err(map_err(names::DOOMED));
            let result = armed.and_then(|()| self.iter.walk());
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
