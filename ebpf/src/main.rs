//! Socket-level service load balancing (cgroup sock_addr programs), and
//! the TC programs for traffic from other hosts (`nodeport`).
//!
//! `connect4/6` and `sendmsg4/6` rewrite a destination that is a service
//! frontend (ClusterIP, external IP, node address + NodePort) to one of its
//! backends before the kernel routes anything, so east-west traffic carries
//! no per-packet NAT. `recvmsg4/6` and `getpeername4/6` undo the rewrite in
//! what the application sees, so UDP replies and the peer name show the
//! frontend. The maps are described in `skiff-ebpf-common`.
//!
//! An AF_INET6 socket may name an IPv4 service as `::ffff:10.96.0.10`
//! (Go, Java and Python dual-stack clients do): the v6 hooks look such an
//! address up in the IPv4 entries and answer in the same mapped form.
#![no_std]
#![no_main]

use core::num::NonZeroU32;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use skiff_ebpf_common::{
    AffinityKey, AffinityValue, Backend, FAMILY_V4, FAMILY_V6, MAX_AFFINITY, MAX_BACKENDS,
    MAX_DOOMED, MAX_ORIGINS, MAX_REVNAT, MAX_SERVICES, MAX_SLOTS, PROTO_TCP, PROTO_UDP, PeerValue,
    RevNatKey, RevNatValue, SCOPE_CLIENT, SCOPE_SOCKET, SLOT_ORIGIN, ServiceKey, ServiceValue,
    SlotKey, SlotValue,
};

/// Without preallocation a replaced or deleted element is freed after an RCU
/// grace period, so a program that looked it up keeps reading the value it
/// found; preallocated hash maps recycle elements at once and a reader could
/// see another entry's bytes. Every update the agent makes relies on this.
pub(crate) const BPF_F_NO_PREALLOC: u32 = 1;

mod ip;
mod nodeport;
mod packet;
mod runtime;

/// Allowed / rejected, as cgroup sock_addr programs answer.
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;
const NS_PER_SEC: u64 = 1_000_000_000;

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "SLOTS")]
static SLOTS: HashMap<SlotKey, SlotValue> = HashMap::pinned(MAX_SLOTS, BPF_F_NO_PREALLOC);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(MAX_REVNAT, 0);

/// Connected sockets to terminate, by their `PEERS` record: the agent
/// fills it when backends leave and runs its socket iterator (loaded from
/// user space: it calls the `bpf_sock_destroy` kfunc) over the pods'
/// network namespaces. No program here reads it.
#[map(name = "DOOMED")]
static DOOMED: HashMap<PeerValue, u8> = HashMap::pinned(MAX_DOOMED, BPF_F_NO_PREALLOC);

/// Per-socket record of a translated connect, for getpeername and for
/// recvmsg on connected UDP sockets. Socket storage costs two allocations
/// (charged to the map's memory cgroup) that the kernel frees with the
/// socket: most of what a translated connect costs. A TCP connect through
/// its backend's origin frontend (`ORIGINS`) needs none.
#[btf_map(name = "PEERS")]
static PEERS: SkStorage<PeerValue> = SkStorage::new();

/// TCP backend -> the frontend a recordless socket connected to it is
/// shown as. Written by the agent once per backend, before any slot names
/// it, and left unchanged while sockets may rely on it.
#[map(name = "ORIGINS")]
static ORIGINS: HashMap<ServiceKey, RevNatValue> = HashMap::pinned(MAX_ORIGINS, BPF_F_NO_PREALLOC);

/// Which hook is running: connected sockets (connect) and unconnected UDP
/// datagrams (sendmsg) pick backends differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn skiff_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_forward(&ctx, FAMILY_V4, Hook::Connect))
}

#[cgroup_sock_addr(connect6)]
pub fn skiff_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_forward(&ctx, FAMILY_V6, Hook::Connect))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn skiff_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(try_forward(&ctx, FAMILY_V4, Hook::Sendmsg))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn skiff_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(try_forward(&ctx, FAMILY_V6, Hook::Sendmsg))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn skiff_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4);
    SYS_PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn skiff_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn skiff_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V4);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn skiff_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, FAMILY_V6);
    SYS_PROCEED
}

/// A rejected connect or sendmsg fails with ECONNREFUSED, as kube-proxy's
/// REJECT rule makes it, instead of the EPERM a plain reject gives.
fn verdict(result: Result<i32, i32>) -> i32 {
    match result {
        Ok(v) => v,
        Err(errno) => {
            // SAFETY: bpf_set_retval is allowed in connect and sendmsg hooks.
            unsafe { bpf_set_retval(-errno) };
            SYS_REJECT
        }
    }
}

