//! StatefulSet: pods with stable names (`<set>-<ordinal>`), hostnames
//! under the governing Service, and claims of their own from
//! `volumeClaimTemplates` (`<template>-<set>-<ordinal>`) that outlive them.
//!
//! - `OrderedReady`: a pod is created only when every lower ordinal is
//!   Running and Ready, and the set scales down from the highest ordinal,
//!   one pod at a time while the rest are healthy. `Parallel` does both
//!   at once.
//! - Templates are kept as ControllerRevisions (`<set>-<hash>`, the hash
//!   also in each pod's `controller-revision-hash` label). `RollingUpdate`
//!   replaces pods from the highest ordinal down to the partition, one at
//!   a time, each after the one before is Ready again; pods below the
//!   partition are recreated at the current revision. `OnDelete` replaces
//!   a pod only when it is deleted.
//! - `persistentVolumeClaimRetentionPolicy`: `whenDeleted: Delete` makes
//!   the set own its claims (garbage collection removes them with it),
//!   `whenScaled: Delete` removes the claims of ordinals scaled away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::deployment::template_hash;
use super::replicaset::{delete_pod, pods_by_owner};
use crate::informer::{Wake, next_pass, ready, reflect};
use crate::meta::{availability, controller_of, is_ready, name_of, ns_of, owner_ref};

const HASH_LABEL: &str = "controller-revision-hash";
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
const COMPONENT: &str = "statefulset-controller";

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (sets, _a) = reflect(Api::<StatefulSet>::all(client.clone()), notify.clone());
    let (pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    let (revs, _c) = reflect(
        Api::<ControllerRevision>::all(client.clone()),
        notify.clone(),
    );
    let (claims, _d) = reflect(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        notify.clone(),
    );
    ready(&sets).await;
    ready(&pods).await;
    ready(&revs).await;
    ready(&claims).await;
    let mut wake = Wake::default();
    loop {
        next_pass("statefulset", &notify, Duration::from_secs(15)).await;
        let by_owner = pods_by_owner(&pods.state());
        let all_revs = revs.state();
        let all_claims = claims.state();
        for set in sets.state() {
            let spec = &set.spec;
            if set.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = set.metadata.uid.clone().unwrap_or_default();
            let owned = by_owner.get(&uid).cloned().unwrap_or_default();
            let mine: Vec<&ControllerRevision> = all_revs
                .iter()
                .filter(|r| controller_of(&r.metadata).is_some_and(|o| o.uid == uid))
                .map(Arc::as_ref)
                .collect();
            let s = Set {
                client: &client,
                set: &set,
                spec,
                name: name_of(&set.metadata),
                ns: ns_of(&set.metadata),
            };
            if let Some(left) = s.reconcile(owned, &mine, &all_claims).await {
                wake.after(&notify, left);
            }
        }
    }
}

struct Set<'a> {
    client: &'a Client,
    set: &'a StatefulSet,
    spec: &'a StatefulSetSpec,
    name: &'a str,
    ns: &'a str,
}

