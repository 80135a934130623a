//! The node agent's Prometheus metrics, one registry for every role of the
//! process, served as plain HTTP on `--metrics-bind-address` (loopback by
//! default, off the pod network) at `/metrics`, with `/healthz`, `/livez`
//! and `/readyz`. The metric families are made once per process, so a role
//! restarted after a failure keeps counting where it was.
//!
//! Health, with upstream's meanings: each role registers a check. A
//! `Sync` check (the proxy, kube-proxy's rule; the overlay) is unhealthy
//! while a change it was given has waited longer than its timeout without
//! being programmed; a `Loop` check (the kubelet's sync loop, as the
//! kubelet's `syncloop`) is unhealthy when its loop has not turned within
//! its timeout. `/livez` and `/healthz` need every check healthy;
//! `/readyz` also needs each role's first sync done (the proxy's first
//! rules, the kubelet's first pod list, the DNS zone read). `?verbose`
//! lists the checks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabel {
    pub program: &'static str,
}

/// The service proxy's metrics (kube-proxy's names where it has them).
pub struct Proxy {
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, AtomicU64>,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_max_entries: Family<MapLabel, Gauge>,
    pub program_runs: Family<ProgramLabel, Gauge>,
    pub program_seconds: Family<ProgramLabel, Gauge<f64, AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub container_state: &'static str,
}

/// The kubelet's metrics, under upstream's names.
pub struct Kubelet {
    /// Pod creation until all its containers run, less image pulls.
    pub pod_start: Histogram,
    pub running_pods: Gauge,
    pub running_containers: Family<StateLabel, Gauge>,
    /// A container's exit, from containerd's timestamp to the kubelet
    /// seeing it (the event-driven PLEG's latency).
    pub event_latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeResultLabels {
    pub probe_type: &'static str,
    pub result: &'static str,
    pub container: String,
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe_type: &'static str,
    pub container: String,
    pub pod: String,
    pub namespace: String,
}

type Buckets = fn() -> Histogram;

/// The kubelet's `/metrics/probes` (on its port, beside
/// `/metrics/resource`): `prober_probe_total` and
/// `prober_probe_duration_seconds`, per container and probe, under
/// upstream's names and labels. A pod's series go with the pod.
pub struct Probes {
    registry: Mutex<Registry>,
    total: Family<ProbeResultLabels, Counter>,
    duration: Family<ProbeLabels, Histogram, Buckets>,
    /// The series of each pod (by uid), to remove when it goes.
    series: Mutex<std::collections::HashMap<String, std::collections::HashSet<ProbeResultLabels>>>,
}

/// One probe's run, as `Probes::observe` records it.
pub struct ProbeRun<'a> {
    pub uid: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
    /// `Liveness`, `Readiness` or `Startup`.
    pub probe_type: &'static str,
    /// `successful`, `failed` or `unknown`.
    pub result: &'static str,
    pub seconds: f64,
}

impl Default for Probes {
    fn default() -> Self {
        let mut r = Registry::default();
        let total = Family::<ProbeResultLabels, Counter>::default();
        let duration = Family::<ProbeLabels, Histogram, Buckets>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        r.register(
            "prober_probe",
            "Cumulative number of a liveness, readiness or startup probe for a container by result",
            total.clone(),
        );
        r.register(
            "prober_probe_duration_seconds",
            "Duration in seconds for a probe response",
            duration.clone(),
        );
        Self {
            registry: Mutex::new(r),
            total,
            duration,
            series: Mutex::default(),
        }
    }
}

impl Probes {
    pub fn observe(&self, run: &ProbeRun<'_>) {
        let labels = ProbeResultLabels {
            probe_type: run.probe_type,
            result: run.result,
            container: run.container.to_string(),
            pod: run.pod.to_string(),
            namespace: run.namespace.to_string(),
            pod_uid: run.uid.to_string(),
        };
        self.total.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&ProbeLabels {
                probe_type: run.probe_type,
                container: labels.container.clone(),
                pod: labels.pod.clone(),
                namespace: labels.namespace.clone(),
            })
            .observe(run.seconds);
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(run.uid.to_string())
            .or_default()
            .insert(labels);
    }

    /// Removes the series of the pod `uid`.
    pub fn forget(&self, uid: &str) {
        let gone = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(uid);
        for l in gone.into_iter().flatten() {
            self.total.remove(&l);
            self.duration.remove(&ProbeLabels {
                probe_type: l.probe_type,
                container: l.container,
                pod: l.pod,
                namespace: l.namespace,
            });
        }
    }

    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

