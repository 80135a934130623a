//! What the DNS server keeps of the cluster's Services and EndpointSlices:
//! only what their records need, read out of each object as it arrives
//! (a Service object is a few kilobytes; its view is tens of bytes).
//!
//! Pure logic: [`Views`] is the role's [`Keep`], filled by the catalog's
//! watch and read by [`super::zone::records_of`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::catalog::{Keep, service_key, slice_owner};

/// What a Service publishes under its name.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// Its ClusterIPs (none yet: nothing is published).
    ClusterIp(Box<[IpAddr]>),
    /// Its endpoints, the unready ones too if it says so.
    Headless { publish_not_ready: bool },
    /// A CNAME to this name.
    ExternalName(Box<str>),
}

/// A named port, with its protocol's label (`tcp`, `udp`, `sctp`).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPort {
    pub name: Box<str>,
    pub proto: &'static str,
    pub port: u16,
}

/// A Service's view; its namespace and name are its key in [`Views`].
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub kind: Kind,
    pub ports: Box<[NamedPort]>,
}

impl ServiceView {
    /// The view of `svc`, if it has a name and a spec.
    pub fn of(svc: &Service) -> Option<Self> {
        svc.metadata.name.as_deref()?;
        let spec = svc.spec.as_ref()?;
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            Kind::ExternalName(spec.external_name.as_deref().unwrap_or_default().into())
        } else if spec.cluster_ip.as_deref() == Some("None") {
            Kind::Headless {
                publish_not_ready: spec.publish_not_ready_addresses == Some(true),
            }
        } else {
            let mut ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            ips.sort();
            ips.dedup();
            Kind::ClusterIp(ips.into())
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let name = p.name.as_deref().filter(|n| !n.is_empty())?;
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => "tcp",
                    "UDP" => "udp",
                    "SCTP" => "sctp",
                    _ => return None,
                };
                Some(NamedPort {
                    name: name.into(),
                    proto,
                    port: u16::try_from(p.port).ok()?,
                })
            })
            .collect();
        Some(Self { kind, ports })
    }
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointView {
    pub hostname: Option<Box<str>>,
    pub ready: bool,
    pub addresses: Box<[IpAddr]>,
}

/// One EndpointSlice: its named ports and its endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceView {
    pub ports: Box<[(Box<str>, u16)]>,
    pub endpoints: Box<[EndpointView]>,
}

impl SliceView {
    /// The view of `slice`; empty for an address type DNS does not serve.
    pub fn of(slice: &EndpointSlice) -> Self {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return Self::default();
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.as_deref()?.into(), u16::try_from(p.port?).ok()?)))
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|ep| EndpointView {
                hostname: ep
                    .hostname
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .map(Into::into),
                ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                addresses: ep.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            })
            .collect();
        Self { ports, endpoints }
    }
}

/// Slices of one Service, by slice name.
pub type Slices = BTreeMap<Box<str>, SliceView>;

/// The views by `namespace/name`, the role's [`Keep`].
#[derive(Debug, Default)]
pub struct Views {
    pub services: HashMap<Box<str>, ServiceView>,
    /// Slices by owning Service.
    pub slices: HashMap<Box<str>, Slices>,
}

impl Keep for Views {
    fn insert_service(&mut self, svc: Service) {
        let key = service_key(&svc).into_boxed_str();
        match ServiceView::of(&svc) {
            Some(v) => {
                self.services.insert(key, v);
            }
            None => {
                self.services.remove(&key);
            }
        }
    }

    fn remove_service(&mut self, key: &str) {
        self.services.remove(key);
    }

    fn insert_slice(&mut self, slice: EndpointSlice) {
        if let Some(owner) = slice_owner(&slice) {
            let name = slice.metadata.name.as_deref().unwrap_or_default();
            self.slices
                .entry(owner.into_boxed_str())
                .or_default()
                .insert(name.into(), SliceView::of(&slice));
        }
    }

    fn remove_slice(&mut self, owner: &str, name: &str) {
        if let Some(m) = self.slices.get_mut(owner) {
            m.remove(name);
            if m.is_empty() {
                self.slices.remove(owner);
            }
        }
    }

    fn replace_services(&mut self, from: Self) {
        self.services = from.services;
    }

    fn replace_slices(&mut self, from: Self) {
        self.slices = from.slices;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice")
    }

    #[test]
    fn a_view_keeps_what_records_need_and_follows_its_objects() {
        let mut views = Views::default();
        views.insert_service(svc(json!({
            "metadata": {"name": "web", "namespace": "ns", "labels": {"a": "b"}},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", "fd00::20"],
                     "ports": [{"name": "http", "port": 80}, {"port": 81},
                               {"name": "q", "port": 5, "protocol": "UDP"}]}})));
        let web = &views.services["ns/web"];
        assert_eq!(
            web.kind,
            Kind::ClusterIp(
                ["10.96.0.20", "fd00::20"]
                    .iter()
                    .map(|s| s.parse().expect("ip"))
                    .collect()
            )
        );
        let ports: Vec<(&str, &str, u16)> = web
            .ports
            .iter()
            .map(|p| (&*p.name, p.proto, p.port))
            .collect();
        assert_eq!(ports, [("http", "tcp", 80), ("q", "udp", 5)], "named only");
        views.insert_service(svc(json!({
            "metadata": {"name": "ext", "namespace": "ns"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}})));
        assert_eq!(
            views.services["ns/ext"].kind,
            Kind::ExternalName("example.com".into())
        );

        let labels = json!({"kubernetes.io/service-name": "db"});
        views.insert_slice(slice(json!({
            "metadata": {"name": "db-1", "namespace": "ns", "labels": labels},
            "addressType": "IPv4", "ports": [{"name": "pg", "port": 15432}],
            "endpoints": [{"addresses": ["10.244.1.5"], "hostname": "db-0",
                           "conditions": {"ready": false}}]})));
        views.insert_slice(slice(json!({
            "metadata": {"name": "db-2", "namespace": "ns", "labels": labels},
            "addressType": "FQDN", "endpoints": [{"addresses": ["x.example.com"]}]})));
        let db = &views.slices["ns/db"];
        assert_eq!(
            db["db-1"].endpoints[0],
            EndpointView {
                hostname: Some("db-0".into()),
                ready: false,
                addresses: ["10.244.1.5".parse().expect("ip")].into(),
            }
        );
        assert_eq!(
            db["db-2"],
            SliceView::default(),
            "not an address DNS serves"
        );
        views.remove_slice("ns/db", "db-1");
        views.remove_slice("ns/db", "db-2");
        assert!(views.slices.is_empty(), "no empty map left behind");
        views.remove_service("ns/web");
        let left: Vec<&str> = views.services.keys().map(|k| &**k).collect();
        assert_eq!(left, ["ns/ext"]);
    }
}
