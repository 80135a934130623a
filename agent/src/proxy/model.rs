//! What the dataplane should hold: Services and EndpointSlices turned into
//! frontends (address, port, protocol) with their selectable backends.
//!
//! Pure logic, no kernel: the rules kube-proxy applies are here so that they
//! can be unit-tested. Per frontend, new connections go to ready endpoints;
//! when none is ready, to endpoints that are serving and terminating; when
//! none at all, the frontend is programmed with zero backends and the kernel
//! refuses connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use skiff_ebpf_common::{
    BACKEND_LOCAL, Backend, EXT_AFFINITY, EXT_LOCAL, EXT_REJECT, ExtBackend, FAMILY_V4, FAMILY_V6,
    MAX_SLOTS_PER_SERVICE, PROTO_TCP, PROTO_UDP, ServiceKey,
};
use tracing::warn;

pub use crate::catalog::{Catalog, SERVICE_NAME_LABEL, object_key, service_key, slice_owner};

/// Kubernetes' default and maximum ClientIP affinity timeouts (seconds).
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10_800;
const MAX_AFFINITY_TIMEOUT: i32 = 86_400;

/// One address clients dial, and where its connections may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: ServiceKey,
    /// ClientIP affinity timeout in seconds, 0 for none.
    pub affinity_timeout: u32,
    /// Sorted, without duplicates.
    pub backends: Vec<Backend>,
}

/// One backend set of the TC path (a service port in one family): the
/// frontends traffic from other hosts arrives at, and where it may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalSet {
    /// `namespace/name:port/PROTO/family`, stable while the port exists.
    pub name: String,
    pub frontends: Vec<ServiceKey>,
    /// Sorted, without duplicates; `BACKEND_LOCAL` marks this node's.
    pub backends: Vec<ExtBackend>,
    /// `EXT_*` bits.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds; 0 without affinity.
    pub affinity_timeout: u32,
}

/// What `healthCheckNodePort` answers for a Service with
/// `externalTrafficPolicy: Local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub port: u16,
    pub namespace: String,
    pub name: String,
    /// Ready endpoints on this node.
    pub local_endpoints: usize,
}

/// Everything one Service asks of this node's dataplane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// Frontends of the socket path (local clients).
    pub socket: Vec<Frontend>,
    /// Backend sets of the TC path (clients on other hosts).
    pub external: Vec<ExternalSet>,
    pub health: Option<Health>,
}

/// How this node sees the cluster.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// This node's name, for `internalTrafficPolicy: Local`.
    pub node_name: String,
    /// Addresses on which NodePorts are served to local clients.
    pub nodeport_addresses: Vec<IpAddr>,
}

/// A Service that cannot be programmed; it is skipped, the rest are not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service {service}: {field} is not a valid IP address: {value:?}")]
    InvalidIp {
        service: String,
        field: String,
        value: String,
    },
    #[error("service {service}: {field} must be between 1 and 65535, got {port}")]
    InvalidPort {
        service: String,
        field: String,
        port: i32,
    },
    #[error("service {service}: duplicate port {port}/{protocol} in spec.ports")]
    DuplicatePort {
        service: String,
        port: i32,
        protocol: String,
    },
    #[error(
        "service {service}: spec.sessionAffinityConfig.clientIP.timeoutSeconds must be between 1 and 86400, got {value}"
    )]
    InvalidAffinityTimeout { service: String, value: i32 },
    #[error("service {service}: frontend {frontend} is already used by service {owner}")]
    FrontendTaken {
        service: String,
        frontend: String,
        owner: String,
    },
    #[error("service {service}: {count} backends for {frontend}, more than {max}")]
    TooManyBackends {
        service: String,
        frontend: String,
        count: usize,
        max: u32,
    },
}

pub fn encode_ip(ip: IpAddr) -> (u8, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (FAMILY_V6, w)
        }
    }
}

