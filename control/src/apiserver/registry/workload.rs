//! Deployments, ReplicaSets and DaemonSets: their selector is fixed once
//! created, as in apps/v1.

use serde_json::Value;

use crate::resources::Resource;
use crate::status::{ApiError, Cause};

pub(super) fn check_update(
    r: &Resource,
    name: &str,
    cur: &Value,
    new: &Value,
) -> Result<(), ApiError> {
    if new.pointer("/spec/selector") == cur.pointer("/spec/selector") {
        return Ok(());
    }
    let shown = new
        .pointer("/spec/selector")
        .map(Value::to_string)
        .unwrap_or_default();
    Err(ApiError::invalid(
        r.group,
        r.kind,
        name,
        vec![Cause::invalid("spec.selector", shown, "field is immutable")],
    ))
}
