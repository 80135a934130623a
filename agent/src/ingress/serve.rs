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
//!   OPTIONS) is sent to another endpoint when one fails before it
//!   answers; others are not, since they may have been acted on (a request
//!   a kept-alive connection could not take is sent again on a new one: it
//!   was not sent, see [`super::pool`]).
//! - An HTTP/1.1 upgrade (WebSocket) is passed on with its `Upgrade`
//!   header; once the endpoint answers 101, the two connections are
//!   joined byte for byte.
//! - Endpoints of a Service port whose `appProtocol` is
//!   `kubernetes.io/h2c` are spoken to in HTTP/2, others in HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::{Either, Empty};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::Current;
use super::pool::{Outgoing, Pool, Pooled};

/// What a client is answered with: a text of ours, or an endpoint's body
/// streamed.
pub enum Answer {
    Text(Option<Bytes>),
    /// Over HTTP/1.1, from the pool.
    Pooled(Pooled),
    /// Over HTTP/2.
    H2(Incoming),
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Answer::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
            Answer::Pooled(b) => Pin::new(b).poll_frame(cx),
            Answer::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Text(t) => t.is_none(),
            Answer::Pooled(b) => b.is_end_stream(),
            Answer::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            Answer::Pooled(b) => b.size_hint(),
            Answer::H2(b) => b.size_hint(),
        }
    }
}

/// What one worker's listeners share: the state and the connections to the
/// endpoints.
pub struct Server {
    state: Arc<Current>,
    /// HTTP/1.1 to endpoints.
    pool: Arc<Pool>,
    /// HTTP/2 with prior knowledge, to `kubernetes.io/h2c` ports.
    h2c: Client<HttpConnector, Outgoing>,
    /// Turns the endpoints of every backend.
    next: AtomicUsize,
    /// Where HTTPS is served, for redirects.
    https_port: u16,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A connection's client, as its requests' headers name it.
struct Peer {
    ip: HeaderValue,
    /// Over TLS.
    secure: bool,
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

/// The tokens of the Connection header(s): `keep-alive`, `upgrade`, or
/// names of further headers that belong to the connection.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the Connection header names are the connection's too. Most
    // messages name none but these, which need no name made (and no
    // allocation).
    const USUAL: [&str; 3] = ["keep-alive", "close", "upgrade"];
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter(|t| !USUAL.iter().any(|u| t.eq_ignore_ascii_case(u)))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(named.iter()) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

fn text(code: StatusCode, msg: String) -> Response<Answer> {
    debug!(status = code.as_u16(), "{msg}");
    let mut r = Response::new(Answer::Text(Some(Bytes::from(msg + "\n"))));
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
    let asks = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
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
    pub fn new(state: Arc<Current>, https_port: u16) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(super::pool::CONNECT));
        Arc::new(Server {
            state,
            pool: Arc::default(),
            h2c: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(super::pool::IDLE)
                .http2_only(true)
                .build(connector),
            next: AtomicUsize::new(0),
            https_port,
        })
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: &Peer) -> Response<Answer> {
        // The Host header, or HTTP/2's :authority.
        let host_value = match req.headers().get(header::HOST) {
            Some(h) => h.clone(),
            None => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| HeaderValue::from_static("")),
        };
        let host = host_value.to_str().unwrap_or_default();
        let secure = peer.secure;
        let state = self.state.get();
        let path = req.uri().path();
        let Some(backend) = state.table.route(host, path) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("no Ingress rule takes {host}{path}"),
            );
        };
        if !secure && backend.ssl_redirect && state.table.has_tls(host) {
            let port = match self.https_port {
                443 => String::new(),
                p => format!(":{p}"),
            };
            let to = format!(
                "https://{}{port}{}",
                super::routes::host_name(host),
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
        let forwarded_for = match parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prior) => HeaderValue::from_str(&format!(
                "{prior}, {}",
                peer.ip.to_str().unwrap_or_default()
            ))
            .unwrap_or_else(|_| peer.ip.clone()),
            None => peer.ip.clone(),
        };
        let h = &mut parts.headers;
        h.insert(X_FORWARDED_FOR, forwarded_for);
        h.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if secure { "https" } else { "http" }),
        );
        h.insert(X_FORWARDED_HOST, host_value.clone());
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, host_value);
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        // A body-less idempotent request may go to another endpoint when
        // one cannot be reached.
        let retry = idempotent(&parts.method) && hyper::body::Body::is_end_stream(&body);
        let eps = &endpoints.addrs;
        let h2c = endpoints.h2c && client_upgrade.is_none();
        let tries = if retry { eps.len().min(3) } else { 1 };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut body = Some(Either::Left(body));
        let mut parts = Some(parts);
        let mut last_error = String::new();
        for i in 0..tries {
            let (ep, authority) = &eps[(start + i) % eps.len()];
            // HTTP/1.1 is sent in origin form (the path), HTTP/2 needs the
            // scheme and authority as well.
            let uri = if h2c {
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(http::uri::Scheme::HTTP);
                uri.authority = Some(authority.clone());
                uri.path_and_query = Some(path_and_query.clone());
                let Ok(uri) = Uri::from_parts(uri) else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("bad path {path_and_query}"),
                    );
                };
                uri
            } else {
                Uri::from(path_and_query.clone())
            };
            // The last try takes the request's own parts; earlier ones a copy.
            let p = if i + 1 == tries {
                parts.take()
            } else {
                parts.clone()
            };
            let Some(p) = p else { break };
            let mut out = Request::from_parts(p, ());
            *out.uri_mut() = uri;
            let b = body.take().unwrap_or_else(|| Either::Right(Empty::new()));
            let sent = async {
                if h2c {
                    *out.version_mut() = http::Version::HTTP_2;
                    let r = self.h2c.request(out.map(|()| b)).await;
                    r.map(|r| r.map(Answer::H2)).map_err(|e| e.to_string())
                } else {
                    *out.version_mut() = http::Version::HTTP_11;
                    let r = self.pool.send(*ep, out.map(|()| b)).await;
                    r.map(|r| r.map(Answer::Pooled)).map_err(|e| e.to_string())
                }
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
                        return Response::from_parts(rp, Answer::Text(None));
                    }
                    strip_hop_by_hop(resp.headers_mut());
                    return resp;
                }
                // An idempotent request goes to the next endpoint, if it
                // has tries left.
                Err(e) => {
                    debug!(endpoint = %ep, error = %e, "backend request failed");
                    last_error = format!("{ep}: {e}");
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
async fn run(
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

/// Closes the worker's idle connections to endpoints as they expire.
async fn sweep(server: Arc<Server>) {
    let mut every = tokio::time::interval(super::pool::IDLE / 4);
    loop {
        every.tick().await;
        server.pool.sweep();
    }
}

/// Binds `addr` once per worker, with `SO_REUSEPORT`: the kernel spreads
/// the connections over the workers' listeners.
pub fn bind_each(addr: SocketAddr, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    (0..workers)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(4096)?;
            Ok(s.into())
        })
        .collect()
}

