//! Resources served at a second version: HorizontalPodAutoscalers are
//! stored as autoscaling/v2 and also served as autoscaling/v1 (what
//! `kubectl autoscale` writes). A v1 request is turned into v2 on the way
//! in and its answers (objects, lists, watch events) back into v1. As
//! upstream does, what v1 cannot say (other metrics, behavior, conditions,
//! current metrics) rides in `autoscaling.alpha.kubernetes.io/*`
//! annotations, so a v1 round trip loses nothing.

use std::convert::Infallible;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Map, Value, json};

use super::Body;
use super::objects::Served;
use crate::resources::Resource;

const METRICS: &str = "autoscaling.alpha.kubernetes.io/metrics";
const BEHAVIOR: &str = "autoscaling.alpha.kubernetes.io/behavior";
const CONDITIONS: &str = "autoscaling.alpha.kubernetes.io/conditions";
const CURRENT: &str = "autoscaling.alpha.kubernetes.io/current-metrics";

/// For a version served over another stored one: the stored resource and
/// how objects turn from one into the other.
pub(super) fn view_of(r: &Resource) -> Option<(&'static Resource, Served)> {
    let stored = r.stored_as()?;
    // HorizontalPodAutoscalers are the one such kind (`stored_as`).
    let served = Served {
        to_served: hpa_to_v1,
        to_stored: hpa_to_v2,
    };
    Some((stored, served))
}

fn is_cpu_utilization(m: &Value) -> bool {
    m["type"] == "Resource"
        && m.pointer("/resource/name") == Some(&json!("cpu"))
        && m.pointer("/resource/target/type") == Some(&json!("Utilization"))
}

fn annotations(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if !obj["metadata"]["annotations"].is_object() {
        obj["metadata"]["annotations"] = json!({});
    }
    obj["metadata"]["annotations"]
        .as_object_mut()
        .expect("an object was just put there")
}

/// An autoscaling/v2 HorizontalPodAutoscaler as autoscaling/v1; other
/// objects (Status, DeleteOptions) unchanged.
pub(super) fn hpa_to_v1(v2: &Value) -> Value {
    if v2["kind"] != "HorizontalPodAutoscaler" {
        return v2.clone();
    }
    let mut out = json!({
        "kind": "HorizontalPodAutoscaler",
        "apiVersion": "autoscaling/v1",
        "metadata": v2["metadata"].clone(),
        "spec": {
            "scaleTargetRef": v2.pointer("/spec/scaleTargetRef").cloned().unwrap_or(json!({})),
            "minReplicas": v2.pointer("/spec/minReplicas").cloned().unwrap_or(json!(1)),
            "maxReplicas": v2.pointer("/spec/maxReplicas").cloned().unwrap_or(json!(0)),
        },
        "status": {
            "currentReplicas": v2.pointer("/status/currentReplicas").cloned().unwrap_or(json!(0)),
            "desiredReplicas": v2.pointer("/status/desiredReplicas").cloned().unwrap_or(json!(0)),
        },
    });
    for (from, to) in [
        ("/status/observedGeneration", "observedGeneration"),
        ("/status/lastScaleTime", "lastScaleTime"),
    ] {
        if let Some(v) = v2.pointer(from) {
            out["status"][to] = v.clone();
        }
    }
    let metrics = v2
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (cpu, other): (Vec<Value>, Vec<Value>) = metrics.into_iter().partition(is_cpu_utilization);
    if let Some(u) = cpu
        .first()
        .and_then(|m| m.pointer("/resource/target/averageUtilization"))
    {
        out["spec"]["targetCPUUtilizationPercentage"] = u.clone();
    }
    let current = v2
        .pointer("/status/currentMetrics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(u) = current
        .iter()
        .find(|m| m.pointer("/resource/name") == Some(&json!("cpu")))
        .and_then(|m| m.pointer("/resource/current/averageUtilization"))
    {
        out["status"]["currentCPUUtilizationPercentage"] = u.clone();
    }
    let mut carry: Vec<(&str, Value)> = Vec::new();
    if !other.is_empty() {
        carry.push((METRICS, json!(other)));
    }
    if let Some(b) = v2.pointer("/spec/behavior").filter(|b| !b.is_null()) {
        carry.push((BEHAVIOR, b.clone()));
    }
    if let Some(c) = v2.pointer("/status/conditions").filter(|c| !c.is_null()) {
        carry.push((CONDITIONS, c.clone()));
    }
    if !current.is_empty() {
        carry.push((CURRENT, json!(current)));
    }
    for (k, v) in carry {
        annotations(&mut out).insert(k.into(), json!(v.to_string()));
    }
    out
}

/// An autoscaling/v1 HorizontalPodAutoscaler as autoscaling/v2; other
/// objects unchanged.
pub(super) fn hpa_to_v2(v1: &Value) -> Value {
    if v1["kind"] != "HorizontalPodAutoscaler" {
        return v1.clone();
    }
    let mut out = json!({
        "kind": "HorizontalPodAutoscaler",
        "apiVersion": "autoscaling/v2",
        "metadata": v1.get("metadata").cloned().unwrap_or(json!({})),
        "spec": {
            "scaleTargetRef": v1.pointer("/spec/scaleTargetRef").cloned().unwrap_or(json!({})),
            "maxReplicas": v1.pointer("/spec/maxReplicas").cloned().unwrap_or(json!(0)),
        },
    });
    if let Some(m) = v1.pointer("/spec/minReplicas") {
        out["spec"]["minReplicas"] = m.clone();
    }
    let carried = |key: &str| -> Option<Value> {
        v1.pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
    };
    let mut metrics: Vec<Value> = Vec::new();
    if let Some(u) = v1.pointer("/spec/targetCPUUtilizationPercentage") {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": u}}}));
    }
    if let Some(Value::Array(more)) = carried(METRICS) {
        metrics.extend(more.into_iter().filter(|m| !is_cpu_utilization(m)));
    }
    if !metrics.is_empty() {
        out["spec"]["metrics"] = json!(metrics);
    }
    if let Some(b) = carried(BEHAVIOR) {
        out["spec"]["behavior"] = b;
    }
    let mut status = v1.get("status").cloned().unwrap_or(json!({}));
    if let Some(s) = status.as_object_mut() {
        s.remove("currentCPUUtilizationPercentage");
        if let Some(c) = carried(CONDITIONS) {
            s.insert("conditions".into(), c);
        }
        if let Some(c) = carried(CURRENT) {
            s.insert("currentMetrics".into(), c);
        }
    }
    out["status"] = status;
    if let Some(a) = out
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        for k in [METRICS, BEHAVIOR, CONDITIONS, CURRENT] {
            a.remove(k);
        }
        if a.is_empty()
            && let Some(m) = out["metadata"].as_object_mut()
        {
            m.remove("annotations");
        }
    }
    out
}

