//! One worker per pod bound to this node: it makes the sandbox, pulls
//! images, runs the containers on containerd under the restart policy with
//! back-off, follows their exits (from containerd's event stream, routed
//! here), writes the pod's status, and on deletion stops the containers
//! within the grace period, tears the sandbox down and removes the pod.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::containerd::{Containerd, Exit, TaskState};
use super::image::{ImageError, ImageInfo, Puller};
use super::sandbox::{self, Cni, PodRef};
use super::spec::{self, SpecInput};

/// What the worker shares with the kubelet.
pub struct Shared {
    pub cd: Containerd,
    pub puller: Puller,
    pub cni: Cni,
    pub client: kube::Client,
    pub pods_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The `skiff-log` binary containerd's shim runs for each container.
    pub log_driver: PathBuf,
    pub cgroup_parent: String,
    pub node_name: String,
    pub node_ip: String,
    /// Tokens for the pods' projected ServiceAccount volumes.
    pub tokens: super::volumes::TokenCache,
    /// What pods' resolv.conf is written from.
    pub dns: super::dns::ClusterDns,
    /// The agent's metrics.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Each pod's last reported (phase is Running, running containers,
    /// other containers), for the running pods and containers gauges.
    pub running: std::sync::Mutex<std::collections::HashMap<String, (bool, usize, usize)>>,
}

impl Shared {
    /// Records pod `uid`'s counts (`None`: it is gone) and sets the gauges.
    fn set_running(&self, uid: &str, counts: Option<(bool, usize, usize)>) {
        let Ok(mut all) = self.running.lock() else {
            return;
        };
        match counts {
            Some(c) => all.insert(uid.to_string(), c),
            None => all.remove(uid),
        };
        let (mut pods, mut running, mut other) = (0usize, 0usize, 0usize);
        for (p, r, o) in all.values() {
            pods += usize::from(*p);
            running += r;
            other += o;
        }
        let k = &self.telemetry.kubelet;
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        k.running_pods.set(n(pods));
        for (container_state, v) in [("running", running), ("exited", other)] {
            k.running_containers
                .get_or_create(&crate::telemetry::StateLabel { container_state })
                .set(n(v));
        }
    }
}

pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.kubernetes.container.name";
pub const LABEL_ATTEMPT: &str = "io.kubernetes.container.restartCount";

const BACKOFF_FIRST: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// How often volumes written from the API are compared with it.
const VOLUME_RESYNC: Duration = Duration::from_secs(5);

/// The containerd id of a container's `attempt`-th run.
pub fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    format!("{uid}-{name}-{attempt}")
}

/// The pod uid a containerd id belongs to.
pub fn uid_of(container_id: &str) -> &str {
    container_id.get(..36).unwrap_or(container_id)
}

#[derive(Clone, Debug, PartialEq)]
enum Run {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        id: String,
        started: String,
    },
    Terminated {
        id: String,
        exit: i32,
        reason: String,
        started: String,
        finished: String,
    },
}

#[derive(Clone, Debug)]
struct Ctr {
    run: Run,
    last: Option<Run>,
    restarts: u32,
    image_id: String,
    /// Not before this instant may it start again; the delay it was.
    backoff: Option<(Instant, Duration)>,
    started_at: Option<Instant>,
    /// The probes of the current run.
    probes: Option<super::probe::Tracker>,
}

impl Ctr {
    /// The next delay before this container may start again (10 s
    /// doubling to 300 s; back to 10 s after a long clean run), noted in
    /// `backoff`.
    fn back_off(&mut self, ran_long: bool) -> Duration {
        let delay = match self.backoff {
            Some((_, d)) if !ran_long => (d * 2).min(BACKOFF_MAX),
            _ => BACKOFF_FIRST,
        };
        self.backoff = Some((Instant::now() + delay, delay));
        delay
    }

    fn new() -> Self {
        Self {
            run: Run::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            restarts: 0,
            image_id: String::new(),
            backoff: None,
            started_at: None,
            probes: None,
        }
    }
}

