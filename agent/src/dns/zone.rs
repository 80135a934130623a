//! The cluster domain as the Kubernetes DNS specification lays it out,
//! built from Services and EndpointSlices, and the answer to one question.
//!
//! Pure logic, no sockets: [`records_of`] turns one Service (with its
//! slices) into owner names and record data; [`Zone`] keeps them by name,
//! replaced a Service at a time, and [`Zone::lookup`] answers a question
//! the way an authoritative server does: the records of that type, NODATA
//! (NOERROR, no answer) when the name exists with other records or only
//! has names below it, NXDOMAIN when it does not exist, with the zone's SOA
//! in the authority section of both negative answers.
//!
//! Pod names (`a-b-c-d.<ns>.pod.<zone>`) are answered for any address, as
//! the specification's deprecated record and CoreDNS's `pods insecure` do,
//! so they need no state. Reverse names are answered where a Service's
//! ClusterIP or a headless Service's endpoint has the address; others are
//! not this zone's and go upstream.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::view::{Kind, ServiceView, Slices};

/// The schema version of the Kubernetes DNS specification answered.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// How deep a CNAME chain inside the zone is followed.
const MAX_CHAIN: usize = 8;

#[derive(Debug, thiserror::Error)]
#[error("cluster domain {domain:?}: {reason}")]
pub struct BadDomain {
    domain: String,
    reason: String,
}

/// What one Service publishes: owner names (lower case, fully qualified)
/// with their data.
pub type ServiceRecords = Vec<(Name, RData)>;

/// The records of one Service in `apex`, per the specification.
/// `key` is the Service's `namespace/name`.
pub fn records_of(
    apex: &Name,
    key: &str,
    svc: &ServiceView,
    slices: Option<&Slices>,
) -> ServiceRecords {
    let Some((ns, name)) = key.split_once('/') else {
        return Vec::new();
    };
    let Ok(owner) = Name::from_ascii(format!("{name}.{ns}.svc"))
        .and_then(|n| n.append_domain(apex))
        .map(|n| n.to_lowercase())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let srv_owner = |port: &str, proto: &str| {
        Name::from_ascii(format!("_{port}._{proto}"))
            .and_then(|n| n.append_domain(&owner))
            .map(|n| n.to_lowercase())
            .ok()
    };
    let publish_all = match &svc.kind {
        Kind::ExternalName(target) => {
            if let Some(target) = Name::from_ascii(target.trim_end_matches('.'))
                .ok()
                .filter(|t| !t.is_root() && t.parse_arpa_name().is_err())
            {
                let mut target = target;
                target.set_fqdn(true);
                out.push((owner, RData::CNAME(CNAME(target))));
            }
            return out;
        }
        Kind::ClusterIp(ips) => {
            if ips.is_empty() {
                return out;
            }
            for ip in ips {
                out.push((owner.clone(), address(*ip)));
                out.push((Name::from(*ip), RData::PTR(PTR(owner.clone()))));
            }
            for p in &svc.ports {
                if let Some(n) = srv_owner(&p.name, p.proto) {
                    out.push((n, RData::SRV(SRV::new(0, 100, p.port, owner.clone()))));
                }
            }
            return out;
        }
        Kind::Headless { publish_not_ready } => *publish_not_ready,
    };
    // Headless: the endpoints themselves.
    let mut endpoints: BTreeMap<(String, IpAddr), BTreeMap<&str, u16>> = BTreeMap::new();
    for slice in slices.into_iter().flat_map(|m| m.values()) {
        for ep in &slice.endpoints {
            if !ep.ready && !publish_all {
                continue;
            }
            for ip in &ep.addresses {
                let host = ep
                    .hostname
                    .as_deref()
                    .map(str::to_ascii_lowercase)
                    .unwrap_or_else(|| dashed(*ip));
                endpoints
                    .entry((host, *ip))
                    .or_default()
                    .extend(slice.ports.iter().map(|(n, p)| (&**n, *p)));
            }
        }
    }
    let weight = u16::try_from(100 / endpoints.len().max(1))
        .unwrap_or(1)
        .max(1);
    for ((host, ip), ports) in &endpoints {
        let Ok(host_name) = Name::from_ascii(host)
            .and_then(|h| h.append_domain(&owner))
            .map(|n| n.to_lowercase())
        else {
            continue;
        };
        out.push((owner.clone(), address(*ip)));
        out.push((host_name.clone(), address(*ip)));
        out.push((Name::from(*ip), RData::PTR(PTR(host_name.clone()))));
        for p in &svc.ports {
            let number = ports.get(&*p.name).copied().unwrap_or(p.port);
            if let Some(n) = srv_owner(&p.name, p.proto) {
                out.push((
                    n,
                    RData::SRV(SRV::new(0, weight, number, host_name.clone())),
                ));
            }
        }
    }
    out
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// An address as one DNS label: `10-244-1-5`, `fd00--5`.
fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The address a pod label names, if it names one.
fn undashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// A name as the zone keeps it: lower case, fully qualified, in ASCII
/// (hickory's presentation form), shared by every record that names it.
type Key = Arc<str>;

/// The key of `name`.
fn key_of(name: &Name) -> String {
    let mut n = name.to_lowercase();
    n.set_fqdn(true);
    n.to_ascii()
}

/// Record data as the zone keeps it: names as shared keys, addresses
/// inline (a hickory `RData` is 184 bytes and each `Name` in it 80).
#[derive(Clone, Debug, PartialEq)]
enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Ptr(Key),
    Srv { weight: u16, port: u16, target: Key },
    Cname(Key),
    Other(Box<RData>),
}

