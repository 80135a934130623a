//! The printers of PersistentVolumes, PersistentVolumeClaims,
//! StorageClasses and StatefulSets.

use serde_json::{Value, json};

use super::{containers_and_images, n, s};

type Column = (&'static str, &'static str, u8);

/// The columns after the name, or None for another kind.
pub(super) fn columns(group: &str, plural: &str, age: Column) -> Option<Vec<Column>> {
    let string = |title: &'static str, priority: u8| (title, "string", priority);
    Some(match (group, plural) {
        ("", "persistentvolumes") => vec![
            string("Capacity", 0),
            string("Access Modes", 0),
            string("Reclaim Policy", 0),
            string("Status", 0),
            string("Claim", 0),
            string("StorageClass", 0),
            string("VolumeAttributesClass", 0),
            string("Reason", 0),
            age,
            string("VolumeMode", 1),
        ],
        ("", "persistentvolumeclaims") => vec![
            string("Status", 0),
            string("Volume", 0),
            string("Capacity", 0),
            string("Access Modes", 0),
            string("StorageClass", 0),
            string("VolumeAttributesClass", 0),
            age,
            string("VolumeMode", 1),
        ],
        ("storage.k8s.io", "storageclasses") => vec![
            string("Provisioner", 0),
            string("ReclaimPolicy", 0),
            string("VolumeBindingMode", 0),
            ("AllowVolumeExpansion", "boolean", 0),
            age,
        ],
        ("apps", "statefulsets") => vec![
            string("Ready", 0),
            age,
            string("Containers", 1),
            string("Images", 1),
        ],
        _ => return None,
    })
}

/// kubectl's short access modes: `RWO,ROX`.
fn access_modes(o: &Value, pointer: &str) -> String {
    o.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn unset(v: &str) -> String {
    if v.is_empty() {
        "<unset>".into()
    } else {
        v.into()
    }
}

/// The cells after the name (which a default StorageClass has marked),
/// or None for another kind.
pub(super) fn cells(
    group: &str,
    plural: &str,
    o: &Value,
    created: &Value,
    name: &mut Value,
) -> Option<Vec<Value>> {
    Some(match (group, plural) {
        ("", "persistentvolumes") => {
            let claim = match s(o, "/spec/claimRef/name") {
                "" => String::new(),
                c => format!("{}/{c}", s(o, "/spec/claimRef/namespace")),
            };
            vec![
                json!(s(o, "/spec/capacity/storage")),
                json!(access_modes(o, "/spec/accessModes")),
                json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                json!(s(o, "/status/phase")),
                json!(claim),
                json!(s(o, "/spec/storageClassName")),
                json!(unset(s(o, "/spec/volumeAttributesClassName"))),
                json!(s(o, "/status/reason")),
                created.clone(),
                json!(s(o, "/spec/volumeMode")),
            ]
        }
        ("", "persistentvolumeclaims") => vec![
            json!(s(o, "/status/phase")),
            json!(s(o, "/spec/volumeName")),
            json!(s(o, "/status/capacity/storage")),
            json!(access_modes(o, "/status/accessModes")),
            json!(s(o, "/spec/storageClassName")),
            json!(unset(s(o, "/spec/volumeAttributesClassName"))),
            created.clone(),
            json!(s(o, "/spec/volumeMode")),
        ],
        ("storage.k8s.io", "storageclasses") => {
            let default = o
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(crate::apiserver::registry::storage::DEFAULT_CLASS))
                .and_then(Value::as_str)
                == Some("true");
            if default {
                *name = json!(format!("{} (default)", s(o, "/metadata/name")));
            }
            vec![
                json!(s(o, "/provisioner")),
                json!(s(o, "/reclaimPolicy")),
                json!(s(o, "/volumeBindingMode")),
                json!(
                    o.get("allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                ),
                created.clone(),
            ]
        }
        ("apps", "statefulsets") => {
            let (c, i) = containers_and_images(o);
            vec![
                json!(format!(
                    "{}/{}",
                    n(o, "/status/readyReplicas"),
                    n(o, "/spec/replicas")
                )),
                created.clone(),
                json!(c),
                json!(i),
            ]
        }
        _ => return None,
    })
}
