//! `cargo xtask bench net`: the pod network side by side with its
//! baselines, in one run.
//!
//! - Throughput (iperf3, TCP): pod to pod across two nodes over vxlan and
//!   over host-gw, and node to node on the underlay (the limit). Modes are
//!   interleaved per round; every measurement gets fresh pods.
//! - Turns: vxlan and host-gw (as shipped) in short runs taking turns on
//!   the same pods, seconds apart, for a ratio the machine's drift moves
//!   less.
//! - CNI latency: ADD and DEL of `skiff-cni` and of the reference plugins
//!   (`bridge` with `host-local`) doing the same job (bridge, veth, address,
//!   default route), each in a fresh node namespace, rounds interleaved.
//! - Convergence: N leases written to etcd by simulated nodes; the time
//!   until one real node has a route to every one of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use skiff_tests::overlay::{Cluster, Node, Pod};
use skiff_tests::{Netns, Proc, Spawn, TempDir, bin, unique};

use super::knobs::Knob;
use super::stats::{busy_seconds, median_ci, pct, summary};

pub struct Args {
    pub rounds: usize,
    pub seconds: u32,
    pub cni_calls: usize,
    pub leases: Vec<usize>,
    /// The vxlan knobs to measure, each alone on top of what ships.
    pub knobs: Vec<Knob>,
    /// Which of [`PARTS`] to run.
    pub parts: Vec<String>,
    /// The turns part: turns per round, and each run's length.
    pub turns: usize,
    pub turn_seconds: u32,
    /// The turns part: iperf3's client and server each on a CPU of its
    /// own, as the two ends would be on two machines (the two swap CPUs
    /// every round).
    pub pin: bool,
    pub out: PathBuf,
}

/// The parts of the benchmark, each run on its own with `--parts`.
pub const PARTS: [&str; 4] = ["throughput", "turns", "cni", "convergence"];

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.245.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// One iperf3 run's result: its rate, and what the machine spent on it.
#[derive(Clone, Copy)]
struct Run {
    gbits: f64,
    /// Busy CPU time of the whole machine (every core, every process and
    /// softirq) per Gbit carried, in ms: the cost of a path even when
    /// the rate is not CPU-bound (a single stream here leaves a core
    /// partly idle).
    cpu_ms_per_gbit: f64,
}

/// One iperf3 run from `client` to `server_ip` in `server`.
fn iperf(server: &Netns, client: &Netns, server_ip: &str, seconds: u32) -> Result<Run> {
    let log = TempDir::new();
    let _server = iperf_server(server, server_ip, &log, true);
    iperf_client(client, server_ip, seconds, None)
}

/// An iperf3 server on `server_ip` in `server`, for one client (`once`) or
/// for any number in turn; it stops when the returned process is dropped.
fn iperf_server(server: &Netns, server_ip: &str, log: &TempDir, once: bool) -> Proc {
    let mut args = vec!["-s", "-B", server_ip, "-p", "5201"];
    if once {
        args.push("-1");
    }
    // Its output goes to a file: iperf3 does not flush a pipe, so there is
    // no banner to wait for; the client retries until the server listens.
    Spawn::new("iperf3")
        .args(args)
        .netns(server)
        .log_to(&log.path.join(format!("iperf3-{server_ip}.log")))
        .start()
}

