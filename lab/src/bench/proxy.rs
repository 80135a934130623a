//! `cargo xtask bench proxy`: Skiff's socket-level load balancer side by
//! side with kube-proxy's iptables and nftables layouts and with the limit
//! (connecting to the backend's own address), at several service counts.
//!
//! Each measurement gets a fresh client/server namespace pair and cgroup,
//! modes are interleaved per round, and the table reports medians and
//! ratios to the limit (../shared/BENCHMARKING.md).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use skiff_agent::proxy::model::{encode_ip, encode_port};
use skiff_agent::proxy::{Dataplane, Frontend};
use skiff_ebpf_common::{Backend, PROTO_TCP, ServiceKey};
use skiff_tests::netns::veth;
use skiff_tests::{Cgroup, Netns, PinDir, Proc, Spawn, TempDir, bin};

use super::rules::{self, BenchService};
use plotters::prelude::*;

use super::plot::{self, Series, draw_named, panel, register_font};

const CLIENT_IP: &str = "10.201.0.1";
/// The server namespace's end of the veth: the client's next hop.
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// Every service has two backends of its own, as pods of a real cluster's
/// services are: addresses from this range (local to the server namespace,
/// which answers all of them), the first on one port and the second on the
/// other, each port served by its own process.
const BACKEND_NET: u32 = u32::from_be_bytes([10, 128, 0, 0]);
const BACKEND_NET_PREFIX: u8 = 15;
const BACKEND_PORTS: [u16; 2] = [8080, 8081];
const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// How many distinct services the client cycles through in one run, spread
/// evenly over the table (so iptables' linear scan costs its average).
const TARGETS: usize = 64;
/// Repetitions of "add one service" per measurement.
const ADD_ONE_REPS: usize = 20;
/// How long after a load its deferred work is still counted as its CPU.
const CPU_TAIL_MS: u64 = 300;

#[derive(Clone, Debug)]
pub struct Args {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub conns: u64,
    pub steady_conns: u64,
    pub steady_sizes: Vec<usize>,
    pub threads: u64,
    pub out: PathBuf,
    pub modes: Vec<Mode>,
    /// Largest size at which the nftables baseline is loaded: this
    /// machine's nft (1.0.6) takes time quadratic in the number of chains
    /// (about 100 s for 10 000 services), so 50 000 would take most of an
    /// hour per round.
    pub nft_max: usize,
    /// Paired measurement of skiff against direct: this many pairs per size
    /// and state (0: none), each two loads of `chunk` connections.
    pub pairs: usize,
    pub chunk: u64,
    /// A third arm in each pair: direct's load through an empty connect
    /// program (the floor any socket-level translation starts from).
    pub hooked: bool,
    /// Each pair's two loads at the same time instead of one after the
    /// other: both run `window_ms` from one instant, each from its own
    /// cgroup, and count the connections they complete in that window.
    pub together: bool,
    pub window_ms: u64,
    /// With `together`: both arms direct (a control of the method).
    pub control: bool,
}

impl Args {
    fn modes_at(&self, n: usize) -> impl Iterator<Item = Mode> + '_ {
        self.modes
            .iter()
            .copied()
            .filter(move |m| *m != Mode::Nftables || n <= self.nft_max)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    Skiff,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Skiff, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Skiff => "skiff",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode {s:?} (direct, skiff, iptables, nftables)"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Fewer connections than the ephemeral port range.
    Fresh,
    /// Enough connections to wrap the port range.
    Steady,
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub services: usize,
    pub mode: Mode,
    pub state: State,
    pub round: usize,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub connections: u64,
    pub errors: u64,
    /// The machine's busy CPU time per connection over the load and a
    /// short tail after it (deferred frees), in microseconds.
    pub cpu_us_per_conn: Option<f64>,
    /// Loading all services from cold (not for direct).
    pub program_ms: Option<f64>,
    /// Median time to add one more service at this size.
    pub add_one_us: Option<f64>,
}

/// What `skiff-probe load` and `keepalive` print.
#[derive(Debug, serde::Deserialize, Serialize)]
pub(super) struct Load {
    pub connections: u64,
    pub errors: u64,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The client's own CPU time per connection (user and system).
    #[serde(default)]
    pub cpu_us: f64,
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(VIP_BASE + i as u32)
}

/// The backends of the service numbered `i`.
fn endpoints(i: usize) -> Vec<(Ipv4Addr, u16)> {
    BACKEND_PORTS
        .iter()
        .enumerate()
        .map(|(e, port)| (Ipv4Addr::from(BACKEND_NET + (2 * i + e) as u32), *port))
        .collect()
}

fn bench_services(n: usize) -> Vec<BenchService> {
    (0..n)
        .map(|i| BenchService {
            vip: vip(i),
            port: 80,
            endpoints: endpoints(i),
        })
        .collect()
}

fn frontend(s: &BenchService) -> Frontend {
    let (family, addr) = encode_ip(s.vip.into());
    let mut backends: Vec<Backend> = s
        .endpoints
        .iter()
        .map(|(ip, port)| {
            let (family, addr) = encode_ip((*ip).into());
            Backend {
                addr,
                port: encode_port(*port),
                family,
                pad: 0,
            }
        })
        .collect();
    backends.sort();
    Frontend {
        key: ServiceKey {
            addr,
            port: encode_port(s.port),
            proto: PROTO_TCP,
            family,
        },
        affinity_timeout: 0,
        backends,
    }
}

/// Length of direct's list of destinations. Its backends are picked at
/// random, not in turn: with no proxy at all, dialling a service's two
/// backends strictly in turn ran 1.2 - 1.8 % more connections per second
/// than picking at random (side by side, `--together`), which a direct
/// baseline in turn would count against every proxy.
pub(super) const DIRECT_PICKS: usize = 1024;