pub fn decode_ip(family: u8, addr: &[u32; 4]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// Port in network byte order, as sock_addr programs see `user_port`.
pub fn encode_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

pub fn decode_port(port: u16) -> u16 {
    u16::from_be_bytes(port.to_ne_bytes())
}

pub fn protocol_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        _ => "?",
    }
}

pub fn frontend_string(key: &ServiceKey) -> String {
    let ip = decode_ip(key.family, &key.addr);
    let port = decode_port(key.port);
    let proto = protocol_name(key.proto);
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}/{proto}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}/{proto}"),
    }
}

pub fn backend_string(b: &Backend) -> String {
    let ip = decode_ip(b.family, &b.addr);
    let port = decode_port(b.port);
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

fn parse_ip(service: &str, field: &str, value: &str) -> Result<IpAddr, ServiceError> {
    value.parse().map_err(|_| ServiceError::InvalidIp {
        service: service.to_string(),
        field: field.to_string(),
        value: value.to_string(),
    })
}

fn check_port(service: &str, field: &str, port: i32) -> Result<u16, ServiceError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ServiceError::InvalidPort {
            service: service.to_string(),
            field: field.to_string(),
            port,
        })
}

fn protocol_of(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        _ => None,
    }
}

/// The backends of one service port, in one address family, each with
/// whether it runs on this node.
fn backends_for(
    service: &str,
    port: &ServicePort,
    family: u8,
    local_only: bool,
    slices: &[&EndpointSlice],
    node: &NodeView,
) -> Vec<(Backend, bool)> {
    let want_type = if family == FAMILY_V4 { "IPv4" } else { "IPv6" };
    let mut ready = BTreeMap::new();
    let mut fallback = BTreeMap::new();
    for slice in slices {
        if slice.address_type != want_type {
            continue;
        }
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        let Some(target) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port.name.as_deref().unwrap_or_default()
                && p.protocol.as_deref().unwrap_or("TCP")
                    == port.protocol.as_deref().unwrap_or("TCP")
        }) else {
            continue;
        };
        let Some(target_port) = target
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            warn!(service, slice = slice_name, port = ?target.port, "endpoint port out of range, skipped");
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let local = ep.node_name.as_deref() == Some(node.node_name.as_str());
            if local_only && !local {
                continue;
            }
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            let Ok(ip) = first.parse::<IpAddr>() else {
                warn!(service, slice = slice_name, address = %first, "endpoint address is not an IP, skipped");
                continue;
            };
            let (fam, addr) = encode_ip(ip);
            if fam != family {
                continue;
            }
            let state = crate::catalog::Readiness::of(ep);
            let b = Backend {
                addr,
                port: encode_port(target_port),
                family,
                pad: 0,
            };
            if state.ready {
                ready.insert(b, local);
            } else if state.serving_terminating {
                fallback.insert(b, local);
            }
        }
    }
    let chosen = if ready.is_empty() { fallback } else { ready };
    chosen.into_iter().collect()
}

/// The socket-path frontends of one Service (see [`service_plan`]).
pub fn service_frontends(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeView,
) -> Result<Vec<Frontend>, ServiceError> {
    service_plan(svc, slices, node).map(|p| p.socket)
}

