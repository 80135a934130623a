//! HorizontalPodAutoscaler (autoscaling/v2): every sync period, sets its
//! target's scale from the pods' resource metrics (`metrics.k8s.io`) by
//! upstream's algorithm.
//! - Each metric asks for `ceil(ready pods × usage / target)` replicas.
//!   Within the 10 % tolerance, it asks for the current count.
//! - Pods without metrics count as using the whole target when scaling
//!   down and nothing when scaling up. Pods not yet Ready count as using
//!   nothing when scaling up. If that turns the direction around, or
//!   brings it within tolerance, the count stays.
//! - The largest ask wins. The stabilization window then holds it to the
//!   highest (scaling down) or lowest (scaling up) ask within the window,
//!   and the behavior's policies limit how fast it moves. It is finally
//!   kept within `minReplicas`..`maxReplicas`.
//! - The status has upstream's conditions (AbleToScale, ScalingActive,
//!   ScalingLimited) and current metrics. A rescale is recorded as an
//!   event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::{
    HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler, MetricSpec,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::events::{Said, about, record};
use crate::informer::{next_pass, ready, reflect};
use crate::meta::{name_of, now, ns_of};
use crate::quantity::parse_quantity;
use crate::selector::LabelSelector;

const TOLERANCE: f64 = 0.1;
const COMPONENT: &str = "horizontal-pod-autoscaler";
/// Within this time of its start a pod may still be warming up: its CPU
/// counts only once a whole metric window follows its turning Ready
/// (upstream's CPU initialization period).
const CPU_INITIALIZATION: Duration = Duration::from_secs(300);

/// A pod's usage of one resource, and when and over how long it was
/// measured.
#[derive(Clone, Copy, Debug)]
struct Usage {
    value: f64,
    at: jiff::Timestamp,
    window: Duration,
}

pub async fn run(client: Client, sync_period: Duration) {
    let notify = Arc::new(Notify::new());
    let (hpas, _a) = reflect(
        Api::<HorizontalPodAutoscaler>::all(client.clone()),
        notify.clone(),
    );
    let (pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&hpas).await;
    ready(&pods).await;
    let mut memory: HashMap<String, History> = HashMap::new();
    let mut last_run = Instant::now() - sync_period;
    loop {
        next_pass("horizontal-pod-autoscaler", &notify, sync_period).await;
        // Metrics move at their own pace: passes come once a sync period.
        let since = last_run.elapsed();
        if since < sync_period {
            tokio::time::sleep(sync_period - since).await;
        }
        last_run = Instant::now();
        let all_pods = pods.state();
        let live: Vec<String> = hpas
            .state()
            .iter()
            .filter_map(|h| h.metadata.uid.clone())
            .collect();
        memory.retain(|k, _| live.contains(k));
        for hpa in hpas.state() {
            let uid = hpa.metadata.uid.clone().unwrap_or_default();
            let h = memory.entry(uid).or_default();
            reconcile(&client, &hpa, &all_pods, h).await;
        }
    }
}

/// What an autoscaler remembers: its recent recommendations and rescales.
#[derive(Default)]
pub(crate) struct History {
    recommendations: Vec<(Instant, i32)>,
    /// Rescales: when, and by how many replicas (negative: down).
    scales: Vec<(Instant, i32)>,
}

/// A metric's ask and what status reports of it.
struct Ask {
    replicas: i32,
    current: Value,
    name: String,
}

/// `ceil(ready × usage ratio)` with upstream's rules for pods without
/// metrics (`missing`) and pods not yet ready (`unready`, which only
/// count when the resource is CPU).
pub(crate) fn replicas_for(
    current: i32,
    ratio: f64,
    ready: usize,
    missing: usize,
    unready: usize,
    rebalance: impl Fn(usize, usize) -> f64,
) -> i32 {
    if missing == 0 && unready == 0 {
        if (ratio - 1.0).abs() <= TOLERANCE {
            return current;
        }
        return (ratio * ready as f64).ceil() as i32;
    }
    let up = ratio > 1.0;
    // Missing pods use the whole target going down and nothing going
    // up; unready ones nothing, and only going up.
    let new_ratio = rebalance(missing, if up { unready } else { 0 });
    if (new_ratio - 1.0).abs() <= TOLERANCE || (up != (new_ratio > 1.0)) {
        return current;
    }
    let counted = ready + missing + if up { unready } else { 0 };
    let asked = (new_ratio * counted as f64).ceil() as i32;
    // The second pass may not move further than the first in either
    // direction.
    if (up && asked < current) || (!up && asked > current) {
        current
    } else {
        asked
    }
}