/// A whole answer's object or list, in v1.
fn value_to_v1(v: &Value) -> Value {
    if v["kind"] == "HorizontalPodAutoscalerList" {
        let mut list = v.clone();
        list["apiVersion"] = json!("autoscaling/v1");
        if let Some(items) = list["items"].as_array_mut() {
            for i in items.iter_mut() {
                // List items carry no kind of their own.
                let mut item = i.clone();
                item["kind"] = json!("HorizontalPodAutoscaler");
                let mut one = hpa_to_v1(&item);
                if let Some(m) = one.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                *i = one;
            }
        }
        return list;
    }
    if let Some(obj) = v.get("object").filter(|_| v.get("type").is_some()) {
        let mut event = v.clone();
        event["object"] = hpa_to_v1(obj);
        return event;
    }
    hpa_to_v1(v)
}

fn convert_bytes(b: &[u8]) -> Bytes {
    match serde_json::from_slice::<Value>(b) {
        Ok(v) => {
            let mut out = serde_json::to_vec(&value_to_v1(&v)).unwrap_or_default();
            if b.ends_with(b"\n") {
                out.push(b'\n');
            }
            Bytes::from(out)
        }
        Err(_) => Bytes::copy_from_slice(b),
    }
}

/// An answer from the stored version, in v1: one JSON body, or a watch
/// stream of one event per frame.
pub(super) async fn response_to_v1(resp: Response<Body>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let streaming = parts.headers.get(http::header::TRANSFER_ENCODING).is_some()
        || hyper::body::Body::size_hint(&body).exact().is_none();
    if streaming {
        let frames = http_body_util::BodyStream::new(body);
        let mapped = futures::StreamExt::map(frames, |f| {
            let f = f.unwrap_or_else(|e| match e {});
            Ok::<_, Infallible>(match f.into_data() {
                Ok(b) => Frame::data(convert_bytes(&b)),
                Err(other) => other,
            })
        });
        return Response::from_parts(parts, StreamBody::new(mapped).boxed());
    }
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Full::new(convert_bytes(&bytes)).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_round_trip_without_loss() {
        let v2 = json!({
            "kind": "HorizontalPodAutoscaler", "apiVersion": "autoscaling/v2",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 5,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
                    {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "64Mi"}}},
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 5}},
            },
            "status": {"currentReplicas": 2, "desiredReplicas": 3,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 80}}}]},
        });
        let v1 = hpa_to_v1(&v2);
        assert_eq!(v1["apiVersion"], "autoscaling/v1");
        assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
        assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 80);
        assert!(v1["metadata"]["annotations"][METRICS].is_string());
        let back = hpa_to_v2(&v1);
        assert_eq!(back["spec"], v2["spec"]);
        assert_eq!(
            back["status"]["currentMetrics"],
            v2["status"]["currentMetrics"]
        );
        assert!(back["metadata"].get("annotations").is_none(), "{back}");
        // `kubectl autoscale`'s body: a CPU target only.
        let made = hpa_to_v2(
            &json!({"kind": "HorizontalPodAutoscaler", "apiVersion": "autoscaling/v1",
            "metadata": {"name": "web"}, "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"},
            "maxReplicas": 3, "targetCPUUtilizationPercentage": 50}}),
        );
        assert_eq!(
            made["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            50
        );
        // Anything else passes through.
        let status = json!({"kind": "Status", "code": 404});
        assert_eq!(hpa_to_v1(&status), status);
    }
}
