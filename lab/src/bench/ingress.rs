//! `cargo xtask bench ingress`: the ingress role beside nginx (Debian's,
//! the engine ingress-nginx runs) configured as a reverse proxy for the
//! same routes and the same backend, loaded by wrk from another
//! namespace, in the same run.
//!
//! - **Routes**: `--rules` sizes (10 and 1 000), each rule a host
//!   `h<i>.bench.example` whose `/` goes to Service `s<i>`. Skiff reads
//!   them as Ingresses (one rule each, TLS for its host from one wildcard
//!   Secret) from a real apiserver, with each Service's EndpointSlice
//!   naming the backend; nginx gets a `server` block per host proxying to
//!   one upstream with a keep-alive pool, as ingress-nginx's balancer
//!   upstream is, with its default of no response buffering.
//! - **Backend**: a third namespace's nginx answering `ok` at once, the
//!   same for both.
//! - **Load**: wrk, 2 threads and `--conns` connections, its Host header
//!   turning over every host of the size: HTTP keep-alive, HTTPS
//!   keep-alive (SNI `h0.bench.example`), and HTTPS with a new connection
//!   (and handshake) per request. Requests per second, p50/p99 latency,
//!   and each proxy's own CPU time per request (from `/proc`, all its
//!   processes and threads: steadier than the rate on shared cores); each
//!   round runs every case against each proxy in turn.
//! - **Change**: from an Ingress created through the API until its host is
//!   answered 200 (polled every millisecond from the client namespace),
//!   beside nginx from a config rewritten with one more server and a
//!   reload signal until the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use skiff_tests::control::ControlPlane;
use skiff_tests::netns::veth;
use skiff_tests::{Netns, Proc, Spawn, TempDir, bin};

use super::stats::{median_ci, pct};

pub struct Args {
    pub rules: Vec<usize>,
    /// Which of [`CASES`] to run.
    pub cases: Vec<String>,
    pub seconds: u64,
    pub rounds: usize,
    pub conns: usize,
    /// Ingresses created one at a time for the change figure.
    pub changes: usize,
    pub out: PathBuf,
}

/// Where both proxies listen.
const PROXY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 79, 0, 1);
const CLIENT_IP: &str = "10.79.0.2";
const PROXY_BACK_IP: &str = "10.79.1.1";
const BACKEND_IP: &str = "10.79.1.2";
const BACKEND_PORT: u16 = 8000;
/// nginx's ports (Skiff's are 80 and 443).
const NGINX_HTTP: u16 = 8080;
const NGINX_HTTPS: u16 = 8443;
const DOMAIN: &str = "bench.example";
pub const CASES: [&str; 3] = ["http-keepalive", "https-keepalive", "https-new-conn"];
const PROXIES: [&str; 2] = ["skiff", "nginx"];

/// One wrk run.
#[derive(Clone, Debug, serde::Serialize)]
struct Run {
    rps: f64,
    /// Answered in the run, all of them.
    requests: u64,
    /// The proxy's own CPU time (user and system, all its processes and
    /// threads) per request: steadier than the rate when the machine's
    /// cores are shared with the client and the backend.
    cpu_us: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Non-2xx answers and socket errors.
    errors: u64,
    /// wrk's own lines about them.
    #[serde(skip_serializing_if = "String::is_empty")]
    error_lines: String,
}

