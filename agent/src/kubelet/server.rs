//! The kubelet's HTTPS port (10250 by default): `/healthz`,
//! `/metrics` (the agent's metrics, as on its metrics port),
//! `/metrics/resource` (see `metrics`), `/metrics/probes`,
//! `/containerLogs/<ns>/<pod>/<container>`, which the apiserver proxies
//! `kubectl logs` to, `/exec/...` and `/attach/...` (see `stream`) and
//! `/portForward/<ns>/<pod>` (see `portforward`). Only clients whose certificate the cluster CA signed
//! get in (the apiserver's kubelet-client certificate); the serving
//! certificate is made at start, as upstream's kubelet makes one when none
//! is given.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tracing::{debug, info, warn};

use super::logs::{self, ReadOptions};
use super::stream::Streaming;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reading the client CA {path}: {why}")]
    Ca { path: PathBuf, why: String },
    #[error("kubelet TLS: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn tls(ca: &Path, names: Vec<String>) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = crate::pki::provider();
    let ca_err = |why: String| ServerError::Ca {
        path: ca.to_path_buf(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| ca_err(e.to_string()))? {
        roots
            .add(c.map_err(|e| ca_err(e.to_string()))?)
            .map_err(|e| ca_err(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (cert, key) =
        crate::pki::self_signed(names, None).map_err(|e| ServerError::Tls(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(vec![cert], key)
        })
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Serves until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    ca: &Path,
    node_name: &str,
    log_dir: PathBuf,
    streaming: Arc<Streaming>,
) -> Result<(), ServerError> {
    let config = tls(ca, vec![addr.ip().to_string(), node_name.to_string()])?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    info!(%addr, "kubelet port listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let log_dir = Arc::new(log_dir);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, log_dir, streaming) = (acceptor.clone(), log_dir.clone(), streaming.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    debug!(%peer, error = %e, "kubelet TLS handshake refused");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let (log_dir, streaming) = (log_dir.clone(), streaming.clone());
                async move { Ok::<_, Infallible>(handle(req, &log_dir, streaming).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.replace("%3A", ":").replace("%3a", ":")),
            None => (p.to_string(), "true".to_string()),
        })
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    log_dir: &Path,
    streaming: Arc<Streaming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    if path == "/metrics/resource" {
        let sample = super::metrics::sample(&streaming.cd).await;
        let mut r = text(StatusCode::OK, super::metrics::render(&sample));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return r;
    }
    if path == "/metrics" || path == "/metrics/probes" {
        // `/metrics` as on the agent's metrics port (the kubelet's own
        // families among them), for scrapers that look for it here.
        let body = if path == "/metrics" {
            streaming.telemetry.render()
        } else {
            streaming.telemetry.probes.render()
        };
        let mut r = text(StatusCode::OK, body);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return r;
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs[..] {
        ["exec", ns, pod, container] => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            return streaming.exec(req, &ns, &pod, &container).await;
        }
        ["attach", ns, pod, container] => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            return streaming.attach(req, &ns, &pod, &container).await;
        }
        ["portForward", ns, pod] => {
            let (ns, pod) = (ns.to_string(), pod.to_string());
            return streaming.port_forward(req, &ns, &pod).await;
        }
        ["exec" | "attach" | "portForward", ..] => {
            return text(
                StatusCode::BAD_REQUEST,
                "expected /exec|attach/<namespace>/<pod>/<container> or /portForward/<namespace>/<pod>",
            );
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/containerLogs/") else {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let [ns, pod, container] = parts[..] else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected /containerLogs/<namespace>/<pod>/<container>",
        );
    };
    let q = query(&req);
    let on = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    let opts = ReadOptions {
        tail_lines: q.get("tailLines").and_then(|v| v.parse().ok()),
        timestamps: on("timestamps"),
        since: q.get("sinceTime").cloned().or_else(|| {
            q.get("sinceSeconds")
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(|s| {
                    k8s_openapi::jiff::Timestamp::now()
                        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                        .ok()
                        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_string())
                })
        }),
        limit_bytes: q.get("limitBytes").and_then(|v| v.parse().ok()),
    };
    let Some(dir) = logs::container_dir(log_dir, ns, pod, container) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} in pod {pod:?} is not available"),
        );
    };
    let runs = logs::restarts(&dir);
    let file = if on("previous") {
        match runs.len() {
            n if n >= 2 => runs[n - 2].1.clone(),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("previous terminated container {container:?} in pod {pod:?} not found"),
                );
            }
        }
    } else {
        match runs.last() {
            Some((_, f)) => f.clone(),
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("container {container:?} in pod {pod:?} is waiting to start"),
                );
            }
        }
    };
    let content = tokio::fs::read_to_string(&file).await.unwrap_or_default();
    let first = logs::render(&content, &opts);
    if !on("follow") || on("previous") {
        return text(StatusCode::OK, first);
    }
    // Follow: what is there, then new complete records as they come, until
    // the container restarts (a newer file) or its pod's logs go.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut offset = content.len();
    let newest = runs.last().map(|(n, _)| *n).unwrap_or(0);
    let follow_opts = ReadOptions {
        tail_lines: None,
        ..opts
    };
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(Bytes::from(first)))).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Only what was appended since the last look is read; a file
            // shorter than what was sent has been rotated and is read anew.
            let Ok(len) = tokio::fs::metadata(&file).await.map(|m| m.len() as usize) else {
                return;
            };
            if len < offset {
                offset = 0;
            }
            if len > offset {
                let Ok(fresh) = logs::read_from(&file, offset).await else {
                    return;
                };
                // Only whole records; a half-written one waits.
                if let Some(i) = fresh.rfind('\n') {
                    let out = logs::render(&fresh[..=i], &follow_opts);
                    offset += i + 1;
                    if !out.is_empty() && tx.send(Ok(Frame::data(Bytes::from(out)))).await.is_err()
                    {
                        return;
                    }
                }
            }
            if logs::restarts(file.parent().unwrap_or(Path::new("/")))
                .last()
                .map(|(n, _)| *n)
                != Some(newest)
            {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let mut r = Response::new(body);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the server for the role, logging why it stopped.
pub async fn run(
    addr: SocketAddr,
    ca: PathBuf,
    node_name: String,
    log_dir: PathBuf,
    streaming: Arc<Streaming>,
) {
    if let Err(e) = serve(addr, &ca, &node_name, log_dir, streaming).await {
        warn!(error = %e, "the kubelet port is not served");
    }
}
