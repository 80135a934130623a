//! CronJob (batch/v1): creates a Job from `jobTemplate` at each time of
//! `schedule` (in `timeZone`, else the control plane's zone), as upstream's
//! controller does:
//! - Only the newest missed time runs. Times older than
//!   `startingDeadlineSeconds` are not run.
//! - `concurrencyPolicy`: `Allow` runs Jobs side by side, `Forbid` skips a
//!   time while one runs, and `Replace` deletes the running ones first.
//! - `suspend` stops new runs.
//! - Finished Jobs beyond `successfulJobsHistoryLimit` and
//!   `failedJobsHistoryLimit` are deleted, oldest first.
//!
//! A Job is named `<cronjob>-<scheduled time in minutes>`, so a time is
//! never run twice, even when a pass repeats before the status it wrote
//! comes back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::cron::{Schedule, zone};
use crate::events::{about, normal, record};
use crate::informer::{Wake, next_pass, ready, reflect};
use crate::meta::{controller_of, name_of, ns_of, owner_ref};

/// Missed times counted before only the newest is looked for.
const MISSED_LIMIT: usize = 100;
const SCHEDULED_AT: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
const COMPONENT: &str = "cronjob-controller";

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (cjs, _a) = reflect(Api::<CronJob>::all(client.clone()), notify.clone());
    let (jobs, _b) = reflect(Api::<Job>::all(client.clone()), notify.clone());
    ready(&cjs).await;
    ready(&jobs).await;
    let mut wake = Wake::default();
    loop {
        next_pass("cronjob", &notify, Duration::from_secs(10)).await;
        let mut by_owner: HashMap<String, Vec<Arc<Job>>> = HashMap::new();
        for j in jobs.state() {
            if let Some(o) = controller_of(&j.metadata).filter(|o| o.kind == "CronJob") {
                by_owner.entry(o.uid.clone()).or_default().push(j.clone());
            }
        }
        for cj in cjs.state() {
            let uid = cj.metadata.uid.clone().unwrap_or_default();
            let owned = by_owner.remove(&uid).unwrap_or_default();
            if let Some(left) = reconcile(&client, &cj, owned).await {
                wake.after(&notify, left);
            }
        }
    }
}

/// `Complete` or `Failed`, if the Job finished.
fn finished(job: &Job) -> Option<&'static str> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    ["Complete", "Failed"]
        .into_iter()
        .find(|k| conds.iter().any(|c| c.type_ == *k && c.status == "True"))
}

async fn delete_job(api: &Api<Job>, name: &str, why: &str) {
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => info!(job = %name, why, "deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(job = %name, error = %e, "deleting a job failed"),
    }
}

/// Deletes the finished Jobs beyond the history limits, oldest first.
async fn trim_history(client: &Client, api: &Api<Job>, cj: &CronJob, owned: &[Arc<Job>]) {
    let spec = &cj.spec;
    for (kind, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let mut done: Vec<&Arc<Job>> = owned
            .iter()
            .filter(|j| finished(j) == Some(kind) && j.metadata.deletion_timestamp.is_none())
            .collect();
        done.sort_by_key(|j| {
            j.status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .or(j.metadata.creation_timestamp.as_ref())
                .map(|t| t.0)
        });
        let extra = done.len().saturating_sub(limit.max(0) as usize);
        for j in &done[..extra] {
            let n = name_of(&j.metadata);
            delete_job(api, n, "history limit").await;
            let msg = format!("Deleted job {n}");
            record(
                client,
                COMPONENT,
                about(cj),
                normal("SuccessfulDelete", &msg),
            );
        }
    }
}

