//! Address allocation from the node's subnet, recorded on disk.
//!
//! One file per address, named by the address and holding the attachment
//! (container ID, interface) that owns it. A claim is a `link(2)` of a fully
//! written temporary file to the address's name: it either creates the name
//! or fails with EEXIST, so concurrent ADDs never share an address and no
//! lock is held. A second link, named by the attachment, finds the address
//! again on DEL without a scan. A caller killed at any point leaves either
//! nothing, a temporary file, or a complete record of an attachment that the
//! runtime does not know: GC removes the last two.
//!
//! Unlike host-local, whose records survive a crash with no way back, every
//! record here names its owner, so GC with the runtime's list of live
//! attachments frees exactly what leaked.
//!
//! A dual-stack attachment holds one address of each family, each with its
//! own attachment link and its own "last handed out" hint.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;

use crate::spec::{Attachment, CniError, Code, Result};

pub struct Store {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::new(Code::Io, what).with_details(e)
}

const TMP_PREFIX: &str = ".tmp-";
/// The attachment links: IPv4 (the name they had before dual stack) and
/// IPv6. The prefixes differ before the container ID starts, so no ID makes
/// one look like the other.
const ATTACHMENT_PREFIX: &str = "att-";
const ATTACHMENT6_PREFIX: &str = "att6-";
const HINT: &str = "last_reserved_ip";
const HINT6: &str = "last_reserved_ip6";
/// Addresses past the taken ones an allocation tries before it gives up:
/// room for as many concurrent ADDs claiming the same ones.
const CONCURRENT_SLACK: u128 = 1024;

fn record(a: &Attachment, ip: IpAddr) -> String {
    skiff_cni_lib::attachments::record(&a.container_id, &a.ifname, ip)
}

fn parse_record(text: &str) -> Option<(Attachment, IpAddr)> {
    let (container_id, ifname, ip) = skiff_cni_lib::attachments::parse_record(text)?;
    Some((
        Attachment {
            container_id,
            ifname,
        },
        ip,
    ))
}

/// Addresses ADD may hand out: the subnet without its network address, the
/// gateway (first address) and the last address (IPv4's broadcast; left
/// out of IPv6 subnets too, for symmetry). Indexed, not listed: an IPv6
/// /64 has 2^64 of them.
#[derive(Clone, Copy, Debug)]
pub struct Pool {
    base: u128,
    v6: bool,
    len: u128,
}

impl Pool {
    pub fn new(subnet: IpNetwork) -> Self {
        let (base, bits) = match subnet {
            IpNetwork::V4(n) => (u32::from(n.network()) as u128, 32),
            IpNetwork::V6(n) => (u128::from(n.network()), 128),
        };
        let host_bits = bits - subnet.prefix() as u32;
        let size = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        Self {
            base,
            v6: subnet.is_ipv6(),
            len: size.saturating_sub(3),
        }
    }

    pub fn len(&self) -> u128 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn at(&self, i: u128) -> IpAddr {
        let n = self.base + 2 + i;
        if self.v6 {
            IpAddr::V6(n.into())
        } else {
            IpAddr::V4((n as u32).into())
        }
    }

    /// The index of `ip` in the pool, if it is in it.
    pub fn index(&self, ip: IpAddr) -> Option<u128> {
        let n = match ip {
            IpAddr::V4(a) if !self.v6 => u32::from(a) as u128,
            IpAddr::V6(a) if self.v6 => u128::from(a),
            _ => return None,
        };
        n.checked_sub(self.base + 2).filter(|&i| i < self.len)
    }