/// One iperf3 client run from `client` to the server on `server_ip`;
/// with `pin`, the client on the first CPU and the server on the second.
fn iperf_client(
    client: &Netns,
    server_ip: &str,
    seconds: u32,
    pin: Option<(usize, usize)>,
) -> Result<Run> {
    let mut last = Err(anyhow::anyhow!("iperf3 did not run"));
    let mut args: Vec<String> = [
        "-c",
        server_ip,
        "-p",
        "5201",
        "-t",
        &seconds.to_string(),
        "-J",
    ]
    .map(String::from)
    .to_vec();
    if let Some((c, s)) = pin {
        args.extend(["-A".to_string(), format!("{c},{s}")]);
    }
    for _ in 0..20 {
        let busy_before = busy_seconds();
        let out = Spawn::new("iperf3").args(&args).netns(client).try_output();
        match out {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text).context("iperf3 -J output")?;
                let received = &v["end"]["sum_received"];
                match (
                    received["bits_per_second"].as_f64(),
                    received["bytes"].as_f64(),
                ) {
                    (Some(bps), Some(bytes)) => {
                        let busy = busy_seconds()
                            .zip(busy_before)
                            .map_or(0.0, |(after, before)| after - before);
                        let carried_gbit = bytes * 8.0 / 1e9;
                        return Ok(Run {
                            gbits: bps / 1e9,
                            cpu_ms_per_gbit: busy * 1000.0 / carried_gbit.max(1e-9),
                        });
                    }
                    // Connected before the server was ready, or to a
                    // server still finishing: try again.
                    _ => {
                        last = Err(anyhow::anyhow!("iperf3: {}", v["error"]));
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            Err(e) => {
                last = Err(anyhow::anyhow!(e));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    last
}

/// What one throughput measurement goes through.
#[derive(Clone, Copy)]
enum Mode {
    /// Node to node on the underlay: the limit.
    Node,
    /// host-gw as it ships (the agent's fast path routes in TC).
    HostGw,
    /// host-gw routed by the kernel alone (`--fast-path false`), as
    /// Flannel.
    HostGwKernel,
    /// vxlan as it ships (the agent's fast path).
    Vxlan,
    /// vxlan through the kernel's VTEP alone (`--fast-path false`), as
    /// Flannel carries it.
    VxlanKernel,
    /// vxlan as it ships, with one knob on top.
    Knob(Knob),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Node => "node".into(),
            Mode::HostGw => "host-gw".into(),
            Mode::HostGwKernel => "host-gw-kernel".into(),
            Mode::Vxlan => "vxlan".into(),
            Mode::VxlanKernel => "vxlan-kernel".into(),
            Mode::Knob(k) => format!("vxlan+{}", k.name()),
        }
    }
}

/// The pods' throughput in cluster `c` (fresh pods), with `knob` on for
/// the measurement.
fn pod_to_pod(c: &Cluster, knob: Option<Knob>, seconds: u32) -> Result<Run> {
    if let Some(k) = knob {
        for n in &c.nodes {
            k.node(n, true)?;
        }
    }
    let (a, b): (Pod, Pod) = (c.nodes[0].add_pod(), c.nodes[1].add_pod());
    if let Some(k) = knob {
        k.pod(&c.nodes[0], &a, true)?;
        k.pod(&c.nodes[1], &b, true)?;
    }
    let g = iperf(&b.ns, &a.ns, &b.ip, seconds);
    for (n, p) in [(&c.nodes[0], &a), (&c.nodes[1], &b)] {
        let _ = n.cni("DEL", &p.ns, &p.id);
    }
    if let Some(k) = knob {
        for n in &c.nodes {
            k.node(n, false)?;
        }
    }
    g
}

fn throughput(args: &Args) -> Result<Value> {
    eprintln!(
        "throughput: two-node clusters (vxlan and host-gw, each with and without the fast path)"
    );
    let mut vx = Cluster::new(2, VXLAN);
    vx.start_all(&[]);
    let mut vk = Cluster::new(2, VXLAN);
    vk.start_all(&["--fast-path", "false"]);
    let mut hg = Cluster::new(2, HOST_GW);
    hg.start_all(&[]);
    let mut hk = Cluster::new(2, HOST_GW);
    hk.start_all(&["--fast-path", "false"]);
    ready(&[&vx, &vk, &hg, &hk])?;
    let mut modes = vec![
        Mode::Node,
        Mode::HostGw,
        Mode::HostGwKernel,
        Mode::Vxlan,
        Mode::VxlanKernel,
    ];
    modes.extend(args.knobs.iter().map(|k| Mode::Knob(*k)));
    let mut results: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds {
        for mode in &modes {
            let run = match *mode {
                Mode::Node => iperf(
                    &hg.nodes[1].ns,
                    &hg.nodes[0].ns,
                    &hg.nodes[1].ip,
                    args.seconds,
                )?,
                Mode::HostGw => pod_to_pod(&hg, None, args.seconds)?,
                Mode::HostGwKernel => pod_to_pod(&hk, None, args.seconds)?,
                Mode::Vxlan => pod_to_pod(&vx, None, args.seconds)?,
                Mode::VxlanKernel => pod_to_pod(&vk, None, args.seconds)?,
                Mode::Knob(k) => pod_to_pod(&vx, Some(k), args.seconds)?,
            };
            let name = mode.name();
            eprintln!(
                "  round {} {name:>28}: {:.2} Gbit/s, {:.1} CPU ms per Gbit",
                round + 1,
                run.gbits,
                run.cpu_ms_per_gbit
            );
            results.entry(name.clone()).or_default().push(run.gbits);
            cpu.entry(name).or_default().push(run.cpu_ms_per_gbit);
        }
    }
    let mut doc = serde_json::Map::new();
    for (mode, samples) in &results {
        doc.insert(mode.replace('-', "_"), summary(samples.clone()));
    }
    doc.insert("samples".into(), json!(results));
    doc.insert("cpu_ms_per_gbit".into(), json!(cpu));
    Ok(Value::Object(doc))
}

/// Waits until each cluster's first node routes to the other, and makes
/// and removes a pod on every node: the fast path attaches to the bridge
/// the first pod makes, so that no measurement runs before it is there.
fn ready(clusters: &[&Cluster]) -> Result<()> {
    for c in clusters {
        Routes::of(&c.nodes[0])?.wait_until(
            "a route to the other node",
            Duration::from_millis(20),
            |n| n >= 1,
        )?;
        for n in &c.nodes {
            let p = n.add_pod();
            let _ = n.cni("DEL", &p.ns, &p.id);
        }
    }
    Ok(())
}

/// vxlan and host-gw, both as shipped, in turns: per round one pod pair
/// in each cluster and an iperf3 server in each, then `turns` times one
/// `turn_seconds` run of each (vxlan first in even turns, host-gw first in
/// odd ones). The two are measured seconds apart on the same pods, where
/// the throughput part's runs of the two are about 15 s apart with other
/// modes and fresh pods between them, and the machine's speed moves in
/// that time. A round's ratio is its vxlan runs' mean rate over its
/// host-gw runs' mean.
fn turns(args: &Args) -> Result<Value> {
    eprintln!(
        "turns: vxlan and host-gw (both as shipped), {} turns of {} s per round{}",
        args.turns,
        args.turn_seconds,
        if args.pin {
            ", iperf3 client and server pinned to two CPUs (swapped each round)"
        } else {
            ""
        }
    );
    let mut vx = Cluster::new(2, VXLAN);
    vx.start_all(&[]);
    let mut hg = Cluster::new(2, HOST_GW);
    hg.start_all(&[]);
    ready(&[&vx, &hg])?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    let cpus = if args.pin { Some(two_cpus()?) } else { None };
    for round in 0..args.rounds {
        // Pinned: client and server on two CPUs, swapping each round.
        let pin = cpus.map(|c| (c[round % 2], c[(round + 1) % 2]));
        let pods: Vec<(&Cluster, Pod, Pod)> = [&vx, &hg]
            .into_iter()
            .map(|c| (c, c.nodes[0].add_pod(), c.nodes[1].add_pod()))
            .collect();
        let log = TempDir::new();
        let servers: Vec<Proc> = pods
            .iter()
            .map(|(_, _, b)| iperf_server(&b.ns, &b.ip, &log, false))
            .collect();
        let mut round_rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut result = Ok(());
        'turns: for turn in 0..args.turns {
            let order = if turn % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (_, a, b) = &pods[i];
                match iperf_client(&a.ns, &b.ip, args.turn_seconds, pin) {
                    Ok(run) => round_rates[i].push(run.gbits),
                    Err(e) => {
                        result = Err(e);
                        break 'turns;
                    }
                }
            }
        }
        drop(servers);
        for (c, a, b) in &pods {
            for (n, p) in [(&c.nodes[0], a), (&c.nodes[1], b)] {
                let _ = n.cni("DEL", &p.ns, &p.id);
            }
        }
        result?;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let ratio = mean(&round_rates[0]) / mean(&round_rates[1]).max(1e-9);
        eprintln!(
            "  round {}: vxlan {:.2}, host-gw {:.2} Gbit/s (means of {} turns), ratio {ratio:.3}",
            round + 1,
            mean(&round_rates[0]),
            mean(&round_rates[1]),
            args.turns
        );
        ratios.push(ratio);
        for (all, these) in rates.iter_mut().zip(round_rates) {
            all.extend(these);
        }
    }
    Ok(json!({
        "pinned": args.pin,
        "turn_seconds": args.turn_seconds,
        "turns": args.turns,
        "vxlan": rates[0],
        "host_gw": rates[1],
        "round_ratios": ratios,
    }))
}

