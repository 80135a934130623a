//! The commands: what ADD, DEL, CHECK, GC and STATUS do to the node.
//!
//! ADD wires one container: the node bridge (gateway = first address of the
//! node's subnet), a veth whose container end is created straight inside
//! the container's namespace as CNI_IFNAME, an address from [`ipam`], and a
//! route through the gateway. Every step that fails undoes the ones before
//! it, so a refused ADD changes nothing. A dual-stack node (an IPv6 subnet in
//! the subnet file or the configuration) gives each pod an IPv6 address and
//! route as well, through the bridge's IPv6 gateway.

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::Value;
use skiff_netlink::{Netlink, Route};

use crate::ipam::Store;
use crate::spec::{
    Attachment, CniError, CniResult, Code, Command, Env, Interface, IpConfig, NetConf, Result,
    RouteConfig,
};
use crate::subnet_env::SubnetEnv;

/// The host end of an attachment's veth.
pub fn host_veth_name(a: &Attachment) -> String {
    skiff_cni_lib::attachments::host_veth_name(&a.container_id, &a.ifname)
}

const HOST_VETH_PREFIX: &str = "skv";

/// The bridge's second link-local address on dual-stack nodes (one router
/// per bridge, so one address does for every node).
const BRIDGE_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The configuration's `field` (`s`): a CIDR of `family` whose prefix
/// leaves addresses for pods (at most `max_prefix`).
fn conf_subnet<N: std::str::FromStr>(
    field: &str,
    s: &str,
    family: &str,
    max_prefix: u8,
    prefix: impl Fn(&N) -> u8,
) -> Result<N>
where
    N::Err: std::fmt::Display,
{
    let n: N = s.parse().map_err(|e| {
        CniError::new(
            Code::InvalidConfig,
            format!("{field} {s:?} is not an {family} CIDR"),
        )
        .with_details(e)
    })?;
    if prefix(&n) > max_prefix {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("{field} {s}: a prefix longer than /{max_prefix} leaves no address for pods"),
        ));
    }
    Ok(n)
}

/// The node's subnet, MTU and cluster network: from the configuration's
/// `subnet` (and `ipv6Subnet`) or the overlay's subnet file.
fn node_subnet(conf: &NetConf) -> Result<SubnetEnv> {
    let mut env = match (&conf.subnet, &conf.ipv6_subnet) {
        (Some(s), six) => {
            let v4 = conf_subnet::<Ipv4Network>("subnet", s, "IPv4", 30, |n| n.prefix())?;
            let env = SubnetEnv::for_subnet(v4, v4, 1500, false);
            match six {
                None => env,
                Some(s6) => {
                    let v6 =
                        conf_subnet::<Ipv6Network>("ipv6Subnet", s6, "IPv6", 126, |n| n.prefix())?;
                    env.with_ipv6(v6, v6)
                }
            }
        }
        (None, Some(_)) => {
            return Err(CniError::new(
                Code::InvalidConfig,
                "ipv6Subnet is given without subnet: give both, or neither and the subnet file",
            ));
        }
        (None, None) => match SubnetEnv::read(conf.subnet_file.as_ref()) {
            Ok(e) => e,
            Err(crate::subnet_env::SubnetEnvError::Read { source, path })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                // The overlay writes it once the node's lease is taken; a
                // pod started before that should be retried, not failed.
                return Err(CniError::new(
                    Code::TryAgainLater,
                    format!("{path} does not exist yet: the node's subnet is not leased"),
                ));
            }
            Err(e) => return Err(CniError::new(Code::InvalidConfig, e.to_string())),
        },
    };
    if let Some(m) = conf.mtu {
        env.mtu = m;
    }
    Ok(env)
}

