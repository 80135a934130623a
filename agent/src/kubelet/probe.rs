//! Liveness, readiness and startup probes with upstream's semantics:
//! `initialDelaySeconds`, `periodSeconds` (10), `timeoutSeconds` (1),
//! `successThreshold` (1), `failureThreshold` (3); liveness and readiness
//! wait for the startup probe to succeed; a container without a readiness
//! probe is ready once started. [`Tracker`] is the pure bookkeeping;
//! [`check`] runs one probe (httpGet and tcpSocket from the node to the
//! pod's IP, exec through containerd).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// One probe's running tally.
#[derive(Clone, Debug)]
pub struct Tally {
    pub next: Instant,
    successes: i32,
    failures: i32,
    /// The probe's verdict so far (startup/readiness start false,
    /// liveness starts true).
    pub passing: bool,
}

/// The outcome of one probe run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

pub fn period(p: &Probe) -> Duration {
    secs(p.period_seconds, 10).max(Duration::from_secs(1))
}

pub fn timeout(p: &Probe) -> Duration {
    secs(p.timeout_seconds, 1).max(Duration::from_secs(1))
}

/// The probes of one running container.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    pub startup: Option<Tally>,
    pub liveness: Option<Tally>,
    pub readiness: Option<Tally>,
}

impl Tracker {
    /// Fresh tallies for a container that started at `at`.
    pub fn new(c: &Container, at: Instant) -> Self {
        let tally = |p: &Option<Probe>, passing: bool| {
            p.as_ref().map(|p| Tally {
                next: at + secs(p.initial_delay_seconds, 0),
                successes: 0,
                failures: 0,
                passing,
            })
        };
        Self {
            startup: tally(&c.startup_probe, false),
            liveness: tally(&c.liveness_probe, true),
            readiness: tally(&c.readiness_probe, false),
        }
    }

    /// Whether the container counts as started (no startup probe, or it
    /// passed).
    pub fn started(&self) -> bool {
        self.startup.as_ref().is_none_or(|t| t.passing)
    }

    pub fn ready(&self) -> bool {
        self.started() && self.readiness.as_ref().is_none_or(|t| t.passing)
    }

    /// The probes due at `now`.
    pub fn due(&self, now: Instant) -> Vec<Kind> {
        let mut out = Vec::new();
        if let Some(t) = &self.startup
            && !t.passing
            && t.next <= now
        {
            out.push(Kind::Startup);
        }
        if self.started() {
            if self.liveness.as_ref().is_some_and(|t| t.next <= now) {
                out.push(Kind::Liveness);
            }
            if self.readiness.as_ref().is_some_and(|t| t.next <= now) {
                out.push(Kind::Readiness);
            }
        }
        out
    }

    /// The next instant a probe is due.
    pub fn next(&self) -> Option<Instant> {
        let mut n: Vec<Instant> = Vec::new();
        if let Some(t) = &self.startup
            && !t.passing
        {
            n.push(t.next);
        }
        if self.started() {
            n.extend(self.liveness.as_ref().map(|t| t.next));
            n.extend(self.readiness.as_ref().map(|t| t.next));
        }
        n.into_iter().min()
    }

    /// Records a result; true when the container must be killed (liveness
    /// or startup failed `failureThreshold` times in a row).
    pub fn record(&mut self, kind: Kind, probe: &Probe, outcome: &Outcome, now: Instant) -> bool {
        let success_needed = probe.success_threshold.unwrap_or(1).max(1);
        let failure_needed = probe.failure_threshold.unwrap_or(3).max(1);
        let t = match kind {
            Kind::Startup => self.startup.as_mut(),
            Kind::Liveness => self.liveness.as_mut(),
            Kind::Readiness => self.readiness.as_mut(),
        };
        let Some(t) = t else { return false };
        t.next = now + period(probe);
        match outcome {
            Outcome::Success => {
                t.failures = 0;
                t.successes += 1;
                if t.successes >= success_needed {
                    t.passing = true;
                }
                false
            }
            Outcome::Failure(_) => {
                t.successes = 0;
                t.failures += 1;
                if t.failures >= failure_needed {
                    t.passing = false;
                    return matches!(kind, Kind::Liveness | Kind::Startup);
                }
                false
            }
        }
    }
}

