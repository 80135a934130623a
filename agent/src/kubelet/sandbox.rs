//! A pod's sandbox without a pause process: network, IPC and UTS
//! namespaces made by a short-lived thread and kept alive by bind mounts
//! under the pod's state directory, the network wired by the node's CNI
//! conflist (ADD with the pod's hostPorts as `portMappings`, DEL with the
//! ADD's result). The containers join these namespaces by path.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use skiff_cni_lib::exec::{Attachment, Conflist, ExecError, Runtime};

use super::spec::PodNamespaces;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("making the pod's namespaces in {dir}: {source}")]
    Namespaces {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI: {0}")]
    Cni(#[from] ExecError),
}

pub const IFNAME: &str = "eth0";

/// Where a pod's namespaces are pinned.
pub fn ns_dir(pod_dir: &Path) -> PathBuf {
    pod_dir.join("ns")
}

pub fn namespaces(pod_dir: &Path) -> PodNamespaces {
    let d = ns_dir(pod_dir);
    let p = |n: &str| d.join(n).display().to_string();
    PodNamespaces {
        net: p("net"),
        ipc: p("ipc"),
        uts: p("uts"),
    }
}

/// Makes the pod's namespaces (idempotent: kept ones are reused), with
/// `hostname` in the UTS namespace and loopback up.
pub fn create_namespaces(pod_dir: &Path, hostname: &str) -> Result<PodNamespaces, SandboxError> {
    let dir = ns_dir(pod_dir);
    let err = |source| SandboxError::Namespaces {
        dir: dir.clone(),
        source,
    };
    let ns = namespaces(pod_dir);
    if is_mounted(Path::new(&ns.net)) && is_mounted(Path::new(&ns.uts)) {
        return Ok(ns);
    }
    std::fs::create_dir_all(&dir).map_err(err)?;
    let (d, host) = (dir.clone(), hostname.to_string());
    // unshare moves only this thread; it ends once the mounts hold the
    // namespaces.
    std::thread::spawn(move || pin_namespaces(&d, &host))
        .join()
        .map_err(|_| err(std::io::Error::other("namespace thread panicked")))?
        .map_err(err)?;
    Ok(ns)
}

fn pin_namespaces(dir: &Path, hostname: &str) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)?;
    nix::unistd::sethostname(hostname)?;
    loopback_up()?;
    for kind in ["net", "ipc", "uts"] {
        let target = dir.join(kind);
        std::fs::File::create(&target)?;
        let source = format!("/proc/thread-self/ns/{kind}");
        mount(
            Some(source.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
    }
    Ok(())
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a plain socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(e);
        }
    }
    Ok(())
}

fn is_mounted(p: &Path) -> bool {
    // A bind-mounted namespace file is on nsfs.
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type().0 == 0x6e736673)
        .unwrap_or(false)
}

/// Unmounts and removes the pod's namespaces (they go once nothing else
/// holds them).
pub fn remove_namespaces(pod_dir: &Path) {
    let dir = ns_dir(pod_dir);
    for kind in ["net", "ipc", "uts"] {
        let p = dir.join(kind);
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&p);
    }
    let _ = std::fs::remove_dir(&dir);
}

/// The node's CNI setup.
#[derive(Clone, Debug)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub runtime: Runtime,
}

/// Who the attachment is for (CNI_ARGS, as the CRI runtimes pass them).
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

impl PodRef<'_> {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.uid, self.uid
        )
    }
}

impl Cni {
    /// ADD; the result (saved beside the namespaces for DEL and CHECK).
    pub fn add(
        &self,
        pod_dir: &Path,
        pod: &PodRef,
        port_mappings: Vec<Value>,
    ) -> Result<Value, SandboxError> {
        let mut list = Conflist::load_dir(&self.conf_dir)?;
        list.runtime_config = json!({"portMappings": port_mappings});
        let ns = namespaces(pod_dir);
        let args = pod.cni_args();
        let at = Attachment {
            container_id: pod.uid,
            netns: &ns.net,
            ifname: IFNAME,
            args: &args,
        };
        let result = list.add(&self.runtime, &at)?;
        let _ = std::fs::write(pod_dir.join("cni-result.json"), result.to_string());
        let _ = std::fs::write(
            pod_dir.join("cni-ports.json"),
            list.runtime_config.to_string(),
        );
        Ok(result)
    }

    /// The result of an earlier ADD, if there was one.
    pub fn saved_result(pod_dir: &Path) -> Option<Value> {
        std::fs::read(pod_dir.join("cni-result.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// DEL (idempotent; the namespace may be gone).
    pub fn del(&self, pod_dir: &Path, pod: &PodRef) -> Result<(), SandboxError> {
        let mut list = Conflist::load_dir(&self.conf_dir)?;
        if let Some(rc) = std::fs::read(pod_dir.join("cni-ports.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        {
            list.runtime_config = rc;
        }
        let ns = namespaces(pod_dir);
        let netns = if Path::new(&ns.net).exists() {
            ns.net.clone()
        } else {
            String::new()
        };
        let args = pod.cni_args();
        let at = Attachment {
            container_id: pod.uid,
            netns: &netns,
            ifname: IFNAME,
            args: &args,
        };
        let prev = Self::saved_result(pod_dir);
        list.del(&self.runtime, &at, prev.as_ref())?;
        let _ = std::fs::remove_file(pod_dir.join("cni-result.json"));
        Ok(())
    }

    /// GC with the pods that still exist.
    pub fn gc(&self, valid_uids: &[String]) -> Result<(), SandboxError> {
        let list = Conflist::load_dir(&self.conf_dir)?;
        let valid: Vec<(String, String)> = valid_uids
            .iter()
            .map(|u| (u.clone(), IFNAME.to_string()))
            .collect();
        list.gc(&self.runtime, &valid)?;
        Ok(())
    }
}
