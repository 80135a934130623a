//! The resource metrics API, `metrics.k8s.io/v1beta1` (NodeMetrics and
//! PodMetrics), served by the apiserver itself the way metrics-server
//! serves it. Each resolution period every node's kubelet is scraped at
//! `/metrics/resource`. Memory is the last working set. CPU is the rate
//! between a node's last two scrapes, so usage shows from the second
//! scrape on. `kubectl top` and the HorizontalPodAutoscaler read it. It
//! is read-only (get and list, with label selectors).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tracing::debug;

use super::Api;
use super::fields::{core, str_at};
use super::logs::fetch;
use crate::resources::Resource;
use crate::status::ApiError;

/// One scrape of one kubelet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// Milliseconds since the epoch, as the kubelet stamped it.
    pub at_ms: i64,
    /// CPU seconds and working-set bytes.
    pub node: (f64, u64),
    /// By (namespace, pod, container).
    pub containers: HashMap<(String, String, String), (f64, u64)>,
}

/// Parses `/metrics/resource` text: the four series the API needs.
pub fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, labels, rest) = match line.split_once('{') {
            Some((name, rest)) => match rest.split_once('}') {
                Some((labels, rest)) => (name, labels, rest),
                None => continue,
            },
            None => match line.split_once(' ') {
                Some((name, rest)) => (name, "", rest),
                None => continue,
            },
        };
        let mut fields = rest.split_whitespace();
        let Some(value) = fields.next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if let Some(ts) = fields.next().and_then(|t| t.parse::<i64>().ok()) {
            s.at_ms = s.at_ms.max(ts);
        }
        let label = |k: &str| {
            labels.split(',').find_map(|kv| {
                let (key, v) = kv.split_once('=')?;
                (key.trim() == k).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let key = || Some((label("namespace")?, label("pod")?, label("container")?));
        match name {
            "node_cpu_usage_seconds_total" => s.node.0 = value,
            "node_memory_working_set_bytes" => s.node.1 = value as u64,
            "container_cpu_usage_seconds_total" => {
                if let Some(k) = key() {
                    s.containers.entry(k).or_default().0 = value;
                }
            }
            "container_memory_working_set_bytes" => {
                if let Some(k) = key() {
                    s.containers.entry(k).or_default().1 = value as u64;
                }
            }
            _ => {}
        }
    }
    s
}

/// The last two scrapes of every node.
#[derive(Default)]
pub struct Samples(Mutex<HashMap<String, (Option<Scrape>, Scrape)>>);

impl Samples {
    fn put(&self, node: &str, s: Scrape) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = m.remove(node);
        let prev = entry.map(|(_, cur)| cur).filter(|c| c.at_ms < s.at_ms);
        m.insert(node.to_string(), (prev, s));
    }

    fn retain(&self, nodes: &[String]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|n, _| nodes.contains(n));
    }

    fn get(&self, node: &str) -> Option<(Scrape, Scrape)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (prev, cur) = m.get(node)?;
        Some((prev.clone()?, cur.clone()))
    }
}

/// CPU as the API writes it: nanocores.
fn cpu_quantity(cores: f64) -> String {
    format!("{}n", (cores.max(0.0) * 1e9).round() as u64)
}

/// Memory as the API writes it: KiB.
fn memory_quantity(bytes: u64) -> String {
    format!("{}Ki", bytes / 1024)
}

fn rate(prev: f64, cur: f64, window_ms: i64) -> f64 {
    if window_ms <= 0 {
        return 0.0;
    }
    (cur - prev).max(0.0) / (window_ms as f64 / 1000.0)
}

fn timestamp(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn window(ms: i64) -> String {
    format!("{}s", ms as f64 / 1000.0)
}

fn api_err(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("{what}: {e}"))
}

impl Api {
    /// Scrapes every node's kubelet once per `resolution`, forever.
    pub async fn scrape_metrics(self: Arc<Self>, resolution: Duration) {
        loop {
            tokio::time::sleep(resolution).await;
            let Ok(nodes_r) = core("nodes") else { return };
            let nodes = match self.list_objects(nodes_r, None, &HashMap::new()).await {
                Ok((nodes, _)) => nodes,
                Err(e) => {
                    debug!(error = %e.message, "metrics: listing nodes failed");
                    continue;
                }
            };
            let names: Vec<String> = nodes
                .iter()
                .map(|n| str_at(n, "/metadata/name").to_string())
                .collect();
            self.metrics.retain(&names);
            let scrapes =
                futures::future::join_all(nodes.iter().map(|n| self.scrape_node(n))).await;
            for (name, s) in names.iter().zip(scrapes) {
                match s {
                    Ok(s) => self.metrics.put(name, s),
                    Err(e) => debug!(node = %name, error = %e.message, "metrics: scrape failed"),
                }
            }
        }
    }

