//! Answers from upstream, kept for their TTL.
//!
//! - Positive answers live for their smallest TTL (at most
//!   [`CacheConfig::max_ttl`]), negative ones (NXDOMAIN, NODATA) for the
//!   SOA's minimum or TTL, whichever is smaller (RFC 2308), at most
//!   [`CacheConfig::max_negative_ttl`]; SERVFAIL, REFUSED and truncated
//!   answers are not kept.
//! - Served records count their TTL down from when they were stored.
//! - An entry asked for in the last tenth of its life is reported as due
//!   for a refresh (prefetch), once, so popular names never expire.
//! - An expired entry is kept for [`CacheConfig::stale`] and served (with
//!   TTL [`STALE_TTL`], RFC 8767) when upstream does not answer.
//! - At most [`CacheConfig::capacity`] entries: a full cache drops expired
//!   entries first, then the oldest.
//!
//! - Entries are kept encoded (a decoded record is a few hundred bytes,
//!   its wire form tens), and decoded when served.
//!
//! Pure: the caller passes the time, so every rule is tested without
//! waiting.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// TTL of records served stale.
pub const STALE_TTL: u32 = 30;

#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    pub capacity: usize,
    pub max_ttl: u32,
    pub max_negative_ttl: u32,
    /// How long an expired entry may still be served when upstream fails.
    pub stale: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_ttl: 3600,
            max_negative_ttl: 1800,
            stale: Duration::from_secs(3600),
        }
    }
}

/// A question: its name in lower case and its type.
pub type Key = (Name, RecordType);

pub fn key(name: &Name, qtype: RecordType) -> Key {
    let mut n = name.to_lowercase();
    n.set_fqdn(true);
    (n, qtype)
}

/// An upstream answer: its rcode and records.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
}

impl Entry {
    /// The answer in `reply`, its records as they are.
    pub fn from_reply(reply: &Message) -> Self {
        Self {
            rcode: reply.metadata.response_code,
            answers: reply.answers.clone(),
            authorities: reply.authorities.clone(),
        }
    }

    /// The answer in `reply` in wire form (a message holding only it).
    fn encode(reply: &Message) -> Option<Box<[u8]>> {
        let mut m = Message::response(0, reply.metadata.op_code);
        m.metadata.response_code = reply.metadata.response_code;
        m.answers.clone_from(&reply.answers);
        m.authorities.clone_from(&reply.authorities);
        m.to_vec().ok().map(Vec::into_boxed_slice)
    }

    fn decode(wire: &[u8]) -> Option<Self> {
        Message::from_vec(wire).ok().map(|m| Self::from_reply(&m))
    }
}

/// Where an entry is kept: the question's type and name in one string,
/// shared by the map and the queue of insertions.
type Slot = std::sync::Arc<str>;

fn slot((name, qtype): &Key) -> String {
    format!("{} {}", u16::from(*qtype), name.to_ascii())
}

/// An answer kept, with when and for how long.
#[derive(Clone, Debug)]
struct Kept {
    wire: Box<[u8]>,
    stored: Instant,
    ttl: u32,
    prefetched: bool,
}

/// What the cache has for a question.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Live: serve it. `refresh` is set once, late in its life. `steady`
    /// is how much longer it stays live with no refresh due (0 when one
    /// is due or done), so what is served from it may be served as it is
    /// (its TTLs counted down) for that long.
    Fresh {
        entry: Entry,
        refresh: bool,
        steady: Duration,
    },
    /// Expired but within the stale window: serve only if upstream fails.
    Stale(Entry),
    Miss,
}

pub struct Cache {
    cfg: CacheConfig,
    entries: HashMap<Slot, Kept>,
    /// Slots in the order they were stored (with repeats of re-stored
    /// slots; an old position whose entry was re-stored since is skipped).
    order: VecDeque<(Slot, Instant)>,
}

impl Cache {
    pub fn new(cfg: CacheConfig) -> Self {
        Self {
            cfg,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How long `reply` may be kept, if at all.
    fn ttl_of(&self, reply: &Message) -> Option<u32> {
        if reply.metadata.truncation {
            return None;
        }
        match reply.metadata.response_code {
            ResponseCode::NoError if !reply.answers.is_empty() => reply
                .answers
                .iter()
                .map(|r| r.ttl)
                .min()
                .map(|t| t.min(self.cfg.max_ttl)),
            ResponseCode::NoError | ResponseCode::NXDomain => {
                let soa = reply.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                    _ => None,
                });
                // Without an SOA a negative answer is not cached (RFC
                // 2308 section 5).
                soa.map(|t| t.min(self.cfg.max_negative_ttl))
            }
            _ => None,
        }
    }

