//! The eBPF service proxy end to end: the real `skiff-agent` in static
//! (manifest) mode inside a network namespace the test creates, its programs
//! attached to a cgroup the test creates, real TCP and UDP servers as
//! backends, and clients run in that namespace and cgroup.
//!
//! Addresses: node 10.200.0.1, backends 10.200.0.11-13 (and fd00:200::11),
//! all on one interface; ClusterIPs in 10.96.0.0/16 exist nowhere, so a
//! connection that is not translated fails (no route) instead of leaving.
//! Needs root.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use skiff_agent::proxy::model::ExternalSet;
use skiff_agent::proxy::{Dataplane, External, ExternalConfig, Frontend, Interfaces};
use skiff_ebpf_common::{
    Backend, ExtBackend, ExternalValue, FAMILY_V4, MAX_EXT_BACKENDS, MAX_EXTERNAL, MAX_SERVICES,
    PROTO_TCP, ServiceKey, maps as names,
};
use skiff_tests::node::sample;
use skiff_tests::{Cgroup, Netns, PinDir, Proc, Spawn, TempDir, bin, wait_for};

const NODE_IP: &str = "10.200.0.1";
const B: [&str; 3] = ["10.200.0.11", "10.200.0.12", "10.200.0.13"];
const TIMEOUT: Duration = Duration::from_secs(15);

/// One node: namespace, client cgroup, pins, manifests, agent, servers.
/// Field order is drop order: processes first, then pins (detaching the
/// programs), cgroup, namespace, directories.
struct Node {
    agent: Option<Proc>,
    servers: Vec<Proc>,
    pins: PinDir,
    cg: Cgroup,
    ns: Netns,
    manifests: TempDir,
    logs: TempDir,
    restarts: u32,
}

impl Node {
    fn new() -> Self {
        let ns = Netns::new();
        ns.add_local_link("skd0", &[&format!("{NODE_IP}/24")]);
        for b in B {
            ns.ip(&["addr", "add", &format!("{b}/32"), "dev", "skd0"]);
        }
        ns.ip(&["addr", "add", "fd00:200::1/64", "dev", "skd0", "nodad"]);
        ns.ip(&["addr", "add", "fd00:200::11/128", "dev", "skd0", "nodad"]);
        Self {
            agent: None,
            servers: Vec::new(),
            pins: PinDir::new(),
            cg: Cgroup::new(),
            ns,
            manifests: TempDir::new(),
            logs: TempDir::new(),
            restarts: 0,
        }
    }

    /// TCP server on ADDR:8080 and UDP server on ADDR:5353 answering `name`.
    fn backend(&mut self, ip: &str, name: &str) {
        let fmt = |port: u16| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        };
        for (kind, port) in [("serve-tcp", 8080), ("serve-udp", 5353)] {
            let mut p = Spawn::new(bin("skiff-probe"))
                .args([kind, &fmt(port), name])
                .netns(&self.ns)
                .start();
            let ready = p.ask("");
            assert_eq!(ready, "ready", "{kind} {ip} did not start");
            self.servers.push(p);
        }
    }

    fn write(&self, file: &str, yaml: &str) {
        // Write then rename, so the agent never reads half a file.
        let tmp = self.manifests.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap_or_else(|e| panic!("write {file}: {e}"));
        std::fs::rename(&tmp, self.manifests.path.join(file))
            .unwrap_or_else(|e| panic!("rename {file}: {e}"));
    }

    fn start_agent(&mut self) {
        self.restarts += 1;
        let log = self.logs.path.join(format!("agent-{}.log", self.restarts));
        let p = Spawn::new(bin("skiff-agent"))
            .args(["run", "--roles", "proxy", "--manifests"])
            .args([&self.manifests.path])
            .args(["--cgroup"])
            .args([&self.cg.path])
            .args(["--bpffs"])
            .args([&self.pins.path])
            .args([
                "--node-name",
                "node-a",
                "--nodeport-address",
                NODE_IP,
                "--poll-ms",
                "50",
            ])
            .netns(&self.ns)
            .log_to(&log)
            .start();
        self.agent = Some(p);
    }

    /// The agent reading Services and EndpointSlices from an apiserver.
    fn start_agent_kube(&mut self, kubeconfig: &std::path::Path) {
        self.restarts += 1;
        let log = self.logs.path.join(format!("agent-{}.log", self.restarts));
        let p = Spawn::new(bin("skiff-agent"))
            .args(["run", "--roles", "proxy", "--kubeconfig"])
            .args([kubeconfig])
            .args(["--cgroup"])
            .args([&self.cg.path])
            .args(["--bpffs"])
            .args([&self.pins.path])
            .args(["--node-name", "node-a", "--nodeport-address", NODE_IP])
            .netns(&self.ns)
            .log_to(&log)
            .start();
        self.agent = Some(p);
    }

    /// Kills the agent without warning: links and maps stay pinned.
    fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
    }

    fn agent_log(&self) -> String {
        self.agent.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// `skiff-agent proxy list --json`: frontend -> backends.
    fn list(&self) -> BTreeMap<String, Vec<String>> {
        self.try_list().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The agent's `/metrics`, scraped on its default loopback address in
    /// the node's namespace.
    fn metrics(&self) -> String {
        self.agent("/metrics")
    }

    /// What the agent's metrics port answers at `path`: the body, then
    /// the status code on a line of its own.
    fn agent(&self, path: &str) -> String {
        skiff_tests::node::agent_get(&self.ns.path(), path)
    }

    /// Entries in the pinned map `name`, from `skiff-agent proxy maps`.
    fn map_entries(&self, name: &str) -> u64 {
        let out = Spawn::new(bin("skiff-agent"))
            .args(["proxy", "maps", "--json", "--bpffs"])
            .args([&self.pins.path])
            .output();
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        v.as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == name)
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or_else(|| panic!("no map {name} in {out}"))
    }

    /// As `list`, or the error while the agent has not installed yet.
    fn try_list(&self) -> Result<BTreeMap<String, Vec<String>>, String> {
        let out = Spawn::new(bin("skiff-agent"))
            .args(["proxy", "list", "--json", "--bpffs"])
            .args([&self.pins.path])
            .try_output()?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                let backends = f["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|b| b.as_str().map(String::from))
                    .collect();
                (
                    f["frontend"].as_str().unwrap_or_default().to_string(),
                    backends,
                )
            })
            .collect::<BTreeMap<_, _>>())
        .map_err(|e: String| e)
    }

    /// Waits until `frontend` has exactly `backends` (order-insensitive).
    fn wait_programmed(&self, frontend: &str, backends: &[&str]) {
        let mut want: Vec<String> = backends.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_for(&format!("{frontend} -> {want:?}"), TIMEOUT, || {
            let mut got = self.try_list().ok()?.get(frontend).cloned()?;
            got.sort();
            (got == want).then_some(())
        });
    }

    /// Runs a probe client in the namespace and the translated cgroup.
    fn client(&self, args: &[&str]) -> Value {
        let out = Spawn::new(bin("skiff-probe"))
            .args(args)
            .netns(&self.ns)
            .cgroup(&self.cg)
            .output();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn tcp(&self, to: &str, n: u32) -> Value {
        self.client(&["tcp", to, &n.to_string()])
    }

    fn udp(&self, to: &str, n: u32) -> Value {
        self.client(&["udp", to, &n.to_string()])
    }
}