/// A pod's ordinal, from its name `<set>-<ordinal>`.
fn ordinal_of(set: &str, pod: &Pod) -> Option<i32> {
    name_of(&pod.metadata)
        .strip_prefix(set)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn revision_of(pod: &Pod) -> &str {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(HASH_LABEL))
        .map(String::as_str)
        .unwrap_or_default()
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Running and Ready, and not going away.
fn healthy(pod: &Pod) -> bool {
    !terminating(pod)
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && is_ready(pod)
}

/// The claim a template gives the pod of `ordinal`.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

impl Set<'_> {
    fn spec(&self) -> &StatefulSetSpec {
        self.spec
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), self.ns)
    }

    fn event(&self, warning: bool, reason: &str, message: &str) {
        let said = crate::events::Said {
            warning,
            reason,
            message,
            action: "",
        };
        crate::events::record(self.client, COMPONENT, crate::events::about(self.set), said);
    }

    /// The revisions of the set, made current: (current name, update
    /// name, the current revision's template).
    async fn revisions(&self, revs: &[&ControllerRevision]) -> (String, String, PodTemplateSpec) {
        let template = self.spec().template.clone();
        let hash = template_hash(&serde_json::to_value(&template).unwrap_or_default());
        let update = format!("{}-{hash}", self.name);
        if !revs.iter().any(|r| name_of(&r.metadata) == update) {
            let number = revs.iter().filter_map(|r| r.revision).max().unwrap_or(0) + 1;
            let rev = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(update.clone()),
                    namespace: Some(self.ns.to_string()),
                    labels: self.spec().selector.match_labels.clone().map(|mut l| {
                        l.insert(HASH_LABEL.into(), hash.clone());
                        l
                    }),
                    owner_references: owner_ref(self.set).map(|o| vec![o]),
                    ..Default::default()
                },
                data: RawExtension(json!({"spec": {"template": template}})),
                revision: Some(number),
            };
            let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), self.ns);
            match api.create(&PostParams::default(), &rev).await {
                Ok(_) => {
                    info!(statefulset = %format!("{}/{}", self.ns, self.name), revision = %update, "revision recorded")
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    warn!(statefulset = %self.name, error = %e, "recording a revision failed")
                }
            }
        }
        let current = self
            .set
            .status
            .as_ref()
            .and_then(|s| s.current_revision.clone())
            .filter(|c| revs.iter().any(|r| name_of(&r.metadata) == c))
            .unwrap_or_else(|| update.clone());
        let current_template = revs
            .iter()
            .find(|r| name_of(&r.metadata) == current)
            .and_then(|r| r.data.0.pointer("/spec/template").cloned())
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or(template);
        (current, update, current_template)
    }

    /// Drops the oldest revisions no pod uses beyond the history limit.
    async fn trim_history(&self, revs: &[&ControllerRevision], keep: &[&str], pods: &[Arc<Pod>]) {
        let limit = self.spec().revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut spare: Vec<&&ControllerRevision> = revs
            .iter()
            .filter(|r| {
                let n = name_of(&r.metadata);
                !keep.contains(&n) && !pods.iter().any(|p| revision_of(p) == n)
            })
            .collect();
        if spare.len() <= limit {
            return;
        }
        spare.sort_by_key(|r| r.revision);
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), self.ns);
        for r in spare.iter().take(spare.len() - limit) {
            if let Err(e) = api
                .delete(name_of(&r.metadata), &DeleteParams::default())
                .await
            {
                warn!(revision = %name_of(&r.metadata), error = %e, "trimming history failed");
            }
        }
    }

    /// The pod of `ordinal` at `revision` from `template`.
    fn new_pod(&self, template: &PodTemplateSpec, ordinal: i32, revision: &str) -> Pod {
        let spec = self.spec();
        let name = format!("{}-{ordinal}", self.name);
        let meta = template.metadata.clone().unwrap_or_default();
        let mut labels = meta.labels.unwrap_or_default();
        labels.insert(POD_NAME_LABEL.into(), name.clone());
        labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
        labels.insert(HASH_LABEL.into(), revision.to_string());
        let mut pod_spec = template.spec.clone().unwrap_or_default();
        pod_spec.hostname = Some(name.clone());
        if let Some(svc) = spec.service_name.as_deref().filter(|s| !s.is_empty()) {
            pod_spec.subdomain = Some(svc.to_string());
        }
        let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
        for t in spec.volume_claim_templates.iter().flatten() {
            let tname = name_of(&t.metadata).to_string();
            volumes.retain(|v| v.name != tname);
            volumes.push(Volume {
                name: tname.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name(&tname, self.name, ordinal),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(self.ns.to_string()),
                labels: Some(labels),
                annotations: meta.annotations,
                owner_references: owner_ref(self.set).map(|o| vec![o]),
                ..Default::default()
            },
            spec: Some(pod_spec),
            status: None,
        }
    }

    /// Makes the claims of `ordinal` that do not exist; false while one
    /// of them is still being deleted.
    async fn ensure_claims(&self, ordinal: i32, claims: &[Arc<PersistentVolumeClaim>]) -> bool {
        let spec = self.spec();
        let owned_by_set = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .and_then(|p| p.when_deleted.as_deref())
            == Some("Delete");
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), self.ns);
        for t in spec.volume_claim_templates.iter().flatten() {
            let name = claim_name(name_of(&t.metadata), self.name, ordinal);
            let existing = claims
                .iter()
                .find(|c| ns_of(&c.metadata) == self.ns && name_of(&c.metadata) == name);
            match existing {
                Some(c) if c.metadata.deletion_timestamp.is_some() => return false,
                Some(_) => continue,
                None => {}
            }
            let mut labels: BTreeMap<String, String> =
                t.metadata.labels.clone().unwrap_or_default();
            labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
            let claim = PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.ns.to_string()),
                    labels: Some(labels),
                    annotations: t.metadata.annotations.clone(),
                    owner_references: owner_ref(self.set)
                        .filter(|_| owned_by_set)
                        .map(|o| vec![o]),
                    ..Default::default()
                },
                spec: t.spec.clone(),
                status: None,
            };
            match api.create(&PostParams::default(), &claim).await {
                Ok(_) => self.event(
                    false,
                    "SuccessfulCreate",
                    &format!(
                        "create Claim {name} Pod {}-{ordinal} in StatefulSet {} success",
                        self.name, self.name
                    ),
                ),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    self.event(
                        true,
                        "FailedCreate",
                        &format!("create Claim {name} for Pod {}-{ordinal} in StatefulSet {} failed error: {e}", self.name, self.name),
                    );
                    return false;
                }
            }
        }
        true
    }

    async fn create_pod(&self, pod: &Pod) {
        let name = name_of(&pod.metadata);
        match self.pods_api().create(&PostParams::default(), pod).await {
            Ok(_) => {
                info!(statefulset = %format!("{}/{}", self.ns, self.name), pod = %name, "pod created");
                self.event(
                    false,
                    "SuccessfulCreate",
                    &format!("create Pod {name} in StatefulSet {} successful", self.name),
                );
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => self.event(
                true,
                "FailedCreate",
                &format!(
                    "create Pod {name} in StatefulSet {} failed error: {e}",
                    self.name
                ),
            ),
        }
    }

    async fn delete(&self, pod: &Pod) {
        let name = name_of(&pod.metadata);
        if delete_pod(&self.pods_api(), name).await {
            info!(statefulset = %format!("{}/{}", self.ns, self.name), pod = %name, "pod deleted");
            self.event(
                false,
                "SuccessfulDelete",
                &format!("delete Pod {name} in StatefulSet {} successful", self.name),
            );
        }
    }

    /// One pass: at most one step in ordered mode. Returns when to look
    /// again for minReadySeconds.
    async fn reconcile(
        &self,
        owned: Vec<Arc<Pod>>,
        revs: &[&ControllerRevision],
        claims: &[Arc<PersistentVolumeClaim>],
    ) -> Option<Duration> {
        let spec = self.spec();
        let (current, update, current_template) = self.revisions(revs).await;
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
        let end = start + replicas;
        let ordered = spec.pod_management_policy.as_deref() != Some("Parallel");
        let strategy = spec.update_strategy.as_ref();
        let rolling = strategy.and_then(|s| s.type_.as_deref()) != Some("OnDelete");
        let partition = strategy
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0);
        let mut by_ordinal: BTreeMap<i32, Arc<Pod>> = BTreeMap::new();
        let mut condemned: Vec<Arc<Pod>> = Vec::new();
        for p in &owned {
            match ordinal_of(self.name, p) {
                Some(o) if (start..end).contains(&o) => {
                    by_ordinal.insert(o, p.clone());
                }
                _ => condemned.push(p.clone()),
            }
        }
        condemned.sort_by_key(|p| std::cmp::Reverse(ordinal_of(self.name, p)));
        let status_left = self
            .write_status(&owned, &current, &update, start, end)
            .await;
        let template_for = |ordinal: i32| {
            if rolling && ordinal < start + partition {
                (&current_template, current.as_str())
            } else {
                (&spec.template, update.as_str())
            }
        };

        // Finished pods are replaced.
        for p in by_ordinal
            .values()
            .filter(|p| finished(p) && !terminating(p))
        {
            self.delete(p).await;
            if ordered {
                return status_left;
            }
        }
        // Missing pods are made, in order; in ordered mode each waits for
        // the ones below it.
        for ordinal in start..end {
            match by_ordinal.get(&ordinal) {
                None => {
                    if self.ensure_claims(ordinal, claims).await {
                        let (template, revision) = template_for(ordinal);
                        self.create_pod(&self.new_pod(template, ordinal, revision))
                            .await;
                    }
                    if ordered {
                        return status_left;
                    }
                }
                Some(p) if ordered && !healthy(p) => return status_left,
                Some(_) => {}
            }
        }
        // Ordinals scaled away go from the highest, in ordered mode one at
        // a time and only while the rest are healthy.
        let all_healthy = by_ordinal.values().all(|p| healthy(p));
        for p in &condemned {
            if terminating(p) {
                if ordered {
                    return status_left;
                }
                continue;
            }
            if ordered && !all_healthy {
                return status_left;
            }
            self.delete(p).await;
            if ordered {
                return status_left;
            }
        }
        self.release_scaled_claims(&owned, end, claims).await;
        if !rolling || !all_healthy {
            return status_left;
        }
        // A rolling update replaces the highest outdated pod at or above
        // the partition; the next waits until it is back and Ready.
        for (ordinal, p) in by_ordinal.iter().rev() {
            if *ordinal < start + partition {
                break;
            }
            if revision_of(p) != update {
                self.delete(p).await;
                return status_left;
            }
        }
        let keep = [current.as_str(), update.as_str()];
        self.trim_history(revs, &keep, &owned).await;
        status_left
    }

    /// With `whenScaled: Delete`, the claims of ordinals at or above `end`
    /// whose pods are gone are removed.
    async fn release_scaled_claims(
        &self,
        owned: &[Arc<Pod>],
        end: i32,
        claims: &[Arc<PersistentVolumeClaim>],
    ) {
        let spec = self.spec();
        let delete = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .and_then(|p| p.when_scaled.as_deref())
            == Some("Delete");
        if !delete {
            return;
        }
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), self.ns);
        for t in spec.volume_claim_templates.iter().flatten() {
            let prefix = format!("{}-{}-", name_of(&t.metadata), self.name);
            for c in claims.iter().filter(|c| {
                ns_of(&c.metadata) == self.ns && c.metadata.deletion_timestamp.is_none()
            }) {
                let Some(ordinal) = name_of(&c.metadata)
                    .strip_prefix(&prefix)
                    .and_then(|o| o.parse::<i32>().ok())
                else {
                    continue;
                };
                let pod_left = owned
                    .iter()
                    .any(|p| ordinal_of(self.name, p) == Some(ordinal));
                if ordinal >= end && !pod_left {
                    match api
                        .delete(name_of(&c.metadata), &DeleteParams::default())
                        .await
                    {
                        Ok(_) => {
                            info!(claim = %name_of(&c.metadata), "claim of a scaled-away pod deleted")
                        }
                        Err(e) => {
                            warn!(claim = %name_of(&c.metadata), error = %e, "deleting a claim failed")
                        }
                    }
                }
            }
        }
    }

    /// Writes the counts and revisions; the time until a Ready pod turns
    /// available, if one is waiting.
    async fn write_status(
        &self,
        owned: &[Arc<Pod>],
        current: &str,
        update: &str,
        start: i32,
        end: i32,
    ) -> Option<Duration> {
        let spec = self.spec();
        let active: Vec<&Arc<Pod>> = owned
            .iter()
            .filter(|p| !terminating(p) && !finished(p))
            .collect();
        let now = jiff::Timestamp::now();
        let min_ready = spec.min_ready_seconds.unwrap_or(0);
        let mut left: Option<Duration> = None;
        let mut available = 0;
        for p in &active {
            match availability(p, min_ready, now) {
                (true, _) => available += 1,
                (false, Some(l)) => left = Some(left.map_or(l, |x: Duration| x.min(l))),
                _ => {}
            }
        }
        let count = |rev: &str| active.iter().filter(|p| revision_of(p) == rev).count() as i32;
        let replicas = active.len() as i32;
        let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
        let updated = count(update);
        let in_range = active
            .iter()
            .filter(|p| ordinal_of(self.name, p).is_some_and(|o| (start..end).contains(&o)))
            .count() as i32;
        // The update is complete once every pod runs it and is Ready.
        let (current, current_replicas) =
            if updated == end - start && ready == updated && in_range == updated {
                (update, updated)
            } else {
                (current, count(current))
            };
        let status = json!({
            "replicas": replicas,
            "readyReplicas": ready,
            "availableReplicas": available,
            "currentReplicas": current_replicas,
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": update,
            "observedGeneration": self.set.metadata.generation,
            "collisionCount": 0,
        });
        let cur = serde_json::to_value(&self.set.status).unwrap_or_default();
        let zero = json!(0);
        let changed = status
            .as_object()
            .into_iter()
            .flatten()
            .any(|(k, v)| cur.get(k).unwrap_or(&zero) != v);
        if changed {
            let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), self.ns);
            crate::informer::write_status(&api, self.name, status).await;
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_from_names() {
        let pod = |name: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name}})).expect("pod")
        };
        assert_eq!(ordinal_of("web", &pod("web-0")), Some(0));
        assert_eq!(ordinal_of("web", &pod("web-12")), Some(12));
        assert_eq!(ordinal_of("web", &pod("web-x")), None);
        assert_eq!(ordinal_of("web", &pod("webby-1")), None);
        assert_eq!(ordinal_of("web-1", &pod("web-1-3")), Some(3));
        assert_eq!(claim_name("data", "web", 2), "data-web-2");
    }
}
