//! PersistentVolumes, PersistentVolumeClaims, StorageClasses and
//! StatefulSets: their defaults and upstream's rules for them.

use serde_json::{Value, json};

use super::{Check, default_pod_spec, obj_mut, set_default};
use crate::quantity::parse_quantity;
use crate::status::Cause;

const ACCESS_MODES: &[&str] = &[
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOnce",
    "ReadWriteOncePod",
];
const RECLAIM: &[&str] = &["Delete", "Recycle", "Retain"];
const BINDING_MODES: &[&str] = &["Immediate", "WaitForFirstConsumer"];
const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];

/// The volume sources a PersistentVolume may name (one of them).
const PV_SOURCES: &[&str] = &[
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cephfs",
    "cinder",
    "csi",
    "fc",
    "flexVolume",
    "flocker",
    "gcePersistentDisk",
    "glusterfs",
    "hostPath",
    "iscsi",
    "local",
    "nfs",
    "photonPersistentDisk",
    "portworxVolume",
    "quobyte",
    "rbd",
    "scaleIO",
    "storageos",
    "vsphereVolume",
];

pub(super) fn default_claim_spec(spec: &mut Value) {
    set_default(spec, "volumeMode", json!("Filesystem"));
}

pub(super) fn default_volume(v: &mut Value) {
    let spec = obj_mut(v, "spec");
    set_default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
    set_default(spec, "volumeMode", json!("Filesystem"));
    set_default(obj_mut(v, "status"), "phase", json!("Pending"));
}

pub(super) fn default_storage_class(v: &mut Value) {
    set_default(v, "reclaimPolicy", json!("Delete"));
    set_default(v, "volumeBindingMode", json!("Immediate"));
}

