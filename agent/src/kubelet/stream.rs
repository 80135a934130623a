//! `kubectl exec` and `kubectl attach` on the kubelet's port:
//! `/exec/<ns>/<pod>/<container>` and `/attach/...` over a WebSocket speaking the channel protocol kubectl ≥ 1.30 uses
//! (`v5.channel.k8s.io`, or `v4.channel.k8s.io`), reached through the
//! apiserver's `pods/exec`.
//!
//! Each binary message starts with its channel: 0 stdin, 1 stdout, 2
//! stderr, 3 the final Status (exit code), 4 terminal resize (`{"Width",
//! "Height"}`); in v5, 255 `[0]` says the client closed stdin. The command
//! runs as a containerd exec process with the container's own process
//! settings (user, environment, working directory), its stdio on FIFOs
//! this module reads and writes. Attach follows what the container's main
//! process writes (its log, as it is written) until the process ends; the
//! main process has no stdin to attach to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info, warn};

use super::containerd::{Containerd, ExecIo};
use super::pod::{LABEL_CONTAINER, LABEL_POD_NAME, LABEL_POD_NAMESPACE};

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// What a streaming request needs from the kubelet.
pub struct Streaming {
    pub cd: Containerd,
    /// Where exec FIFOs are made.
    pub fifo_dir: PathBuf,
    /// The pods' container logs (what attach follows).
    pub log_dir: PathBuf,
    /// The pods' directories (their network namespaces, for port-forward).
    pub pods_dir: PathBuf,
    /// The metrics (`/metrics/probes`).
    pub telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
}

pub(super) type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

pub(super) fn text(code: StatusCode, msg: impl Into<String>) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(msg.into())).boxed());
    *r.status_mut() = code;
    r
}

/// The exec options of a request's query (`command` repeats).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Percent-decoding of a query value (`+` is a space).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn exec_options(query: &str) -> ExecOptions {
    let mut o = ExecOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        let v = decode(v);
        let on = v == "true" || v == "1";
        match k {
            "command" => o.command.push(v),
            "input" | "stdin" => o.stdin = on,
            "output" | "stdout" => o.stdout = on,
            "error" | "stderr" => o.stderr = on,
            "tty" => o.tty = on,
            _ => {}
        }
    }
    o
}

/// The Status the error channel carries at the end.
fn exit_status(command: &[String], code: Option<u32>, error: Option<&str>) -> Value {
    match (code, error) {
        (_, Some(e)) => {
            json!({"metadata": {}, "status": "Failure", "message": e, "reason": "InternalError"})
        }
        (Some(0), None) => json!({"metadata": {}, "status": "Success"}),
        (Some(c), None) => json!({
            "metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {c}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]},
        }),
        (None, None) => {
            json!({"metadata": {}, "status": "Failure", "message": "the command did not report an exit code"})
        }
    }
}

impl Streaming {
    /// The running container `container` of pod `ns/pod`: its id and its
    /// process settings (from its OCI spec).
    async fn find(&self, ns: &str, pod: &str, container: &str) -> Option<(String, Value)> {
        let filter = format!(
            "labels.\"{LABEL_POD_NAMESPACE}\"=={ns},labels.\"{LABEL_POD_NAME}\"=={pod},labels.\"{LABEL_CONTAINER}\"=={container}"
        );
        let list = self.cd.containers(&filter).await.ok()?;
        for c in list {
            if !matches!(
                self.cd.task(&c.id).await,
                Ok(Some(super::containerd::TaskState::Running { .. }))
            ) {
                continue;
            }
            let spec: Value = c
                .spec
                .as_ref()
                .and_then(|a| serde_json::from_slice(&a.value).ok())
                .unwrap_or_default();
            return Some((c.id, spec.get("process").cloned().unwrap_or_default()));
        }
        None
    }