    /// Keeps `reply` to `key` if it may be kept.
    pub fn store(&mut self, key: Key, reply: &Message, now: Instant) {
        let Some(ttl) = self.ttl_of(reply).filter(|t| *t > 0) else {
            return;
        };
        let Some(wire) = Entry::encode(reply) else {
            return;
        };
        let key: Slot = slot(&key).into();
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cfg.capacity {
            self.make_room(now);
        }
        self.order.push_back((key.clone(), now));
        self.entries.insert(
            key,
            Kept {
                wire,
                stored: now,
                ttl,
                prefetched: false,
            },
        );
        // Positions of re-stored keys pile up; keep the queue near the map.
        if self.order.len() > 2 * self.cfg.capacity.max(16) {
            let entries = &self.entries;
            self.order
                .retain(|(k, at)| entries.get(k).is_some_and(|e| e.stored == *at));
        }
    }

    fn make_room(&mut self, now: Instant) {
        let before = self.entries.len();
        let stale = self.cfg.stale;
        self.entries
            .retain(|_, e| now < e.stored + Duration::from_secs(e.ttl.into()) + stale);
        if self.entries.len() < before {
            return;
        }
        while let Some((k, at)) = self.order.pop_front() {
            if self.entries.get(&k).is_some_and(|e| e.stored == at) {
                self.entries.remove(&k);
                return;
            }
        }
    }

