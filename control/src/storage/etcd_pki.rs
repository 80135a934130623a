//! etcd's own trust material, laid out as kubeadm lays it out in a pki
//! directory: a CA of its own (`etcd/ca.crt`, `etcd/ca.key`), a server and
//! a peer certificate for the members (`etcd/server.*`, `etcd/peer.*`), the
//! control plane's client certificate (`apiserver-etcd-client.*`), and any
//! other client's (`etcd/<name>-client.*`). etcd runs accepting only
//! clients whose certificate that CA signed.

use std::path::{Path, PathBuf};

use rcgen::ExtendedKeyUsagePurpose;

use crate::pki::{Ca, Leaf, PkiError, io, write_private};

/// A client's view of an etcd behind mutual TLS: the CA to trust and the
/// certificate to show (etcd's `--trusted-ca-file`, `--cert-file` and
/// `--key-file` are the members' equivalents).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientFiles {
    /// The TLS settings an etcd client connects with.
    pub fn tls(&self) -> Result<etcd_client::TlsOptions, PkiError> {
        let read = |p: &Path| std::fs::read(p).map_err(io("read", p));
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?))
            .identity(etcd_client::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            )))
    }
}

/// Where [`ensure`] wrote what a member needs.
#[derive(Clone, Debug)]
pub struct MemberFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub peer_cert: PathBuf,
    pub peer_key: PathBuf,
    /// The control plane's client certificate.
    pub apiserver: ClientFiles,
}

impl MemberFiles {
    /// The TLS flags of an etcd member using these files.
    pub fn etcd_args(&self) -> Vec<String> {
        let f = |flag: &str, p: &Path| format!("--{flag}={}", p.display());
        vec![
            f("cert-file", &self.server_cert),
            f("key-file", &self.server_key),
            f("trusted-ca-file", &self.ca),
            "--client-cert-auth=true".into(),
            f("peer-cert-file", &self.peer_cert),
            f("peer-key-file", &self.peer_key),
            f("peer-trusted-ca-file", &self.ca),
            "--peer-client-cert-auth=true".into(),
        ]
    }
}

/// The names every member certificate is valid for, before the given ones.
const LOCAL_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

fn write_leaf(leaf: &Leaf, cert: &Path, key: &Path) -> Result<(), PkiError> {
    write_private(key, leaf.key_pem.as_bytes())?;
    write_private(cert, leaf.cert_pem.as_bytes())
}

/// Makes the etcd CA in `pki/etcd` unless it is there, and signs afresh the
/// member certificates (valid for loopback and `sans`), the control
/// plane's client certificate, and one client certificate per name in
/// `clients` (`etcd/<name>-client.crt`).
pub fn ensure(pki: &Path, sans: &[String], clients: &[String]) -> Result<MemberFiles, PkiError> {
    let dir = pki.join("etcd");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let ca_crt = dir.join("ca.crt");
    let ca = Ca::load_or_create(&ca_crt, &dir.join("ca.key"), "etcd-ca")?;
    let mut names: Vec<String> = LOCAL_SANS.iter().map(|s| s.to_string()).collect();
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let both = [
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let client = [ExtendedKeyUsagePurpose::ClientAuth];
    let files = MemberFiles {
        ca: ca_crt.clone(),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        peer_cert: dir.join("peer.crt"),
        peer_key: dir.join("peer.key"),
        apiserver: ClientFiles {
            ca: ca_crt.clone(),
            cert: pki.join("apiserver-etcd-client.crt"),
            key: pki.join("apiserver-etcd-client.key"),
        },
    };
    let server = ca.sign("etcd-server", None, &names, &both)?;
    write_leaf(&server, &files.server_cert, &files.server_key)?;
    let peer = ca.sign("etcd-peer", None, &names, &both)?;
    write_leaf(&peer, &files.peer_cert, &files.peer_key)?;
    let apiserver = ca.sign("kube-apiserver-etcd-client", None, &[], &client)?;
    write_leaf(&apiserver, &files.apiserver.cert, &files.apiserver.key)?;
    for name in clients {
        let leaf = ca.sign(&format!("{name}-etcd-client"), None, &[], &client)?;
        let c = client_files(pki, name);
        write_leaf(&leaf, &c.cert, &c.key)?;
    }
    Ok(files)
}

/// Where [`ensure`] writes the client certificate named `name`.
pub fn client_files(pki: &Path, name: &str) -> ClientFiles {
    let dir = pki.join("etcd");
    ClientFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join(format!("{name}-client.crt")),
        key: dir.join(format!("{name}-client.key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_kept_and_the_certificates_are_signed_again() {
        let dir = crate::testutil::TempDir::new("skiff-etcd-pki");
        let first = ensure(&dir.0, &["10.0.0.5".into()], &["overlay".into()]).expect("pki");
        let ca = std::fs::read_to_string(&first.ca).expect("ca");
        let server = std::fs::read_to_string(&first.server_cert).expect("server");
        let again = ensure(&dir.0, &[], &[]).expect("pki");
        assert_eq!(std::fs::read_to_string(&again.ca).expect("ca"), ca);
        assert_ne!(
            std::fs::read_to_string(&again.server_cert).expect("server"),
            server
        );
        let overlay = client_files(&dir.0, "overlay");
        assert!(overlay.cert.exists() && overlay.key.exists());
        assert!(first.apiserver.tls().is_ok());
    }
}
