//! Deployment: one ReplicaSet per pod template (named by the template's
//! hash, labelled `pod-template-hash`, numbered by the
//! `deployment.kubernetes.io/revision` annotation that `kubectl rollout
//! history/undo` read), a rolling update bounded by maxSurge and
//! maxUnavailable or a Recreate, old ReplicaSets pruned to
//! `revisionHistoryLimit`, and the status `kubectl rollout status` waits on.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::informer::{Wake, next_pass, ready, reflect};
use crate::meta::{controller_of, name_of, ns_of, owner_ref};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";

/// Serialises with object keys sorted, so equal templates hash equally.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for k in keys {
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k], out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for x in a {
                canonical(x, out);
                out.push(',');
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The template's hash as upstream spells it: FNV-1a over the template,
/// its decimal digits mapped to a vowel-free alphabet.
pub fn template_hash(template: &Value) -> String {
    let mut text = String::new();
    canonical(template, &mut text);
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect()
}

/// A template without the hash label, for comparing a ReplicaSet's
/// template with the Deployment's.
fn without_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(Value::Object(labels)) = t.pointer_mut("/metadata/labels") {
        labels.remove(HASH_LABEL);
    }
    t
}

/// maxSurge / maxUnavailable against `replicas`: percentages round surge
/// up and unavailability down, and both zero means one unavailable.
pub fn resolve(
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
    replicas: i32,
) -> (i32, i32) {
    let value = |v: Option<&IntOrString>, default: &str, up: bool| -> i32 {
        let v = v.cloned().unwrap_or(IntOrString::String(default.into()));
        match v {
            IntOrString::Int(n) => n,
            IntOrString::String(s) => {
                let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
                let x = pct * f64::from(replicas) / 100.0;
                if up {
                    x.ceil() as i32
                } else {
                    x.floor() as i32
                }
            }
        }
    };
    let s = value(surge, "25%", true).max(0);
    let mut u = value(unavailable, "25%", false).max(0);
    if s == 0 && u == 0 {
        u = 1;
    }
    (s, u.min(replicas.max(0)))
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status.as_ref().map_or((0, 0, 0), |s| {
        (
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        )
    })
}

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (deps, _a) = reflect(Api::<Deployment>::all(client.clone()), notify.clone());
    let (rss, _b) = reflect(Api::<ReplicaSet>::all(client.clone()), notify.clone());
    ready(&deps).await;
    ready(&rss).await;
    let mut wake = Wake::default();
    loop {
        next_pass("deployment", &notify, Duration::from_secs(10)).await;
        let all_rs = rss.state();
        for d in deps.state() {
            let uid = d.metadata.uid.as_deref().unwrap_or_default();
            let mut owned: Vec<ReplicaSet> = all_rs
                .iter()
                .filter(|rs| controller_of(&rs.metadata).is_some_and(|o| o.uid == uid))
                .map(|rs| (**rs).clone())
                .collect();
            owned.sort_by_key(revision);
            match reconcile(&client, &d, owned).await {
                Ok(Some(left)) => wake.after(&notify, left),
                Ok(None) => {}
                Err(e) => {
                    warn!(deployment = %name_of(&d.metadata), error = %e, "reconcile failed");
                }
            }
        }
    }
}

