//! Object storage in etcd.
//!
//! Objects are stored as JSON under `/registry/<resource>/<ns>/<name>`
//! without their `resourceVersion`: the version a client sees is the key's
//! etcd `mod_revision`, and a list's version is the store revision it was
//! read at, so list-then-watch from that revision misses nothing. Every
//! write is one etcd transaction guarded by the revision the caller read,
//! which is how stale updates become 409s and how a ClusterIP or NodePort
//! is claimed in the same step as the Service that holds it.

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;

/// One stored object as read.
#[derive(Clone, Debug)]
pub struct Item {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// One range read of [`Store::page`].
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Item>,
    /// The revision the page was read at.
    pub revision: i64,
    /// The key to read the next page from, if there are more.
    pub next: Option<Vec<u8>>,
    /// Keys in the whole range from `from` (this page's included).
    pub count: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    Exists { key: String },
    #[error("key {key} not found")]
    NotFound { key: String },
    #[error("key {key} changed since revision {expected}")]
    Conflict { key: String, expected: i64 },
    #[error("revision {requested} has been compacted (oldest available {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd client certificate: {0}")]
    Tls(#[from] crate::pki::PkiError),
}

/// A guard on another key, checked in the same transaction as a write.
#[derive(Clone, Debug)]
pub enum Guard {
    /// The key must not exist (a claim on an allocated value).
    Absent(String),
    /// The key must still be at this mod revision (a quota whose count
    /// the write raises).
    Unchanged(String, i64),
}

/// A change to another key made in the same transaction as a write.
#[derive(Clone, Debug)]
pub enum Side {
    Put(String, Vec<u8>),
    Delete(String),
}

/// A change seen by a watch.
#[derive(Clone, Debug)]
pub enum Change {
    /// Created (`prev` empty) or updated (`prev` is the object before).
    Put { item: Item, prev: Option<Item> },
    /// Deleted at `revision`; `last` is the object as it was before.
    Delete { last: Item, revision: i64 },
    /// Every change up to `revision` has been delivered.
    Progress { revision: i64 },
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(
            super::prefix_end(b"/registry/pods/"),
            b"/registry/pods0".to_vec()
        );
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
    }
}

#[derive(Clone)]
pub struct Store {
    /// One client per etcd endpoint; requests go to the one in use.
    clients: Arc<Vec<Client>>,
    /// The endpoint in use, moved on when it does not answer.
    at: Arc<std::sync::atomic::AtomicUsize>,
    /// One shared etcd watch per resource (see [`Hub`]).
    hubs: Arc<tokio::sync::Mutex<HashMap<String, Arc<Hub>>>>,
    /// Told how long each read and write took (the apiserver's metrics).
    observer: Option<Observer>,
}

/// Called with an operation (`get`, `list`, `create`, `update`,
/// `delete`), the resource its key is under and how long etcd took.
pub type Observer = Arc<dyn Fn(&'static str, &str, Duration) + Send + Sync>;

/// The resource of a `/registry/<resource>/...` key.
fn kind_of(key: &[u8]) -> &str {
    let rest = key.strip_prefix(b"/registry/").unwrap_or_default();
    let end = rest.iter().position(|b| *b == b'/').unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).unwrap_or_default()
}

/// Changes a hub keeps for watches that start a little in the past (a
/// list's revision, a reconnect).
const HUB_BUFFER: usize = 2048;

/// How often a hub asks etcd for progress, which becomes bookmarks.
const HUB_PROGRESS: Duration = Duration::from_secs(5);

/// One etcd watch on a resource (`/registry/<resource>/`) shared by every
/// API watch of it, with the last changes kept in memory: a watch from a
/// revision they cover is replayed from them and then fed live, so N
/// watchers cost etcd one watch instead of N. A watch from further back
/// gets an etcd watch of its own (and its 410 when compacted).
struct Hub {
    state: std::sync::Mutex<HubState>,
}

