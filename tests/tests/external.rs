//! Traffic from outside the cluster (the TC path): a client namespace on
//! the underlay, not a node, reaches NodePorts on every node, over IPv4 and
//! IPv6, whether the backend runs on that node or another, over TCP and
//! UDP, ICMP errors included (and a datagram too big for the overlay's
//! tunnel answered with its MTU, and datagrams in fragments both ways); under
//! `externalTrafficPolicy: Local` the backend sees the client's address
//! and a node without endpoints answers its health check with 503 (and
//! drops), while a Service without any endpoint is refused; Maglev
//! keeps flows where they are when a backend leaves and an agent restarts,
//! and ClientIP affinity keeps clients on their backends through new
//! backends and an agent restart until its timeout. externalIPs are
//! served too, and one client port keeps getting through to one backend
//! across many frontends, its flows' SNAT tuples taken again once closed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use skiff_tests::cluster::{Cluster, add_underlay_ipv6, node_ipv6};
use skiff_tests::overlay::attach;
use skiff_tests::{Netns, Spawn, bin, wait_for};

/// Pods `name` on `node` answering on TCP 7000 and UDP 7001: with their
/// own name, or with the client's address as they see it (`%peer`); up to
/// 64 TCP connections held open at once.
fn server(name: &str, node: &str, labels: &str, reply: &str, probe: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{{labels}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: tcp, image: {probe}, args: [serve-tcp, "[::]:7000", "{reply}", "64"]}}
  - {{name: udp, image: {probe}, args: [serve-udp, "[::]:7001", "{reply}"]}}
---
"#
    )
}

/// A client namespace outside the cluster, on the underlay: its IPv4 and
/// IPv6 addresses.
fn outside(c: &Cluster) -> (Netns, String, String) {
    let (ns, ip) = attach(&c.underlay, 9);
    add_underlay_ipv6(&ns, 9);
    (ns, ip, node_ipv6(9))
}