/// Upstream's StatefulSet defaults.
pub(super) fn default_stateful_set(spec: &mut Value) {
    set_default(spec, "replicas", json!(1));
    set_default(spec, "podManagementPolicy", json!("OrderedReady"));
    set_default(spec, "revisionHistoryLimit", json!(10));
    let strategy = obj_mut(spec, "updateStrategy");
    set_default(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        set_default(obj_mut(strategy, "rollingUpdate"), "partition", json!(0));
    }
    let retention = obj_mut(spec, "persistentVolumeClaimRetentionPolicy");
    set_default(retention, "whenDeleted", json!("Retain"));
    set_default(retention, "whenScaled", json!("Retain"));
    if let Some(Value::Array(claims)) = spec.get_mut("volumeClaimTemplates") {
        for c in claims {
            default_claim_spec(obj_mut(c, "spec"));
            set_default(obj_mut(c, "status"), "phase", json!("Pending"));
        }
    }
    default_pod_spec(obj_mut(obj_mut(spec, "template"), "spec"));
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

impl Check {
    fn access_modes(&mut self, at: &str, spec: &Value) {
        let modes = strs(spec.get("accessModes"));
        if modes.is_empty() {
            self.push(Cause::required_because(
                format!("{at}.accessModes"),
                "at least 1 access mode is required",
            ));
        }
        for m in &modes {
            if !ACCESS_MODES.contains(m) {
                self.push(Cause::unsupported(
                    format!("{at}.accessModes"),
                    m,
                    ACCESS_MODES,
                ));
            }
        }
        if modes.contains(&"ReadWriteOncePod") && modes.len() > 1 {
            self.push(Cause::forbidden(
                format!("{at}.accessModes"),
                "may not use ReadWriteOncePod with other access modes",
            ));
        }
        self.one_of(
            &format!("{at}.volumeMode"),
            spec.get("volumeMode"),
            VOLUME_MODES,
            false,
        );
    }

    fn storage_size(&mut self, field: &str, v: Option<&Value>) {
        match v.and_then(Value::as_str) {
            None => self.push(Cause::required(field)),
            Some(q) => match parse_quantity(q) {
                Some(b) if b > 0.0 => {}
                Some(_) => self.push(Cause::invalid(field, q, "must be greater than zero")),
                None => self.push(Cause::invalid(
                    field,
                    q,
                    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                )),
            },
        }
    }

    /// A claim's spec (of a PVC, or of a StatefulSet's claim template).
    pub(super) fn claim_spec(&mut self, at: &str, spec: &Value) {
        self.access_modes(at, spec);
        self.storage_size(
            &format!("{at}.resources[storage]"),
            spec.pointer("/resources/requests/storage"),
        );
    }

    pub(super) fn persistent_volume(&mut self, spec: &Value) {
        self.access_modes("spec", spec);
        self.storage_size("spec.capacity", spec.pointer("/capacity/storage"));
        let sources: Vec<&&str> = PV_SOURCES
            .iter()
            .filter(|s| spec.get(**s).is_some_and(|v| !v.is_null()))
            .collect();
        match sources.len() {
            0 => self.push(Cause::required_because(
                "spec",
                "must specify a volume type",
            )),
            1 => {}
            _ => self.push(Cause::forbidden(
                format!("spec.{}", sources[1]),
                "may not specify more than 1 volume type",
            )),
        }
        for src in ["hostPath", "local"] {
            if let Some(p) = spec
                .pointer(&format!("/{src}/path"))
                .and_then(Value::as_str)
                && !p.starts_with('/')
            {
                self.push(Cause::invalid(
                    format!("spec.{src}.path"),
                    p,
                    "must be an absolute path",
                ));
            }
        }
        if spec.get("local").is_some_and(|v| !v.is_null())
            && spec
                .pointer("/nodeAffinity/required/nodeSelectorTerms")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
        {
            self.push(Cause::required_because(
                "spec.nodeAffinity",
                "Local volume requires node affinity",
            ));
        }
        self.one_of(
            "spec.persistentVolumeReclaimPolicy",
            spec.get("persistentVolumeReclaimPolicy"),
            RECLAIM,
            false,
        );
    }

    pub(super) fn storage_class(&mut self, v: &Value) {
        match v.get("provisioner").and_then(Value::as_str) {
            None | Some("") => self.push(Cause::required("provisioner")),
            Some(p) if p.len() > 63 => self.push(Cause::invalid(
                "provisioner",
                p,
                "must be no more than 63 characters",
            )),
            Some(_) => {}
        }
        self.one_of(
            "reclaimPolicy",
            v.get("reclaimPolicy"),
            &["Delete", "Retain"],
            false,
        );
        self.one_of(
            "volumeBindingMode",
            v.get("volumeBindingMode"),
            BINDING_MODES,
            false,
        );
    }

    pub(super) fn stateful_set(&mut self, spec: &Value) {
        self.workload("StatefulSet", spec);
        self.one_of(
            "spec.podManagementPolicy",
            spec.get("podManagementPolicy"),
            &["OrderedReady", "Parallel"],
            true,
        );
        let strategy = spec.get("updateStrategy");
        self.one_of(
            "spec.updateStrategy.type",
            strategy.and_then(|s| s.get("type")),
            &["OnDelete", "RollingUpdate"],
            true,
        );
        if let Some(p) = strategy
            .and_then(|s| s.pointer("/rollingUpdate/partition"))
            .and_then(Value::as_i64)
            && p < 0
        {
            self.push(Cause::invalid(
                "spec.updateStrategy.rollingUpdate.partition",
                p,
                "must be greater than or equal to 0",
            ));
        }
        if strategy.and_then(|s| s.get("type")).and_then(Value::as_str) == Some("OnDelete")
            && strategy.is_some_and(|s| s.get("rollingUpdate").is_some_and(|r| !r.is_null()))
        {
            self.push(Cause::invalid(
                "spec.updateStrategy.rollingUpdate",
                "",
                "only allowed for updateStrategy 'RollingUpdate'",
            ));
        }
        for field in ["whenDeleted", "whenScaled"] {
            self.one_of(
                &format!("spec.persistentVolumeClaimRetentionPolicy.{field}"),
                spec.pointer(&format!("/persistentVolumeClaimRetentionPolicy/{field}")),
                &["Delete", "Retain"],
                false,
            );
        }
        if let Some(n) = spec.get("serviceName").and_then(Value::as_str)
            && !n.is_empty()
            && !super::is_dns_label(n)
        {
            self.push(Cause::invalid("spec.serviceName", n, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in spec
            .get("volumeClaimTemplates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("spec.volumeClaimTemplates[{i}]");
            match c.pointer("/metadata/name").and_then(Value::as_str) {
                None | Some("") => self.push(Cause::required(format!("{at}.metadata.name"))),
                Some(n) if !names.insert(n.to_string()) => {
                    self.push(Cause::duplicate(format!("{at}.metadata.name"), n))
                }
                Some(_) => {}
            }
            self.claim_spec(&format!("{at}.spec"), c.get("spec").unwrap_or(&Value::Null));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::resources::find;

    fn causes(plural: &str, v: serde_json::Value) -> Vec<String> {
        let group = if plural == "storageclasses" {
            "storage.k8s.io"
        } else {
            ""
        };
        let r = find(group, "v1", plural).expect("resource");
        let mut v = v;
        super::super::default(r, &mut v);
        match super::super::validate(
            r,
            &v,
            super::super::Limits {
                node_ports: (30000, 32767),
            },
        ) {
            Ok(()) => Vec::new(),
            Err(e) => e
                .causes()
                .iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect(),
        }
    }

    #[test]
    fn volumes_claims_and_classes_follow_upstream_rules() {
        let local = serde_json::json!({"metadata": {"name": "v"}, "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "local": {"path": "/data"}}});
        assert_eq!(
            causes("persistentvolumes", local),
            ["spec.nodeAffinity: Required value: Local volume requires node affinity"]
        );
        let two = serde_json::json!({"metadata": {"name": "v"}, "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "hostPath": {"path": "/a"}, "nfs": {"server": "s", "path": "/"}}});
        assert_eq!(
            causes("persistentvolumes", two),
            ["spec.nfs: Forbidden: may not specify more than 1 volume type"]
        );
        let claim = serde_json::json!({"metadata": {"name": "c"}, "spec": {
            "accessModes": ["ReadWriteSometimes"], "resources": {"requests": {"storage": "0"}}}});
        assert_eq!(
            causes("persistentvolumeclaims", claim),
            [
                "spec.accessModes: Unsupported value: \"ReadWriteSometimes\": supported values: \"ReadOnlyMany\", \"ReadWriteMany\", \"ReadWriteOnce\", \"ReadWriteOncePod\"",
                "spec.resources[storage]: Invalid value: \"0\": must be greater than zero",
            ]
        );
        let class = serde_json::json!({"metadata": {"name": "s"}, "provisioner": "p", "volumeBindingMode": "Later"});
        assert_eq!(
            causes("storageclasses", class),
            [
                "volumeBindingMode: Unsupported value: \"Later\": supported values: \"Immediate\", \"WaitForFirstConsumer\""
            ]
        );
    }
}
