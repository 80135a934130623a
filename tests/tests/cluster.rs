//! A three-node cluster on one machine, every node running the whole agent
//! (kubelet, proxy, overlay) on its own containerd: what a user sees
//! after `kubectl apply`.

use std::collections::BTreeSet;
use std::time::Duration;

use skiff_tests::cluster::{Cluster, web_app};
use skiff_tests::node::sample;
use skiff_tests::wait_for;

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
    // `get nodes -o wide` shows each node's address, OS and runtime.
    let wide = c.cp.kubectl_ok(&["get", "nodes", "-o", "wide"]);
    for h in [
        "INTERNAL-IP",
        "OS-IMAGE",
        "KERNEL-VERSION",
        "CONTAINER-RUNTIME",
    ] {
        assert!(wide.contains(h), "{h} in {wide}");
    }
    for n in &c.nodes {
        let row = wide
            .lines()
            .find(|l| l.starts_with(&n.name))
            .unwrap_or_else(|| panic!("{} in {wide}", n.name));
        assert!(
            row.contains(&n.ip) && row.contains("containerd://1.6"),
            "{row}"
        );
    }
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

    // Every component's metrics, scraped as Prometheus would, under
    // upstream's names, with what this test did counted in them.
    let admin = std::fs::read_to_string(c.cp.dir.path.join("pki/admin.token"))
        .unwrap_or_else(|e| panic!("the admin token: {e}"));
    let api =
        c.cp.curl(Some(&admin), &["-f", &format!("{}/metrics", c.cp.server)])
            .unwrap_or_else(|e| panic!("scraping the apiserver: {e}"));
    let at_least = |text: &str, name: &str, labels: &[&str], n: f64| {
        let v = sample(text, name, labels).unwrap_or(0.0);
        assert!(v >= n, "{name}{labels:?} = {v}, not {n} or more\n{text}");
    };
    let pod_creates = [r#"verb="POST""#, r#"resource="pods""#, r#"code="201""#];
    // The ReplicaSet controller's three creates (the client pod came by
    // kubectl apply).
    at_least(&api, "apiserver_request_total", &pod_creates, 3.0);
    at_least(
        &api,
        "etcd_request_duration_seconds_count",
        &[r#"operation="create""#, r#"type="pods""#],
        4.0,
    );
    // The web pods went through the scheduler (the client was placed by
    // name).
    at_least(
        &api,
        "scheduler_schedule_attempts_total",
        &[r#"result="scheduled""#],
        3.0,
    );
    at_least(&api, "workqueue_adds_total", &[r#"name="replicaset""#], 1.0);
    // Open watches (the controllers', the agents'), over all resources.
    let watches: f64 = api
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_longrunning_requests{") && l.contains(r#"verb="WATCH""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(watches >= 3.0, "open watches: {watches}\n{api}");
    let mut started = 0.0;
    for n in &c.nodes {
        let m = n.metrics();
        // The proxy programmed the web Service and its three endpoints
        // (and the others), and the overlay routes to the two other nodes.
        at_least(
            &m,
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            &[],
            1.0,
        );
        at_least(&m, "skiff_proxy_endpoints", &[], 3.0);
        assert_eq!(sample(&m, "skiff_overlay_routes", &[]), Some(2.0), "{m}");
        assert!(m.contains("# TYPE coredns_dns_requests counter"), "{m}");
        started += sample(&m, "kubelet_pod_start_sli_duration_seconds_count", &[]).unwrap_or(0.0);
        let ready = n.health("/readyz?verbose");
        for check in ["syncloop", "proxy", "overlay", "dns"] {
            assert!(
                ready.contains(&format!("[+]{check} ok\n")),
                "{}: {ready}",
                n.name
            );
        }
    }
    // Three web pods and the client started, each observed once.
    assert!(started >= 4.0, "pod starts observed: {started}");
}

#[test]
fn a_rolling_update_under_load_fails_no_request() {
    let c = Cluster::start(3);
    let next = c.registry.push(&c.underlay, "busybox", "busybox:next");
    c.cp.apply(&web_app(&c.busybox, 6).replace(
        "      terminationGracePeriodSeconds: 2\n",
        "      terminationGracePeriodSeconds: 10\n",
    ).replace(
        "        readinessProbe:\n",
        "        lifecycle:\n          preStop:\n            exec: {command: [\"sleep\", \"3\"]}\n        readinessProbe:\n",
    ).replace(
        "  replicas: 6\n",
        "  replicas: 6\n  strategy:\n    type: RollingUpdate\n    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let old = c.ready_pods("app=web", 6);
    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    // A new connection per request, for as long as the client runs.
    let client_node = c.quietest_node(&old);
    c.start_script(
        "load",
        &client_node,
        &format!(
            "while true; do t=$(date +%T); out=$(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1); rc=$?; \
             echo \"r $out\"; [ $rc = 0 ] || echo \"failed at $t: exit $rc\"; sleep 0.05; done"
        ),
    );
    skiff_tests::wait_for("the load to flow", Duration::from_secs(60), || {
        let log = c.cp.kubectl(&["logs", "load"]).unwrap_or_default();
        (log.lines().filter(|l| l.starts_with("r hello")).count() >= 10).then_some(())
    });
    c.cp.kubectl_ok(&["set", "image", "deployment/web", &format!("httpd={next}")]);
    c.cp.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=180s"]);
    let new = c.ready_pods("app=web", 6);
    assert!(
        new.keys().all(|n| !old.contains_key(n)),
        "every pod replaced: {old:?} -> {new:?}"
    );
    for name in new.keys() {
        assert_eq!(
            c.cp.jsonpath(&["pod", name], "{.spec.containers[0].image}"),
            next
        );
    }
    // Requests keep flowing to the new pods after the roll.
    let seen_new = |log: &str| {
        log.lines()
            .filter_map(|l| l.strip_prefix("r hello from "))
            .filter(|n| new.contains_key(*n))
            .count()
    };
    let log = skiff_tests::wait_for(
        "requests to reach new pods",
        Duration::from_secs(30),
        || {
            let log = c.cp.kubectl(&["logs", "load"]).unwrap_or_default();
            (seen_new(&log) >= 10).then_some(log)
        },
    );
    let answers: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("r ")).collect();
    let failed: Vec<&&str> = answers
        .iter()
        .filter(|a| {
            a.strip_prefix("hello from ")
                .is_none_or(|n| !old.contains_key(n) && !new.contains_key(n))
        })
        .collect();
    let when: Vec<&str> = log.lines().filter(|l| l.starts_with("failed at")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the roll: {:?} {when:?}\n{}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(10)],
        c.cp.kubectl(&[
            "get",
            "events",
            "--sort-by=.lastTimestamp",
            "-o",
            "custom-columns=T:.lastTimestamp,OBJ:.involvedObject.name,R:.reason,M:.message"
        ])
        .unwrap_or_default()
    );
    assert!(
        answers.len() > 50,
        "the load ran through the roll: {}",
        answers.len()
    );
}

/// `node -> (pod, image, ready)` of the DaemonSet's pods that are not
/// terminating.
fn daemon_pods(c: &Cluster) -> std::collections::BTreeMap<String, (String, String, bool)> {
    let out = c.cp.jsonpath(
        &["pods", "-l", "app=everywhere"],
        r#"{range .items[*]}{.spec.nodeName} {.metadata.name} {.spec.containers[0].image} {.status.conditions[?(@.type=="Ready")].status} {.metadata.deletionTimestamp}{"\n"}{end}"#,
    );
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| {
                (
                    f[0].to_string(),
                    (f[1].to_string(), f[2].to_string(), f[3] == "True"),
                )
            })
        })
        .collect()
}

#[test]
fn a_daemonset_runs_on_every_node_follows_a_new_one_and_rolls_one_node_at_a_time() {
    let mut c = Cluster::start(3);
    let next = c.registry.push(&c.underlay, "busybox", "busybox:next");
    c.cp.apply(&format!(
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: everywhere
spec:
  selector:
    matchLabels: {{app: everywhere}}
  updateStrategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 1}}
  template:
    metadata:
      labels: {{app: everywhere}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {image}
        command: ["sh", "-c", "sleep 3600"]
"#,
        image = c.busybox
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let nodes =
        |c: &Cluster| -> BTreeSet<String> { c.nodes.iter().map(|n| n.name.clone()).collect() };
    let all_ready = |c: &Cluster, image: &str| {
        let pods = daemon_pods(c);
        (pods.keys().cloned().collect::<BTreeSet<_>>() == nodes(c)
            && pods.values().all(|(_, i, r)| *r && i == image))
        .then_some(pods)
    };
    skiff_tests::wait_for(
        "a ready pod on each of 3 nodes",
        Duration::from_secs(90),
        || all_ready(&c, &c.busybox),
    );

    let i = c.add_node();
    let newcomer = c.nodes[i].name.clone();
    let pods = skiff_tests::wait_for("a pod on the new node", Duration::from_secs(90), || {
        all_ready(&c, &c.busybox)
    });
    assert!(pods.contains_key(&newcomer), "{pods:?}");

    c.cp.kubectl_ok(&[
        "set",
        "image",
        "daemonset/everywhere",
        &format!("main={next}"),
    ]);
    let mut fewest = usize::MAX;
    let started = std::time::Instant::now();
    loop {
        let pods = daemon_pods(&c);
        fewest = fewest.min(pods.values().filter(|(_, _, r)| *r).count());
        if pods.len() == 4 && pods.values().all(|(_, i, r)| *r && *i == next) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the roll did not finish: {pods:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        fewest >= 3,
        "maxUnavailable 1: at most one node at a time without a ready pod (saw {fewest} of 4)"
    );
}

#[test]
fn tcp_and_udp_cross_nodes_by_pod_ip_cluster_ip_and_node_port_with_the_source_ip_kept_over_both_families()
 {
    let c = Cluster::start(3);
    let server_node = c.nodes[0].name.clone();
    c.cp.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: echo
  labels: {{app: echo}}
spec:
  nodeName: {server_node}
  containers:
  - {{name: tcp, image: {probe}, args: [serve-tcp, "[::]:7000", "%peer"]}}
  - {{name: udp, image: {probe}, args: [serve-udp, "[::]:7001", "%peer"]}}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  selector: {{app: echo}}
  ports:
  - {{name: tcp, port: 7000, protocol: TCP, nodePort: 30700}}
  - {{name: udp, port: 7001, protocol: UDP, nodePort: 30701}}
"#,
        probe = c.probe
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let echo = c.ready_pods("app=echo", 1);
    let echo_ip = echo
        .values()
        .next()
        .map(|p| p.ip.clone())
        .unwrap_or_default();
    let cluster_ip = c.cp.jsonpath(&["service", "echo"], "{.spec.clusterIP}");
    // Dual stack: the pod's and the Service's second address are IPv6.
    let echo_name = echo.keys().next().cloned().unwrap_or_default();
    let echo_ip6 =
        c.cp.jsonpath(&["pod", &echo_name], "{.status.podIPs[1].ip}");
    let cluster_ip6 = c.cp.jsonpath(&["service", "echo"], "{.spec.clusterIPs[1]}");
    assert!(
        echo_ip6.starts_with("fd00:10:244:"),
        "pod IPv6 {echo_ip6:?}"
    );
    assert!(
        cluster_ip6.starts_with("fd00:10:96::"),
        "ClusterIP IPv6 {cluster_ip6:?}"
    );

    // From a pod on every node, the server's node included.
    for (i, node) in c.nodes.iter().enumerate() {
        let name = format!("client-{i}");
        let checks = [
            ("tcp-pod-ip", "tcp", format!("{echo_ip}:7000")),
            ("tcp-cluster-ip", "tcp", format!("{cluster_ip}:7000")),
            ("udp-pod-ip", "udp", format!("{echo_ip}:7001")),
            ("udp-cluster-ip", "udp", format!("{cluster_ip}:7001")),
            ("tcp-node-port", "tcp", format!("{}:30700", node.ip)),
            ("tcp-pod-ipv6", "tcp", format!("[{echo_ip6}]:7000")),
            ("tcp-cluster-ipv6", "tcp", format!("[{cluster_ip6}]:7000")),
            ("udp-pod-ipv6", "udp", format!("[{echo_ip6}]:7001")),
            ("udp-cluster-ipv6", "udp", format!("[{cluster_ip6}]:7001")),
        ];
        let containers: String = checks
            .iter()
            .map(|(n, proto, to)| {
                format!(
                    "  - {{name: {n}, image: {}, args: [{proto}, \"{to}\", \"3\"]}}\n",
                    c.probe
                )
            })
            .collect();
        c.cp.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {}\n  restartPolicy: Never\n  containers:\n{containers}",
            node.name
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let phase = skiff_tests::wait_for(
            &format!("{name} to finish"),
            Duration::from_secs(90),
            || {
                let p = c.cp.jsonpath(&["pod", &name], "{.status.phase}");
                (p == "Succeeded" || p == "Failed").then_some(p)
            },
        );
        let client_ip = c.cp.jsonpath(&["pod", &name], "{.status.podIP}");
        let client_ip6 = c.cp.jsonpath(&["pod", &name], "{.status.podIPs[1].ip}");
        for (check, _, to) in &checks {
            let out = c.cp.kubectl_ok(&["logs", &name, "-c", check]);
            let v: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|e| panic!("{check} from {name}: {e}: {out}"));
            let source = if check.ends_with("ipv6") {
                &client_ip6
            } else {
                &client_ip
            };
            assert_eq!(
                v["answers"],
                serde_json::json!({ source.clone(): 3 }),
                "{check} {to} from {name} on {} ({phase}): every answer, with the pod's own address as the source: {out}",
                node.name
            );
        }
    }
}

#[test]
fn drain_evicts_with_the_grace_period_and_the_pods_come_back_elsewhere() {
    let c = Cluster::start(3);
    let shared = skiff_tests::TempDir::new();
    c.cp.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: slow
spec:
  replicas: 3
  selector:
    matchLabels: {{app: slow}}
  template:
    metadata:
      labels: {{app: slow}}
    spec:
      terminationGracePeriodSeconds: 20
      containers:
      - name: main
        image: {image}
        command: ["sh", "-c", "trap 'echo term >> /shared/$(hostname); sleep 3; echo done >> /shared/$(hostname); exit 0' TERM; while true; do sleep 0.2; done"]
        volumeMounts: [{{name: shared, mountPath: /shared}}]
      volumes: [{{name: shared, hostPath: {{path: {shared}}}}}]
"#,
        image = c.busybox,
        shared = shared.path.display()
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let before = c.ready_pods("app=slow", 3);
    let target = before
        .values()
        .map(|p| p.node.clone())
        .next()
        .unwrap_or_default();
    let evicted: Vec<&String> = before
        .iter()
        .filter(|(_, p)| p.node == target)
        .map(|(n, _)| n)
        .collect();
    let started = std::time::Instant::now();
    c.cp.kubectl_ok(&["drain", &target, "--ignore-daemonsets", "--timeout=90s"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "drain waits for the pods to stop: {took:?}"
    );
    assert_eq!(
        c.cp.jsonpath(&["node", &target], "{.spec.unschedulable}"),
        "true",
        "drain cordons the node"
    );
    for name in &evicted {
        let log = std::fs::read_to_string(shared.path.join(name)).unwrap_or_default();
        assert_eq!(log, "term\ndone\n", "{name} had its grace period");
    }
    let after = c.ready_pods("app=slow", 3);
    assert!(
        after.values().all(|p| p.node != target),
        "the replacements run elsewhere: {after:?}"
    );
    c.cp.kubectl_ok(&["uncordon", &target]);
    assert_eq!(
        c.cp.jsonpath(&["node", &target], "{.spec.unschedulable}"),
        ""
    );
}

#[test]
fn a_lost_node_has_its_pods_replaced_and_comes_back_clean() {
    let mut c = Cluster::start_with(
        3,
        &[
            "--node-monitor-grace-seconds",
            "8",
            "--pod-eviction-timeout-seconds",
            "2",
        ],
    );
    c.cp.apply(&web_app(&c.busybox, 3))
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = c.ready_pods("app=web", 3);
    // The lost node runs a web pod; the client runs elsewhere.
    let lost = c
        .nodes
        .iter()
        .position(|n| pods.values().any(|p| p.node == n.name))
        .unwrap_or_else(|| panic!("no node runs a web pod: {pods:?}"));
    let lost_name = c.nodes[lost].name.clone();
    let client_node = c
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != lost_name)
        .unwrap_or_default();
    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");

    // The node dies: its agent and containerd are killed and its link cut
    // (its containers live on, unreachable).
    let killed = std::time::Instant::now();
    if let Some(mut a) = c.nodes[lost].agent.take() {
        a.kill_now();
    }
    c.nodes[lost].containerd.proc.kill_now();
    c.ns(lost).ip(&["link", "set", "eth0", "down"]);

    skiff_tests::wait_for("the node NotReady", Duration::from_secs(60), || {
        let s = c.cp.jsonpath(
            &["node", &lost_name],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        (s == "Unknown" || s == "False").then_some(())
    });
    let not_ready = killed.elapsed();
    // Three ready web pods again, none on the lost node.
    let replaced = skiff_tests::wait_for("replacements elsewhere", Duration::from_secs(90), || {
        let pods = c.ready_pods("app=web", 3);
        pods.values().all(|p| p.node != lost_name).then_some(pods)
    });
    let script = format!(
        "for i in $(seq 1 12); do echo \"svc $(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1)\"; done"
    );
    let log = c.run_script("after-loss", &client_node, &script);
    let answers: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("svc ")).collect();
    assert_eq!(answers.len(), 12, "{log}");
    for a in &answers {
        let name = a
            .strip_prefix("hello from ")
            .unwrap_or_else(|| panic!("the Service serves again: {a:?}\n{log}"));
        assert!(
            replaced.contains_key(name),
            "{name} is a live pod: {replaced:?}"
        );
    }
    eprintln!(
        "node loss: NotReady after {:.1} s, the Service fully served again after {:.1} s",
        not_ready.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );

    // The node comes back: link, containerd, agent. Its stale containers
    // go and it is Ready again.
    c.ns(lost).ip(&["link", "set", "eth0", "up"]);
    c.nodes[lost].containerd.crash_and_restart();
    c.nodes[lost].start_agent();
    skiff_tests::wait_for("the node Ready again", Duration::from_secs(60), || {
        let s = c.cp.jsonpath(
            &["node", &lost_name],
            "{.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
        );
        (s.starts_with("True") && !s.contains("unreachable")).then_some(())
    });
    skiff_tests::wait_for(
        "the lost node's old pods and containers gone",
        Duration::from_secs(60),
        || {
            let left = c.cp.jsonpath(
                &[
                    "pods",
                    "-A",
                    "--field-selector",
                    &format!("spec.nodeName={lost_name}"),
                ],
                "{.items[*].metadata.name}",
            );
            (left.is_empty() && c.nodes[lost].containerd.containers().is_empty()).then_some(())
        },
    );
}

/// A pod's own credential: the ServiceAccount volume (token, CA,
/// namespace) and the `KUBERNETES_SERVICE_*` variables give a kube-rs
/// client in the pod in-cluster config; it reaches the apiserver through
/// the `kubernetes` ClusterIP and may do what RBAC grants its account.
#[test]
fn a_pod_talks_to_the_apiserver_as_its_service_account() {
    let c = Cluster::start(2);
    let node = c.nodes[1].name.clone();
    c.cp.kubectl_ok(&["create", "namespace", "apps"]);
    c.cp.kubectl_ok(&["create", "serviceaccount", "lister", "-n", "apps"]);
    c.cp.kubectl_ok(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
        "-n",
        "apps",
    ]);
    c.cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "lister-reads",
        "--role=pod-reader",
        "--serviceaccount=apps:lister",
        "-n",
        "apps",
    ]);
    let pod = |name: &str, sa: &str, command: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    command: {command}\n",
            image = c.probe
        )
    };
    let finished = |name: &str| {
        wait_for(
            &format!("pod {name} to finish"),
            Duration::from_secs(120),
            || {
                let phase =
                    c.cp.jsonpath(&["pod", name, "-n", "apps"], "{.status.phase}");
                (phase == "Succeeded" || phase == "Failed").then_some(phase)
            },
        )
    };
    c.cp.apply(&pod("whoami", "lister", "[/skiff-probe, in-cluster]"))
        .unwrap_or_else(|e| panic!("{e}"));
    let phase = finished("whoami");
    let log =
        c.cp.kubectl(&["logs", "whoami", "-n", "apps"])
            .unwrap_or_default();
    assert_eq!(phase, "Succeeded", "{log}");
    let out: serde_json::Value =
        serde_json::from_str(log.trim()).unwrap_or_else(|e| panic!("{e}: {log}"));
    assert_eq!(out["user"], "system:serviceaccount:apps:lister", "{out}");
    assert_eq!(out["namespace"], "apps");
    assert!(
        out["pods"]
            .as_array()
            .is_some_and(|p| p.iter().any(|n| n == "whoami")),
        "{out}"
    );
    // The volume the apiserver added and the kubelet filled.
    let mounts = c.cp.jsonpath(
        &["pod", "whoami", "-n", "apps"],
        "{.spec.containers[0].volumeMounts[0].mountPath}",
    );
    assert_eq!(mounts, "/var/run/secrets/kubernetes.io/serviceaccount");

    // The default account may not list pods: the pod sees the 403.
    c.cp.apply(&pod("nobody", "default", "[/skiff-probe, in-cluster]"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(finished("nobody"), "Failed");
    let log =
        c.cp.kubectl(&["logs", "nobody", "-n", "apps"])
            .unwrap_or_default();
    assert!(
        log.contains("listing pods") && log.contains("forbidden"),
        "{log}"
    );

    // automountServiceAccountToken: false leaves the pod without one.
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: plain, namespace: apps}}\nspec:\n  nodeName: {node}\n  automountServiceAccountToken: false\n  containers:\n  - {{name: main, image: {}, command: [sleep, '1']}}\n",
        c.busybox
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let volumes =
        c.cp.jsonpath(&["pod", "plain", "-n", "apps"], "{.spec.volumes}");
    assert_eq!(volumes, "", "no volume was added");
    let err =
        c.cp.apply(&pod("ghost", "missing", "[sleep, '1']"))
            .err()
            .unwrap_or_default();
    assert!(
        err.contains("serviceaccount \"missing\" not found"),
        "{err}"
    );
}

