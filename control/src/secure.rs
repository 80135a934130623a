//! The secure port of a scheduler or controllers running without the
//! apiserver in their process, as kube-scheduler's 10259 and
//! kube-controller-manager's 10257: HTTPS with a certificate made at
//! start, serving `/metrics`, `/healthz`, `/livez` and `/readyz`.
//!
//! Authentication and authorization are delegated to the apiserver, as
//! upstream's are: a bearer token is checked with a TokenReview, then the
//! user's right to `get` the path with a SubjectAccessReview; answers are
//! kept 10 s. The health paths are always allowed (upstream's
//! `--authorization-always-allow-paths`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::telemetry::Shared;

/// How long a review's answer is kept.
const KEEP: Duration = Duration::from_secs(10);

/// What a token may do: `Ok(())`, or the status and message to answer.
type Verdict = Result<(), (StatusCode, String)>;

/// Verdicts by the token's SHA-256 and the path, with when each was made.
type Seen = HashMap<(Vec<u8>, &'static str), (Instant, Verdict)>;

struct Port {
    registry: Shared,
    client: kube::Client,
    /// By the token's hash and the path: the verdict and when it was made.
    seen: Mutex<Seen>,
}

/// POSTs `body` to `path` on the apiserver; the object answered.
async fn post(client: &kube::Client, path: &str, body: &Value) -> Result<Value, String> {
    let req = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    client
        .request::<Value>(req)
        .await
        .map_err(|e| e.to_string())
}

impl Port {
    /// Asks the apiserver who `token` is and whether it may `get` `path`.
    async fn review(&self, token: &str, path: &'static str) -> Verdict {
        let review = post(
            &self.client,
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}),
        )
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("reviewing the token: {e}")))?;
        let status = &review["status"];
        if status["authenticated"] != json!(true) {
            return Err((StatusCode::UNAUTHORIZED, "Unauthorized".into()));
        }
        let user = &status["user"];
        let name = user["username"].as_str().unwrap_or_default().to_string();
        let sar = post(
            &self.client,
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            &json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
                "user": name, "uid": user["uid"], "groups": user["groups"], "extra": user["extra"],
                "nonResourceAttributes": {"path": path, "verb": "get"},
            }}),
        )
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("reviewing access: {e}")))?;
        if sar["status"]["allowed"] == json!(true) {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                format!("forbidden: User \"{name}\" cannot get path \"{path}\""),
            ))
        }
    }

    async fn allowed(&self, token: Option<&str>, path: &'static str) -> Verdict {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err((StatusCode::UNAUTHORIZED, "Unauthorized".into()));
        };
        let key = (
            ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
                .as_ref()
                .to_vec(),
            path,
        );
        if let Some((at, v)) = self.lock().get(&key)
            && at.elapsed() < KEEP
        {
            return v.clone();
        }
        let v = self.review(token, path).await;
        let mut seen = self.lock();
        seen.retain(|_, (at, _)| at.elapsed() < KEEP);
        seen.insert(key, (Instant::now(), v.clone()));
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let text = |code: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        if req.method() != http::Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz" | "/livez" | "/readyz" => text(StatusCode::OK, "ok".into()),
            "/metrics" => {
                let token = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match self.allowed(token, "/metrics").await {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, crate::telemetry::render(&self.registry));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    Err((code, why)) => {
                        debug!(%code, %why, "metrics request refused");
                        text(code, format!("{why}\n"))
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, "404 page not found\n".into()),
        }
    }
}

/// A certificate for this process alone, made at start (as upstream's
/// components make one when given none).
fn tls() -> Result<Arc<rustls::ServerConfig>, String> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    let (certs, key) = crate::apiserver::cert_and_key(
        &made.cert.pem(),
        &made.signing_key.serialize_pem(),
        "the secure port's",
    )?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves on `addr` until the process ends. A port that cannot be bound
/// is reported and left: the components run on without it.
pub async fn serve(addr: SocketAddr, registry: Shared, client: kube::Client) {
    let cfg = match tls() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "no serving certificate; the secure port is off");
            return;
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "secure port not bound; no metrics served");
            return;
        }
    };
    info!(%addr, "serving metrics and health");
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let port = Arc::new(Port {
        registry,
        client,
        seen: Mutex::default(),
    });
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, port) = (acceptor.clone(), port.clone());
        tokio::spawn(async move {
            let Some(stream) = crate::apiserver::handshake(&acceptor, tcp, peer).await else {
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let port = port.clone();
                async move { Ok::<_, Infallible>(port.answer(&req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