async fn merge_patch(
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    patch: Value,
) -> Result<(), kube::Error> {
    api.patch(
        name_of(&rs.metadata),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(drop)
}

async fn scale(
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    to: i32,
    max: i32,
) -> Result<(), kube::Error> {
    let name = name_of(&rs.metadata);
    let patch = json!({
        "metadata": {"annotations": {"deployment.kubernetes.io/desired-replicas": to.to_string(), "deployment.kubernetes.io/max-replicas": max.to_string()}},
        "spec": {"replicas": to}
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    info!(replicaset = %name, from = spec_replicas(rs), to, "scaled");
    Ok(())
}

/// One pass over a Deployment; returns when to look again for a pending
/// progress deadline.
async fn reconcile(
    client: &Client,
    d: &Deployment,
    mut owned: Vec<ReplicaSet>,
) -> Result<Option<Duration>, kube::Error> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let (name, ns) = (name_of(&d.metadata), ns_of(&d.metadata));
    let spec = &d.spec;
    let replicas = spec.replicas.unwrap_or(1);
    let template = serde_json::to_value(&spec.template).unwrap_or_default();
    let hash = template_hash(&template);
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let max_rev = owned.iter().map(revision).max().unwrap_or(0);
    let rolling = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) != Some("Recreate");
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let (surge, unavailable) = if rolling {
        resolve(
            ru.and_then(|r| r.max_surge.as_ref()),
            ru.and_then(|r| r.max_unavailable.as_ref()),
            replicas,
        )
    } else {
        (0, replicas)
    };

    let new_idx = owned.iter().position(|rs| {
        rs.spec
            .template
            .as_ref()
            .map(|t| without_hash(&serde_json::to_value(t).unwrap_or_default()))
            == Some(without_hash(&template))
    });
    let Some(new_idx) = new_idx else {
        // A new template: a new ReplicaSet, started at what the strategy allows.
        let total: i32 = owned.iter().map(spec_replicas).sum();
        let old_pods: i32 = owned.iter().map(|rs| status_of(rs).0).sum();
        let start = if rolling {
            (replicas + surge - total).clamp(0, replicas)
        } else if old_pods == 0 && total == 0 {
            replicas
        } else {
            0
        };
        let mut tmpl = spec.template.clone();
        let meta = tmpl.metadata.get_or_insert_with(Default::default);
        meta.labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut annotations = d.metadata.annotations.clone().unwrap_or_default();
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        annotations.insert(REVISION.into(), (max_rev + 1).to_string());
        annotations.insert(
            "deployment.kubernetes.io/desired-replicas".into(),
            replicas.to_string(),
        );
        annotations.insert(
            "deployment.kubernetes.io/max-replicas".into(),
            (replicas + surge).to_string(),
        );
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{hash}")),
                namespace: Some(ns.into()),
                labels: meta.labels.clone(),
                annotations: Some(annotations),
                owner_references: owner_ref(d).map(|o| vec![o]),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(start),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(tmpl),
            },
            status: None,
        };
        match rs_api.create(&PostParams::default(), &rs).await {
            Ok(_) => {
                info!(deployment = %format!("{ns}/{name}"), replicaset = %format!("{name}-{hash}"), revision = max_rev + 1, "new replicaset")
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
        return Ok(None);
    };
    let new = owned.remove(new_idx);
    let new_rev = revision(&new);
    if new_rev < max_rev {
        // Rolled back to an older template: it becomes the newest revision.
        let patch = json!({"metadata": {"annotations": {REVISION: (max_rev + 1).to_string()}}});
        merge_patch(&rs_api, &new, patch).await?;
        return Ok(None);
    }
    if new.spec.min_ready_seconds != spec.min_ready_seconds {
        // minReadySeconds is not part of the template; the new ReplicaSet
        // follows the Deployment's.
        let patch = json!({"spec": {"minReadySeconds": spec.min_ready_seconds}});
        merge_patch(&rs_api, &new, patch).await?;
    }
    let old = owned;
    if spec.paused != Some(true) {
        let all_spec: i32 = old.iter().map(spec_replicas).sum::<i32>() + spec_replicas(&new);
        if rolling {
            let new_spec = spec_replicas(&new);
            if new_spec > replicas {
                scale(&rs_api, &new, replicas, replicas + surge).await?;
            } else if new_spec < replicas {
                let room = replicas + surge - all_spec;
                if room > 0 {
                    scale(
                        &rs_api,
                        &new,
                        (new_spec + room).min(replicas),
                        replicas + surge,
                    )
                    .await?;
                }
            }
            let min_available = replicas - unavailable;
            let (_, _, new_avail) = status_of(&new);
            let new_unavailable = (spec_replicas(&new) - new_avail).max(0);
            let all_avail: i32 = old.iter().map(|rs| status_of(rs).2).sum::<i32>() + new_avail;
            let old_unhealthy: i32 = old
                .iter()
                .map(|rs| (spec_replicas(rs) - status_of(rs).2).max(0))
                .sum();
            let mut budget = (all_spec - min_available - new_unavailable)
                .min((all_avail - min_available).max(0) + old_unhealthy)
                .max(0);
            for rs in &old {
                if budget == 0 {
                    break;
                }
                let cur = spec_replicas(rs);
                if cur == 0 {
                    continue;
                }
                let take = cur.min(budget);
                scale(&rs_api, rs, cur - take, replicas + surge).await?;
                budget -= take;
            }
        } else {
            let old_running = old.iter().any(|rs| spec_replicas(rs) > 0);
            for rs in old.iter().filter(|rs| spec_replicas(rs) > 0) {
                scale(&rs_api, rs, 0, replicas).await?;
            }
            let old_pods: i32 = old.iter().map(|rs| status_of(rs).0).sum();
            if !old_running && old_pods == 0 && spec_replicas(&new) != replicas {
                scale(&rs_api, &new, replicas, replicas).await?;
            }
        }
    }
    // History: only empty old ReplicaSets beyond the limit go.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let empty: Vec<&ReplicaSet> = old
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
        .collect();
    if empty.len() > limit {
        for rs in &empty[..empty.len() - limit] {
            let _ = rs_api
                .delete(name_of(&rs.metadata), &DeleteParams::background())
                .await;
        }
    }
    update_status(client, d, &new, &old, replicas, unavailable, new_rev).await
}

async fn update_status(
    client: &Client,
    d: &Deployment,
    new: &ReplicaSet,
    old: &[ReplicaSet],
    replicas: i32,
    unavailable: i32,
    new_rev: i64,
) -> Result<Option<Duration>, kube::Error> {
    let (name, ns) = (name_of(&d.metadata), ns_of(&d.metadata));
    let all = || old.iter().chain(std::iter::once(new));
    let total: i32 = all().map(|rs| status_of(rs).0).sum();
    let ready_n: i32 = all().map(|rs| status_of(rs).1).sum();
    let avail: i32 = all().map(|rs| status_of(rs).2).sum();
    let updated = status_of(new).0;
    let complete = updated == replicas
        && avail >= replicas
        && total == replicas
        && spec_replicas(new) == replicas;
    let rs_name = name_of(&new.metadata);
    let now = crate::meta::now();
    let keep_time = |ty: &str, status: &str| -> String {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_.as_deref() == Some(ty) && c.status.as_deref() == Some(status))
            })
            .and_then(|c| c.last_transition_time.as_ref())
            .map_or(now.clone(), |t| {
                t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
            })
    };
    let available_ok = avail >= replicas - unavailable;
    let (a_status, a_reason, a_msg) = if available_ok {
        (
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        )
    } else {
        (
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        )
    };
    let old_total: i32 = old.iter().map(|rs| status_of(rs).0).sum();
    let progressing = progressing(
        d,
        rs_name,
        Counts {
            updated,
            ready: ready_n,
            available: avail,
            old: old_total,
        },
        complete,
        jiff::Timestamp::now(),
    );
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready_n,
        "availableReplicas": avail,
        "unavailableReplicas": (replicas - avail).max(0),
        "conditions": [
            {"type": "Available", "status": a_status, "reason": a_reason, "message": a_msg, "lastUpdateTime": now, "lastTransitionTime": keep_time("Available", a_status)},
            {"type": "Progressing", "status": progressing.status, "reason": progressing.reason, "message": progressing.message, "lastUpdateTime": progressing.last_update, "lastTransitionTime": keep_time("Progressing", progressing.status)},
        ]
    });
    let cur = d.status.as_ref();
    let same = cur.is_some_and(|s| {
        s.observed_generation == d.metadata.generation
            && s.replicas.unwrap_or(0) == total
            && s.updated_replicas.unwrap_or(0) == updated
            && s.ready_replicas.unwrap_or(0) == ready_n
            && s.available_replicas.unwrap_or(0) == avail
            && s.conditions.as_ref().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_.as_deref() == Some("Progressing")
                        && c.status.as_deref() == Some(progressing.status)
                        && c.reason.as_deref() == Some(progressing.reason)
                        && c.message.as_deref() == Some(progressing.message.as_str())
                }) && cs.iter().any(|c| {
                    c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some(a_status)
                })
            })
    });
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let rev_now = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .cloned();
    if rev_now != Some(new_rev.to_string()) {
        let patch = json!({"metadata": {"annotations": {REVISION: new_rev.to_string()}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    if !same {
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    }
    Ok(progressing.deadline_in)
}

/// The counts a rollout's progress is judged by.
#[derive(Clone, Copy)]
struct Counts {
    updated: i32,
    ready: i32,
    available: i32,
    /// Pods of the old ReplicaSets.
    old: i32,
}

/// The Progressing condition to write.
struct Progressing {
    status: &'static str,
    reason: &'static str,
    message: String,
    last_update: String,
    /// Time left before progressDeadlineSeconds runs out, if it is running.
    deadline_in: Option<Duration>,
}

/// Upstream's rules for the Progressing condition: a paused Deployment is
/// Unknown; a finished rollout is True (NewReplicaSetAvailable); any
/// progress (more updated, ready or available pods, fewer old ones, a new
/// ReplicaSet, a new spec) is True (ReplicaSetUpdated) and restarts the
/// clock; no progress for progressDeadlineSeconds since the last is False
/// (ProgressDeadlineExceeded), which `kubectl rollout status` reports as a
/// failed rollout.
fn progressing(
    d: &Deployment,
    rs_name: &str,
    now_counts: Counts,
    complete: bool,
    now: jiff::Timestamp,
) -> Progressing {
    let stamp = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let status = d.status.as_ref();
    let prev = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter()
            .find(|c| c.type_.as_deref() == Some("Progressing"))
    });
    let prev_reason = prev.and_then(|c| c.reason.as_deref()).unwrap_or_default();
    let prev_update = prev.and_then(|c| c.last_update_time.as_ref()).map(|t| t.0);
    let moved = |last_update: String| Progressing {
        status: "True",
        reason: "ReplicaSetUpdated",
        message: format!("ReplicaSet \"{rs_name}\" is progressing."),
        last_update,
        deadline_in: None,
    };
    if d.spec.paused == Some(true) {
        return Progressing {
            status: "Unknown",
            reason: "DeploymentPaused",
            message: "Deployment is paused".into(),
            last_update: stamp(now),
            deadline_in: None,
        };
    }
    if complete {
        return Progressing {
            status: "True",
            reason: "NewReplicaSetAvailable",
            message: format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            last_update: prev_update
                .filter(|_| prev_reason == "NewReplicaSetAvailable")
                .map_or_else(|| stamp(now), stamp),
            deadline_in: None,
        };
    }
    // The counts at the last status write.
    let was = status.map_or(
        Counts {
            updated: 0,
            ready: 0,
            available: 0,
            old: 0,
        },
        |s| Counts {
            updated: s.updated_replicas.unwrap_or(0),
            ready: s.ready_replicas.unwrap_or(0),
            available: s.available_replicas.unwrap_or(0),
            old: s.replicas.unwrap_or(0) - s.updated_replicas.unwrap_or(0),
        },
    );
    let progressed = prev.is_none()
        || prev_reason == "DeploymentPaused"
        || prev_reason == "NewReplicaSetAvailable"
        || !prev
            .and_then(|c| c.message.as_deref())
            .is_some_and(|m| m.contains(&format!("\"{rs_name}\"")))
        || status.and_then(|s| s.observed_generation) != d.metadata.generation
        || now_counts.updated > was.updated
        || now_counts.ready > was.ready
        || now_counts.available > was.available
        || now_counts.old < was.old;
    let deadline = d
        .spec
        .progress_deadline_seconds
        .filter(|s| *s > 0 && *s < i32::MAX);
    if progressed {
        let mut p = moved(stamp(now));
        p.deadline_in = deadline.map(|s| Duration::from_secs(s.unsigned_abs().into()));
        return p;
    }
    if prev_reason == "ProgressDeadlineExceeded" {
        return Progressing {
            status: "False",
            reason: "ProgressDeadlineExceeded",
            message: format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            last_update: prev_update.map_or_else(|| stamp(now), stamp),
            deadline_in: None,
        };
    }
    let since = prev_update.unwrap_or(now);
    match deadline {
        Some(secs) => {
            let due = since + jiff::SignedDuration::from_secs(i64::from(secs));
            if due <= now {
                Progressing {
                    status: "False",
                    reason: "ProgressDeadlineExceeded",
                    message: format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
                    last_update: stamp(now),
                    deadline_in: None,
                }
            } else {
                let mut p = moved(stamp(since));
                p.deadline_in = Some(now.duration_until(due).unsigned_abs());
                p
            }
        }
        None => moved(stamp(since)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_and_unavailability() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(resolve(Some(&pct("25%")), Some(&pct("25%")), 10), (3, 2));
        assert_eq!(
            resolve(Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0)), 3),
            (0, 1)
        );
        assert_eq!(resolve(None, None, 1), (1, 0));
        assert_eq!(
            resolve(Some(&IntOrString::Int(1)), Some(&IntOrString::Int(5)), 2),
            (1, 2)
        );
    }

    #[test]
    fn progress_deadline() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "d", "generation": 2},
            "spec": {"selector": {}, "template": {}, "progressDeadlineSeconds": 60},
            "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 0,
                "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                    "message": "ReplicaSet \"d-1\" is progressing.", "lastUpdateTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("deployment");
        let same = Counts {
            updated: 2,
            ready: 0,
            available: 0,
            old: 0,
        };
        let at = |s: &str| s.parse::<jiff::Timestamp>().expect("time");
        let p = progressing(&d, "d-1", same, false, at("2026-01-01T00:00:45Z"));
        assert_eq!((p.status, p.reason), ("True", "ReplicaSetUpdated"));
        assert_eq!(
            p.last_update, "2026-01-01T00:00:00Z",
            "no progress keeps the clock"
        );
        assert_eq!(p.deadline_in, Some(Duration::from_secs(15)));
        let p = progressing(&d, "d-1", same, false, at("2026-01-01T00:01:01Z"));
        assert_eq!((p.status, p.reason), ("False", "ProgressDeadlineExceeded"));
        // A pod turning ready is progress: the clock restarts.
        let more = Counts { ready: 1, ..same };
        let p = progressing(&d, "d-1", more, false, at("2026-01-01T00:01:01Z"));
        assert_eq!(
            (p.status, p.last_update.as_str()),
            ("True", "2026-01-01T00:01:01Z")
        );
        // A new ReplicaSet is progress too.
        let p = progressing(&d, "d-2", same, false, at("2026-01-01T00:01:01Z"));
        assert_eq!(p.status, "True");
    }

    #[test]
    fn hash_ignores_key_order_and_changes_with_content() {
        let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "x", "image": "i:1"}]}});
        let b = json!({"spec": {"containers": [{"image": "i:1", "name": "x"}]}, "metadata": {"labels": {"b": "2", "a": "1"}}});
        let c = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"containers": [{"name": "x", "image": "i:2"}]}});
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_ne!(template_hash(&a), template_hash(&c));
        assert!(template_hash(&a).bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
