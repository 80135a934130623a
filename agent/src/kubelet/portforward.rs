//! `kubectl port-forward` on the kubelet's port: `/portForward/<ns>/<pod>`.
//!
//! kubectl ≥ 1.31 opens a WebSocket with the subprotocol
//! `SPDY/3.1+portforward.k8s.io` and tunnels SPDY through its binary
//! messages; older ones (and the fallback) upgrade straight to `SPDY/3.1`.
//! Both become one byte stream carrying a SPDY session ([`super::spdy`]).
//! For every local connection the client opens two streams sharing a
//! `requestID`: `error` (the kubelet writes a failure there, then ends
//! it) and `data` (the bytes), each naming the pod's `port`. The kubelet
//! connects to that port on the pod's loopback, inside the pod's network
//! namespace as upstream does, so ports bound only to 127.0.0.1 work too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info};

use super::pod::{LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID};
use super::spdy::{self, Codec, Frame};
use super::stream::{Body, Streaming, text};

const TUNNELED: &str = "SPDY/3.1+portforward.k8s.io";
const PROTOCOL: &str = "portforward.k8s.io";

/// How the client asked to upgrade.
enum Upgrade {
    WebSocket(String),
    Spdy,
}

impl Streaming {
    /// The network namespace of pod `ns/pod` on this node.
    async fn pod_netns(&self, ns: &str, pod: &str) -> Option<PathBuf> {
        let filter =
            format!("labels.\"{LABEL_POD_NAMESPACE}\"=={ns},labels.\"{LABEL_POD_NAME}\"=={pod}");
        let list = self.cd.containers(&filter).await.ok()?;
        let uid = list.iter().find_map(|c| c.labels.get(LABEL_POD_UID))?;
        let path = super::sandbox::namespaces(&self.pods_dir.join(uid)).net;
        std::path::Path::new(&path)
            .exists()
            .then(|| PathBuf::from(path))
    }

    /// `/portForward/<ns>/<pod>`, upgraded to SPDY (tunnelled or not).
    pub async fn port_forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        ns: &str,
        pod: &str,
    ) -> Response<Body> {
        let offered = super::stream::offered_protocols(&req);
        let upgrade = match (
            req.headers().get("sec-websocket-key"),
            req.headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok()),
        ) {
            (Some(key), _) if offered.iter().any(|p| p == TUNNELED) => Upgrade::WebSocket(
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
            ),
            (None, Some(u)) if u.eq_ignore_ascii_case("SPDY/3.1") => Upgrade::Spdy,
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "port forwarding needs a WebSocket with {TUNNELED} or an upgrade to SPDY/3.1"
                    ),
                );
            }
        };
        let Some(netns) = self.pod_netns(ns, pod).await else {
            return text(
                StatusCode::NOT_FOUND,
                format!("pod {ns}/{pod} is not running on this node"),
            );
        };
        let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, "");
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let tunneled = match &upgrade {
            Upgrade::WebSocket(accept) => {
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                if let Ok(v) = HeaderValue::from_str(accept) {
                    h.insert("sec-websocket-accept", v);
                }
                h.insert("sec-websocket-protocol", HeaderValue::from_static(TUNNELED));
                true
            }
            Upgrade::Spdy => {
                h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
                h.insert(
                    "x-stream-protocol-version",
                    HeaderValue::from_static(PROTOCOL),
                );
                false
            }
        };
        let label = format!("{ns}/{pod}");
        info!(pod = %label, tunneled, "port-forward");
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => TokioIo::new(u),
                Err(e) => {
                    debug!(error = %e, "port-forward upgrade failed");
                    return;
                }
            };
            if tunneled {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    upgraded,
                    Role::Server,
                    None,
                )
                .await;
                let (near, far) = tokio::io::duplex(256 * 1024);
                tokio::spawn(unwrap_websocket(ws, far));
                session(near, netns, label).await;
            } else {
                session(upgraded, netns, label).await;
            }
        });
        resp
    }
}

/// Joins the WebSocket's binary messages into the byte stream at `io`, and
/// sends what is written there as binary messages.
async fn unwrap_websocket<S>(ws: tokio_tungstenite::WebSocketStream<S>, io: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut messages) = ws.split();
    let (mut from_session, mut to_session) = tokio::io::split(io);
    let inbound = async {
        while let Some(Ok(msg)) = messages.next().await {
            match msg {
                Message::Binary(b) if to_session.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_session.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_session.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(frame))).await;
    };
    tokio::join!(inbound, outbound);
}

