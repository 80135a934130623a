//! `cargo xtask bench dns`: the dns role beside unbound, the resolver
//! users run in front of their clusters and on their nodes, answering the
//! same cluster zone from memory, loaded by dnsperf from another
//! namespace, in the same run.
//!
//! Both serve the same records: the dns role reads `--services` Services
//! from a real apiserver; unbound gets them as `local-data` in a static
//! `cluster.local` zone (which, like the dns role, answers NXDOMAIN for
//! names it does not hold). Two mixes of questions:
//! - `hit`: the A record of every Service, in turn;
//! - `search-miss`: what a pod's resolver (ndots:5) asks first for an
//!   outside name: `<name>.<ns>.svc.cluster.local`, NXDOMAIN.
//!
//! Each round runs every mix against each server (in alternating order),
//! for `--seconds`, with the same dnsperf load; the ratio is Skiff's
//! queries per second over unbound's.

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
    pub out: PathBuf,
}

const SKIFF_IP: &str = "10.78.0.1";
const UNBOUND_IP: &str = "10.78.0.3";
const CLIENT_IP: &str = "10.78.0.2";
const MIXES: [&str; 2] = ["hit", "search-miss"];

/// One dnsperf run.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    qps: f64,
    avg_latency_us: f64,
    lost: u64,
    completed: u64,
}

fn dnsperf(client: &Netns, server: &str, file: &std::path::Path, seconds: u64) -> Result<Run> {
    let out = Spawn::new("dnsperf")
        .args(["-s", server, "-d"])
        .args([file])
        .args([
            "-l",
            &seconds.to_string(),
            "-c",
            "8",
            "-T",
            "2",
            "-q",
            "500",
            "-t",
            "2",
        ])
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
         \x20 module-config: \"iterator\"\n  local-zone: \"cluster.local.\" static\n",
        dir = dir.display()
    );
    for (name, ip) in services {
        conf.push_str(&format!(
            "  local-data: \"{name}.default.svc.cluster.local. 30 IN A {ip}\"\n"
        ));
    }
    conf.push_str("remote-control:\n  control-enable: no\n");
    conf
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
    srv.ip(&["addr", "add", &format!("{UNBOUND_IP}/24"), "dev", "eth0"]);
    let dir = TempDir::new();
    let cp = ControlPlane::start_in(Some(&srv), &["--node-monitor-grace-seconds", "3600"]);

    println!("creating {} Services", args.services);
    for chunk in (0..args.services).collect::<Vec<_>>().chunks(500) {
        let yaml: String = chunk
            .iter()
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n"
                )
            })
            .collect();
        cp.apply(&yaml).map_err(anyhow::Error::msg)?;
    }
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

    let agent_log = dir.path.join("agent.log");
    let mut agent: Proc = Spawn::new(bin("skiff-agent"))
        .args([
            "run",
            "--roles",
            "dns",
            "--node-name",
            "bench",
            "--kubeconfig",
        ])
        .args([&cp.kubeconfig])
        .args(["--dns-listen", SKIFF_IP, "--dns-upstream", "none"])
        .env("RUST_LOG", "warn")
        .netns(&srv)
        .log_to(&agent_log)
        .start();
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

    let files: Vec<(&str, PathBuf)> = MIXES
        .iter()
        .map(|mix| {
            let path = dir.path.join(format!("{mix}.txt"));
            let text: String = services
                .iter()
                .enumerate()
                .map(|(i, (name, _))| match *mix {
                    "hit" => format!("{name}.default.svc.cluster.local A\n"),
                    _ => format!("www{i}.example.com.default.svc.cluster.local A\n"),
                })
                .collect();
            std::fs::write(&path, text).map(|()| (*mix, path))
        })
        .collect::<std::io::Result<_>>()?;

    let servers = [("skiff", SKIFF_IP), ("unbound", UNBOUND_IP)];
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
    let rss = json!({
        "skiff_kib": super::rss_kib(agent.pid() as u32),
        "unbound_kib": super::rss_kib(unbound.pid() as u32),
    });
    agent.terminate();
    unbound.terminate();

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
    let lat = |r: &serde_json::Value| r["avg_latency_us"].as_f64().unwrap_or(0.0);
    let mut summary = Vec::new();
    println!(
        "\nDNS, {} Services, {} s per run, median of {} rounds (dnsperf -c 8 -T 2 -q 500)",
        args.services, args.seconds, args.rounds
    );
    println!(
        "{:<12} {:>12} {:>12} {:>8} {:>12} {:>12}",
        "mix", "skiff q/s", "unbound q/s", "ratio", "skiff µs", "unbound µs"
    );
    for mix in MIXES {
        let (s, u) = (median(mix, "skiff", &qps), median(mix, "unbound", &qps));
        let (sl, ul) = (median(mix, "skiff", &lat), median(mix, "unbound", &lat));
        let ratio = if u > 0.0 { s / u } else { 0.0 };
        println!("{mix:<12} {s:>12.0} {u:>12.0} {ratio:>8.2} {sl:>12.0} {ul:>12.0}");
        summary.push(
            json!({"mix": mix, "skiff_qps": s, "unbound_qps": u, "ratio": ratio,
                            "skiff_latency_us": sl, "unbound_latency_us": ul}),
        );
    }
    println!("resident: {rss}");
    let doc = json!({
        "services": args.services, "seconds": args.seconds, "rounds": args.rounds,
        "summary": summary, "runs": runs, "rss": rss,
    });
    let plotted = json!({ "summary": summary });
    super::publish(&args.out, "dns", started, doc, |path| {
        super::plot::dns(&plotted, path)
    })
}
