//! ClusterIP and NodePort allocation.
//!
//! Each allocated value is a key of its own (`/registry/ranges/serviceips/
//! 10.96.0.12`, `/registry/ranges/servicenodeports/30080`) created in the
//! same etcd transaction as the Service that holds it and deleted in the
//! same transaction that deletes or changes the Service, so a value is
//! never handed out twice and never outlives its Service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::storage::store::{Store, StoreError};

pub const IP_PREFIX: &str = "/registry/ranges/serviceips/";
pub const PORT_PREFIX: &str = "/registry/ranges/servicenodeports/";

/// A service CIDR: IPv4 (`10.96.0.0/12`, prefix 8..=30) or IPv6
/// (`fd00:96::/108`, prefix 108..=124, at most 2^20 addresses as upstream
/// allows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    base: u128,
    pub len: u8,
    pub v6: bool,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse_within(s, 8..=30, 108..=124)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl Cidr {
    /// A pod network (`--cluster-cidr`): IPv4 prefix 8..=30, IPv6 8..=126.
    pub fn pod_network(s: &str) -> Result<Self, String> {
        Self::parse_within(s, 8..=30, 8..=126)
    }

    fn parse_within(
        s: &str,
        v4: std::ops::RangeInclusive<u8>,
        v6: std::ops::RangeInclusive<u8>,
    ) -> Result<Self, String> {
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected address/length"))?;
        let ip: IpAddr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let (bits, range) = match ip {
            IpAddr::V4(_) => (32u32, v4),
            IpAddr::V6(_) => (128u32, v6),
        };
        if !range.contains(&len) {
            return Err(format!(
                "{s:?}: prefix length must be {}..={}",
                range.start(),
                range.end()
            ));
        }
        let raw = match ip {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let mask = (u128::MAX >> (128 - bits)) & !((1u128 << (bits - u32::from(len))) - 1);
        Ok(Self {
            base: raw & mask,
            len,
            v6: ip.is_ipv6(),
        })
    }
    fn bits(&self) -> u32 {
        if self.v6 { 128 } else { 32 }
    }

    fn size(&self) -> u128 {
        1u128 << (self.bits() - u32::from(self.len))
    }

    /// `IPv4` or `IPv6`, as `spec.ipFamilies` names them.
    pub fn family(&self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        let raw = match (ip, self.v6) {
            (IpAddr::V4(a), false) => u128::from(u32::from(a)),
            (IpAddr::V6(a), true) => u128::from(a),
            _ => return None,
        };
        raw.checked_sub(self.base).filter(|o| *o < self.size())
    }

    /// The usable addresses: not the network or (IPv4) broadcast address.
    pub fn contains_usable(&self, ip: IpAddr) -> bool {
        self.offset(ip)
            .is_some_and(|off| off > 0 && off < self.size() - 1)
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.nth(0)
    }

    /// The first usable address, which belongs to the `kubernetes` Service.
    pub fn first(&self) -> IpAddr {
        self.nth(1)
    }

    /// The address `off` after the network's (no bound check).
    pub fn nth(&self, off: u128) -> IpAddr {
        let raw = self.base + off;
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(raw))
        } else {
            IpAddr::V4(Ipv4Addr::from(raw as u32))
        }
    }
}

/// `--service-cidr`: one CIDR, or two of different families.
pub fn parse_service_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let cidrs = s
        .split(',')
        .map(|c| c.trim().parse::<Cidr>())
        .collect::<Result<Vec<_>, _>>()?;
    match cidrs.as_slice() {
        [_] => Ok(cidrs),
        [a, b] if a.v6 != b.v6 => Ok(cidrs),
        [_, _] => Err(format!("{s:?}: two CIDRs must be of different families")),
        _ => Err(format!("{s:?}: one CIDR, or two (one IPv4, one IPv6)")),
    }
}

/// The family an address belongs to, as `spec.ipFamilies` names it.
pub fn family_of(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() { "IPv6" } else { "IPv4" }
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

/// The addresses allocated now, of every family (the create transaction
/// rechecks each one it takes).
pub async fn taken_ips(store: &Store) -> Result<std::collections::HashSet<String>, StoreError> {
    Ok(store
        .keys(IP_PREFIX)
        .await?
        .into_iter()
        .filter_map(|k| k.strip_prefix(IP_PREFIX).map(String::from))
        .collect())
}

/// Random addresses probed one by one before the whole range is read.
const PROBES: usize = 8;

/// The first addresses of a range, left to Services that ask for one by
/// address (kube-dns's, say) while dynamic ones are found above them, as
/// upstream's allocator does: 16 to 256, a sixteenth of the range.
fn static_band(cidr: Cidr) -> u128 {
    (cidr.size() / 16).clamp(16, 256)
}

/// A free address of `cidr` for a Service that names none: a few random
/// addresses above the static band, each checked with one read, and only
/// when those are all taken (a nearly full range) the whole set of
/// allocations read and scanned. The create transaction checks the
/// address again, so a race only costs a retry. Reading every allocation
/// for every create made creating N Services cost N² reads.
pub async fn pick_ip(store: &Store, cidr: Cidr) -> Result<Option<IpAddr>, StoreError> {
    let usable = cidr.size() - 2;
    let band = static_band(cidr);
    if usable > band {
        for _ in 0..PROBES {
            let ip = cidr.nth(1 + band + u128::from(random_u32()) % (usable - band));
            if store.get(&ip_key(&ip.to_string())).await?.is_none() {
                return Ok(Some(ip));
            }
        }
    }
    Ok(free_ip(cidr, &taken_ips(store).await?))
}

/// A free address of `cidr` not in `taken`, scanning from a random start.
pub fn free_ip(cidr: Cidr, taken: &std::collections::HashSet<String>) -> Option<IpAddr> {
    let usable = cidr.size() - 2;
    let start = u128::from(random_u32()) % usable;
    (0..usable).find_map(|i| {
        // Offset 1 (the first address) is left to the `kubernetes` Service.
        let ip = cidr.nth(2 + (start + i) % (usable - 1));
        (!taken.contains(&ip.to_string())).then_some(ip)
    })
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
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        assert_eq!(c.first(), v4(10, 96, 0, 1));
        assert!(c.contains_usable(v4(10, 111, 255, 254)));
        assert!(!c.contains_usable(v4(10, 111, 255, 255)));
        assert!(!c.contains_usable(v4(10, 96, 0, 0)));
        assert!(!c.contains_usable(v4(10, 112, 0, 1)));
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn the_static_band_is_a_sixteenth_within_16_and_256() {
        let band = |s: &str| static_band(s.parse().expect("cidr"));
        assert_eq!(band("10.96.0.0/12"), 256);
        assert_eq!(band("10.96.0.0/24"), 16);
        assert_eq!(band("10.96.0.0/20"), 256);
        assert_eq!(band("10.96.0.0/28"), 16);
    }

    #[test]
    fn ipv6_cidr_bounds() {
        let c: Cidr = "fd00:96::7/108".parse().expect("parses");
        assert_eq!(c.to_string(), "fd00:96::/108");
        assert_eq!((c.family(), c.size()), ("IPv6", 1 << 20));
        assert_eq!(c.first(), "fd00:96::1".parse::<IpAddr>().unwrap());
        assert!(c.contains_usable("fd00:96::f:fffe".parse().unwrap()));
        assert!(!c.contains_usable("fd00:96::10:0".parse().unwrap()));
        // Never an address of the other family.
        assert!(!c.contains_usable("10.96.0.1".parse().unwrap()));
        assert!("fd00:96::/64".parse::<Cidr>().is_err(), "too big");
    }
}
