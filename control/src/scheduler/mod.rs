//! The scheduler: binds each pending pod (no `spec.nodeName`, scheduler
//! `default-scheduler`) to the best feasible node through `pods/binding`.
//!
//! Filters: node unschedulable, taints vs tolerations, nodeSelector,
//! required node affinity, resource requests vs allocatable, host ports,
//! and the node affinity of the pod's volumes (`volumes.rs`: a
//! `WaitForFirstConsumer` claim gets the chosen node first, and the pod is
//! bound once the claim is).
//! Scores: least allocated (CPU and memory), and spreading pods of the same
//! controller across nodes. A pod that fits nowhere gets
//! `PodScheduled=False/Unschedulable` and a `FailedScheduling` event, and is
//! tried again on every change of nodes or pods. A bound pod is assumed on
//! its node until the pod store shows the binding, so one pass never
//! over-commits a node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Binding, Node, NodeSelector, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
    Taint, Toleration,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use futures::StreamExt;

use crate::fit::{
    affinity_matches, node_selector_matches, selector_matches, tolerates, untolerated_taint,
};
use crate::informer::{next_pass, ready, reflect};
use crate::meta::{controller_of, is_active, name_of, ns_of};
pub use crate::quantity::parse_quantity;

pub mod volumes;

use volumes::Claims;

pub const SCHEDULER_NAME: &str = "default-scheduler";

/// A pod's requests: CPU in millicores, memory in bytes (limits stand in
/// for missing requests; init containers count by their maximum).
pub fn requests(pod: &Pod) -> (i64, i64) {
    let Some(spec) = pod.spec.as_ref() else {
        return (0, 0);
    };
    let of = |c: &k8s_openapi::api::core::v1::Container, res: &str| -> f64 {
        let r = c.resources.as_ref();
        let q = r
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get(res))
            .or_else(|| r.and_then(|r| r.limits.as_ref()).and_then(|m| m.get(res)));
        q.and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0)
    };
    let sum = |res: &str| spec.containers.iter().map(|c| of(c, res)).sum::<f64>();
    let init_max = |res: &str| {
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| of(c, res))
            .fold(0.0, f64::max)
    };
    let cpu = sum("cpu").max(init_max("cpu"));
    let mem = sum("memory").max(init_max("memory"));
    ((cpu * 1000.0).round() as i64, mem.round() as i64)
}

fn host_ports(pod: &Pod) -> Vec<(String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            p.host_port
                .filter(|h| *h > 0)
                .map(|h| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), h))
        })
        .collect()
}

/// One node as the scheduler accounts it.
pub struct NodeInfo {
    pub node: Arc<Node>,
    cpu: i64,
    mem: i64,
    pods: i64,
    used_cpu: i64,
    used_mem: i64,
    used_pods: i64,
    ports: HashSet<(String, i32)>,
    owners: HashMap<String, i64>,
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> Self {
        let status = node.status.as_ref();
        let get = |res: &str| {
            status
                .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
                .and_then(|m| m.get(res))
                .and_then(|q| parse_quantity(&q.0))
        };
        Self {
            cpu: get("cpu").map_or(i64::MAX, |c| (c * 1000.0) as i64),
            mem: get("memory").map_or(i64::MAX, |m| m as i64),
            pods: get("pods").map_or(110, |p| p as i64),
            node,
            used_cpu: 0,
            used_mem: 0,
            used_pods: 0,
            ports: HashSet::new(),
            owners: HashMap::new(),
        }
    }

    pub fn add(&mut self, pod: &Pod) {
        let (c, m) = requests(pod);
        self.used_cpu += c;
        self.used_mem += m;
        self.used_pods += 1;
        self.ports.extend(host_ports(pod));
        if let Some(o) = controller_of(&pod.metadata) {
            *self.owners.entry(o.uid.clone()).or_default() += 1;
        }
    }

