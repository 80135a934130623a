//! What admission, the scheduler and the volume controller share about
//! PersistentVolumeClaims: the well-known names, and the claims a pod
//! uses.

use k8s_openapi::api::core::v1::Pod;

/// The finalizer that keeps a claim while a pod uses it: admission adds
/// it, the volume controller removes it.
pub(crate) const CLAIM_PROTECTION: &str = "kubernetes.io/pvc-protection";
/// Where the scheduler names the node of a `WaitForFirstConsumer` claim.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The provisioner name of Skiff's node-local volumes.
pub const PROVISIONER: &str = "skiff.io/local-path";
/// Held by a provisioned volume until its node's kubelet removed the
/// directory.
pub const CLEANUP_FINALIZER: &str = "skiff.io/local-path-cleanup";
/// The Node annotation where a kubelet publishes its local volume root.
pub const ROOT_ANNOTATION: &str = "skiff.io/local-path-root";

/// The claims a pod's volumes name.
pub fn claims_of(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}