fn default_up() -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(0),
        select_policy: Some("Max".into()),
        policies: Some(vec![
            HPAScalingPolicy {
                type_: "Pods".into(),
                value: 4,
                period_seconds: 15,
            },
            HPAScalingPolicy {
                type_: "Percent".into(),
                value: 100,
                period_seconds: 15,
            },
        ]),
        tolerance: None,
    }
}

fn default_down() -> HPAScalingRules {
    HPAScalingRules {
        stabilization_window_seconds: Some(300),
        select_policy: Some("Max".into()),
        policies: Some(vec![HPAScalingPolicy {
            type_: "Percent".into(),
            value: 100,
            period_seconds: 15,
        }]),
        tolerance: None,
    }
}

/// The rules a behavior gives, with upstream's defaults filled in.
fn rules(given: Option<&HPAScalingRules>, default: HPAScalingRules) -> HPAScalingRules {
    let Some(g) = given else { return default };
    HPAScalingRules {
        stabilization_window_seconds: g
            .stabilization_window_seconds
            .or(default.stabilization_window_seconds),
        select_policy: g.select_policy.clone().or(default.select_policy),
        policies: g.policies.clone().or(default.policies),
        tolerance: None,
    }
}

/// Replicas changed by rescales within the last `period` seconds: (added,
/// removed).
fn changed_within(scales: &[(Instant, i32)], period: i32, now: Instant) -> (i32, i32) {
    let window = Duration::from_secs(u64::try_from(period.max(0)).unwrap_or(0));
    scales
        .iter()
        .filter(|(at, _)| now.duration_since(*at) < window)
        .fold((0, 0), |(up, down), (_, d)| {
            if *d > 0 {
                (up + d, down)
            } else {
                (up, down - d)
            }
        })
}

/// How far `rules` let the count move from `current` (upstream's scale
/// limits): the highest allowed going up, the lowest going down.
pub(crate) fn limit(
    current: i32,
    up: bool,
    rules: &HPAScalingRules,
    scales: &[(Instant, i32)],
    now: Instant,
) -> i32 {
    let select = rules.select_policy.as_deref().unwrap_or("Max");
    if select == "Disabled" {
        return current;
    }
    // "Max" picks the policy allowing the largest change.
    let largest = select != "Min";
    let mut out: Option<i32> = None;
    for p in rules.policies.iter().flatten() {
        let (added, removed) = changed_within(scales, p.period_seconds, now);
        let start = current - added + removed;
        let proposed = match (p.type_.as_str(), up) {
            ("Pods", true) => start + p.value,
            ("Percent", true) => {
                (f64::from(start) * (1.0 + f64::from(p.value) / 100.0)).ceil() as i32
            }
            ("Pods", false) => start - p.value,
            (_, false) => (f64::from(start) * (1.0 - f64::from(p.value) / 100.0)) as i32,
            _ => continue,
        };
        out = Some(match out {
            None => proposed,
            Some(o) if up == largest => o.max(proposed),
            Some(o) => o.min(proposed),
        });
    }
    out.unwrap_or(current)
}

