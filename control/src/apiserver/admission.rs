//! The LimitRanger and ResourceQuota admission plugins.
//!
//! - LimitRanger: a new pod's containers get the `default` limits and
//!   `defaultRequest` requests of the namespace's LimitRanges where they set
//!   none (noted in the `kubernetes.io/limit-ranger` annotation), and a pod
//!   or claim outside a range's `min`/`max`/`maxLimitRequestRatio` is
//!   refused with 403 and upstream's messages.
//! - ResourceQuota: a new object that would take a quota of its namespace
//!   past `spec.hard` is refused with 403 (`exceeded quota: ...`), as is a
//!   pod that leaves a tracked compute resource unset (`failed quota:
//!   ...`). Usage is counted from the namespace's objects, and the quota's
//!   `status.used` is written in the same transaction as the object,
//!   guarded by the quota's revision, so concurrent creates cannot both
//!   take the last of a quota: the loser is retried against the new count.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value, json};

use super::Api;
use super::fields::str_at;
use crate::quantity::parse_quantity;
use crate::resources::{self, Resource};
use crate::status::ApiError;
use crate::storage::store::{Guard, Item, Side};
use crate::usage::{self, Usage};

const LIMIT_RANGER: &str = "kubernetes.io/limit-ranger";

/// Which namespaces hold objects of one kind (LimitRanges, quotas), kept
/// in memory from etcd, so that a create in a namespace with none reads
/// nothing more. Until it follows etcd every namespace may have some.
#[derive(Default)]
pub(crate) struct Holders {
    followed: AtomicBool,
    names: RwLock<HashMap<String, HashSet<String>>>,
}

impl Holders {
    pub(crate) fn followed(&self) {
        self.followed.store(true, Ordering::Release);
    }

    fn may_have(&self, ns: &str) -> bool {
        !self.followed.load(Ordering::Acquire)
            || self
                .names
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(ns)
                .is_some_and(|n| !n.is_empty())
    }
}

impl crate::auth::mirror::View for Holders {
    fn reset(&self) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn apply(&self, obj: &Value, present: bool) {
        let (ns, name) = (
            str_at(obj, "/metadata/namespace"),
            str_at(obj, "/metadata/name"),
        );
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        if present {
            names
                .entry(ns.to_string())
                .or_default()
                .insert(name.to_string());
        } else if let Some(n) = names.get_mut(ns) {
            n.remove(name);
        }
    }
}

fn q(v: &Value) -> Option<f64> {
    v.as_str().and_then(parse_quantity)
}

fn forbidden(plural: &str, obj: &Value, errors: Vec<String>) -> ApiError {
    let why = if errors.len() == 1 {
        errors.into_iter().next().unwrap_or_default()
    } else {
        format!("[{}]", errors.join(", "))
    };
    ApiError::forbidden("", plural, str_at(obj, "/metadata/name"), &why)
}

/// Checks one amount against a range item's `min`, `max` and
/// `maxLimitRequestRatio`, as upstream words each failure.
fn check_range(
    item: &Value,
    what: &str,
    requests: &Map<String, Value>,
    limits: &Map<String, Value>,
    errors: &mut Vec<String>,
) {
    let shown = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (res, min) in item
        .get("min")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        match requests.get(res) {
            None => errors.push(format!(
                "minimum {res} usage per {what} is {}.  No request is specified",
                shown(min)
            )),
            Some(r) if q(r) < q(min) => errors.push(format!(
                "minimum {res} usage per {what} is {}, but request is {}",
                shown(min),
                shown(r)
            )),
            Some(_) => {}
        }
    }
    for (res, max) in item
        .get("max")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        match limits.get(res) {
            None => errors.push(format!(
                "maximum {res} usage per {what} is {}.  No limit is specified",
                shown(max)
            )),
            Some(l) if q(l) > q(max) => errors.push(format!(
                "maximum {res} usage per {what} is {}, but limit is {}",
                shown(max),
                shown(l)
            )),
            Some(_) => {}
        }
    }
    for (res, ratio) in item
        .get("maxLimitRequestRatio")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let (Some(l), Some(r)) = (limits.get(res).and_then(q), requests.get(res).and_then(q))
        else {
            continue;
        };
        if r > 0.0 && q(ratio).is_some_and(|max| l / r > max) {
            errors.push(format!(
                "{res} max limit to request ratio per {what} is {}, but provided ratio is {:.6}",
                shown(ratio),
                l / r
            ));
        }
    }
}

