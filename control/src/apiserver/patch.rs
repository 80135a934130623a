//! The three patch types kubectl sends: JSON patch (RFC 6902), JSON merge
//! patch (RFC 7386) and Kubernetes strategic merge patch.
//!
//! Strategic merge differs from merge patch on lists: a list whose field
//! carries `patchStrategy: merge` in the upstream types is merged element by
//! element on its `patchMergeKey` (containers by `name`, container ports by
//! `containerPort`, ...), and the patch may carry the directives
//! `$patch` (replace / delete / merge), `$setElementOrder/<field>`,
//! `$retainKeys` and `$deleteFromPrimitiveList/<field>`, which is what
//! `kubectl apply` computes. Lists without a strategy are replaced.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("invalid JSON patch: {0}")]
    Json(String),
    #[error("the patch is not a JSON object")]
    NotObject,
    #[error("unknown patch directive {directive:?} at {path}")]
    Directive { directive: String, path: String },
}

pub fn json_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| PatchError::Json(e.to_string()))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &ops).map_err(|e| PatchError::Json(e.to_string()))?;
    Ok(out)
}

pub fn merge_patch(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_object() {
        return Err(PatchError::NotObject);
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
enum Strategy {
    MergeOn(&'static str),
    MergePrimitives,
    Replace,
}

/// The upstream types' `patchStrategy`/`patchMergeKey` for a list field,
/// given the names of the fields above it.
fn strategy(parents: &[String], field: &str) -> Strategy {
    let in_container = parents
        .iter()
        .rev()
        .find(|p| !p.starts_with('['))
        .is_some_and(|p| {
            matches!(
                p.as_str(),
                "containers" | "initContainers" | "ephemeralContainers"
            )
        });
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => Strategy::MergeOn("name"),
        "volumeMounts" => Strategy::MergeOn("mountPath"),
        "volumeDevices" => Strategy::MergeOn("devicePath"),
        "ports" if in_container => Strategy::MergeOn("containerPort"),
        "ports" if parents.last().is_some_and(|p| p == "spec") => Strategy::MergeOn("port"),
        "hostAliases" => Strategy::MergeOn("ip"),
        "conditions" | "addresses" => Strategy::MergeOn("type"),
        "ownerReferences" => Strategy::MergeOn("uid"),
        "topologySpreadConstraints" => Strategy::MergeOn("topologyKey"),
        "finalizers" => Strategy::MergePrimitives,
        _ => Strategy::Replace,
    }
}

/// Applies a strategic merge patch to `doc`.
pub fn strategic_merge(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let (Value::Object(d), Value::Object(p)) = (doc, patch) else {
        return Err(PatchError::NotObject);
    };
    let mut parents = Vec::new();
    Ok(merge_map(d.clone(), p, &mut parents)?.map_or(Value::Object(Map::new()), Value::Object))
}

fn path_of(parents: &[String]) -> String {
    if parents.is_empty() {
        ".".into()
    } else {
        parents.join(".")
    }
}

/// Merges `patch` into `doc`; `None` means the map was deleted by
/// `$patch: delete`.
fn merge_map(
    mut doc: Map<String, Value>,
    patch: &Map<String, Value>,
    parents: &mut Vec<String>,
) -> Result<Option<Map<String, Value>>, PatchError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut out = patch.clone();
            out.remove("$patch");
            return Ok(Some(strip(out)));
        }
        Some("merge") | None => {}
        Some(other) => {
            return Err(PatchError::Directive {
                directive: other.into(),
                path: path_of(parents),
            });
        }
    }
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (k, pv) in patch {
        if k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Value::Array(order) = pv {
                orders.push((field, order));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (doc.get_mut(field), pv) {
                list.retain(|v| !gone.contains(v));
            }
            continue;
        }
        if k.starts_with('$') {
            return Err(PatchError::Directive {
                directive: k.clone(),
                path: path_of(parents),
            });
        }
        if pv.is_null() {
            doc.remove(k);
            continue;
        }
        parents.push(k.clone());
        let merged = match (doc.remove(k), pv) {
            (Some(Value::Object(dm)), Value::Object(pm)) => {
                merge_map(dm, pm, parents)?.map(Value::Object)
            }
            (Some(Value::Array(dl)), Value::Array(pl)) => {
                Some(Value::Array(merge_list(dl, pl, parents)?))
            }
            (_, Value::Object(pm)) => merge_map(Map::new(), pm, parents)?.map(Value::Object),
            (_, Value::Array(pl)) => Some(Value::Array(merge_list(Vec::new(), pl, parents)?)),
            (_, other) => Some(other.clone()),
        };
        parents.pop();
        if let Some(v) = merged {
            doc.insert(k.clone(), v);
        }
    }
    for (field, order) in orders {
        let parents_owned = parents.clone();
        if let Some(Value::Array(list)) = doc.get_mut(field) {
            reorder(list, order, &strategy(&parents_owned, field));
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        doc.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(doc))
}