impl Data {
    fn rdata(&self) -> Option<RData> {
        let name = |k: &Key| Name::from_ascii(&**k).ok();
        Some(match self {
            Self::A(ip) => RData::A(A(*ip)),
            Self::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            Self::Ptr(k) => RData::PTR(PTR(name(k)?)),
            Self::Srv {
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(0, *weight, *port, name(target)?)),
            Self::Cname(k) => RData::CNAME(CNAME(name(k)?)),
            Self::Other(d) => (**d).clone(),
        })
    }

    fn record_type(&self) -> RecordType {
        match self {
            Self::A(_) => RecordType::A,
            Self::Aaaa(_) => RecordType::AAAA,
            Self::Ptr(_) => RecordType::PTR,
            Self::Srv { .. } => RecordType::SRV,
            Self::Cname(_) => RecordType::CNAME,
            Self::Other(d) => d.record_type(),
        }
    }
}

/// A Service's place in the zone's table of them.
type Id = u32;

/// In `names`: more than one Service holds records at names of this hash;
/// `shared` lists them.
const SHARED: Id = Id::MAX;

/// What one Service publishes, kept in the zone's table of them.
struct Published {
    /// `namespace/name`.
    key: Arc<str>,
    /// Sorted by owner name.
    records: Box<[(Key, Data)]>,
}

/// A hasher for keys that are already keyed hashes ([`Zone::hash`]): it
/// takes a 64-bit one as it is, and spreads a 32-bit one over 64 bits (the
/// table reads the top bits too).
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByHash<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Prehashed>>;

/// The records of `recs` (sorted by name) at `key`.
fn at<'a>(recs: &'a [(Key, Data)], key: &str) -> &'a [(Key, Data)] {
    let start = recs.partition_point(|(k, _)| &**k < key);
    let len = recs[start..].partition_point(|(k, _)| &**k == key);
    &recs[start..start + len]
}

/// What a question gets.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The zone answers it.
    Answer(Answer),
    /// Not this zone's: ask upstream.
    Forward,
    /// A name in the zone is a CNAME to a name outside it: the answer so
    /// far, to be completed by asking upstream for `target`.
    Chase { partial: Answer, target: Name },
}

#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// The cluster domain's records by name.
pub struct Zone {
    apex: Name,
    ttl: u32,
    serial: u32,
    soa: Record,
    /// Owner names, by the low 32 bits of the [`Zone::hash`] of their
    /// [`key_of`] (so any spelling finds them), with the Service that holds
    /// their records. The text is kept once, in those records: a name found
    /// here is looked up there, by its text, so names that share a hash
    /// (among tens of thousands, some do) share only this entry, never
    /// their records.
    names: ByHash<u32, Id>,
    /// The Services of the names whose entry is [`SHARED`].
    shared: ByHash<u32, Box<[Id]>>,
    /// Every name inside the zone that has owner names below it, with how
    /// many: such a name exists (NODATA) even with no records of its own.
    /// By the whole 64-bit hash: a name that shared one with another would
    /// answer NODATA instead of NXDOMAIN.
    parents: ByHash<u64, u32>,
    /// The key of the hashes in `names` and `parents`, random per process.
    hash_key: std::collections::hash_map::RandomState,
    /// The Services with records, by [`Id`]; `None` is a free place.
    services: Vec<Option<Published>>,
    free: Vec<Id>,
    ids: HashMap<Arc<str>, Id>,
    pod_label: Name,
}

