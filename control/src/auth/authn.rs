//! Authentication: the credential on a request → a [`User`].
//!
//! Client certificates are asked for but not required in the TLS
//! handshake, and checked here against the cluster CA, so that a
//! certificate from another CA (or an expired one) gets upstream's 401
//! rather than a failed handshake. The handshake still proves the client
//! holds the certificate's key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{User, bootstrap};
use crate::resources;
use crate::storage::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error("client certificate: {0}")]
    Certificate(String),
    #[error("bootstrap token: {0}")]
    Bootstrap(String),
    #[error("the token is not recognised")]
    UnknownToken,
    #[error("service account token: {0}")]
    ServiceAccount(String),
    #[error("the credential could not be checked: {0}")]
    Unavailable(String),
}

pub struct Authenticator {
    /// Static bearer tokens (the admin token).
    tokens: HashMap<String, User>,
    store: Store,
    client_ca: Arc<dyn ClientCertVerifier>,
    service_accounts: Option<Arc<super::serviceaccount::Tokens>>,
}

impl Authenticator {
    pub fn new(
        tokens: HashMap<String, User>,
        store: Store,
        ca_pem: &str,
        service_accounts: Option<Arc<super::serviceaccount::Tokens>>,
    ) -> Result<Self, String> {
        Ok(Self {
            tokens,
            store,
            client_ca: ca_verifier(ca_pem)?,
            service_accounts,
        })
    }

    /// The TLS side: ask for a client certificate, check only that the
    /// client holds its key; [`Self::certificate_user`] judges it.
    pub fn tls_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(RequestClientCert(self.client_ca.clone()))
    }

    /// The user a client certificate chain names: CN is the user, each O a
    /// group, if the chain leads to the cluster CA and is in date.
    pub fn certificate_user(&self, chain: &[CertificateDer<'_>]) -> Result<User, AuthnError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| AuthnError::Certificate("empty chain".into()))?;
        self.client_ca
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| AuthnError::Certificate(e.to_string()))?;
        subject_user(leaf).map_err(AuthnError::Certificate)
    }

    /// The user a bearer token stands for.
    pub async fn token_user(&self, token: &str) -> Result<User, AuthnError> {
        if let Some(user) = self.tokens.get(token) {
            return Ok(user.clone());
        }
        if let Some((id, secret)) = bootstrap::parse(token) {
            return self.bootstrap_user(id, secret).await;
        }
        if let Some(sa) = &self.service_accounts
            && super::serviceaccount::looks_like_jwt(token)
        {
            return sa
                .review(&self.store, token)
                .await
                .map_err(AuthnError::ServiceAccount);
        }
        Err(AuthnError::UnknownToken)
    }

    async fn bootstrap_user(&self, id: &str, secret: &str) -> Result<User, AuthnError> {
        let secrets = resources::find("", "v1", "secrets")
            .ok_or_else(|| AuthnError::Unavailable("no secrets resource".into()))?;
        let key = secrets.key(
            Some(bootstrap::NAMESPACE),
            &format!("{}{id}", bootstrap::SECRET_PREFIX),
        );
        let item = self
            .store
            .get(&key)
            .await
            .map_err(|e| AuthnError::Unavailable(e.to_string()))?
            .ok_or_else(|| AuthnError::Bootstrap(format!("no token with id {id}")))?;
        let obj: serde_json::Value = serde_json::from_slice(&item.value)
            .map_err(|e| AuthnError::Unavailable(e.to_string()))?;
        bootstrap::check(&obj, id, secret, SystemTime::now()).map_err(AuthnError::Bootstrap)
    }
}

/// The cluster CA as a client-certificate verifier.
fn ca_verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("the client CA: {e}"))
}

/// A certificate's subject as a user: CN the name, O the groups.
fn subject_user(der: &CertificateDer<'_>) -> Result<User, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .ok_or("the certificate has no common name")?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    Ok(User::authenticated(name, groups))
}

/// Asks for a client certificate without requiring one, and without
/// naming acceptable CAs (so clients send what they have, and a foreign
/// certificate is refused with a 401 by the authenticator).
#[derive(Debug)]
struct RequestClientCert(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn client_cert(cn: &str, orgs: &[&str]) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name.push(DnType::OrganizationName, *o);
        }
        let key = KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn subject_names_user_and_groups() {
        let der = client_cert("system:node:n1", &["system:nodes"]);
        let u = subject_user(&der).expect("user");
        assert_eq!(u.name, "system:node:n1");
        assert!(u.in_group("system:nodes") && u.in_group(super::super::AUTHENTICATED));
        assert!(subject_user(&client_cert("", &[])).is_err());
    }
}