/// What the client dials: the services' addresses, or for direct their
/// backends. Fresh state: 64 services spread over the table. Steady state:
/// the one service in the middle of the table, so that every mode's
/// connections share one destination's port range (the VIP for
/// iptables/nftables, whose DNAT happens after the port is chosen; the
/// backends for Skiff and direct), as one client talking to one service.
fn targets(mode: Mode, n: usize, state: State) -> Vec<SocketAddr> {
    let services = if state == State::Steady {
        vec![n / 2]
    } else {
        let k = TARGETS.min(n);
        let mut idx: Vec<usize> = (0..k)
            .map(|j| (j * n / k + (n / k) / 2).min(n - 1))
            .collect();
        idx.dedup();
        idx
    };
    if mode == Mode::Direct {
        // The services in the same turn as the other modes dial them, each
        // time one of its backends at random, as Skiff, iptables and
        // nftables pick one per connection. The same sequence every run.
        return (0..DIRECT_PICKS.max(services.len()))
            .map(|j| {
                let backends = endpoints(services[j % services.len()]);
                SocketAddr::from(backends[super::stats::pick(j, backends.len())])
            })
            .collect();
    }
    services
        .into_iter()
        .map(|i| SocketAddr::from((vip(i), 80)))
        .collect()
}

/// A client namespace and a server namespace joined by a veth, the backend
/// servers (one per port, answering every backend address), and the
/// client's cgroup. Dropped after each measurement.
struct Topology {
    /// Held for their `Drop`: the backend servers and their namespace.
    _servers: Vec<Proc>,
    cg: Cgroup,
    client: Netns,
    _server: Netns,
}

impl Topology {
    fn new() -> Self {
        let client = Netns::new();
        let server = Netns::new();
        veth(
            &client,
            "skc0",
            &format!("{CLIENT_IP}/24"),
            &server,
            "sks0",
            &format!("{SERVER_IP}/24"),
        );
        let backend_net = format!("{}/{BACKEND_NET_PREFIX}", Ipv4Addr::from(BACKEND_NET));
        server.ip(&["route", "add", "local", &backend_net, "dev", "lo"]);
        // A client that opens short connections to one service for long
        // wraps the port range while its old ports sit in TIME_WAIT (60 s):
        // without reuse, connects fall to about 1 000 per second (the range
        // ÷ 60 s) for every mode alike, and the steady state would measure
        // only that. Reuse takes a TIME_WAIT port once it is a second old,
        // as a busy client host is set up to; before the range wraps it
        // changes nothing.
        client.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
        // Service and backend addresses route to the server side inside
        // the client namespace only: the iptables and nftables modes need a
        // route for the original destination before DNAT.
        for net in ["10.96.0.0/12", &backend_net] {
            client.ip(&["route", "add", net, "via", &SERVER_IP.to_string()]);
        }
        let servers = BACKEND_PORTS
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let mut p = Spawn::new(bin("skiff-probe"))
                    .args([
                        "serve-tcp",
                        &format!("0.0.0.0:{port}"),
                        &format!("backend-{i}"),
                    ])
                    .netns(&server)
                    .start();
                let ready = p.ask("");
                assert_eq!(ready, "ready", "backend server did not start");
                p
            })
            .collect();
        Self {
            _servers: servers,
            cg: Cgroup::new(),
            client,
            _server: server,
        }
    }

    fn load(&self, targets: &[SocketAddr], conns: u64, threads: u64) -> Result<Load> {
        probe_load(
            "load",
            &self.client,
            Some(&self.cg),
            targets,
            conns,
            threads,
        )
    }
}

/// Runs `skiff-probe <kind>` (`load` or `keepalive`) in `ns` (and `cg`)
/// against `targets`, `count` connections or requests over `threads`.
pub(super) fn probe_load(
    kind: &str,
    ns: &Netns,
    cg: Option<&Cgroup>,
    targets: &[SocketAddr],
    count: u64,
    threads: u64,
) -> Result<Load> {
    run_probe(ns, cg, kind, targets, &[count, threads])
}

/// `skiff-probe <kind> ADDR[,ADDR...] <rest...>` in `ns` (and `cg`): the
/// load it prints.
fn run_probe(
    ns: &Netns,
    cg: Option<&Cgroup>,
    kind: &str,
    targets: &[SocketAddr],
    rest: &[u64],
) -> Result<Load> {
    let list: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    let mut spawn = Spawn::new(bin("skiff-probe"))
        .args([kind.to_string(), list.join(",")])
        .args(rest.iter().map(u64::to_string))
        .netns(ns);
    if let Some(cg) = cg {
        spawn = spawn.cgroup(cg);
    }
    let out = spawn.try_output().map_err(anyhow::Error::msg)?;
    serde_json::from_str(&out).with_context(|| format!("{kind} output {out:?}"))
}

pub(super) fn run_in(
    ns: &Netns,
    program: &str,
    args: &[&str],
    input: Option<&Path>,
) -> Result<f64> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, program]).args(args);
    if let Some(p) = input {
        cmd.stdin(std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?);
    }
    let started = Instant::now();
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(ms)
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// What programming one mode left: Skiff's dataplane (alive during the
/// traffic run), the cold programming time and the median time to add one
/// service.
struct Programmed {
    _skiff: Option<(Dataplane, PinDir)>,
    program_ms: Option<f64>,
    add_one_us: Option<f64>,
}

impl Programmed {
    fn new(
        skiff: Option<(Dataplane, PinDir)>,
        program_ms: Option<f64>,
        add_one_us: Option<f64>,
    ) -> Self {
        Self {
            _skiff: skiff,
            program_ms,
            add_one_us,
        }
    }
}