fn mac_string(mac: Option<[u8; 6]>) -> String {
    mac.map(|m| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
    .unwrap_or_default()
}

fn open_netns(path: &str) -> Result<File> {
    File::open(path).map_err(|e| {
        CniError::new(
            Code::UnknownContainer,
            format!("network namespace {path} cannot be opened"),
        )
        .with_details(e)
    })
}

pub async fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(crate::spec::version_reply(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    match env.command {
        Command::Add => add(env, &conf, &attachment).await.map(Some),
        Command::Del => del(env, &conf, &attachment).await.map(|()| None),
        Command::Check => check(env, &conf, &attachment).await.map(|()| None),
        Command::Gc => gc(&conf).await.map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Version => Ok(None),
    }
}

async fn add(env: &Env, conf: &NetConf, a: &Attachment) -> Result<Value> {
    let subnet = node_subnet(conf)?;
    let netns_path = env.netns.as_deref().unwrap_or_default();
    let netns = open_netns(netns_path)?;
    let host = Netlink::open()?;
    let pod = Netlink::open_in(netns_path)?;
    if pod.link(&env.ifname).await?.is_some() {
        return Err(CniError::new(
            Code::InterfaceExists,
            format!("{} already exists in {netns_path}", env.ifname),
        ));
    }
    let store = Store::open(&conf.data_dir, &conf.name)?;
    // A dual-stack allocation that fails half way gives back the half.
    let ips = allocate(&store, a, &subnet).inspect_err(|_| {
        let _ = store.release(a);
    })?;
    match wire(env, conf, a, &subnet, ips, &host, &pod, &netns).await {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = host.delete_link_named(&host_veth_name(a)).await;
            let _ = store.release(a);
            Err(e)
        }
    }
}

/// The pod's addresses: IPv4, and IPv6 on a dual-stack node.
struct PodIps {
    v4: Ipv4Addr,
    v6: Option<Ipv6Addr>,
}

fn allocate(store: &Store, a: &Attachment, subnet: &SubnetEnv) -> Result<PodIps> {
    let v4 = match store.allocate(a, IpNetwork::V4(subnet.subnet_network()))? {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!("an IPv4 pool hands out IPv4 addresses"),
    };
    let v6 = match subnet.ipv6_subnet() {
        Some((_, net6)) => match store.allocate(a, IpNetwork::V6(net6))? {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => unreachable!("an IPv6 pool hands out IPv6 addresses"),
        },
        None => None,
    };
    Ok(PodIps { v4, v6 })
}

#[expect(
    clippy::too_many_arguments,
    reason = "one ADD's whole context, used once"
)]
async fn wire(
    env: &Env,
    conf: &NetConf,
    a: &Attachment,
    subnet: &SubnetEnv,
    ips: PodIps,
    host: &Netlink,
    pod: &Netlink,
    netns: &File,
) -> Result<Value> {
    let ip = ips.v4;
    let gw = subnet.gateway();
    let prefix = subnet.subnet.prefix();
    let v6 = ips.v6.zip(subnet.ipv6_subnet());
    let bridge = host.ensure_bridge(&conf.bridge, subnet.mtu).await?;
    let mut gateways = vec![(IpAddr::V4(gw), prefix)];
    if let Some((_, (gw6, net6))) = v6 {
        // The gateway, and a link-local address that is valid at once: the
        // node's neighbour solicitations towards pods (for traffic it
        // forwards, such as from other nodes) must come from a link-local
        // address, and the bridge's own one spends its first seconds in
        // duplicate address detection, dropping those pods' first packets.
        gateways.extend([
            (IpAddr::V6(gw6), net6.prefix()),
            (BRIDGE_LINK_LOCAL.into(), 64),
        ]);
    }
    host.ensure_addresses(bridge.index, &gateways).await?;
    let veth = host_veth_name(a);
    // A leftover from an ADD killed half-way for this same attachment.
    host.delete_link_named(&veth).await?;
    host.create_veth(&veth, &env.ifname, netns, subnet.mtu, Some(bridge.index))
        .await?;
    let inner = pod.need_link(&env.ifname).await?;
    pod.add_address(inner.index, ip, prefix).await?;
    if let Some((ip6, (_, net6))) = v6 {
        pod.add_address(inner.index, ip6, net6.prefix()).await?;
    }
    pod.set_up(inner.index).await?;
    let (dst, dst_prefix) = if conf.is_default_gateway {
        (Ipv4Addr::UNSPECIFIED, 0)
    } else {
        (subnet.network.network(), subnet.network.prefix())
    };
    pod.add_route(&Route {
        dst,
        prefix: dst_prefix,
        gateway: Some(gw),
        oif: Some(inner.index),
        onlink: false,
        protocol: 4, // RTPROT_STATIC, as `ip route add` marks it
    })
    .await?;
    let route6 = match v6 {
        Some((_, (gw6, _))) => {
            let (dst6, dst6_prefix) = match subnet.ipv6 {
                Some((net, _)) if !conf.is_default_gateway => (net.network(), net.prefix()),
                _ => (Ipv6Addr::UNSPECIFIED, 0),
            };
            pod.add_route(&Route {
                dst: dst6,
                prefix: dst6_prefix,
                gateway: Some(gw6),
                oif: Some(inner.index),
                onlink: false,
                protocol: 4,
            })
            .await?;
            Some((dst6, dst6_prefix, gw6))
        }
        None => None,
    };
    let host_link = host.need_link(&veth).await?;

    let mut result: CniResult = match &conf.prev_result {
        Some(prev) => serde_json::from_value(prev.clone()).map_err(|e| {
            CniError::new(Code::Decode, "prevResult is not a CNI result").with_details(e)
        })?,
        None => CniResult::default(),
    };
    result.cni_version = conf.cni_version.clone();
    let base = result.interfaces.len();
    result.interfaces.push(Interface {
        name: conf.bridge.clone(),
        mac: mac_string(bridge.mac),
        ..Default::default()
    });
    result.interfaces.push(Interface {
        name: veth,
        mac: mac_string(host_link.mac),
        ..Default::default()
    });
    result.interfaces.push(Interface {
        name: env.ifname.clone(),
        mac: mac_string(inner.mac),
        sandbox: env.netns.clone().unwrap_or_default(),
        mtu: conf.cni_version.starts_with("1.").then_some(subnet.mtu),
    });
    result.ips.push(IpConfig {
        version: conf.result_has_ip_version().then(|| "4".to_string()),
        address: format!("{ip}/{prefix}"),
        gateway: Some(gw.to_string()),
        interface: Some(base + 2),
    });
    if let Some((ip6, (gw6, net6))) = v6 {
        result.ips.push(IpConfig {
            version: conf.result_has_ip_version().then(|| "6".to_string()),
            address: format!("{ip6}/{}", net6.prefix()),
            gateway: Some(gw6.to_string()),
            interface: Some(base + 2),
        });
    }
    if let Some(dns) = &conf.dns {
        result.dns = dns.clone();
    }
    result.routes.push(RouteConfig {
        dst: format!("{dst}/{dst_prefix}"),
        gw: Some(gw.to_string()),
    });
    if let Some((dst6, dst6_prefix, gw6)) = route6 {
        result.routes.push(RouteConfig {
            dst: format!("{dst6}/{dst6_prefix}"),
            gw: Some(gw6.to_string()),
        });
    }
    serde_json::to_value(&result)
        .map_err(|e| CniError::new(Code::Io, "encoding the result").with_details(e))
}

