//! The Node object: registration (addresses, capacity, nodeInfo,
//! podCIDR, daemon endpoint), conditions, and the heartbeat Lease in
//! `kube-node-lease`, renewed every `lease_renew` (10 s upstream), with the
//! status written when it changes and at least every `status_report`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::config::KubeletConfig;

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn now_micro() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

/// What the node reports about itself.
pub fn capacity(cfg: &KubeletConfig) -> BTreeMap<&'static str, String> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let disk = nix::sys::statvfs::statvfs(&cfg.root_dir)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0);
    BTreeMap::from([
        ("cpu", cpus.to_string()),
        ("memory", format!("{mem_kib}Ki")),
        ("pods", cfg.max_pods.to_string()),
        ("ephemeral-storage", disk.to_string()),
    ])
}

fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into())
}

/// The pressure conditions, from the kernel's own figures.
fn pressure(cfg: &KubeletConfig) -> [(&'static str, bool, &'static str); 3] {
    let mem_avail_low = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        // Upstream's default hard eviction threshold: 100Mi available.
        .is_some_and(|kib| kib < 100 * 1024);
    let disk_low = nix::sys::statvfs::statvfs(&cfg.root_dir)
        // nodefs.available < 10%.
        .map(|s| s.blocks_available() * 10 < s.blocks())
        .unwrap_or(false);
    let pids_low = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse::<u64>().ok())
        .zip(std::fs::read_dir("/proc").ok().map(|d| d.count() as u64))
        .is_some_and(|(max, used)| used * 10 > max * 9);
    [
        (
            "MemoryPressure",
            mem_avail_low,
            "KubeletHasSufficientMemory",
        ),
        ("DiskPressure", disk_low, "KubeletHasNoDiskPressure"),
        ("PIDPressure", pids_low, "KubeletHasSufficientPID"),
    ]
}

