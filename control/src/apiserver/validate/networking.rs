//! Ingresses and IngressClasses: upstream's rules for them.

use serde_json::Value;

use super::{Check, is_dns_label, is_dns_subdomain};
use crate::status::Cause;

const PATH_TYPES: &[&str] = &["Exact", "ImplementationSpecific", "Prefix"];

impl Check {
    fn ingress_backend(&mut self, at: &str, b: &Value) {
        let service = b.get("service");
        let resource = b.get("resource");
        match (service, resource) {
            (None, None) => self.push(Cause::invalid(
                at,
                "",
                "must specify a service or a resource",
            )),
            (Some(_), Some(_)) => self.push(Cause::invalid(
                at,
                "",
                "cannot set both service and resource backends",
            )),
            (Some(s), None) => {
                match s.get("name").and_then(Value::as_str) {
                    None | Some("") => self.push(Cause::required(format!("{at}.service.name"))),
                    Some(n) if !is_dns_label(n) => self.push(Cause::invalid(format!("{at}.service.name"), n, "a DNS-1035 label must consist of lower case alphanumeric characters or '-'")),
                    Some(_) => {}
                }
                let port = s.get("port");
                let number = port.and_then(|p| p.get("number")).and_then(Value::as_i64);
                let name = port
                    .and_then(|p| p.get("name"))
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty());
                match (number, name) {
                    (None, None) => self.push(Cause::required(format!("{at}.service.port"))),
                    (Some(_), Some(_)) => self.push(Cause::invalid(
                        format!("{at}.service.port"),
                        "",
                        "cannot set both port name & port number",
                    )),
                    (Some(n), None) => self.port(
                        &format!("{at}.service.port.number"),
                        port.and_then(|p| p.get("number")),
                        n == 0,
                    ),
                    (None, Some(_)) => {}
                }
            }
            (None, Some(_)) => {}
        }
    }

    pub(super) fn ingress(&mut self, spec: &Value) {
        let default = spec.get("defaultBackend").filter(|b| !b.is_null());
        let rules = spec.get("rules").and_then(Value::as_array);
        if default.is_none() && rules.is_none_or(Vec::is_empty) {
            self.push(Cause::invalid(
                "spec",
                "",
                "either `defaultBackend` or `rules` must be specified",
            ));
        }
        if let Some(b) = default {
            self.ingress_backend("spec.defaultBackend", b);
        }
        for (i, rule) in rules.into_iter().flatten().enumerate() {
            let at = format!("spec.rules[{i}]");
            if let Some(host) = rule
                .get("host")
                .and_then(Value::as_str)
                .filter(|h| !h.is_empty())
            {
                let bare = host.strip_prefix("*.").unwrap_or(host);
                if host.parse::<std::net::IpAddr>().is_ok() {
                    self.push(Cause::invalid(
                        format!("{at}.host"),
                        host,
                        "must be a DNS name, not an IP address",
                    ));
                } else if bare.contains('*') || !is_dns_subdomain(bare) {
                    self.push(Cause::invalid(format!("{at}.host"), host, "a wildcard DNS-1123 subdomain must start with '*.', followed by a valid DNS subdomain"));
                }
            }
            let paths = rule.pointer("/http/paths").and_then(Value::as_array);
            if rule.get("http").is_some_and(|h| !h.is_null()) && paths.is_none_or(Vec::is_empty) {
                self.push(Cause::required(format!("{at}.http.paths")));
            }
            for (j, p) in paths.into_iter().flatten().enumerate() {
                let pat = format!("{at}.http.paths[{j}]");
                let ty = p.get("pathType").and_then(Value::as_str);
                match ty {
                    None | Some("") => self.push(Cause::required_because(
                        format!("{pat}.pathType"),
                        "pathType must be specified",
                    )),
                    Some(t) if !PATH_TYPES.contains(&t) => {
                        self.push(Cause::unsupported(format!("{pat}.pathType"), t, PATH_TYPES))
                    }
                    Some(_) => {}
                }
                let path = p.get("path").and_then(Value::as_str).unwrap_or_default();
                if matches!(ty, Some("Exact" | "Prefix")) && !path.starts_with('/') {
                    self.push(Cause::invalid(
                        format!("{pat}.path"),
                        path,
                        "must be an absolute path",
                    ));
                }
                match p.get("backend") {
                    Some(b) => self.ingress_backend(&format!("{pat}.backend"), b),
                    None => self.push(Cause::required(format!("{pat}.backend"))),
                }
            }
        }
        for (i, t) in spec
            .get("tls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (j, h) in t
                .get("hosts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let host = h.as_str().unwrap_or_default();
                let bare = host.strip_prefix("*.").unwrap_or(host);
                if bare.contains('*') || !is_dns_subdomain(bare) {
                    self.push(Cause::invalid(format!("spec.tls[{i}].hosts[{j}]"), host, "a wildcard DNS-1123 subdomain must start with '*.', followed by a valid DNS subdomain"));
                }
            }
        }
    }

    pub(super) fn ingress_class(&mut self, spec: &Value) {
        match spec.get("controller").and_then(Value::as_str) {
            None | Some("") => self.push(Cause::required("spec.controller")),
            Some(c) if c.len() > 250 => self.push(Cause::invalid(
                "spec.controller",
                c,
                "must be no more than 250 bytes",
            )),
            Some(_) => {}
        }
    }
}
