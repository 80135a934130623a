//! Replies kept encoded, ready to send (pure): a question asked
//! again is answered by copying bytes, without parsing it into a message
//! or encoding a reply. Most of a node's questions are the same few names
//! asked over and over (and the same search-path misses), so this is the
//! server's hot path; whatever it does not recognise goes the full way.
//!
//! A question qualifies when its header is a plain query (QUERY, one
//! question, no answer or authority records), its name is uncompressed
//! labels, its class IN, and it has either no additional record or one
//! EDNS(0) OPT record with no options. The key is the name in lower case,
//! the type and whether EDNS was asked; what differs between two askers
//! of one key (ID, RD and CD flags, the question's spelling) is copied
//! from the question into the stored reply.
//!
//! Entries are made from the zone's answers and from upstream answers
//! served out of the cache. The latter are kept only while the cache
//! would serve them as they are (before a prefetch is due) and have their
//! TTLs counted down as they are sent. All are dropped at once whenever
//! the zone changes ([`Ready::clear`] with the zone's new SOA serial; an
//! answer worked out on an older serial is refused): a name the zone
//! takes over (a ClusterIP's PTR, say) stops being upstream's at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bytes the stored replies take (with their keys and bookkeeping) at
/// most; past that the store starts afresh, so a flood of distinct names
/// cannot grow it. About 15 000 cluster-name answers fit.
pub const MAX_BYTES: usize = 2 << 20;

/// What an entry takes beside its own bytes: its slot in the map (24
/// bytes, at the map's usual load, with its control byte) and the
/// allocator's header and rounding.
const ENTRY_OVERHEAD: usize = 56;

/// The longest key: a 255-byte name, the type and the EDNS flag.
const KEY_MAX: usize = 255 + 3;

/// A question read from the wire as far as a stored reply needs.
#[derive(Clone)]
pub struct Question {
    key: [u8; KEY_MAX],
    key_len: usize,
    /// Bytes of the question section (name, type, class) from offset 12.
    section: usize,
    /// The largest reply the asker takes over UDP (512 without EDNS).
    pub udp_limit: usize,
}

const HEADER: usize = 12;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

impl Question {
    /// The question in `packet` when it qualifies (see the module's
    /// description); None sends it the full way. `udp_payload` is ours.
    pub fn parse(packet: &[u8], udp_payload: u16) -> Option<Self> {
        let flags = *packet.get(2)?;
        // A response, or an opcode other than QUERY.
        if flags & 0x80 != 0 || (flags >> 3) & 0x0f != 0 {
            return None;
        }
        let counts = [
            u16_at(packet, 4)?,
            u16_at(packet, 6)?,
            u16_at(packet, 8)?,
            u16_at(packet, 10)?,
        ];
        if counts[0] != 1 || counts[1] != 0 || counts[2] != 0 || counts[3] > 1 {
            return None;
        }
        let mut key = [0u8; KEY_MAX];
        let mut at = HEADER;
        loop {
            let len = usize::from(*packet.get(at)?);
            // A compression pointer or a reserved label type.
            if len > 63 {
                return None;
            }
            let label = packet.get(at..at + 1 + len)?;
            let name_len = at + 1 + len - HEADER;
            if name_len > 255 {
                return None;
            }
            for (k, b) in key[at - HEADER..].iter_mut().zip(label) {
                *k = b.to_ascii_lowercase();
            }
            at += 1 + len;
            if len == 0 {
                break;
            }
        }
        let name_len = at - HEADER;
        let qtype = u16_at(packet, at)?;
        if u16_at(packet, at + 2)? != CLASS_IN {
            return None;
        }
        let section = name_len + 4;
        at += 4;
        let edns = match counts[3] {
            0 if at == packet.len() => None,
            // Root name, OPT, payload, extended rcode, version 0, flags,
            // no options, and nothing after it.
            1 if packet.len() == at + 11
                && packet[at] == 0
                && u16_at(packet, at + 1)? == TYPE_OPT
                && packet[at + 6] == 0
                && u16_at(packet, at + 9)? == 0 =>
            {
                u16_at(packet, at + 3)
            }
            _ => return None,
        };
        key[name_len..name_len + 2].copy_from_slice(&qtype.to_be_bytes());
        key[name_len + 2] = u8::from(edns.is_some());
        let udp_limit = edns.map_or(512, |p| p.clamp(512, udp_payload));
        Some(Self {
            key,
            key_len: name_len + 3,
            section,
            udp_limit: usize::from(udp_limit),
        })
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// Encoded replies by question, for one serial of the zone.
pub struct Ready {
    serial: u32,
    replies: HashMap<Stored, Option<Box<Aging>>>,
    bytes: usize,
}

/// A key and its reply in one allocation: the key's length (2 bytes), the
/// key, then the reply without its question section. The question is the
/// asker's own when it is served (the same length as the key's name, so
/// the reply's compression pointers still point at it).
struct Stored(Box<[u8]>);

impl Stored {
    fn new(key: &[u8], reply: &[u8], section: usize) -> Self {
        let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
        let mut b = Vec::with_capacity(2 + key.len() + reply.len() - section);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&reply[..HEADER]);
        b.extend_from_slice(&reply[HEADER + section..]);
        Self(b.into_boxed_slice())
    }

    fn key_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.0[0], self.0[1]]))
    }

    fn key(&self) -> &[u8] {
        &self.0[2..2 + self.key_len()]
    }

    /// The reply's header and what follows its question.
    fn rest(&self) -> &[u8] {
        &self.0[2 + self.key_len()..]
    }
}