/// One pair of streams of a local connection.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<(u32, String)>,
    started: bool,
}

/// Serves the SPDY session on `io` until the client ends it.
async fn session<S>(io: S, netns: PathBuf, label: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, w) = tokio::io::split(io);
    let out = spdy::writer(w);
    let mut codec = Codec::default();
    let mut inbound: HashMap<u32, mpsc::Sender<Option<Vec<u8>>>> = HashMap::new();
    let mut pending: HashMap<u32, mpsc::Receiver<Option<Vec<u8>>>> = HashMap::new();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    loop {
        let frame = match spdy::read_frame(&mut r, &mut codec).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                debug!(pod = %label, error = %e, "port-forward session ended");
                break;
            }
        };
        match frame {
            Frame::SynStream { id, headers, .. } => {
                let Ok(reply) = spdy::syn_reply(&mut codec, id) else {
                    break;
                };
                if out.send(reply).await.is_err() {
                    break;
                }
                let request = headers
                    .get("requestid")
                    .cloned()
                    .unwrap_or_else(|| id.to_string());
                let pair = pairs.entry(request.clone()).or_default();
                match headers.get("streamtype").map(String::as_str) {
                    Some("error") => pair.error = Some(id),
                    Some("data") => {
                        let port = headers.get("port").cloned().unwrap_or_default();
                        pair.data = Some((id, port));
                        let (tx, rx) = mpsc::channel(64);
                        inbound.insert(id, tx);
                        pending.insert(id, rx);
                    }
                    _ => {
                        let _ = out.send(spdy::reset(id, spdy::CANCEL)).await;
                        continue;
                    }
                }
                if let (false, Some(err_id), Some((data_id, port))) =
                    (pair.started, pair.error, pair.data.clone())
                    && let Some(rx) = pending.remove(&data_id)
                {
                    pair.started = true;
                    tokio::spawn(forward(
                        out.clone(),
                        err_id,
                        data_id,
                        port,
                        rx,
                        netns.clone(),
                    ));
                }
            }
            Frame::Data { id, fin, data } => {
                if let Some(tx) = inbound.get(&id) {
                    if !data.is_empty() && tx.send(Some(data)).await.is_err() {
                        inbound.remove(&id);
                    } else if fin {
                        let _ = tx.send(None).await;
                        inbound.remove(&id);
                    }
                }
            }
            Frame::Reset { id } => {
                inbound.remove(&id);
                pending.remove(&id);
            }
            Frame::Ping { id } => {
                if out.send(spdy::ping(id)).await.is_err() {
                    break;
                }
            }
            Frame::GoAway => break,
            Frame::Other => {}
        }
    }
}

/// Connects to `port` on the loopback of the network namespace at `netns`.
async fn connect_in(netns: PathBuf, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: setns changes only the calling thread, which
    // ends with this connection made.
    std::thread::spawn(move || {
        let made = (|| {
            let f = std::fs::File::open(&netns)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })();
        let _ = tx.send(made);
    });
    let std_stream = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread died"))??;
    tokio::net::TcpStream::from_std(std_stream)
}

/// Copies between the data stream and a connection to the pod's port;
/// a failure goes to the error stream. Both streams are ended after.
async fn forward(
    out: mpsc::Sender<Vec<u8>>,
    error_id: u32,
    data_id: u32,
    port: String,
    mut rx: mpsc::Receiver<Option<Vec<u8>>>,
    netns: PathBuf,
) {
    let end = |id: u32| spdy::data(id, true, &[]);
    let port_num: Option<u16> = port.parse().ok().filter(|p| *p > 0);
    let tcp = match port_num {
        Some(p) => connect_in(netns, p).await.map_err(|e| e.to_string()),
        None => Err(format!("invalid port {port:?}")),
    };
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod: {e}");
            let _ = out.send(spdy::data(error_id, false, msg.as_bytes())).await;
            let _ = out.send(end(error_id)).await;
            let _ = out.send(end(data_id)).await;
            return;
        }
    };
    let (mut tr, mut tw) = tcp.into_split();
    // The client's side ends with its FIN (a half-close for the pod); the
    // pod's side ends the forwarding.
    let up = tokio::spawn(async move {
        while let Some(Some(chunk)) = rx.recv().await {
            if tw.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = tw.shutdown().await;
    });
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match tr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out
                        .send(spdy::data(data_id, false, &buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = out.send(end(data_id)).await;
    };
    down.await;
    up.abort();
    let _ = out.send(end(error_id)).await;
}