/// The count after stabilization and rate limits, kept within min..max,
/// and the ScalingLimited reason and message.
#[allow(clippy::too_many_arguments)]
pub(crate) fn normalize(
    asked: i32,
    current: i32,
    min: i32,
    max: i32,
    up_rules: &HPAScalingRules,
    down_rules: &HPAScalingRules,
    h: &mut History,
    now: Instant,
) -> (i32, &'static str, &'static str) {
    let window = |r: &HPAScalingRules| {
        Duration::from_secs(
            u64::try_from(r.stabilization_window_seconds.unwrap_or(0).max(0)).unwrap_or(0),
        )
    };
    let (up_w, down_w) = (window(up_rules), window(down_rules));
    let mut up_rec = asked;
    let mut down_rec = asked;
    for (at, r) in &h.recommendations {
        let age = now.duration_since(*at);
        if age < up_w {
            up_rec = up_rec.min(*r);
        }
        if age < down_w {
            down_rec = down_rec.max(*r);
        }
    }
    let keep = up_w.max(down_w);
    h.recommendations
        .retain(|(at, _)| now.duration_since(*at) < keep);
    h.recommendations.push((now, asked));
    let mut desired = current;
    if desired < up_rec {
        desired = up_rec;
    }
    if desired > down_rec {
        desired = down_rec;
    }
    if desired > current {
        let cap = limit(current, true, up_rules, &h.scales, now).max(current);
        let (allowed, reason, message) = if max > cap {
            (
                cap,
                "ScaleUpLimit",
                "the desired replica count is increasing faster than the maximum scale rate",
            )
        } else {
            (
                max,
                "TooManyReplicas",
                "the desired replica count is more than the maximum replica count",
            )
        };
        if desired > allowed {
            return (allowed, reason, message);
        }
    } else if desired < current {
        let floor = limit(current, false, down_rules, &h.scales, now).min(current);
        let (allowed, reason, message) = if min < floor {
            (
                floor,
                "ScaleDownLimit",
                "the desired replica count is decreasing faster than the maximum scale rate",
            )
        } else {
            (
                min,
                "TooFewReplicas",
                "the desired replica count is less than the minimum replica count",
            )
        };
        if desired < allowed {
            return (allowed, reason, message);
        }
    }
    (
        desired,
        "DesiredWithinRange",
        "the desired count is within the acceptable range",
    )
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, old: &[Value]) -> Value {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c["type"] == kind && c["status"] == status)
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now()));
    json!({"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
}

/// The pods' usage of `resource` against the metric's target: each
/// metric's ask, or why there is none.
fn ask(
    metric: &MetricSpec,
    current: i32,
    pods: &[&Pod],
    usage: &HashMap<String, Usage>,
) -> Result<Ask, (&'static str, String)> {
    let Some(res) = metric
        .resource
        .as_ref()
        .filter(|_| metric.type_ == "Resource")
    else {
        return Err((
            "InvalidMetricSourceType",
            format!("the HPA does not support metric type {}", metric.type_),
        ));
    };
    let name = res.name.as_str();
    let cpu = name == "cpu";
    let now = jiff::Timestamp::now();
    let mut ready = Vec::new();
    let (mut missing, mut unready) = (0usize, 0usize);
    for p in pods {
        let pname = name_of(&p.metadata);
        let metric = usage.get(pname);
        if cpu && warming_up(p, metric, now) {
            unready += 1;
            continue;
        }
        match metric {
            Some(u) => ready.push((*p, u.value)),
            None => missing += 1,
        }
    }
    if ready.is_empty() {
        return Err((
            "FailedGetResourceMetric",
            format!(
                "failed to get {name} utilization: did not receive metrics for targeted pods (pods might be unready)"
            ),
        ));
    }
    let request = |p: &Pod| -> Result<f64, String> {
        let mut sum = 0.0;
        for c in &p
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
        {
            let q = c
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(name))
                .and_then(|q| parse_quantity(&q.0));
            match q {
                Some(v) => sum += v,
                None => {
                    return Err(format!(
                        "missing request for {name} in container {} of Pod {}",
                        c.name,
                        name_of(&p.metadata)
                    ));
                }
            }
        }
        Ok(sum)
    };
    let total_usage: f64 = ready.iter().map(|(_, u)| *u).sum();
    let target = res.target.clone();
    if target.type_ == "Utilization" {
        let want = f64::from(target.average_utilization.unwrap_or(80)) / 100.0;
        let mut requests: HashMap<&str, f64> = HashMap::new();
        for p in pods {
            let r = request(p).map_err(|e| {
                (
                    "FailedGetResourceMetric",
                    format!("failed to get {name} utilization: {e}"),
                )
            })?;
            requests.insert(name_of(&p.metadata), r);
        }
        let total_req: f64 = ready
            .iter()
            .map(|(p, _)| requests[name_of(&p.metadata)])
            .sum();
        if total_req <= 0.0 {
            return Err((
                "FailedGetResourceMetric",
                format!("failed to get {name} utilization: no requests"),
            ));
        }
        let utilization = total_usage / total_req;
        let ratio = utilization / want;
        // Refilled: missing pods at the target (down) or nothing (up),
        // unready ones at nothing.
        let refill = |missing_n: usize, unready_n: usize| {
            let avg_req = total_req / ready.len() as f64;
            let filled_usage = total_usage
                + if ratio < 1.0 {
                    missing_n as f64 * avg_req * want
                } else {
                    0.0
                };
            let filled_req = total_req + (missing_n + unready_n) as f64 * avg_req;
            (filled_usage / filled_req) / want
        };
        let replicas = replicas_for(current, ratio, ready.len(), missing, unready, refill);
        let percent = (utilization * 100.0).round() as i64;
        Ok(Ask {
            replicas,
            name: format!("{name} resource utilization (percentage of request)"),
            current: json!({"type": "Resource", "resource": {"name": name, "current": {
                "averageUtilization": percent,
                "averageValue": quantity(name, total_usage / ready.len() as f64),
            }}}),
        })
    } else {
        let want = target
            .average_value
            .as_ref()
            .and_then(|q| parse_quantity(&q.0))
            .filter(|v| *v > 0.0)
            .ok_or((
                "FailedGetResourceMetric",
                format!("invalid target value for {name}"),
            ))?;
        let avg = total_usage / ready.len() as f64;
        let ratio = avg / want;
        let refill = |missing_n: usize, unready_n: usize| {
            let filled = total_usage
                + if ratio < 1.0 {
                    missing_n as f64 * want
                } else {
                    0.0
                };
            (filled / (ready.len() + missing_n + unready_n) as f64) / want
        };
        let replicas = replicas_for(current, ratio, ready.len(), missing, unready, refill);
        Ok(Ask {
            replicas,
            name: format!("{name} resource"),
            current: json!({"type": "Resource", "resource": {"name": name, "current": {
                "averageValue": quantity(name, avg),
            }}}),
        })
    }
}