impl Zone {
    pub fn new(domain: &str, ttl: u32) -> Result<Self, BadDomain> {
        let bad = |reason: String| BadDomain {
            domain: domain.to_string(),
            reason,
        };
        let mut apex = Name::from_ascii(domain.trim_end_matches('.'))
            .map_err(|e| bad(e.to_string()))?
            .to_lowercase();
        apex.set_fqdn(true);
        if apex.is_root() {
            return Err(bad("the root cannot be the cluster domain".into()));
        }
        let under = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&apex))
                .map_err(|e| bad(e.to_string()))
        };
        let svc_label = under("svc")?;
        let pod_label = under("pod")?;
        let version = under("dns-version")?;
        let mut zone = Self {
            apex: apex.clone(),
            ttl,
            serial: 1,
            soa: Self::build_soa(&apex, ttl, 1),
            names: ByHash::default(),
            shared: ByHash::default(),
            parents: ByHash::default(),
            hash_key: std::collections::hash_map::RandomState::new(),
            services: Vec::new(),
            free: Vec::new(),
            ids: HashMap::new(),
            pod_label: pod_label.clone(),
        };
        let ns = under("ns.dns")?;
        let fixed: ServiceRecords = vec![
            (apex.clone(), RData::NS(NS(ns))),
            (
                version,
                RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
            ),
        ];
        zone.set_service("", fixed);
        // `svc.<zone>` and `pod.<zone>` exist even when empty.
        for n in [svc_label, pod_label] {
            let h = zone.hash(&key_of(&n));
            zone.parents.entry(h).or_insert(1);
        }
        Ok(zone)
    }

    pub fn apex(&self) -> &Name {
        &self.apex
    }

    /// The SOA serial: moves at every change of the zone's records.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Services the zone holds records for (by `namespace/name`).
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services
            .iter()
            .flatten()
            .map(|p| &*p.key)
            .filter(|k| !k.is_empty())
    }

    /// `records` as the zone keeps them, sorted by owner name, each name's
    /// text kept once.
    fn compact(records: ServiceRecords) -> Box<[(Key, Data)]> {
        let mut batch: HashMap<String, Key> = HashMap::new();
        let mut key = |n: &Name| {
            batch
                .entry(key_of(n))
                .or_insert_with_key(|k| Arc::from(k.as_str()))
                .clone()
        };
        let mut out: Vec<(Key, Data)> = records
            .into_iter()
            .map(|(name, data)| {
                let data = match data {
                    RData::A(a) => Data::A(a.0),
                    RData::AAAA(a) => Data::Aaaa(a.0),
                    RData::PTR(p) => Data::Ptr(key(&p.0)),
                    RData::SRV(srv) => Data::Srv {
                        weight: srv.weight,
                        port: srv.port,
                        target: key(&srv.target),
                    },
                    RData::CNAME(c) => Data::Cname(key(&c.0)),
                    other => Data::Other(Box::new(other)),
                };
                (key(&name), data)
            })
            .collect();
        // Stable: a name's records keep the order they were given in.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_boxed_slice()
    }

    /// Replaces what Service `key` publishes (nothing removes it).
    pub fn set_service(&mut self, key: &str, records: ServiceRecords) {
        let records = Self::compact(records);
        let id = self.ids.get(key).copied();
        let old = match id.and_then(|id| self.published_mut(id)) {
            Some(p) if *p.records == *records => return,
            Some(p) => std::mem::take(&mut p.records),
            None if records.is_empty() => return,
            None => Box::default(),
        };
        let id = id.unwrap_or_else(|| self.allocate(key));
        let names = |recs: &[(Key, Data)]| -> Vec<Key> {
            let mut v: Vec<Key> = recs.iter().map(|(n, _)| n.clone()).collect();
            v.dedup();
            v
        };
        let (old_names, new_names) = (names(&old), names(&records));
        for name in old_names
            .iter()
            .filter(|n| new_names.binary_search(n).is_err())
        {
            self.unpublish(name, id);
        }
        for name in new_names
            .iter()
            .filter(|n| old_names.binary_search(n).is_err())
        {
            self.publish(name, id);
        }
        if records.is_empty() {
            self.release(id);
        } else if let Some(p) = self.published_mut(id) {
            p.records = records;
        }
        self.serial = self.serial.wrapping_add(1).max(1);
        if let RData::SOA(soa) = &mut self.soa.data {
            soa.serial = self.serial;
        }
    }

    fn published_mut(&mut self, id: Id) -> Option<&mut Published> {
        self.services.get_mut(id as usize)?.as_mut()
    }

    /// A place for Service `key`, with no records yet.
    fn allocate(&mut self, key: &str) -> Id {
        let key: Arc<str> = Arc::from(key);
        let p = Some(Published {
            key: key.clone(),
            records: Box::default(),
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.services[id as usize] = p;
                id
            }
            None => {
                self.services.push(p);
                // A zone holds far fewer than 2^32 Services: each takes
                // over a hundred bytes.
                (self.services.len() - 1) as Id
            }
        };
        self.ids.insert(key, id);
        id
    }

    fn release(&mut self, id: Id) {
        if let Some(p) = self.services.get_mut(id as usize).and_then(Option::take) {
            self.ids.remove(&p.key);
            self.free.push(id);
        }
    }

    /// Lists Service `id` at `name`, and counts `name` in its parents (per
    /// Service, so that each [`Zone::unpublish`] takes back one count).
    fn publish(&mut self, name: &str, id: Id) {
        let h = self.hash(name) as u32;
        match self.names.get(&h).copied() {
            None => {
                self.names.insert(h, id);
            }
            Some(SHARED) => {
                let v = self.shared.entry(h).or_default();
                *v = v.iter().copied().chain([id]).collect();
            }
            Some(other) => {
                self.names.insert(h, SHARED);
                self.shared.insert(h, Box::new([other, id]));
            }
        }
        self.count_parents(name, true);
    }

    fn unpublish(&mut self, name: &str, id: Id) {
        let h = self.hash(name) as u32;
        match self.names.get(&h).copied() {
            Some(SHARED) => {
                let mut v = self.shared.remove(&h).unwrap_or_default().into_vec();
                if let Some(i) = v.iter().position(|s| *s == id) {
                    v.remove(i);
                }
                match *v {
                    [] => {
                        self.names.remove(&h);
                    }
                    [one] => {
                        self.names.insert(h, one);
                    }
                    _ => {
                        self.shared.insert(h, v.into_boxed_slice());
                    }
                }
            }
            Some(one) if one == id => {
                self.names.remove(&h);
            }
            _ => {}
        }
        self.count_parents(name, false);
    }

    /// The records at `key` (a [`key_of`]), of every Service holding some.
    fn records(&self, key: &str) -> impl Iterator<Item = &Data> {
        let h = self.hash(key) as u32;
        let ids: &[Id] = match self.names.get(&h) {
            None => &[],
            Some(&SHARED) => self.shared.get(&h).map_or(&[], |v| &**v),
            Some(id) => std::slice::from_ref(id),
        };
        ids.iter()
            .enumerate()
            // A Service listed twice (two of its names share the hash)
            // gives its records once.
            .filter(move |(i, id)| !ids[..*i].contains(id))
            .filter_map(|(_, id)| self.services.get(*id as usize)?.as_ref())
            .flat_map(move |p| at(&p.records, key).iter().map(|(_, d)| d))
    }

    /// A name's hash: SipHash with a random key, so two names share one
    /// only by chance, with no way for a client to aim at one. `parents`
    /// takes all 64 bits (two names share them about once in 2^64 per
    /// pair); `names` takes 32, where a shared hash costs only a second
    /// look.
    fn hash(&self, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hash_key.hash_one(key)
    }

    fn count_parents(&mut self, name: &str, add: bool) {
        let Ok(name) = Name::from_ascii(name) else {
            return;
        };
        if !self.apex.zone_of(&name) {
            return;
        }
        let mut n = name.base_name();
        while n.num_labels() > self.apex.num_labels() {
            let h = self.hash(&key_of(&n));
            if add {
                *self.parents.entry(h).or_default() += 1;
            } else if let Some(c) = self.parents.get_mut(&h) {
                *c -= 1;
                if *c == 0 {
                    self.parents.remove(&h);
                }
            }
            n = n.base_name();
        }
    }

    fn soa(&self) -> Record {
        self.soa.clone()
    }

    /// The zone's SOA at its current serial (kept built: every negative
    /// answer carries it).
    fn build_soa(apex: &Name, ttl: u32, serial: u32) -> Record {
        let under = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(apex))
                .unwrap_or_else(|_| apex.clone())
        };
        Record::from_rdata(
            apex.clone(),
            ttl,
            RData::SOA(SOA::new(
                under("ns.dns"),
                under("hostmaster"),
                serial,
                7200,
                1800,
                86_400,
                ttl,
            )),
        )
    }

    /// Whether `name` is inside the cluster domain.
    pub fn contains(&self, name: &Name) -> bool {
        self.apex.zone_of(name)
    }

    /// The answer to `qname`/`qtype` (class IN).
    pub fn lookup(&self, qname: &Name, qtype: RecordType) -> Outcome {
        let mut qname = qname.clone();
        qname.set_fqdn(true);
        let inside = self.contains(&qname);
        if !inside && self.records(&key_of(&qname)).next().is_none() {
            return Outcome::Forward;
        }
        let mut answer = Answer::default();
        let mut name = qname;
        for _ in 0..MAX_CHAIN {
            let records = self.records_at(&name, qtype);
            match records {
                Found::Records(rs) => {
                    for data in rs {
                        if let RData::SRV(srv) = &data {
                            self.add_targets(&srv.target, &mut answer.additionals);
                        }
                        answer
                            .answers
                            .push(Record::from_rdata(name.clone(), self.ttl, data));
                    }
                    return Outcome::Answer(answer);
                }
                Found::Cname(target) => {
                    answer.answers.push(Record::from_rdata(
                        name.clone(),
                        self.ttl,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    if qtype == RecordType::CNAME {
                        return Outcome::Answer(answer);
                    }
                    if !self.contains(&target) {
                        return Outcome::Chase {
                            partial: answer,
                            target,
                        };
                    }
                    name = target;
                }
                Found::NoData => {
                    answer.authorities.push(self.soa());
                    return Outcome::Answer(answer);
                }
                Found::NxDomain => {
                    // After a CNAME the first name exists: the rcode
                    // speaks of the last one, as RFC 6604 says.
                    answer.rcode = ResponseCode::NXDomain;
                    answer.authorities.push(self.soa());
                    return Outcome::Answer(answer);
                }
            }
        }
        answer.rcode = ResponseCode::ServFail;
        Outcome::Answer(answer)
    }

    fn records_at(&self, name: &Name, qtype: RecordType) -> Found {
        let key = key_of(name);
        let entry: Vec<&Data> = self.records(&key).collect();
        if !entry.is_empty() {
            if let Some(c) = entry.iter().find_map(|d| match d {
                Data::Cname(c) => Name::from_ascii(&**c).ok(),
                _ => None,
            }) {
                return Found::Cname(c);
            }
            let mut rs: Vec<RData> = entry
                .iter()
                .filter(|d| qtype == RecordType::ANY || d.record_type() == qtype)
                .filter_map(|d| d.rdata())
                .collect();
            if name == &self.apex && matches!(qtype, RecordType::SOA | RecordType::ANY) {
                rs.push(self.soa().data);
            }
            return if rs.is_empty() {
                Found::NoData
            } else {
                Found::Records(rs)
            };
        }
        if !self.contains(name) {
            return Found::NxDomain;
        }
        if let Some(ip) = self.pod_address(name) {
            return match (ip, qtype) {
                (IpAddr::V4(_), RecordType::A | RecordType::ANY)
                | (IpAddr::V6(_), RecordType::AAAA | RecordType::ANY) => {
                    Found::Records(vec![address(ip)])
                }
                _ => Found::NoData,
            };
        }
        let pod_namespace =
            name.num_labels() == self.pod_label.num_labels() + 1 && self.pod_label.zone_of(name);
        if self.parents.contains_key(&self.hash(&key)) || pod_namespace {
            Found::NoData
        } else {
            Found::NxDomain
        }
    }

    /// The address of `a-b-c-d.<ns>.pod.<zone>`.
    fn pod_address(&self, name: &Name) -> Option<IpAddr> {
        if name.num_labels() != self.pod_label.num_labels() + 2 || !self.pod_label.zone_of(name) {
            return None;
        }
        let first = name.iter().next()?;
        undashed(std::str::from_utf8(first).ok()?)
    }

    /// The addresses of an SRV target inside the zone, for the additional
    /// section.
    fn add_targets(&self, target: &Name, out: &mut Vec<Record>) {
        if out.iter().any(|r| &r.name == target) {
            return;
        }
        for d in self.records(&key_of(target)) {
            if let Data::A(_) | Data::Aaaa(_) = d
                && let Some(data) = d.rdata()
            {
                out.push(Record::from_rdata(target.clone(), self.ttl, data));
            }
        }
    }
}

enum Found {
    Records(Vec<RData>),
    Cname(Name),
    NoData,
    NxDomain,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn svc(v: serde_json::Value) -> ServiceView {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(v).expect("service");
        ServiceView::of(&svc).expect("view")
    }

    fn slices(v: Vec<serde_json::Value>) -> Slices {
        v.into_iter()
            .enumerate()
            .map(|(i, s)| {
                let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
                    serde_json::from_value(s).expect("slice");
                (
                    format!("s{i}").into(),
                    super::super::view::SliceView::of(&slice),
                )
            })
            .collect()
    }

    fn zone() -> Zone {
        let mut z = Zone::new("cluster.local", 30).expect("zone");
        let web = svc(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                     "ports": [{"name": "http", "port": 80}, {"port": 81},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}}));
        z.set_service(
            "default/web",
            records_of(z.apex(), "default/web", &web, None),
        );
        let db = svc(json!({"metadata": {"name": "db", "namespace": "data"},
            "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}));
        let db_slices = slices(vec![json!({
        "metadata": {"name": "db-1"}, "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 15432}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.6"], "conditions": {}},
            {"addresses": ["10.244.3.7"], "hostname": "db-2", "conditions": {"ready": false}},
        ]})]);
        z.set_service(
            "data/db",
            records_of(z.apex(), "data/db", &db, Some(&db_slices)),
        );
        let ext = svc(json!({"metadata": {"name": "ext", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "www.example.com"}}));
        z.set_service(
            "default/ext",
            records_of(z.apex(), "default/ext", &ext, None),
        );
        let alias = svc(
            json!({"metadata": {"name": "alias", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local."}}),
        );
        z.set_service(
            "default/alias",
            records_of(z.apex(), "default/alias", &alias, None),
        );
        z
    }

    fn answer(z: &Zone, q: &str, t: RecordType) -> Answer {
        match z.lookup(&name(q), t) {
            Outcome::Answer(a) => a,
            other => panic!("{q} {t}: {other:?}"),
        }
    }

    fn data(a: &Answer) -> Vec<String> {
        let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn cluster_ip_services_have_addresses_srv_and_ptr() {
        let z = zone();
        let a = answer(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(data(&a), ["10.96.0.20"]);
        assert_eq!(a.answers[0].ttl, 30);
        let a = answer(&z, "web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(data(&a), ["fd00::20"]);
        let a = answer(
            &z,
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(data(&a), ["0 100 80 web.default.svc.cluster.local."]);
        assert_eq!(a.additionals.len(), 2, "the target's A and AAAA");
        let a = answer(
            &z,
            "_dns._udp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(data(&a), ["0 100 53 web.default.svc.cluster.local."]);
        // The unnamed port has none; the protocol must match.
        let a = answer(
            &z,
            "_dns._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = answer(&z, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(data(&a), ["web.default.svc.cluster.local."]);
        let v6 = Name::from(IpAddr::from("fd00::20".parse::<Ipv6Addr>().expect("v6")));
        match z.lookup(&v6, RecordType::PTR) {
            Outcome::Answer(a) => assert_eq!(data(&a), ["web.default.svc.cluster.local."]),
            o => panic!("{o:?}"),
        }
        // An address nobody here has is not ours to deny.
        assert_eq!(
            z.lookup(&name("21.0.96.10.in-addr.arpa."), RecordType::PTR),
            Outcome::Forward
        );
    }

    #[test]
    fn headless_services_publish_ready_endpoints_by_hostname() {
        let z = zone();
        let a = answer(&z, "db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(
            data(&a),
            ["10.244.1.5", "10.244.2.6"],
            "not the unready one"
        );
        let a = answer(&z, "db-0.db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.244.1.5"]);
        let a = answer(&z, "10-244-2-6.db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.244.2.6"], "no hostname: the dashed address");
        let a = answer(&z, "db-2.db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
        let a = answer(&z, "_pg._tcp.db.data.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            data(&a),
            [
                "0 50 15432 10-244-2-6.db.data.svc.cluster.local.",
                "0 50 15432 db-0.db.data.svc.cluster.local."
            ],
            "the endpoints' port"
        );
        assert_eq!(a.additionals.len(), 2);
        let a = answer(&z, "5.1.244.10.in-addr.arpa.", RecordType::PTR);
        assert_eq!(data(&a), ["db-0.db.data.svc.cluster.local."]);
    }

    #[test]
    fn publish_not_ready_addresses_and_no_ready_endpoint() {
        let mut z = zone();
        let spec = |publish: bool| {
            svc(json!({"metadata": {"name": "db", "namespace": "data"},
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": publish}}))
        };
        let unready = slices(vec![json!({
            "metadata": {"name": "db-1"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.3.7"], "conditions": {"ready": false}}]})]);
        let apex = z.apex().clone();
        z.set_service(
            "data/db",
            records_of(&apex, "data/db", &spec(false), Some(&unready)),
        );
        let a = answer(&z, "db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain, "no ready endpoint");
        z.set_service(
            "data/db",
            records_of(&apex, "data/db", &spec(true), Some(&unready)),
        );
        let a = answer(&z, "db.data.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.244.3.7"]);
    }

    #[test]
    fn external_names_are_cnames_chased_inside_the_zone_or_upstream() {
        let z = zone();
        match z.lookup(&name("ext.default.svc.cluster.local."), RecordType::A) {
            Outcome::Chase { partial, target } => {
                assert_eq!(data(&partial), ["www.example.com."]);
                assert_eq!(target, name("www.example.com."));
            }
            o => panic!("{o:?}"),
        }
        let a = answer(&z, "alias.default.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.20", "web.default.svc.cluster.local."]);
        let a = answer(&z, "ext.default.svc.cluster.local.", RecordType::CNAME);
        assert_eq!(data(&a), ["www.example.com."]);
    }

    #[test]
    fn nxdomain_nodata_and_the_soa_in_negative_answers() {
        let z = zone();
        // The name exists with other types.
        let a = answer(&z, "web.default.svc.cluster.local.", RecordType::TXT);
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(a.authorities[0].record_type(), RecordType::SOA);
        // Names with only names below them exist too.
        for ent in [
            "default.svc.cluster.local.",
            "svc.cluster.local.",
            "_http._tcp.web.default.svc.cluster.local.",
            "_tcp.web.default.svc.cluster.local.",
            "pod.cluster.local.",
        ] {
            let a = answer(&z, ent, RecordType::A);
            assert_eq!(a.rcode, ResponseCode::NoError, "{ent}");
            assert!(a.answers.is_empty(), "{ent}");
        }
        for nx in [
            "nope.default.svc.cluster.local.",
            "web.nope.svc.cluster.local.",
            "x.web.default.svc.cluster.local.",
            "google.com.default.svc.cluster.local.",
            "other.cluster.local.",
        ] {
            let a = answer(&z, nx, RecordType::A);
            assert_eq!(a.rcode, ResponseCode::NXDomain, "{nx}");
            let RData::SOA(soa) = &a.authorities[0].data else {
                panic!("no SOA for {nx}");
            };
            assert_eq!(soa.minimum, 30);
            assert_eq!(soa.mname, name("ns.dns.cluster.local."));
        }
        assert_eq!(
            z.lookup(&name("example.com."), RecordType::A),
            Outcome::Forward
        );
        let a = answer(&z, "cluster.local.", RecordType::SOA);
        assert_eq!(a.answers[0].record_type(), RecordType::SOA);
        let a = answer(&z, "dns-version.cluster.local.", RecordType::TXT);
        assert_eq!(data(&a), ["1.1.0"]);
    }

    #[test]
    fn names_match_without_case_and_echo_the_question() {
        let z = zone();
        let a = answer(&z, "WeB.DEFAULT.svc.Cluster.Local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.20"]);
        assert_eq!(
            a.answers[0].name.to_ascii(),
            "WeB.DEFAULT.svc.Cluster.Local."
        );
        let mut z = Zone::new("Cluster.LOCAL", 5).expect("zone");
        let apex = z.apex().clone();
        let s = svc(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20"}}));
        z.set_service("default/web", records_of(&apex, "default/web", &s, None));
        let a = answer(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.20"]);
    }

    #[test]
    fn pod_names_answer_any_address() {
        let z = zone();
        let a = answer(&z, "10-244-1-9.anyns.pod.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.244.1.9"]);
        let a = answer(&z, "fd00--9.anyns.pod.cluster.local.", RecordType::AAAA);
        assert_eq!(data(&a), ["fd00::9"]);
        let a = answer(&z, "10-244-1-9.anyns.pod.cluster.local.", RecordType::AAAA);
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0));
        let a = answer(&z, "anyns.pod.cluster.local.", RecordType::A);
        assert_eq!((a.rcode, a.answers.len()), (ResponseCode::NoError, 0));
        let a = answer(&z, "10-244-1-999.anyns.pod.cluster.local.", RecordType::A);
        assert_eq!(a.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn replacing_and_removing_a_service_leaves_nothing_behind() {
        let mut z = zone();
        let apex = z.apex().clone();
        let moved = svc(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"name": "https", "port": 443}]}}));
        z.set_service(
            "default/web",
            records_of(&apex, "default/web", &moved, None),
        );
        let a = answer(&z, "web.default.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.30"]);
        assert_eq!(
            answer(
                &z,
                "_http._tcp.web.default.svc.cluster.local.",
                RecordType::SRV
            )
            .rcode,
            ResponseCode::NXDomain
        );
        assert_eq!(
            z.lookup(&name("20.0.96.10.in-addr.arpa."), RecordType::PTR),
            Outcome::Forward
        );
        for key in ["default/web", "default/ext", "default/alias"] {
            z.set_service(key, Vec::new());
        }
        assert_eq!(
            answer(&z, "default.svc.cluster.local.", RecordType::A).rcode,
            ResponseCode::NXDomain,
            "the namespace has no Service left"
        );
        assert_eq!(z.services().collect::<Vec<_>>(), ["data/db"]);
        let fresh = zone();
        z.set_service("data/db", Vec::new());
        assert_eq!(z.parents.len(), 2, "svc and pod only: {:?}", z.parents);
        assert!(fresh.names.len() > z.names.len());
    }

    #[test]
    fn a_name_two_services_publish_answers_both_until_each_goes() {
        let mut z = zone();
        let apex = z.apex().clone();
        // The same ClusterIP, as when one Service's address is reused by
        // the next before the first one's deletion is seen.
        let twin = svc(json!({"metadata": {"name": "twin", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}}));
        z.set_service(
            "default/twin",
            records_of(&apex, "default/twin", &twin, None),
        );
        let ptr = |z: &Zone| data(&answer(z, "20.0.96.10.in-addr.arpa.", RecordType::PTR));
        assert_eq!(
            ptr(&z),
            [
                "twin.default.svc.cluster.local.",
                "web.default.svc.cluster.local."
            ]
        );
        z.set_service("default/web", Vec::new());
        assert_eq!(ptr(&z), ["twin.default.svc.cluster.local."]);
        let a = answer(&z, "twin.default.svc.cluster.local.", RecordType::A);
        assert_eq!(data(&a), ["10.96.0.20"]);
        z.set_service("default/twin", Vec::new());
        assert_eq!(
            z.lookup(&name("20.0.96.10.in-addr.arpa."), RecordType::PTR),
            Outcome::Forward
        );
    }

    #[test]
    fn names_that_share_a_hash_keep_their_own_records() {
        let mut z = zone();
        let apex = z.apex().clone();
        let owner = |i: u32| format!("s{i}.default.svc.cluster.local.");
        // Two Service names whose hashes share the bits `names` keeps.
        let mut seen: HashMap<u32, u32> = HashMap::new();
        let (i, j) = (0..1_000_000u32)
            .find_map(|j| {
                let h = z.hash(&owner(j)) as u32;
                seen.insert(h, j).map(|i| (i, j))
            })
            .expect("a shared hash within a million names");
        let ip = |n: u32| format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
        for n in [i, j] {
            let key = format!("default/s{n}");
            let v = svc(
                json!({"metadata": {"name": format!("s{n}"), "namespace": "default"},
                "spec": {"clusterIP": ip(n), "ports": [{"port": 80}]}}),
            );
            z.set_service(&key, records_of(&apex, &key, &v, None));
        }
        let a = |z: &Zone, n: u32| data(&answer(z, &owner(n), RecordType::A));
        assert_eq!((a(&z, i), a(&z, j)), (vec![ip(i)], vec![ip(j)]));
        z.set_service(&format!("default/s{i}"), Vec::new());
        assert_eq!(
            answer(&z, &owner(i), RecordType::A).rcode,
            ResponseCode::NXDomain
        );
        assert_eq!(a(&z, j), [ip(j)]);
    }
}
