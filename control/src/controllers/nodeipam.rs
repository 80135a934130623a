//! Node IPAM (kube-controller-manager's `--allocate-node-cidrs`): every
//! Node gets a `spec.podCIDR` of `--node-cidr-mask-size` bits carved from
//! `--cluster-cidr`, which the overlay in Kubernetes subnet-manager mode
//! (Flannel's `--kube-subnet-mgr`) then routes.
//!
//! A pass marks the ranges Nodes already hold as taken (whoever set them)
//! and gives each Node without one the lowest free range. A deleted Node's
//! range is free again at the next pass. A podCIDR is never changed once
//! set, as upstream forbids.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{name_of, next_pass, ready, reflect};
use crate::alloc::Cidr;

/// The cluster's pod network and the size of each node's slice of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCidrs {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub node_prefix: u8,
}

impl NodeCidrs {
    /// `cluster` as `a.b.c.d/len` (IPv4: the overlay is); `node_prefix`
    /// must be longer than its prefix and at most 30.
    pub fn new(cluster: &str, node_prefix: u8) -> Result<Self, String> {
        let cidr: Cidr = cluster.parse().map_err(|e| format!("--cluster-cidr {e}"))?;
        let IpAddr::V4(network) = cidr.network() else {
            return Err(format!(
                "--cluster-cidr {cluster:?}: must be IPv4 (the overlay is)"
            ));
        };
        let prefix = cidr.len;
        if node_prefix <= prefix || node_prefix > 30 {
            return Err(format!(
                "--node-cidr-mask-size {node_prefix}: must be longer than the cluster CIDR's /{prefix} and at most 30"
            ));
        }
        Ok(Self {
            network,
            prefix,
            node_prefix,
        })
    }

    /// `cidr` when it is one of this network's node ranges.
    fn slot(&self, cidr: &str) -> Option<u32> {
        let (ip, len) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        if len.parse::<u8>().ok()? != self.node_prefix {
            return None;
        }
        let ip = u32::from(ip);
        let inside = ip & mask(self.prefix) == u32::from(self.network);
        let aligned = ip & !mask(self.node_prefix) == 0;
        (inside && aligned).then_some(ip)
    }

    /// The lowest node range not in `taken`.
    pub fn first_free(&self, taken: &BTreeSet<u32>) -> Option<String> {
        let step = 1u64 << (32 - self.node_prefix);
        let count = 1u64 << (self.node_prefix - self.prefix);
        (0..count)
            .map(|i| (u64::from(u32::from(self.network)) + i * step) as u32)
            .find(|ip| !taken.contains(ip))
            .map(|ip| format!("{}/{}", Ipv4Addr::from(ip), self.node_prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.pod_cidr.as_deref()
}

pub async fn run(client: Client, cidrs: NodeCidrs) {
    let notify = Arc::new(Notify::new());
    let (nodes, _w) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    ready(&nodes).await;
    let api = Api::<Node>::all(client);
    let mut warned = BTreeSet::new();
    loop {
        let all = nodes.state();
        let mut taken: BTreeSet<u32> = all
            .iter()
            .filter_map(|n| pod_cidr(n).and_then(|c| cidrs.slot(c)))
            .collect();
        for node in all.iter().filter(|n| pod_cidr(n).is_none()) {
            let name = name_of(&node.metadata);
            if node.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(cidr) = cidrs.first_free(&taken) else {
                if warned.insert(name.to_string()) {
                    warn!(node = %name, network = %format!("{}/{}", cidrs.network, cidrs.prefix), "no free pod CIDR left for the node");
                }
                continue;
            };
            let patch = json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(node = %name, pod_cidr = %cidr, "pod CIDR allocated");
                    if let Some(slot) = cidrs.slot(&cidr) {
                        taken.insert(slot);
                    }
                }
                Err(e) => warn!(node = %name, error = %e, "setting the pod CIDR failed"),
            }
        }
        next_pass("nodeipam", &notify, Duration::from_secs(60)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_handed_out_lowest_first_and_reused_when_free() {
        let c = NodeCidrs::new("10.244.0.0/16", 24).unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(c.first_free(&taken).as_deref(), Some("10.244.0.0/24"));
        taken.insert(c.slot("10.244.0.0/24").unwrap());
        taken.insert(c.slot("10.244.2.0/24").unwrap());
        assert_eq!(c.first_free(&taken).as_deref(), Some("10.244.1.0/24"));
        // Ranges from elsewhere or of another size take nothing.
        assert_eq!(c.slot("10.245.1.0/24"), None);
        assert_eq!(c.slot("10.244.1.0/25"), None);
        assert_eq!(c.slot("10.244.1.128/24"), None);
    }

    #[test]
    fn a_full_network_has_nothing_left() {
        let c = NodeCidrs::new("10.0.0.0/30", 30);
        assert!(c.is_err(), "the node prefix must be longer");
        let c = NodeCidrs::new("10.0.0.0/29", 30).unwrap();
        let taken: BTreeSet<u32> = ["10.0.0.0/30", "10.0.0.4/30"]
            .iter()
            .filter_map(|s| c.slot(s))
            .collect();
        assert_eq!(c.first_free(&taken), None);
    }

    #[test]
    fn bad_flags_name_themselves() {
        let e = NodeCidrs::new("10.244.0.0", 24).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
        let e = NodeCidrs::new("10.244.0.0/16", 31).unwrap_err();
        assert!(e.contains("--node-cidr-mask-size"), "{e}");
    }
}
