//! The `#[repr(C)]` types that the kernel programs in `skiff-ebpf` and the
//! agent's `proxy` module both read and write, and the names and sizes of the
//! maps they live in.
//!
//! Layout of the service tables (one lookup chain per connect/sendmsg):
//! `SERVICES[ServiceKey] -> ServiceValue { id, count, generation }`, then
//! `SLOTS[SlotKey { id, generation, slot }] -> SlotValue { backend, id }`.
//! `BACKENDS[id] -> Backend` holds the live backends, for validating
//! affinity entries (which remember a backend id). The agent writes a
//! service's new slots under the generation that is not live, then flips the
//! generation in one `SERVICES` update, so a program sees either the old or
//! the new backend set, never a mix.
#![no_std]

/// Address family markers in keys (not the kernel's AF_* values, which differ
/// in width).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `AffinityKey::scope` for ClientIP session affinity: the key's cookie is the
/// client's network-namespace cookie (the client identity available at
/// connect time for local clients).
pub const SCOPE_CLIENT: u32 = 0;
/// `AffinityKey::scope` for an unconnected UDP socket: its datagrams to one
/// service keep going to the backend picked for its first one.
pub const SCOPE_SOCKET: u32 = 1;

pub const MAX_SERVICES: u32 = 262_144;
pub const MAX_SLOTS: u32 = 1_048_576;
pub const MAX_BACKENDS: u32 = 524_288;
pub const MAX_AFFINITY: u32 = 131_072;
pub const MAX_REVNAT: u32 = 262_144;
/// Connections marked for termination at once (socket termination runs
/// per change, with the backends that just left).
pub const MAX_DOOMED: u32 = 16_384;

/// Largest number of backends one service can have (slot numbers are u16).
pub const MAX_SLOTS_PER_SERVICE: u32 = 65_535;

/// A frontend: the address a client dials. IPv4 addresses use `addr[0]` and
/// leave the rest zero. Address and port are in network byte order, exactly
/// as the kernel hands them to a sock_addr program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// A frontend's live backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id of the service frontend; keys its slots and affinity entries.
    pub id: u32,
    /// Number of selectable backends in the live generation; 0 means refuse.
    pub count: u32,
    /// Which of the two slot generations (0 or 1) is live.
    pub generation: u32,
    /// ClientIP affinity timeout in seconds; 0 turns affinity off.
    pub affinity_timeout: u32,
}

/// One slot of a service's backend set: `slot` runs from 0 to `count - 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service: u32,
    pub generation: u16,
    pub slot: u16,
}

/// A slot: the backend itself (so the connect path needs no third lookup)
/// and its id (for affinity entries, which `BACKENDS` validates).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotValue {
    pub backend: Backend,
    pub id: u32,
}

/// A backend (endpoint address and target port), network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// Key of the affinity LRU: a client (or a socket, see the scopes) and a
/// service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub cookie: u64,
    pub service: u32,
    pub scope: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: u32,
    pub pad: u32,
    /// `bpf_ktime_get_ns` at the last connection that used this entry.
    pub last_used_ns: u64,
}

/// Reverse translation for an unconnected UDP socket: one entry per backend
/// it sent datagrams to (LRU; connected sockets use `PeerValue` instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

/// The frontend a socket's peer is shown as (recvmsg, getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub pad: [u8; 6],
}

/// What a connected socket (TCP, or UDP after connect) was sent to, kept in
/// the socket's own storage: freed with the socket, no table to fill.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerValue {
    /// The frontend the application dialled.
    pub frontend: [u32; 4],
    /// The backend it was sent to.
    pub backend: [u32; 4],
    pub frontend_port: u16,
    pub backend_port: u16,
    pub pad: u32,
}

/// Map names, shared so that the agent opens exactly what the programs
/// declare (and pins them under these names).
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const REVNAT: &str = "REVNAT";
    /// `PeerValue -> u8`: connected sockets whose (frontend, backend) pair
    /// is in it are destroyed by the socket iterator (the backend left).
    pub const DOOMED: &str = "DOOMED";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are plain `#[repr(C)]` integers and arrays with
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for PeerValue {}
}
