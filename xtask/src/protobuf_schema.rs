//! `cargo xtask gen-protobuf-schema`: writes
//! `control/src/apiserver/protobuf/schema.txt`, the field numbers of the Kubernetes
//! protobuf messages the apiserver accepts as request bodies.
//!
//! Field numbers and wire types come from the prost types of the `k8s-pb`
//! crate; JSON field names come from `k8s-openapi` (its deserializers map
//! each JSON name to a Rust field). Only messages reachable from the
//! objects the apiserver serves are written. The output is committed, so
//! builds and CI do not need either source; rerun this when the served
//! resources or the Kubernetes version change.
//!
//! Output, one block per message:
//! ```text
//! @api.core.v1.ContainerPort
//! 1 name 1 string
//! 3 containerPort 1 int32
//! ```
//! Each field line is `<tag> <json name> <1|*|map> <type>`, where type is a
//! scalar (string, int32, int64, bool, double, bytes) or a message name;
//! `<tag> - inline <message>` is a Go embedded struct, whose fields JSON
//! puts in the parent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Messages the apiserver may receive as a body (and so everything they
/// contain).
const ROOTS: &[&str] = &[
    "api.core.v1.Namespace",
    "api.core.v1.Pod",
    "api.core.v1.Service",
    "api.core.v1.Endpoints",
    "api.core.v1.Node",
    "api.core.v1.ConfigMap",
    "api.core.v1.Secret",
    "api.core.v1.Event",
    "api.core.v1.ServiceAccount",
    "api.core.v1.Binding",
    "api.core.v1.ReplicationController",
    "api.core.v1.PersistentVolume",
    "api.core.v1.PersistentVolumeClaim",
    "api.core.v1.ResourceQuota",
    "api.core.v1.LimitRange",
    "api.storage.v1.StorageClass",
    "api.networking.v1.Ingress",
    "api.networking.v1.IngressClass",
    "api.apps.v1.StatefulSet",
    "api.coordination.v1.Lease",
    "api.discovery.v1.EndpointSlice",
    "api.apps.v1.ReplicaSet",
    "api.apps.v1.Deployment",
    "api.apps.v1.DaemonSet",
    "api.apps.v1.ControllerRevision",
    "api.batch.v1.Job",
    "api.batch.v1.CronJob",
    "api.autoscaling.v2.HorizontalPodAutoscaler",
    "api.autoscaling.v1.HorizontalPodAutoscaler",
    "api.policy.v1.Eviction",
    "api.autoscaling.v1.Scale",
    "api.rbac.v1.Role",
    "api.rbac.v1.ClusterRole",
    "api.rbac.v1.RoleBinding",
    "api.rbac.v1.ClusterRoleBinding",
    "api.certificates.v1.CertificateSigningRequest",
    "api.authorization.v1.SelfSubjectAccessReview",
    "api.authorization.v1.SelfSubjectRulesReview",
    "api.authorization.v1.SubjectAccessReview",
    "api.authorization.v1.LocalSubjectAccessReview",
    "api.authentication.v1.TokenRequest",
    "api.authentication.v1.TokenReview",
    "api.authentication.v1.SelfSubjectReview",
    "apimachinery.pkg.apis.meta.v1.DeleteOptions",
];

/// Messages with a JSON form of their own; the apiserver's decoder knows
/// them, so they are written without fields.
const LEAVES: &[&str] = &[
    "apimachinery.pkg.apis.meta.v1.Time",
    "apimachinery.pkg.apis.meta.v1.MicroTime",
    "apimachinery.pkg.apis.meta.v1.Duration",
    "apimachinery.pkg.apis.meta.v1.FieldsV1",
    "apimachinery.pkg.api.resource.Quantity",
    "apimachinery.pkg.util.intstr.IntOrString",
    "apimachinery.pkg.runtime.RawExtension",
];

#[derive(Debug)]
struct Field {
    tag: u32,
    rust: String,
    card: &'static str,
    ty: String,
}

