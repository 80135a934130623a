//! kube-proxy's rule layouts, generated for the benchmark's baselines
//! (../shared/BENCHMARKING.md): the iptables chains loaded with one
//! `iptables-restore`, and the nftables verdict-map table loaded with one
//! `nft -f`. One TCP port per service, two endpoints each.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One service of the benchmark: its ClusterIP and endpoint addresses.
pub struct BenchService {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{i:016X}")
}

fn sep_chain(i: usize, e: usize) -> String {
    format!("KUBE-SEP-{i:014X}{e:02X}")
}

fn iptables_service(out: &mut String, i: usize, s: &BenchService) {
    let chain = svc_chain(i);
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport {} -j {chain}",
        s.vip, s.port
    );
    let k = s.endpoints.len();
    for (e, (ip, port)) in s.endpoints.iter().enumerate() {
        let sep = sep_chain(i, e);
        if e + 1 < k {
            let p = 1.0 / (k - e) as f64;
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"bench/svc-{i}:http -> {ip}:{port}\" -m statistic --mode random --probability {p:.11} -j {sep}"
            );
        } else {
            let _ = writeln!(
                out,
                "-A {chain} -m comment --comment \"bench/svc-{i}:http -> {ip}:{port}\" -j {sep}"
            );
        }
        let _ = writeln!(out, "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ");
        let _ = writeln!(
            out,
            "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{port}"
        );
    }
}

fn iptables_chains(out: &mut String, i: usize, s: &BenchService) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(i));
    for e in 0..s.endpoints.len() {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(i, e));
    }
}

/// The whole nat table as kube-proxy's iptables mode writes it.
pub fn iptables_restore(services: &[BenchService]) -> String {
    iptables_nat(services, None)
}

/// NodePorts of the benchmark's services: service `i` has `ports[i]`;
/// under externalTrafficPolicy Cluster (`masquerade`) the client's address
/// is masqueraded, under Local it is kept.
pub struct NodePorts<'a> {
    pub ports: &'a [u16],
    pub masquerade: bool,
}

/// As [`iptables_restore`], with each service also a NodePort:
/// `KUBE-NODEPORTS` (reached from the end of `KUBE-SERVICES` for local
/// destinations) jumps per port to `KUBE-EXT-*`, which marks for
/// masquerade and goes on to the service's chain.
pub fn iptables_nodeports(services: &[BenchService], node_ports: &NodePorts<'_>) -> String {
    iptables_nat(services, Some(node_ports))
}

fn ext_chain(i: usize) -> String {
    format!("KUBE-EXT-{i:016X}")
}

fn iptables_nat(services: &[BenchService], node_ports: Option<&NodePorts<'_>>) -> String {
    let mut out = String::with_capacity(services.len() * 600);
    out.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    for (i, s) in services.iter().enumerate() {
        iptables_chains(&mut out, i, s);
        if node_ports.is_some() {
            let _ = writeln!(out, ":{} - [0:0]", ext_chain(i));
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    out.push_str("-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n");
    for (i, s) in services.iter().enumerate() {
        iptables_service(&mut out, i, s);
    }
    out.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    if let Some(np) = node_ports {
        for (i, port) in np.ports.iter().enumerate().take(services.len()) {
            let ext = ext_chain(i);
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp --dport {port} -j {ext}"
            );
            if np.masquerade {
                let _ = writeln!(
                    out,
                    "-A {ext} -m comment --comment \"masquerade traffic for bench/svc-{i}:http external destinations\" -j KUBE-MARK-MASQ"
                );
            }
            let _ = writeln!(out, "-A {ext} -j {}", svc_chain(i));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// One more service, for `iptables-restore --noflush` (kube-proxy's
/// partial sync writes the new chains and the service's KUBE-SERVICES rule).
pub fn iptables_add_one(index: usize, s: &BenchService) -> String {
    let mut out = String::from("*nat\n");
    iptables_chains(&mut out, index, s);
    let mut rules = String::new();
    iptables_service(&mut rules, index, s);
    // Insert the KUBE-SERVICES rule at the top, as a new first match.
    for line in rules.lines() {
        if let Some(rest) = line.strip_prefix("-A KUBE-SERVICES ") {
            let _ = writeln!(out, "-I KUBE-SERVICES 1 {rest}");
        } else {
            let _ = writeln!(out, "{line}");
        }
    }
    out.push_str("COMMIT\n");
    out
}

fn nft_service_chains(out: &mut String, i: usize, s: &BenchService) {
    let k = s.endpoints.len();
    for (e, (ip, port)) in s.endpoints.iter().enumerate() {
        let _ = writeln!(
            out,
            "add chain ip kube-proxy endpoint-{i}-{e}\nadd rule ip kube-proxy endpoint-{i}-{e} ip saddr {ip} jump mark-for-masquerade\nadd rule ip kube-proxy endpoint-{i}-{e} meta l4proto tcp dnat to {ip}:{port}"
        );
    }
    let _ = writeln!(out, "add chain ip kube-proxy service-{i}");
    let arms: Vec<String> = (0..k)
        .map(|e| format!("{e} : goto endpoint-{i}-{e}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy service-{i} numgen random mod {k} vmap {{ {} }}",
        arms.join(", ")
    );
}

fn nft_element(i: usize, s: &BenchService) -> String {
    format!("{} . tcp . {} : goto service-{i}", s.vip, s.port)
}

/// kube-proxy's nftables mode: a verdict map keyed by address, protocol and
/// port, a chain per service picking an endpoint with numgen.
pub fn nft_script(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 500);
    out.push_str("add table ip kube-proxy\n");
    out.push_str("add chain ip kube-proxy mark-for-masquerade\nadd rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n");
    out.push_str("add chain ip kube-proxy masquerading { type nat hook postrouting priority 100; policy accept; }\n");
    out.push_str("add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n");
    out.push_str("add rule ip kube-proxy masquerading mark set mark xor 0x4000\n");
    out.push_str("add rule ip kube-proxy masquerading masquerade fully-random\n");
    out.push_str("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n");
    out.push_str("add chain ip kube-proxy services\n");
    out.push_str(
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
    );
    out.push_str("add chain ip kube-proxy nat-output { type nat hook output priority -100; policy accept; }\n");
    out.push_str("add rule ip kube-proxy nat-output jump services\n");
    out.push_str("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n");
    out.push_str("add rule ip kube-proxy nat-prerouting jump services\n");
    for (i, s) in services.iter().enumerate() {
        nft_service_chains(&mut out, i, s);
    }
    for chunk in services.iter().enumerate().collect::<Vec<_>>().chunks(1000) {
        let elems: Vec<String> = chunk.iter().map(|(i, s)| nft_element(*i, s)).collect();
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} }}",
            elems.join(", ")
        );
    }
    out
}

/// One more service for `nft -f`: its chains and its map element.
pub fn nft_add_one(index: usize, s: &BenchService) -> String {
    let mut out = String::new();
    nft_service_chains(&mut out, index, s);
    let _ = writeln!(
        out,
        "add element ip kube-proxy service-ips {{ {} }}",
        nft_element(index, s)
    );
    out
}