#[inline(always)]
fn read_addr(sa: *mut bpf_sock_addr, family: u8) -> [u32; 4] {
    // SAFETY: the kernel hands a valid context; user_ip6 must be read one
    // 32-bit word at a time (the verifier rejects wider context loads).
    unsafe {
        if family == FAMILY_V4 {
            [(*sa).user_ip4, 0, 0, 0]
        } else {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        }
    }
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), as
/// `user_ip6` holds it (network byte order).
const MAPPED: u32 = 0xffff_u32.to_be();

/// The address and family the maps key `raw` by, and whether it was an
/// IPv4-mapped IPv6 address.
#[inline(always)]
fn key_of(raw: [u32; 4], family: u8) -> ([u32; 4], u8, bool) {
    if family == FAMILY_V6 && raw[0] == 0 && raw[1] == 0 && raw[2] == MAPPED {
        ([raw[3], 0, 0, 0], FAMILY_V4, true)
    } else {
        (raw, family, false)
    }
}

/// `addr` (as the maps hold it) in the form the socket speaks.
#[inline(always)]
fn in_form(addr: &[u32; 4], mapped: bool) -> [u32; 4] {
    if mapped {
        [0, 0, MAPPED, addr[0]]
    } else {
        *addr
    }
}

#[inline(always)]
fn write_addr(sa: *mut bpf_sock_addr, family: u8, addr: &[u32; 4], port: u16) {
    // SAFETY: these hooks may write user_ip4/user_ip6 and user_port.
    unsafe {
        if family == FAMILY_V4 {
            (*sa).user_ip4 = addr[0];
        } else {
            (*sa).user_ip6[0] = addr[0];
            (*sa).user_ip6[1] = addr[1];
            (*sa).user_ip6[2] = addr[2];
            (*sa).user_ip6[3] = addr[3];
        }
        (*sa).user_port = u32::from(port);
    }
}

#[inline(always)]
fn try_forward(ctx: &SockAddrContext, family: u8, hook: Hook) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: valid context pointer from the kernel.
    let (protocol, port) = unsafe { ((*sa).protocol, (*sa).user_port) };
    let proto = match protocol {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return Ok(SYS_PROCEED),
    };
    let (addr, key_family, mapped) = key_of(read_addr(sa, family), family);
    let key = ServiceKey {
        addr,
        port: port as u16,
        proto,
        family: key_family,
    };
    // SAFETY: read in place: a replaced or deleted entry stays readable
    // until the program ends (see BPF_F_NO_PREALLOC), and the agent never
    // writes into one.
    let svc = match unsafe { SERVICES.get(&key) } {
        Some(v) => v,
        None => {
            // Straight to a backend's own address: a record that says so,
            // or getpeername would show the backend's origin frontend.
            if hook == Hook::Connect && proto == PROTO_TCP && ORIGINS.get_ptr(&key).is_some() {
                let own = PeerValue {
                    frontend: addr,
                    backend: addr,
                    frontend_port: key.port,
                    backend_port: key.port,
                    pad: 0,
                };
                remember(ctx, own, true);
            }
            return Ok(SYS_PROCEED);
        }
    };
    // Read once and checked once: `choose` divides by it.
    let Some(count) = NonZeroU32::new(svc.count) else {
        return Err(ECONNREFUSED);
    };
    // Only unconnected UDP needs the socket's cookie (its sticky backend and
    // reverse entries); connected sockets keep their record in PEERS.
    let cookie = if hook == Hook::Sendmsg {
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    } else {
        0
    };
    let (backend, origin) = choose(ctx, svc, count, hook, cookie)?;
    write_addr(sa, family, &in_form(&backend.addr, mapped), backend.port);

    if hook == Hook::Connect {
        // Remember the frontend for getpeername and connected recvmsg,
        // unless this is TCP through the backend's origin frontend, which
        // getpeername finds in ORIGINS.
        let peer = PeerValue {
            frontend: addr,
            backend: backend.addr,
            frontend_port: port as u16,
            backend_port: backend.port,
            pad: 0,
        };
        remember(ctx, peer, !(origin && proto == PROTO_TCP));
    } else {
        // Unconnected UDP: one reverse entry per (socket, backend), written
        // only when missing since sendmsg runs per datagram.
        let rkey = RevNatKey {
            cookie,
            addr: backend.addr,
            port: backend.port,
            family: key_family,
            pad: [0; 5],
        };
        if REVNAT.get_ptr(&rkey).is_none() {
            let rval = RevNatValue {
                addr,
                port: port as u16,
                pad: [0; 6],
            };
            let _ = REVNAT.insert(&rkey, &rval, 0);
        }
    }
    Ok(SYS_PROCEED)
}

