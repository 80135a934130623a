//! CertificateSigningRequests: reading the PKCS#10 request, deciding
//! whether a node's request may be approved without a person, and signing
//! an approved client certificate with the cluster CA.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;

use super::{BOOTSTRAPPERS, NODE_PREFIX, NODES};

/// Client certificates for kubelets (what `skiff-agent join` asks for).
pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// Client certificates for anyone (approved by a person).
pub const CLIENT: &str = "kubernetes.io/kube-apiserver-client";

/// The PEM text of a CSR's `spec.request` (base64 of PEM, as the API
/// carries bytes).
fn request_pem(request_b64: &str) -> Result<String, String> {
    let bytes = STANDARD
        .decode(request_b64.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "not PEM text".to_string())
}

/// The subject a request asks for: common name and organizations.
#[derive(Debug, PartialEq, Eq)]
pub struct Subject {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub has_sans: bool,
}

pub fn parse_request(request_b64: &str) -> Result<Subject, String> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let pem = request_pem(request_b64)?;
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("no CERTIFICATE REQUEST block: {e}"))?;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("not a PKCS#10 request: {e}"))?;
    req.verify_signature()
        .map_err(|e| format!("the request's signature does not verify: {e}"))?;
    let subject = &req.certification_request_info.subject;
    let common_name = subject
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let organizations = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    let has_sans = req.requested_extensions().into_iter().flatten().any(|e| {
        matches!(
            e,
            x509_parser::extensions::ParsedExtension::SubjectAlternativeName(_)
        )
    });
    Ok(Subject {
        common_name,
        organizations,
        has_sans,
    })
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether a CSR may be approved without a person, as upstream's
/// csrapproving controller does for kubelets: a node client certificate
/// (`system:node:<name>`, organization `system:nodes` only, client usages,
/// no alternative names) asked for by a bootstrap token, or renewed by
/// that node itself. The reason when not.
pub fn auto_approvable(csr: &Value) -> Result<(), String> {
    let spec = &csr["spec"];
    if spec.get("signerName").and_then(Value::as_str) != Some(KUBELET_CLIENT) {
        return Err(format!(
            "only {KUBELET_CLIENT} requests are approved automatically"
        ));
    }
    let subject = parse_request(
        spec.get("request")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    )?;
    let Some(node) = subject
        .common_name
        .strip_prefix(NODE_PREFIX)
        .filter(|n| !n.is_empty())
    else {
        return Err("the common name is not system:node:<name>".into());
    };
    if subject.organizations != [NODES] {
        return Err("the organization must be system:nodes alone".into());
    }
    if subject.has_sans {
        return Err("a node client certificate has no alternative names".into());
    }
    let usages = strings(spec.get("usages"));
    let allowed = ["digital signature", "key encipherment", "client auth"];
    if !usages.contains(&"client auth") || usages.iter().any(|u| !allowed.contains(u)) {
        return Err("usages must be client auth (with digital signature, key encipherment)".into());
    }
    let groups = strings(spec.get("groups"));
    let username = spec
        .get("username")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if groups.contains(&BOOTSTRAPPERS) || username == subject.common_name {
        Ok(())
    } else {
        Err(format!(
            "requested by {username:?}, neither a bootstrap token nor node {node:?}"
        ))
    }
}

/// Signs an approved client certificate request with the CA: the subject
/// the request names, client usages only, valid for `lifetime`.
pub fn sign(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    request_b64: &str,
    lifetime: Duration,
) -> Result<String, String> {
    let pem = request_pem(request_b64)?;
    let mut csr = CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| format!("reading the request: {e}"))?;
    let key = KeyPair::from_pem(ca_key_pem).map_err(|e| format!("the CA key: {e}"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key).map_err(|e| format!("the CA: {e}"))?;
    let p = &mut csr.params;
    // Only the subject comes from the request; the rest is the signer's.
    p.subject_alt_names.clear();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.custom_extensions.clear();
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::days(365));
    let cn = p.distinguished_name.get(&DnType::CommonName).cloned();
    if cn.is_none() {
        return Err("the request has no common name".into());
    }
    let cert = csr
        .signed_by(&issuer)
        .map_err(|e| format!("signing: {e}"))?;
    Ok(cert.pem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::CertificateParams;
    use serde_json::json;

    fn request(cn: &str, orgs: &[&str], sans: Vec<String>) -> String {
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            p.distinguished_name.push(DnType::OrganizationName, *o);
        }
        let key = KeyPair::generate().expect("key");
        let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
        STANDARD.encode(pem)
    }

    fn csr(req: String, username: &str, groups: &[&str]) -> Value {
        json!({"spec": {"request": req, "signerName": KUBELET_CLIENT, "usages": ["digital signature", "client auth"], "username": username, "groups": groups}})
    }

    #[test]
    fn node_requests_from_bootstrappers_are_approved() {
        let ok = request("system:node:n1", &[NODES], vec![]);
        assert_eq!(
            parse_request(&ok).expect("parse"),
            Subject {
                common_name: "system:node:n1".into(),
                organizations: vec![NODES.into()],
                has_sans: false
            }
        );
        assert!(
            auto_approvable(&csr(
                ok.clone(),
                "system:bootstrap:abcdef",
                &[BOOTSTRAPPERS]
            ))
            .is_ok()
        );
        assert!(
            auto_approvable(&csr(ok.clone(), "system:node:n1", &[NODES])).is_ok(),
            "renewal"
        );
        assert!(
            auto_approvable(&csr(ok, "system:node:n2", &[NODES])).is_err(),
            "another node"
        );
        let admin = request("system:node:n1", &[NODES, "system:masters"], vec![]);
        assert!(auto_approvable(&csr(admin, "system:bootstrap:abcdef", &[BOOTSTRAPPERS])).is_err());
        let user = request("alice", &[], vec![]);
        assert!(auto_approvable(&csr(user, "system:bootstrap:abcdef", &[BOOTSTRAPPERS])).is_err());
        let sans = request("system:node:n1", &[NODES], vec!["evil.example".into()]);
        assert!(auto_approvable(&csr(sans, "system:bootstrap:abcdef", &[BOOTSTRAPPERS])).is_err());
        assert!(parse_request("bm90IGEgY3Ny").is_err());
    }

    #[test]
    fn signing_keeps_the_subject_and_uses_client_usages() {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test-ca");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let req = request("system:node:n1", &[NODES], vec![]);
        let pem = sign(
            &ca_cert.pem(),
            &ca_key.serialize_pem(),
            &req,
            Duration::from_secs(3600),
        )
        .expect("sign");
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(cn, ["system:node:n1"]);
        let issuer: Vec<_> = cert
            .issuer()
            .iter_common_name()
            .filter_map(|c| c.as_str().ok())
            .collect();
        assert_eq!(issuer, ["test-ca"]);
        let eku = cert.extended_key_usage().expect("eku").expect("present");
        assert!(eku.value.client_auth && !eku.value.server_auth);
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 3600 + 300);
    }
}
