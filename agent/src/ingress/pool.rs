//! One ingress worker's keep-alive connections to endpoints, in HTTP/1.1
//! (hyper's `client::conn::http1`). Each endpoint has a stack of idle
//! connections, the last used on top, as nginx's upstream `keepalive`
//! cache does.
//!
//! - A connection goes back on its stack once its response has been read
//!   whole.
//! - One whose response is dropped half read, or that switched protocols
//!   (WebSocket), is not reused.
//! - Idle ones are closed after [`IDLE`] ([`Pool::sweep`]).
//! - A request that a reused connection could not take (the endpoint had
//!   closed it) is sent again on a new connection: it was not sent.
//!
//! Each worker has a pool of its own, used from its one thread, so the
//! lock is never contended.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tracing::debug;

/// A request's body on its way to an endpoint: the client's, or none.
pub type Outgoing = Either<Incoming, Empty<Bytes>>;

/// How long a connection may stay idle (nginx's upstream
/// `keepalive_timeout`).
pub const IDLE: Duration = Duration::from_secs(60);
/// How long an endpoint has to accept a connection.
pub const CONNECT: Duration = Duration::from_secs(5);
/// Idle connections kept per endpoint; more are closed.
const MAX_IDLE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("connecting: no answer within {} s", CONNECT.as_secs())]
    ConnectTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

struct Idle {
    tx: SendRequest<Outgoing>,
    since: Instant,
}

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
}

impl Pool {
    fn idle(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection to `addr` that is ready for a request.
    async fn reuse(&self, addr: SocketAddr) -> Option<SendRequest<Outgoing>> {
        loop {
            let mut idle = self.idle().get_mut(&addr).and_then(Vec::pop)?;
            if !idle.tx.is_closed() && idle.tx.ready().await.is_ok() {
                return Some(idle.tx);
            }
        }
    }

    async fn connect(addr: SocketAddr) -> Result<SendRequest<Outgoing>, SendError> {
        let tcp = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| SendError::ConnectTimeout)??;
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(endpoint = %addr, error = %e, "endpoint connection ended");
            }
        });
        Ok(tx)
    }

    fn put(&self, addr: SocketAddr, tx: SendRequest<Outgoing>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle();
        let stack = idle.entry(addr).or_default();
        if stack.len() < MAX_IDLE {
            stack.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for longer than [`IDLE`] or closed by
    /// their endpoint, and forgets endpoints left with none.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle().retain(|_, stack| {
            stack.retain(|i| !i.tx.is_closed() && now.duration_since(i.since) < IDLE);
            !stack.is_empty()
        });
    }

    /// Idle connections, over all endpoints.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }

    /// Sends `req` to `addr` over an idle connection, or a new one, and
    /// answers with the response, whose body gives the connection back
    /// once read whole.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<Outgoing>,
    ) -> Result<Response<Pooled>, SendError> {
        let req = match self.reuse(addr).await {
            Some(mut tx) => match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(addr, tx, resp)),
                Err(mut e) => match e.take_message() {
                    // The endpoint closed it as it was taken: not sent.
                    Some(req) => req,
                    None => return Err(e.into_error().into()),
                },
            },
            None => req,
        };
        // A new connection takes its first request at once.
        let mut tx = Self::connect(addr).await?;
        let resp = tx.send_request(req).await?;
        Ok(self.pooled(addr, tx, resp))
    }

    fn pooled(
        self: &Arc<Self>,
        addr: SocketAddr,
        tx: SendRequest<Outgoing>,
        resp: Response<Incoming>,
    ) -> Response<Pooled> {
        let (parts, body) = resp.into_parts();
        // A connection that switched protocols is the upgrade's.
        let back = (parts.status != StatusCode::SWITCHING_PROTOCOLS).then(|| Back {
            pool: self.clone(),
            addr,
            tx,
        });
        let mut pooled = Pooled { body, back };
        if pooled.body.is_end_stream() {
            pooled.give_back();
        }
        Response::from_parts(parts, pooled)
    }
}

struct Back {
    pool: Arc<Pool>,
    addr: SocketAddr,
    tx: SendRequest<Outgoing>,
}

/// An endpoint's response body, which gives its connection back to the
/// pool once it has been read to its end.
pub struct Pooled {
    body: Incoming,
    back: Option<Back>,
}

impl Pooled {
    fn give_back(&mut self) {
        if let Some(b) = self.back.take() {
            b.pool.put(b.addr, b.tx);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            Some(Ok(_)) if this.body.is_end_stream() => this.give_back(),
            // A broken body leaves the connection unusable.
            Some(Err(_)) => this.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An endpoint on loopback answering `n` requests per connection with
    /// `ok`, then closing it; it counts the connections it accepted.
    async fn endpoint(per_conn: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    for _ in 0..per_conn {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr) -> Request<Outgoing> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, addr.to_string())
            .body(Either::Right(Empty::new()))
            .unwrap()
    }

    async fn body(r: Response<Pooled>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_read_whole_is_reused_and_one_left_half_read_is_not() {
        let (addr, accepted) = endpoint(100).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..5 {
            let r = pool.send(addr, get(addr)).await.unwrap();
            assert_eq!(body(r).await, "ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        // Taken, and its response dropped unread: not given back.
        let r = pool.send(addr, get(addr)).await.unwrap();
        drop(r);
        assert_eq!(pool.idle_count(), 0);
        let r = pool.send(addr, get(addr)).await.unwrap();
        assert_eq!(body(r).await, "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn requests_take_new_connections_when_the_endpoint_closes_each() {
        // One request per connection, closed after it: every idle
        // connection the pool keeps is dead by the next request.
        let (addr, accepted) = endpoint(1).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..3 {
            let r = pool.send(addr, get(addr)).await.unwrap();
            assert_eq!(body(r).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(Pool::default());
        let e = pool.send(addr, get(addr)).await.err().unwrap();
        assert!(matches!(e, SendError::Connect(_)), "{e}");
    }

    #[tokio::test]
    async fn sweep_closes_connections_the_endpoint_closed() {
        let (addr, _) = endpoint(1).await;
        let pool = Arc::new(Pool::default());
        let r = pool.send(addr, get(addr)).await.unwrap();
        assert_eq!(body(r).await, "ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
    }
}