/// The verbs a user reaches for on a running pod: `exec` (streams, stdin,
/// a terminal, the exit code passed through), `attach`, `cp` (tar through
/// exec) and `port-forward` (to a port bound to the pod's loopback),
/// through the apiserver to the pod's kubelet.
#[test]
fn exec_attach_cp_and_port_forward_reach_a_running_pod() {
    let c = Cluster::start(2);
    let node = c.nodes[1].name.clone();
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: shell}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {}, command: [sleep, '3600'], env: [{{name: GREETING, value: hello}}]}}\n",
        c.busybox
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for("pod shell Running", Duration::from_secs(120), || {
        (c.cp.jsonpath(&["pod", "shell"], "{.status.phase}") == "Running").then_some(())
    });
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // Output streams apart, the container's environment, the exit code.
    let out = c.cp.kubectl_run(
        &[
            "exec",
            "shell",
            "--",
            "sh",
            "-c",
            "echo out $GREETING; echo err >&2; exit 3",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out hello\n");
    // kubectl adds its own line after the command's stderr.
    assert_eq!(
        text(&out.stderr),
        "err\ncommand terminated with exit code 3\n"
    );
    let ok = c.cp.kubectl_run(&["exec", "shell", "--", "true"], b"");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));

    // stdin, to its end.
    let upper = c.cp.kubectl_run(
        &["exec", "-i", "shell", "--", "tr", "a-z", "A-Z"],
        b"hello\nworld\n",
    );
    assert_eq!(
        text(&upper.stdout),
        "HELLO\nWORLD\n",
        "{}",
        text(&upper.stderr)
    );

    // A terminal: kubectl under `script` has one to offer.
    let kubeconfig = c.cp.kubeconfig.display().to_string();
    let tty = skiff_tests::Spawn::new("script")
        .netns_path(Some(&c.underlay.path()))
        .env("KUBECONFIG", &kubeconfig)
        .args([
            "-qec",
            "kubectl exec -it shell -- sh -c 'tty; echo term=$TERM; exit 4'",
            "/dev/null",
        ])
        .run_with_input(b"");
    let shown = text(&tty.stdout);
    assert!(
        shown.contains("/dev/pts/") && shown.contains("term=xterm"),
        "{shown} {}",
        text(&tty.stderr)
    );
    assert_eq!(tty.status.code(), Some(4), "{shown}");

    // cp both ways.
    let local = c.cp.dir.path.join("note.txt");
    std::fs::write(&local, "from the host side\n").unwrap_or_else(|e| panic!("{e}"));
    c.cp.kubectl_ok(&["cp", &local.display().to_string(), "shell:/tmp/note.txt"]);
    let read =
        c.cp.kubectl_ok(&["exec", "shell", "--", "cat", "/tmp/note.txt"]);
    assert_eq!(read, "from the host side\n");
    c.cp.kubectl_ok(&[
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        "echo made inside > /tmp/back.txt",
    ]);
    let back = c.cp.dir.path.join("back.txt");
    c.cp.kubectl_ok(&["cp", "shell:/tmp/back.txt", &back.display().to_string()]);
    assert_eq!(
        std::fs::read_to_string(&back).unwrap_or_default(),
        "made inside\n"
    );

    // attach follows the main process's output until it ends.
    c.cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ticker}}\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {}, command: [sh, -c, 'sleep 3; for i in 1 2 3; do echo tick $i; sleep 0.3; done; echo bye >&2']}}\n",
        c.busybox
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    wait_for("pod ticker Running", Duration::from_secs(120), || {
        (c.cp.jsonpath(&["pod", "ticker"], "{.status.phase}") == "Running").then_some(())
    });
    let attached = c.cp.kubectl_run(&["attach", "ticker"], b"");
    assert_eq!(
        attached.status.code(),
        Some(0),
        "{}",
        text(&attached.stderr)
    );
    assert!(
        text(&attached.stdout).contains("tick 1\ntick 2\ntick 3\n"),
        "{}",
        text(&attached.stdout)
    );
    assert!(
        text(&attached.stderr).contains("bye"),
        "{}",
        text(&attached.stderr)
    );

    // port-forward, to a port the pod serves on its loopback only.
    c.cp.kubectl_ok(&[
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo forwarded > /www/index.html && (httpd -p 127.0.0.1:8080 -h /www &)",
    ]);
    let mut forward = skiff_tests::Spawn::new("kubectl")
        .netns_path(Some(&c.underlay.path()))
        .env("KUBECONFIG", &kubeconfig)
        .args(["port-forward", "pod/shell", "18080:8080", "18081:8081"])
        .log_to(&c.cp.dir.path.join("port-forward.log"))
        .start();
    wait_for("port-forward listening", Duration::from_secs(20), || {
        forward
            .log_text()
            .contains("Forwarding from 127.0.0.1:18081")
            .then_some(())
    });
    let curl = |port: &str| {
        skiff_tests::Spawn::new("curl")
            .netns_path(Some(&c.underlay.path()))
            .args([
                "-s",
                "--max-time",
                "10",
                &format!("http://127.0.0.1:{port}/index.html"),
            ])
            .try_output()
    };
    for _ in 0..3 {
        assert_eq!(
            curl("18080").unwrap_or_else(|e| panic!("{e}\n{}", forward.log_text())),
            "forwarded\n"
        );
    }
    // Nothing listens on 8081 in the pod: the connection fails, kubectl says why.
    assert!(curl("18081").is_err());
    wait_for(
        "the forwarding error reported",
        Duration::from_secs(10),
        || {
            forward
                .log_text()
                .contains("error forwarding port 8081")
                .then_some(())
        },
    );
    // (kubectl itself gives up on a forwarding error: "lost connection".)
    forward.kill_now();
    // The same over plain SPDY, kubectl's fallback.
    let mut spdy = skiff_tests::Spawn::new("kubectl")
        .netns_path(Some(&c.underlay.path()))
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")
        .args(["port-forward", "pod/shell", "18082:8080"])
        .log_to(&c.cp.dir.path.join("port-forward-spdy.log"))
        .start();
    wait_for(
        "port-forward over SPDY listening",
        Duration::from_secs(20),
        || {
            spdy.log_text()
                .contains("Forwarding from 127.0.0.1:18082")
                .then_some(())
        },
    );
    assert_eq!(
        curl("18082").unwrap_or_else(|e| panic!("{e}\n{}", spdy.log_text())),
        "forwarded\n"
    );
    spdy.kill_now();

    // Bad input is named.
    let err =
        c.cp.kubectl(&["exec", "shell", "-c", "nope", "--", "true"])
            .err()
            .unwrap_or_default();
    assert!(
        err.contains("container nope is not valid for pod shell"),
        "{err}"
    );
    let err =
        c.cp.kubectl(&["exec", "shell", "--", "/no/such/binary"])
            .err()
            .unwrap_or_default();
    assert!(
        err.contains("no such file") || err.contains("not found"),
        "{err}"
    );
    // exec is `create pods/exec`: the view role may not.
    c.cp.kubectl_ok(&["create", "serviceaccount", "viewer"]);
    c.cp.kubectl_ok(&[
        "create",
        "rolebinding",
        "viewer-views",
        "--clusterrole=view",
        "--serviceaccount=default:viewer",
    ]);
    let err =
        c.cp.kubectl(&[
            "exec",
            "shell",
            "--as=system:serviceaccount:default:viewer",
            "--",
            "true",
        ])
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("cannot create resource \"pods/exec\""),
        "{err}"
    );
}
