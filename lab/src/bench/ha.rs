//! The high-availability figures of `bench control`, on the host's
//! loopback:
//! - write throughput: ConfigMap creates, many in flight, through one
//!   replica on a one-member etcd, and spread over three replicas on a
//!   three-member etcd (the ratio is what the cluster costs);
//! - failover: two replicas on a three-member etcd, the leader killed
//!   (SIGKILL), and the time until the other holds both leases.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use skiff_tests::control::{ControlPlane, Etcd};

use super::stats::pct;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, 0.5)
}

const LEASES: [&str; 2] = ["kube-scheduler", "kube-controller-manager"];

/// Creates `n` ConfigMaps, `inflight` at once, spread over `clients`;
/// creates per second.
async fn writes(clients: &[kube::Client], n: usize, inflight: usize) -> Result<f64> {
    let t = Instant::now();
    let done: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api: Api<ConfigMap> =
                Api::namespaced(clients[i % clients.len()].clone(), "default");
            async move {
                let cm: ConfigMap = serde_json::from_value(
                    json!({"metadata": {"name": format!("cm{i}")}, "data": {"i": i.to_string()}}),
                )?;
                api.create(&PostParams::default(), &cm).await?;
                Ok(())
            }
        })
        .buffer_unordered(inflight)
        .collect()
        .await;
    for d in done {
        d?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// `replicas` replicas on an etcd of `members` members.
fn control_plane(members: usize, replicas: usize) -> Vec<ControlPlane> {
    let etcd = if members > 1 {
        Etcd::start_local_cluster(members)
    } else {
        Etcd::start()
    };
    let first = ControlPlane::start_on_etcd(etcd, &[]);
    let mut all: Vec<ControlPlane> = (1..replicas).map(|_| first.replica(&[])).collect();
    all.insert(0, first);
    all
}

async fn clients(cps: &[ControlPlane]) -> Result<Vec<kube::Client>> {
    let mut out = Vec::new();
    for cp in cps {
        out.push(super::control::client(&cp.kubeconfig).await?);
    }
    Ok(out)
}

fn identity(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.dir.path.join("leader-identity"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn holds_both(cp: &ControlPlane, id: &str) -> bool {
    LEASES
        .iter()
        .all(|l| cp.jsonpath(&["lease", "-n", "kube-system", l], "{.spec.holderIdentity}") == id)
}

/// Waits until `id` holds both leases, as `cp` reports them; how long.
fn wait_holder(cp: &ControlPlane, id: &str, limit: Duration, what: &str) -> Result<f64> {
    let t = Instant::now();
    while !holds_both(cp, id) {
        anyhow::ensure!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// One failover: seconds from the leader's SIGKILL until the other
/// replica holds both leases.
fn failover() -> Result<f64> {
    let mut cps = control_plane(3, 2);
    let (a, b) = (identity(&cps[0]), identity(&cps[1]));
    wait_holder(
        &cps[1],
        &a,
        Duration::from_secs(30),
        "the first replica never led",
    )?;
    cps[0].proc.kill_now();
    wait_holder(&cps[1], &b, Duration::from_secs(60), "no takeover")
}

pub(crate) async fn run(writes_n: usize, rounds: usize) -> Result<Value> {
    let inflight = 32;
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternated, so that drift on the machine falls on both.
        for members in [1, 3] {
            let cps = tokio::task::spawn_blocking(move || control_plane(members, members)).await?;
            let rate = writes(&clients(&cps).await?, writes_n, inflight).await?;
            eprintln!(
                "  round {r}: {members} replica(s) on {members} etcd member(s): {rate:.0} creates/s"
            );
            if members == 1 {
                one.push(rate);
            } else {
                three.push(rate);
            }
            tokio::task::spawn_blocking(move || drop(cps)).await?;
        }
    }
    let mut takeovers = Vec::new();
    for r in 0..rounds {
        let s = tokio::task::spawn_blocking(failover).await??;
        eprintln!("  round {r}: the other replica led {s:.1} s after the kill");
        takeovers.push(s);
    }
    let ratios: Vec<f64> = three.iter().zip(&one).map(|(t, o)| t / o).collect();
    Ok(json!({
        "writes": writes_n,
        "inflight": inflight,
        "one_replica_creates_per_s": median(&one),
        "three_replicas_creates_per_s": median(&three),
        "three_over_one": median(&ratios),
        "ratios": ratios,
        "failover_s": takeovers,
        "failover_median_s": median(&takeovers),
    }))
}