/// The data path's workers: threads of their own, each with a
/// single-threaded runtime, its own listeners and its own pools to the
/// endpoints, as nginx's worker processes are. A request's client and
/// endpoint connections are served on one thread, with no wake-ups across
/// threads.
pub struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ended: tokio::sync::mpsc::Receiver<String>,
}

impl Workers {
    /// A worker per pair of listeners (`http[i]`, `https[i]`).
    pub fn start(
        state: Arc<Current>,
        https_port: u16,
        listeners: Vec<(std::net::TcpListener, std::net::TcpListener)>,
        tls: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (end, ended) = tokio::sync::mpsc::channel(listeners.len().max(1));
        let mut threads = Vec::new();
        for (i, (http, https)) in listeners.into_iter().enumerate() {
            let (state, tls, end) = (state.clone(), tls.clone(), end.clone());
            let mut stopped = stopped.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ingress-{i}"))
                    .spawn(move || {
                        let why = rt.block_on(async move {
                            let server = Server::new(state, https_port);
                            let (http, https) = match (
                                tokio::net::TcpListener::from_std(http),
                                tokio::net::TcpListener::from_std(https),
                            ) {
                                (Ok(a), Ok(b)) => (a, b),
                                (Err(e), _) | (_, Err(e)) => return format!("listening: {e}"),
                            };
                            tokio::select! {
                                () = sweep(server.clone()) => String::new(),
                                () = run(server.clone(), http, None) => "HTTP ended".to_string(),
                                () = run(server, https, Some(tls)) => "HTTPS ended".to_string(),
                                _ = stopped.wait_for(|s| *s) => String::new(),
                            }
                        });
                        let _ = end.try_send(why);
                    })?,
            );
        }
        Ok(Self {
            stop,
            threads,
            ended,
        })
    }

    /// Until a worker ends of itself: why.
    pub async fn ended(&mut self) -> String {
        self.ended
            .recv()
            .await
            .unwrap_or_else(|| "no worker".to_string())
    }

    /// Stops every worker (their connections close) and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
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
    let who = Arc::new(Peer {
        ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("")),
        secure,
    });
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (server, who) = (server.clone(), who.clone());
        async move { Ok::<_, Infallible>(server.handle(req, &who).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Slow clients (slowloris) may not hold a connection open on half-sent
    // headers.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        // Larger headers are answered 431 (nginx's limit is 4 buffers of
        // 8 KB, answered 400).
        .max_buf_size(MAX_HEADERS);
    builder.http2().max_header_list_size(MAX_HEADERS as u32);
    if let Err(e) = builder.serve_connection_with_upgrades(io, svc).await {
        debug!(%peer, error = %e, "ingress connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_passed_on() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Trace"),
            ("connection", "Upgrade"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("x-trace", "1"),
            ("x-kept", "2"),
            ("host", "a.example"),
        ] {
            h.append(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-kept"]);
    }
}
