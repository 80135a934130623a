//! The apiserver: HTTPS with bearer tokens, the upstream URL layout, and
//! the verbs of every served resource.
//!
//! `mod.rs` owns transport and routing; `objects` the life of an object
//! (create, update, patch, delete and their subresources); `watch` list and
//! watch streams; `discovery` the documents clients read before anything
//! else.

mod access;
mod admission;
mod convert;
mod discovery;
mod fields;
mod health;
mod logs;
mod managed;
pub mod metrics;
mod objects;
pub mod openapi;
pub mod patch;
pub mod peers;
pub mod protobuf;
mod registry;
mod stream;
pub mod table;
mod telemetry;
mod ui;
pub mod validate;
mod watch;

pub use logs::kubelet_tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::alloc::Cidr;
use crate::apiserver::validate::Limits;
use crate::auth::authn::Authenticator;
use crate::auth::serviceaccount::Tokens;
use crate::auth::{self, Attributes, Authorizer, Decision, ResourceAttributes, User};
use crate::resources::{self, Resource};
use crate::status::ApiError;
use crate::storage::store::Store;

pub type Body = BoxBody<Bytes, Infallible>;

/// What the apiserver needs besides its store.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The service CIDRs: the primary family first, at most one per family.
    pub service_cidrs: Vec<Cidr>,
    pub node_ports: (u16, u16),
    /// The address clients are told to use (discovery's serverAddress).
    pub advertise: SocketAddr,
    /// TLS (with the kubelet-client certificate) for `pods/log`.
    pub kubelet_tls: Option<Arc<rustls::ClientConfig>>,
}

/// Who may do what, and the ServiceAccount token signer.
pub struct Access {
    pub authn: Authenticator,
    pub authz: Authorizer,
    pub tokens: Arc<Tokens>,
}

pub struct Api {
    store: Store,
    cfg: ApiConfig,
    access: Access,
    /// The kubelets' last scrapes (`metrics.k8s.io`).
    metrics: metrics::Samples,
    /// Which namespaces have LimitRanges and quotas.
    policies: admission::Policies,
    /// Request and etcd metrics (`/metrics`).
    telemetry: Arc<telemetry::Telemetry>,
    /// Set on SIGTERM: `/readyz` fails from then on.
    stopping: std::sync::atomic::AtomicBool,
}

const MAX_BODY: usize = 3 * 1024 * 1024;