/// The text exposition (OpenMetrics) of `registry`.
fn encode(registry: &Mutex<Registry>) -> String {
    let mut out = String::new();
    let r = registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Upstream's buckets for the pod start SLI.
const POD_START_BUCKETS: [f64; 25] = [
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0,
    300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    pub proto: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RcodeLabel {
    pub rcode: &'static str,
}

/// Cluster DNS metrics, under CoreDNS's names.
pub struct Dns {
    pub requests: Family<QueryLabels, Counter>,
    pub responses: Family<RcodeLabel, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub forward_duration: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// The overlay's metrics.
pub struct Overlay {
    /// Lease renewals, by result: `renewed`, `lost` (taken again) or
    /// `error` (the store did not answer).
    pub renewals: Family<ResultLabel, Counter>,
    /// Other nodes' subnets routed.
    pub routes: Gauge,
    /// A full reconcile of the routes with the leases (a list or a
    /// resync).
    pub reconcile: Histogram,
}

/// What a role's health check watches.
#[derive(Clone, Copy, Debug)]
pub enum Watch {
    /// Changes handed to the role are programmed within this time.
    Sync(Duration),
    /// The role's loop turns at least this often.
    Loop(Duration),
}

/// One role's health check (see the module's doc).
#[derive(Debug)]
pub struct Check {
    name: &'static str,
    watch: Watch,
    base: Instant,
    synced: AtomicBool,
    /// Milliseconds from `base` plus one; 0 when nothing is pending.
    pending_since: AtomicU64,
    last_beat: AtomicU64,
}

impl Check {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    /// A change was handed to the role (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        let now = self.now();
        let _ = self
            .pending_since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Everything handed so far is programmed (kube-proxy's `Updated`).
    pub fn synced(&self) {
        self.pending_since.store(0, Ordering::Relaxed);
        self.synced.store(true, Ordering::Relaxed);
        self.beat();
    }

    /// The role's loop turned.
    pub fn beat(&self) {
        self.last_beat.store(self.now(), Ordering::Relaxed);
    }

    /// Healthy, or why not.
    fn live(&self) -> Result<(), String> {
        let now = self.now();
        match self.watch {
            Watch::Sync(limit) => {
                let since = self.pending_since.load(Ordering::Relaxed);
                let waited = Duration::from_millis(now.saturating_sub(since));
                if since != 0 && waited > limit {
                    return Err(format!(
                        "a change has waited {}s to be programmed",
                        waited.as_secs()
                    ));
                }
            }
            Watch::Loop(limit) => {
                // Not beaten yet: counted from registration.
                let last = self.last_beat.load(Ordering::Relaxed).max(1);
                let idle = Duration::from_millis(now.saturating_sub(last));
                if idle > limit {
                    return Err(format!("the loop last turned {}s ago", idle.as_secs()));
                }
            }
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        self.live()?;
        if self.synced.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not synced yet".into())
        }
    }
}

/// Every role's metrics and the registry that serves them.
pub struct Telemetry {
    registry: Mutex<Registry>,
    checks: Mutex<Vec<Arc<Check>>>,
    pub proxy: Proxy,
    pub kubelet: Kubelet,
    pub dns: Dns,
    pub overlay: Overlay,
    pub probes: Probes,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut r = Registry::default();
        let proxy = Proxy {
            // 1 ms to about 16 s, as kube-proxy's.
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            map_entries: Family::default(),
            map_max_entries: Family::default(),
            program_runs: Family::default(),
            program_seconds: Family::default(),
        };
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long programming the services into the BPF maps took, in seconds",
            proxy.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the services were last programmed, in seconds since the epoch",
            proxy.last_sync.clone(),
        );
        r.register(
            "skiff_proxy_services",
            "Service frontends programmed (ClusterIP, NodePort and external addresses, per port and protocol)",
            proxy.services.clone(),
        );
        r.register(
            "skiff_proxy_endpoints",
            "Backends programmed, summed over the frontends",
            proxy.endpoints.clone(),
        );
        r.register(
            "skiff_bpf_map_entries",
            "Entries in each pinned BPF map",
            proxy.map_entries.clone(),
        );
        r.register(
            "skiff_bpf_map_max_entries",
            "Size of each pinned BPF map",
            proxy.map_max_entries.clone(),
        );
        r.register(
            "skiff_bpf_program_runs",
            "Runs of each attached program, counted while kernel.bpf_stats_enabled is on",
            proxy.program_runs.clone(),
        );
        r.register(
            "skiff_bpf_program_run_seconds",
            "Time spent in each attached program, counted while kernel.bpf_stats_enabled is on",
            proxy.program_seconds.clone(),
        );
        let kubelet = Kubelet {
            pod_start: Histogram::new(POD_START_BUCKETS),
            running_pods: Gauge::default(),
            running_containers: Family::default(),
            event_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        r.register(
            "kubelet_pod_start_sli_duration_seconds",
            "Time from a pod's creation until all its containers run, image pulls left out, in seconds",
            kubelet.pod_start.clone(),
        );
        r.register(
            "kubelet_running_pods",
            "Pods of this node in phase Running",
            kubelet.running_pods.clone(),
        );
        r.register(
            "kubelet_running_containers",
            "Containers of this node's pods, by state",
            kubelet.running_containers.clone(),
        );
        r.register(
            "kubelet_evented_pleg_connection_latency_seconds",
            "Time from a container's exit, as containerd stamps it, until the kubelet receives the event, in seconds",
            kubelet.event_latency.clone(),
        );
        let dns = Dns {
            requests: Family::default(),
            responses: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            // 0.25 ms to about 8 s.
            forward_duration: Histogram::new(exponential_buckets(0.00025, 2.0, 16)),
        };
        r.register(
            "coredns_dns_requests",
            "Questions answered, by transport and query type",
            dns.requests.clone(),
        );
        r.register(
            "coredns_dns_responses",
            "Answers sent, by response code",
            dns.responses.clone(),
        );
        r.register(
            "coredns_cache_hits",
            "Questions for outside names answered from the cache",
            dns.cache_hits.clone(),
        );
        r.register(
            "coredns_cache_misses",
            "Questions for outside names the cache did not hold live",
            dns.cache_misses.clone(),
        );
        r.register(
            "coredns_forward_request_duration_seconds",
            "Time an upstream resolver took to answer, in seconds",
            dns.forward_duration.clone(),
        );
        let overlay = Overlay {
            renewals: Family::default(),
            routes: Gauge::default(),
            reconcile: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        };
        r.register(
            "skiff_overlay_lease_renewals",
            "Renewals of this node's subnet lease, by result (renewed, lost, error)",
            overlay.renewals.clone(),
        );
        r.register(
            "skiff_overlay_routes",
            "Other nodes' subnets this node routes to",
            overlay.routes.clone(),
        );
        r.register(
            "skiff_overlay_reconcile_duration_seconds",
            "How long a full reconcile of the routes with the leases took, in seconds",
            overlay.reconcile.clone(),
        );
        Self {
            registry: Mutex::new(r),
            checks: Mutex::default(),
            probes: Probes::default(),
            proxy,
            kubelet,
            dns,
            overlay,
        }
    }
}

impl Telemetry {
    /// The text exposition (OpenMetrics) of every metric.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    /// The health check named `name` (made on first use: a role restarted
    /// after a failure gets its old one back, reset to not synced).
    pub fn check(&self, name: &'static str, watch: Watch) -> Arc<Check> {
        let mut checks = self
            .checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = Arc::new(Check {
            name,
            watch,
            base: Instant::now(),
            synced: AtomicBool::new(false),
            pending_since: AtomicU64::new(0),
            last_beat: AtomicU64::new(0),
        });
        match checks.iter_mut().find(|c| c.name == name) {
            Some(c) => *c = fresh.clone(),
            None => checks.push(fresh.clone()),
        }
        fresh
    }

    /// `/livez`, `/healthz` or `/readyz` (`probe`): the code and text.
    fn health(&self, probe: &str, verbose: bool) -> (StatusCode, String) {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let results: Vec<(&str, Result<(), String>)> = checks
            .iter()
            .map(|c| {
                (
                    c.name,
                    if probe == "readyz" {
                        c.ready()
                    } else {
                        c.live()
                    },
                )
            })
            .collect();
        let failed = results.iter().any(|(_, r)| r.is_err());
        for (name, r) in &results {
            if let Err(e) = r {
                warn!(probe, check = name, error = %e, "health check failed");
            }
        }
        if !failed && !verbose {
            return (StatusCode::OK, "ok".into());
        }
        let mut text: String = results
            .iter()
            .map(|(name, r)| match r {
                Ok(()) => format!("[+]{name} ok\n"),
                Err(e) => format!("[-]{name} failed: {e}\n"),
            })
            .collect();
        let verdict = if failed { "failed" } else { "passed" };
        text.push_str(&format!("{probe} check {verdict}\n"));
        let code = if failed {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (code, text)
    }

    /// Serves `/metrics` and the health paths on `addr` until the process
    /// ends. A port that cannot be bound is reported and left: metrics are
    /// never a reason for the node's roles not to run.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "metrics port not bound; no metrics served");
                return;
            }
        };
        info!(%addr, "serving metrics");
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.answer(req.uri().path(), req.uri().query())) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    fn answer(&self, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        let verbose = query.is_some_and(|q| {
            q.split('&')
                .any(|p| p == "verbose" || p.starts_with("verbose="))
        });
        let (code, content_type, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.render(),
            ),
            "/healthz" | "/livez" | "/readyz" => {
                let (code, text) = self.health(&path[1..], verbose);
                (code, "text/plain; charset=utf-8", text)
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "404 page not found\n".into(),
            ),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    }
}
