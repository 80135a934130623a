//! The ingress role's routing table: which Service port a request goes
//! to, by the rules of the Ingresses of this node's class, as the
//! networking.k8s.io/v1 specification has them.
//!
//! - **Class**: an Ingress is served when its `spec.ingressClassName` (or
//!   the older `kubernetes.io/ingress.class` annotation) names this
//!   class, or names none while this class is the default one.
//! - **Hosts**: a rule's host matches the request's exactly
//!   (case-insensitive, port left out), or as a wildcard `*.example.com`,
//!   which matches one label in its place (`a.example.com`, not
//!   `example.com` nor `a.b.example.com`). A rule without a host matches
//!   any. The most specific host that matches is chosen (exact, then the
//!   wildcard, then none), and the request is routed by that host's paths
//!   alone, as nginx chooses its server block first.
//! - **Paths**: `Exact` matches the path as written. `Prefix` matches by
//!   `/`-separated elements (`/foo` matches `/foo`, `/foo/` and `/foo/bar`,
//!   not `/foobar`). `ImplementationSpecific` is taken as `Prefix`. The
//!   longest matching path wins; at equal length `Exact` wins over
//!   `Prefix`, then the older Ingress.
//! - **Default**: a request that no path takes goes to the
//!   `spec.defaultBackend` of the oldest Ingress that has one, if any.
//! - **TLS**: each `spec.tls` entry names a Secret for its hosts (exact or
//!   wildcard; an entry without hosts covers any name no other entry
//!   takes). The oldest Ingress wins a host that two name.
//! - **Options**, per Ingress, for each of its routes:
//!   `ingress.skiff.io/ssl-redirect` (`"true"` by default: plain HTTP to a
//!   host with TLS is redirected to HTTPS) and
//!   `ingress.skiff.io/proxy-read-timeout` (seconds the endpoint may take
//!   to begin its response; 60 by default, as nginx's).
//!
//! Lookups are by hash of the host, then along that host's paths in
//! precedence order, so a table of thousands of rules costs a request no
//! more than one of ten.
//!
//! Pure logic: the role turns a backend into ready endpoints elsewhere.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};

/// The annotation that marks an IngressClass as the cluster's default.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The annotation older Ingresses name their class with.
pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
/// `"false"`: plain HTTP to this Ingress's TLS hosts is served, not
/// redirected.
pub const SSL_REDIRECT_ANNOTATION: &str = "ingress.skiff.io/ssl-redirect";
/// Seconds an endpoint may take to begin its response.
pub const READ_TIMEOUT_ANNOTATION: &str = "ingress.skiff.io/proxy-read-timeout";
/// As nginx's `proxy_read_timeout`.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A Service port, by number or by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    Number(i32),
    Name(String),
}

/// Where a request goes: a Service port in the Ingress's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
    /// The Ingress it comes from (`namespace/name`), for errors and events.
    pub ingress: String,
    /// How long the endpoint may take to begin its response.
    pub timeout: Duration,
    /// Whether plain HTTP to a host with TLS is redirected to HTTPS.
    pub ssl_redirect: bool,
}

/// A `spec.tls` entry: the Secret whose certificate is served for its
/// hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ingress: String,
    pub namespace: String,
    pub secret: String,
    /// Exact names, and wildcards as `*.example.com`; empty: any name.
    pub hosts: Vec<String>,
}

/// The options an Ingress's annotations set for its routes.
#[derive(Clone, Copy, Debug)]
struct Options {
    timeout: Duration,
    ssl_redirect: bool,
}

