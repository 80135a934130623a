//! The DNS server: questions on UDP and TCP, answered from the zone in
//! memory on the socket's own task, or forwarded upstream on a task of
//! their own, bounded in number.
//!
//! What a client gets beyond the zone's answer:
//! - a packet that does not parse gets FORMERR when its header can be
//!   read, and nothing when it cannot; responses are never answered;
//! - opcodes other than QUERY get NOTIMP, more or fewer than one question
//!   FORMERR, classes other than IN REFUSED, zone transfers NOTIMP;
//! - an EDNS question gets an EDNS answer (payload [`UDP_PAYLOAD`]); an
//!   EDNS version above 0 gets BADVERS;
//! - a UDP answer larger than the client can take loses its additional
//!   section first, then is sent truncated (TC) so the client asks over
//!   TCP;
//! - while the zone has not been read from the apiserver yet, questions
//!   for it get SERVFAIL (the client tries again), never a wrong NXDOMAIN;
//! - a question asked again is answered from the zone's reply to it kept
//!   encoded ([`ready`](super::ready)), until the zone next changes;
//! - when as many forwards as allowed are in flight (in all, or for the
//!   asking client: a share of them, so one client cannot take them all),
//!   the next one gets SERVFAIL at once: a flood of outside names cannot
//!   grow memory, starve other clients or hold up the cluster domain's
//!   answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::cache::{self, Cache, CacheConfig, Entry, Lookup};
use super::forward::{ForwardError, Forwarder, UDP_PAYLOAD, tcp_frame};
use super::ready::{Question, Ready};
use super::zone::{Answer, Outcome, Zone};

/// How long a TCP client may stay silent between questions.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Limits that keep the server's memory bounded under any load.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Forwards in flight at once.
    pub forwards: usize,
    /// Forwards in flight at once for one client address.
    pub forwards_per_client: usize,
    /// TCP connections open at once.
    pub tcp_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            forwards: 1024,
            forwards_per_client: 128,
            tcp_connections: 256,
        }
    }
}

/// Query types counted by name; the rest are `other`.
const TYPES: [(u16, &str); 9] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (12, "PTR"),
    (33, "SRV"),
    (16, "TXT"),
    (15, "MX"),
    (2, "NS"),
    (6, "SOA"),
];
const RCODES: [&str; 6] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
];

/// The metrics' counters, looked up once: counting an answer is two
/// atomic adds.
pub struct Counters {
    /// By transport (UDP, TCP), then type (`TYPES`, then other).
    requests: [[prometheus_client::metrics::counter::Counter; TYPES.len() + 1]; 2],
    /// By `RCODES`, then other.
    responses: [prometheus_client::metrics::counter::Counter; RCODES.len() + 1],
    hits: prometheus_client::metrics::counter::Counter,
    misses: prometheus_client::metrics::counter::Counter,
    forward: prometheus_client::metrics::histogram::Histogram,
}

impl Counters {
    pub fn new(m: &crate::telemetry::Dns) -> Self {
        use crate::telemetry::{QueryLabels, RcodeLabel};
        let proto = |proto: &'static str| {
            std::array::from_fn(|i| {
                let r#type = TYPES.get(i).map_or("other", |t| t.1);
                m.requests
                    .get_or_create(&QueryLabels { proto, r#type })
                    .clone()
            })
        };
        Self {
            requests: [proto("udp"), proto("tcp")],
            responses: std::array::from_fn(|i| {
                let rcode = RCODES.get(i).copied().unwrap_or("other");
                m.responses.get_or_create(&RcodeLabel { rcode }).clone()
            }),
            hits: m.cache_hits.clone(),
            misses: m.cache_misses.clone(),
            forward: m.forward_duration.clone(),
        }
    }

    /// Counts `reply` (wire format), sent over UDP or TCP: its question's
    /// type and its response code, read from the bytes.
    fn answered(&self, reply: &[u8], udp: bool) {
        let rcode = reply.get(3).map_or(usize::MAX, |b| usize::from(b & 0x0f));
        self.responses[rcode.min(RCODES.len())].inc();
        let ty = question_type(reply)
            .and_then(|t| TYPES.iter().position(|(code, _)| *code == t))
            .unwrap_or(TYPES.len());
        self.requests[usize::from(!udp)][ty].inc();
    }
}

/// The type of a message's first question, if it has one.
fn question_type(msg: &[u8]) -> Option<u16> {
    if u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]) == 0 {
        return None;
    }
    let mut at = 12;
    loop {
        let len = usize::from(*msg.get(at)?);
        if len == 0 {
            break;
        }
        // A question's name is never compressed.
        if len & 0xc0 != 0 {
            return None;
        }
        at += len + 1;
    }
    Some(u16::from_be_bytes([*msg.get(at + 1)?, *msg.get(at + 2)?]))
}

