//! ReplicaSet and ReplicationController: each keeps `spec.replicas`
//! active pods made from its template, owned by it, and reports counts in
//! its status. The two kinds differ only in how their selector is
//! written, so one controller serves both from one pod store.
//!
//! Creations and deletions not yet seen by the pod store are remembered
//! (upstream calls these expectations) so that a pass never acts twice on
//! the same shortfall.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::events::{about, normal, record};
use crate::informer::{Wake, in_parallel, next_pass, ready, reflect};
use crate::meta::{availability, controller_of, is_active, is_ready, name_of, ns_of, owner_ref};

/// Pod creations and deletions made but not yet seen in the pod store,
/// per owner, with a deadline after which they are no longer waited for.
#[derive(Default)]
pub(crate) struct Expectations(HashMap<String, (Vec<(String, bool)>, Instant)>);

impl Expectations {
    /// Whether the store reflects every change made for this owner.
    pub(crate) fn satisfied(&mut self, uid: &str, owned: &[Arc<Pod>]) -> bool {
        let Some((pending, until)) = self.0.get(uid) else {
            return true;
        };
        let seen = pending.iter().all(|(name, created)| {
            let pod = owned
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str()));
            if *created {
                pod.is_some()
            } else {
                pod.is_none_or(|p| !is_active(p))
            }
        });
        if seen || Instant::now() >= *until {
            self.0.remove(uid);
            return true;
        }
        false
    }

    fn note(&mut self, uid: &str, name: String, created: bool) {
        let e = self
            .0
            .entry(uid.to_string())
            .or_insert_with(|| (Vec::new(), Instant::now()));
        e.0.push((name, created));
        e.1 = Instant::now() + Duration::from_secs(10);
    }

    pub(crate) fn created(&mut self, uid: &str, name: String) {
        self.note(uid, name, true);
    }

    pub(crate) fn deleted(&mut self, uid: &str, name: String) {
        self.note(uid, name, false);
    }
}

/// The pods each controller owns, by owner uid.
pub(crate) fn pods_by_owner(pods: &[Arc<Pod>]) -> HashMap<String, Vec<Arc<Pod>>> {
    let mut out: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for p in pods {
        if let Some(o) = controller_of(&p.metadata) {
            out.entry(o.uid.clone()).or_default().push(p.clone());
        }
    }
    out
}

/// Which pods go first when scaling down: unscheduled, then pending, then
/// not ready, then the youngest.
pub(crate) fn deletion_order(pods: &mut [Arc<Pod>]) {
    pods.sort_by_key(|p| {
        let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second());
        (scheduled, running, is_ready(p), std::cmp::Reverse(created))
    });
}

/// Deletes a pod; one already gone counts as deleted, any other failure
/// is logged and returns false.
pub(crate) async fn delete_pod(api: &Api<Pod>, name: &str) -> bool {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 404 => true,
        Err(e) => {
            warn!(pod = %name, error = %e, "deleting a pod failed");
            false
        }
    }
}

/// Deletes the pods named, 16 at a time.
pub(crate) async fn delete_pods(api: &Api<Pod>, names: Vec<String>) {
    in_parallel(
        16,
        names
            .into_iter()
            .map(|n| async move { delete_pod(api, &n).await }),
    )
    .await;
}

/// A pod made from `template`, owned through `owner`.
pub(crate) fn pod_from_template(
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ns: &str,
    node: Option<&str>,
) -> Pod {
    let meta = template.metadata.clone().unwrap_or_default();
    let mut spec = template.spec.clone().unwrap_or_default();
    if let Some(n) = node {
        spec.node_name = Some(n.to_string());
    }
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", owner.name)),
            namespace: Some(ns.to_string()),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// What a ReplicaSet's or ReplicationController's status counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    replicas: i32,
    ready: i32,
    available: i32,
    observed_generation: Option<i64>,
}

/// The two kinds' statuses have the same fields under different types.
macro_rules! counts_of {
    ($status:expr) => {
        $status.as_ref().map(|s| Counts {
            replicas: s.replicas,
            ready: s.ready_replicas.unwrap_or(0),
            available: s.available_replicas.unwrap_or(0),
            observed_generation: s.observed_generation,
        })
    };
}

/// Who records a kind's events, as upstream names its controllers.
fn component<K: Replicated>() -> &'static str {
    if K::kind(&()) == "ReplicationController" {
        "replication-controller"
    } else {
        "replicaset-controller"
    }
}

/// What the controller reads of the kinds it keeps.
trait Replicated:
    kube::Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn replicas(&self) -> Option<i32>;
    fn template(&self) -> Option<&PodTemplateSpec>;
    fn min_ready_seconds(&self) -> i32;
    /// What its status says, if it has one yet.
    fn counts(&self) -> Option<Counts>;
}

impl Replicated for ReplicaSet {
    fn replicas(&self) -> Option<i32> {
        self.spec.replicas
    }
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.template.as_ref()
    }
    fn min_ready_seconds(&self) -> i32 {
        self.spec.min_ready_seconds.unwrap_or(0)
    }
    fn counts(&self) -> Option<Counts> {
        counts_of!(self.status)
    }
}

