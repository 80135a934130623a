//! DaemonSet: one pod per eligible node (node selector, required node
//! affinity and taints, with the tolerations upstream adds to daemon
//! pods), placed on its node directly; pods on nodes that stopped being
//! eligible are removed; a template change rolls pods over at most
//! `maxUnavailable` at a time (or waits for deletion with `OnDelete`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::deployment::template_hash;
use super::replicaset::{delete_pod, pod_from_template, pods_by_owner};
use crate::fit::{affinity_matches, selector_matches, untolerated_taint};
use crate::informer::{Wake, next_pass, ready, reflect};
use crate::meta::{availability, is_active, is_ready, name_of, ns_of, owner_ref};

const HASH_LABEL: &str = "controller-revision-hash";

/// The tolerations the upstream DaemonSet controller adds to its pods.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ]
}

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (dss, _a) = reflect(Api::<DaemonSet>::all(client.clone()), notify.clone());
    let (nodes, _b) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    let (pods, _c) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&dss).await;
    ready(&nodes).await;
    ready(&pods).await;
    let mut exp = super::replicaset::Expectations::default();
    let mut wake = Wake::default();
    loop {
        next_pass("daemonset", &notify, Duration::from_secs(15)).await;
        let by_owner = pods_by_owner(&pods.state());
        let all_nodes = nodes.state();
        for ds in dss.state() {
            let owned = by_owner
                .get(ds.metadata.uid.as_deref().unwrap_or_default())
                .cloned()
                .unwrap_or_default();
            if let Some(left) = reconcile(&client, &ds, &all_nodes, owned, &mut exp).await {
                wake.after(&notify, left);
            }
        }
    }
}

async fn reconcile(
    client: &Client,
    ds: &DaemonSet,
    nodes: &[Arc<Node>],
    owned: Vec<Arc<Pod>>,
    exp: &mut super::replicaset::Expectations,
) -> Option<Duration> {
    let (name, ns) = (name_of(&ds.metadata), ns_of(&ds.metadata));
    let uid = ds.metadata.uid.clone().unwrap_or_default();
    let spec = &ds.spec;
    let mut template = spec.template.clone();
    let hash = template_hash(&serde_json::to_value(&template).unwrap_or_default());
    let pod_spec = template.spec.get_or_insert_with(Default::default);
    let mut tolerations = pod_spec.tolerations.clone().unwrap_or_default();
    tolerations.extend(daemon_tolerations());
    pod_spec.tolerations = Some(tolerations.clone());
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.clone());

    let probe = Pod {
        spec: template.spec.clone(),
        ..Default::default()
    };
    let eligible: Vec<&str> = nodes
        .iter()
        .filter(|n| {
            selector_matches(&probe, n)
                && affinity_matches(&probe, n)
                && untolerated_taint(&tolerations, n).is_none()
        })
        .map(|n| name_of(&n.metadata))
        .collect();
    let active: Vec<Arc<Pod>> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let mut on_node: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
    for p in &active {
        on_node
            .entry(
                p.spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .unwrap_or_default(),
            )
            .or_default()
            .push(p);
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let delete = |p: &Arc<Pod>| {
        let api = pods_api.clone();
        let pname = name_of(&p.metadata).to_string();
        async move { delete_pod(&api, &pname).await }
    };
    if ds.metadata.deletion_timestamp.is_none() && exp.satisfied(&uid, &owned) {
        let owner = owner_ref(ds);
        for node in &eligible {
            if on_node.get(node).is_none_or(Vec::is_empty)
                && let Some(owner) = owner.clone()
            {
                let pod = pod_from_template(&template, owner, ns, Some(node));
                match pods_api.create(&PostParams::default(), &pod).await {
                    Ok(p) => {
                        exp.created(&uid, p.metadata.name.unwrap_or_default());
                        info!(daemonset = %format!("{ns}/{name}"), node = %node, "daemon pod created");
                    }
                    Err(e) => {
                        warn!(daemonset = %name, node = %node, error = %e, "creating a daemon pod failed")
                    }
                }
            }
        }
        for (node, pods) in &on_node {
            let surplus = if eligible.contains(node) {
                pods.len().saturating_sub(1)
            } else {
                pods.len()
            };
            for p in pods.iter().take(surplus) {
                if delete(p).await {
                    exp.deleted(&uid, name_of(&p.metadata).to_string());
                }
            }
        }
        if spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            != Some("OnDelete")
        {
            let max_unavailable = match spec
                .update_strategy
                .as_ref()
                .and_then(|s| s.rolling_update.as_ref())
                .and_then(|r| r.max_unavailable.clone())
            {
                Some(IntOrString::Int(n)) => n.max(1) as usize,
                Some(IntOrString::String(s)) => {
                    ((s.trim_end_matches('%').parse::<f64>().unwrap_or(0.0) * eligible.len() as f64
                        / 100.0) as usize)
                        .max(1)
                }
                None => 1,
            };
            let unavailable = eligible
                .iter()
                .filter(|n| {
                    !on_node
                        .get(*n)
                        .is_some_and(|ps| ps.iter().any(|p| is_ready(p)))
                })
                .count();
            let mut outdated: Vec<&&Arc<Pod>> = on_node
                .iter()
                .filter(|(n, _)| eligible.contains(n))
                .flat_map(|(_, ps)| ps.iter())
                .filter(|p| {
                    p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) != Some(&hash)
                })
                .collect();
            outdated.sort_by_key(|p| is_ready(p));
            let budget = max_unavailable.saturating_sub(unavailable)
                + outdated.iter().filter(|p| !is_ready(p)).count();
            for p in outdated.into_iter().take(budget) {
                if delete(p).await {
                    exp.deleted(&uid, name_of(&p.metadata).to_string());
                }
            }
        }
    }
    let scheduled = eligible.iter().filter(|n| on_node.contains_key(*n)).count();
    let ready_n = eligible
        .iter()
        .filter(|n| {
            on_node
                .get(*n)
                .is_some_and(|ps| ps.iter().any(|p| is_ready(p)))
        })
        .count();
    let updated = active
        .iter()
        .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash))
        .count();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let now = jiff::Timestamp::now();
    let mut recheck: Option<Duration> = None;
    let available_n = eligible
        .iter()
        .filter(|n| {
            on_node.get(*n).is_some_and(|ps| {
                ps.iter().any(|p| match availability(p, min_ready, now) {
                    (true, _) => true,
                    (false, left) => {
                        if let Some(l) = left {
                            recheck = Some(recheck.map_or(l, |r: Duration| r.min(l)));
                        }
                        false
                    }
                })
            })
        })
        .count();
    let misscheduled = on_node.keys().filter(|n| !eligible.contains(n)).count();
    let status = json!({
        "desiredNumberScheduled": eligible.len(),
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": ready_n,
        "numberAvailable": available_n,
        "numberUnavailable": eligible.len() - available_n.min(eligible.len()),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation,
    });
    let cur = serde_json::to_value(&ds.status).unwrap_or_default();
    let changed = [
        "desiredNumberScheduled",
        "currentNumberScheduled",
        "numberMisscheduled",
        "numberReady",
        "numberAvailable",
        "updatedNumberScheduled",
        "observedGeneration",
    ]
    .iter()
    .any(|k| cur.get(*k).cloned().unwrap_or(json!(0)) != status[*k]);
    if changed {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        crate::informer::write_status(&api, name, status).await;
    }
    recheck
}
