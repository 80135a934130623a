//! What the verbs and the kinds' rules all read: an object's string
//! fields, a core resource by its plural, and a storage error as the
//! API's error for that object.

use serde_json::Value;

use crate::resources::{self, Resource};
use crate::status::ApiError;
use crate::storage::store::StoreError;

/// The string at `pointer`; empty when absent or not a string.
pub(super) fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A core (`v1`) resource by its plural.
pub(super) fn core(plural: &str) -> Result<&'static Resource, ApiError> {
    resources::find("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} are not served")))
}

/// A storage error as the API answers it for object `name` of `r`.
pub(super) fn store_err(r: &Resource, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::Exists { .. } => ApiError::already_exists(r.group, r.plural, name),
        StoreError::NotFound { .. } => ApiError::not_found(r.group, r.plural, name),
        StoreError::Conflict { .. } => ApiError::conflict(r.group, r.plural, name),
        StoreError::Compacted {
            requested,
            compacted,
        } => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        StoreError::Etcd(e) => ApiError::unavailable(format!("storage: {e}")),
        StoreError::Tls(e) => ApiError::unavailable(format!("storage: {e}")),
    }
}

/// A label selector as text (`app=web,tier in (a,b)`), from an apps/v1
/// `LabelSelector` or from a plain label map (a ReplicationController's,
/// a Service's, a node selector); empty when there is none.
pub(super) fn selector_text(sel: Option<&Value>) -> String {
    let Some(sel) = sel.and_then(Value::as_object) else {
        return String::new();
    };
    let structured = sel.contains_key("matchLabels") || sel.contains_key("matchExpressions");
    let labels = if structured {
        sel.get("matchLabels").and_then(Value::as_object)
    } else {
        Some(sel)
    };
    let mut parts: Vec<String> = labels
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
        .collect();
    let exprs = sel.get("matchExpressions").and_then(Value::as_array);
    for e in exprs.into_iter().flatten().filter(|_| structured) {
        let key = str_at(e, "/key");
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match str_at(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            _ => continue,
        });
    }
    parts.join(",")
}
