//! A pod's name service files, as the kubelet writes them: its hostname,
//! `/etc/hosts` and `/etc/resolv.conf` per `dnsPolicy` and `dnsConfig`.
//!
//! - `ClusterFirst` (the default): the cluster DNS, searching
//!   `<ns>.svc.<zone> svc.<zone> <zone>` then the node's search domains,
//!   `options ndots:5`. On the node's network it means `Default`, as
//!   upstream's kubelet has it.
//! - `ClusterFirstWithHostNet`: `ClusterFirst` on the node's network too.
//! - `Default`: the node's resolv.conf (its nameservers, search and
//!   options).
//! - `None`: only what `dnsConfig` says.
//!
//! `dnsConfig` then adds nameservers and search domains (without repeats)
//! and options (the pod's value wins). Past the resolver's limits (3
//! nameservers, 32 search domains, 2 048 characters of them) the rest is
//! dropped and the pod told so in an event.
//!
//! The files live in the pod's directory and are bind mounted into every
//! container that does not mount those paths itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// The resolver's limits (glibc's MAXNS; upstream's search limits).
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;

/// What the kubelet knows of the cluster's DNS.
#[derive(Clone, Debug)]
pub struct ClusterDns {
    /// The cluster DNS Service's addresses (`--cluster-dns`).
    pub servers: Vec<IpAddr>,
    /// The cluster domain (`--cluster-domain`).
    pub domain: String,
    /// The node's resolver configuration (`--resolv-conf`).
    pub resolv_conf: PathBuf,
}

/// A resolv.conf's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolv {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`.
    pub options: Vec<String>,
}

