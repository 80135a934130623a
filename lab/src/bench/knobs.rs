//! The vxlan knobs `bench net` measures one at a time: each is a change to
//! the nodes or to a pod's veth, made with the tools an operator would use
//! (ethtool, `ip link`, nft), and undone after its measurement so that the
//! next one starts from what Skiff ships.

use anyhow::{Context, Result, bail};
use skiff_tests::Netns;
use skiff_tests::overlay::{Node, Pod};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knob {
    /// GRO on both ends of every pod veth (veth then runs NAPI).
    VethGro,
    /// GRO on the nodes' underlay interface.
    UnderlayGro,
    /// GRO plus `rx-udp-gro-forwarding` on the underlay interface, so
    /// that tunnel packets are aggregated before decapsulation.
    UdpGroForwarding,
    /// The tunnel segmentation offloads off at every hop: shows what
    /// they are worth, since veth and the bridge have them on already.
    NoTunnelOffload,
    /// `nf_call_iptables` (and ip6tables, arptables) off on the pod
    /// bridge: br_netfilter stops handing bridged frames to netfilter.
    NoBridgeNetfilter,
    /// NOTRACK for the tunnel's UDP (port 8472) in the raw hooks.
    Notrack,
}

const TUNNEL_OFFLOADS: &[&str] = &["tx-udp_tnl-segmentation", "tx-udp_tnl-csum-segmentation"];
const NOTRACK_TABLE: &str = "skiff_bench_notrack";

impl Knob {
    pub const ALL: [Knob; 6] = [
        Knob::VethGro,
        Knob::UnderlayGro,
        Knob::UdpGroForwarding,
        Knob::NoTunnelOffload,
        Knob::NoBridgeNetfilter,
        Knob::Notrack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Knob::VethGro => "veth-gro",
            Knob::UnderlayGro => "underlay-gro",
            Knob::UdpGroForwarding => "udp-gro-forwarding",
            Knob::NoTunnelOffload => "no-tunnel-offload",
            Knob::NoBridgeNetfilter => "no-bridge-netfilter",
            Knob::Notrack => "notrack",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown knob {s:?} ({})", names.join(", "))
            })
    }

    /// Sets (or, with `on` false, clears) the node-wide part of the knob.
    pub fn node(self, node: &Node, on: bool) -> Result<()> {
        let ns = &node.ns;
        match self {
            Knob::VethGro => Ok(()),
            Knob::UnderlayGro => ethtool(ns, "eth0", &[("gro", on)]),
            Knob::UdpGroForwarding => {
                ethtool(ns, "eth0", &[("gro", on), ("rx-udp-gro-forwarding", on)])
            }
            Knob::NoTunnelOffload => {
                let set: Vec<_> = TUNNEL_OFFLOADS.iter().map(|f| (*f, !on)).collect();
                ethtool(ns, "eth0", &set)?;
                // The bridge's own features follow its ports'; the vxlan
                // device has the offloads fixed off (it is the encapsulator).
                ethtool(ns, "cni0", &set)
            }
            Knob::NoBridgeNetfilter => {
                let v = if on { "0" } else { "1" };
                run(
                    ns,
                    &[
                        "ip",
                        "link",
                        "set",
                        "cni0",
                        "type",
                        "bridge",
                        "nf_call_iptables",
                        v,
                        "nf_call_ip6tables",
                        v,
                        "nf_call_arptables",
                        v,
                    ],
                )
            }
            Knob::Notrack => {
                let script = if on {
                    format!(
                        "table inet {NOTRACK_TABLE} {{\n\
                         \tchain pre {{ type filter hook prerouting priority raw; udp dport 8472 notrack; }}\n\
                         \tchain out {{ type filter hook output priority raw; udp dport 8472 notrack; }}\n\
                         }}\n"
                    )
                } else {
                    format!("table inet {NOTRACK_TABLE} {{}}\ndelete table inet {NOTRACK_TABLE}\n")
                };
                let out = ns.exec_with_input(&["nft", "-f", "-"], script.as_bytes());
                if !out.status.success() {
                    bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(())
            }
        }
    }

    /// Sets the per-pod part of the knob on a fresh pod of `node`.
    pub fn pod(self, node: &Node, pod: &Pod, on: bool) -> Result<()> {
        match self {
            Knob::VethGro => {
                ethtool(&pod.ns, "eth0", &[("gro", on)])?;
                ethtool(&node.ns, &host_veth(pod)?, &[("gro", on)])
            }
            Knob::NoTunnelOffload => {
                let set: Vec<_> = TUNNEL_OFFLOADS.iter().map(|f| (*f, !on)).collect();
                ethtool(&pod.ns, "eth0", &set)?;
                ethtool(&node.ns, &host_veth(pod)?, &set)
            }
            _ => Ok(()),
        }
    }
}

/// The host end of a pod's veth, from the CNI result: the interface
/// without a sandbox that is not the bridge.
fn host_veth(pod: &Pod) -> Result<String> {
    pod.result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|n| *n != "cni0")
        .map(str::to_string)
        .context("the CNI result names no host veth")
}

fn ethtool(ns: &Netns, dev: &str, features: &[(&str, bool)]) -> Result<()> {
    let mut cmd = vec!["ethtool", "-K", dev];
    for (f, on) in features {
        cmd.push(f);
        cmd.push(if *on { "on" } else { "off" });
    }
    run(ns, &cmd)
}

fn run(ns: &Netns, cmd: &[&str]) -> Result<()> {
    let out = ns.exec_with_input(cmd, b"");
    if !out.status.success() {
        bail!(
            "{cmd:?} in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
