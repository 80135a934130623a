//! PersistentVolume binding, the node-local provisioner's control half,
//! reclaiming, and claim protection.
//!
//! - A pending claim binds to the smallest available volume that fits it
//!   (class, access modes, size, volume mode, selector, and the selected
//!   node for a `WaitForFirstConsumer` class). A claim of such a class
//!   waits until the scheduler names a node on it.
//! - A claim no volume fits, of a class whose provisioner is
//!   [`PROVISIONER`], gets a new local volume on the selected node, as
//!   k3s's local-path provisioner makes one: a directory
//!   `<root>/<volume name>` (the root is the class's `nodePath`
//!   parameter, or what the node's kubelet published in
//!   [`ROOT_ANNOTATION`]), with node affinity to that node. The kubelet
//!   makes the directory when a pod first mounts it, and removes it when
//!   the volume is deleted (the [`CLEANUP_FINALIZER`] waits for it).
//! - A volume whose claim is gone is Released; with reclaim policy Delete
//!   a provisioned one is deleted, Retain keeps it.
//! - A claim being deleted keeps its `kubernetes.io/pvc-protection`
//!   finalizer while a pod that has not finished uses it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::claims::{
    CLAIM_PROTECTION, CLEANUP_FINALIZER, PROVISIONER, ROOT_ANNOTATION, SELECTED_NODE, claims_of,
};
use crate::fit::node_selector_matches;
use crate::informer::{next_pass, ready, reflect};
use crate::meta::{name_of, ns_of};
use crate::quantity::parse_quantity;

const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// The local volume root of a node that published none.
const DEFAULT_ROOT: &str = "/var/lib/skiff/local-path";
const COMPONENT: &str = "persistentvolume-controller";

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (claims, _a) = reflect(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        notify.clone(),
    );
    let (volumes, _b) = reflect(Api::<PersistentVolume>::all(client.clone()), notify.clone());
    let (classes, _c) = reflect(Api::<StorageClass>::all(client.clone()), notify.clone());
    let (nodes, _d) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    let (pods, _e) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&claims).await;
    ready(&volumes).await;
    ready(&classes).await;
    ready(&nodes).await;
    ready(&pods).await;
    let mut said: HashSet<(String, String)> = HashSet::new();
    loop {
        next_pass("persistentvolume", &notify, Duration::from_secs(15)).await;
        let view = View {
            client: &client,
            claims: claims.state(),
            volumes: volumes.state(),
            classes: classes.state(),
            nodes: nodes.state(),
        };
        // Volumes claimed (or being provisioned) in this pass.
        let mut taken: HashSet<String> = HashSet::new();
        for claim in &view.claims {
            view.protect(claim, &pods.state()).await;
            if let Some(event) = view.bind(claim, &mut taken).await {
                let key = (
                    claim.metadata.uid.clone().unwrap_or_default(),
                    event.1.clone(),
                );
                if said.insert(key) {
                    let about = crate::events::about(claim.as_ref());
                    let said = crate::events::Said {
                        warning: event.0,
                        reason: event.2,
                        message: &event.1,
                        action: "Binding",
                    };
                    crate::events::record(&client, COMPONENT, about, said);
                }
            }
        }
        for pv in &view.volumes {
            view.reclaim(pv).await;
        }
        let live: HashSet<String> = view
            .claims
            .iter()
            .filter_map(|c| c.metadata.uid.clone())
            .collect();
        said.retain(|(uid, _)| live.contains(uid));
    }
}

struct View<'a> {
    client: &'a Client,
    claims: Vec<Arc<PersistentVolumeClaim>>,
    volumes: Vec<Arc<PersistentVolume>>,
    classes: Vec<Arc<StorageClass>>,
    nodes: Vec<Arc<Node>>,
}

