//! `skiff-lab`: the demo (`cargo xtask up`) and the benchmarks
//! (`cargo xtask bench ...`). Needs root; everything runs in namespaces it
//! creates.

mod bench;
mod demo;
mod reap;

use bench::{cluster, control, dns, ingress, knobs, kubelet, net, nodeport, proxy};

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: skiff-lab demo [--once] [--ha]
       skiff-lab images [--push REGISTRY] [--plain-http]
       skiff-lab bench-proxy [--sizes 1,1000,10000,50000] [--rounds 3] [--conns 8000]
                             [--steady-conns 40000] [--steady-sizes 1,10000] [--threads 2]
                             [--modes direct,skiff,iptables,nftables] [--nft-max 10000]
                             [--pairs 0] [--chunk 2000] [--hooked false]
                             [--together false] [--window-ms 300] [--control false]
                             [--out target/bench]
       skiff-lab bench-control [--nodes 1000,5000] [--sched-pods 3000] [--pods 1000,10000]
                               [--samples 300] [--rounds 3] [--ha-writes 2000] [--ha-rounds 3]
                               [--job-pods 1000] [--hpa-rounds 3] [--dashboard-pods 1000]
                               [--out target/bench]
       skiff-lab bench-net [--rounds 3] [--seconds 5] [--cni-calls 100] [--leases 100,1000]
                           [--knobs veth-gro,underlay-gro,udp-gro-forwarding,no-tunnel-offload,
                                    no-bridge-netfilter,notrack|none]
                           [--parts throughput,turns,cni,convergence] [--turns 8]
                           [--turn-seconds 1] [--pin false] [--out target/bench]
       skiff-lab bench-kubelet [--singles 50] [--batch 30] [--batches 2] [--exits 30]
                               [--idle-pods 100] [--idle-seconds 30] [--rounds 2]
                               [--runtimes runc,crun] [--out target/bench]
       skiff-lab bench-cluster [--replicas 100] [--pods-per-node 30] [--out target/bench]
       skiff-lab bench-nodeport [--sizes 1,1000,10000] [--rounds 2] [--conns 8000]
                                [--requests 40000] [--threads 2]
                                [--cases remote,local,local-policy] [--maglev-size 16381]
                                [--pods-direct true]
                                [--together false] [--pairs 30] [--window-ms 300]
                                [--control false] [--out target/bench]
       skiff-lab bench-dns [--services 10000] [--seconds 10] [--rounds 3] [--latency-qps 20000]
                           [--propagation 50] [--rss-services 50000] [--out target/bench]
       skiff-lab bench-ingress [--rules 10,1000] [--seconds 10] [--rounds 3] [--conns 64]
                               [--cases http-keepalive,https-keepalive,https-new-conn]
                               [--changes 20] [--out target/bench]";

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: {x:?} is not a number"))
        })
        .collect()
}

/// Calls `set` for each `--flag value` pair of `argv`; `set` answers
/// whether it knew the flag.
fn each_flag(argv: &[String], mut set: impl FnMut(&str, &str) -> Result<bool>) -> Result<()> {
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        if !set(flag, value)? {
            bail!("unknown flag {flag:?}\n{USAGE}");
        }
    }
    Ok(())
}

