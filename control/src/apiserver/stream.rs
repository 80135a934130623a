//! `pods/exec`, `pods/attach` and `pods/portforward`: the apiserver
//! relays the client's upgrade (a WebSocket speaking `v5.channel.k8s.io`,
//! or SPDY for port forwarding, tunnelled in a WebSocket or not) to the
//! kubelet of the pod's node, as upstream proxies it. The request goes to the kubelet as it came (its
//! upgrade headers and query, the command and streams); once the kubelet
//! has switched protocols, the two connections are joined byte for byte,
//! so the protocol is the kubelet's business.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::debug;

use super::{Api, Body};
use crate::status::ApiError;

/// Headers of the client's upgrade that the kubelet needs.
const FORWARDED: &[&str] = &[
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// Headers of the kubelet's 101 that the client needs.
const RETURNED: &[&str] = &[
    "upgrade",
    "connection",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// The head of the kubelet's answer: status, headers, and bytes already
/// read past it.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<Head, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err("the kubelet's answer has no end of headers".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the kubelet closed the connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("the kubelet's answer has no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Head {
        status,
        headers,
        rest: buf[end + 4..].to_vec(),
    })
}

impl Api {
    /// Relays `req` (already authorized) to the kubelet at
    /// `/<kubelet_sub>/<ns>/<pod>[/<container>]`.
    pub(super) async fn pod_stream(
        &self,
        mut req: Request<Incoming>,
        ns: &str,
        name: &str,
        kubelet_sub: &str,
    ) -> Result<Response<Body>, ApiError> {
        let q = super::query(req.uri());
        let k = self.kubelet_of(ns, name).await?;
        // exec and attach name a container; port forwarding is the pod's.
        let target = if kubelet_sub == "portForward" {
            format!("/{kubelet_sub}/{ns}/{name}")
        } else {
            let container =
                super::logs::container(&k.pod, name, q.get("container").map(String::as_str))?;
            format!("/{kubelet_sub}/{ns}/{name}/{container}")
        };
        if !req.headers().contains_key(header::UPGRADE) {
            return Err(ApiError::bad_request(format!(
                "{kubelet_sub} needs a connection upgrade (a WebSocket, or SPDY/3.1 to port-forward)"
            )));
        }
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let path = format!("{target}{query}");
        let mut head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\n",
            k.authority()
        );
        for h in FORWARDED {
            for v in req.headers().get_all(*h) {
                if let Ok(v) = v.to_str() {
                    head.push_str(&format!("{h}: {v}\r\n"));
                }
            }
        }
        head.push_str("\r\n");
        let what = format!("{kubelet_sub} in pod {ns}/{name}");
        let mut kubelet = k.dial(&what).await?;
        kubelet
            .write_all(head.as_bytes())
            .await
            .map_err(|e| ApiError::internal(format!("{what}: {e}")))?;
        let answer = read_head(&mut kubelet)
            .await
            .map_err(|e| ApiError::internal(format!("{what}: {e}")))?;
        if answer.status != 101 {
            let mut body = answer.rest;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let mut more = [0u8; 4096];
                while body.len() < 64 * 1024 {
                    match kubelet.read(&mut more).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body.extend_from_slice(&more[..n]),
                    }
                }
            })
            .await;
            return Err(ApiError::proxied(
                answer.status,
                String::from_utf8_lossy(&body).trim().to_string(),
            ));
        }
        let mut resp = Response::new(Full::new(Bytes::new()).boxed());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        for (k, v) in &answer.headers {
            if RETURNED.contains(&k.as_str())
                && let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                )
            {
                resp.headers_mut().append(name, value);
            }
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        let early = answer.rest;
        tokio::spawn(async move {
            let client = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    debug!(error = %e, "the client's upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            if !early.is_empty() && client.write_all(&early).await.is_err() {
                return;
            }
            match tokio::io::copy_bidirectional(&mut client, &mut kubelet).await {
                Ok((up, down)) => debug!(up, down, "stream ended"),
                Err(e) => debug!(error = %e, "stream ended"),
            }
        });
        Ok(resp)
    }
}
