//! A whole cluster on one machine: an underlay namespace holding etcd,
//! `skiff-control` and the image registry on bridge `br0`, and nodes on
//! that bridge, each a namespace with its own containerd and `skiff-agent`
//! running every role (kubelet, proxy, overlay on vxlan). The host reaches
//! none of it; kubectl runs inside the underlay namespace.

use std::time::Duration;

use crate::control::{ControlPlane, Etcd};
use crate::node::{KubeletNode, NodeNetwork, NodeSetup, Registry};
use crate::overlay::{UNDERLAY_GW, underlay};
use crate::{Netns, wait_for};

/// The Flannel network config the overlay reads.
pub const NETWORK: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;

pub struct Cluster {
    // Dropped first: the agents and containerds go before what they use.
    pub nodes: Vec<KubeletNode>,
    pub cp: ControlPlane,
    pub registry: Registry,
    /// `<registry>/busybox:1.36`.
    pub busybox: String,
    /// `<registry>/skiff-probe:1`.
    pub probe: String,
    pub node_ns: Vec<Netns>,
    pub underlay: Netns,
}

impl Cluster {
    /// `n` nodes, each Ready with its subnet leased, and the images pushed.
    pub fn start(n: usize) -> Self {
        let (underlay, nodes) = underlay(n);
        let etcd = Etcd::start_on(Some(&underlay), UNDERLAY_GW);
        etcd.ctl(&["put", "/coreos.com/network/config", NETWORK])
            .unwrap_or_else(|e| panic!("{e}"));
        let etcd_url = etcd.url.clone();
        let cp = ControlPlane::start_on(&underlay, etcd, &["--tls-san", UNDERLAY_GW]);
        let registry = Registry::start_on(&underlay, UNDERLAY_GW);
        let busybox = registry.push(&underlay, "busybox", "busybox:1.36");
        let probe = registry.push(&underlay, "skiff-probe", "skiff-probe:1");
        let kubeconfig = cp.kubeconfig_for(UNDERLAY_GW);
        let ca_file = cp.ca_file();
        let (node_ns, ips): (Vec<Netns>, Vec<String>) = nodes.into_iter().unzip();
        let nodes = node_ns
            .iter()
            .zip(&ips)
            .map(|(ns, ip)| {
                KubeletNode::start_with(
                    ns,
                    &NodeSetup {
                        ip,
                        kubeconfig: &kubeconfig,
                        ca_file: &ca_file,
                        registry: &registry.addr,
                        network: NodeNetwork::Overlay { etcd: &etcd_url },
                    },
                )
            })
            .collect();
        let c = Self {
            nodes,
            cp,
            registry,
            busybox,
            probe,
            node_ns,
            underlay,
        };
        for node in &c.nodes {
            wait_for(
                &format!("node {} Ready with a pod CIDR", node.name),
                Duration::from_secs(60),
                || {
                    let s = c.cp.jsonpath(
                        &["node", &node.name],
                        "{.status.conditions[?(@.type==\"Ready\")].status} {.spec.podCIDR}",
                    );
                    s.starts_with("True 10.244.").then_some(())
                },
            );
        }
        c
    }

    /// The namespace of node `i`.
    pub fn ns(&self, i: usize) -> &Netns {
        &self.node_ns[i]
    }

    /// `kubectl exec` in `pod` (default namespace).
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> Result<String, String> {
        let mut args = vec!["exec", pod, "--"];
        args.extend(cmd);
        self.cp.kubectl(&args)
    }
}
