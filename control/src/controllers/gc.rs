//! Garbage collection by ownerReferences, and the `foregroundDeletion` and
//! `orphan` finalizers that `propagationPolicy` adds.
//!
//! - An object all of whose owners are gone (checked against the apiserver,
//!   not only the cache) is deleted.
//! - An owner being deleted in the foreground has its dependents deleted in
//!   the foreground too, and loses its finalizer once none is left.
//! - An owner being deleted with orphaning has its reference removed from
//!   every dependent, then loses its finalizer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ReplicationController, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::informer::{next_pass_after, ready, reflect};

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

/// What the collector needs of any object.
struct Entry {
    ar: ApiResource,
    name: String,
    ns: Option<String>,
    uid: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    finalizers: Vec<String>,
}

fn entries<K>(store: &Store<K>) -> Vec<Entry>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    store
        .state()
        .iter()
        .map(|o| {
            let m = o.meta();
            Entry {
                ar: ar.clone(),
                name: m.name.clone().unwrap_or_default(),
                ns: m.namespace.clone(),
                uid: m.uid.clone().unwrap_or_default(),
                owners: m.owner_references.clone().unwrap_or_default(),
                deleting: m.deletion_timestamp.is_some(),
                finalizers: m.finalizers.clone().unwrap_or_default(),
            }
        })
        .collect()
}

fn api_for(client: &Client, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Whether the owner named by `o` is gone (or replaced by a namesake).
async fn owner_gone(client: &Client, o: &OwnerReference, ns: Option<&str>) -> bool {
    let Some(r) = crate::resources::by_kind(&o.api_version, &o.kind) else {
        // An owner of a kind this apiserver does not serve cannot exist.
        return true;
    };
    let (group, version) = match o.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", o.api_version.as_str()),
    };
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, &o.kind),
        r.plural,
    );
    let api = api_for(client, &ar, if r.namespaced { ns } else { None });
    match api.get_opt(&o.name).await {
        Ok(None) => true,
        Ok(Some(obj)) => obj.metadata.uid.as_deref() != Some(o.uid.as_str()),
        Err(_) => false,
    }
}

async fn delete(client: &Client, e: &Entry, foreground: bool) {
    let api = api_for(client, &e.ar, e.ns.as_deref());
    let dp = if foreground {
        DeleteParams::foreground()
    } else {
        DeleteParams::background()
    };
    match api.delete(&e.name, &dp).await {
        Ok(_) => info!(kind = %e.ar.kind, name = %e.name, namespace = ?e.ns, "collected"),
        Err(kube::Error::Api(err)) if err.code == 404 => {}
        Err(err) => warn!(kind = %e.ar.kind, name = %e.name, error = %err, "collecting failed"),
    }
}

async fn patch_meta(client: &Client, e: &Entry, meta: serde_json::Value) {
    let api = api_for(client, &e.ar, e.ns.as_deref());
    if let Err(err) = api
        .patch(
            &e.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": meta})),
        )
        .await
    {
        warn!(kind = %e.ar.kind, name = %e.name, error = %err, "metadata update failed");
    }
}

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (pods, _a) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    let (rss, _b) = reflect(Api::<ReplicaSet>::all(client.clone()), notify.clone());
    let (deps, _c) = reflect(Api::<Deployment>::all(client.clone()), notify.clone());
    let (dss, _d) = reflect(Api::<DaemonSet>::all(client.clone()), notify.clone());
    let (svcs, _e) = reflect(Api::<Service>::all(client.clone()), notify.clone());
    let (slices, _f) = reflect(Api::<EndpointSlice>::all(client.clone()), notify.clone());
    let (revs, _g) = reflect(
        Api::<ControllerRevision>::all(client.clone()),
        notify.clone(),
    );
    let (rcs, _h) = reflect(
        Api::<ReplicationController>::all(client.clone()),
        notify.clone(),
    );
    let (jobs, _i) = reflect(Api::<Job>::all(client.clone()), notify.clone());
    ready(&pods).await;
    ready(&rss).await;
    ready(&rcs).await;
    let (cjs, _j) = reflect(Api::<CronJob>::all(client.clone()), notify.clone());
    let (sts, _k) = reflect(Api::<StatefulSet>::all(client.clone()), notify.clone());
    let (claims, _l) = reflect(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        notify.clone(),
    );
    ready(&jobs).await;
    ready(&cjs).await;
    ready(&sts).await;
    ready(&claims).await;
    ready(&deps).await;
    ready(&dss).await;
    ready(&svcs).await;
    ready(&slices).await;
    ready(&revs).await;
    loop {
        // Collection can wait a moment: one pass reads every object.
        next_pass_after(
            "garbage-collector",
            &notify,
            Duration::from_secs(15),
            Duration::from_millis(200),
        )
        .await;
        let mut all = Vec::new();
        all.extend(entries(&pods));
        all.extend(entries(&rss));
        all.extend(entries(&rcs));
        all.extend(entries(&jobs));
        all.extend(entries(&cjs));
        all.extend(entries(&deps));
        all.extend(entries(&dss));
        all.extend(entries(&svcs));
        all.extend(entries(&slices));
        all.extend(entries(&revs));
        all.extend(entries(&sts));
        all.extend(entries(&claims));
        collect(&client, &all).await;
    }
}

async fn collect(client: &Client, all: &[Entry]) {
    let by_uid: HashMap<&str, &Entry> = all.iter().map(|e| (e.uid.as_str(), e)).collect();
    let mut dependents: HashMap<&str, usize> = HashMap::new();
    for e in all {
        if e.owners.is_empty() {
            continue;
        }
        for o in &e.owners {
            *dependents.entry(o.uid.as_str()).or_default() += 1;
        }
        let present: Vec<(&OwnerReference, &Entry)> = e
            .owners
            .iter()
            .filter_map(|o| by_uid.get(o.uid.as_str()).map(|owner| (o, *owner)))
            .collect();
        if present.is_empty() {
            let mut gone = true;
            for o in &e.owners {
                if !owner_gone(client, o, e.ns.as_deref()).await {
                    gone = false;
                    break;
                }
            }
            if gone && !e.deleting {
                delete(client, e, false).await;
            }
            continue;
        }
        for (o, owner) in present {
            if !owner.deleting {
                continue;
            }
            if owner.finalizers.iter().any(|f| f == FOREGROUND) && !e.deleting {
                delete(client, e, true).await;
            } else if owner.finalizers.iter().any(|f| f == ORPHAN) {
                let keep: Vec<&OwnerReference> =
                    e.owners.iter().filter(|x| x.uid != o.uid).collect();
                let refs = if keep.is_empty() {
                    json!(null)
                } else {
                    json!(keep)
                };
                patch_meta(client, e, json!({"ownerReferences": refs})).await;
            }
        }
    }
    for owner in all.iter().filter(|e| e.deleting) {
        let left = dependents.get(owner.uid.as_str()).copied().unwrap_or(0);
        let ours = |f: &String| f == FOREGROUND || f == ORPHAN;
        if left == 0 && owner.finalizers.iter().any(ours) {
            let rest: Vec<&String> = owner.finalizers.iter().filter(|f| !ours(f)).collect();
            let value = if rest.is_empty() {
                json!(null)
            } else {
                json!(rest)
            };
            patch_meta(client, owner, json!({"finalizers": value})).await;
        }
    }
}
