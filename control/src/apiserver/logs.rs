//! `pods/log`: the apiserver proxies to the kubelet of the pod's node, as
//! upstream does. The kubelet is found at the node's address (InternalIP,
//! else Hostname, else ExternalIP) and `status.daemonEndpoints.
//! kubeletEndpoint.Port` (10250 if unset), spoken to over HTTPS at
//! `/containerLogs/<namespace>/<pod>/<container>` with the log options as
//! query parameters. The apiserver shows a client certificate signed by
//! the cluster CA (CN `skiff-apiserver-kubelet-client`); like upstream
//! without `--kubelet-certificate-authority`, it does not verify the
//! kubelet's serving certificate. The kubelet's answer is streamed back
//! as it comes, so `kubectl logs -f` follows.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, BodyStream, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use tracing::debug;

use super::{Api, Body};
use crate::resources;
use crate::status::{ApiError, Cause};

/// The default kubelet port.
const KUBELET_PORT: i64 = 10250;

/// Accepts any kubelet serving certificate (upstream's default), while
/// still checking the handshake signatures.
#[derive(Debug)]
struct AnyKubeletCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyKubeletCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration for talking to kubelets.
pub fn kubelet_tls(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let (certs, key) = super::cert_and_key(cert_pem, key_pem, "kubelet client")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyKubeletCert(provider)))
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("kubelet client certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// The container a log or exec request is for: the one named, or the
/// pod's only container.
pub(super) fn container<'a>(
    pod: &'a Value,
    pod_name: &str,
    asked: Option<&'a str>,
) -> Result<&'a str, ApiError> {
    let spec = &pod["spec"];
    let names = |list: &str| -> Vec<&'a str> {
        spec.get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect()
    };
    let main = names("containers");
    let all: Vec<&str> = main
        .iter()
        .copied()
        .chain(names("initContainers"))
        .chain(names("ephemeralContainers"))
        .collect();
    match asked.filter(|c| !c.is_empty()) {
        Some(c) if all.contains(&c) => Ok(c),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {pod_name}"
        ))),
        None if main.len() == 1 => Ok(main[0]),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}]",
            all.join(" ")
        ))),
    }
}

/// Where the node's kubelet listens.
fn kubelet_address(node: &Value) -> Option<(String, u16)> {
    let addrs = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)?;
    let host = ["InternalIP", "Hostname", "ExternalIP"]
        .iter()
        .find_map(|ty| {
            addrs
                .iter()
                .find(|a| a["type"] == *ty)
                .and_then(|a| a["address"].as_str())
                .filter(|a| !a.is_empty())
        })?
        .to_string();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_i64)
        .filter(|p| *p > 0)
        .unwrap_or(KUBELET_PORT);
    Some((host, u16::try_from(port).ok()?))
}

/// The log options the kubelet takes, checked, as a query string.
fn log_query(q: &HashMap<String, String>, pod_name: &str) -> Result<String, ApiError> {
    let mut causes = Vec::new();
    let mut parts = Vec::new();
    for (key, min) in [("sinceSeconds", 1), ("tailLines", 0), ("limitBytes", 1)] {
        if let Some(v) = q.get(key) {
            match v.parse::<i64>() {
                Ok(n) if n >= min => parts.push(format!("{key}={n}")),
                _ => causes.push(Cause::invalid(
                    key,
                    v,
                    &format!("must be an integer greater than or equal to {min}"),
                )),
            }
        }
    }
    for key in ["follow", "previous", "timestamps"] {
        match q.get(key).map(String::as_str) {
            None | Some("false") => {}
            Some("true" | "") => parts.push(format!("{key}=true")),
            Some(v) => causes.push(Cause::invalid(key, v, "must be true or false")),
        }
    }
    if let Some(t) = q.get("sinceTime") {
        match t.parse::<jiff::Timestamp>() {
            Ok(ts) => parts.push(format!("sinceTime={}", ts.strftime("%Y-%m-%dT%H:%M:%SZ"))),
            Err(_) => causes.push(Cause::invalid("sinceTime", t, "must be an RFC 3339 time")),
        }
    }
    if q.contains_key("sinceSeconds") && q.contains_key("sinceTime") {
        causes.push(Cause::forbidden(
            "sinceTime",
            "at most one of sinceTime or sinceSeconds may be specified",
        ));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid("", "PodLogOptions", pod_name, causes));
    }
    Ok(if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    })
}

/// Where a pod's kubelet is, and how to talk to it.
pub(super) struct KubeletOf {
    pub pod: Value,
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
}

