//! `meta.k8s.io/v1` Table responses, which is what `kubectl get` asks for
//! (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`): the columns and
//! cells follow the upstream printers, wide-only columns have priority 1.

use jiff::Timestamp;
use serde_json::{Value, json};

use super::fields::selector_text;
use crate::resources::Resource;

mod networking;
mod quota;
mod storage;

/// Which object each row carries (`?includeObject=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

fn columns(r: &Resource) -> Vec<(&'static str, &'static str, u8)> {
    let name = ("Name", "string", 0);
    let age = ("Age", "string", 0);
    if let Some(mut rest) = storage::columns(r.group, r.plural, age)
        .or_else(|| quota::columns(r.group, r.plural, age))
        .or_else(|| networking::columns(r.group, r.plural, age))
    {
        rest.insert(0, name);
        return rest;
    }
    match (r.group, r.plural) {
        ("", "pods") => vec![
            name,
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            age,
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        ("", "services") => vec![
            name,
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            age,
            ("Selector", "string", 1),
        ],
        ("", "nodes") => vec![
            name,
            ("Status", "string", 0),
            ("Roles", "string", 0),
            age,
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        ("", "namespaces") => vec![name, ("Status", "string", 0), age],
        ("", "endpoints") => vec![name, ("Endpoints", "string", 0), age],
        ("", "configmaps") => vec![name, ("Data", "integer", 0), age],
        ("", "secrets") => vec![name, ("Type", "string", 0), ("Data", "integer", 0), age],
        ("", "events") => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        ("apps", "deployments") => vec![
            name,
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "replicasets") | ("", "replicationcontrollers") => vec![
            name,
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "daemonsets") => vec![
            name,
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Node Selector", "string", 0),
            age,
        ],
        ("autoscaling", "horizontalpodautoscalers") => vec![
            name,
            ("Reference", "string", 0),
            ("Targets", "string", 0),
            ("MinPods", "string", 0),
            ("MaxPods", "integer", 0),
            ("Replicas", "integer", 0),
            age,
        ],
        ("batch", "cronjobs") => vec![
            name,
            ("Schedule", "string", 0),
            ("Timezone", "string", 0),
            ("Suspend", "boolean", 0),
            ("Active", "integer", 0),
            ("Last Schedule", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("batch", "jobs") => vec![
            name,
            ("Status", "string", 0),
            ("Completions", "string", 0),
            ("Duration", "string", 0),
            age,
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("discovery.k8s.io", "endpointslices") => vec![
            name,
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            age,
        ],
        ("coordination.k8s.io", "leases") => vec![name, ("Holder", "string", 0), age],
        ("certificates.k8s.io", "certificatesigningrequests") => vec![
            name,
            age,
            ("SignerName", "string", 0),
            ("Requestor", "string", 0),
            ("RequestedDuration", "string", 0),
            ("Condition", "string", 0),
        ],
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => vec![
            name,
            ("Role", "string", 0),
            age,
            ("Users", "string", 1),
            ("Groups", "string", 1),
            ("ServiceAccounts", "string", 1),
        ],
        ("rbac.authorization.k8s.io", "roles" | "clusterroles") => {
            vec![name, ("Created At", "date", 0)]
        }
        _ => vec![name, age],
    }
}

/// kubectl's short durations: `45s`, `3m20s`, `5h`, `2d3h`, `400d`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        },
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        },
        _ if h < 48 => format!("{h}h"),
        _ if h < 24 * 8 => match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        },
        _ if d < 365 * 2 => format!("{d}d"),
        _ if d < 365 * 8 => format!("{}y{}d", d / 365, d % 365),
        _ => format!("{}y", d / 365),
    }
}

fn age(obj: &Value, field: &str) -> String {
    let Some(ts) = obj
        .pointer(field)
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
    else {
        return "<unknown>".into();
    };
    human_duration(Timestamp::now().as_second() - ts.as_second())
}

fn s<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn n(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

/// kubectl's placeholder for a node field the kubelet did not report.
fn or_unknown(v: &str) -> String {
    if v.is_empty() {
        "<unknown>".into()
    } else {
        v.to_string()
    }
}

/// An HPA's TARGETS column: each Resource metric's current and target,
/// as kubectl prints them (`cpu: 250%/50%`).
fn hpa_targets(hpa: &Value) -> String {
    let current = hpa
        .pointer("/status/currentMetrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let parts: Vec<String> = hpa
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| s(m, "/type") == "Resource")
        .map(|m| {
            let name = s(m, "/resource/name");
            let cur = current
                .iter()
                .find(|c| s(c, "/resource/name") == name)
                .and_then(|c| c.pointer("/resource/current"));
            let (now, want) = if s(m, "/resource/target/type") == "Utilization" {
                (
                    cur.and_then(|c| c.get("averageUtilization"))
                        .and_then(Value::as_i64)
                        .map(|u| format!("{u}%")),
                    format!("{}%", n(m, "/resource/target/averageUtilization")),
                )
            } else {
                (
                    cur.and_then(|c| c.get("averageValue"))
                        .and_then(Value::as_str)
                        .map(String::from),
                    s(m, "/resource/target/averageValue").to_string(),
                )
            };
            format!(
                "{name}: {}/{want}",
                now.unwrap_or_else(|| "<unknown>".into())
            )
        })
        .collect();
    or_none(parts.join(", "))
}

/// Whether the Job has condition `kind` with status True.
fn job_condition(job: &Value, kind: &str) -> bool {
    job.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| s(c, "/type") == kind && s(c, "/status") == "True")
}

/// The Job's STATUS column, in kubectl's order of precedence.
fn job_status(job: &Value) -> &'static str {
    if job_condition(job, "Complete") {
        "Complete"
    } else if job_condition(job, "Failed") {
        "Failed"
    } else if job.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else if job_condition(job, "Suspended") {
        "Suspended"
    } else if job_condition(job, "FailureTarget") {
        "FailureTarget"
    } else if job_condition(job, "SuccessCriteriaMet") {
        "SuccessCriteriaMet"
    } else {
        "Running"
    }
}

