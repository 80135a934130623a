//! Decoding, defaulting and validation of incoming objects.
//!
//! An object is first decoded into its upstream k8s-openapi type (a type
//! error is a 400 naming the field path) and re-encoded, which drops unknown
//! fields as the upstream apiserver does. Then the defaults the upstream
//! types document are filled in, and the semantic rules are checked; every
//! violation becomes a cause of one 422, named by its field path.

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::{
    apps::v1 as apps, autoscaling::v2 as autoscaling, batch::v1 as batch,
    certificates::v1 as certificates, coordination::v1 as coordination, core::v1 as core,
    discovery::v1 as discovery, rbac::v1 as rbac,
};
use serde_json::{Map, Value, json};

use crate::resources::Resource;
use crate::status::{ApiError, Cause};

mod networking;
mod quota;
mod storage;

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(
    v: &Value,
) -> Result<Value, ApiError> {
    let typed: T = serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_request(format!("error decoding object: {path}: {}", e.inner()))
    })?;
    serde_json::to_value(typed).map_err(|e| ApiError::internal(e.to_string()))
}

/// Decodes `v` as the resource's upstream type and encodes it again.
pub fn decode(r: &Resource, v: &Value) -> Result<Value, ApiError> {
    match (r.group, r.kind) {
        ("", "Namespace") => roundtrip::<core::Namespace>(v),
        ("", "Pod") => roundtrip::<core::Pod>(v),
        ("", "Service") => roundtrip::<core::Service>(v),
        ("", "Endpoints") => roundtrip::<core::Endpoints>(v),
        ("", "Node") => roundtrip::<core::Node>(v),
        ("", "ConfigMap") => roundtrip::<core::ConfigMap>(v),
        ("", "Secret") => roundtrip::<core::Secret>(v),
        ("", "Event") => roundtrip::<core::Event>(v),
        ("", "ServiceAccount") => roundtrip::<core::ServiceAccount>(v),
        ("", "ReplicationController") => roundtrip::<core::ReplicationController>(v),
        ("", "PersistentVolume") => roundtrip::<core::PersistentVolume>(v),
        ("", "PersistentVolumeClaim") => roundtrip::<core::PersistentVolumeClaim>(v),
        ("", "ResourceQuota") => roundtrip::<core::ResourceQuota>(v),
        ("", "LimitRange") => roundtrip::<core::LimitRange>(v),
        ("storage.k8s.io", "StorageClass") => {
            roundtrip::<k8s_openapi::api::storage::v1::StorageClass>(v)
        }
        ("apps", "StatefulSet") => roundtrip::<apps::StatefulSet>(v),
        ("networking.k8s.io", "Ingress") => {
            roundtrip::<k8s_openapi::api::networking::v1::Ingress>(v)
        }
        ("networking.k8s.io", "IngressClass") => {
            roundtrip::<k8s_openapi::api::networking::v1::IngressClass>(v)
        }
        ("coordination.k8s.io", "Lease") => roundtrip::<coordination::Lease>(v),
        ("discovery.k8s.io", "EndpointSlice") => roundtrip::<discovery::EndpointSlice>(v),
        ("apps", "ReplicaSet") => roundtrip::<apps::ReplicaSet>(v),
        ("apps", "Deployment") => roundtrip::<apps::Deployment>(v),
        ("apps", "DaemonSet") => roundtrip::<apps::DaemonSet>(v),
        ("apps", "ControllerRevision") => roundtrip::<apps::ControllerRevision>(v),
        ("batch", "Job") => roundtrip::<batch::Job>(v),
        ("batch", "CronJob") => roundtrip::<batch::CronJob>(v),
        ("autoscaling", "HorizontalPodAutoscaler") => {
            roundtrip::<autoscaling::HorizontalPodAutoscaler>(v)
        }
        ("rbac.authorization.k8s.io", "ClusterRole") => roundtrip::<rbac::ClusterRole>(v),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            roundtrip::<rbac::ClusterRoleBinding>(v)
        }
        ("rbac.authorization.k8s.io", "Role") => roundtrip::<rbac::Role>(v),
        ("rbac.authorization.k8s.io", "RoleBinding") => roundtrip::<rbac::RoleBinding>(v),
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            roundtrip::<certificates::CertificateSigningRequest>(v)
        }
        _ => Ok(v.clone()),
    }
}

fn set_default(obj: &mut Value, field: &str, value: Value) {
    if let Some(m) = obj.as_object_mut() {
        m.entry(field).or_insert(value);
    }
}

/// Removes `field` when it holds Go's zero value. Non-pointer fields in the
/// upstream Go types (a container's hostPort, a service port's nodePort)
/// treat 0 as unset, and client-go's protobuf always writes them, so 0
/// must mean "not given", not "port 0".
fn drop_go_zero(obj: &mut Value, field: &str) {
    if let Some(m) = obj.as_object_mut()
        && m.get(field).is_some_and(|v| v == 0 || v == "")
    {
        m.remove(field);
    }
}

fn obj_mut<'a>(v: &'a mut Value, field: &str) -> &'a mut Value {
    if !v.get(field).is_some_and(Value::is_object) {
        v[field] = json!({});
    }
    &mut v[field]
}