/// Programs `mode` for `n` services in the topology.
fn program(mode: Mode, n: usize, topo: &Topology, scratch: &Path) -> Result<Programmed> {
    let services = bench_services(n);
    let extra: Vec<BenchService> = (0..ADD_ONE_REPS)
        .map(|j| BenchService {
            vip: vip(n + 1000 + j),
            port: 80,
            endpoints: endpoints(n + 1000 + j),
        })
        .collect();
    match mode {
        Mode::Direct => Ok(Programmed::new(None, None, None)),
        Mode::Skiff => {
            let pins = PinDir::new();
            let mut dp = Dataplane::install(&pins.path, &topo.cg.path)?;
            let desired: BTreeMap<String, Vec<Frontend>> = services
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("bench/svc-{i}"), vec![frontend(s)]))
                .collect();
            let started = Instant::now();
            dp.sync_all(&desired)?;
            let program_ms = started.elapsed().as_secs_f64() * 1e3;
            let mut adds = Vec::new();
            for (j, s) in extra.iter().enumerate() {
                let f = frontend(s);
                let started = Instant::now();
                dp.sync_service(&format!("bench/extra-{j}"), &[f])?;
                adds.push(started.elapsed().as_secs_f64() * 1e6);
            }
            for j in 0..extra.len() {
                dp.sync_service(&format!("bench/extra-{j}"), &[])?;
            }
            Ok(Programmed::new(
                Some((dp, pins)),
                Some(program_ms),
                median(adds),
            ))
        }
        Mode::Iptables => {
            let file = scratch.join("iptables.rules");
            std::fs::write(&file, rules::iptables_restore(&services))?;
            let program_ms = run_in(&topo.client, "iptables-restore", &[], Some(&file))?;
            let mut adds = Vec::new();
            for (j, s) in extra.iter().enumerate().take(5) {
                let f = scratch.join("iptables-add.rules");
                std::fs::write(&f, rules::iptables_add_one(n + j, s))?;
                adds.push(
                    run_in(&topo.client, "iptables-restore", &["--noflush"], Some(&f))? * 1e3,
                );
            }
            // Take the added services out again so every mode serves n.
            std::fs::write(&file, rules::iptables_restore(&services))?;
            run_in(&topo.client, "iptables-restore", &[], Some(&file))?;
            Ok(Programmed::new(None, Some(program_ms), median(adds)))
        }
        Mode::Nftables => {
            let file = scratch.join("kube-proxy.nft");
            std::fs::write(&file, rules::nft_script(&services))?;
            let program_ms = run_in(&topo.client, "nft", &["-f", &file.to_string_lossy()], None)?;
            let mut adds = Vec::new();
            for (j, s) in extra.iter().enumerate().take(5) {
                let f = scratch.join("nft-add.nft");
                std::fs::write(&f, rules::nft_add_one(n + j, s))?;
                adds.push(run_in(&topo.client, "nft", &["-f", &f.to_string_lossy()], None)? * 1e3);
            }
            Ok(Programmed::new(None, Some(program_ms), median(adds)))
        }
    }
}

/// Idle fraction of all CPUs over `window`, from /proc/stat.
fn idle_fraction(window: std::time::Duration) -> Option<f64> {
    let read = || -> Option<(u64, u64)> {
        let v = super::stats::cpu_ticks()?;
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((idle, v.iter().sum()))
    };
    let (i0, t0) = read()?;
    std::thread::sleep(window);
    let (i1, t1) = read()?;
    let dt = t1.saturating_sub(t0);
    (dt > 0).then(|| i1.saturating_sub(i0) as f64 / dt as f64)
}

/// Waits until the machine is quiet again: deleting a namespace (and the
/// tens of thousands of rules in it) finishes in kernel workers after the
/// namespace is gone, and would otherwise slow the next measurement.
pub(super) fn settle() {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while Instant::now() < deadline {
        match idle_fraction(std::time::Duration::from_millis(300)) {
            Some(idle) if idle < 0.9 => continue,
            _ => return,
        }
    }
}

/// What the programs cost per call at `n` services, counted by the kernel
/// (`kernel.bpf_stats_enabled`) in a load of its own: counting adds a
/// clock read per call, so it never runs during a rate measurement.
#[derive(Debug, Serialize)]
pub struct ProgramCost {
    pub services: usize,
    pub program: &'static str,
    pub runs: u64,
    pub ns_per_run: f64,
    /// The load's connection rate with counting on (for scale).
    pub rate: f64,
}

fn program_cost(n: usize, conns: u64, args: &Args) -> Result<Vec<ProgramCost>> {
    settle();
    let scratch = TempDir::new();
    let topo = Topology::new();
    let programmed = program(Mode::Skiff, n, &topo, &scratch.path)?;
    let pins = programmed
        ._skiff
        .as_ref()
        .map(|(_, p)| p.path.clone())
        .context("skiff mode has pins")?;
    let (load, costs) = super::stats::bpf_cost(
        || skiff_agent::proxy::dataplane::program_stats(&pins),
        || topo.load(&targets(Mode::Skiff, n, State::Fresh), conns, args.threads),
    )?;
    drop(programmed);
    drop(topo);
    Ok(costs
        .into_iter()
        .map(|c| {
            eprintln!(
                "  {n:>6} services  {}: {:.0} ns per run ({} runs)",
                c.program, c.ns_per_run, c.runs
            );
            ProgramCost {
                services: n,
                program: c.program,
                runs: c.runs,
                ns_per_run: c.ns_per_run,
                rate: load.rate,
            }
        })
        .collect())
}

