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

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::spec::{Attachment, CniError, Code, Result};

pub struct Store {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::new(Code::Io, what).with_details(e)
}

const TMP_PREFIX: &str = ".tmp-";
const ATTACHMENT_PREFIX: &str = "att-";
const HINT: &str = "last_reserved_ip";

fn record(a: &Attachment, ip: Ipv4Addr) -> String {
    skiff_cni_lib::attachments::record(&a.container_id, &a.ifname, ip)
}

fn parse_record(text: &str) -> Option<(Attachment, Ipv4Addr)> {
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
/// gateway (first address) and the broadcast address.
pub fn pool(subnet: Ipv4Network) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(subnet.network());
    let size = 1u64 << (32 - subnet.prefix() as u32);
    (2..size.saturating_sub(1)).map(move |i| Ipv4Addr::from(base + i as u32))
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

    fn attachment_path(&self, a: &Attachment) -> PathBuf {
        self.dir.join(format!(
            "{ATTACHMENT_PREFIX}{}-{}",
            a.container_id, a.ifname
        ))
    }

    /// The address the attachment holds.
    pub fn lookup(&self, a: &Attachment) -> Result<Option<Ipv4Addr>> {
        match fs::read_to_string(self.attachment_path(a)) {
            Ok(t) => Ok(parse_record(&t).filter(|(o, _)| o == a).map(|(_, ip)| ip)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading an allocation".into())(e)),
        }
    }

    /// Claims a free address of `subnet` for the attachment (or returns the
    /// one it already holds).
    pub fn allocate(&self, a: &Attachment, subnet: Ipv4Network) -> Result<Ipv4Addr> {
        if let Some(ip) = self.lookup(a)? {
            return Ok(ip);
        }
        let taken: HashSet<String> = fs::read_dir(&self.dir)
            .map_err(io(format!("listing {}", self.dir.display())))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let hint: Option<Ipv4Addr> = fs::read_to_string(self.dir.join(HINT))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let all: Vec<Ipv4Addr> = pool(subnet).collect();
        // Start after the last address handed out, as host-local does, so a
        // freed address is not reused at once.
        let start = hint
            .and_then(|h| all.iter().position(|&ip| ip == h))
            .map_or(0, |p| p + 1);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            a.container_id
        ));
        let result = self.claim(a, &all, start, &taken, &tmp);
        let _ = fs::remove_file(&tmp);
        result
    }

    fn claim(
        &self,
        a: &Attachment,
        all: &[Ipv4Addr],
        start: usize,
        taken: &HashSet<String>,
        tmp: &Path,
    ) -> Result<Ipv4Addr> {
        let n = all.len();
        for i in 0..n {
            let ip = all[(start + i) % n];
            let name = ip.to_string();
            if taken.contains(&name) {
                continue;
            }
            fs::write(tmp, record(a, ip)).map_err(io(format!("writing {}", tmp.display())))?;
            match fs::hard_link(tmp, self.dir.join(&name)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(format!("claiming {ip}"))(e)),
            }
            let att = self.attachment_path(a);
            match fs::hard_link(tmp, &att) {
                Ok(()) => {}
                // Only a concurrent ADD of the same attachment gets here;
                // give our claim back and keep the first.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(self.dir.join(&name));
                    return self.lookup(a)?.ok_or_else(|| {
                        CniError::new(Code::Io, "a concurrent ADD of the same attachment failed")
                    });
                }
                Err(e) => {
                    let _ = fs::remove_file(self.dir.join(&name));
                    return Err(io(format!("recording {ip}"))(e));
                }
            }
            let _ = fs::write(self.dir.join(HINT), name);
            return Ok(ip);
        }
        Err(CniError::new(
            Code::AddressesExhausted,
            format!(
                "no IP addresses available in {subnet}",
                subnet = subnet_of(all)
            ),
        ))
    }

    /// Frees what the attachment holds; nothing held is not an error.
    pub fn release(&self, a: &Attachment) -> Result<()> {
        let att = self.attachment_path(a);
        let ip = match fs::read_to_string(&att) {
            Ok(t) => parse_record(&t).map(|(_, ip)| ip),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading an allocation".into())(e)),
        };
        match ip {
            Some(ip) => self.remove_if_owned(ip, a)?,
            // A caller killed between the two links leaves only the
            // address's record: find it by owner.
            None => {
                for (ip, owner) in self.records()? {
                    if &owner == a {
                        self.remove_if_owned(ip, a)?;
                    }
                }
            }
        }
        match fs::remove_file(&att) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", att.display()))(e)),
        }
    }

    fn remove_if_owned(&self, ip: Ipv4Addr, a: &Attachment) -> Result<()> {
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
    pub fn records(&self) -> Result<Vec<(Ipv4Addr, Attachment)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)
            .map_err(io(format!("listing {}", self.dir.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<Ipv4Addr>().is_err() {
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
            } else if name.parse::<Ipv4Addr>().is_ok() || name.starts_with(ATTACHMENT_PREFIX) {
                match fs::read_to_string(&path)
                    .ok()
                    .as_deref()
                    .and_then(parse_record)
                {
                    Some((owner, _)) if valid.contains(&owner) => false,
                    Some((owner, _)) => {
                        if name.parse::<Ipv4Addr>().is_ok() {
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

    /// Whether any address is left (for STATUS).
    pub fn has_free(&self, subnet: Ipv4Network) -> Result<bool> {
        let used = self.records()?.len();
        Ok(pool(subnet).count() > used)
    }

    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.dir
    }
}

fn subnet_of(all: &[Ipv4Addr]) -> String {
    match (all.first(), all.last()) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "an empty range".into(),
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
        let p: Vec<_> = pool("10.0.0.0/29".parse().unwrap()).collect();
        assert_eq!(p.first(), Some(&Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(p.last(), Some(&Ipv4Addr::new(10, 0, 0, 6)));
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn allocate_release_exhaust_and_gc() {
        let (s, dir) = store();
        let net: Ipv4Network = "10.0.0.0/29".parse().unwrap();
        let ips: Vec<_> = (0..5)
            .map(|i| s.allocate(&att(&format!("c{i}")), net).unwrap())
            .collect();
        let unique: HashSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), 5);
        // The same attachment gets its address back.
        assert_eq!(s.allocate(&att("c0"), net).unwrap(), ips[0]);
        let e = s.allocate(&att("c9"), net).unwrap_err();
        assert_eq!(e.code, Code::AddressesExhausted);
        assert!(s.lookup(&att("c9")).unwrap().is_none());
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
