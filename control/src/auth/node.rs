//! The Node authorizer with NodeRestriction's limits: what a node's
//! credential (`system:node:<name>` in `system:nodes`) may do.
//!
//! A node reads what its kubelet, service proxy and overlay read: nodes,
//! pods, services, endpoints and slices, PersistentVolumes, and the
//! ConfigMaps, Secrets, ServiceAccounts and PersistentVolumeClaims of pods
//! bound to it. It writes only its own Node and Lease, the status of pods
//! bound to it (and their final deletion), Events, its certificate
//! requests, tokens for pods bound to it, and the volumes whose node
//! affinity names it alone (to finalize them). For the ingress role it
//! reads Ingresses and IngressClasses, the Secrets Ingresses name for TLS,
//! and writes Ingresses' status.

use serde_json::Value;

use super::{Decision, ResourceAttributes};
use crate::resources;
use crate::storage::store::Store;

const READ: &[&str] = &["get", "list", "watch"];

fn deny(reason: impl Into<String>) -> Decision {
    Decision::Deny(reason.into())
}

/// A stored object, or None.
async fn stored(
    store: &Store,
    group: &str,
    plural: &str,
    ns: &str,
    name: &str,
) -> Result<Option<Value>, String> {
    let r = resources::find(group, "v1", plural).ok_or_else(|| format!("no {plural}"))?;
    let ns = (!ns.is_empty()).then_some(ns);
    let item = store
        .get(&r.key(ns, name))
        .await
        .map_err(|e| e.to_string())?;
    Ok(item.and_then(|i| serde_json::from_slice(&i.value).ok()))
}

