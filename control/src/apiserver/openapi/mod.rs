//! `/openapi/v2` and `/openapi/v3`: the upstream schemas of the served
//! kinds, which `kubectl explain`, client-side validation (of `kind:
//! List` files too) and client-side apply's strategic merge read.
//!
//! The schemas are Kubernetes' own OpenAPI v2 definitions, vendored as
//! `kubernetes-v<version>.json` by `cargo xtask gen-openapi` (k8s-openapi's
//! types lack the `x-kubernetes-patch-*` and list-type extensions). v2 is
//! served as JSON, or as the gnostic protobuf client-go asks for; each v3
//! group-version document holds the schemas reachable from its kinds, its
//! references rewritten to `#/components/schemas/` as upstream's are.

use std::collections::{BTreeSet, VecDeque};
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::resources::RESOURCES;

mod gnostic;

/// The Kubernetes version the vendored schemas are from.
pub const VERSION: &str = "1.33.1";
const SPEC: &str = include_str!("kubernetes-v1.33.1.json");

/// The media type of the v2 document as protobuf, as upstream answers it
/// (clients ask for `...spec.v2@v1.0+protobuf`, which is no valid media
/// type to parse back).
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

fn spec() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(SPEC).unwrap_or_else(|_| json!({"definitions": {}})))
}

/// Every vendored definition, by name.
pub(crate) fn definitions() -> &'static Map<String, Value> {
    static EMPTY: OnceLock<Map<String, Value>> = OnceLock::new();
    spec()
        .get("definitions")
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

/// The schema of `group/version/kind`.
/// Read on every write (for managedFields), so looked up in an index
/// built once rather than by scanning every definition.
pub(crate) fn definition(group: &str, version: &str, kind: &str) -> Option<&'static Value> {
    type Gvk = (String, String, String);
    static BY_GVK: OnceLock<std::collections::HashMap<Gvk, &'static Value>> = OnceLock::new();
    let index = BY_GVK.get_or_init(|| {
        let mut m = std::collections::HashMap::new();
        for d in definitions().values() {
            for g in d
                .get("x-kubernetes-group-version-kind")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = |k: &str| g[k].as_str().unwrap_or_default().to_string();
                m.entry((s("group"), s("version"), s("kind"))).or_insert(d);
            }
        }
        m
    });
    index
        .get(&(group.to_string(), version.to_string(), kind.to_string()))
        .copied()
}

/// The v2 document as JSON.
pub fn v2_json() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| serde_json::to_vec(spec()).unwrap_or_default())
}

/// The v2 document as gnostic's `openapi.v2.Document`.
pub fn v2_protobuf() -> &'static [u8] {
    static PB: OnceLock<Vec<u8>> = OnceLock::new();
    PB.get_or_init(|| gnostic::document(spec()))
}

/// Whether definition `d` is the schema of `group/version/kind`.
fn is_kind(d: &Value, group: &str, version: &str, kind: &str) -> bool {
    d.get("x-kubernetes-group-version-kind")
        .and_then(Value::as_array)
        .is_some_and(|gvks| {
            gvks.iter().any(|g| {
                g["group"].as_str() == Some(group)
                    && g["version"].as_str() == Some(version)
                    && g["kind"].as_str() == Some(kind)
            })
        })
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(name) = m
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("#/definitions/"))
            {
                out.push(name.to_string());
            }
            m.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

/// A v2 schema written as v3: references point into components, and a
/// reference with other keys beside it goes into `allOf`.
fn to_v3(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out: Map<String, Value> =
                m.iter().map(|(k, x)| (k.clone(), to_v3(x))).collect();
            if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                let target = json!(r.replace("#/definitions/", "#/components/schemas/"));
                if m.len() == 1 {
                    out.insert("$ref".into(), target);
                } else {
                    out.remove("$ref");
                    out.insert("allOf".into(), json!([{"$ref": target}]));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(to_v3).collect()),
        other => other.clone(),
    }
}

/// The schemas of a v3 group-version document: those of the kinds served
/// there, their lists, and all they reference.
pub fn v3_schemas(group: &str, version: &str) -> Map<String, Value> {
    let defs = definitions();
    let mut queue: VecDeque<String> = VecDeque::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        for kind in [r.kind.to_string(), format!("{}List", r.kind)] {
            queue.extend(
                defs.iter()
                    .filter(|(_, d)| is_kind(d, group, version, &kind))
                    .map(|(k, _)| k.clone()),
            );
        }
    }
    queue.push_back("io.k8s.apimachinery.pkg.apis.meta.v1.Status".into());
    queue.push_back("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions".into());
    let mut seen = BTreeSet::new();
    let mut out = Map::new();
    while let Some(name) = queue.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(d) = defs.get(&name) else { continue };
        let mut more = Vec::new();
        collect_refs(d, &mut more);
        queue.extend(more);
        out.insert(name, to_v3(d));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_schemas_carry_the_patch_extensions() {
        let pods = v3_schemas("", "v1");
        let spec = &pods["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(spec["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(spec["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(spec["x-kubernetes-list-type"], "map");
        assert_eq!(
            spec["items"]["$ref"],
            "#/components/schemas/io.k8s.api.core.v1.Container"
        );
        assert!(is_kind(&pods["io.k8s.api.core.v1.Pod"], "", "v1", "Pod"));
        let apps = v3_schemas("apps", "v1");
        assert!(apps.contains_key("io.k8s.api.apps.v1.StatefulSet"));
        assert!(!apps.contains_key("io.k8s.api.core.v1.Service"));
        assert!(
            v3_schemas("autoscaling", "v1")
                .contains_key("io.k8s.api.autoscaling.v1.HorizontalPodAutoscaler")
        );
    }
}
