//! ClusterIP and NodePort allocation.
//!
//! Each allocated value is a key of its own (`/registry/ranges/serviceips/
//! 10.96.0.12`, `/registry/ranges/servicenodeports/30080`) created in the
//! same etcd transaction as the Service that holds it and deleted in the
//! same transaction that deletes or changes the Service, so a value is
//! never handed out twice and never outlives its Service.

use std::net::Ipv4Addr;

use crate::store::{Store, StoreError};

pub const IP_PREFIX: &str = "/registry/ranges/serviceips/";
pub const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// An IPv4 CIDR such as `10.96.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected a.b.c.d/len"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        if !(8..=30).contains(&len) {
            return Err(format!("{s:?}: prefix length must be 8..=30"));
        }
        let mask = u32::MAX << (32 - len);
        Ok(Self {
            base: Ipv4Addr::from(u32::from(ip) & mask),
            len,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

impl Cidr {
    fn size(&self) -> u32 {
        1u32 << (32 - self.len)
    }

    /// The usable addresses: not the network or broadcast address.
    pub fn contains_usable(&self, ip: Ipv4Addr) -> bool {
        let off = u32::from(ip).wrapping_sub(u32::from(self.base));
        off > 0 && off < self.size() - 1
    }

    /// The first usable address, which belongs to the `kubernetes` Service.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    fn nth(&self, off: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + off)
    }
}

pub fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

pub fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // A fixed start on failure is still correct, only less spread.
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b)
}

/// A free address, scanning from a random start; `taken` is what the store
/// holds now (the create transaction rechecks).
pub async fn free_ip(
    store: &Store,
    cidr: Cidr,
    skip: &[String],
) -> Result<Option<Ipv4Addr>, StoreError> {
    let taken: std::collections::HashSet<String> = store
        .keys(IP_PREFIX)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(IP_PREFIX).map(String::from))
        .chain(skip.iter().cloned())
        .collect();
    let usable = cidr.size() - 2;
    let start = random_u32() % usable;
    for i in 0..usable {
        // Offset 1 (the first address) is left to the `kubernetes` Service.
        let off = 2 + (start + i) % (usable - 1);
        let ip = cidr.nth(off);
        if !taken.contains(&ip.to_string()) {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

pub async fn free_port(
    store: &Store,
    range: (u16, u16),
    skip: &[i64],
) -> Result<Option<i64>, StoreError> {
    let taken: std::collections::HashSet<i64> = store
        .keys(PORT_PREFIX)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(PORT_PREFIX).and_then(|p| p.parse().ok()))
        .chain(skip.iter().copied())
        .collect();
    let span = u32::from(range.1 - range.0) + 1;
    let start = random_u32() % span;
    for i in 0..span {
        let port = i64::from(range.0) + i64::from((start + i) % span);
        if !taken.contains(&port) {
            return Ok(Some(port));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_bounds() {
        let c: Cidr = "10.96.0.7/12".parse().expect("parses");
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert_eq!(c.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(c.contains_usable(Ipv4Addr::new(10, 111, 255, 254)));
        assert!(!c.contains_usable(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!c.contains_usable(Ipv4Addr::new(10, 96, 0, 0)));
        assert!(!c.contains_usable(Ipv4Addr::new(10, 112, 0, 1)));
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }
}