struct HubState {
    /// Watches from `after >= floor` can be served.
    floor: i64,
    buffer: VecDeque<(i64, Arc<Change>)>,
    tx: broadcast::Sender<Arc<Change>>,
    alive: bool,
}

impl Change {
    fn revision(&self) -> i64 {
        match self {
            Change::Put { item, .. } => item.mod_revision,
            Change::Delete { revision, .. } | Change::Progress { revision } => *revision,
        }
    }
}

/// The resource root a watch prefix belongs to: `/registry/pods/` for
/// `/registry/pods/default/`.
fn hub_root(prefix: &str) -> Option<String> {
    let rest = prefix.strip_prefix("/registry/")?;
    let resource = rest.split('/').next().filter(|r| !r.is_empty())?;
    Some(format!("/registry/{resource}/"))
}

/// Keys per range request: well under gRPC's 4 MiB message limit for
/// objects of a few KiB.
const PAGE: i64 = 500;

/// The first key after every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether `e` says the endpoint did not answer, so another may: for a
/// write, only when no connection was made (the request never left).
fn unanswered(e: &etcd_client::Error, write: bool) -> bool {
    let text = e.to_string().to_lowercase();
    let unreachable = match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ) || text.contains("no leader")
                || text.contains("timeout")
                || text.contains("timed out")
        }
        _ => false,
    };
    // A timed-out write may have been applied: only reads move on then.
    let unsent = text.contains("connect") || text.contains("no leader");
    unreachable && (!write || unsent)
}

fn is_compacted(e: &etcd_client::Error) -> bool {
    e.to_string().contains("compacted")
}

