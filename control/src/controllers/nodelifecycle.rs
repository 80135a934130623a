//! Node lifecycle: a node whose Lease (in `kube-node-lease`) has not been
//! renewed within the grace period gets `Ready=Unknown`, the
//! `node.kubernetes.io/unreachable` NoSchedule and NoExecute taints, and
//! its pods marked not ready; once the eviction timeout has passed (or a
//! pod's own `tolerationSeconds` for that taint), its pods are deleted so
//! their controllers replace them elsewhere. A node whose Lease is renewed
//! again loses the taints. A node that reports `Ready=False` (a kubelet
//! without a pod network, say) gets `node.kubernetes.io/not-ready`
//! NoSchedule until it is Ready, as upstream taints nodes by condition.
//!
//! Silence is measured on this controller's own clock from when it last
//! saw a node's sign of life change (upstream's probe timestamp), not from
//! the Lease's wall-clock time: a node first seen (this replica just
//! started, or took the lead) gets a whole grace period, and so does every
//! node after a read of a Lease that could not reach the apiserver. An
//! outage of the control plane itself is not counted against the nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::Settings;
use crate::informer::{next_pass, ready, reflect};
use crate::meta::{name_of, ns_of};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// The node's taints with the not-ready NoSchedule taint added (`on`) or
/// removed; None when that changes nothing.
fn with_not_ready(node: &Node, on: bool, now: Timestamp) -> Option<Vec<Taint>> {
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let has = taints
        .iter()
        .any(|t| t.key == NOT_READY && t.effect == "NoSchedule");
    match (on, has) {
        (true, false) => {
            let mut t = taints;
            t.push(Taint {
                key: NOT_READY.into(),
                effect: "NoSchedule".into(),
                time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
                value: None,
            });
            Some(t)
        }
        (false, true) => Some(taints.into_iter().filter(|t| t.key != NOT_READY).collect()),
        _ => None,
    }
}

/// The last sign of life: the Lease's renewTime, else the Ready
/// condition's heartbeat, else the node's creation.
fn last_seen(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let renew = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let heartbeat = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [renew, heartbeat, created].into_iter().flatten().max()
}

/// How long a fresh read of a Lease may take before it counts as having
/// waited out an outage (the client retries unavailable answers).
const OUTAGE: Duration = Duration::from_secs(5);

/// A node's last sign of life as this controller saw it change.
struct Heard {
    value: Option<Timestamp>,
    at: Instant,
}

/// Notes `value` for `node`; whether the node has been silent for longer
/// than `grace` on this controller's clock.
fn silent_for(
    heard: &mut HashMap<String, Heard>,
    node: &str,
    value: Option<Timestamp>,
    now: Instant,
    grace: Duration,
) -> bool {
    let h = heard
        .entry(node.to_string())
        .or_insert(Heard { value, at: now });
    if h.value != value {
        *h = Heard { value, at: now };
    }
    now.duration_since(h.at) > grace
}

fn ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

fn unreachable_since(node: &Node) -> Option<Timestamp> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .find(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
        .map(|t| t.time_added.as_ref().map_or_else(Timestamp::now, |x| x.0))
}

/// How long `pod` stays on an unreachable node: its own toleration of the
/// taint, or `default`. `None` means it tolerates it forever.
fn tolerated_for(pod: &Pod, default: Duration) -> Option<Duration> {
    let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_ref());
    for t in tolerations.into_iter().flatten() {
        let key_ok = t.key.as_deref().is_none_or(|k| k == UNREACHABLE)
            && (t.key.is_some() || t.operator.as_deref() == Some("Exists"));
        let effect_ok = t.effect.as_deref().is_none_or(|e| e == "NoExecute");
        if key_ok && effect_ok {
            return t
                .toleration_seconds
                .map(|s| Duration::from_secs(s.max(0) as u64));
        }
    }
    Some(default)
}

