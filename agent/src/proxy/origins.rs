//! Which frontend each TCP backend's recordless sockets are shown as
//! (`ORIGINS`), kept by the agent.
//!
//! A translated connect used to write a `PEERS` record for every socket, so
//! that getpeername could show the frontend: two allocations per connection
//! and most of what the translation costs. Now a backend's first TCP
//! frontend becomes its origin, and a connect through the origin writes no
//! record: getpeername finds the frontend by the backend's address. Connects
//! through any other frontend, and connects straight to the backend's own
//! address, still write one.
//!
//! That is exact only while an origin never changes under a socket that
//! relies on it, so an origin is set once and outlives its last frontend by
//! `keep`: a backend that leaves and comes back (readiness flapping, a
//! rolling update that reuses the address) keeps it, and sockets that were
//! connected through it before still show it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use skiff_ebpf_common::{Backend, PROTO_TCP, RevNatValue, ServiceKey};

/// How long an origin outlives its backend's last frontend.
pub const KEEP: Duration = Duration::from_secs(3600);

/// The `ORIGINS` key of a TCP backend reached through a frontend of
/// `family` (the family the programs key it by).
pub fn key_of(backend: &Backend, family: u8) -> ServiceKey {
    ServiceKey {
        addr: backend.addr,
        port: backend.port,
        proto: PROTO_TCP,
        family,
    }
}

/// The `ORIGINS` keys of `backends` as `frontend` reaches them: none
/// unless it is TCP.
pub fn keys_of<'a, I>(
    frontend: &ServiceKey,
    backends: I,
) -> impl Iterator<Item = ServiceKey> + use<'a, I>
where
    I: IntoIterator<Item = &'a Backend>,
{
    let (tcp, family) = (frontend.proto == PROTO_TCP, frontend.family);
    backends
        .into_iter()
        .filter(move |_| tcp)
        .map(move |b| key_of(b, family))
}

/// What `ORIGINS` holds, and which TCP frontends use each backend.
#[derive(Debug)]
pub struct Origins {
    of: HashMap<ServiceKey, RevNatValue>,
    users: HashMap<ServiceKey, u32>,
    unused_since: HashMap<ServiceKey, Instant>,
    /// `unused_since`'s entries in the order they were made (times never go
    /// back), so expiry looks only at the oldest; an entry a claim has
    /// since removed or a later release replaced is skipped there.
    queue: VecDeque<(Instant, ServiceKey)>,
    keep: Duration,
}

impl Origins {
    /// Starts from what the map holds (an earlier agent's origins stay as
    /// they are); every backend counts as unused until a frontend claims it.
    pub fn new(
        existing: impl IntoIterator<Item = (ServiceKey, RevNatValue)>,
        keep: Duration,
        now: Instant,
    ) -> Self {
        let of: HashMap<_, _> = existing.into_iter().collect();
        let unused_since = of.keys().map(|k| (*k, now)).collect();
        let queue = of.keys().map(|k| (now, *k)).collect();
        Self {
            of,
            users: HashMap::new(),
            unused_since,
            queue,
            keep,
        }
    }

    /// A TCP frontend `frontend` now uses the backend `key`. Returns the
    /// entry to write first when the backend has no origin yet; the caller
    /// reports a write that succeeded with [`Origins::set`].
    pub fn claim(
        &mut self,
        key: ServiceKey,
        frontend: &ServiceKey,
    ) -> Option<(ServiceKey, RevNatValue)> {
        *self.users.entry(key).or_default() += 1;
        self.unused_since.remove(&key);
        if self.of.contains_key(&key) {
            return None;
        }
        Some((
            key,
            RevNatValue {
                addr: frontend.addr,
                port: frontend.port,
                pad: [0; 6],
            },
        ))
    }

    /// The map now holds `value` for `key`.
    pub fn set(&mut self, key: ServiceKey, value: RevNatValue) {
        self.of.insert(key, value);
    }