fn counts(v: &Value, field: &str) -> BTreeMap<String, u64> {
    v[field]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
        .collect()
}

/// Every request answered, by all three backends, and the peer the
/// application saw was `peer` (the frontend) each time.
fn assert_spread(r: &Value, peer: &str) {
    assert_eq!(counts(r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(
        counts(r, "answers").keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{r}"
    );
    assert_peers(r, peer);
}

/// Every peer name the application saw was `peer`.
fn assert_peers(r: &Value, peer: &str) {
    assert_eq!(counts(r, "peers").keys().collect::<Vec<_>>(), [peer], "{r}");
}

/// Every connection answered by backend `name`, none failed.
fn assert_only(r: &Value, name: &str, n: u64) {
    assert_eq!(counts(r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(
        counts(r, "answers"),
        BTreeMap::from([(name.to_string(), n)]),
        "{r}"
    );
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}\n"
    )
}

/// An EndpointSlice for service `svc` with ports tcp 8080 ("http") and udp
/// 5353 ("dns"); each endpoint is (ip, conditions-yaml, node).
fn slice(svc: &str, family: &str, endpoints: &[(&str, &str, &str)]) -> String {
    let mut eps = String::new();
    for (ip, cond, node) in endpoints {
        eps.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: {node}\n  conditions: {{{cond}}}\n"
        ));
    }
    if endpoints.is_empty() {
        eps.push_str("[]\n");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{family}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: {family}\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n{eps}"
    )
}

/// Service `name` at ClusterIP `vip` with the web ports, and its IPv4
/// EndpointSlice of `endpoints`, as one manifest.
fn plain_service(name: &str, vip: &str, endpoints: &[(&str, &str, &str)]) -> String {
    format!(
        "{}---\n{}",
        service(name, &format!("  clusterIP: {vip}\n{WEB_PORTS}")),
        slice(name, "IPv4", endpoints)
    )
}

const WEB_PORTS: &str =
    "  ports:\n  - {name: http, port: 80, protocol: TCP}\n  - {name: dns, port: 53, protocol: UDP}";

fn three_backends(node: &mut Node) {
    for (i, b) in B.iter().enumerate() {
        node.backend(b, &format!("b{}", i + 1));
    }
}

fn ready(ip: &str) -> (&str, &'static str, &'static str) {
    (ip, "ready: true", "node-a")
}

fn web_node(extra_spec: &str) -> Node {
    let mut node = Node::new();
    three_backends(&mut node);
    node.write(
        "web.yaml",
        &format!(
            "{}---\n{}",
            service(
                "web",
                &format!("  clusterIP: 10.96.0.10\n{extra_spec}{WEB_PORTS}")
            ),
            slice("web", "IPv4", &[ready(B[0]), ready(B[1]), ready(B[2])])
        ),
    );
    node.start_agent();
    node.wait_programmed(
        "10.96.0.10:80/TCP",
        &["10.200.0.11:8080", "10.200.0.12:8080", "10.200.0.13:8080"],
    );
    node
}

