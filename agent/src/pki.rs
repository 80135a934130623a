//! TLS material the agent's roles make for themselves: the crypto provider
//! they all use, and self-signed serving certificates (the kubelet's port,
//! the ingress role's certificate for names no Ingress covers).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The crypto provider every TLS endpoint of the agent uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `names` (DNS names or IP addresses), with
/// `common_name` when given, and its key.
pub fn self_signed(
    names: Vec<String>,
    common_name: Option<&str>,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names)?;
    if let Some(cn) = common_name {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    let cert = params.self_signed(&key)?;
    let der = PrivatePkcs8KeyDer::from(key.serialize_der());
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}
