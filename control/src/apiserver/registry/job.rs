//! Jobs (batch/v1): on create a Job without `manualSelector` gets the
//! selector and pod labels upstream generates from its uid and name; an
//! update may not change what its pods were made from (selector,
//! template, completions, completion mode, pod failure policy).

use serde_json::{Map, Value, json};

use super::super::fields::str_at;
use crate::status::{ApiError, Cause};

/// The label that ties a Job's pods to it, keyed by its uid.
pub(crate) const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
/// The label naming a pod's Job.
pub(crate) const JOB_NAME: &str = "batch.kubernetes.io/job-name";

fn manual(obj: &Value) -> bool {
    obj.pointer("/spec/manualSelector") == Some(&json!(true))
}

/// The selector a Job without `manualSelector` has.
fn generated_selector(uid: &str) -> Value {
    json!({"matchLabels": {CONTROLLER_UID: uid}})
}

/// Admission on create: the generated selector, and the labels it
/// selects (with the legacy unprefixed pair) on the pod template. A
/// selector the client gave is left for validation to refuse.
pub(crate) fn admit(obj: &mut Value) {
    if manual(obj) {
        return;
    }
    let uid = str_at(obj, "/metadata/uid").to_string();
    let name = str_at(obj, "/metadata/name").to_string();
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("selector")
        .or_insert_with(|| generated_selector(&uid));
    let template = spec
        .entry("template")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    let Some(template) = template else { return };
    let meta = template
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    let Some(meta) = meta else { return };
    let labels = meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(labels) = labels.as_object_mut() {
        for (k, v) in [
            (CONTROLLER_UID, &uid),
            (JOB_NAME, &name),
            ("controller-uid", &uid),
            ("job-name", &name),
        ] {
            labels.insert(k.to_string(), json!(v));
        }
    }
}

/// What is wrong with the selector, if anything: one not asked for as
/// manual must be the generated one.
pub(crate) fn selector_cause(obj: &Value) -> Option<Cause> {
    if manual(obj) {
        return None;
    }
    let sel = obj
        .pointer("/spec/selector")
        .cloned()
        .unwrap_or(Value::Null);
    (sel != generated_selector(str_at(obj, "/metadata/uid")))
        .then(|| Cause::invalid("spec.selector", sel, "`selector` not auto-generated"))
}

pub(super) fn check_update(name: &str, cur: &Value, new: &Value) -> Result<(), ApiError> {
    let causes: Vec<Cause> = [
        "selector",
        "template",
        "completions",
        "completionMode",
        "podFailurePolicy",
    ]
    .into_iter()
    .filter(|f| cur.pointer(&format!("/spec/{f}")) != new.pointer(&format!("/spec/{f}")))
    .map(|f| {
        let shown = new
            .pointer(&format!("/spec/{f}"))
            .map(Value::to_string)
            .unwrap_or_else(|| "null".into());
        Cause::invalid(format!("spec.{f}"), shown, "field is immutable")
    })
    .collect();
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("batch", "Job", name, causes))
    }
}