/// The first two CPUs this process may run on (the turns part's `--pin`).
fn two_cpus() -> Result<[usize; 2]> {
    match skiff_tests::allowed_cpus()[..] {
        [a, b, ..] => Ok([a, b]),
        ref few => bail!(
            "--pin true: needs two CPUs, this process may use {}",
            few.len()
        ),
    }
}

/// The turns part's table; returns the median of the rounds' ratios.
fn print_turns(tp: &Value) -> f64 {
    let list = |k: &str| -> Vec<f64> {
        tp[k]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let ratios = sorted(&list("round_ratios"));
    let (lo, hi) = median_ci(&ratios);
    let m = pct(&ratios, 0.5);
    println!(
        "\nvxlan ÷ host-gw in turns ({} rounds of {} turns of {} s, both as shipped, same pods per round{})",
        ratios.len(),
        tp["turns"],
        tp["turn_seconds"],
        if tp["pinned"].as_bool() == Some(true) {
            ", iperf3 pinned"
        } else {
            ""
        }
    );
    println!("| ratio | median | min – max | 95 % CI | vxlan Gbit/s | host-gw Gbit/s |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| vxlan ÷ host-gw (target ≥ 0.9) | {m:.3} | {:.3} – {:.3} | {lo:.3} – {hi:.3} | {:.2} | {:.2} |",
        ratios.first().copied().unwrap_or(0.0),
        ratios.last().copied().unwrap_or(0.0),
        pct(&sorted(&list("vxlan")), 0.5),
        pct(&sorted(&list("host_gw")), 0.5),
    );
    m
}

/// Counts a node's overlay routes over one netlink socket opened in its
/// namespace, so that polling costs one dump and nothing else.
struct Routes {
    rt: tokio::runtime::Runtime,
    nl: skiff_netlink::Netlink,
}

impl Routes {
    fn of(node: &Node) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let nl = rt.block_on(async { skiff_netlink::Netlink::open_in(&node.ns.path()) })?;
        Ok(Self { rt, nl })
    }

    fn count(&self) -> Result<usize> {
        let routes = self
            .rt
            .block_on(self.nl.routes(Some(skiff_netlink::SKIFF_ROUTE_PROTOCOL)))?;
        Ok(routes.len())
    }

    /// Polls every `every` until `done(count)`, for at most a minute.
    fn wait_until(&self, what: &str, every: Duration, done: impl Fn(usize) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self.count()?) {
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(every);
        }
        Ok(())
    }
}