    /// Why `pod` cannot go here, as upstream words it.
    pub fn filter(&self, pod: &Pod, needs: &Needs) -> Result<(), String> {
        if self.node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            let taint = Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            };
            if !needs.tolerations.iter().any(|t| tolerates(t, &taint)) {
                return Err("node(s) were unschedulable".into());
            }
        }
        if let Some(t) = untolerated_taint(&needs.tolerations, &self.node) {
            return Err(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or_default()
            ));
        }
        if !selector_matches(pod, &self.node) || !affinity_matches(pod, &self.node) {
            return Err("node(s) didn't match Pod's node affinity/selector".into());
        }
        if !needs
            .volumes
            .iter()
            .all(|sel| node_selector_matches(sel, &self.node))
        {
            return Err("node(s) had volume node affinity conflict".into());
        }
        if self.used_pods + 1 > self.pods {
            return Err("Too many pods".into());
        }
        if needs.cpu > 0 && self.used_cpu.saturating_add(needs.cpu) > self.cpu {
            return Err("Insufficient cpu".into());
        }
        if needs.mem > 0 && self.used_mem.saturating_add(needs.mem) > self.mem {
            return Err("Insufficient memory".into());
        }
        if needs.ports.iter().any(|p| self.ports.contains(p)) {
            return Err("node(s) didn't have free ports for the requested pod ports".into());
        }
        Ok(())
    }

    /// Higher is better: free CPU and memory after placing the pod, minus a
    /// penalty per pod of the same controller already here.
    pub fn score(&self, needs: &Needs) -> i64 {
        let free = |used: i64, cap: i64| -> i64 {
            if cap == i64::MAX || cap == 0 {
                return 100;
            }
            ((cap - used).max(0) as f64 * 100.0 / cap as f64) as i64
        };
        let least_allocated = (free(self.used_cpu + needs.cpu, self.cpu)
            + free(self.used_mem + needs.mem, self.mem))
            / 2;
        let same_owner = needs
            .owner
            .as_ref()
            .and_then(|o| self.owners.get(o))
            .copied()
            .unwrap_or(0);
        let pod_load = free(self.used_pods + 1, self.pods);
        least_allocated + pod_load / 4 - same_owner * 10
    }
}

/// What a pod asks of a node, read once per scheduling attempt.
pub struct Needs {
    cpu: i64,
    mem: i64,
    ports: Vec<(String, i32)>,
    tolerations: Vec<Toleration>,
    owner: Option<String>,
    /// The node affinities of the pod's bound volumes.
    volumes: Vec<NodeSelector>,
}

impl Needs {
    pub fn of(pod: &Pod) -> Self {
        let (cpu, mem) = requests(pod);
        Self {
            cpu,
            mem,
            ports: host_ports(pod),
            tolerations: pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.clone())
                .unwrap_or_default(),
            owner: controller_of(&pod.metadata).map(|o| o.uid.clone()),
            volumes: Vec::new(),
        }
    }
}

/// How many feasible nodes to find before choosing: all of a small
/// cluster, then a shrinking share (upstream's percentageOfNodesToScore:
/// 50% minus 1% per 125 nodes, at least 5%, at least 100 nodes).
pub fn enough(nodes: usize) -> usize {
    if nodes <= 100 {
        return nodes;
    }
    let pct = (50usize.saturating_sub(nodes / 125)).max(5);
    (nodes * pct / 100).max(100)
}

/// The best node for `pod` among the first `enough` feasible ones met
/// from `start` on (the start rotates so that every node gets its turn),
/// or the message of why none fits.
pub fn place(pod: &Pod, nodes: &[NodeInfo], start: usize) -> Result<usize, String> {
    place_with(pod, &Needs::of(pod), nodes, start)
}

/// [`place`] with what the pod needs already read.
fn place_with(pod: &Pod, needs: &Needs, nodes: &[NodeInfo], start: usize) -> Result<usize, String> {
    let want = enough(nodes.len());
    let mut best: Option<(i64, usize)> = None;
    let mut feasible = 0;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        match nodes[i].filter(pod, needs) {
            Ok(()) => {
                let s = nodes[i].score(needs);
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, i));
                }
                feasible += 1;
                if feasible >= want {
                    break;
                }
            }
            Err(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    match best {
        Some((_, i)) => Ok(i),
        None => {
            let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            let detail = if parts.is_empty() {
                String::new()
            } else {
                format!(" {}.", parts.join(", "))
            };
            Err(format!("0/{} nodes are available:{detail}", nodes.len()))
        }
    }
}

fn pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty))
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n == SCHEDULER_NAME)
        && is_active(pod)
}