impl Resolv {
    pub fn parse(text: &str) -> Self {
        let mut r = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => r.nameservers.extend(words.next().map(String::from)),
                // The last search (or domain) line is the one that counts.
                Some("search" | "domain") => {
                    r.searches = words.filter(|w| *w != ".").map(String::from).collect();
                }
                Some("options") => r.options.extend(words.map(String::from)),
                _ => {}
            }
        }
        r
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsConfigError {
    #[error("dnsPolicy {0:?} is not one of ClusterFirst, ClusterFirstWithHostNet, Default, None")]
    Policy(String),
    #[error("dnsPolicy None needs at least one dnsConfig.nameservers entry")]
    NoNameserver,
    #[error("reading the node's resolver configuration {path}: {source}")]
    Node {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pod's hostname: `spec.hostname`, else its name (at most 63
/// characters, without a trailing `-` or `.`).
pub fn hostname(pod: &Pod) -> String {
    let given = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty());
    let name = given.unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    let mut h: String = name.chars().take(63).collect();
    while h.ends_with(['-', '.']) {
        h.pop();
    }
    h
}

/// `<hostname>.<subdomain>.<ns>.svc.<zone>` when the pod has a subdomain.
pub fn fqdn(pod: &Pod, domain: &str) -> Option<String> {
    let sub = pod
        .spec
        .as_ref()?
        .subdomain
        .as_deref()
        .filter(|s| !s.is_empty())?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    Some(format!(
        "{}.{sub}.{ns}.svc.{}",
        hostname(pod),
        domain.trim_end_matches('.')
    ))
}

/// The pod's resolv.conf, with what had to be dropped to fit.
pub fn resolv_conf(
    pod: &Pod,
    cluster: &ClusterDns,
    node: impl FnOnce() -> Result<Resolv, DnsConfigError>,
) -> Result<(Resolv, Vec<String>), DnsConfigError> {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let cluster_first = match policy {
        "ClusterFirst" => !host_network,
        "ClusterFirstWithHostNet" => true,
        "Default" | "None" => false,
        other => return Err(DnsConfigError::Policy(other.to_string())),
    };
    let mut r = if policy == "None" {
        Resolv::default()
    } else if cluster_first && !cluster.servers.is_empty() {
        let node = node()?;
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let zone = cluster.domain.trim_end_matches('.');
        let mut searches = vec![
            format!("{ns}.svc.{zone}"),
            format!("svc.{zone}"),
            zone.to_string(),
        ];
        searches.extend(node.searches);
        Resolv {
            nameservers: cluster.servers.iter().map(IpAddr::to_string).collect(),
            searches,
            options: vec!["ndots:5".to_string()],
        }
    } else {
        // Default, or ClusterFirst with no cluster DNS configured.
        node()?
    };
    if let Some(c) = spec.and_then(|s| s.dns_config.as_ref()) {
        for n in c.nameservers.iter().flatten() {
            if !r.nameservers.contains(n) {
                r.nameservers.push(n.clone());
            }
        }
        for s in c.searches.iter().flatten() {
            if !r.searches.contains(s) {
                r.searches.push(s.clone());
            }
        }
        for o in c.options.iter().flatten() {
            let option = match &o.value {
                Some(v) => format!("{}:{v}", o.name.as_deref().unwrap_or_default()),
                None => o.name.clone().unwrap_or_default(),
            };
            let name = option.split(':').next().unwrap_or_default().to_string();
            r.options
                .retain(|have| have.split(':').next() != Some(name.as_str()));
            r.options.push(option);
        }
    }
    if policy == "None" && r.nameservers.is_empty() {
        return Err(DnsConfigError::NoNameserver);
    }
    let mut dropped = Vec::new();
    if r.nameservers.len() > MAX_NAMESERVERS {
        dropped.extend(
            r.nameservers
                .split_off(MAX_NAMESERVERS)
                .into_iter()
                .map(|n| format!("nameserver {n}")),
        );
    }
    let mut chars = 0;
    let mut kept = Vec::new();
    for s in std::mem::take(&mut r.searches) {
        chars += s.len() + usize::from(!kept.is_empty());
        if kept.len() < MAX_SEARCHES && chars <= MAX_SEARCH_CHARS {
            kept.push(s);
        } else {
            dropped.push(format!("search {s}"));
        }
    }
    r.searches = kept;
    Ok((r, dropped))
}

/// The pod's /etc/hosts: loopback names, its own addresses under its
/// hostname (and FQDN), then `hostAliases`.
pub fn hosts(pod: &Pod, ips: &[String], domain: &str) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    let host = hostname(pod);
    let names = match fqdn(pod, domain) {
        Some(f) => format!("{f}\t{host}"),
        None => host,
    };
    for ip in ips {
        out.push_str(&format!("{ip}\t{names}\n"));
    }
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        out.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.clone().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", a.ip));
        }
    }
    out
}

/// The node's resolver configuration.
pub fn node_resolv(path: &Path) -> Result<Resolv, DnsConfigError> {
    std::fs::read_to_string(path)
        .map(|t| Resolv::parse(&t))
        .map_err(|source| DnsConfigError::Node {
            path: path.to_path_buf(),
            source,
        })
}

