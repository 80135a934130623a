//! The `kubernetes` Service's endpoints, kept by the apiservers themselves
//! as upstream's lease endpoint reconciler keeps them: every replica keeps
//! a record of its address in etcd on a short lease and, on each pass,
//! writes the Service's Endpoints and EndpointSlices from the records that
//! are alive. A replica that dies drops out when its lease runs out; one
//! that stops takes its record and its address out at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use super::{Api, ApiError};
use crate::resources::{self, Resource};

/// Where the records live (upstream's key).
pub const PREFIX: &str = "/registry/masterleases/";
/// How long a record outlives its last renewal (upstream's default).
pub const TTL: Duration = Duration::from_secs(15);
/// How often a replica renews its record and rewrites the endpoints.
pub const INTERVAL: Duration = Duration::from_secs(10);

const NAME: &str = "kubernetes";
const NAMESPACE: &str = "default";
const MANAGER: &str = "skiff-control";
const PORT_NAME: &str = "https";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

fn family(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// The addresses per (family, port), each set sorted.
fn groups(addrs: &BTreeSet<SocketAddr>) -> BTreeMap<(&'static str, u16), Vec<String>> {
    let mut out: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for a in addrs {
        out.entry((family(a), a.port()))
            .or_default()
            .push(a.ip().to_string());
    }
    out
}

/// The Endpoints' subsets: one per port (replicas normally share one).
fn subsets(addrs: &BTreeSet<SocketAddr>) -> Value {
    let mut per_port: BTreeMap<u16, Vec<Value>> = BTreeMap::new();
    for a in addrs {
        per_port
            .entry(a.port())
            .or_default()
            .push(json!({"ip": a.ip().to_string()}));
    }
    Value::Array(
        per_port
            .into_iter()
            .map(|(port, addresses)| {
                json!({"addresses": addresses, "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]})
            })
            .collect(),
    )
}

/// The slices, one per (family, port): the first is `kubernetes`, any
/// other is named after its family and port. With no address at all,
/// `kubernetes` stays, empty, on `fallback`'s family and port.
fn slices(addrs: &BTreeSet<SocketAddr>, fallback: SocketAddr) -> Vec<Value> {
    let mut groups = groups(addrs);
    if groups.is_empty() {
        groups.insert((family(&fallback), fallback.port()), Vec::new());
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, ((family, port), ips))| {
            let name = if i == 0 {
                NAME.to_string()
            } else {
                format!("{NAME}-{}-{port}", family.to_lowercase())
            };
            let endpoints: Vec<Value> = ips
                .into_iter()
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}))
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
                    SERVICE_NAME_LABEL: NAME, MANAGED_BY_LABEL: MANAGER}},
                "addressType": family,
                "endpoints": endpoints,
                "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]
            })
        })
        .collect()
}

fn resource(group: &str, plural: &str) -> Result<&'static Resource, ApiError> {
    resources::find(group, "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("no resource {group}/{plural}")))
}

impl Api {
    /// Records `me` as a live apiserver and writes the `kubernetes`
    /// Service's endpoints from every live record; returns them.
    pub async fn join_peers(&self, me: SocketAddr) -> Result<BTreeSet<SocketAddr>, ApiError> {
        let key = format!("{PREFIX}{me}");
        self.store
            .put_leased(&key, me.to_string().into_bytes(), TTL)
            .await
            .map_err(|e| ApiError::internal(format!("recording this apiserver: {e}")))?;
        let mut live = self.peers().await?;
        live.insert(me);
        self.write_endpoints(&live, me).await?;
        Ok(live)
    }

    /// Takes `me` out of the records and the endpoints (a replica stopping).
    pub async fn leave_peers(&self, me: SocketAddr) -> Result<(), ApiError> {
        self.store
            .remove(&format!("{PREFIX}{me}"))
            .await
            .map_err(|e| ApiError::internal(format!("removing this apiserver: {e}")))?;
        let mut live = self.peers().await?;
        live.remove(&me);
        self.write_endpoints(&live, me).await
    }

    /// The addresses of the live records.
    async fn peers(&self) -> Result<BTreeSet<SocketAddr>, ApiError> {
        let (items, _) = self
            .store
            .list(PREFIX, None)
            .await
            .map_err(|e| ApiError::internal(format!("listing the apiservers: {e}")))?;
        Ok(items
            .iter()
            .filter_map(|i| std::str::from_utf8(&i.value).ok()?.parse().ok())
            .collect())
    }

