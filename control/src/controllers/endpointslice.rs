//! EndpointSlice: for every Service with a selector, one slice per family
//! in its `ipFamilies` (the first named after the Service, a second
//! `<name>-ipv6` or `<name>-ipv4`), listing the selected pods that have an
//! address of that family, with the ready / serving / terminating
//! conditions the service proxy reads. Slices are owned by their Service,
//! so the garbage collector removes them with it; a family the Service no
//! longer has loses its slice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::PostParams;
use kube::{Api, Client, Resource};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::informer::{next_pass, ready, reflect};
use crate::meta::{is_ready, name_of, ns_of};

pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGER: &str = "endpointslice-controller.skiff.dev";

fn port_of(pod: &Pod, target: &IntOrString) -> Option<i32> {
    match target {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(name) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// `pod`'s address of `family` (`IPv4`/`IPv6`): from `status.podIPs`, else
/// `status.podIP`.
fn address_of(pod: &Pod, family: &str) -> Option<String> {
    let st = pod.status.as_ref()?;
    let fits = |ip: &str| match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => family == "IPv4",
        Ok(std::net::IpAddr::V6(_)) => family == "IPv6",
        Err(_) => false,
    };
    st.pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(st.pod_ip.as_deref())
        .find(|ip| fits(ip))
        .map(String::from)
}

/// The slices `svc` has, by name and family: one per family of its
/// `ipFamilies` (the first named after it); none without a selector.
pub fn slice_names(svc: &Service) -> Vec<(String, String)> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    if spec.selector.as_ref().is_none_or(|s| s.is_empty())
        || spec.type_.as_deref() == Some("ExternalName")
    {
        return Vec::new();
    }
    let name = name_of(&svc.metadata);
    let families = spec
        .ip_families
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| vec!["IPv4".into()]);
    families
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let slice = if i == 0 {
                name.to_string()
            } else {
                format!("{name}-{}", f.to_lowercase())
            };
            (slice, f)
        })
        .collect()
}

/// The slices `svc` should have, given the pods of its namespace: the pods
/// are selected once, then each family's slice lists those with an
/// address of it.
pub fn desired(svc: &Service, pods: &[Arc<Pod>]) -> Vec<EndpointSlice> {
    let names = slice_names(svc);
    let Some((spec, selector)) = svc
        .spec
        .as_ref()
        .and_then(|s| Some((s, s.selector.as_ref()?)))
        .filter(|_| !names.is_empty())
    else {
        return Vec::new();
    };
    let ns = ns_of(&svc.metadata);
    let mut selected: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| ns_of(&p.metadata) == ns)
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    selected.sort_by(|a, b| name_of(&a.metadata).cmp(name_of(&b.metadata)));
    names
        .iter()
        .map(|(slice, family)| slice_of(svc, spec, &selected, family, slice))
        .collect()
}