/// Where the pod's files are, in its directory.
pub fn files(pod_dir: &Path) -> [(PathBuf, &'static str); 3] {
    [
        (pod_dir.join("etc-hosts"), "/etc/hosts"),
        (pod_dir.join("etc-resolv.conf"), "/etc/resolv.conf"),
        (pod_dir.join("etc-hostname"), "/etc/hostname"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "web-1", "namespace": "shop"}, "spec": spec}),
        )
        .expect("pod")
    }

    fn cluster() -> ClusterDns {
        ClusterDns {
            servers: vec!["10.96.0.10".parse().expect("ip")],
            domain: "cluster.local".into(),
            resolv_conf: PathBuf::from("/unused"),
        }
    }

    fn node() -> Result<Resolv, DnsConfigError> {
        Ok(Resolv::parse(
            "nameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch corp.example lab.example\noptions edns0 timeout:2\n",
        ))
    }

    fn render(p: &Pod) -> String {
        resolv_conf(p, &cluster(), node)
            .expect("resolv.conf")
            .0
            .render()
    }

    #[test]
    fn cluster_first_searches_the_namespace_then_the_node() {
        assert_eq!(
            render(&pod(json!({"containers": []}))),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
        // On the node's network ClusterFirst is the node's resolver...
        let host = pod(json!({"hostNetwork": true, "containers": []}));
        assert_eq!(
            render(&host),
            "search corp.example lab.example\nnameserver 192.0.2.53\nnameserver 192.0.2.54\noptions edns0 timeout:2\n"
        );
        // ...unless asked for with hostNet.
        let with = pod(
            json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": []}),
        );
        assert!(render(&with).contains("nameserver 10.96.0.10\n"));
        let default = pod(json!({"dnsPolicy": "Default", "containers": []}));
        assert_eq!(render(&default), render(&host));
    }

    #[test]
    fn dns_config_adds_and_overrides_and_none_takes_only_it() {
        let p = pod(
            json!({"dnsConfig": {"nameservers": ["10.96.0.10", "1.1.1.1"],
            "searches": ["extra.example", "svc.cluster.local"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "single-request"}]}, "containers": []}),
        );
        assert_eq!(
            render(&p),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example extra.example\n\
             nameserver 10.96.0.10\nnameserver 1.1.1.1\noptions ndots:2 single-request\n"
        );
        let none = pod(
            json!({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["192.0.2.1"],
            "searches": ["a.example"]}, "containers": []}),
        );
        assert_eq!(render(&none), "search a.example\nnameserver 192.0.2.1\n");
        let empty = pod(json!({"dnsPolicy": "None", "containers": []}));
        assert!(matches!(
            resolv_conf(&empty, &cluster(), node),
            Err(DnsConfigError::NoNameserver)
        ));
        let bad = pod(json!({"dnsPolicy": "Cluster", "containers": []}));
        assert!(matches!(
            resolv_conf(&bad, &cluster(), node),
            Err(DnsConfigError::Policy(_))
        ));
    }

    #[test]
    fn past_the_resolvers_limits_the_rest_is_dropped_and_said() {
        let searches: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let p = pod(json!({"dnsPolicy": "None", "dnsConfig": {
            "nameservers": ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"],
            "searches": searches}, "containers": []}));
        let (r, dropped) = resolv_conf(&p, &cluster(), node).expect("resolv.conf");
        assert_eq!(r.nameservers.len(), 3);
        assert_eq!(r.searches.len(), 32);
        assert_eq!(dropped.len(), 1 + 8);
        assert_eq!(dropped[0], "nameserver 192.0.2.4");
    }

    #[test]
    fn hosts_name_the_pod_by_hostname_and_subdomain_and_keep_aliases() {
        let p = pod(
            json!({"hostname": "db-0", "subdomain": "db", "containers": [],
            "hostAliases": [{"ip": "192.0.2.9", "hostnames": ["foo.local", "bar.local"]}]}),
        );
        assert_eq!(hostname(&p), "db-0");
        let h = hosts(
            &p,
            &["10.244.1.5".into(), "fd00::5".into()],
            "cluster.local",
        );
        assert!(
            h.contains("\n10.244.1.5\tdb-0.db.shop.svc.cluster.local\tdb-0\n"),
            "{h}"
        );
        assert!(
            h.contains("\nfd00::5\tdb-0.db.shop.svc.cluster.local\tdb-0\n"),
            "{h}"
        );
        assert!(h.ends_with("192.0.2.9\tfoo.local\tbar.local\n"), "{h}");
        let plain = pod(json!({"containers": []}));
        assert_eq!(hostname(&plain), "web-1");
        assert!(
            hosts(&plain, &["10.244.1.6".into()], "cluster.local")
                .contains("\n10.244.1.6\tweb-1\n")
        );
    }
}