/// The zone and the way out, shared by every socket.
pub struct Resolver {
    zone: RwLock<Zone>,
    /// Replies kept encoded, for the zone's current serial.
    ready: RwLock<Ready>,
    synced: AtomicBool,
    forwarder: Forwarder,
    cache: Mutex<Cache>,
    /// Questions asked upstream now, which others join.
    inflight: Mutex<HashMap<cache::Key, Flight>>,
    forwards: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    tcp: Arc<Semaphore>,
    counters: Option<Counters>,
}

/// What one packet needs.
enum Handled {
    /// A kept reply, written into the caller's buffer.
    Ready,
    Reply(Vec<u8>),
    /// Needs upstream: the question and what the zone answered so far.
    Upstream(Box<Pending>),
    Drop,
}

struct Pending {
    request: Message,
    /// Set when the zone answered with a CNAME that leaves it.
    partial: Option<(Answer, hickory_proto::rr::Name)>,
    /// For keeping the reply ready: the question as read from the wire,
    /// and the zone's serial when it sent it upstream.
    question: Option<Question>,
    serial: u32,
}

type Flight = Shared<BoxFuture<'static, Result<Arc<Message>, Arc<ForwardError>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Resolver {
    pub fn new(zone: Zone, forwarder: Forwarder, limits: Limits, cache: CacheConfig) -> Self {
        Self {
            ready: RwLock::new(Ready::new(zone.serial())),
            zone: RwLock::new(zone),
            synced: AtomicBool::new(false),
            forwarder,
            cache: Mutex::new(Cache::new(cache)),
            inflight: Mutex::new(HashMap::new()),
            forwards: Arc::new(Semaphore::new(limits.forwards)),
            per_client: PerClient::new(limits.forwards_per_client),
            tcp: Arc::new(Semaphore::new(limits.tcp_connections)),
            counters: None,
        }
    }

    /// This resolver, counting what it answers into `counters`.
    pub fn counted(mut self, counters: Counters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// Sends `bytes` to `peer` over UDP, counted.
    async fn send_udp(&self, sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
        if let Some(c) = &self.counters {
            c.answered(bytes, true);
        }
        send(sock, bytes, peer).await;
    }

    /// The zone, to read.
    pub fn zone(&self) -> std::sync::RwLockReadGuard<'_, Zone> {
        read(&self.zone)
    }

    /// Changes the zone with `edit`. When that changed it (its serial
    /// moved), the replies kept for it go; an edit that changed nothing
    /// (a Service whose endpoints moved but whose records did not) keeps
    /// them.
    pub fn edit_zone(&self, edit: impl FnOnce(&mut Zone)) {
        let (before, after) = {
            let mut zone = write(&self.zone);
            let before = zone.serial();
            edit(&mut zone);
            (before, zone.serial())
        };
        if after != before {
            write(&self.ready).clear(after);
        }
    }

    /// The zone has been read from the apiserver: answer from it.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// One packet: a kept reply (written into `out`) when there is one
    /// for it, else answered from the zone if it can be. The question is
    /// read from the wire once, for both.
    fn handle(&self, packet: &[u8], udp: bool, out: &mut Vec<u8>) -> Handled {
        let q = Question::parse(packet, UDP_PAYLOAD);
        if let Some(q) = &q {
            let limit = if udp {
                q.udp_limit
            } else {
                usize::from(u16::MAX)
            };
            if read(&self.ready).answer(packet, q, limit, out) {
                return Handled::Ready;
            }
        }
        self.work_out(packet, q, udp)
    }

    /// The full way: the packet parsed, answered from the zone or sent
    /// upstream; a whole zone reply to a question `q` read is kept.
    fn work_out(&self, packet: &[u8], q: Option<Question>, udp: bool) -> Handled {
        if packet.len() < 12 {
            return Handled::Drop;
        }
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "malformed question");
                // Never answer what claims to be a response.
                if packet[2] & 0x80 != 0 {
                    return Handled::Drop;
                }
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                let op = OpCode::from_u8((packet[2] >> 3) & 0x0f);
                let reply = Message::error_msg(id, op, ResponseCode::FormErr);
                return encode(reply, 512).map_or(Handled::Drop, Handled::Reply);
            }
        };
        if request.metadata.message_type == MessageType::Response {
            return Handled::Drop;
        }
        let limit = limit_of(&request, udp);
        let refuse = |rcode| {
            let mut reply = self.reply_to(&request);
            reply.metadata.response_code = rcode;
            encode(reply, limit).map_or(Handled::Drop, Handled::Reply)
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return refuse(ResponseCode::BADVERS);
        }
        if request.metadata.op_code != OpCode::Query {
            return refuse(ResponseCode::NotImp);
        }
        let [query] = request.queries.as_slice() else {
            return refuse(ResponseCode::FormErr);
        };
        if query.query_class() != DNSClass::IN {
            return refuse(ResponseCode::Refused);
        }
        if matches!(
            query.query_type(),
            RecordType::AXFR | RecordType::IXFR | RecordType::OPT
        ) {
            return refuse(ResponseCode::NotImp);
        }
        let (outcome, serial) = {
            let zone = read(&self.zone);
            if !self.synced() && zone.contains(query.name()) {
                return refuse(ResponseCode::ServFail);
            }
            (zone.lookup(query.name(), query.query_type()), zone.serial())
        };
        match outcome {
            Outcome::Answer(a) => {
                let mut reply = self.reply_to(&request);
                reply.metadata.authoritative = true;
                fill(&mut reply, a);
                let Some((bytes, whole)) = encode_whole(reply, limit) else {
                    return Handled::Drop;
                };
                // Kept only whole: a reply cut for this asker's limit
                // must not reach one who takes more.
                if whole && let Some(q) = &q {
                    write(&self.ready).keep(q, serial, &bytes);
                }
                Handled::Reply(bytes)
            }
            Outcome::Forward => Handled::Upstream(Box::new(Pending {
                request,
                partial: None,
                question: q,
                serial,
            })),
            Outcome::Chase { partial, target } => Handled::Upstream(Box::new(Pending {
                request,
                partial: Some((partial, target)),
                question: None,
                serial,
            })),
        }
    }

    /// An empty response to `request`: its ID, opcode, question and RD,
    /// RA when there is an upstream, EDNS when it asked with EDNS.
    fn reply_to(&self, request: &Message) -> Message {
        let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.metadata.recursion_available = !self.forwarder.upstreams().is_empty();
        reply.metadata.checking_disabled = request.metadata.checking_disabled;
        reply.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD);
            reply.set_edns(edns);
        }
        reply
    }

    /// Completes a question the zone could not answer alone.
    async fn resolve(self: &Arc<Self>, p: Box<Pending>, udp: bool) -> Option<Vec<u8>> {
        let limit = limit_of(&p.request, udp);
        let mut reply = self.reply_to(&p.request);
        let query = p.request.queries.first()?;
        let (question, partial) = match p.partial {
            Some((answer, target)) => (Query::query(target, query.query_type()), Some(answer)),
            None => (query.clone(), None),
        };
        let upstream = self.upstream(&question).await;
        let mut steady = Duration::ZERO;
        match (partial, upstream) {
            (Some(mut answer), Ok((up, _))) => {
                reply.metadata.authoritative = true;
                answer.rcode = up.rcode;
                answer.answers.extend(up.answers);
                fill(&mut reply, answer);
            }
            // Without an upstream the CNAME alone is the answer: the
            // client's resolver may chase it.
            (Some(answer), Err(e)) if matches!(*e, ForwardError::NoUpstream) => {
                reply.metadata.authoritative = true;
                fill(&mut reply, answer);
            }
            (None, Ok((up, fresh_for))) => {
                reply.metadata.response_code = up.rcode;
                reply.answers = up.answers;
                reply.authorities = up.authorities;
                steady = fresh_for;
            }
            (None, Err(e)) if matches!(*e, ForwardError::NoUpstream) => {
                reply.metadata.response_code = ResponseCode::Refused;
            }
            (_, Err(e)) => {
                debug!(name = %question.name(), error = %e, "forward failed");
                reply.metadata.response_code = ResponseCode::ServFail;
            }
        }
        let (bytes, whole) = encode_whole(reply, limit)?;
        if whole && let Some(q) = &p.question {
            write(&self.ready).keep_for(q, p.serial, &bytes, steady);
        }
        Some(bytes)
    }

    /// Upstream's answer to `query` through the cache: a live entry, else
    /// one question upstream however many clients ask at once, else
    /// (upstream failing) an expired entry still within its stale window.
    /// With it, how long the cache serves it as it is (zero but for a
    /// live entry with no refresh due).
    async fn upstream(
        self: &Arc<Self>,
        query: &Query,
    ) -> Result<(Entry, Duration), Arc<ForwardError>> {
        if self.forwarder.upstreams().is_empty() {
            return Err(Arc::new(ForwardError::NoUpstream));
        }
        let k = cache::key(query.name(), query.query_type());
        let stale = match lock(&self.cache).lookup(&k, Instant::now()) {
            Lookup::Fresh {
                entry,
                refresh,
                steady,
            } => {
                if let Some(c) = &self.counters {
                    c.hits.inc();
                }
                if refresh {
                    // Prefetch: asked again before it expires.
                    let (me, q) = (self.clone(), query.clone());
                    tokio::spawn(async move {
                        let _ = me.ask(q).await;
                    });
                }
                return Ok((entry, steady));
            }
            Lookup::Stale(e) => Some(e),
            Lookup::Miss => None,
        };
        if let Some(c) = &self.counters {
            c.misses.inc();
        }
        match self.ask(query.clone()).await {
            Ok(reply) => Ok((Entry::from_reply(&reply), Duration::ZERO)),
            Err(e) => stale.map(|s| (s, Duration::ZERO)).ok_or(e),
        }
    }

    /// Asks upstream, joining a question already in flight for the same
    /// name and type; the answer is kept in the cache.
    async fn ask(self: &Arc<Self>, query: Query) -> Result<Arc<Message>, Arc<ForwardError>> {
        let k = cache::key(query.name(), query.query_type());
        let flight = {
            let mut inflight = lock(&self.inflight);
            match inflight.get(&k) {
                Some(f) => f.clone(),
                None => {
                    let me = self.clone();
                    let key = k.clone();
                    let f = async move {
                        let started = Instant::now();
                        let r = me.forwarder.ask(&query).await;
                        if let Some(c) = &me.counters {
                            c.forward.observe(started.elapsed().as_secs_f64());
                        }
                        if let Ok(reply) = &r {
                            lock(&me.cache).store(key.clone(), reply, Instant::now());
                        }
                        lock(&me.inflight).remove(&key);
                        r.map(Arc::new).map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    inflight.insert(k, f.clone());
                    f
                }
            }
        };
        flight.await
    }

    /// Room for one more forward from `client`: within the server's limit
    /// and the client's share of it, so one client cannot take every slot.
    fn forward_slot(&self, client: IpAddr) -> Option<ForwardSlot> {
        let mine = self.per_client.take(client)?;
        let permit = self.forwards.clone().try_acquire_owned().ok()?;
        Some(ForwardSlot {
            _permit: permit,
            _client: mine,
        })
    }

    /// Serves UDP on `sock` until the task is dropped.
    pub async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65_535];
        let mut out = Vec::with_capacity(usize::from(UDP_PAYLOAD));
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors of earlier replies surface here.
                    debug!(error = %e, "udp receive");
                    continue;
                }
            };
            match self.handle(&buf[..n], true, &mut out) {
                Handled::Ready => self.send_udp(&sock, &out, peer).await,
                Handled::Reply(bytes) => self.send_udp(&sock, &bytes, peer).await,
                Handled::Drop => {}
                Handled::Upstream(p) => {
                    let Some(permit) = self.forward_slot(peer.ip()) else {
                        let mut reply = self.reply_to(&p.request);
                        reply.metadata.response_code = ResponseCode::ServFail;
                        if let Some(bytes) = encode(reply, limit_of(&p.request, true)) {
                            self.send_udp(&sock, &bytes, peer).await;
                        }
                        continue;
                    };
                    let (me, sock) = (self.clone(), sock.clone());
                    tokio::spawn(async move {
                        if let Some(bytes) = me.resolve(p, true).await {
                            me.send_udp(&sock, &bytes, peer).await;
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Serves TCP on `listener` until the task is dropped.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "tcp accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.tcp.clone().try_acquire_owned() else {
                debug!(%peer, "too many tcp clients; closing");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.clone().tcp_client(stream, peer.ip()).await {
                    debug!(%peer, error = %e, "tcp client");
                }
                drop(permit);
            });
        }
    }

    async fn tcp_client(self: Arc<Self>, mut s: TcpStream, client: IpAddr) -> std::io::Result<()> {
        let mut out = Vec::new();
        loop {
            let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
                return Ok(());
            };
            let len = match len {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; usize::from(len)];
            tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let framed = match self.handle(&buf, false, &mut out) {
                Handled::Ready => tcp_frame(&out),
                Handled::Reply(b) => tcp_frame(&b),
                Handled::Drop => return Ok(()),
                Handled::Upstream(p) => match self.forward_slot(client) {
                    Some(_slot) => self.resolve(p, false).await,
                    None => {
                        let mut reply = self.reply_to(&p.request);
                        reply.metadata.response_code = ResponseCode::ServFail;
                        encode(reply, u16::MAX.into())
                    }
                }
                .as_deref()
                .and_then(tcp_frame),
            };
            if let Some(framed) = framed {
                if let Some(c) = &self.counters {
                    c.answered(&framed[2..], false);
                }
                s.write_all(&framed).await?;
            }
        }
    }
}