fn measure(
    mode: Mode,
    n: usize,
    state: State,
    round: usize,
    conns: u64,
    args: &Args,
) -> Result<Sample> {
    settle();
    let scratch = TempDir::new();
    let topo = Topology::new();
    let programmed = program(mode, n, &topo, &scratch.path)?;
    // The work programming leaves behind (the previous run's maps freed in
    // the background, RCU callbacks, kernel workers) finishes before the
    // load, so that it is not counted against the mode that programmed.
    settle();
    let busy_before = super::stats::busy_seconds();
    let load = topo.load(&targets(mode, n, state), conns, args.threads)?;
    // RCU callbacks and other work the connections deferred run shortly
    // after them; the same tail is counted for every mode.
    std::thread::sleep(std::time::Duration::from_millis(CPU_TAIL_MS));
    let cpu_us_per_conn = super::stats::busy_seconds()
        .zip(busy_before)
        .filter(|_| load.connections > 0)
        .map(|(after, before)| (after - before) * 1e6 / load.connections as f64);
    let Programmed {
        program_ms,
        add_one_us,
        ..
    } = programmed;
    // The programs detach (pins removed) before the cgroup and namespaces go.
    drop(programmed);
    drop(topo);
    let s = Sample {
        services: n,
        mode,
        state,
        round,
        rate: load.rate,
        p50_us: load.p50_us,
        p99_us: load.p99_us,
        connections: load.connections,
        errors: load.errors,
        cpu_us_per_conn,
        program_ms,
        add_one_us,
    };
    eprintln!(
        "  {:>6} services  {:<8} {:<6} round {}: {:>8.0} conn/s  p50 {:>6.0} us  p99 {:>6.0} us  cpu {:>5.1} us/conn  errors {}{}",
        n,
        mode.name(),
        format!("{state:?}").to_lowercase(),
        round,
        s.rate,
        s.p50_us,
        s.p99_us,
        s.cpu_us_per_conn.unwrap_or(f64::NAN),
        s.errors,
        s.program_ms
            .map(|p| format!("  programmed in {p:.1} ms"))
            .unwrap_or_default()
    );
    Ok(s)
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub services: usize,
    pub mode: Mode,
    pub state: State,
    pub rate: f64,
    pub rate_min: f64,
    pub rate_max: f64,
    /// Median over rounds of this mode's rate ÷ direct's in the same round
    /// (pairs taken a few seconds apart, so drift of the machine cancels).
    pub ratio_to_direct: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Approximate 95 % confidence interval of that median (order
    /// statistics of the pairs): what a target can be checked against.
    pub ratio_ci: (f64, f64),
    /// Median busy CPU per connection, microseconds.
    pub cpu_us_per_conn: Option<f64>,
    /// Median over rounds of direct's CPU per connection ÷ this mode's in
    /// the same round: the rate ratio a CPU-bound load would reach on a
    /// machine of its own (1.0 = costs nothing over direct).
    pub cpu_ratio: Option<f64>,
    pub cpu_ratio_ci: (f64, f64),
    pub p50_us: f64,
    pub p99_us: f64,
    pub program_ms: Option<f64>,
    pub add_one_us: Option<f64>,
    pub errors: u64,
}

fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut groups: BTreeMap<(State, usize, Mode), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.state, s.services, s.mode))
            .or_default()
            .push(s);
    }
    let rate_of = |g: &[&Sample]| median(g.iter().map(|s| s.rate).collect()).unwrap_or(0.0);
    let mut out = Vec::new();
    for ((state, n, mode), g) in &groups {
        let direct = groups.get(&(*state, *n, Mode::Direct));
        let mut paired: Vec<f64> = g
            .iter()
            .filter_map(|s| {
                let d = direct?.iter().find(|d| d.round == s.round)?;
                (d.rate > 0.0).then(|| s.rate / d.rate)
            })
            .collect();
        paired.sort_by(f64::total_cmp);
        let mut cpu_paired: Vec<f64> = g
            .iter()
            .filter_map(|s| {
                let d = direct?.iter().find(|d| d.round == s.round)?;
                let (mine, theirs) = (s.cpu_us_per_conn?, d.cpu_us_per_conn?);
                (mine > 0.0).then(|| theirs / mine)
            })
            .collect();
        cpu_paired.sort_by(f64::total_cmp);
        let rate = rate_of(g);
        out.push(Summary {
            cpu_us_per_conn: median(g.iter().filter_map(|s| s.cpu_us_per_conn).collect()),
            cpu_ratio_ci: super::stats::median_ci(&cpu_paired),
            cpu_ratio: median(cpu_paired),
            ratio_ci: super::stats::median_ci(&paired),
            ratio_to_direct: median(paired.clone()).unwrap_or(f64::NAN),
            ratio_min: paired.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_max: paired.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            services: *n,
            mode: *mode,
            state: *state,
            rate,
            rate_min: g.iter().map(|s| s.rate).fold(f64::INFINITY, f64::min),
            rate_max: g.iter().map(|s| s.rate).fold(0.0, f64::max),
            p50_us: median(g.iter().map(|s| s.p50_us).collect()).unwrap_or(0.0),
            p99_us: median(g.iter().map(|s| s.p99_us).collect()).unwrap_or(0.0),
            program_ms: median(g.iter().filter_map(|s| s.program_ms).collect()),
            add_one_us: median(g.iter().filter_map(|s| s.add_one_us).collect()),
            errors: g.iter().map(|s| s.errors).sum(),
        });
    }
    out
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{} {unit}", plot::label(v)))
}