/// One pass; when the next scheduled time is due.
async fn reconcile(client: &Client, cj: &CronJob, owned: Vec<Arc<Job>>) -> Option<Duration> {
    let (name, ns) = (name_of(&cj.metadata), ns_of(&cj.metadata));
    let spec = &cj.spec;
    let status = cj.status.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let cjs: Api<CronJob> = Api::namespaced(client.clone(), ns);

    // Running Jobs: the owned ones not finished, and those the status
    // names that the cache has not shown yet but the API still has.
    let mut active: Vec<ObjectReference> = owned
        .iter()
        .filter(|j| finished(j).is_none())
        .map(|j| about(j.as_ref()))
        .collect();
    let known: BTreeSet<&str> = owned.iter().map(|j| name_of(&j.metadata)).collect();
    for r in status.active.iter().flatten() {
        let n = r.name.as_deref().unwrap_or_default();
        if known.contains(n) {
            continue;
        }
        if let Ok(j) = jobs.get(n).await
            && j.metadata.uid == r.uid
            && finished(&j).is_none()
        {
            active.push(r.clone());
        }
    }
    let mut last_success = status.last_successful_time.as_ref().map(|t| t.0);
    for j in owned.iter().filter(|j| finished(j) == Some("Complete")) {
        let done = j.status.as_ref().and_then(|s| s.completion_time.as_ref());
        if let Some(t) = done.map(|t| t.0) {
            last_success = Some(last_success.map_or(t, |l| l.max(t)));
        }
    }
    trim_history(client, &jobs, cj, &owned).await;

    let mut last_schedule = status.last_schedule_time.as_ref().map(|t| t.0);
    let mut wake = None;
    let runnable = cj.metadata.deletion_timestamp.is_none() && spec.suspend != Some(true);
    if runnable
        && let (Ok(schedule), Ok(tz)) = (
            Schedule::parse(&spec.schedule),
            zone(spec.time_zone.as_deref()),
        )
    {
        let now = Timestamp::now();
        let created = cj.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let mut since = last_schedule.or(created).unwrap_or(now);
        if let Some(d) = spec.starting_deadline_seconds {
            let earliest = now
                .checked_sub(jiff::SignedDuration::from_secs(d))
                .unwrap_or(now);
            since = since.max(earliest);
        }
        let (due, missed) = schedule.latest_between(since, now, &tz, MISSED_LIMIT);
        if missed >= MISSED_LIMIT {
            warn!(cronjob = %format!("{ns}/{name}"), "too many missed start times; running the newest");
        }
        if let Some(t) = due {
            let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
            if policy == "Forbid" && !active.is_empty() {
                info!(cronjob = %format!("{ns}/{name}"), "a run is skipped: the last one still runs (Forbid)");
            } else {
                if policy == "Replace" {
                    for r in active.drain(..) {
                        let n = r.name.unwrap_or_default();
                        delete_job(&jobs, &n, "replaced").await;
                    }
                }
                match start(client, &jobs, cj, t).await {
                    Some(job) => {
                        active.push(about(&job));
                        last_schedule = Some(t);
                    }
                    None => wake = Some(Duration::from_secs(5)),
                }
            }
        }
        if let Some(next) = schedule.next_after(now, &tz) {
            let left = now.duration_until(next).unsigned_abs();
            wake = Some(wake.map_or(left, |w: Duration| w.min(left)));
        }
    }

    let fmt = |t: Timestamp| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let new = json!({
        "active": if active.is_empty() { serde_json::Value::Null } else { json!(active) },
        "lastScheduleTime": last_schedule.map(fmt),
        "lastSuccessfulTime": last_success.map(fmt),
    });
    let names = |refs: &[ObjectReference]| -> BTreeSet<Option<String>> {
        refs.iter().map(|r| r.name.clone()).collect()
    };
    let same = names(&active) == names(status.active.as_deref().unwrap_or_default())
        && last_schedule == status.last_schedule_time.as_ref().map(|t| t.0)
        && last_success == status.last_successful_time.as_ref().map(|t| t.0);
    if !same {
        crate::informer::write_status(&cjs, name, new).await;
    }
    wake
}

/// Creates the Job for scheduled time `t`; an existing one of that name
/// (an earlier pass made it) counts as made.
async fn start(client: &Client, api: &Api<Job>, cj: &CronJob, t: Timestamp) -> Option<Job> {
    let spec = &cj.spec;
    let name = format!("{}-{}", name_of(&cj.metadata), t.as_second() / 60);
    let meta = spec.job_template.metadata.clone().unwrap_or_default();
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(
        SCHEDULED_AT.into(),
        t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );
    let job = Job {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: cj.metadata.namespace.clone(),
            labels: meta.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![owner_ref(cj)?]),
            ..Default::default()
        },
        spec: spec.job_template.spec.clone(),
        status: None,
    };
    match api.create(&PostParams::default(), &job).await {
        Ok(j) => {
            info!(job = %name, scheduled = %t, "started");
            let msg = format!("Created job {name}");
            record(
                client,
                COMPONENT,
                about(cj),
                normal("SuccessfulCreate", &msg),
            );
            Some(j)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.ok(),
        Err(e) => {
            warn!(job = %name, error = %e, "creating the job failed");
            None
        }
    }
}