    /// A TCP frontend no longer uses the backend `key`.
    pub fn release(&mut self, key: ServiceKey, now: Instant) {
        let Some(n) = self.users.get_mut(&key) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.users.remove(&key);
            if self.of.contains_key(&key) {
                self.unused_since.insert(key, now);
                self.queue.push_back((now, key));
            }
        }
    }

    /// Origins unused for longer than `keep`, forgotten here; the caller
    /// deletes them from the map. Runs after every sync, so it looks only
    /// at the entries old enough to be due.
    pub fn expired(&mut self, now: Instant) -> Vec<ServiceKey> {
        let mut gone = Vec::new();
        while let Some(&(since, key)) = self.queue.front() {
            if now.saturating_duration_since(since) < self.keep {
                break;
            }
            self.queue.pop_front();
            if self.unused_since.get(&key) == Some(&since) {
                self.unused_since.remove(&key);
                self.of.remove(&key);
                gone.push(key);
            }
        }
        gone
    }

    /// The origin of `key`, if it has one.
    pub fn get(&self, key: &ServiceKey) -> Option<&RevNatValue> {
        self.of.get(key)
    }

    /// Whether the TCP frontend `frontend` is `backend`'s origin, so its
    /// connects to it need no socket record.
    pub fn is_origin(&self, frontend: &ServiceKey, backend: &Backend) -> bool {
        frontend.proto == PROTO_TCP
            && self
                .get(&key_of(backend, frontend.family))
                .is_some_and(|o| o.addr == frontend.addr && o.port == frontend.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_ebpf_common::FAMILY_V4;

    fn backend(last: u8) -> Backend {
        Backend {
            addr: [u32::from_ne_bytes([10, 0, 0, last]), 0, 0, 0],
            port: 8080u16.to_be(),
            family: FAMILY_V4,
            pad: 0,
        }
    }

    fn frontend(last: u8) -> ServiceKey {
        ServiceKey {
            addr: [u32::from_ne_bytes([10, 96, 0, last]), 0, 0, 0],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        }
    }

    #[test]
    fn the_first_frontend_becomes_the_origin_and_later_ones_do_not_move_it() {
        let now = Instant::now();
        let mut o = Origins::new([], KEEP, now);
        let k = key_of(&backend(1), FAMILY_V4);
        let (key, v) = o
            .claim(k, &frontend(1))
            .expect("a new backend gets an origin");
        assert_eq!(
            (key, v.addr, v.port),
            (k, frontend(1).addr, frontend(1).port)
        );
        o.set(key, v);
        assert_eq!(
            o.claim(k, &frontend(2)),
            None,
            "a second frontend writes nothing"
        );
        assert_eq!(o.get(&k).map(|v| v.addr), Some(frontend(1).addr));
        assert!(o.is_origin(&frontend(1), &backend(1)));
        assert!(!o.is_origin(&frontend(2), &backend(1)));
    }

    #[test]
    fn only_tcp_frontends_key_their_backends() {
        let b = [backend(1), backend(2)];
        let keys: Vec<_> = keys_of(&frontend(1), &b).collect();
        assert_eq!(keys, [key_of(&b[0], FAMILY_V4), key_of(&b[1], FAMILY_V4)]);
        let udp = ServiceKey {
            proto: skiff_ebpf_common::PROTO_UDP,
            ..frontend(1)
        };
        assert_eq!(keys_of(&udp, &b).count(), 0);
    }

    #[test]
    fn a_failed_write_is_tried_again_by_the_next_claim() {
        let now = Instant::now();
        let mut o = Origins::new([], KEEP, now);
        let k = key_of(&backend(1), FAMILY_V4);
        assert!(o.claim(k, &frontend(1)).is_some());
        // Not set: the map refused it (full).
        assert!(o.claim(k, &frontend(2)).is_some());
        assert_eq!(o.get(&k), None);
    }

    #[test]
    fn an_origin_outlives_its_last_frontend_by_keep_and_a_return_keeps_it() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(60);
        let mut o = Origins::new([], keep, t0);
        let k = key_of(&backend(1), FAMILY_V4);
        let (key, v) = o.claim(k, &frontend(1)).expect("new");
        o.set(key, v);
        o.claim(k, &frontend(2));
        o.release(k, t0);
        assert!(
            o.expired(t0 + keep * 2).is_empty(),
            "one frontend still uses it"
        );
        o.release(k, t0 + keep);
        assert!(
            o.expired(t0 + keep + keep / 2).is_empty(),
            "kept for `keep`"
        );
        // Back before it expired: the same origin, and the clock stops.
        assert_eq!(o.claim(k, &frontend(3)), None);
        assert!(o.expired(t0 + keep * 10).is_empty());
        o.release(k, t0 + keep * 10);
        assert_eq!(o.expired(t0 + keep * 11), vec![k]);
        assert_eq!(o.get(&k), None);
        let (_, v) = o.claim(k, &frontend(3)).expect("expired: a new origin");
        assert_eq!(v.addr, frontend(3).addr);
    }

    #[test]
    fn origins_an_earlier_agent_left_stay_until_unused_for_keep() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(60);
        let k1 = key_of(&backend(1), FAMILY_V4);
        let k2 = key_of(&backend(2), FAMILY_V4);
        let old = |f: ServiceKey| RevNatValue {
            addr: f.addr,
            port: f.port,
            pad: [0; 6],
        };
        let mut o = Origins::new([(k1, old(frontend(1))), (k2, old(frontend(2)))], keep, t0);
        // Still served through another frontend: the earlier origin stays.
        assert_eq!(o.claim(k1, &frontend(9)), None);
        assert_eq!(o.get(&k1).map(|v| v.addr), Some(frontend(1).addr));
        assert_eq!(o.expired(t0 + keep), vec![k2]);
    }
}
