//! `cargo xtask bench nodeport`: a client outside the cluster hitting
//! NodePorts on node A, served by Skiff's TC path, by kube-proxy's iptables
//! NodePort layout (DNAT + masquerade) and, for the limit, by plain routing
//! to the backend's own address, in the same run.
//!
//! Topology (fresh for every measurement): client -- node A -- node B,
//! with two backend addresses in a pod namespace behind each node. Three
//! cases: `remote` (backends on node B: Skiff SNATs and redirects, iptables
//! masquerades), `local` (backends on node A) and `local-policy`
//! (`externalTrafficPolicy: Local`: node A's backends, the client's address
//! kept). Each measurement reports new connections per second with their
//! p99 (connect + request + close) and requests per second on kept-alive
//! connections.
//!
//! With `--together`, skiff's and direct's connection rates are also taken
//! side by side: two such topologies, alike but for Skiff's TC path on the
//! first's node A, each loaded from its own client in the same window,
//! their threads on the same CPUs, as `bench proxy --together` does.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::Serialize;
use skiff_agent::proxy::model::{ExternalSet, encode_ip, encode_port};
use skiff_agent::proxy::{External, ExternalConfig, Interfaces};
use skiff_ebpf_common::{BACKEND_LOCAL, EXT_LOCAL, ExtBackend, PROTO_TCP, ServiceKey};
use skiff_tests::netns::veth;
use skiff_tests::{Netns, PinDir, Proc, Spawn, TempDir, bin};

use super::plot::{Series, draw_named, panel, register_font};
use super::proxy::{
    FRESH_BUDGET, Load, Mode, color, median, probe_load, run_in, settle, side_by_side,
};
use super::rules::{self, BenchService, NodePorts};
use super::stats::{median_ci, pct, sorted_finite};

const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
const NODE_A: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const NODE_A_INNER: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 1);
const NODE_B_INNER: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 2);
const PODS_A: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)];
const PODS_B: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 2, 2), Ipv4Addr::new(10, 244, 2, 3)];
const BACKEND_PORT: u16 = 8080;
/// Service `i` has NodePort `NODE_PORT_BASE + i` (a range wider than the
/// default one, for 10 000 services).
const NODE_PORT_BASE: u16 = 20_000;
const VIP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// NodePorts the client cycles through, spread evenly over the table.
const TARGETS: usize = 64;

pub const MODES: [Mode; 3] = [Mode::Direct, Mode::Skiff, Mode::Iptables];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    Remote,
    Local,
    LocalPolicy,
}

impl Case {
    pub const ALL: [Case; 3] = [Case::Remote, Case::Local, Case::LocalPolicy];

    pub fn name(self) -> &'static str {
        match self {
            Case::Remote => "remote",
            Case::Local => "local",
            Case::LocalPolicy => "local-policy",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .with_context(|| format!("unknown case {s:?} (remote, local, local-policy)"))
    }