/// Fills in the defaults of the upstream types.
pub fn default(r: &Resource, v: &mut Value) {
    match (r.group, r.kind) {
        ("", "Pod") => {
            default_pod_spec(obj_mut(v, "spec"));
            default_requests_to_limits(obj_mut(v, "spec"));
            let status = obj_mut(v, "status");
            set_default(status, "phase", json!("Pending"));
        }
        ("", "Service") => default_service(obj_mut(v, "spec")),
        ("", "Namespace") => {
            set_default(obj_mut(v, "spec"), "finalizers", json!(["kubernetes"]));
            set_default(obj_mut(v, "status"), "phase", json!("Active"));
        }
        ("", "Secret") => set_default(v, "type", json!("Opaque")),
        ("", "ReplicationController") => default_replication_controller(v),
        ("", "PersistentVolumeClaim") => {
            storage::default_claim_spec(obj_mut(v, "spec"));
            set_default(obj_mut(v, "status"), "phase", json!("Pending"));
        }
        ("", "PersistentVolume") => storage::default_volume(v),
        ("", "LimitRange") => quota::default_limit_range(v),
        ("storage.k8s.io", "StorageClass") => storage::default_storage_class(v),
        ("apps", "StatefulSet") => storage::default_stateful_set(obj_mut(v, "spec")),
        ("batch", "Job") => default_job(obj_mut(v, "spec")),
        ("autoscaling", "HorizontalPodAutoscaler") => {
            let spec = obj_mut(v, "spec");
            set_default(spec, "minReplicas", json!(1));
            // Upstream's v2 default: 80 % of the pods' CPU requests.
            if spec
                .get("metrics")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                spec["metrics"] = json!([{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80}}}]);
            }
        }
        ("batch", "CronJob") => {
            let spec = obj_mut(v, "spec");
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            let job = obj_mut(obj_mut(spec, "jobTemplate"), "spec");
            let template = obj_mut(job, "template");
            default_pod_spec(obj_mut(template, "spec"));
        }
        ("apps", kind @ ("Deployment" | "ReplicaSet" | "DaemonSet")) => {
            let spec = obj_mut(v, "spec");
            if kind != "DaemonSet" {
                set_default(spec, "replicas", json!(1));
            }
            if kind != "ReplicaSet" {
                set_default(spec, "revisionHistoryLimit", json!(10));
            }
            if kind == "Deployment" {
                set_default(spec, "progressDeadlineSeconds", json!(600));
                let strategy = obj_mut(spec, "strategy");
                set_default(strategy, "type", json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    let ru = obj_mut(strategy, "rollingUpdate");
                    set_default(ru, "maxSurge", json!("25%"));
                    set_default(ru, "maxUnavailable", json!("25%"));
                }
            }
            if kind == "DaemonSet" {
                let strategy = obj_mut(spec, "updateStrategy");
                set_default(strategy, "type", json!("RollingUpdate"));
                if strategy["type"] == "RollingUpdate" {
                    let ru = obj_mut(strategy, "rollingUpdate");
                    set_default(ru, "maxUnavailable", json!(1));
                    set_default(ru, "maxSurge", json!(0));
                }
            }
            let template = obj_mut(spec, "template");
            default_pod_spec(obj_mut(template, "spec"));
        }
        _ => {}
    }
}

/// Upstream's ReplicationController defaults: an empty selector and empty
/// labels are the template's labels, one replica, and the pod defaults.
fn default_replication_controller(v: &mut Value) {
    let template_labels = v
        .pointer("/spec/template/metadata/labels")
        .filter(|l| l.as_object().is_some_and(|m| !m.is_empty()))
        .cloned();
    if let Some(labels) = template_labels {
        let empty = |x: Option<&Value>| x.and_then(Value::as_object).is_none_or(Map::is_empty);
        if empty(v.pointer("/spec/selector")) {
            obj_mut(v, "spec")["selector"] = labels.clone();
        }
        if empty(v.pointer("/metadata/labels")) {
            obj_mut(v, "metadata")["labels"] = labels;
        }
    }
    let spec = obj_mut(v, "spec");
    set_default(spec, "replicas", json!(1));
    if spec.get("template").is_some_and(Value::is_object) {
        default_pod_spec(obj_mut(obj_mut(spec, "template"), "spec"));
    }
}

/// Upstream's Job defaults: one pod at a time, one completion when
/// neither count is given, six retries, non-indexed, not suspended.
fn default_job(spec: &mut Value) {
    if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
        set_default(spec, "completions", json!(1));
    }
    set_default(spec, "parallelism", json!(1));
    let per_index = spec
        .get("backoffLimitPerIndex")
        .is_some_and(|v| !v.is_null());
    set_default(
        spec,
        "backoffLimit",
        json!(if per_index { i32::MAX } else { 6 }),
    );
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    let replace = if spec.get("podFailurePolicy").is_some_and(|v| !v.is_null()) {
        "Failed"
    } else {
        "TerminatingOrFailed"
    };
    set_default(spec, "podReplacementPolicy", json!(replace));
    if spec.get("template").is_some_and(Value::is_object) {
        default_pod_spec(obj_mut(obj_mut(spec, "template"), "spec"));
    }
}

