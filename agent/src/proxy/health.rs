//! `healthCheckNodePort`: for each Service with `externalTrafficPolicy:
//! Local` that has one, an HTTP server on that port answering as
//! kube-proxy's does, 200 with the local endpoint count while this node
//! has ready endpoints of the Service and 503 otherwise, so that a load
//! balancer sends the Service's traffic only to nodes that serve it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::model::Health;

type State = Arc<Mutex<BTreeMap<u16, Health>>>;

/// The servers, one per port, and what each answers.
#[derive(Default)]
pub struct HealthServers {
    state: State,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for (_, task) in std::mem::take(&mut self.listeners) {
            task.abort();
        }
    }
}

/// The body and status kube-proxy's health check server gives.
pub fn answer(h: &Health) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": {"namespace": h.namespace, "name": h.name},
        "localEndpoints": h.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let code = if h.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string())
}

impl HealthServers {
    /// Whether every port asked for has a running server (a port that
    /// could not be bound is tried again on the next `set`).
    pub fn serves_all(&self) -> bool {
        let wanted = self.state.lock().map_or(0, |s| s.len());
        wanted == self.listeners.len() && self.listeners.values().all(|t| !t.is_finished())
    }

    /// Serves exactly `wanted` (by port): new ports get a server, gone
    /// ones lose theirs, the rest answer from the new state at once. A
    /// port that cannot be bound is tried again on the next call.
    pub fn set(&mut self, wanted: BTreeMap<u16, Health>) {
        let ports: Vec<u16> = wanted.keys().copied().collect();
        if let Ok(mut s) = self.state.lock() {
            *s = wanted;
        }
        self.listeners.retain(|port, task| {
            let keep = ports.contains(port) && !task.is_finished();
            if !keep {
                task.abort();
                debug!(port, "health check server stopped");
            }
            keep
        });
        for port in ports {
            if self.listeners.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, error = %e, "cannot serve a healthCheckNodePort");
                    continue;
                }
            };
            info!(port, "health check server listening");
            self.listeners.insert(
                port,
                tokio::spawn(serve(listener, port, self.state.clone())),
            );
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, port: u16, state: State) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let h = state.lock().ok().and_then(|s| s.get(&port).cloned());
                async move {
                    let (code, body) = match &h {
                        Some(h) => answer(h),
                        None => (StatusCode::SERVICE_UNAVAILABLE, "{}".to_string()),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = code;
                    let headers = r.headers_mut();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    headers.insert(
                        "X-Content-Type-Options",
                        http::HeaderValue::from_static("nosniff"),
                    );
                    let weight = h.map_or(0, |h| h.local_endpoints);
                    if let Ok(v) = http::HeaderValue::from_str(&weight.to_string()) {
                        headers.insert("X-Load-Balancing-Endpoint-Weight", v);
                    }
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_kube_proxy_does() {
        let mut h = Health {
            port: 32000,
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (code, body) = answer(&h);
        assert_eq!(code, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["service"]["name"], "web");
        h.local_endpoints = 0;
        assert_eq!(answer(&h).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