fn full(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = code;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response<Body> {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    full(
        code,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

/// A JSON body already serialised.
pub(crate) fn bytes_response(code: u16, body: Vec<u8>) -> Response<Body> {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    full(code, "application/json", body)
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    bytes_response(e.code, e.to_status().to_bytes())
}

/// A `Status` body, in upstream's field order.
pub(crate) fn status_response(s: &crate::status::Status) -> Response<Body> {
    bytes_response(s.code(), s.to_bytes())
}

/// Percent-decoded query parameters.
pub(crate) fn query(uri: &http::Uri) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// The parsed target of a resource request.
pub(crate) struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    let not_found = || ApiError::path_not_found(&rest.join("/"));
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(not_found()),
    };
    let resource = resources::find(group, version, plural).ok_or_else(not_found)?;
    if resource.namespaced != namespace.is_some() && (name.is_some() || !resource.namespaced) {
        return Err(not_found());
    }
    Ok(Target {
        resource,
        namespace,
        name,
        sub,
    })
}

impl Api {
    pub fn new(store: Store, cfg: ApiConfig, access: Access) -> Arc<Self> {
        let telemetry = Arc::new(telemetry::Telemetry::new(crate::telemetry::shared()));
        let observed = telemetry.clone();
        let store = store.observed(Arc::new(move |op, kind, took| {
            observed.observe_etcd(op, kind, took.as_secs_f64());
        }));
        Arc::new(Self {
            store,
            cfg,
            access,
            metrics: metrics::Samples::default(),
            policies: admission::Policies::default(),
            telemetry,
            stopping: Default::default(),
        })
    }

    /// The metrics registry `/metrics` serves: other components of this
    /// process register theirs in it.
    pub fn registry(&self) -> crate::telemetry::Shared {
        self.telemetry.registry()
    }

    /// Creates `obj` unless an object of that name exists (bootstrap).
    pub async fn ensure(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        obj: Value,
    ) -> Result<(), ApiError> {
        match self.create(r, ns, obj, objects::Write::default()).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates `obj`, or replaces the object of that name (bootstrap
    /// objects the apiserver keeps current).
    pub async fn put(
        &self,
        r: &'static Resource,
        ns: Option<&str>,
        name: &str,
        obj: Value,
    ) -> Result<(), ApiError> {
        match self
            .create(r, ns, obj.clone(), objects::Write::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == 409 => self
                .update(r, ns, name, None, obj, objects::Write::default())
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        }
    }

    pub fn first_service_ip(&self) -> String {
        self.cfg
            .service_cidrs
            .first()
            .map(|c| c.first().to_string())
            .unwrap_or_default()
    }

    /// The cluster DNS Service's ClusterIPs: the tenth address of each
    /// service range (the first range's first), as kubeadm picks it; none
    /// when the first range is too small.
    pub fn dns_service_ips(&self) -> Vec<IpAddr> {
        let tenth = |cidr: &crate::alloc::Cidr| {
            let host_bits = if cidr.v6 { 128 } else { 32 } - u32::from(cidr.len);
            (host_bits >= 5).then(|| cidr.nth(10))
        };
        let mut ips = self.cfg.service_cidrs.iter().map(tenth);
        match ips.next().flatten() {
            Some(first) => std::iter::once(first).chain(ips.flatten()).collect(),
            None => Vec::new(),
        }
    }

    pub(crate) fn limits(&self) -> Limits {
        Limits {
            node_ports: self.cfg.node_ports,
        }
    }

    /// The requester: a valid client certificate, else a bearer token,
    /// else anonymous. A credential that is given but not valid is a 401.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        cert: Option<&Result<User, String>>,
    ) -> Result<User, ApiError> {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match (cert, bearer) {
            (Some(Ok(user)), _) => Ok(user.clone()),
            (_, Some(token)) => self.access.authn.token_user(token).await.map_err(|e| {
                debug!(error = %e, "bearer token refused");
                ApiError::unauthorized()
            }),
            (Some(Err(e)), None) => {
                debug!(error = %e, "client certificate refused");
                Err(ApiError::unauthorized())
            }
            (None, None) => Ok(User::anonymous()),
        }
    }

    /// `user`, or whom it impersonates (`kubectl --as`), if it may.
    async fn impersonate(&self, req: &Request<Incoming>, user: User) -> Result<User, ApiError> {
        let values = |h: &str| -> Vec<String> {
            req.headers()
                .get_all(h)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(String::from)
                .collect()
        };
        let Some(name) = values("Impersonate-User").into_iter().next() else {
            return Ok(user);
        };
        let groups = values("Impersonate-Group");
        let mut checks = Vec::new();
        match auth::serviceaccount::parse_user(&name) {
            Some((ns, sa)) => checks.push(("serviceaccounts", ns.to_string(), sa.to_string())),
            None => checks.push(("users", String::new(), name.clone())),
        }
        for g in &groups {
            checks.push(("groups", String::new(), g.clone()));
        }
        for (resource, namespace, target) in checks {
            let attrs = Attributes::Resource(ResourceAttributes {
                verb: "impersonate".into(),
                resource: resource.into(),
                namespace,
                name: target,
                ..Default::default()
            });
            if let Decision::Deny(why) = self.access.authz.authorize(&user, &attrs, None).await {
                return Err(auth::forbidden(&user, &attrs, &why));
            }
        }
        let mut as_user = match auth::serviceaccount::parse_user(&name) {
            Some((ns, sa)) if groups.is_empty() => {
                auth::serviceaccount::service_account_user(ns, sa)
            }
            _ => User::authenticated(name.clone(), groups),
        };
        if name == auth::ANONYMOUS {
            as_user.groups.retain(|g| g != auth::AUTHENTICATED);
        }
        Ok(as_user)
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        cert: Option<&Result<User, String>>,
    ) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(String::from);
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if let Some(probe @ ("healthz" | "livez" | "readyz")) = segs.first().copied() {
            return self.health(probe, &segs[1..], query.as_deref()).await;
        }
        if segs.first() == Some(&"ui") {
            return ui::serve(&method, &segs[1..], path.ends_with('/'), req.headers());
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let flight = self.telemetry.start(telemetry::labels(
            &method,
            &segs,
            query.as_deref(),
            content_type,
        ));
        let user = match self.authenticate(&req, cert).await {
            Ok(u) => u,
            Err(e) => return flight.finish(error_response(&e)),
        };
        let user = match self.impersonate(&req, user).await {
            Ok(u) => u,
            Err(e) => return flight.finish(error_response(&e)),
        };
        let resp = match self.route(req, &segs, &user).await {
            Ok(r) => r,
            Err(e) => {
                if e.code >= 500 {
                    warn!(%method, %path, error = %e, "request failed");
                }
                error_response(&e)
            }
        };
        debug!(user = %user.name, %method, %path, query = query.as_deref().unwrap_or_default(), code = resp.status().as_u16(), "request");
        flight.finish(resp)
    }

    /// 403 unless `user` may do `attrs`.
    pub(crate) async fn authorize(
        &self,
        user: &User,
        attrs: &Attributes,
        body: Option<&Value>,
    ) -> Result<(), ApiError> {
        match self.access.authz.authorize(user, attrs, body).await {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(auth::forbidden(user, attrs, &why)),
        }
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        segs: &[&str],
        user: &User,
    ) -> Result<Response<Body>, ApiError> {
        let get = req.method() == Method::GET;
        let resource_path = matches!(segs, ["api", "v1", _, ..] | ["apis", _, _, _, ..]);
        if !resource_path {
            let attrs = Attributes::NonResource {
                verb: req.method().as_str().to_ascii_lowercase(),
                path: req.uri().path().to_string(),
            };
            self.authorize(user, &attrs, None).await?;
        }
        match segs {
            [] if get => Ok(json_response(200, &discovery::root_paths())),
            ["version"] if get => Ok(json_response(200, &discovery::version())),
            ["metrics"] if get => Ok(full(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.telemetry.render(),
            )),
            ["api"] if get => Ok(json_response(
                200,
                &discovery::api_versions(self.cfg.advertise),
            )),
            ["apis"] if get => Ok(json_response(200, &discovery::group_list())),
            ["api", "v1"] if get => Ok(json_response(200, &discovery::resource_list("", "v1"))),
            ["apis", g] if get => discovery::group(g).map(|v| json_response(200, &v)),
            ["apis", g, v] if get => {
                if resources::in_version(g, v).next().is_none() {
                    return Err(ApiError::path_not_found(&segs.join("/")));
                }
                Ok(json_response(200, &discovery::resource_list(g, v)))
            }
            ["openapi", "v2"] if get => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                Ok(if accept.contains("protobuf") {
                    full(
                        StatusCode::OK,
                        openapi::V2_PROTOBUF,
                        Bytes::from_static(openapi::v2_protobuf()),
                    )
                } else {
                    full(
                        StatusCode::OK,
                        "application/json",
                        Bytes::from_static(openapi::v2_json()),
                    )
                })
            }
            ["openapi", "v3"] if get => Ok(json_response(200, &discovery::openapi_v3_root())),
            ["openapi", "v3", rest @ ..] if get => {
                discovery::openapi_v3(rest).map(|v| json_response(200, &v))
            }
            ["api", "v1", rest @ ..] => {
                let t = parse_target("", "v1", rest)?;
                self.resource_request(req, t, user).await
            }
            ["apis", g, v, rest @ ..] => {
                let t = parse_target(g, v, rest)?;
                self.resource_request(req, t, user).await
            }
            _ => Err(ApiError::path_not_found(&segs.join("/"))),
        }
    }

    async fn resource_request(
        &self,
        req: Request<Incoming>,
        t: Target,
        user: &User,
    ) -> Result<Response<Body>, ApiError> {
        let q = query(req.uri());
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let as_table = accept.contains("as=Table");
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let method = req.method().clone();
        if let (true, Some(name), Some(sub @ ("exec" | "attach" | "portforward"))) = (
            t.resource.is("", "pods"),
            t.name.as_deref(),
            t.sub.as_deref(),
        ) {
            // Upgrades are authorized as `create`, whatever the method
            // (WebSockets use GET), as upstream does.
            let attrs = Attributes::Resource(ResourceAttributes {
                verb: "create".into(),
                resource: "pods".into(),
                subresource: sub.into(),
                namespace: t.namespace.clone().unwrap_or_default(),
                name: name.into(),
                ..Default::default()
            });
            self.authorize(user, &attrs, None).await?;
            let ns = t.namespace.clone().unwrap_or_default();
            let kubelet_sub = if sub == "portforward" {
                "portForward"
            } else {
                sub
            };
            return self.pod_stream(req, &ns, name, kubelet_sub).await;
        }
        // The manager of what this write sets: named, or the client's
        // first User-Agent word (`kubectl/v1.33.1 (linux/amd64) ...`).
        let agent = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .unwrap_or_default()
            .to_string();
        let w = objects::Write {
            dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
            strict: q.get("fieldValidation").is_some_and(|v| v == "Strict"),
            manager: q.get("fieldManager").cloned().unwrap_or(agent),
            force: q.get("force").is_some_and(|v| v == "true"),
            apply: false,
        };
        let body = read_body(req).await?;
        // A version served over another stored one: requests are turned
        // into the stored version, answers back.
        let view = convert::view_of(t.resource);
        let served = view.map(|(_, s)| s);
        let parse = |body: &[u8]| {
            parse_body(&content_type, body).map(|v| match served {
                Some(s) => (s.to_stored)(&v),
                None => v,
            })
        };
        let r = view.map_or(t.resource, |(stored, _)| stored);
        let ns = t.namespace.as_deref();
        let watching = q.get("watch").is_some_and(|v| v == "true" || v == "1");
        // A list or watch pinned to one name (`fieldSelector=metadata.name=x`)
        // is authorized as for that object, as upstream does: a node may
        // watch the one Secret it is allowed to read.
        let pinned = if t.name.is_none() && method == Method::GET {
            q.get("fieldSelector")
                .and_then(|f| crate::selector::FieldSelector::parse(f, &[]).ok())
                .filter(|f| f.terms() == 1)
                .and_then(|f| f.name().map(str::to_string))
        } else {
            None
        };
        let attrs = Attributes::Resource(ResourceAttributes {
            verb: auth::verb(&method, t.name.is_some(), watching).to_string(),
            group: r.group.to_string(),
            resource: r.plural.to_string(),
            subresource: t.sub.clone().unwrap_or_default(),
            namespace: t.namespace.clone().unwrap_or_default(),
            name: t.name.clone().or(pinned).unwrap_or_default(),
        });
        // The object written (create or update), for authorizers that
        // judge what is written, not only where.
        let posted = if (method == Method::POST || method == Method::PUT) && !body.is_empty() {
            parse(&body).ok()
        } else {
            None
        };
        self.authorize(user, &attrs, posted.as_ref()).await?;
        if let Some(resp) = self
            .access_request(&t, &method, posted.as_ref(), user, w.clone())
            .await?
        {
            return Ok(resp);
        }
        if r.metrics() {
            return match (&method, t.sub.as_deref(), watching) {
                (&Method::GET, None, false) => {
                    let v = self.metrics_get(r, ns, t.name.as_deref(), &q).await?;
                    Ok(json_response(200, &v))
                }
                _ => Err(ApiError::method_not_allowed(method.as_str())),
            };
        }
        let resp = match (&method, t.name.as_deref(), t.sub.as_deref()) {
            (&Method::GET, None, None) => {
                if watching {
                    self.watch(r, ns, &q, as_table).await
                } else {
                    self.list(r, ns, &q, as_table).await
                }
            }
            (&Method::GET, Some(name), Some("log")) if r.is("", "pods") => {
                self.pod_log(ns.unwrap_or_default(), name, &q).await
            }
            (&Method::GET, Some(name), sub) => {
                let obj = self.get_sub(r, ns, name, sub).await?;
                if as_table && sub.is_none() {
                    let meta = serde_json::json!({"resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or_default()});
                    return Ok(json_response(
                        200,
                        &crate::apiserver::table::table(
                            r,
                            &[obj],
                            meta,
                            crate::apiserver::table::Include::parse(
                                q.get("includeObject").map(String::as_str),
                            ),
                        ),
                    ));
                }
                Ok(json_response(200, &obj))
            }
            (&Method::POST, None, None) => {
                let obj = parse(&body)?;
                let created = self.create(r, ns, obj, w).await?;
                Ok(json_response(201, &created))
            }
            (&Method::POST, Some(name), Some("binding")) if r.is("", "pods") => {
                let obj = parse(&body)?;
                let status = self.bind(ns.unwrap_or_default(), name, &obj).await?;
                Ok(json_response(201, &status))
            }
            (&Method::POST, Some(name), Some("eviction")) if r.is("", "pods") => {
                // An Eviction carries the DeleteOptions (`kubectl drain
                // --grace-period`) for the pod's deletion.
                let eviction = if body.is_empty() {
                    Value::Null
                } else {
                    parse(&body)?
                };
                let opts = eviction
                    .get("deleteOptions")
                    .cloned()
                    .unwrap_or(Value::Null);
                self.delete(r, ns, name, &opts, &q).await?;
                Ok(status_response(&crate::status::Status::success_with_code(
                    201,
                )))
            }
            (&Method::PUT, Some(name), sub) => {
                let obj = parse(&body)?;
                let updated = self.update(r, ns, name, sub, obj, w).await?;
                Ok(json_response(200, &updated))
            }
            (&Method::PATCH, Some(name), None)
                if content_type.starts_with("application/apply-patch") =>
            {
                let applied = parse_json(&body)?;
                let (out, created) = self.apply(r, ns, name, applied, w).await?;
                Ok(json_response(if created { 201 } else { 200 }, &out))
            }
            (&Method::PATCH, Some(name), sub) => {
                let patch = parse_json(&body)?;
                let patched = self
                    .patch(r, ns, name, sub, &content_type, &patch, w, served)
                    .await?;
                Ok(json_response(200, &patched))
            }
            (&Method::DELETE, Some(name), None) => {
                let opts = if body.is_empty() {
                    Value::Null
                } else {
                    parse(&body)?
                };
                Ok(match self.delete(r, ns, name, &opts, &q).await? {
                    objects::Deleted::Object(obj) => json_response(200, &obj),
                    objects::Deleted::Status(s) => status_response(&s),
                })
            }
            (&Method::DELETE, None, None) => {
                let opts = if body.is_empty() {
                    Value::Null
                } else {
                    parse(&body)?
                };
                let out = self.delete_collection(r, ns, &opts, &q).await?;
                Ok(json_response(200, &out))
            }
            _ => Err(ApiError::method_not_allowed(method.as_str())),
        }?;
        Ok(match view {
            Some(_) if !as_table => convert::response_to_v1(resp).await,
            _ => resp,
        })
    }
}

/// A create, update or delete body: JSON, YAML, or client-go's protobuf.
fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    if !content_type.starts_with("application/vnd.kubernetes.protobuf") {
        return parse_json(body);
    }
    crate::apiserver::protobuf::decode(body)
        .map_err(|e| ApiError::bad_request(format!("the protobuf request body: {e}")))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice::<Value>(body))
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    limited
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))
}

