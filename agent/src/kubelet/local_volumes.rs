//! The node half of Skiff's local volumes (provisioner
//! `skiff.io/local-path`): where a pod's PersistentVolumeClaims live on
//! this node, and removing the directory of a provisioned volume once it
//! is deleted.
//!
//! The control plane's volume controller creates the PersistentVolume with
//! `local.path = <root>/<volume>` and node affinity to this node, where
//! `<root>` is what the kubelet publishes in the Node's
//! `skiff.io/local-path-root` annotation. The directory is made when a pod
//! first mounts the volume, and the volume's `skiff.io/local-path-cleanup`
//! finalizer holds its deletion until the directory is gone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use tracing::{info, warn};

use super::volumes::{ConfigError, Sources};

/// The provisioner whose volumes the kubelet makes and removes.
pub const PROVISIONER: &str = "skiff.io/local-path";
/// The Node annotation naming where this node keeps local volumes.
pub const ROOT_ANNOTATION: &str = "skiff.io/local-path-root";
const CLEANUP_FINALIZER: &str = "skiff.io/local-path-cleanup";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// Where the node keeps the local volumes it is given.
pub fn root(root_dir: &Path) -> PathBuf {
    root_dir.join("local-path")
}

fn provisioned_here(pv: &PersistentVolume) -> bool {
    pv.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVISIONED_BY))
        .is_some_and(|p| p == PROVISIONER)
}

fn path_of(pv: &PersistentVolume) -> Option<&str> {
    let spec = pv.spec.as_ref()?;
    spec.local
        .as_ref()
        .map(|l| l.path.as_str())
        .or_else(|| spec.host_path.as_ref().map(|h| h.path.as_str()))
}

/// The node path of each of the pod's claim volumes, by volume name; a
/// provisioned volume's directory is made on first use.
pub async fn claim_paths(
    src: &Sources<'_>,
    pod: &Pod,
) -> Result<BTreeMap<String, PathBuf>, ConfigError> {
    let mut out = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(c) = &v.persistent_volume_claim else {
            continue;
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(src.client.clone(), src.namespace);
        let claim = claims
            .get_opt(&c.claim_name)
            .await
            .map_err(|e| {
                ConfigError(format!(
                    "reading persistentvolumeclaim {:?}: {e}",
                    c.claim_name
                ))
            })?
            .ok_or_else(|| {
                ConfigError(format!(
                    "persistentvolumeclaim {:?} not found",
                    c.claim_name
                ))
            })?;
        let volume = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ConfigError(format!(
                    "persistentvolumeclaim {:?} is not bound",
                    c.claim_name
                ))
            })?;
        let pvs: Api<PersistentVolume> = Api::all(src.client.clone());
        let pv = pvs
            .get(&volume)
            .await
            .map_err(|e| ConfigError(format!("reading persistentvolume {volume:?}: {e}")))?;
        let path = path_of(&pv).ok_or_else(|| {
            ConfigError(format!(
                "persistentvolume {volume:?}: unsupported volume type (local and hostPath are)"
            ))
        })?;
        let path = PathBuf::from(path);
        if !path.exists() && provisioned_here(&pv) {
            std::fs::create_dir_all(&path)
                .and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
                })
                .map_err(|e| ConfigError(format!("making local volume {}: {e}", path.display())))?;
            info!(volume = %volume, path = %path.display(), "local volume directory made");
        }
        if !path.exists() {
            return Err(ConfigError(format!(
                "persistentvolume {volume:?}: path {} does not exist on the node",
                path.display()
            )));
        }
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// Removes the directories of provisioned volumes with affinity to this
/// node once they are deleted, then lets them go, until the watch ends.
pub async fn cleanup(client: kube::Client, node: String, root: PathBuf) {
    let api: Api<PersistentVolume> = Api::all(client);
    let mut events = Box::pin(
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects(),
    );
    while let Some(ev) = events.next().await {
        let pv = match ev {
            Ok(pv) => pv,
            Err(e) => {
                warn!(error = %e, "volume watch error; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let holds = pv
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == CLEANUP_FINALIZER);
        if pv.metadata.deletion_timestamp.is_none() || !holds || !on_node(&pv, &node) {
            continue;
        }
        let name = pv.metadata.name.clone().unwrap_or_default();
        // Only what this node made, under its own root, is removed.
        if let Some(path) = path_of(&pv).map(PathBuf::from)
            && provisioned_here(&pv)
            && path.starts_with(&root)
            && path != root
            && let Err(e) = std::fs::remove_dir_all(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(volume = %name, path = %path.display(), error = %e, "removing a local volume failed");
            continue;
        }
        let rest: Vec<&String> = pv
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != CLEANUP_FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": rest, "resourceVersion": pv.metadata.resource_version}});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => info!(volume = %name, "local volume removed"),
            Err(e) => warn!(volume = %name, error = %e, "finalizing a local volume failed"),
        }
    }
}

/// Whether the volume's node affinity is this node by hostname.
fn on_node(pv: &PersistentVolume, node: &str) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .is_some_and(|r| {
            r.node_selector_terms.iter().any(|t| {
                t.match_expressions.iter().flatten().any(|e| {
                    e.key == "kubernetes.io/hostname"
                        && e.operator == "In"
                        && e.values.as_deref() == Some(&[node.to_string()][..])
                })
            })
        })
}
