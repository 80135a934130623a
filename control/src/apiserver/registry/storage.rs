//! PersistentVolumeClaims, PersistentVolumes, StorageClasses and
//! StatefulSets: what a create adds (the default StorageClass, the
//! in-use protection finalizer) and what an update may not change.

use serde_json::{Value, json};

use super::super::Api;
use super::super::fields::str_at;
use crate::claims::CLAIM_PROTECTION;
use crate::resources;
use crate::status::{ApiError, Cause};

/// The annotation that makes a StorageClass the default one.
pub(crate) const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";

fn immutable(field: &str, new: Option<&Value>) -> Cause {
    let shown = new.map(Value::to_string).unwrap_or_else(|| "null".into());
    Cause::invalid(field, shown, "field is immutable")
}

impl Api {
    /// The name of the newest object of `group/plural` (a class) carrying
    /// `annotation: "true"`, as upstream's default-class admission picks.
    pub(super) async fn default_class(
        &self,
        group: &str,
        plural: &str,
        annotation: &str,
    ) -> Result<Option<String>, ApiError> {
        let r = resources::find(group, "v1", plural)
            .ok_or_else(|| ApiError::internal(format!("no {plural} resource")))?;
        let (items, _) = self
            .store
            .list(&r.prefix(None), None)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut best: Option<(String, String)> = None;
        for item in items {
            let Ok(class) = serde_json::from_slice::<Value>(&item.value) else {
                continue;
            };
            let default = class
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(annotation))
                .and_then(Value::as_str)
                == Some("true");
            if !default {
                continue;
            }
            let created = str_at(&class, "/metadata/creationTimestamp").to_string();
            let name = str_at(&class, "/metadata/name").to_string();
            if best.as_ref().is_none_or(|(c, _)| created > *c) {
                best = Some((created, name));
            }
        }
        Ok(best.map(|(_, n)| n))
    }

    /// A new claim without a class (not `""`, which asks for none) gets
    /// the default class, and every claim the protection finalizer.
    pub(super) async fn admit_claim(&self, obj: &mut Value) -> Result<(), ApiError> {
        if obj
            .pointer("/spec/storageClassName")
            .is_none_or(Value::is_null)
            && let Some(class) = self
                .default_class("storage.k8s.io", "storageclasses", DEFAULT_CLASS)
                .await?
            && let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("storageClassName".into(), json!(class));
        }
        add_finalizer(obj, CLAIM_PROTECTION);
        Ok(())
    }
}

fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list = meta.entry("finalizers").or_insert_with(|| json!([]));
    if let Some(list) = list.as_array_mut()
        && !list.iter().any(|f| f == finalizer)
    {
        list.push(json!(finalizer));
    }
}

/// A claim's spec is fixed once created, except its requests (a resize)
/// and the volume it is bound to, set once.
pub(super) fn check_claim_update(name: &str, cur: &Value, new: &Value) -> Result<(), ApiError> {
    let strip = |v: &Value| {
        let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
        if let Some(m) = spec.as_object_mut() {
            m.remove("resources");
            m.remove("volumeAttributesClassName");
            if str_at(cur, "/spec/volumeName").is_empty() {
                m.remove("volumeName");
            }
        }
        spec
    };
    if strip(cur) == strip(new) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "",
        "PersistentVolumeClaim",
        name,
        vec![Cause::forbidden(
            "spec",
            "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
        )],
    ))
}

/// A volume's source and node affinity are fixed once created.
pub(super) fn check_volume_update(name: &str, cur: &Value, new: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let source = |v: &Value| -> Vec<(String, Value)> {
        v.get("spec")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "accessModes"
                        | "capacity"
                        | "claimRef"
                        | "mountOptions"
                        | "nodeAffinity"
                        | "persistentVolumeReclaimPolicy"
                        | "storageClassName"
                        | "volumeMode"
                        | "volumeAttributesClassName"
                )
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    if source(cur) != source(new) {
        causes.push(Cause::forbidden(
            "spec.persistentvolumesource",
            "spec.persistentvolumesource is immutable after creation",
        ));
    }
    let affinity = cur.pointer("/spec/nodeAffinity");
    if affinity.is_some_and(|a| !a.is_null()) && affinity != new.pointer("/spec/nodeAffinity") {
        causes.push(immutable(
            "spec.nodeAffinity.required",
            new.pointer("/spec/nodeAffinity/required"),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("", "PersistentVolume", name, causes))
    }
}

/// A class's provisioner, parameters, reclaim policy and binding mode are
/// fixed once created.
pub(super) fn check_class_update(name: &str, cur: &Value, new: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    for field in ["parameters", "provisioner", "reclaimPolicy"] {
        if cur.get(field) != new.get(field) {
            causes.push(Cause::forbidden(
                field,
                &format!("updates to {field} are forbidden."),
            ));
        }
    }
    if cur.get("volumeBindingMode") != new.get("volumeBindingMode") {
        causes.push(immutable("volumeBindingMode", new.get("volumeBindingMode")));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "storage.k8s.io",
            "StorageClass",
            name,
            causes,
        ))
    }
}

/// Only the replicas, template, update strategy, history limit, claim
/// retention and minReadySeconds of a StatefulSet may change.
pub(super) fn check_stateful_set_update(
    name: &str,
    cur: &Value,
    new: &Value,
) -> Result<(), ApiError> {
    let fixed = |v: &Value| {
        let mut spec = v.get("spec").cloned().unwrap_or(Value::Null);
        if let Some(m) = spec.as_object_mut() {
            for f in [
                "replicas",
                "ordinals",
                "template",
                "updateStrategy",
                "revisionHistoryLimit",
                "persistentVolumeClaimRetentionPolicy",
                "minReadySeconds",
            ] {
                m.remove(f);
            }
        }
        spec
    };
    if fixed(cur) == fixed(new) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "apps",
        "StatefulSet",
        name,
        vec![Cause::forbidden(
            "spec",
            "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
        )],
    ))
}
