//! The high-availability figures of `bench control`:
//! - write throughput: Pod creates, many in flight, through the apiservers
//!   alone (no scheduler writing status for pods no node can take): one
//!   replica on a one-member etcd, and spread over three replicas on a
//!   three-member etcd. Each beside the limit it is built on: the same
//!   etcd's own put rate, for the bytes a Pod is stored as, as many in
//!   flight, on the host's loopback;
//! - failover: two replicas on a three-member etcd and a node object; the
//!   leader killed (SIGKILL) and a pod created at once: the time until the
//!   other replica holds both leases, and until it binds the pod (its first
//!   scheduling decision);
//! - agent failover: a one-node cluster (a real agent) and a second
//!   replica; the apiserver the agent uses killed and a Service created at
//!   once through the other: the time until the agent has programmed it
//!   (its watch delivered a change again). Rounds take the two apiservers
//!   in turn, the killed one started again after each.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use skiff_tests::cluster::Cluster;
use skiff_tests::control::{ControlPlane, Etcd};

use super::stats::pct;

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, 0.5)
}

const LEASES: [&str; 2] = ["kube-scheduler", "kube-controller-manager"];
const INFLIGHT: usize = 32;

/// Runs `n` of `op(i)`, `INFLIGHT` at once; how many per second.
async fn rate<F, Fut>(n: usize, op: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let t = Instant::now();
    let done: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(op)
        .buffer_unordered(INFLIGHT)
        .collect()
        .await;
    for d in done {
        d?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Creates `n` pods spread over `clients`; creates per second.
async fn pod_creates(clients: &[kube::Client], n: usize) -> Result<f64> {
    rate(n, |i| {
        let api: Api<Pod> = Api::namespaced(clients[i % clients.len()].clone(), "default");
        async move {
            api.create(
                &PostParams::default(),
                &super::bench_pod(&format!("p{i}"), "default"),
            )
            .await?;
            Ok(())
        }
    })
    .await
}

/// etcd's own rate for `n` puts of what the apiserver stored for pod
/// `p0`, under other keys; puts per second.
async fn etcd_puts(etcd: &Etcd, n: usize) -> Result<f64> {
    let e = super::etcd_client(etcd).await?;
    let mut kv = e.kv_client();
    let stored = kv.get("/registry/pods/default/p0", None).await?;
    let value = stored
        .kvs()
        .first()
        .map(|kv| kv.value().to_vec())
        .context("pod p0 is not in etcd")?;
    rate(n, |i| {
        let (mut kv, value) = (e.kv_client(), value.clone());
        async move {
            kv.put(format!("/bench-limit/pods/p{i}"), value, None)
                .await?;
            Ok(())
        }
    })
    .await
}

/// `replicas` replicas on an etcd of `members` members, with `extra`.
fn control_plane(members: usize, replicas: usize, extra: &[&str]) -> Vec<ControlPlane> {
    let etcd = if members > 1 {
        Etcd::start_local_cluster(members)
    } else {
        Etcd::start()
    };
    let first = ControlPlane::start_on_etcd(etcd, extra);
    let mut all: Vec<ControlPlane> = (1..replicas).map(|_| first.replica(extra)).collect();
    all.insert(0, first);
    all
}

async fn clients(cps: &[ControlPlane]) -> Result<Vec<kube::Client>> {
    let mut out = Vec::new();
    for cp in cps {
        out.push(super::kube_client(&cp.kubeconfig).await?);
    }
    Ok(out)
}

fn identity(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.dir.path.join("leader-identity"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

async fn holds_both(leases: &Api<Lease>, id: &str) -> bool {
    for l in LEASES {
        let holder = leases
            .get(l)
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity);
        if holder.as_deref() != Some(id) {
            return false;
        }
    }
    true
}

/// One failover: seconds from the leader's SIGKILL until the other
/// replica holds both leases, and until it has bound a pod created just
/// after the kill.
async fn failover() -> Result<(f64, f64)> {
    // The node object has no kubelet behind it: no grace runs out on it.
    let extra = ["--node-monitor-grace-seconds", "3600"];
    let mut cps = tokio::task::spawn_blocking(move || {
        let cps = control_plane(3, 2, &extra);
        cps[1].add_node("node-0", "", "32");
        cps
    })
    .await?;
    let (a, b) = (identity(&cps[0]), identity(&cps[1]));
    let c = super::kube_client(&cps[1].kubeconfig).await?;
    let (leases, pods): (Api<Lease>, Api<Pod>) = (
        Api::namespaced(c.clone(), "kube-system"),
        Api::namespaced(c, "default"),
    );
    let t = Instant::now();
    while !holds_both(&leases, &a).await {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the first replica never led"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cps[0].proc.kill_now();
    let killed = Instant::now();
    pods.create(
        &PostParams::default(),
        &super::bench_pod("pending", "default"),
    )
    .await?;
    let (mut led, mut bound) = (None, None);
    while led.is_none() || bound.is_none() {
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "no takeover within 60 s"
        );
        if led.is_none() && holds_both(&leases, &b).await {
            led = Some(killed.elapsed().as_secs_f64());
        }
        if bound.is_none()
            && let Ok(p) = pods.get("pending").await
            && p.spec.and_then(|s| s.node_name).is_some()
        {
            bound = Some(killed.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::task::spawn_blocking(move || drop(cps)).await?;
    Ok((led.unwrap_or_default(), bound.unwrap_or_default()))
}

/// How many lines of `log` contain `what`.
fn count(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// A Service `name` and its EndpointSlice (one address on the pod network
/// that is never dialled).
async fn service(c: &kube::Client, name: &str, slice: bool) -> Result<()> {
    if slice {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-own"), "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.0.250"], "conditions": {"ready": true}}]
        }))?;
        Api::<EndpointSlice>::namespaced(c.clone(), "default")
            .create(&PostParams::default(), &s)
            .await?;
    } else {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": name}, "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}
        }))?;
        Api::<Service>::namespaced(c.clone(), "default")
            .create(&PostParams::default(), &s)
            .await?;
    }
    Ok(())
}

