//! What each peer's lease becomes in this node's kernel, and keeping the
//! kernel that way.
//!
//! vxlan (Flannel's layout): for a peer's subnet 10.244.5.0/24 with VTEP MAC
//! M at public IP P,
//!   route `10.244.5.0/24 via 10.244.5.0 dev flannel.1 onlink`,
//!   neighbour `10.244.5.0 lladdr M dev flannel.1 permanent`,
//!   fdb `M dev flannel.1 dst P`.
//! host-gw: route `10.244.5.0/24 via P dev <underlay>`.
//!
//! Routes carry [`SKIFF_ROUTE_PROTOCOL`]; neighbour and FDB entries live on
//! the VTEP, which is ours alone. So a full resync can remove whatever no
//! lease explains, which is how a restart catches up on deletions it missed.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnetwork::Ipv4Network;
use skiff_netlink::{FdbEntry, Neighbour, Netlink, Route, SKIFF_ROUTE_PROTOCOL};
use tracing::{debug, warn};

use super::lease::Lease;
use super::network::BackendType;

/// The kernel entries one lease stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub route: Option<Route>,
    pub neighbour: Option<Neighbour>,
    pub fdb: Option<FdbEntry>,
}

#[derive(Clone)]
pub struct Dataplane {
    pub nl: Netlink,
    pub backend: BackendType,
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

impl Dataplane {
    /// The entries for `lease` here: none for our own subnet or a lease of
    /// another backend.
    pub fn entries_for(&self, lease: &Lease) -> Entries {
        if lease.subnet == self.own {
            return Entries::default();
        }
        if lease.attrs.backend_type != self.backend.as_str() {
            warn!(subnet = %lease.subnet, theirs = %lease.attrs.backend_type, ours = self.backend.as_str(), "lease of another backend; not routed");
            return Entries::default();
        }
        let dst = lease.subnet.network();
        match self.backend {
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
                        oif: Some(self.route_dev),
                        onlink: true,
                        protocol: SKIFF_ROUTE_PROTOCOL,
                    }),
                    neighbour: Some(Neighbour { ip: dst, mac }),
                    fdb: Some(FdbEntry {
                        mac,
                        dst: lease.attrs.public_ip,
                    }),
                }
            }
            BackendType::HostGw => Entries {
                route: Some(Route {
                    dst,
                    prefix: lease.subnet.prefix(),
                    gateway: Some(lease.attrs.public_ip),
                    oif: Some(self.route_dev),
                    onlink: false,
                    protocol: SKIFF_ROUTE_PROTOCOL,
                }),
                neighbour: None,
                fdb: None,
            },
        }
    }

    /// Installs the entries: FDB, then neighbour, then route, so that a
    /// packet that finds the route finds where to send it.
    pub async fn install(&self, e: &Entries) -> Result<(), skiff_netlink::Error> {
        if let Some(f) = &e.fdb {
            self.nl.replace_fdb(self.route_dev, f).await?;
        }
        if let Some(n) = &e.neighbour {
            self.nl.replace_neighbour(self.route_dev, n).await?;
        }
        if let Some(r) = &e.route {
            self.nl.replace_route(r).await?;
        }
        Ok(())
    }

    /// Removes the entries (route first); what is already gone is fine.
    pub async fn remove(&self, e: &Entries) -> Result<(), skiff_netlink::Error> {
        let ok = |r: Result<(), skiff_netlink::Error>| match r {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        };
        if let Some(r) = &e.route {
            ok(self.nl.delete_route(r).await)?;
        }
        if let Some(n) = &e.neighbour {
            ok(self.nl.delete_neighbour(self.route_dev, n).await)?;
        }
        if let Some(f) = &e.fdb {
            ok(self.nl.delete_fdb(self.route_dev, f).await)?;
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
        let mut want_neigh: HashMap<std::net::Ipv4Addr, Neighbour> = HashMap::new();
        let mut want_fdb: HashSet<FdbEntry> = HashSet::new();
        for l in leases {
            let e = self.entries_for(l);
            if let Some(r) = e.route {
                want_routes.insert((r.dst, r.prefix), r);
            }
            if let Some(n) = e.neighbour {
                want_neigh.insert(n.ip, n);
            }
            if let Some(f) = e.fdb {
                want_fdb.insert(f);
            }
        }
        let mut changed = Changed::default();
        let have_routes = self.nl.routes(Some(SKIFF_ROUTE_PROTOCOL)).await?;
        let (have_neigh, have_fdb) = if self.backend == BackendType::Vxlan {
            (
                self.nl.neighbours(self.route_dev).await?,
                self.nl.fdb(self.route_dev).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        // Removals first: a stale route must not outlive its lease.
        for r in &have_routes {
            if !want_routes.contains_key(&(r.dst, r.prefix)) {
                debug!(dst = %r.dst, prefix = r.prefix, "removing stale route");
                self.ignore_gone(self.nl.delete_route(r).await)?;
                changed.removed += 1;
            }
        }
        for n in &have_neigh {
            if want_neigh.get(&n.ip) != Some(n) {
                self.ignore_gone(self.nl.delete_neighbour(self.route_dev, n).await)?;
                changed.removed += 1;
            }
        }
        for f in &have_fdb {
            if !want_fdb.contains(f) {
                self.ignore_gone(self.nl.delete_fdb(self.route_dev, f).await)?;
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
        let have_routes: HashSet<Route> = have_routes.into_iter().collect();
        for r in want_routes.values() {
            if !have_routes.contains(r) {
                if let Err(e) = self.nl.replace_route(r).await {
                    // host-gw needs the peer on our L2 segment; say which
                    // lease cannot be routed and go on with the others.
                    warn!(dst = %r.dst, gateway = ?r.gateway, error = %e, "cannot install route");
                    continue;
                }
                changed.added += 1;
            }
        }
        Ok(changed)
    }

    fn ignore_gone(&self, r: Result<(), skiff_netlink::Error>) -> Result<(), skiff_netlink::Error> {
        match r {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }
}
