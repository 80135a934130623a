//! How `skiff-cni` records what it wired, shared with the agent (whose
//! overlay fast path delivers to pods by their host-side veth): one file
//! per address (of either family) in `<dataDir>/<network>/`, named by the
//! address, holding the container ID, the interface name and the address;
//! the host end of the veth is named from the first two.

use std::net::IpAddr;
use std::path::Path;

/// The host end of an attachment's veth: derived from the attachment so
/// that DEL and GC find it without state (FNV-1a, 44 bits in hex).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("skv{:011x}", h >> 20)
}

/// An address record's text.
pub fn record(container_id: &str, ifname: &str, ip: IpAddr) -> String {
    format!("{container_id}\n{ifname}\n{ip}\n")
}

/// (container ID, interface name, address) of a record's text.
pub fn parse_record(text: &str) -> Option<(String, String, IpAddr)> {
    let mut l = text.lines();
    let container_id = l.next()?.to_string();
    let ifname = l.next()?.to_string();
    let ip = l.next()?.parse().ok()?;
    Some((container_id, ifname, ip))
}

/// Every recorded address in `dir` (`<dataDir>/<network>`), of either
/// family, with the name of its host-side veth.
pub fn host_veths(dir: &Path) -> std::io::Result<Vec<(IpAddr, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().parse::<IpAddr>().is_err() {
            continue;
        }
        if let Ok(t) = std::fs::read_to_string(e.path())
            && let Some((id, ifname, ip)) = parse_record(&t)
        {
            out.push((ip, host_veth_name(&id, &ifname)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_names_its_veth() {
        for ip in ["10.244.1.7", "fd00:10:244:1::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let text = record("abc", "eth0", ip);
            assert_eq!(parse_record(&text), Some(("abc".into(), "eth0".into(), ip)));
        }
        let name = host_veth_name("abc", "eth0");
        // A valid interface name, stable, and apart for another interface.
        assert!(name.starts_with("skv") && name.len() <= 15, "{name}");
        assert_eq!(name, host_veth_name("abc", "eth0"));
        assert_ne!(name, host_veth_name("abc", "eth1"));
        assert_eq!(parse_record("abc\neth0\n"), None);
    }
}