fn options(i: &Ingress, name: &str, skipped: &mut Vec<Skipped>) -> Options {
    let a = i.metadata.annotations.as_ref();
    let get = |k: &str| a.and_then(|a| a.get(k)).map(|v| v.trim().to_string());
    let mut o = Options {
        timeout: DEFAULT_READ_TIMEOUT,
        ssl_redirect: true,
    };
    let mut bad = |key: &str, v: &str, want: &str| {
        skipped.push(Skipped {
            ingress: name.to_string(),
            reason: "InvalidAnnotation",
            why: format!("{key}: {v:?} is not {want}"),
        })
    };
    if let Some(v) = get(SSL_REDIRECT_ANNOTATION) {
        match v.as_str() {
            "true" => {}
            "false" => o.ssl_redirect = false,
            _ => bad(SSL_REDIRECT_ANNOTATION, &v, "\"true\" or \"false\""),
        }
    }
    if let Some(v) = get(READ_TIMEOUT_ANNOTATION) {
        match v.parse::<u64>() {
            Ok(n) if (1..=86_400).contains(&n) => o.timeout = Duration::from_secs(n),
            _ => bad(
                READ_TIMEOUT_ANNOTATION,
                &v,
                "a number of seconds from 1 to 86400",
            ),
        }
    }
    o
}

/// Something an Ingress asks that is left out, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub ingress: String,
    /// The Warning Event's reason.
    pub reason: &'static str,
    pub why: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.ingress, self.why)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    /// Lower case.
    Exact(String),
    /// The part after `*`, with its dot (`.example.com`), lower case.
    Wildcard(String),
    Any,
}

impl Host {
    fn parse(h: Option<&str>) -> Self {
        match h.map(str::to_ascii_lowercase) {
            None => Host::Any,
            Some(h) if h.is_empty() => Host::Any,
            Some(h) => match h.strip_prefix('*') {
                Some(rest) => Host::Wildcard(rest.to_string()),
                None => Host::Exact(h),
            },
        }
    }
}

/// Values by host (exact, wildcard, or any), found for a request's host
/// without allocating: the exact name, then the wildcard of its first
/// label (`*.example.com` holds one label in its place), then any.
#[derive(Clone, Debug)]
pub struct ByHost<T> {
    exact: HashMap<String, T>,
    /// By the part after `*` (`.example.com`).
    wildcard: HashMap<String, T>,
    any: Option<T>,
}

impl<T> Default for ByHost<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        }
    }
}

impl<T> ByHost<T> {
    /// The value of a host as an Ingress writes it (`*.x` a wildcard; none
    /// or empty: any), made with `new` if it has none yet.
    pub fn entry(&mut self, host: Option<&str>, new: impl FnOnce() -> T) -> &mut T {
        match Host::parse(host) {
            Host::Exact(h) => self.exact.entry(h).or_insert_with(new),
            Host::Wildcard(w) => self.wildcard.entry(w).or_insert_with(new),
            Host::Any => self.any.get_or_insert_with(new),
        }
    }

