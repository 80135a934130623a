//! The workload figures of `cargo xtask bench control`, on one real node
//! (containerd, runc, skiff-cni and the kubelet role, in a network
//! namespace of its own, as the workloads tests run):
//!
//! - Job throughput: N short pods (`sh -c true`) through one Job with
//!   parallelism P, in pods per second from the Job's creation to its
//!   last completion, beside the same work as plain pods: a driver here
//!   keeps P pods in flight, creating the next one as soon as one
//!   succeeds, watching them as the Job controller does, and keeping the
//!   finished ones as a Job keeps its pods (the baseline).
//! - HPA reaction time: a one-pod Deployment (CPU request 100m) under an
//!   HPA (50 % of requests, 1..3) starts burning CPU; the time until the
//!   Deployment has a second Ready pod, at the control plane's default
//!   metric resolution and HPA sync period (15 s each, as upstream).
//!
//! The API clients run on a thread inside the node's namespace (where the
//! apiserver listens), so nothing leaves it.

use std::collections::HashSet;
use std::os::fd::AsFd as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use skiff_tests::node::OneNode;

/// Runs `f` with a kube client on a thread that joined the node's
/// network namespace.
fn in_netns<T: Send + 'static>(
    c: &OneNode,
    f: impl FnOnce(kube::Client) -> futures::future::BoxFuture<'static, Result<T>> + Send + 'static,
) -> Result<T> {
    let netns = c.ns.path();
    let kubeconfig = c.cp.kubeconfig.clone();
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&netns).with_context(|| format!("opening {netns}"))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("joining the node's network namespace")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
            let client = kube::Client::try_from(config)?;
            f(client).await
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

fn short_pod(name: &str, image: &str, labels: Value) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": image, "command": ["sh", "-c", "true"]}]},
    }))?)
}

/// Waits until no pod matching `selector` is left, so that one figure's
/// clean-up does not run under the next one.
async fn gone(client: &kube::Client, selector: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let left = pods.list(&ListParams::default().labels(selector)).await?;
        if left.items.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("pods {selector} are still there")
}

/// Seconds for `n` pods through one Job of parallelism `p`.
async fn job(client: kube::Client, image: String, n: usize, p: usize) -> Result<f64> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "throughput"},
        "spec": {"completions": n, "parallelism": p, "backoffLimit": n,
            "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "main", "image": image, "command": ["sh", "-c", "true"]}]}}},
    }))?;
    let started = Instant::now();
    jobs.create(&PostParams::default(), &job).await?;
    // Watched again whenever the server ends a watch.
    while started.elapsed() < Duration::from_secs(1800) {
        let mut stream = jobs
            .watch(
                &WatchParams::default().fields("metadata.name=throughput"),
                "0",
            )
            .await?
            .boxed();
        while let Some(ev) = stream.try_next().await? {
            if let WatchEvent::Added(j) | WatchEvent::Modified(j) = ev {
                let done = j.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) as usize;
                if done >= n {
                    let took = started.elapsed().as_secs_f64();
                    jobs.delete("throughput", &DeleteParams::background())
                        .await?;
                    gone(&client, "batch.kubernetes.io/job-name=throughput").await?;
                    return Ok(took);
                }
            }
        }
    }
    bail!("the Job did not complete")
}

/// Seconds for `n` plain pods, `p` in flight, each replaced as soon as it
/// succeeds.
async fn plain(client: kube::Client, image: String, n: usize, p: usize) -> Result<f64> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let labels = json!({"bench": "plain"});
    let started = Instant::now();
    let (mut created, mut done) = (0usize, 0usize);
    let mut counted: HashSet<String> = HashSet::new();
    while created < p.min(n) {
        pods.create(
            &PostParams::default(),
            &short_pod(&format!("plain-{created}"), &image, labels.clone())?,
        )
        .await?;
        created += 1;
    }
    let wp = WatchParams::default().labels("bench=plain");
    let watch = || pods.watch(&wp, "0");
    let mut stream = watch().await?.boxed();
    while done < n {
        let Some(ev) = stream.try_next().await? else {
            // The server ended the watch: start again from the state.
            stream = watch().await?.boxed();
            continue;
        };
        let (WatchEvent::Added(pod) | WatchEvent::Modified(pod)) = ev else {
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Succeeded") || !counted.insert(name.clone()) {
            continue;
        }
        done += 1;
        if created < n {
            pods.create(
                &PostParams::default(),
                &short_pod(&format!("plain-{created}"), &image, labels.clone())?,
            )
            .await?;
            created += 1;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the plain pods did not finish");
        }
    }
    let took = started.elapsed().as_secs_f64();
    pods.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels("bench=plain"),
    )
    .await?;
    gone(&client, "bench=plain").await?;
    Ok(took)
}

