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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::alloc::Cidr;
use crate::informer::{next_pass, ready, reflect};
use crate::meta::name_of;

/// The cluster's pod network and the size of each node's slice of it; on a
/// dual-stack cluster also the IPv6 network and slice size. Node ranges are
/// numbered from the network's start, and the n-th Node range of each
/// family go together (the overlay pairs its IPv4 and IPv6 subnets the same
/// way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCidrs {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub node_prefix: u8,
    pub ipv6: Option<NodeCidrs6>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeCidrs6 {
    pub network: Ipv6Addr,
    pub prefix: u8,
    pub node_prefix: u8,
}

impl NodeCidrs {
    /// `cluster` as `a.b.c.d/len`, or that and an IPv6 CIDR, comma
    /// separated (dual stack). `node_prefix` must be longer than the IPv4
    /// prefix and at most 30; `node_prefix6` longer than the IPv6 prefix,
    /// at most 126, and leaving as many IPv6 ranges as IPv4 ones.
    pub fn new(cluster: &str, node_prefix: u8, node_prefix6: u8) -> Result<Self, String> {
        let mut parts = cluster.split(',').map(str::trim);
        let first = parts.next().unwrap_or_default();
        let (network, prefix) = family_range(first, false, node_prefix)?;
        let IpAddr::V4(network) = network else {
            unreachable!("family_range checked the family");
        };
        let ipv6 = match parts.next() {
            None => None,
            Some(second) => {
                let (network6, prefix6) = family_range(second, true, node_prefix6)?;
                let IpAddr::V6(network6) = network6 else {
                    unreachable!("family_range checked the family");
                };
                if node_prefix6 - prefix6 < node_prefix - prefix {
                    return Err(format!(
                        "--node-cidr-mask-size-ipv6 {node_prefix6}: {second} holds fewer /{node_prefix6} ranges than {first} holds /{node_prefix} ones"
                    ));
                }
                Some(NodeCidrs6 {
                    network: network6,
                    prefix: prefix6,
                    node_prefix: node_prefix6,
                })
            }
        };
        if parts.next().is_some() {
            return Err(format!(
                "--cluster-cidr {cluster:?}: at most two ranges, one per family"
            ));
        }
        Ok(Self {
            network,
            prefix,
            node_prefix,
            ipv6,
        })
    }

    /// The number of `cidr` among this network's node ranges (of either
    /// family).
    fn slot(&self, cidr: &str) -> Option<u64> {
        let (ip, len) = cidr.split_once('/')?;
        let len: u8 = len.parse().ok()?;
        let (raw, base, prefix, node_prefix, bits) = match ip.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => (
                u128::from(u32::from(a)),
                u128::from(u32::from(self.network)),
                self.prefix,
                self.node_prefix,
                32,
            ),
            IpAddr::V6(a) => {
                let six = self.ipv6?;
                (
                    u128::from(a),
                    u128::from(six.network),
                    six.prefix,
                    six.node_prefix,
                    128,
                )
            }
        };
        if len != node_prefix {
            return None;
        }
        let off = raw.checked_sub(base)?;
        let step_bits = bits - u32::from(node_prefix);
        let inside = off >> (bits - u32::from(prefix)) == 0;
        let aligned = off & ((1u128 << step_bits) - 1) == 0;
        (inside && aligned).then_some((off >> step_bits) as u64)
    }

    /// The lowest node range number not in `taken`, as the Node's
    /// `podCIDRs` (IPv4 first).
    pub fn first_free(&self, taken: &BTreeSet<u64>) -> Option<Vec<String>> {
        let count = 1u64 << (self.node_prefix - self.prefix);
        let i = (0..count).find(|i| !taken.contains(i))?;
        let step = 1u64 << (32 - self.node_prefix);
        let v4 = Ipv4Addr::from((u64::from(u32::from(self.network)) + i * step) as u32);
        let mut out = vec![format!("{v4}/{}", self.node_prefix)];
        if let Some(six) = self.ipv6 {
            let v6 = Ipv6Addr::from(
                u128::from(six.network) + (u128::from(i) << (128 - u32::from(six.node_prefix))),
            );
            out.push(format!("{v6}/{}", six.node_prefix));
        }
        Some(out)
    }
}

/// One family's part of `--cluster-cidr`: its network and prefix, with
/// the node ranges' size for it checked (longer than the prefix, at most
/// 30 for IPv4 and 126 for IPv6).
fn family_range(s: &str, v6: bool, node_prefix: u8) -> Result<(IpAddr, u8), String> {
    let cidr = Cidr::pod_network(s).map_err(|e| format!("--cluster-cidr {e}"))?;
    let (position, family, flag, max) = if v6 {
        ("second", "IPv6", "--node-cidr-mask-size-ipv6", 126)
    } else {
        ("first", "IPv4", "--node-cidr-mask-size", 30)
    };
    if cidr.network().is_ipv6() != v6 {
        return Err(format!(
            "--cluster-cidr {s:?}: the {position} range must be {family}"
        ));
    }
    if node_prefix <= cidr.len || node_prefix > max {
        return Err(format!(
            "{flag} {node_prefix}: must be longer than the {family} cluster CIDR's /{} and at most {max}",
            cidr.len
        ));
    }
    Ok((cidr.network(), cidr.len))
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec.as_ref()?.pod_cidr.as_deref()
}

