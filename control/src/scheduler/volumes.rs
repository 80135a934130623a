//! Volume binding in scheduling, as upstream's VolumeBinding plugin does
//! it: a pod's bound claims limit it to the nodes their volumes' node
//! affinity allows; a claim of a `WaitForFirstConsumer` class is given
//! the node chosen for the pod (the `volume.kubernetes.io/selected-node`
//! annotation), and the pod is bound once the volume controller has bound
//! its claims there.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::claims::{SELECTED_NODE, claims_of};
use crate::meta::{name_of, ns_of};

/// Where a pod stands with its claims.
#[derive(Debug, PartialEq)]
pub enum Claims {
    /// Every claim is bound: the node affinities of their volumes.
    Bound(Vec<NodeSelector>),
    /// These claims wait for the pod's node; the bound ones' affinities
    /// limit where it may go.
    Unbound {
        waiting: Vec<String>,
        affinities: Vec<NodeSelector>,
    },
    /// A node was chosen for the pod's claims; they are being bound.
    Binding(String),
    /// The pod cannot be scheduled yet, and why.
    Blocked(String),
}

/// What the scheduler reads of the claims, volumes and classes.
pub struct Snapshot {
    pub claims: Vec<Arc<PersistentVolumeClaim>>,
    pub volumes: Vec<Arc<PersistentVolume>>,
    pub classes: Vec<Arc<StorageClass>>,
}

impl Snapshot {
    pub fn of(&self, pod: &Pod) -> Claims {
        let ns = ns_of(&pod.metadata);
        let mut affinities = Vec::new();
        let mut waiting = Vec::new();
        let mut chosen: Option<String> = None;
        for name in claims_of(pod) {
            let Some(claim) = self
                .claims
                .iter()
                .find(|c| ns_of(&c.metadata) == ns && name_of(&c.metadata) == name)
            else {
                return Claims::Blocked(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Claims::Blocked(format!(
                    "persistentvolumeclaim \"{name}\" is being deleted"
                ));
            }
            let volume = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .filter(|v| !v.is_empty());
            if let Some(volume) = volume {
                let pv = self.volumes.iter().find(|v| name_of(&v.metadata) == volume);
                match pv {
                    Some(pv) => affinities.extend(
                        pv.spec
                            .as_ref()
                            .and_then(|s| s.node_affinity.as_ref())
                            .and_then(|a| a.required.clone()),
                    ),
                    None => {
                        return Claims::Blocked(format!("persistentvolume \"{volume}\" not found"));
                    }
                }
                continue;
            }
            let class = claim
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
                .unwrap_or_default();
            let delayed = self
                .classes
                .iter()
                .find(|c| name_of(&c.metadata) == class)
                .and_then(|c| c.volume_binding_mode.as_deref())
                == Some("WaitForFirstConsumer");
            if !delayed {
                return Claims::Blocked("pod has unbound immediate PersistentVolumeClaims".into());
            }
            match claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SELECTED_NODE))
            {
                Some(node) => chosen = Some(node.clone()),
                None => waiting.push(name.to_string()),
            }
        }
        match chosen {
            Some(node) => Claims::Binding(node),
            None if waiting.is_empty() => Claims::Bound(affinities),
            None => Claims::Unbound {
                waiting,
                affinities,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("object"))
    }

    #[test]
    fn claims_decide_where_and_when() {
        let snap = Snapshot {
            claims: vec![
                arc(
                    serde_json::json!({"metadata": {"name": "bound", "namespace": "d"}, "spec": {"volumeName": "pv1"}}),
                ),
                arc(
                    serde_json::json!({"metadata": {"name": "late", "namespace": "d"}, "spec": {"storageClassName": "local"}}),
                ),
                arc(
                    serde_json::json!({"metadata": {"name": "now", "namespace": "d"}, "spec": {"storageClassName": "fast"}}),
                ),
                arc(
                    serde_json::json!({"metadata": {"name": "picked", "namespace": "d", "annotations": {SELECTED_NODE: "n2"}}, "spec": {"storageClassName": "local"}}),
                ),
            ],
            volumes: vec![arc(
                serde_json::json!({"metadata": {"name": "pv1"}, "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}}}}),
            )],
            classes: vec![
                arc(
                    serde_json::json!({"metadata": {"name": "local"}, "provisioner": "p", "volumeBindingMode": "WaitForFirstConsumer"}),
                ),
                arc(serde_json::json!({"metadata": {"name": "fast"}, "provisioner": "p"})),
            ],
        };
        let pod = |claims: &[&str]| -> Pod {
            let volumes: Vec<serde_json::Value> = claims
                .iter()
                .map(|c| serde_json::json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
                .collect();
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": [], "volumes": volumes}})).expect("pod")
        };
        assert!(matches!(snap.of(&pod(&["bound"])), Claims::Bound(a) if a.len() == 1));
        assert_eq!(snap.of(&pod(&[])), Claims::Bound(Vec::new()));
        assert!(
            matches!(snap.of(&pod(&["bound", "late"])), Claims::Unbound { waiting, affinities } if waiting == ["late"] && affinities.len() == 1)
        );
        assert_eq!(snap.of(&pod(&["picked"])), Claims::Binding("n2".into()));
        assert_eq!(
            snap.of(&pod(&["now"])),
            Claims::Blocked("pod has unbound immediate PersistentVolumeClaims".into())
        );
        assert_eq!(
            snap.of(&pod(&["gone"])),
            Claims::Blocked("persistentvolumeclaim \"gone\" not found".into())
        );
    }
}