    /// Writes what differs from `live` (so that steady passes write
    /// nothing), and deletes slices of groups that are gone.
    async fn write_endpoints(
        &self,
        live: &BTreeSet<SocketAddr>,
        fallback: SocketAddr,
    ) -> Result<(), ApiError> {
        let ep = resource("", "endpoints")?;
        let want = subsets(live);
        let current = self.read(ep, Some(NAMESPACE), NAME).await.ok();
        if current.as_ref().map(|(v, _)| &v["subsets"]) != Some(&want) {
            let obj = json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": NAME, "namespace": NAMESPACE}, "subsets": want});
            self.put(ep, Some(NAMESPACE), NAME, obj).await?;
        }
        let es = resource("discovery.k8s.io", "endpointslices")?;
        let wanted = slices(live, fallback);
        for slice in &wanted {
            let name = slice["metadata"]["name"].as_str().unwrap_or(NAME);
            let current = self.read(es, Some(NAMESPACE), name).await.ok();
            let same = current.as_ref().is_some_and(|(v, _)| {
                ["addressType", "endpoints", "ports"]
                    .iter()
                    .all(|f| v[*f] == slice[*f])
            });
            if !same {
                self.put(es, Some(NAMESPACE), name, slice.clone()).await?;
            }
        }
        // Only the slices named after the Service: ours are among them.
        let (items, _) = self
            .store
            .list(&format!("{}{NAME}", es.prefix(Some(NAMESPACE))), None)
            .await
            .map_err(|e| ApiError::internal(format!("listing endpointslices: {e}")))?;
        for item in items {
            let Ok(v) = serde_json::from_slice::<Value>(&item.value) else {
                continue;
            };
            let labels = &v["metadata"]["labels"];
            let ours = labels[SERVICE_NAME_LABEL] == NAME && labels[MANAGED_BY_LABEL] == MANAGER;
            let name = v["metadata"]["name"].as_str().unwrap_or_default();
            if ours && !wanted.iter().any(|w| w["metadata"]["name"] == name) {
                match self
                    .delete(es, Some(NAMESPACE), name, &json!({}), &HashMap::new())
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Renews `me`'s record and the endpoints every [`INTERVAL`] until `stop`
/// turns true, then leaves.
pub async fn keep(api: Arc<Api>, me: SocketAddr, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last = BTreeSet::new();
    loop {
        match api.join_peers(me).await {
            Ok(live) if live != last => {
                info!(apiservers = ?live, "kubernetes service endpoints");
                last = live;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "keeping the kubernetes service endpoints"),
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if let Err(e) = api.leave_peers(me).await {
        warn!(error = %e, "taking this apiserver out of the kubernetes service endpoints");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|a| a.parse().expect("address")).collect()
    }

    #[test]
    fn replicas_on_one_port_make_one_subset_and_one_slice() {
        let live = set(&["10.0.0.3:6443", "10.0.0.1:6443", "10.0.0.2:6443"]);
        let s = subsets(&live);
        assert_eq!(s.as_array().map(Vec::len), Some(1));
        assert_eq!(
            s[0]["addresses"],
            json!([{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, {"ip": "10.0.0.3"}])
        );
        let sl = slices(&live, "10.0.0.1:6443".parse().expect("address"));
        assert_eq!(sl.len(), 1);
        assert_eq!(sl[0]["metadata"]["name"], "kubernetes");
        assert_eq!(sl[0]["endpoints"].as_array().map(Vec::len), Some(3));
        assert_eq!(sl[0]["ports"][0]["port"], 6443);
    }

    #[test]
    fn ports_and_families_that_differ_get_slices_of_their_own() {
        let live = set(&["127.0.0.1:7001", "127.0.0.1:7000", "[fd00::1]:7000"]);
        assert_eq!(subsets(&live).as_array().map(Vec::len), Some(2));
        let names: Vec<_> = slices(&live, "127.0.0.1:7000".parse().expect("address"))
            .iter()
            .map(|s| {
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            ["kubernetes", "kubernetes-ipv4-7001", "kubernetes-ipv6-7000"]
        );
    }

    #[test]
    fn with_no_apiserver_left_the_slice_stays_empty() {
        let sl = slices(&BTreeSet::new(), "10.0.0.1:6443".parse().expect("address"));
        assert_eq!(sl.len(), 1);
        assert_eq!(sl[0]["endpoints"], json!([]));
        assert_eq!(subsets(&BTreeSet::new()), json!([]));
    }
}