/// Upstream's test for a pod whose CPU is not yet to be trusted: not
/// Ready, or, early in its life, measured before a whole window had passed
/// since it turned Ready.
fn warming_up(p: &Pod, metric: Option<&Usage>, now: jiff::Timestamp) -> bool {
    let status = p.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let (Some(ready), Some(start)) = (ready, status.and_then(|s| s.start_time.as_ref())) else {
        return true;
    };
    let young = now.duration_since(start.0).unsigned_abs() < CPU_INITIALIZATION;
    if !young {
        return ready.status == "False";
    }
    if ready.status != "True" {
        return true;
    }
    match (metric, ready.last_transition_time.as_ref()) {
        (Some(m), Some(since)) => {
            let settled = since.0 + jiff::SignedDuration::try_from(m.window).unwrap_or_default();
            m.at < settled
        }
        _ => false,
    }
}

/// A usage as the API writes it: CPU in millicores, memory in bytes.
fn quantity(resource: &str, v: f64) -> String {
    if resource == "cpu" {
        format!("{}m", (v * 1000.0).round() as i64)
    } else {
        format!("{}", v.round() as i64)
    }
}

/// Each pod's summed container usage of `resource`, by pod name.
/// The pods' metrics matching `selector`, read once per pass for every
/// metric of the autoscaler.
async fn pod_metrics(client: &Client, ns: &str, selector: &str) -> Vec<DynamicObject> {
    let ar = ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    match api.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list.items,
        Err(e) => {
            warn!(namespace = ns, error = %e, "reading pod metrics failed");
            Vec::new()
        }
    }
}