/// A pod's container with a limit and no request of a resource requests
/// its limit (upstream's pod defaulting; templates keep what was given).
fn default_requests_to_limits(spec: &mut Value) {
    for list in ["containers", "initContainers"] {
        let Some(Value::Array(cs)) = spec.get_mut(list) else {
            continue;
        };
        for c in cs {
            let limits = c
                .pointer("/resources/limits")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if limits.is_empty() {
                continue;
            }
            let requests = obj_mut(obj_mut(c, "resources"), "requests");
            for (k, v) in limits {
                set_default(requests, &k, v);
            }
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        let Some(Value::Array(cs)) = spec.get_mut(list) else {
            continue;
        };
        for c in cs {
            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
            let tagless = !image.rsplit('/').next().unwrap_or_default().contains(':');
            let policy = if image.ends_with(":latest") || (tagless && !image.contains('@')) {
                "Always"
            } else {
                "IfNotPresent"
            };
            set_default(c, "imagePullPolicy", json!(policy));
            set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(c, "terminationMessagePolicy", json!("File"));
            set_default(c, "resources", json!({}));
            if let Some(Value::Array(ports)) = c.get_mut("ports") {
                for p in ports {
                    drop_go_zero(p, "hostPort");
                    set_default(p, "protocol", json!("TCP"));
                }
            }
        }
    }
}

fn default_service(spec: &mut Value) {
    set_default(spec, "type", json!("ClusterIP"));
    set_default(spec, "sessionAffinity", json!("None"));
    drop_go_zero(spec, "healthCheckNodePort");
    if spec["sessionAffinity"] == "ClientIP" {
        let cfg = obj_mut(spec, "sessionAffinityConfig");
        let ip = obj_mut(cfg, "clientIP");
        set_default(ip, "timeoutSeconds", json!(10800));
    }
    if spec["type"] != "ExternalName" {
        set_default(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        set_default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports {
            drop_go_zero(p, "nodePort");
            drop_go_zero(p, "targetPort");
            set_default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                set_default(p, "targetPort", port);
            }
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Label keys are `[prefix/]name`, values up to 63 of `[A-Za-z0-9._-]`
/// starting and ending alphanumeric.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric))
}

fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

struct Check {
    causes: Vec<Cause>,
}

impl Check {
    fn push(&mut self, c: Cause) {
        self.causes.push(c);
    }

    /// A field that must be one of `allowed` (and given, if `required`).
    fn one_of(&mut self, field: &str, v: Option<&Value>, allowed: &[&str], required: bool) {
        match v.and_then(Value::as_str) {
            None | Some("") if required => self.push(Cause::required(field)),
            Some(s) if !s.is_empty() && !allowed.contains(&s) => {
                self.push(Cause::unsupported(field, s, allowed))
            }
            _ => {}
        }
    }

    fn labels(&mut self, field: &str, labels: Option<&Map<String, Value>>) {
        for (k, v) in labels.into_iter().flatten() {
            if !is_label_key(k) {
                self.push(Cause::invalid(field, k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            if !v.as_str().is_some_and(is_label_value) {
                self.push(Cause::invalid(format!("{field}[{k}]"), v.as_str().unwrap_or_default(), "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
        }
    }

    fn port(&mut self, field: &str, v: Option<&Value>, required: bool) {
        match v.and_then(Value::as_i64) {
            None if required => self.push(Cause::required(field)),
            None => {}
            Some(p) if !(1..=65535).contains(&p) => {
                self.push(Cause::invalid(
                    field,
                    p,
                    "must be between 1 and 65535, inclusive",
                ));
            }
            Some(_) => {}
        }
    }

    fn pod_spec(&mut self, at: &str, spec: &Value) {
        let containers = spec.get("containers").and_then(Value::as_array);
        if containers.is_none_or(Vec::is_empty) {
            self.push(Cause::required(format!("{at}.containers")));
        }
        let mut names = HashSet::new();
        for (list, cs) in [
            ("containers", containers),
            (
                "initContainers",
                spec.get("initContainers").and_then(Value::as_array),
            ),
        ] {
            for (i, c) in cs.into_iter().flatten().enumerate() {
                let f = format!("{at}.{list}[{i}]");
                match c.get("name").and_then(Value::as_str) {
                    None | Some("") => self.push(Cause::required(format!("{f}.name"))),
                    Some(n) if !is_dns_label(n) => self.push(Cause::invalid(format!("{f}.name"), n, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'")),
                    Some(n) if !names.insert(n.to_string()) => self.push(Cause::duplicate(format!("{f}.name"), n)),
                    Some(_) => {}
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .is_none_or(|s| s.trim().is_empty())
                {
                    self.push(Cause::required(format!("{f}.image")));
                }
                for (j, p) in c
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    self.port(
                        &format!("{f}.ports[{j}].containerPort"),
                        p.get("containerPort"),
                        true,
                    );
                    self.port(
                        &format!("{f}.ports[{j}].hostPort"),
                        p.get("hostPort"),
                        false,
                    );
                    self.protocol(&format!("{f}.ports[{j}].protocol"), p.get("protocol"));
                }
            }
        }
        self.one_of(
            &format!("{at}.restartPolicy"),
            spec.get("restartPolicy"),
            &["Always", "OnFailure", "Never"],
            false,
        );
    }

    fn protocol(&mut self, field: &str, v: Option<&Value>) {
        self.one_of(field, v, &["SCTP", "TCP", "UDP"], false);
    }

    fn service(&mut self, spec: &Value, node_ports: (u16, u16)) {
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP");
        self.one_of(
            "spec.type",
            spec.get("type"),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
            false,
        );
        let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
        let ports = spec.get("ports").and_then(Value::as_array);
        if ty != "ExternalName" && !headless && ports.is_none_or(Vec::is_empty) {
            self.push(Cause::required("spec.ports"));
        }
        let ports = ports.map(Vec::as_slice).unwrap_or_default();
        let (mut names, mut seen) = (HashSet::new(), HashSet::new());
        for (i, p) in ports.iter().enumerate() {
            let f = format!("spec.ports[{i}]");
            self.port(&format!("{f}.port"), p.get("port"), true);
            self.protocol(&format!("{f}.protocol"), p.get("protocol"));
            let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
            if ports.len() > 1 && name.is_empty() {
                self.push(Cause::required(format!("{f}.name")));
            }
            if !name.is_empty() && !names.insert(name.to_string()) {
                self.push(Cause::duplicate(format!("{f}.name"), name));
            }
            let key = (
                p.get("port").and_then(Value::as_i64),
                p.get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_string(),
            );
            if key.0.is_some() && !seen.insert(key.clone()) {
                self.push(Cause::duplicate(
                    f.clone(),
                    format!("{}/{}", key.0.unwrap_or_default(), key.1),
                ));
            }
            if let Some(tp) = p.get("targetPort").filter(|tp| Some(*tp) != p.get("port")) {
                match tp {
                    Value::Number(n) => self.port(&format!("{f}.targetPort"), Some(&json!(n)), false),
                    Value::String(s) if !is_dns_label(s) || s.len() > 15 => self.push(Cause::invalid(format!("{f}.targetPort"), s, "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")),
                    _ => {}
                }
            }
            if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
                if ty == "ClusterIP" {
                    self.push(Cause::forbidden(
                        format!("{f}.nodePort"),
                        "may not be used when `type` is 'ClusterIP'",
                    ));
                } else if !(i64::from(node_ports.0)..=i64::from(node_ports.1)).contains(&np) {
                    self.push(Cause::invalid(format!("{f}.nodePort"), np, &format!("provided port is not in the valid range. The range of valid ports is {}-{}", node_ports.0, node_ports.1)));
                }
            }
        }
        if let Some(ip) = spec.get("clusterIP").and_then(Value::as_str)
            && !ip.is_empty()
            && ip != "None"
            && ip.parse::<IpAddr>().is_err()
        {
            self.push(Cause::invalid(
                "spec.clusterIP",
                ip,
                "must be empty, 'None', or a valid IP address",
            ));
        }
        // Where the Service needs none, the allocation drops it (as
        // upstream drops type-dependent fields on an update).
        if let Some(hc) = spec.get("healthCheckNodePort").and_then(Value::as_i64)
            && !(i64::from(node_ports.0)..=i64::from(node_ports.1)).contains(&hc)
        {
            self.push(Cause::invalid(
                "spec.healthCheckNodePort",
                hc,
                &format!(
                    "provided port is not in the valid range. The range of valid ports is {}-{}",
                    node_ports.0, node_ports.1
                ),
            ));
        }
        for (i, ip) in spec
            .get("externalIPs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if ip.as_str().is_none_or(|s| s.parse::<IpAddr>().is_err()) {
                self.push(Cause::invalid(
                    format!("spec.externalIPs[{i}]"),
                    ip.as_str().unwrap_or_default(),
                    "must be a valid IP address",
                ));
            }
        }
        if let Some(t) = spec
            .pointer("/sessionAffinityConfig/clientIP/timeoutSeconds")
            .and_then(Value::as_i64)
            && !(1..=86400).contains(&t)
        {
            self.push(Cause::invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                t,
                "must be greater than 0 and less than 86400",
            ));
        }
    }

    fn workload(&mut self, kind: &str, spec: &Value) {
        if let Some(n) = spec.get("replicas").and_then(Value::as_i64)
            && n < 0
        {
            self.push(Cause::invalid(
                "spec.replicas",
                n,
                "must be greater than or equal to 0",
            ));
        }
        let selector = spec.get("selector");
        // A ReplicationController's selector is a plain label map.
        let rc = kind == "ReplicationController";
        let match_labels = if rc {
            selector.and_then(Value::as_object)
        } else {
            selector
                .and_then(|s| s.get("matchLabels"))
                .and_then(Value::as_object)
        };
        let exprs = selector
            .filter(|_| !rc)
            .and_then(|s| s.get("matchExpressions"))
            .and_then(Value::as_array);
        if match_labels.is_none_or(Map::is_empty) && exprs.is_none_or(Vec::is_empty) {
            self.push(Cause::required("spec.selector"));
        }
        if rc {
            self.labels("spec.selector", match_labels);
        }
        let template_labels = spec
            .pointer("/template/metadata/labels")
            .and_then(Value::as_object);
        self.labels("spec.template.metadata.labels", template_labels);
        if let Some(ml) = match_labels {
            let ok = ml
                .iter()
                .all(|(k, v)| template_labels.and_then(|t| t.get(k)) == Some(v));
            if !ok {
                let shown: Vec<String> = template_labels
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or_default()))
                    .collect();
                self.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    format!("map[{}]", shown.join(" ")),
                    if rc {
                        "selector does not match labels in `template`"
                    } else {
                        "`selector` does not match template `labels`"
                    },
                ));
            }
        }
        match spec.get("template").and_then(|t| t.get("spec")) {
            Some(pod) => self.pod_spec("spec.template.spec", pod),
            None if rc && spec.get("template").is_none_or(Value::is_null) => {
                self.push(Cause::required("spec.template"))
            }
            None => self.push(Cause::required("spec.template.spec")),
        }
        // Pods of every workload here restart in place.
        self.one_of(
            "spec.template.spec.restartPolicy",
            spec.pointer("/template/spec/restartPolicy"),
            &["Always"],
            false,
        );
    }
}

impl Check {
    fn non_negative(&mut self, at: &str, spec: &Value, field: &str) {
        if let Some(n) = spec.get(field).and_then(Value::as_i64)
            && n < 0
        {
            self.push(Cause::invalid(
                format!("{at}.{field}"),
                n,
                "must be greater than or equal to 0",
            ));
        }
    }

    fn autoscaler(&mut self, spec: &Value) {
        let min = spec.get("minReplicas").and_then(Value::as_i64).unwrap_or(1);
        let max = spec.get("maxReplicas").and_then(Value::as_i64).unwrap_or(0);
        if min < 1 {
            self.push(Cause::invalid(
                "spec.minReplicas",
                min,
                "must be greater than or equal to 1",
            ));
        }
        if max < 1 {
            self.push(Cause::invalid(
                "spec.maxReplicas",
                max,
                "must be greater than or equal to 1",
            ));
        } else if max < min {
            self.push(Cause::invalid(
                "spec.maxReplicas",
                max,
                "must be greater than or equal to `minReplicas`",
            ));
        }
        for f in ["kind", "name"] {
            if spec
                .pointer(&format!("/scaleTargetRef/{f}"))
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                self.push(Cause::required(format!("spec.scaleTargetRef.{f}")));
            }
        }
        let metrics = spec.get("metrics").and_then(Value::as_array);
        for (i, m) in metrics.into_iter().flatten().enumerate() {
            let at = format!("spec.metrics[{i}]");
            let kind = m.get("type").and_then(Value::as_str).unwrap_or_default();
            if kind != "Resource" {
                self.push(Cause::unsupported(
                    format!("{at}.type"),
                    kind,
                    &["Resource"],
                ));
                continue;
            }
            let name = m
                .pointer("/resource/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !matches!(name, "cpu" | "memory") {
                self.push(Cause::unsupported(
                    format!("{at}.resource.name"),
                    name,
                    &["cpu", "memory"],
                ));
            }
            let target = m.pointer("/resource/target");
            let ty = target
                .and_then(|t| t.get("type"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            match ty {
                "Utilization" => {
                    if target
                        .and_then(|t| t.get("averageUtilization"))
                        .and_then(Value::as_i64)
                        .is_none_or(|u| u < 1)
                    {
                        self.push(Cause::required(format!(
                            "{at}.resource.target.averageUtilization"
                        )));
                    }
                }
                "AverageValue" => {
                    if target.and_then(|t| t.get("averageValue")).is_none() {
                        self.push(Cause::required(format!(
                            "{at}.resource.target.averageValue"
                        )));
                    }
                }
                other => self.push(Cause::unsupported(
                    format!("{at}.resource.target.type"),
                    other,
                    &["Utilization", "AverageValue"],
                )),
            }
        }
    }

    fn cron_job(&mut self, spec: &Value) {
        let schedule = spec
            .get("schedule")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if schedule.is_empty() {
            self.push(Cause::required("spec.schedule"));
        } else if schedule.contains("TZ=") {
            self.push(Cause::invalid(
                "spec.schedule",
                schedule,
                "cannot use TZ or CRON_TZ in schedule, use timeZone field instead",
            ));
        } else if let Err(e) = crate::cron::Schedule::parse(schedule) {
            self.push(Cause::invalid("spec.schedule", schedule, &e));
        }
        if let Some(tz) = spec.get("timeZone").and_then(Value::as_str)
            && let Err(e) = crate::cron::zone(Some(tz))
        {
            self.push(Cause::invalid("spec.timeZone", tz, &e));
        }
        self.one_of(
            "spec.concurrencyPolicy",
            spec.get("concurrencyPolicy"),
            &["Allow", "Forbid", "Replace"],
            false,
        );
        for f in [
            "startingDeadlineSeconds",
            "successfulJobsHistoryLimit",
            "failedJobsHistoryLimit",
        ] {
            self.non_negative("spec", spec, f);
        }
        match spec.pointer("/jobTemplate/spec") {
            Some(job) => self.job("spec.jobTemplate.spec", job),
            None => self.push(Cause::required("spec.jobTemplate.spec")),
        }
    }

    fn pod_failure_policy(&mut self, at: &str, pfp: &Value) {
        let rules = pfp.get("rules").and_then(Value::as_array);
        for (i, rule) in rules.into_iter().flatten().enumerate() {
            let at = format!("{at}.rules[{i}]");
            let action = rule
                .get("action")
                .and_then(Value::as_str)
                .unwrap_or_default();
            // FailIndex needs backoffLimitPerIndex, which is not served.
            if !matches!(action, "FailJob" | "Ignore" | "Count") {
                self.push(Cause::unsupported(
                    format!("{at}.action"),
                    action,
                    &["Count", "FailJob", "Ignore"],
                ));
            }
            let codes = rule.get("onExitCodes").filter(|v| !v.is_null());
            let conditions = rule.get("onPodConditions").filter(|v| !v.is_null());
            match (codes, conditions) {
                (Some(_), Some(_)) => self.push(Cause::invalid(
                    at.clone(),
                    "",
                    "specifying both OnExitCodes and OnPodConditions is not supported",
                )),
                (None, None) => self.push(Cause::invalid(
                    at.clone(),
                    "",
                    "specifying one of OnExitCodes and OnPodConditions is required",
                )),
                _ => {}
            }
            if let Some(c) = codes {
                let op = c
                    .get("operator")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !matches!(op, "In" | "NotIn") {
                    self.push(Cause::unsupported(
                        format!("{at}.onExitCodes.operator"),
                        op,
                        &["In", "NotIn"],
                    ));
                }
                let values = c.get("values").and_then(Value::as_array);
                if values.is_none_or(Vec::is_empty) {
                    self.push(Cause::required(format!("{at}.onExitCodes.values")));
                }
                if op == "In" && values.into_iter().flatten().any(|v| v == 0) {
                    self.push(Cause::invalid(
                        format!("{at}.onExitCodes.values"),
                        0,
                        "must not be 0 for the In operator",
                    ));
                }
            }
        }
    }

    /// A Job's spec, at `at` (`spec`, or a CronJob's
    /// `spec.jobTemplate.spec`).
    fn job(&mut self, at: &str, spec: &Value) {
        for f in [
            "parallelism",
            "completions",
            "backoffLimit",
            "activeDeadlineSeconds",
            "ttlSecondsAfterFinished",
        ] {
            self.non_negative(at, spec, f);
        }
        let mode = spec
            .get("completionMode")
            .and_then(Value::as_str)
            .unwrap_or("NonIndexed");
        match mode {
            "NonIndexed" => {}
            "Indexed" => match spec.get("completions").and_then(Value::as_i64) {
                None => self.push(Cause {
                    message: "Required value: when completion mode is Indexed".into(),
                    ..Cause::required(format!("{at}.completions"))
                }),
                Some(n) if n > 100_000 => self.push(Cause::invalid(
                    format!("{at}.completions"),
                    n,
                    "must be less than or equal to 100000 when completion mode is Indexed",
                )),
                Some(_) => {}
            },
            other => self.push(Cause::unsupported(
                format!("{at}.completionMode"),
                other,
                &["NonIndexed", "Indexed"],
            )),
        }
        let selector = spec
            .pointer("/selector/matchLabels")
            .and_then(Value::as_object);
        let template_labels = spec
            .pointer("/template/metadata/labels")
            .and_then(Value::as_object);
        self.labels(&format!("{at}.template.metadata.labels"), template_labels);
        if let Some(ml) = selector
            && !ml
                .iter()
                .all(|(k, v)| template_labels.and_then(|t| t.get(k)) == Some(v))
        {
            self.push(Cause::invalid(
                format!("{at}.template.metadata.labels"),
                Value::Object(template_labels.cloned().unwrap_or_default()),
                "`selector` does not match template `labels`",
            ));
        }
        match spec.get("template").and_then(|t| t.get("spec")) {
            Some(pod) => self.pod_spec(&format!("{at}.template.spec"), pod),
            None => self.push(Cause::required(format!("{at}.template.spec"))),
        }
        let policy = spec
            .pointer("/template/spec/restartPolicy")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(policy, "OnFailure" | "Never") {
            self.push(Cause::unsupported(
                format!("{at}.template.spec.restartPolicy"),
                policy,
                &["OnFailure", "Never"],
            ));
        }
        if let Some(pfp) = spec.get("podFailurePolicy").filter(|v| !v.is_null()) {
            if policy == "OnFailure" {
                self.push(Cause::invalid(
                    format!("{at}.template.spec.restartPolicy"),
                    policy,
                    "only \"Never\" is supported when podFailurePolicy is specified",
                ));
            }
            self.pod_failure_policy(&format!("{at}.podFailurePolicy"), pfp);
        }
    }

    fn rules(&mut self, kind: &str, v: &Value) {
        let rules = v.get("rules").and_then(Value::as_array);
        for (i, r) in rules.into_iter().flatten().enumerate() {
            let at = format!("rules[{i}]");
            let non_empty = |k: &str| {
                r.get(k)
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            };
            if !non_empty("verbs") {
                self.push(Cause::required(format!("{at}.verbs")));
            }
            let urls = non_empty("nonResourceURLs");
            if urls && kind == "Role" {
                self.push(Cause::invalid(
                    format!("{at}.nonResourceURLs"),
                    "[...]",
                    "namespaced rules cannot apply to non-resource URLs",
                ));
            }
            if urls && (non_empty("resources") || non_empty("apiGroups")) {
                self.push(Cause::invalid(
                    format!("{at}.nonResourceURLs"),
                    "[...]",
                    "rules cannot apply to both regular resources and non-resource URLs",
                ));
            }
            if !urls && !non_empty("resources") {
                self.push(Cause::required(format!("{at}.resources")));
            }
            if !urls && r.get("apiGroups").and_then(Value::as_array).is_none() {
                self.push(Cause::required(format!("{at}.apiGroups")));
            }
        }
    }

    fn binding(&mut self, kind: &str, v: &Value) {
        let role_kind = v
            .pointer("/roleRef/kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let allowed: &[&str] = if kind == "RoleBinding" {
            &["Role", "ClusterRole"]
        } else {
            &["ClusterRole"]
        };
        if !allowed.contains(&role_kind) {
            self.push(Cause::unsupported("roleRef.kind", role_kind, allowed));
        }
        if v.pointer("/roleRef/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            self.push(Cause::required("roleRef.name"));
        }
        let subjects = v.get("subjects").and_then(Value::as_array);
        for (i, sub) in subjects.into_iter().flatten().enumerate() {
            let at = format!("subjects[{i}]");
            let str_of = |k: &str| sub.get(k).and_then(Value::as_str).unwrap_or_default();
            let sk = str_of("kind");
            if !["User", "Group", "ServiceAccount"].contains(&sk) {
                self.push(Cause::unsupported(
                    format!("{at}.kind"),
                    sk,
                    &["User", "Group", "ServiceAccount"],
                ));
            }
            if str_of("name").is_empty() {
                self.push(Cause::required(format!("{at}.name")));
            }
            if sk == "ServiceAccount"
                && kind == "ClusterRoleBinding"
                && str_of("namespace").is_empty()
            {
                self.push(Cause::required(format!("{at}.namespace")));
            }
        }
    }

    fn csr(&mut self, spec: &Value) {
        let request = spec
            .get("request")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if request.is_empty() {
            self.push(Cause::required("spec.request"));
        } else if crate::auth::csr::parse_request(request).is_err() {
            self.push(Cause::invalid(
                "spec.request",
                "<request>",
                "must be a PEM-encoded PKCS#10 certificate signing request",
            ));
        }
        if spec
            .get("signerName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            self.push(Cause::required("spec.signerName"));
        }
        if spec
            .get("usages")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            self.push(Cause::required("spec.usages"));
        }
    }
}

/// Settings validation depends on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub node_ports: (u16, u16),
}

/// Checks an object that is about to be stored.
pub fn validate(r: &Resource, v: &Value, limits: Limits) -> Result<(), ApiError> {
    let mut c = Check { causes: Vec::new() };
    let meta = v.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let label_named = matches!(r.kind, "Namespace" | "Service");
    // RBAC names are path segments (`system:node-bootstrapper`).
    let path_named = r.group == "rbac.authorization.k8s.io";
    if name.is_empty() {
        c.push(Cause::required("metadata.name"));
    } else if path_named {
        if name == "." || name == ".." || name.contains(['/', '%']) {
            c.push(Cause::invalid(
                "metadata.name",
                name,
                "may not be '.' or '..' and may not contain '/' or '%'",
            ));
        }
    } else if label_named && !is_dns_label(name) {
        c.push(Cause::invalid("metadata.name", name, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"));
    } else if !label_named && !is_dns_subdomain(name) {
        c.push(Cause::invalid("metadata.name", name, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"));
    }
    c.labels(
        "metadata.labels",
        meta.and_then(|m| m.get("labels"))
            .and_then(Value::as_object),
    );
    let spec = v.get("spec").cloned().unwrap_or(Value::Null);
    match (r.group, r.kind) {
        ("", "Pod") => c.pod_spec("spec", &spec),
        ("", "Service") => c.service(&spec, limits.node_ports),
        ("apps", kind @ ("Deployment" | "ReplicaSet" | "DaemonSet"))
        | ("", kind @ "ReplicationController") => c.workload(kind, &spec),
        ("", "PersistentVolumeClaim") => c.claim_spec("spec", &spec),
        ("", "PersistentVolume") => c.persistent_volume(&spec),
        ("", "ResourceQuota") => c.resource_quota(&spec),
        ("", "LimitRange") => c.limit_range(&spec),
        ("storage.k8s.io", "StorageClass") => c.storage_class(v),
        ("apps", "StatefulSet") => c.stateful_set(&spec),
        ("networking.k8s.io", "Ingress") => c.ingress(&spec),
        ("networking.k8s.io", "IngressClass") => c.ingress_class(&spec),
        ("batch", "Job") => {
            c.job("spec", &spec);
            if let Some(cause) = super::registry::job::selector_cause(v) {
                c.push(cause);
            }
        }
        ("autoscaling", "HorizontalPodAutoscaler") => c.autoscaler(&spec),
        ("batch", "CronJob") => {
            if name.len() > 52 {
                c.push(Cause::invalid(
                    "metadata.name",
                    name,
                    "must be no more than 52 characters",
                ));
            }
            c.cron_job(&spec);
        }
        ("", "ConfigMap" | "Secret") => {
            for field in ["data", "binaryData", "stringData"] {
                for k in v
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                {
                    let ok = !k.is_empty()
                        && k.len() <= 253
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    if !ok {
                        c.push(Cause::invalid(format!("{field}[{k}]"), k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"));
                    }
                }
            }
        }
        ("rbac.authorization.k8s.io", kind @ ("Role" | "ClusterRole")) => c.rules(kind, v),
        ("rbac.authorization.k8s.io", kind @ ("RoleBinding" | "ClusterRoleBinding")) => {
            c.binding(kind, v)
        }
        ("certificates.k8s.io", "CertificateSigningRequest") => c.csr(&spec),
        ("discovery.k8s.io", "EndpointSlice") => {
            let at = v
                .get("addressType")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !matches!(at, "IPv4" | "IPv6" | "FQDN") {
                c.push(Cause::unsupported(
                    "addressType",
                    at,
                    &["IPv4", "IPv6", "FQDN"],
                ));
            }
            for (i, e) in v
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                if e.get("addresses")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty)
                {
                    c.push(Cause::required(format!("endpoints[{i}].addresses")));
                }
            }
        }
        _ => {}
    }
    if c.causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(r.group, r.kind, name, c.causes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    const LIMITS: Limits = Limits {
        node_ports: (30000, 32767),
    };

    fn fields(r: Result<(), ApiError>) -> Vec<String> {
        r.err()
            .map(|e| e.causes().iter().map(|c| c.field.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn deployment_rules_name_fields() {
        let d = find("apps", "v1", "deployments").expect("deployments");
        let bad = json!({"metadata": {"name": "web"}, "spec": {"replicas": -1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "other"}}, "spec": {"containers": [{"name": "app"}]}}}});
        assert_eq!(
            fields(validate(d, &bad, LIMITS)),
            [
                "spec.replicas",
                "spec.template.metadata.labels",
                "spec.template.spec.containers[0].image"
            ]
        );
    }

    #[test]
    fn replication_controllers_default_their_selector_and_check_it() {
        let rc = find("", "v1", "replicationcontrollers").expect("rcs");
        let mut v = json!({"metadata": {"name": "web"}, "spec": {
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}});
        default(rc, &mut v);
        assert_eq!(v["spec"]["selector"], json!({"app": "web"}));
        assert_eq!(v["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(v["spec"]["replicas"], 1);
        assert_eq!(v["spec"]["template"]["spec"]["restartPolicy"], "Always");
        assert_eq!(fields(validate(rc, &v, LIMITS)), Vec::<String>::new());

        // A selector the template's labels do not carry, a restart policy
        // replicated pods cannot have, and a negative count.
        let mut bad = json!({"metadata": {"name": "web"}, "spec": {"replicas": -2,
            "selector": {"app": "other"},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}});
        default(rc, &mut bad);
        assert_eq!(
            fields(validate(rc, &bad, LIMITS)),
            [
                "spec.replicas",
                "spec.template.metadata.labels",
                "spec.template.spec.restartPolicy"
            ]
        );
        // No template: nothing to default the selector from.
        let mut empty = json!({"metadata": {"name": "web"}, "spec": {}});
        default(rc, &mut empty);
        assert_eq!(
            fields(validate(rc, &empty, LIMITS)),
            ["spec.selector", "spec.template"]
        );
    }

    #[test]
    fn job_rules_name_fields() {
        let jobs = find("batch", "v1", "jobs").expect("jobs");
        let mut bad = json!({"metadata": {"name": "j", "uid": "u"}, "spec": {
            "completionMode": "Indexed", "parallelism": -1,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [0]}},
                {"action": "Retry", "onPodConditions": [{"type": "DisruptionTarget"}],
                 "onExitCodes": {"operator": "NotIn", "values": [1]}},
            ]},
            "template": {"spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "busybox"}]}}}});
        super::super::registry::job::admit(&mut bad);
        default(jobs, &mut bad);
        assert_eq!(
            fields(validate(jobs, &bad, LIMITS)),
            [
                "spec.parallelism",
                "spec.completions",
                "spec.template.spec.restartPolicy",
                "spec.podFailurePolicy.rules[0].onExitCodes.values",
                "spec.podFailurePolicy.rules[1].action",
                "spec.podFailurePolicy.rules[1]",
            ]
        );
    }

    #[test]
    fn service_rules() {
        let s = find("", "v1", "services").expect("services");
        let mut bad = json!({"metadata": {"name": "Bad_Name"}, "spec": {"clusterIP": "10.96.0.999",
            "ports": [{"name": "a", "port": 70000}, {"name": "a", "port": 80, "nodePort": 31000}]}});
        default(s, &mut bad);
        assert_eq!(
            fields(validate(s, &bad, LIMITS)),
            [
                "metadata.name",
                "spec.ports[0].port",
                "spec.ports[1].name",
                "spec.ports[1].nodePort",
                "spec.clusterIP"
            ]
        );
        let mut good = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        default(s, &mut good);
        assert!(validate(s, &good, LIMITS).is_ok());
        assert_eq!(good["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(good["spec"]["type"], "ClusterIP");
    }

    #[test]
    fn decode_names_the_bad_field() {
        let d = find("apps", "v1", "deployments").expect("deployments");
        let err = decode(
            d,
            &json!({"metadata": {"name": "x"}, "spec": {"replicas": "three"}}),
        )
        .err()
        .map(|e| e.message)
        .unwrap_or_default();
        assert!(err.contains("spec.replicas"), "{err}");
    }

    #[test]
    fn pod_defaults() {
        let p = find("", "v1", "pods").expect("pods");
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}, {"name": "d", "image": "reg:5000/busybox:1.36"}]}});
        default(p, &mut pod);
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["status"]["phase"], "Pending");
        assert!(validate(p, &pod, LIMITS).is_ok());
    }
}
