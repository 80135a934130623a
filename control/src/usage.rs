//! What an object counts against a ResourceQuota, as upstream's quota
//! evaluators count it: object counts (`pods`, `services`,
//! `count/<resource>[.<group>]`), a pod's compute requests and limits
//! (`requests.cpu`, `cpu`, `limits.memory`, ...), a Service's NodePorts
//! and load balancers, a claim's storage. Shared by quota admission and
//! the quota controller.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::quantity::{format_quantity, parse_quantity};

pub type Usage = BTreeMap<String, f64>;

/// The kinds counted by their plain plural (`pods: 10`).
const COUNTED: &[&str] = &[
    "pods",
    "services",
    "configmaps",
    "secrets",
    "persistentvolumeclaims",
    "replicationcontrollers",
    "resourcequotas",
];

/// The compute resources whose plain name means the request.
const PLAIN: &[&str] = &["cpu", "memory", "ephemeral-storage"];

/// The object-count name of a resource (`count/deployments.apps`).
fn count_key(group: &str, plural: &str) -> String {
    if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    }
}

fn list<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// A container's request of `res` (its limit when no request is given, as
/// upstream's defaulting fills it) and its limit.
fn container_amounts(c: &Value) -> (Usage, Usage) {
    let of = |what: &str| -> Usage {
        c.pointer(&format!("/resources/{what}"))
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, q)| Some((k.clone(), parse_quantity(q.as_str()?)?)))
            .collect()
    };
    let limits = of("limits");
    let mut requests = of("requests");
    for (k, v) in &limits {
        requests.entry(k.clone()).or_insert(*v);
    }
    (requests, limits)
}

/// A pod's requests and limits: the sum over its containers, at least
/// the largest of its init containers'.
pub fn pod_amounts(pod: &Value) -> (Usage, Usage) {
    let (mut requests, mut limits) = (Usage::new(), Usage::new());
    for c in list(pod, "/spec/containers") {
        let (r, l) = container_amounts(c);
        for (k, v) in r {
            *requests.entry(k).or_default() += v;
        }
        for (k, v) in l {
            *limits.entry(k).or_default() += v;
        }
    }
    for c in list(pod, "/spec/initContainers") {
        let (r, l) = container_amounts(c);
        for (k, v) in r {
            let e = requests.entry(k).or_default();
            *e = e.max(v);
        }
        for (k, v) in l {
            let e = limits.entry(k).or_default();
            *e = e.max(v);
        }
    }
    (requests, limits)
}

