//! `cargo xtask bench dns`: the dns role beside unbound, the resolver
//! users run in front of their clusters and on their nodes, answering the
//! same cluster zone from memory, loaded by dnsperf from another
//! namespace, in the same run.
//!
//! Both serve the same records: the dns role reads `--services` Services
//! from a real apiserver; unbound gets them as `local-data` in a static
//! `cluster.local` zone (which, like the dns role, answers NXDOMAIN for
//! names it does not hold). Both forward other names to the same upstream
//! (dnsmasq, answering all of `example.com` with one address for an hour)
//! and cache them. Three mixes of questions:
//! - `hit`: the A record of every Service, in turn;
//! - `external`: `www<i>.example.com`, every one asked once before the
//!   runs, so answered from each server's cache;
//! - `search-miss`: what a pod's resolver (ndots:5) asks first for an
//!   outside name: `<name>.<ns>.svc.cluster.local`, NXDOMAIN.
//!
//! Each round runs every mix against each server (in alternating order),
//! for `--seconds`, with the same dnsperf load; the ratio is Skiff's
//! queries per second over unbound's. Latency percentiles come from one
//! run per mix and server at a fixed rate (`--latency-qps`, below both
//! servers' limits), with every answer's latency.
//!
//! Then, with a second node's dns role beside the first: propagation,
//! from a Service's create until its name resolves on both nodes
//! (`--propagation` Services, one at a time); and memory, the dns role's
//! resident size at `--services` and at `--rss-services` Services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use skiff_tests::control::ControlPlane;
use skiff_tests::netns::veth;
use skiff_tests::{Netns, Proc, Spawn, TempDir, bin};

pub struct Args {
    pub services: usize,
    pub seconds: u64,
    pub rounds: usize,
    /// The fixed rate of the latency runs.
    pub latency_qps: u32,
    /// Services created one at a time for propagation.
    pub propagation: usize,
    /// Services in all for the second memory figure (0: none).
    pub rss_services: usize,
    pub out: PathBuf,
}

const SKIFF_IP: &str = "10.78.0.1";
const CLIENT_IP: &str = "10.78.0.2";
const UNBOUND_IP: &str = "10.78.0.3";
const UPSTREAM_IP: &str = "10.78.0.4";
/// The second node's dns role.
const SKIFF2_IP: &str = "10.78.0.5";
const MIXES: [&str; 3] = ["hit", "external", "search-miss"];
/// What the upstream answers for every `example.com` name.
const EXTERNAL_ADDR: &str = "192.0.2.1";

/// One dnsperf run.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    qps: f64,
    avg_latency_us: f64,
    lost: u64,
    completed: u64,
}

/// dnsperf's load: 8 clients on 2 threads, 500 questions outstanding.
const LOAD: [&str; 8] = ["-c", "8", "-T", "2", "-q", "500", "-t", "2"];

fn dnsperf(client: &Netns, server: &str, file: &std::path::Path, seconds: u64) -> Result<Run> {
    let out = Spawn::new("dnsperf")
        .args(["-s", server, "-d"])
        .args([file])
        .args(["-l", &seconds.to_string()])
        .args(LOAD)
        .netns(client)
        .try_output()
        .map_err(anyhow::Error::msg)?;
    let field = |label: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
    };
    let num = |label: &str| -> Result<f64> {
        field(label)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dnsperf printed no {label:?}:\n{out}"))
    };
    Ok(Run {
        qps: num("Queries per second:")?,
        avg_latency_us: num("Average Latency (s):")? * 1e6,
        lost: num("Queries lost:")? as u64,
        completed: num("Queries completed:")? as u64,
    })
}

/// Asks every question of `file` once (filling a cache).
fn once(client: &Netns, server: &str, file: &std::path::Path) -> Result<()> {
    Spawn::new("dnsperf")
        .args(["-s", server, "-d"])
        .args([file])
        .args(["-n", "1"])
        .args(LOAD)
        .netns(client)
        .try_output()
        .map_err(anyhow::Error::msg)
        .map(drop)
}