pub fn print_table(summary: &[Summary]) {
    println!();
    println!(
        "{:<7} {:>8} {:<9} {:>9} {:>15} {:>8} {:>13} {:>13} {:>8} {:>8} {:>9} {:>9} {:>13} {:>12} {:>12} {:>6}",
        "state",
        "services",
        "mode",
        "conn/s",
        "min..max",
        "ratio",
        "ratio min..max",
        "ratio 95% CI",
        "p50 us",
        "p99 us",
        "cpu us",
        "cpu ratio",
        "cpu 95% CI",
        "program",
        "add one",
        "errors"
    );
    for s in summary {
        println!(
            "{:<7} {:>8} {:<9} {:>9.0} {:>15} {:>8.3} {:>13} {:>13} {:>8.0} {:>8.0} {:>9} {:>9} {:>13} {:>12} {:>12} {:>6}",
            format!("{:?}", s.state).to_lowercase(),
            s.services,
            s.mode.name(),
            s.rate,
            format!("{:.0}..{:.0}", s.rate_min, s.rate_max),
            s.ratio_to_direct,
            format!("{:.3}..{:.3}", s.ratio_min, s.ratio_max),
            format!("{:.3}..{:.3}", s.ratio_ci.0, s.ratio_ci.1),
            s.p50_us,
            s.p99_us,
            s.cpu_us_per_conn
                .map_or_else(|| "-".to_string(), |v| format!("{v:.1}")),
            s.cpu_ratio
                .map_or_else(|| "-".to_string(), |v| format!("{v:.3}")),
            format!("{:.3}..{:.3}", s.cpu_ratio_ci.0, s.cpu_ratio_ci.1),
            fmt_opt(s.program_ms, "ms"),
            fmt_opt(s.add_one_us, "us"),
            s.errors
        );
    }
    println!(
        "ratio = median over rounds of the connection rate / direct's (the limit: the backend's own address) in the same round, size and state; 95% CI: where that median lies, from the rounds' spread (more rounds narrow it); cpu = the machine's busy CPU per connection (client, server, softirq and deferred work; steal excluded), cpu ratio = median over rounds of direct's cpu / this mode's"
    );
}

pub fn run(args: &Args) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench proxy: sizes {:?}, {} rounds, {} connections per fresh run, {} per steady run (sizes {:?}), {} client threads, {cores} cores",
        args.sizes, args.rounds, args.conns, args.steady_conns, args.steady_sizes, args.threads
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut states = vec![(State::Fresh, &args.sizes, args.conns)];
    if args.steady_conns > 0 {
        states.push((State::Steady, &args.steady_sizes, args.steady_conns));
    }
    for (state, sizes, conns) in states {
        for round in 0..args.rounds {
            for &n in sizes {
                // Rotate the order each round so that no mode always runs
                // first (or right after the slowest teardown).
                let mut modes: Vec<Mode> = args.modes_at(n).collect();
                let len = modes.len().max(1);
                modes.rotate_left(round % len);
                for mode in modes {
                    samples.push(measure(mode, n, state, round, conns, args)?);
                }
            }
        }
    }
    let mut pairs = Vec::new();
    if args.pairs > 0 {
        for &n in &args.sizes {
            pairs.extend(paired(n, State::Fresh, args)?);
        }
        if args.steady_conns > 0 {
            for &n in &args.steady_sizes {
                pairs.extend(paired(n, State::Steady, args)?);
            }
        }
    }
    let mut costs = Vec::new();
    if args.modes.contains(&Mode::Skiff) {
        for &n in &args.sizes {
            costs.extend(program_cost(n, args.conns, args)?);
        }
    }
    let summary = summarize(&samples);
    if !summary.is_empty() {
        print_table(&summary);
    }
    let paired_summary = summarize_pairs(&pairs);
    if !paired_summary.is_empty() {
        print_pairs(&paired_summary, args);
    }
    if !costs.is_empty() {
        println!("\nprogram cost (kernel.bpf_stats_enabled, a load of its own)");
        println!(
            "{:>8} {:<20} {:>10} {:>10}",
            "services", "program", "ns/run", "runs"
        );
        for c in &costs {
            println!(
                "{:>8} {:<20} {:>10.0} {:>10}",
                c.services, c.program, c.ns_per_run, c.runs
            );
        }
    }
    if args.modes.contains(&Mode::Nftables) && args.sizes.iter().any(|n| *n > args.nft_max) {
        println!(
            "nftables not loaded above {} services (--nft-max): nft's load time grows quadratically here",
            args.nft_max
        );
    }

    let doc = serde_json::json!({
        "args": {
            "sizes": args.sizes, "rounds": args.rounds, "conns": args.conns,
            "steady_conns": args.steady_conns, "steady_sizes": args.steady_sizes,
            "threads": args.threads, "nft_max": args.nft_max,
            "pairs": args.pairs, "chunk": args.chunk,
            "together": args.together, "window_ms": args.window_ms, "control": args.control,
        },
        "summary": summary,
        "paired": paired_summary,
        "pairs": pairs,
        "samples": samples,
        "program_cost": costs,
    });
    super::publish(&args.out, "proxy", started, doc, |png| {
        plot_results(&summary, png)
    })
}

// ---- paired: skiff and direct alternating in one topology ----

/// Connections one topology takes in the fresh state of a paired run, both
/// modes together: every connection leaves its port in TIME_WAIT, and
/// connects slowed from about 16 000 to 900 per second once 28 000 had
/// been made (the ephemeral range, 32768-60999, shared by the two backend
/// destinations).
pub(super) const FRESH_BUDGET: u64 = 24_000;
/// Pause before each load of a pair: the previous load's deferred work
/// (RCU frees of closed sockets) is done before the next starts.
const PAIR_PAUSE_MS: u64 = 100;

