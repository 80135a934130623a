//! Flannel's network configuration (`<prefix>/config`), its lease records
//! (`<prefix>/subnets/10.244.3.0-24`), and the subnet arithmetic between
//! them. Pure: no etcd, no kernel.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// Flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Flannel's VXLAN UDP port on Linux (not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// VXLAN over IPv4 adds 50 bytes (outer IP 20, UDP 8, VXLAN 8, inner
/// Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network config: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("network config: {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendType {
    Vxlan,
    HostGw,
}

impl BackendType {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendType::Vxlan => "vxlan",
            BackendType::HostGw => "host-gw",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawBackend {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    port: Option<u16>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    network: Option<String>,
    subnet_len: Option<u8>,
    subnet_min: Option<String>,
    subnet_max: Option<String>,
    backend: Option<RawBackend>,
    #[serde(rename = "EnableIPv6")]
    enable_ipv6: Option<bool>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<String>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
}

/// Dual stack: the cluster's IPv6 network and the length of each node's
/// IPv6 subnet. A node's IPv6 subnet follows from its IPv4 lease (the n-th
/// IPv4 subnet of `Network` pairs with the n-th IPv6 subnet of
/// `IPv6Network`), so a lease stays one key and every node knows every
/// peer's IPv6 subnet from the leases it already reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Config {
    pub network: Ipv6Network,
    pub subnet_len: u8,
}

/// The network configuration, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendType,
    pub vni: u32,
    pub port: u16,
    pub ipv6: Option<Ipv6Config>,
}

impl NetworkConfig {
    /// Parses `<prefix>/config` with Flannel's defaults: SubnetLen 24 (one
    /// bit longer than the network when that is /24 or smaller), backend
    /// vxlan with VNI 1 on port 8472.
    pub fn parse(json: &[u8]) -> Result<Self, NetworkError> {
        let raw: RawConfig = serde_json::from_slice(json)?;
        let invalid = |field, why: String| NetworkError::Invalid { field, why };
        let network: Ipv4Network = raw
            .network
            .ok_or_else(|| invalid("Network", "missing".into()))?
            .parse()
            .map_err(|e| invalid("Network", format!("{e}")))?;
        let network = Ipv4Network::new(network.network(), network.prefix())
            .map_err(|e| invalid("Network", e.to_string()))?;
        let subnet_len = raw.subnet_len.unwrap_or(if network.prefix() < 24 {
            24
        } else {
            network.prefix() + 1
        });
        if subnet_len <= network.prefix() || subnet_len > 30 {
            return Err(invalid(
                "SubnetLen",
                format!(
                    "{subnet_len} must be longer than the network's /{} and at most 30",
                    network.prefix()
                ),
            ));
        }
        let step = 1u32 << (32 - subnet_len as u32);
        let first = u32::from(network.network());
        let last = first + (((1u64 << (32 - network.prefix() as u32)) as u32).wrapping_sub(step));
        let bound = |field, v: Option<String>, default: u32| -> Result<Ipv4Addr, NetworkError> {
            match v {
                None => Ok(Ipv4Addr::from(default)),
                Some(s) => {
                    let ip: Ipv4Addr =
                        s.parse().map_err(|e| invalid(field, format!("{s}: {e}")))?;
                    if !network.contains(ip) || u32::from(ip) % step != 0 {
                        return Err(invalid(field, format!("{s} is not a subnet of {network}")));
                    }
                    Ok(ip)
                }
            }
        };
        // Flannel leaves out the network's first subnet by default (its
        // address ends in .0.0 and upsets tools); so do we.
        let subnet_min = bound("SubnetMin", raw.subnet_min, first + step)?;
        let subnet_max = bound("SubnetMax", raw.subnet_max, last)?;
        if subnet_min > subnet_max {
            return Err(invalid(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }
        let backend = raw.backend.unwrap_or(RawBackend {
            kind: None,
            vni: None,
            port: None,
        });
        let kind = match backend.kind.as_deref().unwrap_or("vxlan") {
            "vxlan" => BackendType::Vxlan,
            "host-gw" => BackendType::HostGw,
            other => {
                return Err(invalid(
                    "Backend.Type",
                    format!("{other:?} is not supported (vxlan, host-gw)"),
                ));
            }
        };
        let vni = backend.vni.unwrap_or(1);
        if vni == 0 || vni >= 1 << 24 {
            return Err(invalid("Backend.VNI", format!("{vni} is outside 1..2^24")));
        }
        let ipv6 = if raw.enable_ipv6.unwrap_or(false) {
            let net6: Ipv6Network = raw
                .ipv6_network
                .ok_or_else(|| invalid("IPv6Network", "missing while EnableIPv6 is true".into()))?
                .parse()
                .map_err(|e| invalid("IPv6Network", format!("{e}")))?;
            let net6 = Ipv6Network::new(net6.network(), net6.prefix())
                .map_err(|e| invalid("IPv6Network", e.to_string()))?;
            let len6 = raw.ipv6_subnet_len.unwrap_or(64);
            if len6 <= net6.prefix() || len6 > 126 {
                return Err(invalid(
                    "IPv6SubnetLen",
                    format!(
                        "{len6} must be longer than the IPv6 network's /{} and at most 126",
                        net6.prefix()
                    ),
                ));
            }
            // Every IPv4 subnet needs its IPv6 partner.
            if (len6 - net6.prefix()) < (subnet_len - network.prefix()) {
                return Err(invalid(
                    "IPv6SubnetLen",
                    format!(
                        "{net6} holds 2^{} subnets of /{len6}, fewer than the 2^{} /{subnet_len} subnets of {network}",
                        len6 - net6.prefix(),
                        subnet_len - network.prefix()
                    ),
                ));
            }
            Some(Ipv6Config {
                network: net6,
                subnet_len: len6,
            })
        } else {
            None
        };
        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend: kind,
            vni,
            port: backend.port.unwrap_or(DEFAULT_VXLAN_PORT),
            ipv6,
        })
    }