    fn describe(&self) -> String {
        if self.is_empty() {
            "an empty range".into()
        } else {
            format!("{}-{}", self.at(0), self.at(self.len - 1))
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

impl Store {
    pub fn open(data_dir: &str, network: &str) -> Result<Self> {
        let dir = Path::new(data_dir).join(network);
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Self { dir })
    }

    fn attachment_path(&self, a: &Attachment, v6: bool) -> PathBuf {
        let prefix = if v6 {
            ATTACHMENT6_PREFIX
        } else {
            ATTACHMENT_PREFIX
        };
        self.dir
            .join(format!("{prefix}{}-{}", a.container_id, a.ifname))
    }

    /// The address of the family (`v6`) the attachment holds.
    pub fn lookup(&self, a: &Attachment, v6: bool) -> Result<Option<IpAddr>> {
        match fs::read_to_string(self.attachment_path(a, v6)) {
            Ok(t) => Ok(parse_record(&t)
                .filter(|(o, ip)| o == a && ip.is_ipv6() == v6)
                .map(|(_, ip)| ip)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading an allocation".into())(e)),
        }
    }

    /// Claims a free address of `subnet` for the attachment (or returns the
    /// one of that family it already holds).
    pub fn allocate(&self, a: &Attachment, subnet: IpNetwork) -> Result<IpAddr> {
        let v6 = subnet.is_ipv6();
        if let Some(ip) = self.lookup(a, v6)? {
            return Ok(ip);
        }
        let taken: HashSet<String> = fs::read_dir(&self.dir)
            .map_err(io(format!("listing {}", self.dir.display())))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let hint: Option<IpAddr> = fs::read_to_string(self.dir.join(if v6 { HINT6 } else { HINT }))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let pool = Pool::new(subnet);
        // Start after the last address handed out, as host-local does, so a
        // freed address is not reused at once.
        let start = hint.and_then(|h| pool.index(h)).map_or(0, |p| p + 1);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            a.container_id
        ));
        let result = self.claim(a, pool, start, &taken, &tmp);
        let _ = fs::remove_file(&tmp);
        result
    }

    fn claim(
        &self,
        a: &Attachment,
        pool: Pool,
        start: u128,
        taken: &HashSet<String>,
        tmp: &Path,
    ) -> Result<IpAddr> {
        let n = pool.len();
        let v6 = matches!(pool.at(0), IpAddr::V6(_));
        // Every address tried is either taken (listed before, or claimed by
        // a concurrent ADD since) or ours: past the taken ones plus one, a
        // big pool is not walked to its end.
        let tries = n.min(taken.len() as u128 + 1 + CONCURRENT_SLACK);
        let mut tried = 0u128;
        let mut i = 0u128;
        while i < n && tried < tries {
            let ip = pool.at((start % n.max(1) + i) % n);
            i += 1;
            let name = ip.to_string();
            if taken.contains(&name) {
                continue;
            }
            tried += 1;
            fs::write(tmp, record(a, ip)).map_err(io(format!("writing {}", tmp.display())))?;
            match fs::hard_link(tmp, self.dir.join(&name)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(format!("claiming {ip}"))(e)),
            }
            let att = self.attachment_path(a, v6);
            match fs::hard_link(tmp, &att) {
                Ok(()) => {}
                // Only a concurrent ADD of the same attachment gets here;
                // give our claim back and keep the first.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(self.dir.join(&name));
                    return self.lookup(a, v6)?.ok_or_else(|| {
                        CniError::new(Code::Io, "a concurrent ADD of the same attachment failed")
                    });
                }
                Err(e) => {
                    let _ = fs::remove_file(self.dir.join(&name));
                    return Err(io(format!("recording {ip}"))(e));
                }
            }
            let _ = fs::write(self.dir.join(if v6 { HINT6 } else { HINT }), name);
            return Ok(ip);
        }
        Err(CniError::new(
            Code::AddressesExhausted,
            format!("no IP addresses available in {}", pool.describe()),
        ))
    }

    /// Frees what the attachment holds, of both families; nothing held is
    /// not an error.
    pub fn release(&self, a: &Attachment) -> Result<()> {
        let mut held = Vec::new();
        for v6 in [false, true] {
            match fs::read_to_string(self.attachment_path(a, v6)) {
                Ok(t) => held.extend(parse_record(&t).map(|(_, ip)| ip)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("reading an allocation".into())(e)),
            }
        }
        if held.is_empty() {
            // A caller killed between the two links leaves only the
            // address's record: find it by owner. (GC frees the rarer half
            // of a dual-stack ADD killed there.)
            held.extend(
                self.records()?
                    .into_iter()
                    .filter(|(_, owner)| owner == a)
                    .map(|(ip, _)| ip),
            );
        }
        for ip in held {
            self.remove_if_owned(ip, a)?;
        }
        for v6 in [false, true] {
            let att = self.attachment_path(a, v6);
            match fs::remove_file(&att) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("removing {}", att.display()))(e)),
            }
        }
        Ok(())
    }

    fn remove_if_owned(&self, ip: IpAddr, a: &Attachment) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::read_to_string(&path) {
            Ok(t) if parse_record(&t).is_some_and(|(o, _)| &o == a) => fs::remove_file(&path)
                .or_else(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io(format!("removing {}", path.display()))),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Every recorded address and its owner.
    pub fn records(&self) -> Result<Vec<(IpAddr, Attachment)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)
            .map_err(io(format!("listing {}", self.dir.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<IpAddr>().is_err() {
                continue;
            }
            if let Ok(t) = fs::read_to_string(e.path())
                && let Some((owner, ip)) = parse_record(&t)
            {
                out.push((ip, owner));
            }
        }
        Ok(out)
    }

    /// Removes every record whose attachment is not in `valid`, and the
    /// temporary files of callers that are gone. Goes on past errors and
    /// returns the first.
    pub fn gc(&self, valid: &HashSet<Attachment>) -> Result<Vec<Attachment>> {
        let mut first_err = None;
        let mut freed = Vec::new();
        let entries: Vec<_> = fs::read_dir(&self.dir)
            .map_err(io(format!("listing {}", self.dir.display())))?
            .flatten()
            .collect();
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let stale = if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
                let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
                pid.is_none_or(|p| !pid_alive(p))
            } else if name.parse::<IpAddr>().is_ok()
                || name.starts_with(ATTACHMENT_PREFIX)
                || name.starts_with(ATTACHMENT6_PREFIX)
            {
                match fs::read_to_string(&path)
                    .ok()
                    .as_deref()
                    .and_then(parse_record)
                {
                    Some((owner, _)) if valid.contains(&owner) => false,
                    Some((owner, _)) => {
                        if name.parse::<IpAddr>().is_ok() && !freed.contains(&owner) {
                            freed.push(owner);
                        }
                        true
                    }
                    None => true,
                }
            } else {
                false
            };
            if stale
                && let Err(err) = fs::remove_file(&path)
                && err.kind() != ErrorKind::NotFound
                && first_err.is_none()
            {
                first_err = Some(io(format!("removing {}", path.display()))(err));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// Whether any address of `subnet`'s family is left (for STATUS).
    pub fn has_free(&self, subnet: IpNetwork) -> Result<bool> {
        let pool = Pool::new(subnet);
        let used = self
            .records()?
            .into_iter()
            .filter(|(ip, _)| pool.index(*ip).is_some())
            .count();
        Ok(pool.len() > used as u128)
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(c: &str) -> Attachment {
        Attachment {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn store() -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "skiff-ipam-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let s = Store::open(dir.to_str().unwrap(), "net").unwrap();
        (s, dir)
    }

    #[test]
    fn pool_leaves_out_network_gateway_and_broadcast() {
        let p = Pool::new("10.0.0.0/29".parse().unwrap());
        assert_eq!(p.len(), 5);
        assert_eq!(p.at(0).to_string(), "10.0.0.2");
        assert_eq!(p.at(4).to_string(), "10.0.0.6");
        assert_eq!(p.index("10.0.0.6".parse().unwrap()), Some(4));
        assert_eq!(p.index("10.0.0.7".parse().unwrap()), None);
        assert_eq!(p.index("fd00::2".parse().unwrap()), None);
        let p6 = Pool::new("fd00:10:244:3::/64".parse().unwrap());
        assert_eq!(p6.len(), (1u128 << 64) - 3);
        assert_eq!(p6.at(0).to_string(), "fd00:10:244:3::2");
        assert_eq!(
            p6.at(p6.len() - 1).to_string(),
            "fd00:10:244:3:ffff:ffff:ffff:fffe"
        );
        assert_eq!(p6.index("fd00:10:244:3::9".parse().unwrap()), Some(7));
    }

    #[test]
    fn a_dual_stack_attachment_holds_one_address_of_each_family() {
        let (s, dir) = store();
        let v4: IpNetwork = "10.0.0.0/29".parse().unwrap();
        let v6: IpNetwork = "fd00:1::/64".parse().unwrap();
        let a4 = s.allocate(&att("c0"), v4).unwrap();
        let a6 = s.allocate(&att("c0"), v6).unwrap();
        assert_eq!(a4.to_string(), "10.0.0.2");
        assert_eq!(a6.to_string(), "fd00:1::2");
        assert_eq!(s.allocate(&att("c0"), v6).unwrap(), a6, "kept on a retry");
        assert_eq!(s.lookup(&att("c0"), false).unwrap(), Some(a4));
        assert_eq!(s.lookup(&att("c0"), true).unwrap(), Some(a6));
        // Each family goes on from its own last address.
        assert_eq!(s.allocate(&att("c1"), v6).unwrap().to_string(), "fd00:1::3");
        assert_eq!(s.allocate(&att("c1"), v4).unwrap().to_string(), "10.0.0.3");
        assert!(s.has_free(v6).unwrap());
        s.release(&att("c0")).unwrap();
        assert_eq!(s.lookup(&att("c0"), true).unwrap(), None);
        assert_eq!(s.lookup(&att("c0"), false).unwrap(), None);
        let left: Vec<_> = s.records().unwrap().into_iter().map(|(_, a)| a).collect();
        assert_eq!(left, vec![att("c1"), att("c1")]);
        // GC frees both of a gone attachment's addresses, and names it once.
        let freed = s.gc(&HashSet::new()).unwrap();
        assert_eq!(freed, vec![att("c1")]);
        assert!(s.records().unwrap().is_empty());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn allocate_release_exhaust_and_gc() {
        let (s, dir) = store();
        let net: IpNetwork = "10.0.0.0/29".parse().unwrap();
        let ips: Vec<_> = (0..5)
            .map(|i| s.allocate(&att(&format!("c{i}")), net).unwrap())
            .collect();
        let unique: HashSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), 5);
        // The same attachment gets its address back.
        assert_eq!(s.allocate(&att("c0"), net).unwrap(), ips[0]);
        let e = s.allocate(&att("c9"), net).unwrap_err();
        assert_eq!(e.code, Code::AddressesExhausted);
        assert!(s.lookup(&att("c9"), false).unwrap().is_none());
        s.release(&att("c1")).unwrap();
        s.release(&att("c1")).unwrap();
        assert_eq!(s.allocate(&att("c9"), net).unwrap(), ips[1]);
        let valid: HashSet<_> = [att("c0"), att("c9")].into_iter().collect();
        let mut freed = s.gc(&valid).unwrap();
        freed.sort();
        assert_eq!(freed, vec![att("c2"), att("c3"), att("c4")]);
        let mut left: Vec<_> = s.records().unwrap().into_iter().map(|(_, a)| a).collect();
        left.sort();
        assert_eq!(left, vec![att("c0"), att("c9")]);
        let files = fs::read_dir(s.path()).unwrap().count();
        assert_eq!(files, 5, "two records, two attachment links, one hint");
        let _ = fs::remove_dir_all(dir);
    }
}
