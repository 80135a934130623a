//! Before a TCP backend first gets an origin (`ORIGINS`), TCP sockets
//! already connected straight to its address get a `PEERS` record naming
//! the address itself, as the connect hook gives such a socket once the
//! origin exists. Without it getpeername, finding no record, would look the
//! address up in `ORIGINS` and show such a socket the Service instead of
//! the pod it dialled.
//!
//! The agent writes the new origins, puts their keys in a map of its own
//! (`fresh`), runs this TCP socket iterator over the cgroup's namespaces
//! (`iter`), and only then writes the slots that let connects through the
//! origin go without a record. The iterator gives a record to each full TCP
//! socket whose peer is a fresh key and that has none; a socket with a
//! record (translated, or marked already) keeps it. The peer is read from
//! `struct sock_common` at the offsets the kernel's BTF gives.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use aya::maps::{HashMap, IterableMap as _, MapData};
use skiff_ebpf_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, ServiceKey, maps as names};
use tracing::{debug, info};

use super::btf::Btf;
use super::iter::{BPF_PSEUDO_MAP_FD, Result, SocketIter, map_err};
use super::sys::insn;

/// Keys marked in one walk at most.
const MAX_FRESH: u32 = 16_384;
const FRESH: &str = "fresh origins";

/// Where the iterator reads a socket's peer (`struct sock_common`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    pub daddr: i16,
    pub dport: i16,
    pub family: i16,
    pub v6_daddr: i16,
}

impl Offsets {
    fn of(btf: &Btf) -> Result<Self> {
        let off = |m| -> Result<i16> {
            let o = btf.member_offset("sock_common", m)?;
            Ok(i16::try_from(o).unwrap_or(i16::MAX))
        };
        Ok(Self {
            daddr: off("skc_daddr")?,
            dport: off("skc_dport")?,
            family: off("skc_family")?,
            v6_daddr: off("skc_v6_daddr")?,
        })
    }
}

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
/// `BPF_SK_STORAGE_GET_F_CREATE`: the record is created (from the value
/// given) where the socket has none; an existing one is left as it is.
const F_CREATE: i32 = 1;
/// The third word of an IPv4-mapped IPv6 address, as loaded from memory.
const MAPPED: i32 = 0xffff_u32.to_be() as i32;

// Stack layout: the `ServiceKey` at -24 (addr -24..-8, port -8, proto -6,
// family -5), the `PeerValue` at -64 (frontend -64, backend -48, ports
// -32 and -30, pad -28).
const KEY: i16 = -24;
const PEER: i16 = -64;

