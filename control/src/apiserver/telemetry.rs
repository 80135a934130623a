//! The apiserver's own Prometheus metrics, served at `/metrics` to callers
//! RBAC lets `get` that path (the `system:monitoring` role, or an admin),
//! under upstream's names and labels so that existing dashboards and
//! alerts read them: `apiserver_request_total`,
//! `apiserver_request_duration_seconds`,
//! `apiserver_current_inflight_requests` and
//! `apiserver_longrunning_requests` (watches and connections that stay
//! open). The storage's `etcd_request_duration_seconds` is registered here
//! too and observed by the store.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Body;

/// What upstream labels a request by (`code` is added for the counter).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: &'static str,
    pub dry_run: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub scope: &'static str,
    pub component: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    #[prometheus(flatten)]
    request: RequestLabels,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    request_kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EtcdLabels {
    pub operation: &'static str,
    pub r#type: String,
}

/// Upstream's buckets for `apiserver_request_duration_seconds`.
const REQUEST_BUCKETS: [f64; 23] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// Upstream's buckets for `etcd_request_duration_seconds`.
const ETCD_BUCKETS: [f64; 18] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0,
];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The apiserver's metrics, in the registry of the process.
pub struct Telemetry {
    registry: crate::telemetry::Shared,
    requests: Family<CodeLabels, Counter>,
    durations: Histograms<RequestLabels>,
    inflight: Family<KindLabels, Gauge>,
    longrunning: Family<RequestLabels, Gauge>,
    etcd: Histograms<EtcdLabels>,
}

impl Telemetry {
    /// Registers the apiserver's metrics in `shared`.
    pub fn new(shared: crate::telemetry::Shared) -> Self {
        let requests = Family::<CodeLabels, Counter>::default();
        let durations: Histograms<RequestLabels> =
            Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS));
        let inflight = Family::<KindLabels, Gauge>::default();
        let longrunning = Family::<RequestLabels, Gauge>::default();
        let etcd: Histograms<EtcdLabels> =
            Family::new_with_constructor(|| Histogram::new(ETCD_BUCKETS));
        let mut guard = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let registry: &mut Registry = &mut guard;
        registry.register(
            "apiserver_request",
            "Requests answered, by verb, dry run, group, version, resource, subresource, scope, component and HTTP code",
            requests.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Time until the response was ready, in seconds, by verb, dry run, group, version, resource, subresource, scope and component",
            durations.clone(),
        );
        registry.register(
            "apiserver_current_inflight_requests",
            "Requests being served now, by kind (readOnly or mutating), long-running ones left out",
            inflight.clone(),
        );
        registry.register(
            "apiserver_longrunning_requests",
            "Open long-running requests (watches, log follows, exec/attach/port-forward) by verb, group, version, resource, subresource, scope and component",
            longrunning.clone(),
        );
        registry.register(
            "etcd_request_duration_seconds",
            "Time of each etcd request, in seconds, by operation and resource",
            etcd.clone(),
        );
        // Both kinds show from the start, as upstream's do.
        for kind in ["readOnly", "mutating"] {
            let _ = inflight.get_or_create(&KindLabels { request_kind: kind });
        }
        drop(guard);
        Self {
            registry: shared,
            requests,
            durations,
            inflight,
            longrunning,
            etcd,
        }
    }
}

/// A request being served: counted in flight until `finish`.
pub struct InFlight<'a> {
    telemetry: &'a Telemetry,
    labels: RequestLabels,
    kind: KindLabels,
    started: Instant,
}

impl Telemetry {
    /// The text exposition of every metric of the process (OpenMetrics).
    pub fn render(&self) -> String {
        crate::telemetry::render(&self.registry)
    }

    /// The registry the apiserver's metrics are in.
    pub fn registry(&self) -> crate::telemetry::Shared {
        self.registry.clone()
    }