    /// The value for a request's host (a [`host_name`]), by the exact
    /// name or its wildcard only (`any`: or the value for any host).
    pub fn find(&self, host: &str, any: bool) -> Option<&T> {
        self.exact
            .get(host)
            .or_else(|| match host.find('.') {
                Some(i) if i > 0 => self.wildcard.get(&host[i..]),
                _ => None,
            })
            .or(if any { self.any.as_ref() } else { None })
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .chain(self.any.iter())
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.exact
            .values_mut()
            .chain(self.wildcard.values_mut())
            .chain(self.any.iter_mut())
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.any.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Exact,
    Prefix,
}

#[derive(Clone, Debug)]
struct Route {
    /// As written for Exact; without a trailing slash for Prefix (`/`
    /// stays `/`).
    path: String,
    kind: Kind,
    backend: Backend,
    /// The Ingress's age rank (0 the oldest): ties go to the older.
    age: usize,
}

impl Route {
    fn matches_path(&self, path: &str) -> bool {
        match self.kind {
            Kind::Exact => path == self.path,
            Kind::Prefix => {
                self.path == "/"
                    || path
                        .strip_prefix(self.path.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

/// The routes of every Ingress of one class.
#[derive(Clone, Debug, Default)]
pub struct Table {
    /// Each host's routes, in precedence order: the longest path first,
    /// Exact before Prefix, then the older Ingress.
    hosts: ByHost<Vec<Route>>,
    default: Option<Backend>,
    /// Oldest Ingress first.
    tls: Vec<Tls>,
    /// The hosts some TLS entry names.
    tls_hosts: ByHost<()>,
}

/// `namespace/name` of an Ingress, as [`Skipped::ingress`] names it.
pub fn key(i: &Ingress) -> String {
    crate::catalog::object_key(i.metadata.namespace.as_deref(), i.metadata.name.as_deref())
}

/// Whether the Ingress `i` belongs to `class` (`is_default`: that class is
/// the cluster's default).
pub fn of_class(i: &Ingress, class: &str, is_default: bool) -> bool {
    let named = i
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .or_else(|| {
            i.metadata
                .annotations
                .as_ref()?
                .get(CLASS_ANNOTATION)
                .map(String::as_str)
        });
    match named {
        Some(c) => c == class,
        None => is_default,
    }
}

fn backend(
    ingress: &str,
    namespace: &str,
    b: &IngressBackend,
    o: Options,
) -> Result<Backend, String> {
    let Some(svc) = &b.service else {
        return Err("only Service backends are served (a resource backend is not)".into());
    };
    let port = match &svc.port {
        Some(p) => match (p.number, p.name.as_deref()) {
            (Some(n), _) => PortRef::Number(n),
            (None, Some(n)) if !n.is_empty() => PortRef::Name(n.to_string()),
            _ => {
                return Err(format!(
                    "service {}: a port number or name is needed",
                    svc.name
                ));
            }
        },
        None => {
            return Err(format!(
                "service {}: a port number or name is needed",
                svc.name
            ));
        }
    };
    Ok(Backend {
        namespace: namespace.to_string(),
        service: svc.name.clone(),
        port,
        ingress: ingress.to_string(),
        timeout: o.timeout,
        ssl_redirect: o.ssl_redirect,
    })
}

impl Table {
    /// The table of the Ingresses `all` that belong to `class`, oldest
    /// first; what cannot be served is returned beside it.
    pub fn build<'a>(
        all: impl IntoIterator<Item = &'a Ingress>,
        class: &str,
        is_default: bool,
    ) -> (Self, Vec<Skipped>) {
        let mut ours: Vec<&Ingress> = all
            .into_iter()
            .filter(|i| of_class(i, class, is_default))
            .collect();
        // Oldest first; the name breaks ties so that every node agrees.
        ours.sort_by(|a, b| {
            (&a.metadata.creation_timestamp.as_ref().map(|t| t.0), key(a))
                .cmp(&(&b.metadata.creation_timestamp.as_ref().map(|t| t.0), key(b)))
        });
        let mut table = Table::default();
        let mut skipped = Vec::new();
        for (age, i) in ours.iter().enumerate() {
            let name = key(i);
            let ns = i.metadata.namespace.as_deref().unwrap_or("default");
            let Some(spec) = &i.spec else { continue };
            let o = options(i, &name, &mut skipped);
            for t in spec.tls.iter().flatten() {
                let Some(secret) = t.secret_name.as_deref().filter(|s| !s.is_empty()) else {
                    skipped.push(Skipped {
                        ingress: name.clone(),
                        reason: "InvalidTLS",
                        why: "a tls entry names no secretName".into(),
                    });
                    continue;
                };
                let hosts: Vec<String> = t
                    .hosts
                    .iter()
                    .flatten()
                    .map(|h| h.to_ascii_lowercase())
                    .collect();
                for h in &hosts {
                    table.tls_hosts.entry(Some(h), || ());
                }
                table.tls.push(Tls {
                    ingress: name.clone(),
                    namespace: ns.to_string(),
                    secret: secret.to_string(),
                    hosts,
                });
            }
            if let Some(b) = &spec.default_backend {
                match backend(&name, ns, b, o) {
                    Ok(b) if table.default.is_none() => table.default = Some(b),
                    Ok(_) => {}
                    Err(why) => skipped.push(Skipped {
                        ingress: name.clone(),
                        reason: "InvalidBackend",
                        why,
                    }),
                }
            }
            for rule in spec.rules.iter().flatten() {
                for p in rule.http.iter().flat_map(|h| h.paths.iter()) {
                    let b = match backend(&name, ns, &p.backend, o) {
                        Ok(b) => b,
                        Err(why) => {
                            skipped.push(Skipped {
                                ingress: name.clone(),
                                reason: "InvalidBackend",
                                why,
                            });
                            continue;
                        }
                    };
                    let written = p.path.as_deref().unwrap_or("/");
                    if !written.starts_with('/') {
                        skipped.push(Skipped {
                            ingress: name.clone(),
                            reason: "InvalidPath",
                            why: format!("path {written:?} does not start with /"),
                        });
                        continue;
                    }
                    let kind = if p.path_type == "Exact" {
                        Kind::Exact
                    } else {
                        Kind::Prefix
                    };
                    let path = match kind {
                        Kind::Prefix if written.len() > 1 => {
                            written.trim_end_matches('/').to_string()
                        }
                        _ => written.to_string(),
                    };
                    table
                        .hosts
                        .entry(rule.host.as_deref(), Vec::new)
                        .push(Route {
                            path,
                            kind,
                            backend: b,
                            age,
                        });
                }
            }
        }
        for routes in table.hosts.values_mut() {
            routes.sort_by_key(|r| {
                (
                    std::cmp::Reverse(r.path.len()),
                    r.kind != Kind::Exact,
                    r.age,
                )
            });
        }
        (table, skipped)
    }

    /// The backend for a request to `host` (a Host header: any port is
    /// left out) and `path` (the URI's path, query left out).
    pub fn route(&self, host: &str, path: &str) -> Option<&Backend> {
        let host = host_name(host);
        self.hosts
            .find(&host, true)?
            .iter()
            .find(|r| r.matches_path(path))
            .map(|r| &r.backend)
            .or(self.default.as_ref())
    }

    /// Whether some TLS entry names `host` (a Host header), exactly or by
    /// its wildcard.
    pub fn has_tls(&self, host: &str) -> bool {
        self.tls_hosts.find(&host_name(host), false).is_some()
    }

    /// The TLS entries, oldest Ingress first.
    pub fn tls(&self) -> &[Tls] {
        &self.tls
    }

    /// The default backend alone (a request whose host no rule names and
    /// no hostless rule takes).
    pub fn default_backend(&self) -> Option<&Backend> {
        self.default.as_ref()
    }

    /// Every backend a request may be sent to.
    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.hosts
            .values()
            .flatten()
            .map(|r| &r.backend)
            .chain(self.default.iter())
    }

    /// How many path rules the table holds.
    pub fn len(&self) -> usize {
        self.hosts.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.default.is_none()
    }
}

/// A Host header's name: lower case, without its port (an IPv6 literal
/// keeps its brackets); borrowed when it is so already.
pub fn host_name(host: &str) -> std::borrow::Cow<'_, str> {
    let h = host.trim();
    let name = if h.starts_with('[') {
        h.split_once(']').map_or(h, |(a, _)| &h[..=a.len()])
    } else {
        h.rsplit_once(':').map_or(h, |(a, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                a
            } else {
                h
            }
        })
    };
    let name = name.trim_end_matches('.');
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(name: &str, age: u32, spec: serde_json::Value) -> Ingress {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop",
                "creationTimestamp": format!("2026-12-0{age}T00:00:00Z")},
            "spec": spec,
        }))
        .expect("an Ingress")
    }

    fn to(service: &str, port: serde_json::Value) -> serde_json::Value {
        json!({"service": {"name": service, "port": port}})
    }

    fn path(p: &str, kind: &str, service: &str) -> serde_json::Value {
        json!({"path": p, "pathType": kind, "backend": to(service, json!({"number": 80}))})
    }

    fn svc(t: &Table, host: &str, p: &str) -> Option<String> {
        t.route(host, p).map(|b| b.service.clone())
    }

    #[test]
    fn paths_match_by_element_and_the_longest_wins() {
        let i = ingress(
            "a",
            1,
            json!({"ingressClassName": "skiff", "rules": [{"host": "shop.example", "http": {"paths": [
                path("/", "Prefix", "home"),
                path("/api", "Prefix", "api"),
                path("/api/v2/", "Prefix", "v2"),
                path("/api/exact", "Exact", "exact"),
                path("/api/exact", "Prefix", "prefix-exact"),
            ]}}]}),
        );
        let (t, skipped) = Table::build([&i], "skiff", false);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(svc(&t, "shop.example", "/"), Some("home".into()));
        assert_eq!(svc(&t, "shop.example", "/api"), Some("api".into()));
        assert_eq!(svc(&t, "shop.example", "/api/"), Some("api".into()));
        assert_eq!(svc(&t, "shop.example", "/api/users"), Some("api".into()));
        assert_eq!(
            svc(&t, "shop.example", "/apix"),
            Some("home".into()),
            "not by characters"
        );
        assert_eq!(
            svc(&t, "shop.example", "/api/v2"),
            Some("v2".into()),
            "a trailing slash is no element"
        );
        assert_eq!(svc(&t, "shop.example", "/api/v2/x"), Some("v2".into()));
        assert_eq!(
            svc(&t, "shop.example", "/api/exact"),
            Some("exact".into()),
            "Exact wins a tie"
        );
        assert_eq!(
            svc(&t, "shop.example", "/api/exact/more"),
            Some("prefix-exact".into())
        );
    }

    #[test]
    fn the_most_specific_host_decides_then_the_default_backend() {
        let i = ingress(
            "a",
            1,
            json!({"ingressClassName": "skiff",
            "defaultBackend": to("fallback", json!({"name": "http"})),
            "rules": [
                {"host": "a.example", "http": {"paths": [path("/only", "Prefix", "exact-host")]}},
                {"host": "*.example", "http": {"paths": [path("/", "Prefix", "wild")]}},
                {"http": {"paths": [path("/", "Prefix", "any")]}},
            ]}),
        );
        let (t, _) = Table::build([&i], "skiff", false);
        assert_eq!(
            svc(&t, "A.Example:8080", "/only/x"),
            Some("exact-host".into())
        );
        // The exact host is chosen, and no path of it takes /other.
        assert_eq!(svc(&t, "a.example", "/other"), Some("fallback".into()));
        assert_eq!(svc(&t, "b.example", "/x"), Some("wild".into()));
        assert_eq!(
            svc(&t, "b.c.example", "/x"),
            Some("any".into()),
            "a wildcard is one label"
        );
        assert_eq!(svc(&t, "example", "/x"), Some("any".into()));
        assert_eq!(svc(&t, "other.test", "/"), Some("any".into()));
        assert_eq!(
            t.route("a.example", "/other").map(|b| b.port.clone()),
            Some(PortRef::Name("http".into()))
        );
    }

    #[test]
    fn only_this_class_counts_and_the_older_ingress_wins_a_tie() {
        let newer = ingress(
            "newer",
            2,
            json!({"ingressClassName": "skiff", "rules": [{"host": "x", "http": {"paths": [path("/", "Prefix", "new")]}}]}),
        );
        let older = ingress(
            "older",
            1,
            json!({"ingressClassName": "skiff", "rules": [{"host": "x", "http": {"paths": [path("/", "Prefix", "old")]}}]}),
        );
        let other = ingress(
            "other",
            1,
            json!({"ingressClassName": "nginx", "rules": [{"host": "y", "http": {"paths": [path("/", "Prefix", "theirs")]}}]}),
        );
        let classless = ingress(
            "classless",
            1,
            json!({"rules": [{"host": "z", "http": {"paths": [path("/", "Prefix", "mine-if-default")]}}]}),
        );
        let (t, _) = Table::build([&newer, &older, &other, &classless], "skiff", false);
        assert_eq!(svc(&t, "x", "/"), Some("old".into()));
        assert_eq!(svc(&t, "y", "/"), None);
        assert_eq!(svc(&t, "z", "/"), None);
        let (t, _) = Table::build([&newer, &older, &other, &classless], "skiff", true);
        assert_eq!(svc(&t, "z", "/"), Some("mine-if-default".into()));
        let mut annotated = classless.clone();
        annotated.metadata.annotations =
            Some([(CLASS_ANNOTATION.to_string(), "skiff".to_string())].into());
        let (t, _) = Table::build([&annotated], "skiff", false);
        assert_eq!(svc(&t, "z", "/"), Some("mine-if-default".into()));
    }

    #[test]
    fn what_cannot_be_served_is_named() {
        let i = ingress(
            "bad",
            1,
            json!({"ingressClassName": "skiff", "rules": [{"host": "x", "http": {"paths": [
                {"path": "/r", "pathType": "Prefix", "backend": {"resource": {"kind": "Bucket", "name": "b"}}},
                {"path": "/p", "pathType": "Prefix", "backend": {"service": {"name": "s"}}},
                path("/ok", "Prefix", "fine"),
            ]}}]}),
        );
        let (t, skipped) = Table::build([&i], "skiff", false);
        assert_eq!(t.len(), 1);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0]
                .to_string()
                .starts_with("shop/bad: only Service backends"),
            "{}",
            skipped[0]
        );
        assert!(
            skipped[1].why.contains("port number or name"),
            "{}",
            skipped[1]
        );
    }

    #[test]
    fn tls_hosts_and_annotated_options() {
        let mut i = ingress(
            "a",
            1,
            json!({"ingressClassName": "skiff",
                "tls": [{"hosts": ["Secure.example", "*.wild.example"], "secretName": "cert"}, {"hosts": ["x"]}],
                "rules": [{"host": "secure.example", "http": {"paths": [path("/", "Prefix", "s")]}}]}),
        );
        let (t, skipped) = Table::build([&i], "skiff", false);
        assert!(t.has_tls("secure.example:443") && t.has_tls("a.wild.example"));
        assert!(!t.has_tls("wild.example") && !t.has_tls("plain.example"));
        assert_eq!(t.tls().len(), 1);
        assert_eq!(t.tls()[0].hosts, ["secure.example", "*.wild.example"]);
        assert_eq!(
            skipped.len(),
            1,
            "a tls entry without a secret: {skipped:?}"
        );
        let b = t.route("secure.example", "/").expect("routed");
        assert!(b.ssl_redirect);
        assert_eq!(b.timeout, DEFAULT_READ_TIMEOUT);

        i.metadata.annotations = Some(
            [
                (SSL_REDIRECT_ANNOTATION.to_string(), "false".to_string()),
                (READ_TIMEOUT_ANNOTATION.to_string(), "5".to_string()),
            ]
            .into(),
        );
        let (t, _) = Table::build([&i], "skiff", false);
        let b = t.route("secure.example", "/").expect("routed");
        assert!(!b.ssl_redirect);
        assert_eq!(b.timeout, Duration::from_secs(5));

        i.metadata.annotations = Some(
            [
                (SSL_REDIRECT_ANNOTATION.to_string(), "no".to_string()),
                (READ_TIMEOUT_ANNOTATION.to_string(), "5m".to_string()),
            ]
            .into(),
        );
        let (t, skipped) = Table::build([&i], "skiff", false);
        let b = t.route("secure.example", "/").expect("still routed");
        assert!(b.ssl_redirect && b.timeout == DEFAULT_READ_TIMEOUT);
        let bad: Vec<_> = skipped
            .iter()
            .filter(|s| s.reason == "InvalidAnnotation")
            .collect();
        assert_eq!(bad.len(), 2, "{skipped:?}");
        assert!(
            bad[1].why.contains("\"5m\" is not a number of seconds"),
            "{}",
            bad[1]
        );
    }

    #[test]
    fn host_headers_lose_their_port() {
        assert_eq!(host_name("Shop.Example:443"), "shop.example");
        assert_eq!(host_name("shop.example."), "shop.example");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("10.0.0.1"), "10.0.0.1");
    }
}