/// One forward in flight, counted against the server and its client.
struct ForwardSlot {
    _permit: OwnedSemaphorePermit,
    _client: ClientSlot,
}

/// Forwards in flight per client address.
struct PerClient {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot of `client`'s, if it has one left. The map holds only
    /// clients with forwards in flight, so it is bounded by them.
    fn take(self: &Arc<Self>, client: IpAddr) -> Option<ClientSlot> {
        let mut counts = lock(&self.counts);
        let n = counts.entry(client).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            client,
        })
    }
}

struct ClientSlot {
    owner: Arc<PerClient>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.owner.counts);
        if let Some(n) = counts.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

async fn send(sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, peer).await {
        debug!(%peer, error = %e, "udp send");
    }
}

/// The largest reply the client takes: its EDNS payload (at least 512,
/// at most ours) over UDP, 65 535 over TCP.
fn limit_of(request: &Message, udp: bool) -> usize {
    if udp {
        usize::from(request.max_payload().min(UDP_PAYLOAD))
    } else {
        usize::from(u16::MAX)
    }
}

fn fill(reply: &mut Message, a: Answer) {
    reply.metadata.response_code = a.rcode;
    reply.answers = a.answers;
    reply.authorities = a.authorities;
    reply.additionals = a.additionals;
}