    /// Marks a request as started.
    pub fn start(&self, labels: RequestLabels) -> InFlight<'_> {
        let mutating = !matches!(labels.verb, "GET" | "LIST" | "WATCH");
        let kind = KindLabels {
            request_kind: if mutating { "mutating" } else { "readOnly" },
        };
        // Long-running requests are left out of the in-flight gauge, as
        // upstream leaves them out of its limit.
        if !is_long_running(&labels) {
            self.inflight.get_or_create(&kind).inc();
        }
        InFlight {
            telemetry: self,
            labels,
            kind,
            started: Instant::now(),
        }
    }

    /// One etcd round trip of `operation` on objects of `kind`.
    pub fn observe_etcd(&self, operation: &'static str, kind: &str, seconds: f64) {
        self.etcd
            .get_or_create(&EtcdLabels {
                operation,
                r#type: kind.to_string(),
            })
            .observe(seconds);
    }
}

fn is_long_running(l: &RequestLabels) -> bool {
    l.verb == "WATCH" || l.verb == "CONNECT" || (l.subresource == "log" && l.verb == "GET")
}

impl InFlight<'_> {
    /// Counts the answer. A long-running request's body is wrapped so
    /// that it is counted in `apiserver_longrunning_requests` until the
    /// stream ends.
    pub fn finish(self, resp: hyper::Response<Body>) -> hyper::Response<Body> {
        let t = self.telemetry;
        let code = resp.status().as_u16().to_string();
        t.requests
            .get_or_create(&CodeLabels {
                request: self.labels.clone(),
                code,
            })
            .inc();
        t.durations
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        if !is_long_running(&self.labels) {
            t.inflight.get_or_create(&self.kind).dec();
            return resp;
        }
        if !resp.status().is_success() && resp.status().as_u16() != 101 {
            return resp;
        }
        let gauge = t.longrunning.get_or_create(&self.labels).clone();
        gauge.inc();
        resp.map(|inner| Tracked { inner, gauge }.boxed())
    }
}

/// A response body that keeps its long-running gauge raised while alive.
struct Tracked {
    inner: Body,
    gauge: Gauge,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The subresources the apiserver serves, as labels; any other path
/// segment there is `other`, so that requests cannot grow the label sets.
fn subresource_label(sub: &str) -> &'static str {
    const SERVED: [&str; 10] = [
        "status",
        "scale",
        "log",
        "binding",
        "eviction",
        "exec",
        "attach",
        "portforward",
        "token",
        "approval",
    ];
    SERVED.into_iter().find(|s| *s == sub).unwrap_or("other")
}

