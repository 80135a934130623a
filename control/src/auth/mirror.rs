//! An in-memory view of every object under an etcd prefix: read once,
//! then followed by a watch (and read again if the watch fails), so that
//! authorization decisions read memory instead of etcd.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tracing::{debug, warn};

use crate::storage::store::{Change, Store, StoreError};

/// What a mirror keeps current.
pub trait View: Send + Sync + 'static {
    /// Forgets everything (a full read follows).
    fn reset(&self);
    /// An object stored (`present`) or deleted.
    fn apply(&self, obj: &Value, present: bool);
}

/// `(namespace, name)` of a stored object, as views key them (empty when
/// absent).
pub fn ns_name(obj: &Value) -> (String, String) {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

/// Reads `prefix` into `view`, then keeps it current in the background.
pub async fn start(
    store: Store,
    prefix: &'static str,
    view: Arc<dyn View>,
) -> Result<(), StoreError> {
    let rev = load(&store, prefix, view.as_ref()).await?;
    tokio::spawn(follow(store, prefix, view, rev));
    Ok(())
}

async fn load(store: &Store, prefix: &str, view: &dyn View) -> Result<i64, StoreError> {
    let (items, rev) = store.list(prefix, None).await?;
    view.reset();
    for i in &items {
        if let Ok(v) = serde_json::from_slice::<Value>(&i.value) {
            view.apply(&v, true);
        }
    }
    Ok(rev)
}

async fn follow(store: Store, prefix: &'static str, view: Arc<dyn View>, mut rev: i64) {
    loop {
        let progress = tokio::time::interval(Duration::from_secs(5));
        match store.watch(prefix, rev, progress).await {
            Ok(mut changes) => {
                while let Some(change) = changes.next().await {
                    let Ok(change) = change else { break };
                    let (obj, present, at) = match &change {
                        Change::Put { item, .. } => (&item.value, true, item.mod_revision),
                        Change::Delete { last, revision } => (&last.value, false, *revision),
                        Change::Progress { revision } => {
                            rev = rev.max(*revision);
                            continue;
                        }
                    };
                    if let Ok(v) = serde_json::from_slice::<Value>(obj) {
                        view.apply(&v, present);
                    }
                    rev = at;
                }
                debug!(prefix, "mirror watch ended; watching again");
            }
            Err(e) => {
                warn!(prefix, error = %e, "mirror watch failed; reading again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                match load(&store, prefix, view.as_ref()).await {
                    Ok(r) => rev = r,
                    Err(e) => warn!(prefix, error = %e, "mirror read failed"),
                }
            }
        }
    }
}