    async fn scrape_node(&self, node: &Value) -> Result<Scrape, ApiError> {
        let k = self.kubelet_of_node(node)?;
        let read = async {
            let resp = fetch(&k, "/metrics/resource").await?;
            http_body_util::Limited::new(resp.into_body(), 16 << 20)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| api_err("metrics", e))
        };
        let body = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| api_err("metrics", "timed out"))??;
        Ok(parse(&String::from_utf8_lossy(&body)))
    }

    /// GET on `metrics.k8s.io`: one object, or a list filtered by
    /// `labelSelector`.
    pub(super) async fn metrics_get(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: Option<&str>,
        q: &HashMap<String, String>,
    ) -> Result<Value, ApiError> {
        let nodes = r.plural == "nodes";
        let source = core(r.plural)?;
        let mut q = q.clone();
        if let Some(n) = name {
            q.insert("fieldSelector".into(), format!("metadata.name={n}"));
        }
        let (objs, _) = self.list_objects(source, ns, &q).await?;
        let items: Vec<Value> = objs
            .iter()
            .filter_map(|o| {
                if nodes {
                    self.node_metrics(o)
                } else {
                    self.pod_metrics(o)
                }
            })
            .collect();
        if let Some(n) = name {
            return items
                .into_iter()
                .next()
                .ok_or_else(|| ApiError::not_found(r.group, r.plural, n));
        }
        Ok(json!({
            "kind": format!("{}List", r.kind),
            "apiVersion": r.api_version(),
            "metadata": {},
            "items": items,
        }))
    }

    fn node_metrics(&self, node: &Value) -> Option<Value> {
        let name = str_at(node, "/metadata/name");
        let (prev, cur) = self.metrics.get(name)?;
        let window_ms = cur.at_ms - prev.at_ms;
        Some(json!({
            "kind": "NodeMetrics",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {
                "name": name,
                "creationTimestamp": timestamp(cur.at_ms),
                "labels": node.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
            },
            "timestamp": timestamp(cur.at_ms),
            "window": window(window_ms),
            "usage": {
                "cpu": cpu_quantity(rate(prev.node.0, cur.node.0, window_ms)),
                "memory": memory_quantity(cur.node.1),
            },
        }))
    }

    /// A pod's metrics: each container seen in both of its node's last
    /// scrapes.
    fn pod_metrics(&self, pod: &Value) -> Option<Value> {
        let (ns, name) = (
            str_at(pod, "/metadata/namespace"),
            str_at(pod, "/metadata/name"),
        );
        let (prev, cur) = self.metrics.get(str_at(pod, "/spec/nodeName"))?;
        let window_ms = cur.at_ms - prev.at_ms;
        let mut containers: Vec<(&String, Value)> = cur
            .containers
            .iter()
            .filter(|((n, p, _), _)| n == ns && p == name)
            .filter_map(|(k, (cpu, mem))| {
                let (before, _) = prev.containers.get(k)?;
                Some((
                    &k.2,
                    json!({"name": k.2, "usage": {
                        "cpu": cpu_quantity(rate(*before, *cpu, window_ms)),
                        "memory": memory_quantity(*mem),
                    }}),
                ))
            })
            .collect();
        if containers.is_empty() {
            return None;
        }
        containers.sort_by(|a, b| a.0.cmp(b.0));
        Some(json!({
            "kind": "PodMetrics",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {
                "name": name,
                "namespace": ns,
                "creationTimestamp": timestamp(cur.at_ms),
                "labels": pod.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
            },
            "timestamp": timestamp(cur.at_ms),
            "window": window(window_ms),
            "containers": containers.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP container_cpu_usage_seconds_total [STABLE] x\n\
# TYPE container_cpu_usage_seconds_total counter\n\
container_cpu_usage_seconds_total{container=\"main\",namespace=\"default\",pod=\"web\"} 1.500000000 1700000002000\n\
container_memory_working_set_bytes{container=\"main\",namespace=\"default\",pod=\"web\"} 2097152 1700000002000\n\
node_cpu_usage_seconds_total 10.000000000 1700000002000\n\
node_memory_working_set_bytes 1073741824 1700000002000\n\
resource_scrape_error 0\n";

    #[test]
    fn kubelet_text_parses_and_rates_come_from_two_scrapes() {
        let s = parse(TEXT);
        assert_eq!(s.at_ms, 1_700_000_002_000);
        assert_eq!(s.node, (10.0, 1 << 30));
        let key = ("default".to_string(), "web".to_string(), "main".to_string());
        assert_eq!(s.containers.get(&key), Some(&(1.5, 2 << 20)));
        // Half a core over two seconds.
        assert_eq!(cpu_quantity(rate(0.5, 1.5, 2000)), "500000000n");
        assert_eq!(memory_quantity(2 << 20), "2048Ki");
        assert_eq!(window(15_000), "15s");
        // A counter that went back (a restarted container) is no usage.
        assert_eq!(rate(3.0, 1.0, 1000), 0.0);
    }

    #[test]
    fn samples_keep_the_last_two_and_forget_gone_nodes() {
        let s = Samples::default();
        let at = |ms| Scrape {
            at_ms: ms,
            ..Default::default()
        };
        s.put("n1", at(1000));
        assert!(s.get("n1").is_none(), "one scrape gives no rate");
        s.put("n1", at(2000));
        s.put("n1", at(3000));
        assert_eq!(
            s.get("n1").map(|(p, c)| (p.at_ms, c.at_ms)),
            Some((2000, 3000))
        );
        s.retain(&["n2".to_string()]);
        assert!(s.get("n1").is_none());
    }
}