/// The pod's QoS class (upstream's rules): Guaranteed when every
/// container has cpu and memory limits equal to its requests, BestEffort
/// when no container asks for anything, Burstable otherwise.
pub fn qos_class(pod: &Pod) -> &'static str {
    let containers: Vec<&Container> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .collect();
    let get = |c: &Container, limits: bool, r: &str| {
        c.resources
            .as_ref()
            .and_then(|x| {
                if limits {
                    x.limits.as_ref()
                } else {
                    x.requests.as_ref()
                }
            })
            .and_then(|m| m.get(r))
            .map(|q| q.0.clone())
    };
    let any = containers.iter().any(|c| {
        ["cpu", "memory"]
            .iter()
            .any(|r| get(c, true, r).is_some() || get(c, false, r).is_some())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            // Requests default to limits.
            let limit = get(c, true, r);
            limit.is_some() && get(c, false, r).is_none_or(|q| Some(q) == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn stamp(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| k8s_openapi::jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(now)
}

pub struct Worker {
    shared: Arc<Shared>,
    uid: String,
    pod: Pod,
    ctrs: BTreeMap<String, Ctr>,
    ip: Option<String>,
    /// Every address of the pod (`podIPs`): `ip` first, then a dual-stack
    /// pod's address of the other family.
    ips: Vec<String>,
    sandbox_error: Option<String>,
    last_status: Option<Value>,
    started: String,
    volumes_synced: Option<Instant>,
    /// The pod finished and its network was given back (its addresses
    /// stay in its status, as upstream's do).
    network_released: bool,
    /// Time spent pulling this pod's images (left out of its start SLI).
    pulling: Duration,
    /// The pod start SLI was observed.
    start_observed: bool,
}

/// Where a finished pod's addresses are kept once its network is given
/// back, so a restarted kubelet neither reports it Pending nor wires it
/// again.
const RELEASED: &str = "released-ips.json";

impl Worker {
    pub fn new(shared: Arc<Shared>, pod: Pod) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        // A pod that already ran (a restarted kubelet adopting it) did not
        // start now.
        let ran = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running" | "Succeeded" | "Failed")
        );
        Self {
            shared,
            uid,
            pod,
            ctrs: BTreeMap::new(),
            ip: None,
            ips: Vec::new(),
            sandbox_error: None,
            last_status: None,
            started: now(),
            volumes_synced: None,
            network_released: false,
            pulling: Duration::ZERO,
            start_observed: ran,
        }
    }

    fn dir(&self) -> PathBuf {
        self.shared.pods_dir.join(&self.uid)
    }

    fn name(&self) -> &str {
        self.pod.metadata.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }

    fn containers(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// Runs the pod until it is deleted (from the API or `updates` closes).
    pub async fn run(
        mut self,
        mut updates: watch::Receiver<Option<Pod>>,
        mut exits: mpsc::Receiver<Exit>,
    ) {
        self.adopt().await;
        loop {
            let deleting = self.pod.metadata.deletion_timestamp.is_some();
            if deleting || updates.borrow().is_none() {
                self.terminate(&mut exits).await;
                return;
            }
            self.sync().await;
            self.report().await;
            if !self.network_released && self.finished() {
                self.release_network().await;
            }
            let wake = self
                .ctrs
                .values()
                .filter_map(|c| c.backoff.map(|(t, _)| t))
                .chain(self.ctrs.values().filter_map(|c| c.probes.as_ref()?.next()))
                .filter(|t| *t > Instant::now())
                .min()
                .map(|t| t - Instant::now())
                .unwrap_or(Duration::from_secs(if self.sandbox_error.is_some() {
                    2
                } else {
                    60
                }))
                .min(if self.has_api_volumes() {
                    VOLUME_RESYNC
                } else {
                    Duration::MAX
                });
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        let _ = updates; // closed: the kubelet stops
                        return;
                    }
                    if let Some(p) = updates.borrow().clone() {
                        self.pod = p;
                    }
                }
                Some(exit) = exits.recv() => self.exited(exit),
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// Whether the pod has finished: Succeeded, or Failed, as last
    /// reported (nothing in it runs again).
    fn finished(&self) -> bool {
        self.last_status
            .as_ref()
            .and_then(|s| s["phase"].as_str())
            .is_some_and(|p| p == "Succeeded" || p == "Failed")
    }

    /// What tearing the sandbox down needs, owned for a blocking task: the
    /// CNI setup, the pod's directory, its uid, namespace and name.
    fn teardown_parts(&self) -> (Cni, PathBuf, String, String, String) {
        (
            self.shared.cni.clone(),
            self.dir(),
            self.uid.clone(),
            self.namespace().to_string(),
            self.name().to_string(),
        )
    }

    /// Gives a finished pod's network back (CNI DEL, the namespaces), as
    /// upstream's kubelet stops a finished pod's sandbox: a node running
    /// Jobs would otherwise run out of addresses while their pods are
    /// kept. The containers and their logs stay until the pod goes.
    async fn release_network(&mut self) {
        let (cni, dir, uid, ns, name) = self.teardown_parts();
        let host_network = self.host_network();
        let ips = self.ips.clone();
        let done = tokio::task::spawn_blocking(move || {
            let pod = PodRef {
                namespace: &ns,
                name: &name,
                uid: &uid,
            };
            if !host_network {
                std::fs::write(
                    dir.join(RELEASED),
                    serde_json::to_vec(&ips).unwrap_or_default(),
                )
                .map_err(|e| e.to_string())?;
                cni.del(&dir, &pod).map_err(|e| e.to_string())?;
            }
            sandbox::remove_namespaces(&dir);
            Ok::<_, String>(())
        })
        .await;
        match done {
            Ok(Ok(())) => {
                self.network_released = true;
                info!(pod = %self.name(), "finished; network released");
            }
            Ok(Err(e)) => {
                warn!(pod = %self.name(), error = %e, "releasing a finished pod's network failed; retried")
            }
            Err(e) => {
                warn!(pod = %self.name(), error = %e, "releasing a finished pod's network failed; retried")
            }
        }
    }

    /// Picks up the containers a previous kubelet run left.
    async fn adopt(&mut self) {
        if self.host_network() {
            // The sandbox is there once its namespaces are.
            let ns = sandbox::namespaces(&self.dir());
            if std::path::Path::new(&ns.ipc).exists() {
                self.ip = Some(self.shared.node_ip.clone());
            }
        } else if let Some(r) = Cni::saved_result(&self.dir()) {
            self.ips = skiff_cni_lib::exec::all_ips(&r);
            self.ip = self.ips.first().cloned();
        } else if let Some(ips) = std::fs::read(self.dir().join(RELEASED))
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
        {
            self.ips = ips;
            self.ip = self.ips.first().cloned();
            self.network_released = true;
        }
        let filter = format!("labels.\"{LABEL_POD_UID}\"=={}", self.uid);
        let Ok(list) = self.shared.cd.containers(&filter).await else {
            return;
        };
        for c in list {
            // The run's start as containerd recorded it, so that a
            // restarted kubelet reports the same startedAt.
            let created = stamp(c.created_at.as_ref());
            let name = c.labels.get(LABEL_CONTAINER).cloned().unwrap_or_default();
            let attempt: u32 = c
                .labels
                .get(LABEL_ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let entry = self.ctrs.entry(name.clone()).or_insert_with(Ctr::new);
            if attempt < entry.restarts {
                continue;
            }
            entry.restarts = attempt;
            entry.run = match self.shared.cd.task(&c.id).await {
                Ok(Some(TaskState::Running { .. })) => {
                    entry.started_at = Some(Instant::now());
                    if let Some(spec) = self
                        .pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.containers.iter().find(|x| x.name == name))
                    {
                        entry.probes = Some(super::probe::Tracker::new(spec, Instant::now()));
                    }
                    Run::Running {
                        id: c.id.clone(),
                        started: created,
                    }
                }
                Ok(Some(TaskState::Stopped { exit_status })) => Run::Terminated {
                    id: c.id.clone(),
                    exit: exit_status as i32,
                    reason: if exit_status == 0 {
                        "Completed"
                    } else {
                        "Error"
                    }
                    .into(),
                    started: created,
                    finished: now(),
                },
                _ => Run::Terminated {
                    id: c.id.clone(),
                    exit: 255,
                    reason: "Unknown".into(),
                    started: created,
                    finished: now(),
                },
            };
        }
        if !self.ctrs.is_empty() {
            info!(pod = %self.name(), containers = self.ctrs.len(), "adopted running pod");
        }
    }

    fn exited(&mut self, exit: Exit) {
        for c in self.ctrs.values_mut() {
            if let Run::Running { id, started } = &c.run
                && *id == exit.container_id
            {
                let code = exit.exit_status as i32;
                c.run = Run::Terminated {
                    id: id.clone(),
                    exit: code,
                    reason: if code == 0 { "Completed" } else { "Error" }.into(),
                    started: started.clone(),
                    finished: stamp(exit.exited_at.as_ref()),
                };
                c.probes = None;
            }
        }
    }

    async fn sync(&mut self) {
        if self.ip.is_none() && !self.ensure_sandbox().await {
            return;
        }
        let policy = self.restart_policy();
        if !self.init_step(&policy).await {
            return;
        }
        for c in self.containers() {
            let state = self
                .ctrs
                .entry(c.name.clone())
                .or_insert_with(Ctr::new)
                .clone();
            let start = match &state.run {
                Run::Running { .. } => false,
                Run::Waiting { .. } => state.backoff.is_none_or(|(t, _)| Instant::now() >= t),
                Run::Terminated { exit, .. } => match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => *exit != 0,
                    _ => true,
                },
            };
            if !start {
                continue;
            }
            if let Run::Terminated { .. } = state.run {
                self.schedule_restart(&c.name).await;
                continue;
            }
            self.start(&c).await;
        }
        self.run_probes().await;
        self.refresh_volumes().await;
    }

    /// Where the pod's volumes and environment are read from.
    fn sources(&self) -> super::volumes::Sources<'_> {
        super::volumes::Sources {
            client: &self.shared.client,
            namespace: self.namespace(),
            tokens: &self.shared.tokens,
        }
    }

    fn has_api_volumes(&self) -> bool {
        self.pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(|v| {
                v.config_map.is_some()
                    || v.secret.is_some()
                    || v.downward_api.is_some()
                    || v.projected.is_some()
            })
    }

    /// Keeps configMap, secret, downwardAPI and projected volumes in step
    /// with the API (atomically, see `volumes`), every few seconds.
    async fn refresh_volumes(&mut self) {
        if self
            .volumes_synced
            .is_some_and(|t| t.elapsed() < VOLUME_RESYNC)
        {
            return;
        }
        if !self.has_api_volumes()
            || !self
                .ctrs
                .values()
                .any(|c| matches!(c.run, Run::Running { .. }))
        {
            return;
        }
        self.volumes_synced = Some(Instant::now());
        match super::volumes::prepare(&self.sources(), &self.pod, &self.dir()).await {
            Ok(true) => info!(pod = %self.name(), "volumes updated"),
            Ok(false) => {}
            Err(e) => warn!(pod = %self.name(), error = %e, "refreshing volumes"),
        }
    }

    /// Runs the probes that are due; a failed liveness or startup probe
    /// kills the container, and the restart policy takes it from there.
    async fn run_probes(&mut self) {
        use super::probe::{self, Kind, Outcome};
        let Some(ip) = self.ip.clone() else { return };
        let now = Instant::now();
        for c in self.containers() {
            let Some(st) = self.ctrs.get(&c.name) else {
                continue;
            };
            let (Run::Running { id, .. }, Some(tracker)) = (&st.run, &st.probes) else {
                continue;
            };
            let id = id.clone();
            for kind in tracker.due(now) {
                let Some(p) = probe::of(&c, kind).cloned() else {
                    continue;
                };
                let began = Instant::now();
                let outcome = match (probe::check_network(&c, &p, &ip).await, &p.exec) {
                    (Some(o), _) => o,
                    (None, Some(e)) => {
                        let cmd = e.command.clone().unwrap_or_default();
                        probe::run_exec(&self.shared.cd, &id, &cmd, probe::timeout(&p)).await
                    }
                    (None, None) => Outcome::Failure("the probe has no handler".into()),
                };
                let name = match kind {
                    Kind::Startup => "Startup",
                    Kind::Liveness => "Liveness",
                    Kind::Readiness => "Readiness",
                };
                self.shared
                    .telemetry
                    .probes
                    .observe(&crate::telemetry::ProbeRun {
                        uid: &self.uid,
                        namespace: self.namespace(),
                        pod: self.name(),
                        container: &c.name,
                        probe_type: name,
                        result: match &outcome {
                            Outcome::Success => "successful",
                            Outcome::Failure(_) => "failed",
                        },
                        seconds: began.elapsed().as_secs_f64(),
                    });
                if let Outcome::Failure(why) = &outcome {
                    self.event(
                        "Warning",
                        "Unhealthy",
                        &format!("{name} probe failed: {why}"),
                    )
                    .await;
                }
                let Some(tracker) = self.ctrs.get_mut(&c.name).and_then(|s| s.probes.as_mut())
                else {
                    break;
                };
                if tracker.record(kind, &p, &outcome, Instant::now()) {
                    info!(pod = %self.pod.metadata.name.as_deref().unwrap_or_default(), container = %c.name, probe = name, "probe failed: killing the container");
                    self.event(
                        "Normal",
                        "Killing",
                        &format!(
                            "Container {} failed {} probe, will be restarted",
                            c.name,
                            name.to_lowercase()
                        ),
                    )
                    .await;
                    let _ = self.shared.cd.kill(&id, 9).await;
                    if let Some(st) = self.ctrs.get_mut(&c.name) {
                        st.probes = None;
                    }
                    break;
                }
            }
        }
    }

    fn init_containers(&self) -> Vec<Container> {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.clone())
            .unwrap_or_default()
    }

    /// Whether every init container ran to success.
    fn init_done(&self) -> bool {
        self.init_containers().iter().all(|c| {
            self.ctrs
                .get(&c.name)
                .is_some_and(|s| matches!(s.run, Run::Terminated { exit: 0, .. }))
        })
    }

    /// Whether an init container failed for good (restartPolicy Never).
    fn init_failed(&self) -> bool {
        self.restart_policy() == "Never"
            && self.init_containers().iter().any(|c| {
                self.ctrs
                    .get(&c.name)
                    .is_some_and(|s| matches!(s.run, Run::Terminated { exit, .. } if exit != 0))
            })
    }

    /// Runs the init containers one after another; true once all have
    /// succeeded. A failed one is retried with back-off (the pod's
    /// restartPolicy, Always counting as OnFailure), or fails the pod under
    /// Never.
    async fn init_step(&mut self, policy: &str) -> bool {
        for c in self.init_containers() {
            let st = self
                .ctrs
                .entry(c.name.clone())
                .or_insert_with(Ctr::new)
                .clone();
            match &st.run {
                Run::Terminated { exit: 0, .. } => continue,
                Run::Running { .. } => return false,
                Run::Waiting { .. } => {
                    if st.backoff.is_none_or(|(t, _)| Instant::now() >= t) {
                        self.start(&c).await;
                    }
                    return false;
                }
                Run::Terminated { .. } => {
                    if policy != "Never" {
                        self.schedule_restart(&c.name).await;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// A terminated container waits out its back-off before it runs again.
    async fn schedule_restart(&mut self, name: &str) {
        let Some(c) = self.ctrs.get_mut(name) else {
            return;
        };
        let ran_long = c.started_at.is_some_and(|t| t.elapsed() >= BACKOFF_RESET);
        let delay = c.back_off(ran_long);
        let old = std::mem::replace(
            &mut c.run,
            Run::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container={name} pod={}_{}({})",
                    delay.as_secs(),
                    self.pod.metadata.name.as_deref().unwrap_or_default(),
                    self.pod.metadata.namespace.as_deref().unwrap_or_default(),
                    self.uid
                ),
            },
        );
        if let Run::Terminated { id, .. } = &old {
            self.shared.cd.remove(id).await;
        }
        c.last = Some(old);
        c.restarts += 1;
    }

    /// The pod uses the node's network (no CNI; its IP is the node's).
    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    async fn ensure_sandbox(&mut self) -> bool {
        let dir = self.dir();
        let host_network = self.host_network();
        let hostname = super::dns::hostname(&self.pod);
        let ports: Vec<Value> = self
            .containers()
            .iter()
            .flat_map(|c| c.ports.clone().unwrap_or_default())
            .filter(|p| p.host_port.is_some_and(|h| h > 0))
            .map(|p| {
                json!({"hostPort": p.host_port, "containerPort": p.container_port,
                "protocol": p.protocol.unwrap_or_else(|| "TCP".into()).to_lowercase()})
            })
            .collect();
        let (cni, uid, ns, name) = (
            self.shared.cni.clone(),
            self.uid.clone(),
            self.namespace().to_string(),
            self.name().to_string(),
        );
        let r = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            sandbox::create_namespaces(&dir, &hostname).map_err(|e| e.to_string())?;
            if host_network {
                return Ok(None);
            }
            let pod = PodRef {
                namespace: &ns,
                name: &name,
                uid: &uid,
            };
            cni.add(&dir, &pod, ports)
                .map(Some)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let r = match r {
            Ok(result) => {
                self.ips = match result {
                    Some(result) => skiff_cni_lib::exec::all_ips(&result),
                    None => vec![self.shared.node_ip.clone()],
                };
                self.ip = self.ips.first().cloned();
                self.write_name_files().await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                self.sandbox_error = None;
                info!(pod = %self.name(), ip = ?self.ip, "sandbox ready");
                true
            }
            Err(e) => {
                warn!(pod = %self.name(), error = %e, "sandbox failed");
                self.event(
                    "Warning",
                    "FailedCreatePodSandBox",
                    &format!("Failed to create pod sandbox: {e}"),
                )
                .await;
                self.sandbox_error = Some(e);
                false
            }
        }
    }

    /// The pod's hostname, /etc/hosts and resolv.conf, in its directory
    /// (see [`super::dns`]). What the resolver's limits drop is told in an
    /// event, as upstream's kubelet does.
    async fn write_name_files(&self) -> Result<(), String> {
        let dns = &self.shared.dns;
        let (resolv, dropped) =
            super::dns::resolv_conf(&self.pod, dns, || super::dns::node_resolv(&dns.resolv_conf))
                .map_err(|e| e.to_string())?;
        let hosts = if self.host_network() {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            super::dns::hosts(&self.pod, &self.ips, &dns.domain)
        };
        let [(hosts_path, _), (resolv_path, _), (hostname_path, _)] =
            super::dns::files(&self.dir());
        let hostname = format!("{}\n", super::dns::hostname(&self.pod));
        for (path, text) in [
            (hosts_path, hosts),
            (resolv_path, resolv.render()),
            (hostname_path, hostname),
        ] {
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        if !dropped.is_empty() {
            self.event(
                "Warning",
                "DNSConfigForming",
                &format!(
                    "the resolver's limits were exceeded; left out: {}",
                    dropped.join(", ")
                ),
            )
            .await;
        }
        Ok(())
    }

    async fn image(&mut self, c: &Container) -> Result<ImageInfo, (String, String)> {
        let image = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            let tagged_latest = image
                .rsplit('/')
                .next()
                .is_some_and(|last| !last.contains(':') || last.ends_with(":latest"));
            if tagged_latest && !image.contains('@') {
                "Always"
            } else {
                "IfNotPresent"
            }
            .into()
        });
        let local = match self.shared.puller.local(&self.shared.cd, &image).await {
            Ok(l) => l,
            Err(ImageError::InvalidName { why, .. }) => {
                return Err((
                    "InvalidImageName".into(),
                    format!("Failed to apply default image tag {image:?}: {why}"),
                ));
            }
            Err(e) => return Err(("ErrImagePull".into(), e.to_string())),
        };
        match (policy.as_str(), local) {
            ("Never", Some(l)) | ("IfNotPresent", Some(l)) => Ok(l),
            ("Never", None) => Err((
                "ErrImageNeverPull".into(),
                format!("Container image {image:?} is not present with pull policy of Never"),
            )),
            _ => {
                self.event("Normal", "Pulling", &format!("Pulling image {image:?}"))
                    .await;
                let pull_started = Instant::now();
                let pulled = self
                    .shared
                    .puller
                    .pull(&self.shared.cd, &image, policy == "Always")
                    .await;
                self.pulling += pull_started.elapsed();
                match pulled {
                    Ok(i) => {
                        self.event(
                            "Normal",
                            "Pulled",
                            &format!("Successfully pulled image {image:?}"),
                        )
                        .await;
                        Ok(i)
                    }
                    Err(e) => Err(("ErrImagePull".into(), e.to_string())),
                }
            }
        }
    }

    async fn start(&mut self, c: &Container) {
        let img = match self.image(c).await {
            Ok(i) => i,
            Err((reason, message)) => {
                warn!(pod = %self.name(), container = %c.name, %reason, %message, "image not available");
                let st = self.ctrs.entry(c.name.clone()).or_insert_with(Ctr::new);
                // A failed pull backs off: ErrImagePull, then ImagePullBackOff.
                let reason = if matches!(&st.run, Run::Waiting { reason: r, .. } if r == "ErrImagePull" || r == "ImagePullBackOff")
                    && reason == "ErrImagePull"
                {
                    "ImagePullBackOff".to_string()
                } else {
                    reason
                };
                st.run = Run::Waiting {
                    reason: reason.clone(),
                    message: message.clone(),
                };
                st.back_off(false);
                self.event(
                    "Warning",
                    if reason == "InvalidImageName" {
                        "InspectFailed"
                    } else {
                        "Failed"
                    },
                    &message,
                )
                .await;
                return;
            }
        };
        let attempt = self.ctrs.get(&c.name).map(|s| s.restarts).unwrap_or(0);
        let id = container_id(&self.uid, &c.name, attempt);
        let image_env: Vec<(String, String)> = img.config["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                e.as_str()?
                    .split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let configured = async {
            let src = self.sources();
            super::volumes::prepare(&src, &self.pod, &self.dir()).await?;
            let env = super::volumes::environment(&src, &self.pod, c, image_env).await?;
            let claims = super::local_volumes::claim_paths(&src, &self.pod).await?;
            let mut mounts = super::volumes::mounts(&self.pod, c, &self.dir(), &claims)?;
            // The pod's name files, where the container does not mount
            // something of its own there.
            for (src, dst) in super::dns::files(&self.dir()) {
                if src.exists() && !mounts.iter().any(|(_, d, _)| d == dst) {
                    mounts.push((src.display().to_string(), dst.to_string(), false));
                }
            }
            Ok::<_, super::volumes::ConfigError>((env, mounts))
        }
        .await;
        let (env, bind_mounts) = match configured {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %self.name(), container = %c.name, error = %e, "container config");
                let st = self.ctrs.entry(c.name.clone()).or_insert_with(Ctr::new);
                st.back_off(false);
                st.run = Run::Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: e.to_string(),
                };
                self.event("Warning", "Failed", &format!("Error: {e}"))
                    .await;
                return;
            }
        };
        let ns = sandbox::namespaces(&self.dir());
        let cgroups = format!("{}/pod{}/{}", self.shared.cgroup_parent, self.uid, id);
        let spec = spec::runtime_spec(&SpecInput {
            pod: &self.pod,
            container: c,
            image_config: &img.config,
            env: &env,
            namespaces: &ns,
            hostname: &super::dns::hostname(&self.pod),
            cgroups_path: &cgroups,
            mounts: &bind_mounts,
        });
        let labels = [
            (LABEL_POD_UID, self.uid.clone()),
            (LABEL_POD_NAME, self.name().to_string()),
            (LABEL_POD_NAMESPACE, self.namespace().to_string()),
            (LABEL_CONTAINER, c.name.clone()),
            (LABEL_ATTEMPT, attempt.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let log_dir = super::logs::pod_dir(
            &self.shared.log_dir,
            self.namespace(),
            self.name(),
            &self.uid,
        )
        .join(&c.name);
        let _ = std::fs::create_dir_all(&log_dir);
        let log = super::logs::uri(
            &self.shared.log_driver,
            &log_dir.join(format!("{attempt}.log")),
            super::logs::MAX_SIZE,
        );
        let started = async {
            // The snapshot is leased until the container references it.
            let cd = self.shared.cd.leased("container").await?;
            let created = async {
                let mounts = match cd.prepare(&id, &img.top_layer, Default::default()).await {
                    Ok(m) => m,
                    Err(e) if e.is_already_exists() => cd.mounts(&id).await?,
                    Err(e) => return Err(e),
                };
                match cd.create_container(&id, &img.name, &spec, labels).await {
                    Ok(()) => Ok(mounts),
                    Err(e) if e.is_already_exists() => Ok(mounts),
                    Err(e) => Err(e),
                }
            }
            .await;
            cd.release().await;
            self.shared.cd.start_task(&id, created?, &log).await
        }
        .await;
        let never = self.restart_policy() == "Never";
        let st = self.ctrs.entry(c.name.clone()).or_insert_with(Ctr::new);
        st.image_id = img.id.clone();
        match started {
            Ok(pid) => {
                st.run = Run::Running {
                    id: id.clone(),
                    started: now(),
                };
                st.started_at = Some(Instant::now());
                st.probes = Some(super::probe::Tracker::new(c, Instant::now()));
                info!(pod = %self.pod.metadata.name.as_deref().unwrap_or_default(), container = %c.name, pid, "container started");
                self.event(
                    "Normal",
                    "Started",
                    &format!("Started container {}", c.name),
                )
                .await;
            }
            Err(e) => {
                let msg = e.to_string();
                self.shared.cd.remove(&id).await;
                let failed = Run::Terminated {
                    id: id.clone(),
                    exit: 128,
                    reason: "StartError".into(),
                    started: now(),
                    finished: now(),
                };
                if never {
                    // Never restarts, not even a container that failed to
                    // start: it ends as exit 128 and the pod fails.
                    st.run = failed;
                } else {
                    st.last = Some(failed);
                    st.restarts += 1;
                    st.back_off(false);
                    st.run = Run::Waiting {
                        reason: "RunContainerError".into(),
                        message: msg.clone(),
                    };
                }
                self.event("Warning", "Failed", &format!("Error: {msg}"))
                    .await;
            }
        }
    }

    /// Graceful stop: SIGTERM, the grace period, SIGKILL; then the
    /// sandbox goes and the pod object is removed.
    async fn terminate(&mut self, exits: &mut mpsc::Receiver<Exit>) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let running: Vec<String> = self
            .ctrs
            .values()
            .filter_map(|c| match &c.run {
                Run::Running { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect();
        let cd = self.shared.cd.clone();
        let deadline = Instant::now() + Duration::from_secs(grace);
        // preStop hooks run first, inside the grace period (upstream's
        // order), each container's in parallel with the others'.
        if grace > 0 {
            let hooks = self.containers().into_iter().filter_map(|c| {
                let hook = c.lifecycle.as_ref()?.pre_stop.clone()?;
                let id = match &self.ctrs.get(&c.name)?.run {
                    Run::Running { id, .. } => id.clone(),
                    _ => return None,
                };
                Some((c, hook, id))
            });
            let ip = self.ip.clone().unwrap_or_default();
            let runs = hooks.map(|(c, hook, id)| {
                let (cd, ip) = (cd.clone(), ip.clone());
                async move {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let outcome = super::probe::run_hook(&cd, &id, &c, &hook, &ip, left).await;
                    if let super::probe::Outcome::Failure(why) = outcome {
                        warn!(container = %c.name, %why, "preStop hook failed");
                    }
                }
            });
            let _ = tokio::time::timeout_at(deadline.into(), futures::future::join_all(runs)).await;
        }
        for id in &running {
            let _ = cd.kill(id, if grace == 0 { 9 } else { 15 }).await;
        }
        // Exits as they come, until all are gone or the grace period ends;
        // what still runs then is SIGKILLed by `remove_containers`.
        let mut alive: Vec<String> = running.clone();
        while !alive.is_empty() {
            match tokio::time::timeout_at(deadline.into(), exits.recv()).await {
                Ok(Some(e)) => {
                    alive.retain(|a| *a != e.container_id);
                    self.exited(e);
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.remove_containers().await;
        let (cni, dir, uid, ns, name) = self.teardown_parts();
        self.shared.tokens.forget_pod(&uid);
        let host_network = self.host_network();
        let torn = tokio::task::spawn_blocking(move || {
            let pod = PodRef {
                namespace: &ns,
                name: &name,
                uid: &uid,
            };
            let r = if host_network {
                Ok(())
            } else {
                cni.del(&dir, &pod)
            };
            sandbox::remove_namespaces(&dir);
            super::volumes::release(&dir);
            if r.is_ok() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            r
        })
        .await;
        if let Ok(Err(e)) = &torn {
            warn!(pod = %self.name(), error = %e, "CNI DEL failed; the sandbox is kept for the next kubelet start to retry");
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), self.namespace());
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        self.shared.set_running(&self.uid, None);
        self.shared.telemetry.probes.forget(&self.uid);
        match api.delete(self.name(), &dp).await {
            Ok(_) => info!(pod = %self.name(), "pod removed"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => warn!(pod = %self.name(), error = %e, "removing the pod object failed"),
        }
    }

    async fn remove_containers(&self) {
        let filter = format!("labels.\"{LABEL_POD_UID}\"=={}", self.uid);
        let cd = &self.shared.cd;
        if let Ok(list) = cd.containers(&filter).await {
            for c in list {
                cd.remove(&c.id).await;
            }
        }
    }

    fn status(&self) -> Value {
        let containers = self.containers();
        let policy = self.restart_policy();
        let mut statuses = Vec::new();
        let mut all_ready = !containers.is_empty();
        let (mut running_n, mut succeeded, mut failed, mut waiting) = (0, 0, 0, 0);
        for c in &containers {
            let st = self.ctrs.get(&c.name).cloned().unwrap_or_else(Ctr::new);
            let (s, ready) = self.container_status(c);
            all_ready &= ready;
            match &st.run {
                Run::Running { .. } => running_n += 1,
                Run::Terminated { exit: 0, .. } => succeeded += 1,
                Run::Terminated { .. } => failed += 1,
                Run::Waiting { .. } => waiting += 1,
            }
            statuses.push(s);
        }
        let init_statuses: Vec<Value> = self
            .init_containers()
            .iter()
            .map(|c| self.container_status(c).0)
            .collect();
        let (init_done, init_failed) = (self.init_done(), self.init_failed());
        let n = containers.len();
        let phase = if init_failed {
            "Failed"
        } else if self.ip.is_none() || !init_done {
            "Pending"
        } else if n > 0 && succeeded == n && policy != "Always" {
            "Succeeded"
        } else if n > 0 && failed + succeeded == n && failed > 0 && policy == "Never" {
            "Failed"
        } else if running_n > 0
            || (waiting < n && policy == "Always")
            || self.ctrs.values().any(|c| c.restarts > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let prev = |ty: &str, status: &str| {
            self.last_status
                .as_ref()
                .and_then(|s| s["conditions"].as_array())
                .and_then(|cs| cs.iter().find(|c| c["type"] == ty && c["status"] == status))
                .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
                .unwrap_or_else(now)
        };
        let cond = |ty: &str, ok: bool, reason: &str| {
            let status = if ok { "True" } else { "False" };
            let mut c =
                json!({"type": ty, "status": status, "lastTransitionTime": prev(ty, status)});
            if !ok && !reason.is_empty() {
                c["reason"] = json!(reason);
            }
            c
        };
        let mut status = json!({
            "phase": phase,
            "hostIP": self.shared.node_ip,
            "hostIPs": [{"ip": self.shared.node_ip}],
            "startTime": self.started,
            "conditions": [
                cond("PodReadyToStartContainers", self.ip.is_some(), ""),
                cond("Initialized", init_done, "ContainersNotInitialized"),
                cond("ContainersReady", all_ready, "ContainersNotReady"),
                cond("Ready", all_ready, "ContainersNotReady"),
                cond("PodScheduled", true, ""),
            ],
            "containerStatuses": statuses,
            "qosClass": qos_class(&self.pod),
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = Value::Array(init_statuses);
        }
        if let Some(ip) = &self.ip {
            status["podIP"] = json!(ip);
            let ips: Vec<&String> = if self.ips.is_empty() {
                vec![ip]
            } else {
                self.ips.iter().collect()
            };
            status["podIPs"] = ips.iter().map(|ip| json!({"ip": ip})).collect();
        }
        status
    }

    /// One container's status and whether it is ready.
    fn container_status(&self, c: &Container) -> (Value, bool) {
        let st = self.ctrs.get(&c.name).cloned().unwrap_or_else(Ctr::new);
        let state = |r: &Run| match r {
            Run::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if !message.is_empty() {
                    w["message"] = json!(message);
                }
                json!({"waiting": w})
            }
            Run::Running { started, .. } => json!({"running": {"startedAt": started}}),
            Run::Terminated {
                id,
                exit,
                reason,
                started,
                finished,
            } => json!({"terminated": {
                "exitCode": exit, "reason": reason, "startedAt": started, "finishedAt": finished,
                "containerID": format!("containerd://{id}")}}),
        };
        let running = matches!(st.run, Run::Running { .. });
        let ready = running && st.probes.as_ref().is_none_or(|p| p.ready());
        let started = running && st.probes.as_ref().is_none_or(|p| p.started());
        let mut s = json!({"name": c.name, "image": c.image, "imageID": st.image_id,
            "ready": ready, "started": started, "restartCount": st.restarts, "state": state(&st.run)});
        match &st.run {
            Run::Running { id, .. } | Run::Terminated { id, .. } => {
                s["containerID"] = json!(format!("containerd://{id}"));
            }
            Run::Waiting { .. } => {}
        }
        s["lastState"] = st.last.as_ref().map(state).unwrap_or_else(|| json!({}));
        (s, ready)
    }

    /// Writes the status when it changed.
    async fn report(&mut self) {
        let st = self.status();
        if self.last_status.as_ref() == Some(&st) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), self.namespace());
        match api
            .patch_status(
                self.name(),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": st})),
            )
            .await
        {
            Ok(_) => {
                self.record(&st);
                self.last_status = Some(st);
            }
            Err(e) => warn!(pod = %self.name(), error = %e, "status update failed"),
        }
    }

    /// The metrics of a reported status: the running gauges, and the pod
    /// start SLI the first time every container runs (as upstream, from
    /// the pod's creation as the API stamped it, image pulls left out).
    fn record(&mut self, st: &Value) {
        let statuses = st["containerStatuses"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let running = statuses
            .iter()
            .filter(|c| c["state"].get("running").is_some())
            .count();
        let phase_running = st["phase"] == "Running";
        self.shared.set_running(
            &self.uid,
            Some((phase_running, running, statuses.len() - running)),
        );
        if self.start_observed || !phase_running || running == 0 || running < statuses.len() {
            return;
        }
        self.start_observed = true;
        let Some(created) = self.pod.metadata.creation_timestamp.as_ref() else {
            return;
        };
        let since = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
        let seconds = since.as_secs_f64() - self.pulling.as_secs_f64();
        self.shared
            .telemetry
            .kubelet
            .pod_start
            .observe(seconds.max(0.0));
    }

    async fn event(&self, ty: &str, reason: &str, message: &str) {
        use k8s_openapi::api::core::v1::Event;
        let api: Api<Event> = Api::namespaced(self.shared.client.clone(), self.namespace());
        let ev = json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{}.", self.name()), "namespace": self.namespace()},
            "involvedObject": {"kind": "Pod", "name": self.name(), "namespace": self.namespace(), "uid": self.uid, "apiVersion": "v1"},
            "type": ty, "reason": reason, "message": message,
            "source": {"component": "kubelet", "host": self.shared.node_name},
            "firstTimestamp": now(), "lastTimestamp": now(), "count": 1});
        if let Ok(ev) = serde_json::from_value::<Event>(ev)
            && let Err(e) = api.create(&Default::default(), &ev).await
        {
            warn!(error = %e, "event not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    /// Quantities by resource name.
    type Amounts<'a> = &'a [(&'a str, &'a str)];

    /// A pod whose containers have these (requests, limits).
    fn pod(resources: Vec<Option<(Amounts, Amounts)>>) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect()
            })
        };
        Pod {
            spec: Some(PodSpec {
                containers: resources
                    .into_iter()
                    .map(|r| Container {
                        resources: r.map(|(req, lim)| ResourceRequirements {
                            requests: map(req),
                            limits: map(lim),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        assert_eq!(qos_class(&pod(vec![None])), "BestEffort");
        let both = [("cpu", "1"), ("memory", "1Gi")];
        assert_eq!(qos_class(&pod(vec![Some((&both, &both))])), "Guaranteed");
        assert_eq!(
            qos_class(&pod(vec![Some((&[], &both))])),
            "Guaranteed",
            "requests default to limits"
        );
        assert_eq!(
            qos_class(&pod(vec![Some((&[("cpu", "1")], &[]))])),
            "Burstable"
        );
        assert_eq!(
            qos_class(&pod(vec![Some((&both, &both)), None])),
            "Burstable"
        );
    }
}
