//! The benchmarks (`cargo xtask bench <name>`): each measures Skiff beside
//! the baseline its issue names, in the same run, and writes a table, a
//! JSON document and a plot.

pub mod cluster;
pub mod control;
mod dashboard;
pub mod dns;
mod ha;
pub mod ingress;
pub mod knobs;
pub mod kubelet;
pub mod net;
pub mod nodeport;
pub mod plot;
pub mod proxy;
mod rules;
pub mod stats;
mod workloads;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

/// A client of a test etcd, with the admin's certificate.
pub async fn etcd_client(etcd: &skiff_tests::control::Etcd) -> anyhow::Result<etcd_client::Client> {
    let [ca, cert, key] = etcd.client_files(skiff_tests::control::EtcdClient::Admin);
    let tls = skiff_agent::overlay::lease::EtcdTls {
        ca: ca.into(),
        cert: cert.into(),
        key: key.into(),
    };
    let endpoints: Vec<&str> = etcd.url.split(',').collect();
    Ok(etcd_client::Client::connect(endpoints, Some(tls.options()?)).await?)
}

/// An apiserver client from a kubeconfig file.
pub(crate) async fn kube_client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Runs `f` on a thread of its own inside the network namespace at
/// `netns` (where a bench's apiservers and servers are reachable, never
/// from the host's).
pub(crate) fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(netns).with_context(|| format!("open {netns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {netns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in {netns} panicked"))?
    })
}

/// Runs `f` on a single-threaded runtime in `netns`, so that its sockets
/// (a kube client's, a prober's) are made there.
pub(crate) fn inside<T: Send, F>(
    netns: &skiff_tests::Netns,
    f: impl FnOnce() -> F + Send,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    in_netns(&netns.path(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })
}

/// The pod the control-plane benchmarks create: one container asking for
/// a little CPU and memory.
pub(crate) fn bench_pod(name: &str, ns: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
    }))
    .unwrap_or_default()
}

pub fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes a run's document as `<out>/<name>-<unix time>.json` and
/// `<out>/<name>-latest.json`; returns the first path.
pub fn write_results(
    out: &std::path::Path,
    name: &str,
    doc: &serde_json::Value,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("mkdir {}", out.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = serde_json::to_string_pretty(doc)?;
    let path = out.join(format!("{name}-{stamp}.json"));
    std::fs::write(&path, &text).with_context(|| format!("write {}", path.display()))?;
    std::fs::write(out.join(format!("{name}-latest.json")), &text)?;
    Ok(path)
}

/// Writes a run's document (with the commit, kernel, cores and duration
/// added) as JSON, draws its plot as `<out>/<name>.png` and says where.
pub fn publish(
    out: &std::path::Path,
    name: &str,
    started: std::time::Instant,
    mut doc: serde_json::Value,
    plot: impl FnOnce(&std::path::Path) -> Result<()>,
) -> Result<()> {
    if let Some(m) = doc.as_object_mut() {
        m.insert("benchmark".into(), name.into());
        m.insert("commit".into(), git_commit().into());
        m.insert("kernel".into(), kernel().into());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        m.insert("cores".into(), cores.into());
        m.insert("seconds".into(), started.elapsed().as_secs_f64().into());
    }
    let json_path = write_results(out, name, &doc)?;
    let png = out.join(format!("{name}.png"));
    plot(&png)?;
    println!("wrote {} and {}", json_path.display(), png.display());
    Ok(())
}

pub fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A process's resident set in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A KiB figure of `/proc/<pid>/status` (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process's resident size in KiB, in all and in its two parts: its
/// heap and stacks (anonymous), and the pages of its binary and libraries
/// (file-backed).
pub fn rss_parts(pid: u32) -> serde_json::Value {
    serde_json::json!({
        "kib": status_kib(pid, "VmRSS:"),
        "anon_kib": status_kib(pid, "RssAnon:"),
        "file_kib": status_kib(pid, "RssFile:"),
    })
}
