//! The overlay across three nodes (namespaces on one underlay bridge) with
//! a real etcd: pods wired by skiff-cni reach each other by pod IP over
//! vxlan and host-gw, leases survive restarts, and a lease that goes away
//! takes its routes with it on every node.

use std::time::Duration;

use serde_json::Value;
use skiff_tests::cni::result_ip;
use skiff_tests::node::sample;
use skiff_tests::overlay::{Cluster, Node, Pod, UNDERLAY_GW};
use skiff_tests::{Proc, Spawn, bin, wait_for};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.245.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#;
const DUAL: &str = r#"{"Network":"10.246.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:246::/56","Backend":{"Type":"vxlan"}}"#;
const DUAL_HOST_GW: &str = r#"{"Network":"10.246.0.0/16","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:10:246::/56","Backend":{"Type":"host-gw"}}"#;

/// TCP and UDP servers in the pod, on its pod IP, answering with the
/// client's address as they see it.
fn serve(pod: &Pod) -> Vec<Proc> {
    ["serve-tcp", "serve-udp"]
        .iter()
        .map(|kind| {
            let mut p = Spawn::new(bin("skiff-probe"))
                .args([kind.to_string(), format!("{}:7000", pod.ip), "%peer".into()])
                .netns(&pod.ns)
                .start();
            assert_eq!(p.ask(""), "ready", "{kind} in {}", pod.ip);
            p
        })
        .collect()
}

/// From `from`, `count` TCP connections and UDP exchanges to `to_ip`;
/// returns the source addresses the server saw.
fn exchange(from: &Pod, to_ip: &str, count: u32) -> Vec<String> {
    let mut seen = Vec::new();
    for kind in ["tcp", "udp"] {
        let out = Spawn::new(bin("skiff-probe"))
            .args([kind, &format!("{to_ip}:7000"), &count.to_string()])
            .netns(&from.ns)
            .output();
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let answers = v["answers"].as_object().cloned().unwrap_or_default();
        let total: u64 = answers.values().filter_map(Value::as_u64).sum();
        assert_eq!(total, count as u64, "{kind} {} → {to_ip}: {out}", from.ip);
        seen.extend(answers.keys().cloned());
    }
    seen
}

fn assert_full_mesh(c: &Cluster, pods: &[Pod]) {
    let _servers: Vec<Proc> = pods.iter().flat_map(serve).collect();
    for (i, a) in pods.iter().enumerate() {
        for (j, b) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            let seen = exchange(a, &b.ip, 5);
            // No NAT between pods: the server sees the client pod's IP.
            assert!(
                seen.iter().all(|s| s == &a.ip),
                "node{i} → node{j}: server saw {seen:?}, not {}\n{}",
                a.ip,
                c.nodes[i].routes()
            );
        }
    }
}

fn has_route(n: &Node, subnet: &str) -> bool {
    n.routes().lines().any(|l| l.starts_with(subnet))
}

/// Waits until every node routes to every other node's subnet: a node that
/// started first learns of later ones through its watch.
fn converge(c: &Cluster, subnets: &[String]) {
    for (i, n) in c.nodes.iter().enumerate() {
        wait_for(
            &format!("node {i} to route to every other subnet"),
            Duration::from_secs(10),
            || {
                subnets
                    .iter()
                    .enumerate()
                    .all(|(j, s)| i == j || has_route(n, s))
                    .then_some(())
            },
        );
    }
}

/// Two nodes of `network` whose agents run with `extra`, routing to each
/// other, and a pod on each.
fn two_nodes_with_pods(network: &str, extra: &[&str]) -> (Cluster, Vec<Pod>) {
    let mut c = Cluster::new(2, network);
    c.start_all(extra);
    let subnets = distinct_subnets(&c);
    converge(&c, &subnets);
    let pods = c.nodes.iter().map(Node::add_pod).collect();
    (c, pods)
}

fn distinct_subnets(c: &Cluster) -> Vec<String> {
    let subnets: Vec<String> = c.nodes.iter().map(Node::subnet).collect();
    let mut d = subnets.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), c.nodes.len(), "subnets {subnets:?}");
    subnets
}