    /// `GET /exec/<ns>/<pod>/<container>?command=...`, upgraded to a
    /// WebSocket.
    pub async fn exec(
        self: Arc<Self>,
        req: Request<Incoming>,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Response<Body> {
        let opts = exec_options(req.uri().query().unwrap_or_default());
        if opts.command.is_empty() {
            return text(
                StatusCode::BAD_REQUEST,
                "you must specify at least 1 command",
            );
        }
        let (resp, v5) = match handshake(&req) {
            Ok(r) => r,
            Err(refused) => return text(StatusCode::BAD_REQUEST, refused),
        };
        let Some((id, process)) = self.find(ns, pod, container).await else {
            return not_running(ns, pod, container);
        };
        let label = format!("{ns}/{pod}/{container}");
        tokio::spawn(async move {
            if let Some(ws) = websocket(req, "exec").await {
                self.session(ws, &id, process, opts, v5, &label).await;
            }
        });
        resp
    }

    /// `GET /attach/<ns>/<pod>/<container>`, upgraded to a WebSocket.
    pub async fn attach(
        self: Arc<Self>,
        req: Request<Incoming>,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Response<Body> {
        let opts = exec_options(req.uri().query().unwrap_or_default());
        let (resp, _v5) = match handshake(&req) {
            Ok(r) => r,
            Err(refused) => return text(StatusCode::BAD_REQUEST, refused),
        };
        let Some((id, _)) = self.find(ns, pod, container).await else {
            return not_running(ns, pod, container);
        };
        let Some(dir) = super::logs::container_dir(&self.log_dir, ns, pod, container) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("container {container:?} of pod {ns}/{pod} has no output to attach to"),
            );
        };
        info!(container = %format!("{ns}/{pod}/{container}"), "attach");
        tokio::spawn(async move {
            if let Some(ws) = websocket(req, "attach").await {
                self.follow(ws, &id, &dir, opts).await;
            }
        });
        resp
    }

