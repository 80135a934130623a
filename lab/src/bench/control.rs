//! `cargo xtask bench control`: the control plane's figures, each beside
//! the limit it is built on where one exists.
//!
//! - scheduler throughput: N node objects and P pending pods are made first
//!   (apiserver and controllers running, no scheduler); then a scheduler
//!   process starts and every binding is timed off a pod watch;
//! - create / list / watch latency at a number of pods, beside etcd's own
//!   put / range / watch latency for the same keys and values (the limit);
//! - cold start (against a running etcd, and with the local etcd it starts
//!   itself) and idle RSS (etcd excluded, and included);
//! - workloads (see `workloads.rs`, on one real node): Job throughput
//!   beside the same work as plain pods, and the HPA's reaction time;
//! - high availability (see `ha.rs`): pod-create throughput with one
//!   replica against three (each beside etcd's own put rate), the time a
//!   killed leader takes to be replaced and to bind a pod, and the time a
//!   node agent takes to follow changes through another apiserver;
//! - the dashboard (see `dashboard.rs`, in headless Chromium): its first
//!   load and its live updates with 1 000 pods, beside the bare API
//!   requests made from the same page.
//!
//! Everything listens on 127.0.0.1 (the dashboard's control plane and
//! browser on the loopback of a namespace of their own); nothing leaves
//! the host's loopback.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use skiff_tests::TempDir;
use skiff_tests::control::{Etcd, EtcdClient, free_port};
use tokio::sync::Mutex;

use super::stats::pct;

pub struct Args {
    pub nodes: Vec<usize>,
    pub sched_pods: usize,
    pub pods: Vec<usize>,
    pub samples: usize,
    pub rounds: usize,
    /// Pod creates per write-throughput round of the HA figures.
    pub ha_writes: usize,
    /// Rounds of the HA figures (0: none).
    pub ha_rounds: usize,
    /// Short pods through one Job, and as plain pods (0: neither).
    pub job_pods: usize,
    pub job_parallelism: usize,
    /// Rounds of the HPA reaction time (0: none).
    pub hpa_rounds: usize,
    /// Pods the dashboard shows while it is measured (0: not measured).
    pub dashboard_pods: usize,
    pub out: PathBuf,
}