/// Starts nodes 0 and 1 with the fast path (the default, plus
/// `fast_extra`) and node 2 without, as a Flannel node would run; waits
/// until all are ready.
fn start_mixed(c: &mut Cluster, fast_extra: &[&str]) {
    for (i, n) in c.nodes.iter_mut().enumerate() {
        let extra: &[&str] = if i == 2 {
            &["--fast-path", "false"]
        } else {
            fast_extra
        };
        n.start_agent(extra);
    }
    for n in &c.nodes {
        n.wait_ready();
    }
}

/// Over a full mesh of a mixed cluster: the kernel-only node 2 counted its
/// share (5 TCP connections and 5 UDP exchanges each way with each peer)
/// while the fast path nodes' counters stayed still (a stray packet of the
/// node's own is allowed for).
fn assert_kernel_node_alone(through: &[u64], what: &str) {
    assert!(
        through[2] >= 40 && through[0] <= 2 && through[1] <= 2,
        "{what} during the exchanges, per node: {through:?}"
    );
}

/// How much `counter` moved on each node while `f` ran.
fn counted(c: &Cluster, counter: fn(&Node) -> u64, f: impl FnOnce()) -> Vec<u64> {
    let before: Vec<u64> = c.nodes.iter().map(counter).collect();
    f();
    c.nodes
        .iter()
        .zip(before)
        .map(|(n, b)| counter(n) - b)
        .collect()
}

/// Packets the node's VTEP (the kernel's VXLAN device) sent and received.
fn vtep_packets(n: &Node) -> u64 {
    ["tx_packets", "rx_packets"]
        .iter()
        .map(|f| {
            let text =
                n.ns.exec(&["cat", &format!("/sys/class/net/flannel.1/statistics/{f}")]);
            text.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{f} {text:?}: {e}"))
        })
        .sum()
}

