//! What each peer's lease becomes in this node's kernel, and keeping the
//! kernel that way.
//!
//! vxlan (Flannel's layout): for a peer's subnet 10.244.5.0/24 with VTEP MAC
//! M at public IP P,
//!   route `10.244.5.0/24 via 10.244.5.0 dev flannel.1 onlink`,
//!   neighbour `10.244.5.0 lladdr M dev flannel.1 permanent`,
//!   fdb `M dev flannel.1 dst P`.
//! host-gw: route `10.244.5.0/24 via P dev <underlay>`.
//! Dual stack (vxlan): the peer's IPv6 subnet fd00:10:244:5::/64 (paired with
//! its IPv4 lease) the same way through the same VTEP,
//!   route `fd00:10:244:5::/64 via fd00:10:244:5:: dev flannel.1 onlink`,
//!   neighbour `fd00:10:244:5:: lladdr M dev flannel.1 permanent`.
//!
//! Routes carry [`SKIFF_ROUTE_PROTOCOL`]; neighbour and FDB entries live on
//! the VTEP, which is ours alone. So a full resync can remove whatever no
//! lease explains, which is how a restart catches up on deletions it missed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

use ipnetwork::Ipv4Network;
use skiff_netlink::{Family, FdbEntry, Neighbour, Netlink, Route, SKIFF_ROUTE_PROTOCOL};
use tracing::{debug, warn};

use super::lease::Lease;
use super::network::{BackendType, NetworkConfig};

/// The kernel entries one lease stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub route: Option<Route>,
    pub neighbour: Option<Neighbour>,
    pub fdb: Option<FdbEntry>,
    /// Dual stack: the route and neighbour of the peer's IPv6 subnet.
    pub route6: Option<Route<Ipv6Addr>>,
    pub neighbour6: Option<Neighbour>,
}

#[derive(Clone)]
pub struct Dataplane {
    pub nl: Netlink,
    /// The network configuration: its backend, and on a dual-stack network
    /// each lease's IPv6 subnet.
    pub net: NetworkConfig,
    /// The VTEP (vxlan) or the underlay device (host-gw) routes go out of.
    pub route_dev: u32,
    pub own: Ipv4Network,
}

/// Counts of what a resync changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub added: usize,
    pub removed: usize,
}

/// What a lease becomes on a node of `backend` whose routes leave through
/// `route_dev` and which owns `own`.
pub fn entries(backend: BackendType, route_dev: u32, own: Ipv4Network, lease: &Lease) -> Entries {
    if lease.subnet == own {
        return Entries::default();
    }
    if lease.attrs.backend_type != backend.as_str() {
        warn!(subnet = %lease.subnet, theirs = %lease.attrs.backend_type, ours = backend.as_str(), "lease of another backend; not routed");
        return Entries::default();
    }
    let dst = lease.subnet.network();
    match backend {
        BackendType::Vxlan => {
            let Some(mac) = lease.attrs.vtep_mac() else {
                warn!(subnet = %lease.subnet, "vxlan lease without a VtepMAC; not routed");
                return Entries::default();
            };
            Entries {
                route: Some(Route {
                    dst,
                    prefix: lease.subnet.prefix(),
                    gateway: Some(dst),
                    oif: Some(route_dev),
                    onlink: true,
                    protocol: SKIFF_ROUTE_PROTOCOL,
                }),
                neighbour: Some(Neighbour {
                    ip: dst.into(),
                    mac,
                }),
                fdb: Some(FdbEntry {
                    mac,
                    dst: lease.attrs.public_ip,
                }),
                ..Entries::default()
            }
        }
        BackendType::HostGw => Entries {
            route: Some(Route {
                dst,
                prefix: lease.subnet.prefix(),
                gateway: Some(lease.attrs.public_ip),
                oif: Some(route_dev),
                onlink: false,
                protocol: SKIFF_ROUTE_PROTOCOL,
            }),
            ..Entries::default()
        },
    }
}

