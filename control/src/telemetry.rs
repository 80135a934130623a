//! The process's Prometheus metrics: one registry that every component in
//! this process registers into once (the apiserver serves it at
//! `/metrics`), the controllers' work-queue metrics and the scheduler's.
//!
//! Controllers here do not queue items: each wakes on a change (or its
//! resync period) and reconciles everything in one pass. Upstream's
//! workqueue metrics are kept with that meaning: an add is a wake-up that
//! starts a pass, the depth is a wake-up waiting while a pass runs, the
//! work duration is a pass's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The registry the components of this process share.
pub type Shared = Arc<Mutex<Registry>>;

pub fn shared() -> Shared {
    Arc::default()
}

/// The text exposition (OpenMetrics) of everything registered.
pub fn render(registry: &Shared) -> String {
    let mut out = String::new();
    if let Ok(r) = registry.lock() {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    }
    out
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Name {
    name: &'static str,
}

/// Work-queue metrics of every controller pass loop in the process.
pub struct Passes {
    adds: Family<Name, Counter>,
    depth: Family<Name, Gauge>,
    work: Histograms<Name>,
    queue: Histograms<Name>,
    /// When each loop's current pass started.
    started: Mutex<HashMap<&'static str, Instant>>,
}

static PASSES: OnceLock<Passes> = OnceLock::new();

impl Passes {
    /// Registers the pass metrics in `registry`, once per process; later
    /// calls do nothing.
    pub fn install(registry: &Shared) {
        let Ok(mut r) = registry.lock() else { return };
        if PASSES.get().is_some() {
            return;
        }
        let p = Passes {
            adds: Family::default(),
            depth: Family::default(),
            work: Family::new_with_constructor(seconds_histogram),
            queue: Family::new_with_constructor(seconds_histogram),
            started: Mutex::default(),
        };
        r.register(
            "workqueue_adds",
            "Wake-ups that started a pass, by controller",
            p.adds.clone(),
        );
        r.register(
            "workqueue_depth",
            "Wake-ups waiting for a controller's pass to end",
            p.depth.clone(),
        );
        r.register(
            "workqueue_work_duration_seconds",
            "How long a controller's pass took, in seconds",
            p.work.clone(),
        );
        r.register(
            "workqueue_queue_duration_seconds",
            "How long a wake-up waited before its pass started, in seconds",
            p.queue.clone(),
        );
        let _ = PASSES.set(p);
    }

    /// A pass of loop `name` ended (if one ran); `pending` says a wake-up
    /// is already waiting.
    pub(crate) fn ended(name: &'static str, pending: bool) {
        let Some(p) = PASSES.get() else { return };
        let label = Name { name };
        if let Some(t) = p.started.lock().ok().and_then(|mut s| s.remove(name)) {
            p.work
                .get_or_create(&label)
                .observe(t.elapsed().as_secs_f64());
        }
        p.depth.get_or_create(&label).set(i64::from(pending));
    }

    /// Loop `name` was woken at `woken` and starts its pass now.
    pub(crate) fn started(name: &'static str, woken: Instant) {
        let Some(p) = PASSES.get() else { return };
        let label = Name { name };
        p.adds.get_or_create(&label).inc();
        p.depth.get_or_create(&label).set(0);
        p.queue
            .get_or_create(&label)
            .observe(woken.elapsed().as_secs_f64());
        if let Ok(mut s) = p.started.lock() {
            s.insert(name, Instant::now());
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Attempt {
    result: &'static str,
    profile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Attempts {
    attempts: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: &'static str,
}

/// The scheduler's metrics, under upstream's names.
pub struct Scheduler {
    attempts: Family<Attempt, Counter>,
    durations: Histograms<Attempts>,
    pending: Family<Queue, Gauge>,
}

const PROFILE: &str = "default-scheduler";

impl Scheduler {
    pub fn new(registry: &Shared) -> Arc<Self> {
        let s = Self {
            attempts: Family::default(),
            durations: Family::new_with_constructor(seconds_histogram),
            pending: Family::default(),
        };
        if let Ok(mut r) = registry.lock() {
            r.register(
                "scheduler_schedule_attempts",
                "Attempts to schedule pods, by result (scheduled, unschedulable, error)",
                s.attempts.clone(),
            );
            r.register(
                "scheduler_pod_scheduling_duration_seconds",
                "Time from the scheduler first seeing a pod pending to its binding, by attempts",
                s.durations.clone(),
            );
            r.register(
                "scheduler_pending_pods",
                "Pods waiting to be scheduled: active (being tried) or unschedulable",
                s.pending.clone(),
            );
        }
        for result in ["scheduled", "unschedulable", "error"] {
            let _ = s.attempts.get_or_create(&Attempt {
                result,
                profile: PROFILE,
            });
        }
        Arc::new(s)
    }

    pub(crate) fn attempt(&self, result: &'static str) {
        self.attempts
            .get_or_create(&Attempt {
                result,
                profile: PROFILE,
            })
            .inc();
    }

    /// A pod was bound after `attempts` tries, `seconds` after it was
    /// first seen pending.
    pub(crate) fn scheduled(&self, attempts: u32, seconds: f64) {
        self.attempt("scheduled");
        self.durations
            .get_or_create(&Attempts {
                attempts: attempts.to_string(),
            })
            .observe(seconds);
    }

    pub(crate) fn pending(&self, active: usize, unschedulable: usize) {
        for (queue, n) in [("active", active), ("unschedulable", unschedulable)] {
            self.pending
                .get_or_create(&Queue { queue })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_attempts_show_under_upstream_names() {
        let registry = shared();
        let s = Scheduler::new(&registry);
        s.attempt("unschedulable");
        s.scheduled(2, 0.5);
        s.pending(0, 1);
        let text = render(&registry);
        for want in [
            r#"scheduler_schedule_attempts_total{result="unschedulable",profile="default-scheduler"} 1"#,
            r#"scheduler_schedule_attempts_total{result="scheduled",profile="default-scheduler"} 1"#,
            r#"scheduler_schedule_attempts_total{result="error",profile="default-scheduler"} 0"#,
            r#"scheduler_pod_scheduling_duration_seconds_count{attempts="2"} 1"#,
            r#"scheduler_pending_pods{queue="unschedulable"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
