//! A whole cluster on one machine: an underlay namespace holding etcd,
//! `skiff-control` and the image registry on bridge `br0`, and nodes on
//! that bridge, each a namespace with its own containerd and `skiff-agent`
//! running every role (kubelet, proxy, overlay on vxlan). The host reaches
//! none of it; kubectl runs inside the underlay namespace.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::control::{ControlPlane, Etcd};
use crate::node::{KubeletNode, NodeNetwork, NodeSetup, Registry};
use crate::overlay::{UNDERLAY_GW, attach, underlay};
use crate::{Netns, wait_for};

/// A Deployment `web` of `replicas` busybox httpd pods that answer "hello
/// from <pod name>" on port 80 (ready once they do), and its ClusterIP
/// Service `web` on port 80.
pub fn web_app(image: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
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

/// A pod as `kubectl get` shows it.
#[derive(Clone, Debug)]
pub struct PodAt {
    pub ip: String,
    pub node: String,
}

/// The Flannel network config the overlay reads: dual stack, so pods have
/// an address of each family.
pub const NETWORK: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "vxlan"}}"#;

/// ClusterIP ranges, one per family (IPv4 primary): Services are IPv4
/// unless they ask for both.
pub const SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:10:96::/108";

/// The underlay's IPv6 gateway (its bridge).
pub const UNDERLAY_GW6: &str = "fd00:31::fe";

/// Node `i`'s IPv6 address on the underlay (beside its IPv4
/// `overlay::node_ip`): NodePorts are served on both.
pub fn node_ipv6(i: usize) -> String {
    format!("fd00:31::{:x}", i + 1)
}

/// Gives the underlay namespace `ns` (node or client `i`) its IPv6
/// address, usable at once.
pub fn add_underlay_ipv6(ns: &Netns, i: usize) {
    add_ipv6(ns, &node_ipv6(i), "eth0");
}

/// `addr`/64 on `dev` in `ns`, usable at once (no duplicate detection).
fn add_ipv6(ns: &Netns, addr: &str, dev: &str) {
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{addr}/64"),
        "dev",
        dev,
        "nodad",
    ]);
}

pub struct Cluster {
    // Dropped first: the agents and containerds go before what they use.
    pub nodes: Vec<KubeletNode>,
    pub cp: ControlPlane,
    /// Further control-plane replicas ([`Cluster::start_ha`]), each in
    /// its namespace of `control_ns`.
    pub replicas: Vec<ControlPlane>,
    pub registry: Registry,
    /// `<registry>/busybox:1.36`.
    pub busybox: String,
    /// `<registry>/skiff-probe:1`.
    pub probe: String,
    pub node_ns: Vec<Netns>,
    /// The control-plane members' namespaces ([`Cluster::start_ha`]),
    /// with their underlay addresses; none when the control plane runs in
    /// the underlay's own.
    pub control_ns: Vec<(Netns, String)>,
    pub underlay: Netns,
    /// The overlay's `--etcd` and TLS flags.
    etcd_args: Vec<String>,
    /// `skiff-agent join` flags for the nodes.
    node_join: Vec<String>,
    /// The control plane's flags but its addresses (for its replicas).
    control_flags: Vec<String>,
    /// Nodes run the kubelet alone; the network is installed onto them.
    bare: bool,
}

/// Where the control-plane members' namespaces sit on the underlay:
/// [`crate::overlay::node_ip`] of this index and the next ones.
const CONTROL_INDEX: usize = 100;

/// A control-plane member's flags: its address, then `base`.
fn member_flags(ip: &str, base: &[String]) -> Vec<String> {
    let mut flags: Vec<String> = ["--tls-san", ip, "--advertise-address", ip]
        .map(String::from)
        .to_vec();
    flags.extend(base.iter().cloned());
    flags
}