pub fn generate(root: &Path, k8s_pb: Option<PathBuf>, k8s_openapi: Option<PathBuf>) -> Result<()> {
    let pb = match k8s_pb {
        Some(p) => p,
        None => registry_crate("k8s-pb-")?.join("src"),
    };
    let openapi = match k8s_openapi {
        Some(p) => p,
        None => latest_version_dir(&registry_crate("k8s-openapi-0.29")?.join("src"))?,
    };
    let mut messages = BTreeMap::new();
    for file in rust_files(&pb)? {
        let module = module_path(&pb, &file);
        let text = fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        parse_prost(&module, &text, &mut messages)
            .with_context(|| format!("parsing {}", file.display()))?;
    }
    let mut json_names: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in rust_files(&openapi)? {
        let module = module_path(&openapi, &file);
        let text = fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        if let Some((name, fields)) = parse_openapi(&text) {
            // prost writes HTTPGetAction as HttpGetAction: match names
            // without case.
            json_names.insert(format!("{module}.{name}").to_lowercase(), fields);
        }
    }

    let mut out = String::from(
        "# Kubernetes protobuf field numbers, written by `cargo xtask gen-protobuf-schema`.\n\
         # <tag> <json name> <1|*|map> <scalar or message>\n",
    );
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<String> = ROOTS.iter().map(|s| s.to_string()).collect();
    let mut guessed = 0;
    let mut inherited: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    while let Some(name) = queue.pop_front() {
        if !seen.insert(name.clone()) || LEAVES.contains(&name.as_str()) {
            continue;
        }
        let Some(fields) = messages.get(&name) else {
            bail!("message {name} is not in {}", pb.display());
        };
        let names = json_names
            .get(&name.to_lowercase())
            .or_else(|| inherited.get(&name))
            .cloned();
        out.push_str(&format!("@{name}\n"));
        for f in fields {
            let json = names.as_ref().and_then(|n| n.get(&norm(&f.rust)));
            let json = match json {
                Some(j) => j.clone(),
                // A Go embedded struct (ProbeHandler in Probe): a message
                // of its own in protobuf, its fields inline in JSON.
                None if f.card == "1"
                    && names.is_some()
                    && messages.get(&f.ty).is_some_and(|child| {
                        !child.is_empty()
                            && child.iter().all(|c| {
                                names
                                    .as_ref()
                                    .is_some_and(|n| n.contains_key(&norm(&c.rust)))
                            })
                    }) =>
                {
                    out.push_str(&format!("{} - inline {}\n", f.tag, f.ty));
                    if let Some(n) = &names {
                        inherited.insert(f.ty.clone(), n.clone());
                    }
                    queue.push_back(f.ty.clone());
                    continue;
                }
                None => {
                    guessed += 1;
                    eprintln!("{name}.{}: not in k8s-openapi, JSON name guessed", f.rust);
                    lower_camel(&f.rust)
                }
            };
            out.push_str(&format!("{} {json} {} {}\n", f.tag, f.card, f.ty));
            if !is_scalar(&f.ty) {
                queue.push_back(f.ty.clone());
            }
        }
    }
    let dest = root.join("control/src/apiserver/protobuf/schema.txt");
    fs::create_dir_all(dest.parent().context("schema path")?)?;
    fs::write(&dest, out).with_context(|| dest.display().to_string())?;
    println!(
        "wrote {} ({} messages, {guessed} JSON names guessed)",
        dest.display(),
        seen.len()
    );
    Ok(())
}

fn is_scalar(ty: &str) -> bool {
    matches!(
        ty,
        "string" | "int32" | "int64" | "bool" | "double" | "bytes"
    )
}

