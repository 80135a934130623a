//! A three-node cluster on one machine, every node running the whole agent
//! (kubelet, proxy, overlay) on its own containerd: what a user sees
//! after `kubectl apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use skiff_tests::cluster::Cluster;
use skiff_tests::wait_for;

fn web(image: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: {image}
        command: ["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"]
        ports:
        - containerPort: 80
        readinessProbe:
          httpGet: {{path: /, port: 80}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 80}}
"#
    )
}

#[test]
fn pods_spread_over_three_nodes_answer_by_cluster_ip_and_pod_ip_across_the_overlay() {
    let c = Cluster::start(3);
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    c.cp.apply(&web(&c.busybox))
        .unwrap_or_else(|e| panic!("{e}"));
    // name -> (pod IP, node)
    let pods: BTreeMap<String, (String, String)> = wait_for(
        "three web pods Ready",
        Duration::from_secs(120),
        || {
            let out = c.cp.jsonpath(
                &["pods", "-l", "app=web"],
                r#"{range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
            );
            let pods: BTreeMap<String, (String, String)> = out
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() == 4 && f[3] == "True")
                        .then(|| (f[0].to_string(), (f[1].to_string(), f[2].to_string())))
                })
                .collect();
            (pods.len() == 3).then_some(pods)
        },
    );
    for (ip, node) in pods.values() {
        assert!(ip.starts_with("10.244."), "pod IP {ip}");
        assert!(nodes.contains(node), "{node} is one of ours");
    }
    let used: BTreeSet<&String> = pods.values().map(|(_, n)| n).collect();
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
    let client_node = nodes
        .iter()
        .min_by_key(|n| pods.values().filter(|(_, pn)| pn == *n).count())
        .unwrap_or_else(|| panic!("no nodes"));
    assert!(pods.values().any(|(_, n)| n != client_node));
    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    assert!(
        cluster_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "a ClusterIP: {cluster_ip:?}"
    );
    let pod_ips: Vec<&str> = pods.values().map(|(ip, _)| ip.as_str()).collect();
    let script = format!(
        "for i in $(seq 1 15); do echo \"svc $(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1)\"; done; \
         for ip in {ips}; do echo \"pod $ip $(timeout 5 wget -qO- http://$ip/ 2>&1)\"; done; echo done",
        ips = pod_ips.join(" ")
    );
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\nspec:\n  nodeName: {client_node}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sh\", \"-c\", {script:?}]\n",
        image = c.busybox
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let log = wait_for("the client to finish", Duration::from_secs(120), || {
        let phase = c.cp.jsonpath(&["pod", "client"], "{.status.phase}");
        (phase == "Succeeded" || phase == "Failed")
            .then(|| c.cp.kubectl(&["logs", "client"]).unwrap_or_default())
    });
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
                .find(|(_, (pip, _))| pip == ip)
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
