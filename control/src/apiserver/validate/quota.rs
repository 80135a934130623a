//! ResourceQuotas and LimitRanges: their defaults and upstream's rules.

use serde_json::{Value, json};

use super::{Check, set_default};
use crate::quantity::parse_quantity;
use crate::status::Cause;

const LIMIT_TYPES: &[&str] = &["Container", "PersistentVolumeClaim", "Pod"];

/// A Container range's `default` defaults to its `max`, and its
/// `defaultRequest` to its `default`, as upstream's LimitRange defaults.
pub(super) fn default_limit_range(v: &mut Value) {
    let Some(Value::Array(items)) = v.pointer_mut("/spec/limits") else {
        return;
    };
    for item in items {
        if item.get("type").and_then(Value::as_str) != Some("Container") {
            continue;
        }
        for (from, to) in [("max", "default"), ("default", "defaultRequest")] {
            let src = item.get(from).and_then(Value::as_object).cloned();
            let Some(src) = src.filter(|m| !m.is_empty()) else {
                continue;
            };
            if !item.get(to).is_some_and(Value::is_object) {
                item[to] = json!({});
            }
            for (k, q) in src {
                set_default(&mut item[to], &k, q);
            }
        }
    }
}

impl Check {
    fn quantities(&mut self, at: &str, v: Option<&Value>) {
        for (k, q) in v.and_then(Value::as_object).into_iter().flatten() {
            let ok = q
                .as_str()
                .and_then(parse_quantity)
                .is_some_and(|n| n >= 0.0);
            if !ok {
                self.push(Cause::invalid(
                    format!("{at}[{k}]"),
                    q.as_str().unwrap_or_default(),
                    "must be greater than or equal to 0",
                ));
            }
        }
    }

    pub(super) fn resource_quota(&mut self, spec: &Value) {
        self.quantities("spec.hard", spec.get("hard"));
    }

    pub(super) fn limit_range(&mut self, spec: &Value) {
        for (i, item) in spec
            .get("limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("spec.limits[{i}]");
            let ty = item.get("type").and_then(Value::as_str).unwrap_or_default();
            if !LIMIT_TYPES.contains(&ty) {
                self.push(Cause::unsupported(format!("{at}.type"), ty, LIMIT_TYPES));
            }
            for field in [
                "max",
                "min",
                "default",
                "defaultRequest",
                "maxLimitRequestRatio",
            ] {
                self.quantities(&format!("{at}.{field}"), item.get(field));
            }
            if ty == "Pod" {
                for field in ["default", "defaultRequest"] {
                    if item.get(field).is_some_and(|d| !d.is_null()) {
                        self.push(Cause::forbidden(
                            format!("{at}.{field}"),
                            "may not be specified when `type` is 'Pod'",
                        ));
                    }
                }
            }
            // min <= defaultRequest <= default <= max, per resource.
            let amount = |field: &str, res: &str| {
                item.get(field)
                    .and_then(|m| m.get(res))
                    .and_then(Value::as_str)
                    .and_then(|s| Some((s.to_string(), parse_quantity(s)?)))
            };
            let resources: std::collections::BTreeSet<String> =
                ["max", "min", "default", "defaultRequest"]
                    .iter()
                    .flat_map(|f| {
                        item.get(*f)
                            .and_then(Value::as_object)
                            .into_iter()
                            .flatten()
                            .map(|(k, _)| k.clone())
                    })
                    .collect();
            for res in resources {
                for (low, high, why) in [
                    ("min", "max", "min value {l} is greater than max value {h}"),
                    (
                        "min",
                        "defaultRequest",
                        "min value {l} is greater than default request value {h}",
                    ),
                    (
                        "defaultRequest",
                        "max",
                        "default request value {l} is greater than max value {h}",
                    ),
                    (
                        "default",
                        "max",
                        "default value {l} is greater than max value {h}",
                    ),
                ] {
                    if let (Some((ls, l)), Some((hs, h))) = (amount(low, &res), amount(high, &res))
                        && l > h
                    {
                        self.push(Cause::invalid(
                            format!("{at}.{low}[{res}]"),
                            &ls,
                            &why.replace("{l}", &ls).replace("{h}", &hs),
                        ));
                    }
                }
            }
        }
    }
}