/// All one Service asks of this node, or why it cannot be programmed. A
/// Service without a cluster IP (headless) or of type ExternalName has
/// nothing.
pub fn service_plan(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeView,
) -> Result<ServicePlan, ServiceError> {
    let name = service_key(svc);
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(ServicePlan::default());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(ServicePlan::default());
    }

    // Addresses, each with the field it came from (for error messages).
    let mut vips: Vec<IpAddr> = Vec::new();
    let cluster_ips: Vec<(String, &str)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip.as_str()))
            .collect(),
    };
    for (field, ip) in &cluster_ips {
        if ip.is_empty() || *ip == "None" {
            continue;
        }
        vips.push(parse_ip(&name, field, ip)?);
    }
    // Addresses past this index are reached from other hosts too.
    let first_external = vips.len();
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        vips.push(parse_ip(&name, &format!("spec.externalIPs[{i}]"), ip)?);
    }
    let lb_ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in lb_ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &ing.ip {
            vips.push(parse_ip(
                &name,
                &format!("status.loadBalancer.ingress[{i}].ip"),
                ip,
            )?);
        }
    }
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));

    let affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        if !(1..=MAX_AFFINITY_TIMEOUT).contains(&t) {
            return Err(ServiceError::InvalidAffinityTimeout {
                service: name,
                value: t,
            });
        }
        t as u32
    } else {
        0
    };
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let prefer_same_node = spec.traffic_distribution.as_deref() == Some("PreferSameNode");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let mut ext_flags = 0;
    if external_local {
        ext_flags |= EXT_LOCAL;
    }
    if affinity_timeout > 0 {
        ext_flags |= EXT_AFFINITY;
    }

    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut external = Vec::new();
    // By family: a dual-stack pod is one endpoint with an address of each.
    let mut local_endpoints: BTreeMap<u8, BTreeSet<[u32; 4]>> = BTreeMap::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let p = check_port(&name, &format!("spec.ports[{i}].port"), port.port)?;
        let proto_name = port.protocol.clone().unwrap_or_else(|| "TCP".to_string());
        if !seen.insert((p, proto_name.clone())) {
            return Err(ServiceError::DuplicatePort {
                service: name,
                port: port.port,
                protocol: proto_name,
            });
        }
        let node_port = match port.node_port {
            Some(np) if has_node_ports => {
                Some(check_port(&name, &format!("spec.ports[{i}].nodePort"), np)?)
            }
            _ => None,
        };
        let Some(proto) = protocol_of(port.protocol.as_deref()) else {
            warn!(service = %name, protocol = %proto_name, port = p, "protocol not supported by the socket dataplane, port skipped");
            continue;
        };
        let mut frontends: Vec<(IpAddr, u16)> = vips.iter().map(|ip| (*ip, p)).collect();
        if let Some(np) = node_port {
            frontends.extend(node.nodeport_addresses.iter().map(|ip| (*ip, np)));
        }
        for (j, (ip, fport)) in frontends.into_iter().enumerate() {
            let (family, addr) = encode_ip(ip);
            let key = ServiceKey {
                addr,
                port: encode_port(fport),
                proto,
                family,
            };
            if j >= first_external {
                let set_name = format!("{name}:{p}/{proto_name}/{family}");
                match external
                    .iter_mut()
                    .find(|s: &&mut ExternalSet| s.name == set_name)
                {
                    Some(set) => set.frontends.push(key),
                    None => {
                        let backends: Vec<ExtBackend> =
                            backends_for(&name, port, family, external_local, slices, node)
                                .into_iter()
                                .map(|(b, local)| {
                                    if local {
                                        local_endpoints.entry(b.family).or_default().insert(b.addr);
                                    }
                                    ExtBackend {
                                        addr: b.addr,
                                        port: b.port,
                                        family: b.family,
                                        flags: if local { BACKEND_LOCAL } else { 0 },
                                    }
                                })
                                .collect();
                        // No endpoints at all (not only none on this
                        // node): refused, as kube-proxy REJECTs.
                        // (Only under the Local policy can the set be empty
                        // while other nodes have endpoints.)
                        let none_anywhere = backends.is_empty()
                            && (!external_local
                                || backends_for(&name, port, family, false, slices, node)
                                    .is_empty());
                        external.push(ExternalSet {
                            name: set_name,
                            frontends: vec![key],
                            backends,
                            flags: if none_anywhere {
                                ext_flags | EXT_REJECT
                            } else {
                                ext_flags
                            },
                            affinity_timeout,
                        });
                    }
                }
            }
            let mut picked = backends_for(&name, port, family, local_only, slices, node);
            // PreferSameNode: this node's endpoints while it has any,
            // every node's when it has none.
            if prefer_same_node && picked.iter().any(|(_, local)| *local) {
                picked.retain(|(_, local)| *local);
            }
            let backends: Vec<Backend> = picked.into_iter().map(|(b, _)| b).collect();
            if backends.len() > MAX_SLOTS_PER_SERVICE as usize {
                return Err(ServiceError::TooManyBackends {
                    service: name,
                    frontend: frontend_string(&key),
                    count: backends.len(),
                    max: MAX_SLOTS_PER_SERVICE,
                });
            }
            out.push(Frontend {
                key,
                affinity_timeout,
                backends,
            });
        }
    }
    let health = match spec.health_check_node_port {
        Some(hc) if external_local => {
            let (namespace, svc_name) = name.split_once('/').unwrap_or(("default", &name));
            Some(Health {
                port: check_port(&name, "spec.healthCheckNodePort", hc)?,
                namespace: namespace.to_string(),
                name: svc_name.to_string(),
                local_endpoints: local_endpoints
                    .values()
                    .map(BTreeSet::len)
                    .max()
                    .unwrap_or(0),
            })
        }
        _ => None,
    };
    Ok(ServicePlan {
        socket: out,
        external,
        health,
    })
}