/// Seconds from load starting until the Deployment has a second Ready
/// pod, for one round.
fn hpa_round(c: &OneNode, round: usize) -> Result<f64> {
    let name = format!("burn{round}");
    let yaml = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n      - name: main\n        image: {}\n        command: [\"sleep\", \"36000\"]\n        resources: {{requests: {{cpu: 100m}}}}\n",
        c.image
    );
    c.cp.apply(&yaml).map_err(anyhow::Error::msg)?;
    let wait = |what: &str, secs: u64, f: &dyn Fn() -> bool| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("timed out waiting for {what}")
    };
    let ready = || {
        c.cp.jsonpath(&["deployment", &name], "{.status.readyReplicas}")
    };
    wait("the first pod", 60, &|| ready() == "1")?;
    c.cp.kubectl(&[
        "autoscale",
        "deployment",
        &name,
        "--min=1",
        "--max=3",
        "--cpu-percent=50",
    ])
    .map_err(anyhow::Error::msg)?;
    // The HPA has read the idle pod's metrics: the clock starts from a
    // settled state.
    wait("the HPA's first metrics", 120, &|| {
        c.cp.jsonpath(
            &["hpa", &name],
            r#"{.status.conditions[?(@.type=="ScalingActive")].status}"#,
        ) == "True"
    })?;
    let pod = c.cp.jsonpath(
        &["pods", "-l", &format!("app={name}")],
        "{.items[0].metadata.name}",
    );
    let started = Instant::now();
    c.cp.kubectl(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "(while :; do :; done) > /dev/null 2>&1 &",
    ])
    .map_err(anyhow::Error::msg)?;
    wait("a second Ready pod", 300, &|| {
        ready().parse::<u32>().is_ok_and(|n| n >= 2)
    })?;
    let took = started.elapsed().as_secs_f64();
    let _ = c.cp.kubectl(&["delete", "hpa", &name]);
    let _ =
        c.cp.kubectl(&["delete", "deployment", &name, "--wait=false"]);
    Ok(took)
}

pub fn run(job_pods: usize, parallelism: usize, hpa_rounds: usize) -> Result<Value> {
    let c = OneNode::start("172.31.40.2", "10.244.40.0/24");
    // The image is pulled and unpacked once, before anything is timed.
    c.cp.kubectl(&[
        "run",
        "warm",
        "--image",
        &c.image,
        "--restart=Never",
        "--",
        "true",
    ])
    .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.cp.jsonpath(&["pod", "warm"], "{.status.phase}") != "Succeeded" {
        if Instant::now() > deadline {
            bail!("the warm-up pod did not run");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.cp.kubectl(&["delete", "pod", "warm"]);
    let mut out = json!({"job_pods": job_pods, "parallelism": parallelism});
    if job_pods > 0 {
        eprintln!("jobs: {job_pods} pods, {parallelism} at a time, as one Job ...");
        let image = c.image.clone();
        let job_s = in_netns(&c, move |client| {
            Box::pin(job(client, image, job_pods, parallelism))
        })?;
        eprintln!("  {job_s:.1} s; the same as plain pods ...");
        let image = c.image.clone();
        let plain_s = in_netns(&c, move |client| {
            Box::pin(plain(client, image, job_pods, parallelism))
        })?;
        eprintln!("  {plain_s:.1} s");
        out["job_s"] = json!(job_s);
        out["plain_s"] = json!(plain_s);
        out["job_pods_per_s"] = json!(job_pods as f64 / job_s);
        out["plain_pods_per_s"] = json!(job_pods as f64 / plain_s);
    }
    let mut reactions = Vec::new();
    for round in 0..hpa_rounds {
        eprintln!("hpa reaction, round {} of {hpa_rounds} ...", round + 1);
        let s = hpa_round(&c, round)?;
        eprintln!("  {s:.1} s");
        reactions.push(s);
    }
    out["hpa_reaction_s"] = json!(reactions);
    Ok(out)
}

pub fn print(w: &Value) {
    if let (Some(job), Some(plain)) = (w["job_pods_per_s"].as_f64(), w["plain_pods_per_s"].as_f64())
    {
        println!(
            "\nJob throughput ({} short pods, {} at a time, one real node; the baseline is the same work as plain pods driven from a watch)",
            w["job_pods"], w["parallelism"]
        );
        println!("| Job pods/s | plain pods/s | Job ÷ plain |");
        println!("| --- | --- | --- |");
        println!("| {job:.2} | {plain:.2} | {:.2} |", job / plain);
    }
    let r: Vec<f64> = w["hpa_reaction_s"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    if !r.is_empty() {
        let mut sorted = r.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "\nHPA reaction time (load starts → a second Ready pod; metric resolution and sync period 15 s, upstream's defaults)"
        );
        println!("| rounds | min | median | max |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| {} | {:.1} s | {:.1} s | {:.1} s |",
            r.len(),
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
}
