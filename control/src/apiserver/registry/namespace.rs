//! Namespaces: a delete marks one `Terminating`, and a background purge
//! removes everything in it, then the namespace itself.

use serde_json::Value;

use super::Strategy;
use crate::alloc::Cidr;
use crate::resources;
use crate::storage::store::Store;

/// Removes everything in a terminating namespace, then the namespace.
pub(super) async fn purge(store: Store, ns: String, cidrs: Vec<Cidr>) {
    for r in resources::RESOURCES
        .iter()
        .filter(|r| r.namespaced && r.stored())
    {
        let Ok((items, _)) = store.list(&r.prefix(Some(&ns)), None).await else {
            continue;
        };
        let strategy = Strategy::of(r);
        for item in items {
            let sides = match serde_json::from_slice::<Value>(&item.value) {
                Ok(obj) => strategy.released(&obj, &cidrs),
                Err(_) => Vec::new(),
            };
            if let Err(e) = store.delete(&item.key, item.mod_revision, &sides).await {
                tracing::debug!(key = %item.key, error = %e, "namespace purge: delete failed");
            }
        }
    }
    let key = format!("/registry/namespaces/{ns}");
    if let Ok(Some(item)) = store.get(&key).await
        && let Err(e) = store.delete(&key, item.mod_revision, &[]).await
    {
        tracing::warn!(namespace = %ns, error = %e, "namespace purge: could not remove the namespace");
    }
    tracing::info!(namespace = %ns, "namespace deleted");
}
