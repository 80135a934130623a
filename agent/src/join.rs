//! `skiff-agent join`: a node's first contact with its cluster, as
//! `kubeadm join` and the kubelet's TLS bootstrap make it.
//!
//! 1. Read `kube-public/cluster-info` without trusting the server yet, and
//!    accept its CA only if the hash of the CA's public key is the one the
//!    operator gave (`--ca-cert-hash sha256:...`).
//! 2. With the bootstrap token, and now verifying the server against that
//!    CA, ask for a client certificate for `system:node:<name>` (a
//!    CertificateSigningRequest; the control plane approves and signs it).
//! 3. Write a kubeconfig with that certificate and its key. The node uses
//!    it from then on; the token is not needed again, and a restart reuses
//!    the kubeconfig while its certificate is in date.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tracing::info;

pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("--ca-cert-hash {0:?}: expected sha256:<64 hex digits>")]
    BadHash(String),
    #[error("reading cluster-info from {server}: {source}")]
    Discovery { server: String, source: kube::Error },
    #[error("cluster-info: {0}")]
    ClusterInfo(String),
    #[error(
        "the cluster CA's hash is {found}, not the {expected} given: refusing to trust {server}"
    )]
    HashMismatch {
        server: String,
        expected: String,
        found: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("asking for a certificate: {0}")]
    Request(kube::Error),
    #[error("certificate request {name} was {how}: {message}")]
    Refused {
        name: String,
        how: String,
        message: String,
    },
    #[error("certificate request {0} was not signed within {1:?}")]
    Timeout(String, Duration),
    #[error("making a key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct JoinConfig {
    pub server: String,
    pub token: String,
    pub ca_cert_hash: String,
    pub node_name: String,
    /// Where the node's kubeconfig is written (and found after a restart).
    pub kubeconfig: PathBuf,
    /// How long to wait for the certificate.
    pub timeout: Duration,
}

/// The hash `--ca-cert-hash` names, lower-case hex, or an error.
fn expected_hash(given: &str) -> Result<String, JoinError> {
    let hex = given
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| JoinError::BadHash(given.to_string()))?;
    Ok(hex.to_ascii_lowercase())
}

/// SHA-256 of the CA certificate's SubjectPublicKeyInfo, in hex.
pub fn ca_hash(ca_pem: &str) -> Result<String, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use sha2::Digest as _;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let digest = sha2::Sha256::digest(cert.public_key().raw);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn kubeconfig_text(server: &str, ca_pem: &str, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: skiff\n  context:\n    cluster: skiff\n    user: node\ncurrent-context: skiff\nusers:\n- name: node\n  user:\n{user}preferences: {{}}\n",
        ca = STANDARD.encode(ca_pem)
    )
}

async fn client_from(text: &str) -> Result<Client, JoinError> {
    let kc = Kubeconfig::from_yaml(text).map_err(|e| JoinError::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| JoinError::Kubeconfig(e.to_string()))?;
    Client::try_from(config).map_err(|e| JoinError::Kubeconfig(e.to_string()))
}

/// The CA from `cluster-info`, checked against the hash.
async fn discover_ca(server: &str, hash: &str) -> Result<String, JoinError> {
    let insecure = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: anonymous\ncurrent-context: c\nusers:\n- name: anonymous\n  user: {{}}\n"
    );
    let client = client_from(&insecure).await?;
    let cm = Api::<ConfigMap>::namespaced(client, "kube-public")
        .get("cluster-info")
        .await
        .map_err(|source| JoinError::Discovery {
            server: server.to_string(),
            source,
        })?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("kubeconfig"))
        .ok_or_else(|| JoinError::ClusterInfo("no kubeconfig key".into()))?;
    let kc = Kubeconfig::from_yaml(text).map_err(|e| JoinError::ClusterInfo(e.to_string()))?;
    let ca_b64 = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.certificate_authority_data.clone())
        .ok_or_else(|| JoinError::ClusterInfo("no certificate-authority-data".into()))?;
    let ca = STANDARD
        .decode(ca_b64.trim())
        .map_err(|e| JoinError::ClusterInfo(format!("certificate-authority-data: {e}")))?;
    let ca =
        String::from_utf8(ca).map_err(|_| JoinError::ClusterInfo("the CA is not PEM".into()))?;
    let found = ca_hash(&ca).map_err(JoinError::ClusterInfo)?;
    if found != hash {
        return Err(JoinError::HashMismatch {
            server: server.to_string(),
            expected: format!("sha256:{hash}"),
            found: format!("sha256:{found}"),
        });
    }
    Ok(ca)
}

