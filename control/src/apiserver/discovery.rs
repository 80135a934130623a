//! Discovery (`/api`, `/apis`, group and version documents), `/version`,
//! and the OpenAPI v3 documents kubectl reads.
//!
//! The OpenAPI documents are deliberately small: kubectl only looks in them
//! for the PATCH operation of a kind and its `fieldValidation` parameter to
//! decide that the server validates fields itself (so `kubectl apply`
//! defaults to server-side strict validation); strategic-merge patches are
//! then computed from the types compiled into kubectl.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::resources::{self, RESOURCES, Resource};
use crate::status::ApiError;

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-skiff",
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "2026-12-01T00:00:00Z",
        "goVersion": "n/a",
        "compiler": "rustc",
        "platform": "linux/amd64"
    })
}

pub fn root_paths() -> Value {
    let mut paths = vec!["/api".to_string(), "/api/v1".into(), "/apis".into()];
    for g in resources::groups() {
        paths.push(format!("/apis/{g}"));
        paths.push(format!("/apis/{g}/v1"));
    }
    paths.extend([
        "/healthz".into(),
        "/livez".into(),
        "/readyz".into(),
        "/openapi/v3".into(),
        "/version".into(),
    ]);
    json!({ "paths": paths })
}

pub fn api_versions(advertise: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": advertise.to_string()}]
    })
}

fn group_doc(g: &str) -> Value {
    let versions: Vec<Value> = resources::group_versions(g)
        .into_iter()
        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": g, "versions": versions, "preferredVersion": preferred})
}

pub fn group_list() -> Value {
    let groups: Vec<Value> = resources::groups().into_iter().map(group_doc).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(g: &str) -> Result<Value, ApiError> {
    if !resources::groups().contains(&g) {
        return Err(ApiError::path_not_found(&format!("apis/{g}")));
    }
    let mut doc = group_doc(g);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Ok(doc)
}

fn sub(r: &Resource, name: &str, kind: &str, verbs: &[&str]) -> Value {
    json!({"name": format!("{}/{name}", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": kind, "verbs": verbs})
}

pub fn resource_list(group: &str, version: &str) -> Value {
    let mut list = Vec::new();
    for r in resources::in_version(group, version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": if r.review() {
                &["create"][..]
            } else if r.metrics() {
                &["get", "list"][..]
            } else {
                resources::VERBS
            },
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        if r.status {
            list.push(sub(r, "status", r.kind, &["get", "patch", "update"]));
        }
        if r.scale {
            let mut s = sub(r, "scale", "Scale", &["get", "patch", "update"]);
            s["group"] = json!("autoscaling");
            s["version"] = json!("v1");
            list.push(s);
        }
        if r.is("", "serviceaccounts") {
            let mut t = sub(r, "token", "TokenRequest", &["create"]);
            t["group"] = json!("authentication.k8s.io");
            t["version"] = json!("v1");
            list.push(t);
        }
        if r.is("certificates.k8s.io", "certificatesigningrequests") {
            list.push(sub(r, "approval", r.kind, &["get", "patch", "update"]));
        }
        if r.is("", "pods") {
            list.push(sub(r, "binding", "Binding", &["create"]));
            list.push(sub(r, "log", "Pod", &["get"]));
            list.push(sub(r, "exec", "PodExecOptions", &["create", "get"]));
            list.push(sub(r, "attach", "PodAttachOptions", &["create", "get"]));
            list.push(sub(
                r,
                "portforward",
                "PodPortForwardOptions",
                &["create", "get"],
            ));
            let mut e = sub(r, "eviction", "Eviction", &["create"]);
            e["group"] = json!("policy");
            e["version"] = json!("v1");
            list.push(e);
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
}

pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    let mut gvs = vec![("", "v1")];
    for g in resources::groups() {
        gvs.extend(resources::group_versions(g).into_iter().map(|v| (g, v)));
    }
    for (g, v) in gvs {
        let p = if g.is_empty() {
            "api/v1".to_string()
        } else {
            format!("apis/{g}/{v}")
        };
        paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}-{}", super::openapi::VERSION, env!("CARGO_PKG_VERSION"))}));
    }
    json!({ "paths": paths })
}

pub fn openapi_v3(rest: &[&str]) -> Result<Value, ApiError> {
    let (group, version) = match rest {
        ["api", "v1"] => ("", "v1"),
        ["apis", g, v] if resources::group_versions(g).contains(v) => (*g, *v),
        _ => {
            return Err(ApiError::path_not_found(&format!(
                "openapi/v3/{}",
                rest.join("/")
            )));
        }
    };
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let base = if group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{base}/{}/{{name}}", r.plural)
        };
        paths.insert(path, json!({
            "patch": {
                "operationId": format!("patch{}", r.kind),
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
                ],
                "responses": {"200": {"description": "OK"}}
            }
        }));
    }
    Ok(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{}", super::openapi::VERSION)},
        "paths": paths,
        "components": {"schemas": super::openapi::v3_schemas(group, version)}
    }))
}
