//! Questions outside the cluster domain, asked of the node's upstream
//! resolvers: over UDP from a fresh random port with a random ID, the reply
//! taken only when its ID and question match; over TCP when the reply is
//! truncated; the next upstream when one does not answer in time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

/// The largest UDP reply asked of upstreams (DNS flag day 2020).
pub const UDP_PAYLOAD: u16 = 1232;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        source: std::io::Error,
    },
    #[error("encoding the question: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
}

/// The node's upstream resolvers.
#[derive(Clone, Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// How long one upstream is given.
    attempt: Duration,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, attempt: Duration) -> Self {
        Self { upstreams, attempt }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks `query` (recursion desired), trying each upstream in turn.
    pub async fn ask(&self, query: &Query) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let mut last = None;
        for upstream in &self.upstreams {
            match self.ask_one(*upstream, query).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::debug!(%upstream, error = %e, "upstream failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(ForwardError::NoUpstream))
    }

    async fn ask_one(&self, upstream: SocketAddr, query: &Query) -> Result<Message, ForwardError> {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        msg.set_edns(edns);
        let id = msg.metadata.id;
        let bytes = msg.to_vec()?;
        let io = |source| ForwardError::Io { upstream, source };
        let deadline = Instant::now() + self.attempt;
        let local: SocketAddr = match upstream.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await.map_err(io)?;
        sock.connect(upstream).await.map_err(io)?;
        sock.send(&bytes).await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(UDP_PAYLOAD).max(4096)];
        loop {
            let n = timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| ForwardError::Timeout(self.attempt))?
                .map_err(io)?;
            // Anything else on this port is not the reply: a late or forged
            // packet is dropped, not taken.
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if !answers(&reply, id, query) {
                continue;
            }
            if reply.metadata.truncation {
                return timeout_at(deadline, self.ask_tcp(upstream, &bytes, id, query))
                    .await
                    .map_err(|_| ForwardError::Timeout(self.attempt))?;
            }
            return Ok(reply);
        }
    }

    async fn ask_tcp(
        &self,
        upstream: SocketAddr,
        question: &[u8],
        id: u16,
        query: &Query,
    ) -> Result<Message, ForwardError> {
        let io = |source| ForwardError::Io { upstream, source };
        let mut s = TcpStream::connect(upstream).await.map_err(io)?;
        let framed = tcp_frame(question).ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "question too long",
            ))
        })?;
        s.write_all(&framed).await.map_err(io)?;
        let n = s.read_u16().await.map_err(io)?;
        let mut buf = vec![0u8; usize::from(n)];
        s.read_exact(&mut buf).await.map_err(io)?;
        match Message::from_vec(&buf) {
            Ok(reply) if answers(&reply, id, query) => Ok(reply),
            _ => Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a reply to the question",
            ))),
        }
    }
}

/// A DNS message as TCP carries it: its length (two bytes), then itself;
/// None past 65 535 bytes.
pub fn tcp_frame(message: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(message.len()).ok()?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    Some(framed)
}

fn answers(reply: &Message, id: u16, query: &Query) -> bool {
    reply.metadata.id == id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries.len() == 1
        && reply.queries[0].name() == query.name()
        && reply.queries[0].query_type() == query.query_type()
}

/// The nameservers of a resolv.conf, on port 53, without `exclude` (the
/// DNS server's own addresses: forwarding to them would loop).
pub fn resolv_conf_upstreams(path: &Path, exclude: &[IpAddr]) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse_nameservers(&text)
        .into_iter()
        .filter(|ip| !exclude.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) keeps its address.
            words.next()?.split('%').next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf_lines() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.53\n\
                    nameserver  fe80::1%eth0\nnameserver bogus\noptions ndots:2\nnameserver 10.96.0.10\n";
        let got = parse_nameservers(text);
        assert_eq!(
            got,
            [
                "192.0.2.53".parse::<IpAddr>().expect("ip"),
                "fe80::1".parse().expect("ip"),
                "10.96.0.10".parse().expect("ip"),
            ]
        );
    }
}
