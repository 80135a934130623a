//! The multi-node harness: an "underlay" namespace holding a bridge that
//! joins the nodes, a real etcd listening on the underlay, and one
//! namespace per node with its own `skiff-agent --roles overlay`. Pods are
//! namespaces wired by calling `skiff-cni` inside their node's namespace,
//! as a runtime would. Nothing routes out of the namespaces made here.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cni::{Call, Reply, ip_of};
use crate::control::Etcd;
use crate::netns::ip;
use crate::{Netns, Proc, Spawn, TempDir, bin, unique, wait_for};

/// The underlay network: node i is 172.31.0.<i+1>, etcd 172.31.0.254.
pub const UNDERLAY_GW: &str = "172.31.0.254";

pub fn node_ip(i: usize) -> String {
    format!("172.31.0.{}", i + 1)
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    pub underlay: Netns,
    pub dir: TempDir,
}

pub struct Node {
    pub ns: Netns,
    pub ip: String,
    pub subnet_file: PathBuf,
    pub cni_dir: PathBuf,
    pub agent: Option<Proc>,
    pub agent_args: Vec<String>,
    log: PathBuf,
    starts: u32,
    /// `--etcd` and the overlay's client certificate.
    etcd_args: Vec<String>,
}

pub struct Pod {
    pub ns: Netns,
    pub id: String,
    pub ip: String,
    pub result: Value,
}

/// The underlay: a namespace holding bridge `br0` at [`UNDERLAY_GW`], and
/// `n` node namespaces, each with `eth0` on the bridge at [`node_ip`].
pub fn underlay(n: usize) -> (Netns, Vec<(Netns, String)>) {
    let underlay = Netns::new();
    underlay.ip(&["link", "add", "br0", "type", "bridge"]);
    underlay.ip(&["addr", "add", &format!("{UNDERLAY_GW}/24"), "dev", "br0"]);
    underlay.ip(&["link", "set", "br0", "up"]);
    let nodes = (0..n).map(|i| attach(&underlay, i)).collect();
    (underlay, nodes)
}

/// Node `i`'s namespace, with `eth0` on the underlay's bridge at
/// [`node_ip`]`(i)`.
pub fn attach(underlay: &Netns, i: usize) -> (Netns, String) {
    let ns = Netns::new();
    let port = format!("u{i}");
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &ns.name,
        "type",
        "veth",
        "peer",
        "name",
        &port,
        "netns",
        &underlay.name,
    ]);
    underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
    let addr = node_ip(i);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    // The link-local address is usable as soon as the link is up, as on a
    // machine booted long before: a node publishes it as its IPv6 next hop
    // (host-gw), and a tentative one answers no neighbour solicitation for
    // its first second or two.
    ns.exec(&[
        "sh",
        "-c",
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad",
    ]);
    ns.ip(&["link", "set", "eth0", "up"]);
    (ns, addr)
}

impl Cluster {
    /// `n` nodes on one underlay bridge and an etcd holding `network` as
    /// the Flannel network config. Agents are not started.
    pub fn new(n: usize, network: &str) -> Self {
        let (underlay, node_ns) = underlay(n);
        let etcd = Etcd::start_on(Some(&underlay), UNDERLAY_GW);
        let dir = TempDir::new();
        let nodes = node_ns
            .into_iter()
            .enumerate()
            .map(|(i, (ns, addr))| Node {
                subnet_file: dir.path.join(format!("node{i}-subnet.env")),
                cni_dir: dir.path.join(format!("node{i}-cni")),
                log: dir.path.join(format!("node{i}")),
                ns,
                ip: addr,
                agent: None,
                agent_args: Vec::new(),
                starts: 0,
                etcd_args: etcd.client_args(crate::control::EtcdClient::Overlay),
            })
            .collect();
        let c = Self {
            nodes,
            etcd,
            underlay,
            dir,
        };
        c.etcd
            .ctl(&["put", "/coreos.com/network/config", network])
            .unwrap_or_else(|e| panic!("{e}"));
        c
    }

    /// Starts every node's agent and waits until each has written its
    /// subnet file.
    pub fn start_all(&mut self, extra: &[&str]) {
        for n in &mut self.nodes {
            n.start_agent(extra);
        }
        for n in &self.nodes {
            n.wait_ready();
        }
    }

    /// The lease keys in etcd.
    pub fn lease_keys(&self) -> Vec<String> {
        self.etcd
            .ctl(&[
                "get",
                "--prefix",
                "--keys-only",
                "/coreos.com/network/subnets/",
            ])
            .unwrap_or_else(|e| panic!("{e}"))
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Node {
    pub fn start_agent(&mut self, extra: &[&str]) {
        self.starts += 1;
        self.agent_args = extra.iter().map(|s| s.to_string()).collect();
        let p = Spawn::new(bin("skiff-agent"))
            .args(["run", "--roles", "overlay"])
            .args(&self.etcd_args)
            .args(["--iface", "eth0"])
            .args(["--subnet-file"])
            .args([&self.subnet_file])
            .args(["--cni-records"])
            .args([self.cni_dir.join("skiff")])
            .args(extra)
            .env("RUST_LOG", "info")
            .netns(&self.ns)
            .log_to(&self.log.with_extension(format!("agent{}.log", self.starts)))
            .start();
        self.agent = Some(p);
    }

    /// The agent's log of its latest start.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Waits for "overlay ready" in the agent's latest log; returns the
    /// node's subnet (`10.244.3.0/24`).
    pub fn wait_ready(&self) -> String {
        wait_for(
            &format!("the agent on {} to be ready", self.ip),
            Duration::from_secs(30),
            || self.agent_log().contains("overlay ready").then_some(()),
        );
        self.subnet()
    }

    /// The subnet in the node's subnet file, in network form
    /// (`10.244.3.0/24`), read the way the CNI plugin reads it.
    pub fn subnet(&self) -> String {
        skiff_cni_lib::subnet_env::SubnetEnv::read(&self.subnet_file)
            .unwrap_or_else(|e| panic!("{e}"))
            .subnet_network()
            .to_string()
    }

    /// `ip route` in the node.
    pub fn routes(&self) -> String {
        self.ns.exec(&["ip", "route"])
    }

    /// Neighbour and FDB entries on the VTEP.
    pub fn vtep_entries(&self) -> String {
        let neigh = self.ns.exec(&["ip", "neigh", "show", "dev", "flannel.1"]);
        let fdb = self.ns.exec(&["bridge", "fdb", "show", "dev", "flannel.1"]);
        format!("{neigh}{fdb}")
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.terminate();
        }
    }

    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill_now();
        }
    }

    /// The plugin configuration for this node.
    pub fn cni_conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "skiff",
            "type": "skiff-cni",
            "subnetFile": self.subnet_file,
            "dataDir": self.cni_dir,
        })
    }

    /// Calls skiff-cni in this node for a fresh pod namespace.
    pub fn cni(&self, command: &str, pod_ns: &Netns, id: &str) -> Reply {
        let path = pod_ns.path();
        Call {
            node: &self.ns,
            command,
            container_id: id,
            netns: &path,
            ifname: "eth0",
        }
        .exec(&bin("skiff-cni"), &self.cni_conf("1.1.0"))
    }

    /// A pod: a new namespace wired by ADD.
    pub fn add_pod(&self) -> Pod {
        let ns = Netns::new();
        let id = unique("pod");
        let r = self.cni("ADD", &ns, &id);
        assert!(r.ok, "ADD on {}: {} {}", self.ip, r.stdout, r.stderr);
        Pod {
            ip: ip_of(&r),
            result: r.json(),
            ns,
            id,
        }
    }
}
