//! `cargo xtask gen-openapi <swagger.json>`: writes
//! `control/src/apiserver/openapi/kubernetes-v<version>.json`, the
//! upstream OpenAPI v2 definitions of the group-versions the apiserver
//! serves, from Kubernetes' own `api/openapi-spec/swagger.json` of that
//! version (which has the patch-strategy, list-type and
//! group-version-kind extensions kubectl reads; k8s-openapi's types do
//! not). Only the definitions reachable from those group-versions' kinds
//! are kept, and the paths are left out (the apiserver writes its own).
//! The output is committed data: rerun this when the served resources or
//! the Kubernetes version change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The group-versions whose kinds are kept ("" is the core group; meta
/// types come along through the references).
const SERVED: &[(&str, &str)] = &[
    ("", "v1"),
    ("apps", "v1"),
    ("autoscaling", "v1"),
    ("autoscaling", "v2"),
    ("batch", "v1"),
    ("certificates.k8s.io", "v1"),
    ("coordination.k8s.io", "v1"),
    ("discovery.k8s.io", "v1"),
    ("networking.k8s.io", "v1"),
    ("policy", "v1"),
    ("rbac.authorization.k8s.io", "v1"),
    ("storage.k8s.io", "v1"),
    ("authorization.k8s.io", "v1"),
    ("authentication.k8s.io", "v1"),
];

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str)
                && let Some(name) = r.strip_prefix("#/definitions/")
            {
                out.push(name.to_string());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

pub fn generate(root: &Path, swagger: &Path, version: &str) -> Result<()> {
    let text = std::fs::read_to_string(swagger)
        .with_context(|| format!("reading {}", swagger.display()))?;
    let doc: Value = serde_json::from_str(&text).context("parsing the swagger document")?;
    let defs = doc["definitions"]
        .as_object()
        .context("the document has no definitions")?;
    let served = |d: &Value| {
        d.get("x-kubernetes-group-version-kind")
            .and_then(Value::as_array)
            .is_some_and(|gvks| {
                gvks.iter().any(|g| {
                    let (gr, v) = (g["group"].as_str(), g["version"].as_str());
                    SERVED
                        .iter()
                        .any(|(sg, sv)| gr == Some(sg) && v == Some(sv))
                })
            })
            // A meta type listed under every group-version (DeleteOptions,
            // WatchEvent) is kept through the references alone.
            && d["x-kubernetes-group-version-kind"]
                .as_array()
                .is_none_or(|g| g.len() <= SERVED.len())
    };
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<String> = defs
        .iter()
        .filter(|(_, d)| served(d))
        .map(|(k, _)| k.clone())
        .collect();
    for meta in [
        "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
        "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
        "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent",
        "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList",
    ] {
        queue.push_back(meta.to_string());
    }
    while let Some(name) = queue.pop_front() {
        if !keep.insert(name.clone()) {
            continue;
        }
        let Some(d) = defs.get(&name) else {
            bail!("{name} is referenced but not defined");
        };
        let mut found = Vec::new();
        refs(d, &mut found);
        queue.extend(found.into_iter().filter(|r| !keep.contains(r)));
    }
    let kept: BTreeMap<&String, &Value> = defs.iter().filter(|(k, _)| keep.contains(*k)).collect();
    let out = json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v{version}")},
        "paths": {},
        "definitions": kept,
    });
    let dir = root.join("control/src/apiserver/openapi");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("kubernetes-v{version}.json"));
    std::fs::write(&path, serde_json::to_string(&out)?)?;
    println!(
        "wrote {} ({} of {} definitions)",
        path.display(),
        kept.len(),
        defs.len()
    );
    Ok(())
}