/// `1.23ms`, `456.00us`, `1.20s` in milliseconds.
fn millis(s: &str) -> Option<f64> {
    let s = s.trim();
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_wrk(out: &str) -> Result<Run> {
    let mut run = Run {
        rps: 0.0,
        requests: 0,
        cpu_us: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        errors: 0,
        error_lines: String::new(),
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().context("Requests/sec")?;
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n.trim().parse().context("requests in")?;
        } else if let Some(v) = line.strip_prefix("50%") {
            run.p50_ms = millis(v).context("the 50% line")?;
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_ms = millis(v).context("the 99% line")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
            run.error_lines.push_str(line);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            run.error_lines.push_str(line);
            run.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if run.rps == 0.0 {
        bail!("no Requests/sec in wrk's output:\n{out}");
    }
    Ok(run)
}

/// wrk's script: the Host header turns over `rules` hosts; `close` asks
/// for a new connection per request.
fn wrk_script(rules: usize, close: bool) -> String {
    let close = if close {
        ", Connection = \"close\""
    } else {
        ""
    };
    format!(
        "local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(\"GET\", \"/\", {{Host = \"h\" .. (n % {rules}) .. \".{DOMAIN}\"{close}}})\nend\n"
    )
}

fn wrk(client: &Netns, url: &str, script: &Path, conns: usize, seconds: u64) -> Result<Run> {
    let out = client.exec(&[
        "wrk",
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{seconds}s"),
        "--latency",
        "-s",
        &script.display().to_string(),
        url,
    ]);
    parse_wrk(&out)
}

/// The backend: nginx answering `ok` to everything.
fn backend_conf(dir: &Path) -> String {
    format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/backend.pid;\nerror_log {d}/backend-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n{temps}  keepalive_requests 100000;\n\
         server {{ listen {BACKEND_IP}:{BACKEND_PORT} reuseport backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
        d = dir.display(),
        temps = temp_paths(dir, "backend"),
    )
}

fn temp_paths(dir: &Path, who: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("  {t}_temp_path {}/{who}-{t};\n", dir.display()))
        .collect()
}

/// nginx as the reverse proxy: a server per host (`extra` more after the
/// `rules`), one upstream with a keep-alive pool, ingress-nginx's
/// forwarding headers and its default of no response buffering.
fn proxy_conf(dir: &Path, rules: usize, extra: usize, crt: &Path, key: &Path) -> String {
    let mut servers = String::new();
    for i in 0..rules + extra {
        servers.push_str(&format!(
            "  server {{ listen {PROXY}:{NGINX_HTTP}; listen {PROXY}:{NGINX_HTTPS} ssl http2; server_name h{i}.{DOMAIN}; location / {{ proxy_pass http://backend; }} }}\n"
        ));
    }
    format!(
        "user root;\nworker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n{temps}\
         server_names_hash_max_size 8192;\n  server_names_hash_bucket_size 128;\n\
         keepalive_requests 100000;\n\
         ssl_certificate {crt};\n  ssl_certificate_key {key};\n  ssl_protocols TLSv1.2 TLSv1.3;\n\
         proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  proxy_set_header Host $host;\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         proxy_set_header X-Forwarded-Proto $scheme;\n  proxy_set_header X-Forwarded-Host $host;\n\
         proxy_buffering off;\n\
         upstream backend {{ server {BACKEND_IP}:{BACKEND_PORT}; keepalive 320; keepalive_requests 100000; }}\n\
         server {{ listen {PROXY}:{NGINX_HTTP} default_server; listen {PROXY}:{NGINX_HTTPS} ssl http2 default_server; return 404; }}\n\
         {servers}}}\n",
        d = dir.display(),
        temps = temp_paths(dir, "nginx"),
        crt = crt.display(),
        key = key.display(),
    )
}

/// nginx, master and workers in a process group of their own, killed
/// whole when dropped (a killed master leaves its workers running).
struct Nginx(Proc);

impl Nginx {
    fn pid(&self) -> i32 {
        self.0.pid()
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<i32> {
        let me = self.pid();
        let mut all = crate::reap::descendants(me, &crate::reap::parents());
        all.push(me);
        all
    }
}

/// CPU seconds of `pids`, together.
fn cpu_seconds(pids: &[i32]) -> f64 {
    pids.iter()
        .map(|&p| super::stats::process_cpu_seconds(p))
        .sum()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.0.kill_group();
    }
}

fn nginx(ns: &Netns, conf: &Path, log: &Path) -> Nginx {
    Nginx(
        Spawn::new("nginx")
            .args(["-c"])
            .args([conf])
            .args(["-e", "stderr"])
            .netns(ns)
            .own_group()
            .die_with_parent()
            .log_to(log)
            .start(),
    )
}

/// Whether a plain GET for `host` to `to` is answered 200 (from the
/// calling thread's namespace).
fn answers_200(to: std::net::SocketAddr, host: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

/// The moment [`served_at`]'s poller saw the last of its hosts served.
fn wait(poller: std::thread::JoinHandle<Result<Instant>>) -> Result<Instant> {
    poller
        .join()
        .map_err(|_| anyhow::anyhow!("the poller panicked"))?
}

/// Polls each of `hosts` in turn at port `port` of the proxy from
/// `client` every millisecond (up to 30 s in all): the moment the last is
/// first answered 200.
fn served_at(
    client: &Netns,
    port: u16,
    hosts: Vec<String>,
) -> std::thread::JoinHandle<Result<Instant>> {
    let to = std::net::SocketAddr::from((PROXY, port));
    let path = client.path();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        let end = Instant::now() + Duration::from_secs(30);
        for host in &hosts {
            while !answers_200(to, host) {
                if Instant::now() > end {
                    bail!("{host} not served at {to} within 30 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(Instant::now())
    })
}

/// The objects of `n` rules from `from` on: for each, a Service without
/// selector, its EndpointSlice naming the backend, and an Ingress.
fn rule_objects(from: usize, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in from..from + n {
        out.push(service(i));
        out.push(slice(i));
        out.push(ingress(i));
    }
    out
}

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{i}"), "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

fn slice(i: usize) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-bench"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [BACKEND_IP], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}]})
}

fn ingress(i: usize) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": format!("i{i}"), "namespace": "default",
            // As nginx is set up: HTTP is served, not redirected.
            "annotations": {"ingress.skiff.io/ssl-redirect": "false"}},
        "spec": {"ingressClassName": "skiff",
            "tls": [{"hosts": [format!("h{i}.{DOMAIN}")], "secretName": "bench-tls"}],
            "rules": [{"host": format!("h{i}.{DOMAIN}"), "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": format!("s{i}"), "port": {"number": 80}}}}]}}]}})
}

