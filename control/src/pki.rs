//! The apiserver's trust material: a CA made on first start and kept in the
//! data directory, a serving certificate signed by it at every start, the
//! bearer tokens the apiserver accepts, and the admin kubeconfig.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("random: {0}")]
    Random(String),
    #[error("key: {0}")]
    Key(String),
}

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub admin_token: String,
    /// The client certificate the apiserver shows kubelets (container
    /// logs), signed by the CA like upstream's kubelet-client certificate.
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` through a temporary file and a rename, mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
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

pub fn random_hex(bytes: usize) -> Result<String, PkiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| PkiError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A CA kept in a certificate and key file pair, made on first use.
pub(crate) struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate signed by a [`Ca`], with its fresh key.
pub(crate) struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// Loads the CA in `crt` and `key`, or makes one named `common_name`
    /// when either file is missing.
    pub(crate) fn load_or_create(
        crt: &Path,
        key: &Path,
        common_name: &str,
    ) -> Result<Self, PkiError> {
        let pair = if key.exists() && crt.exists() {
            let pem = std::fs::read_to_string(key).map_err(io("read", key))?;
            KeyPair::from_pem(&pem)?
        } else {
            let pair = KeyPair::generate()?;
            let cert = ca_params(common_name)?.self_signed(&pair)?;
            write_private(key, pair.serialize_pem().as_bytes())?;
            write_private(crt, cert.pem().as_bytes())?;
            pair
        };
        let pem = std::fs::read_to_string(crt).map_err(io("read", crt))?;
        Ok(Self {
            pem,
            issuer: Issuer::new(ca_params(common_name)?, pair),
        })
    }

    /// Signs a certificate for `common_name` (in `organization`, if any),
    /// valid for the names and addresses in `sans`, for `usages`.
    pub(crate) fn sign(
        &self,
        common_name: &str,
        organization: Option<&str>,
        sans: &[String],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> Result<Leaf, PkiError> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.extended_key_usages = usages.to_vec();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Loads (or on first start creates) the CA and admin token in `dir`, and
/// signs a fresh serving certificate for `sans`.
pub fn load_or_create(dir: &Path, sans: &[String]) -> Result<Pki, PkiError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let ca = Ca::load_or_create(&dir.join("ca.crt"), &dir.join("ca.key"), "skiff-ca")?;
    let serving = ca.sign("skiff-apiserver", None, sans, &[])?;
    // The client certificate the apiserver shows kubelets.
    let client = ca.sign(
        "skiff-apiserver-kubelet-client",
        Some("system:masters"),
        &[],
        &[ExtendedKeyUsagePurpose::ClientAuth],
    )?;

    let token_path = dir.join("admin.token");
    let admin_token = match std::fs::read_to_string(&token_path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = random_hex(32)?;
            write_private(&token_path, t.as_bytes())?;
            t
        }
    };
    Ok(Pki {
        ca_pem: ca.pem,
        cert_pem: serving.cert_pem,
        key_pem: serving.key_pem,
        admin_token,
        kubelet_client_cert_pem: client.cert_pem,
        kubelet_client_key_pem: client.key_pem,
    })
}

/// The names a client may dial the apiserver by.
pub fn default_sans(extra: &[String], service_ip: Option<IpAddr>, listen: IpAddr) -> Vec<String> {
    let mut sans: Vec<String> = [
        "localhost",
        "127.0.0.1",
        "::1",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(ip) = service_ip {
        sans.push(ip.to_string());
    }
    if !listen.is_unspecified() {
        sans.push(listen.to_string());
    }
    for e in extra {
        if !sans.contains(e) {
            sans.push(e.clone());
        }
    }
    sans
}

/// A kubeconfig naming only the cluster (`kube-public/cluster-info`).
pub fn cluster_kubeconfig(server: &str, ca_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts: null\ncurrent-context: \"\"\nusers: null\npreferences: {{}}\n",
        ca = STANDARD.encode(ca_pem.as_bytes())
    )
}

/// An admin kubeconfig for `server` that trusts the CA and sends the token.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: skiff-admin\n  context:\n    cluster: skiff\n    user: admin\n    namespace: default\ncurrent-context: skiff-admin\nusers:\n- name: admin\n  user:\n    token: {token}\npreferences: {{}}\n",
        ca = STANDARD.encode(ca_pem.as_bytes())
    )
}

/// kubeadm's `--discovery-token-ca-cert-hash` of a CA: `sha256:` and the
/// hex SHA-256 of its SubjectPublicKeyInfo.
pub fn ca_cert_hash(ca_pem: &str) -> Result<String, PkiError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| PkiError::Key(format!("the CA certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Key(format!("the CA certificate: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}
