//! What the scheduler and the controllers share as clients of the
//! apiserver: reflector stores fed by watches, owned by the task that
//! reads them, and the passes that run on a change or a resync.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

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
    // A change that came while the last pass ran is already waiting.
    let pending = futures::FutureExt::now_or_never(notify.notified()).is_some();
    crate::telemetry::Passes::ended(name, pending);
    if !pending {
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(resync) => {}
        }
    }
    let woken = std::time::Instant::now();
    tokio::time::sleep(coalesce).await;
    crate::telemetry::Passes::started(name, woken);
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