/// Agent failovers, `rounds` of them: for each, seconds from the death of
/// the apiserver the agent uses until its balancer switched, and until it
/// programmed a Service created at once through the other.
fn agent_failover(rounds: usize) -> Result<Vec<(f64, f64)>> {
    let mut c = Cluster::start(1);
    let mut b = c.control_replica();
    let underlay = c.underlay.path();
    super::in_netns(&underlay, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut out = Vec::new();
        for r in 0..rounds {
            // Round 0 kills the apiserver the agent joined through; each
            // next round, the one it moved to.
            let a_in_use = r % 2 == 0;
            let live = if a_in_use {
                &b.kubeconfig
            } else {
                &c.cp.kubeconfig
            };
            let live = rt.block_on(super::kube_client(live))?;
            let name = format!("late-{r}");
            // The slice first: the Service alone is then the change.
            rt.block_on(service(&live, &name, true))?;
            std::thread::sleep(Duration::from_secs(1));
            let log = c.nodes[0].agent_log();
            let (programmed, switched) = (count(&log, "programmed"), count(&log, "switched"));
            if a_in_use {
                c.cp.proc.kill_now();
            } else {
                b.proc.kill_now();
            }
            let killed = Instant::now();
            rt.block_on(service(&live, &name, false))?;
            let (mut moved, mut delivered) = (None, None);
            while moved.is_none() || delivered.is_none() {
                anyhow::ensure!(
                    killed.elapsed() < Duration::from_secs(30),
                    "the agent did not follow within 30 s:\n{}",
                    c.nodes[0].agent_log()
                );
                let log = c.nodes[0].agent_log();
                if moved.is_none() && count(&log, "switched") > switched {
                    moved = Some(killed.elapsed().as_secs_f64());
                }
                if delivered.is_none() && count(&log, "programmed") > programmed {
                    delivered = Some(killed.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            let (moved, delivered) = (moved.unwrap_or_default(), delivered.unwrap_or_default());
            eprintln!(
                "  round {r}: the agent switched {:.0} ms and programmed the new Service {:.0} ms after the kill",
                moved * 1000.0,
                delivered * 1000.0
            );
            out.push((moved, delivered));
            if a_in_use {
                c.cp.restart();
            } else {
                b.restart();
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(out)
    })
}

fn seconds(v: &[(f64, f64)], pick: impl Fn(&(f64, f64)) -> f64) -> Vec<f64> {
    v.iter().map(pick).collect()
}

pub(crate) async fn run(writes_n: usize, rounds: usize) -> Result<Value> {
    let only_api = ["--components", "apiserver"];
    let (mut one, mut three, mut one_etcd, mut three_etcd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternated, so that drift on the machine falls on both.
        for members in [1, 3] {
            let cps =
                tokio::task::spawn_blocking(move || control_plane(members, members, &only_api))
                    .await?;
            let creates = pod_creates(&clients(&cps).await?, writes_n).await?;
            let puts = etcd_puts(&cps[0].etcd, writes_n).await?;
            eprintln!(
                "  round {r}: {members} replica(s) on {members} etcd member(s): {creates:.0} pod creates/s, etcd {puts:.0} puts/s"
            );
            if members == 1 {
                one.push(creates);
                one_etcd.push(puts);
            } else {
                three.push(creates);
                three_etcd.push(puts);
            }
            tokio::task::spawn_blocking(move || drop(cps)).await?;
        }
    }
    let mut takeovers = Vec::new();
    for r in 0..rounds {
        let (led, bound) = failover().await?;
        eprintln!(
            "  round {r}: the other replica led {led:.1} s and bound a pending pod {bound:.1} s after the kill"
        );
        takeovers.push((led, bound));
    }
    let agent = tokio::task::spawn_blocking(move || agent_failover(rounds)).await??;
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let (led, bound) = (seconds(&takeovers, |t| t.0), seconds(&takeovers, |t| t.1));
    let (switched, delivered) = (seconds(&agent, |t| t.0), seconds(&agent, |t| t.1));
    Ok(json!({
        "writes": writes_n,
        "inflight": INFLIGHT,
        "one_replica_creates_per_s": median(&one),
        "one_member_puts_per_s": median(&one_etcd),
        "one_creates_over_puts": median(&ratio(&one, &one_etcd)),
        "three_replicas_creates_per_s": median(&three),
        "three_members_puts_per_s": median(&three_etcd),
        "three_creates_over_puts": median(&ratio(&three, &three_etcd)),
        "three_over_one": median(&ratio(&three, &one)),
        "failover_leases_s": led,
        "failover_first_binding_s": bound,
        "failover_leases_median_s": median(&led),
        "failover_first_binding_median_s": median(&bound),
        "agent_switched_s": switched,
        "agent_delivered_s": delivered,
        "agent_switched_median_s": median(&switched),
        "agent_delivered_median_s": median(&delivered),
    }))
}

/// The figures as tables.
pub(crate) fn print(h: &Value) {
    let f = |k: &str| h[k].as_f64().unwrap_or(0.0);
    println!(
        "\nhigh availability: write throughput ({} pod creates, {} in flight, apiservers alone; medians of the rounds; the limit is etcd's own put rate for the same bytes)",
        h["writes"], h["inflight"]
    );
    println!("| setup | pod creates/s | etcd puts/s (limit) | creates ÷ puts |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| 1 replica, 1 etcd member | {:.0} | {:.0} | {:.2} |",
        f("one_replica_creates_per_s"),
        f("one_member_puts_per_s"),
        f("one_creates_over_puts")
    );
    println!(
        "| 3 replicas, 3 etcd members | {:.0} | {:.0} | {:.2} |",
        f("three_replicas_creates_per_s"),
        f("three_members_puts_per_s"),
        f("three_creates_over_puts")
    );
    println!("three replicas ÷ one: {:.2}", f("three_over_one"));
    println!("\nhigh availability: failover (medians; from the SIGKILL)");
    println!(
        "| leader replaced (both leases) | new leader's first binding | agent switched apiserver | agent's watch delivered a change |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| {:.1} s | {:.1} s | {:.0} ms | {:.0} ms |",
        f("failover_leases_median_s"),
        f("failover_first_binding_median_s"),
        f("agent_switched_median_s") * 1000.0,
        f("agent_delivered_median_s") * 1000.0
    );
}