#[test]
fn tcp_cluster_ip_spreads_over_three_backends() {
    let node = web_node("");
    let r = node.tcp("10.96.0.10:80", 60);
    let answers = counts(&r, "answers");
    assert_eq!(counts(&r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(
        answers.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{r}"
    );
    assert_eq!(answers.values().sum::<u64>(), 60);
    // getpeername shows the service, not the backend.
    assert_eq!(
        counts(&r, "peers").keys().collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "{r}"
    );
    // `proxy maps` counts what the tables hold: a SERVICES entry per
    // frontend `proxy list` shows, and a BACKENDS entry and a slot per
    // backend of each.
    let listed = node.list();
    let backends: usize = listed.values().map(Vec::len).sum();
    assert!(listed.contains_key("10.96.0.10:80/TCP"), "{listed:?}");
    assert_eq!(node.map_entries("SERVICES"), listed.len() as u64);
    assert_eq!(node.map_entries("BACKENDS"), backends as u64);
    assert_eq!(node.map_entries("SLOTS"), backends as u64);
}

/// A set larger than what its `SERVICES` entry carries (4 slots): the
/// connect program reads the other slots from `SLOTS`, so all six backends
/// answer; shrunk to two, only those two do.
#[test]
fn a_service_with_more_backends_than_its_entry_carries_uses_all_of_them() {
    let mut node = Node::new();
    let six: Vec<String> = (11..17).map(|i| format!("10.200.0.{i}")).collect();
    for (i, b) in six.iter().enumerate() {
        if i >= B.len() {
            node.ns
                .ip(&["addr", "add", &format!("{b}/32"), "dev", "skd0"]);
        }
        node.backend(b, &format!("b{}", i + 1));
    }
    let svc = service("web", &format!("  clusterIP: 10.96.0.10\n{WEB_PORTS}"));
    let all: Vec<_> = six.iter().map(|b| ready(b)).collect();
    node.write(
        "web.yaml",
        &format!("{svc}---\n{}", slice("web", "IPv4", &all)),
    );
    node.start_agent();
    let want: Vec<String> = six.iter().map(|b| format!("{b}:8080")).collect();
    node.wait_programmed(
        "10.96.0.10:80/TCP",
        &want.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // 120 connections over six backends: each is missed with probability
    // (5/6)^120, about 3e-10.
    let r = node.tcp("10.96.0.10:80", 120);
    assert_eq!(counts(&r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(
        counts(&r, "answers").keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3", "b4", "b5", "b6"],
        "{r}"
    );
    assert_eq!(
        counts(&r, "peers").keys().collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "{r}"
    );

    let two = [ready(&six[4]), ready(&six[5])];
    node.write(
        "web.yaml",
        &format!("{svc}---\n{}", slice("web", "IPv4", &two)),
    );
    node.wait_programmed("10.96.0.10:80/TCP", &[&want[4], &want[5]]);
    let r = node.tcp("10.96.0.10:80", 60);
    assert_eq!(counts(&r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(
        counts(&r, "answers").keys().collect::<Vec<_>>(),
        ["b5", "b6"],
        "{r}"
    );
}

/// The agent's `/metrics` follow what is programmed: kube-proxy's sync
/// duration and timestamp, the frontends and backends, and each map's
/// fill, and they move when a Service is added.
#[test]
fn proxy_metrics_follow_what_is_programmed() {
    let node = web_node("");
    let listed = node.list();
    let m = wait_for("a sync counted", TIMEOUT, || {
        let m = node.metrics();
        (sample(&m, "skiff_proxy_services", &[]) == Some(listed.len() as f64)).then_some(m)
    });
    let backends: usize = listed.values().map(Vec::len).sum();
    assert_eq!(
        sample(&m, "skiff_proxy_endpoints", &[]),
        Some(backends as f64),
        "{m}"
    );
    let syncs = sample(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(syncs >= 1.0, "{m}");
    // Ready, as kube-proxy means it: the rules were programmed and no
    // change waits.
    let readyz = node.agent("/readyz?verbose");
    assert!(
        readyz.contains("[+]proxy ok\n") && readyz.ends_with("readyz check passed\n\n200"),
        "{readyz}"
    );
    assert_eq!(node.agent("/livez"), "ok\n200");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let last = sample(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]).unwrap_or(0.0);
    assert!(
        (now - last).abs() < 60.0,
        "last sync {last}, now {now}\n{m}"
    );
    // Map fills are read a second after the first programming, then
    // every 30 s.
    let m = wait_for("the maps read", TIMEOUT, || {
        let m = node.metrics();
        sample(&m, "skiff_bpf_map_entries", &[r#"map="SERVICES""#]).map(|_| m)
    });
    assert_eq!(
        sample(&m, "skiff_bpf_map_entries", &[r#"map="SERVICES""#]),
        Some(node.map_entries("SERVICES") as f64),
        "{m}"
    );
    assert!(
        sample(&m, "skiff_bpf_map_max_entries", &[r#"map="SERVICES""#]).is_some_and(|n| n > 0.0),
        "{m}"
    );

    node.write(
        "other.yaml",
        &plain_service("other", "10.96.0.20", &[ready(B[0])]),
    );
    node.wait_programmed("10.96.0.20:80/TCP", &["10.200.0.11:8080"]);
    let after = wait_for("the new Service counted", TIMEOUT, || {
        let m = node.metrics();
        (sample(&m, "skiff_proxy_services", &[]) == Some(listed.len() as f64 + 2.0)).then_some(m)
    });
    assert_eq!(
        sample(&after, "skiff_proxy_endpoints", &[]),
        Some(backends as f64 + 2.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            &[]
        )
        .is_some_and(|n| n > syncs),
        "{after}"
    );
    // Nothing is served beyond loopback: the node's address refuses.
    let outside = Spawn::new("curl")
        .args(["-s", "-m", "2", &format!("http://{NODE_IP}:10249/metrics")])
        .netns(&node.ns)
        .try_output();
    assert!(outside.is_err(), "{outside:?}");
}

#[test]
fn udp_cluster_ip_spreads_and_reply_comes_from_vip() {
    let node = web_node("");
    node.wait_programmed(
        "10.96.0.10:53/UDP",
        &["10.200.0.11:5353", "10.200.0.12:5353", "10.200.0.13:5353"],
    );
    // Replies must appear to come from the VIP.
    assert_spread(&node.udp("10.96.0.10:53", 60), "10.96.0.10:53");
}

#[test]
fn ipv4_mapped_ipv6_destinations_reach_ipv4_services() {
    // Dual-stack clients (Go, Java, Python) connect AF_INET6 sockets to
    // `::ffff:<ClusterIP>`.
    let node = web_node("");
    node.wait_programmed(
        "10.96.0.10:53/UDP",
        &["10.200.0.11:5353", "10.200.0.12:5353", "10.200.0.13:5353"],
    );
    // getpeername and recvfrom answer in the form the socket asked.
    assert_spread(
        &node.tcp("[::ffff:10.96.0.10]:80", 60),
        "[::ffff:10.96.0.10]:80",
    );
    assert_spread(
        &node.udp("[::ffff:10.96.0.10]:53", 30),
        "[::ffff:10.96.0.10]:53",
    );
}

/// `(ms since the epoch, answer or "error: ...")` per line of a
/// `udp-follow` client's log.
fn follow_lines(p: &Proc) -> Vec<(u128, String)> {
    p.log_text()
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[test]
fn a_connected_udp_client_is_moved_off_a_backend_that_leaves_and_nothing_else_is_touched() {
    let node = web_node("");
    // A second Service whose only backend is every backend of `web`: its
    // sockets to them must survive `web` losing one.
    let all = [ready(B[0]), ready(B[1]), ready(B[2])];
    node.write(
        "other.yaml",
        &format!(
            "{}---
{}",
            service(
                "other",
                &format!(
                    "  clusterIP: 10.96.0.20
{WEB_PORTS}"
                )
            ),
            slice("other", "IPv4", &all)
        ),
    );
    node.wait_programmed(
        "10.96.0.20:53/UDP",
        &["10.200.0.11:5353", "10.200.0.12:5353", "10.200.0.13:5353"],
    );
    let follow = |to: &str, in_cgroup: bool, name: &str| {
        let mut s = Spawn::new(bin("skiff-probe"))
            .args(["udp-follow", to, "8"])
            .netns(&node.ns)
            .log_to(&node.logs.path.join(format!("{name}.log")));
        if in_cgroup {
            s = s.cgroup(&node.cg);
        }
        s.start()
    };
    let mut client = follow("10.96.0.10:53", true, "client");
    let mut other = follow("10.96.0.20:53", true, "other");
    // Which backend each got.
    let first = |p: &Proc| {
        wait_for("a first answer", TIMEOUT, || {
            follow_lines(p)
                .into_iter()
                .find(|(_, a)| a.starts_with('b'))
                .map(|(_, a)| a)
        })
    };
    let gone = first(&client);
    let other_backend = first(&other);
    let gone_ip = B[gone[1..].parse::<usize>().unwrap_or(1) - 1];
    // A process outside the cgroup talking to that backend directly.
    let mut outside = follow(&format!("{gone_ip}:5353"), false, "outside");
    first(&outside);

    // `gone` leaves `web` (its server keeps running, as a terminating pod's
    // may). What the client sees is judged from this moment: the socket
    // may end before the poll below sees the new slice programmed.
    let changed_at = epoch_ms();
    let left: Vec<_> = all.iter().copied().filter(|e| e.0 != gone_ip).collect();
    node.write(
        "web.yaml",
        &format!(
            "{}---
{}",
            service(
                "web",
                &format!(
                    "  clusterIP: 10.96.0.10
{WEB_PORTS}"
                )
            ),
            slice("web", "IPv4", &left)
        ),
    );
    let kept: Vec<String> = left.iter().map(|e| format!("{}:5353", e.0)).collect();
    let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
    node.wait_programmed("10.96.0.10:53/UDP", &kept);
    let programmed_at = epoch_ms();
    for p in [&mut client, &mut other, &mut outside] {
        p.finish();
    }

    let lines = follow_lines(&client);
    let after: Vec<&(u128, String)> = lines.iter().filter(|(t, _)| *t > changed_at).collect();
    let moved = after
        .iter()
        .find(|(_, a)| a.starts_with('b') && *a != gone)
        .unwrap_or_else(|| panic!("the client never left {gone}: {lines:?}"));
    // Ended: a read says ECONNABORTED, a write EDESTADDRREQ (89).
    assert!(
        after
            .iter()
            .any(|(_, a)| a.contains("ConnectionAborted") || a.ends_with("errno 89")),
        "the application saw its socket end: {lines:?}"
    );
    let last: Vec<&String> = lines.iter().rev().take(10).map(|(_, a)| a).collect();
    assert!(
        last.iter().all(|a| a.starts_with('b') && **a != gone),
        "it stays on live backends: {last:?}"
    );
    eprintln!(
        "moved from {gone} to {} {} ms after the slice was programmed",
        moved.1,
        moved.0.saturating_sub(programmed_at)
    );
    // The other Service's socket and the process outside the cgroup kept
    // their backends without an error.
    for (p, backend) in [(&other, &other_backend), (&outside, &gone)] {
        let lines = follow_lines(p);
        assert!(
            lines.iter().all(|(_, a)| a == backend),
            "{backend} throughout: {lines:?}"
        );
    }
}

#[test]
fn endpoint_removal_and_readiness_changes_apply_to_new_connections() {
    let node = web_node("");
    // b3 removed, b2 not ready: only b1 takes new connections.
    node.write(
        "web.yaml",
        &plain_service(
            "web",
            "10.96.0.10",
            &[ready(B[0]), (B[1], "ready: false", "node-a")],
        ),
    );
    node.wait_programmed("10.96.0.10:80/TCP", &["10.200.0.11:8080"]);
    assert_only(&node.tcp("10.96.0.10:80", 30), "b1", 30);

    // No ready endpoint left: the serving, terminating one takes them.
    node.write(
        "web.yaml",
        &plain_service(
            "web",
            "10.96.0.10",
            &[
                (
                    B[1],
                    "ready: false, serving: true, terminating: true",
                    "node-a",
                ),
                (
                    B[2],
                    "ready: false, serving: false, terminating: true",
                    "node-a",
                ),
            ],
        ),
    );
    node.wait_programmed("10.96.0.10:80/TCP", &["10.200.0.12:8080"]);
    assert_only(&node.tcp("10.96.0.10:80", 20), "b2", 20);
}

#[test]
fn service_without_endpoints_refuses_connections() {
    let mut node = Node::new();
    node.write(
        "empty.yaml",
        &service("empty", &format!("  clusterIP: 10.96.0.20\n{WEB_PORTS}")),
    );
    node.start_agent();
    node.wait_programmed("10.96.0.20:80/TCP", &[]);
    let r = node.tcp("10.96.0.20:80", 5);
    assert_eq!(
        counts(&r, "errors"),
        BTreeMap::from([("ConnectionRefused".into(), 5)]),
        "{r}"
    );
    let r = node.udp("10.96.0.20:53", 3);
    assert_eq!(
        counts(&r, "errors"),
        BTreeMap::from([("ConnectionRefused".into(), 3)]),
        "{r}"
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let node = web_node(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    );
    let first = node.tcp("10.96.0.10:80", 30);
    let answers = counts(&first, "answers");
    assert_eq!(
        answers.len(),
        1,
        "all connections of one client go to one backend: {first}"
    );
    // A later client process in the same client (namespace) stays there.
    let again = node.tcp("10.96.0.10:80", 10);
    assert_eq!(
        counts(&again, "answers").keys().collect::<Vec<_>>(),
        answers.keys().collect::<Vec<_>>()
    );
    let listed = node.list();
    assert!(listed.contains_key("10.96.0.10:80/TCP"));
}

#[test]
fn node_port_serves_local_clients() {
    let mut node = Node::new();
    three_backends(&mut node);
    node.write(
        "np.yaml",
        &format!(
            "{}---\n{}",
            service(
                "np",
                "  type: NodePort\n  clusterIP: 10.96.0.30\n  ports:\n  - {name: http, port: 80, nodePort: 30080}"
            ),
            slice("np", "IPv4", &[ready(B[0]), ready(B[1]), ready(B[2])])
        ),
    );
    node.start_agent();
    node.wait_programmed(
        "10.200.0.1:30080/TCP",
        &["10.200.0.11:8080", "10.200.0.12:8080", "10.200.0.13:8080"],
    );
    let r = node.tcp("10.200.0.1:30080", 45);
    assert_eq!(counts(&r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(counts(&r, "answers").len(), 3, "{r}");
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let mut node = Node::new();
    three_backends(&mut node);
    node.write(
        "local.yaml",
        &format!(
            "{}---\n{}",
            service(
                "local",
                &format!("  clusterIP: 10.96.0.40\n  internalTrafficPolicy: Local\n{WEB_PORTS}")
            ),
            slice(
                "local",
                "IPv4",
                &[
                    (B[0], "ready: true", "node-b"),
                    (B[1], "ready: true", "node-a"),
                    (B[2], "ready: true", "node-b"),
                ]
            )
        ),
    );
    node.start_agent();
    node.wait_programmed("10.96.0.40:80/TCP", &["10.200.0.12:8080"]);
    assert_only(&node.tcp("10.96.0.40:80", 20), "b2", 20);
}

#[test]
fn ipv6_cluster_ip_is_translated() {
    let mut node = Node::new();
    node.backend("fd00:200::11", "v6");
    node.write(
        "v6.yaml",
        &format!(
            "{}---\n{}",
            service(
                "v6",
                &format!("  clusterIP: fd00:96::10\n  ipFamilies: [IPv6]\n{WEB_PORTS}")
            ),
            slice("v6", "IPv6", &[ready("fd00:200::11")])
        ),
    );
    node.start_agent();
    node.wait_programmed("[fd00:96::10]:80/TCP", &["[fd00:200::11]:8080"]);
    let r = node.tcp("[fd00:96::10]:80", 5);
    assert_only(&r, "v6", 5);
    assert_eq!(
        counts(&r, "peers").keys().collect::<Vec<_>>(),
        ["[fd00:96::10]:80"],
        "{r}"
    );
    let r = node.udp("[fd00:96::10]:53", 3);
    assert_eq!(
        counts(&r, "peers").keys().collect::<Vec<_>>(),
        ["[fd00:96::10]:53"],
        "{r}"
    );
}

/// A client's kept-open connection through the web frontend, and the
/// backend that answered its first line.
fn web_session(node: &Node) -> (Proc, String) {
    let mut session = Spawn::new(bin("skiff-probe"))
        .args(["session", "10.96.0.10:80"])
        .netns(&node.ns)
        .cgroup(&node.cg)
        .start();
    let first = session.ask("one");
    assert!(first.starts_with('b'), "session answer: {first}");
    (session, first)
}

#[test]
fn connections_survive_agent_stop_and_restart_without_flush() {
    let mut node = web_node("");
    let before = node.list();

    let (mut session, first) = web_session(&node);
    // Killed without warning: links and maps stay pinned.
    node.kill_agent();
    assert_eq!(
        session.ask("two"),
        first,
        "established connection while the agent is down"
    );
    let r = node.tcp("10.96.0.10:80", 15);
    assert_eq!(
        counts(&r, "errors"),
        BTreeMap::new(),
        "new connections while down: {r}"
    );
    assert_eq!(counts(&r, "answers").len(), 3, "{r}");

    node.start_agent();
    wait_for("the restarted agent to reconcile", TIMEOUT, || {
        node.agent_log().contains("programmed").then_some(())
    });
    let log = node.agent_log();
    assert!(log.contains("adopted maps"), "{log}");
    assert!(!log.contains("another layout"), "no map replaced: {log}");
    assert!(log.contains("frontends=2"), "adopted both frontends: {log}");
    assert!(
        log.contains("changed=0"),
        "nothing rewritten on restart: {log}"
    );
    assert_eq!(node.list(), before);
    assert_eq!(
        session.ask("three"),
        first,
        "established connection after restart"
    );

    // The new agent applies changes as usual.
    node.write(
        "web.yaml",
        &plain_service("web", "10.96.0.10", &[ready(B[0])]),
    );
    node.wait_programmed("10.96.0.10:80/TCP", &["10.200.0.11:8080"]);
    assert_only(&node.tcp("10.96.0.10:80", 10), "b1", 10);
}

/// getpeername shows what the application dialled, whether or not its
/// connect kept a per-socket record: through the backends' origin frontend
/// (no record), through a second service over the same pods (a record),
/// and straight to a pod (a record saying so). A connection through the
/// origin keeps showing it after its backend leaves every service.
#[test]
fn the_peer_name_is_what_was_dialled_with_or_without_a_socket_record() {
    let node = web_node("");
    let all = [ready(B[0]), ready(B[1]), ready(B[2])];
    node.write("alias.yaml", &plain_service("alias", "10.96.0.20", &all));
    let backends = ["10.200.0.11:8080", "10.200.0.12:8080", "10.200.0.13:8080"];
    node.wait_programmed("10.96.0.20:80/TCP", &backends);
    // web came first, so it is each TCP backend's origin; UDP has none.
    assert_eq!(node.map_entries("ORIGINS"), 3);

    assert_spread(&node.tcp("10.96.0.10:80", 30), "10.96.0.10:80");
    assert_spread(&node.tcp("10.96.0.20:80", 30), "10.96.0.20:80");
    let direct = node.tcp("10.200.0.12:8080", 5);
    assert_only(&direct, "b2", 5);
    // A pod dialled by its own address.
    assert_peers(&direct, "10.200.0.12:8080");

    let (mut session, first) = web_session(&node);
    assert_eq!(session.ask("?peer"), "10.96.0.10:80");
    // The session's backend leaves both services.
    let gone = first[1..].parse::<usize>().expect("answer names bN") - 1;
    let rest: Vec<_> = (0..3).filter(|i| *i != gone).map(|i| ready(B[i])).collect();
    node.write("web.yaml", &plain_service("web", "10.96.0.10", &rest));
    node.write("alias.yaml", &plain_service("alias", "10.96.0.20", &rest));
    let left: Vec<&str> = (0..3).filter(|i| *i != gone).map(|i| backends[i]).collect();
    node.wait_programmed("10.96.0.10:80/TCP", &left);
    node.wait_programmed("10.96.0.20:80/TCP", &left);
    assert_eq!(
        session.ask("two"),
        first,
        "the drained connection still works"
    );
    assert_eq!(
        session.ask("?peer"),
        "10.96.0.10:80",
        "its peer name outlives the backend's membership"
    );
    assert_eq!(node.map_entries("ORIGINS"), 3, "the origin is kept");
    let own = format!("{}:8080", B[gone]);
    assert_peers(&node.tcp(&own, 3), &own);
    assert_spread_over(&node.tcp("10.96.0.10:80", 20), "10.96.0.10:80", 2);
}

/// Every request answered, by `n` backends, and the peer the application
/// saw was `peer` each time.
fn assert_spread_over(r: &Value, peer: &str, n: usize) {
    assert_eq!(counts(r, "errors"), BTreeMap::new(), "{r}");
    assert_eq!(counts(r, "answers").len(), n, "{r}");
    assert_peers(r, peer);
}

/// (type, key size, value size, entries, flags) of the map pinned at `path`.
fn pinned_layout(path: &std::path::Path) -> [u32; 5] {
    use skiff_agent::proxy::sys::{object_info, open_pinned};
    let fd = open_pinned(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags
    let info = object_info::<24>(std::os::fd::AsFd::as_fd(&fd)).expect("map info");
    let at = |i: usize| u32::from_ne_bytes([info[i], info[i + 1], info[i + 2], info[i + 3]]);
    [at(0), at(8), at(12), at(16), at(20)]
}

/// Creates a map named `name` with `layout` and pins it at `path`.
fn pin_map(path: &std::path::Path, name: &str, layout: [u32; 5]) {
    use skiff_agent::proxy::sys::{BPF_MAP_CREATE, BPF_OBJ_PIN, bpf_fd, put32, put64, sys_bpf};
    let mut attr = [0u8; 48];
    for (i, v) in layout.iter().enumerate() {
        put32(&mut attr, 4 * i, *v);
    }
    attr[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the attributes hold no pointers.
    let fd = unsafe { bpf_fd(BPF_MAP_CREATE, &mut attr) }.expect("create the map");
    let path_c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut attr = [0u8; 16];
    put64(&mut attr, 0, path_c.as_ptr() as u64);
    put32(&mut attr, 8, std::os::fd::AsRawFd::as_raw_fd(&fd) as u32);
    // SAFETY: `path_c` outlives the call; the command only reads it.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.expect("pin the map");
}

/// An upgrade in place: an agent of another version left `SERVICES` with
/// its value layout (the 16 bytes it had before the inline slots) and
/// links running its programs. The new agent must replace that map and put
/// its own programs into the links: a service added after the upgrade is
/// served (only the new programs read the new map), and an established
/// connection is kept throughout.
#[test]
fn an_upgrade_over_a_map_of_another_layout_replaces_the_map_and_the_programs() {
    let mut node = web_node("");
    let before = node.list();
    let (mut session, first) = web_session(&node);
    node.kill_agent();
    // An agent from before backends had origins left no ORIGINS pin; the
    // CLI still lists what it programmed.
    std::fs::remove_file(node.pins.path.join("maps/ORIGINS")).expect("unpin ORIGINS");
    assert_eq!(node.list(), before, "listed without ORIGINS");
    let services = node.pins.path.join("maps/SERVICES");
    let [kind, key, value, entries, flags] = pinned_layout(&services);
    assert_ne!(value, 16, "this agent's layout is not the old one");
    std::fs::remove_file(&services).expect("unpin SERVICES");
    pin_map(&services, "SERVICES", [kind, key, 16, entries, flags]);

    node.start_agent();
    wait_for("the upgraded agent to program", TIMEOUT, || {
        node.agent_log().contains("programmed").then_some(())
    });
    let log = node.agent_log();
    assert!(log.contains("another layout"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("replaced the program in the pinned link")
                && l.contains("skiff_connect4")),
        "{log}"
    );
    assert_eq!(pinned_layout(&services)[2], value, "SERVICES was replaced");
    assert_eq!(node.list(), before);
    assert_eq!(node.map_entries("ORIGINS"), 3, "origins written anew");
    assert_eq!(session.ask("two"), first, "established connection");
    assert_spread(&node.tcp("10.96.0.10:80", 30), "10.96.0.10:80");

    node.write(
        "api.yaml",
        &plain_service("api", "10.96.0.20", &[ready(B[1])]),
    );
    node.wait_programmed("10.96.0.20:80/TCP", &["10.200.0.12:8080"]);
    assert_only(&node.tcp("10.96.0.20:80", 5), "b2", 5);
}

#[test]
fn malformed_manifests_and_services_are_reported_and_skipped() {
    let mut node = Node::new();
    three_backends(&mut node);
    node.write(
        "good.yaml",
        &plain_service("good", "10.96.0.50", &[ready(B[0])]),
    );
    node.write(
        "badport.yaml",
        &service(
            "badport",
            "  clusterIP: 10.96.0.51\n  ports: [{port: 70000}]",
        ),
    );
    node.write(
        "badip.yaml",
        &service("badip", "  clusterIP: 10.96.0.999\n  ports: [{port: 80}]"),
    );
    node.write(
        "dup.yaml",
        &service(
            "dup",
            "  clusterIP: 10.96.0.52\n  ports: [{name: a, port: 80}, {name: b, port: 80}]",
        ),
    );
    node.write("broken.yaml", "kind: Service\nmetadata: [unclosed\n");
    node.start_agent();
    node.wait_programmed("10.96.0.50:80/TCP", &["10.200.0.11:8080"]);

    let listed = node.list();
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["10.96.0.50:53/UDP", "10.96.0.50:80/TCP"],
        "only the good service is programmed"
    );
    let log = node.agent_log();
    for needle in [
        "default/badport: spec.ports[0].port must be between 1 and 65535, got 70000",
        "default/badip: spec.clusterIP is not a valid IP address: \"10.96.0.999\"",
        "default/dup: duplicate port 80/TCP",
        "broken.yaml",
    ] {
        assert!(log.contains(needle), "log should report {needle:?}:\n{log}");
    }
    assert_only(&node.tcp("10.96.0.50:80", 5), "b1", 5);
    // The invalid ones are not reachable through anything the proxy made.
    let r = node.tcp("10.96.0.52:80", 1);
    assert_eq!(counts(&r, "answers"), BTreeMap::new(), "{r}");
}

#[test]
fn backend_changes_under_load_never_refuse_or_misroute() {
    let node = web_node("");
    let svc = service("web", &format!("  clusterIP: 10.96.0.10\n{WEB_PORTS}"));
    let sets = [
        slice("web", "IPv4", &[ready(B[0]), ready(B[1])]),
        slice("web", "IPv4", &[ready(B[1]), ready(B[2])]),
    ];
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 0..30 {
                node.write("web.yaml", &format!("{svc}---\n{}", sets[i % 2]));
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        let r = node.tcp("10.96.0.10:80", 3000);
        let _ = writer.join();
        assert_eq!(counts(&r, "errors"), BTreeMap::new(), "{r}");
        let answers = counts(&r, "answers");
        assert_eq!(answers.values().sum::<u64>(), 3000, "{r}");
        assert!(
            answers
                .keys()
                .all(|k| ["b1", "b2", "b3"].contains(&k.as_str())),
            "{r}"
        );
    });
}

#[test]
fn cluster_ip_moving_to_another_service_is_programmed_for_it() {
    let mut node = Node::new();
    three_backends(&mut node);
    let spec = |ip: &str| format!("  clusterIP: {ip}\n{WEB_PORTS}");
    node.write(
        "zeta.yaml",
        &format!(
            "{}---\n{}",
            service("zeta", &spec("10.96.0.60")),
            slice("zeta", "IPv4", &[ready(B[0])])
        ),
    );
    node.start_agent();
    node.wait_programmed("10.96.0.60:80/TCP", &["10.200.0.11:8080"]);
    // In one change, zeta moves to .61 and alpha (sorted first) takes .60.
    node.write(
        "zeta.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}",
            service("zeta", &spec("10.96.0.61")),
            slice("zeta", "IPv4", &[ready(B[0])]),
            service("alpha", &spec("10.96.0.60")),
            slice("alpha", "IPv4", &[ready(B[1])])
        ),
    );
    node.wait_programmed("10.96.0.60:80/TCP", &["10.200.0.12:8080"]);
    node.wait_programmed("10.96.0.61:80/TCP", &["10.200.0.11:8080"]);
    assert!(
        !node.agent_log().contains("already used"),
        "{}",
        node.agent_log()
    );
}

/// The whole control loop on one node: kubectl → skiff-control (apiserver,
/// EndpointSlice controller) → the agent's kube-rs watch → the BPF maps →
/// a client's connection to the ClusterIP. The control plane runs in the
/// node's namespace; the pods' containers are the probe servers, reported
/// running at their addresses through `pods/status` as a kubelet would.
#[test]
fn proxy_follows_services_and_pods_through_the_apiserver() {
    use skiff_tests::control::ControlPlane;
    let mut node = Node::new();
    three_backends(&mut node);
    let cp = ControlPlane::start_in(Some(&node.ns), &["--node-monitor-grace-seconds", "3600"]);
    cp.add_node("node-a", "", "4");
    for (i, ip) in B.iter().enumerate() {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: b{n}, labels: {{app: web}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: app\n    image: skiff-probe\n    ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]\n",
            n = i + 1
        );
        cp.apply(&pod).unwrap_or_else(|e| panic!("{e}"));
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
        );
        cp.kubectl_ok(&[
            "patch",
            "pod",
            &format!("b{}", i + 1),
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ]);
    }
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, protocol: UDP, targetPort: dns}\n";
    cp.apply(svc).unwrap_or_else(|e| panic!("{e}"));
    node.start_agent_kube(&cp.kubeconfig);
    node.wait_programmed(
        "10.96.0.20:80/TCP",
        &["10.200.0.11:8080", "10.200.0.12:8080", "10.200.0.13:8080"],
    );
    node.wait_programmed(
        "10.96.0.20:53/UDP",
        &["10.200.0.11:5353", "10.200.0.12:5353", "10.200.0.13:5353"],
    );
    let r = node.tcp("10.96.0.20:80", 60);
    assert_eq!(
        counts(&r, "errors"),
        BTreeMap::new(),
        "{r}\n{}",
        node.agent_log()
    );
    assert_eq!(
        counts(&r, "answers").keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{r}"
    );

    // b2 turns unready, b3 is deleted (terminating while its grace runs).
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "b2",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    ]);
    cp.kubectl_ok(&["delete", "pod", "b3", "--wait=false"]);
    node.wait_programmed("10.96.0.20:80/TCP", &["10.200.0.11:8080"]);
    assert_only(&node.tcp("10.96.0.20:80", 20), "b1", 20);

    // The service goes: so does its frontend.
    cp.kubectl_ok(&["delete", "service", "web"]);
    wait_for("the frontend to be removed", TIMEOUT, || {
        (!node.try_list().ok()?.contains_key("10.96.0.20:80/TCP")).then_some(())
    });
}

#[test]
fn a_dual_stack_service_from_the_apiserver_is_served_on_both_families() {
    use skiff_tests::control::ControlPlane;
    let mut node = Node::new();
    // One pod with an address of each family.
    node.backend(B[0], "b1");
    node.backend("fd00:200::11", "b1");
    let cp = ControlPlane::start_in(
        Some(&node.ns),
        &[
            "--node-monitor-grace-seconds",
            "3600",
            "--service-cidr",
            "10.96.0.0/12,fd00:96::/108",
        ],
    );
    cp.add_node("node-a", "", "4");
    cp.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: b1, labels: {app: web}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: app\n    image: skiff-probe\n")
        .unwrap_or_else(|e| panic!("{e}"));
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "b1",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"status":{{"phase":"Running","podIP":"{}","podIPs":[{{"ip":"{}"}},{{"ip":"fd00:200::11"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
            B[0], B[0]
        ),
    ]);
    cp.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ipFamilyPolicy: RequireDualStack\n  clusterIPs: [\"10.96.0.20\", \"fd00:96::10\"]\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    // A slice per family, as the controller makes them.
    let families = wait_for("two EndpointSlices", TIMEOUT, || {
        let out = cp.jsonpath(
            &["endpointslices", "-l", "kubernetes.io/service-name=web"],
            "{range .items[*]}{.addressType}={.endpoints[*].addresses[*]} {end}",
        );
        (out.split_whitespace().count() == 2).then_some(out)
    });
    assert!(
        families.contains("IPv4=10.200.0.11") && families.contains("IPv6=fd00:200::11"),
        "{families}"
    );
    node.start_agent_kube(&cp.kubeconfig);
    node.wait_programmed("10.96.0.20:80/TCP", &["10.200.0.11:8080"]);
    node.wait_programmed("[fd00:96::10]:80/TCP", &["[fd00:200::11]:8080"]);
    for (vip, n) in [("10.96.0.20:80", 5), ("[fd00:96::10]:80", 5)] {
        let r = node.tcp(vip, n);
        assert_only(&r, "b1", u64::from(n));
        assert_eq!(counts(&r, "peers").keys().collect::<Vec<_>>(), [vip], "{r}");
    }
}

fn frontend_key(i: u32) -> ServiceKey {
    ServiceKey {
        addr: [(0x0a60_0000 | i).to_be(), 0, 0, 0],
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    }
}

/// Entries of the pinned map `map` under `pins`.
fn entries(pins: &PinDir, map: &str) -> u64 {
    skiff_agent::proxy::dataplane::map_fill(&pins.path)
        .unwrap_or_else(|e| panic!("map fill: {e}"))
        .into_iter()
        .find(|m| m.name == map)
        .map_or_else(|| panic!("no map {map}"), |m| m.entries)
}

/// A new frontend whose write fails (here `SERVICES` is full) leaves no
/// backend entries or slots behind, however often it is retried, and
/// once there is room it is written whole, with no more than its own.
#[test]
fn a_frontend_that_cannot_be_written_leaves_nothing_behind() {
    let (pins, cg) = (PinDir::new(), Cgroup::new());
    let mut dp = Dataplane::install(&pins.path, &cg.path).unwrap_or_else(|e| panic!("{e}"));
    // Frontends without backends fill SERVICES and nothing else.
    for i in 1..=MAX_SERVICES {
        let filler = Frontend {
            key: frontend_key(i),
            affinity_timeout: 0,
            backends: Vec::new(),
        };
        dp.upsert(&filler)
            .unwrap_or_else(|e| panic!("filling SERVICES: {e}"));
    }
    let backend = |i: u32| Backend {
        addr: [(0x0ac8_0000 | i).to_be(), 0, 0, 0],
        port: 8080u16.to_be(),
        family: FAMILY_V4,
        pad: 0,
    };
    let f = Frontend {
        key: frontend_key(0),
        affinity_timeout: 0,
        backends: vec![backend(1), backend(2), backend(3)],
    };
    for _ in 0..2 {
        assert!(dp.upsert(&f).is_err(), "SERVICES is full");
        assert_eq!(entries(&pins, names::BACKENDS), 0);
        assert_eq!(entries(&pins, names::SLOTS), 0);
    }
    assert!(
        dp.remove(&frontend_key(1))
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(dp.upsert(&f).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(entries(&pins, names::BACKENDS), 3);
    assert_eq!(entries(&pins, names::SLOTS), 3);
}

/// The TC path's counterpart: an external set that cannot be written (its
/// backend ids do not fit, or one of its frontends does not) leaves no
/// backend id, member or table of the attempt behind, and its ids are
/// counted once, so that removing the Service empties the maps again.
#[test]
fn an_external_set_that_cannot_be_written_leaves_nothing_behind() {
    let pins = PinDir::new();
    let cfg = ExternalConfig {
        interfaces: Vec::new(),
        pod_interfaces: Vec::new(),
        maglev_size: 7,
    };
    // No interface: the maps alone.
    let mut ext = External::install(&pins.path, cfg, &Interfaces::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let pinned = |name: &str| {
        aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(pins.path.join("maps").join(name))
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        )
    };
    let ext_backend = |i: u32| ExtBackend {
        addr: [(0x0ac8_0000 | i).to_be(), 0, 0, 0],
        port: 8080u16.to_be(),
        family: FAMILY_V4,
        flags: 0,
    };
    // Fillers, under ids the agent does not hand out this run.
    let mut backends: aya::maps::HashMap<_, u32, ExtBackend> =
        aya::maps::HashMap::try_from(pinned(names::EXT_BACKENDS)).unwrap_or_else(|e| panic!("{e}"));
    let filler_backends = MAX_EXT_BACKENDS - 2;
    for i in 0..filler_backends {
        backends
            .insert(0x8000_0000 | i, ext_backend(0x10000 | i), 0)
            .unwrap_or_else(|e| panic!("filling EXT_BACKENDS: {e}"));
    }
    let set = |frontends: &[u32], members: &[u32]| ExternalSet {
        name: "default/web:80/TCP/4".to_string(),
        frontends: frontends.iter().map(|i| frontend_key(*i)).collect(),
        backends: members.iter().map(|i| ext_backend(*i)).collect(),
        flags: 0,
        affinity_timeout: 0,
    };
    let first = set(&[1, 2], &[1, 2, 3]);
    let service = "default/web";
    let quiet = || {
        (
            entries(&pins, names::EXT_BACKENDS),
            entries(&pins, names::EXT_MEMBERS),
            entries(&pins, names::MAGLEV),
            entries(&pins, names::EXTERNAL),
        )
    };
    // Room for two of its three ids: refused, and each retry too.
    for _ in 0..2 {
        let r = ext.sync_service(service, std::slice::from_ref(&first));
        assert!(r.is_err(), "EXT_BACKENDS has room for 2 of 3");
        assert_eq!(quiet(), (u64::from(filler_backends), 0, 0, 0));
    }
    for i in 0..8 {
        backends
            .remove(&(0x8000_0000 | i))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let filler_backends = filler_backends - 8;
    assert_eq!(
        ext.sync_service(service, std::slice::from_ref(&first))
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    assert_eq!(quiet(), (u64::from(filler_backends) + 3, 3, 1, 2));

    // EXTERNAL full: the changed set's new frontend cannot go in.
    let mut frontends: aya::maps::HashMap<_, ServiceKey, ExternalValue> =
        aya::maps::HashMap::try_from(pinned(names::EXTERNAL)).unwrap_or_else(|e| panic!("{e}"));
    let filler_frontends = MAX_EXTERNAL - 2;
    let none = ExternalValue {
        table: 0,
        size: 0,
        flags: 0,
        affinity_timeout: 0,
    };
    for i in 0..filler_frontends {
        frontends
            .insert(frontend_key(0x10000 + i), none, 0)
            .unwrap_or_else(|e| panic!("filling EXTERNAL: {e}"));
    }
    let second = set(&[1, 2, 3], &[2, 3, 4]);
    for _ in 0..2 {
        let r = ext.sync_service(service, std::slice::from_ref(&second));
        assert!(r.is_err(), "EXTERNAL has no room for the third frontend");
        // The new backend set is live (two frontends serve it); backend 1
        // left.
        assert_eq!(
            quiet(),
            (
                u64::from(filler_backends) + 3,
                3,
                1,
                u64::from(MAX_EXTERNAL)
            )
        );
    }
    frontends
        .remove(&frontend_key(0x10000))
        .unwrap_or_else(|e| panic!("{e}"));
    let filler_frontends = filler_frontends - 1;
    assert_eq!(
        ext.sync_service(service, std::slice::from_ref(&second))
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    assert_eq!(
        quiet(),
        (
            u64::from(filler_backends) + 3,
            3,
            1,
            u64::from(filler_frontends) + 3
        )
    );
    // The Service goes: every id, member, table and frontend of it goes.
    assert_eq!(
        ext.sync_service(service, &[])
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
    assert_eq!(
        quiet(),
        (
            u64::from(filler_backends),
            0,
            0,
            u64::from(filler_frontends)
        )
    );
}
