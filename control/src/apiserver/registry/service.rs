//! The Service kind's rules: its IP families, and the ClusterIPs and
//! NodePorts it holds, allocated in the same etcd transaction as the write
//! that stores it (guards on the keys it takes, side writes that free the
//! ones it gives back).

use serde_json::{Value, json};

use super::super::Api;
use super::super::fields::{core, store_err, str_at};
use crate::alloc::{self, Cidr};
use crate::status::{ApiError, Cause};
use crate::storage::store::{Guard, Side};

const IP_FAMILIES: [&str; 2] = ["IPv4", "IPv6"];
const POLICIES: [&str; 3] = ["SingleStack", "PreferDualStack", "RequireDualStack"];

/// A Service's `ipFamilyPolicy` and `ipFamilies`, by upstream's rules: the
/// families asked for (else those of the ClusterIPs asked for, else the
/// cluster's primary), a second one added for the dual-stack policies when
/// the cluster has it, refused when a family is not configured here or the
/// policy cannot hold what was asked.
fn ip_families(
    svc: &Value,
    ips: &[String],
    cidrs: &[Cidr],
) -> Result<(String, Vec<&'static str>), Cause> {
    let configured: Vec<&'static str> = cidrs.iter().map(Cidr::family).collect();
    let given: Vec<String> = svc
        .pointer("/spec/ipFamilies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    let mut families: Vec<&'static str> = Vec::new();
    for (i, f) in given.iter().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        let Some(known) = IP_FAMILIES.iter().find(|k| **k == f) else {
            return Err(Cause::unsupported(field, f, &IP_FAMILIES));
        };
        if families.contains(known) {
            return Err(Cause::duplicate(field, f));
        }
        if !configured.contains(known) {
            return Err(Cause::invalid(field, f, "not configured on this cluster"));
        }
        families.push(known);
    }
    let mut ip_families = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let ip: std::net::IpAddr = ip.parse().map_err(|_| {
            Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                ip,
                "must be a valid IP address",
            )
        })?;
        ip_families.push(alloc::family_of(ip));
    }
    if ips.len() > 2 || given.len() > 2 {
        let field = if ips.len() > 2 {
            "spec.clusterIPs"
        } else {
            "spec.ipFamilies"
        };
        return Err(Cause::invalid(
            field,
            ips.len().max(given.len()),
            "may hold at most 2 entries",
        ));
    }
    let policy = match svc.pointer("/spec/ipFamilyPolicy").and_then(Value::as_str) {
        Some(p) if !p.is_empty() => {
            if !POLICIES.contains(&p) {
                return Err(Cause::unsupported("spec.ipFamilyPolicy", p, &POLICIES));
            }
            p.to_string()
        }
        _ if families.len() == 2 || ips.len() == 2 => "RequireDualStack".to_string(),
        _ => "SingleStack".to_string(),
    };
    if families.is_empty() {
        families = if ip_families.is_empty() {
            vec![configured[0]]
        } else {
            ip_families.clone()
        };
    }
    if policy == "SingleStack" && (families.len() > 1 || ips.len() > 1) {
        return Err(Cause::invalid(
            "spec.ipFamilyPolicy",
            &policy,
            "must be RequireDualStack or PreferDualStack when multiple ipFamilies are specified",
        ));
    }
    if policy != "SingleStack" && families.len() == 1 {
        match configured.iter().find(|c| **c != families[0]) {
            Some(other) => families.push(other),
            None if policy == "RequireDualStack" => {
                return Err(Cause::invalid(
                    "spec.ipFamilyPolicy",
                    &policy,
                    "this cluster is not configured for dual-stack services",
                ));
            }
            None => {}
        }
    }
    for (i, f) in ip_families.iter().enumerate() {
        if families.get(i) != Some(f) {
            let want = families.get(i).copied().unwrap_or("no");
            return Err(Cause::invalid(
                format!("spec.clusterIPs[{i}]"),
                &ips[i],
                &format!("expected an {want} value as indicated by `ipFamilies[{i}]`"),
            ));
        }
    }
    Ok((policy, families))
}

/// A Service's ClusterIPs as written: `spec.clusterIPs`, else
/// `spec.clusterIP` alone.
fn cluster_ips(svc: &Value) -> Vec<String> {
    let listed: Vec<String> = svc
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    let one = str_at(svc, "/spec/clusterIP");
    if one.is_empty() {
        Vec::new()
    } else {
        vec![one.to_string()]
    }
}

