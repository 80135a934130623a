//! The server side of SPDY/3.1 as `kubectl port-forward` speaks it
//! (protocol `portforward.k8s.io`): frames, the zlib-compressed header
//! blocks, and a session that hands each stream the client opens to a
//! handler.
//!
//! Only what port forwarding uses is here. The client opens every stream
//! (SYN_STREAM, answered with SYN_REPLY) and the server opens none; DATA
//! frames carry the bytes, FIN ends a direction, RST_STREAM ends a stream,
//! PING is echoed and GOAWAY ends the session. The client (Go's
//! spdystream) keeps no flow-control windows, so none are kept here.

use std::collections::HashMap;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;
/// RST_STREAM status: the stream is refused / was cancelled.
pub const CANCEL: u32 = 5;

/// SPDY/3's header compression dictionary (draft-mbelshe-httpbis-spdy-00,
/// section 2.6.10.1): length-prefixed words, then a run of common text.
fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8",
        "charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SPDY/3: {0}")]
    Protocol(String),
    #[error("header block: {0}")]
    Headers(String),
}

/// One frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: HashMap<String, String>,
    },
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    Reset {
        id: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    /// Frames port forwarding does not use (SETTINGS, WINDOW_UPDATE, ...).
    Other,
}

/// The header codec of one direction each: SPDY compresses all header
/// blocks of a session as one zlib stream.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
    dict: Vec<u8>,
    deflate_primed: bool,
}

impl Default for Codec {
    fn default() -> Self {
        Self {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            dict: dictionary(),
            deflate_primed: false,
        }
    }
}

impl Codec {
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let mut used = 0usize;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(4096);
            }
            let before = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync);
            used += (self.inflate.total_in() - before) as usize;
            match r {
                // All input taken and room left over: nothing is pending.
                Ok(_) if used >= input.len() && out.len() < out.capacity() => return Ok(out),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&self.dict)
                        .map_err(|e| SpdyError::Headers(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Headers(e.to_string())),
            }
        }
    }

    fn deflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        if !self.deflate_primed {
            self.deflate
                .set_dictionary(&self.dict)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            self.deflate_primed = true;
        }
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut used = 0usize;
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&input[used..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            used += (self.deflate.total_in() - before) as usize;
            if used >= input.len() && out.capacity() > out.len() {
                return Ok(out);
            }
        }
    }

    /// A header block: name/value pairs, compressed.
    pub fn encode_headers(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
            raw.extend_from_slice(k.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        self.deflate(&raw)
    }

    pub fn decode_headers(&mut self, block: &[u8]) -> Result<HashMap<String, String>, SpdyError> {
        let raw = self.inflate(block)?;
        let bad = || SpdyError::Headers("truncated name/value block".into());
        let u32_at = |i: usize| -> Result<usize, SpdyError> {
            raw.get(i..i + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(bad)
        };
        let n = u32_at(0)?;
        let mut at = 4;
        let mut out = HashMap::new();
        for _ in 0..n {
            let kl = u32_at(at)?;
            let k = raw.get(at + 4..at + 4 + kl).ok_or_else(bad)?;
            at += 4 + kl;
            let vl = u32_at(at)?;
            let v = raw.get(at + 4..at + 4 + vl).ok_or_else(bad)?;
            at += 4 + vl;
            out.insert(
                String::from_utf8_lossy(k).to_ascii_lowercase(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
        Ok(out)
    }
}

fn control(kind: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

pub fn syn_reply(codec: &mut Codec, id: u32) -> Result<Vec<u8>, SpdyError> {
    let mut data = id.to_be_bytes().to_vec();
    data.extend(codec.encode_headers(&[])?);
    Ok(control(SYN_REPLY, 0, &data))
}

pub fn data(id: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(payload);
    f
}

pub fn reset(id: u32, status: u32) -> Vec<u8> {
    let mut d = id.to_be_bytes().to_vec();
    d.extend_from_slice(&status.to_be_bytes());
    control(RST_STREAM, 0, &d)
}

pub fn ping(id: u32) -> Vec<u8> {
    control(PING, 0, &id.to_be_bytes())
}

/// Reads the next frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    codec: &mut Codec,
) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let word = |i: usize| -> u32 {
        body.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
            .unwrap_or(0)
    };
    if head[0] & 0x80 == 0 {
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
        return Ok(Some(Frame::Data {
            id,
            fin: flags & FLAG_FIN != 0,
            data: body,
        }));
    }
    let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
    if version != VERSION {
        return Err(SpdyError::Protocol(format!("version {version}")));
    }
    Ok(Some(match u16::from_be_bytes([head[2], head[3]]) {
        SYN_STREAM => {
            if body.len() < 10 {
                return Err(SpdyError::Protocol("short SYN_STREAM".into()));
            }
            Frame::SynStream {
                id: word(0),
                fin: flags & FLAG_FIN != 0,
                headers: codec.decode_headers(&body[10..])?,
            }
        }
        RST_STREAM => Frame::Reset { id: word(0) },
        PING => Frame::Ping { id: word(0) },
        GOAWAY => Frame::GoAway,
        _ => Frame::Other,
    }))
}

/// Writes the frames sent to the returned sender, in order, until every
/// sender is gone or the connection fails.
pub fn writer<W: AsyncWrite + Unpin + Send + 'static>(mut w: W) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if w.write_all(&frame).await.is_err() {
                return;
            }
            // Coalesce what is queued before flushing.
            while let Ok(more) = rx.try_recv() {
                if w.write_all(&more).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\x00\x00\x00\x07options");
        assert!(d.ends_with(b"enq=0."));
        use sha2::Digest as _;
        let digest: String = sha2::Sha256::digest(&d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest, "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02",
            "the dictionary Go's spdystream uses"
        );
    }

    #[tokio::test]
    async fn frames_round_trip_through_one_header_stream() {
        let (mut client, mut server) = (Codec::default(), Codec::default());
        let mut wire = Vec::new();
        for (id, port) in [(1u32, "8080"), (3, "9090")] {
            let block = client
                .encode_headers(&[("streamType", "data"), ("port", port), ("requestID", "0")])
                .expect("encode");
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            body.extend(block);
            wire.extend(control(SYN_STREAM, 0, &body));
        }
        wire.extend(data(1, true, b"hello"));
        wire.extend(ping(7));
        let mut r = &wire[..];
        let first = read_frame(&mut r, &mut server)
            .await
            .expect("read")
            .expect("frame");
        let Frame::SynStream { id, headers, .. } = first else {
            panic!("{first:?}")
        };
        assert_eq!(
            (id, headers["streamtype"].as_str(), headers["port"].as_str()),
            (1, "data", "8080")
        );
        let second = read_frame(&mut r, &mut server)
            .await
            .expect("read")
            .expect("frame");
        assert!(
            matches!(second, Frame::SynStream { id: 3, ref headers, .. } if headers["port"] == "9090")
        );
        assert_eq!(
            read_frame(&mut r, &mut server).await.expect("read"),
            Some(Frame::Data {
                id: 1,
                fin: true,
                data: b"hello".to_vec()
            })
        );
        assert_eq!(
            read_frame(&mut r, &mut server).await.expect("read"),
            Some(Frame::Ping { id: 7 })
        );
        assert_eq!(read_frame(&mut r, &mut server).await.expect("read"), None);
        // A reply's empty header block decodes on the other side.
        let reply = syn_reply(&mut server, 1).expect("reply");
        let block = client.decode_headers(&reply[12..]).expect("decode");
        assert!(block.is_empty());
    }
}