impl Catalog {
    pub fn plan_of(&self, service: &str, node: &NodeView) -> Result<ServicePlan, ServiceError> {
        let Some(svc) = self.services.get(service) else {
            return Ok(ServicePlan::default());
        };
        let slices: Vec<&EndpointSlice> = self
            .slices
            .get(service)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        service_plan(svc, &slices, node)
    }

    /// Every service's plan; services in error are left out and their
    /// errors returned beside.
    pub fn desired(&self, node: &NodeView) -> (BTreeMap<String, ServicePlan>, Vec<ServiceError>) {
        let mut ok = BTreeMap::new();
        let mut errors = Vec::new();
        for name in self.services.keys() {
            match self.plan_of(name, node) {
                Ok(f) => {
                    ok.insert(name.clone(), f);
                }
                Err(e) => errors.push(e),
            }
        }
        (ok, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service json")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice json")
    }

    fn node() -> NodeView {
        NodeView {
            node_name: "n1".into(),
            nodeport_addresses: vec!["192.0.2.1".parse().expect("ip")],
        }
    }

    fn web_slice(endpoints: serde_json::Value) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
    }

    fn web(extra: serde_json::Value) -> Service {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        });
        if let (Some(spec), Some(extra)) = (v["spec"].as_object_mut(), extra.as_object()) {
            for (k, val) in extra {
                spec.insert(k.clone(), val.clone());
            }
        }
        svc(v)
    }

    fn addrs(f: &Frontend) -> Vec<String> {
        f.backends.iter().map(backend_string).collect()
    }

    #[test]
    fn ready_endpoints_are_backends() {
        let s = web_slice(json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.2"]},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
        ]));
        let f = service_frontends(&web(json!({})), &[&s], &node()).expect("ok");
        assert_eq!(f.len(), 1);
        assert_eq!(frontend_string(&f[0].key), "10.96.0.10:80/TCP");
        assert_eq!(addrs(&f[0]), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    }

    #[test]
    fn serving_terminating_used_only_when_none_ready() {
        let both = web_slice(json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        let f = service_frontends(&web(json!({})), &[&both], &node()).expect("ok");
        assert_eq!(addrs(&f[0]), ["10.0.0.1:8080"]);

        let only_term = web_slice(json!([
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        let f = service_frontends(&web(json!({})), &[&only_term], &node()).expect("ok");
        assert_eq!(addrs(&f[0]), ["10.0.0.2:8080"]);
    }

    #[test]
    fn no_endpoints_gives_empty_backend_set() {
        let f = service_frontends(&web(json!({})), &[], &node()).expect("ok");
        assert_eq!(f.len(), 1);
        assert!(f[0].backends.is_empty());
    }

    #[test]
    fn node_port_and_external_ips_are_frontends() {
        let s = web_slice(json!([{"addresses": ["10.0.0.1"]}]));
        let svc = svc(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalIPs": ["198.51.100.7"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }));
        let f = service_frontends(&svc, &[&s], &node()).expect("ok");
        let names: Vec<String> = f.iter().map(|f| frontend_string(&f.key)).collect();
        assert_eq!(
            names,
            [
                "10.96.0.10:80/TCP",
                "198.51.100.7:80/TCP",
                "192.0.2.1:30080/TCP"
            ]
        );
        assert!(f.iter().all(|f| addrs(f) == ["10.0.0.1:8080"]));
    }

    #[test]
    fn external_sets_hold_node_ports_and_external_ips_and_mark_local_backends() {
        let s = web_slice(json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1"},
            {"addresses": ["10.0.0.2"], "nodeName": "n2"},
        ]));
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["198.51.100.7"],
                     "healthCheckNodePort": 32000,
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        });
        let plan = service_plan(&svc(v.clone()), &[&s], &node()).expect("ok");
        assert_eq!(plan.external.len(), 1);
        let set = &plan.external[0];
        assert_eq!(set.name, "default/web:80/TCP/4");
        let names: Vec<String> = set.frontends.iter().map(frontend_string).collect();
        assert_eq!(names, ["198.51.100.7:80/TCP", "192.0.2.1:30080/TCP"]);
        let flags: Vec<u8> = set.backends.iter().map(|b| b.flags).collect();
        assert_eq!(flags, [BACKEND_LOCAL, 0]);
        assert_eq!(set.flags, 0);
        assert_eq!(
            plan.health, None,
            "a health check port only under eTP Local"
        );

        v["spec"]["externalTrafficPolicy"] = json!("Local");
        let plan = service_plan(&svc(v.clone()), &[&s], &node()).expect("ok");
        let set = &plan.external[0];
        assert_eq!(set.flags, EXT_LOCAL);
        assert_eq!(set.backends.len(), 1, "local endpoints only");
        // Local clients still reach every endpoint.
        assert_eq!(plan.socket[2].backends.len(), 2);
        let h = plan.health.expect("health check");
        assert_eq!((h.port, h.local_endpoints), (32000, 1));

        // No endpoint on this node: dropped (EXT_LOCAL alone); none at
        // all: refused (EXT_REJECT), as kube-proxy does.
        let elsewhere = web_slice(json!([{"addresses": ["10.0.0.2"], "nodeName": "n2"}]));
        let plan = service_plan(&svc(v.clone()), &[&elsewhere], &node()).expect("ok");
        assert_eq!(plan.external[0].flags, EXT_LOCAL);
        let plan = service_plan(&svc(v.clone()), &[], &node()).expect("ok");
        assert_eq!(plan.external[0].flags, EXT_LOCAL | EXT_REJECT);
        v["spec"]["externalTrafficPolicy"] = json!("Cluster");
        let plan = service_plan(&svc(v), &[], &node()).expect("ok");
        assert_eq!(plan.external[0].flags, EXT_REJECT);
    }

    #[test]
    fn a_dual_stack_pod_is_one_local_endpoint_for_the_health_check() {
        let v4 = web_slice(json!([{"addresses": ["10.0.0.1"], "nodeName": "n1"}]));
        let v6 = slice(json!({
            "metadata": {"name": "web-v6", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["fd00::1"], "nodeName": "n1"}],
        }));
        let service = svc(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }));
        let mut n = node();
        n.nodeport_addresses
            .push("2001:db8::1".parse().expect("ip"));
        let plan = service_plan(&service, &[&v4, &v6], &n).expect("ok");
        assert_eq!(plan.external.len(), 2, "a NodePort set per family");
        let h = plan.health.expect("health check");
        assert_eq!(h.local_endpoints, 1);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_local_endpoints() {
        let s = web_slice(json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1"},
            {"addresses": ["10.0.0.2"], "nodeName": "n2"},
        ]));
        let f = service_frontends(
            &web(json!({"internalTrafficPolicy": "Local"})),
            &[&s],
            &node(),
        )
        .expect("ok");
        assert_eq!(addrs(&f[0]), ["10.0.0.1:8080"]);
    }

    #[test]
    fn prefer_same_node_keeps_this_nodes_ready_endpoints_and_falls_back_to_all() {
        let svc = web(json!({"trafficDistribution": "PreferSameNode"}));
        let both = web_slice(json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1"},
            {"addresses": ["10.0.0.2"], "nodeName": "n2"},
        ]));
        let f = service_frontends(&svc, &[&both], &node()).expect("ok");
        assert_eq!(addrs(&f[0]), ["10.0.0.1:8080"]);
        // This node's endpoint not ready (or gone): every node's.
        let unready = web_slice(json!([
            {"addresses": ["10.0.0.1"], "nodeName": "n1", "conditions": {"ready": false}},
            {"addresses": ["10.0.0.2"], "nodeName": "n2"},
            {"addresses": ["10.0.0.3"], "nodeName": "n3"},
        ]));
        let f = service_frontends(&svc, &[&unready], &node()).expect("ok");
        assert_eq!(addrs(&f[0]), ["10.0.0.2:8080", "10.0.0.3:8080"]);
    }

    #[test]
    fn client_ip_affinity_default_timeout() {
        let f = service_frontends(&web(json!({"sessionAffinity": "ClientIP"})), &[], &node())
            .expect("ok");
        assert_eq!(f[0].affinity_timeout, 10_800);
        let bad = service_frontends(
            &web(json!({"sessionAffinity": "ClientIP",
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}})),
            &[],
            &node(),
        );
        assert!(
            matches!(bad, Err(ServiceError::InvalidAffinityTimeout { .. })),
            "{bad:?}"
        );
    }

    #[test]
    fn bad_port_ip_and_duplicates_are_errors_naming_the_field() {
        let e = service_frontends(&web(json!({"ports": [{"port": 70000}]})), &[], &node())
            .expect_err("bad port");
        assert!(e.to_string().contains("spec.ports[0].port"), "{e}");

        let e = service_frontends(&web(json!({"clusterIP": "10.96.0.999"})), &[], &node())
            .expect_err("bad ip");
        assert!(e.to_string().contains("spec.clusterIP"), "{e}");

        let e = service_frontends(
            &web(json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]})),
            &[],
            &node(),
        )
        .expect_err("dup");
        assert!(
            matches!(e, ServiceError::DuplicatePort { port: 80, .. }),
            "{e}"
        );
    }

    #[test]
    fn headless_and_external_name_have_no_frontends() {
        assert!(
            service_frontends(&web(json!({"clusterIP": "None"})), &[], &node())
                .expect("ok")
                .is_empty()
        );
        assert!(
            service_frontends(&web(json!({"type": "ExternalName"})), &[], &node())
                .expect("ok")
                .is_empty()
        );
    }

    #[test]
    fn dual_stack_uses_matching_slices() {
        let v6 = slice(json!({
            "metadata": {"name": "web-v6", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00::1"]}],
        }));
        let v4 = web_slice(json!([{"addresses": ["10.0.0.1"]}]));
        let f = service_frontends(
            &web(json!({"clusterIPs": ["10.96.0.10", "fd00:96::10"]})),
            &[&v4, &v6],
            &node(),
        )
        .expect("ok");
        assert_eq!(frontend_string(&f[1].key), "[fd00:96::10]:80/TCP");
        assert_eq!(addrs(&f[0]), ["10.0.0.1:8080"]);
        assert_eq!(addrs(&f[1]), ["[fd00::1]:8080"]);
    }

    #[test]
    fn encodings_round_trip() {
        for ip in ["10.1.2.3", "fd00::1:2"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let (fam, a) = encode_ip(ip);
            assert_eq!(decode_ip(fam, &a), ip);
        }
        assert_eq!(decode_port(encode_port(30080)), 30080);
        assert_eq!(encode_port(80).to_ne_bytes(), [0, 80]);
    }
}