/// The iterator, 59 instructions.
pub fn program(peers_fd: i32, fresh_fd: i32, at: Offsets) -> Vec<u64> {
    use super::sys::op::*;
    // Jump targets.
    const V6: usize = 16;
    const FULL6: usize = 26;
    const PORT: usize = 31;
    const OUT: usize = 57;
    let jump = |code: u8, dst: u8, imm: i32, from: usize, to: usize| {
        insn(code, dst, 0, (to as isize - from as isize - 1) as i16, imm)
    };
    vec![
        // 0: r6 = ctx->sk_common (struct bpf_iter__tcp: meta, sk_common, uid)
        insn(LDX_DW, 6, 1, 8, 0),
        jump(JEQ_K, 6, 0, 1, OUT),
        // 2: r7 = bpf_skc_to_tcp_sock(sk): full TCP sockets only (not a
        // request or time-wait socket), and the type the storage wants
        insn(MOV_X, 1, 6, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SKC_TO_TCP_SOCK),
        jump(JEQ_K, 0, 0, 4, OUT),
        insn(MOV_X, 7, 0, 0, 0),
        // 6: the key, zeroed
        insn(ST_DW, 10, 0, KEY, 0),
        insn(ST_DW, 10, 0, KEY + 8, 0),
        insn(ST_W, 10, 0, KEY + 16, 0),
        // 9: by family
        insn(LDX_H, 2, 6, at.family, 0),
        jump(JEQ_K, 2, AF_INET6, 10, V6),
        jump(JNE_K, 2, AF_INET, 11, OUT),
        // 12: IPv4
        insn(LDX_W, 3, 6, at.daddr, 0),
        insn(STX_W, 10, 3, KEY, 0),
        insn(ST_B, 10, 0, KEY + 19, i32::from(FAMILY_V4)),
        jump(JA, 0, 0, 15, PORT),
        // 16: IPv6, keyed as IPv4 when mapped (the programs' key_of)
        insn(LDX_W, 3, 6, at.v6_daddr, 0),
        insn(LDX_W, 4, 6, at.v6_daddr + 4, 0),
        insn(LDX_W, 5, 6, at.v6_daddr + 8, 0),
        insn(LDX_W, 2, 6, at.v6_daddr + 12, 0),
        jump(JNE_K, 3, 0, 20, FULL6),
        jump(JNE_K, 4, 0, 21, FULL6),
        jump(JNE32_K, 5, MAPPED, 22, FULL6),
        insn(STX_W, 10, 2, KEY, 0),
        insn(ST_B, 10, 0, KEY + 19, i32::from(FAMILY_V4)),
        jump(JA, 0, 0, 25, PORT),
        // 26: a full IPv6 address
        insn(STX_W, 10, 3, KEY, 0),
        insn(STX_W, 10, 4, KEY + 4, 0),
        insn(STX_W, 10, 5, KEY + 8, 0),
        insn(STX_W, 10, 2, KEY + 12, 0),
        insn(ST_B, 10, 0, KEY + 19, i32::from(FAMILY_V6)),
        // 31: port and protocol
        insn(LDX_H, 3, 6, at.dport, 0),
        insn(STX_H, 10, 3, KEY + 16, 0),
        insn(ST_B, 10, 0, KEY + 18, i32::from(PROTO_TCP)),
        // 34: r0 = bpf_map_lookup_elem(fresh, &key)
        insn(MOV_X, 2, 10, 0, 0),
        insn(ADD_K, 2, 0, 0, i32::from(KEY)),
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, fresh_fd),
        0,
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        jump(JEQ_K, 0, 0, 39, OUT),
        // 40: the record: frontend = backend = the peer
        insn(LDX_DW, 2, 10, KEY, 0),
        insn(LDX_DW, 3, 10, KEY + 8, 0),
        insn(STX_DW, 10, 2, PEER, 0),
        insn(STX_DW, 10, 3, PEER + 8, 0),
        insn(STX_DW, 10, 2, PEER + 16, 0),
        insn(STX_DW, 10, 3, PEER + 24, 0),
        insn(LDX_H, 4, 10, KEY + 16, 0),
        insn(STX_H, 10, 4, PEER + 32, 0),
        insn(STX_H, 10, 4, PEER + 34, 0),
        insn(ST_W, 10, 0, PEER + 36, 0),
        // 50: bpf_sk_storage_get(PEERS, tcp_sock, &record, F_CREATE)
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, peers_fd),
        0,
        insn(MOV_X, 2, 7, 0, 0),
        insn(MOV_X, 3, 10, 0, 0),
        insn(ADD_K, 3, 0, 0, i32::from(PEER)),
        insn(MOV_K, 4, 0, 0, F_CREATE),
        insn(CALL, 0, 0, 0, HELPER_SK_STORAGE_GET),
        // 57: out
        insn(MOV_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The loaded iterator and the map that arms it.
pub struct Marker {
    iter: SocketIter,
    fresh: HashMap<MapData, ServiceKey, u8>,
}

impl Marker {
    /// Loads the iterator against the `PEERS` map pinned under `pin_dir`;
    /// `cgroup` holds the clients.
    pub fn load(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        let btf = Btf::kernel()?;
        let iter_tcp = btf.func_id("bpf_iter_tcp")?;
        let offsets = Offsets::of(&btf)?;
        let peers_path = pin_dir.join("maps").join(names::PEERS);
        let peers = MapData::from_pin(&peers_path).map_err(map_err(names::PEERS))?;
        let fresh =
            HashMap::<MapData, ServiceKey, u8>::create(MAX_FRESH, 0).map_err(map_err(FRESH))?;
        let insns = program(
            peers.fd().as_fd().as_raw_fd(),
            fresh.map().fd().as_fd().as_raw_fd(),
            offsets,
        );
        let iter = SocketIter::load("skiff_origin_mk", &insns, iter_tcp, cgroup)?;
        info!("origin marker ready");
        Ok(Self { iter, fresh })
    }

    /// Gives every TCP socket in the cgroup's namespaces that is connected
    /// to one of `backends` and has no record a record naming its peer.
    /// Returns how many namespaces were walked.
    pub fn mark(&mut self, backends: &[ServiceKey]) -> Result<usize> {
        let mut walked = 0;
        // What was armed is always disarmed, so no key outlives its walk.
        for chunk in backends.chunks(MAX_FRESH as usize) {
            let armed = chunk
                .iter()
                .try_for_each(|k| self.fresh.insert(k, 1, 0))
                .map_err(map_err(FRESH));
            let result = armed.and_then(|()| self.iter.walk());
            for k in chunk {
                let _ = self.fresh.remove(k);
            }
            walked = result?;
        }
        debug!(
            backends = backends.len(),
            namespaces = walked,
            "sockets straight to new origins marked"
        );
        Ok(walked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_and_the_maps_are_loaded_by_descriptor() {
        let at = Offsets {
            daddr: 0,
            dport: 12,
            family: 16,
            v6_daddr: 56,
        };
        let p = program(7, 8, at);
        assert_eq!(p.len(), 59);
        // r6 = *(u64 *)(r1 + 8)
        assert_eq!(p[0].to_le_bytes(), [0x79, 0x16, 8, 0, 0, 0, 0, 0]);
        // ld_imm64 r1, map fd 8 (fresh), then 7 (PEERS)
        assert_eq!(p[36].to_le_bytes(), [0x18, 0x11, 0, 0, 8, 0, 0, 0]);
        assert_eq!(p[50].to_le_bytes(), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        // the peer's family, read at the offset given
        assert_eq!(p[9].to_le_bytes(), [0x69, 0x62, 16, 0, 0, 0, 0, 0]);
        // the mapped-address test compares 32 bits with 0x0000ffff (network order)
        assert_eq!(p[22].to_le_bytes()[0], 0x56);
        assert_eq!(p[22].to_le_bytes()[4..], [0, 0, 0xff, 0xff]);
        let mut jumps = 0;
        for (at, i) in p.iter().enumerate() {
            let b = i.to_le_bytes();
            let class = b[0] & 0x07;
            if (class == 0x05 || class == 0x06) && b[0] != 0x85 && b[0] != 0x95 {
                let to = at as i64 + 1 + i64::from(i16::from_le_bytes([b[2], b[3]]));
                assert!((0..p.len() as i64).contains(&to), "jump at {at} to {to}");
                assert!(to > at as i64, "jump at {at} goes back");
                jumps += 1;
            }
        }
        assert_eq!(jumps, 10);
    }
}