/// Spec: "Plugins should generally complete a DEL action without error even
/// if some resources are missing", including the namespace.
async fn del(env: &Env, conf: &NetConf, a: &Attachment) -> Result<()> {
    let host = Netlink::open()?;
    // Deleting the host end takes the pod end with it: the pod's namespace
    // is entered only when the host end was already gone (an ADD that
    // stopped half way, or a retried DEL).
    let deleted = host.delete_link_named(&host_veth_name(a)).await?;
    if !deleted
        && let Some(path) = env.netns.as_deref()
        && File::open(path).is_ok()
        && let Ok(pod) = Netlink::open_in(path)
    {
        pod.delete_link_named(&env.ifname).await?;
    }
    Store::open(&conf.data_dir, &conf.name)?.release(a)
}

async fn check(env: &Env, conf: &NetConf, a: &Attachment) -> Result<()> {
    let failed = |what: String| CniError::new(Code::CheckFailed, what);
    let subnet = node_subnet(conf)?;
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let mut want: Vec<(IpAddr, u8)> = Vec::new();
    for (v6, prefix) in [
        (false, Some(subnet.subnet.prefix())),
        (true, subnet.ipv6_subnet().map(|(_, n)| n.prefix())),
    ] {
        let Some(prefix) = prefix else { continue };
        let ip = store.lookup(a, v6)?.ok_or_else(|| {
            failed(format!(
                "no IPv{} address is allocated to {} {}",
                if v6 { 6 } else { 4 },
                a.container_id,
                a.ifname
            ))
        })?;
        want.push((ip, prefix));
    }
    if let Some(prev) = &conf.prev_result {
        let listed = skiff_cni_lib::exec::all_ips(prev);
        if let Some((ip, _)) = want
            .iter()
            .find(|(ip, _)| !listed.contains(&ip.to_string()))
        {
            return Err(failed(format!("prevResult does not list {ip}")));
        }
    }
    let netns_path = env.netns.as_deref().unwrap_or_default();
    open_netns(netns_path)?;
    let pod = Netlink::open_in(netns_path)?;
    let inner = pod
        .link(&env.ifname)
        .await?
        .ok_or_else(|| failed(format!("{} is missing from {netns_path}", env.ifname)))?;
    let held = pod.all_addresses(inner.index).await?;
    if let Some((ip, _)) = want.iter().find(|w| !held.contains(w)) {
        return Err(failed(format!("{} does not hold {ip}", env.ifname)));
    }
    let gw = subnet.gateway();
    if !pod
        .routes(None)
        .await?
        .iter()
        .any(|r| r.gateway == Some(gw))
    {
        return Err(failed(format!("no route through {gw} in {netns_path}")));
    }
    if let Some((gw6, _)) = subnet.ipv6_subnet()
        && !pod
            .routes6(None)
            .await?
            .iter()
            .any(|r| r.gateway == Some(gw6))
    {
        return Err(failed(format!("no route through {gw6} in {netns_path}")));
    }
    let host = Netlink::open()?;
    let veth = host_veth_name(a);
    let bridge = host
        .link(&conf.bridge)
        .await?
        .ok_or_else(|| failed(format!("bridge {} is missing", conf.bridge)))?;
    match host.link(&veth).await? {
        Some(l) if l.controller == Some(bridge.index) && l.up => Ok(()),
        Some(_) => Err(failed(format!("{veth} is not up on {}", conf.bridge))),
        None => Err(failed(format!("{veth} is missing"))),
    }
}

