//! Job (batch/v1): runs pods from its template until enough of them
//! succeed (`completions`, or each index once in Indexed mode), at most
//! `parallelism` at a time. A Job fails past `backoffLimit` failures or
//! after `activeDeadlineSeconds`, and is deleted `ttlSecondsAfterFinished`
//! after it finished. `suspend` deletes its running pods until resumed.
//!
//! Pods are counted the way upstream counts them, so that a pod is counted
//! exactly once even when it is deleted right after it ends. Every pod it
//! makes carries the `batch.kubernetes.io/job-tracking` finalizer. A
//! finished pod's uid is first written to `status.uncountedTerminatedPods`,
//! then its finalizer is removed, and only then does the uid move into the
//! `succeeded` or `failed` count. A pod deleted while it runs counts as
//! failed. Pods the controller deletes itself (suspend, scale-down, a
//! finished Job) lose the finalizer first and are not counted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{Job, PodFailurePolicy};
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodTemplateSpec};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::replicaset::{
    Expectations, delete_pods, deletion_order, pod_from_template, pods_by_owner,
};
use crate::events::{Said, about, normal, record};
use crate::informer::{Wake, in_parallel, next_pass, ready, reflect};
use crate::meta::{controller_of, is_active, is_ready, name_of, now, ns_of, owner_ref};

const TRACKING: &str = "batch.kubernetes.io/job-tracking";
const COMPONENT: &str = "job-controller";
const INDEX: &str = "batch.kubernetes.io/job-completion-index";
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(360);

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (jobs, _a) = reflect(Api::<Job>::all(client.clone()), notify.clone());
    let (pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    ready(&jobs).await;
    ready(&pods).await;
    let mut st = State::default();
    let mut wake = Wake::default();
    loop {
        next_pass("job", &notify, Duration::from_secs(10)).await;
        let all_pods = pods.state();
        let by_owner = pods_by_owner(&all_pods);
        let all_jobs = jobs.state();
        for job in &all_jobs {
            let uid = job.metadata.uid.clone().unwrap_or_default();
            let owned = by_owner.get(&uid).cloned().unwrap_or_default();
            if let Some(left) = reconcile(&client, job, &owned, &mut st).await {
                wake.after(&notify, left);
            }
        }
        // Pods whose Job is gone keep no finalizer of ours.
        let live: HashSet<&str> = all_jobs
            .iter()
            .filter_map(|j| j.metadata.uid.as_deref())
            .collect();
        let orphans: Vec<Arc<Pod>> = all_pods
            .iter()
            .filter(|p| tracked(p))
            .filter(|p| {
                controller_of(&p.metadata).is_none_or(|o| {
                    o.kind == "Job" && o.api_version == "batch/v1" && !live.contains(o.uid.as_str())
                })
            })
            .cloned()
            .collect();
        if !orphans.is_empty() {
            untrack(&client, &orphans).await;
        }
    }
}

/// What the controller remembers between passes.
#[derive(Default)]
struct State {
    exp: Expectations,
    /// When each Job's newest counted failure was seen, for the back-off.
    last_failure: HashMap<String, Instant>,
}

fn tracked(p: &Pod) -> bool {
    p.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == TRACKING))
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// Upstream's "failed" for counting: it failed, or, unless only failed
/// pods count (a pod failure policy), it was deleted before it succeeded.
fn failed(p: &Pod, only_failed: bool) -> bool {
    phase(p) == "Failed"
        || (!only_failed && p.metadata.deletion_timestamp.is_some() && phase(p) != "Succeeded")
}

/// The first rule of the pod failure policy a failed pod matches: its
/// action and upstream's message for it.
fn policy_match(policy: &PodFailurePolicy, p: &Pod) -> Option<(String, String)> {
    let (ns, pod) = (ns_of(&p.metadata), name_of(&p.metadata));
    let status = p.status.as_ref();
    for (i, rule) in policy.rules.iter().enumerate() {
        if let Some(codes) = &rule.on_exit_codes {
            let statuses = status
                .and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten()
                .filter(|c| codes.container_name.as_ref().is_none_or(|n| *n == c.name));
            for c in statuses {
                let Some(code) = c
                    .state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| t.exit_code)
                else {
                    continue;
                };
                let listed = codes.values.contains(&code);
                let hit = match codes.operator.as_str() {
                    "In" => listed,
                    "NotIn" => !listed && code != 0,
                    _ => false,
                };
                if hit {
                    let msg = format!(
                        "Container {} for pod {ns}/{pod} failed with exit code {code} matching {} rule at index {i}",
                        c.name, rule.action
                    );
                    return Some((rule.action.clone(), msg));
                }
            }
        }
        for pattern in rule.on_pod_conditions.iter().flatten() {
            let want = pattern.status.as_deref().unwrap_or("True");
            let has = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == pattern.type_ && c.status == want)
                });
            if has {
                let msg = format!(
                    "Pod {ns}/{pod} has condition {} matching {} rule at index {i}",
                    pattern.type_, rule.action
                );
                return Some((rule.action.clone(), msg));
            }
        }
    }
    None
}