fn slice_of(
    svc: &Service,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    selected: &[&Arc<Pod>],
    family: &str,
    slice_name: &str,
) -> EndpointSlice {
    let (name, ns) = (name_of(&svc.metadata), ns_of(&svc.metadata));
    let publish_unready = spec.publish_not_ready_addresses == Some(true);
    let with_address: Vec<(&Arc<Pod>, String)> = selected
        .iter()
        .filter_map(|p| Some((*p, address_of(p, family)?)))
        .collect();
    let endpoints: Vec<Endpoint> = with_address
        .iter()
        .map(|(p, address)| {
            let terminating = p.metadata.deletion_timestamp.is_some();
            let serving = is_ready(p) || publish_unready;
            Endpoint {
                addresses: vec![address.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(serving && !terminating),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                // A pod names itself in its Service's DNS with a hostname
                // and that Service as its subdomain.
                hostname: p
                    .spec
                    .as_ref()
                    .filter(|s| s.subdomain.as_deref() == Some(name))
                    .and_then(|s| s.hostname.clone())
                    .filter(|h| !h.is_empty()),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(ns.into()),
                    name: p.metadata.name.clone(),
                    uid: p.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let first = with_address.first().map(|(p, _)| p);
    let ports: Vec<EndpointPort> = spec
        .ports
        .iter()
        .flatten()
        .map(|sp| {
            let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
            EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: first.and_then(|p| port_of(p, &target)).or(match target {
                    IntOrString::Int(n) => Some(n),
                    IntOrString::String(_) => None,
                }),
                protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: sp.app_protocol.clone(),
            }
        })
        .collect();
    let labels = BTreeMap::from([
        (SERVICE_NAME.to_string(), name.to_string()),
        (MANAGED_BY.to_string(), MANAGER.to_string()),
    ]);
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(labels),
            owner_references: crate::meta::owner_ref(svc).map(|mut o| {
                o.block_owner_deletion = Some(true);
                vec![o]
            }),
            ..Default::default()
        },
        address_type: family.into(),
        endpoints: Some(endpoints),
        ports: Some(ports),
    }
}

fn same(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.endpoints == b.endpoints
        && a.ports == b.ports
        && a.metadata.labels == b.metadata.labels
        && a.metadata.owner_references == b.metadata.owner_references
}

pub async fn run(client: Client) {
    let notify = Arc::new(Notify::new());
    let (svcs, _a) = reflect(Api::<Service>::all(client.clone()), notify.clone());
    let (pods, _b) = reflect(Api::<Pod>::all(client.clone()), notify.clone());
    let (slices, _c) = reflect(Api::<EndpointSlice>::all(client.clone()), notify.clone());
    ready(&svcs).await;
    ready(&pods).await;
    ready(&slices).await;
    loop {
        next_pass("endpointslice", &notify, Duration::from_secs(30)).await;
        // Pods by namespace, once per pass: a Service selects only its own.
        let mut by_ns: std::collections::HashMap<String, Vec<Arc<Pod>>> =
            std::collections::HashMap::new();
        for p in pods.state() {
            by_ns
                .entry(ns_of(&p.metadata).to_string())
                .or_default()
                .push(p);
        }
        for svc in svcs.state() {
            let in_ns = by_ns
                .get(ns_of(&svc.metadata))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ns = ns_of(&svc.metadata);
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
            for want in desired(&svc, in_ns) {
                let name = name_of(&want.metadata).to_string();
                let existing = slices.get(
                    &kube::runtime::reflector::ObjectRef::<EndpointSlice>::new(&name).within(ns),
                );
                let result = match existing {
                    Some(cur) if same(&cur, &want) => continue,
                    Some(cur) => {
                        let mut next = want.clone();
                        next.metadata.resource_version = cur.meta().resource_version.clone();
                        api.replace(&name, &PostParams::default(), &next)
                            .await
                            .map(|_| "updated")
                    }
                    None => api
                        .create(&PostParams::default(), &want)
                        .await
                        .map(|_| "created"),
                };
                match result {
                    Ok(what) => {
                        info!(slice = %format!("{ns}/{name}"), family = %want.address_type, endpoints = want.endpoints.as_ref().map_or(0, Vec::len), "endpointslice {what}")
                    }
                    Err(e) => {
                        warn!(slice = %format!("{ns}/{name}"), error = %e, "endpointslice write failed")
                    }
                }
            }
        }
        // A Service that lost its selector, or a family, keeps no managed
        // slice for it.
        for s in slices.state() {
            let managed = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY))
                .is_some_and(|m| m == MANAGER);
            let svc_name = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME))
                .cloned()
                .unwrap_or_default();
            let ns = ns_of(&s.metadata);
            let svc = svcs
                .get(&kube::runtime::reflector::ObjectRef::<Service>::new(&svc_name).within(ns));
            let orphaned = svc.is_some_and(|svc| {
                !slice_names(&svc)
                    .iter()
                    .any(|(n, _)| Some(n) == s.metadata.name.as_ref())
            });
            if managed && orphaned {
                let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
                let _ = api.delete(name_of(&s.metadata), &Default::default()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_follow_pod_readiness_and_deletion() {
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "d", "uid": "u1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}))
        .expect("service");
        let pod = |name: &str, ready: bool, deleting: bool| -> Arc<Pod> {
            let mut p = json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": format!("10.244.0.{}", name.len()),
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            Arc::new(serde_json::from_value(p).expect("pod"))
        };
        let pods = vec![
            pod("a", true, false),
            pod("bb", false, false),
            pod("ccc", true, true),
        ];
        let s = desired(&svc, &pods).pop().expect("slice");
        let conds: Vec<(bool, bool, bool)> = s
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                (
                    c.ready.unwrap_or_default(),
                    c.serving.unwrap_or_default(),
                    c.terminating.unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            conds,
            [
                (true, true, false),
                (false, false, false),
                (false, true, true)
            ]
        );
        assert_eq!(
            s.ports.as_ref().and_then(|p| p[0].port),
            Some(8080),
            "named targetPort resolved"
        );
    }

    #[test]
    fn a_pod_with_the_service_as_its_subdomain_gets_its_hostname() {
        let svc: Service =
            serde_json::from_value(json!({"metadata": {"name": "db", "namespace": "d"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"}}}))
            .expect("service");
        let pod = |name: &str, subdomain: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(
                    json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "db"}},
                    "spec": {"hostname": name, "subdomain": subdomain, "containers": []},
                    "status": {"phase": "Running", "podIP": format!("10.244.0.{}", name.len())}}),
                )
                .expect("pod"),
            )
        };
        let s = desired(&svc, &[pod("db-0", "db"), pod("other", "elsewhere")])
            .pop()
            .expect("slice");
        let hosts: Vec<Option<String>> = s
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.hostname.clone())
            .collect();
        assert_eq!(hosts, [Some("db-0".to_string()), None]);
    }

    #[test]
    fn a_dual_stack_service_gets_a_slice_per_family_with_the_pods_addresses_of_it() {
        let svc: Service = serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "d", "uid": "u1"},
            "spec": {"selector": {"app": "web"}, "ipFamilies": ["IPv6", "IPv4"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        )
        .expect("service");
        let pod = |name: &str, ips: &[&str]| -> Arc<Pod> {
            let ips: Vec<serde_json::Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c"}]},
                    "status": {"phase": "Running", "podIP": ips.first().map(|i| i["ip"].clone()), "podIPs": ips,
                        "conditions": [{"type": "Ready", "status": "True"}]}}))
                .expect("pod"),
            )
        };
        let pods = vec![
            pod("dual", &["10.244.0.5", "fd00:244::5"]),
            pod("v4only", &["10.244.0.6"]),
        ];
        let slices = desired(&svc, &pods);
        let summary: Vec<(String, String, Vec<String>)> = slices
            .iter()
            .map(|s| {
                (
                    name_of(&s.metadata).to_string(),
                    s.address_type.clone(),
                    s.endpoints
                        .iter()
                        .flatten()
                        .flat_map(|e| e.addresses.clone())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("web".into(), "IPv6".into(), vec!["fd00:244::5".into()]),
                (
                    "web-ipv4".into(),
                    "IPv4".into(),
                    vec!["10.244.0.5".into(), "10.244.0.6".into()]
                ),
            ]
        );
    }
}
