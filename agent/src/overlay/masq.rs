//! IP masquerade for pod traffic leaving the cluster network (Flannel's
//! `--ip-masq`), as one nftables table replaced atomically with `nft -f`.
//!
//! Traffic between pods keeps its source (no NAT inside the cluster
//! network); pod traffic to anywhere else, multicast aside, leaves with the
//! node's address. A dual-stack network gets the same for IPv6, in an `ip6`
//! table of the same name.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::{Ipv4Network, Ipv6Network};

pub const TABLE: &str = "skiff-overlay";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rules: {0}")]
    Refused(String),
}

pub fn ruleset(network: Ipv4Network, network6: Option<Ipv6Network>) -> String {
    let mut r = table("ip", &network.to_string(), "224.0.0.0/4");
    if let Some(n6) = network6 {
        r += &table("ip6", &n6.to_string(), "ff00::/8");
    }
    r
}

/// One family's table (`ip` or `ip6`), replacing what was there: pods of
/// `network` keep their source towards each other and masquerade towards
/// anything else but `multicast`.
fn table(family: &str, network: &str, multicast: &str) -> String {
    drop_table(family)
        + &format!(
            "table {family} {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\t{family} saddr {network} {family} daddr {network} return\n\
         \t\t{family} saddr {network} {family} daddr != {multicast} masquerade fully-random\n\
         \t}}\n\
         }}\n"
        )
}

/// Removes the family's table, whether or not it is there.
fn drop_table(family: &str) -> String {
    format!("table {family} {TABLE} {{}}\ndelete table {family} {TABLE}\n")
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

pub fn install(network: Ipv4Network, network6: Option<Ipv6Network>) -> Result<(), MasqError> {
    nft(&ruleset(network, network6))?;
    if network6.is_none() {
        remove_ipv6();
    }
    Ok(())
}

pub fn remove() -> Result<(), MasqError> {
    nft(&drop_table("ip"))?;
    remove_ipv6();
    Ok(())
}

/// The IPv6 table of an earlier dual-stack run, if there is one (a host
/// without IPv6 nftables never had one: nothing to report).
fn remove_ipv6() {
    let _ = nft(&drop_table("ip6"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_to_pod_keeps_its_source() {
        let r = ruleset("10.244.0.0/16".parse().unwrap(), None);
        let ret = r.find("ip daddr 10.244.0.0/16 return").unwrap();
        let masq = r.find("masquerade").unwrap();
        assert!(ret < masq, "{r}");
        assert!(!r.contains("table ip6 skiff-overlay {\n"), "{r}");
        let r = ruleset(
            "10.244.0.0/16".parse().unwrap(),
            Some("fd00:10:244::/56".parse().unwrap()),
        );
        let ret6 = r.find("ip6 daddr fd00:10:244::/56 return").unwrap();
        let masq6 = r.rfind("masquerade").unwrap();
        assert!(ret6 < masq6, "{r}");
    }
}