/// A running `skiff-control`, killed on drop.
struct Control {
    child: Child,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control_bin() -> PathBuf {
    skiff_tests::bin("skiff-control")
}

/// Starts `skiff-control` and returns it with the time until an
/// authenticated request is answered.
async fn start(
    etcd: Option<&Etcd>,
    components: &str,
    extra: &[&str],
) -> Result<(Control, Duration, kube::Client)> {
    let dir = TempDir::new();
    let mut cmd = Command::new(control_bin());
    cmd.args([
        "--data-dir",
        &dir.path.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--components",
        components,
    ]);
    if let Some(etcd) = etcd {
        cmd.args(etcd.client_args(EtcdClient::Apiserver));
    }
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd.stderr(std::fs::File::create(dir.path.join("control.log"))?);
    let kubeconfig = dir.path.join("admin.kubeconfig");
    let t0 = Instant::now();
    let child = cmd.spawn().context("starting skiff-control")?;
    let control = Control {
        child,
        kubeconfig: kubeconfig.clone(),
        _dir: dir,
    };
    loop {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("skiff-control did not answer within 30 s");
        }
        if kubeconfig.exists()
            && let Ok(c) = super::kube_client(&kubeconfig).await
            && Api::<Namespace>::all(c.clone())
                .get("default")
                .await
                .is_ok()
        {
            return Ok((control, t0.elapsed(), c));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50_ms": pct(&v, 0.5), "p99_ms": pct(&v, 0.99), "min_ms": v.first(), "max_ms": v.last(), "n": v.len()})
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn create_pods(c: &kube::Client, ns: &str, from: usize, to: usize) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(c.clone(), ns);
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &super::bench_pod(&format!("p-{i}"), ns),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .context("creating pods")?;
    Ok(())
}

async fn scheduler(etcd: &Etcd, nodes: usize, pods: usize) -> Result<Value> {
    let (cp, _, c) = start(
        Some(etcd),
        "apiserver,controllers",
        &["--node-monitor-grace-seconds", "3600"],
    )
    .await?;
    let node_api: Api<Node> = Api::all(c.clone());
    futures::stream::iter(0..nodes)
        .map(|i| {
            let api = node_api.clone();
            async move {
                let n: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{i}"), "labels": {"zone": format!("z{}", i % 3)}},
                    "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"}, "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                    "conditions": [{"type": "Ready", "status": "True"}]}}))
                .unwrap_or_default();
                api.create(&PostParams::default(), &n).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .context("creating nodes")?;
    create_pods(&c, "default", 0, pods).await?;
    let pod_api: Api<Pod> = Api::namespaced(c.clone(), "default");
    let rv = pod_api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pod_api
        .watch(&WatchParams::default().timeout(290), &rv)
        .await?
        .boxed();

    let dir = TempDir::new();
    let t0 = Instant::now();
    let mut sched = Command::new(control_bin())
        .args([
            "--components",
            "scheduler",
            "--kubeconfig",
            &cp.kubeconfig.display().to_string(),
            "--data-dir",
            &dir.path.display().to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the scheduler")?;
    let (mut first, mut last, mut bound) = (None, Duration::ZERO, 0usize);
    let mut seen = std::collections::HashSet::new();
    while bound < pods {
        let ev = tokio::time::timeout(Duration::from_secs(120), stream.next()).await;
        let Ok(Some(ev)) = ev else { break };
        if let WatchEvent::Modified(p) = ev? {
            let on_node = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            if on_node && seen.insert(p.metadata.name.clone().unwrap_or_default()) {
                let at = t0.elapsed();
                first.get_or_insert(at);
                last = at;
                bound += 1;
            }
        }
    }
    let _ = sched.kill();
    let _ = sched.wait();
    drop(cp);
    if bound < pods {
        bail!("only {bound} of {pods} pods were bound at {nodes} nodes");
    }
    let first = first.unwrap_or_default();
    let span = (last - first).as_secs_f64().max(1e-6);
    Ok(json!({
        "nodes": nodes, "pods": pods,
        "pods_per_s": pods as f64 / span,
        "pods_per_s_from_start": pods as f64 / last.as_secs_f64().max(1e-6),
        "first_bind_ms": ms(first), "last_bind_ms": ms(last),
    }))
}

async fn latency(etcd: &Etcd, count: usize, samples: usize) -> Result<Value> {
    let (cp, _, c) = start(Some(etcd), "apiserver", &[]).await?;
    let ns = format!("bench-{count}");
    let ns_obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns_obj)
        .await?;
    create_pods(&c, &ns, 0, count).await?;
    let api: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let rv = api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch_lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut stream = api
        .watch(&WatchParams::default().timeout(290), &rv)
        .await?
        .boxed();
    let (s2, w2) = (sent.clone(), watch_lat.clone());
    let watcher = tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(p) = ev {
                let name = p.metadata.name.unwrap_or_default();
                if let Some(t) = s2.lock().await.remove(&name) {
                    w2.lock().await.push(ms(t.elapsed()));
                }
            }
        }
    });
    let mut create = Vec::new();
    for i in 0..samples {
        let name = format!("s-{i}");
        let t = Instant::now();
        sent.lock().await.insert(name.clone(), t);
        api.create(&PostParams::default(), &super::bench_pod(&name, &ns))
            .await?;
        create.push(ms(t.elapsed()));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while watch_lat.lock().await.len() < samples && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    watcher.abort();
    let mut list = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        // The bytes of the list, not their decoding by this client: etcd's
        // range below is timed the same way.
        let req = http::Request::get(format!("/api/v1/namespaces/{ns}/pods")).body(Vec::new())?;
        let body = c.request_text(req).await?;
        list.push(ms(t.elapsed()));
        let items = body.matches("\"kind\":\"Pod\"").count();
        if items < count {
            bail!("list returned {items} of {count} pods");
        }
    }
    let (quiet, scraped) = metrics_cost(&api, &c, &ns).await?;
    drop(cp);

    // The limit: etcd itself, same value sizes, same prefix size.
    let mut e = super::etcd_client(etcd).await?;
    let value = serde_json::to_vec(&super::bench_pod("x", &ns))?;
    let prefix = format!("/registry/pods/{ns}/");
    let (wtx, mut wrx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let mut ws = e
        .watch(
            format!("/bench-limit/{count}/"),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    let etcd_watch = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Ok(Some(resp)) = ws.message().await {
            for _ in resp.events() {
                if let Some(t) = wrx.recv().await {
                    out.push(ms(t.elapsed()));
                }
            }
            if out.len() >= samples {
                break;
            }
        }
        out
    });
    let mut put = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        let _ = wtx.send(t);
        e.put(format!("/bench-limit/{count}/{i}"), value.clone(), None)
            .await?;
        put.push(ms(t.elapsed()));
    }
    let etcd_watch_lat = tokio::time::timeout(Duration::from_secs(10), etcd_watch)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    // One range read of the whole prefix: the fastest etcd gives it.
    let mut kv = e.kv_client().max_decoding_message_size(256 << 20);
    let mut range = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        kv.get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
        range.push(ms(t.elapsed()));
    }
    let watch = watch_lat.lock().await.clone();
    Ok(json!({
        "pods": count,
        "create": stats(create), "watch": stats(watch), "list": stats(list),
        "etcd_put": stats(put), "etcd_watch": stats(etcd_watch_lat), "etcd_range": stats(range),
        "create_unscraped": stats(quiet), "create_scraped": stats(scraped),
    }))
}