/// One plugin under test: how to configure it for a node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plugin {
    Skiff,
    Reference,
}

impl Plugin {
    fn name(self) -> &'static str {
        match self {
            Plugin::Skiff => "skiff-cni",
            Plugin::Reference => "bridge + host-local",
        }
    }

    fn conf(self, dir: &std::path::Path) -> Value {
        match self {
            Plugin::Skiff => json!({
                "cniVersion": "1.0.0", "name": "bench", "type": "skiff-cni",
                "subnet": "10.88.0.0/16", "bridge": "cni0", "dataDir": dir.join("skiff"),
            }),
            Plugin::Reference => json!({
                "cniVersion": "1.0.0", "name": "bench", "type": "bridge",
                "bridge": "cni0", "isGateway": true, "isDefaultGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "dataDir": dir.join("host-local")},
            }),
        }
    }

    fn binary(self) -> PathBuf {
        match self {
            Plugin::Skiff => bin("skiff-cni"),
            Plugin::Reference => PathBuf::from("/usr/lib/cni/bridge"),
        }
    }
}

/// `calls` ADDs then as many DELs on a fresh node; milliseconds each.
fn cni_round(plugin: Plugin, calls: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let node = Netns::new();
    let dir = TempDir::new();
    let pods: Vec<Netns> = (0..calls).map(|_| Netns::new()).collect();
    let conf = plugin.conf(&dir.path).to_string();
    let call = |cmd: &str, id: &str, pod: &Netns| -> Result<f64> {
        let t = Instant::now();
        let out = Spawn::new(plugin.binary())
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", &pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .netns(&node)
            .run_with_input(conf.as_bytes());
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!(
                "{} {cmd}: {}{}",
                plugin.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ms)
    };
    let ids: Vec<String> = (0..calls).map(|_| unique("c")).collect();
    let mut add = Vec::with_capacity(calls);
    for (id, pod) in ids.iter().zip(&pods) {
        add.push(call("ADD", id, pod)?);
    }
    let mut del = Vec::with_capacity(calls);
    for (id, pod) in ids.iter().zip(&pods) {
        del.push(call("DEL", id, pod)?);
    }
    Ok((add, del))
}

