//! The Kubernetes subnet manager (Flannel's `--kube-subnet-mgr`): the node's
//! subnet is its Node's `spec.podCIDR`, handed out by the control plane's
//! node IPAM, and each node publishes what peers need to reach it (public
//! IP, backend type and data) as annotations on its Node, under Flannel's
//! names. The network config is a file (a ConfigMap mounted into the
//! DaemonSet's pod) instead of an etcd key.
//!
//! This is how the overlay runs as a DaemonSet on any cluster: it needs
//! only read access to Nodes and a patch of its own Node's status.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::lease::{Event, Held, Lease, LeaseError};
use super::network::{LeaseAttrs, NetworkConfig};

pub const ANNOTATION_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const ANNOTATION_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANNOTATION_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const ANNOTATION_PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const ANNOTATION_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// Where the network config is read from unless `--net-config-path` says.
pub const DEFAULT_NET_CONFIG: &str = "/etc/skiff/net-conf.json";

/// Where a Node watch picks up: the resourceVersion of the list it
/// follows, and each Node's subnet as that list had it.
pub struct WatchFrom {
    rv: String,
    known: BTreeMap<String, Ipv4Network>,
}

pub struct KubeSubnets {
    nodes: Api<Node>,
    node_name: String,
    config_path: PathBuf,
}

/// A Node's lease: its podCIDR and the annotations its overlay wrote.
/// None while either is missing (the node has no overlay yet).
pub fn lease_of(node: &Node) -> Option<Lease> {
    let subnet = pod_cidr(node)?;
    let notes = node.metadata.annotations.as_ref()?;
    let public_ip: Ipv4Addr = notes.get(ANNOTATION_PUBLIC_IP)?.parse().ok()?;
    let backend_type = notes.get(ANNOTATION_BACKEND_TYPE)?.clone();
    let backend_data = notes
        .get(ANNOTATION_BACKEND_DATA)
        .and_then(|d| serde_json::from_str(d).ok())
        .filter(|d: &serde_json::Value| !d.is_null());
    Some(Lease {
        subnet,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: notes.get(ANNOTATION_PUBLIC_IPV6).cloned(),
            backend_type,
            backend_data,
        },
        ipv6_subnet: pod_cidr6(node),
    })
}

fn pod_cidr(node: &Node) -> Option<Ipv4Network> {
    let s: Ipv4Network = node.spec.as_ref()?.pod_cidr.as_deref()?.parse().ok()?;
    Ipv4Network::new(s.network(), s.prefix()).ok()
}

/// A dual-stack Node's IPv6 podCIDR (in `spec.podCIDRs`, beside the IPv4
/// one).
fn pod_cidr6(node: &Node) -> Option<Ipv6Network> {
    node.spec
        .as_ref()?
        .pod_cidrs
        .iter()
        .flatten()
        .find_map(|c| match c.parse::<IpNetwork>().ok()? {
            IpNetwork::V6(n) => Ipv6Network::new(n.network(), n.prefix()).ok(),
            IpNetwork::V4(_) => None,
        })
}

impl KubeSubnets {
    pub fn new(client: Client, node_name: &str, config_path: &Path) -> Self {
        Self {
            nodes: Api::all(client),
            node_name: node_name.to_string(),
            config_path: config_path.to_path_buf(),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub async fn config(&self) -> Result<NetworkConfig, LeaseError> {
        let text = match std::fs::read(&self.config_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LeaseError::NoConfigFile {
                    path: self.config_path.display().to_string(),
                });
            }
            Err(source) => {
                return Err(LeaseError::ConfigFile {
                    path: self.config_path.display().to_string(),
                    source,
                });
            }
        };
        Ok(NetworkConfig::parse(&text)?)
    }

