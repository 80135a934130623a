//! The kubelet's log endpoint for node objects that have no agent, as
//! `HollowNodes` plays their pod status: HTTPS on loopback at
//! `/containerLogs/<ns>/<pod>/<container>`, requiring a client certificate
//! signed by the cluster CA (the apiserver's kubelet-client certificate).
//! Each container "logs" `line N from <pod>/<container>` for N = 1..5;
//! `tailLines`, `timestamps` and `follow` (a new line every 200 ms) are
//! honoured. Registers its port in the node's
//! `status.daemonEndpoints.kubeletEndpoint`, and stops on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::control::ControlPlane;

pub struct HollowKubelet {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl HollowKubelet {
    /// Serves logs for `node` (whose InternalIP must be 127.0.0.1).
    pub fn start(cp: &ControlPlane, node: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let config = server_config(&cp.ca_file());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let (config, flag) = (config.clone(), flag.clone());
                std::thread::spawn(move || serve(tcp, config, &flag));
            }
        });
        let patch =
            serde_json::json!({"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
        cp.kubectl_ok(&[
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
        Self { port, stop }
    }
}

impl Drop for HollowKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn server_config(ca_file: &Path) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_file).unwrap_or_else(|e| panic!("CA: {e}")) {
        roots
            .add(c.unwrap_or_else(|e| panic!("CA: {e}")))
            .unwrap_or_else(|e| panic!("CA: {e}"));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap_or_else(|e| panic!("client verifier: {e}"));
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .and_then(|p| p.self_signed(&key))
        .unwrap_or_else(|e| panic!("serving certificate: {e}"));
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(vec![cert.der().clone()], key)
        })
        .unwrap_or_else(|e| panic!("kubelet TLS: {e}"));
    Arc::new(cfg)
}

fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, stop: &AtomicBool) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = String::new();
    {
        let mut reader = BufReader::new(&mut tls);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push_str(&line),
            }
        }
    }
    let target = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["containerLogs", _ns, pod, container] = parts.as_slice() else {
        let _ = tls.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found");
        return;
    };
    let opt = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .map(String::from)
    };
    let stamp = opt("timestamps").is_some_and(|v| v == "true");
    let line = |n: usize| {
        let text = format!("line {n} from {pod}/{container}\n");
        if stamp {
            format!("2026-01-01T00:00:{:02}Z {text}", n % 60)
        } else {
            text
        }
    };
    let mut lines: Vec<String> = (1..=5).map(line).collect();
    if let Some(tail) = opt("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        lines = lines.split_off(lines.len().saturating_sub(tail));
    }
    if opt("follow").is_some_and(|v| v == "true") {
        let _ = tls.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
        let mut n = 6;
        let mut out = lines.concat();
        while !stop.load(Ordering::Relaxed) {
            if tls
                .write_all(chunk(&out).as_bytes())
                .and_then(|()| tls.flush())
                .is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            out = line(n);
            n += 1;
        }
        let _ = tls.write_all(b"0\r\n\r\n");
        return;
    }
    let body = lines.concat();
    let _ = tls.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = tls.flush();
}