fn resources_of(c: &Value, what: &str) -> Map<String, Value> {
    c.pointer(&format!("/resources/{what}"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// The namespaces with LimitRanges and with quotas.
#[derive(Default)]
pub(crate) struct Policies {
    limit_ranges: std::sync::Arc<Holders>,
    quotas: std::sync::Arc<Holders>,
}

impl Api {
    /// Follows which namespaces have LimitRanges and quotas, so creates
    /// elsewhere skip both plugins' reads.
    pub async fn follow_policies(&self) -> Result<(), crate::storage::store::StoreError> {
        for (prefix, holders) in [
            ("/registry/limitranges/", &self.policies.limit_ranges),
            ("/registry/resourcequotas/", &self.policies.quotas),
        ] {
            crate::auth::mirror::start(self.store.clone(), prefix, holders.clone()).await?;
            holders.followed();
        }
        Ok(())
    }

    /// The stored objects of `plural` (core) in `ns`.
    async fn in_namespace(
        &self,
        group: &str,
        plural: &str,
        ns: &str,
    ) -> Result<Vec<Item>, ApiError> {
        let version = resources::group_version(group);
        let r = resources::find(group, version, plural)
            .ok_or_else(|| ApiError::internal(format!("no {plural} resource")))?;
        let (items, _) = self
            .store
            .list(&r.prefix(Some(ns)), None)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(items)
    }

    /// The `spec.limits` items of the namespace's LimitRanges.
    async fn limit_items(&self, ns: &str) -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        if !self.policies.limit_ranges.may_have(ns) {
            return Ok(out);
        }
        for item in self.in_namespace("", "limitranges", ns).await? {
            let Ok(lr) = serde_json::from_slice::<Value>(&item.value) else {
                continue;
            };
            out.extend(
                lr.pointer("/spec/limits")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        Ok(out)
    }

    /// LimitRanger for a new pod: defaults, then the ranges.
    pub(super) async fn limit_pod(&self, ns: &str, pod: &mut Value) -> Result<(), ApiError> {
        let items = self.limit_items(ns).await?;
        let of_type = |t: &str| -> Vec<Value> {
            items
                .iter()
                .filter(|l| l.get("type").and_then(Value::as_str) == Some(t))
                .cloned()
                .collect()
        };
        let (containers, pods) = (of_type("Container"), of_type("Pod"));
        if containers.is_empty() && pods.is_empty() {
            return Ok(());
        }
        let mut notes = Vec::new();
        for list in ["initContainers", "containers"] {
            let Some(Value::Array(cs)) = pod.pointer_mut(&format!("/spec/{list}")) else {
                continue;
            };
            for c in cs.iter_mut() {
                let name = str_at(c, "/name").to_string();
                for item in &containers {
                    for (field, what, label) in [
                        ("default", "limits", "limit"),
                        ("defaultRequest", "requests", "request"),
                    ] {
                        let mut set = Vec::new();
                        for (res, amount) in item
                            .get(field)
                            .and_then(Value::as_object)
                            .into_iter()
                            .flatten()
                        {
                            let resources = c
                                .as_object_mut()
                                .map(|m| m.entry("resources").or_insert_with(|| json!({})));
                            let Some(Value::Object(resources)) = resources else {
                                continue;
                            };
                            let target = resources.entry(what).or_insert_with(|| json!({}));
                            let Some(target) = target.as_object_mut() else {
                                continue;
                            };
                            // Requests of limits the pod gave were
                            // already set to them by the pod defaults.
                            if target.contains_key(res) {
                                continue;
                            }
                            target.insert(res.clone(), amount.clone());
                            set.push(res.clone());
                        }
                        if !set.is_empty() {
                            notes.push(format!(
                                "{} {label} for {} {name}",
                                set.join(", "),
                                if list == "initContainers" {
                                    "init container"
                                } else {
                                    "container"
                                }
                            ));
                        }
                    }
                }
            }
        }
        if !notes.is_empty()
            && let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut)
        {
            let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
            if let Some(a) = annotations.as_object_mut() {
                a.insert(
                    LIMIT_RANGER.into(),
                    json!(format!("LimitRanger plugin set: {}", notes.join("; "))),
                );
            }
        }
        let mut errors = Vec::new();
        let all: Vec<Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|l| {
                pod.pointer(&format!("/spec/{l}"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        for c in &all {
            let mut requests = resources_of(c, "requests");
            let limits = resources_of(c, "limits");
            for (k, v) in &limits {
                requests.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for item in &containers {
                check_range(item, "Container", &requests, &limits, &mut errors);
            }
        }
        if !pods.is_empty() {
            let (requests, limits) = usage::pod_amounts(pod);
            let as_map = |u: Usage| -> Map<String, Value> {
                u.into_iter()
                    .map(|(k, v)| {
                        let s = usage::format(&k, v);
                        (k, json!(s))
                    })
                    .collect()
            };
            let (requests, limits) = (as_map(requests), as_map(limits));
            for item in &pods {
                check_range(item, "Pod", &requests, &limits, &mut errors);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(forbidden("pods", pod, errors))
        }
    }

    /// LimitRanger for a new claim: its storage request against the
    /// ranges.
    pub(super) async fn limit_claim(&self, ns: &str, claim: &Value) -> Result<(), ApiError> {
        let items: Vec<Value> = self
            .limit_items(ns)
            .await?
            .into_iter()
            .filter(|l| l.get("type").and_then(Value::as_str) == Some("PersistentVolumeClaim"))
            .collect();
        let requests = resources_of(claim.get("spec").unwrap_or(&Value::Null), "requests");
        let mut errors = Vec::new();
        for item in &items {
            // A claim's limit is its request.
            check_range(
                item,
                "PersistentVolumeClaim",
                &requests,
                &requests,
                &mut errors,
            );
        }
        // The same words as upstream, where "limit" is the request.
        let errors: Vec<String> = errors
            .into_iter()
            .map(|e| {
                e.replace(", but limit is", ", but request is")
                    .replace("No limit is specified", "No request is specified")
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(forbidden("persistentvolumeclaims", claim, errors))
        }
    }

    /// ResourceQuota for a new object of `r` in `ns`: the guards and side
    /// writes that charge it to the namespace's quotas, or the 403.
    pub(super) async fn charge_quota(
        &self,
        r: &Resource,
        ns: &str,
        obj: &Value,
    ) -> Result<(Vec<Guard>, Vec<Side>), ApiError> {
        let none = (Vec::new(), Vec::new());
        if !r.namespaced || !r.stored() || r.is("", "resourcequotas") && ns.is_empty() {
            return Ok(none);
        }
        let delta = usage::usage(r.group, r.plural, obj);
        if delta.is_empty() {
            return Ok(none);
        }
        if !self.policies.quotas.may_have(ns) {
            return Ok(none);
        }
        let quotas = self.in_namespace("", "resourcequotas", ns).await?;
        if quotas.is_empty() {
            return Ok(none);
        }
        // What the namespace's objects of this kind use now.
        let mut used = Usage::new();
        for item in self.in_namespace(r.group, r.plural, ns).await? {
            let Ok(o) = serde_json::from_slice::<Value>(&item.value) else {
                continue;
            };
            for (k, v) in usage::usage(r.group, r.plural, &o) {
                *used.entry(k).or_default() += v;
            }
        }
        let (mut guards, mut sides) = (Vec::new(), Vec::new());
        for item in quotas {
            let Ok(mut quota) = serde_json::from_slice::<Value>(&item.value) else {
                continue;
            };
            let name = str_at(&quota, "/metadata/name").to_string();
            let hard = usage::amounts(quota.pointer("/spec/hard"));
            let touched: Vec<&String> = delta.keys().filter(|k| hard.contains_key(*k)).collect();
            if touched.is_empty() {
                continue;
            }
            if r.is("", "pods") {
                let missing = usage::unspecified(obj, &hard);
                if !missing.is_empty() {
                    return Err(ApiError::forbidden(
                        "",
                        r.plural,
                        str_at(obj, "/metadata/name"),
                        &format!("failed quota: {name}: must specify {}", missing.join("; ")),
                    ));
                }
            }
            let pick = |from: &Usage| -> Usage {
                from.iter()
                    .filter(|(k, _)| touched.contains(k))
                    .map(|(k, v)| (k.clone(), *v))
                    .collect()
            };
            let now = pick(&used);
            let over: Vec<&String> = touched
                .iter()
                .copied()
                .filter(|k| now.get(*k).copied().unwrap_or(0.0) + delta[*k] > hard[*k] + 1e-9)
                .collect();
            if !over.is_empty() {
                let only = |from: &Usage| -> Usage {
                    over.iter()
                        .map(|k| ((*k).clone(), from.get(*k).copied().unwrap_or(0.0)))
                        .collect()
                };
                return Err(ApiError::forbidden(
                    "",
                    r.plural,
                    str_at(obj, "/metadata/name"),
                    &format!(
                        "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
                        usage::pretty(&only(&delta)),
                        usage::pretty(&only(&now)),
                        usage::pretty(&only(&hard)),
                    ),
                ));
            }
            // The quota's usage with this object, written with it.
            let mut status_used = quota
                .pointer("/status/used")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            for k in &touched {
                let total = now.get(*k).copied().unwrap_or(0.0) + delta[*k];
                status_used.insert((*k).clone(), json!(usage::format(k, total)));
            }
            quota["status"] = json!({"hard": quota.pointer("/spec/hard"), "used": status_used});
            let key = item.key.clone();
            guards.push(Guard::Unchanged(key.clone(), item.mod_revision));
            sides.push(Side::Put(key, super::objects::encode(&quota)));
        }
        Ok((guards, sides))
    }
}
