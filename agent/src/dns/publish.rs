//! This node's endpoints of the `kube-dns` Service: an EndpointSlice per
//! address family it listens on, `kube-system/kube-dns-<node>` (IPv4) and
//! `kube-system/kube-dns-<node>-v6` (IPv6), each with the node's first DNS
//! address of that family and its own name as `nodeName`, so that with
//! `trafficDistribution: PreferSameNode` each node's proxy sends the
//! ClusterIP of either family to its own server while it has one.
//!
//! Written once the zone is read, checked again every [`REFRESH`] (they
//! come back if someone deletes them), deleted when the role stops. They
//! are owned by the Node once the Node exists, so the garbage collector
//! removes them with a deleted node.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{debug, info, warn};

use super::{SERVICE_NAME, SERVICE_NAMESPACE};

/// How often the slice is checked.
const REFRESH: Duration = Duration::from_secs(30);

/// Who writes these slices (the EndpointSlice controller leaves them be).
pub const MANAGER: &str = "skiff-agent";

/// The name of `node`'s slice of the `kube-dns` Service for IPv6
/// addresses (`v6`) or IPv4 ones.
pub fn slice_name(node: &str, v6: bool) -> String {
    if v6 {
        format!("{SERVICE_NAME}-{node}-v6")
    } else {
        format!("{SERVICE_NAME}-{node}")
    }
}

/// The first address of each family in `listen`: what the node publishes.
pub fn endpoints(listen: &[IpAddr]) -> Vec<IpAddr> {
    let v4 = listen.iter().find(|ip| ip.is_ipv4());
    let v6 = listen.iter().find(|ip| ip.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

pub struct Publisher {
    slices: Api<EndpointSlice>,
    nodes: Api<Node>,
    node: String,
    /// One address per family.
    ips: Vec<IpAddr>,
    port: u16,
    node_uid: tokio::sync::Mutex<Option<String>>,
}

impl Publisher {
    /// Publishes the first address of each family in `listen`.
    pub fn new(client: Client, node: &str, listen: &[IpAddr], port: u16) -> Self {
        Self {
            slices: Api::namespaced(client.clone(), SERVICE_NAMESPACE),
            nodes: Api::all(client),
            node: node.to_string(),
            ips: endpoints(listen),
            port,
            node_uid: tokio::sync::Mutex::new(None),
        }
    }

    /// The slice of `ip` as it should be (owned by the Node if it has a
    /// UID).
    fn desired(
        &self,
        ip: IpAddr,
        node_uid: Option<&str>,
    ) -> Result<EndpointSlice, serde_json::Error> {
        let owners = node_uid.map(
            |uid| json!([{"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}]),
        );
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name(&self.node, ip.is_ipv6()), "namespace": SERVICE_NAMESPACE,
                "labels": {
                    crate::catalog::SERVICE_NAME_LABEL: SERVICE_NAME,
                    "endpointslice.kubernetes.io/managed-by": MANAGER,
                },
                "ownerReferences": owners,
            },
            "addressType": family,
            "endpoints": [{
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": self.node,
            }],
            "ports": [
                {"name": "dns", "port": self.port, "protocol": "UDP"},
                {"name": "dns-tcp", "port": self.port, "protocol": "TCP"},
            ],
        }))
    }

    /// The Node's UID, read until it is known (a Node keeps its UID).
    async fn node_uid(&self) -> Option<String> {
        let mut known = self.node_uid.lock().await;
        if known.is_none() {
            match self.nodes.get_opt(&self.node).await {
                Ok(n) => *known = n.and_then(|n| n.metadata.uid),
                Err(e) => debug!(error = %e, "reading the node for the dns slice's owner"),
            }
        }
        known.clone()
    }

    /// Writes every slice unless it already says the same.
    async fn ensure(&self) -> Result<(), kube::Error> {
        let uid = self.node_uid().await;
        for ip in &self.ips {
            self.ensure_one(*ip, uid.as_deref()).await?;
        }
        Ok(())
    }

    async fn ensure_one(&self, ip: IpAddr, uid: Option<&str>) -> Result<(), kube::Error> {
        let mut want = self.desired(ip, uid).map_err(kube::Error::SerdeError)?;
        let name = slice_name(&self.node, ip.is_ipv6());
        match self.slices.get_opt(&name).await? {
            None => {
                self.slices.create(&PostParams::default(), &want).await?;
                info!(slice = %name, %ip, "published the node's dns endpoint");
            }
            Some(have) => {
                let same = have.endpoints == want.endpoints
                    && have.ports == want.ports
                    && have.address_type == want.address_type
                    && have.metadata.labels == want.metadata.labels
                    && (uid.is_none()
                        || have.metadata.owner_references == want.metadata.owner_references);
                if !same {
                    want.metadata.resource_version = have.metadata.resource_version;
                    if uid.is_none() {
                        want.metadata.owner_references = have.metadata.owner_references;
                    }
                    self.slices
                        .replace(&name, &PostParams::default(), &want)
                        .await?;
                    info!(slice = %name, %ip, "updated the node's dns endpoint");
                }
            }
        }
        Ok(())
    }

    /// Waits for the zone, then keeps the slice written. Never returns.
    pub async fn keep(&self, mut synced: tokio::sync::watch::Receiver<bool>) {
        if synced.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        loop {
            if let Err(e) = self.ensure().await {
                warn!(error = %e, "publishing the node's dns endpoint; will retry");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            tokio::time::sleep(REFRESH).await;
        }
    }

    /// Deletes the slices of both families (a run listening on other
    /// addresses may have left one), best effort, bounded in time.
    pub async fn withdraw(&self) {
        let dp = DeleteParams::default();
        let dp = &dp;
        let deletes = [false, true].map(|v6| async move {
            let name = slice_name(&self.node, v6);
            let delete = self.slices.delete(&name, dp);
            match tokio::time::timeout(Duration::from_secs(5), delete).await {
                Ok(Ok(_)) => info!(slice = %name, "withdrew the node's dns endpoint"),
                Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
                Ok(Err(e)) => warn!(slice = %name, error = %e, "withdrawing the dns endpoint"),
                Err(_) => warn!(slice = %name, "withdrawing the dns endpoint timed out"),
            }
        });
        futures::future::join_all(deletes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_endpoint_per_family_each_in_its_own_slice() {
        let ips: Vec<IpAddr> = ["fd00::a", "10.0.0.1", "10.0.0.2", "fd00::b"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(endpoints(&ips), [ips[1], ips[0]]);
        assert_eq!(endpoints(&ips[1..3]), [ips[1]]);
        assert_eq!(slice_name("n1", false), "kube-dns-n1");
        assert_eq!(slice_name("n1", true), "kube-dns-n1-v6");
    }
}