/// Every range the Node holds: `podCIDRs`, and `podCIDR` for a Node
/// written by something that set only that.
fn pod_cidrs(node: &Node) -> Vec<&str> {
    let mut out: Vec<&str> = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let Some(c) = pod_cidr(node)
        && !out.contains(&c)
    {
        out.push(c);
    }
    out
}

pub async fn run(client: Client, cidrs: NodeCidrs) {
    let notify = Arc::new(Notify::new());
    let (nodes, _w) = reflect(Api::<Node>::all(client.clone()), notify.clone());
    ready(&nodes).await;
    let api = Api::<Node>::all(client);
    let mut warned = BTreeSet::new();
    loop {
        let all = nodes.state();
        let mut taken: BTreeSet<u64> = all
            .iter()
            .flat_map(|n| pod_cidrs(n).into_iter().filter_map(|c| cidrs.slot(c)))
            .collect();
        for node in all.iter().filter(|n| pod_cidr(n).is_none()) {
            let name = name_of(&node.metadata);
            if node.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(ranges) = cidrs.first_free(&taken) else {
                if warned.insert(name.to_string()) {
                    warn!(node = %name, network = %format!("{}/{}", cidrs.network, cidrs.prefix), "no free pod CIDR left for the node");
                }
                continue;
            };
            let cidr = ranges[0].clone();
            let patch = json!({"spec": {"podCIDR": cidr, "podCIDRs": ranges}});
            match api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(node = %name, pod_cidrs = ?ranges, "pod CIDRs allocated");
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
        let c = NodeCidrs::new("10.244.0.0/16", 24, 64).unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(
            c.first_free(&taken),
            Some(vec!["10.244.0.0/24".to_string()])
        );
        taken.insert(c.slot("10.244.0.0/24").unwrap());
        taken.insert(c.slot("10.244.2.0/24").unwrap());
        assert_eq!(
            c.first_free(&taken),
            Some(vec!["10.244.1.0/24".to_string()])
        );
        // Ranges from elsewhere or of another size take nothing.
        assert_eq!(c.slot("10.245.1.0/24"), None);
        assert_eq!(c.slot("10.244.1.0/25"), None);
        assert_eq!(c.slot("10.244.1.128/24"), None);
        assert_eq!(
            c.slot("fd00::/64"),
            None,
            "no IPv6 on a single-stack cluster"
        );
    }

    #[test]
    fn a_dual_stack_node_gets_the_same_numbered_range_of_each_family() {
        let c = NodeCidrs::new("10.244.0.0/16,fd00:10:244::/56", 24, 64).unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(
            c.first_free(&taken),
            Some(vec![
                "10.244.0.0/24".to_string(),
                "fd00:10:244::/64".to_string()
            ])
        );
        taken.insert(c.slot("10.244.0.0/24").unwrap());
        // A range held in either family takes its number.
        taken.insert(c.slot("fd00:10:244:1::/64").unwrap());
        assert_eq!(
            c.first_free(&taken),
            Some(vec![
                "10.244.2.0/24".to_string(),
                "fd00:10:244:2::/64".to_string()
            ])
        );
        assert_eq!(c.slot("fd00:10:244:1::/60"), None);
        assert_eq!(c.slot("fd00:10:245::/64"), None);
        let e = NodeCidrs::new("10.244.0.0/16,fd00::/60", 24, 64).unwrap_err();
        assert!(e.contains("--node-cidr-mask-size-ipv6"), "{e}");
        let e = NodeCidrs::new("fd00::/56,10.244.0.0/16", 24, 64).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
        let e = NodeCidrs::new("10.244.0.0/16,10.245.0.0/16", 24, 64).unwrap_err();
        assert!(e.contains("IPv6"), "{e}");
    }

    #[test]
    fn a_full_network_has_nothing_left() {
        let c = NodeCidrs::new("10.0.0.0/30", 30, 64);
        assert!(c.is_err(), "the node prefix must be longer");
        let c = NodeCidrs::new("10.0.0.0/29", 30, 64).unwrap();
        let taken: BTreeSet<u64> = ["10.0.0.0/30", "10.0.0.4/30"]
            .iter()
            .filter_map(|s| c.slot(s))
            .collect();
        assert_eq!(c.first_free(&taken), None);
    }

    #[test]
    fn bad_flags_name_themselves() {
        let e = NodeCidrs::new("10.244.0.0", 24, 64).unwrap_err();
        assert!(e.contains("--cluster-cidr"), "{e}");
        let e = NodeCidrs::new("10.244.0.0/16", 31, 64).unwrap_err();
        assert!(e.contains("--node-cidr-mask-size"), "{e}");
    }
}