/// [`entries`], and the lease's IPv6 subnet on a dual-stack network.
/// vxlan: through the same VTEP, to the same MAC. host-gw: a route to the
/// peer's IPv6 underlay address (its `PublicIPv6`: a global address, or the
/// underlay link's link-local one, which is enough between neighbours).
pub fn entries_dual(
    net: &NetworkConfig,
    route_dev: u32,
    own: Ipv4Network,
    lease: &Lease,
) -> Entries {
    let mut e = entries(net.backend, route_dev, own, lease);
    let Some(peer6) = net.ipv6_subnet_for(lease.subnet, lease.ipv6_subnet) else {
        return e;
    };
    let gw6 = peer6.network();
    match (net.backend, &e.neighbour, &e.route) {
        (BackendType::Vxlan, Some(n), _) => {
            e.route6 = Some(Route {
                dst: gw6,
                prefix: peer6.prefix(),
                gateway: Some(gw6),
                oif: Some(route_dev),
                onlink: true,
                protocol: SKIFF_ROUTE_PROTOCOL,
            });
            e.neighbour6 = Some(Neighbour {
                ip: IpAddr::V6(gw6),
                mac: n.mac,
            });
        }
        (BackendType::HostGw, _, Some(_)) => match lease.attrs.public_ipv6() {
            Some(peer) => {
                e.route6 = Some(Route {
                    dst: gw6,
                    prefix: peer6.prefix(),
                    gateway: Some(peer),
                    oif: Some(route_dev),
                    onlink: false,
                    protocol: SKIFF_ROUTE_PROTOCOL,
                });
            }
            None => {
                warn!(subnet = %lease.subnet, "host-gw lease without a PublicIPv6; its IPv6 subnet is not routed");
            }
        },
        _ => {}
    }
    e
}

impl Dataplane {
    /// The entries for `lease` here: none for our own subnet or a lease of
    /// another backend.
    pub fn entries_for(&self, lease: &Lease) -> Entries {
        entries_dual(&self.net, self.route_dev, self.own, lease)
    }

    /// Installs the entries: FDB, then neighbour, then route, so that a
    /// packet that finds the route finds where to send it.
    pub async fn install(&self, e: &Entries) -> Result<(), skiff_netlink::Error> {
        if let Some(f) = &e.fdb {
            self.nl.replace_fdb(self.route_dev, f).await?;
        }
        for n in e.neighbour.iter().chain(&e.neighbour6) {
            self.nl.replace_neighbour(self.route_dev, n).await?;
        }
        if let Some(r) = &e.route {
            self.nl.replace_route(r).await?;
        }
        if let Some(r) = &e.route6 {
            self.nl.replace_route(r).await?;
        }
        Ok(())
    }

    /// Removes the entries (route first); what is already gone is fine.
    pub async fn remove(&self, e: &Entries) -> Result<(), skiff_netlink::Error> {
        if let Some(r) = &e.route {
            ignore_gone(self.nl.delete_route(r).await)?;
        }
        if let Some(r) = &e.route6 {
            ignore_gone(self.nl.delete_route(r).await)?;
        }
        for n in e.neighbour.iter().chain(&e.neighbour6) {
            ignore_gone(self.nl.delete_neighbour(self.route_dev, n).await)?;
        }
        if let Some(f) = &e.fdb {
            ignore_gone(self.nl.delete_fdb(self.route_dev, f).await)?;
        }
        Ok(())
    }

