//! The printers of ResourceQuotas and LimitRanges.

use serde_json::{Value, json};

use super::s;

type Column = (&'static str, &'static str, u8);

/// The columns after the name, or None for another kind.
pub(super) fn columns(group: &str, plural: &str, age: Column) -> Option<Vec<Column>> {
    match (group, plural) {
        ("", "resourcequotas") => Some(vec![age, ("Request", "string", 0), ("Limit", "string", 0)]),
        ("", "limitranges") => Some(vec![("Created At", "date", 0)]),
        _ => None,
    }
}

/// `requests.cpu: 100m/1, pods: 2/10`: used over hard, for the keys
/// that are (`limits.`) or are not limits.
fn used_of_hard(o: &Value, limits: bool) -> String {
    let hard = o.pointer("/status/hard").and_then(Value::as_object);
    hard.into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("limits.") == limits)
        .map(|(k, h)| {
            let used = o
                .pointer("/status/used")
                .and_then(|u| u.get(k))
                .and_then(Value::as_str)
                .unwrap_or("0");
            format!("{k}: {used}/{}", h.as_str().unwrap_or_default())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cells after the name, or None for another kind.
pub(super) fn cells(group: &str, plural: &str, o: &Value, created: &Value) -> Option<Vec<Value>> {
    match (group, plural) {
        ("", "resourcequotas") => Some(vec![
            created.clone(),
            json!(used_of_hard(o, false)),
            json!(used_of_hard(o, true)),
        ]),
        ("", "limitranges") => Some(vec![json!(s(o, "/metadata/creationTimestamp"))]),
        _ => None,
    }
}