    /// Sends what the container writes from now on, until it ends or the
    /// client leaves.
    async fn follow<S>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<S>,
        id: &str,
        dir: &Path,
        opts: ExecOptions,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut incoming) = ws.split();
        let newest = |dir: &Path| super::logs::restarts(dir).last().map(|(_, f)| f.clone());
        let Some(file) = newest(dir) else {
            close(&mut sink).await;
            return;
        };
        let mut offset = std::fs::metadata(&file)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    ticks += 1;
                    // Checked before reading, so the last lines are sent.
                    let running = !ticks.is_multiple_of(5) || matches!(
                        self.cd.task(id).await,
                        Ok(Some(super::containerd::TaskState::Running { .. }))
                    );
                    if let Ok(fresh) = super::logs::read_from(&file, offset).await
                        && let Some(i) = fresh.rfind('\n')
                    {
                        offset += i + 1;
                        for line in fresh[..=i].lines() {
                            let Some((_, stream, full, text)) = super::logs::parse(line) else {
                                continue;
                            };
                            let channel = if stream == "stderr" && !opts.tty { STDERR } else { STDOUT };
                            if (channel == STDOUT && !opts.stdout && !opts.tty)
                                || (channel == STDERR && !opts.stderr)
                            {
                                continue;
                            }
                            let mut data = text.as_bytes().to_vec();
                            if full {
                                data.push(b'\n');
                            }
                            if send(&mut sink, channel, &data).await.is_err() {
                                return;
                            }
                        }
                    }
                    if !running {
                        let status = json!({"metadata": {}, "status": "Success"});
                        let _ = send(&mut sink, ERROR, status.to_string().as_bytes()).await;
                        close(&mut sink).await;
                        return;
                    }
                }
                msg = incoming.next() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    async fn session<S>(
        &self,
        ws: tokio_tungstenite::WebSocketStream<S>,
        id: &str,
        mut process: Value,
        opts: ExecOptions,
        v5: bool,
        label: &str,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let exec_id = format!("exec-{}", random_id());
        let dir = self.fifo_dir.join(&exec_id);
        let (mut sink, mut incoming) = ws.split();
        let fifos = match Fifos::make(&dir, &opts) {
            Ok(f) => f,
            Err(e) => {
                let status = exit_status(
                    &opts.command,
                    None,
                    Some(&format!("making the exec FIFOs: {e}")),
                );
                let _ = send(&mut sink, ERROR, status.to_string().as_bytes()).await;
                close(&mut sink).await;
                return;
            }
        };
        process["args"] = json!(opts.command);
        process["terminal"] = json!(opts.tty);
        if opts.tty
            && let Some(env) = process.get_mut("env").and_then(Value::as_array_mut)
            && !env
                .iter()
                .any(|e| e.as_str().is_some_and(|s| s.starts_with("TERM=")))
        {
            env.push(json!("TERM=xterm"));
        }
        info!(container = %label, command = ?opts.command, tty = opts.tty, "exec");
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(32);
        let exited = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for (channel, rx) in [(STDOUT, fifos.stdout), (STDERR, fifos.stderr)] {
            if let Some(rx) = rx {
                readers.push(tokio::spawn(pump(
                    rx,
                    channel,
                    out_tx.clone(),
                    exited.clone(),
                )));
            }
        }
        drop(out_tx);
        let mut stdin = fifos.stdin;
        let started = self.cd.exec_start(id, &exec_id, &process, &fifos.io).await;
        if let Err(e) = started {
            let status = exit_status(&opts.command, None, Some(&e.to_string()));
            exited.store(true, Ordering::SeqCst);
            let _ = send(&mut sink, ERROR, status.to_string().as_bytes()).await;
            close(&mut sink).await;
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let wait = self.cd.exec_wait_exit(id, &exec_id);
        tokio::pin!(wait);
        let mut code = None;
        let mut client_gone = false;
        let mut outputs_open = true;
        loop {
            tokio::select! {
                r = &mut wait, if code.is_none() => {
                    code = Some(r.ok());
                    exited.store(true, Ordering::SeqCst);
                }
                out = out_rx.recv(), if outputs_open => match out {
                    Some((ch, data)) => {
                        if send(&mut sink, ch, &data).await.is_err() {
                            client_gone = true;
                            break;
                        }
                    }
                    None => outputs_open = false,
                },
                msg = incoming.next(), if !client_gone => match msg {
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => match b[0] {
                        STDIN => {
                            if let Some(w) = stdin.as_mut()
                                && w.write_all(&b[1..]).await.is_err()
                            {
                                stdin = None;
                            }
                        }
                        RESIZE => {
                            if let Ok(v) = serde_json::from_slice::<Value>(&b[1..]) {
                                let dim = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
                                self.cd.exec_resize(id, &exec_id, dim("Width"), dim("Height")).await;
                            }
                        }
                        CLOSE if v5 && b.get(1) == Some(&STDIN) => {
                            stdin = None;
                            self.cd.exec_close_stdin(id, &exec_id).await;
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        client_gone = true;
                        if code.is_none() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                },
            }
            if code.is_some() && !outputs_open {
                break;
            }
        }
        drop(stdin);
        if client_gone && code.is_none() {
            debug!(container = %label, "exec client went away: killing the process");
            self.cd.exec_kill(id, &exec_id, 9).await;
        } else {
            let code = code.flatten();
            let status = exit_status(&opts.command, code, None);
            let _ = send(&mut sink, ERROR, status.to_string().as_bytes()).await;
            close(&mut sink).await;
        }
        exited.store(true, Ordering::SeqCst);
        for r in readers {
            r.abort();
        }
        self.cd.exec_delete(id, &exec_id).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Ends the WebSocket with a normal closure (clients read any other as an
/// error).
async fn close<S>(sink: &mut S)
where
    S: futures::Sink<Message> + Unpin,
{
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    let _ = sink.close().await;
}

/// The connection of an upgraded request as a server-side WebSocket, once
/// the 101 has gone out; None (logged) when the upgrade failed.
pub(super) async fn websocket(
    req: Request<Incoming>,
    what: &str,
) -> Option<tokio_tungstenite::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>> {
    match hyper::upgrade::on(req).await {
        Ok(u) => Some(
            tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(u),
                Role::Server,
                None,
            )
            .await,
        ),
        Err(e) => {
            debug!(error = %e, "{what} upgrade failed");
            None
        }
    }
}

fn not_running(ns: &str, pod: &str, container: &str) -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        format!("container {container:?} of pod {ns}/{pod} is not running on this node"),
    )
}

/// The WebSocket subprotocols a request offers.
pub(super) fn offered_protocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect()
}

/// Checks a streaming request's WebSocket upgrade: the 101 to answer with
/// and whether v5 was chosen, or the refusal.
fn handshake(req: &Request<Incoming>) -> Result<(Response<Body>, bool), String> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec());
    let offered = offered_protocols(req);
    let Some(key) = key else {
        return Err(
            "a WebSocket upgrade is needed (v5.channel.k8s.io or v4.channel.k8s.io); SPDY is not served"
                .into(),
        );
    };
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return Err(format!(
            "none of the offered subprotocols {offered:?} is served: {PROTOCOLS:?}"
        ));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    Ok((resp, *protocol == PROTOCOLS[0]))
}