/// Whether the object still counts: a finished pod does not.
pub fn counts(group: &str, plural: &str, obj: &Value) -> bool {
    if (group, plural) != ("", "pods") {
        return true;
    }
    !matches!(
        obj.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// What `obj`, of resource `group/plural`, counts.
pub fn usage(group: &str, plural: &str, obj: &Value) -> Usage {
    let mut out = Usage::new();
    if !counts(group, plural, obj) {
        return out;
    }
    out.insert(count_key(group, plural), 1.0);
    if group.is_empty() && COUNTED.contains(&plural) {
        out.insert(plural.to_string(), 1.0);
    }
    match (group, plural) {
        ("", "pods") => {
            let (requests, limits) = pod_amounts(obj);
            for (k, v) in requests {
                if PLAIN.contains(&k.as_str()) {
                    out.insert(k.clone(), v);
                }
                out.insert(format!("requests.{k}"), v);
            }
            for (k, v) in limits {
                out.insert(format!("limits.{k}"), v);
            }
        }
        ("", "services") => {
            let ty = obj.pointer("/spec/type").and_then(Value::as_str);
            if ty == Some("LoadBalancer") {
                out.insert("services.loadbalancers".into(), 1.0);
            }
            if matches!(ty, Some("NodePort" | "LoadBalancer")) {
                let n = list(obj, "/spec/ports").count();
                out.insert("services.nodeports".into(), n as f64);
            }
        }
        ("", "persistentvolumeclaims") => {
            if let Some(q) = obj
                .pointer("/spec/resources/requests/storage")
                .and_then(Value::as_str)
                .and_then(parse_quantity)
            {
                out.insert("requests.storage".into(), q);
            }
        }
        _ => {}
    }
    out
}

/// The resource (group, plural) whose objects a quota key counts.
pub fn counted_kind(key: &str) -> Option<(String, String)> {
    if let Some(rest) = key.strip_prefix("count/") {
        return Some(match rest.split_once('.') {
            Some((plural, group)) => (group.to_string(), plural.to_string()),
            None => (String::new(), rest.to_string()),
        });
    }
    let plural = match key {
        k if COUNTED.contains(&k) => key,
        "services.nodeports" | "services.loadbalancers" => "services",
        "requests.storage" => "persistentvolumeclaims",
        k if PLAIN.contains(&k) || k.starts_with("requests.") || k.starts_with("limits.") => "pods",
        _ => return None,
    };
    Some((String::new(), plural.to_string()))
}

/// A quota amount written back: memory and storage in binary units.
pub fn format(key: &str, v: f64) -> String {
    let binary = key.contains("memory") || key.contains("storage");
    format_quantity(v, binary)
}

/// `k=v,k2=v2` in key order, as upstream prints resource lists.
pub fn pretty(usage: &Usage) -> String {
    usage
        .iter()
        .map(|(k, v)| format!("{k}={}", format(k, *v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The compute resources a quota tracks that some container of the pod
/// does not set, as upstream lists them: `requests.cpu for: a,b`, by
/// quota key, container names sorted.
pub fn unspecified(pod: &Value, hard: &Usage) -> Vec<String> {
    let mut out = Vec::new();
    for key in hard.keys() {
        let (res, limit) = match key.split_once('.') {
            Some(("limits", r)) => (r, true),
            Some(("requests", r)) => (r, false),
            _ => (key.as_str(), false),
        };
        if !PLAIN.contains(&res) || (res == key && !PLAIN.contains(&key.as_str())) {
            continue;
        }
        let mut missing: Vec<&str> = list(pod, "/spec/initContainers")
            .chain(list(pod, "/spec/containers"))
            .filter(|c| {
                let (requests, limits) = container_amounts(c);
                !if limit { limits } else { requests }.contains_key(res)
            })
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .collect();
        missing.sort_unstable();
        if !missing.is_empty() {
            out.push(format!("{key} for: {}", missing.join(",")));
        }
    }
    out
}

/// A quota's `spec.hard` (or `status.used`) as numbers.
pub fn amounts(v: Option<&Value>) -> Usage {
    v.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, q)| Some((k.clone(), parse_quantity(q.as_str()?)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pods_count_their_containers_requests_and_limits() {
        let pod = json!({"spec": {
        "initContainers": [{"name": "init", "resources": {"requests": {"cpu": "1"}}}],
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}},
            {"name": "b", "resources": {"limits": {"cpu": "200m"}}},
        ]}});
        let u = usage("", "pods", &pod);
        assert_eq!(u["pods"], 1.0);
        assert_eq!(u["count/pods"], 1.0);
        assert_eq!(format("requests.cpu", u["requests.cpu"]), "1");
        assert_eq!(format("cpu", u["cpu"]), "1");
        assert_eq!(format("requests.memory", u["requests.memory"]), "64Mi");
        assert_eq!(format("limits.cpu", u["limits.cpu"]), "200m");
        let hard = amounts(Some(&json!({"requests.memory": "1Gi", "limits.cpu": "2"})));
        assert_eq!(
            unspecified(&pod, &hard),
            ["limits.cpu for: a,init", "requests.memory for: b,init"]
        );
        let done = json!({"status": {"phase": "Succeeded"}});
        assert!(usage("", "pods", &done).is_empty());
        assert_eq!(
            counted_kind("count/deployments.apps"),
            Some(("apps".into(), "deployments".into()))
        );
        assert_eq!(
            counted_kind("limits.memory"),
            Some((String::new(), "pods".into()))
        );
    }
}