/// Upstream's labels for a request: its verb as upstream cleans it
/// (`LIST`, `WATCH`, `APPLY`, `DELETECOLLECTION`, `CONNECT` beside the
/// HTTP methods), and for resource paths the group, version, resource,
/// subresource and scope. Unknown resources are labelled empty, so that
/// bad paths cannot grow the label sets.
pub fn labels(
    method: &hyper::Method,
    segs: &[&str],
    query: Option<&str>,
    content_type: Option<&str>,
) -> RequestLabels {
    let param = |name: &str| {
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let mut l = RequestLabels {
        verb: match *method {
            hyper::Method::GET | hyper::Method::HEAD => "GET",
            hyper::Method::POST => "POST",
            hyper::Method::PUT => "PUT",
            hyper::Method::PATCH => "PATCH",
            hyper::Method::DELETE => "DELETE",
            _ => "OTHER",
        },
        dry_run: if param("dryRun") == Some("All") {
            "All"
        } else {
            ""
        },
        component: "apiserver",
        ..RequestLabels::default()
    };
    let target = match segs {
        ["api", v, rest @ ..] => super::parse_target("", v, rest),
        ["apis", g, v, rest @ ..] => super::parse_target(g, v, rest),
        _ => return l,
    };
    let Ok(t) = target else {
        return l;
    };
    l.group = t.resource.group;
    l.version = t.resource.version;
    l.resource = t.resource.plural;
    l.subresource = t.sub.as_deref().map_or("", subresource_label);
    l.scope = if t.name.is_some() {
        "resource"
    } else if t.namespace.is_some() {
        "namespace"
    } else {
        "cluster"
    };
    let (name, sub) = (t.name.as_deref(), t.sub.as_deref());
    let watch = matches!(param("watch"), Some("true" | "1"));
    l.verb = match (l.verb, name, sub) {
        (_, Some(_), Some("exec" | "attach" | "portforward")) => "CONNECT",
        ("GET", _, _) if watch => "WATCH",
        ("GET", None, _) => "LIST",
        ("DELETE", None, _) => "DELETECOLLECTION",
        ("PATCH", _, _) if content_type.is_some_and(|c| c.contains("apply-patch")) => "APPLY",
        (v, _, _) => v,
    };
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Method;

    fn of(method: Method, path: &str, query: Option<&str>, ct: Option<&str>) -> RequestLabels {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        labels(&method, &segs, query, ct)
    }

    #[test]
    fn requests_are_labelled_as_upstream_labels_them() {
        let l = of(Method::GET, "/api/v1/namespaces/default/pods", None, None);
        assert_eq!(
            (l.verb, l.resource, l.scope, l.group),
            ("LIST", "pods", "namespace", "")
        );
        let l = of(Method::GET, "/api/v1/pods", Some("watch=true&rv=1"), None);
        assert_eq!((l.verb, l.scope), ("WATCH", "cluster"));
        let l = of(
            Method::GET,
            "/apis/apps/v1/namespaces/a/deployments/web/scale",
            None,
            None,
        );
        assert_eq!(
            (l.verb, l.group, l.subresource, l.scope),
            ("GET", "apps", "scale", "resource")
        );
        let l = of(
            Method::PATCH,
            "/api/v1/namespaces/a/configmaps/x",
            Some("dryRun=All"),
            Some("application/apply-patch+yaml"),
        );
        assert_eq!((l.verb, l.dry_run), ("APPLY", "All"));
        let l = of(Method::POST, "/api/v1/namespaces/a/pods/p/exec", None, None);
        assert_eq!(l.verb, "CONNECT");
        let l = of(Method::DELETE, "/api/v1/namespaces/a/pods", None, None);
        assert_eq!(l.verb, "DELETECOLLECTION");
        // Unknown resources and other paths keep only the verb.
        let l = of(Method::GET, "/api/v1/namespaces/a/nonsense", None, None);
        assert_eq!((l.verb, l.resource), ("GET", ""));
        let l = of(
            Method::GET,
            "/api/v1/namespaces/a/pods/p/anything",
            None,
            None,
        );
        assert_eq!((l.resource, l.subresource), ("pods", "other"));
        let l = of(Method::GET, "/version", None, None);
        assert_eq!((l.verb, l.scope), ("GET", ""));
    }

    #[test]
    fn a_finished_request_is_counted_and_timed_and_leaves_flight() {
        let t = Telemetry::new(crate::telemetry::shared());
        let l = of(Method::POST, "/api/v1/namespaces/a/configmaps", None, None);
        let f = t.start(l);
        assert!(
            t.render()
                .contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 1"#)
        );
        let mut resp = hyper::Response::new(http_body_util::Empty::new().boxed());
        *resp.status_mut() = hyper::StatusCode::CREATED;
        let _ = f.finish(resp);
        let text = t.render();
        assert!(
            text.contains(r#"apiserver_current_inflight_requests{request_kind="mutating"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"apiserver_request_total{verb="POST",dry_run="",group="",version="v1",resource="configmaps",subresource="",scope="namespace",component="apiserver",code="201"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("apiserver_request_duration_seconds_count{verb=\"POST\""),
            "{text}"
        );
    }

    #[test]
    fn a_watch_is_long_running_until_its_body_is_dropped() {
        let t = Telemetry::new(crate::telemetry::shared());
        let l = of(Method::GET, "/api/v1/pods", Some("watch=1"), None);
        let resp = t
            .start(l)
            .finish(hyper::Response::new(http_body_util::Empty::new().boxed()));
        let gauge = r#"apiserver_longrunning_requests{verb="WATCH",dry_run="",group="",version="v1",resource="pods",subresource="",scope="cluster",component="apiserver"}"#;
        assert!(t.render().contains(&format!("{gauge} 1")), "{}", t.render());
        drop(resp);
        assert!(t.render().contains(&format!("{gauge} 0")), "{}", t.render());
    }
}