/// The Secrets an Ingress names in its `spec.tls`.
fn tls_secrets(ingress: &Value) -> Vec<String> {
    ingress
        .pointer("/spec/tls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("secretName").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

fn bound_to(pod: &Value, node: &str) -> bool {
    pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
}

/// The ConfigMaps, Secrets and the ServiceAccount a pod uses, as
/// (resource, name).
fn referenced(pod: &Value) -> Vec<(&'static str, String)> {
    let spec = &pod["spec"];
    let mut out = Vec::new();
    let sa = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    out.push(("serviceaccounts", sa.to_string()));
    let mut add = |plural: &'static str, v: Option<&Value>, field: &str| {
        if let Some(n) = v.and_then(|x| x.get(field)).and_then(Value::as_str) {
            out.push((plural, n.to_string()));
        }
    };
    let list = |v: Option<&Value>| -> Vec<Value> {
        v.and_then(Value::as_array).cloned().unwrap_or_default()
    };
    for v in list(spec.get("volumes")) {
        add(
            "persistentvolumeclaims",
            v.get("persistentVolumeClaim"),
            "claimName",
        );
        add("configmaps", v.get("configMap"), "name");
        add("secrets", v.get("secret"), "secretName");
        for src in list(v.pointer("/projected/sources")) {
            add("configmaps", src.get("configMap"), "name");
            add("secrets", src.get("secret"), "name");
        }
    }
    for s in list(spec.get("imagePullSecrets")) {
        add("secrets", Some(&s), "name");
    }
    for c in list(spec.get("initContainers"))
        .into_iter()
        .chain(list(spec.get("containers")))
    {
        for e in list(c.get("env")) {
            let from = e.get("valueFrom");
            add(
                "configmaps",
                from.and_then(|f| f.get("configMapKeyRef")),
                "name",
            );
            add("secrets", from.and_then(|f| f.get("secretKeyRef")), "name");
        }
        for f in list(c.get("envFrom")) {
            add("configmaps", f.get("configMapRef"), "name");
            add("secrets", f.get("secretRef"), "name");
        }
    }
    out
}

/// Whether a volume's node affinity names `node` by hostname alone, as
/// the node-local provisioner writes it.
fn volume_on(pv: &Value, node: &str) -> bool {
    let terms = pv
        .pointer("/spec/nodeAffinity/required/nodeSelectorTerms")
        .and_then(Value::as_array);
    terms.is_some_and(|t| {
        !t.is_empty()
            && t.iter().all(|term| {
                term.get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_some_and(|es| {
                        es.iter().any(|e| {
                            e.get("key").and_then(Value::as_str) == Some("kubernetes.io/hostname")
                                && e.get("operator").and_then(Value::as_str) == Some("In")
                                && e.get("values")
                                    .and_then(Value::as_array)
                                    .is_some_and(|v| v.len() == 1 && v[0] == node)
                        })
                    })
            })
    })
}

/// Whether `pod` uses the ConfigMap, Secret or ServiceAccount `name`.
fn references(pod: &Value, plural: &str, name: &str) -> bool {
    referenced(pod)
        .iter()
        .any(|(p, n)| *p == plural && n == name)
}

/// Which node each pod is bound to and what it uses, kept in memory from
/// etcd ([`super::mirror`]): the Node authorizer's graph, read on every
/// ConfigMap or Secret a kubelet fetches (each volume resync).
#[derive(Default)]
pub struct PodIndex(std::sync::RwLock<std::collections::HashMap<(String, String), Bound>>);

struct Bound {
    node: String,
    uses: Vec<(&'static str, String)>,
}

impl super::mirror::View for PodIndex {
    fn reset(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn apply(&self, pod: &Value, present: bool) {
        let key = super::mirror::ns_name(pod);
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if present && !node.is_empty() {
            map.insert(
                key,
                Bound {
                    node,
                    uses: referenced(pod),
                },
            );
        } else {
            map.remove(&key);
        }
    }
}

/// The Secrets each Ingress names for TLS, by Ingress, kept in memory
/// from etcd ([`super::mirror`]) as the pods are: read when a node reads or
/// watches a Secret for its ingress role.
#[derive(Default)]
pub struct TlsIndex(std::sync::RwLock<std::collections::HashMap<(String, String), Vec<String>>>);

impl super::mirror::View for TlsIndex {
    fn reset(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn apply(&self, ingress: &Value, present: bool) {
        let key = super::mirror::ns_name(ingress);
        let names = if present {
            tls_secrets(ingress)
        } else {
            Vec::new()
        };
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if names.is_empty() {
            map.remove(&key);
        } else {
            map.insert(key, names);
        }
    }
}

impl TlsIndex {
    /// Whether some Ingress of `ns` names Secret `name` for TLS.
    fn named(&self, ns: &str, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|((ing_ns, _), names)| ing_ns == ns && names.iter().any(|n| n == name))
    }
}

/// What the Node authorizer reads besides the request: which pods are
/// bound where and what they use, and what Ingresses name for TLS.
#[derive(Default)]
pub struct Graph {
    pub pods: std::sync::Arc<PodIndex>,
    pub tls: std::sync::Arc<TlsIndex>,
}

impl PodIndex {
    /// Whether some pod bound to `node` in `ns` uses `plural/name`.
    fn used_on(&self, node: &str, ns: &str, plural: &str, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|((pod_ns, _), b)| {
                pod_ns == ns
                    && b.node == node
                    && b.uses.iter().any(|(p, n)| *p == plural && n == name)
            })
    }
}

/// The decision for node `node`. `body` is the object of a create or an
/// update (its name, a TokenRequest's bound pod, a slice's endpoints).
pub async fn authorize(
    store: &Store,
    graph: &Graph,
    node: &str,
    a: &ResourceAttributes,
    body: Option<&Value>,
) -> Decision {
    match decide(store, graph, node, a, body).await {
        Ok(d) => d,
        Err(e) => deny(format!("the node authorizer could not decide: {e}")),
    }
}

async fn decide(
    store: &Store,
    graph: &Graph,
    node: &str,
    a: &ResourceAttributes,
    body: Option<&Value>,
) -> Result<Decision, String> {
    let verb = a.verb.as_str();
    let reading = READ.contains(&verb);
    let own = |name: &str| name == node;
    let body_name = body
        .and_then(|b| b.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let sub = a.subresource.as_str();
    Ok(match (a.group.as_str(), a.resource.as_str()) {
        ("", "nodes") if reading => Decision::Allow,
        ("", "nodes") => {
            let target = if verb == "create" { body_name } else { &a.name };
            if !matches!(sub, "" | "status") {
                deny(format!("a node may not use nodes/{sub}"))
            } else if verb == "deletecollection" || !own(target) {
                deny(format!("node {node:?} may only modify its own Node"))
            } else {
                Decision::Allow
            }
        }
        ("", "pods") if reading && matches!(sub, "" | "status") => Decision::Allow,
        ("", "pods") if matches!(verb, "update" | "patch") && sub == "status" => {
            match stored(store, "", "pods", &a.namespace, &a.name).await? {
                Some(p) if bound_to(&p, node) => Decision::Allow,
                Some(_) => deny(format!(
                    "node {node:?} may only change the status of pods bound to it"
                )),
                None => Decision::Allow, // the update answers 404
            }
        }
        ("", "pods") if verb == "delete" && sub.is_empty() => {
            match stored(store, "", "pods", &a.namespace, &a.name).await? {
                Some(p) if bound_to(&p, node) => Decision::Allow,
                Some(_) => deny(format!("node {node:?} may only delete pods bound to it")),
                None => Decision::Allow,
            }
        }
        ("", "pods") => deny(format!(
            "a node may read pods and write the status of its own, not {verb} {}",
            a.resource_path()
        )),
        ("", "services" | "endpoints") | ("discovery.k8s.io", "endpointslices")
            if reading && sub.is_empty() =>
        {
            Decision::Allow
        }
        ("discovery.k8s.io", "endpointslices") => dns_slice(node, verb, sub, a, body),
        // The ingress role routes by the Ingresses of its class, and
        // lists the node's address in the status of those it serves.
        ("networking.k8s.io", "ingresses" | "ingressclasses") if reading && sub.is_empty() => {
            Decision::Allow
        }
        ("networking.k8s.io", "ingresses")
            if sub == "status" && matches!(verb, "get" | "patch" | "update") =>
        {
            Decision::Allow
        }
        // A Secret an Ingress names for TLS: the ingress role serves its
        // certificate, and watches it by name to reload it.
        ("", "secrets")
            if reading && sub.is_empty() && !a.name.is_empty() && !a.namespace.is_empty() =>
        {
            if verb == "get" && graph.pods.used_on(node, &a.namespace, "secrets", &a.name)
                || graph.tls.named(&a.namespace, &a.name)
            {
                Decision::Allow
            } else {
                deny(format!(
                    "no relationship found between node {node:?} and this object"
                ))
            }
        }
        ("", "persistentvolumes") if reading && sub.is_empty() => Decision::Allow,
        ("", "persistentvolumes") if matches!(verb, "update" | "patch") && sub.is_empty() => {
            match stored(store, "", "persistentvolumes", "", &a.name).await? {
                Some(pv) if volume_on(&pv, node) => Decision::Allow,
                Some(_) => deny(format!(
                    "node {node:?} may only finalize volumes with affinity to it"
                )),
                None => Decision::Allow,
            }
        }
        (
            "",
            plural @ ("configmaps" | "secrets" | "serviceaccounts" | "persistentvolumeclaims"),
        ) if verb == "get" && sub.is_empty() => {
            if graph.pods.used_on(node, &a.namespace, plural, &a.name) {
                Decision::Allow
            } else {
                deny(format!(
                    "no relationship found between node {node:?} and this object"
                ))
            }
        }
        ("", "serviceaccounts") if verb == "create" && sub == "token" => {
            let pod = body
                .and_then(|b| b.pointer("/spec/boundObjectRef"))
                .filter(|r| r.get("kind").and_then(Value::as_str) == Some("Pod"))
                .and_then(|r| r.get("name"))
                .and_then(Value::as_str);
            let Some(pod) = pod else {
                return Ok(deny("a node may only request tokens bound to a pod"));
            };
            match stored(store, "", "pods", &a.namespace, pod).await? {
                Some(p) if bound_to(&p, node) && references(&p, "serviceaccounts", &a.name) => {
                    Decision::Allow
                }
                _ => deny(format!(
                    "pod {pod:?} is not bound to node {node:?} or does not use this serviceaccount"
                )),
            }
        }
        ("coordination.k8s.io", "leases") => {
            let target = if verb == "create" { body_name } else { &a.name };
            if a.namespace == "kube-node-lease"
                && own(target)
                && sub.is_empty()
                && matches!(verb, "get" | "create" | "update" | "patch" | "delete")
            {
                Decision::Allow
            } else {
                deny(format!(
                    "node {node:?} may only use its own Lease in kube-node-lease"
                ))
            }
        }
        ("" | "events.k8s.io", "events")
            if matches!(verb, "create" | "update" | "patch") && sub.is_empty() =>
        {
            Decision::Allow
        }
        ("certificates.k8s.io", "certificatesigningrequests")
            if matches!(verb, "create" | "get" | "list" | "watch") && sub.is_empty() =>
        {
            Decision::Allow
        }
        _ => deny(""),
    })
}

/// The cluster DNS Service whose endpoints each node writes for itself.
const DNS_NAMESPACE: &str = "kube-system";
const DNS_SERVICE: &str = "kube-dns";

/// A node may write one EndpointSlice per address family,
/// `kube-system/kube-dns-<node>` and `kube-system/kube-dns-<node>-v6`, of
/// the `kube-dns` Service, whose every endpoint names that node. (With the
/// Service's `trafficDistribution: PreferSameNode`, an endpoint naming
/// another node would take over that node's DNS.) Patches are refused: the
/// result could not be checked before it is written.
fn dns_slice(
    node: &str,
    verb: &str,
    sub: &str,
    a: &ResourceAttributes,
    body: Option<&Value>,
) -> Decision {
    let own = format!("{DNS_SERVICE}-{node}");
    let own_v6 = format!("{own}-v6");
    let name = match (verb, body) {
        ("create", Some(b)) => b.pointer("/metadata/name").and_then(Value::as_str),
        _ => Some(a.name.as_str()),
    };
    if !sub.is_empty()
        || a.namespace != DNS_NAMESPACE
        || !(name == Some(own.as_str()) || name == Some(own_v6.as_str()))
        || !matches!(verb, "create" | "update" | "delete")
    {
        return deny(format!(
            "node {node:?} may only create, update or delete the EndpointSlices \
             {DNS_NAMESPACE}/{own} and {DNS_NAMESPACE}/{own_v6}"
        ));
    }
    if verb == "delete" {
        return Decision::Allow;
    }
    let Some(b) = body else {
        return deny("no body");
    };
    let service = b
        .pointer("/metadata/labels/kubernetes.io~1service-name")
        .and_then(Value::as_str);
    let endpoints = b.get("endpoints").and_then(Value::as_array);
    let all_own = endpoints.is_none_or(|eps| {
        eps.iter()
            .all(|e| e.get("nodeName").and_then(Value::as_str) == Some(node))
    });
    if service != Some(DNS_SERVICE) || !all_own {
        return deny(format!(
            "node {node:?} may only publish its own endpoints of the {DNS_SERVICE} Service"
        ));
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_node_writes_only_its_own_dns_endpoint() {
        let attrs = |verb: &str, ns: &str, name: &str| ResourceAttributes {
            verb: verb.into(),
            group: "discovery.k8s.io".into(),
            resource: "endpointslices".into(),
            namespace: ns.into(),
            name: name.into(),
            ..Default::default()
        };
        let slice = |name: &str, service: &str, node: &str| {
            json!({"metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
                   "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": node}]})
        };
        let allowed = |d: Decision| matches!(d, Decision::Allow);
        let good = slice("kube-dns-n1", "kube-dns", "n1");
        let create = attrs("create", "kube-system", "");
        assert!(allowed(dns_slice("n1", "create", "", &create, Some(&good))));
        let update = attrs("update", "kube-system", "kube-dns-n1");
        assert!(allowed(dns_slice("n1", "update", "", &update, Some(&good))));
        let delete = attrs("delete", "kube-system", "kube-dns-n1");
        assert!(allowed(dns_slice("n1", "delete", "", &delete, None)));
        let v6 = slice("kube-dns-n1-v6", "kube-dns", "n1");
        assert!(allowed(dns_slice("n1", "create", "", &create, Some(&v6))));
        let delete_v6 = attrs("delete", "kube-system", "kube-dns-n1-v6");
        assert!(allowed(dns_slice("n1", "delete", "", &delete_v6, None)));
        for (who, verb, a, body) in [
            (
                "n1",
                "create",
                &create,
                slice("kube-dns-n1-v4", "kube-dns", "n1"),
            ),
            (
                "n2",
                "delete",
                &attrs("delete", "kube-system", "kube-dns-n1-v6"),
                good.clone(),
            ),
            (
                "n2",
                "create",
                &create,
                slice("kube-dns-n1", "kube-dns", "n1"),
            ),
            ("n1", "create", &create, slice("kube-dns-n1", "web", "n1")),
            (
                "n1",
                "create",
                &create,
                slice("kube-dns-n1", "kube-dns", "n2"),
            ),
            ("n1", "patch", &update, good.clone()),
            (
                "n1",
                "create",
                &attrs("create", "default", ""),
                good.clone(),
            ),
            (
                "n1",
                "delete",
                &attrs("delete", "kube-system", "kube-dns-n2"),
                good.clone(),
            ),
        ] {
            assert!(
                !allowed(dns_slice(who, verb, "", a, Some(&body))),
                "{who} {verb} {body}"
            );
        }
    }

    #[test]
    fn ingresses_name_their_tls_secrets() {
        use super::super::mirror::View as _;
        let idx = TlsIndex::default();
        let ing = |name: &str, secret: &str| {
            json!({"metadata": {"namespace": "shop", "name": name},
                "spec": {"tls": [{"hosts": ["a"], "secretName": secret}, {"hosts": ["b"]}]}})
        };
        idx.apply(&ing("web", "web-tls"), true);
        assert!(idx.named("shop", "web-tls"));
        assert!(!idx.named("other", "web-tls"), "another namespace's");
        assert!(!idx.named("shop", "other"));
        // The Ingress names another Secret now, then goes.
        idx.apply(&ing("web", "new-tls"), true);
        assert!(!idx.named("shop", "web-tls") && idx.named("shop", "new-tls"));
        idx.apply(&ing("web", "new-tls"), false);
        assert!(!idx.named("shop", "new-tls"));
    }

    #[test]
    fn pods_reference_their_config() {
        let pod = json!({"spec": {
            "serviceAccountName": "builder",
            "volumes": [
                {"name": "a", "configMap": {"name": "cm1"}},
                {"name": "b", "secret": {"secretName": "s1"}},
                {"name": "c", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}},
            ],
            "containers": [{"name": "x", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}],
                            "envFrom": [{"configMapRef": {"name": "cm2"}}]}],
        }});
        for (plural, name) in [
            ("configmaps", "cm1"),
            ("configmaps", "cm2"),
            ("configmaps", "kube-root-ca.crt"),
            ("secrets", "s1"),
            ("secrets", "s2"),
            ("serviceaccounts", "builder"),
        ] {
            assert!(references(&pod, plural, name), "{plural}/{name}");
        }
        assert!(!references(&pod, "secrets", "cm1"));
        assert!(!references(&pod, "serviceaccounts", "default"));
        assert!(references(
            &json!({"spec": {}}),
            "serviceaccounts",
            "default"
        ));
    }
}