/// `ip:port`, the IPv6 address in brackets.
fn addr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn probe(ns: &Netns, args: &[&str]) -> Value {
    let p = bin("skiff-probe");
    let mut cmd = vec![p.to_str().unwrap_or_default()];
    cmd.extend_from_slice(args);
    let out = ns.exec(&cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Three TCP exchanges with `to`, from `ns`, once all three are answered
/// (within 30 s: the Service may still be on its way to the node).
fn answered(ns: &Netns, what: &str, to: &str) -> Value {
    wait_for(what, Duration::from_secs(30), || {
        let v = probe(ns, &["tcp", to, "3"]);
        (map(&v["answers"]).values().sum::<u64>() == 3).then_some(v)
    })
}

/// A connected UDP client asking `to` every 100 ms for a second: a line
/// per request, errors ending with their errno.
fn udp_follow(ns: &Netns, to: &str) -> String {
    udp_follow_for(ns, to, 1)
}

fn udp_follow_for(ns: &Netns, to: &str, seconds: u32) -> String {
    let p = bin("skiff-probe");
    ns.exec(&[
        p.to_str().unwrap_or_default(),
        "udp-follow",
        to,
        &seconds.to_string(),
    ])
}

fn map(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

fn http_get(ns: &Netns, url: &str) -> (u16, String) {
    let out = ns.exec(&["curl", "-s", "-m", "3", "-w", "\n%{http_code}", url]);
    let (body, code) = out.rsplit_once('\n').unwrap_or((&out, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn node_ports_serve_clients_outside_the_cluster_and_local_policy_keeps_their_address() {
    // Node 1's pods keep their addresses towards other nodes (below).
    let mut c = Cluster::start(1);
    c.add_node_without_masq();
    let n0 = c.nodes[0].name.clone();
    let (ip0, ip1) = (c.nodes[0].ip.clone(), c.nodes[1].ip.clone());
    // Addresses outside every node's, served as a Service's externalIPs.
    let external_ips: Vec<String> = (10..20).map(|i| format!("192.0.2.{i}")).collect();
    let mut manifests = server("echo", &n0, "app: echo", "%peer", &c.probe);
    manifests.push_str(
        &r#"apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {app: echo}
  ports:
  - {name: tcp, port: 7000, protocol: TCP, nodePort: 30700}
  - {name: udp, port: 7001, protocol: UDP, nodePort: 30701}
  - {name: closed, port: 7002, protocol: UDP, targetPort: 7999, nodePort: 30702}
  - {name: again, port: 7003, protocol: TCP, targetPort: 7000, nodePort: 30703}
---
apiVersion: v1
kind: Service
metadata:
  name: local
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports:
  - {name: tcp, port: 7000, protocol: TCP, nodePort: 30710}
---
apiVersion: v1
kind: Service
metadata:
  name: empty
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  selector: {app: nobody}
  ports:
  - {name: tcp, port: 7000, protocol: TCP, nodePort: 30730}
  - {name: udp, port: 7001, protocol: UDP, nodePort: 30731}
---
apiVersion: v1
kind: Service
metadata:
  name: external
spec:
  selector: {app: echo}
  externalIPs: [EXTERNAL_IPS]
  ports:
  - {name: tcp, port: 7100, protocol: TCP, targetPort: 7000}
"#
        .replace("EXTERNAL_IPS", &external_ips.join(", ")),
    );
    c.cp.apply(&manifests).unwrap_or_else(|e| panic!("{e}"));
    c.ready_pods("app=echo", 1);
    let (client, client_ip, client_ip6) = outside(&c);
    let (ip0_6, ip1_6) = (node_ipv6(0), node_ipv6(1));
    // Each node's address of each family, with the client's address of
    // that family and whether the backend is on that node.
    let nodes = [
        ("node 0", &ip0, &client_ip, true),
        ("node 1", &ip1, &client_ip, false),
        ("node 0 over IPv6", &ip0_6, &client_ip6, true),
        ("node 1 over IPv6", &ip1_6, &client_ip6, false),
    ];

    // The backend runs on node 0: through node 0 it is reached through
    // the stack and sees the client; through node 1 the flow is SNATed to
    // node 1 and crosses the overlay. Either way the answers come back
    // from the address the client dialled. The Service is dual stack, so
    // each node serves its NodePorts on both of its addresses.
    for (via, ip, client_ip, local) in nodes {
        let count = || forwarded(&c.node_ns[0], ip.contains(':'));
        let before = count();
        let tcp = answered(
            &client,
            &format!("TCP NodePort via {via}"),
            &addr(ip, 30700),
        );
        let peers = map(&tcp["answers"]);
        if local {
            assert_eq!(
                peers,
                BTreeMap::from([(client_ip.clone(), 3)]),
                "a local backend sees the client's address: {tcp}"
            );
            // Its pod sits behind the node's bridge: both ways of its
            // three connections (a dozen packets or more) skip the node's
            // forwarding path.
            let during = count() - before;
            assert!(
                during < 6,
                "{during} packets forwarded by node 0 during 3 connections to its own backend via {via}"
            );
        } else {
            assert!(
                !peers.contains_key(client_ip),
                "a flow to another node is SNATed: {tcp}"
            );
        }
        assert_eq!(
            map(&tcp["peers"]),
            BTreeMap::from([(addr(ip, 30700), 3)]),
            "via {via}: {tcp}"
        );
        let udp = probe(&client, &["udp", &addr(ip, 30701), "3"]);
        assert_eq!(
            map(&udp["answers"]).values().sum::<u64>(),
            3,
            "UDP NodePort via {via}: {udp}"
        );
        assert_eq!(
            map(&udp["peers"]),
            BTreeMap::from([(addr(ip, 30701), 3)]),
            "UDP replies come from the NodePort via {via}: {udp}"
        );
        // A datagram bigger than the path, both ways (4 000 bytes, the
        // answer as big): it crosses in fragments, which the TC path
        // translates one by one, the later ones (without ports) by the
        // first one's. Via node 1, IPv4's 1500-byte fragments are too big
        // for the tunnel and, routers being allowed to fragment them, go on
        // in fragments of the outer packet; IPv6's are answered with the
        // tunnel's MTU and the client sends smaller ones. The answer's
        // fragments go the same ways back. Sent before the check below, so
        // that the client has not yet learnt the tunnel's MTU.
        let fragmented = probe(&client, &["udp-size", &addr(ip, 30701), "4000", "0", "1"]);
        assert!(
            fragmented["answered"] == true
                && fragmented["sent_len"].as_u64() > Some(2 * 1500)
                && fragmented["answer_len"] == fragmented["sent_len"],
            "a fragmented datagram, and its fragmented answer, via {via}: {fragmented}"
        );
        // A datagram too big for the tunnel (1500 bytes from a 1500-byte
        // underlay; the overlay's MTU is 1450) is answered as a router
        // answers it, whether the kernel forwards it to a local backend
        // or the TC path redirects it towards a remote one (a redirect
        // skips the kernel's check): the client's next receive fails with
        // EMSGSIZE, its path MTU drops to the tunnel's, and a datagram of
        // that size is served.
        let big = probe(&client, &["udp-size", &addr(ip, 30701), "1500", "1"]);
        assert!(
            big["answered"] == false && big["errnos"][0] == libc::EMSGSIZE && big["mtu"] == 1450,
            "a datagram too big for the tunnel via {via}: {big}"
        );
        let fits = probe(&client, &["udp-size", &addr(ip, 30701), "1450", "1"]);
        assert_eq!(
            fits["answered"], true,
            "a datagram that fits, via {via}: {fits}"
        );
        // Nothing listens behind port 30702: the backend's ICMP port
        // unreachable, translated back, reaches the client's connected
        // socket as ECONNREFUSED.
        let out = udp_follow(&client, &addr(ip, 30702));
        assert!(
            out.lines().any(|l| l.ends_with("errno 111")),
            "ICMP errors of a flow via {via} reach the client: {out}"
        );
    }

    // A pod on node 1 dialling node 0's NodePort: the flow reaches node 0
    // from the underlay with the pod's own address (node 1 does not
    // masquerade), and the backend, local to node 0, replies to another
    // node's pod subnet, which the overlay's fast path tunnels from the
    // bridge. The reply must be rewritten to come from the NodePort before
    // it is tunnelled, or the client's socket never sees an answer.
    let client_node = c.nodes[1].name.clone();
    let checks = [("v4", addr(&ip0, 30700)), ("v6", addr(&ip0_6, 30700))];
    let containers: String = checks
        .iter()
        .map(|(n, to)| {
            format!(
                "  - {{name: {n}, image: {}, args: [tcp, \"{to}\", \"3\"]}}\n",
                c.probe
            )
        })
        .collect();
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-client\nspec:\n  nodeName: {client_node}\n  restartPolicy: Never\n  containers:\n{containers}"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for("pod-client to finish", Duration::from_secs(90), || {
        let p = c.cp.jsonpath(&["pod", "pod-client"], "{.status.phase}");
        (p == "Succeeded" || p == "Failed").then_some(())
    });
    let pod_ips =
        c.cp.jsonpath(&["pod", "pod-client"], "{.status.podIPs[*].ip}");
    let pod_ips: Vec<&str> = pod_ips.split_whitespace().collect();
    for ((check, to), pod_ip) in checks.iter().zip(&pod_ips) {
        let out = c.cp.kubectl_ok(&["logs", "pod-client", "-c", check]);
        let v: Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{check}: {e}: {out}"));
        assert_eq!(
            (map(&v["answers"]), map(&v["peers"])),
            (
                BTreeMap::from([(pod_ip.to_string(), 3)]),
                BTreeMap::from([(to.clone(), 3)])
            ),
            "a pod on node 1 to node 0's NodePort {to}: answered from it, its own address seen: {out}"
        );
    }

    // One client port to two NodePorts of the same local backend at once:
    // the backend would see one tuple for both, so the second flow's port
    // is remapped (its address kept) and both connections work.
    let mut first = Spawn::new(bin("skiff-probe"))
        .args(["flows", "45000", "1"])
        .netns(&client)
        .start();
    let mut second = Spawn::new(bin("skiff-probe"))
        .args(["flows", "45000", "1"])
        .netns(&client)
        .start();
    let a = names(&first.ask(&format!("open {ip0}:30700")));
    let b = names(&second.ask(&format!("open {ip0}:30703")));
    let a_again = names(&first.ask("ask"));
    assert_eq!(
        (a, b, a_again),
        (
            vec![client_ip.clone()],
            vec![client_ip.clone()],
            vec![client_ip.clone()]
        ),
        "both flows from port 45000 are served, with the client's address"
    );

    // externalIPs, routed by the client to node 1, are served there (SNATed
    // to the backend on node 0). One client port to each of them in turn,
    // each connection reset before the next, a second apart: every flow
    // needs a tuple towards the one backend from node 1's address, none
    // of which is free outright for a minute after its flow closed; once
    // the few candidates of that client port are all taken, the next flow
    // takes one whose flow was reset (or closed both ways) over a second
    // ago.
    client.ip(&["route", "add", "192.0.2.0/24", "via", &ip1]);
    let first_ip = addr(&external_ips[0], 7100);
    let served = answered(&client, "an externalIP via node 1", &first_ip);
    assert!(
        !map(&served["answers"]).contains_key(&client_ip),
        "an externalIP's flow to another node is SNATed: {served}"
    );
    let mut one_port = Spawn::new(bin("skiff-probe"))
        .args(["flows", "45100", "1"])
        .netns(&client)
        .start();
    for ip in &external_ips {
        let answer = names(&one_port.ask(&format!("open {}", addr(ip, 7100))));
        assert!(
            answer.len() == 1 && !answer[0].starts_with("error:") && answer[0] != client_ip,
            "client port 45100 to {ip}:7100 after the others' flows were reset: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(1_100));
    }

    // externalTrafficPolicy: Local: node 0 serves with the client's
    // address kept; node 1 has no endpoint, does not serve, and says so
    // on the health check port.
    let hc =
        c.cp.jsonpath(&["service", "local"], "{.spec.healthCheckNodePort}");
    assert!(
        hc.parse::<u16>()
            .is_ok_and(|p| (30000..=32767).contains(&p)),
        "a LoadBalancer Service with externalTrafficPolicy Local gets a healthCheckNodePort: {hc:?}"
    );
    for (via, ip, client_ip, local) in nodes {
        if local {
            let served = answered(&client, &format!("eTP Local via {via}"), &addr(ip, 30710));
            assert_eq!(
                map(&served["answers"]),
                BTreeMap::from([(client_ip.clone(), 3)]),
                "via {via}: {served}"
            );
        } else {
            let none = probe(&client, &["tcp", &addr(ip, 30710), "2"]);
            assert!(
                map(&none["answers"]).is_empty(),
                "a node without local endpoints does not serve (via {via}): {none}"
            );
            assert!(
                !map(&none["errors"]).contains_key("ConnectionRefused"),
                "... it drops, as kube-proxy does (the Service has endpoints elsewhere): {none}"
            );
        }
    }

    // A Service without any endpoint is refused, as kube-proxy's REJECT
    // refuses it: ICMP port unreachable from the NodePort, on every node.
    for (via, ip, _, _) in nodes {
        let tcp = probe(&client, &["tcp", &addr(ip, 30730), "2"]);
        assert_eq!(
            map(&tcp["errors"]),
            BTreeMap::from([("ConnectionRefused".to_string(), 2)]),
            "TCP to a NodePort without endpoints via {via}: {tcp}"
        );
        let out = udp_follow(&client, &addr(ip, 30731));
        assert!(
            out.lines().any(|l| l.ends_with("errno 111")),
            "UDP to a NodePort without endpoints via {via} is refused: {out}"
        );
    }
    // ... within the kernel's limits on the ICMP errors it sends, which
    // kube-proxy's REJECT is under: to one client, a burst of six and
    // then one a second; the rest is dropped unanswered. Asked every
    // 100 ms for 3 s, without a limit every request would be refused.
    let out = udp_follow_for(&client, &addr(&ip1, 30731), 3);
    let ending = |errno: &str| out.lines().filter(|l| l.ends_with(errno)).count();
    let (refused, unanswered) = (ending("errno 111"), ending("errno 11"));
    assert!(
        (1..=9).contains(&refused) && unanswered >= 1,
        "port unreachables to one client, limited: {refused} refused, {unanswered} unanswered\n{out}"
    );
    let (code, body) = http_get(&client, &format!("http://{ip0}:{hc}/healthz"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["service"]["name"], "local", "{body}");
    let (code, body) = http_get(&client, &format!("http://{ip1}:{hc}/healthz"));
    assert_eq!(code, 503, "{body}");
}

/// Packets the namespace `ns` has forwarded, IPv4's or (`v6`) IPv6's.
fn forwarded(ns: &Netns, v6: bool) -> u64 {
    let (file, field) = if v6 {
        ("/proc/net/snmp6", "Ip6OutForwDatagrams")
    } else {
        ("/proc/net/snmp", "ForwDatagrams")
    };
    let text = ns.exec(&["cat", file]);
    if v6 {
        return text
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {file}"));
    }
    // "Ip: names..." then "Ip: values...".
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("Ip: "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let at = rows
        .first()
        .and_then(|names| names.iter().position(|n| *n == field))
        .unwrap_or_else(|| panic!("no {field} in {file}"));
    rows.get(1)
        .and_then(|values| values.get(at)?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} value in {file}"))
}

/// The backend names `names` holds, as answered by a `flows` command.
fn names(line: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    v["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Ready endpoints of Service `m`.
fn slice_addresses(c: &Cluster) -> usize {
    c.cp.jsonpath(
        &["endpointslices", "-l", "kubernetes.io/service-name=m"],
        "{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}",
    )
    .split_whitespace()
    .count()
}

#[test]
fn maglev_keeps_flows_when_a_backend_leaves_and_across_an_agent_restart() {
    const FLOWS: u16 = 200;
    let mut c = Cluster::start(2);
    let (n0, n1) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    let (ip0, ip1) = (c.nodes[0].ip.clone(), c.nodes[1].ip.clone());
    // Ten backends, five on each node.
    let mut manifests = String::new();
    for i in 0..10 {
        let node = if i % 2 == 0 { &n0 } else { &n1 };
        manifests.push_str(&server(
            &format!("m{i}"),
            node,
            "app: m",
            &format!("m{i}"),
            &c.probe,
        ));
    }
    manifests.push_str(
        r#"apiVersion: v1
kind: Service
metadata:
  name: m
spec:
  type: NodePort
  selector: {app: m}
  ports:
  - {name: tcp, port: 7000, protocol: TCP, nodePort: 30720}
"#,
    );
    c.cp.apply(&manifests).unwrap_or_else(|e| panic!("{e}"));
    c.ready_pods("app=m", 10);
    wait_for("ten endpoints", Duration::from_secs(30), || {
        (slice_addresses(&c) == 10).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let (client, _, _) = outside(&c);
    let mut flows = Spawn::new(bin("skiff-probe"))
        .args(["flows", "40000", &FLOWS.to_string()])
        .netns(&client)
        .start();
    let to1 = format!("open {ip1}:30720");
    let before = names(&flows.ask(&to1));
    assert!(
        before.iter().all(|n| n.starts_with('m')),
        "every flow answered: {before:?}"
    );
    let spread: BTreeMap<&String, usize> = before.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n).or_default() += 1;
        m
    });
    assert_eq!(spread.len(), 10, "flows spread over all ten: {spread:?}");

    // Any node picks the same backend for a flow.
    let via0 = names(&flows.ask(&format!("open {ip0}:30720")));
    assert_eq!(via0, before, "node 0 and node 1 choose alike");
    let before = names(&flows.ask(&to1));

    // The agent on node 1 restarts while the flows stay open and new
    // connections keep coming.
    let mut load = Spawn::new(bin("skiff-probe"))
        .args(["load", &format!("{ip1}:30720"), "10000", "1"])
        .netns(&client)
        .start();
    std::thread::sleep(Duration::from_millis(300));
    c.nodes[1].start_agent();
    let kept = names(&flows.ask("ask"));
    assert_eq!(kept, before, "established flows survive an agent restart");
    let (_, out) = load.finish();
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (v["connections"].as_u64(), v["errors"].as_u64()),
        (Some(10000), Some(0)),
        "new connections through the restart: {out}"
    );

    // m3 (on node 1) leaves: the other nine keep their established flows.
    c.cp.kubectl_ok(&["delete", "pod", "m3", "--wait=false"]);
    wait_for(
        "m3 out of the EndpointSlice",
        Duration::from_secs(30),
        || (slice_addresses(&c) == 9).then_some(()),
    );
    // ... and out of node 1's table: new connections all answered, none
    // by m3.
    wait_for("m3 out of node 1's table", Duration::from_secs(60), || {
        let v = probe(&client, &["tcp", &format!("{ip1}:30720"), "60"]);
        let answers = map(&v["answers"]);
        (answers.values().sum::<u64>() == 60 && !answers.contains_key("m3")).then_some(())
    });
    let kept = names(&flows.ask("ask"));
    for (i, (b, k)) in before.iter().zip(&kept).enumerate() {
        if b != "m3" {
            assert_eq!(k, b, "flow {i} on a backend that stayed keeps it");
        }
    }
    // New flows from the same ports: those of m3 move, about a tenth in
    // all, and few others do.
    let after = names(&flows.ask(&to1));
    assert!(
        after.iter().all(|n| n.starts_with('m') && n != "m3"),
        "{after:?}"
    );
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let moved_others = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != "m3" && b != a)
        .count();
    eprintln!("{moved} of {FLOWS} new flows moved, {moved_others} of them not from m3");
    assert!(
        (5..=40).contains(&moved),
        "about a tenth of {FLOWS} new flows move, {moved} did"
    );
    assert!(
        moved_others <= 10,
        "{moved_others} new flows of staying backends moved"
    );
}

/// The one backend that answered all of `v`'s exchanges, if one did.
fn only_answer(v: &Value) -> Option<String> {
    let answers = map(&v["answers"]);
    (answers.len() == 1 && v["errors"].as_object().is_none_or(|e| e.is_empty()))
        .then(|| answers.into_keys().next())
        .flatten()
}

#[test]
fn client_ip_affinity_on_node_ports_outlasts_new_backends_and_an_agent_restart_until_its_timeout() {
    const CLIENTS: usize = 16;
    const TIMEOUT_S: u64 = 30;
    let mut c = Cluster::start(2);
    let (n0, n1) = (c.nodes[0].name.clone(), c.nodes[1].name.clone());
    let ip1 = c.nodes[1].ip.clone();
    // Eight backends of the Services, and six more pods that join them
    // later (by label: faster than starting them then).
    let mut manifests = String::new();
    for i in 0..14 {
        let node = if i % 2 == 0 { &n0 } else { &n1 };
        let app = if i < 8 { "app: a" } else { "app: later" };
        manifests.push_str(&server(
            &format!("a{i}"),
            node,
            app,
            &format!("a{i}"),
            &c.probe,
        ));
    }
    // Two alike Services, both ClientIP.
    for (name, port) in [("sticky", 30741), ("fresh", 30742)] {
        manifests.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: NodePort\n  selector: {{app: a}}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {TIMEOUT_S}}}}}\n  ports:\n  - {{port: 7000, protocol: TCP, nodePort: {port}}}\n---\n"
        ));
    }
    c.cp.apply(&manifests).unwrap_or_else(|e| panic!("{e}"));
    c.ready_pods("app=a", 8);
    c.ready_pods("app=later", 6);
    let (client, _, _) = outside(&c);
    // Sixteen clients: addresses of their own on the client's namespace.
    let clients: Vec<String> = (0..CLIENTS)
        .map(|i| format!("172.31.0.{}", 100 + i))
        .collect();
    for a in &clients {
        client.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
    }
    let sticky = addr(&ip1, 30741);
    let fresh = addr(&ip1, 30742);
    answered(&client, "sticky served on node 1", &sticky);
    // Every client keeps one backend.
    let pinned: Vec<String> = clients
        .iter()
        .map(|from| {
            let v = probe(&client, &["tcp", &sticky, "3", from]);
            only_answer(&v).unwrap_or_else(|| panic!("{from}: one backend for all three: {v}"))
        })
        .collect();
    let joined = std::time::Instant::now();
    let later: Vec<String> = (8..14).map(|i| format!("a{i}")).collect();
    let mut args = vec!["label", "pods", "--overwrite"];
    args.extend(later.iter().map(String::as_str));
    args.push("app=a");
    c.cp.kubectl_ok(&args);
    // Node 1 has both Services at fourteen backends (its socket path's
    // frontends for the node address, written in the same pass as the TC
    // path's sets, just before them).
    let pins = c.nodes[1]
        .pins
        .as_ref()
        .expect("node 1 runs the proxy")
        .path
        .clone();
    wait_for(
        "fourteen backends on node 1",
        Duration::from_secs(15),
        || {
            let out = Spawn::new(bin("skiff-agent"))
                .args(["proxy", "list", "--json", "--bpffs"])
                .args([&pins])
                .try_output()
                .ok()?;
            let v: Value = serde_json::from_str(&out).ok()?;
            let backends = |port: u16| {
                let frontend = format!("{ip1}:{port}/TCP");
                v.as_array()
                    .into_iter()
                    .flatten()
                    .find(|f| f["frontend"].as_str() == Some(frontend.as_str()))
                    .and_then(|f| f["backends"].as_array().map(Vec::len))
            };
            (backends(30741) == Some(14) && backends(30742) == Some(14)).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        joined.elapsed() < Duration::from_secs(TIMEOUT_S - 10),
        "the new backends took {:?}, too close to the timeout for what follows",
        joined.elapsed()
    );
    // Within the timeout, no client moves; `fresh`, never used by these
    // clients, shows where Maglev alone sends each of them now.
    let mut moved_by_maglev = Vec::new();
    for (from, kept) in clients.iter().zip(&pinned) {
        let v = probe(&client, &["tcp", &sticky, "3", from]);
        assert_eq!(
            only_answer(&v).as_ref(),
            Some(kept),
            "{from} keeps its backend: {v}"
        );
        let v = probe(&client, &["tcp", &fresh, "1", from]);
        let by_maglev = only_answer(&v).unwrap_or_else(|| panic!("{from} through fresh: {v}"));
        if &by_maglev != kept {
            moved_by_maglev.push((from.clone(), kept.clone(), by_maglev));
        }
    }
    eprintln!(
        "{} of {CLIENTS} clients kept a backend Maglev alone would have moved",
        moved_by_maglev.len()
    );
    // With 6 of 14 backends new, each client's Maglev slot changes with
    // odds of about 6/14, so all 16 staying put has odds under 1e-3.
    assert!(
        !moved_by_maglev.is_empty(),
        "no client's Maglev choice changed, so affinity was not put to the test"
    );
    // Node 1's agent restarts: the clients' entries are in a pinned map,
    // keyed by frontend, and name backend ids the new agent adopts, so
    // once it has synced, those clients still keep their backends.
    c.nodes[1].restart_agent();
    // Each of those clients (from, kept, by Maglev) gets the backend
    // `pick` names, for all three of its connections.
    let each_gets = |pick: fn(&(String, String, String)) -> &String, when: &str| {
        for m in &moved_by_maglev {
            let v = probe(&client, &["tcp", &sticky, "3", &m.0]);
            assert_eq!(
                only_answer(&v).as_ref(),
                Some(pick(m)),
                "{} {when}: {v}",
                m.0
            );
        }
    };
    each_gets(|m| &m.1, "keeps its backend across node 1's agent restart");
    let refreshed = std::time::Instant::now();
    // Once the timeout has passed since their last connection, those
    // clients go where the table sends them.
    std::thread::sleep(Duration::from_secs(TIMEOUT_S + 1).saturating_sub(refreshed.elapsed()));
    each_gets(|m| &m.2, "after its affinity lapsed");
}