/// The probe of `kind` on a container.
pub fn of(c: &Container, kind: Kind) -> Option<&Probe> {
    match kind {
        Kind::Startup => c.startup_probe.as_ref(),
        Kind::Liveness => c.liveness_probe.as_ref(),
        Kind::Readiness => c.readiness_probe.as_ref(),
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
pub fn port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

/// Runs an HTTP GET or a TCP connect against the pod (exec probes are run
/// by the caller, through containerd). None for an exec probe.
pub async fn check_network(c: &Container, probe: &Probe, pod_ip: &str) -> Option<Outcome> {
    let limit = timeout(probe);
    if let Some(h) = &probe.http_get {
        let Some(port) = port(c, &h.port) else {
            return Some(Outcome::Failure(format!("bad port {:?}", h.port)));
        };
        let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .flatten()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        return Some(
            match tokio::time::timeout(limit, http_get(&host, port, &path, &headers)).await {
                Ok(Ok(code)) if (200..400).contains(&code) => Outcome::Success,
                Ok(Ok(code)) => {
                    Outcome::Failure(format!("HTTP probe failed with statuscode: {code}"))
                }
                Ok(Err(e)) => Outcome::Failure(format!("Get \"http://{host}:{port}{path}\": {e}")),
                Err(_) => Outcome::Failure(format!(
                    "Get \"http://{host}:{port}{path}\": context deadline exceeded"
                )),
            },
        );
    }
    if let Some(t) = &probe.tcp_socket {
        let Some(port) = port(c, &t.port) else {
            return Some(Outcome::Failure(format!("bad port {:?}", t.port)));
        };
        let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
        return Some(
            match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
            {
                Ok(Ok(_)) => Outcome::Success,
                Ok(Err(e)) => Outcome::Failure(format!("dial tcp {host}:{port}: {e}")),
                Err(_) => Outcome::Failure(format!("dial tcp {host}:{port}: i/o timeout")),
            },
        );
    }
    None
}

/// Runs `cmd` in the container (as root, without I/O) and judges its
/// exit status, for exec probes and hooks.
pub async fn run_exec(
    cd: &super::containerd::Containerd,
    id: &str,
    cmd: &[String],
    limit: Duration,
) -> Outcome {
    static EXECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let exec_id = format!(
        "skiff-exec-{}",
        EXECS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let process = serde_json::json!({"args": cmd, "cwd": "/", "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]});
    match cd.exec_wait(id, &exec_id, &process, limit).await {
        Ok(Some(0)) => Outcome::Success,
        Ok(Some(code)) => Outcome::Failure(format!("command {cmd:?} exited with {code}")),
        Ok(None) => Outcome::Failure(format!("command {cmd:?} timed out after {limit:?}")),
        Err(e) => Outcome::Failure(e.to_string()),
    }
}

/// Runs a lifecycle hook (exec through containerd, or httpGet against
/// the pod) within `limit`.
pub async fn run_hook(
    cd: &super::containerd::Containerd,
    id: &str,
    c: &Container,
    hook: &k8s_openapi::api::core::v1::LifecycleHandler,
    pod_ip: &str,
    limit: Duration,
) -> Outcome {
    if let Some(cmd) = hook.exec.as_ref().and_then(|e| e.command.clone()) {
        return run_exec(cd, id, &cmd, limit).await;
    }
    if let Some(h) = &hook.http_get {
        let probe = Probe {
            http_get: Some(h.clone()),
            timeout_seconds: Some(limit.as_secs().max(1) as i32),
            ..Default::default()
        };
        return check_network(c, &probe, pod_ip)
            .await
            .unwrap_or(Outcome::Failure("no handler".into()));
    }
    Outcome::Failure("the hook has no handler".into())
}

/// A minimal HTTP/1.1 GET whose only product is the status code, as the
/// kubelet's prober reads it.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(failure: i32, success: i32) -> Probe {
        Probe {
            failure_threshold: Some(failure),
            success_threshold: Some(success),
            period_seconds: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn liveness_kills_after_the_failure_threshold_and_readiness_flips() {
        let c = Container {
            liveness_probe: Some(probe(3, 1)),
            readiness_probe: Some(probe(2, 2)),
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut t = Tracker::new(&c, t0);
        assert!(!t.ready(), "not ready before the readiness probe passes");
        let (live, ready) = (probe(3, 1), probe(2, 2));
        let fail = Outcome::Failure("x".into());
        assert!(!t.record(Kind::Readiness, &ready, &Outcome::Success, t0));
        assert!(!t.ready(), "successThreshold 2");
        t.record(Kind::Readiness, &ready, &Outcome::Success, t0);
        assert!(t.ready());
        t.record(Kind::Readiness, &ready, &fail, t0);
        assert!(t.ready(), "one failure of two");
        t.record(Kind::Readiness, &ready, &fail, t0);
        assert!(!t.ready());
        assert!(!t.record(Kind::Liveness, &live, &fail, t0));
        assert!(!t.record(Kind::Liveness, &live, &fail, t0));
        assert!(
            t.record(Kind::Liveness, &live, &fail, t0),
            "third failure kills"
        );
    }

    #[test]
    fn startup_gates_the_other_probes() {
        let c = Container {
            startup_probe: Some(probe(2, 1)),
            liveness_probe: Some(probe(1, 1)),
            ..Default::default()
        };
        let now = Instant::now();
        let mut t = Tracker::new(&c, now);
        assert_eq!(t.due(now), vec![Kind::Startup]);
        assert!(!t.started() && !t.ready());
        t.record(Kind::Startup, &probe(2, 1), &Outcome::Success, now);
        assert!(
            t.started() && t.ready(),
            "no readiness probe: ready once started"
        );
        assert_eq!(t.due(now), vec![Kind::Liveness]);
    }
}