/// Nodes 0 and 1 run the fast path (the default), node 2 only the kernel's
/// VTEP, as a Flannel node would: every pair talks, in both directions,
/// and the fast path nodes' VTEPs carry none of it.
#[test]
fn pods_on_three_nodes_exchange_tcp_and_udp_over_vxlan() {
    let mut c = Cluster::new(3, VXLAN);
    // Node 1 holds its underlay address as a /32, with a route to the rest
    // of the segment: its peers are in no subnet of its own, but the
    // kernel reaches them directly out of eth0, and so does its fast path.
    let ip1 = skiff_tests::overlay::node_ip(1);
    let ns1 = &c.nodes[1].ns;
    ns1.ip(&["addr", "del", &format!("{ip1}/24"), "dev", "eth0"]);
    ns1.ip(&["addr", "add", &format!("{ip1}/32"), "dev", "eth0"]);
    ns1.ip(&["route", "add", "172.31.0.0/24", "dev", "eth0"]);
    // A resync each second: node 1 is given its subnet below.
    start_mixed(&mut c, &["--resync-seconds", "1"]);
    let subnets = distinct_subnets(&c);
    assert_eq!(c.lease_keys().len(), 3, "{:?}", c.lease_keys());
    converge(&c, &subnets);
    for (i, n) in c.nodes.iter().enumerate() {
        let env = std::fs::read_to_string(&n.subnet_file).unwrap_or_default();
        assert!(env.contains("FLANNEL_NETWORK=10.244.0.0/16"), "{env}");
        // veth underlay MTU 1500 − 50 bytes of VXLAN.
        assert!(env.contains("FLANNEL_MTU=1450"), "{env}");
        let vtep = n.ns.exec(&["ip", "-d", "link", "show", "flannel.1"]);
        assert!(
            vtep.contains("mtu 1450")
                && vtep.contains("vxlan id 1")
                && vtep.contains("dstport 8472")
                && vtep.contains("nolearning"),
            "{vtep}"
        );
        let routes = n.routes();
        for (j, s) in subnets.iter().enumerate() {
            if i != j {
                let gw = s.trim_end_matches("/24");
                assert!(
                    routes.contains(&format!("{s} via {gw} dev flannel.1")),
                    "node{i} lacks {s}:\n{routes}"
                );
            }
        }
        let entries = n.vtep_entries();
        for j in 0..3 {
            if i != j {
                assert!(
                    entries.contains(&format!("dst {}", skiff_tests::overlay::node_ip(j))),
                    "node{i} fdb:\n{entries}"
                );
            }
        }
        // The agent's metrics count the two peers routed and the list
        // that reconciled them.
        let m = wait_for("the routes counted", Duration::from_secs(15), || {
            let m = Spawn::new("curl")
                .args(["-sf", "http://127.0.0.1:10249/metrics"])
                .netns(&n.ns)
                .try_output()
                .ok()?;
            (sample(&m, "skiff_overlay_routes", &[]) == Some(2.0)).then_some(m)
        });
        assert!(
            sample(&m, "skiff_overlay_reconcile_duration_seconds_count", &[])
                .is_some_and(|v| v >= 1.0),
            "node{i}:\n{m}"
        );
    }
    let pods: Vec<Pod> = c.nodes.iter().map(Node::add_pod).collect();
    let mtu = pods[0].ns.exec(&["ip", "link", "show", "eth0"]);
    assert!(
        mtu.contains("mtu 1450"),
        "pod MTU must fit the tunnel: {mtu}"
    );
    // The fast path takes the bridge once the first pod made it.
    for n in &c.nodes[..2] {
        fast_path_on_bridge(n);
    }
    let through = counted(&c, vtep_packets, || assert_full_mesh(&c, &pods));
    assert_kernel_node_alone(&through, "VTEP packets");

    // Node 0 is given a more specific route to node 2's underlay address,
    // through node 1: its agent notices at a resync, and from then on its
    // fast path sends node 2's wrapped packets to node 1 (which forwards
    // them) instead of straight to node 2, as the kernel's VTEP would. The
    // mesh still holds with the fast path nodes' VTEPs still.
    let ip2 = skiff_tests::overlay::node_ip(2);
    c.nodes[0].ns.ip(&[
        "route",
        "add",
        &format!("{ip2}/32"),
        "via",
        &ip1,
        "dev",
        "eth0",
    ]);
    wait_for(
        "node 0's agent to follow its new route to node 2",
        Duration::from_secs(15),
        || {
            c.nodes[0]
                .agent_log()
                .lines()
                .any(|l| l.contains("vxlan peer routes changed") && l.contains("gateway=1"))
                .then_some(())
        },
    );
    // Node 1's ways, looked up at each resync (each second), did not
    // change (a first lookup may have found its peers there already).
    let log1 = c.nodes[1].agent_log();
    assert!(
        log1.matches("vxlan peer routes changed").count() <= 1,
        "{log1}"
    );
    let forwarded_before = forwarded(&c.nodes[1]);
    let through = counted(&c, vtep_packets, || assert_full_mesh(&c, &pods));
    assert_kernel_node_alone(&through, "VTEP packets after node 0's new route");
    // Node 0 → node 2 is 5 TCP connections (at least 3 packets each) and
    // 5 UDP datagrams, each way of the mesh's pod pairs.
    let detoured = forwarded(&c.nodes[1]) - forwarded_before;
    assert!(
        detoured >= 20,
        "node 1 forwarded {detoured} datagrams of node 0's to node 2"
    );
}

/// A dual-stack network: each node's IPv6 subnet is the one paired with its
/// IPv4 lease, peers route it through the same VTEP, and pods on two nodes
/// talk over IPv6 (TCP and UDP, both ways, no NAT) at once as well as IPv4.
#[test]
fn dual_stack_pods_on_two_nodes_talk_over_ipv6_through_the_vtep() {
    dual_stack_pods_talk(DUAL, |other| format!("via {other} dev flannel.1"));
}

/// host-gw, dual stack on an underlay with no IPv6 addresses but its
/// links' own: the peer's IPv6 subnet is routed to the peer's link-local
/// address on the underlay, which it publishes as its PublicIPv6.
#[test]
fn dual_stack_pods_on_two_nodes_talk_over_ipv6_by_host_gw_through_link_local_next_hops() {
    dual_stack_pods_talk(DUAL_HOST_GW, |_| "via fe80::".to_string());
}