/// One pair: a skiff load and a direct load, a few hundred milliseconds
/// apart or at the same time, in the same namespaces and port-range state.
#[derive(Debug, Serialize)]
pub(super) struct Pair {
    pub services: usize,
    pub state: State,
    pub skiff_first: bool,
    pub skiff: Load,
    pub direct: Load,
    /// Direct's load through an empty connect program (`--hooked`).
    pub hooked: Option<Load>,
}

#[derive(Debug, Serialize)]
pub struct PairedSummary {
    pub services: usize,
    pub state: State,
    pub pairs: usize,
    pub errors: u64,
    /// Median over pairs of skiff's rate ÷ direct's.
    pub ratio: f64,
    pub ratio_ci: (f64, f64),
    /// Median over pairs of direct's client CPU per connection ÷ skiff's.
    pub cpu_ratio: f64,
    pub cpu_ratio_ci: (f64, f64),
    pub skiff_cpu_us: f64,
    pub direct_cpu_us: f64,
    /// With `--hooked`: median over pairs of the empty-hook arm's rate ÷
    /// direct's, and of skiff's ÷ the empty-hook arm's.
    pub hooked_ratio: Option<(f64, (f64, f64))>,
    pub skiff_hooked_ratio: Option<(f64, (f64, f64))>,
}

/// `pairs` pairs at `n` services: skiff's client in the programmed cgroup
/// dials the services, direct's in a cgroup without programs dials the
/// backends, in one client namespace, so that both share the port-range
/// state and the neighbour cache. One after the other (which goes first
/// alternates too), or with `--together` at the same time. The fresh state
/// takes a new topology before the port range could wrap; the steady state
/// wraps it first.
fn paired(n: usize, state: State, args: &Args) -> Result<Vec<Pair>> {
    let mut out = Vec::with_capacity(args.pairs);
    while out.len() < args.pairs {
        settle();
        let scratch = TempDir::new();
        let topo = Topology::new();
        let programmed = program(Mode::Skiff, n, &topo, &scratch.path)?;
        let plain = Cgroup::new();
        let control = args.control.then(Cgroup::new);
        let hook = if args.hooked {
            let cg = Cgroup::new();
            let link = empty_connect_hook(&cg)?;
            Some((cg, link))
        } else {
            None
        };
        let direct = targets(Mode::Direct, n, state);
        let services = targets(Mode::Skiff, n, state);
        // The direct and empty-hook arms dial the backends from their cgroup.
        let direct_load = |cg: &Cgroup, count: u64| {
            probe_load("load", &topo.client, Some(cg), &direct, count, args.threads)
        };
        if state == State::Steady {
            direct_load(&plain, args.steady_conns)?;
        }
        settle();
        // Connections this topology has taken, and the last pair's.
        let (mut used, mut last) = (0u64, 0u64);
        loop {
            if out.len() >= args.pairs
                || (state == State::Fresh && used > 0 && used + last > FRESH_BUDGET)
            {
                break;
            }
            let pair = if args.together {
                // With `--control`, the first arm is direct's load too, from a
                // plain cgroup of its own: what the method reads when the two
                // arms do the same.
                let (first_cg, first_to) = match &control {
                    Some(cg) => (cg, &direct),
                    None => (&topo.cg, &services),
                };
                let (skiff, direct) = side_by_side(
                    (&topo.client, Some(first_cg), first_to),
                    (&topo.client, Some(&plain), &direct),
                    args.window_ms,
                    args.threads,
                )?;
                Pair {
                    services: n,
                    state,
                    skiff_first: false,
                    skiff,
                    direct,
                    hooked: None,
                }
            } else {
                // Which arm goes first alternates; with the empty-hook arm,
                // the three take each place in turn (a load's place in the
                // sequence moves its rate by a few percent).
                let arms = if hook.is_some() { 3 } else { 2 };
                let first = out.len() % arms;
                let mut loads: [Option<Load>; 3] = [None, None, None];
                for k in 0..arms {
                    let arm = (first + k) % arms;
                    std::thread::sleep(std::time::Duration::from_millis(PAIR_PAUSE_MS));
                    loads[arm] = Some(match (arm, &hook) {
                        (0, _) => topo.load(&services, args.chunk, args.threads)?,
                        (2, Some((cg, _))) => direct_load(cg, args.chunk)?,
                        _ => direct_load(&plain, args.chunk)?,
                    });
                }
                let [Some(skiff), Some(direct), hooked] = loads else {
                    bail!("a pair's skiff or direct load is missing");
                };
                Pair {
                    services: n,
                    state,
                    skiff_first: first == 0,
                    skiff,
                    direct,
                    hooked,
                }
            };
            eprintln!(
                "  {n:>6} services  {:<6} pair {:>3}: skiff {:>7.0} conn/s {:>5.1} us cpu  direct {:>7.0} conn/s {:>5.1} us cpu  ratio {:.3}",
                format!("{state:?}").to_lowercase(),
                out.len(),
                pair.skiff.rate,
                pair.skiff.cpu_us,
                pair.direct.rate,
                pair.direct.cpu_us,
                pair.skiff.rate / pair.direct.rate
            );
            if let Some(h) = &pair.hooked {
                eprintln!(
                    "  {:>36} empty hook {:>7.0} conn/s {:>5.1} us cpu  ratio to direct {:.3}",
                    "",
                    h.rate,
                    h.cpu_us,
                    h.rate / pair.direct.rate
                );
            }
            last = pair.skiff.connections
                + pair.direct.connections
                + pair.hooked.as_ref().map_or(0, |h| h.connections);
            used += last;
            out.push(pair);
        }
        drop(hook);
        drop(control);
        // The programs detach (pins removed) before the cgroups and
        // namespaces go.
        drop(programmed);
        drop(plain);
        drop(topo);
    }
    Ok(out)
}