/// `reply` in at most `limit` bytes: whole, else without its additional
/// section, else truncated (TC) to its question.
fn encode(reply: Message, limit: usize) -> Option<Vec<u8>> {
    encode_whole(reply, limit).map(|(b, _)| b)
}

/// [`encode`], and whether the reply went whole.
fn encode_whole(mut reply: Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    let fits = |m: &Message| m.to_vec().ok().filter(|b| b.len() <= limit);
    if let Some(b) = fits(&reply) {
        return Some((b, true));
    }
    if !reply.additionals.is_empty() {
        reply.additionals.clear();
        if let Some(b) = fits(&reply) {
            return Some((b, false));
        }
    }
    let mut short = reply.truncate();
    short.metadata.authoritative = reply.metadata.authoritative;
    match short.to_vec() {
        Ok(b) => Some((b, false)),
        Err(e) => {
            warn!(error = %e, "encoding a reply");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::view::{ServiceView, SliceView};
    use crate::dns::zone::records_of;
    use hickory_proto::rr::Name;
    use serde_json::json;

    fn resolver() -> Resolver {
        let mut zone = Zone::new("cluster.local", 30).expect("zone");
        let apex = zone.apex().clone();
        let ips: Vec<String> = (1..=200).map(|i| format!("10.244.0.{i}")).collect();
        let big: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "big", "namespace": "default"}, "spec": {"clusterIP": "None"}}))
        .expect("svc");
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(json!({"metadata": {"name": "big-1"}, "addressType": "IPv4",
                "endpoints": [{"addresses": ips}]}))
            .expect("slice");
        let slices = [("big-1".into(), SliceView::of(&slice))]
            .into_iter()
            .collect();
        let big = ServiceView::of(&big).expect("view");
        zone.set_service(
            "default/big",
            records_of(&apex, "default/big", &big, Some(&slices)),
        );
        let r = Resolver::new(
            zone,
            Forwarder::new(Vec::new(), Duration::from_secs(1)),
            Limits::default(),
            CacheConfig::default(),
        );
        r.set_synced();
        r
    }

    fn ask(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
        crate::dns::ready::tests::ask(name, t, 0, true, edns)
    }

    /// The way the sockets answer: a kept reply, else the full way.
    fn reply(r: &Resolver, packet: &[u8], udp: bool) -> Message {
        let mut out = Vec::new();
        match r.handle(packet, udp, &mut out) {
            Handled::Ready => Message::from_vec(&out).expect("kept reply parses"),
            Handled::Reply(b) => Message::from_vec(&b).expect("reply parses"),
            Handled::Drop => panic!("dropped"),
            Handled::Upstream(_) => panic!("forwarded"),
        }
    }

    fn service(name: &str, ip: &str) -> ServiceView {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}))
        .expect("svc");
        ServiceView::of(&svc).expect("view")
    }

    fn addresses(m: &Message) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn a_kept_reply_is_the_askers_own_and_goes_when_the_zone_changes() {
        let r = resolver();
        let apex = r.zone().apex().clone();
        r.edit_zone(|z| {
            z.set_service(
                "default/web",
                records_of(&apex, "default/web", &service("web", "10.96.0.20"), None),
            )
        });
        let first = reply(
            &r,
            &ask("web.default.svc.cluster.local.", RecordType::A, None),
            true,
        );
        assert_eq!(addresses(&first), ["10.96.0.20"]);
        // Asked again, in another spelling, ID and flags: from the kept reply.
        let mut again = Message::query();
        again.metadata.id = 0x4242;
        again.metadata.checking_disabled = true;
        again.add_query(Query::query(
            Name::from_ascii("WEB.Default.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let again = again.to_vec().expect("encode");
        let mut out = Vec::new();
        assert!(matches!(r.handle(&again, true, &mut out), Handled::Ready));
        let m = Message::from_vec(&out).expect("parses");
        assert_eq!(m.metadata.id, 0x4242);
        assert!(!m.metadata.recursion_desired);
        assert!(m.metadata.checking_disabled);
        assert!(m.metadata.authoritative);
        assert_eq!(
            m.queries[0].name().to_ascii(),
            "WEB.Default.svc.cluster.local."
        );
        assert_eq!(addresses(&m), ["10.96.0.20"]);
        // An edit that leaves the records as they are (endpoints moved
        // behind a ClusterIP) keeps the reply.
        r.edit_zone(|z| {
            z.set_service(
                "default/web",
                records_of(&apex, "default/web", &service("web", "10.96.0.20"), None),
            )
        });
        assert!(matches!(r.handle(&again, true, &mut out), Handled::Ready));
        // The Service changes: the next answer is the new one.
        r.edit_zone(|z| {
            z.set_service(
                "default/web",
                records_of(&apex, "default/web", &service("web", "10.96.0.21"), None),
            )
        });
        assert!(!matches!(r.handle(&again, true, &mut out), Handled::Ready));
        let m = reply(&r, &again, true);
        assert_eq!(addresses(&m), ["10.96.0.21"]);
        // NXDOMAIN is kept too, and goes the same way.
        let miss = ask("db.default.svc.cluster.local.", RecordType::A, Some(1232));
        assert_eq!(
            reply(&r, &miss, true).metadata.response_code,
            ResponseCode::NXDomain
        );
        assert!(matches!(r.handle(&miss, true, &mut out), Handled::Ready));
        r.edit_zone(|z| {
            z.set_service(
                "default/db",
                records_of(&apex, "default/db", &service("db", "10.96.0.30"), None),
            )
        });
        assert_eq!(addresses(&reply(&r, &miss, true)), ["10.96.0.30"]);
    }

    #[test]
    fn large_answers_truncate_over_udp_and_come_whole_over_tcp() {
        let r = resolver();
        let q = ask("big.default.svc.cluster.local.", RecordType::A, None);
        let m = reply(&r, &q, true);
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
        let m = reply(&r, &q, false);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200);
        assert!(m.metadata.authoritative);
        // EDNS with room for them all over UDP: at most our 1232 bytes,
        // still too small for 200 addresses.
        let m = reply(
            &r,
            &ask("big.default.svc.cluster.local.", RecordType::A, Some(4096)),
            true,
        );
        assert!(m.metadata.truncation);
        assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(UDP_PAYLOAD));
    }

    #[test]
    fn bad_questions_get_their_rcode_and_responses_get_nothing() {
        let r = resolver();
        let mut q = ask("web.default.svc.cluster.local.", RecordType::A, None);
        q.truncate(20);
        let m = reply(&r, &q, true);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
        assert!(matches!(
            r.handle(&q[..5], true, &mut Vec::new()),
            Handled::Drop
        ));
        let mut resp = ask("web.default.svc.cluster.local.", RecordType::A, None);
        resp[2] |= 0x80;
        assert!(matches!(
            r.handle(&resp, true, &mut Vec::new()),
            Handled::Drop
        ));
        let mut notify = Message::query();
        notify.metadata.op_code = OpCode::Notify;
        notify.add_query(Query::query(
            Name::from_ascii("cluster.local.").expect("name"),
            RecordType::SOA,
        ));
        let m = reply(&r, &notify.to_vec().expect("encode"), true);
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        let axfr = ask("cluster.local.", RecordType::AXFR, None);
        assert_eq!(
            reply(&r, &axfr, false).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut two = Message::query();
        for n in ["a.cluster.local.", "b.cluster.local."] {
            two.add_query(Query::query(
                Name::from_ascii(n).expect("name"),
                RecordType::A,
            ));
        }
        let m = reply(&r, &two.to_vec().expect("encode"), true);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        let mut v1 = Message::query();
        v1.add_query(Query::query(
            Name::from_ascii("a.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_version(1);
        v1.set_edns(e);
        let m = reply(&r, &v1.to_vec().expect("encode"), true);
        // BADVERS is 16 (which BADSIG shares, and decodes as).
        let rcode = m.metadata.response_code;
        assert_eq!((rcode.high(), rcode.low()), (1, 0), "{rcode:?}");
    }

    #[test]
    fn nothing_is_denied_before_the_zone_is_read() {
        let r = Resolver::new(
            Zone::new("cluster.local", 30).expect("zone"),
            Forwarder::new(Vec::new(), Duration::from_secs(1)),
            Limits::default(),
            CacheConfig::default(),
        );
        let q = ask("web.default.svc.cluster.local.", RecordType::A, None);
        assert_eq!(
            reply(&r, &q, true).metadata.response_code,
            ResponseCode::ServFail
        );
        r.set_synced();
        assert_eq!(
            reply(&r, &q, true).metadata.response_code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn one_client_cannot_take_every_forward() {
        let r = Resolver::new(
            Zone::new("cluster.local", 30).expect("zone"),
            Forwarder::new(Vec::new(), Duration::from_secs(1)),
            Limits {
                forwards: 5,
                forwards_per_client: 3,
                tcp_connections: 1,
            },
            CacheConfig::default(),
        );
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let held: Vec<ForwardSlot> = (0..3).filter_map(|_| r.forward_slot(a)).collect();
        assert_eq!(held.len(), 3);
        assert!(r.forward_slot(a).is_none(), "a has its share");
        let b_held: Vec<ForwardSlot> = (0..3).filter_map(|_| r.forward_slot(b)).collect();
        assert_eq!(b_held.len(), 2, "the server's limit is 5 in all");
        drop(held);
        assert!(r.forward_slot(a).is_some(), "a's slots came back");
        drop(b_held);
        assert!(
            lock(&r.per_client.counts).is_empty(),
            "no client left in the map"
        );
    }

    #[tokio::test]
    async fn outside_names_are_refused_without_an_upstream() {
        let r = Arc::new(resolver());
        let q = ask("example.com.", RecordType::A, Some(1232));
        let Handled::Upstream(p) = r.handle(&q, true, &mut Vec::new()) else {
            panic!("not forwarded");
        };
        let b = r.resolve(p, true).await.expect("a reply");
        let m = Message::from_vec(&b).expect("parses");
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.recursion_available);
    }

    #[test]
    fn answers_are_counted_by_their_question_type_and_code() {
        let t = crate::telemetry::Telemetry::default();
        let c = Counters::new(&t.dns);
        let mut q = Message::query();
        q.add_query(Query::query(
            hickory_proto::rr::Name::from_ascii("web.default.svc.cluster.local.")
                .unwrap_or_default(),
            RecordType::SRV,
        ));
        q.metadata.response_code = ResponseCode::NXDomain;
        let bytes = q.to_vec().unwrap_or_default();
        assert_eq!(question_type(&bytes), Some(33));
        c.answered(&bytes, false);
        c.answered(&[0u8; 12], true);
        let text = t.render();
        for want in [
            r#"coredns_dns_requests_total{proto="tcp",type="SRV"} 1"#,
            r#"coredns_dns_requests_total{proto="udp",type="other"} 1"#,
            r#"coredns_dns_responses_total{rcode="NXDOMAIN"} 1"#,
            r#"coredns_dns_responses_total{rcode="NOERROR"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert_eq!(question_type(&[0u8; 5]), None);
    }
}