/// The ClusterIPs and NodePorts a Service holds, as allocation keys.
pub(super) fn held_keys(svc: &Value, cidrs: &[Cidr]) -> Vec<String> {
    let mut keys = Vec::new();
    for ip in cluster_ips(svc) {
        if let Ok(ip) = ip.parse::<std::net::IpAddr>()
            && cidrs.iter().any(|c| c.contains_usable(ip))
        {
            keys.push(alloc::ip_key(&ip.to_string()));
        }
    }
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
            keys.push(alloc::port_key(np));
        }
    }
    if let Some(hc) = svc
        .pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_i64)
    {
        keys.push(alloc::port_key(hc));
    }
    keys
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` gets a
/// healthCheckNodePort, as upstream gives it.
fn wants_health_check_port(svc: &Value) -> bool {
    str_at(svc, "/spec/type") == "LoadBalancer"
        && str_at(svc, "/spec/externalTrafficPolicy") == "Local"
}

fn wants_node_ports(svc: &Value) -> bool {
    matches!(str_at(svc, "/spec/type"), "NodePort" | "LoadBalancer")
}

impl Api {
    /// A NodePort for one field of a Service: the `given` one, else the one
    /// it held before (`kept`, unless this request took it already), else
    /// the lowest free one. `Err(port)` inside when `given` repeats one
    /// this request took.
    async fn claim_port(
        &self,
        given: Option<i64>,
        kept: Option<i64>,
        chosen: &mut Vec<i64>,
        name: &str,
    ) -> Result<Result<i64, i64>, ApiError> {
        let port = match given.or(kept.filter(|k| !chosen.contains(k))) {
            Some(p) => p,
            None => {
                let services = core("services")?;
                alloc::free_port(&self.store, self.cfg.node_ports, chosen)
                    .await
                    .map_err(|e| store_err(services, name, e))?
                    .ok_or_else(|| ApiError::internal("no NodePort left in the range"))?
            }
        };
        if chosen.contains(&port) {
            return Ok(Err(port));
        }
        chosen.push(port);
        Ok(Ok(port))
    }

    /// Allocation for a Service being created or changed: the guards and
    /// sides of the write, with `svc` filled in.
    pub(in crate::apiserver) async fn allocate(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
    ) -> Result<(Vec<Guard>, Vec<Side>), ApiError> {
        let cidrs = self.cfg.service_cidrs.clone();
        let services = core("services")?;
        let name = str_at(svc, "/metadata/name").to_string();
        let owner = format!("{}/{name}", str_at(svc, "/metadata/namespace"));
        let invalid = |c: Cause| ApiError::invalid("", "Service", &name, vec![c]);
        let (mut guards, mut sides) = (Vec::new(), Vec::new());
        let held_before = old.map(|o| held_keys(o, &cidrs)).unwrap_or_default();
        let ty = str_at(svc, "/spec/type").to_string();
        if ty == "ExternalName" {
            if let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) {
                for f in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                    spec.remove(f);
                }
            }
        } else {
            let one = str_at(svc, "/spec/clusterIP").to_string();
            let mut wanted = cluster_ips(svc);
            if !one.is_empty() && wanted.first().is_some_and(|w| *w != one) {
                return Err(invalid(Cause::invalid(
                    "spec.clusterIPs[0]",
                    &wanted[0],
                    "must match spec.clusterIP",
                )));
            }
            if let Some(old) = old {
                let before = cluster_ips(old);
                if wanted.is_empty() {
                    // Kept as they were; a downgrade to SingleStack keeps
                    // the primary only.
                    wanted = before;
                    if str_at(svc, "/spec/ipFamilyPolicy") == "SingleStack" {
                        wanted.truncate(1);
                    }
                } else if before.first().is_some_and(|b| Some(b) != wanted.first()) {
                    return Err(invalid(Cause::invalid(
                        "spec.clusterIPs[0]",
                        &wanted[0],
                        "may not change once set",
                    )));
                }
            }
            let (policy, families) = ip_families(svc, &wanted, &cidrs).map_err(invalid)?;
            if wanted.first().is_some_and(|w| w == "None") {
                svc["spec"]["clusterIP"] = json!("None");
                svc["spec"]["clusterIPs"] = json!(["None"]);
            } else {
                let mut ips: Vec<String> = Vec::new();
                for (i, family) in families.iter().enumerate() {
                    let Some(cidr) = cidrs.iter().find(|c| c.family() == *family) else {
                        continue;
                    };
                    let ip = match wanted.get(i).filter(|w| !w.is_empty()) {
                        Some(w) => {
                            let ip: std::net::IpAddr = w.parse().map_err(|_| {
                                invalid(Cause::invalid(
                                    format!("spec.clusterIPs[{i}]"),
                                    w,
                                    "must be a valid IP address",
                                ))
                            })?;
                            if !cidr.contains_usable(ip) {
                                return Err(invalid(Cause::invalid(
                                    format!("spec.clusterIPs[{i}]"),
                                    w,
                                    &format!(
                                        "provided IP is not in the valid range. The range of valid IPs is {cidr}"
                                    ),
                                )));
                            }
                            ip
                        }
                        None => alloc::pick_ip(&self.store, *cidr)
                            .await
                            .map_err(|e| store_err(services, &name, e))?
                            .ok_or_else(|| {
                                ApiError::internal(format!("no ClusterIP left in {cidr}"))
                            })?,
                    };
                    let key = alloc::ip_key(&ip.to_string());
                    if !held_before.contains(&key) {
                        guards.push(Guard::Absent(key.clone()));
                        sides.push(Side::Put(key, owner.clone().into_bytes()));
                    }
                    ips.push(ip.to_string());
                }
                svc["spec"]["clusterIP"] = json!(ips.first());
                svc["spec"]["clusterIPs"] = json!(ips);
            }
            svc["spec"]["ipFamilies"] = json!(families);
            svc["spec"]["ipFamilyPolicy"] = json!(policy);
        }
        let mut chosen: Vec<i64> = Vec::new();
        let old_ports: Vec<Value> = old
            .and_then(|o| o.pointer("/spec/ports").and_then(Value::as_array).cloned())
            .unwrap_or_default();
        let node_ports = wants_node_ports(svc);
        // A port the Service did not hold before is claimed in the write.
        let hold = |port: i64, guards: &mut Vec<Guard>, sides: &mut Vec<Side>| {
            let key = alloc::port_key(port);
            if !held_before.contains(&key) {
                guards.push(Guard::Absent(key.clone()));
                sides.push(Side::Put(key, owner.clone().into_bytes()));
            }
        };
        if let Some(Value::Array(ports)) = svc.pointer_mut("/spec/ports") {
            for (i, p) in ports.iter_mut().enumerate() {
                if !node_ports {
                    if let Some(m) = p.as_object_mut() {
                        m.remove("nodePort");
                    }
                    continue;
                }
                let kept = old_ports
                    .iter()
                    .find(|o| {
                        o.get("port") == p.get("port") && o.get("protocol") == p.get("protocol")
                    })
                    .and_then(|o| o.get("nodePort").and_then(Value::as_i64));
                let given = p.get("nodePort").and_then(Value::as_i64);
                let np = self
                    .claim_port(given, kept, &mut chosen, &name)
                    .await?
                    .map_err(|np| {
                        invalid(Cause::duplicate(format!("spec.ports[{i}].nodePort"), np))
                    })?;
                p["nodePort"] = json!(np);
                hold(np, &mut guards, &mut sides);
            }
        }
        if wants_health_check_port(svc) {
            let given = svc
                .pointer("/spec/healthCheckNodePort")
                .and_then(Value::as_i64);
            let kept = old
                .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
                .and_then(Value::as_i64);
            let hc = self
                .claim_port(given, kept, &mut chosen, &name)
                .await?
                .map_err(|hc| invalid(Cause::duplicate("spec.healthCheckNodePort", hc)))?;
            svc["spec"]["healthCheckNodePort"] = json!(hc);
            hold(hc, &mut guards, &mut sides);
        } else if let Some(m) = svc.pointer_mut("/spec").and_then(Value::as_object_mut) {
            m.remove("healthCheckNodePort");
        }
        let held_after = held_keys(svc, &cidrs);
        for k in held_before {
            if !held_after.contains(&k) {
                sides.push(Side::Delete(k));
            }
        }
        Ok((guards, sides))
    }

    pub(in crate::apiserver) fn allocation_error(svc: &Value, key: &str) -> ApiError {
        let name = str_at(svc, "/metadata/name");
        let cause = if let Some(ip) = key.strip_prefix(alloc::IP_PREFIX) {
            Cause::invalid("spec.clusterIPs", ip, "provided IP is already allocated")
        } else {
            let port = key.strip_prefix(alloc::PORT_PREFIX).unwrap_or_default();
            Cause::invalid(
                "spec.ports[].nodePort",
                port,
                "provided port is already allocated",
            )
        };
        ApiError::invalid("", "Service", name, vec![cause])
    }
}