/// How far ahead of now two side-by-side loads are told to start: time
/// for both processes to start and join their namespace and cgroup.
const WINDOW_LEAD_MS: u64 = 150;

/// Where one side-by-side load runs (namespace, cgroup) and what it dials.
pub(super) type Arm<'a> = (&'a Netns, Option<&'a Cgroup>, &'a [SocketAddr]);

/// Two `skiff-probe load-window` loads at the same time, after a pause for
/// the previous pair's deferred work: both count the connections they
/// complete in the same `window_ms` from one CLOCK_MONOTONIC instant,
/// thread k of each on CPU k.
pub(super) fn side_by_side(
    first: Arm<'_>,
    second: Arm<'_>,
    window_ms: u64,
    threads: u64,
) -> Result<(Load, Load)> {
    std::thread::sleep(std::time::Duration::from_millis(PAIR_PAUSE_MS));
    let start = skiff_tests::monotonic_ns() + WINDOW_LEAD_MS * 1_000_000;
    let window =
        |(ns, cg, to): Arm<'_>| run_probe(ns, cg, "load-window", to, &[start, window_ms, threads]);
    std::thread::scope(|scope| {
        let a = scope.spawn(|| window(first));
        let b = window(second);
        let a = a
            .join()
            .map_err(|_| anyhow::anyhow!("the first load's thread panicked"))?;
        Ok((a?, b?))
    })
}

/// Attaches a connect4 program that only says "proceed" to `cg`: what
/// every connect through a cgroup hook pays before any translation. It is
/// detached when the returned link is closed.
fn empty_connect_hook(cg: &Cgroup) -> Result<std::os::fd::OwnedFd> {
    use skiff_agent::proxy::sys::{BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd, insn, put32, put64};
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const MOV_K: u8 = 0xb7;
    const EXIT: u8 = 0x95;
    // r0 = 1 (proceed); exit
    let insns = [insn(MOV_K, 0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)];
    let license = c"GPL";
    let mut attr = [0u8; 72];
    put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 68, BPF_CGROUP_INET4_CONNECT);
    // SAFETY: the instructions and the license outlive the call, which
    // only reads them.
    let prog = unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }.context("loading the empty hook")?;
    let dir = std::fs::File::open(&cg.path).context("opening the hook's cgroup")?;
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, dir.as_raw_fd() as u32);
    put32(&mut attr, 8, BPF_CGROUP_INET4_CONNECT);
    // SAFETY: link create only reads the descriptors in `attr`.
    unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }.context("attaching the empty hook")
}

fn summarize_pairs(pairs: &[Pair]) -> Vec<PairedSummary> {
    let mut groups: BTreeMap<(State, usize), Vec<&Pair>> = BTreeMap::new();
    for p in pairs {
        groups.entry((p.state, p.services)).or_default().push(p);
    }
    groups
        .into_iter()
        .map(|((state, services), ps)| {
            let sorted =
                |f: &dyn Fn(&Pair) -> f64| super::stats::sorted_finite(ps.iter().map(|p| f(p)));
            let ratios = sorted(&|p| p.skiff.rate / p.direct.rate);
            let cpu = sorted(&|p| p.direct.cpu_us / p.skiff.cpu_us);
            let with_ci = |v: Vec<f64>| {
                (!v.is_empty()).then(|| (super::stats::pct(&v, 0.5), super::stats::median_ci(&v)))
            };
            let hook_rate = |p: &Pair| p.hooked.as_ref().map_or(f64::NAN, |h| h.rate);
            PairedSummary {
                services,
                state,
                pairs: ps.len(),
                errors: ps.iter().map(|p| p.skiff.errors + p.direct.errors).sum(),
                ratio: super::stats::pct(&ratios, 0.5),
                ratio_ci: super::stats::median_ci(&ratios),
                cpu_ratio: super::stats::pct(&cpu, 0.5),
                cpu_ratio_ci: super::stats::median_ci(&cpu),
                skiff_cpu_us: super::stats::pct(&sorted(&|p| p.skiff.cpu_us), 0.5),
                direct_cpu_us: super::stats::pct(&sorted(&|p| p.direct.cpu_us), 0.5),
                hooked_ratio: with_ci(sorted(&|p| hook_rate(p) / p.direct.rate)),
                skiff_hooked_ratio: with_ci(sorted(&|p| p.skiff.rate / hook_rate(p))),
            }
        })
        .collect()
}

fn print_pairs(summary: &[PairedSummary], args: &Args) {
    let title = match (args.together, args.control) {
        (false, _) => "skiff and direct alternating in one topology",
        (true, false) => "skiff and direct side by side in one topology",
        (true, true) => {
            "control: direct and direct side by side (--control; \"skiff\" is a second direct load)"
        }
    };
    let how = if args.together {
        format!(
            "each pair two loads running the same {} ms, their threads on the same CPUs",
            args.window_ms
        )
    } else {
        "each pair two loads a few hundred ms apart in the same namespaces".to_string()
    };
    println!(
        "\npaired: {title}\n{:<7} {:>8} {:>6} {:>7} {:>17} {:>13} {:>9} {:>17} {:>7}",
        "state",
        "services",
        "pairs",
        "ratio",
        "95% CI",
        "client cpu us",
        "cpu ratio",
        "95% CI",
        "errors"
    );
    for s in summary {
        println!(
            "{:<7} {:>8} {:>6} {:>7.3} {:>17} {:>13} {:>9.3} {:>17} {:>7}",
            format!("{:?}", s.state).to_lowercase(),
            s.services,
            s.pairs,
            s.ratio,
            format!("{:.3} - {:.3}", s.ratio_ci.0, s.ratio_ci.1),
            format!("{:.1} / {:.1}", s.skiff_cpu_us, s.direct_cpu_us),
            s.cpu_ratio,
            format!("{:.3} - {:.3}", s.cpu_ratio_ci.0, s.cpu_ratio_ci.1),
            s.errors
        );
    }
    for s in summary {
        if let (Some((h, hci)), Some((sh, shci))) = (s.hooked_ratio, s.skiff_hooked_ratio) {
            println!(
                "{:<7} {:>8} empty hook / direct {:.3} ({:.3} - {:.3}), skiff / empty hook {:.3} ({:.3} - {:.3})",
                format!("{:?}", s.state).to_lowercase(),
                s.services,
                h,
                hci.0,
                hci.1,
                sh,
                shci.0,
                shci.1
            );
        }
    }
    println!(
        "ratio = median over pairs of skiff's conn/s / direct's, {how}; client cpu = the client process's own CPU per connection (skiff / direct), cpu ratio = median over pairs of direct's / skiff's"
    );
}

