//! Links: find, create (bridge, veth, vxlan), set up, enslave, delete.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};

use crate::{Error, Netlink, Result, request};

/// What Skiff reads back about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    /// The bridge it is enslaved to.
    pub controller: Option<u32>,
    pub kind: Option<String>,
    /// For vxlan: the VNI, the local address and the underlay device.
    pub vxlan: Option<(u32, Option<Ipv4Addr>, Option<u32>)>,
}

/// A VXLAN device as the overlay wants it (Flannel's layout: no learning,
/// FDB and neighbour entries programmed from leases).
#[derive(Clone, Debug)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
    pub underlay_index: u32,
    pub port: u16,
    pub mtu: u32,
}

fn parse(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        controller: None,
        kind: None,
        vxlan: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&a);
                link.mac = Some(mac);
            }
            LinkAttribute::Controller(c) => link.controller = Some(c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            use netlink_packet_route::link::InfoVxlan;
                            let (mut id, mut local, mut dev) = (0, None, None);
                            for a in v {
                                match a {
                                    InfoVxlan::Id(i) => id = i,
                                    InfoVxlan::Local(l) => local = Some(l),
                                    InfoVxlan::Link(d) => dev = Some(d),
                                    _ => {}
                                }
                            }
                            link.vxlan = Some((id, local, dev));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

impl Netlink {
    /// The link named `name`, or `None` when there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.map(parse)),
            Err(source) => {
                let e = Error::Request {
                    what: format!("get link {name}"),
                    source,
                };
                if matches!(e.errno(), Some(libc::ENODEV)) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The link named `name`, or [`Error::NoLink`].
    pub async fn need_link(&self, name: &str) -> Result<Link> {
        self.link(name)
            .await?
            .ok_or_else(|| Error::NoLink(name.to_string()))
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(request("dump links"))?;
        Ok(msgs.into_iter().map(parse).collect())
    }

    /// A bridge named `name` with `mtu`, up; an existing one is kept.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<Link> {
        if let Some(l) = self.link(name).await? {
            if !l.up || l.mtu != mtu {
                self.set(
                    LinkUnspec::new_with_index(l.index).mtu(mtu).up().build(),
                    name,
                )
                .await?;
            }
            return self.need_link(name).await;
        }
        let msg = LinkBridge::new(name).mtu(mtu).up().build();
        match self.handle.link().add(msg).execute().await {
            Ok(()) => {}
            // Another ADD made it between our look and our create.
            Err(source) => {
                let e = Error::Request {
                    what: format!("create bridge {name}"),
                    source,
                };
                if !e.is_exists() {
                    return Err(e);
                }
            }
        }
        self.need_link(name).await
    }

    /// A veth pair: `host` here, `peer` created directly inside the network
    /// namespace open as `peer_netns` (so the peer never appears here and
    /// nothing is left to move). Both get `mtu`; `host` is enslaved to
    /// `controller` and set up.
    pub async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_netns: &std::fs::File,
        mtu: u32,
        controller: Option<u32>,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_string())
            .mtu(mtu)
            .append_extra_attribute(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()))
            .build();
        let mut b = LinkVeth::new(host, peer).mtu(mtu).up();
        b = b.set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
        if let Some(c) = controller {
            b = b.controller(c);
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(request(format!("create veth {host} (peer {peer})")))
    }

    /// A VXLAN device per `spec`. An existing device with the same VNI,
    /// local address and underlay is kept (so a restart does not change the
    /// VTEP MAC peers have programmed); a different one is replaced.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Link> {
        if let Some(l) = self.link(&spec.name).await? {
            let same = l.kind.as_deref() == Some("vxlan")
                && l.vxlan == Some((spec.vni, Some(spec.local), Some(spec.underlay_index)));
            if same {
                if l.mtu != spec.mtu || !l.up {
                    self.set(
                        LinkUnspec::new_with_index(l.index)
                            .mtu(spec.mtu)
                            .up()
                            .build(),
                        &spec.name,
                    )
                    .await?;
                }
                return self.need_link(&spec.name).await;
            }
            self.delete_link(l.index).await?;
        }
        let msg = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_index)
            .local(spec.local)
            .port(spec.port)
            .learning(false)
            .mtu(spec.mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(request(format!("create vxlan {}", spec.name)))?;
        self.need_link(&spec.name).await
    }

    /// Sets the link up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            &index.to_string(),
        )
        .await
    }

    async fn set(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(format!("set link {what}")))
    }

    /// Deletes the link (a veth takes its peer with it).
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(request(format!("delete link {index}")))
    }

    /// Deletes the link named `name`; `Ok(false)` when there was none.
    /// One request: the kernel looks the name up itself.
    pub async fn delete_link_named(&self, name: &str) -> Result<bool> {
        let mut req = self.handle.link().del(0);
        req.message_mut()
            .attributes
            .push(netlink_packet_route::link::LinkAttribute::IfName(
                name.to_string(),
            ));
        match req
            .execute()
            .await
            .map_err(request(format!("delete link {name}")))
        {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}