/// Creates `objects` (Services, EndpointSlices, Ingresses and Secrets)
/// through the API, 32 at a time.
async fn create(client: &kube::Client, objects: Vec<Value>) -> Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::Ingress;
    use kube::api::{ApiResource, DynamicObject, PostParams};
    let mut made = futures::stream::iter(objects.into_iter().map(|v| {
        let client = client.clone();
        async move {
            let ar = match v["kind"].as_str().unwrap_or_default() {
                "Service" => ApiResource::erase::<Service>(&()),
                "EndpointSlice" => ApiResource::erase::<EndpointSlice>(&()),
                "Ingress" => ApiResource::erase::<Ingress>(&()),
                "Secret" => ApiResource::erase::<Secret>(&()),
                other => bail!("the bench makes no {other}"),
            };
            let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(client, "default", &ar);
            let obj: DynamicObject = serde_json::from_value(v)?;
            api.create(&PostParams::default(), &obj).await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(32);
    while let Some(r) = made.next().await {
        r?;
    }
    Ok(())
}

/// A wildcard certificate for the bench's hosts: files, and the Secret.
fn certificate(dir: &Path) -> Result<(PathBuf, PathBuf, Value)> {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")])?.self_signed(&key)?;
    let (crt_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let (crt, keyf) = (dir.join("bench.crt"), dir.join("bench.key"));
    std::fs::write(&crt, &crt_pem)?;
    std::fs::write(&keyf, &key_pem)?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "bench-tls", "namespace": "default"},
        "data": {"tls.crt": b64(&crt_pem), "tls.key": b64(&key_pem)}});
    Ok((crt, keyf, secret))
}

/// `/etc/netns/<ns>/hosts` (which `ip netns exec` puts in place of
/// `/etc/hosts`), removed when dropped: wrk resolves the SNI name.
struct HostsFile(PathBuf);

impl HostsFile {
    fn new(ns: &Netns, lines: &str) -> Result<Self> {
        let dir = PathBuf::from(format!("/etc/netns/{}", ns.name));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), lines)?;
        Ok(Self(dir))
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let srv = Netns::new();
    let cli = Netns::new();
    let back = Netns::new();
    veth(
        &srv,
        "eth0",
        &format!("{PROXY}/24"),
        &cli,
        "eth0",
        &format!("{CLIENT_IP}/24"),
    );
    veth(
        &srv,
        "eth1",
        &format!("{PROXY_BACK_IP}/24"),
        &back,
        "eth0",
        &format!("{BACKEND_IP}/24"),
    );
    srv.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    cli.exec(&["ip", "route", "add", "default", "via", &PROXY.to_string()]);
    back.exec(&["ip", "route", "add", "default", "via", PROXY_BACK_IP]);
    for ns in [&srv, &cli, &back] {
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    }
    let _hosts = HostsFile::new(&cli, &format!("{PROXY} h0.{DOMAIN}\n"))?;
    let dir = TempDir::new();
    let backend_file = dir.path.join("backend.conf");
    std::fs::write(&backend_file, backend_conf(&dir.path))?;
    let _backend = nginx(&back, &backend_file, &dir.path.join("backend.log"));
    let (crt, key, secret) = certificate(&dir.path)?;
    let cp = ControlPlane::start_in(Some(&srv), &["--node-monitor-grace-seconds", "3600"]);
    let kubeconfig = cp.kubeconfig.clone();
    cp.apply(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: skiff}\nspec: {controller: skiff.io/ingress}\n",
    )
    .map_err(anyhow::Error::msg)?;
    super::inside(&srv, || async {
        let client = super::kube_client(&kubeconfig).await?;
        create(&client, vec![secret]).await
    })?;
    let mut agent: Proc = Spawn::new(bin("skiff-agent"))
        .args([
            "run",
            "--roles",
            "ingress",
            "--node-name",
            "bench",
            "--kubeconfig",
        ])
        .args([&cp.kubeconfig])
        .args(["--ingress-http-address", &format!("{PROXY}:80")])
        .args(["--ingress-https-address", &format!("{PROXY}:443")])
        .env(
            "RUST_LOG",
            std::env::var("SKIFF_BENCH_LOG")
                .as_deref()
                .unwrap_or("warn"),
        )
        .netns(&srv)
        .die_with_parent()
        .log_to(&dir.path.join("agent.log"))
        .start();

    let cases: Vec<&str> = CASES
        .into_iter()
        .filter(|c| args.cases.iter().any(|a| a == c))
        .collect();
    let mut results = Vec::new();
    let mut changes = Value::Null;
    let mut have = 0;
    for &rules in &args.rules {
        println!("{rules} rules: creating them");
        let made = Instant::now();
        let kubeconfig = cp.kubeconfig.clone();
        super::inside(&srv, || async {
            let client = super::kube_client(&kubeconfig).await?;
            create(&client, rule_objects(have, rules.saturating_sub(have))).await
        })?;
        have = have.max(rules);
        // Every host served before any load: a 404 would count as an error.
        let hosts: Vec<String> = (0..rules).map(|i| format!("h{i}.{DOMAIN}")).collect();
        wait(served_at(&cli, 80, hosts.clone())).context("skiff serving every rule")?;
        println!("  made and served in {:.1} s", made.elapsed().as_secs_f64());
        // The statuses written before any load, so that the apiserver is
        // quiet during the runs.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(120) {
            let shown = cp.jsonpath(
                &["ingress"],
                r#"{range .items[*]}{.status.loadBalancer.ingress[0].ip}{"\n"}{end}"#,
            );
            if shown.lines().filter(|l| l.parse() == Ok(PROXY)).count() >= rules {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "  statuses written in {:.1} s more",
            settle.elapsed().as_secs_f64()
        );
        let conf = dir.path.join(format!("nginx-{rules}.conf"));
        std::fs::write(&conf, proxy_conf(&dir.path, rules, 0, &crt, &key))?;
        let proxy = nginx(&srv, &conf, &dir.path.join(format!("nginx-{rules}.log")));
        wait(served_at(&cli, NGINX_HTTP, hosts)).context("nginx serving every rule")?;

        let scripts: BTreeMap<bool, PathBuf> = [false, true]
            .into_iter()
            .map(|close| {
                let p = dir.path.join(format!("wrk-{rules}-{close}.lua"));
                std::fs::write(&p, wrk_script(rules, close)).map(|()| (close, p))
            })
            .collect::<std::io::Result<_>>()?;
        let mut runs: BTreeMap<(&str, &str), Vec<Run>> = BTreeMap::new();
        for round in 0..args.rounds {
            for &case in &cases {
                // Alternate which proxy goes first.
                let order: Vec<&str> = if round % 2 == 0 {
                    PROXIES.to_vec()
                } else {
                    PROXIES.iter().rev().copied().collect()
                };
                for who in order {
                    let (http, https) = match who {
                        "skiff" => (80, 443),
                        _ => (NGINX_HTTP, NGINX_HTTPS),
                    };
                    let url = match case {
                        "http-keepalive" => format!("http://{PROXY}:{http}/"),
                        _ => format!("https://h0.{DOMAIN}:{https}/"),
                    };
                    let script = &scripts[&(case == "https-new-conn")];
                    let pids = match who {
                        "skiff" => vec![agent.pid()],
                        _ => proxy.pids(),
                    };
                    let cpu0 = cpu_seconds(&pids);
                    let mut r = wrk(&cli, &url, script, args.conns, args.seconds)?;
                    r.cpu_us = (cpu_seconds(&pids) - cpu0) * 1e6 / r.requests.max(1) as f64;
                    println!(
                        "  round {round} {case} {who}: {:.0} req/s, {:.1} µs CPU per request, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                        r.rps, r.cpu_us, r.p50_ms, r.p99_ms, r.errors
                    );
                    runs.entry((case, who)).or_default().push(r);
                }
            }
        }
        for &case in &cases {
            let get = |who: &str| runs.get(&(case, who)).cloned().unwrap_or_default();
            let (s, n) = (get("skiff"), get("nginx"));
            let rps = |v: &[Run]| v.iter().map(|r| r.rps).collect::<Vec<_>>();
            let cpu = |v: &[Run]| v.iter().map(|r| r.cpu_us).collect::<Vec<_>>();
            let p50 = |v: &[Run]| v.iter().map(|r| r.p50_ms).collect::<Vec<_>>();
            let p99 = |v: &[Run]| v.iter().map(|r| r.p99_ms).collect::<Vec<_>>();
            let mut ratios: Vec<f64> = s.iter().zip(&n).map(|(a, b)| a.rps / b.rps).collect();
            ratios.sort_by(f64::total_cmp);
            let (lo, hi) = median_ci(&ratios);
            results.push(json!({
                "rules": rules, "case": case,
                "skiff_rps": median(rps(&s)), "nginx_rps": median(rps(&n)),
                "rps_ratio": median(rps(&s)) / median(rps(&n)).max(1e-9),
                "rps_ratio_ci95": [lo, hi],
                "skiff_cpu_us": median(cpu(&s)), "nginx_cpu_us": median(cpu(&n)),
                "skiff_p50_ms": median(p50(&s)), "nginx_p50_ms": median(p50(&n)),
                "skiff_p99_ms": median(p99(&s)), "nginx_p99_ms": median(p99(&n)),
                "p99_ratio": median(p99(&s)) / median(p99(&n)).max(1e-9),
                "skiff_errors": s.iter().map(|r| r.errors).sum::<u64>(),
                "nginx_errors": n.iter().map(|r| r.errors).sum::<u64>(),
                "runs": {"skiff": s, "nginx": n},
            }));
        }

        // The change figure, at the largest size.
        if Some(&rules) == args.rules.iter().max() {
            let mut skiff_ms = Vec::new();
            let mut nginx_ms = Vec::new();
            for k in 0..args.changes {
                let i = have + k;
                let host = format!("h{i}.{DOMAIN}");
                let kubeconfig = cp.kubeconfig.clone();
                let objects = rule_objects(i, 1);
                // The Service and its slice first: the Ingress is the change.
                let (pre, ing) = objects.split_at(2);
                let (pre, ing) = (pre.to_vec(), ing.to_vec());
                let poll = served_at(&cli, 80, vec![host.clone()]);
                let t0 = super::inside(&srv, || async {
                    let client = super::kube_client(&kubeconfig).await?;
                    create(&client, pre).await?;
                    let t0 = Instant::now();
                    create(&client, ing).await?;
                    anyhow::Ok(t0)
                })?;
                let t1 = wait(poll)?;
                skiff_ms.push(t1.duration_since(t0).as_secs_f64() * 1e3);

                std::fs::write(&conf, proxy_conf(&dir.path, rules, k + 1, &crt, &key))?;
                let poll = served_at(&cli, NGINX_HTTP, vec![host]);
                let t0 = Instant::now();
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(proxy.pid()),
                    nix::sys::signal::Signal::SIGHUP,
                )?;
                let t1 = wait(poll)?;
                nginx_ms.push(t1.duration_since(t0).as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(200));
            }
            println!(
                "  change served: skiff p50 {:.1} ms, nginx reload p50 {:.1} ms",
                median(skiff_ms.clone()),
                median(nginx_ms.clone())
            );
            changes = json!({
                "rules": rules,
                "skiff": super::stats::summary(skiff_ms.clone()), "skiff_all_ms": skiff_ms,
                "nginx_reload": super::stats::summary(nginx_ms.clone()), "nginx_all_ms": nginx_ms,
            });
            have += args.changes;
        }
        drop(proxy);
    }
    agent.terminate();
    drop(cp);
    // The agent's log, for what the figures do not say (errors, say).
    std::fs::create_dir_all(&args.out)?;
    std::fs::copy(
        dir.path.join("agent.log"),
        args.out.join("ingress-agent.log"),
    )?;

    let doc = json!({
        "seconds_per_run": args.seconds, "rounds": args.rounds, "conns": args.conns,
        "summary": results, "change": changes,
    });
    print(&doc);
    super::publish(&args.out, "ingress", started, doc, |png| {
        let rows: Vec<&Value> = results.iter().collect();
        let v = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect();
        let groups: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{i}: {} at {}",
                    r["case"].as_str().unwrap_or("?"),
                    r["rules"]
                )
            })
            .collect();
        super::plot::paired_bars(
            png,
            "Ingress requests per second (wrk), same routes and backend",
            &groups.join(", "),
            "requests/s",
            [
                ("skiff ingress role", v("skiff_rps")),
                ("nginx", v("nginx_rps")),
            ],
        )
    })
}