/// The cost of metrics: pod creates, one every 10 ms, with `/metrics`
/// scraped every second and without, in alternating 2 s blocks (so the
/// machine's drift falls on both).
async fn metrics_cost(api: &Api<Pod>, c: &kube::Client, ns: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    const BLOCKS: usize = 6;
    const BLOCK: Duration = Duration::from_secs(2);
    let scraping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let (c, on) = (c.clone(), scraping.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if on.load(std::sync::atomic::Ordering::Relaxed)
                    && let Ok(req) = http::Request::get("/metrics").body(Vec::new())
                {
                    let _ = c.request_text(req).await;
                }
            }
        })
    };
    let (mut quiet, mut scraped) = (Vec::new(), Vec::new());
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    for block in 0..BLOCKS {
        let on = block % 2 == 1;
        scraping.store(on, std::sync::atomic::Ordering::Relaxed);
        let until = Instant::now() + BLOCK;
        for i in 0.. {
            if Instant::now() >= until {
                break;
            }
            pace.tick().await;
            let name = format!("m-{block}-{i}");
            let t = Instant::now();
            api.create(&PostParams::default(), &super::bench_pod(&name, ns))
                .await?;
            let took = ms(t.elapsed());
            if on {
                scraped.push(took);
            } else {
                quiet.push(took);
            }
        }
    }
    scraper.abort();
    Ok((quiet, scraped))
}

async fn cold_start(etcd: &Etcd, rounds: usize) -> Result<Value> {
    let (mut with_etcd, mut local, mut rss, mut rss_etcd) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (cp, t, _) = start(Some(etcd), "apiserver,scheduler,controllers", &[]).await?;
        with_etcd.push(ms(t));
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss.push(super::rss_kib(cp.child.id()) as f64 / 1024.0);
        rss_etcd.push(super::rss_kib(etcd.pid() as u32) as f64 / 1024.0);
        drop(cp);
        let (cp, t, _) = start(None, "apiserver,scheduler,controllers", &[]).await?;
        local.push(ms(t));
        drop(cp);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        pct(&v, 0.5)
    };
    let control_rss = med(rss);
    let etcd_rss = med(rss_etcd);
    Ok(json!({
        "cold_start_ms": med(with_etcd.clone()), "cold_start_ms_all": with_etcd,
        "cold_start_with_local_etcd_ms": med(local.clone()), "cold_start_with_local_etcd_ms_all": local,
        "idle_rss_mib": control_rss, "idle_rss_with_etcd_mib": control_rss + etcd_rss,
    }))
}

fn row(name: &str, v: &Value, limit: Option<&Value>) -> String {
    let p50 = v["p50_ms"].as_f64().unwrap_or(0.0);
    let p99 = v["p99_ms"].as_f64().unwrap_or(0.0);
    match limit {
        Some(l) => {
            let lp50 = l["p50_ms"].as_f64().unwrap_or(0.0);
            let lp99 = l["p99_ms"].as_f64().unwrap_or(0.0);
            let ratio = if lp50 > 0.0 { p50 / lp50 } else { 0.0 };
            format!("| {name} | {p50:.2} | {p99:.2} | {lp50:.2} | {lp99:.2} | {ratio:.2} |")
        }
        None => format!("| {name} | {p50:.2} | {p99:.2} | - | - | - |"),
    }
}

