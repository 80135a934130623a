//! IP masquerade for pod traffic leaving the cluster network (Flannel's
//! `--ip-masq`), as one nftables table replaced atomically with `nft -f`.
//!
//! Traffic between pods keeps its source (no NAT inside the cluster
//! network); pod traffic to anywhere else, multicast aside, leaves with the
//! node's address.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

pub const TABLE: &str = "skiff-overlay";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

pub fn ruleset(network: Ipv4Network) -> String {
    format!(
        "table ip {TABLE} {{}}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {network} ip daddr {network} return\n\
         \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(script: &str) -> Result<(), MasqError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(MasqError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MasqError::Spawn)?;
    if !out.status.success() {
        return Err(MasqError::Refused(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(())
}

pub fn install(network: Ipv4Network) -> Result<(), MasqError> {
    nft(&ruleset(network))
}

pub fn remove() -> Result<(), MasqError> {
    nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_to_pod_keeps_its_source() {
        let r = ruleset("10.244.0.0/16".parse().unwrap());
        let ret = r.find("ip daddr 10.244.0.0/16 return").unwrap();
        let masq = r.find("masquerade").unwrap();
        assert!(ret < masq, "{r}");
    }
}