async fn send<S>(sink: &mut S, channel: u8, data: &[u8]) -> Result<(), ()>
where
    S: futures::Sink<Message> + Unpin,
{
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(data);
    sink.send(Message::Binary(Bytes::from(frame)))
        .await
        .map_err(|_| ())
}

/// Copies a FIFO to the output channel until the process has exited and
/// the shim closed its end. An end of file before the process exited is
/// the shim not having opened its end yet.
async fn pump(
    mut rx: tokio::net::unix::pipe::Receiver,
    channel: u8,
    out: tokio::sync::mpsc::Sender<(u8, Vec<u8>)>,
    exited: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) => {
                if exited.load(Ordering::SeqCst) {
                    // One more look: what the shim wrote just before closing.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match rx.read(&mut buf).await {
                        Ok(n) if n > 0 => {
                            if out.send((channel, buf[..n].to_vec())).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        _ => return,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(n) => {
                if out.send((channel, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(error = %e, "reading exec output");
                return;
            }
        }
    }
}

/// The FIFOs of one exec: made in `dir`, our ends open.
struct Fifos {
    io: ExecIo,
    stdin: Option<tokio::net::unix::pipe::Sender>,
    stdout: Option<tokio::net::unix::pipe::Receiver>,
    stderr: Option<tokio::net::unix::pipe::Receiver>,
}

impl Fifos {
    fn make(dir: &Path, o: &ExecOptions) -> std::io::Result<Self> {
        use tokio::net::unix::pipe::OpenOptions;
        std::fs::create_dir_all(dir)?;
        let fifo = |name: &str| -> std::io::Result<PathBuf> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(std::io::Error::from)?;
            Ok(p)
        };
        let mut io = ExecIo {
            terminal: o.tty,
            ..Default::default()
        };
        let stdin = if o.stdin {
            let p = fifo("stdin")?;
            io.stdin = p.display().to_string();
            // Read-write: opening does not wait for the shim's reader.
            Some(OpenOptions::new().read_write(true).open_sender(&p)?)
        } else {
            None
        };
        let stdout = if o.stdout || o.tty {
            let p = fifo("stdout")?;
            io.stdout = p.display().to_string();
            Some(OpenOptions::new().open_receiver(&p)?)
        } else {
            None
        };
        // With a terminal, stderr is the terminal too.
        let stderr = if o.stderr && !o.tty {
            let p = fifo("stderr")?;
            io.stderr = p.display().to_string();
            Some(OpenOptions::new().open_receiver(&p)?)
        } else {
            None
        };
        Ok(Self {
            io,
            stdin,
            stdout,
            stderr,
        })
    }
}

/// An exec id unique in this kubelet's life.
fn random_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_the_query() {
        let o = exec_options(
            "command=sh&command=-c&command=echo+hi%3B+exit+3&stdin=true&stdout=true&tty=false",
        );
        assert_eq!(
            o,
            ExecOptions {
                command: vec!["sh".into(), "-c".into(), "echo hi; exit 3".into()],
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false,
            }
        );
    }

    #[test]
    fn exit_codes_travel_as_a_status() {
        let cmd = vec!["false".to_string()];
        let s = exit_status(&cmd, Some(3), None);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status(&cmd, Some(0), None)["status"], "Success");
        assert_eq!(
            exit_status(&cmd, None, Some("no such file"))["status"],
            "Failure"
        );
    }
}