    /// On a dual-stack network, the IPv6 subnet of a node holding `v4`:
    /// the one its source `named` (a Node's IPv6 podCIDR), else the one
    /// paired with `v4`.
    pub fn ipv6_subnet_for(
        &self,
        v4: Ipv4Network,
        named: Option<Ipv6Network>,
    ) -> Option<Ipv6Network> {
        self.ipv6?;
        named.or_else(|| self.ipv6_subnet_of(v4))
    }

    /// The IPv6 subnet paired with the IPv4 subnet `v4`, when dual stack.
    pub fn ipv6_subnet_of(&self, v4: Ipv4Network) -> Option<Ipv6Network> {
        let v6 = self.ipv6?;
        if !self.network.contains(v4.network()) {
            return None;
        }
        let index = (u32::from(v4.network()) - u32::from(self.network.network()))
            >> (32 - self.subnet_len as u32);
        let base = u128::from(v6.network.network());
        let addr = base + ((index as u128) << (128 - v6.subnet_len as u32));
        Ipv6Network::new(Ipv6Addr::from(addr), v6.subnet_len).ok()
    }

    /// Every subnet a node may lease, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        let step = 1u32 << (32 - self.subnet_len as u32);
        let (lo, hi) = (u32::from(self.subnet_min), u32::from(self.subnet_max));
        (0..=(hi - lo) / step).filter_map(move |i| {
            Ipv4Network::new(Ipv4Addr::from(lo + i * step), self.subnet_len).ok()
        })
    }

    /// Whether `s` is a subnet this configuration hands out.
    pub fn owns(&self, s: &Ipv4Network) -> bool {
        s.prefix() == self.subnet_len
            && self.network.contains(s.network())
            && s.network() >= self.subnet_min
            && s.network() <= self.subnet_max
    }
}

/// `10.244.3.0/24` ↔ `10.244.3.0-24`, the last segment of a lease key.
pub fn subnet_key(s: &Ipv4Network) -> String {
    format!("{}-{}", s.network(), s.prefix())
}

pub fn parse_subnet_key(key: &str) -> Option<Ipv4Network> {
    let (ip, len) = key.rsplit('/').next()?.split_once('-')?;
    let n = Ipv4Network::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (n.network() == n.ip()).then_some(n)
}

/// Backend data of a VXLAN lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// A lease's value, in Flannel's field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
}

impl LeaseAttrs {
    /// The peer's IPv6 underlay address, when it published one.
    pub fn public_ipv6(&self) -> Option<Ipv6Addr> {
        self.public_ipv6.as_deref()?.parse().ok()
    }

    /// The peer's VTEP MAC, for a VXLAN lease.
    pub fn vtep_mac(&self) -> Option<[u8; 6]> {
        let data: VxlanData = serde_json::from_value(self.backend_data.clone()?).ok()?;
        parse_mac(&data.vtep_mac)
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannel_defaults_and_bounds() {
        let c = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        assert_eq!((c.subnet_len, c.vni, c.port), (24, 1, 8472));
        let subnets: Vec<_> = c.subnets().collect();
        assert_eq!(subnets.len(), 255);
        assert_eq!(subnets[0].to_string(), "10.244.1.0/24");
        assert_eq!(subnets[254].to_string(), "10.244.255.0/24");
        let hg = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.1.0.0","SubnetMax":"10.1.48.0","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(hg.backend, BackendType::HostGw);
        assert_eq!(hg.subnets().count(), 4);
        assert!(hg.owns(&"10.1.16.0/20".parse().unwrap()));
        assert!(!hg.owns(&"10.2.0.0/20".parse().unwrap()));
    }

    #[test]
    fn ipv6_subnets_pair_with_the_ipv4_leases() {
        let c = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let six = |s: &str| c.ipv6_subnet_of(s.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(six("10.244.3.0/24").as_deref(), Some("fd00:10:244:3::/64"));
        assert_eq!(
            six("10.244.255.0/24").as_deref(),
            Some("fd00:10:244:ff::/64")
        );
        assert_eq!(six("10.245.3.0/24"), None);
        let v4only = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(
            v4only.ipv6_subnet_of("10.244.3.0/24".parse().unwrap()),
            None
        );
        let err = |s: &str| NetworkConfig::parse(s.as_bytes()).unwrap_err().to_string();
        assert!(err(r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#).contains("IPv6Network"));
        assert!(
            err(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/60"}"#)
                .contains("IPv6SubnetLen"),
            "a /60 has 16 /64s for 256 /24s"
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |s: &str| NetworkConfig::parse(s.as_bytes()).unwrap_err().to_string();
        assert!(err(r#"{"SubnetLen":24}"#).contains("Network"));
        assert!(err(r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#).contains("SubnetLen"));
        assert!(
            err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#).contains("Backend.Type")
        );
        assert!(
            err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.3.7"}"#).contains("SubnetMin")
        );
    }

    #[test]
    fn lease_keys_and_values_use_flannels_layout() {
        let s: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(&s), "10.244.3.0-24");
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.244.3.0-24"),
            Some(s)
        );
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.244.3.7-24"),
            None
        );
        let v: LeaseAttrs = serde_json::from_str(
            r#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:11:22"}}"#,
        )
        .unwrap();
        assert_eq!(v.vtep_mac(), Some([0xaa, 0xbb, 0xcc, 0, 0x11, 0x22]));
        assert_eq!(
            format_mac(&[0xaa, 0xbb, 0xcc, 0, 0x11, 0x22]),
            "aa:bb:cc:00:11:22"
        );
    }
}