// ---- the plot ----

pub(super) fn color(m: Mode) -> RGBColor {
    match m {
        Mode::Direct => BLACK,
        Mode::Skiff => RGBColor(0, 114, 178),
        Mode::Iptables => RGBColor(213, 94, 0),
        Mode::Nftables => RGBColor(0, 158, 115),
    }
}

/// One line with points per mode, and the legend.
fn draw_modes<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(Mode, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let named: Vec<Series<'_>> = series
        .iter()
        .filter(|(_, pts)| !pts.is_empty())
        .map(|(mode, pts)| (mode.name(), color(*mode), pts.clone()))
        .collect();
    draw_named(chart, &named, legend)
}

/// Left: fresh-state connection rate against the number of services.
/// Right: time to program all services from cold.
fn plot_results(summary: &[Summary], path: &Path) -> Result<()> {
    register_font()?;
    let fresh: Vec<&Summary> = summary.iter().filter(|s| s.state == State::Fresh).collect();
    let max_n = fresh.iter().map(|s| s.services).max().unwrap_or(1).max(10) as f64;
    let max_rate = fresh.iter().map(|s| s.rate).fold(1.0, f64::max) * 1.1;
    let prog: Vec<&&Summary> = fresh.iter().filter(|s| s.program_ms.is_some()).collect();
    let max_prog = prog.iter().filter_map(|s| s.program_ms).fold(1.0, f64::max) * 2.0;
    let min_prog = prog
        .iter()
        .filter_map(|s| s.program_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.001, 1.0)
        / 2.0;

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);

    let mut chart = panel(
        &left,
        "TCP connect + request/response (fresh state)",
        (
            (0.5f64..max_n * 2.0).log_scale(),
            "services (2 endpoints each)",
        ),
        (0f64..max_rate, "connections / s"),
    )?;
    let series: Vec<(Mode, Vec<(f64, f64)>)> = Mode::ALL
        .into_iter()
        .map(|mode| {
            let pts = fresh
                .iter()
                .filter(|s| s.mode == mode)
                .map(|s| (s.services as f64, s.rate))
                .collect();
            (mode, pts)
        })
        .collect();
    draw_modes(&mut chart, &series, SeriesLabelPosition::LowerLeft)?;

    let mut chart = panel(
        &right,
        "programming all services from cold",
        ((0.5f64..max_n * 2.0).log_scale(), "services"),
        ((min_prog..max_prog).log_scale(), "milliseconds"),
    )?;
    let series: Vec<(Mode, Vec<(f64, f64)>)> = [Mode::Skiff, Mode::Iptables, Mode::Nftables]
        .into_iter()
        .map(|mode| {
            let pts = prog
                .iter()
                .filter(|s| s.mode == mode)
                .filter_map(|s| s.program_ms.map(|p| (s.services as f64, p)))
                .collect();
            (mode, pts)
        })
        .collect();
    draw_modes(&mut chart, &series, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_dials_the_services_in_the_same_turn_and_their_backends_at_random() {
        for (n, state) in [
            (1, State::Fresh),
            (50_000, State::Fresh),
            (1_000, State::Steady),
        ] {
            let services = targets(Mode::Skiff, n, state);
            let direct = targets(Mode::Direct, n, state);
            assert!(direct.len() >= services.len());
            // Entry j of direct's list is a backend of the service the
            // other modes dial at the same place in their (shorter) cycle.
            let index = |vip: &SocketAddr| match vip.ip() {
                std::net::IpAddr::V4(a) => (u32::from(a) - VIP_BASE) as usize,
                std::net::IpAddr::V6(_) => unreachable!("the bench's services are IPv4"),
            };
            for (j, to) in direct.iter().enumerate() {
                let svc = index(&services[j % services.len()]);
                assert!(
                    endpoints(svc)
                        .into_iter()
                        .map(SocketAddr::from)
                        .any(|b| b == *to),
                    "{to} is not a backend of service {svc}"
                );
            }
            // Not in turn: each backend is dialled about as often, and a
            // service's next pick repeats the last one about half the time.
            let first = SocketAddr::from(endpoints(index(&services[0]))[0]);
            let picks: Vec<bool> = direct
                .iter()
                .step_by(services.len())
                .map(|to| *to == first)
                .collect();
            let ones = picks.iter().filter(|p| **p).count() as f64 / picks.len() as f64;
            let repeats =
                picks.windows(2).filter(|w| w[0] == w[1]).count() as f64 / (picks.len() - 1) as f64;
            assert!((0.3..0.7).contains(&ones), "first backend share {ones}");
            assert!((0.3..0.7).contains(&repeats), "repeat share {repeats}");
        }
    }
}
