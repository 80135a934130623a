//! The ingress role's HTTP and HTTPS servers (hyper: HTTP/1.1, and HTTP/2
//! by ALPN over TLS or with prior knowledge in clear text). Each request
//! is routed by its host and path, then sent to one of the backend's ready
//! endpoints in turn, over a keep-alive pool, with the bodies streamed
//! both ways.
//!
//! - No rule takes it: 404. No ready endpoint: 503. The endpoint fails:
//!   502. It does not begin its answer within the route's read timeout:
//!   504. Each body says which Ingress and Service it was.
//! - Plain HTTP to a host that has TLS is redirected (308) to HTTPS unless
//!   its Ingress says `ingress.skiff.io/ssl-redirect: "false"`.
//! - `X-Forwarded-For` (appended to), `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are set; the `Host` header goes through as sent.
//! - A request without a body whose method is idempotent (GET, HEAD,
//!   OPTIONS) is sent to another endpoint when the connection to one
//!   fails; others are not, since they may have been acted on.
//! - An HTTP/1.1 upgrade (WebSocket) is passed on with its `Upgrade`
//!   header; once the endpoint answers 101, the two connections are
//!   joined byte for byte.
//! - Endpoints of a Service port whose `appProtocol` is
//!   `kubernetes.io/h2c` are spoken to in HTTP/2, others in HTTP/1.1.

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

/// What both listeners share: the state and the pools to the endpoints.
pub struct Server {
    state: Arc<RwLock<Arc<State>>>,
    /// HTTP/1.1 to endpoints.
    client: Client<HttpConnector, Body>,
    /// HTTP/2 with prior knowledge, to `kubernetes.io/h2c` ports.
    h2c: Client<HttpConnector, Body>,
    /// Turns the endpoints of every backend.
    next: AtomicUsize,
    /// Where HTTPS is served, for redirects.
    https_port: u16,
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

/// The protocol an HTTP/1.1 request asks to upgrade to, if it does.
fn upgrade_to(req: &Request<Incoming>) -> Option<HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (req.version() == http::Version::HTTP_11 && asks)
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Joins the client's upgraded connection to the endpoint's.
fn join_upgraded(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, backend) {
            Ok((c, b)) => {
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                    debug!(error = %e, "upgraded connection ended");
                }
            }
            Err(e) => debug!(error = %e, "upgrade not completed"),
        }
    });
}

impl Server {
    pub fn new(state: Arc<RwLock<Arc<State>>>, https_port: u16) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        let idle = std::time::Duration::from_secs(90);
        Arc::new(Server {
            state,
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .build(connector.clone()),
            h2c: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .http2_only(true)
                .build(connector),
            next: AtomicUsize::new(0),
            https_port,
        })
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        secure: bool,
    ) -> Response<Body> {
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
        if !secure && backend.ssl_redirect && state.table.has_tls(&host) {
            let port = match self.https_port {
                443 => String::new(),
                p => format!(":{p}"),
            };
            let to = format!(
                "https://{}{port}{}",
                super::routes::host_name(&host),
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            );
            let mut r = text(StatusCode::PERMANENT_REDIRECT, format!("see {to}"));
            if let Ok(v) = HeaderValue::from_str(&to) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        let Some(endpoints) = state.endpoints_of(backend) else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "service {}/{} (Ingress {}) does not exist",
                    backend.namespace, backend.service, backend.ingress
                ),
            );
        };
        if endpoints.addrs.is_empty() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "service {}/{} (Ingress {}) has no ready endpoint",
                    backend.namespace, backend.service, backend.ingress
                ),
            );
        }
        let upgrade = upgrade_to(&req);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        let scheme = if secure { "https" } else { "http" };
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
            ("x-forwarded-proto", scheme),
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
        let addrs = &endpoints.addrs;
        let h2c = endpoints.h2c && client_upgrade.is_none();
        let tries = if retry { addrs.len().min(3) } else { 1 };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut body = Some(body.boxed());
        let mut last_error = String::new();
        for i in 0..tries {
            let ep = addrs[(start + i) % addrs.len()];
            let Ok(uri) = format!("http://{ep}{path_and_query}").parse::<Uri>() else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("bad path {path_and_query:?}"),
                );
            };
            let mut out = Request::from_parts(parts.clone(), ());
            *out.uri_mut() = uri;
            let b = body
                .take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed());
            let sent = if h2c {
                *out.version_mut() = http::Version::HTTP_2;
                self.h2c.request(out.map(|()| b))
            } else {
                *out.version_mut() = http::Version::HTTP_11;
                self.client.request(out.map(|()| b))
            };
            let answer = match tokio::time::timeout(backend.timeout, sent).await {
                Ok(a) => a,
                Err(_) => {
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "service {}/{} (Ingress {}) did not answer within {} s",
                            backend.namespace,
                            backend.service,
                            backend.ingress,
                            backend.timeout.as_secs()
                        ),
                    );
                }
            };
            match answer {
                Ok(mut resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client_side) = client_upgrade
                    {
                        let backend_side = hyper::upgrade::on(&mut resp);
                        join_upgraded(client_side, backend_side);
                        let (rp, _) = resp.into_parts();
                        return Response::from_parts(
                            rp,
                            Empty::new().map_err(|never| match never {}).boxed(),
                        );
                    }
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

/// Serves `listener` until the task is dropped: HTTPS when `tls` is
/// given, plain HTTP otherwise.
pub async fn run(
    server: Arc<Server>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve(server, TokioIo::new(tcp), peer, false).await,
                Some(acceptor) => {
                    // A client that never finishes its handshake is let go.
                    let shake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    match shake.await {
                        Ok(Ok(stream)) => serve(server, TokioIo::new(stream), peer, true).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// How long a client has to send its request headers, or to finish its
/// TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The most a request's headers may take, in bytes.
const MAX_HEADERS: usize = 64 * 1024;

/// Serves one connection.
async fn serve<I>(server: Arc<Server>, io: I, peer: SocketAddr, secure: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(server.handle(req, peer, secure).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Slow clients (slowloris) may not hold a connection open on half-sent
    // headers.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        // Larger headers are answered 431, as nginx's 32 KB buffers are.
        .max_buf_size(MAX_HEADERS);
    builder.http2().max_header_list_size(MAX_HEADERS as u32);
    if let Err(e) = builder.serve_connection_with_upgrades(io, svc).await {
        debug!(%peer, error = %e, "ingress connection ended");
    }
}