fn job_completions(job: &Value) -> String {
    let done = n(job, "/status/succeeded");
    match job.pointer("/spec/completions").and_then(Value::as_i64) {
        Some(want) => format!("{done}/{want}"),
        None => match n(job, "/spec/parallelism") {
            p if p > 1 => format!("{done}/1 of {p}"),
            _ => format!("{done}/1"),
        },
    }
}

/// From the start to completion, or to now while it runs.
fn job_duration(job: &Value) -> String {
    let at = |p: &str| {
        job.pointer(p)
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<Timestamp>().ok())
    };
    let Some(start) = at("/status/startTime") else {
        return String::new();
    };
    let end = at("/status/completionTime").unwrap_or_else(Timestamp::now);
    human_duration(end.as_second() - start.as_second())
}

fn selector_string(sel: Option<&Value>) -> String {
    or_none(selector_text(sel))
}

fn containers_and_images(obj: &Value) -> (String, String) {
    let cs = obj
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = s(pod, "/status/reason").to_string();
    if reason.is_empty() {
        reason = s(pod, "/status/phase").to_string();
    }
    for cs in pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let waiting = s(cs, "/state/waiting/reason");
        let terminated = s(cs, "/state/terminated/reason");
        if !waiting.is_empty() {
            reason = waiting.to_string();
        } else if !terminated.is_empty() {
            reason = terminated.to_string();
        }
    }
    reason
}

fn pod_cells(pod: &Value) -> Vec<Value> {
    let total = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let restarts: i64 = statuses.iter().map(|c| n(c, "/restartCount")).sum();
    vec![
        json!(format!("{ready}/{total}")),
        json!(pod_status(pod)),
        json!(restarts.to_string()),
        json!(age(pod, "/metadata/creationTimestamp")),
        json!(or_none(s(pod, "/status/podIP").to_string())),
        json!(or_none(s(pod, "/spec/nodeName").to_string())),
        json!(or_none(s(pod, "/status/nominatedNodeName").to_string())),
        json!("<none>"),
    ]
}

fn service_ports(svc: &Value) -> String {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) => format!("{}:{np}/{proto}", n(p, "/port")),
                None => format!("{}/{proto}", n(p, "/port")),
            }
        })
        .collect();
    or_none(ports.join(","))
}

fn node_status(node: &Value) -> String {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| s(c, "/status").to_string());
    let mut out = match ready.as_deref() {
        Some("True") => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if node.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        out.push_str(",SchedulingDisabled");
    }
    out
}

