//! `cargo xtask up`: Skiff doing its job in a network namespace it makes.
//! The control plane (etcd, skiff-control) runs there; `kubectl apply`
//! creates a Deployment and a NodePort Service; the scheduler places the
//! pods on the node; the agent follows the Service and its EndpointSlice
//! into the BPF maps; a client in the translated cgroup reaches the pods
//! through the ClusterIP and the NodePort; then one pod turns unready and
//! the traffic moves off it.
//!
//! There is no kubelet yet: the demo plays the node side for the pods,
//! starting a probe server for each and reporting it running and ready at
//! its address through `pods/status`, as a kubelet would.
//!
//! Then the pod network: two more nodes join a vxlan overlay through their
//! agents' leases in etcd, skiff-cni wires a pod on each, and the pods talk
//! by pod IP across the tunnel.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skiff_tests::control::ControlPlane;
use skiff_tests::overlay::{Cluster, Pod};
use skiff_tests::{Cgroup, Netns, PinDir, Proc, Spawn, TempDir, bin, wait_for};

const NODE_IP: &str = "10.202.0.1";
const POD_IPS: [&str; 3] = ["10.202.0.11", "10.202.0.12", "10.202.0.13"];

const APP: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: skiff-probe
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
";

fn list(pins: &PinDir) -> Result<String> {
    Spawn::new(bin("skiff-agent"))
        .args(["proxy", "list", "--bpffs"])
        .args([&pins.path])
        .try_output()
        .map_err(anyhow::Error::msg)
}

fn traffic(ns: &Netns, cg: &Cgroup, to: &str, n: u32) -> Result<BTreeMap<String, u64>> {
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", to, &n.to_string()])
        .netns(ns)
        .cgroup(cg)
        .try_output()
        .map_err(anyhow::Error::msg)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("probe output")?;
    if let Some(e) = v["errors"].as_object().filter(|e| !e.is_empty()) {
        bail!("connections failed: {e:?}");
    }
    Ok(v["answers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, c)| (k.clone(), c.as_u64().unwrap_or(0)))
        .collect())
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    cp.kubectl(args).map_err(anyhow::Error::msg)
}

fn show(cp: &ControlPlane, args: &[&str]) -> Result<()> {
    println!(
        "\n$ kubectl {}\n{}",
        args.join(" "),
        kubectl(cp, args)?.trim_end()
    );
    Ok(())
}

/// Runs each scheduled pod: a probe server at its address, reported
/// Running and Ready.
fn run_pods(cp: &ControlPlane, ns: &Netns) -> Result<(Vec<Proc>, Vec<String>)> {
    let names = wait_for(
        "the scheduler to place 3 pods",
        Duration::from_secs(30),
        || {
            let out = cp
                .kubectl(&[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "--field-selector=spec.nodeName=demo-node",
                    "-o",
                    "name",
                ])
                .ok()?;
            let names: Vec<String> = out
                .lines()
                .map(|l| l.trim_start_matches("pod/").to_string())
                .collect();
            (names.len() == 3).then_some(names)
        },
    );
    let mut servers = Vec::new();
    for (name, ip) in names.iter().zip(POD_IPS) {
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "skd0"]);
        let mut p = Spawn::new(bin("skiff-probe"))
            .args(["serve-tcp", &format!("{ip}:8080"), name])
            .netns(ns)
            .start();
        if p.ask("") != "ready" {
            bail!("the server of pod {name} did not start");
        }
        servers.push(p);
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","hostIP":"{NODE_IP}","conditions":[{{"type":"Ready","status":"True"}}],"containerStatuses":[{{"name":"web","image":"skiff-probe","imageID":"","ready":true,"restartCount":0,"started":true,"state":{{"running":{{}}}}}}]}}}}"#
        );
        kubectl(
            cp,
            &[
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
        )?;
    }
    Ok((servers, names))
}

/// Two nodes on a vxlan overlay, a pod on each, one talking to the other.
fn pod_network() -> Result<(Cluster, Vec<Pod>, Vec<Proc>)> {
    println!("\npod network: two nodes join a vxlan overlay (leases in etcd)");
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
    );
    c.start_all(&[]);
    println!("$ etcdctl get --prefix --keys-only /coreos.com/network/subnets/");
    for k in c.lease_keys() {
        println!("{k}");
    }
    let peer = c.nodes[1].subnet();
    wait_for("node 0 to route to node 1", Duration::from_secs(10), || {
        c.nodes[0].routes().contains(&peer).then_some(())
    });
    println!("node 0 $ ip route\n{}", c.nodes[0].routes().trim_end());
    let pods: Vec<Pod> = c.nodes.iter().map(|n| n.add_pod()).collect();
    println!(
        "skiff-cni ADD: pod {} on node 0, pod {} on node 1",
        pods[0].ip, pods[1].ip
    );
    let mut server = Spawn::new(bin("skiff-probe"))
        .args(["serve-tcp", &format!("{}:7000", pods[1].ip), "%peer"])
        .netns(&pods[1].ns)
        .start();
    if server.ask("") != "ready" {
        bail!("the pod's server did not start");
    }
    let out = Spawn::new(bin("skiff-probe"))
        .args(["tcp", &format!("{}:7000", pods[1].ip), "5"])
        .netns(&pods[0].ns)
        .try_output()
        .map_err(anyhow::Error::msg)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("skiff-probe output")?;
    println!(
        "5 connections pod {} -> pod {}:7000 over vxlan; the server saw them come from {} (no NAT)",
        pods[0].ip, pods[1].ip, v["answers"]
    );
    Ok((c, pods, vec![server]))
}