fn cni_latency(args: &Args) -> Result<Value> {
    let mut add: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut del: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds {
        for p in [Plugin::Skiff, Plugin::Reference] {
            let (a, d) = cni_round(p, args.cni_calls)?;
            eprintln!(
                "  round {} {:>20}: ADD p50 {:.2} ms, DEL p50 {:.2} ms",
                round + 1,
                p.name(),
                pct(&sorted(&a), 0.5),
                pct(&sorted(&d), 0.5)
            );
            add.entry(p.name()).or_default().extend(a);
            del.entry(p.name()).or_default().extend(d);
        }
    }
    let mut out = serde_json::Map::new();
    for p in [Plugin::Skiff, Plugin::Reference] {
        out.insert(
            p.name().into(),
            json!({
                "add": summary(add.get(p.name()).cloned().unwrap_or_default()),
                "del": summary(del.get(p.name()).cloned().unwrap_or_default()),
                "add_samples": sorted(add.get(p.name()).map(Vec::as_slice).unwrap_or_default()),
            }),
        );
    }
    Ok(Value::Object(out))
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Writes `n` leases as `n` simulated nodes would (a lease grant and a
/// create-if-absent transaction each), 32 in flight.
async fn write_leases(
    client: &etcd_client::Client,
    own: &str,
    n: usize,
    ttl: i64,
) -> Result<Vec<i64>> {
    use futures::StreamExt;
    let own = own.to_string();
    let results: Vec<Result<i64>> = futures::stream::iter(0..n)
        .map(|i| {
            let mut c = client.clone();
            let own = own.clone();
            async move {
                // Subnets 10.1.0.0/24 upwards, skipping the real node's.
                let mut k = i + 256;
                let mut subnet = format!("10.{}.{}.0", k / 256, k % 256);
                if format!("{subnet}/24") == own {
                    k += 60_000;
                    subnet = format!("10.{}.{}.0", k / 256, k % 256);
                }
                let id = c.lease_grant(ttl, None).await?.id();
                let value = json!({
                    "PublicIP": format!("172.30.{}.{}", i / 250, i % 250 + 1),
                    "PublicIPv6": null,
                    "BackendType": "vxlan",
                    "BackendData": {"VNI": 1, "VtepMAC": format!("0e:00:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)},
                });
                let key = format!("/coreos.com/network/subnets/{subnet}-24");
                let txn = etcd_client::Txn::new()
                    .when(vec![etcd_client::Compare::create_revision(
                        key.as_str(),
                        etcd_client::CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![etcd_client::TxnOp::put(
                        key.as_str(),
                        value.to_string(),
                        Some(etcd_client::PutOptions::new().with_lease(id)),
                    )]);
                let r = c.txn(txn).await?;
                if !r.succeeded() {
                    bail!("{key} was taken");
                }
                Ok(id)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

fn convergence(args: &Args) -> Result<Value> {
    let config = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
    let mut c = Cluster::new(1, config);
    c.start_all(&[]);
    // etcd listens on the underlay, which only exists inside the test's
    // namespaces: the simulated nodes' client runs on a thread that has
    // entered the underlay namespace, never from the host's.
    let underlay = c.underlay.path();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _inside = skiff_netlink::NetnsGuard::enter(&underlay)?;
            simulate_nodes(args, &c)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the convergence thread panicked"))?
    })
}

fn simulate_nodes(args: &Args, c: &Cluster) -> Result<Value> {
    let own = c.nodes[0].subnet();
    let routes = Routes::of(&c.nodes[0])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(super::etcd_client(&c.etcd))?;
    let mut out = Vec::new();
    for &n in &args.leases {
        let mut total = Vec::new();
        let mut after_write = Vec::new();
        let mut writing = Vec::new();
        for _ in 0..args.rounds {
            let t0 = Instant::now();
            let ids = rt.block_on(write_leases(&client, &own, n, 600))?;
            let written = t0.elapsed();
            routes.wait_until(
                &format!("routes to {n} leases"),
                Duration::from_millis(2),
                |have| have >= n,
            )?;
            let all = t0.elapsed();
            total.push(all.as_secs_f64() * 1000.0);
            after_write.push(all.saturating_sub(written).as_secs_f64() * 1000.0);
            writing.push(written.as_secs_f64() * 1000.0);
            // Take them away again (revoking deletes the keys) and wait
            // for the node to be back to no routes.
            rt.block_on(async {
                let mut c = client.clone();
                for id in ids {
                    c.lease_revoke(id).await?;
                }
                Ok::<_, etcd_client::Error>(())
            })?;
            routes.wait_until(
                "the revoked leases' routes to go",
                Duration::from_millis(10),
                |have| have == 0,
            )?;
        }
        let med = |v: &[f64]| pct(&sorted(v), 0.5);
        eprintln!(
            "  {n:>5} leases: all routes {:.0} ms after the first write ({:.0} ms to write them, {:.0} ms after the last)",
            med(&total),
            med(&writing),
            med(&after_write)
        );
        out.push(json!({
            "leases": n,
            "total_ms": summary(total),
            "write_ms": summary(writing),
            "after_last_write_ms": summary(after_write),
        }));
    }
    Ok(Value::Array(out))
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench net: {} rounds, iperf3 {} s, {} CNI calls per round, leases {:?}, knobs {:?}, parts {:?}, {cores} cores",
        args.rounds,
        args.seconds,
        args.cni_calls,
        args.leases,
        args.knobs.iter().map(|k| k.name()).collect::<Vec<_>>(),
        args.parts
    );
    let part = |p: &str| args.parts.iter().any(|x| x == p);
    let mut ratios = serde_json::Map::new();
    let tp = if part("throughput") {
        let tp = throughput(args)?;
        ratios.insert(
            "vxlan_over_host_gw".into(),
            json!(print_throughput(args, &tp)),
        );
        tp
    } else {
        json!({})
    };
    let turned = if part("turns") {
        let t = turns(args)?;
        ratios.insert("vxlan_over_host_gw_in_turns".into(), json!(print_turns(&t)));
        t
    } else {
        json!({})
    };
    let cni = if part("cni") {
        eprintln!("CNI latency");
        let cni = cni_latency(args)?;
        let (add, del) = print_cni(args, &cni);
        ratios.insert("skiff_add_p99_over_reference".into(), json!(add));
        ratios.insert("skiff_del_p99_over_reference".into(), json!(del));
        cni
    } else {
        json!({})
    };
    let conv = if part("convergence") {
        eprintln!("convergence");
        let conv = convergence(args)?;
        print_convergence(args, &conv);
        conv
    } else {
        json!([])
    };

    let doc = json!({
        "benchmark": "net",
        "commit": super::git_commit(),
        "kernel": super::kernel(),
        "cores": cores,
        "seconds": started.elapsed().as_secs_f64(),
        "args": {
            "rounds": args.rounds,
            "iperf_seconds": args.seconds,
            "cni_calls": args.cni_calls,
            "leases": args.leases,
            "knobs": args.knobs.iter().map(|k| k.name()).collect::<Vec<_>>(),
            "parts": args.parts,
            "turns": args.turns,
            "turn_seconds": args.turn_seconds,
            "pin": args.pin,
        },
        "throughput": tp,
        "turns": turned,
        "cni": cni,
        "convergence": conv,
        "ratios": ratios,
    });
    let path = super::write_results(&args.out, "net", &doc)?;
    let png = args.out.join("net.png");
    super::plot::net(&doc, &png)?;
    println!("wrote {} and {}", path.display(), png.display());
    Ok(())
}

/// The throughput tables and the knob table; returns vxlan ÷ host-gw
/// (median of the rounds' own ratios).
fn print_throughput(args: &Args, tp: &Value) -> f64 {
    let g = |p: &str| tp.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    let node = g("/node/p50");
    println!(
        "\nTCP throughput, iperf3 -t {} (median of {} rounds, Gbit/s)",
        args.seconds, args.rounds
    );
    println!("| path | Gbit/s | min | max | ÷ node-to-node |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, key) in [
        ("node ↔ node (limit)", "node"),
        ("pod ↔ pod, host-gw (fast path, as shipped)", "host_gw"),
        (
            "pod ↔ pod, host-gw (kernel only, as Flannel)",
            "host_gw_kernel",
        ),
        ("pod ↔ pod, vxlan (fast path, as shipped)", "vxlan"),
        (
            "pod ↔ pod, vxlan (kernel VTEP only, as Flannel)",
            "vxlan_kernel",
        ),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.3} |",
            g(&format!("/{key}/p50")),
            g(&format!("/{key}/min")),
            g(&format!("/{key}/max")),
            g(&format!("/{key}/p50")) / node.max(1e-9)
        );
    }
    // Each round's own pair (the machine drifts between rounds): median,
    // min, max and the median's 95 % interval of the per-round ratios.
    let paired = |series: &str, a: &str, b: &str| -> (f64, f64, f64, (f64, f64)) {
        let ratios: Vec<f64> = samples(tp, series, a)
            .iter()
            .zip(samples(tp, series, b))
            .map(|(x, y)| x / y.max(1e-9))
            .collect();
        let s = sorted(&ratios);
        (
            pct(&s, 0.5),
            s.first().copied().unwrap_or(0.0),
            s.last().copied().unwrap_or(0.0),
            median_ci(&s),
        )
    };
    let pairs = [
        (
            "vxlan ÷ host-gw, as shipped (target ≥ 0.9)",
            "vxlan",
            "host-gw",
        ),
        (
            "vxlan ÷ host-gw, kernel only",
            "vxlan-kernel",
            "host-gw-kernel",
        ),
        (
            "vxlan as shipped ÷ host-gw kernel only",
            "vxlan",
            "host-gw-kernel",
        ),
        ("fast path ÷ kernel only, vxlan", "vxlan", "vxlan-kernel"),
        (
            "fast path ÷ kernel only, host-gw",
            "host-gw",
            "host-gw-kernel",
        ),
    ];
    // By rate, then by cost: the machine's busy CPU per Gbit carried, the
    // second's over the first's (so that, as by rate, above 1 means the
    // first does better).
    let ratio_table = |title: &str, series: &str, by_cost: bool| {
        println!("\n{title}");
        println!("| ratio | median | min – max | 95 % CI |");
        println!("| --- | ---: | ---: | ---: |");
        for (name, a, b) in pairs {
            let (a, b) = if by_cost { (b, a) } else { (a, b) };
            let (m, lo, hi, (ci_lo, ci_hi)) = paired(series, a, b);
            println!("| {name} | {m:.3} | {lo:.3} – {hi:.3} | {ci_lo:.3} – {ci_hi:.3} |");
        }
    };
    ratio_table(
        "ratios, per round (median, min – max, the median's 95 % interval)",
        "samples",
        false,
    );
    println!("\nCPU per Gbit carried (the whole machine's busy time during each run)");
    println!("| path | CPU ms per Gbit | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    for key in ["node", "host-gw", "host-gw-kernel", "vxlan", "vxlan-kernel"] {
        let v = sorted(&samples(tp, "cpu_ms_per_gbit", key));
        println!(
            "| {key} | {:.1} | {:.1} | {:.1} |",
            pct(&v, 0.5),
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        );
    }
    ratio_table(
        "cost ratios, per round (the second's CPU per Gbit ÷ the first's)",
        "cpu_ms_per_gbit",
        true,
    );
    let vx_ratio = paired("samples", "vxlan", "host-gw").0;
    if !args.knobs.is_empty() {
        println!("\nvxlan knobs, each alone on top of what ships (median Gbit/s)");
        println!("| knob | Gbit/s | min | max | ÷ vxlan | ÷ host-gw |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for k in &args.knobs {
            let key = format!("/vxlan+{}", k.name().replace('-', "_"));
            let p50 = g(&format!("{key}/p50"));
            println!(
                "| {} | {p50:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
                k.name(),
                g(&format!("{key}/min")),
                g(&format!("{key}/max")),
                p50 / g("/vxlan/p50").max(1e-9),
                p50 / g("/host_gw/p50").max(1e-9),
            );
        }
    }
    vx_ratio
}

/// The per-round figures of `mode` in one of the throughput part's series
/// (`samples`: Gbit/s; `cpu_ms_per_gbit`).
fn samples(tp: &Value, series: &str, mode: &str) -> Vec<f64> {
    tp[series][mode]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// The CNI latency table; returns skiff-cni ÷ reference for ADD and DEL p99.
fn print_cni(args: &Args, cni: &Value) -> (f64, f64) {
    let c = |p: &str| cni.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    println!(
        "\nCNI latency ({} calls × {} rounds each, ms)",
        args.cni_calls, args.rounds
    );
    println!("| plugin | ADD p50 | ADD p99 | DEL p50 | DEL p99 |");
    println!("| --- | --- | --- | --- | --- |");
    for p in ["skiff-cni", "bridge + host-local"] {
        let k = format!("/{p}");
        println!(
            "| {p} | {:.2} | {:.2} | {:.2} | {:.2} |",
            c(&format!("{k}/add/p50")),
            c(&format!("{k}/add/p99")),
            c(&format!("{k}/del/p50")),
            c(&format!("{k}/del/p99"))
        );
    }
    let add_ratio = c("/skiff-cni/add/p99") / c("/bridge + host-local/add/p99").max(1e-9);
    let del_ratio = c("/skiff-cni/del/p99") / c("/bridge + host-local/del/p99").max(1e-9);
    println!(
        "skiff-cni ÷ reference: ADD p99 {add_ratio:.3} (target ≤ 0.5), DEL p99 {del_ratio:.3}"
    );
    (add_ratio, del_ratio)
}

fn print_convergence(args: &Args, conv: &Value) {
    println!(
        "\nconvergence (one real node, vxlan; median of {} rounds)",
        args.rounds
    );
    println!(
        "| leases | all routes installed after the first write | writing them took | after the last write |"
    );
    println!("| --- | --- | --- | --- |");
    for r in conv.as_array().into_iter().flatten() {
        let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
        println!(
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms |",
            r["leases"],
            f("/total_ms/p50"),
            f("/write_ms/p50"),
            f("/after_last_write_ms/p50")
        );
    }
}