    pub fn lookup(&mut self, key: &Key, now: Instant) -> Lookup {
        let stale = self.cfg.stale;
        let key = slot(key);
        let Some(e) = self.entries.get_mut(key.as_str()) else {
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(e.stored);
        let life = Duration::from_secs(e.ttl.into());
        if age < life {
            let prefetches = !e.prefetched && e.ttl >= 10;
            let refresh = prefetches && age * 10 >= life * 9;
            if refresh {
                e.prefetched = true;
            }
            let steady = match (prefetches, e.prefetched) {
                (true, _) => (life * 9 / 10).saturating_sub(age),
                (false, false) => life - age,
                (false, true) => Duration::ZERO,
            };
            let elapsed = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
            if let Some(entry) = aged(e, |t| t.saturating_sub(elapsed)) {
                return Lookup::Fresh {
                    entry,
                    refresh,
                    steady,
                };
            }
        } else if age < life + stale
            && let Some(entry) = aged(e, |t| t.min(STALE_TTL))
        {
            return Lookup::Stale(entry);
        }
        self.entries.remove(key.as_str());
        Lookup::Miss
    }
}

/// The entry `e` keeps, every record's TTL mapped by `f` (the SOA of a
/// negative answer too).
fn aged(e: &Kept, f: impl Fn(u32) -> u32) -> Option<Entry> {
    let mut out = Entry::decode(&e.wire)?;
    for r in out.answers.iter_mut().chain(out.authorities.iter_mut()) {
        r.ttl = f(r.ttl);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn answer(ttls: &[u32]) -> Message {
        let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
        for (i, t) in ttls.iter().enumerate() {
            let ip = std::net::Ipv4Addr::new(192, 0, 2, u8::try_from(i).unwrap_or(0));
            m.add_answer(Record::from_rdata(
                name("www.example.com."),
                *t,
                RData::A(A(ip)),
            ));
        }
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
        m.metadata.response_code = rcode;
        m.authorities.push(Record::from_rdata(
            name("example.com."),
            soa_ttl,
            RData::SOA(SOA::new(
                name("ns.example.com."),
                name("h.example.com."),
                1,
                1,
                1,
                1,
                minimum,
            )),
        ));
        m
    }

    fn cache() -> Cache {
        Cache::new(CacheConfig {
            capacity: 3,
            max_ttl: 300,
            max_negative_ttl: 60,
            stale: Duration::from_secs(100),
        })
    }

    fn fresh(l: Lookup) -> (Entry, bool) {
        match l {
            Lookup::Fresh { entry, refresh, .. } => (entry, refresh),
            other => panic!("not fresh: {other:?}"),
        }
    }

    #[test]
    fn answers_live_for_their_smallest_ttl_counted_down_then_go_stale_then_go() {
        let t0 = Instant::now();
        let mut c = cache();
        let k = key(&name("WWW.Example.com."), RecordType::A);
        c.store(k.clone(), &answer(&[40, 100]), t0);
        let (e, refresh) = fresh(c.lookup(
            &key(&name("www.example.com."), RecordType::A),
            t0 + Duration::from_secs(10),
        ));
        assert_eq!(
            e.answers.iter().map(|r| r.ttl).collect::<Vec<_>>(),
            [30, 90]
        );
        assert!(!refresh);
        // Served as it is until the refresh is due (at 36 of its 40 s).
        let steady = |l: Lookup| match l {
            Lookup::Fresh { steady, .. } => steady,
            other => panic!("not fresh: {other:?}"),
        };
        assert_eq!(
            steady(c.lookup(&k, t0 + Duration::from_secs(10))),
            Duration::from_secs(26)
        );
        // Late in its life: due for a refresh, once.
        assert!(fresh(c.lookup(&k, t0 + Duration::from_secs(37))).1);
        assert!(!fresh(c.lookup(&k, t0 + Duration::from_secs(38))).1);
        assert_eq!(
            steady(c.lookup(&k, t0 + Duration::from_secs(38))),
            Duration::ZERO
        );
        match c.lookup(&k, t0 + Duration::from_secs(41)) {
            Lookup::Stale(e) => assert!(e.answers.iter().all(|r| r.ttl <= STALE_TTL)),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.lookup(&k, t0 + Duration::from_secs(141)), Lookup::Miss);
        assert!(c.is_empty());
        // TTLs past the cap are capped.
        c.store(k.clone(), &answer(&[86_400]), t0);
        assert!(matches!(
            c.lookup(&k, t0 + Duration::from_secs(301)),
            Lookup::Stale(_)
        ));
    }

    #[test]
    fn negative_answers_live_for_the_soa_minimum_and_failures_not_at_all() {
        let t0 = Instant::now();
        let mut c = cache();
        let nx = key(&name("nope.example.com."), RecordType::A);
        c.store(nx.clone(), &negative(ResponseCode::NXDomain, 3600, 20), t0);
        let (e, _) = fresh(c.lookup(&nx, t0 + Duration::from_secs(19)));
        assert_eq!(e.rcode, ResponseCode::NXDomain);
        assert!(matches!(
            c.lookup(&nx, t0 + Duration::from_secs(21)),
            Lookup::Stale(_)
        ));
        let nodata = key(&name("www.example.com."), RecordType::AAAA);
        c.store(
            nodata.clone(),
            &negative(ResponseCode::NoError, 10, 900),
            t0,
        );
        assert!(matches!(
            c.lookup(&nodata, t0 + Duration::from_secs(9)),
            Lookup::Fresh { .. }
        ));
        assert!(matches!(
            c.lookup(&nodata, t0 + Duration::from_secs(11)),
            Lookup::Stale(_)
        ));
        let fail = key(&name("x.example.com."), RecordType::A);
        let mut m = answer(&[]);
        m.metadata.response_code = ResponseCode::ServFail;
        c.store(fail.clone(), &m, t0);
        let mut tc = answer(&[60]);
        tc.metadata.truncation = true;
        c.store(fail.clone(), &tc, t0);
        // NODATA without an SOA says nothing of how long it holds.
        c.store(fail.clone(), &answer(&[]), t0);
        assert_eq!(c.lookup(&fail, t0), Lookup::Miss);
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_the_oldest() {
        let t0 = Instant::now();
        let mut c = cache();
        let k = |s: &str| key(&name(s), RecordType::A);
        c.store(k("a.example."), &answer(&[300]), t0);
        c.store(k("b.example."), &answer(&[1]), t0);
        c.store(k("c.example."), &answer(&[300]), t0);
        // b is past its TTL and its stale window at t0 + 200 s.
        c.store(
            k("d.example."),
            &answer(&[300]),
            t0 + Duration::from_secs(200),
        );
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.lookup(&k("b.example."), t0 + Duration::from_secs(200)),
            Lookup::Miss
        );
        // Nothing expired: the oldest (a) goes.
        c.store(
            k("e.example."),
            &answer(&[300]),
            t0 + Duration::from_secs(201),
        );
        assert_eq!(c.len(), 3);
        assert_eq!(
            c.lookup(&k("a.example."), t0 + Duration::from_secs(201)),
            Lookup::Miss
        );
        assert!(matches!(
            c.lookup(&k("c.example."), t0 + Duration::from_secs(201)),
            Lookup::Fresh { .. }
        ));
        // Many re-stores of one key keep the bookkeeping bounded.
        for i in 0..1000 {
            c.store(
                k("c.example."),
                &answer(&[300]),
                t0 + Duration::from_secs(201 + i),
            );
        }
        assert!(c.order.len() <= 2 * 16 + 1);
    }
}