pub fn run(once: bool) -> Result<()> {
    let ns = Netns::new();
    ns.add_local_link("skd0", &[&format!("{NODE_IP}/24")]);
    let cg = Cgroup::new();
    let pins = PinDir::new();
    let logs = TempDir::new();
    println!(
        "network namespace {} ({NODE_IP}/24), client cgroup {}",
        ns.name,
        cg.path.display()
    );

    let cp = ControlPlane::start_in(Some(&ns), &["--node-monitor-grace-seconds", "3600"]);
    println!(
        "control plane up: etcd {} and skiff-control {}",
        cp.etcd.url, cp.server
    );
    cp.add_node("demo-node", "", "4");
    let app = logs.path.join("app.yaml");
    std::fs::write(&app, APP)?;
    println!(
        "\n$ kubectl apply -f app.yaml\n{}",
        kubectl(&cp, &["apply", "-f", &app.display().to_string()])?.trim_end()
    );
    let (servers, names) = run_pods(&cp, &ns)?;

    let agent = Spawn::new(bin("skiff-agent"))
        .args(["run", "--roles", "proxy", "--kubeconfig"])
        .args([&cp.kubeconfig])
        .args(["--cgroup"])
        .args([&cg.path])
        .args(["--bpffs"])
        .args([&pins.path])
        .args(["--node-name", "demo-node", "--nodeport-address", NODE_IP])
        .netns(&ns)
        .log_to(&logs.path.join("agent.log"))
        .start();
    wait_for(
        "the agent to program the service",
        Duration::from_secs(30),
        || {
            list(&pins)
                .ok()
                .filter(|l| POD_IPS.iter().all(|ip| l.contains(&format!("{ip}:8080"))))
        },
    );
    kubectl(
        &cp,
        &["rollout", "status", "deployment/web", "--timeout=30s"],
    )?;
    show(
        &cp,
        &["get", "deployment,pods,service,endpointslice", "-o", "wide"],
    )?;
    println!("\n$ skiff-agent proxy list\n{}", list(&pins)?.trim_end());

    let vip = kubectl(
        &cp,
        &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"],
    )?;
    println!(
        "\n60 connections to the ClusterIP {vip}:80 -> {:?}",
        traffic(&ns, &cg, &format!("{vip}:80"), 60)?
    );
    println!(
        "60 connections to the NodePort {NODE_IP}:30080 -> {:?}",
        traffic(&ns, &cg, &format!("{NODE_IP}:30080"), 60)?
    );

    let (pod, ip) = (&names[2], POD_IPS[2]);
    println!("\npod {pod} ({ip}) becomes not ready...");
    kubectl(
        &cp,
        &[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
        ],
    )?;
    wait_for(
        "the agent to drop the unready pod",
        Duration::from_secs(15),
        || {
            list(&pins)
                .ok()
                .filter(|l| !l.contains(&format!("{ip}:8080")))
        },
    );
    println!(
        "60 connections to the ClusterIP {vip}:80 -> {:?}",
        traffic(&ns, &cg, &format!("{vip}:80"), 60)?
    );

    let (net, _net_pods, _net_servers) = pod_network()?;

    if !once {
        println!(
            "\nSkiff is up. Try:\n  ip netns exec {ns} kubectl --kubeconfig {kc} get pods -o wide\n  ip netns exec {ns} sh -c 'echo $$ > {cg}/cgroup.procs; exec {probe} tcp {vip}:80 10'",
            ns = ns.name,
            kc = cp.kubeconfig.display(),
            cg = cg.path.display(),
            probe = bin("skiff-probe").display()
        );
        println!("Press Ctrl-C to tear it down.");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut signals = nix::sys::signal::SigSet::empty();
        signals.add(nix::sys::signal::Signal::SIGINT);
        signals.add(nix::sys::signal::Signal::SIGTERM);
        signals.thread_block().context("blocking signals")?;
        std::thread::spawn(move || {
            let _ = signals.wait();
            let _ = tx.send(());
        });
        let _ = rx.recv();
    }
    drop(agent);
    drop(servers);
    drop(cp);
    drop(net);
    println!("torn down");
    Ok(())
}