/// Serves `api` over TLS on `listener` until the task is dropped.
/// The TLS handshake of an accepted connection; a failed one is logged
/// (at debug: scanners and probes fail it all the time) and gives None.
pub(crate) async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match acceptor.accept(tcp).await {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
    }
}

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, api: Arc<Api>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    info!(addr = ?listener.local_addr().ok(), "apiserver listening");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let Some(stream) = handshake(&acceptor, tcp, peer).await else {
                return;
            };
            let cert: Option<Arc<Result<User, String>>> =
                stream.get_ref().1.peer_certificates().map(|chain| {
                    Arc::new(
                        api.access
                            .authn
                            .certificate_user(chain)
                            .map_err(|e| e.to_string()),
                    )
                });
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                let cert = cert.clone();
                async move { Ok::<_, Infallible>(api.handle(req, cert.as_deref()).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// A PEM certificate chain and its key, for rustls; `what` names them in
/// errors.
pub(crate) fn cert_and_key(
    cert_pem: &str,
    key_pem: &str,
    what: &str,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{what} key: {e}"))?;
    Ok((certs, key))
}

/// The serving configuration: the serving certificate, and client
/// certificates asked for (judged by `access`'s authenticator).
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    client_certs: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let (certs, key) = cert_and_key(cert_pem, key_pem, "serving")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(client_certs)
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let uri: http::Uri = "/api/v1/pods?labelSelector=app%3Dweb%2Ctier+in+(a)&watch=true&x"
            .parse()
            .expect("uri");
        let q = query(&uri);
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
    }

    #[test]
    fn targets() {
        let t = parse_target(
            "",
            "v1",
            &["namespaces", "default", "pods", "web", "status"],
        )
        .expect("pod status");
        assert_eq!(
            (
                t.resource.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), Some("web"), Some("status"))
        );
        let t = parse_target("", "v1", &["namespaces", "default"]).expect("namespace");
        assert_eq!(
            (t.resource.plural, t.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let t = parse_target("", "v1", &["pods"]).expect("all pods");
        assert!(t.namespace.is_none());
        assert!(
            parse_target("", "v1", &["pods", "web"]).is_err(),
            "namespaced get needs a namespace"
        );
        assert!(parse_target("", "v1", &["namespaces", "x", "nodes"]).is_err());
        assert!(parse_target("", "v1", &["bogus"]).is_err());
    }
}