/// Two nodes of `network` (dual stack, `Network` 10.246.0.0/16 and
/// `IPv6Network` fd00:10:246::/56); `route(peer subnet's address)` is what
/// the route to the peer's IPv6 subnet must say after its destination.
fn dual_stack_pods_talk(network: &str, route: fn(&str) -> String) {
    let mut c = Cluster::new(2, network);
    c.start_all(&[]);
    let subnets = distinct_subnets(&c);
    converge(&c, &subnets);
    // 10.246.X.0/24 pairs with fd00:10:246:X::/64 (X in hex).
    let six: Vec<String> = subnets
        .iter()
        .map(|s| {
            let x: u32 = s
                .split('.')
                .nth(2)
                .and_then(|o| o.parse().ok())
                .unwrap_or(0);
            format!("fd00:10:246:{x:x}::")
        })
        .collect();
    for (i, n) in c.nodes.iter().enumerate() {
        let env = std::fs::read_to_string(&n.subnet_file).unwrap_or_default();
        assert!(
            env.contains("FLANNEL_IPV6_NETWORK=fd00:10:246::/56")
                && env.contains(&format!("FLANNEL_IPV6_SUBNET={}1/64", six[i])),
            "node{i}: {env}"
        );
        let other = six[1 - i].clone();
        let want = format!("{other}/64 {}", route(&other));
        wait_for("the peer's IPv6 route", Duration::from_secs(10), || {
            let routes = n.ns.exec(&["ip", "-6", "route"]);
            routes.contains(&want).then_some(())
        });
        if network.contains("vxlan") {
            let neigh =
                n.ns.exec(&["ip", "-6", "neigh", "show", "dev", "flannel.1"]);
            assert!(
                neigh.contains(&format!("{other} lladdr")),
                "node{i}: {neigh}"
            );
        }
    }
    let pods: Vec<Pod> = c.nodes.iter().map(Node::add_pod).collect();
    let v6: Vec<String> = pods.iter().map(|p| result_ip(&p.result, true)).collect();
    for (p, prefix) in v6.iter().zip(&six) {
        assert!(p.starts_with(prefix.as_str()), "{p} not in {prefix}/64");
    }
    let _servers: Vec<Proc> = pods
        .iter()
        .zip(&v6)
        .flat_map(|(pod, ip)| {
            ["serve-tcp", "serve-udp"].map(|kind| {
                let mut p = Spawn::new(bin("skiff-probe"))
                    .args([kind.to_string(), format!("[{ip}]:7000"), "%peer".into()])
                    .netns(&pod.ns)
                    .start();
                assert_eq!(p.ask(""), "ready", "{kind} on {ip}");
                p
            })
        })
        .collect();
    let exchange = || {
        for (from, to) in [(0, 1), (1, 0)] {
            for kind in ["tcp", "udp"] {
                let out = Spawn::new(bin("skiff-probe"))
                    .args([kind, &format!("[{}]:7000", v6[to]), "5"])
                    .netns(&pods[from].ns)
                    .output();
                let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
                assert_eq!(
                    v["answers"][&v6[from]], 5,
                    "{kind} node{from} → node{to} over IPv6, the source kept: {out}"
                );
            }
        }
    };
    // At once: the first exchanges of new pods on a new bridge included.
    exchange();
    assert_full_mesh(&c, &pods);
    // A datagram bigger than the pods' MTU, both ways and in both
    // families: its fragments cross nodes whose fast path holds the
    // bridge and the underlay. (These nodes do not gather fragments at the
    // bridge; the external tests' nodes do, and check what wrapping does
    // with such a datagram.)
    let _v4_servers: Vec<Proc> = pods.iter().flat_map(serve).collect();
    for (from, to) in [(0, 1), (1, 0)] {
        for target in [
            format!("{}:7000", pods[to].ip),
            format!("[{}]:7000", v6[to]),
        ] {
            let out = Spawn::new(bin("skiff-probe"))
                .args(["udp-size", &target, "4000", "0", "1"])
                .netns(&pods[from].ns)
                .output();
            let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert!(
                v["answered"] == true
                    && v["sent_len"].as_u64() > Some(2 * 1500)
                    && v["answer_len"] == v["sent_len"],
                "a 4000-byte datagram node{from} → node{to} ({target}) and its answer: {out}"
            );
        }
    }
    // Once the fast path holds the bridge, IPv6 takes it as IPv4 does:
    // the kernel's VTEP (vxlan) or forwarding (host-gw) carries none of it.
    for n in &c.nodes {
        fast_path_on_bridge(n);
    }
    let (counter, what): (fn(&Node) -> u64, &str) = if network.contains("vxlan") {
        (vtep_packets, "VTEP packets")
    } else {
        (forwarded6, "IPv6 datagrams the kernel forwarded")
    };
    let through = counted(&c, counter, exchange);
    assert!(
        through.iter().all(|n| *n <= 2),
        "{what} during the IPv6 exchanges, per node: {through:?}"
    );
}