/// Spec (GC): release everything not in `cni.dev/valid-attachments`, going
/// on past errors.
async fn gc(conf: &NetConf) -> Result<()> {
    let valid: HashSet<Attachment> = conf
        .valid_attachments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let ipam_result = store.gc(&valid);
    // Host veths of attachments that are gone (ADDs killed after creating
    // them): ours by name, on our bridge.
    let host = Netlink::open()?;
    let keep: HashSet<String> = valid.iter().map(host_veth_name).collect();
    let mut link_err = None;
    if let Some(bridge) = host.link(&conf.bridge).await? {
        for l in host.links().await? {
            if l.controller == Some(bridge.index)
                && l.name.starts_with(HOST_VETH_PREFIX)
                && !keep.contains(&l.name)
                && let Err(e) = host.delete_link(l.index).await
                && !e.is_not_found()
            {
                link_err.get_or_insert(e);
            }
        }
    }
    ipam_result?;
    match link_err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Spec (STATUS): succeed when an ADD would; else code 50.
fn status(conf: &NetConf) -> Result<()> {
    let subnet = node_subnet(conf).map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
    let store = Store::open(&conf.data_dir, &conf.name)?;
    let pools = [
        Some(IpNetwork::V4(subnet.subnet_network())),
        subnet.ipv6_subnet().map(|(_, n)| IpNetwork::V6(n)),
    ];
    for net in pools.into_iter().flatten() {
        if !store.has_free(net)? {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("no IP addresses available in {net}"),
            ));
        }
    }
    Ok(())
}