/// The spec is optional in this kind's type.
impl Replicated for ReplicationController {
    fn replicas(&self) -> Option<i32> {
        self.spec.as_ref()?.replicas
    }
    fn template(&self) -> Option<&PodTemplateSpec> {
        self.spec.as_ref()?.template.as_ref()
    }
    fn min_ready_seconds(&self) -> i32 {
        self.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }
    fn counts(&self) -> Option<Counts> {
        counts_of!(self.status)
    }
}

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (rss, _a) = reflect(Api::<ReplicaSet>::all(client.clone()), notify.clone());
    let (rcs, _b) = reflect(
        Api::<ReplicationController>::all(client.clone()),
        notify.clone(),
    );
    let (pods, _c) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&rss).await;
    ready(&rcs).await;
    ready(&pods).await;
    let mut expectations = Expectations::default();
    let mut wake = Wake::default();
    loop {
        next_pass("replicaset", &notify, Duration::from_secs(10)).await;
        let by_owner = pods_by_owner(&pods.state());
        let mut left = Vec::new();
        for rs in rss.state() {
            left.push(pass(&client, &*rs, &by_owner, &mut expectations).await);
        }
        for rc in rcs.state() {
            left.push(pass(&client, &*rc, &by_owner, &mut expectations).await);
        }
        for l in left.into_iter().flatten() {
            wake.after(&notify, l);
        }
    }
}

async fn pass<K: Replicated>(
    client: &Client,
    obj: &K,
    by_owner: &HashMap<String, Vec<Arc<Pod>>>,
    exp: &mut Expectations,
) -> Option<Duration> {
    let owned = by_owner
        .get(obj.meta().uid.as_deref().unwrap_or_default())
        .cloned()
        .unwrap_or_default();
    reconcile(client, obj, owned, exp).await
}

/// One pass over a ReplicaSet or ReplicationController; returns when to
/// look again if a pod is Ready but not yet available (minReadySeconds).
async fn reconcile<K: Replicated>(
    client: &Client,
    rs: &K,
    owned: Vec<Arc<Pod>>,
    exp: &mut Expectations,
) -> Option<Duration> {
    let kind = K::kind(&()).into_owned();
    let (name, ns) = (name_of(rs.meta()), ns_of(rs.meta()));
    let uid = rs.meta().uid.clone().unwrap_or_default();
    let mut active: Vec<Arc<Pod>> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let want = rs.replicas().unwrap_or(1).max(0) as usize;
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    if rs.meta().deletion_timestamp.is_none() && exp.satisfied(&uid, &owned) {
        if active.len() < want {
            let (Some(template), Some(owner)) = (rs.template(), owner_ref(rs)) else {
                return None;
            };
            let missing = want - active.len();
            let pod = pod_from_template(template, owner, ns, None);
            let created: Vec<Option<String>> = futures::stream::iter(0..missing)
                .map(|_| {
                    let (api, pod, kind) = (pods_api.clone(), pod.clone(), kind.clone());
                    async move {
                        match api.create(&PostParams::default(), &pod).await {
                            Ok(p) => p.metadata.name,
                            Err(e) => {
                                warn!(%kind, %name, error = %e, "creating a pod failed");
                                None
                            }
                        }
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let made = created.iter().flatten().count();
            for n in created.into_iter().flatten() {
                let msg = format!("Created pod: {n}");
                record(
                    client,
                    component::<K>(),
                    about(rs),
                    normal("SuccessfulCreate", &msg),
                );
                exp.created(&uid, n);
            }
            info!(%kind, name = %format!("{ns}/{name}"), created = made, "scaled up");
        } else if active.len() > want {
            deletion_order(&mut active);
            let extra: Vec<Arc<Pod>> = active.drain(..active.len() - want).collect();
            for p in &extra {
                exp.deleted(&uid, p.metadata.name.clone().unwrap_or_default());
            }
            let n = extra.len();
            for p in &extra {
                let msg = format!("Deleted pod: {}", name_of(&p.metadata));
                record(
                    client,
                    component::<K>(),
                    about(rs),
                    normal("SuccessfulDelete", &msg),
                );
            }
            let names = extra.iter().map(|p| name_of(&p.metadata).to_string());
            delete_pods(&pods_api, names.collect()).await;
            info!(%kind, name = %format!("{ns}/{name}"), deleted = n, "scaled down");
        }
    }
    let all_active: Vec<&Arc<Pod>> = owned.iter().filter(|p| is_active(p)).collect();
    let ready_n = all_active.iter().filter(|p| is_ready(p)).count();
    let min_ready = rs.min_ready_seconds();
    let now = jiff::Timestamp::now();
    let mut available = 0;
    let mut recheck: Option<Duration> = None;
    for p in &all_active {
        match availability(p, min_ready, now) {
            (true, _) => available += 1,
            (false, Some(left)) => recheck = Some(recheck.map_or(left, |r| r.min(left))),
            (false, None) => {}
        }
    }
    let status = json!({
        "replicas": all_active.len(),
        "fullyLabeledReplicas": all_active.len(),
        "readyReplicas": ready_n,
        "availableReplicas": available,
        "observedGeneration": rs.meta().generation,
    });
    let same = rs.counts().is_some_and(|c| {
        c.replicas as usize == all_active.len()
            && c.ready as usize == ready_n
            && c.available as usize == available
            && c.observed_generation == rs.meta().generation
    });
    if !same {
        let api: Api<K> = Api::namespaced(client.clone(), ns);
        crate::informer::write_status(&api, name, status).await;
    }
    recheck
}