impl Api {
    /// The pod `ns/name` and the kubelet of its node.
    pub(super) async fn kubelet_of(&self, ns: &str, name: &str) -> Result<KubeletOf, ApiError> {
        let pods = resources::find("", "v1", "pods").ok_or_else(|| ApiError::internal("pods"))?;
        let nodes =
            resources::find("", "v1", "nodes").ok_or_else(|| ApiError::internal("nodes"))?;
        let (pod, _) = self.read(pods, Some(ns), name).await?;
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::bad_request(format!("pod {name} does not have a host assigned"))
            })?;
        let (node_obj, _) = self
            .read(nodes, None, node)
            .await
            .map_err(|e| ApiError::internal(format!("node {node} of pod {name}: {}", e.message)))?;
        let mut k = self.kubelet_of_node(&node_obj)?;
        k.pod = pod;
        Ok(k)
    }

    /// The kubelet of `node` (the object); `pod` is left null.
    pub(super) fn kubelet_of_node(&self, node: &Value) -> Result<KubeletOf, ApiError> {
        let name = node
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (host, port) = kubelet_address(node).ok_or_else(|| {
            ApiError::internal(format!("node {name} reports no address for its kubelet"))
        })?;
        let tls = self
            .cfg
            .kubelet_tls
            .clone()
            .ok_or_else(|| ApiError::internal("no kubelet client certificate configured"))?;
        Ok(KubeletOf {
            pod: Value::Null,
            host,
            port,
            tls,
        })
    }

    pub(crate) async fn pod_log(
        &self,
        ns: &str,
        name: &str,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, ApiError> {
        let k = self.kubelet_of(ns, name).await?;
        let container = container(&k.pod, name, q.get("container").map(String::as_str))?;
        let query = log_query(q, name)?;
        let path = format!("/containerLogs/{ns}/{name}/{container}{query}");
        fetch(&k, &path).await
    }
}

impl KubeletOf {
    pub(super) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A TLS connection to the kubelet; errors name `what` (the request).
    pub(super) async fn dial(
        &self,
        what: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ApiError> {
        let authority = self.authority();
        let fail = |e: &dyn std::fmt::Display| ApiError::internal(format!("{what}: {e}"));
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await
        .map_err(|_| fail(&"dial timed out"))?
        .map_err(|e| fail(&e))?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(self.host.clone()).map_err(|e| fail(&e))?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| fail(&e))
    }
}

/// GETs `path` from the kubelet and streams the answer.
pub(super) async fn fetch(k: &KubeletOf, path: &str) -> Result<Response<Body>, ApiError> {
    let authority = k.authority();
    let url = format!("https://{authority}{path}");
    let fail = |e: &dyn std::fmt::Display| ApiError::internal(format!("Get \"{url}\": {e}"));
    let stream = k.dial(&format!("Get \"{url}\"")).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "kubelet connection ended");
        }
    });
    let req = Request::get(path)
        .header(header::HOST, &authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| fail(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(ApiError::proxied(
            status.as_u16(),
            if body.is_empty() {
                format!("the kubelet answered {status}")
            } else {
                body
            },
        ));
    }
    // The stream ends where the kubelet's does, or at its first error.
    let frames = BodyStream::new(resp.into_body())
        .take_while(|f| std::future::ready(f.is_ok()))
        .filter_map(|f| {
            std::future::ready(
                f.ok()
                    .and_then(|f| f.into_data().ok())
                    .map(|b| Ok::<_, Infallible>(Frame::data(b))),
            )
        });
    let mut out = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    out.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn container_choice_and_kubelet_address() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(container(&one, "p", None).ok(), Some("app"));
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "init"}]}});
        let e = container(&two, "p", None).expect_err("ambiguous");
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b init]"
        );
        assert_eq!(container(&two, "p", Some("init")).ok(), Some("init"));
        assert!(container(&two, "p", Some("c")).is_err());

        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}}}});
        assert_eq!(kubelet_address(&node), Some(("10.0.0.5".into(), 10255)));
        let bare = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}]}});
        assert_eq!(kubelet_address(&bare), Some(("n1".into(), 10250)));
    }

    #[test]
    fn log_options() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(log_query(&q(&[]), "p").ok().as_deref(), Some(""));
        let s = log_query(&q(&[("tailLines", "2"), ("follow", "true")]), "p").expect("valid");
        assert!(
            s.contains("tailLines=2") && s.contains("follow=true"),
            "{s}"
        );
        let e = log_query(&q(&[("tailLines", "-1")]), "p").expect_err("negative");
        assert_eq!(e.code, 422);
        assert_eq!(e.causes()[0].field, "tailLines");
    }
}
