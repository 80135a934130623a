//! IPv4 addresses and routes.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::RouteMessageBuilder;

use crate::{Netlink, Result, request};

/// An IPv4 route in the main table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    /// The gateway is on the link even though no address says so (VXLAN
    /// routes point at the peer's subnet address through the VTEP).
    pub onlink: bool,
    pub protocol: u8,
}

fn protocol(p: u8) -> RouteProtocol {
    RouteProtocol::from(p)
}

fn message(r: &Route) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst, r.prefix)
        .protocol(protocol(r.protocol))
        .table_id(RouteHeader::RT_TABLE_MAIN as u32);
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    } else {
        b = b.scope(RouteScope::Link);
    }
    if let Some(o) = r.oif {
        b = b.output_interface(o);
    }
    if r.onlink {
        b = b.onlink();
    }
    b.build()
}

fn parse(m: RouteMessage) -> Option<Route> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32);
    if table != RouteHeader::RT_TABLE_MAIN as u32 {
        return None;
    }
    let mut r = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(m.header.protocol),
    };
    for a in m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(g),
            RouteAttribute::Oif(o) => r.oif = Some(o),
            _ => {}
        }
    }
    Some(r)
}

impl Netlink {
    /// Adds `addr/prefix` to the link unless it is already there.
    pub async fn ensure_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        if self.addresses(index).await?.contains(&(addr, prefix)) {
            return Ok(());
        }
        self.add_address(index, addr, prefix).await
    }

    /// Adds `addr/prefix` to the link (fails if it is there).
    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(request(format!(
                "add address {addr}/{prefix} to link {index}"
            )))
    }

    /// The link's IPv4 addresses.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(request(format!("dump addresses of link {index}")))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some((v4, prefix)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Installs the route, replacing one to the same destination.
    pub async fn replace_route(&self, r: &Route) -> Result<()> {
        self.install_route(r, true).await
    }

    /// Adds the route (fails if one to the same destination exists).
    pub async fn add_route(&self, r: &Route) -> Result<()> {
        self.install_route(r, false).await
    }

    async fn install_route(&self, r: &Route, replace: bool) -> Result<()> {
        let mut req = self.handle.route().add(message(r));
        if replace {
            req = req.replace();
        }
        req.execute()
            .await
            .map_err(request(format!("install route {}/{}", r.dst, r.prefix)))
    }

    pub async fn delete_route(&self, r: &Route) -> Result<()> {
        self.handle
            .route()
            .del(message(r))
            .execute()
            .await
            .map_err(request(format!("delete route {}/{}", r.dst, r.prefix)))
    }

    /// IPv4 routes of the main table; only those with `protocol` when given.
    pub async fn routes(&self, protocol: Option<u8>) -> Result<Vec<Route>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(request("dump routes"))?;
        Ok(msgs
            .into_iter()
            .filter_map(parse)
            .filter(|r| protocol.is_none_or(|p| r.protocol == p))
            .collect())
    }
}
