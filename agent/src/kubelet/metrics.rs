//! `/metrics/resource`: what the resource metrics pipeline (and through
//! it `kubectl top` and the HorizontalPodAutoscaler) reads of this node,
//! in Prometheus text format with upstream's metric names:
//! - each running container's CPU time and working set, from its cgroup;
//! - each pod's sums;
//! - the node's, from the root of the cgroup tree the kubelet sees.
//!
//! Working set is upstream's: memory in use less the inactive file
//! cache, which the kernel can take back. Both cgroup layouts are read:
//! cgroup v2 alone, and the v1 controllers (`cpuacct`, `memory`) that
//! runc uses on hybrid hosts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::containerd::{Containerd, TaskState};
use super::pod::{LABEL_CONTAINER, LABEL_POD_NAME, LABEL_POD_NAMESPACE};

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One cgroup's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Working set, in bytes.
    pub working_set: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Self) {
        self.cpu_seconds += o.cpu_seconds;
        self.working_set += o.working_set;
    }
}

fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The usage of the cgroup at `rel` (a runtime's `cgroupsPath`; empty for
/// the root, the node) under the cgroup mount `root`; none when it is
/// gone.
pub fn cgroup_usage(root: &Path, rel: &str) -> Option<Usage> {
    let rel = rel.trim_start_matches('/');
    if root.join("cgroup.controllers").exists() {
        return v2_usage(&root.join(rel), rel.is_empty());
    }
    // v1: each controller its own hierarchy.
    let cpu_dir = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .map(|c| root.join(c).join(rel))
        .find(|d| d.join("cpuacct.usage").exists())?;
    let ns: u64 = std::fs::read_to_string(cpu_dir.join("cpuacct.usage"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let working_set = if rel.is_empty() {
        machine_working_set().unwrap_or(0)
    } else {
        let mem = root.join("memory").join(rel);
        working_set(&mem, "memory.usage_in_bytes", "total_inactive_file")
    };
    Some(Usage {
        cpu_seconds: ns as f64 / 1e9,
        working_set,
    })
}

/// Memory in use (the file `used` in `dir`) less the inactive file cache
/// (`inactive` in its memory.stat).
fn working_set(dir: &Path, used: &str, inactive: &str) -> u64 {
    let used: u64 = std::fs::read_to_string(dir.join(used))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    used.saturating_sub(stat_field(&stat, inactive).unwrap_or(0))
}

fn v2_usage(dir: &Path, root: bool) -> Option<Usage> {
    let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec = stat_field(&cpu, "usage_usec")?;
    let working_set = if root {
        // The root cgroup has no memory.current: the machine's instead.
        machine_working_set().unwrap_or(0)
    } else {
        working_set(dir, "memory.current", "inactive_file")
    };
    Some(Usage {
        cpu_seconds: usec as f64 / 1e6,
        working_set,
    })
}

/// Memory in use on the machine: total less what is available.
fn machine_working_set() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| {
        info.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(kb("MemTotal:")?.saturating_sub(kb("MemAvailable:")?) * 1024)
}

/// A running container as the metrics name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerKey {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// What one scrape found.
#[derive(Debug, Default)]
pub struct Sample {
    pub node: Usage,
    pub containers: BTreeMap<ContainerKey, Usage>,
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// Some container's cgroup could not be read.
    pub error: bool,
}

/// Reads the node and every running container of `cd`.
pub async fn sample(cd: &Containerd) -> Sample {
    let mut out = Sample {
        at_ms: k8s_openapi::jiff::Timestamp::now().as_millisecond(),
        ..Default::default()
    };
    let root = Path::new(CGROUP_ROOT);
    out.node = cgroup_usage(root, "").unwrap_or_default();
    let filter = format!("labels.\"{LABEL_CONTAINER}\"");
    let Ok(list) = cd.containers(&filter).await else {
        out.error = true;
        return out;
    };
    for c in list {
        if !matches!(cd.task(&c.id).await, Ok(Some(TaskState::Running { .. }))) {
            continue;
        }
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        let key = ContainerKey {
            namespace: label(LABEL_POD_NAMESPACE),
            pod: label(LABEL_POD_NAME),
            container: label(LABEL_CONTAINER),
        };
        let spec: Value = c
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .unwrap_or_default();
        let Some(path) = spec.pointer("/linux/cgroupsPath").and_then(Value::as_str) else {
            continue;
        };
        match cgroup_usage(root, path) {
            Some(u) => {
                *out.containers.entry(key).or_default() += u;
            }
            None => out.error = true,
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The sample in Prometheus text format, as upstream's kubelet writes
/// `/metrics/resource`.
pub fn render(s: &Sample) -> String {
    let mut out = String::new();
    let ts = s.at_ms;
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (l, v) in rows {
            let _ = writeln!(out, "{name}{l} {v} {ts}");
        }
    };
    let per_container = |f: fn(&Usage) -> String| {
        s.containers
            .iter()
            .map(|(k, u)| {
                let l = labels(&[
                    ("container", &k.container),
                    ("namespace", &k.namespace),
                    ("pod", &k.pod),
                ]);
                (l, f(u))
            })
            .collect::<Vec<_>>()
    };
    let mut pods: BTreeMap<(&str, &str), Usage> = BTreeMap::new();
    for (k, u) in &s.containers {
        *pods.entry((&k.namespace, &k.pod)).or_default() += *u;
    }
    let per_pod = |f: fn(&Usage) -> String| {
        pods.iter()
            .map(|((ns, pod), u)| (labels(&[("namespace", ns), ("pod", pod)]), f(u)))
            .collect::<Vec<_>>()
    };
    let cpu = |u: &Usage| format!("{:.9}", u.cpu_seconds);
    let mem = |u: &Usage| u.working_set.to_string();
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        per_container(cpu),
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
        per_container(mem),
    );
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        vec![(String::new(), cpu(&s.node))],
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
        vec![(String::new(), mem(&s.node))],
    );
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        per_pod(cpu),
    );
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
        per_pod(mem),
    );
    let _ = writeln!(
        out,
        "# HELP resource_scrape_error [STABLE] 1 if there was an error while getting container metrics, 0 otherwise"
    );
    let _ = writeln!(out, "# TYPE resource_scrape_error gauge");
    let _ = writeln!(out, "resource_scrape_error {}", u8::from(s.error));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write");
        }
    }

    #[test]
    fn a_cgroup_reads_as_cpu_seconds_and_working_set_in_both_layouts() {
        let base = std::env::temp_dir().join(format!("skiff-metrics-{}", std::process::id()));
        let want = Usage {
            cpu_seconds: 2.5,
            working_set: 6 * 1024 * 1024,
        };
        let v2 = base.join("v2");
        write(&v2, &[("cgroup.controllers", "cpu memory")]);
        write(
            &v2.join("pods/c1"),
            &[
                ("cpu.stat", "usage_usec 2500000\nuser_usec 1\n"),
                ("memory.current", "10485760\n"),
                ("memory.stat", "anon 1\ninactive_file 4194304\n"),
            ],
        );
        let v1 = base.join("v1");
        write(
            &v1.join("cpuacct/pods/c1"),
            &[("cpuacct.usage", "2500000000\n")],
        );
        write(
            &v1.join("memory/pods/c1"),
            &[
                ("memory.usage_in_bytes", "10485760\n"),
                ("memory.stat", "cache 1\ntotal_inactive_file 4194304\n"),
            ],
        );
        let got = (
            cgroup_usage(&v2, "/pods/c1"),
            cgroup_usage(&v1, "/pods/c1"),
            cgroup_usage(&v1, "/pods/gone"),
        );
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(got, (Some(want), Some(want), None));
    }

    #[test]
    fn the_text_names_each_container_and_sums_pods() {
        let key = |pod: &str, c: &str| ContainerKey {
            namespace: "default".into(),
            pod: pod.into(),
            container: c.into(),
        };
        let u = |cpu, ws| Usage {
            cpu_seconds: cpu,
            working_set: ws,
        };
        let s = Sample {
            node: u(100.0, 1 << 30),
            containers: BTreeMap::from([
                (key("web", "a"), u(1.5, 100)),
                (key("web", "b"), u(0.5, 50)),
            ]),
            at_ms: 1_700_000_000_000,
            error: false,
        };
        let text = render(&s);
        assert!(text.contains(
            "container_cpu_usage_seconds_total{container=\"a\",namespace=\"default\",pod=\"web\"} 1.500000000 1700000000000"
        ), "{text}");
        assert!(
            text.contains(
                "pod_memory_working_set_bytes{namespace=\"default\",pod=\"web\"} 150 1700000000000"
            ),
            "{text}"
        );
        assert!(
            text.contains("node_memory_working_set_bytes 1073741824 1700000000000"),
            "{text}"
        );
        assert!(text.ends_with("resource_scrape_error 0\n"), "{text}");
    }
}