fn bench_args(argv: &[String]) -> Result<proxy::Args> {
    let mut a = proxy::Args {
        sizes: vec![1, 1_000, 10_000, 50_000],
        rounds: 3,
        conns: 8_000,
        steady_conns: 40_000,
        steady_sizes: vec![1, 10_000],
        threads: 2,
        out: PathBuf::from("target/bench"),
        modes: proxy::Mode::ALL.to_vec(),
        nft_max: 10_000,
        pairs: 0,
        chunk: 2_000,
        hooked: false,
        together: false,
        window_ms: 300,
        control: false,
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--sizes" => a.sizes = list(value, "--sizes")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--conns" => a.conns = value.parse().context("--conns")?,
            "--steady-conns" => a.steady_conns = value.parse().context("--steady-conns")?,
            "--steady-sizes" => a.steady_sizes = list(value, "--steady-sizes")?,
            "--threads" => a.threads = value.parse().context("--threads")?,
            "--out" => a.out = PathBuf::from(value),
            "--nft-max" => a.nft_max = value.parse().context("--nft-max")?,
            "--pairs" => a.pairs = value.parse().context("--pairs")?,
            "--chunk" => a.chunk = value.parse().context("--chunk")?,
            "--hooked" => a.hooked = value.parse().context("--hooked: true or false")?,
            "--together" => a.together = value.parse().context("--together: true or false")?,
            "--window-ms" => a.window_ms = value.parse().context("--window-ms")?,
            "--control" => a.control = value.parse().context("--control: true or false")?,
            "--modes" => {
                a.modes = value
                    .split(',')
                    .map(proxy::Mode::parse)
                    .collect::<Result<_>>()?;
                if !a.modes.contains(&proxy::Mode::Direct) {
                    a.modes.insert(0, proxy::Mode::Direct);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.sizes.contains(&0) {
        bail!("--sizes: every size must be at least 1");
    }
    if a.together && a.hooked {
        bail!(
            "--hooked: only with --together false (the empty-hook arm takes its turn in a sequence)"
        );
    }
    if a.control && !a.together {
        bail!("--control: only with --together true");
    }
    if a.together && a.window_ms == 0 {
        bail!("--window-ms: at least 1");
    }
    if a.chunk < a.threads.max(1) {
        bail!(
            "--chunk: at least one connection per client thread ({})",
            a.threads
        );
    }
    Ok(a)
}

fn control_args(argv: &[String]) -> Result<control::Args> {
    let mut a = control::Args {
        nodes: vec![1_000, 5_000],
        sched_pods: 3_000,
        pods: vec![1_000, 10_000],
        samples: 300,
        rounds: 3,
        ha_writes: 2_000,
        ha_rounds: 3,
        job_pods: 1_000,
        job_parallelism: 20,
        hpa_rounds: 3,
        dashboard_pods: 1_000,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--ha-writes" => a.ha_writes = value.parse().context("--ha-writes")?,
            "--ha-rounds" => a.ha_rounds = value.parse().context("--ha-rounds")?,
            "--job-pods" => a.job_pods = value.parse().context("--job-pods")?,
            "--job-parallelism" => {
                a.job_parallelism = value.parse().context("--job-parallelism")?
            }
            "--hpa-rounds" => a.hpa_rounds = value.parse().context("--hpa-rounds")?,
            "--dashboard-pods" => a.dashboard_pods = value.parse().context("--dashboard-pods")?,
            "--nodes" => a.nodes = list(value, "--nodes")?,
            "--sched-pods" => a.sched_pods = value.parse().context("--sched-pods")?,
            "--pods" => a.pods = list(value, "--pods")?,
            "--samples" => a.samples = value.parse().context("--samples")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.samples == 0 || a.rounds == 0 {
        bail!("--samples and --rounds must be at least 1");
    }
    Ok(a)
}

fn net_args(argv: &[String]) -> Result<net::Args> {
    let mut a = net::Args {
        rounds: 3,
        seconds: 5,
        cni_calls: 100,
        leases: vec![100, 1_000],
        knobs: knobs::Knob::ALL.to_vec(),
        parts: net::PARTS.map(String::from).to_vec(),
        turns: 8,
        turn_seconds: 1,
        pin: false,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--seconds" => a.seconds = value.parse().context("--seconds")?,
            "--cni-calls" => a.cni_calls = value.parse().context("--cni-calls")?,
            "--turns" => a.turns = value.parse().context("--turns")?,
            "--turn-seconds" => a.turn_seconds = value.parse().context("--turn-seconds")?,
            "--pin" => a.pin = value.parse().context("--pin: true or false")?,
            "--leases" => a.leases = list(value, "--leases")?,
            "--knobs" => {
                a.knobs = value
                    .split(',')
                    .filter(|k| !k.is_empty() && *k != "none")
                    .map(knobs::Knob::parse)
                    .collect::<Result<_>>()?
            }
            "--parts" => {
                a.parts = value.split(',').map(String::from).collect();
                if let Some(p) = a.parts.iter().find(|p| !net::PARTS.contains(&p.as_str())) {
                    bail!("--parts: unknown part {p:?} ({})", net::PARTS.join(", "));
                }
            }
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.rounds == 0 || a.seconds == 0 || a.cni_calls == 0 || a.turns == 0 || a.turn_seconds == 0 {
        bail!("--rounds, --seconds, --cni-calls, --turns and --turn-seconds must be at least 1");
    }
    Ok(a)
}

fn dns_args(argv: &[String]) -> Result<dns::Args> {
    let mut a = dns::Args {
        services: 10_000,
        seconds: 10,
        rounds: 3,
        latency_qps: 20_000,
        propagation: 50,
        rss_services: 50_000,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--services" => a.services = value.parse().context("--services")?,
            "--latency-qps" => a.latency_qps = value.parse().context("--latency-qps")?,
            "--propagation" => a.propagation = value.parse().context("--propagation")?,
            "--rss-services" => a.rss_services = value.parse().context("--rss-services")?,
            "--seconds" => a.seconds = value.parse().context("--seconds")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.services == 0 || a.seconds == 0 || a.rounds == 0 || a.latency_qps == 0 {
        bail!("--services, --seconds, --rounds and --latency-qps must be at least 1");
    }
    Ok(a)
}

fn ingress_args(argv: &[String]) -> Result<ingress::Args> {
    let mut a = ingress::Args {
        rules: vec![10, 1_000],
        cases: ingress::CASES.map(String::from).to_vec(),
        seconds: 10,
        rounds: 3,
        conns: 64,
        changes: 20,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--rules" => a.rules = list(value, "--rules")?,
            "--cases" => {
                a.cases = list(value, "--cases")?;
                if let Some(c) = a
                    .cases
                    .iter()
                    .find(|c| !ingress::CASES.contains(&c.as_str()))
                {
                    bail!("--cases: {c:?} is not one of {}", ingress::CASES.join(", "));
                }
            }
            "--seconds" => a.seconds = value.parse().context("--seconds")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--conns" => a.conns = value.parse().context("--conns")?,
            "--changes" => a.changes = value.parse().context("--changes")?,
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    a.rules.sort_unstable();
    a.rules.dedup();
    if a.rules.first().is_none_or(|r| *r == 0) || a.seconds == 0 || a.rounds == 0 || a.conns == 0 {
        bail!("--rules, --seconds, --rounds and --conns must be at least 1");
    }
    Ok(a)
}

fn nodeport_args(argv: &[String]) -> Result<nodeport::Args> {
    let mut a = nodeport::Args {
        sizes: vec![1, 1_000, 10_000],
        rounds: 2,
        conns: 8_000,
        requests: 40_000,
        threads: 2,
        cases: nodeport::Case::ALL.to_vec(),
        maglev_size: skiff_ebpf_common::DEFAULT_MAGLEV_SIZE,
        pods_direct: true,
        pairs: 30,
        together: false,
        window_ms: 300,
        control: false,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--sizes" => a.sizes = list(value, "--sizes")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--conns" => a.conns = value.parse().context("--conns")?,
            "--requests" => a.requests = value.parse().context("--requests")?,
            "--threads" => a.threads = value.parse().context("--threads")?,
            "--cases" => {
                a.cases = value
                    .split(',')
                    .map(|c| nodeport::Case::parse(c.trim()))
                    .collect::<Result<_>>()?
            }
            "--maglev-size" => a.maglev_size = value.parse().context("--maglev-size")?,
            "--pods-direct" => {
                a.pods_direct = value.parse().context("--pods-direct: true or false")?
            }
            "--pairs" => a.pairs = value.parse().context("--pairs")?,
            "--together" => a.together = value.parse().context("--together: true or false")?,
            "--window-ms" => a.window_ms = value.parse().context("--window-ms")?,
            "--control" => a.control = value.parse().context("--control: true or false")?,
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.conns == 0 || a.requests == 0 || a.threads == 0 {
        bail!("--conns, --requests and --threads must be at least 1");
    }
    if a.rounds == 0 && !a.together {
        bail!("--rounds: at least 1 (0 only with --together true)");
    }
    if a.together && (a.pairs == 0 || a.window_ms == 0) {
        bail!("--pairs and --window-ms: at least 1 with --together true");
    }
    if a.control && !a.together {
        bail!("--control: only with --together true");
    }
    if a.sizes.is_empty() || a.sizes.contains(&0) || a.sizes.iter().any(|n| *n > 40_000) {
        bail!("--sizes: between 1 and 40000 services (NodePorts 20000 and up)");
    }
    Ok(a)
}

fn kubelet_args(argv: &[String]) -> Result<kubelet::Args> {
    let mut a = kubelet::Args {
        singles: 50,
        batch: 30,
        batches: 2,
        exits: 30,
        idle_pods: 100,
        idle_seconds: 30,
        rounds: 2,
        runtimes: vec!["runc".into(), "crun".into()],
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--singles" => a.singles = value.parse().context("--singles")?,
            "--batch" => a.batch = value.parse().context("--batch")?,
            "--batches" => a.batches = value.parse().context("--batches")?,
            "--exits" => a.exits = value.parse().context("--exits")?,
            "--idle-pods" => a.idle_pods = value.parse().context("--idle-pods")?,
            "--idle-seconds" => a.idle_seconds = value.parse().context("--idle-seconds")?,
            "--rounds" => a.rounds = value.parse().context("--rounds")?,
            "--runtimes" => a.runtimes = value.split(',').map(String::from).collect(),
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.rounds == 0 || a.batch == 0 || a.idle_seconds == 0 {
        bail!("--rounds, --batch and --idle-seconds must be at least 1");
    }
    if let Some(r) = a
        .runtimes
        .iter()
        .find(|r| !matches!(r.as_str(), "runc" | "crun"))
    {
        bail!("--runtimes: {r:?} is not runc or crun");
    }
    if a.runtimes.is_empty() {
        bail!("--runtimes: name at least one of runc, crun");
    }
    Ok(a)
}

fn cluster_args(argv: &[String]) -> Result<cluster::Args> {
    let mut a = cluster::Args {
        replicas: 100,
        pods_per_node: 30,
        out: PathBuf::from("target/bench"),
    };
    each_flag(argv, |flag, value| {
        match flag {
            "--replicas" => a.replicas = value.parse().context("--replicas")?,
            "--pods-per-node" => a.pods_per_node = value.parse().context("--pods-per-node")?,
            "--out" => a.out = PathBuf::from(value),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.replicas == 0 || a.pods_per_node == 0 {
        bail!("--replicas and --pods-per-node must be at least 1");
    }
    Ok(a)
}

/// Builds every image into target/images and says what it built; with
/// `--push REGISTRY`, pushes each as `REGISTRY/<name>:<version>` too.
fn images(argv: &[String]) -> Result<()> {
    let mut push: Option<String> = None;
    let mut plain_http = false;
    let mut rest = Vec::new();
    for a in argv {
        if a == "--plain-http" {
            plain_http = true;
        } else {
            rest.push(a.clone());
        }
    }
    each_flag(&rest, |flag, value| {
        match flag {
            "--push" => push = Some(value.trim_end_matches('/').to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let dir = skiff_tests::images::dir();
    for name in skiff_tests::images::NAMES {
        let out = dir.join(name);
        skiff_tests::images::build(name, &out).map_err(|e| anyhow::anyhow!("image {name}: {e}"))?;
        let size = std::fs::metadata(out.join("layer.tar.gz")).map_or(0, |m| m.len());
        println!(
            "image {name}: {} ({:.1} MiB gzipped)",
            out.display(),
            size as f64 / (1 << 20) as f64
        );
        if let Some(registry) = &push {
            let reference = format!("{registry}/{name}:{}", env!("CARGO_PKG_VERSION"));
            let image = skiff_tests::images::get(name).map_err(anyhow::Error::msg)?;
            skiff_tests::images::push(image, &reference, plain_http).map_err(anyhow::Error::msg)?;
            println!("pushed {reference}");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The demo tears itself down on Ctrl-C once it is up; a bench is
    // reaped at any point.
    if argv.first().is_some_and(|c| c.starts_with("bench-")) {
        reap::on_signals()?;
    }
    // A bench whose children a signal killed fails or panics here: then
    // the reaping thread finishes its work and ends the process, not this
    // return.
    let result = std::panic::catch_unwind(|| run(&argv));
    reap::wait_if_reaping();
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn run(argv: &[String]) -> Result<()> {
    match argv.first().map(String::as_str) {
        Some("demo") => demo::run(
            argv.iter().any(|a| a == "--once"),
            argv.iter().any(|a| a == "--ha"),
        ),
        Some("images") => images(&argv[1..]),
        Some("bench-proxy") => proxy::run(&bench_args(&argv[1..])?),
        Some("bench-control") => control::run(&control_args(&argv[1..])?),
        Some("bench-net") => net::run(&net_args(&argv[1..])?),
        Some("bench-kubelet") => kubelet::run(&kubelet_args(&argv[1..])?),
        Some("bench-cluster") => cluster::run(&cluster_args(&argv[1..])?),
        Some("bench-nodeport") => nodeport::run(&nodeport_args(&argv[1..])?),
        Some("bench-dns") => dns::run(&dns_args(&argv[1..])?),
        Some("bench-ingress") => ingress::run(&ingress_args(&argv[1..])?),
        _ => bail!("{USAGE}"),
    }
}
