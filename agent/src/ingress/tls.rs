//! HTTPS for the ingress role: the certificates of the Secrets that
//! Ingresses name in `spec.tls`, chosen at each handshake by the client's
//! server name (SNI).
//!
//! - A name is looked up exactly, then by the wildcard of its first label,
//!   then among entries without hosts; a name no entry covers (or a client
//!   that sends none) gets the node's own self-signed certificate, as
//!   ingress-nginx serves its "fake" one.
//! - The certificates live in the role's [`super::State`], which is
//!   swapped whole: a changed Secret is served from the next handshake on,
//!   while connections already made keep theirs.
//! - A Secret that is missing, not of type `kubernetes.io/tls`, or whose
//!   key does not match its certificate is left out (its hosts get the
//!   node's certificate) and named in a Warning Event on the Ingress.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Current;
use super::routes::{ByHost, Skipped, Tls, host_name};
use crate::pki::provider;

/// The type a TLS Secret must have.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// A Secret an Ingress names, as its watch has it.
#[derive(Clone, Debug)]
pub enum Loaded {
    /// Not listed yet: no warning until it is.
    Pending,
    Missing,
    Present(Arc<Secret>),
}

/// `namespace/name` of a Secret.
pub type SecretKey = (String, String);

/// The certificates by the names they are served for.
#[derive(Default)]
pub struct Certs(ByHost<Arc<CertifiedKey>>);

impl Certs {
    /// The certificate for server name `name`, if an entry covers it.
    pub fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        self.0.find(&host_name(name), true)
    }
}

/// Each Secret's certificate as last parsed, with the resourceVersion it
/// was parsed at.
pub type Parsed = HashMap<SecretKey, (String, Result<Arc<CertifiedKey>, String>)>;

/// The certificate and key of a `kubernetes.io/tls` Secret.
pub fn certified_key(secret: &Secret) -> Result<Arc<CertifiedKey>, String> {
    let name = format!(
        "secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    );
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != TLS_SECRET_TYPE {
        return Err(format!("{name} is of type {kind}, not {TLS_SECRET_TYPE}"));
    }
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.as_slice())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| format!("{name} has no {k}"))
    };
    let chain = CertificateDer::pem_slice_iter(field("tls.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{name}: tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{name}: tls.crt holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(field("tls.key")?)
        .map_err(|e| format!("{name}: tls.key: {e}"))?;
    let ck = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("{name}: the key does not fit the certificate: {e}"))?;
    Ok(Arc::new(ck))
}

/// The certificates of the TLS entries `tls` (oldest Ingress first, which
/// wins a name two entries give), from `secrets`; what cannot be served is
/// returned beside them. `parsed` keeps each Secret's certificate by its
/// resourceVersion, so that a rebuild parses only what changed.
pub fn certs(
    tls: &[Tls],
    secrets: &HashMap<SecretKey, Loaded>,
    parsed: &mut Parsed,
) -> (Certs, Vec<Skipped>) {
    let mut out = Certs::default();
    let mut skipped = Vec::new();
    let mut used = std::collections::HashSet::new();
    for t in tls {
        let key = (t.namespace.clone(), t.secret.clone());
        let ck = match secrets.get(&key) {
            None | Some(Loaded::Pending) => continue,
            Some(Loaded::Missing) => Err((
                "SecretNotFound",
                format!(
                    "secret {}/{} not found: its hosts get the node's own certificate",
                    t.namespace, t.secret
                ),
            )),
            Some(Loaded::Present(s)) => {
                let version = s.metadata.resource_version.clone().unwrap_or_default();
                let r = match parsed.get(&key) {
                    Some((v, r)) if *v == version => r.clone(),
                    _ => {
                        let r = certified_key(s);
                        parsed.insert(key.clone(), (version, r.clone()));
                        r
                    }
                };
                r.map_err(|why| ("InvalidCertificate", why))
            }
        };
        used.insert(key);
        let ck = match ck {
            Ok(ck) => ck,
            Err((reason, why)) => {
                let s = Skipped {
                    ingress: t.ingress.clone(),
                    reason,
                    why,
                };
                if !skipped.contains(&s) {
                    skipped.push(s);
                }
                continue;
            }
        };
        if t.hosts.is_empty() {
            out.0.entry(None, || ck.clone());
        }
        for h in &t.hosts {
            out.0.entry(Some(h), || ck.clone());
        }
    }
    parsed.retain(|k, _| used.contains(k));
    (out, skipped)
}