pub fn run(args: &Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &Args) -> Result<()> {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!(
        "bench control: nodes {:?} x {} pods, latency at {:?} pods ({} samples), {} cold-start rounds, {cores} cores",
        args.nodes, args.sched_pods, args.pods, args.samples, args.rounds
    );
    let mut sched = Vec::new();
    for &n in &args.nodes {
        let etcd = Etcd::start();
        eprintln!("scheduler: {n} nodes ...");
        let s = scheduler(&etcd, n, args.sched_pods).await?;
        eprintln!("  {s}");
        sched.push(s);
    }
    let mut lat = Vec::new();
    for &p in &args.pods {
        let etcd = Etcd::start();
        eprintln!("latency: {p} pods ...");
        let l = latency(&etcd, p, args.samples).await?;
        eprintln!("  {l}");
        lat.push(l);
    }
    let etcd = Etcd::start();
    eprintln!("cold start and idle RSS ...");
    let cold = cold_start(&etcd, args.rounds).await?;
    let ha = if args.ha_rounds > 0 {
        eprintln!(
            "high availability: {} pod creates per round ...",
            args.ha_writes
        );
        Some(super::ha::run(args.ha_writes, args.ha_rounds).await?)
    } else {
        None
    };

    let workloads = if args.job_pods > 0 || args.hpa_rounds > 0 {
        let (n, p, r) = (args.job_pods, args.job_parallelism, args.hpa_rounds);
        Some(tokio::task::spawn_blocking(move || super::workloads::run(n, p, r)).await??)
    } else {
        None
    };

    let dashboard = if args.dashboard_pods > 0 {
        let n = args.dashboard_pods;
        // On a thread of its own: the browser's driver runs its own runtime.
        let d = tokio::task::spawn_blocking(move || {
            std::thread::spawn(move || super::dashboard::run(n, 5, 30)).join()
        })
        .await?
        .map_err(|_| anyhow::anyhow!("the dashboard benchmark panicked"))??;
        Some(d)
    } else {
        None
    };

    println!("\nscheduler throughput (pods bound per second, from the first binding to the last)");
    println!("| nodes | pods | pods/s | pods/s incl. scheduler start | last binding at |");
    println!("| --- | --- | --- | --- | --- |");
    for s in &sched {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} ms |",
            s["nodes"],
            s["pods"],
            s["pods_per_s"].as_f64().unwrap_or(0.0),
            s["pods_per_s_from_start"].as_f64().unwrap_or(0.0),
            s["last_bind_ms"].as_f64().unwrap_or(0.0)
        );
    }
    for l in &lat {
        println!(
            "\nlatency at {} pods (ms; ratio = apiserver p50 / etcd p50, etcd being the limit)",
            l["pods"]
        );
        println!("| operation | p50 | p99 | etcd p50 | etcd p99 | ratio |");
        println!("| --- | --- | --- | --- | --- | --- |");
        println!(
            "{}",
            row("create (etcd: put)", &l["create"], Some(&l["etcd_put"]))
        );
        println!(
            "{}",
            row(
                "watch event after create (etcd: after put)",
                &l["watch"],
                Some(&l["etcd_watch"])
            )
        );
        println!(
            "{}",
            row(
                "list all pods (etcd: range)",
                &l["list"],
                Some(&l["etcd_range"])
            )
        );
        println!(
            "{}",
            row(
                "create, /metrics scraped every second (limit: not scraped)",
                &l["create_scraped"],
                Some(&l["create_unscraped"])
            )
        );
    }
    println!("\nstart and memory");
    println!(
        "| cold start (etcd running) | cold start (local etcd) | idle RSS, etcd excluded | idle RSS, etcd included |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| {:.0} ms | {:.0} ms | {:.1} MiB | {:.1} MiB |",
        cold["cold_start_ms"].as_f64().unwrap_or(0.0),
        cold["cold_start_with_local_etcd_ms"]
            .as_f64()
            .unwrap_or(0.0),
        cold["idle_rss_mib"].as_f64().unwrap_or(0.0),
        cold["idle_rss_with_etcd_mib"].as_f64().unwrap_or(0.0)
    );

    if let Some(h) = &ha {
        super::ha::print(h);
    }
    if let Some(w) = &workloads {
        super::workloads::print(w);
    }
    if let Some(d) = &dashboard {
        super::dashboard::print(d);
    }

    let doc = json!({
        "benchmark": "control",
        "commit": super::git_commit(),
        "kernel": super::kernel(),
        "cores": cores,
        "seconds": started.elapsed().as_secs_f64(),
        "args": {"nodes": args.nodes, "sched_pods": args.sched_pods, "pods": args.pods, "samples": args.samples, "rounds": args.rounds},
        "scheduler": sched, "latency": lat, "start": cold, "ha": ha, "workloads": workloads, "dashboard": dashboard,
    });
    let path = super::write_results(&args.out, "control", &doc)?;
    let png = args.out.join("control.png");
    super::plot::control(&doc, &png)?;
    println!("wrote {} and {}", path.display(), png.display());
    Ok(())
}