pub fn print(d: &Value) {
    println!(
        "\ningress beside nginx: wrk, 2 threads, {} connections, {} s per run, {} rounds (medians; ratio = skiff / nginx)",
        d["conns"], d["seconds_per_run"], d["rounds"]
    );
    println!(
        "| rules | case | skiff req/s | nginx req/s | ratio (95% CI) | CPU µs/req skiff / nginx | skiff p50 / p99 ms | nginx p50 / p99 ms | p99 ratio | errors s/n |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in d["summary"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let ci = &r["rps_ratio_ci95"];
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.3} ({:.3}–{:.3}) | {:.1} / {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {}/{} |",
            r["rules"],
            r["case"].as_str().unwrap_or("?"),
            f("skiff_rps"),
            f("nginx_rps"),
            f("rps_ratio"),
            ci[0].as_f64().unwrap_or(0.0),
            ci[1].as_f64().unwrap_or(0.0),
            f("skiff_cpu_us"),
            f("nginx_cpu_us"),
            f("skiff_p50_ms"),
            f("skiff_p99_ms"),
            f("nginx_p50_ms"),
            f("nginx_p99_ms"),
            f("p99_ratio"),
            r["skiff_errors"],
            r["nginx_errors"],
        );
    }
    let c = &d["change"];
    if !c.is_null() {
        let g = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        println!(
            "\nchange until served, at {} rules: skiff (Ingress created) p50 {:.1} ms, max {:.1} ms; nginx (config rewritten, reload) p50 {:.1} ms, max {:.1} ms",
            c["rules"],
            g(&c["skiff"], "p50"),
            g(&c["skiff"], "max"),
            g(&c["nginx_reload"], "p50"),
            g(&c["nginx_reload"], "max"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_gives_rate_percentiles_and_errors() {
        let out = "Running 5s test @ http://10.79.0.1:80/
  2 threads and 64 connections
  Latency Distribution
     50%  1.20ms
     75%    1.50ms
     90%    2.01ms
     99%  850.00us
  244567 requests in 5.00s, 30.02MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  48901.23
Transfer/sec:      6.00MB
";
        let r = parse_wrk(out).expect("parsed");
        assert_eq!(r.rps, 48901.23);
        assert_eq!(r.requests, 244567);
        assert_eq!(r.p50_ms, 1.2);
        assert!((r.p99_ms - 0.85).abs() < 1e-9, "{}", r.p99_ms);
        assert_eq!(r.errors, 13);
        assert_eq!(millis("1.05s"), Some(1050.0));
        assert!(parse_wrk("no run").is_err());
    }
}