/// `path` ends with the list's own field name.
fn merge_list(
    mut doc: Vec<Value>,
    patch: &[Value],
    path: &mut Vec<String>,
) -> Result<Vec<Value>, PatchError> {
    let Some((field, parents)) = path.split_last() else {
        return Ok(patch.to_vec());
    };
    match strategy(parents, field) {
        Strategy::Replace => Ok(patch.iter().cloned().map(strip_value).collect()),
        Strategy::MergePrimitives => {
            for v in patch {
                if !doc.contains(v) {
                    doc.push(v.clone());
                }
            }
            Ok(doc)
        }
        Strategy::MergeOn(key) => {
            if patch
                .iter()
                .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
            {
                return Ok(patch
                    .iter()
                    .filter(|p| p.get("$patch").is_none())
                    .cloned()
                    .map(strip_value)
                    .collect());
            }
            for p in patch {
                let Value::Object(pm) = p else {
                    doc.push(p.clone());
                    continue;
                };
                let id = pm.get(key);
                let at = id.and_then(|id| doc.iter().position(|d| d.get(key) == Some(id)));
                path.push(format!(
                    "[{}]",
                    id.map(Value::to_string).unwrap_or_default()
                ));
                match (at, pm.get("$patch").and_then(Value::as_str)) {
                    (Some(i), Some("delete")) => {
                        doc.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), _) => {
                        let Value::Object(dm) = doc.remove(i) else {
                            path.pop();
                            continue;
                        };
                        if let Some(m) = merge_map(dm, pm, path)? {
                            doc.insert(i, Value::Object(m));
                        }
                    }
                    (None, _) => {
                        if let Some(m) = merge_map(Map::new(), pm, path)? {
                            doc.push(Value::Object(m));
                        }
                    }
                }
                path.pop();
            }
            Ok(doc)
        }
    }
}

/// `$setElementOrder`: listed elements first, in the given order, then the
/// rest in their current order.
fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: &Strategy) {
    let ident = |v: &Value| -> Value {
        match strategy {
            Strategy::MergeOn(key) => v.get(*key).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let mut rest = std::mem::take(list);
    for o in order {
        let want = ident(o);
        if let Some(i) = rest.iter().position(|v| ident(v) == want) {
            list.push(rest.remove(i));
        }
    }
    list.extend(rest);
}

fn strip(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k, strip_value(v)))
        .collect()
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "app", "image": "busybox:1", "ports": [{"containerPort": 80}, {"containerPort": 81}],
                 "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "busybox:1"}
            ]}}}
        })
    }

    #[test]
    fn containers_merge_by_name() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
            "containers": [{"name": "app", "image": "busybox:2"}]
        }}}});
        let out = strategic_merge(&deployment(), &patch).expect("merges");
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["image"], "busybox:2");
        assert_eq!(
            cs[0]["ports"][1]["containerPort"], 81,
            "untouched fields stay"
        );
        assert_eq!(cs[1]["name"], "side");
    }

    #[test]
    fn delete_directive_and_null_remove() {
        let patch = json!({
            "metadata": {"labels": {"app": null}},
            "spec": {"replicas": null, "template": {"spec": {"containers": [
                {"name": "side", "$patch": "delete"},
                {"name": "app", "ports": [{"containerPort": 81, "$patch": "delete"}]}
            ]}}}
        });
        let out = strategic_merge(&deployment(), &patch).expect("merges");
        assert_eq!(out["metadata"]["labels"], json!({}));
        assert!(out["spec"].get("replicas").is_none());
        let cs = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("list");
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0]["ports"], json!([{"containerPort": 80}]));
    }

    #[test]
    fn lists_without_strategy_are_replaced_and_finalizers_merge() {
        let doc =
            json!({"metadata": {"finalizers": ["a"]}, "spec": {"tolerations": [{"key": "x"}]}});
        let patch =
            json!({"metadata": {"finalizers": ["b"]}, "spec": {"tolerations": [{"key": "y"}]}});
        let out = strategic_merge(&doc, &patch).expect("merges");
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "y"}]));
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}});
        let out = strategic_merge(&out, &patch).expect("merges");
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn service_ports_merge_on_port_and_order_is_set() {
        let doc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
            "ports": [{"port": 80, "targetPort": 8080}]
        }});
        let out = strategic_merge(&doc, &patch).expect("merges");
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 443, "name": "https"}, {"port": 80, "name": "http", "targetPort": 8080}])
        );
    }

    #[test]
    fn replace_directive_and_retain_keys() {
        let doc = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}});
        let out = strategic_merge(&doc, &patch).expect("merges");
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        let patch = json!({"spec": {"$patch": "replace", "x": 1}});
        let out = strategic_merge(&doc, &patch).expect("merges");
        assert_eq!(out["spec"], json!({"x": 1}));
        assert!(strategic_merge(&doc, &json!({"$bogus": 1})).is_err());
    }

    #[test]
    fn json_and_merge_patches() {
        let doc = json!({"spec": {"replicas": 1, "x": [1]}});
        let out = json_patch(
            &doc,
            &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]),
        )
        .expect("applies");
        assert_eq!(out["spec"]["replicas"], 3);
        assert!(
            json_patch(
                &doc,
                &json!([{"op": "test", "path": "/spec/replicas", "value": 9}])
            )
            .is_err()
        );
        let out =
            merge_patch(&doc, &json!({"spec": {"x": [2], "replicas": null}})).expect("applies");
        assert_eq!(out, json!({"spec": {"x": [2]}}));
    }
}