fn cells(r: &Resource, o: &Value) -> Vec<Value> {
    let mut name = json!(s(o, "/metadata/name"));
    let created = json!(age(o, "/metadata/creationTimestamp"));
    if let Some(mut row) = storage::cells(r.group, r.plural, o, &created, &mut name)
        .or_else(|| quota::cells(r.group, r.plural, o, &created))
        .or_else(|| networking::cells(r.group, r.plural, o, &created))
    {
        row.insert(0, name);
        return row;
    }
    let mut row = match (r.group, r.plural) {
        ("", "pods") => pod_cells(o),
        ("", "services") => {
            let mut external: Vec<String> = o
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            external.extend(
                o.pointer("/status/loadBalancer/ingress")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.get("ip").and_then(Value::as_str).map(String::from)),
            );
            let ext = match (external.is_empty(), s(o, "/spec/type")) {
                (true, "LoadBalancer") => "<pending>".to_string(),
                (true, "ExternalName") => s(o, "/spec/externalName").to_string(),
                (true, _) => "<none>".to_string(),
                (false, _) => external.join(","),
            };
            vec![
                json!(s(o, "/spec/type")),
                json!(or_none(s(o, "/spec/clusterIP").into())),
                json!(ext),
                json!(service_ports(o)),
                created.clone(),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("", "nodes") => {
            let roles: Vec<&str> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            let address = |kind: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == kind)
                    .map(|a| s(a, "/address").to_string())
                    .unwrap_or_default()
            };
            let info = |field: &str| json!(or_unknown(s(o, &format!("/status/nodeInfo/{field}"))));
            vec![
                json!(node_status(o)),
                json!(or_none(roles.join(","))),
                created.clone(),
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(or_none(address("InternalIP"))),
                json!(or_none(address("ExternalIP"))),
                info("osImage"),
                info("kernelVersion"),
                info("containerRuntimeVersion"),
            ]
        }
        ("", "namespaces") => vec![json!(s(o, "/status/phase")), created.clone()],
        ("", "endpoints") => {
            let mut eps = Vec::new();
            for subset in o
                .pointer("/subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for a in subset
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for p in subset
                        .get("ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        eps.push(format!("{}:{}", s(a, "/ip"), n(p, "/port")));
                    }
                }
            }
            vec![json!(or_none(eps.join(","))), created.clone()]
        }
        ("", "configmaps") => {
            let data = o
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![json!(data), created.clone()]
        }
        ("", "secrets") => vec![
            json!(s(o, "/type")),
            json!(
                o.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len())
            ),
            created.clone(),
        ],
        ("", "events") => {
            let seen = if o.pointer("/lastTimestamp").is_some() {
                age(o, "/lastTimestamp")
            } else {
                age(o, "/eventTime")
            };
            let object = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            return vec![
                json!(seen),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, "/message")),
            ];
        }
        ("apps", "deployments") => {
            let (c, i) = containers_and_images(o);
            vec![
                json!(format!(
                    "{}/{}",
                    n(o, "/status/readyReplicas"),
                    n(o, "/spec/replicas")
                )),
                json!(n(o, "/status/updatedReplicas")),
                json!(n(o, "/status/availableReplicas")),
                created.clone(),
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "replicasets") | ("", "replicationcontrollers") => {
            let (c, i) = containers_and_images(o);
            vec![
                json!(n(o, "/spec/replicas")),
                json!(n(o, "/status/replicas")),
                json!(n(o, "/status/readyReplicas")),
                created.clone(),
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("autoscaling", "horizontalpodautoscalers") => vec![
            json!(format!(
                "{}/{}",
                s(o, "/spec/scaleTargetRef/kind"),
                s(o, "/spec/scaleTargetRef/name")
            )),
            json!(hpa_targets(o)),
            json!(n(o, "/spec/minReplicas").to_string()),
            json!(n(o, "/spec/maxReplicas")),
            json!(n(o, "/status/currentReplicas")),
            created.clone(),
        ],
        ("batch", "cronjobs") => {
            let template = o
                .pointer("/spec/jobTemplate")
                .cloned()
                .unwrap_or(Value::Null);
            let (c, i) = containers_and_images(&template);
            let last = match o.pointer("/status/lastScheduleTime") {
                Some(_) => age(o, "/status/lastScheduleTime"),
                None => "<none>".into(),
            };
            vec![
                json!(s(o, "/spec/schedule")),
                json!(or_none(s(o, "/spec/timeZone").to_string())),
                // kubectl's printer writes this boolean as text.
                json!(match o.pointer("/spec/suspend").and_then(Value::as_bool) {
                    Some(true) => "True",
                    Some(false) => "False",
                    None => "<unset>",
                }),
                json!(
                    o.pointer("/status/active")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)
                ),
                json!(last),
                created.clone(),
                json!(c),
                json!(i),
                json!(selector_string(template.pointer("/spec/selector"))),
            ]
        }
        ("batch", "jobs") => {
            let (c, i) = containers_and_images(o);
            vec![
                json!(job_status(o)),
                json!(job_completions(o)),
                json!(job_duration(o)),
                created.clone(),
                json!(c),
                json!(i),
                json!(selector_string(o.pointer("/spec/selector"))),
            ]
        }
        ("apps", "daemonsets") => vec![
            json!(n(o, "/status/desiredNumberScheduled")),
            json!(n(o, "/status/currentNumberScheduled")),
            json!(n(o, "/status/numberReady")),
            json!(n(o, "/status/updatedNumberScheduled")),
            json!(n(o, "/status/numberAvailable")),
            json!(selector_string(
                o.pointer("/spec/template/spec/nodeSelector")
            )),
            created.clone(),
        ],
        ("discovery.k8s.io", "endpointslices") => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| n(p, "/port").to_string())
                .collect();
            let addrs: Vec<&str> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e.get("addresses")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                })
                .collect();
            vec![
                json!(s(o, "/addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(addrs.join(","))),
                created.clone(),
            ]
        }
        ("coordination.k8s.io", "leases") => {
            vec![json!(s(o, "/spec/holderIdentity")), created.clone()]
        }
        ("certificates.k8s.io", "certificatesigningrequests") => {
            let conditions: Vec<&str> = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|c| s(c, "/status") == "True")
                .map(|c| s(c, "/type"))
                .collect();
            let mut condition = if conditions.is_empty() {
                "Pending".to_string()
            } else {
                conditions.join(",")
            };
            if o.pointer("/status/certificate")
                .and_then(Value::as_str)
                .is_some_and(|c| !c.is_empty())
            {
                condition.push_str(",Issued");
            }
            let duration = o
                .pointer("/spec/expirationSeconds")
                .and_then(Value::as_i64)
                .map(human_duration)
                .unwrap_or_else(|| "<none>".into());
            vec![
                created.clone(),
                json!(s(o, "/spec/signerName")),
                json!(s(o, "/spec/username")),
                json!(duration),
                json!(condition),
            ]
        }
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            let of = |kind: &str| -> String {
                o.get("subjects")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|x| s(x, "/kind") == kind)
                    .map(|x| {
                        if kind == "ServiceAccount" {
                            format!("{}/{}", s(x, "/namespace"), s(x, "/name"))
                        } else {
                            s(x, "/name").to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                json!(format!(
                    "{}/{}",
                    s(o, "/roleRef/kind"),
                    s(o, "/roleRef/name")
                )),
                created.clone(),
                json!(of("User")),
                json!(of("Group")),
                json!(of("ServiceAccount")),
            ]
        }
        ("rbac.authorization.k8s.io", "roles" | "clusterroles") => {
            vec![json!(s(o, "/metadata/creationTimestamp"))]
        }
        _ => vec![created.clone()],
    };
    row.insert(0, name);
    row
}

fn row_object(o: &Value, include: Include) -> Option<Value> {
    match include {
        Include::None => None,
        Include::Object => Some(o.clone()),
        Include::Metadata => Some(json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
        })),
    }
}

/// One object or a list's items as a Table.
pub fn table(r: &Resource, items: &[Value], list_meta: Value, include: Include) -> Value {
    let defs: Vec<Value> = columns(r)
        .into_iter()
        .map(|(name, ty, priority)| {
            let format = if name == "Name" { "name" } else { "" };
            json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(r, o)});
            if let Some(obj) = row_object(o, include) {
                row["object"] = obj;
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3 * 3600), "3h");
        assert_eq!(human_duration(50 * 3600), "2d2h");
        assert_eq!(human_duration(400 * 86400), "400d");
    }

    #[test]
    fn pod_rows() {
        let pods = find("", "v1", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "web-1", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.1.5", "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let t = table(pods, &[pod], json!({}), Include::Metadata);
        assert_eq!(t["columnDefinitions"].as_array().map(Vec::len), Some(9));
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web-1");
        assert_eq!(cells[1], "1/1");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "2");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
