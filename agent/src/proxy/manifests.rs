//! Static source: Services and EndpointSlices read from manifest files in a
//! directory (YAML or JSON, several documents per file, `kind: List`
//! allowed), for standalone use and benchmarks.
//!
//! A document that does not parse, or an object of a kind the proxy does not
//! use, is reported and skipped; everything else in the directory is still
//! read.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;

use super::model::Catalog;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: not valid YAML: {source}")]
    Parse {
        path: PathBuf,
        doc: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: document {doc}: {kind} {name:?}: {source}")]
    Decode {
        path: PathBuf,
        doc: usize,
        kind: String,
        name: String,
        source: serde_json::Error,
    },
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// What the directory looks like (names, sizes, mtimes): reread when it
/// changes.
pub fn signature(dir: &Path) -> Result<Vec<(PathBuf, u64, SystemTime)>, ManifestError> {
    let read_err = |source| ManifestError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        if !is_manifest(&path) {
            continue;
        }
        // A file removed between listing and stat is simply gone.
        if let Ok(meta) = entry.metadata() {
            out.push((
                path,
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
    out.sort();
    Ok(out)
}

fn add_object(
    catalog: &mut Catalog,
    value: serde_json::Value,
    path: &Path,
    doc: usize,
    errors: &mut Vec<ManifestError>,
) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let decode_err = |source| ManifestError::Decode {
        path: path.to_path_buf(),
        doc,
        kind: kind.clone(),
        name: name.clone(),
        source,
    };
    match kind.as_str() {
        "Service" => match serde_json::from_value::<Service>(value) {
            Ok(s) => catalog.insert_service(s),
            Err(e) => errors.push(decode_err(e)),
        },
        "EndpointSlice" => match serde_json::from_value::<EndpointSlice>(value) {
            Ok(s) => catalog.insert_slice(s),
            Err(e) => errors.push(decode_err(e)),
        },
        "List" | "ServiceList" | "EndpointSliceList" => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                add_object(catalog, item, path, doc, errors);
            }
        }
        other => {
            tracing::debug!(path = %path.display(), doc, kind = other, "ignored: not used by the proxy");
        }
    }
}

/// Reads every manifest in `dir`.
pub fn load(dir: &Path) -> Result<(Catalog, Vec<ManifestError>), ManifestError> {
    let mut catalog = Catalog::default();
    let mut errors = Vec::new();
    for (path, _, _) in signature(dir)? {
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(source) => {
                errors.push(ManifestError::Read { path, source });
                continue;
            }
        };
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let doc = i + 1;
            match serde_json::Value::deserialize(document) {
                Ok(serde_json::Value::Null) => {}
                Ok(value) => add_object(&mut catalog, value, &path, doc, &mut errors),
                Err(source) => {
                    errors.push(ManifestError::Parse {
                        path: path.clone(),
                        doc,
                        source,
                    });
                    // serde_yaml cannot resume inside a broken stream.
                    break;
                }
            }
        }
    }
    Ok((catalog, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_multi_docs_and_reports_bad_ones() {
        let dir = std::env::temp_dir().join(format!("skiff-manifests-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: b, namespace: x}, spec: {clusterIP: 10.96.0.2}}\n",
        )
        .expect("write");
        fs::write(dir.join("bad.yaml"), "kind: Service\nmetadata: [unclosed\n").expect("write");
        fs::write(
            dir.join("typed.yaml"),
            "kind: Service\nmetadata: {name: c}\nspec: {ports: [{port: eighty}]}\n",
        )
        .expect("write");
        fs::write(dir.join("notes.txt"), "not a manifest").expect("write");
        let (catalog, errors) = load(&dir).expect("load");
        let _ = fs::remove_dir_all(&dir);
        let names: Vec<&String> = catalog.services.keys().collect();
        assert_eq!(names, ["default/a", "x/b"]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.to_string().contains("bad.yaml")));
        assert!(errors.iter().any(|e| e.to_string().contains("\"c\"")));
    }
}