    /// The node's InternalIP (IPv4), which peers reach it at unless the
    /// flags say otherwise.
    pub async fn internal_ip(&self) -> Result<Option<Ipv4Addr>, LeaseError> {
        let node = self.nodes.get(&self.node_name).await?;
        Ok(node
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| match a.address.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            }))
    }

    /// Waits for the Node's podCIDR, checks that it lies in the network,
    /// and publishes `attrs` on the Node.
    pub async fn acquire(
        &self,
        net: &NetworkConfig,
        attrs: &LeaseAttrs,
    ) -> Result<Held, LeaseError> {
        let mut warned = false;
        let (subnet, subnet6) = loop {
            let node = self.nodes.get(&self.node_name).await?;
            if let Some(s) = pod_cidr(&node) {
                break (s, pod_cidr6(&node));
            }
            if !warned {
                warn!(node = %self.node_name, "waiting for the Node's podCIDR (the control plane's node IPAM: --allocate-node-cidrs)");
                warned = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        if !net.network.contains(subnet.network()) || subnet.prefix() < net.network.prefix() {
            return Err(LeaseError::Outside {
                subnet,
                network: net.network,
            });
        }
        if let (Some(six), Some(s6)) = (net.ipv6, subnet6)
            && (!six.network.contains(s6.network()) || s6.prefix() != six.subnet_len)
        {
            return Err(LeaseError::Outside6 {
                subnet: s6,
                network: six.network,
                len: six.subnet_len,
            });
        }
        self.publish(attrs).await?;
        info!(%subnet, subnet6 = ?subnet6, node = %self.node_name, "subnet from the Node's podCIDR");
        Ok(Held {
            subnet,
            etcd_lease: 0,
            ipv6_subnet: subnet6,
        })
    }

    /// Writes `attrs` as the Node's annotations (through its status, as
    /// Flannel does: a DaemonSet needs no write access to Nodes' specs).
    async fn publish(&self, attrs: &LeaseAttrs) -> Result<(), LeaseError> {
        let data = attrs
            .backend_data
            .as_ref()
            .map_or_else(|| "null".to_string(), |d| d.to_string());
        // A merge patch's null removes an IPv6 address published before.
        let patch = json!({"metadata": {"annotations": {
            ANNOTATION_BACKEND_TYPE: attrs.backend_type,
            ANNOTATION_BACKEND_DATA: data,
            ANNOTATION_PUBLIC_IP: attrs.public_ip.to_string(),
            ANNOTATION_PUBLIC_IPV6: attrs.public_ipv6,
            ANNOTATION_KUBE_SUBNET_MANAGER: "true",
        }}});
        self.nodes
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        Ok(())
    }

    /// Whether the Node still has `held`'s subnet and our annotations;
    /// publishes them again when they went missing.
    pub async fn still_ours(&self, held: &Held, attrs: &LeaseAttrs) -> Result<bool, LeaseError> {
        let node = self.nodes.get(&self.node_name).await?;
        if pod_cidr(&node) != Some(held.subnet) {
            return Ok(false);
        }
        if lease_of(&node).is_none_or(|l| &l.attrs != attrs) {
            warn!(node = %self.node_name, "the Node's overlay annotations changed; writing them again");
            self.publish(attrs).await?;
        }
        Ok(true)
    }

    /// Every Node's lease, and where a watch picks up from: the list's
    /// resourceVersion and each Node's subnet (so that a Node whose
    /// podCIDR later changes takes its old subnet's routes with it).
    pub async fn list(&self) -> Result<(BTreeMap<Ipv4Network, Lease>, WatchFrom), LeaseError> {
        let list = self.nodes.list(&ListParams::default()).await?;
        let rv = list.metadata.resource_version.clone().unwrap_or_default();
        let mut leases = BTreeMap::new();
        let mut known = BTreeMap::new();
        for n in &list.items {
            if let Some(l) = lease_of(n) {
                known.insert(n.metadata.name.clone().unwrap_or_default(), l.subnet);
                leases.insert(l.subnet, l);
            }
        }
        Ok((leases, WatchFrom { rv, known }))
    }

    /// Watches Nodes from `rv`, sending lease events until the receiver
    /// goes away. A Node that loses its podCIDR or annotations, or is
    /// deleted, takes its subnet with it.
    pub async fn watch(
        &self,
        from: WatchFrom,
        tx: mpsc::Sender<Vec<Event>>,
    ) -> Result<(), LeaseError> {
        let WatchFrom { mut rv, mut known } = from;
        loop {
            let params = WatchParams::default().timeout(290);
            let mut stream = self.nodes.watch(&params, &rv).await?.boxed();
            while let Some(ev) = stream.try_next().await? {
                let batch = match ev {
                    WatchEvent::Added(n) | WatchEvent::Modified(n) => {
                        rv = n.metadata.resource_version.clone().unwrap_or(rv);
                        let name = n.metadata.name.clone().unwrap_or_default();
                        match lease_of(&n) {
                            Some(l) => {
                                let mut b = Vec::new();
                                if let Some(old) = known.insert(name, l.subnet)
                                    && old != l.subnet
                                {
                                    b.push(Event::Delete(old));
                                }
                                b.push(Event::Put(l));
                                b
                            }
                            None => known.remove(&name).map(Event::Delete).into_iter().collect(),
                        }
                    }
                    WatchEvent::Deleted(n) => {
                        rv = n.metadata.resource_version.clone().unwrap_or(rv);
                        let name = n.metadata.name.clone().unwrap_or_default();
                        known.remove(&name);
                        lease_of(&n)
                            .map(|l| Event::Delete(l.subnet))
                            .into_iter()
                            .collect()
                    }
                    WatchEvent::Bookmark(b) => {
                        rv = b.metadata.resource_version;
                        Vec::new()
                    }
                    WatchEvent::Error(e) => {
                        let _ = tx.send(vec![Event::Resync]).await;
                        return Err(LeaseError::WatchEnded(format!(
                            "{} ({})",
                            e.message, e.code
                        )));
                    }
                };
                if !batch.is_empty() && tx.send(batch).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cidr: Option<&str>, notes: &[(&str, &str)]) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "annotations": notes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"podCIDR": cidr},
        }))
        .unwrap()
    }

    #[test]
    fn a_node_is_a_lease_once_it_has_a_pod_cidr_and_its_annotations() {
        let notes = [
            (ANNOTATION_BACKEND_TYPE, "vxlan"),
            (
                ANNOTATION_BACKEND_DATA,
                r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#,
            ),
            (ANNOTATION_PUBLIC_IP, "10.0.0.7"),
        ];
        let l = lease_of(&node(Some("10.244.3.0/24"), &notes)).unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.3.0/24");
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(
            l.attrs.vtep_mac(),
            Some([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])
        );
        assert!(lease_of(&node(None, &notes)).is_none());
        assert!(lease_of(&node(Some("10.244.3.0/24"), &notes[..2])).is_none());
        // host-gw publishes no backend data.
        let hostgw = [
            (ANNOTATION_BACKEND_TYPE, "host-gw"),
            (ANNOTATION_BACKEND_DATA, "null"),
            (ANNOTATION_PUBLIC_IP, "10.0.0.8"),
        ];
        let l = lease_of(&node(Some("10.244.4.0/24"), &hostgw)).unwrap();
        assert_eq!(l.attrs.backend_data, None);
        assert_eq!(l.ipv6_subnet, None);
        // A dual-stack Node: its IPv6 podCIDR is the lease's IPv6 subnet.
        let mut dual = node(Some("10.244.5.0/24"), &notes);
        if let Some(spec) = dual.spec.as_mut() {
            spec.pod_cidrs = Some(vec!["10.244.5.0/24".into(), "fd00:10:244:9::/64".into()]);
        }
        let l = lease_of(&dual).unwrap();
        assert_eq!(
            l.ipv6_subnet.map(|n| n.to_string()).as_deref(),
            Some("fd00:10:244:9::/64")
        );
    }
}