    fn backends(self) -> [Ipv4Addr; 2] {
        match self {
            Case::Remote => PODS_B,
            Case::Local | Case::LocalPolicy => PODS_A,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Args {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub conns: u64,
    pub requests: u64,
    pub threads: u64,
    pub cases: Vec<Case>,
    pub maglev_size: u32,
    /// Local backends reached directly through node A's pod interface
    /// (`skiff_from_pods` on it), rather than through its forwarding path.
    pub pods_direct: bool,
    /// Side-by-side pairs per case and size (with `together`).
    pub pairs: usize,
    pub together: bool,
    pub window_ms: u64,
    /// With `together`: both arms direct (a control of the method).
    pub control: bool,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Sample {
    pub case: Case,
    pub services: usize,
    pub mode: Mode,
    pub round: usize,
    pub conn_rate: f64,
    pub conn_p99_us: f64,
    pub req_rate: f64,
    pub req_p99_us: f64,
    pub errors: u64,
    pub program_ms: Option<f64>,
}

/// Client, node A, node B and a pod namespace behind each node, routed;
/// servers on every pod address. Dropped after each measurement.
struct Topology {
    _servers: Vec<Proc>,
    client: Netns,
    a: Netns,
    _b: Netns,
    _pods: [Netns; 2],
}

impl Topology {
    fn new() -> Result<Self> {
        let (client, a, b) = (Netns::new(), Netns::new(), Netns::new());
        let (pod_a, pod_b) = (Netns::new(), Netns::new());
        veth(
            &client,
            "eth0",
            &format!("{CLIENT}/24"),
            &a,
            "ext0",
            &format!("{NODE_A}/24"),
        );
        veth(
            &a,
            "ab0",
            &format!("{NODE_A_INNER}/24"),
            &b,
            "ba0",
            &format!("{NODE_B_INNER}/24"),
        );
        veth(
            &pod_a,
            "eth0",
            &format!("{}/24", PODS_A[0]),
            &a,
            "pod0",
            "10.244.1.1/24",
        );
        veth(
            &pod_b,
            "eth0",
            &format!("{}/24", PODS_B[0]),
            &b,
            "pod0",
            "10.244.2.1/24",
        );
        pod_a.ip(&["addr", "add", &format!("{}/24", PODS_A[1]), "dev", "eth0"]);
        pod_b.ip(&["addr", "add", &format!("{}/24", PODS_B[1]), "dev", "eth0"]);
        pod_a.ip(&["route", "add", "default", "via", "10.244.1.1"]);
        pod_b.ip(&["route", "add", "default", "via", "10.244.2.1"]);
        // The limit dials the pods through node A.
        client.ip(&["route", "add", "10.244.0.0/16", "via", &NODE_A.to_string()]);
        a.ip(&[
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            &NODE_B_INNER.to_string(),
        ]);
        b.ip(&[
            "route",
            "add",
            "172.30.0.0/24",
            "via",
            &NODE_A_INNER.to_string(),
        ]);
        for ns in [&a, &b] {
            ns.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        }
        let mut servers = Vec::new();
        for (ns, ips) in [(&pod_a, PODS_A), (&pod_b, PODS_B)] {
            for ip in ips {
                let mut p = Spawn::new(bin("skiff-probe"))
                    .args([
                        "serve-tcp",
                        &format!("{ip}:{BACKEND_PORT}"),
                        &ip.to_string(),
                    ])
                    .netns(ns)
                    .start();
                if p.ask("") != "ready" {
                    bail!("the backend server on {ip} did not start");
                }
                servers.push(p);
            }
        }
        Ok(Self {
            _servers: servers,
            client,
            a,
            _b: b,
            _pods: [pod_a, pod_b],
        })
    }
}

fn node_port(i: usize) -> u16 {
    NODE_PORT_BASE + i as u16
}

fn targets(mode: Mode, case: Case, n: usize) -> Vec<SocketAddr> {
    if mode == Mode::Direct {
        // One of the backends at random per connection, as Skiff and
        // iptables spread flows (strict turns alone read faster, see
        // `proxy::DIRECT_PICKS`).
        let backends = case.backends();
        return (0..super::proxy::DIRECT_PICKS)
            .map(|j| {
                SocketAddr::from((
                    backends[super::stats::pick(j, backends.len())],
                    BACKEND_PORT,
                ))
            })
            .collect();
    }
    let k = TARGETS.min(n);
    let mut idx: Vec<usize> = (0..k).map(|j| j * n / k + (n / k) / 2).collect();
    idx.dedup();
    idx.into_iter()
        .map(|i| SocketAddr::from((NODE_A, node_port(i.min(n - 1)))))
        .collect()
}

/// Skiff's TC path on node A, alive while it is held.
struct Programmed {
    _skiff: Option<(External, PinDir)>,
    program_ms: Option<f64>,
}

fn external_sets(case: Case, n: usize) -> BTreeMap<String, Vec<ExternalSet>> {
    let local = case != Case::Remote;
    let mut backends: Vec<ExtBackend> = case
        .backends()
        .iter()
        .map(|ip| {
            let (family, addr) = encode_ip((*ip).into());
            ExtBackend {
                addr,
                port: encode_port(BACKEND_PORT),
                family,
                flags: if local { BACKEND_LOCAL } else { 0 },
            }
        })
        .collect();
    backends.sort();
    let (family, addr) = encode_ip(NODE_A.into());
    (0..n)
        .map(|i| {
            let service = format!("bench/svc-{i}");
            let set = ExternalSet {
                name: format!("{service}:80/TCP/4"),
                frontends: vec![ServiceKey {
                    addr,
                    port: encode_port(node_port(i)),
                    proto: PROTO_TCP,
                    family,
                }],
                backends: backends.clone(),
                flags: if case == Case::LocalPolicy {
                    EXT_LOCAL
                } else {
                    0
                },
                affinity_timeout: 0,
            };
            (service, vec![set])
        })
        .collect()
}

fn program(
    mode: Mode,
    case: Case,
    n: usize,
    topo: &Topology,
    scratch: &Path,
    args: &Args,
) -> Result<Programmed> {
    match mode {
        Mode::Direct | Mode::Nftables => Ok(Programmed {
            _skiff: None,
            program_ms: None,
        }),
        Mode::Skiff => {
            let pins = PinDir::new();
            // The programs attach to node A's interfaces by name: look
            // them up from inside its namespace.
            let _inside = skiff_netlink::NetnsGuard::enter(&topo.a.path())
                .context("entering node A's namespace")?;
            let cfg = ExternalConfig {
                interfaces: vec!["ext0".into(), "ab0".into()],
                pod_interfaces: if args.pods_direct {
                    vec!["pod0".into()]
                } else {
                    Vec::new()
                },
                maglev_size: args.maglev_size,
            };
            let mut ext = External::install(&pins.path, cfg, &Interfaces::default())?;
            let desired = external_sets(case, n);
            let started = Instant::now();
            ext.sync_all(&desired)?;
            let program_ms = started.elapsed().as_secs_f64() * 1e3;
            Ok(Programmed {
                _skiff: Some((ext, pins)),
                program_ms: Some(program_ms),
            })
        }
        Mode::Iptables => {
            let services: Vec<BenchService> = (0..n)
                .map(|i| BenchService {
                    vip: Ipv4Addr::from(VIP_BASE + i as u32),
                    port: 80,
                    endpoints: case.backends().iter().map(|b| (*b, BACKEND_PORT)).collect(),
                })
                .collect();
            let ports: Vec<u16> = (0..n).map(node_port).collect();
            let node_ports = NodePorts {
                ports: &ports,
                masquerade: case != Case::LocalPolicy,
            };
            let file = scratch.join("iptables.rules");
            std::fs::write(&file, rules::iptables_nodeports(&services, &node_ports))?;
            let program_ms = run_in(&topo.a, "iptables-restore", &[], Some(&file))?;
            Ok(Programmed {
                _skiff: None,
                program_ms: Some(program_ms),
            })
        }
    }
}

fn measure(mode: Mode, case: Case, n: usize, round: usize, args: &Args) -> Result<Sample> {
    settle();
    let scratch = TempDir::new();
    let topo = Topology::new()?;
    let programmed = program(mode, case, n, &topo, &scratch.path, args)?;
    let to = targets(mode, case, n);
    let (conns, reqs) = both_loads(&topo, &to, args)?;
    let program_ms = programmed.program_ms;
    drop(programmed);
    drop(topo);
    let s = Sample {
        case,
        services: n,
        mode,
        round,
        conn_rate: conns.rate,
        conn_p99_us: conns.p99_us,
        req_rate: reqs.rate,
        req_p99_us: reqs.p99_us,
        errors: conns.errors + reqs.errors,
        program_ms,
    };
    eprintln!(
        "  {:<12} {:>6} services  {:<8} round {}: {:>7.0} conn/s  p99 {:>6.0} us  {:>7.0} req/s  p99 {:>5.0} us  errors {}{}  ({} of {} connections)",
        case.name(),
        n,
        mode.name(),
        round,
        s.conn_rate,
        s.conn_p99_us,
        s.req_rate,
        s.req_p99_us,
        s.errors,
        program_ms
            .map(|p| format!("  programmed in {p:.1} ms"))
            .unwrap_or_default(),
        conns.connections,
        args.conns
    );
    Ok(s)
}

/// What the TC programs cost per run at `services`, counted by the kernel
/// (`kernel.bpf_stats_enabled`) in a load of its own: counting adds a
/// clock read per run, so it never runs during a rate measurement.
#[derive(Debug, Serialize)]
pub struct ProgramCost {
    pub case: Case,
    pub services: usize,
    pub program: &'static str,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// New connections to `to` (`args.conns` of them), then requests on kept
/// connections (`args.requests`), from the client namespace.
fn both_loads(topo: &Topology, to: &[SocketAddr], args: &Args) -> Result<(Load, Load)> {
    let conns = probe_load("load", &topo.client, None, to, args.conns, args.threads)?;
    let reqs = probe_load(
        "keepalive",
        &topo.client,
        None,
        to,
        args.requests,
        args.threads,
    )?;
    Ok((conns, reqs))
}

fn program_cost(case: Case, n: usize, args: &Args) -> Result<Vec<ProgramCost>> {
    settle();
    let scratch = TempDir::new();
    let topo = Topology::new()?;
    let programmed = program(Mode::Skiff, case, n, &topo, &scratch.path, args)?;
    let ext = programmed
        ._skiff
        .as_ref()
        .map(|(e, _)| e)
        .context("skiff mode has its TC path")?;
    let to = targets(Mode::Skiff, case, n);
    let (_, costs) =
        super::stats::bpf_cost(|| ext.program_stats(), || both_loads(&topo, &to, args))?;
    Ok(costs
        .into_iter()
        .map(|c| {
            eprintln!(
                "  {:<12} {n:>6} services  {}: {:.0} ns per run ({} runs)",
                case.name(),
                c.program,
                c.ns_per_run,
                c.runs
            );
            ProgramCost {
                case,
                services: n,
                program: c.program,
                runs: c.runs,
                ns_per_run: c.ns_per_run,
            }
        })
        .collect())
}

// ---- side by side: skiff and direct in the same window ----

/// One side-by-side pair: connections completed in the same window by a
/// client dialling NodePorts through Skiff and by one dialling the
/// backends, each in a topology of its own.
#[derive(Debug, Serialize)]
struct Pair {
    case: Case,
    services: usize,
    skiff: Load,
    direct: Load,
}

/// `args.pairs` pairs of `case` at `n` services. Two whole topologies are
/// made, alike but for Skiff's TC path on the first's node A (nothing
/// with `--control`, where the first client dials the backends too), so
/// that neither arm's packets pass the other's programs or rules, and
/// neither shares a client port range. Both are replaced before either
/// client's ports could run short.
fn paired(case: Case, n: usize, args: &Args) -> Result<Vec<Pair>> {
    let first_mode = if args.control {
        Mode::Direct
    } else {
        Mode::Skiff
    };
    let mut out = Vec::with_capacity(args.pairs);
    while out.len() < args.pairs {
        settle();
        let scratch = TempDir::new();
        let first = Topology::new()?;
        let second = Topology::new()?;
        let programmed = program(first_mode, case, n, &first, &scratch.path, args)?;
        let first_to = targets(first_mode, case, n);
        let direct_to = targets(Mode::Direct, case, n);
        let budget = client_budget(&first_to).min(client_budget(&direct_to));
        settle();
        // Connections the busier client has made, and its last pair's.
        let (mut used, mut last) = (0u64, 0u64);
        while out.len() < args.pairs && !(used > 0 && used + last > budget) {
            let (skiff, direct) = side_by_side(
                (&first.client, None, &first_to),
                (&second.client, None, &direct_to),
                args.window_ms,
                args.threads,
            )?;
            let pair = Pair {
                case,
                services: n,
                skiff,
                direct,
            };
            eprintln!(
                "  {:<12} {n:>6} services  pair {:>3}: skiff {:>7.0} conn/s  direct {:>7.0} conn/s  ratio {:.3}",
                case.name(),
                out.len(),
                pair.skiff.rate,
                pair.direct.rate,
                pair.skiff.rate / pair.direct.rate
            );
            last = pair.skiff.connections.max(pair.direct.connections);
            used += last;
            out.push(pair);
        }
        // The programs detach (pins removed) before the namespaces go.
        drop(programmed);
        drop(first);
        drop(second);
    }
    Ok(out)
}

/// Connections a client may make to `targets` before a new topology is
/// due: each closed connection holds its port towards its destination for
/// TIME_WAIT's minute, and connect() slows to a crawl (from about 7 000 to
/// 200 per second here) once it has to search a nearly used range. The
/// kernel takes even ports first, about 14 000 per destination.
fn client_budget(targets: &[SocketAddr]) -> u64 {
    const PER_DESTINATION: u64 = 10_000;
    let destinations = targets
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    FRESH_BUDGET.min(PER_DESTINATION * destinations)
}

#[derive(Debug, Serialize)]
pub struct PairedSummary {
    pub case: Case,
    pub services: usize,
    pub pairs: usize,
    pub errors: u64,
    /// Median over pairs of skiff's connection rate ÷ direct's.
    pub ratio: f64,
    pub ratio_ci: (f64, f64),
    pub skiff_rate: f64,
    pub direct_rate: f64,
}

fn summarize_pairs(pairs: &[Pair]) -> Vec<PairedSummary> {
    let mut groups: BTreeMap<(Case, usize), Vec<&Pair>> = BTreeMap::new();
    for p in pairs {
        groups.entry((p.case, p.services)).or_default().push(p);
    }
    groups
        .into_iter()
        .map(|((case, services), ps)| {
            let sorted = |f: fn(&Pair) -> f64| sorted_finite(ps.iter().map(|p| f(p)));
            let ratios = sorted(|p| p.skiff.rate / p.direct.rate);
            PairedSummary {
                case,
                services,
                pairs: ps.len(),
                errors: ps.iter().map(|p| p.skiff.errors + p.direct.errors).sum(),
                ratio: pct(&ratios, 0.5),
                ratio_ci: median_ci(&ratios),
                skiff_rate: pct(&sorted(|p| p.skiff.rate), 0.5),
                direct_rate: pct(&sorted(|p| p.direct.rate), 0.5),
            }
        })
        .collect()
}

fn print_pairs(summary: &[PairedSummary], args: &Args) {
    let title = if args.control {
        "control: direct and direct side by side (--control; \"skiff\" is a second direct client)"
    } else {
        "skiff and direct side by side"
    };
    println!(
        "\npaired: {title}\n{:<12} {:>8} {:>6} {:>7} {:>17} {:>10} {:>10} {:>7}",
        "case", "services", "pairs", "ratio", "95% CI", "skiff", "direct", "errors"
    );
    for s in summary {
        println!(
            "{:<12} {:>8} {:>6} {:>7.3} {:>17} {:>10.0} {:>10.0} {:>7}",
            s.case.name(),
            s.services,
            s.pairs,
            s.ratio,
            format!("{:.3} - {:.3}", s.ratio_ci.0, s.ratio_ci.1),
            s.skiff_rate,
            s.direct_rate,
            s.errors
        );
    }
    println!(
        "ratio = median over pairs of skiff's conn/s / direct's, each pair two clients (one per topology) running the same {} ms, their threads on the same CPUs; skiff, direct: median conn/s",
        args.window_ms
    );
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub case: Case,
    pub services: usize,
    pub mode: Mode,
    pub conn_rate: f64,
    pub conn_min: f64,
    pub conn_max: f64,
    pub conn_p99_us: f64,
    pub req_rate: f64,
    pub req_p99_us: f64,
    /// Connection rate ÷ the direct rate (same case and size).
    pub conn_to_direct: f64,
    /// Requests per second ÷ the direct rate.
    pub req_to_direct: f64,
    /// Connection rate ÷ iptables' (same case and size).
    pub conn_to_iptables: f64,
    pub program_ms: Option<f64>,
    pub errors: u64,
}

fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut groups: BTreeMap<(Case, usize, Mode), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups
            .entry((s.case, s.services, s.mode))
            .or_default()
            .push(s);
    }
    let med = |g: &[&Sample], f: fn(&Sample) -> f64| {
        median(g.iter().map(|s| f(s)).collect()).unwrap_or(f64::NAN)
    };
    let of = |case, n, mode, f: fn(&Sample) -> f64| {
        groups.get(&(case, n, mode)).map_or(f64::NAN, |g| med(g, f))
    };
    groups
        .iter()
        .map(|((case, n, mode), g)| {
            let conn = med(g, |s| s.conn_rate);
            let req = med(g, |s| s.req_rate);
            Summary {
                case: *case,
                services: *n,
                mode: *mode,
                conn_rate: conn,
                conn_min: g.iter().map(|s| s.conn_rate).fold(f64::INFINITY, f64::min),
                conn_max: g.iter().map(|s| s.conn_rate).fold(0.0, f64::max),
                conn_p99_us: med(g, |s| s.conn_p99_us),
                req_rate: req,
                req_p99_us: med(g, |s| s.req_p99_us),
                conn_to_direct: conn / of(*case, *n, Mode::Direct, |s| s.conn_rate),
                req_to_direct: req / of(*case, *n, Mode::Direct, |s| s.req_rate),
                conn_to_iptables: conn / of(*case, *n, Mode::Iptables, |s| s.conn_rate),
                program_ms: median(g.iter().filter_map(|s| s.program_ms).collect()),
                errors: g.iter().map(|s| s.errors).sum(),
            }
        })
        .collect()
}

fn print_table(summary: &[Summary]) {
    println!();
    println!(
        "{:<12} {:>8} {:<9} {:>8} {:>13} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6}",
        "case",
        "services",
        "mode",
        "conn/s",
        "min..max",
        "p99 us",
        "÷direct",
        "÷iptab",
        "req/s",
        "p99 us",
        "÷direct",
        "program",
        "errors"
    );
    for s in summary {
        println!(
            "{:<12} {:>8} {:<9} {:>8.0} {:>13} {:>8.0} {:>8.3} {:>8.3} {:>8.0} {:>8.0} {:>8.3} {:>10} {:>6}",
            s.case.name(),
            s.services,
            s.mode.name(),
            s.conn_rate,
            format!("{:.0}..{:.0}", s.conn_min, s.conn_max),
            s.conn_p99_us,
            s.conn_to_direct,
            s.conn_to_iptables,
            s.req_rate,
            s.req_p99_us,
            s.req_to_direct,
            s.program_ms
                .map_or_else(|| "-".to_string(), |p| format!("{p:.1} ms")),
            s.errors
        );
    }
    println!(
        "conn/s: connect + request + close from a client outside the cluster to NodePorts on node A; req/s: requests on kept-alive connections; ÷direct: against dialling the backend's own address through node A; ÷iptab: against kube-proxy's iptables NodePort layout"
    );
}

pub fn run(args: &Args) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench nodeport: sizes {:?}, cases {:?}, {} rounds, {} connections and {} requests per run, {} client threads, Maglev table {}, local backends reached {}, {cores} cores{}",
        args.sizes,
        args.cases.iter().map(|c| c.name()).collect::<Vec<_>>(),
        args.rounds,
        args.conns,
        args.requests,
        args.threads,
        args.maglev_size,
        if args.pods_direct {
            "directly"
        } else {
            "through the forwarding path"
        },
        if args.together {
            format!(
                "; {} side-by-side pairs of {} ms{}",
                args.pairs,
                args.window_ms,
                if args.control { " (control)" } else { "" }
            )
        } else {
            String::new()
        }
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for &case in &args.cases {
            for &n in &args.sizes {
                let mut modes = MODES.to_vec();
                modes.rotate_left(round % MODES.len());
                for mode in modes {
                    samples.push(measure(mode, case, n, round, args)?);
                }
            }
        }
    }
    let mut pairs = Vec::new();
    if args.together {
        for &case in &args.cases {
            for &n in &args.sizes {
                pairs.extend(paired(case, n, args)?);
            }
        }
    }
    // The programs' own cost comes with the sequential rounds.
    let mut costs = Vec::new();
    if args.rounds > 0 {
        for &case in &args.cases {
            for &n in &args.sizes {
                costs.extend(program_cost(case, n, args)?);
            }
        }
    }
    let summary = summarize(&samples);
    let paired_summary = summarize_pairs(&pairs);
    if !summary.is_empty() {
        print_table(&summary);
        println!(
            "\nTC program cost (kernel.bpf_stats_enabled, a load of its own: connections, then kept-alive requests)"
        );
        println!(
            "{:<12} {:>8} {:<14} {:>10} {:>10}",
            "case", "services", "program", "ns/run", "runs"
        );
        for c in &costs {
            println!(
                "{:<12} {:>8} {:<14} {:>10.0} {:>10}",
                c.case.name(),
                c.services,
                c.program,
                c.ns_per_run,
                c.runs
            );
        }
    }
    if !paired_summary.is_empty() {
        print_pairs(&paired_summary, args);
    }
    let doc = serde_json::json!({
        "args": {
            "sizes": args.sizes, "rounds": args.rounds, "conns": args.conns,
            "requests": args.requests, "threads": args.threads,
            "cases": args.cases, "maglev_size": args.maglev_size,
            "pods_direct": args.pods_direct,
            "together": args.together, "pairs": args.pairs,
            "window_ms": args.window_ms, "control": args.control,
        },
        "summary": summary,
        "samples": samples,
        "program_cost": costs,
        "paired_summary": paired_summary,
        "pairs": pairs,
    });
    super::publish(&args.out, "nodeport", started, doc, |png| {
        plot_results(&summary, png)
    })
}

/// One panel per case: connection rate against the number of services.
fn plot_results(summary: &[Summary], path: &Path) -> Result<()> {
    register_font()?;
    let max_n = summary
        .iter()
        .map(|s| s.services)
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let max_rate = summary.iter().map(|s| s.conn_rate).fold(1.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((1, Case::ALL.len()));
    for (area, case) in areas.iter().zip(Case::ALL) {
        let mut chart = panel(
            area,
            &format!("NodePort, {} backends", case.name()),
            ((0.5f64..max_n * 2.0).log_scale(), "services"),
            (0f64..max_rate, "connections / s"),
        )?;
        let series: Vec<Series<'_>> = MODES
            .iter()
            .map(|mode| {
                let pts = summary
                    .iter()
                    .filter(|s| s.case == case && s.mode == *mode)
                    .map(|s| (s.services as f64, s.conn_rate))
                    .collect();
                (mode.name(), color(*mode), pts)
            })
            .collect();
        draw_named(&mut chart, &series, SeriesLabelPosition::LowerLeft)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_dialling_one_nodeport_gets_a_new_topology_sooner_than_one_dialling_many() {
        let one = targets(Mode::Skiff, Case::Remote, 1);
        let many = targets(Mode::Skiff, Case::Remote, 1_000);
        let direct = targets(Mode::Direct, Case::Remote, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(client_budget(&one), 10_000);
        assert_eq!(client_budget(&direct), 20_000, "two backends");
        assert_eq!(client_budget(&many), FRESH_BUDGET);
    }
}
