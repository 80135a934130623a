//! Addresses and routes, IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::RouteMessageBuilder;

use crate::{Netlink, Result, request};

/// A route in the main table, of one family: `Route` (IPv4) or
/// `Route<Ipv6Addr>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route<A = Ipv4Addr> {
    pub dst: A,
    pub prefix: u8,
    pub gateway: Option<A>,
    pub oif: Option<u32>,
    /// The gateway is on the link even though no address says so (VXLAN
    /// routes point at the peer's subnet address through the VTEP).
    pub onlink: bool,
    pub protocol: u8,
}

/// An address family a [`Route`] can be of.
pub trait Family: Copy + std::fmt::Display + Sized {
    const FAMILY: AddressFamily;
    const UNSPECIFIED: Self;
    fn message(r: &Route<Self>) -> RouteMessage;
    fn of(a: RouteAddress) -> Option<Self>;
}

macro_rules! family {
    ($t:ty, $af:ident, $variant:ident) => {
        impl Family for $t {
            const FAMILY: AddressFamily = AddressFamily::$af;
            const UNSPECIFIED: Self = <$t>::UNSPECIFIED;
            fn message(r: &Route<Self>) -> RouteMessage {
                let mut b = RouteMessageBuilder::<$t>::new()
                    .destination_prefix(r.dst, r.prefix)
                    .protocol(RouteProtocol::from(r.protocol))
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
            fn of(a: RouteAddress) -> Option<Self> {
                match a {
                    RouteAddress::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
family!(Ipv4Addr, Inet, Inet);
family!(Ipv6Addr, Inet6, Inet6);

fn parse<A: Family>(m: RouteMessage) -> Option<Route<A>> {
    if m.header.address_family != A::FAMILY {
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
        dst: A::UNSPECIFIED,
        prefix: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(m.header.protocol),
    };
    for a in m.attributes {
        match a {
            RouteAttribute::Destination(d) => r.dst = A::of(d).unwrap_or(r.dst),
            RouteAttribute::Gateway(g) => r.gateway = A::of(g),
            RouteAttribute::Oif(o) => r.oif = Some(o),
            _ => {}
        }
    }
    Some(r)
}

/// Where the kernel sends a packet to one address now (`ip route get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTo {
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
}

impl Netlink {
    /// The route the kernel picks for `dst` now, after policy rules, as
    /// `ip route get` asks it (one lookup, not a dump). None when that is
    /// not a unicast route (local, unreachable, blackhole, prohibit).
    pub async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = 32;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        let mut replies = self.handle.route().get(m).execute();
        let Some(r) = replies
            .try_next()
            .await
            .map_err(request(format!("route to {dst}")))?
        else {
            return Ok(None);
        };
        if r.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let mut to = RouteTo {
            oif: None,
            gateway: None,
        };
        for a in r.attributes {
            match a {
                RouteAttribute::Oif(o) => to.oif = Some(o),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => to.gateway = Some(g),
                _ => {}
            }
        }
        Ok(Some(to))
    }

    /// Adds each of `want` the link does not hold yet, from one dump of its
    /// addresses; one that appeared meanwhile (a concurrent caller) is fine.
    pub async fn ensure_addresses(&self, index: u32, want: &[(IpAddr, u8)]) -> Result<()> {
        let have = self.all_addresses(index).await?;
        for &(addr, prefix) in want.iter().filter(|w| !have.contains(w)) {
            match self.add_address(index, addr, prefix).await {
                Err(e) if !e.is_exists() => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Adds `addr/prefix` to the link (fails if it is there). An IPv6
    /// address is usable at once: no duplicate address detection, whose
    /// second or more of "tentative" would fail the first connects.
    pub async fn add_address(&self, index: u32, addr: impl Into<IpAddr>, prefix: u8) -> Result<()> {
        let addr = addr.into();
        let mut req = self.handle.address().add(index, addr, prefix);
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(request(format!(
            "add address {addr}/{prefix} to link {index}"
        )))
    }

    /// The link's IPv4 addresses.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        Ok(self
            .all_addresses(index)
            .await?
            .into_iter()
            .filter_map(|(a, p)| match a {
                IpAddr::V4(v4) => Some((v4, p)),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// The link's addresses of both families.
    pub async fn all_addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>> {
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
                    AddressAttribute::Address(ip) => Some((ip, prefix)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Installs the route, replacing one to the same destination.
    pub async fn replace_route<A: Family>(&self, r: &Route<A>) -> Result<()> {
        self.install_route(r, true).await
    }

    /// Adds the route (fails if one to the same destination exists).
    pub async fn add_route<A: Family>(&self, r: &Route<A>) -> Result<()> {
        self.install_route(r, false).await
    }

    async fn install_route<A: Family>(&self, r: &Route<A>, replace: bool) -> Result<()> {
        let mut req = self.handle.route().add(A::message(r));
        if replace {
            req = req.replace();
        }
        req.execute()
            .await
            .map_err(request(format!("install route {}/{}", r.dst, r.prefix)))
    }

    pub async fn delete_route<A: Family>(&self, r: &Route<A>) -> Result<()> {
        self.handle
            .route()
            .del(A::message(r))
            .execute()
            .await
            .map_err(request(format!("delete route {}/{}", r.dst, r.prefix)))
    }

    /// IPv4 routes of the main table; only those with `protocol` when given.
    pub async fn routes(&self, protocol: Option<u8>) -> Result<Vec<Route>> {
        self.routes_of(protocol).await
    }

    /// IPv6 routes of the main table, as [`Netlink::routes`].
    pub async fn routes6(&self, protocol: Option<u8>) -> Result<Vec<Route<Ipv6Addr>>> {
        self.routes_of(protocol).await
    }

    async fn routes_of<A: Family>(&self, protocol: Option<u8>) -> Result<Vec<Route<A>>> {
        let mut filter = RouteMessageBuilder::<IpAddr>::new().build();
        filter.header.address_family = A::FAMILY;
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