/// Each pod's summed container usage of `resource`, by pod name.
fn pod_usage(metrics: &[DynamicObject], resource: &str) -> HashMap<String, Usage> {
    let mut out = HashMap::new();
    for m in metrics {
        let value: f64 = m.data["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                c.pointer(&format!("/usage/{resource}"))
                    .and_then(Value::as_str)
            })
            .filter_map(parse_quantity)
            .sum();
        let at = m.data["timestamp"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(jiff::Timestamp::now);
        let window = m.data["window"]
            .as_str()
            .and_then(|w| w.strip_suffix('s'))
            .and_then(|w| w.parse::<f64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        let name = m.metadata.name.clone().unwrap_or_default();
        out.insert(name, Usage { value, at, window });
    }
    out
}

async fn reconcile(
    client: &Client,
    hpa: &HorizontalPodAutoscaler,
    all_pods: &[Arc<Pod>],
    h: &mut History,
) {
    let (name, ns) = (name_of(&hpa.metadata), ns_of(&hpa.metadata));
    let spec = &hpa.spec;
    let old: Vec<Value> = hpa
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        })
        .unwrap_or_default();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    let target = &spec.scale_target_ref;
    let api_version = target.api_version.clone().unwrap_or_else(|| "v1".into());
    let write = |status: Value| {
        let hpas = hpas.clone();
        async move { crate::informer::write_status(&hpas, name, status).await }
    };
    let Some(r) = crate::resources::by_kind(&api_version, &target.kind).filter(|r| r.scale) else {
        let msg = format!(
            "the HPA controller was unable to get the target's current scale: no scale subresource for {api_version}/{}",
            target.kind
        );
        write(
            json!({"conditions": [condition("AbleToScale", false, "FailedGetScale", &msg, &old)]}),
        )
        .await;
        return;
    };
    let ar = ApiResource {
        group: r.group.into(),
        version: r.version.into(),
        api_version: r.api_version(),
        kind: r.kind.into(),
        plural: r.plural.into(),
    };
    let targets: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let scale = match targets.get_scale(&target.name).await {
        Ok(s) => s,
        Err(e) => {
            let msg =
                format!("the HPA controller was unable to get the target's current scale: {e}");
            write(json!({"conditions": [condition("AbleToScale", false, "FailedGetScale", &msg, &old)]})).await;
            return;
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let status_replicas = scale.status.as_ref().map_or(0, |s| s.replicas);
    let selector_text = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    let instant = Instant::now();

    let mut conds = Vec::new();
    let mut current_metrics = Vec::new();
    let (desired, reason) = if current == 0 && min != 0 {
        conds.push(condition(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
            &old,
        ));
        (0, String::new())
    } else if current > max {
        (
            max,
            "Current number of replicas above Spec.MaxReplicas".to_string(),
        )
    } else if current < min {
        (
            min,
            "Current number of replicas below Spec.MinReplicas".to_string(),
        )
    } else {
        let selector = LabelSelector::parse(&selector_text).ok();
        let pods: Vec<&Pod> = all_pods
            .iter()
            .filter(|p| ns_of(&p.metadata) == ns)
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Failed"))
            .filter(|p| {
                let labels = serde_json::to_value(&p.metadata.labels).ok();
                selector
                    .as_ref()
                    .is_some_and(|s| s.matches(labels.as_ref().and_then(Value::as_object)))
            })
            .map(|p| p.as_ref())
            .collect();
        let metrics = spec.metrics.clone().unwrap_or_default();
        let mut best: Option<Ask> = None;
        let mut failure: Option<(&'static str, String)> = None;
        let read = pod_metrics(client, ns, &selector_text).await;
        for m in &metrics {
            let resource = m.resource.as_ref().map_or("cpu", |r| r.name.as_str());
            let usage = pod_usage(&read, resource);
            match ask(m, current, &pods, &usage) {
                Ok(a) => {
                    current_metrics.push(a.current.clone());
                    if best.as_ref().is_none_or(|b| a.replicas > b.replicas) {
                        best = Some(a);
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        match best {
            None => {
                let (reason, msg) =
                    failure.unwrap_or(("FailedGetResourceMetric", "no metrics".into()));
                conds.push(condition(
                    "AbleToScale",
                    true,
                    "SucceededGetScale",
                    "the HPA controller was able to get the target's current scale",
                    &old,
                ));
                conds.push(condition("ScalingActive", false, reason, &msg, &old));
                write(json!({
                    "currentReplicas": status_replicas,
                    "desiredReplicas": current,
                    "currentMetrics": if current_metrics.is_empty() { Value::Null } else { json!(current_metrics) },
                    "conditions": conds,
                    "observedGeneration": hpa.metadata.generation,
                }))
                .await;
                let about = about(hpa);
                let said = Said {
                    warning: true,
                    reason,
                    message: &msg,
                    action: "",
                };
                record(client, COMPONENT, about, said);
                return;
            }
            Some(a) => {
                conds.push(condition(
                    "ScalingActive",
                    true,
                    "ValidMetricFound",
                    &format!(
                        "the HPA was able to successfully calculate a replica count from {}",
                        a.name
                    ),
                    &old,
                ));
                let behavior = spec.behavior.as_ref();
                let up = rules(behavior.and_then(|b| b.scale_up.as_ref()), default_up());
                let down = rules(behavior.and_then(|b| b.scale_down.as_ref()), default_down());
                let (n, why, message) =
                    normalize(a.replicas, current, min, max, &up, &down, h, instant);
                conds.push(condition(
                    "ScalingLimited",
                    why != "DesiredWithinRange",
                    why,
                    message,
                    &old,
                ));
                let direction = if n > current { "above" } else { "below" };
                (n, format!("{} {direction} target", a.name))
            }
        }
    };

    let mut last_scale = hpa
        .status
        .as_ref()
        .and_then(|s| s.last_scale_time.as_ref())
        .map(|t| t.0.to_string());
    let rescale = desired != current && !(current == 0 && min != 0);
    if rescale {
        let patch = json!({"spec": {"replicas": desired}});
        match targets
            .patch_scale(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                h.scales.push((instant, desired - current));
                h.scales
                    .retain(|(at, _)| instant.duration_since(*at) < Duration::from_secs(3600));
                last_scale = Some(now());
                let msg = format!("New size: {desired}; reason: {reason}");
                info!(hpa = %format!("{ns}/{name}"), from = current, to = desired, "rescaled");
                conds.insert(
                    0,
                    condition(
                        "AbleToScale",
                        true,
                        "SucceededRescale",
                        &format!(
                            "the HPA controller was able to update the target scale to {desired}"
                        ),
                        &old,
                    ),
                );
                let said = Said {
                    warning: false,
                    reason: "SuccessfulRescale",
                    message: &msg,
                    action: "",
                };
                record(client, COMPONENT, about(hpa), said);
            }
            Err(e) => {
                warn!(hpa = %format!("{ns}/{name}"), error = %e, "rescale failed");
                conds.insert(
                    0,
                    condition(
                        "AbleToScale",
                        false,
                        "FailedUpdateScale",
                        &format!("the HPA controller was unable to update the target scale: {e}"),
                        &old,
                    ),
                );
            }
        }
    } else {
        conds.insert(
            0,
            condition(
                "AbleToScale",
                true,
                "ReadyForNewScale",
                "recommended size matches current size",
                &old,
            ),
        );
    }
    write(json!({
        "currentReplicas": status_replicas,
        "desiredReplicas": desired,
        "currentMetrics": if current_metrics.is_empty() { Value::Null } else { json!(current_metrics) },
        "lastScaleTime": last_scale,
        "conditions": conds,
        "observedGeneration": hpa.metadata.generation,
    }))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_rules_of_upstream() {
        let none = |_: usize, _: usize| 0.0;
        // 3 pods at twice the target: 6.
        assert_eq!(replicas_for(3, 2.0, 3, 0, 0, none), 6);
        // Within tolerance: unchanged.
        assert_eq!(replicas_for(3, 1.05, 3, 0, 0, none), 3);
        // Half the target: down to 2 (ceil 1.5).
        assert_eq!(replicas_for(3, 0.5, 3, 0, 0, none), 2);
        // Missing pods turn a small rise into no change.
        assert_eq!(replicas_for(4, 1.2, 2, 2, 0, |_, _| 0.6), 4);
        // Or keep a large rise, counted over every pod.
        assert_eq!(replicas_for(4, 3.0, 2, 2, 0, |_, _| 1.5), 6);
    }

    fn policy(t: &str, value: i32, period: i32) -> HPAScalingPolicy {
        HPAScalingPolicy {
            type_: t.into(),
            value,
            period_seconds: period,
        }
    }

    #[test]
    fn rate_limits_and_stabilization() {
        let now = Instant::now();
        let up = default_up();
        // From 1: 4 pods or 100 % per 15 s, the larger: 5.
        assert_eq!(limit(1, true, &up, &[], now), 5);
        // From 10 having just added 6: start at 4 → max(8, 8).
        assert_eq!(limit(10, true, &up, &[(now, 6)], now), 8);
        let down = HPAScalingRules {
            policies: Some(vec![policy("Pods", 1, 60)]),
            ..default_down()
        };
        assert_eq!(limit(5, false, &down, &[], now), 4);

        let mut h = History::default();
        let fast_down = HPAScalingRules {
            stabilization_window_seconds: Some(0),
            ..default_down()
        };
        // Up to the max, limited.
        assert_eq!(normalize(20, 2, 1, 10, &up, &fast_down, &mut h, now).0, 6);
        assert_eq!(
            normalize(20, 6, 1, 10, &up, &fast_down, &mut h, now).1,
            "TooManyReplicas"
        );
        // A 300 s window holds the highest recent ask.
        let mut h = History::default();
        let slow = default_down();
        assert_eq!(normalize(8, 8, 1, 10, &up, &slow, &mut h, now).0, 8);
        assert_eq!(normalize(2, 8, 1, 10, &up, &slow, &mut h, now).0, 8);
        let mut h = History::default();
        assert_eq!(normalize(8, 8, 1, 10, &up, &fast_down, &mut h, now).0, 8);
        assert_eq!(normalize(2, 8, 1, 10, &up, &fast_down, &mut h, now).0, 2);
        assert_eq!(
            normalize(0, 2, 1, 10, &up, &fast_down, &mut h, now),
            (
                1,
                "TooFewReplicas",
                "the desired replica count is less than the minimum replica count"
            )
        );
    }
}
