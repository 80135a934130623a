//! Pods (their ServiceAccount is admitted on create, in `access.rs`): an
//! update may change only images, the active deadline and tolerations,
//! and a pod bound to a node gets a grace period on delete, which its
//! kubelet ends.

use serde_json::{Value, json};

use super::super::fields::str_at;
use crate::status::{ApiError, Cause};

pub(super) fn check_update(name: &str, cur: &Value, new: &Value) -> Result<(), ApiError> {
    let strip = |v: &Value| {
        let mut s = v.get("spec").cloned().unwrap_or(json!({}));
        for list in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = s.get_mut(list) {
                for c in cs {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("image");
                    }
                }
            }
        }
        if let Some(m) = s.as_object_mut() {
            m.remove("activeDeadlineSeconds");
            m.remove("tolerations");
        }
        s
    };
    if strip(new) == strip(cur) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "",
        "Pod",
        name,
        vec![Cause::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds` or `spec.tolerations` (only additions to existing tolerations)",
        )],
    ))
}

/// The grace a delete gives a running pod bound to a node: the one asked,
/// else its `terminationGracePeriodSeconds` (30 by default).
pub(super) fn grace(pod: &Value, asked: Option<i64>) -> Option<i64> {
    let bound = !str_at(pod, "/spec/nodeName").is_empty();
    let done = matches!(str_at(pod, "/status/phase"), "Succeeded" | "Failed");
    let g = asked.unwrap_or_else(|| {
        pod.pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
    });
    (bound && !done && g > 0).then_some(g)
}