    /// Makes the kernel hold exactly the entries of `leases`: reads what is
    /// there, installs what is missing or different, removes what no lease
    /// explains.
    pub async fn resync<'a>(
        &self,
        leases: impl Iterator<Item = &'a Lease>,
    ) -> Result<Changed, skiff_netlink::Error> {
        let mut want_routes: BTreeMap<(std::net::Ipv4Addr, u8), Route> = BTreeMap::new();
        let mut want_routes6: BTreeMap<(Ipv6Addr, u8), Route<Ipv6Addr>> = BTreeMap::new();
        let mut want_neigh: HashMap<IpAddr, Neighbour> = HashMap::new();
        let mut want_fdb: HashSet<FdbEntry> = HashSet::new();
        for l in leases {
            let e = self.entries_for(l);
            if let Some(r) = e.route {
                want_routes.insert((r.dst, r.prefix), r);
            }
            if let Some(r) = e.route6 {
                want_routes6.insert((r.dst, r.prefix), r);
            }
            for n in e.neighbour.into_iter().chain(e.neighbour6) {
                want_neigh.insert(n.ip, n);
            }
            if let Some(f) = e.fdb {
                want_fdb.insert(f);
            }
        }
        let mut changed = Changed::default();
        let have_routes = self.nl.routes(Some(SKIFF_ROUTE_PROTOCOL)).await?;
        let have_routes6 = self.nl.routes6(Some(SKIFF_ROUTE_PROTOCOL)).await?;
        let (have_neigh, have_fdb) = if self.net.backend == BackendType::Vxlan {
            (
                self.nl.neighbours(self.route_dev).await?,
                self.nl.fdb(self.route_dev).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        // Removals first: a stale route must not outlive its lease.
        changed.removed += self.remove_stale(&have_routes, &want_routes).await?;
        changed.removed += self.remove_stale(&have_routes6, &want_routes6).await?;
        for n in &have_neigh {
            if want_neigh.get(&n.ip) != Some(n) {
                ignore_gone(self.nl.delete_neighbour(self.route_dev, n).await)?;
                changed.removed += 1;
            }
        }
        for f in &have_fdb {
            if !want_fdb.contains(f) {
                ignore_gone(self.nl.delete_fdb(self.route_dev, f).await)?;
                changed.removed += 1;
            }
        }
        let have_fdb: HashSet<FdbEntry> = have_fdb.into_iter().collect();
        for f in &want_fdb {
            if !have_fdb.contains(f) {
                self.nl.replace_fdb(self.route_dev, f).await?;
                changed.added += 1;
            }
        }
        let have_neigh: HashSet<Neighbour> = have_neigh.into_iter().collect();
        for n in want_neigh.values() {
            if !have_neigh.contains(n) {
                self.nl.replace_neighbour(self.route_dev, n).await?;
                changed.added += 1;
            }
        }
        changed.added += self.add_missing(have_routes, &want_routes).await;
        changed.added += self.add_missing(have_routes6, &want_routes6).await;
        Ok(changed)
    }

    /// Deletes the routes of `have` that `want` has no route to their
    /// destination for; how many.
    async fn remove_stale<A: Family + Ord + std::fmt::Debug>(
        &self,
        have: &[Route<A>],
        want: &BTreeMap<(A, u8), Route<A>>,
    ) -> Result<usize, skiff_netlink::Error> {
        let mut n = 0;
        for r in have {
            if !want.contains_key(&(r.dst, r.prefix)) {
                debug!(dst = %r.dst, prefix = r.prefix, "removing stale route");
                ignore_gone(self.nl.delete_route(r).await)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Installs the routes of `want` that `have` lacks (a route that cannot
    /// be installed is reported and the others go on); how many.
    async fn add_missing<A: Family + Hash + Eq + std::fmt::Debug>(
        &self,
        have: Vec<Route<A>>,
        want: &BTreeMap<(A, u8), Route<A>>,
    ) -> usize {
        let have: HashSet<Route<A>> = have.into_iter().collect();
        let mut n = 0;
        for r in want.values().filter(|r| !have.contains(r)) {
            // host-gw needs the peer on our L2 segment; say which lease
            // cannot be routed and go on with the others.
            match self.nl.replace_route(r).await {
                Ok(()) => n += 1,
                Err(e) => {
                    warn!(dst = %r.dst, gateway = ?r.gateway, error = %e, "cannot install route")
                }
            }
        }
        n
    }
}

/// A deletion of something already gone is what was wanted.
fn ignore_gone(r: Result<(), skiff_netlink::Error>) -> Result<(), skiff_netlink::Error> {
    match r {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::network::LeaseAttrs;

    fn lease(subnet: &str, ip: &str, kind: &str, mac: Option<&str>) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: kind.into(),
                backend_data: mac.map(|m| serde_json::json!({"VNI": 1, "VtepMAC": m})),
            },
            ipv6_subnet: None,
        }
    }

    #[test]
    fn a_vxlan_lease_is_a_route_a_neighbour_and_an_fdb_entry() {
        let own = "10.244.1.0/24".parse().unwrap();
        let l = lease(
            "10.244.5.0/24",
            "192.168.0.5",
            "vxlan",
            Some("0e:00:00:00:00:05"),
        );
        let e = entries(BackendType::Vxlan, 7, own, &l);
        let gw = "10.244.5.0".parse().unwrap();
        let r = e.route.unwrap();
        assert_eq!(
            (r.dst, r.prefix, r.gateway, r.oif, r.onlink),
            (gw, 24, Some(gw), Some(7), true)
        );
        assert_eq!(r.protocol, SKIFF_ROUTE_PROTOCOL);
        assert_eq!(
            e.neighbour.unwrap(),
            Neighbour {
                ip: std::net::IpAddr::V4(gw),
                mac: [0x0e, 0, 0, 0, 0, 5]
            }
        );
        assert!(e.route6.is_none() && e.neighbour6.is_none());
        // Dual stack: the paired IPv6 subnet through the same VTEP MAC.
        let net = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let d = entries_dual(&net, 7, own, &l);
        let r6 = d.route6.unwrap();
        assert_eq!(r6.dst.to_string(), "fd00:10:244:5::");
        assert_eq!((r6.prefix, r6.gateway, r6.onlink), (64, Some(r6.dst), true));
        assert_eq!(
            d.neighbour6,
            Some(Neighbour {
                ip: r6.dst.into(),
                mac: [0x0e, 0, 0, 0, 0, 5]
            })
        );
        assert_eq!(d.route, Some(r), "the IPv4 entries stay as they were");
        // A lease that names its IPv6 subnet (a Node's podCIDR) is routed
        // there, not to the paired one.
        let mut named = l.clone();
        named.ipv6_subnet = Some("fd00:10:244:77::/64".parse().unwrap());
        let r6 = entries_dual(&net, 7, own, &named).route6.unwrap();
        assert_eq!(r6.dst.to_string(), "fd00:10:244:77::");
        assert_eq!(
            e.fdb.unwrap().dst,
            "192.168.0.5".parse::<std::net::Ipv4Addr>().unwrap()
        );
        // Our own lease, a lease without a VTEP MAC and one of another
        // backend route nowhere.
        assert_eq!(
            entries(
                BackendType::Vxlan,
                7,
                own,
                &lease(
                    "10.244.1.0/24",
                    "192.168.0.1",
                    "vxlan",
                    Some("0e:00:00:00:00:01")
                )
            ),
            Entries::default()
        );
        assert_eq!(
            entries(
                BackendType::Vxlan,
                7,
                own,
                &lease("10.244.6.0/24", "192.168.0.6", "vxlan", None)
            ),
            Entries::default()
        );
        assert_eq!(
            entries(
                BackendType::Vxlan,
                7,
                own,
                &lease("10.244.6.0/24", "192.168.0.6", "host-gw", None)
            ),
            Entries::default()
        );
    }

    #[test]
    fn a_dual_stack_host_gw_lease_routes_ipv6_via_the_peers_ipv6_underlay_address() {
        let net = NetworkConfig::parse(
            br#"{"Network":"10.245.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:245::/56","Backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        let own = "10.245.1.0/24".parse().unwrap();
        let mut l = lease("10.245.3.0/24", "172.31.0.3", "host-gw", None);
        assert_eq!(entries_dual(&net, 2, own, &l).route6, None, "no PublicIPv6");
        l.attrs.public_ipv6 = Some("fe80::3".into());
        let e = entries_dual(&net, 2, own, &l);
        let r6 = e.route6.unwrap();
        assert_eq!(r6.dst.to_string(), "fd00:10:245:3::");
        assert_eq!(
            (r6.gateway, r6.oif),
            (Some("fe80::3".parse().unwrap()), Some(2))
        );
        assert!(e.neighbour6.is_none());
    }

    #[test]
    fn a_host_gw_lease_is_a_route_via_the_peer() {
        let own = "10.245.1.0/24".parse().unwrap();
        let e = entries(
            BackendType::HostGw,
            2,
            own,
            &lease("10.245.3.0/24", "172.31.0.3", "host-gw", None),
        );
        let r = e.route.unwrap();
        assert_eq!(r.gateway, Some("172.31.0.3".parse().unwrap()));
        assert!(!r.onlink);
        assert!(e.neighbour.is_none() && e.fdb.is_none());
    }
}
