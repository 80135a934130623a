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