pub async fn run(client: Client, metrics: Arc<crate::telemetry::Scheduler>) {
    let notify = Arc::new(Notify::new());
    let (nodes, _a) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    let (pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    let (claims, _c) = reflect(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        notify.clone(),
    );
    let (volumes, _d) = reflect(Api::<PersistentVolume>::all(client.clone()), notify.clone());
    let (classes, _e) = reflect(Api::<StorageClass>::all(client.clone()), notify.clone());
    ready(&nodes).await;
    ready(&pods).await;
    ready(&claims).await;
    ready(&volumes).await;
    ready(&classes).await;
    info!("scheduler started");
    let mut assumed: HashMap<String, usize> = HashMap::new();
    let mut reported: HashMap<String, String> = HashMap::new();
    // When each pending pod was first seen, and how often it was tried.
    let mut seen: HashMap<String, (std::time::Instant, u32)> = HashMap::new();
    let mut start = 0usize;
    loop {
        next_pass("scheduler", &notify, Duration::from_secs(5)).await;
        let all_nodes = nodes.state();
        let mut infos: Vec<NodeInfo> = all_nodes.iter().cloned().map(NodeInfo::new).collect();
        let index: HashMap<String, usize> = infos
            .iter()
            .enumerate()
            .map(|(i, n)| (name_of(&n.node.metadata).to_string(), i))
            .collect();
        let all_pods = pods.state();
        let mut queue = Vec::new();
        let mut live: HashSet<String> = HashSet::new();
        for p in &all_pods {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            live.insert(uid.clone());
            let bound = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .filter(|n| !n.is_empty());
            match bound {
                Some(n) if is_active(p) => {
                    assumed.remove(&uid);
                    if let Some(i) = index.get(n) {
                        infos[*i].add(p);
                    }
                }
                Some(_) => {
                    assumed.remove(&uid);
                }
                None if pending(p) => match assumed.get(&uid) {
                    Some(i) if *i < infos.len() => infos[*i].add(p),
                    _ => queue.push(p.clone()),
                },
                None => {}
            }
        }
        assumed.retain(|uid, _| live.contains(uid));
        reported.retain(|uid, _| live.contains(uid));
        seen.retain(|uid, _| live.contains(uid));
        queue.sort_by_key(|p| {
            (
                std::cmp::Reverse(p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)),
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second()),
            )
        });
        let mut binds = Vec::new();
        let mut failures = Vec::new();
        let mut selections = Vec::new();
        let snapshot = volumes::Snapshot {
            claims: claims.state(),
            volumes: volumes.state(),
            classes: classes.state(),
        };
        let mut unschedulable = 0;
        let tried = queue.len();
        for pod in queue {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            start = start.wrapping_add(1);
            seen.entry(uid.clone())
                .or_insert_with(|| (std::time::Instant::now(), 0))
                .1 += 1;
            let mut needs = Needs::of(&pod);
            let mut waiting = Vec::new();
            let placed = match snapshot.of(&pod) {
                Claims::Bound(affinities) => {
                    needs.volumes = affinities;
                    place_with(&pod, &needs, &infos, start % infos.len().max(1))
                }
                Claims::Unbound {
                    waiting: w,
                    affinities,
                } => {
                    needs.volumes = affinities;
                    waiting = w;
                    place_with(&pod, &needs, &infos, start % infos.len().max(1))
                }
                Claims::Binding(node) => {
                    // Its room on the chosen node is held meanwhile.
                    if let Some(i) = index.get(&node) {
                        infos[*i].add(&pod);
                    }
                    continue;
                }
                Claims::Blocked(why) => {
                    Err(format!("0/{} nodes are available: {why}.", infos.len()))
                }
            };
            match placed {
                Ok(i) if !waiting.is_empty() => {
                    infos[i].add(&pod);
                    let node = name_of(&infos[i].node.metadata).to_string();
                    selections.push((ns_of(&pod.metadata).to_string(), waiting, node));
                }
                Ok(i) => {
                    infos[i].add(&pod);
                    assumed.insert(uid.clone(), i);
                    reported.remove(&uid);
                    binds.push((pod, name_of(&infos[i].node.metadata).to_string(), uid));
                }
                Err(msg) => {
                    metrics.attempt("unschedulable");
                    unschedulable += 1;
                    if reported.get(&uid) != Some(&msg) {
                        reported.insert(uid, msg.clone());
                        failures.push((pod, msg));
                    }
                }
            }
        }
        // Pods placed this pass are no longer pending once bound.
        metrics.pending(tried - unschedulable - binds.len(), unschedulable);
        for (ns, waiting, node) in selections {
            select_node(&client, &ns, &waiting, &node).await;
        }
        let n = binds.len();
        let results: Vec<(bool, String)> = futures::stream::iter(binds)
            .map(|(pod, node, uid)| {
                let client = client.clone();
                async move { (bind(&client, &pod, &node).await, uid) }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut failed = Vec::new();
        for (ok, uid) in results {
            if !ok {
                metrics.attempt("error");
                failed.push(uid);
            } else if let Some((first, attempts)) = seen.remove(&uid) {
                metrics.scheduled(attempts, first.elapsed().as_secs_f64());
            }
        }
        if !failed.is_empty() {
            // Forget what failed to bind and let the next pass see the
            // store's truth.
            for uid in failed {
                assumed.remove(&uid);
            }
            notify.notify_one();
        }
        if n > 0 {
            debug!(bound = n, "scheduled");
        }
        for (pod, msg) in failures {
            report_unschedulable(&client, &pod, &msg).await;
        }
    }
}

/// Names `node` on the claims that wait for their pod's node; the volume
/// controller binds (or provisions) them there.
async fn select_node(client: &Client, ns: &str, claims: &[String], node: &str) {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for name in claims {
        let patch = json!({"metadata": {"annotations": {crate::claims::SELECTED_NODE: node}}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => info!(claim = %format!("{ns}/{name}"), node, "node selected for the claim"),
            Err(e) => {
                warn!(claim = %format!("{ns}/{name}"), error = %e, "selecting the claim's node failed")
            }
        }
    }
}

async fn bind(client: &Client, pod: &Pod, node: &str) -> bool {
    let (name, ns) = (name_of(&pod.metadata), ns_of(&pod.metadata));
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match api
        .create_subresource::<Binding, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            warn!(pod = %format!("{ns}/{name}"), node, error = %e, "binding failed");
            false
        }
    }
}

