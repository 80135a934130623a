//! `/run/skiff/subnet.env`: the contract between the overlay, which writes
//! it once the node's subnet is leased and its routes are in place, and the
//! CNI plugin, which reads it on every call. Flannel's format, so tools that
//! read Flannel's file read ours.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The whole cluster network (FLANNEL_NETWORK).
    pub network: Ipv4Network,
    /// The node's subnet with the gateway as its address
    /// (FLANNEL_SUBNET=10.244.3.1/24).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
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

    /// A subnet.env for a node owning `subnet` (its network address form).
    pub fn for_subnet(network: Ipv4Network, subnet: Ipv4Network, mtu: u32, ipmasq: bool) -> Self {
        let first = Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1));
        Self {
            network,
            subnet: Ipv4Network::new(first, subnet.prefix()).unwrap_or(subnet),
            mtu,
            ipmasq,
        }
    }

    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        )
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
        let network = net("FLANNEL_NETWORK")?;
        let subnet = net("FLANNEL_SUBNET")?;
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
    }
}