/// Chooses each handshake's certificate from the role's current state.
pub struct Resolver {
    pub state: Arc<Current>,
    /// The node's own, for names no entry covers.
    pub fallback: Arc<CertifiedKey>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ingress::tls::Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let state = self.state.get();
        Some(
            hello
                .server_name()
                .and_then(|n| state.certs.find(n).cloned())
                .unwrap_or_else(|| self.fallback.clone()),
        )
    }
}

/// The node's own certificate for `names`: what a name no Ingress covers
/// is served.
pub fn self_signed(names: Vec<String>) -> Result<Arc<CertifiedKey>, String> {
    let (cert, key) = crate::pki::self_signed(names, Some("Skiff Ingress Default Certificate"))
        .map_err(|e| e.to_string())?;
    CertifiedKey::from_der(vec![cert], key, &provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// The server configuration: certificates by SNI from `state`, HTTP/2 and
/// HTTP/1.1 offered by ALPN.
pub fn server_config(
    state: Arc<Current>,
    fallback: Arc<CertifiedKey>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { state, fallback }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, kind: &str, ck: Option<(&str, &str)>, version: &str) -> Loaded {
        let mut data = std::collections::BTreeMap::new();
        if let Some((crt, key)) = ck {
            data.insert("tls.crt".to_string(), k8s_openapi::ByteString(crt.into()));
            data.insert("tls.key".to_string(), k8s_openapi::ByteString(key.into()));
        }
        Loaded::Present(Arc::new(Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            type_: Some(kind.into()),
            data: Some(data),
            ..Default::default()
        }))
    }

    fn pem(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .and_then(|p| p.self_signed(&key))
                .expect("a certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn entry(ingress: &str, secret: &str, hosts: &[&str]) -> Tls {
        Tls {
            ingress: format!("shop/{ingress}"),
            namespace: "shop".into(),
            secret: secret.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn names_find_their_certificate_and_bad_secrets_are_named() {
        let (a_crt, a_key) = pem(&["a.example"]);
        let (w_crt, w_key) = pem(&["*.wild.example"]);
        let (o_crt, _) = pem(&["other"]);
        let secrets: HashMap<SecretKey, Loaded> = [
            (
                "a",
                secret("a", TLS_SECRET_TYPE, Some((&a_crt, &a_key)), "1"),
            ),
            (
                "w",
                secret("w", TLS_SECRET_TYPE, Some((&w_crt, &w_key)), "1"),
            ),
            (
                "opaque",
                secret("opaque", "Opaque", Some((&a_crt, &a_key)), "1"),
            ),
            (
                "mismatch",
                secret("mismatch", TLS_SECRET_TYPE, Some((&o_crt, &a_key)), "1"),
            ),
            ("gone", Loaded::Missing),
            ("later", Loaded::Pending),
        ]
        .into_iter()
        .map(|(n, l)| (("shop".to_string(), n.to_string()), l))
        .collect();
        let tls = [
            entry("one", "a", &["a.example"]),
            entry("one", "w", &["*.wild.example"]),
            entry("two", "w", &["a.example"]),
            entry("two", "opaque", &["b.example"]),
            entry("two", "mismatch", &["c.example"]),
            entry("three", "gone", &["d.example"]),
            entry("three", "later", &["e.example"]),
        ];
        let mut parsed = HashMap::new();
        let (certs, skipped) = certs(&tls, &secrets, &mut parsed);
        let a = certs.find("A.Example").expect("a.example is covered");
        let w = certs.find("x.wild.example").expect("the wildcard covers x");
        assert!(!Arc::ptr_eq(a, w), "the older entry keeps a.example");
        assert!(certs.find("x.y.wild.example").is_none(), "one label only");
        assert!(certs.find("b.example").is_none());
        let reasons: Vec<_> = skipped.iter().map(|s| (s.reason, s.why.as_str())).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].1.contains("of type Opaque"), "{reasons:?}");
        assert!(reasons[1].1.contains("does not fit"), "{reasons:?}");
        assert_eq!(reasons[2].0, "SecretNotFound");
        // Parsed once: a rebuild at the same version reuses it.
        let (again, _) = super::certs(&tls, &secrets, &mut parsed);
        assert!(Arc::ptr_eq(
            a,
            again.find("a.example").expect("still covered")
        ));
    }
}