fn index_of(p: &Pod) -> Option<i64> {
    p.metadata.annotations.as_ref()?.get(INDEX)?.parse().ok()
}

/// `0-2,4` → {0, 1, 2, 4}.
pub(crate) fn parse_indexes(s: &str) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(i) = part.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// {0, 1, 2, 4} → `0-2,4`, as upstream writes `completedIndexes`.
pub(crate) fn format_indexes(set: &BTreeSet<i64>) -> String {
    let mut parts = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// The pod for `index` (Indexed mode) or for any slot: the template with
/// the tracking finalizer, and in Indexed mode the index as annotation,
/// label, hostname and `JOB_COMPLETION_INDEX`.
fn job_pod(job: &Job, template: &PodTemplateSpec, index: Option<i64>) -> Option<Pod> {
    let ns = ns_of(&job.metadata);
    let name = name_of(&job.metadata);
    let mut pod = pod_from_template(template, owner_ref(job)?, ns, None);
    pod.metadata.finalizers = Some(vec![TRACKING.to_string()]);
    if let Some(i) = index {
        pod.metadata.generate_name = Some(format!("{name}-{i}-"));
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(INDEX.into(), i.to_string());
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert(INDEX.into(), i.to_string());
        let spec = pod.spec.get_or_insert_default();
        if spec.hostname.is_none() {
            spec.hostname = Some(format!("{name}-{i}"));
        }
        let env = EnvVar {
            name: "JOB_COMPLETION_INDEX".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{INDEX}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let inits = spec.init_containers.iter_mut().flatten();
        for c in spec.containers.iter_mut().chain(inits) {
            c.env.get_or_insert_default().push(env.clone());
        }
    }
    Some(pod)
}

/// Removes the tracking finalizer from each pod; whether all went.
async fn untrack(client: &Client, pods: &[Arc<Pod>]) -> bool {
    // Built before the first await: iterator closures held across it
    // would not be Send.
    let ops: Vec<_> = pods
        .iter()
        .filter(|p| tracked(p))
        .map(|p| {
            let api: Api<Pod> = Api::namespaced(client.clone(), ns_of(&p.metadata));
            let left: Vec<&String> = p
                .metadata
                .finalizers
                .iter()
                .flatten()
                .filter(|f| *f != TRACKING)
                .collect();
            // The resourceVersion makes a concurrent change of the list a
            // conflict, retried on the next pass, instead of a lost update.
            let patch = json!({"metadata": {
                "finalizers": if left.is_empty() { Value::Null } else { json!(left) },
                "resourceVersion": p.metadata.resource_version,
            }});
            let name = name_of(&p.metadata).to_string();
            async move {
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 404 => true,
                    Err(e) => {
                        warn!(pod = %name, error = %e, "removing the job-tracking finalizer failed");
                        false
                    }
                }
            }
        })
        .collect();
    in_parallel(16, ops).await == 0
}

/// Deletes pods the Job no longer wants, uncounted: finalizer first.
async fn remove(client: &Client, job: &Job, pods: Vec<Arc<Pod>>, exp: &mut Expectations) {
    if pods.is_empty() {
        return;
    }
    let uid = job.metadata.uid.clone().unwrap_or_default();
    untrack(client, &pods).await;
    for p in &pods {
        exp.deleted(&uid, name_of(&p.metadata).to_string());
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), ns_of(&job.metadata));
    let names = pods.iter().map(|p| name_of(&p.metadata).to_string());
    delete_pods(&api, names.collect()).await;
}

fn condition(kind: &str, reason: &str, message: &str, status: &str, at: &str) -> Value {
    json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastProbeTime": at, "lastTransitionTime": at,
    })
}

/// Sets condition `kind` to `status` in `conds`, keeping its transition
/// time if the status stays. A False is only written over an existing
/// condition (a Job never suspended has no Suspended condition).
fn set_condition(conds: &mut Vec<Value>, kind: &str, status: &str, reason: &str, message: &str) {
    let at = now();
    match conds.iter_mut().find(|c| c["type"] == kind) {
        Some(c) if c["status"] == status => {}
        Some(c) => *c = condition(kind, reason, message, status, &at),
        None if status == "True" => conds.push(condition(kind, reason, message, status, &at)),
        None => {}
    }
}