impl Store {
    /// Connects to `endpoints`, over mutual TLS when `tls` is given.
    pub async fn connect(
        endpoints: &[String],
        tls: Option<&crate::storage::etcd_pki::ClientFiles>,
    ) -> Result<Self, StoreError> {
        let opts = match tls {
            Some(files) => Some(etcd_client::ConnectOptions::new().with_tls(files.tls()?)),
            None => None,
        };
        // A client of its own per endpoint (rather than one balancing over
        // them all, which fails requests it sends to a dead member), each
        // asking for a leader so that a member cut off from the others
        // refuses instead of serving stale reads.
        // Bounded waits, so that a member cut off (whose packets vanish)
        // shows as an error to move on from rather than a hang: connects
        // and unary requests time out, and HTTP/2 pings find a dead
        // connection under a watch.
        let opts = opts
            .unwrap_or_default()
            .with_require_leader(true)
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(8))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let mut clients = Vec::new();
        for e in endpoints {
            clients.push(Client::connect([e.as_str()], Some(opts.clone())).await?);
        }
        if clients.is_empty() {
            return Err(etcd_client::Error::InvalidArgs("no etcd endpoint".into()).into());
        }
        Ok(Self {
            clients: Arc::new(clients),
            at: Arc::default(),
            hubs: Arc::default(),
            observer: None,
        })
    }

    /// This store, telling `observer` how long each etcd request took.
    pub fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, operation: &'static str, key: &[u8], started: std::time::Instant) {
        if let Some(f) = &self.observer {
            f(operation, kind_of(key), started.elapsed());
        }
    }

    /// Runs `op` on the endpoint in use; when that endpoint does not
    /// answer, moves on to the next and runs it there. A write is run again
    /// only when it cannot have reached the failed endpoint (no connection
    /// was made), so it is never applied twice.
    async fn call<T, F, Fut>(&self, write: bool, op: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.clients.len();
        let mut tries = 0;
        loop {
            let i = self.at.load(Ordering::Relaxed) % n;
            match op(self.clients[i].clone()).await {
                Err(e) if n > 1 && tries + 1 < n && unanswered(&e, write) => {
                    tries += 1;
                    if self
                        .at
                        .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                    {
                        tracing::warn!(endpoint = i, error = %e, "etcd endpoint not answering; moving on");
                    }
                }
                done => return done,
            }
        }
    }

    /// One guarded transaction (a write: never sent twice).
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.call(true, |c| {
            let txn = txn.clone();
            async move { c.kv_client().txn(txn).await }
        })
        .await
    }

    /// One read of one key, as upstream's etcd health check does: etcd
    /// answers (with a quorum).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(false, |c| async move {
            c.kv_client()
                .get("health", Some(GetOptions::new().with_keys_only()))
                .await
        })
        .await?;
        Ok(())
    }

    pub async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .call(false, |c| async move {
                c.kv_client()
                    .get(
                        "/registry/",
                        Some(GetOptions::new().with_count_only().with_prefix()),
                    )
                    .await
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Item>, StoreError> {
        let started = std::time::Instant::now();
        let resp = self
            .call(false, |c| async move { c.kv_client().get(key, None).await })
            .await;
        self.observe("get", key.as_bytes(), started);
        let resp = resp?;
        Ok(resp.kvs().first().map(|kv| Item {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Everything under `prefix`, read at `revision` (latest when `None`),
    /// and the revision the read saw. Read in pages, all at the revision of
    /// the first, so a large list is still one consistent snapshot.
    pub async fn list(
        &self,
        prefix: &str,
        revision: Option<i64>,
    ) -> Result<(Vec<Item>, i64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut at = revision;
        let mut items = Vec::new();
        loop {
            let page = self.page(&from, &end, at, PAGE).await?;
            at = Some(page.revision);
            items.extend(page.items);
            match page.next {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok((items, at.unwrap_or(0)))
    }

    /// Up to `limit` keys in `[from, end)` at `revision` (latest when
    /// `None`): one etcd range read.
    pub async fn page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: Option<i64>,
        limit: i64,
    ) -> Result<Page, StoreError> {
        let mut opts = GetOptions::new().with_range(end.to_vec()).with_limit(limit);
        if let Some(rev) = revision {
            opts = opts.with_revision(rev);
        }
        let started = std::time::Instant::now();
        let got = self
            .call(false, |c| {
                let opts = opts.clone();
                async move { c.kv_client().get(from.to_vec(), Some(opts)).await }
            })
            .await;
        self.observe("list", from, started);
        let resp = match got {
            Ok(r) => r,
            Err(e) if is_compacted(&e) => {
                return Err(StoreError::Compacted {
                    requested: revision.unwrap_or(0),
                    compacted: 0,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let revision = revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
        let items: Vec<Item> = resp
            .kvs()
            .iter()
            .map(|kv| Item {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        let next = match resp.kvs().last() {
            Some(last) if resp.more() => {
                let mut k = last.key().to_vec();
                k.push(0);
                Some(k)
            }
            _ => None,
        };
        Ok(Page {
            items,
            revision,
            next,
            count: resp.count(),
        })
    }

    /// Keys only, for the allocators.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let resp = self
            .call(false, |c| async move {
                c.kv_client()
                    .get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect())
    }

    /// Creates `key`; fails with `Exists` if it (or a guarded key) is there.
    pub async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        guards: &[Guard],
        sides: &[Side],
    ) -> Result<i64, StoreError> {
        let mut when = vec![Compare::create_revision(key, CompareOp::Equal, 0)];
        when.extend(guard_compares(guards));
        let mut ops = vec![TxnOp::put(key, value, None)];
        ops.extend(side_ops(sides));
        let started = std::time::Instant::now();
        let resp = self.txn(Txn::new().when(when).and_then(ops)).await;
        self.observe("create", key.as_bytes(), started);
        let resp = resp?;
        if !resp.succeeded() {
            let which = self.first_existing(key, guards).await?;
            return Err(StoreError::Exists { key: which });
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Which key made a create fail: the key itself, else a guarded one.
    async fn first_existing(&self, key: &str, guards: &[Guard]) -> Result<String, StoreError> {
        if self.get(key).await?.is_some() {
            return Ok(key.to_string());
        }
        Ok(self
            .first_guard_taken(guards)
            .await?
            .unwrap_or_else(|| key.to_string()))
    }

    async fn first_guard_taken(&self, guards: &[Guard]) -> Result<Option<String>, StoreError> {
        for g in guards {
            match g {
                Guard::Absent(k) => {
                    if self.get(k).await?.is_some() {
                        return Ok(Some(k.clone()));
                    }
                }
                Guard::Unchanged(k, rev) => {
                    if self.get(k).await?.map(|i| i.mod_revision) != Some(*rev) {
                        return Ok(Some(k.clone()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Replaces `key` if it is still at `expected` (its mod revision).
    pub async fn update(
        &self,
        key: &str,
        expected: i64,
        value: Vec<u8>,
        guards: &[Guard],
        sides: &[Side],
    ) -> Result<i64, StoreError> {
        let mut when = vec![Compare::mod_revision(key, CompareOp::Equal, expected)];
        when.extend(guard_compares(guards));
        let mut ops = vec![TxnOp::put(key, value, None)];
        ops.extend(side_ops(sides));
        let started = std::time::Instant::now();
        let resp = self.txn(Txn::new().when(when).and_then(ops)).await;
        self.observe("update", key.as_bytes(), started);
        let resp = resp?;
        if !resp.succeeded() {
            return match self.get(key).await? {
                None => Err(StoreError::NotFound { key: key.into() }),
                Some(cur) if cur.mod_revision != expected => Err(StoreError::Conflict {
                    key: key.into(),
                    expected,
                }),
                // The object is as read, so a guarded key is what failed.
                Some(_) => Err(StoreError::Exists {
                    key: self.first_guard_taken(guards).await?.unwrap_or_default(),
                }),
            };
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Deletes `key` if it is still at `expected`; returns the revision of
    /// the delete.
    pub async fn delete(
        &self,
        key: &str,
        expected: i64,
        sides: &[Side],
    ) -> Result<i64, StoreError> {
        let when = vec![Compare::mod_revision(key, CompareOp::Equal, expected)];
        let mut ops = vec![TxnOp::delete(key, None)];
        ops.extend(side_ops(sides));
        let started = std::time::Instant::now();
        let resp = self.txn(Txn::new().when(when).and_then(ops)).await;
        self.observe("delete", key.as_bytes(), started);
        let resp = resp?;
        if !resp.succeeded() {
            return match self.get(key).await? {
                None => Err(StoreError::NotFound { key: key.into() }),
                Some(_) => Err(StoreError::Conflict {
                    key: key.into(),
                    expected,
                }),
            };
        }
        let deleted = resp.op_responses().iter().any(|r| match r {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        if !deleted {
            return Err(StoreError::NotFound { key: key.into() });
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Writes `key` on a fresh etcd lease of `ttl`: the key goes when the
    /// lease expires unless it is written again before (a liveness record).
    pub async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        self.call(true, |c| {
            let value = value.clone();
            async move {
                let lease = c.lease_client().grant(secs, None).await?;
                let opts = etcd_client::PutOptions::new().with_lease(lease.id());
                c.kv_client().put(key, value, Some(opts)).await
            }
        })
        .await?;
        Ok(())
    }

    /// Deletes `key` whatever its revision (a liveness record given up).
    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.call(
            true,
            |c| async move { c.kv_client().delete(key, None).await },
        )
        .await?;
        Ok(())
    }

    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.call(true, |c| async move {
            c.kv_client().compact(revision, None).await
        })
        .await?;
        Ok(())
    }

    /// Changes under `prefix` after `after` (exclusive), in revision order,
    /// with `Progress` markers (every `progress` tick, or every few seconds
    /// from a shared hub). Fails with `Compacted` when `after` is older
    /// than etcd keeps. The stream may end early (its hub went away or it
    /// fell behind); the client then watches again from where it was.
    pub async fn watch(
        &self,
        prefix: &str,
        after: i64,
        progress: tokio::time::Interval,
    ) -> Result<ChangeStream, StoreError> {
        self.check_not_compacted(prefix, after).await?;
        if let Some(root) = hub_root(prefix) {
            let hub = self.hub(&root).await?;
            if let Some(s) = hub.subscribe(prefix, after) {
                return Ok(s);
            }
        }
        Ok(Box::pin(self.etcd_watch(prefix, after, progress).await?))
    }

    /// `Compacted` when etcd no longer has the revisions after `after`.
    async fn check_not_compacted(&self, prefix: &str, after: i64) -> Result<(), StoreError> {
        let opts = GetOptions::new()
            .with_revision(after + 1)
            .with_limit(1)
            .with_keys_only();
        let got = self
            .call(false, |c| {
                let opts = opts.clone();
                async move { c.kv_client().get(prefix, Some(opts)).await }
            })
            .await;
        match got {
            Err(e) if is_compacted(&e) => Err(StoreError::Compacted {
                requested: after,
                compacted: 0,
            }),
            // A revision not written yet (a watch from now) is fine.
            _ => Ok(()),
        }
    }

    /// The hub of `root`, started on first use or after the last one ended.
    async fn hub(&self, root: &str) -> Result<Arc<Hub>, StoreError> {
        let mut hubs = self.hubs.lock().await;
        if let Some(h) = hubs.get(root)
            && h.alive()
        {
            return Ok(h.clone());
        }
        let floor = self.revision().await?;
        let changes = self
            .etcd_watch(root, floor, tokio::time::interval(HUB_PROGRESS))
            .await?;
        let (tx, _) = broadcast::channel(HUB_BUFFER);
        let hub = Arc::new(Hub {
            state: std::sync::Mutex::new(HubState {
                floor,
                buffer: VecDeque::with_capacity(64),
                tx,
                alive: true,
            }),
        });
        tokio::spawn(hub.clone().feed(Box::pin(changes), root.to_string()));
        hubs.insert(root.to_string(), hub.clone());
        Ok(hub)
    }

    /// An etcd watch of this caller's own.
    async fn etcd_watch(
        &self,
        prefix: &str,
        after: i64,
        mut progress: tokio::time::Interval,
    ) -> Result<impl Stream<Item = Result<Change, StoreError>> + Send + use<>, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(after + 1);
        let mut stream = self
            .call(false, |c| {
                let opts = opts.clone();
                async move { c.watch_client().watch(prefix, Some(opts)).await }
            })
            .await?;
        Ok(async_stream_like(move |tx| async move {
            progress.reset();
            loop {
                tokio::select! {
                    _ = progress.tick() => {
                        if let Err(e) = stream.request_progress().await {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                    msg = stream.message() => {
                        let resp = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => return,
                            Err(e) => { let _ = tx.send(Err(e.into())).await; return; }
                        };
                        if resp.compact_revision() > 0 || (resp.canceled() && resp.cancel_reason().contains("compact")) {
                            let _ = tx.send(Err(StoreError::Compacted { requested: after, compacted: resp.compact_revision() })).await;
                            return;
                        }
                        if resp.canceled() {
                            let _ = tx.send(Err(StoreError::Etcd(etcd_client::Error::WatchError(resp.cancel_reason().to_string())))).await;
                            return;
                        }
                        let header_rev = resp.header().map_or(0, |h| h.revision());
                        if resp.events().is_empty() && !resp.created() {
                            if tx.send(Ok(Change::Progress { revision: header_rev })).await.is_err() { return; }
                            continue;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let change = match ev.event_type() {
                                EventType::Put => Change::Put {
                                    prev: ev.prev_kv().filter(|_| kv.create_revision() != kv.mod_revision()).map(|p| Item {
                                        key: key.clone(), value: p.value().to_vec(), mod_revision: p.mod_revision(),
                                    }),
                                    item: Item { key, value: kv.value().to_vec(), mod_revision: kv.mod_revision() },
                                },
                                EventType::Delete => {
                                    let Some(prev) = ev.prev_kv() else { continue };
                                    Change::Delete {
                                        last: Item { key, value: prev.value().to_vec(), mod_revision: prev.mod_revision() },
                                        revision: kv.mod_revision(),
                                    }
                                }
                            };
                            if tx.send(Ok(change)).await.is_err() { return; }
                        }
                    }
                }
            }
        }))
    }
}

/// The changes of one watch.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<Change, StoreError>> + Send>>;

impl Hub {
    fn alive(&self) -> bool {
        self.state.lock().is_ok_and(|s| s.alive)
    }

    /// Moves the etcd watch's changes into the buffer and out to every
    /// subscriber, until the watch fails; then the hub is dead and its
    /// subscribers' streams end.
    async fn feed(self: Arc<Self>, mut changes: ChangeStream, root: String) {
        while let Some(c) = changes.next().await {
            let Ok(c) = c else {
                break;
            };
            let Ok(mut st) = self.state.lock() else {
                break;
            };
            let c = Arc::new(c);
            if !matches!(*c, Change::Progress { .. }) {
                if st.buffer.len() >= HUB_BUFFER
                    && let Some((rev, _)) = st.buffer.pop_front()
                {
                    st.floor = rev;
                }
                st.buffer.push_back((c.revision(), c.clone()));
            }
            // No subscriber is not an error.
            let _ = st.tx.send(c);
        }
        tracing::debug!(root, "shared watch ended");
        if let Ok(mut st) = self.state.lock() {
            st.alive = false;
            st.buffer.clear();
            // Dropping the sender ends every subscriber.
            let (tx, _) = broadcast::channel(1);
            st.tx = tx;
        }
    }

    /// The changes under `prefix` after `after`, if this hub covers them.
    fn subscribe(&self, prefix: &str, after: i64) -> Option<ChangeStream> {
        let (replay, rx) = {
            let st = self.state.lock().ok()?;
            if !st.alive || after < st.floor {
                return None;
            }
            // Subscribed and copied under one lock: nothing is missed
            // between the buffer and the live feed, and nothing is seen twice.
            let rx = st.tx.subscribe();
            let replay: Vec<Arc<Change>> = st
                .buffer
                .iter()
                .filter(|(rev, _)| *rev > after)
                .map(|(_, c)| c.clone())
                .collect();
            (replay, rx)
        };
        let prefix = prefix.to_string();
        let mine = move |c: &Change| match c {
            Change::Put { item, .. } => item.key.starts_with(&prefix),
            Change::Delete { last, .. } => last.key.starts_with(&prefix),
            Change::Progress { revision } => *revision >= after,
        };
        // A subscriber that falls behind (Lagged) or outlives its hub
        // (Closed) ends, and its client watches again from where it was.
        let live =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.ok().map(|c| (c, rx)) },
            );
        let stream = futures::stream::iter(replay)
            .chain(live)
            .filter(move |c| {
                std::future::ready(c.revision() > after || matches!(**c, Change::Progress { .. }))
            })
            .filter(move |c| std::future::ready(mine(c)))
            .map(|c| Ok((*c).clone()));
        Some(Box::pin(stream))
    }
}

/// A stream fed by a task: the task ends when the receiver is dropped.
fn async_stream_like<T, F, Fut>(body: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(body(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn guard_compares(guards: &[Guard]) -> Vec<Compare> {
    guards
        .iter()
        .map(|g| match g {
            Guard::Absent(k) => Compare::create_revision(k.as_str(), CompareOp::Equal, 0),
            Guard::Unchanged(k, rev) => Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev),
        })
        .collect()
}

fn side_ops(sides: &[Side]) -> Vec<TxnOp> {
    sides
        .iter()
        .map(|s| match s {
            Side::Put(k, v) => TxnOp::put(k.as_str(), v.clone(), None),
            Side::Delete(k) => TxnOp::delete(k.as_str(), None),
        })
        .collect()
}
