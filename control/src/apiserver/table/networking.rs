//! The printers of Ingresses and IngressClasses.

use serde_json::{Value, json};

use super::s;

type Column = (&'static str, &'static str, u8);

/// The columns after the name, or None for another kind.
pub(super) fn columns(group: &str, plural: &str, age: Column) -> Option<Vec<Column>> {
    let string = |title: &'static str| (title, "string", 0);
    match (group, plural) {
        ("networking.k8s.io", "ingresses") => Some(vec![
            string("Class"),
            string("Hosts"),
            string("Address"),
            string("Ports"),
            age,
        ]),
        ("networking.k8s.io", "ingressclasses") => {
            Some(vec![string("Controller"), string("Parameters"), age])
        }
        _ => None,
    }
}

fn list<'a>(o: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    o.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The cells after the name, or None for another kind.
pub(super) fn cells(group: &str, plural: &str, o: &Value, created: &Value) -> Option<Vec<Value>> {
    match (group, plural) {
        ("networking.k8s.io", "ingresses") => {
            let hosts: Vec<&str> = list(o, "/spec/rules")
                .map(|r| r.get("host").and_then(Value::as_str).unwrap_or("*"))
                .collect();
            let hosts = if hosts.is_empty() {
                "*".to_string()
            } else {
                hosts.join(",")
            };
            let address: Vec<&str> = list(o, "/status/loadBalancer/ingress")
                .filter_map(|i| {
                    i.get("ip")
                        .or_else(|| i.get("hostname"))
                        .and_then(Value::as_str)
                })
                .collect();
            let ports = if list(o, "/spec/tls").next().is_some() {
                "80, 443"
            } else {
                "80"
            };
            let class = match s(o, "/spec/ingressClassName") {
                "" => "<none>",
                c => c,
            };
            Some(vec![
                json!(class),
                json!(hosts),
                json!(address.join(",")),
                json!(ports),
                created.clone(),
            ])
        }
        ("networking.k8s.io", "ingressclasses") => {
            let params = match (s(o, "/spec/parameters/kind"), s(o, "/spec/parameters/name")) {
                ("", _) => "<none>".to_string(),
                (k, n) => {
                    let g = s(o, "/spec/parameters/apiGroup");
                    if g.is_empty() {
                        format!("{k}/{n}")
                    } else {
                        format!("{k}.{g}/{n}")
                    }
                }
            };
            Some(vec![
                json!(s(o, "/spec/controller")),
                json!(params),
                created.clone(),
            ])
        }
        _ => None,
    }
}
