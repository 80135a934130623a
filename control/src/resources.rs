//! The resources the apiserver serves: names, scope, subresources, and the
//! etcd key layout `/registry/<resource>/<namespace>/<name>`.

/// The verbs every served resource answers, as discovery lists them.
pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// One served resource.
#[derive(Debug)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `status` subresource: the main resource ignores status changes
    /// and `/status` changes nothing else.
    pub status: bool,
    /// Has a `scale` subresource (autoscaling/v1 Scale).
    pub scale: bool,
    /// Spec changes bump `metadata.generation`.
    pub generation: bool,
    pub categories: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The etcd prefix holding every object of this resource, or of one
    /// namespace of it.
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("/registry/{}/{ns}/", self.plural),
            None => format!("/registry/{}/", self.plural),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.prefix(namespace), name)
    }

    pub fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }

    /// A review (access, rules, token, whoami): created and answered, never
    /// stored.
    pub fn review(&self) -> bool {
        matches!(self.group, "authorization.k8s.io" | "authentication.k8s.io")
    }

    /// Resource metrics: read from the kubelets, never stored.
    pub fn metrics(&self) -> bool {
        self.group == "metrics.k8s.io"
    }

    /// The version this one is stored as, when it is only a second
    /// served version of it (`apiserver/convert.rs` turns one into the
    /// other).
    pub fn stored_as(&self) -> Option<&'static Resource> {
        if self.is("autoscaling", "horizontalpodautoscalers") && self.version == "v1" {
            return find("autoscaling", "v2", "horizontalpodautoscalers");
        }
        None
    }

    /// Kept in etcd under [`Resource::prefix`], as itself.
    pub fn stored(&self) -> bool {
        !self.review() && !self.metrics() && self.stored_as().is_none()
    }
}

const ALL: &[&str] = &["all"];

macro_rules! resource {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $short:expr, status: $status:expr, scale: $scale:expr, generation: $gen:expr, categories: $cat:expr) => {
        Resource {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            short_names: $short,
            status: $status,
            scale: $scale,
            generation: $gen,
            categories: $cat,
        }
    };
}

pub static RESOURCES: &[Resource] = &[
    resource!("", "v1", "Namespace", "namespaces", "namespace", false, &["ns"], status: true, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "Pod", "pods", "pod", true, &["po"], status: true, scale: false, generation: true, categories: ALL),
    resource!("", "v1", "Service", "services", "service", true, &["svc"], status: true, scale: false, generation: false, categories: ALL),
    resource!("", "v1", "ReplicationController", "replicationcontrollers", "replicationcontroller", true, &["rc"], status: true, scale: true, generation: true, categories: ALL),
    resource!("", "v1", "PersistentVolume", "persistentvolumes", "persistentvolume", false, &["pv"], status: true, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", "persistentvolumeclaim", true, &["pvc"], status: true, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "ResourceQuota", "resourcequotas", "resourcequota", true, &["quota"], status: true, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "LimitRange", "limitranges", "limitrange", true, &["limits"], status: false, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "Endpoints", "endpoints", "endpoints", true, &["ep"], status: false, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "Node", "nodes", "node", false, &["no"], status: true, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "ConfigMap", "configmaps", "configmap", true, &["cm"], status: false, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "Secret", "secrets", "secret", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "Event", "events", "event", true, &["ev"], status: false, scale: false, generation: false, categories: &[]),
    resource!("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", true, &["sa"], status: false, scale: false, generation: false, categories: &[]),
    resource!("coordination.k8s.io", "v1", "Lease", "leases", "lease", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("apps", "v1", "ReplicaSet", "replicasets", "replicaset", true, &["rs"], status: true, scale: true, generation: true, categories: ALL),
    resource!("apps", "v1", "Deployment", "deployments", "deployment", true, &["deploy"], status: true, scale: true, generation: true, categories: ALL),
    resource!("apps", "v1", "DaemonSet", "daemonsets", "daemonset", true, &["ds"], status: true, scale: false, generation: true, categories: ALL),
    resource!("apps", "v1", "StatefulSet", "statefulsets", "statefulset", true, &["sts"], status: true, scale: true, generation: true, categories: ALL),
    resource!("apps", "v1", "ControllerRevision", "controllerrevisions", "controllerrevision", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", true, &["hpa"], status: true, scale: false, generation: true, categories: ALL),
    // Stored as v2, served as v1 too (`apiserver/convert.rs`).
    resource!("autoscaling", "v1", "HorizontalPodAutoscaler", "horizontalpodautoscalers", "horizontalpodautoscaler", true, &["hpa"], status: true, scale: false, generation: true, categories: ALL),
    resource!("batch", "v1", "Job", "jobs", "job", true, &[], status: true, scale: false, generation: true, categories: ALL),
    resource!("batch", "v1", "CronJob", "cronjobs", "cronjob", true, &["cj"], status: true, scale: false, generation: true, categories: ALL),
    resource!("networking.k8s.io", "v1", "Ingress", "ingresses", "ingress", true, &["ing"], status: true, scale: false, generation: true, categories: &[]),
    resource!("networking.k8s.io", "v1", "IngressClass", "ingressclasses", "ingressclass", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("storage.k8s.io", "v1", "StorageClass", "storageclasses", "storageclass", false, &["sc"], status: false, scale: false, generation: false, categories: &[]),
    resource!("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", "clusterrole", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", "clusterrolebinding", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("certificates.k8s.io", "v1", "CertificateSigningRequest", "certificatesigningrequests", "certificatesigningrequest", false, &["csr"], status: true, scale: false, generation: false, categories: &[]),
    resource!("authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", "selfsubjectaccessreview", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("authorization.k8s.io", "v1", "SelfSubjectRulesReview", "selfsubjectrulesreviews", "selfsubjectrulesreview", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", "subjectaccessreview", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", "localsubjectaccessreview", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", "tokenreview", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("metrics.k8s.io", "v1beta1", "NodeMetrics", "nodes", "nodemetrics", false, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("metrics.k8s.io", "v1beta1", "PodMetrics", "pods", "podmetrics", true, &[], status: false, scale: false, generation: false, categories: &[]),
    resource!("authentication.k8s.io", "v1", "SelfSubjectReview", "selfsubjectreviews", "selfsubjectreview", false, &[], status: false, scale: false, generation: false, categories: &[]),
];

/// The groups in discovery order (core first, as upstream lists them).
pub fn groups() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.contains(&r.group) {
            out.push(r.group);
        }
    }
    out
}

/// The version a group is preferably served at.
pub fn group_version(group: &str) -> &'static str {
    group_versions(group).first().copied().unwrap_or("v1")
}

/// Every version a group is served at, the preferred first.
pub fn group_versions(group: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group) {
        if !out.contains(&r.version) {
            out.push(r.version);
        }
    }
    out
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

pub fn in_version(group: &str, version: &str) -> impl Iterator<Item = &'static Resource> {
    let (g, v) = (group.to_string(), version.to_string());
    RESOURCES
        .iter()
        .filter(move |r| r.group == g && r.version == v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_registry_layout() {
        let pods = find("", "v1", "pods").expect("pods");
        assert_eq!(
            pods.key(Some("default"), "web-1"),
            "/registry/pods/default/web-1"
        );
        assert_eq!(pods.prefix(None), "/registry/pods/");
        let nodes = find("", "v1", "nodes").expect("nodes");
        assert_eq!(nodes.key(Some("ignored"), "n1"), "/registry/nodes/n1");
    }
}