/// The newest `v1_NN` directory of k8s-openapi's sources.
fn latest_version_dir(src: &Path) -> Result<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in fs::read_dir(src)? {
        let path = entry?.path();
        let minor = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("v1_"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(m) = minor
            && best.as_ref().is_none_or(|(b, _)| m > *b)
        {
            best = Some((m, path));
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no v1_NN directory in {}", src.display()))
}

/// The unpacked source of a crate in cargo's registry (the last by name).
fn registry_crate(prefix: &str) -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let mut found = Vec::new();
    for index in fs::read_dir(home.join("registry/src"))? {
        for entry in fs::read_dir(index?.path())? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found.pop().with_context(|| {
        format!(
            "{prefix}* is not in cargo's registry: `cargo info {}` fetches it, or pass its path",
            prefix.trim_end_matches('-')
        )
    })
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `api/core/v1/mod.rs` under `base` is module `api.core.v1`.
fn module_path(base: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(base).unwrap_or(file);
    let dir = rel.parent().unwrap_or(Path::new(""));
    dir.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

/// Reads the prost messages of one module: each `pub struct` and the
/// `#[prost(...)]` attribute and declaration of each field.
fn parse_prost(module: &str, text: &str, out: &mut BTreeMap<String, Vec<Field>>) -> Result<()> {
    let mut current: Option<(String, Vec<Field>)> = None;
    let mut lines = text.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            if let Some((name, fields)) = current.take() {
                out.insert(name, fields);
            }
            let name = rest.trim_end_matches(" {").trim();
            current = Some((format!("{module}.{name}"), Vec::new()));
            continue;
        }
        if line == "}" {
            if let Some((name, fields)) = current.take() {
                out.insert(name, fields);
            }
            continue;
        }
        if !line.starts_with("#[prost(") {
            continue;
        }
        let Some((_, fields)) = current.as_mut() else {
            continue;
        };
        let mut attr = line.to_string();
        while !attr.ends_with(")]") {
            attr.push_str(lines.next().context("unterminated prost attribute")?);
        }
        let mut decl = String::new();
        loop {
            let l = lines.next().context("a prost attribute without a field")?;
            if l.starts_with("///") || l.starts_with("#[") {
                continue;
            }
            decl.push_str(l);
            let open = decl.matches('<').count();
            let close = decl.matches('>').count();
            if decl.ends_with(',') && open == close {
                break;
            }
        }
        fields.push(parse_field(module, &attr, &decl)?);
    }
    if let Some((name, fields)) = current.take() {
        out.insert(name, fields);
    }
    Ok(())
}

fn parse_field(module: &str, attr: &str, decl: &str) -> Result<Field> {
    let inner = attr
        .trim_start_matches("#[prost(")
        .trim_end_matches(")]")
        .to_string();
    let tag: u32 = inner
        .split("tag = \"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("no tag in {attr}"))?;
    let decl = decl.trim_start_matches("pub ");
    let (rust, ty) = decl
        .split_once(':')
        .with_context(|| format!("field {decl}"))?;
    let rust = rust.trim().trim_start_matches("r#").to_string();
    let kind = inner.split([',', ' ']).next().unwrap_or_default();
    let (card, ty) = if kind == "btree_map" || kind == "map" {
        let spec = inner
            .split('"')
            .nth(1)
            .with_context(|| format!("map spec in {attr}"))?;
        let value = spec.split(',').nth(1).map(str::trim).unwrap_or_default();
        let ty = if value == "message" {
            message_type(module, ty)?
        } else {
            value.to_string()
        };
        ("map", ty)
    } else {
        let card = if inner.contains("repeated") { "*" } else { "1" };
        let ty = match kind {
            "message" => message_type(module, ty)?,
            "bytes" => "bytes".to_string(),
            "string" | "int32" | "int64" | "bool" | "double" => kind.to_string(),
            other => bail!("prost type {other} in {attr} is not handled"),
        };
        (card, ty)
    };
    Ok(Field {
        tag,
        rust,
        card,
        ty,
    })
}

/// The full name of the message a field's Rust type names: the last path
/// in the type, with `super::` resolved against `module`.
fn message_type(module: &str, ty: &str) -> Result<String> {
    let path = ty
        .split(['<', '>', ',', ' '])
        .map(str::trim)
        .rfind(|p| {
            !p.is_empty()
                && !p.starts_with("::prost::")
                && !p.starts_with("::core::")
                && !p.starts_with("::std::")
        })
        .with_context(|| format!("no message in {ty}"))?;
    let mut parts: Vec<&str> = module.split('.').filter(|p| !p.is_empty()).collect();
    let mut segs = path.split("::").peekable();
    while segs.peek() == Some(&"super") {
        segs.next();
        parts.pop();
    }
    parts.extend(segs);
    Ok(parts.join("."))
}

/// The struct a k8s-openapi file defines and its Rust field → JSON name
/// pairs, read from its deserializer's `"json" => Field::Key_rust` arms.
fn parse_openapi(text: &str) -> Option<(String, BTreeMap<String, String>)> {
    let name = text.lines().find_map(|l| {
        l.trim().strip_prefix("pub struct ").map(|r| {
            r.trim_end_matches(" {")
                .trim_end_matches(';')
                .trim()
                .to_string()
        })
    })?;
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((json, rest)) = line.split_once(" => Field::Key_") else {
            continue;
        };
        let json = json.trim().trim_matches('"');
        let rust = rest.trim_end_matches(',').trim_end_matches('_');
        fields.insert(norm(rust), json.to_string());
    }
    Some((name, fields))
}

/// Rust field names compared without case or underscores: prost writes
/// targetWWNs as `target_ww_ns`, k8s-openapi as `target_wwns`.
fn norm(rust: &str) -> String {
    rust.trim_start_matches("r#")
        .chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn lower_camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}
