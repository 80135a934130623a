//! Installing the network half onto a cluster whose nodes run only the
//! kubelet: `kubectl apply -f deploy/skiff-node.yaml`, then rolling the
//! DaemonSet to a new image under load.

use std::time::Duration;

use skiff_tests::cluster::{Cluster, web_app};
use skiff_tests::wait_for;

/// The DaemonSet's pods: `node -> (image, ready)`, terminating ones left
/// out.
fn agent_pods(c: &Cluster) -> std::collections::BTreeMap<String, (String, bool)> {
    let out = c.cp.jsonpath(
        &["pods", "-n", "kube-system", "-l", "app=skiff-node"],
        r#"{range .items[*]}{.spec.nodeName} {.spec.containers[0].image} {.status.conditions[?(@.type=="Ready")].status} {.metadata.deletionTimestamp}{"\n"}{end}"#,
    );
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_string(), (f[1].to_string(), f[2] == "True")))
        })
        .collect()
}

fn wait_agents(c: &Cluster, image: &str) {
    let n = c.nodes.len();
    wait_for(
        &format!("skiff-node Ready on {n} nodes with {image}"),
        Duration::from_secs(180),
        || {
            let pods = agent_pods(c);
            (pods.len() == n && pods.values().all(|(i, r)| i == image && *r)).then_some(())
        },
    );
}

