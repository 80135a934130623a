//! A congested router on the underlay, for the overlay's ECN test: a TC
//! program on an interface's egress that marks every ECN-capable VXLAN
//! packet (IPv4, UDP port 8472) CE in its outer header, as an AQM queue
//! (RED, CoDel) does instead of dropping. This kernel has no such qdisc
//! nor `pedit`, so the program is assembled here (27 instructions) and
//! attached with the raw `bpf(2)` calls (the agent's, as its socket
//! iterator is loaded); it stays attached while the
//! returned link is open.

use std::os::fd::{AsRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use skiff_agent::proxy::sys::{BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd, insn, put32, put64};

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_EGRESS: u32 = 47;
const HELPER_L3_CSUM_REPLACE: i32 = 10;

/// The marker. Header words are compared as this (little-endian) machine
/// loads them: EtherType 0x0800 reads 0x0008, port 8472 (0x2118) reads
/// 0x1821, and the TOS byte is the high half of the word at offset 14.
fn program() -> Vec<u64> {
    const LDX_W: u8 = 0x61;
    const LDX_H: u8 = 0x69;
    const LDX_B: u8 = 0x71;
    const STX_H: u8 = 0x6b;
    const MOV_X: u8 = 0xbf;
    const MOV_K: u8 = 0xb7;
    const ADD_K: u8 = 0x07;
    const AND_K: u8 = 0x57;
    const OR_K: u8 = 0x47;
    const JGT_X: u8 = 0x2d;
    const JNE_K: u8 = 0x55;
    const JEQ_K: u8 = 0x15;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const OUT: i16 = 25;
    // A jump at instruction `at` to OUT.
    let to_out = |at: i16| OUT - at - 1;
    vec![
        insn(MOV_X, 6, 1, 0, 0),
        // r2 = skb->data, r3 = skb->data_end
        insn(LDX_W, 2, 1, 76, 0),
        insn(LDX_W, 3, 1, 80, 0),
        // 3: Ethernet, IPv4 without options, UDP up to its ports
        insn(MOV_X, 4, 2, 0, 0),
        insn(ADD_K, 4, 0, 0, 38),
        insn(JGT_X, 4, 3, to_out(5), 0),
        insn(LDX_H, 5, 2, 12, 0),
        insn(JNE_K, 5, 0, to_out(7), 0x0008),
        insn(LDX_B, 5, 2, 23, 0),
        insn(JNE_K, 5, 0, to_out(9), 17),
        insn(LDX_H, 5, 2, 36, 0),
        insn(JNE_K, 5, 0, to_out(11), 0x1821),
        // 12: r7 = version/IHL and TOS; a packet that is not ECN-capable
        // is left alone (a router would drop it, not mark it)
        insn(LDX_H, 7, 2, 14, 0),
        insn(MOV_X, 5, 7, 0, 0),
        insn(AND_K, 5, 0, 0, 0x0300),
        insn(JEQ_K, 5, 0, to_out(15), 0),
        // 16: r8 = the same word marked CE, written back
        insn(MOV_X, 8, 7, 0, 0),
        insn(OR_K, 8, 0, 0, 0x0300),
        insn(STX_H, 2, 8, 14, 0),
        // 19: bpf_l3_csum_replace(skb, 14 + 10, old, new, 2)
        insn(MOV_X, 1, 6, 0, 0),
        insn(MOV_K, 2, 0, 0, 24),
        insn(MOV_X, 3, 7, 0, 0),
        insn(MOV_X, 4, 8, 0, 0),
        insn(MOV_K, 5, 0, 0, 2),
        insn(CALL, 0, 0, 0, HELPER_L3_CSUM_REPLACE),
        // 25 (OUT): on to the next program, or the kernel's path (TCX_NEXT)
        insn(MOV_K, 0, 0, 0, -1),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// Attaches the marker to `ifname`'s egress in this thread's network
/// namespace; it is detached when the returned link is closed.
pub fn mark_ce_on_egress(ifname: &str) -> Result<OwnedFd> {
    let ifindex =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let insns = program();
    let license = c"GPL";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = [0u8; 72];
    put32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1);
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    // SAFETY: the instructions, the license and the log outlive the call;
    // the kernel writes at most the log's length into it.
    let prog = match unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => fd,
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "the verifier refused the marker: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    };
    let mut attr = [0u8; 32];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, ifindex);
    put32(&mut attr, 8, BPF_TCX_EGRESS);
    // SAFETY: no pointers in a tcx link request.
    unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
        .with_context(|| format!("attaching the marker to {ifname}'s egress"))
}