/// Each answer's latency in µs, ascending, from a run at `qps` for
/// `seconds` (dnsperf's verbose mode prints one line per answer, its
/// latency in seconds last).
fn latencies(
    client: &Netns,
    server: &str,
    file: &std::path::Path,
    qps: u32,
    seconds: u64,
) -> Result<Vec<f64>> {
    let out = Spawn::new("dnsperf")
        .args(["-s", server, "-d"])
        .args([file])
        .args(["-l", &seconds.to_string(), "-Q", &qps.to_string(), "-v"])
        .args(LOAD)
        .netns(client)
        .try_output()
        .map_err(anyhow::Error::msg)?;
    // Timed-out questions ("> T") count as slower than any answer, so
    // they cannot leave the percentiles looking better than they are.
    let mut v: Vec<f64> = out
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("> ")?;
            if rest.starts_with("T ") {
                return Some(f64::INFINITY);
            }
            let ok = rest.starts_with("NOERROR") || rest.starts_with("NXDOMAIN");
            ok.then(|| rest.split_whitespace().last()?.parse::<f64>().ok())?
        })
        .map(|s| s * 1e6)
        .collect();
    if v.is_empty() {
        bail!(
            "dnsperf -v printed no latencies:\n{}",
            out.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn dig_short(client: &Netns, server: &str, name: &str) -> String {
    Spawn::new("dig")
        .args([&format!("@{server}"), "+short", "+time=1", "+tries=1", name])
        .netns(client)
        .try_output()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn wait_answer(client: &Netns, server: &str, name: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while dig_short(client, server, name) != want {
        if Instant::now() > deadline {
            bail!("{server} did not answer {name} with {want}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn unbound_conf(dir: &std::path::Path, services: &[(String, String)]) -> String {
    let mut conf = format!(
        "server:\n  interface: {UNBOUND_IP}\n  port: 53\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n\
         \x20 directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n\
         \x20 num-threads: 2\n  so-reuseport: yes\n  access-control: 10.78.0.0/24 allow\n\
         \x20 module-config: \"iterator\"\n  local-zone: \"cluster.local.\" static\n\
         \x20 do-not-query-localhost: no\n",
        dir = dir.display()
    );
    for (name, ip) in services {
        conf.push_str(&format!(
            "  local-data: \"{name}.default.svc.cluster.local. 30 IN A {ip}\"\n"
        ));
    }
    conf.push_str(&format!(
        "forward-zone:\n  name: \".\"\n  forward-addr: {UPSTREAM_IP}\n"
    ));
    conf.push_str("remote-control:\n  control-enable: no\n");
    conf
}

/// A dns-only agent for node `name` listening on `ip`, forwarding to the
/// bench's upstream.
fn agent(
    cp: &ControlPlane,
    srv: &Netns,
    name: &str,
    ip: &str,
    cache: usize,
    log: &std::path::Path,
) -> Proc {
    Spawn::new(bin("skiff-agent"))
        .args(["run", "--roles", "dns", "--node-name", name, "--kubeconfig"])
        .args([&cp.kubeconfig])
        .args(["--dns-listen", ip, "--dns-upstream", UPSTREAM_IP])
        .args(["--dns-cache-size", &cache.to_string()])
        .env("RUST_LOG", "warn")
        .netns(srv)
        .log_to(log)
        .start()
}

/// The upstream both servers forward to: every `example.com` name is
/// `EXTERNAL_ADDR` for an hour.
fn upstream(srv: &Netns, log: &std::path::Path) -> Proc {
    skiff_tests::resolver::dnsmasq(
        srv,
        UPSTREAM_IP,
        &[
            &format!("--address=/example.com/{EXTERNAL_ADDR}"),
            "--local-ttl=3600",
            "--cache-size=0",
        ],
        log,
    )
}

/// `n` Services named `prefix-<i>`, made through the API 32 at a time
/// (kubectl would take minutes for tens of thousands).
async fn create_services(client: &kube::Client, prefix: &str, n: usize) -> Result<()> {
    use futures::StreamExt;
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(client.clone(), "default");
    let made: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&Default::default(), &service(&format!("{prefix}-{i}")))
                    .await
                    .map(drop)
                    .with_context(|| format!("creating {prefix}-{i}"))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    made.into_iter().collect()
}

fn service(name: &str) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap_or_default()
}

/// Whether `server` answers `name` with an address (NOERROR and at least
/// one answer), asked from `sock` as question `id`; false after 200 ms.
async fn resolves(sock: &tokio::net::UdpSocket, server: SocketAddr, id: u16, name: &str) -> bool {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let Ok(name) = Name::from_ascii(name) else {
        return false;
    };
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name, RecordType::A));
    let Ok(bytes) = q.to_vec() else {
        return false;
    };
    if sock.send_to(&bytes, server).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let answer = async {
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.ok()?;
            if let Ok(m) = Message::from_vec(&buf[..n])
                && from == server
                && m.metadata.id == id
            {
                return Some(
                    m.metadata.response_code == ResponseCode::NoError && !m.answers.is_empty(),
                );
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(200), answer).await,
        Ok(Some(true))
    )
}

/// Milliseconds from each of `samples` Service creates until the name
/// resolves on every one of `servers` (run inside their namespace).
async fn propagation(
    client: &kube::Client,
    servers: &[SocketAddr],
    samples: usize,
) -> Result<Vec<f64>> {
    let api: kube::Api<k8s_openapi::api::core::v1::Service> =
        kube::Api::namespaced(client.clone(), "default");
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    let mut out = Vec::new();
    let mut id: u16 = 0;
    for i in 0..samples {
        let name = format!("prop-{i}");
        let fqdn = format!("{name}.default.svc.cluster.local");
        let t0 = Instant::now();
        api.create(&Default::default(), &service(&name)).await?;
        for server in servers {
            loop {
                id = id.wrapping_add(1);
                if resolves(&sock, *server, id, &fqdn).await {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("{fqdn} did not resolve on {server} within 30 s");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
        out.push(t0.elapsed().as_secs_f64() * 1e3);
        // Apart, so that each create is a change of its own.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(out)
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let srv = Netns::new();
    let cli = Netns::new();
    veth(
        &srv,
        "eth0",
        &format!("{SKIFF_IP}/24"),
        &cli,
        "eth0",
        &format!("{CLIENT_IP}/24"),
    );
    for ip in [UNBOUND_IP, UPSTREAM_IP, SKIFF2_IP] {
        srv.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }
    let dir = TempDir::new();
    let cp = ControlPlane::start_in(Some(&srv), &["--node-monitor-grace-seconds", "3600"]);

    println!("creating {} Services", args.services);
    let kubeconfig = cp.kubeconfig.clone();
    let made = Instant::now();
    super::inside(&srv, || async {
        let client = super::kube_client(&kubeconfig).await?;
        create_services(&client, "svc", args.services).await
    })?;
    println!("  made in {:.1} s", made.elapsed().as_secs_f64());
    let listed = cp.jsonpath(
        &["services"],
        r#"{range .items[*]}{.metadata.name} {.spec.clusterIP}{"\n"}{end}"#,
    );
    let services: Vec<(String, String)> = listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| n.starts_with("svc-"))
        .map(|(n, ip)| (n.to_string(), ip.to_string()))
        .collect();
    if services.len() != args.services {
        bail!("{} of {} Services listed", services.len(), args.services);
    }

    let _upstream = upstream(&srv, &dir.path.join("dnsmasq.log"));
    // Room for every external name in the forward cache, as unbound has.
    let cache = (2 * args.services).max(10_000);
    let mut node1 = agent(
        &cp,
        &srv,
        "bench",
        SKIFF_IP,
        cache,
        &dir.path.join("agent.log"),
    );
    let conf = dir.path.join("unbound.conf");
    std::fs::write(&conf, unbound_conf(&dir.path, &services))?;
    let mut unbound: Proc = Spawn::new("unbound")
        .args(["-d", "-c"])
        .args([&conf])
        .netns(&srv)
        .log_to(&dir.path.join("unbound.log"))
        .start();
    let (last, last_ip) = services.last().context("no Service")?;
    let probe = format!("{last}.default.svc.cluster.local");
    wait_answer(&cli, SKIFF_IP, &probe, last_ip).context("the dns role")?;
    wait_answer(&cli, UNBOUND_IP, &probe, last_ip).context("unbound")?;
    wait_answer(&cli, UPSTREAM_IP, "www.example.com", EXTERNAL_ADDR).context("the upstream")?;

    let files: Vec<(&str, PathBuf)> = MIXES
        .iter()
        .map(|mix| {
            let path = dir.path.join(format!("{mix}.txt"));
            let text: String = services
                .iter()
                .enumerate()
                .map(|(i, (name, _))| match *mix {
                    "hit" => format!("{name}.default.svc.cluster.local A\n"),
                    "external" => format!("www{i}.example.com A\n"),
                    _ => format!("www{i}.example.com.default.svc.cluster.local A\n"),
                })
                .collect();
            std::fs::write(&path, text).map(|()| (*mix, path))
        })
        .collect::<std::io::Result<_>>()?;
    let servers = [("skiff", SKIFF_IP), ("unbound", UNBOUND_IP)];
    // The external names into both caches before anything is measured.
    if let Some((_, external)) = files.iter().find(|(m, _)| *m == "external") {
        for (_, ip) in servers {
            once(&cli, ip, external)?;
        }
    }

    let mut runs: Vec<serde_json::Value> = Vec::new();
    for round in 0..args.rounds {
        for (mix, file) in &files {
            let mut order = servers.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for (server, ip) in order {
                let r = dnsperf(&cli, ip, file, args.seconds)?;
                println!(
                    "round {} {mix:<12} {server:<8} {:>9.0} q/s  {:>6.0} µs avg  lost {}",
                    round + 1,
                    r.qps,
                    r.avg_latency_us,
                    r.lost
                );
                runs.push(json!({"round": round + 1, "mix": mix, "server": server, "run": r}));
            }
        }
    }
    let mut latency = Vec::new();
    for (mix, file) in &files {
        for (server, ip) in servers {
            let v = latencies(&cli, ip, file, args.latency_qps, 3)?;
            let (p50, p99) = (super::stats::pct(&v, 0.5), super::stats::pct(&v, 0.99));
            println!(
                "latency at {} q/s {mix:<12} {server:<8} p50 {p50:>6.0} µs  p99 {p99:>6.0} µs",
                args.latency_qps
            );
            latency.push(json!({"mix": mix, "server": server, "p50_us": p50, "p99_us": p99, "answers": v.len()}));
        }
    }
    let rss = json!({
        "services": args.services,
        "skiff": super::rss_parts(node1.pid() as u32),
        "unbound_kib": super::rss_kib(unbound.pid() as u32),
    });
    unbound.terminate();

    // A second node, for propagation to every node.
    let mut node2 = agent(
        &cp,
        &srv,
        "bench-2",
        SKIFF2_IP,
        cache,
        &dir.path.join("agent2.log"),
    );
    wait_answer(&cli, SKIFF2_IP, &probe, last_ip).context("the second dns role")?;
    // The second node has read the zone and answered one question: its
    // size without the caches a load fills.
    let synced = super::rss_parts(node2.pid() as u32);
    let to: Vec<SocketAddr> = [SKIFF_IP, SKIFF2_IP]
        .iter()
        .map(|ip| format!("{ip}:53").parse())
        .collect::<Result<_, _>>()?;
    let (samples, total) = (args.propagation, args.rss_services);
    let (prop, big_rss) = super::inside(&srv, || async {
        let client = super::kube_client(&kubeconfig).await?;
        let prop = propagation(&client, &to, samples).await?;
        let more = total.saturating_sub(args.services);
        if more == 0 {
            return Ok((prop, None));
        }
        println!("creating {more} more Services");
        create_services(&client, "more", more).await?;
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        let name = format!("more-{}.default.svc.cluster.local", more - 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !resolves(&sock, to[0], 1, &name).await {
            if Instant::now() > deadline {
                bail!("{name} did not resolve within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Settled: the watch events behind it applied.
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok((prop, Some(super::rss_parts(node1.pid() as u32))))
    })?;
    node1.terminate();
    node2.terminate();
    let propagation = super::stats::summary(prop);
    println!("propagation to both nodes (ms): {propagation}");

    let median = |mix: &str, server: &str, f: &dyn Fn(&serde_json::Value) -> f64| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r["mix"] == mix && r["server"] == server)
            .map(|r| f(&r["run"]))
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let qps = |r: &serde_json::Value| r["qps"].as_f64().unwrap_or(0.0);
    let lat_of = |mix: &str, server: &str, k: &str| {
        latency
            .iter()
            .find(|l| l["mix"] == mix && l["server"] == server)
            .and_then(|l| l[k].as_f64())
            .unwrap_or(0.0)
    };
    let mut summary = Vec::new();
    println!(
        "\nDNS, {} Services, {} s per run, median of {} rounds (dnsperf -c 8 -T 2 -q 500); latency at {} q/s",
        args.services, args.seconds, args.rounds, args.latency_qps
    );
    println!(
        "{:<12} {:>10} {:>11} {:>6} {:>13} {:>13} {:>13} {:>13}",
        "mix",
        "skiff q/s",
        "unbound q/s",
        "ratio",
        "skiff p50 µs",
        "skiff p99 µs",
        "unb. p50 µs",
        "unb. p99 µs"
    );
    for mix in MIXES {
        let (s, u) = (median(mix, "skiff", &qps), median(mix, "unbound", &qps));
        let ratio = if u > 0.0 { s / u } else { 0.0 };
        let (sp50, sp99) = (
            lat_of(mix, "skiff", "p50_us"),
            lat_of(mix, "skiff", "p99_us"),
        );
        let (up50, up99) = (
            lat_of(mix, "unbound", "p50_us"),
            lat_of(mix, "unbound", "p99_us"),
        );
        println!(
            "{mix:<12} {s:>10.0} {u:>11.0} {ratio:>6.2} {sp50:>13.0} {sp99:>13.0} {up50:>13.0} {up99:>13.0}"
        );
        summary.push(json!({"mix": mix, "skiff_qps": s, "unbound_qps": u, "ratio": ratio,
            "skiff_p50_us": sp50, "skiff_p99_us": sp99, "unbound_p50_us": up50, "unbound_p99_us": up99}));
    }
    println!(
        "resident at {} Services after the runs: {rss}",
        args.services
    );
    println!(
        "resident at {} Services, read and idle (the second node): {synced}",
        args.services
    );
    if let Some(parts) = &big_rss {
        println!(
            "resident at {} Services: the dns role {parts}",
            args.rss_services
        );
    }
    let doc = json!({
        "services": args.services, "seconds": args.seconds, "rounds": args.rounds,
        "latency_qps": args.latency_qps,
        "summary": summary, "runs": runs, "latency": latency, "rss": rss,
        "rss_synced": synced,
        "rss_large": {"services": args.rss_services, "skiff": big_rss},
        "propagation_ms": propagation,
    });
    let plotted = json!({ "summary": summary });
    super::publish(&args.out, "dns", started, doc, |path| {
        super::plot::dns(&plotted, path)
    })
}
