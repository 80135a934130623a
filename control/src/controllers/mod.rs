//! The controllers. Each follows kube-rs's shape: watchers feed reflector
//! stores, and a reconcile pass reads the stores and makes the API match
//! the desired state. Passes are idempotent and run whenever a watched
//! kind changes (bursts coalesced) and on a resync period, so a missed or
//! failed step is retried, never assumed done.

pub mod certificates;
pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod gc;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod replicaset;
pub mod serviceaccount;

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

#[derive(Clone, Debug)]
pub struct Settings {
    pub node_grace: Duration,
    pub eviction_timeout: Duration,
    /// The cluster CA: signs approved client certificates, and its
    /// certificate is published in every namespace (`kube-root-ca.crt`).
    pub signer: Option<Arc<certificates::Signer>>,
    /// Node IPAM: the pod network whose ranges Nodes get as podCIDR.
    pub node_cidrs: Option<nodeipam::NodeCidrs>,
}

/// Runs every controller until dropped. Dropping it (as a replica that
/// lost its lease does) stops them all at once, their watches and helper
/// tasks with them.
pub async fn run_all(client: Client, settings: Settings) {
    let ca_pem = settings.signer.as_ref().map(|s| s.ca_cert_pem.clone());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(cidrs) = settings.node_cidrs {
        tasks.spawn(nodeipam::run(client.clone(), cidrs));
    }
    tasks.spawn(certificates::run(client.clone(), settings.signer.clone()));
    tasks.spawn(replicaset::run(client.clone()));
    tasks.spawn(deployment::run(client.clone()));
    tasks.spawn(daemonset::run(client.clone()));
    tasks.spawn(endpointslice::run(client.clone()));
    tasks.spawn(gc::run(client.clone()));
    tasks.spawn(nodelifecycle::run(client.clone(), settings));
    tasks.spawn(serviceaccount::run(client, ca_pem));
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            warn!(error = %e, "a controller ended");
        }
    }
}

/// A task that ends when its handle is dropped: a controller's watches
/// and helpers end with the controller.
pub(crate) struct Owned(JoinHandle<()>);

impl Owned {
    pub(crate) fn spawn<F>(task: F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        Self(tokio::spawn(task))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A reflector store of `api`'s objects; `notify` fires on every change.
pub(crate) fn reflect<K>(api: Api<K>, notify: Arc<Notify>) -> (Store<K>, Owned)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    reflect_with(api, watcher::Config::default(), notify)
}

/// As [`reflect`], for the objects called `name` only (in every namespace).
pub(crate) fn reflect_named<K>(api: Api<K>, name: &str, notify: Arc<Notify>) -> (Store<K>, Owned)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    reflect_with(api, config, notify)
}

fn reflect_with<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> (Store<K>, Owned)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let task = Owned::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => {
                    warn!(kind = %K::kind(&K::DynamicType::default()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    (reader, task)
}

/// Waits for the next pass: a change (bursts coalesced) or `resync`.
pub(crate) async fn next_pass(name: &'static str, notify: &Notify, resync: Duration) {
    next_pass_after(name, notify, resync, Duration::from_millis(5)).await;
}

/// As `next_pass`, gathering changes for `coalesce` before the pass: for
/// controllers whose pass reads everything and need not be immediate.
pub(crate) async fn next_pass_after(
    name: &'static str,
    notify: &Notify,
    resync: Duration,
    coalesce: Duration,
) {
    tokio::select! {
        _ = notify.notified() => {}
        _ = tokio::time::sleep(resync) => {}
    }
    tokio::time::sleep(coalesce).await;
    debug!(controller = name, "pass");
}

/// Waits until each store has its first list.
pub(crate) async fn ready<K>(store: &Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let _ = store.wait_until_ready().await;
}

/// The owner reference with `controller: true`.
pub(crate) fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
}

pub(crate) fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    let meta = owner.meta();
    Some(OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Not terminating and not finished.
pub(crate) fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub(crate) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Upstream's "available": Ready for at least `min_ready_seconds`. When
/// the pod is Ready but not yet for long enough, the time left is given,
/// so the controller can look again then.
pub(crate) fn availability(
    pod: &Pod,
    min_ready_seconds: i32,
    now: jiff::Timestamp,
) -> (bool, Option<Duration>) {
    if !is_ready(pod) {
        return (false, None);
    }
    if min_ready_seconds <= 0 {
        return (true, None);
    }
    let since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    // Like upstream, a Ready condition with no transition time never
    // counts as available for a non-zero minReadySeconds.
    let Some(since) = since else {
        return (false, None);
    };
    let due = since + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds));
    if due <= now {
        (true, None)
    } else {
        let left = now.duration_until(due).unsigned_abs();
        (false, Some(left))
    }
}

/// Wakes a controller's pass at the earliest instant any reconcile asked
/// for (a pod becoming available, a progress deadline).
#[derive(Default)]
pub(crate) struct Wake(Option<tokio::time::Instant>);

impl Wake {
    /// Arranges for `notify` to fire after `after`, unless an earlier wake
    /// is already pending.
    pub(crate) fn after(&mut self, notify: &Arc<Notify>, after: Duration) {
        let at = tokio::time::Instant::now() + after + Duration::from_millis(20);
        let now = tokio::time::Instant::now();
        if self.0.is_some_and(|w| w > now && w <= at) {
            return;
        }
        self.0 = Some(at);
        let notify = notify.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            notify.notify_one();
        });
    }
}

pub(crate) fn name_of(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

pub(crate) fn ns_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or_default()
}

/// Merges `status` into the object's status subresource; a failure is
/// logged and left to the next pass.
pub(crate) async fn write_status<K>(api: &Api<K>, name: &str, status: serde_json::Value)
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let patch = kube::api::Patch::Merge(serde_json::json!({ "status": status }));
    if let Err(e) = api
        .patch_status(name, &kube::api::PatchParams::default(), &patch)
        .await
    {
        warn!(kind = %K::kind(&K::DynamicType::default()), name, error = %e, "status update failed");
    }
}

/// Runs `ops` with at most `width` in flight and counts the failures
/// (each is logged by the caller's closure).
pub(crate) async fn in_parallel<I, Fut>(width: usize, ops: I) -> usize
where
    I: IntoIterator<Item = Fut>,
    Fut: std::future::Future<Output = bool>,
{
    futures::stream::iter(ops)
        .buffer_unordered(width)
        .filter(|ok| std::future::ready(!*ok))
        .count()
        .await
}