#[test]
fn the_daemonset_gives_kubelet_only_nodes_pod_networking_and_services_and_rolls_without_a_lost_request()
 {
    let c = Cluster::start_bare(2);
    let image = c.registry.push(&c.underlay, "skiff-node", "skiff-node:1");
    // Nodes without a pod network: NotReady and saying why, tainted so
    // nothing but what tolerates it (the DaemonSet) lands there.
    for n in &c.nodes {
        let conf = n.dir.path.join("host/etc-cni-net.d/10-skiff.conflist");
        assert!(!conf.exists(), "{} before the install", conf.display());
        let why = c.cp.jsonpath(
            &["node", &n.name],
            r#"{.status.conditions[?(@.type=="Ready")].message}"#,
        );
        assert!(why.contains("NetworkReady=false"), "{why}");
        wait_for(
            &format!("{} tainted not-ready", n.name),
            Duration::from_secs(20),
            || {
                let taints = c.cp.jsonpath(&["node", &n.name], "{.spec.taints[*].key}");
                taints
                    .contains("node.kubernetes.io/not-ready")
                    .then_some(())
            },
        );
    }
    // The manifest as shipped, with its network made dual stack to match
    // the control plane's two cluster CIDRs.
    let manifest = c.node_manifest(&image);
    let v4_only = "\"Network\": \"10.244.0.0/16\",";
    assert!(manifest.contains(v4_only), "net-conf.json changed");
    let manifest = manifest.replace(
        v4_only,
        "\"Network\": \"10.244.0.0/16\", \"EnableIPv6\": true, \"IPv6Network\": \"fd00:10:244::/56\",",
    );
    c.cp.apply(&manifest).unwrap_or_else(|e| panic!("{e}"));
    wait_agents(&c, &image);
    // With the conflist and plugin in place the nodes are Ready.
    c.wait_all_ready();
    for n in &c.nodes {
        wait_for(
            &format!("{} untainted", n.name),
            Duration::from_secs(20),
            || {
                let taints = c.cp.jsonpath(&["node", &n.name], "{.spec.taints[*].key}");
                (!taints.contains("not-ready")).then_some(())
            },
        );
    }

    // The init step put the plugin and the conflist on every node, and the
    // overlay published each node's VTEP on its Node.
    for n in &c.nodes {
        let host = n.dir.path.join("host");
        assert!(
            host.join("opt-cni-bin/skiff-cni").is_file(),
            "skiff-cni on {}",
            n.name
        );
        let conf = std::fs::read_to_string(host.join("etc-cni-net.d/10-skiff.conflist"))
            .unwrap_or_else(|e| panic!("conflist on {}: {e}", n.name));
        assert!(conf.contains("skiff-cni"), "{conf}");
        let ip = c.cp.jsonpath(
            &["node", &n.name],
            r#"{.metadata.annotations.flannel\.alpha\.coreos\.com/public-ip}"#,
        );
        assert_eq!(ip, n.ip, "node {} publishes its address", n.name);
    }
    let cidrs: Vec<String> = c
        .nodes
        .iter()
        .map(|n| c.cp.jsonpath(&["node", &n.name], "{.spec.podCIDRs}"))
        .collect();
    for (n, cidr) in c.nodes.iter().zip(&cidrs) {
        assert!(
            cidr.contains("10.244.") && cidr.contains("fd00:10:244:"),
            "{} has a podCIDR of each family: {cidr}",
            n.name
        );
    }
    // Its ServiceAccount may do what the roles need and nothing more.
    let can = |args: &[&str]| {
        let mut all = vec![
            "auth",
            "can-i",
            "--as=system:serviceaccount:kube-system:skiff-node",
        ];
        all.extend(args);
        // can-i exits 1 for "no".
        let out = c.cp.kubectl_run(&all, b"");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (args, want) in [
        (&["watch", "services"][..], "yes"),
        (&["list", "endpointslices.discovery.k8s.io"], "yes"),
        (&["watch", "nodes"], "yes"),
        (&["patch", "nodes", "--subresource=status"], "yes"),
        (&["patch", "nodes"], "no"),
        (&["delete", "nodes"], "no"),
        (&["list", "pods"], "no"),
        (&["get", "secrets", "-n", "kube-system"], "no"),
        (&["create", "services"], "no"),
    ] {
        assert_eq!(can(args), want, "can-i {args:?}");
    }

    // Pods on both nodes, a client on the first: by ClusterIP and by the
    // other node's pod IP.
    c.cp.apply(&web_app(&c.busybox, 4))
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = c.ready_pods("app=web", 4);
    let client_node = c.nodes[0].name.clone();
    let remote = pods
        .iter()
        .find(|(_, p)| p.node != client_node)
        .map(|(name, p)| (name.clone(), p.ip.clone()))
        .unwrap_or_else(|| panic!("a web pod on the other node: {pods:?}"));
    // Its IPv6 address, from the other node's IPv6 podCIDR.
    let remote6 = c.cp.jsonpath(&["pod", &remote.0], "{.status.podIPs[1].ip}");
    assert!(remote6.starts_with("fd00:10:244:"), "{remote6:?}");
    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    c.start_script(
        "load",
        &client_node,
        &format!(
            "while [ ! -e /tmp/stop ]; do \
               s=$(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1); echo \"svc $s\"; \
               p=$(timeout 5 wget -qO- http://{ip}/ 2>&1); echo \"pod $p\"; \
               q=$(timeout 5 wget -qO- http://[{remote6}]/ 2>&1); echo \"pod6 $q\"; sleep 0.05; \
             done; echo done",
            ip = remote.1
        ),
    );
    let counts = |log: &str| {
        let ok = log
            .lines()
            .filter(|l| {
                l.strip_prefix("svc hello from ")
                    .is_some_and(|n| pods.contains_key(n))
                    || l == &format!("pod hello from {}", remote.0)
                    || l == &format!("pod6 hello from {}", remote.0)
            })
            .count();
        let all = log
            .lines()
            .filter(|l| l.starts_with("svc ") || l.starts_with("pod"))
            .count();
        (ok, all)
    };
    wait_for("the load to flow", Duration::from_secs(60), || {
        let log = c.cp.kubectl(&["logs", "load"]).unwrap_or_default();
        (counts(&log).0 >= 20).then_some(())
    });

    // Roll the DaemonSet to another image while the load runs.
    let next = c.registry.push_labelled(
        &c.underlay,
        "skiff-node",
        "skiff-node:2",
        Some(("dev.skiff.build", "2")),
    );
    c.cp.kubectl_ok(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "daemonset/skiff-node",
        &format!("skiff-agent={next}"),
        &format!("install-cni={next}"),
    ]);
    wait_agents(&c, &next);
    // A little load on the new agents, then stop the client.
    let before = counts(&c.cp.kubectl(&["logs", "load"]).unwrap_or_default()).1;
    wait_for("load after the roll", Duration::from_secs(30), || {
        let log = c.cp.kubectl(&["logs", "load"]).unwrap_or_default();
        (counts(&log).1 >= before + 20).then_some(())
    });
    c.cp.kubectl_ok(&["exec", "load", "--", "touch", "/tmp/stop"]);
    let log = wait_for("the load to stop", Duration::from_secs(30), || {
        let log = c.cp.kubectl(&["logs", "load"]).unwrap_or_default();
        log.trim_end().ends_with("done").then_some(log)
    });
    let (ok, all) = counts(&log);
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("svc ") || l.starts_with("pod"))
        .filter(|l| !l.contains("hello from "))
        .take(10)
        .collect();
    assert_eq!(
        ok,
        all,
        "{} of {all} requests failed across the roll: {failed:?}",
        all - ok
    );
    assert!(all > 60, "the load ran through the roll: {all} requests");
    let over_ipv6 = log
        .lines()
        .filter(|l| l.starts_with("pod6 hello from "))
        .count();
    assert!(
        over_ipv6 * 3 >= all - 3,
        "a third of the requests went to the pod's IPv6 address: {over_ipv6} of {all}"
    );

    // Nothing moved: same subnets, and a pod started after the roll gets
    // the network and Services.
    let after: Vec<String> = c
        .nodes
        .iter()
        .map(|n| c.cp.jsonpath(&["node", &n.name], "{.spec.podCIDRs}"))
        .collect();
    assert_eq!(cidrs, after);
    let log = c.run_script(
        "late",
        &c.nodes[1].name,
        &format!("timeout 5 wget -qO- http://{cluster_ip}/"),
    );
    assert!(log.starts_with("hello from "), "{log}");
}
