//! `/run/skiff/subnet.env`: the contract between the overlay, which writes
//! it once the node's subnet is leased and its routes are in place, and the
//! CNI plugin, which reads it on every call. Flannel's format, so tools that
//! read Flannel's file read ours.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnetwork::{Ipv4Network, Ipv6Network};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole cluster network (FLANNEL_NETWORK).
    pub network: Ipv4Network,
    /// The node's subnet with the gateway as its address
    /// (FLANNEL_SUBNET=10.244.3.1/24).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
    /// Dual stack: the cluster's IPv6 network and the node's IPv6 subnet,
    /// gateway as address (FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET, as
    /// Flannel writes them).
    pub ipv6: Option<(Ipv6Network, Ipv6Network)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

impl SubnetEnv {
    /// The subnet's gateway: its first usable address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.ip()
    }

    /// The subnet itself (`10.244.3.0/24`).
    pub fn subnet_network(&self) -> Ipv4Network {
        Ipv4Network::new(self.subnet.network(), self.subnet.prefix()).unwrap_or(self.subnet)
    }

    /// The IPv6 subnet's gateway and the subnet itself, when dual stack.
    pub fn ipv6_subnet(&self) -> Option<(Ipv6Addr, Ipv6Network)> {
        self.ipv6.map(|(_, s)| {
            (
                s.ip(),
                Ipv6Network::new(s.network(), s.prefix()).unwrap_or(s),
            )
        })
    }

    /// A subnet.env for a node owning `subnet` (its network address form).
    pub fn for_subnet(network: Ipv4Network, subnet: Ipv4Network, mtu: u32, ipmasq: bool) -> Self {
        let first = Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1));
        Self {
            network,
            subnet: Ipv4Network::new(first, subnet.prefix()).unwrap_or(subnet),
            mtu,
            ipmasq,
            ipv6: None,
        }
    }

    /// Adds the node's IPv6 subnet (its network address form) of `network`.
    pub fn with_ipv6(mut self, network: Ipv6Network, subnet: Ipv6Network) -> Self {
        let first = Ipv6Addr::from(u128::from(subnet.network()).wrapping_add(1));
        self.ipv6 = Some((
            network,
            Ipv6Network::new(first, subnet.prefix()).unwrap_or(subnet),
        ));
        self
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\n",
            self.network, self.subnet
        );
        if let Some((net, sub)) = self.ipv6 {
            s += &format!("FLANNEL_IPV6_NETWORK={net}\nFLANNEL_IPV6_SUBNET={sub}\n");
        }
        s + &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, SubnetEnvError> {
        let invalid = |what: String| SubnetEnvError::Invalid {
            path: path.to_string(),
            what,
        };
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
                .ok_or_else(|| invalid(format!("{key} is missing")))
        };
        let net = |key: &str| -> Result<Ipv4Network, SubnetEnvError> {
            let v = get(key)?;
            v.parse().map_err(|e| invalid(format!("{key}={v}: {e}")))
        };
        let net6 = |key: &str| -> Result<Option<Ipv6Network>, SubnetEnvError> {
            match get(key) {
                Ok(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|e| invalid(format!("{key}={v}: {e}"))),
                Err(_) => Ok(None),
            }
        };
        let network = net("FLANNEL_NETWORK")?;
        let subnet = net("FLANNEL_SUBNET")?;
        let ipv6 = match (net6("FLANNEL_IPV6_NETWORK")?, net6("FLANNEL_IPV6_SUBNET")?) {
            (Some(n), Some(s)) => Some((n, s)),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET go together".into(),
                ));
            }
        };
        let mtu_s = get("FLANNEL_MTU")?;
        let mtu = mtu_s
            .parse()
            .map_err(|e| invalid(format!("FLANNEL_MTU={mtu_s}: {e}")))?;
        let ipmasq = get("FLANNEL_IPMASQ").map(|v| v == "true").unwrap_or(false);
        Ok(Self {
            network,
            subnet,
            mtu,
            ipmasq,
            ipv6,
        })
    }

    pub fn read(path: &Path) -> Result<Self, SubnetEnvError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Writes the file atomically: readers see the old file or the new one.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_flannels_format() {
        let s = SubnetEnv::for_subnet(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            1450,
            true,
        );
        assert_eq!(
            s.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&s.render(), "x").unwrap(), s);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(s.subnet_network().to_string(), "10.244.3.0/24");
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n", "x").is_err());
        assert_eq!(s.ipv6_subnet(), None);
    }

    #[test]
    fn carries_the_ipv6_subnet_under_flannels_names() {
        let s = SubnetEnv::for_subnet(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            1450,
            false,
        )
        .with_ipv6(
            "fd00:10:244::/56".parse().unwrap(),
            "fd00:10:244:3::/64".parse().unwrap(),
        );
        let text = s.render();
        assert!(
            text.contains(
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n"
            ),
            "{text}"
        );
        assert_eq!(SubnetEnv::parse(&text, "x").unwrap(), s);
        let (gw, subnet) = s.ipv6_subnet().unwrap();
        assert_eq!(gw.to_string(), "fd00:10:244:3::1");
        assert_eq!(subnet.to_string(), "fd00:10:244:3::/64");
        let half = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPV6_SUBNET=fd00::1/64\n";
        let e = SubnetEnv::parse(half, "x").unwrap_err().to_string();
        assert!(e.contains("FLANNEL_IPV6_NETWORK"), "{e}");
    }
}