/// IPv6 datagrams the node's kernel forwarded.
fn forwarded6(n: &Node) -> u64 {
    let snmp = n.ns.exec(&["cat", "/proc/net/snmp6"]);
    snmp.lines()
        .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Ip6OutForwDatagrams in {snmp}"))
}

/// Waits until node `n`'s agent (its latest start) has put the fast path
/// on the bridge.
fn fast_path_on_bridge(n: &Node) {
    wait_for(
        "the fast path on the bridge",
        Duration::from_secs(5),
        || {
            n.agent_log()
                .contains("overlay fast path on the bridge")
                .then_some(())
        },
    );
}

/// Datagrams the pod's IP stack received marked CE: IPv4, IPv6.
fn ce_received(pod: &Pod) -> (u64, u64) {
    let netstat = pod.ns.exec(&["cat", "/proc/net/netstat"]);
    let mut ipext = netstat.lines().filter(|l| l.starts_with("IpExt:"));
    let (names, values) = (ipext.next(), ipext.next());
    let v4 = names
        .zip(values)
        .and_then(|(n, v)| {
            n.split_whitespace()
                .zip(v.split_whitespace())
                .find(|(n, _)| *n == "InCEPkts")
                .and_then(|(_, v)| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no IpExt InCEPkts in {netstat}"));
    let snmp6 = pod.ns.exec(&["cat", "/proc/net/snmp6"]);
    let v6 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Ip6InCEPkts"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Ip6InCEPkts in {snmp6}"));
    (v4, v6)
}

/// A router on the underlay marks the tunnel's ECN-capable packets CE
/// (congestion experienced), as an AQM queue does instead of dropping: the
/// fast path unwraps them into the pod with the mark carried to the inner
/// header (RFC 6040), for IPv4 and IPv6 inside, as the kernel's VTEP does,
/// and the VTEP carries none of it. Without the mark the pod's flows would
/// only learn of the congestion from losses.
#[test]
fn a_congestion_mark_on_the_underlay_reaches_the_pod_through_the_fast_path() {
    let (c, pods) = two_nodes_with_pods(DUAL, &[]);
    let (from, to) = (&pods[0], &pods[1]);
    let targets = [
        format!("{}:7000", to.ip),
        format!("[{}]:7000", result_ip(&to.result, true)),
    ];
    let _servers: Vec<Proc> = targets
        .iter()
        .map(|t| {
            let mut p = Spawn::new(bin("skiff-probe"))
                .args(["serve-udp", t, "%peer"])
                .netns(&to.ns)
                .start();
            assert_eq!(p.ask(""), "ready", "serve-udp on {t}");
            p
        })
        .collect();
    // `count` datagrams of TOS / traffic class `tos` to each target; how
    // many of each were answered.
    let send = |tos: u8, count: u32| -> Vec<u64> {
        targets
            .iter()
            .map(|t| {
                let out = Spawn::new(bin("skiff-probe"))
                    .args(["udp", t, &count.to_string(), &tos.to_string()])
                    .netns(&from.ns)
                    .output();
                let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
                v["answers"][&from.ip]
                    .as_u64()
                    .or_else(|| v["answers"][result_ip(&from.result, true)].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    };
    // Both families get through (the IPv6 route may come a moment after
    // the IPv4 one), and the fast path holds both bridges.
    wait_for(
        "both families to reach the pod",
        Duration::from_secs(10),
        || (send(0, 1) == [1, 1]).then_some(()),
    );
    for n in &c.nodes {
        fast_path_on_bridge(n);
    }
    let mut marker = Spawn::new(bin("skiff-probe"))
        .args(["mark-ce", "u1"])
        .netns(&c.underlay)
        .start();
    assert_eq!(marker.ask(""), "ready", "the marker on u1");
    let before = ce_received(to);
    // ECT(0): ECN-capable, as a TCP with ECN sends its data.
    let mut answered = Vec::new();
    let through = counted(&c, vtep_packets, || answered = send(2, 20));
    let after = ce_received(to);
    assert_eq!(answered, [20, 20], "ECN-capable datagrams, IPv4 and IPv6");
    assert!(
        after.0 - before.0 >= 20 && after.1 - before.1 >= 20,
        "CE-marked datagrams the pod received (IPv4, IPv6): {before:?} before, {after:?} after"
    );
    assert!(
        through.iter().all(|n| *n <= 2),
        "VTEP packets during the exchanges, per node: {through:?}"
    );
}

/// The fast path lives with the agent: killed, the kernel's VTEP carries
/// the pods' traffic on; restarted, the agent takes it back.
#[test]
fn the_kernel_vtep_carries_on_while_the_agent_is_down_and_the_fast_path_comes_back() {
    let (mut c, pods) = two_nodes_with_pods(VXLAN, &[]);
    let _servers: Vec<Proc> = pods.iter().flat_map(serve).collect();
    for n in &c.nodes {
        fast_path_on_bridge(n);
    }
    // Both ways; returns (node 0's VTEP packets, node 1's) meanwhile.
    let both_ways = |c: &Cluster| {
        let n = counted(c, vtep_packets, || {
            exchange(&pods[0], &pods[1].ip, 5);
            exchange(&pods[1], &pods[0].ip, 5);
        });
        (n[0], n[1])
    };
    let (n0, n1) = both_ways(&c);
    assert!(
        n0 <= 2 && n1 <= 2,
        "fast path on both: VTEP packets {n0}, {n1}"
    );

    c.nodes[0].kill_agent();
    let (n0, n1) = both_ways(&c);
    assert!(
        n0 >= 20 && n1 <= 2,
        "agent 0 dead: its VTEP carries its side ({n0}), node 1's fast path the other ({n1})"
    );

    c.nodes[0].start_agent(&[]);
    c.nodes[0].wait_ready();
    fast_path_on_bridge(&c.nodes[0]);
    let (n0, n1) = both_ways(&c);
    assert!(n0 <= 2 && n1 <= 2, "agent 0 back: VTEP packets {n0}, {n1}");
}

#[test]
fn pods_on_three_nodes_exchange_tcp_and_udp_over_host_gw() {
    let mut c = Cluster::new(3, HOST_GW);
    start_mixed(&mut c, &[]);
    let subnets = distinct_subnets(&c);
    converge(&c, &subnets);
    for (i, n) in c.nodes.iter().enumerate() {
        let env = std::fs::read_to_string(&n.subnet_file).unwrap_or_default();
        assert!(env.contains("FLANNEL_MTU=1500"), "{env}");
        let routes = n.routes();
        for (j, s) in subnets.iter().enumerate() {
            if i != j {
                let via = format!("{s} via {} dev eth0", skiff_tests::overlay::node_ip(j));
                assert!(routes.contains(&via), "node{i} lacks `{via}`:\n{routes}");
            }
        }
        assert!(
            !n.ns.exec(&["ip", "link"]).contains("flannel.1"),
            "host-gw makes no VTEP"
        );
    }
    let pods: Vec<Pod> = c.nodes.iter().map(Node::add_pod).collect();
    for n in &c.nodes[..2] {
        fast_path_on_bridge(n);
    }
    let through = counted(&c, forwarded, || assert_full_mesh(&c, &pods));
    // The fast path nodes' pods were reached, and reached out, without
    // the node's IP forwarding.
    assert_kernel_node_alone(&through, "datagrams the IP stack forwarded");
}

/// Datagrams the node's IP stack has forwarded (`Ip: ForwDatagrams`).
fn forwarded(n: &Node) -> u64 {
    let snmp = n.ns.exec(&["cat", "/proc/net/snmp"]);
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "ForwDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no ForwDatagrams in {snmp}"))
}

#[test]
fn a_restarted_node_keeps_its_subnet_and_drops_routes_it_missed() {
    let mut c = Cluster::new(3, VXLAN);
    c.start_all(&[]);
    let subnets = distinct_subnets(&c);
    converge(&c, &subnets);
    let pods: Vec<Pod> = c.nodes.iter().take(2).map(Node::add_pod).collect();

    // Node 0 goes down; while it is down node 2 leaves the cluster.
    c.nodes[0].stop_agent();
    c.nodes[2].stop_agent();
    let out = Spawn::new(bin("skiff-agent"))
        .args(["overlay", "leave"])
        .args(
            c.etcd
                .client_args(skiff_tests::control::EtcdClient::Overlay),
        )
        .args(["--iface", "eth0", "--subnet-file"])
        .args([&c.nodes[2].subnet_file])
        .netns(&c.nodes[2].ns)
        .output();
    assert!(out.contains(&format!("released {}", subnets[2])), "{out}");
    assert!(
        !c.nodes[2].ns.exec(&["ip", "link"]).contains("flannel.1"),
        "leave removes the VTEP"
    );
    wait_for(
        "node 1 to drop the departed node's route",
        Duration::from_secs(10),
        || (!has_route(&c.nodes[1], &subnets[2])).then_some(()),
    );
    // Node 0 missed that: it still routes to the departed node.
    assert!(has_route(&c.nodes[0], &subnets[2]));
    // Traffic between the remaining pods does not depend on node 0's agent.
    let _s = serve(&pods[1]);
    exchange(&pods[0], &pods[1].ip, 3);

    c.nodes[0].start_agent(&[]);
    assert_eq!(
        c.nodes[0].wait_ready(),
        subnets[0],
        "a restart keeps the subnet"
    );
    let log = c.nodes[0].agent_log();
    assert!(log.contains("reused=true"), "{log}");
    assert!(
        !has_route(&c.nodes[0], &subnets[2]),
        "stale route survived the restart:\n{}",
        c.nodes[0].routes()
    );
    assert!(
        !c.nodes[0].vtep_entries().contains("172.31.0.3"),
        "{}\n{}",
        c.nodes[0].vtep_entries(),
        c.nodes[0].agent_log()
    );
    assert!(has_route(&c.nodes[0], &subnets[1]));
    exchange(&pods[0], &pods[1].ip, 3);
    assert_eq!(c.lease_keys().len(), 2);
}

#[test]
fn a_deleted_or_expired_lease_disappears_from_every_node() {
    let mut c = Cluster::new(3, VXLAN);
    c.start_all(&["--lease-ttl", "4"]);
    let subnets = distinct_subnets(&c);
    converge(&c, &subnets);
    let key = |s: &str| format!("/coreos.com/network/subnets/{}", s.replace('/', "-"));

    // Node 1 dies without a word: its lease runs out after the TTL, and
    // the others drop its route, neighbour and FDB entries.
    c.nodes[1].kill_agent();
    for i in [0, 2] {
        wait_for(
            &format!("node {i} to drop node 1's subnet"),
            Duration::from_secs(15),
            || {
                (!has_route(&c.nodes[i], &subnets[1])
                    && !c.nodes[i].vtep_entries().contains("172.31.0.2"))
                .then_some(())
            },
        );
    }
    assert!(!c.lease_keys().contains(&key(&subnets[1])));
    // Renewal keeps the others alive well past their TTL.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.lease_keys().len(), 2, "{:?}", c.lease_keys());

    // A lease deleted by hand from under a running node: the others drop
    // it, and its owner takes the same subnet back.
    c.etcd
        .ctl(&["del", &key(&subnets[2])])
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "node 2 to take its lease back",
        Duration::from_secs(10),
        || {
            c.nodes[2]
                .agent_log()
                .contains("our own lease was removed")
                .then_some(())
        },
    );
    wait_for(
        "node 0 to route to node 2 again",
        Duration::from_secs(10),
        || has_route(&c.nodes[0], &subnets[2]).then_some(()),
    );
    assert!(
        c.lease_keys().contains(&key(&subnets[2])),
        "{:?}",
        c.lease_keys()
    );
    assert_eq!(c.nodes[2].subnet(), subnets[2]);
    let log = c.nodes[0].agent_log();
    assert!(
        log.contains(&format!("lease gone; routes removed subnet={}", subnets[2])),
        "{log}"
    );
}

#[test]
fn ip_masq_hides_pods_behind_their_node_outside_the_cluster_network() {
    // Dual stack, with IPv6 on the underlay too, so that both families
    // leave the cluster network.
    let mut c = Cluster::new(2, DUAL);
    c.underlay
        .ip(&["-6", "addr", "add", "fd00:31::fe/64", "dev", "br0", "nodad"]);
    for (i, n) in c.nodes.iter().enumerate() {
        n.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:31::{}/64", i + 1),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
    c.start_all(&["--ip-masq"]);
    converge(&c, &c.nodes.iter().map(Node::subnet).collect::<Vec<_>>());
    let env = std::fs::read_to_string(&c.nodes[0].subnet_file).unwrap_or_default();
    assert!(env.contains("FLANNEL_IPMASQ=true"), "{env}");
    let pods: Vec<Pod> = c.nodes.iter().map(Node::add_pod).collect();
    // A host outside the cluster network: the underlay itself.
    let mut outside = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", "[::]:7001", "%peer"])
        .netns(&c.underlay)
        .start();
    assert_eq!(outside.ask(""), "ready");
    for (to, node_addr) in [
        (format!("{UNDERLAY_GW}:7001"), c.nodes[0].ip.clone()),
        ("[fd00:31::fe]:7001".to_string(), "fd00:31::1".to_string()),
    ] {
        let out = Spawn::new(bin("skiff-probe"))
            .args(["tcp", &to, "3"])
            .netns(&pods[0].ns)
            .output();
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(
            v["answers"][&node_addr], 3,
            "leaving the cluster network to {to}, as the node: {out}"
        );
    }
    // Inside the cluster network the pod keeps its address, in both
    // families.
    let _s = serve(&pods[1]);
    assert_eq!(
        exchange(&pods[0], &pods[1].ip, 3),
        vec![pods[0].ip.clone(); 2]
    );
    let (from6, to6) = (
        result_ip(&pods[0].result, true),
        result_ip(&pods[1].result, true),
    );
    let mut server6 = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", &format!("[{to6}]:7002"), "%peer"])
        .netns(&pods[1].ns)
        .start();
    assert_eq!(server6.ask(""), "ready");
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", &format!("[{to6}]:7002"), "3"])
        .netns(&pods[0].ns)
        .output();
    assert!(out.contains(&format!("\"{from6}\":3")), "{out}");
    for family in ["ip", "ip6"] {
        let rules = c.nodes[0]
            .ns
            .exec(&["nft", "list", "table", family, "skiff-overlay"]);
        assert!(rules.contains("masquerade"), "{family}: {rules}");
    }
}

#[test]
fn nodes_ride_out_an_etcd_outage_and_catch_up_after_it() {
    let (mut c, pods) = two_nodes_with_pods(VXLAN, &["--lease-ttl", "30"]);
    let _s = serve(&pods[1]);

    c.etcd.kill();
    std::thread::sleep(Duration::from_secs(3));
    // The agents keep running and the routes stay: pods still talk.
    for n in &mut c.nodes {
        let alive = n.agent.as_mut().map(|a| a.is_running()).unwrap_or(false);
        assert!(
            alive,
            "agent on {} exited without etcd:\n{}",
            n.ip,
            n.agent_log()
        );
    }
    exchange(&pods[0], &pods[1].ip, 3);

    c.etcd.restart();
    // A node that joins after the outage is seen by both.
    let late = r#"{"PublicIP":"172.31.0.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:77"}}"#;
    c.etcd
        .ctl(&["put", "/coreos.com/network/subnets/10.244.77.0-24", late])
        .unwrap_or_else(|e| panic!("{e}"));
    for (i, n) in c.nodes.iter().enumerate() {
        wait_for(
            &format!("node {i} to route to the late node"),
            Duration::from_secs(20),
            || has_route(n, "10.244.77.0/24").then_some(()),
        );
    }
    exchange(&pods[0], &pods[1].ip, 3);
}