/// A set of pod uids as status holds it: absent when empty.
fn uids(set: &BTreeSet<String>) -> Value {
    if set.is_empty() {
        Value::Null
    } else {
        json!(set)
    }
}

fn has_condition(conds: &[Value], kind: &str) -> bool {
    conds
        .iter()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

/// When the finished Job ended: its completion time, else when it failed.
fn finished_at(job: &Job) -> Option<Timestamp> {
    let s = job.status.as_ref()?;
    if let Some(t) = &s.completion_time {
        return Some(t.0);
    }
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0)
}

/// One pass over a Job; when to look again, if a timer is due (back-off,
/// deadline, TTL).
async fn reconcile(
    client: &Client,
    job: &Job,
    owned: &[Arc<Pod>],
    st: &mut State,
) -> Option<Duration> {
    let (name, ns) = (name_of(&job.metadata), ns_of(&job.metadata));
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let spec = job.spec.as_ref()?;
    let status = job.status.clone().unwrap_or_default();
    let mut conds: Vec<Value> = status
        .conditions
        .iter()
        .flatten()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    let done = has_condition(&conds, "Complete") || has_condition(&conds, "Failed");
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);

    if done || job.metadata.deletion_timestamp.is_some() {
        let left: Vec<Arc<Pod>> = owned.iter().filter(|p| tracked(p)).cloned().collect();
        untrack(client, &left).await;
        st.last_failure.remove(&uid);
        let ttl = spec.ttl_seconds_after_finished?;
        let end = finished_at(job)?;
        let due = end + jiff::SignedDuration::from_secs(i64::from(ttl));
        let now = Timestamp::now();
        if due > now || job.metadata.deletion_timestamp.is_some() {
            return (due > now).then(|| now.duration_until(due).unsigned_abs());
        }
        let dp = DeleteParams {
            propagation_policy: Some(kube::api::PropagationPolicy::Background),
            ..Default::default()
        };
        match jobs.delete(name, &dp).await {
            Ok(_) => info!(job = %format!("{ns}/{name}"), ttl, "deleted after its TTL"),
            Err(e) => warn!(job = %format!("{ns}/{name}"), error = %e, "TTL delete failed"),
        }
        return None;
    }

    // Count what finished: record, untrack, then add up.
    let uncounted = status.uncounted_terminated_pods.clone().unwrap_or_default();
    let mut unc_ok: BTreeSet<String> = uncounted.succeeded.into_iter().flatten().collect();
    let mut unc_failed: BTreeSet<String> = uncounted.failed.into_iter().flatten().collect();
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let mut completed = parse_indexes(status.completed_indexes.as_deref().unwrap_or_default());
    let mut newly = false;
    let policy = spec.pod_failure_policy.as_ref();
    // Failures an Ignore rule matched: untracked, never counted.
    let mut ignored: Vec<Arc<Pod>> = Vec::new();
    for p in owned.iter().filter(|p| tracked(p)) {
        let puid = p.metadata.uid.clone().unwrap_or_default();
        if unc_ok.contains(&puid) || unc_failed.contains(&puid) {
            continue;
        }
        if phase(p) == "Succeeded" {
            unc_ok.insert(puid);
            if indexed && let Some(i) = index_of(p) {
                completed.insert(i);
            }
            newly = true;
        } else if failed(p, policy.is_some()) {
            match policy.and_then(|pol| policy_match(pol, p)) {
                Some((action, _)) if action == "Ignore" => {
                    ignored.push(p.clone());
                    continue;
                }
                // Recorded with the pod, so the Job fails even if this
                // pass goes no further.
                Some((action, message)) if action == "FailJob" => {
                    set_condition(
                        &mut conds,
                        "FailureTarget",
                        "True",
                        "PodFailurePolicy",
                        &message,
                    );
                }
                _ => {}
            }
            unc_failed.insert(puid);
            st.last_failure.insert(uid.clone(), Instant::now());
            newly = true;
        }
    }
    untrack(client, &ignored).await;
    let completions = spec.completions.map(i64::from);
    if indexed && let Some(n) = completions {
        completed.retain(|i| (0..n).contains(i));
    }
    let indexes_text = format_indexes(&completed);
    if newly {
        let record = json!({
            "uncountedTerminatedPods": {"succeeded": uids(&unc_ok), "failed": uids(&unc_failed)},
            "completedIndexes": if indexed { json!(indexes_text) } else { Value::Null },
            "conditions": if conds.is_empty() { Value::Null } else { json!(conds) },
        });
        let patch = json!({"status": record});
        if let Err(e) = jobs
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(job = %format!("{ns}/{name}"), error = %e, "recording finished pods failed");
            return Some(Duration::from_secs(1));
        }
    }
    let recorded: Vec<Arc<Pod>> = owned
        .iter()
        .filter(|p| {
            let puid = p.metadata.uid.as_deref().unwrap_or_default();
            tracked(p) && (unc_ok.contains(puid) || unc_failed.contains(puid))
        })
        .cloned()
        .collect();
    let all_untracked = untrack(client, &recorded).await;
    let mut succeeded = i64::from(status.succeeded.unwrap_or(0));
    let mut failures = i64::from(status.failed.unwrap_or(0));
    if all_untracked {
        succeeded += unc_ok.len() as i64;
        failures += unc_failed.len() as i64;
        unc_ok.clear();
        unc_failed.clear();
    }
    let pending_count = !unc_ok.is_empty() || !unc_failed.is_empty();

    let mut active: Vec<Arc<Pod>> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let restarts: i64 = if spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure")
    {
        active
            .iter()
            .flat_map(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
            })
            .map(|c| i64::from(c.restart_count))
            .sum()
    } else {
        0
    };
    let suspended = spec.suspend == Some(true);
    let now_ts = Timestamp::now();
    let mut start = status.start_time.as_ref().map(|t| t.0);
    if suspended {
        set_condition(
            &mut conds,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
        );
    } else if has_condition(&conds, "Suspended") {
        set_condition(
            &mut conds,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
        );
        // The deadline counts from the resume, as upstream's does.
        start = Some(now_ts);
    }
    if start.is_none() && !suspended {
        start = Some(now_ts);
    }
    let mut completion_time = status.completion_time.as_ref().map(|t| t.0);
    let mut wake: Option<Duration> = None;
    let backoff_limit = i64::from(spec.backoff_limit.unwrap_or(6));
    let deadline = spec
        .active_deadline_seconds
        .zip(start)
        .map(|(s, t)| t + jiff::SignedDuration::from_secs(s));
    let by_policy = conds
        .iter()
        .find(|c| c["type"] == "FailureTarget" && c["reason"] == "PodFailurePolicy")
        .map(|c| c["message"].as_str().unwrap_or_default().to_string());
    let failure: Option<(&str, String)> = if let Some(message) = by_policy {
        Some(("PodFailurePolicy", message))
    } else if failures + restarts > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        ))
    } else if !suspended && deadline.is_some_and(|d| d <= now_ts) {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline".into(),
        ))
    } else {
        None
    };
    let parallelism = i64::from(spec.parallelism.unwrap_or(1)).max(0);
    let complete = match (indexed, completions) {
        (true, Some(n)) => completed.len() as i64 >= n,
        (_, Some(n)) => succeeded >= n,
        (_, None) => succeeded >= 1 && active.is_empty(),
    };
    if pending_count {
        // A Job ends only once every finished pod is counted.
        wake = Some(Duration::from_secs(1));
    } else if let Some((reason, message)) = failure {
        remove(client, job, std::mem::take(&mut active), &mut st.exp).await;
        set_condition(&mut conds, "FailureTarget", "True", reason, &message);
        set_condition(&mut conds, "Failed", "True", reason, &message);
        info!(job = %format!("{ns}/{name}"), reason, "failed");
        let said = Said {
            warning: true,
            reason,
            message: &message,
            action: "",
        };
        record(client, COMPONENT, about(job), said);
    } else if complete {
        remove(client, job, std::mem::take(&mut active), &mut st.exp).await;
        let reason = "CompletionsReached";
        let message = "Reached expected number of succeeded pods";
        set_condition(&mut conds, "SuccessCriteriaMet", "True", reason, message);
        set_condition(&mut conds, "Complete", "True", reason, message);
        completion_time = Some(now_ts);
        info!(job = %format!("{ns}/{name}"), succeeded, "complete");
        record(
            client,
            COMPONENT,
            about(job),
            normal("Completed", "Job completed"),
        );
    } else if suspended {
        remove(client, job, std::mem::take(&mut active), &mut st.exp).await;
    } else if st.exp.satisfied(&uid, owned) {
        if let Some(d) = deadline {
            wake = Some(now_ts.duration_until(d).unsigned_abs());
        }
        // More than parallelism allows (it was lowered): the extra go.
        if active.len() as i64 > parallelism {
            deletion_order(&mut active);
            let extra = active.len() - parallelism as usize;
            let gone: Vec<Arc<Pod>> = active.drain(..extra).collect();
            remove(client, job, gone, &mut st.exp).await;
        }
        // Upstream's back-off: 10 s after the first failure, doubling,
        // at most 6 minutes.
        let backoff = if failures > 0 {
            let n = u32::try_from(failures - 1).unwrap_or(u32::MAX).min(16);
            BACKOFF_BASE.saturating_mul(1 << n).min(BACKOFF_MAX)
        } else {
            Duration::ZERO
        };
        let waited = st
            .last_failure
            .get(&uid)
            .map_or(Duration::MAX, Instant::elapsed);
        if waited < backoff {
            let left = backoff - waited;
            wake = Some(wake.map_or(left, |w| w.min(left)));
        } else {
            let room = (parallelism - active.len() as i64).max(0);
            let slots: Vec<Option<i64>> = match (indexed, completions) {
                (true, Some(n)) => {
                    let running: HashSet<i64> = active.iter().filter_map(|p| index_of(p)).collect();
                    (0..n)
                        .filter(|i| !completed.contains(i) && !running.contains(i))
                        .take(room as usize)
                        .map(Some)
                        .collect()
                }
                (_, Some(n)) => {
                    let want = (n - succeeded).min(parallelism) - active.len() as i64;
                    vec![None; want.max(0) as usize]
                }
                (_, None) if succeeded == 0 => vec![None; room as usize],
                (_, None) => Vec::new(),
            };
            create(client, job, &slots, &mut st.exp).await;
        }
    }

    let ready_n = active.iter().filter(|p| is_ready(p)).count();
    let terminating = owned
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_some() && !matches!(phase(p), "Succeeded" | "Failed")
        })
        .count();
    let fmt = |t: Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    // Written as upstream leaves them: zero counts and empty lists absent.
    let count = |n: i64| if n == 0 { Value::Null } else { json!(n) };
    let new_status = json!({
        "active": count(active.len() as i64),
        "ready": ready_n,
        "terminating": terminating,
        "succeeded": count(succeeded),
        "failed": count(failures),
        "startTime": start.map(fmt),
        "completionTime": completion_time.map(fmt),
        "conditions": if conds.is_empty() { Value::Null } else { json!(conds) },
        "completedIndexes": if indexed { json!(indexes_text) } else { Value::Null },
        "uncountedTerminatedPods": {"succeeded": uids(&unc_ok), "failed": uids(&unc_failed)},
    });
    let old = serde_json::to_value(&status).unwrap_or_default();
    let same = new_status
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| old.get(k).unwrap_or(&Value::Null) == v || is_empty_like(v, old.get(k)));
    if !same {
        crate::informer::write_status(&jobs, name, new_status).await;
    }
    wake
}

