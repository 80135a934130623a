//! Neighbour (ARP, NDP) and bridge FDB entries, as a VXLAN overlay programs them:
//! the peer's gateway address resolves to its VTEP MAC, and that MAC is
//! sent to the peer's underlay address.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use crate::{Netlink, Result, request};

/// A neighbour entry of either family (ARP or NDP).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
}

fn mac_of(attrs: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(l);
            Some(m)
        }
        _ => None,
    })
}

fn dst_of(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(*d),
        // Bridge-family (FDB) messages carry the address undecoded.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
        _ => None,
    })
}

impl Netlink {
    /// A permanent neighbour entry `ip → mac` on the link.
    pub async fn replace_neighbour(&self, index: u32, n: &Neighbour) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, n.ip)
            .link_layer_address(&n.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request(format!(
                "replace neighbour {} on link {index}",
                n.ip
            )))
    }

    pub async fn delete_neighbour(&self, index: u32, n: &Neighbour) -> Result<()> {
        let family = if n.ip.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let m = entry(family, index, NeighbourFlags::empty(), None, n.ip);
        self.delete(m, format!("delete neighbour {} on link {index}", n.ip))
            .await
    }

    /// The link's permanent neighbour entries, IPv4 and IPv6.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>> {
        let mut all = self.dump(AddressFamily::Inet, index).await?;
        all.extend(self.dump(AddressFamily::Inet6, index).await?);
        Ok(all
            .into_iter()
            .filter(|m| m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => {
                        Some(IpAddr::V4(*d))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => {
                        Some(IpAddr::V6(*d))
                    }
                    _ => None,
                })?;
                Some(Neighbour {
                    ip,
                    mac: mac_of(&m.attributes)?,
                })
            })
            .collect())
    }

    /// An FDB entry on the VXLAN device: frames for `mac` go to `dst`.
    pub async fn replace_fdb(&self, index: u32, e: &FdbEntry) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &e.mac)
            .destination(IpAddr::V4(e.dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request(format!("replace fdb {:02x?} → {}", e.mac, e.dst)))
    }

    pub async fn delete_fdb(&self, index: u32, e: &FdbEntry) -> Result<()> {
        let m = entry(
            AddressFamily::Bridge,
            index,
            NeighbourFlags::Own,
            Some(e.mac),
            IpAddr::V4(e.dst),
        );
        self.delete(m, format!("delete fdb {:02x?} → {}", e.mac, e.dst))
            .await
    }

    /// The FDB entries with a remote destination on the link.
    pub async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>> {
        Ok(self
            .dump(AddressFamily::Bridge, index)
            .await?
            .into_iter()
            .filter_map(|m| {
                Some(FdbEntry {
                    mac: mac_of(&m.attributes)?,
                    dst: dst_of(&m.attributes)?,
                })
            })
            .collect())
    }

    async fn delete(&self, m: NeighbourMessage, what: String) -> Result<()> {
        self.handle
            .neighbours()
            .del(m)
            .execute()
            .await
            .map_err(request(what))
    }

    /// Every entry of `family` (Inet: ARP; Bridge: FDB) on the link.
    async fn dump(&self, family: AddressFamily, index: u32) -> Result<Vec<NeighbourMessage>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(request(format!("dump {family:?} neighbours")))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .collect())
    }
}

/// A neighbour message naming one entry, for deletion.
fn entry(
    family: AddressFamily,
    index: u32,
    flags: NeighbourFlags,
    mac: Option<[u8; 6]>,
    dst: IpAddr,
) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m.header.flags = flags;
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    m.attributes
        .push(NeighbourAttribute::Destination(match dst {
            IpAddr::V4(d) => NeighbourAddress::Inet(d),
            IpAddr::V6(d) => NeighbourAddress::Inet6(d),
        }));
    m
}