async fn report_unschedulable(client: &Client, pod: &Pod, msg: &str) {
    let (name, ns) = (name_of(&pod.metadata), ns_of(&pod.metadata));
    info!(pod = %format!("{ns}/{name}"), reason = msg, "unschedulable");
    let now = jiff::Timestamp::now();
    let cond = json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg, "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(), "lastProbeTime": null});
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    if let Err(e) = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [cond]}})),
        )
        .await
    {
        warn!(pod = %name, error = %e, "recording the Unschedulable condition failed");
    }
    let about = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    };
    let said = crate::events::Said {
        warning: true,
        reason: "FailedScheduling",
        message: msg,
        action: "Scheduling",
    };
    crate::events::record(client, SCHEDULER_NAME, about, said);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> NodeInfo {
        NodeInfo::new(Arc::new(serde_json::from_value(v).expect("node")))
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("5Q"), None);
    }

    #[test]
    fn filters_explain_themselves() {
        let nodes = vec![
            node(
                serde_json::json!({"metadata": {"name": "small"}, "status": {"allocatable": {"cpu": "1", "memory": "1Gi", "pods": "10"}}}),
            ),
            node(
                serde_json::json!({"metadata": {"name": "tainted"}, "spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}, "status": {"allocatable": {"cpu": "8", "memory": "8Gi"}}}),
            ),
            node(serde_json::json!({"metadata": {"name": "off"}, "spec": {"unschedulable": true}})),
        ];
        let big = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "2"}}}]}}),
        );
        assert_eq!(
            place(&big, &nodes, 0),
            Err("0/3 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}, 1 node(s) were unschedulable.".into())
        );
        let tolerant = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
            "containers": [{"name": "c", "resources": {"requests": {"cpu": "2"}}}]}}),
        );
        assert_eq!(place(&tolerant, &nodes, 0), Ok(1));
        let picky = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c"}]}}),
        );
        assert!(place(&picky, &nodes, 0).is_err());
    }

    #[test]
    fn affinity_and_spreading() {
        let mut a = node(serde_json::json!({"metadata": {"name": "a", "labels": {"zone": "1"}}}));
        let b = node(serde_json::json!({"metadata": {"name": "b", "labels": {"zone": "2"}}}));
        let owned = |n: &str| {
            pod(
                serde_json::json!({"metadata": {"name": n, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true}]}, "spec": {"containers": [{"name": "c"}]}}),
            )
        };
        a.add(&owned("x"));
        let nodes = vec![a, b];
        assert_eq!(
            place(&owned("y"), &nodes, 0),
            Ok(1),
            "spread away from the sibling"
        );
        let pinned = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["1"]}]}]}}}}}),
        );
        assert_eq!(place(&pinned, &nodes, 0), Ok(0));
        let by_name = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]}]}}}}}),
        );
        assert_eq!(place(&by_name, &nodes, 0), Ok(1));
    }

    #[test]
    fn volumes_hold_pods_to_their_nodes() {
        let a = node(
            serde_json::json!({"metadata": {"name": "a", "labels": {"kubernetes.io/hostname": "a"}}}),
        );
        let b = node(
            serde_json::json!({"metadata": {"name": "b", "labels": {"kubernetes.io/hostname": "b"}}}),
        );
        let p = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}),
        );
        let mut needs = Needs::of(&p);
        needs.volumes = vec![
            serde_json::from_value(
                serde_json::json!({"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["b"]}]}]}),
            )
            .expect("selector"),
        ];
        assert_eq!(place_with(&p, &needs, &[a, b], 0), Ok(1));
        let a = node(
            serde_json::json!({"metadata": {"name": "a", "labels": {"kubernetes.io/hostname": "a"}}}),
        );
        assert_eq!(
            place_with(&p, &needs, &[a], 0),
            Err("0/1 nodes are available: 1 node(s) had volume node affinity conflict.".into())
        );
    }

    #[test]
    fn feasible_nodes_to_find() {
        assert_eq!(enough(3), 3);
        assert_eq!(enough(1000), 420);
        assert_eq!(enough(5000), 500);
        assert_eq!(enough(100_000), 5000);
    }

    #[test]
    fn host_ports_conflict() {
        let mut a = node(serde_json::json!({"metadata": {"name": "a"}}));
        let web = pod(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
        );
        a.add(&web);
        assert!(place(&web, &[a], 0).is_err());
    }
}
