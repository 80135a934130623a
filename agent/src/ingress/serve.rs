//! The ingress role's HTTP server (hyper: HTTP/1.1, and HTTP/2 with prior
//! knowledge). Each request is routed by its host and path, then sent to
//! one of the backend's ready endpoints in turn, over a keep-alive pool,
//! with the bodies streamed both ways.
//!
//! - No rule takes it: 404. No ready endpoint: 503. The endpoint fails:
//!   502. Each body says which Ingress and Service it was.
//! - `X-Forwarded-For` (appended to), `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are set; the `Host` header goes through as sent.
//! - A request without a body whose method is idempotent (GET, HEAD,
//!   OPTIONS) is sent to another endpoint when the connection to one
//!   fails; others are not, since they may have been acted on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::State;

type Body = BoxBody<Bytes, hyper::Error>;

struct Server {
    state: Arc<RwLock<Arc<State>>>,
    client: Client<HttpConnector, Body>,
    /// Turns the endpoints of every backend.
    next: AtomicUsize,
}

/// Headers that belong to one connection and are not passed on (RFC 9110
/// 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the Connection header names are the connection's too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(named.iter()) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

fn text(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl Server {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let state = match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let path = req.uri().path().to_string();
        let Some(backend) = state.table.route(&host, &path) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no Ingress rule takes {host}{path}"),
            );
        };
        let Some(endpoints) = state.endpoints_of(backend) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "service {}/{} (Ingress {}) does not exist",
                    backend.namespace, backend.service, backend.ingress
                ),
            );
        };
        if endpoints.is_empty() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "service {}/{} (Ingress {}) has no ready endpoint",
                    backend.namespace, backend.service, backend.ingress
                ),
            );
        }
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => format!("{prior}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        for (name, value) in [
            ("x-forwarded-for", forwarded_for.as_str()),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", host.as_str()),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                parts.headers.insert(HeaderName::from_static(name), v);
            }
        }
        if parts.headers.get(header::HOST).is_none()
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            parts.headers.insert(header::HOST, v);
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        // A body-less idempotent request may go to another endpoint when
        // one cannot be reached.
        let retry = idempotent(&parts.method)
            && parts
                .headers
                .get(header::CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() == b"0")
            && !parts.headers.contains_key(header::TRANSFER_ENCODING);
        let tries = if retry { endpoints.len().min(3) } else { 1 };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut body = Some(body.boxed());
        let mut last_error = String::new();
        for i in 0..tries {
            let ep = endpoints[(start + i) % endpoints.len()];
            let Ok(uri) = format!("http://{ep}{path_and_query}").parse::<Uri>() else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("bad path {path_and_query:?}"),
                );
            };
            let mut out = Request::from_parts(parts.clone(), ());
            *out.uri_mut() = uri;
            *out.version_mut() = http::Version::HTTP_11;
            let b = body
                .take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed());
            match self.client.request(out.map(|()| b)).await {
                Ok(resp) => {
                    let (mut rp, rb) = resp.into_parts();
                    strip_hop_by_hop(&mut rp.headers);
                    return Response::from_parts(rp, rb.boxed());
                }
                Err(e) => {
                    debug!(endpoint = %ep, error = %e, "backend request failed");
                    last_error = format!("{ep}: {e}");
                    if !e.is_connect() {
                        break;
                    }
                }
            }
        }
        text(
            StatusCode::BAD_GATEWAY,
            format!(
                "service {}/{} (Ingress {}) did not answer: {last_error}",
                backend.namespace, backend.service, backend.ingress
            ),
        )
    }
}

/// Serves `listener` until the task is dropped.
pub async fn run(listener: tokio::net::TcpListener, state: Arc<RwLock<Arc<State>>>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    let server = Arc::new(Server {
        state,
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .build(connector),
        next: AtomicUsize::new(0),
    });
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Slow clients (slowloris) may not hold a connection open on
            // half-sent headers.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                debug!(%peer, error = %e, "ingress connection ended");
            }
        });
    }
}