impl Cluster {
    /// `n` nodes, each Ready with its subnet leased, and the images pushed.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &[])
    }

    /// As `start`, with `control` flags for `skiff-control`.
    pub fn start_with(n: usize, control: &[&str]) -> Self {
        Self::start_nodes(n, control, false, 1)
    }

    /// `n` nodes and a control plane of three members, as kubeadm's
    /// stacked HA: each member a namespace of its own on the underlay,
    /// holding an etcd member and a `skiff-control` replica on the
    /// three-member etcd. Nodes join through the first.
    pub fn start_ha(n: usize) -> Self {
        Self::start_nodes(n, &[], false, 3)
    }

    /// `n` nodes running the kubelet role alone, each in
    /// [`crate::node::NodeMounts`], and a control plane that gives Nodes
    /// their podCIDRs (one of each family): pods get a network only once it is installed
    /// (`deploy/skiff-node.yaml`, see [`Cluster::node_manifest`]).
    pub fn start_bare(n: usize) -> Self {
        Self::start_nodes(
            n,
            &[
                "--allocate-node-cidrs",
                "--cluster-cidr",
                "10.244.0.0/16,fd00:10:244::/56",
            ],
            true,
            1,
        )
    }

    /// `deploy/skiff-node.yaml` as this cluster applies it: `image` for the
    /// agent and the apiserver's address on the underlay.
    pub fn node_manifest(&self, image: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/skiff-node.yaml");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (image_was, host_was, port_was) = (
            "localhost:5000/skiff-node:0.1.0",
            "apiserver-host: \"127.0.0.1\"",
            "apiserver-port: \"6443\"",
        );
        for s in [image_was, host_was, port_was] {
            assert!(text.contains(s), "{path} no longer says {s}");
        }
        text.replace(image_was, image)
            .replace(host_was, &format!("apiserver-host: \"{UNDERLAY_GW}\""))
            .replace(port_was, &format!("apiserver-port: \"{}\"", self.cp.port()))
    }

    fn start_nodes(n: usize, control: &[&str], bare: bool, members: usize) -> Self {
        let (underlay, nodes) = underlay(n);
        add_ipv6(&underlay, UNDERLAY_GW6, "br0");
        for (i, (ns, _)) in nodes.iter().enumerate() {
            add_underlay_ipv6(ns, i);
        }
        // One member: in the underlay's namespace, at its address.
        let control_ns: Vec<(Netns, String)> = if members > 1 {
            (0..members)
                .map(|i| attach(&underlay, CONTROL_INDEX + i))
                .collect()
        } else {
            Vec::new()
        };
        let etcd = if control_ns.is_empty() {
            Etcd::start_on(Some(&underlay), UNDERLAY_GW)
        } else {
            let places: Vec<(&Netns, &str)> = control_ns
                .iter()
                .map(|(ns, ip)| (ns, ip.as_str()))
                .collect();
            Etcd::start_cluster(&places)
        };
        etcd.ctl(&["put", "/coreos.com/network/config", NETWORK])
            .unwrap_or_else(|e| panic!("{e}"));
        let etcd_args = etcd.client_args(crate::control::EtcdClient::Overlay);
        let mut control_flags: Vec<String> = Vec::new();
        if !control.contains(&"--service-cidr") {
            control_flags.extend(["--service-cidr", SERVICE_CIDRS].map(String::from));
        }
        control_flags.extend(control.iter().map(|s| s.to_string()));
        let (first_ns, first_ip) = control_ns
            .first()
            .map_or((&underlay, UNDERLAY_GW), |(ns, ip)| (ns, ip.as_str()));
        let flags = member_flags(first_ip, &control_flags);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cp = ControlPlane::start_on(first_ns, etcd, &flags);
        let replicas = control_ns
            .iter()
            .skip(1)
            .map(|(ns, ip)| {
                let flags = member_flags(ip, &control_flags);
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                cp.replica_in(ns, &flags)
            })
            .collect();
        let registry = Registry::start_on(&underlay, UNDERLAY_GW);
        let busybox = registry.push(&underlay, "busybox", "busybox:1.36");
        let probe = registry.push(&underlay, "skiff-probe", "skiff-probe:1");
        let node_join = cp.join_args(&format!("https://{first_ip}:{}", cp.port()));
        let mut c = Self {
            nodes: Vec::new(),
            cp,
            replicas,
            control_ns,
            registry,
            busybox,
            probe,
            node_ns: Vec::new(),
            underlay,
            etcd_args,
            node_join,
            control_flags,
            bare,
        };
        for (ns, ip) in nodes {
            c.start_node(ns, &ip, true);
        }
        for i in 0..n {
            c.wait_node_ready(i);
        }
        c
    }

    fn start_node(&mut self, ns: Netns, ip: &str, ip_masq: bool) {
        let ip6 = node_ipv6(self.nodes.len());
        let node = KubeletNode::start_with(
            &ns,
            &NodeSetup {
                ip,
                join: &self.node_join,
                registry: &self.registry.addr,
                network: if self.bare {
                    NodeNetwork::Installed
                } else {
                    NodeNetwork::Overlay {
                        etcd: &self.etcd_args,
                        ip6: &ip6,
                        ip_masq,
                    }
                },
            },
        );
        self.nodes.push(node);
        self.node_ns.push(ns);
    }

    /// Waits until node `i` is Ready with a pod CIDR; a bare node, until
    /// it has a pod CIDR and is NotReady for want of a pod network only.
    fn wait_node_ready(&self, i: usize) {
        let name = &self.nodes[i].name;
        let want = if self.bare {
            "False 10.244."
        } else {
            "True 10.244."
        };
        wait_for(
            &format!("node {name} {want}"),
            Duration::from_secs(60),
            || {
                let s = self.cp.jsonpath(
                    &["node", name],
                    "{.status.conditions[?(@.type==\"Ready\")].status} {.spec.podCIDR}",
                );
                s.starts_with(want).then_some(())
            },
        );
    }

    /// Another control-plane replica beside `cp`: on the same etcd and
    /// underlay address (another port), with the same flags.
    pub fn control_replica(&self) -> ControlPlane {
        let flags = member_flags(UNDERLAY_GW, &self.control_flags);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.cp.replica(&flags)
    }

    /// Waits until every node is Ready.
    pub fn wait_all_ready(&self) {
        for n in &self.nodes {
            wait_for(
                &format!("node {} Ready", n.name),
                Duration::from_secs(60),
                || {
                    let s = self.cp.jsonpath(
                        &["node", &n.name],
                        "{.status.conditions[?(@.type==\"Ready\")].status}",
                    );
                    (s == "True").then_some(())
                },
            );
        }
    }

    /// A further node joins the underlay and the cluster; its index once
    /// it is Ready.
    pub fn add_node(&mut self) -> usize {
        self.add_node_with(true)
    }

    /// As [`Cluster::add_node`], its overlay without `--ip-masq`: its pods'
    /// traffic to other nodes' addresses keeps their own, as in clusters
    /// whose underlay routes the pod network.
    pub fn add_node_without_masq(&mut self) -> usize {
        self.add_node_with(false)
    }

    fn add_node_with(&mut self, ip_masq: bool) -> usize {
        let i = self.nodes.len();
        let (ns, ip) = attach(&self.underlay, i);
        add_underlay_ipv6(&ns, i);
        self.start_node(ns, &ip, ip_masq);
        self.wait_node_ready(i);
        i
    }

    /// The namespace of node `i`.
    pub fn ns(&self, i: usize) -> &Netns {
        &self.node_ns[i]
    }

    /// Waits until `n` pods match `selector` and are Ready; by name.
    pub fn ready_pods(&self, selector: &str, n: usize) -> BTreeMap<String, PodAt> {
        wait_for(
            &format!("{n} pods {selector} Ready"),
            Duration::from_secs(120),
            || {
                let out = self.cp.jsonpath(
                    &["pods", "-l", selector],
                    r#"{range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
                );
                let pods: BTreeMap<String, PodAt> = out
                    .lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.len() == 4 && f[3] == "True").then(|| {
                            let at = PodAt {
                                ip: f[1].to_string(),
                                node: f[2].to_string(),
                            };
                            (f[0].to_string(), at)
                        })
                    })
                    .collect();
                (pods.len() == n).then_some(pods)
            },
        )
    }

    /// The node that runs the fewest of `pods`.
    pub fn quietest_node(&self, pods: &BTreeMap<String, PodAt>) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.clone())
            .min_by_key(|n| pods.values().filter(|p| &p.node == n).count())
            .unwrap_or_default()
    }

    /// Starts `script` (busybox sh) in a pod `name` on `node`
    /// (restartPolicy Never, grace 1 s).
    pub fn start_script(&self, name: &str, node: &str, script: &str) {
        Self::start_script_on(&self.cp, &self.busybox, name, node, script);
    }

    /// As [`Cluster::start_script`], through `cp`, with `image`.
    pub fn start_script_on(cp: &ControlPlane, image: &str, name: &str, node: &str, script: &str) {
        cp
            .apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [\"sh\", \"-c\", {script:?}]\n",
            ))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `script` as [`Cluster::start_script`] does, until it ends; its
    /// log.
    pub fn run_script(&self, name: &str, node: &str, script: &str) -> String {
        Self::run_script_on(&self.cp, &self.busybox, name, node, script)
    }

    /// As [`Cluster::run_script`], through `cp`, with `image`.
    pub fn run_script_on(
        cp: &ControlPlane,
        image: &str,
        name: &str,
        node: &str,
        script: &str,
    ) -> String {
        Self::start_script_on(cp, image, name, node, script);
        wait_for(
            &format!("pod {name} to finish"),
            Duration::from_secs(120),
            || {
                let phase = cp.jsonpath(&["pod", name], "{.status.phase}");
                (phase == "Succeeded" || phase == "Failed")
                    .then(|| cp.kubectl(&["logs", name]).unwrap_or_default())
            },
        )
    }
}