/// An empty list or zero written over an absent field changes nothing
/// a reader sees.
fn is_empty_like(new: &Value, old: Option<&Value>) -> bool {
    fn blank(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.values().all(blank),
            Value::Number(n) => n.as_i64() == Some(0),
            _ => false,
        }
    }
    blank(new) && old.is_none_or(blank)
}

/// Creates one pod per slot (an index, or `None` for any).
async fn create(client: &Client, job: &Job, slots: &[Option<i64>], exp: &mut Expectations) {
    if slots.is_empty() {
        return;
    }
    let Some(spec) = job.spec.as_ref() else {
        return;
    };
    let (name, ns) = (name_of(&job.metadata), ns_of(&job.metadata));
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods: Vec<Pod> = slots
        .iter()
        .filter_map(|i| job_pod(job, &spec.template, *i))
        .collect();
    let made: Vec<Option<String>> = futures::future::join_all(pods.iter().map(|pod| {
        let api = api.clone();
        async move {
            match api.create(&PostParams::default(), pod).await {
                Ok(p) => p.metadata.name,
                Err(e) => {
                    warn!(job = %name, error = %e, "creating a pod failed");
                    None
                }
            }
        }
    }))
    .await;
    let n = made.iter().flatten().count();
    for m in made.into_iter().flatten() {
        let msg = format!("Created pod: {m}");
        record(
            client,
            COMPONENT,
            about(job),
            normal("SuccessfulCreate", &msg),
        );
        exp.created(&uid, m);
    }
    info!(job = %format!("{ns}/{name}"), created = n, "pods created");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_indexes_read_and_write_as_upstream_does() {
        let set = parse_indexes("0-2,4,7-8");
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [0, 1, 2, 4, 7, 8]);
        assert_eq!(format_indexes(&set), "0-2,4,7-8");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
        assert_eq!(format_indexes(&parse_indexes("3")), "3");
    }
}