// Looked up by the key alone: equality and hash are the key's, as
// `Borrow` requires.
impl std::borrow::Borrow<[u8]> for Stored {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

impl std::hash::Hash for Stored {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Stored {}

/// The bytes an entry takes.
fn size_of(stored: &Stored, aging: Option<&Aging>) -> usize {
    let aging = aging.map_or(0, |a| {
        std::mem::size_of::<Aging>() + std::mem::size_of_val(&*a.ttls)
    });
    stored.0.len() + aging + ENTRY_OVERHEAD
}

struct Aging {
    stored: Instant,
    /// Served from here until then.
    until: Instant,
    /// Each record's TTL: where in the reply, and its value when stored.
    ttls: Box<[(usize, u32)]>,
}

/// Where the TTL of each answer and authority record of `reply` is, and
/// its value; None when the reply does not read as one.
fn ttl_fields(reply: &[u8]) -> Option<Vec<(usize, u32)>> {
    fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
        loop {
            let len = *b.get(at)?;
            match len {
                0 => return Some(at + 1),
                l if l & 0xc0 == 0xc0 => return Some(at + 2),
                l if l > 63 => return None,
                l => at += 1 + usize::from(l),
            }
        }
    }
    let (qd, an, ns) = (u16_at(reply, 4)?, u16_at(reply, 6)?, u16_at(reply, 8)?);
    let mut at = HEADER;
    for _ in 0..qd {
        at = skip_name(reply, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..u32::from(an) + u32::from(ns) {
        at = skip_name(reply, at)?;
        let ttl = u32::from_be_bytes(reply.get(at + 4..at + 8)?.try_into().ok()?);
        out.push((at + 4, ttl));
        at += 10 + usize::from(u16_at(reply, at + 8)?);
    }
    (at <= reply.len()).then_some(out)
}

impl Ready {
    /// An empty store for the zone at `serial`.
    pub fn new(serial: u32) -> Self {
        Self {
            serial,
            replies: HashMap::new(),
            bytes: 0,
        }
    }

    /// The stored reply to `q` made the asker's own into `out` (its ID,
    /// RD and CD flags and question spelling), if there is one that fits
    /// in `limit` bytes.
    pub fn answer(&self, packet: &[u8], q: &Question, limit: usize, out: &mut Vec<u8>) -> bool {
        let Some((stored, aging)) = self.replies.get_key_value(q.key()) else {
            return false;
        };
        let rest = stored.rest();
        if rest.len() + q.section > limit {
            return false;
        }
        let now = aging.as_ref().map(|_| Instant::now());
        if let (Some(a), Some(now)) = (aging, now)
            && now >= a.until
        {
            return false;
        }
        out.clear();
        out.extend_from_slice(&rest[..HEADER]);
        out.extend_from_slice(&packet[HEADER..HEADER + q.section]);
        out.extend_from_slice(&rest[HEADER..]);
        if let (Some(a), Some(now)) = (aging, now) {
            let elapsed = u32::try_from(now.duration_since(a.stored).as_secs()).unwrap_or(u32::MAX);
            for (at, ttl) in a.ttls.iter() {
                out[*at..*at + 4].copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
            }
        }
        out[..2].copy_from_slice(&packet[..2]);
        // RD is the low bit of byte 2, CD bit 4 of byte 3.
        out[2] = (out[2] & !0x01) | (packet[2] & 0x01);
        out[3] = (out[3] & !0x10) | (packet[3] & 0x10);
        true
    }

    /// Keeps `reply`, the zone's answer to `q` worked out at the zone's
    /// `serial`: refused when the zone has changed since, or when the
    /// reply was truncated.
    pub fn keep(&mut self, q: &Question, serial: u32, reply: &[u8]) {
        self.put(q, serial, reply, None);
    }

    /// Keeps `reply`, an upstream answer to `q` the cache serves as it is
    /// for `steady` more (counting its TTLs down), sent upstream at the
    /// zone's `serial`.
    pub fn keep_for(&mut self, q: &Question, serial: u32, reply: &[u8], steady: Duration) {
        if steady < Duration::from_secs(1) {
            return;
        }
        let Some(ttls) = ttl_fields(reply) else {
            return;
        };
        let stored = Instant::now();
        let aging = Aging {
            stored,
            until: stored + steady,
            ttls: ttls.into(),
        };
        self.put(q, serial, reply, Some(Box::new(aging)));
    }

    fn put(&mut self, q: &Question, serial: u32, reply: &[u8], aging: Option<Box<Aging>>) {
        if serial != self.serial || reply.get(2).is_none_or(|f| f & 0x02 != 0) {
            return;
        }
        if reply.len() < HEADER + q.section {
            return;
        }
        let stored = Stored::new(q.key(), reply, q.section);
        let size = size_of(&stored, aging.as_deref());
        if self.bytes + size > MAX_BYTES {
            self.replies.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some((old, old_aging)) = self.replies.remove_entry(q.key()) {
            self.bytes -= size_of(&old, old_aging.as_deref());
        }
        self.replies.insert(stored, aging);
    }

    /// The zone changed (to `serial`): every stored reply goes.
    pub fn clear(&mut self, serial: u32) {
        self.serial = serial;
        self.replies.clear();
        self.replies.shrink_to(0);
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    /// A question on the wire, as a client's resolver sends it.
    pub(crate) fn ask(name: &str, t: RecordType, id: u16, rd: bool, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = rd;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    #[test]
    fn the_key_ignores_case_id_and_flags_but_not_type_or_edns() {
        let a = Question::parse(
            &ask(
                "Web.Default.svc.cluster.local.",
                RecordType::A,
                1,
                true,
                None,
            ),
            1232,
        )
        .expect("qualifies");
        let b = Question::parse(
            &ask(
                "web.default.svc.cluster.local.",
                RecordType::A,
                9,
                false,
                None,
            ),
            1232,
        )
        .expect("qualifies");
        assert_eq!(a.key(), b.key());
        assert_eq!(a.udp_limit, 512);
        let aaaa = Question::parse(
            &ask(
                "web.default.svc.cluster.local.",
                RecordType::AAAA,
                1,
                true,
                None,
            ),
            1232,
        )
        .expect("qualifies");
        assert_ne!(a.key(), aaaa.key());
        let edns = Question::parse(
            &ask(
                "web.default.svc.cluster.local.",
                RecordType::A,
                1,
                true,
                Some(4096),
            ),
            1232,
        )
        .expect("qualifies");
        assert_ne!(a.key(), edns.key());
        assert_eq!(edns.udp_limit, 1232);
    }

    #[test]
    fn only_plain_queries_qualify() {
        let plain = ask(
            "web.default.svc.cluster.local.",
            RecordType::A,
            1,
            true,
            None,
        );
        // A response.
        let mut response = plain.clone();
        response[2] |= 0x80;
        // Another opcode (NOTIFY).
        let mut notify = plain.clone();
        notify[2] |= 4 << 3;
        // Two questions.
        let mut two = plain.clone();
        two[5] = 2;
        // Class CH.
        let mut chaos = plain.clone();
        let n = chaos.len();
        chaos[n - 1] = 3;
        // A compressed name.
        let mut pointer = plain[..12].to_vec();
        pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        // Trailing bytes, and cut short.
        let mut trailing = plain.clone();
        trailing.push(0);
        let short = &plain[..plain.len() - 1];
        // An EDNS option (a cookie, say) goes the full way too.
        let mut option = ask(
            "web.default.svc.cluster.local.",
            RecordType::A,
            1,
            true,
            Some(1232),
        );
        let n = option.len();
        option[n - 1] = 4;
        option.extend_from_slice(&[0, 10, 0, 0]);
        for (what, p) in [
            ("response", &response[..]),
            ("notify", &notify),
            ("two", &two),
            ("chaos", &chaos),
            ("pointer", &pointer),
            ("trailing", &trailing),
            ("short", short),
            ("option", &option),
        ] {
            assert!(Question::parse(p, 1232).is_none(), "{what}");
        }
        assert!(Question::parse(&plain, 1232).is_some());
    }

    #[test]
    fn a_stored_reply_is_the_askers_own_and_goes_with_the_serial() {
        let first = ask(
            "web.default.svc.cluster.local.",
            RecordType::A,
            7,
            true,
            None,
        );
        let q = Question::parse(&first, 1232).expect("qualifies");
        let mut reply = Message::from_vec(&first).expect("parse");
        reply.metadata.message_type = hickory_proto::op::MessageType::Response;
        reply.metadata.authoritative = true;
        let reply = reply.to_vec().expect("encode");
        let mut ready = Ready::new(0);
        ready.clear(3);
        // Worked out on an older zone: refused.
        ready.keep(&q, 2, &reply);
        assert!(ready.is_empty());
        ready.keep(&q, 3, &reply);
        assert_eq!(ready.len(), 1);

        let again = ask(
            "WEB.default.svc.cluster.local.",
            RecordType::A,
            0xbeef,
            false,
            None,
        );
        let q2 = Question::parse(&again, 1232).expect("qualifies");
        let mut out = Vec::new();
        assert!(ready.answer(&again, &q2, 512, &mut out));
        let got = Message::from_vec(&out).expect("parse");
        assert_eq!(got.metadata.id, 0xbeef);
        assert!(!got.metadata.recursion_desired);
        assert!(got.metadata.authoritative);
        assert_eq!(
            got.queries[0].name().to_ascii(),
            "WEB.default.svc.cluster.local."
        );
        // Too big for the asker: the full way.
        assert!(!ready.answer(&again, &q2, reply.len() - 1, &mut out));
        // The zone changed.
        ready.clear(4);
        assert!(!ready.answer(&again, &q2, 512, &mut out));
    }

    #[test]
    fn an_upstream_reply_counts_its_ttls_down_and_is_served_only_while_steady() {
        use hickory_proto::rr::{RData, Record, rdata::A};
        let p = ask("www.example.com.", RecordType::A, 5, true, Some(1232));
        let q = Question::parse(&p, 1232).expect("qualifies");
        let mut m = Message::from_vec(&p).expect("parse");
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        for (ttl, last) in [(100, 1), (300, 2)] {
            m.add_answer(Record::from_rdata(
                Name::from_ascii("www.example.com.").expect("name"),
                ttl,
                RData::A(A::new(192, 0, 2, last)),
            ));
        }
        let reply = m.to_vec().expect("encode");
        assert_eq!(
            ttl_fields(&reply).map(|f| f.iter().map(|(_, t)| *t).collect::<Vec<_>>()),
            Some(vec![100, 300])
        );
        let mut ready = Ready::new(0);
        // Not steady for a second: not kept.
        ready.keep_for(&q, 0, &reply, Duration::from_millis(500));
        assert!(ready.is_empty());
        ready.keep_for(&q, 0, &reply, Duration::from_secs(60));
        // Kept 5 s ago, as if.
        let now = Instant::now();
        if let Some(Some(a)) = ready.replies.values_mut().next() {
            a.stored = now - Duration::from_secs(5);
        }
        let mut out = Vec::new();
        assert!(ready.answer(&p, &q, 1232, &mut out));
        let got = Message::from_vec(&out).expect("parse");
        assert_eq!(
            got.answers.iter().map(|r| r.ttl).collect::<Vec<_>>(),
            [95, 295]
        );
        // The OPT record is left as it is.
        assert_eq!(got.edns.map(|e| e.max_payload()), Some(1232));
        // Past its steady time: the full way (the cache decides).
        if let Some(Some(a)) = ready.replies.values_mut().next() {
            a.until = now;
        }
        assert!(!ready.answer(&p, &q, 1232, &mut out));
    }

    #[test]
    fn truncated_replies_are_not_kept_and_the_store_is_bounded() {
        let mut ready = Ready::new(0);
        let p = ask("a.default.svc.cluster.local.", RecordType::A, 1, true, None);
        let q = Question::parse(&p, 1232).expect("qualifies");
        let mut tc = p.clone();
        tc[2] |= 0x82;
        ready.keep(&q, 0, &tc);
        assert!(ready.is_empty());
        let big = vec![0u8; 4096];
        for i in 0..(MAX_BYTES / 4096 + 10) {
            let p = ask(
                &format!("n{i}.default.svc.cluster.local."),
                RecordType::A,
                1,
                true,
                None,
            );
            let q = Question::parse(&p, 1232).expect("qualifies");
            ready.keep(&q, 0, &big);
            assert!(ready.bytes <= MAX_BYTES);
        }
        assert!(!ready.is_empty());
    }

    #[test]
    fn a_cluster_of_fifteen_thousand_names_fits() {
        use hickory_proto::rr::{RData, Record, rdata::A};
        let mut ready = Ready::new(0);
        let mut most = 0;
        for i in 0..20_000u32 {
            let name = format!("svc-{i}.default.svc.cluster.local.");
            let p = ask(&name, RecordType::A, 1, true, Some(1232));
            let q = Question::parse(&p, 1232).expect("qualifies");
            let mut m = Message::from_vec(&p).expect("parse");
            m.metadata.message_type = hickory_proto::op::MessageType::Response;
            m.add_answer(Record::from_rdata(
                Name::from_ascii(&name).expect("name"),
                30,
                RData::A(A::from(std::net::Ipv4Addr::from(0x0a60_0000 + i))),
            ));
            ready.keep(&q, 0, &m.to_vec().expect("encode"));
            most = most.max(ready.len());
            assert!(ready.bytes <= MAX_BYTES);
        }
        assert!(most >= 15_000, "{most} answers fit");
    }
}