/// Replaces the node's taints; a failure is logged (the next pass retries).
async fn set_taints(api: &Api<Node>, name: &str, taints: Vec<Taint>, doing: &str) {
    let patch = json!({"spec": {"taints": taints}});
    if let Err(e) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        warn!(node = %name, error = %e, "{doing} failed");
    }
}

fn stamp(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub async fn run(client: Client, settings: Settings) {
    let notify = Arc::new(Notify::new());
    let (nodes, _a) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    // Pod and Lease changes alone never need a pass before the next tick:
    // silence is measured in time, not in events.
    let quiet = Arc::new(Notify::new());
    let (leases, _b) = reflect(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
        quiet.clone(),
    );
    let (pods, _c) = reflect(Api::<Pod>::all(client.clone()), quiet.clone());
    ready(&nodes).await;
    ready(&leases).await;
    ready(&pods).await;
    let nodes_api: Api<Node> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let tick = Duration::from_secs(1)
        .min(settings.node_grace / 4)
        .max(Duration::from_millis(200));
    let mut heard: HashMap<String, Heard> = HashMap::new();
    let mut outage = false;
    loop {
        next_pass("node-lifecycle", &notify, tick).await;
        let mut clock = Instant::now();
        let now = Timestamp::now();
        let mut by_node: std::collections::HashMap<String, Vec<Arc<Pod>>> =
            std::collections::HashMap::new();
        for p in pods.state() {
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                by_node.entry(n).or_default().push(p);
            }
        }
        let present: std::collections::HashSet<String> = nodes
            .state()
            .iter()
            .map(|n| name_of(&n.metadata).to_string())
            .collect();
        heard.retain(|n, _| present.contains(n));
        for node in nodes.state() {
            let name = name_of(&node.metadata).to_string();
            let lease = leases.get(&ObjectRef::new(&name).within("kube-node-lease"));
            let Some(seen) = last_seen(&node, lease.as_deref()) else {
                continue;
            };
            let mut silent = silent_for(&mut heard, &name, Some(seen), clock, settings.node_grace);
            // The caches may lag (a watch backing off after an outage):
            // a node is judged silent only on a fresh read of its Lease.
            // A read that fails, or that the client got only after
            // retrying through unavailable answers, is an outage of the
            // control plane: no node is judged during it, and after it
            // every node gets a whole grace period.
            if silent && ready_status(&node).as_deref() != Some("Unknown") {
                let asked = Instant::now();
                match leases_api.get_opt(&name).await {
                    Ok(fresh) => {
                        if std::mem::take(&mut outage) || asked.elapsed() > OUTAGE {
                            info!(
                                "the apiserver answers again: every node gets a whole grace period"
                            );
                            heard.clear();
                            // The pass's clock is from before the wait.
                            clock = Instant::now();
                        }
                        let seen = last_seen(&node, fresh.as_ref());
                        silent = silent_for(&mut heard, &name, seen, clock, settings.node_grace);
                    }
                    Err(e) => {
                        if !outage {
                            warn!(node = %name, error = %e, "the apiserver does not answer: no node is judged until it does");
                        }
                        outage = true;
                        continue;
                    }
                }
            }
            let tainted = unreachable_since(&node);
            let on_node: Vec<&Arc<Pod>> = by_node.get(&name).into_iter().flatten().collect();
            if silent && ready_status(&node).as_deref() != Some("Unknown") {
                info!(node = %name, "node stopped renewing its lease: NotReady");
                let cond = json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status.", "lastTransitionTime": stamp(now), "lastHeartbeatTime": stamp(seen)});
                if let Err(e) = nodes_api
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Strategic(json!({"status": {"conditions": [cond]}})),
                    )
                    .await
                {
                    warn!(node = %name, error = %e, "marking the node NotReady failed");
                }
                for p in &on_node {
                    let api: Api<Pod> = Api::namespaced(client.clone(), ns_of(&p.metadata));
                    let cond = json!({"type": "Ready", "status": "False", "reason": "NodeNotReady", "lastTransitionTime": stamp(now)});
                    let _ = api
                        .patch_status(
                            name_of(&p.metadata),
                            &PatchParams::default(),
                            &Patch::Strategic(json!({"status": {"conditions": [cond]}})),
                        )
                        .await;
                }
            }
            if silent && tainted.is_none() {
                let mut taints: Vec<Taint> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default();
                for effect in ["NoSchedule", "NoExecute"] {
                    taints.push(Taint {
                        key: UNREACHABLE.into(),
                        effect: effect.into(),
                        time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
                        value: None,
                    });
                }
                set_taints(&nodes_api, &name, taints, "tainting the node").await;
            }
            if !silent && tainted.is_some() {
                let taints: Vec<Taint> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.key != UNREACHABLE)
                    .collect();
                info!(node = %name, "node renewing its lease again: taints removed");
                set_taints(&nodes_api, &name, taints, "removing the taints").await;
            }
            // The unreachable taint's changes land first (the node object
            // read this pass is stale after them).
            if !silent && tainted.is_none() {
                let not_ready = ready_status(&node).as_deref() == Some("False");
                if let Some(taints) = with_not_ready(&node, not_ready, now) {
                    info!(node = %name, not_ready, "not-ready taint {}", if not_ready { "added" } else { "removed" });
                    set_taints(&nodes_api, &name, taints, "updating the not-ready taint").await;
                }
            }
            let Some(since) = tainted.filter(|_| silent) else {
                continue;
            };
            let down_for = now.duration_since(since).unsigned_abs();
            for p in on_node
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                let Some(limit) = tolerated_for(p, settings.eviction_timeout) else {
                    continue;
                };
                if down_for >= limit {
                    let api: Api<Pod> = Api::namespaced(client.clone(), ns_of(&p.metadata));
                    match api
                        .delete(name_of(&p.metadata), &DeleteParams::default())
                        .await
                    {
                        Ok(_) => {
                            info!(node = %name, pod = %format!("{}/{}", ns_of(&p.metadata), name_of(&p.metadata)), "evicted")
                        }
                        Err(e) => warn!(pod = %name_of(&p.metadata), error = %e, "eviction failed"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_from_when_this_controller_saw_a_change() {
        let grace = Duration::from_secs(40);
        let start = Instant::now();
        let mut heard = HashMap::new();
        // A lease renewed long ago, first seen now: a whole grace period.
        let old = Some(Timestamp::UNIX_EPOCH);
        assert!(!silent_for(&mut heard, "n", old, start, grace));
        assert!(!silent_for(&mut heard, "n", old, start + grace, grace));
        assert!(silent_for(
            &mut heard,
            "n",
            old,
            start + grace + Duration::from_secs(1),
            grace
        ));
        // Renewed: heard from again.
        let renewed = Some(Timestamp::now());
        let later = start + grace * 2;
        assert!(!silent_for(&mut heard, "n", renewed, later, grace));
        assert!(!silent_for(
            &mut heard,
            "n",
            renewed,
            later + grace / 2,
            grace
        ));
    }

    fn node(ready: &str, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n"},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    #[test]
    fn the_not_ready_taint_follows_readiness_and_keeps_the_others() {
        let now = Timestamp::now();
        let other = json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]);
        let added = with_not_ready(&node("False", other.clone()), true, now).unwrap();
        assert_eq!(added.len(), 2);
        assert!(
            added
                .iter()
                .any(|t| t.key == NOT_READY && t.effect == "NoSchedule")
        );
        let tainted = node("True", serde_json::to_value(&added).unwrap());
        let removed = with_not_ready(&tainted, false, now).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].key, "dedicated");
        // Nothing to change either way.
        assert!(with_not_ready(&node("True", other), false, now).is_none());
        assert!(with_not_ready(&tainted, true, now).is_none());
    }
}