/// Whether the kubeconfig at `path` holds a client certificate that is in
/// date for at least another hour.
fn still_usable(path: &Path) -> bool {
    let Ok(kc) = Kubeconfig::read_from(path) else {
        return false;
    };
    let cert = kc
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.clone());
    let Some(pem) = cert.and_then(|b| STANDARD.decode(b.trim()).ok()) else {
        return false;
    };
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let Ok(der) = CertificateDer::from_pem_slice(&pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    cert.validity().not_after.timestamp() > now + 3600
}

/// Joins (or, with a usable kubeconfig from an earlier join, does
/// nothing). The CA is also written beside the kubeconfig as `ca.crt`.
pub async fn join(cfg: &JoinConfig) -> Result<(), JoinError> {
    let hash = expected_hash(&cfg.ca_cert_hash)?;
    if still_usable(&cfg.kubeconfig) {
        info!(kubeconfig = %cfg.kubeconfig.display(), "already joined: using the node's kubeconfig");
        return Ok(());
    }
    let ca = discover_ca(&cfg.server, &hash).await?;
    info!(server = %cfg.server, "cluster CA verified by its hash");
    let bootstrap = kubeconfig_text(&cfg.server, &ca, &format!("    token: {}\n", cfg.token));
    let client = client_from(&bootstrap).await?;

    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{}", cfg.node_name),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params.serialize_request(&key)?.pem()?;
    let api = Api::<CertificateSigningRequest>::all(client);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("node-csr-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: KUBELET_CLIENT_SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &csr)
        .await
        .map_err(JoinError::Request)?;
    let name = created.metadata.name.unwrap_or_default();
    info!(csr = %name, "certificate requested");
    let started = Instant::now();
    let cert = loop {
        let cur = api.get(&name).await.map_err(JoinError::Request)?;
        let status = cur.status.unwrap_or_default();
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(JoinError::Refused {
                name,
                how: c.type_.to_lowercase(),
                message: c.message.clone().unwrap_or_default(),
            });
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            break String::from_utf8_lossy(&cert.0).into_owned();
        }
        if started.elapsed() > cfg.timeout {
            return Err(JoinError::Timeout(name, cfg.timeout));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let user = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        STANDARD.encode(&cert),
        STANDARD.encode(key.serialize_pem())
    );
    write_private(
        &cfg.kubeconfig,
        kubeconfig_text(&cfg.server, &ca, &user).as_bytes(),
    )?;
    let ca_file = cfg.kubeconfig.with_file_name("ca.crt");
    write_private(&ca_file, ca.as_bytes())?;
    info!(kubeconfig = %cfg.kubeconfig.display(), ms = started.elapsed().as_millis() as u64, "joined: node certificate issued");
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), JoinError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what, p: &Path| {
        let path = p.to_path_buf();
        move |source| JoinError::Io { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(data).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_checked_for_form() {
        let h = "a".repeat(64);
        assert_eq!(expected_hash(&format!("sha256:{h}")).ok(), Some(h.clone()));
        assert_eq!(
            expected_hash(&format!("sha256:{}", h.to_uppercase())).ok(),
            Some(h.clone())
        );
        assert!(expected_hash(&h).is_err());
        assert!(expected_hash("sha256:abc").is_err());
    }

    #[test]
    fn ca_hash_is_of_the_public_key() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let a = p.self_signed(&key).expect("cert");
        // Re-issued with the same key: same hash, as kubeadm's pinning means.
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "other");
        let b = p.self_signed(&key).expect("cert");
        let ha = ca_hash(&a.pem()).expect("hash");
        assert_eq!(ha.len(), 64);
        assert_eq!(ha, ca_hash(&b.pem()).expect("hash"));
        let other = rcgen::KeyPair::generate().expect("key");
        assert_ne!(
            ha,
            ca_hash(&p.self_signed(&other).expect("cert").pem()).expect("hash")
        );
    }
}