fn annotation<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn storage_of(
    q: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> f64 {
    q.and_then(|m| m.get("storage"))
        .and_then(|q| parse_quantity(&q.0))
        .unwrap_or(0.0)
}

fn claim_class(c: &PersistentVolumeClaim) -> &str {
    c.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or_default()
}

fn phase_of_claim(c: &PersistentVolumeClaim) -> &str {
    c.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn phase_of_volume(v: &PersistentVolume) -> &str {
    v.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether `pv` is reserved for `claim` (its claimRef names it).
fn reserved_for(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| {
            r.name.as_deref() == claim.metadata.name.as_deref()
                && r.namespace.as_deref() == claim.metadata.namespace.as_deref()
                && r.uid
                    .as_deref()
                    .is_none_or(|u| Some(u) == claim.metadata.uid.as_deref())
        })
}

impl View<'_> {
    fn class(&self, name: &str) -> Option<&StorageClass> {
        self.classes
            .iter()
            .find(|c| name_of(&c.metadata) == name)
            .map(Arc::as_ref)
    }

    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| name_of(&n.metadata) == name)
            .map(Arc::as_ref)
    }

    /// Whether volume `pv` can hold `claim` (on node `node`, when named).
    fn fits(
        &self,
        pv: &PersistentVolume,
        claim: &PersistentVolumeClaim,
        node: Option<&str>,
    ) -> bool {
        let (Some(vs), Some(cs)) = (pv.spec.as_ref(), claim.spec.as_ref()) else {
            return false;
        };
        if pv.metadata.deletion_timestamp.is_some() {
            return false;
        }
        let claimed = vs.claim_ref.is_some();
        if claimed && !reserved_for(pv, claim) {
            return false;
        }
        if !claimed && phase_of_volume(pv) != "Available" {
            return false;
        }
        if vs.storage_class_name.as_deref().unwrap_or_default() != claim_class(claim) {
            return false;
        }
        let modes = vs.access_modes.clone().unwrap_or_default();
        if !cs.access_modes.iter().flatten().all(|m| modes.contains(m)) {
            return false;
        }
        let mode = |m: Option<&String>| m.map_or("Filesystem", String::as_str).to_string();
        if mode(vs.volume_mode.as_ref()) != mode(cs.volume_mode.as_ref()) {
            return false;
        }
        let want = storage_of(cs.resources.as_ref().and_then(|r| r.requests.as_ref()));
        if storage_of(vs.capacity.as_ref()) < want {
            return false;
        }
        if let Some(sel) = &cs.selector {
            let sel = crate::selector::LabelSelector::from_structured(
                &serde_json::to_value(sel).unwrap_or_default(),
            );
            let labels = serde_json::to_value(&pv.metadata.labels).unwrap_or_default();
            if !sel.matches(labels.as_object()) {
                return false;
            }
        }
        if let (Some(node), Some(req)) = (
            node,
            vs.node_affinity.as_ref().and_then(|a| a.required.as_ref()),
        ) {
            return self
                .node(node)
                .is_some_and(|n| node_selector_matches(req, n));
        }
        true
    }

    /// Binds a pending claim, or provisions for it; an event to record
    /// (warning, message, reason) when it must wait.
    async fn bind(
        &self,
        claim: &PersistentVolumeClaim,
        taken: &mut HashSet<String>,
    ) -> Option<(bool, String, &'static str)> {
        if claim.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let (name, ns) = (name_of(&claim.metadata), ns_of(&claim.metadata));
        let bound_to = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .filter(|v| !v.is_empty());
        if let Some(vol) = bound_to {
            let pv = self.volumes.iter().find(|v| name_of(&v.metadata) == vol);
            let ours = |pv: &PersistentVolume| {
                reserved_for(pv, claim) || pv.spec.as_ref().is_some_and(|s| s.claim_ref.is_none())
            };
            match pv {
                // Finish a bind a crash left half-done.
                Some(pv)
                    if ours(pv)
                        && (phase_of_claim(claim) != "Bound" || phase_of_volume(pv) != "Bound") =>
                {
                    self.complete(claim, pv).await;
                }
                Some(pv) if ours(pv) => {}
                _ if phase_of_claim(claim) == "Bound" => {
                    self.claim_status(ns, name, json!({"phase": "Lost"})).await;
                    return Some((
                        true,
                        "Bound claim has lost its PersistentVolume. Data on the volume is lost!"
                            .into(),
                        "ClaimLost",
                    ));
                }
                _ => {}
            }
            return None;
        }
        let class_name = claim_class(claim);
        let class = self.class(class_name);
        let wait =
            class.and_then(|c| c.volume_binding_mode.as_deref()) == Some("WaitForFirstConsumer");
        let selected = annotation(&claim.metadata, SELECTED_NODE);
        if wait && selected.is_none() {
            return Some((
                false,
                "waiting for first consumer to be created before binding".into(),
                "WaitForFirstConsumer",
            ));
        }
        let node = if wait { selected } else { None };
        let best = self
            .volumes
            .iter()
            .filter(|pv| !taken.contains(name_of(&pv.metadata)))
            .filter(|pv| self.fits(pv, claim, node))
            // One reserved for the claim first, then the smallest.
            .min_by(|a, b| {
                let key = |pv: &PersistentVolume| {
                    (
                        !reserved_for(pv, claim),
                        storage_of(pv.spec.as_ref().and_then(|s| s.capacity.as_ref())),
                    )
                };
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
            });
        if let Some(pv) = best {
            taken.insert(name_of(&pv.metadata).to_string());
            self.complete(claim, pv).await;
            return None;
        }
        let provisioner = class.map(|c| c.provisioner.as_str());
        match (provisioner, node) {
            (Some(PROVISIONER), Some(node)) => match self.provision(claim, class?, node).await {
                Ok(pv) => {
                    taken.insert(pv.clone());
                    Some((
                        false,
                        format!("Successfully provisioned volume {pv}"),
                        "ProvisioningSucceeded",
                    ))
                }
                Err(e) => Some((
                    true,
                    format!("failed to provision volume with StorageClass \"{class_name}\": {e}"),
                    "ProvisioningFailed",
                )),
            },
            (Some(PROVISIONER), None) => Some((
                true,
                format!(
                    "failed to provision volume with StorageClass \"{class_name}\": configuration error, no node was specified"
                ),
                "ProvisioningFailed",
            )),
            (Some(other), _) => Some((
                false,
                format!(
                    "Waiting for a volume to be created either by the external provisioner '{other}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered."
                ),
                "ExternalProvisioning",
            )),
            (None, _) if class_name.is_empty() => Some((
                false,
                "no persistent volumes available for this claim and no storage class is set".into(),
                "FailedBinding",
            )),
            (None, _) => Some((
                true,
                format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
                "ProvisioningFailed",
            )),
        }
    }

    /// A local volume for `claim` on `node`, reserved for it.
    async fn provision(
        &self,
        claim: &PersistentVolumeClaim,
        class: &StorageClass,
        node: &str,
    ) -> Result<String, String> {
        let (name, ns) = (name_of(&claim.metadata), ns_of(&claim.metadata));
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let pv_name = format!("pvc-{uid}");
        let root = class
            .parameters
            .as_ref()
            .and_then(|p| p.get("nodePath"))
            .cloned()
            .or_else(|| {
                self.node(node)
                    .and_then(|n| annotation(&n.metadata, ROOT_ANNOTATION))
                    .map(String::from)
            })
            .unwrap_or_else(|| DEFAULT_ROOT.into());
        let spec = claim.spec.clone().unwrap_or_default();
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".into());
        let pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {
                "name": pv_name,
                "annotations": {PROVISIONED_BY: PROVISIONER},
                "finalizers": [CLEANUP_FINALIZER],
            },
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes,
                "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
                "storageClassName": name_of(&class.metadata),
                "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
                "local": {"path": format!("{}/{pv_name}", root.trim_end_matches('/'))},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": name, "uid": uid},
            },
        });
        let pv: PersistentVolume = serde_json::from_value(pv).map_err(|e| e.to_string())?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let marked = json!({"metadata": {"annotations": {
            STORAGE_PROVISIONER: PROVISIONER, BETA_STORAGE_PROVISIONER: PROVISIONER}}});
        claims
            .patch(name, &PatchParams::default(), &Patch::Merge(marked))
            .await
            .map_err(|e| e.to_string())?;
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.to_string()),
        }
        info!(claim = %format!("{ns}/{name}"), volume = %pv_name, node, "local volume provisioned");
        Ok(pv_name)
    }

    /// Binds `claim` and `pv` both ways, the volume first, as upstream's
    /// controller does, so a crash in between leaves a reserved volume.
    async fn complete(&self, claim: &PersistentVolumeClaim, pv: &PersistentVolume) {
        let (name, ns) = (name_of(&claim.metadata), ns_of(&claim.metadata));
        let pv_name = name_of(&pv.metadata);
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        if !reserved_for(pv, claim)
            || pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .is_some_and(|r| r.uid.is_none())
        {
            let reserve = json!({
                "metadata": {"annotations": {BOUND_BY_CONTROLLER: "yes"}},
                "spec": {"claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": name,
                    "uid": claim.metadata.uid, "resourceVersion": claim.metadata.resource_version}},
            });
            if let Err(e) = pvs
                .patch(pv_name, &PatchParams::default(), &Patch::Merge(reserve))
                .await
            {
                warn!(volume = %pv_name, error = %e, "reserving a volume failed");
                return;
            }
        }
        if phase_of_volume(pv) != "Bound" {
            crate::informer::write_status(&pvs, pv_name, json!({"phase": "Bound"})).await;
        }
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let binding = json!({
            "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"}},
            "spec": {"volumeName": pv_name},
        });
        if let Err(e) = claims
            .patch(name, &PatchParams::default(), &Patch::Merge(binding))
            .await
        {
            warn!(claim = %format!("{ns}/{name}"), error = %e, "binding a claim failed");
            return;
        }
        let vs = pv.spec.clone().unwrap_or_default();
        self.claim_status(
            ns,
            name,
            json!({
                "phase": "Bound",
                "accessModes": vs.access_modes,
                "capacity": vs.capacity,
            }),
        )
        .await;
        info!(claim = %format!("{ns}/{name}"), volume = %pv_name, "bound");
    }

    async fn claim_status(&self, ns: &str, name: &str, status: Value) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        crate::informer::write_status(&claims, name, status).await;
    }

    /// Lets a claim being deleted go once no unfinished pod uses it.
    async fn protect(&self, claim: &PersistentVolumeClaim, pods: &[Arc<Pod>]) {
        let holds = claim
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == CLAIM_PROTECTION);
        if claim.metadata.deletion_timestamp.is_none() || !holds {
            return;
        }
        let (name, ns) = (name_of(&claim.metadata), ns_of(&claim.metadata));
        let used = pods.iter().any(|p| {
            ns_of(&p.metadata) == ns
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
                && claims_of(p).any(|c| c == name)
        });
        if used {
            return;
        }
        let rest: Vec<&String> = claim
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != CLAIM_PROTECTION)
            .collect();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": claim.metadata.resource_version}});
        if let Err(e) = api
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            warn!(claim = %format!("{ns}/{name}"), error = %e, "releasing the claim's protection failed");
        }
    }

    /// Marks a new volume Available, a volume whose claim is gone
    /// Released, and deletes a released provisioned volume whose policy
    /// says Delete.
    async fn reclaim(&self, pv: &PersistentVolume) {
        if pv.metadata.deletion_timestamp.is_some() {
            return;
        }
        let name = name_of(&pv.metadata);
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        let spec = pv.spec.clone().unwrap_or_default();
        let phase = phase_of_volume(pv);
        let Some(r) = spec.claim_ref.as_ref() else {
            if phase != "Available" {
                crate::informer::write_status(&api, name, json!({"phase": "Available"})).await;
            }
            return;
        };
        if r.uid.is_none() {
            return; // reserved by hand for a claim not yet bound
        }
        let claim = self.claims.iter().find(|c| {
            c.metadata.name == r.name
                && c.metadata.namespace == r.namespace
                && c.metadata.uid == r.uid
        });
        if claim.is_some() {
            return;
        }
        // A claim deleted between our reads shows up in the next pass.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(
            self.client.clone(),
            r.namespace.as_deref().unwrap_or_default(),
        );
        if let Ok(Some(c)) = claims.get_opt(r.name.as_deref().unwrap_or_default()).await
            && c.metadata.uid == r.uid
        {
            return;
        }
        if phase != "Released" && phase != "Failed" {
            crate::informer::write_status(&api, name, json!({"phase": "Released"})).await;
            return;
        }
        match spec.persistent_volume_reclaim_policy.as_deref() {
            Some("Delete") if annotation(&pv.metadata, PROVISIONED_BY) == Some(PROVISIONER) => {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => info!(volume = %name, "released volume deleted"),
                    Err(e) => {
                        warn!(volume = %name, error = %e, "deleting a released volume failed")
                    }
                }
            }
            Some("Delete") if phase != "Failed" => {
                let status = json!({"phase": "Failed", "message": "error getting deleter volume plugin for volume: no deletable volume plugin matched"});
                crate::informer::write_status(&api, name, status).await;
            }
            _ => {}
        }
    }
}
