//! `cargo xtask up`: a three-node Skiff cluster on this machine. An
//! underlay namespace holds etcd, `skiff-control` and the image registry;
//! three node namespaces on its bridge each run their own containerd and
//! `skiff-agent` with every role (kubelet, eBPF service proxy, vxlan
//! overlay). `kubectl apply` of a busybox-httpd Deployment and its Service;
//! a client pod on another node fetches through the ClusterIP and by pod IP
//! across the tunnel, and says which pod answered. Then the cluster stays
//! up for the host's kubectl, through a loopback port that is forwarded
//! into the underlay namespace (the host dials nothing else), until Ctrl-C.
//!
//! `--ha`: the control plane is three members, each a namespace on the
//! underlay with an etcd member and a `skiff-control` replica. After the
//! fetches the first member is killed (its apiserver and its etcd member):
//! the leases move to another replica, the nodes' agents move to another
//! apiserver, and the fetches go on.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use anyhow::{Context, Result};
use skiff_tests::cluster::{Cluster, PodAt, web_app};
use skiff_tests::control::ControlPlane;

fn show(cp: &ControlPlane, args: &[&str]) -> Result<()> {
    let out = cp.kubectl(args).map_err(anyhow::Error::msg)?;
    println!("\n$ kubectl {}\n{}", args.join(" "), out.trim_end());
    Ok(())
}

/// Serves a loopback port on the host: each connection is joined to one
/// made from inside the namespace at `netns` to `target` there.
fn forward(netns: String, target: SocketAddr) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let upstream = skiff_netlink::NetnsGuard::enter(&netns)
                    .map_err(std::io::Error::other)
                    .and_then(|_inside| TcpStream::connect(target));
                let Ok(upstream) = upstream else {
                    let _ = client.shutdown(Shutdown::Both);
                    return;
                };
                let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
                    return;
                };
                let (mut c1, mut u1) = (client, upstream);
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut u1);
                    let _ = u1.shutdown(Shutdown::Write);
                });
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(port)
}

pub fn run(once: bool, ha: bool) -> Result<()> {
    // Ctrl-C is taken once everything is up (and then tears it down);
    // every thread started from here on inherits the block.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block().context("blocking signals")?;

    println!(
        "three nodes on an underlay bridge, each with containerd and skiff-agent (kubelet, proxy, overlay)..."
    );
    let mut c = if ha {
        println!(
            "...and a control plane of three members, each with an etcd member and a skiff-control replica"
        );
        Cluster::start_ha(3)
    } else {
        Cluster::start(3)
    };
    println!(
        "underlay namespace {}: etcd {}, skiff-control {}, registry {}",
        c.underlay.name, c.cp.etcd.url, c.cp.server, c.registry.addr
    );
    for r in &c.replicas {
        println!("  and skiff-control {}", r.server);
    }
    show(&c.cp, &["get", "nodes", "-o", "wide"])?;
    if ha {
        show(&c.cp, &["get", "endpoints", "kubernetes"])?;
        show(&c.cp, &["-n", "kube-system", "get", "leases"])?;
    }

    let app = c.cp.dir.path.join("web.yaml");
    std::fs::write(&app, web_app(&c.busybox, 3))?;
    show(&c.cp, &["apply", "-f", &app.display().to_string()])?;
    let pods = c.ready_pods("app=web", 3);
    show(&c.cp, &["get", "pods", "-o", "wide"])?;
    show(&c.cp, &["get", "service", "web"])?;

    let cluster_ip = c.cp.jsonpath(&["service", "web"], "{.spec.clusterIP}");
    let client_node = c.quietest_node(&pods);
    let ips: Vec<&str> = pods.values().map(|p| p.ip.as_str()).collect();
    let script = format!(
        "for i in 1 2 3 4 5 6; do echo \"http://{cluster_ip}/ -> $(timeout 5 wget -qO- http://{cluster_ip}/ 2>&1)\"; done; \
         for ip in {ips}; do echo \"http://$ip/ -> $(timeout 5 wget -qO- http://$ip/ 2>&1)\"; done",
        ips = ips.join(" ")
    );
    println!(
        "\na client pod on {client_node} fetches through the ClusterIP, then from each pod IP:"
    );
    let log = c.run_script("client", &client_node, &script);
    let node_of = |line: &str| -> String {
        pods.iter()
            .find(|(name, _)| line.ends_with(name.as_str()))
            .map(|(_, PodAt { node, .. })| {
                if *node == client_node {
                    format!("(on {node}, the client's node)")
                } else {
                    format!("(on {node}, across the vxlan tunnel)")
                }
            })
            .unwrap_or_default()
    };
    for line in log.lines().filter(|l| !l.is_empty()) {
        println!("  {line} {}", node_of(line));
    }

    if ha && !c.replicas.is_empty() {
        println!(
            "
killing the first control-plane member: skiff-control {} and its etcd member",
            c.cp.server
        );
        let killed = std::fs::read_to_string(c.cp.dir.path.join("leader-identity"))
            .unwrap_or_default()
            .trim()
            .to_string();
        c.cp.proc.kill_now();
        c.cp.etcd.kill_member(0);
        let started = std::time::Instant::now();
        let survivor = c.replicas.remove(0);
        let moved = skiff_tests::wait_until(std::time::Duration::from_secs(40), || {
            let holder = survivor.jsonpath(
                &["lease", "-n", "kube-system", "kube-controller-manager"],
                "{.spec.holderIdentity}",
            );
            !holder.is_empty() && holder != killed
        });
        if moved {
            println!(
                "the controllers' lease moved to a surviving replica {:.1} s after the kill",
                started.elapsed().as_secs_f64()
            );
        } else {
            println!("the controllers' lease did not move within 40 s");
        }
        show(&survivor, &["-n", "kube-system", "get", "leases"])?;
        show(&survivor, &["get", "nodes"])?;
        let log =
            Cluster::run_script_on(&survivor, &c.busybox, "client-after", &client_node, &script);
        println!("the client pod's fetches, with the first member gone:");
        for line in log.lines().filter(|l| !l.is_empty()) {
            println!("  {line} {}", node_of(line));
        }
        c.replicas.insert(0, survivor);
    }

    if !once {
        // With --ha the first member is gone: the host reaches a survivor.
        let (cp, netns) = match (c.replicas.first(), c.control_ns.get(1)) {
            (Some(r), Some((ns, _))) if ha => (r, ns.path()),
            _ => (&c.cp, c.underlay.path()),
        };
        let port = forward(netns, format!("127.0.0.1:{}", cp.port()).parse()?)?;
        let kubeconfig = std::env::current_dir()?.join("target/skiff-up.kubeconfig");
        cp.write_kubeconfig(&format!("https://127.0.0.1:{port}"), &kubeconfig);
        let kc = kubeconfig.display();
        println!(
            "\nSkiff is up. From this shell:\n  export KUBECONFIG={kc}\n  kubectl get nodes -o wide\n  kubectl get pods -A -o wide\n  kubectl logs client\n(the apiserver is reached through 127.0.0.1:{port}, forwarded into the cluster's namespace)"
        );
        println!("Press Ctrl-C to tear it down.");
        let _ = signals.wait();
        let _ = std::fs::remove_file(&kubeconfig);
    }
    drop(c);
    println!("torn down");
    Ok(())
}