/// Writes a connected socket's record: created when `create`, else only
/// overwritten where one exists (a socket connected again, as UDP may and
/// TCP may after a failed connect, must not keep its earlier record).
#[inline(always)]
fn remember(ctx: &SockAddrContext, peer: PeerValue, create: bool) {
    // SAFETY: the context's socket is valid for the program's run.
    let slot = unsafe {
        if create {
            PEERS.get_or_insert_ptr_mut(ctx, None)
        } else {
            PEERS.get_ptr_mut(ctx)
        }
    };
    if !slot.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe { *slot = peer };
    }
}

/// Picks the backend for this connection or datagram, and says whether
/// this frontend is its origin (known from its slot only; a backend kept by
/// affinity counts as not).
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    svc: &ServiceValue,
    count: NonZeroU32,
    hook: Hook,
    socket_cookie: u64,
) -> Result<(Backend, bool), i32> {
    // A ClientIP-affine service keeps a client on its backend while the
    // client keeps using it within the timeout; an unconnected UDP socket
    // keeps its datagrams on one backend, as conntrack does for kube-proxy.
    let sticky = if svc.affinity_timeout > 0 {
        Some(AffinityKey {
            cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            service: svc.id,
            scope: SCOPE_CLIENT,
        })
    } else if hook == Hook::Sendmsg {
        Some(AffinityKey {
            cookie: socket_cookie,
            service: svc.id,
            scope: SCOPE_SOCKET,
        })
    } else {
        None
    };
    // Only sticky entries need the time; plain connects skip the helper.
    let now = if sticky.is_some() {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if let Some(akey) = &sticky
        && let Some(prev) = AFFINITY.get_ptr(akey)
    {
        // SAFETY: LRU entries are copied out at once.
        let prev = unsafe { *prev };
        let fresh = svc.affinity_timeout == 0
            || now.wrapping_sub(prev.last_used_ns) <= u64::from(svc.affinity_timeout) * NS_PER_SEC;
        if fresh && let Some(b) = unsafe { BACKENDS.get(&prev.backend) } {
            let b = *b;
            if svc.affinity_timeout > 0 {
                let v = AffinityValue {
                    backend: prev.backend,
                    pad: 0,
                    last_used_ns: now,
                };
                let _ = AFFINITY.insert(akey, &v, 0);
            }
            return Ok((b, false));
        }
    }

    let slot = unsafe { bpf_get_prandom_u32() } % count;
    // The first slots ride in the SERVICES entry; the rest cost a lookup.
    let picked = match svc.inline.get(slot as usize) {
        Some(v) => *v,
        None => {
            let skey = SlotKey {
                service: svc.id,
                generation: svc.generation as u16,
                slot: slot as u16,
            };
            // A miss means the agent is between two updates of this
            // service; refuse rather than let the connection go to the
            // frontend address.
            match unsafe { SLOTS.get(&skey) } {
                Some(v) => *v,
                None => return Err(ECONNREFUSED),
            }
        }
    };
    let backend = picked.backend;
    if let Some(akey) = &sticky {
        let v = AffinityValue {
            backend: picked.id,
            pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(akey, &v, 0);
    }
    Ok((backend, picked.flags & SLOT_ORIGIN != 0))
}

/// recvmsg / getpeername: show the frontend instead of the backend.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: u8) {
    let sa = ctx.sock_addr;
    let (addr, key_family, mapped) = key_of(read_addr(sa, family), family);
    // SAFETY: valid context pointer from the kernel.
    let port = unsafe { (*sa).user_port } as u16;
    // SAFETY: the context's socket is valid for the program's run.
    let peer = unsafe { PEERS.get_ptr_mut(ctx) };
    if !peer.is_null() {
        // SAFETY: non-null storage of this socket; copied out at once.
        let p = unsafe { *peer };
        if p.backend == addr && p.backend_port == port {
            write_addr(sa, family, &in_form(&p.frontend, mapped), p.frontend_port);
            return;
        }
    }
    // SAFETY: valid context pointer from the kernel.
    if unsafe { (*sa).protocol } == u32::from(PROTO_TCP) {
        // A TCP socket without a record connected through its backend's
        // origin frontend, or to an address no service uses.
        let okey = ServiceKey {
            addr,
            port,
            proto: PROTO_TCP,
            family: key_family,
        };
        // SAFETY: copied out at once; entries are replaced whole.
        if let Some(o) = unsafe { ORIGINS.get(&okey) } {
            let o = *o;
            write_addr(sa, family, &in_form(&o.addr, mapped), o.port);
        }
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevNatKey {
        cookie,
        addr,
        port,
        family: key_family,
        pad: [0; 5],
    };
    if let Some(v) = REVNAT.get_ptr(&key) {
        // SAFETY: copied out at once.
        let v = unsafe { *v };
        write_addr(sa, family, &in_form(&v.addr, mapped), v.port);
    }
}
