//! A three-node cluster on one machine, every node running the whole agent
//! (kubelet, proxy, overlay) on its own containerd: what a user sees
//! after `kubectl apply`.

use std::collections::BTreeSet;

use skiff_tests::cluster::{Cluster, web_app};

#[test]
fn pods_spread_over_three_nodes_answer_by_cluster_ip_and_pod_ip_across_the_overlay() {
    let c = Cluster::start(3);
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    c.cp.apply(&web_app(&c.busybox, 3))
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = c.ready_pods("app=web", 3);
    for p in pods.values() {
        assert!(p.ip.starts_with("10.244."), "pod IP {}", p.ip);
        assert!(nodes.contains(&p.node), "{} is one of ours", p.node);
    }
    let used: BTreeSet<&String> = pods.values().map(|p| &p.node).collect();
    assert!(
        used.len() >= 2,
        "the scheduler spreads the replicas: {pods:?}"
    );
    // Every node's subnet is its own.
    let cidrs: BTreeSet<String> = nodes
        .iter()
        .map(|n| c.cp.jsonpath(&["node", n], "{.spec.podCIDR}"))
        .collect();
    assert_eq!(cidrs.len(), 3, "{cidrs:?}");

    // The client runs on the node with the fewest web pods, so at least
    // one pod IP it dials is on another node.
    let client_node = c.quietest_node(&pods);
    assert!(pods.values().any(|p| p.node != client_node));
    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    assert!(
        cluster_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "a ClusterIP: {cluster_ip:?}"
    );
    let pod_ips: Vec<&str> = pods.values().map(|p| p.ip.as_str()).collect();
    // busybox wget's own -T crashes; timeout bounds each fetch instead.
    let script = format!(
        "for i in $(seq 1 15); do echo \"svc $(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1)\"; done; \
         for ip in {ips}; do echo \"pod $ip $(timeout 5 wget -qO- http://$ip/ 2>&1)\"; done; echo done",
        ips = pod_ips.join(" ")
    );
    let log = c.run_script("client", &client_node, &script);
    assert!(log.trim_end().ends_with("done"), "{log}");
    let mut through_service = BTreeSet::new();
    for line in log.lines() {
        if let Some(body) = line.strip_prefix("svc ") {
            let name = body
                .strip_prefix("hello from ")
                .unwrap_or_else(|| panic!("the ClusterIP answers from a web pod: {line}\n{log}"));
            assert!(pods.contains_key(name), "{name} is a web pod");
            through_service.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("pod ") {
            let (ip, body) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, _) = pods
                .iter()
                .find(|(_, p)| p.ip == ip)
                .unwrap_or_else(|| panic!("{ip} is a web pod's"));
            assert_eq!(
                body,
                format!("hello from {name}"),
                "{ip} answers as its pod"
            );
        }
    }
    assert!(
        through_service.len() >= 2,
        "15 connections to the ClusterIP reach more than one pod: {through_service:?}"
    );
    assert_eq!(log.lines().filter(|l| l.starts_with("pod ")).count(), 3);
}