/// The node's status as the kubelet writes it.
pub fn status(cfg: &KubeletConfig, runtime_version: &str, previous: Option<&Value>) -> Value {
    let cap = capacity(cfg);
    let mut conditions = Vec::new();
    let prev_cond = |ty: &str| {
        previous
            .and_then(|p| p["conditions"].as_array())
            .and_then(|cs| cs.iter().find(|c| c["type"] == ty).cloned())
    };
    let mut cond = |ty: &str, status: &str, reason: &str, message: &str| {
        let since = prev_cond(ty)
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
            .unwrap_or_else(now);
        conditions.push(
            json!({"type": ty, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now(), "lastTransitionTime": since}),
        );
    };
    for (ty, under, ok_reason) in pressure(cfg) {
        if under {
            let bad = ok_reason
                .replace("HasSufficient", "HasInsufficient")
                .replace("HasNo", "Has");
            cond(ty, "True", &bad, "the node is under pressure");
        } else {
            cond(ty, "False", ok_reason, "kubelet has sufficient resources");
        }
    }
    match network_ready(cfg) {
        Ok(()) => cond(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status",
        ),
        // Upstream's words: a node without a pod network is NotReady
        // (and tainted not-ready) until a CNI config is installed.
        Err(why) => cond(
            "Ready",
            "False",
            "KubeletNotReady",
            &format!(
                "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:{why}"
            ),
        ),
    }
    json!({
        "capacity": cap,
        "allocatable": cap,
        "conditions": conditions,
        "addresses": [
            {"type": "InternalIP", "address": cfg.node_ip.to_string()},
            {"type": "Hostname", "address": cfg.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
        "nodeInfo": {
            "machineID": std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim(),
            "systemUUID": "", "bootID": std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim(),
            "kernelVersion": kernel(), "osImage": os_image(),
            "containerRuntimeVersion": format!("containerd://{runtime_version}"),
            "kubeletVersion": concat!("v1.33.0-skiff.", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

/// Whether pods can get a network here: a CNI config loads from the conf
/// dir and every plugin it chains is found in the bin dirs.
pub fn network_ready(cfg: &KubeletConfig) -> Result<(), String> {
    let list = skiff_cni_lib::exec::Conflist::load_dir(&cfg.cni_conf_dir)
        .map_err(|e| format!("cni config uninitialized: {e}"))?;
    let rt = skiff_cni_lib::exec::Runtime::new(cfg.cni_bin_dirs.clone());
    for p in &list.plugins {
        let kind = p["type"].as_str().unwrap_or_default();
        rt.plugin_path(kind)
            .map_err(|e| format!("network {:?}: {e}", list.name))?;
    }
    Ok(())
}

/// Whether two statuses differ beyond heartbeat times.
fn changed(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v["conditions"].as_array_mut() {
            for c in cs {
                if let Some(m) = c.as_object_mut() {
                    m.remove("lastHeartbeatTime");
                    m.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(a) != strip(b)
}

/// The node's pod subnet, once the overlay has written subnet.env.
/// The node's podCIDRs from subnet.env: its IPv4 subnet, and its IPv6 one
/// on a dual-stack network.
fn pod_cidrs(cfg: &KubeletConfig) -> Option<Vec<String>> {
    let s = skiff_cni_lib::subnet_env::SubnetEnv::read(&cfg.subnet_file).ok()?;
    let mut out = vec![s.subnet_network().to_string()];
    out.extend(s.ipv6_subnet().map(|(_, n)| n.to_string()));
    Some(out)
}

/// Registers the node, then keeps its Lease and status fresh until
/// shutdown. The pod CIDR goes into the spec as soon as subnet.env has
/// it (the overlay may lease the subnet after the kubelet starts).
pub async fn run(
    client: kube::Client,
    cfg: &KubeletConfig,
    runtime_version: &str,
    mut shutdown: crate::role::Shutdown,
) -> Result<(), kube::Error> {
    let mut pod_cidr_set = false;
    let nodes: Api<Node> = Api::all(client.clone());
    let name = cfg.node_name.as_str();
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    labels.extend(cfg.node_labels.clone());
    // Where the volume controller places this node's local volumes.
    let annotations = json!({super::local_volumes::ROOT_ANNOTATION:
        super::local_volumes::root(&cfg.root_dir).display().to_string()});
    if let Some(existing) = nodes.get_opt(name).await? {
        pod_cidr_set = existing.spec.is_some_and(|s| s.pod_cidr.is_some());
        let patch = json!({"metadata": {"labels": labels, "annotations": annotations}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    } else {
        let mut node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": annotations}, "spec": {}});
        if let Some(cidrs) = pod_cidrs(cfg) {
            node["spec"]["podCIDR"] = json!(cidrs[0]);
            node["spec"]["podCIDRs"] = json!(cidrs);
            pod_cidr_set = true;
        }
        let node: Node = serde_json::from_value(node).map_err(kube::Error::SerdeError)?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => info!(node = name, "node registered"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut last_status: Option<(Value, Instant)> = None;
    loop {
        if !pod_cidr_set && let Some(cidrs) = pod_cidrs(cfg) {
            let patch = json!({"spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs}});
            match nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(node = name, pod_cidrs = ?cidrs, "pod CIDRs set");
                    pod_cidr_set = true;
                }
                Err(e) => warn!(error = %e, "setting the node's pod CIDR failed"),
            }
        }
        let st = status(cfg, runtime_version, last_status.as_ref().map(|(v, _)| v));
        let due = last_status
            .as_ref()
            .is_none_or(|(v, at)| changed(v, &st) || at.elapsed() >= cfg.status_report);
        // Each request is bounded by the renew interval, as upstream's
        // lease controller bounds its own: a request stuck on a connection
        // the apiserver no longer serves must not hold back the next
        // renewal until the lease runs out.
        let bound = cfg.lease_renew.max(Duration::from_secs(1));
        if due {
            let (params, patch) = (PatchParams::default(), Patch::Merge(json!({"status": st})));
            let sent = nodes.patch_status(name, &params, &patch);
            match tokio::time::timeout(bound, sent).await {
                Ok(Ok(_)) => last_status = Some((st, Instant::now())),
                Ok(Err(e)) => warn!(error = %e, "node status update failed"),
                Err(_) => warn!(after = ?bound, "node status update timed out"),
            }
        }
        match tokio::time::timeout(bound, renew(&leases, name, cfg.lease_duration)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "node lease renewal failed"),
            Err(_) => warn!(after = ?bound, "node lease renewal timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.lease_renew) => {}
            _ = crate::role::stopped(&mut shutdown) => return Ok(()),
        }
    }
}

async fn renew(leases: &Api<Lease>, name: &str, duration: Duration) -> Result<(), kube::Error> {
    let spec = json!({"holderIdentity": name, "leaseDurationSeconds": duration.as_secs(), "renewTime": now_micro()});
    match leases.get_opt(name).await? {
        Some(_) => {
            leases
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": spec})),
                )
                .await?;
        }
        None => {
            let lease: Lease = serde_json::from_value(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": spec}),
            )
            .map_err(kube::Error::SerdeError)?;
            leases.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}
