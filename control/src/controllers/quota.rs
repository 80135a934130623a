//! ResourceQuota status: `status.hard` follows `spec.hard`, and
//! `status.used` is counted again from the namespace's objects whenever a
//! quota or a pod changes (and every ten seconds), so usage that goes away
//! (a deleted or finished pod, a removed Service) is given back. Admission
//! raises `status.used` with each create (`apiserver/admission.rs`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Api, Client};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tracing::warn;

use crate::informer::{next_pass, ready, reflect};
use crate::meta::{name_of, ns_of};
use crate::usage::{self, Usage};

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (quotas, _a) = reflect(Api::<ResourceQuota>::all(client.clone()), notify.clone());
    let (_pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&quotas).await;
    loop {
        next_pass("resourcequota", &notify, Duration::from_secs(10)).await;
        for q in quotas.state() {
            recount(&client, &q).await;
        }
    }
}

/// The namespace's objects of `group/plural`, as JSON.
async fn objects(client: &Client, ns: &str, group: &str, plural: &str) -> Option<Vec<Value>> {
    let version = crate::resources::group_version(group);
    let r = crate::resources::find(group, version, plural)?;
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, r.kind), plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    match api.list(&ListParams::default()).await {
        Ok(list) => Some(
            list.items
                .into_iter()
                .filter_map(|o| serde_json::to_value(o).ok())
                .collect(),
        ),
        Err(e) => {
            warn!(resource = plural, namespace = ns, error = %e, "listing for a quota failed");
            None
        }
    }
}

async fn recount(client: &Client, quota: &ResourceQuota) {
    let (name, ns) = (name_of(&quota.metadata), ns_of(&quota.metadata));
    let spec_hard =
        serde_json::to_value(quota.spec.as_ref().and_then(|s| s.hard.as_ref())).unwrap_or_default();
    let hard = usage::amounts(Some(&spec_hard));
    let kinds: BTreeSet<(String, String)> =
        hard.keys().filter_map(|k| usage::counted_kind(k)).collect();
    let mut used: Usage = hard.keys().map(|k| (k.clone(), 0.0)).collect();
    for (group, plural) in kinds {
        let Some(items) = objects(client, ns, &group, &plural).await else {
            return; // counted again on the next pass
        };
        for o in items {
            for (k, v) in usage::usage(&group, &plural, &o) {
                if let Some(total) = used.get_mut(&k) {
                    *total += v;
                }
            }
        }
    }
    let used: Map<String, Value> = used
        .iter()
        .map(|(k, v)| (k.clone(), json!(usage::format(k, *v))))
        .collect();
    let status = json!({"hard": spec_hard, "used": used});
    let cur = serde_json::to_value(&quota.status).unwrap_or_default();
    let same = usage::amounts(cur.get("hard")) == hard
        && usage::amounts(cur.get("used")) == usage::amounts(status.get("used"))
        && cur.get("used").and_then(Value::as_object).map(Map::len) == Some(used.len());
    if !same {
        // Keys the spec dropped leave the status too (null in a merge).
        let mut status = status;
        for field in ["hard", "used"] {
            for k in cur
                .get(field)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                if status[field].get(k).is_none() {
                    status[field][k] = Value::Null;
                }
            }
        }
        let api: Api<ResourceQuota> = Api::namespaced(client.clone(), ns);
        crate::informer::write_status(&api, name, status).await;
    }
}
