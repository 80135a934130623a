//! A socket iterator assembled by hand and run over the cgroup's sockets:
//! loaded with the raw `bpf(2)` calls (aya cannot relocate the kfunc calls
//! or the kernel-dependent offsets these programs use), attached, and run
//! once in each network namespace the cgroup's processes use (an iterator
//! walks one namespace's sockets). The socket terminator and the origin
//! marker are the two programs that use it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::MapError;

use super::btf::BtfError;
use super::sys::{BPF_ITER_CREATE, BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd, put32, put64};

#[derive(Debug, thiserror::Error)]
pub enum IterError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the verifier refused the socket iterator {name}: {source}\n{log}")]
    Refused {
        name: String,
        #[source]
        source: std::io::Error,
        log: String,
    },
}

pub type Result<T> = std::result::Result<T, IterError>;

/// Wraps a map error with the map's name.
pub fn map_err(map: &'static str) -> impl Fn(MapError) -> IterError {
    move |source| IterError::Map { map, source }
}

pub fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IterError {
    let what = what.into();
    move |source| IterError::Sys { what, source }
}

const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
/// `src_reg` of a `ld_imm64` that loads a map by descriptor.
pub const BPF_PSEUDO_MAP_FD: u8 = 1;

/// An attached socket iterator and the cgroup whose namespaces it walks.
pub struct SocketIter {
    link: OwnedFd,
    cgroup: PathBuf,
}

impl SocketIter {
    /// Loads `insns` as the iterator `name` (at most 15 bytes) over the
    /// kernel's iterator target `target_btf_id` (`bpf_iter_tcp`,
    /// `bpf_iter_udp`), and attaches it.
    pub fn load(name: &str, insns: &[u64], target_btf_id: u32, cgroup: &Path) -> Result<Self> {
        let license = c"GPL";
        let load = |log: &mut [u8], level: u32| {
            let mut attr = [0u8; 144];
            put32(&mut attr, 0, BPF_PROG_TYPE_TRACING);
            put32(&mut attr, 4, insns.len() as u32);
            put64(&mut attr, 8, insns.as_ptr() as u64);
            put64(&mut attr, 16, license.as_ptr() as u64);
            if level > 0 {
                put32(&mut attr, 24, level);
                put32(&mut attr, 28, log.len() as u32);
                put64(&mut attr, 32, log.as_mut_ptr() as u64);
            }
            let n = name.len().min(15);
            attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
            put32(&mut attr, 68, BPF_TRACE_ITER);
            put32(&mut attr, 108, target_btf_id);
            // SAFETY: the instructions, the license and the log outlive
            // the call; the kernel writes at most the log's length to it.
            unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
        };
        let prog = match load(&mut [], 0) {
            Ok(p) => p,
            // Again with the verifier's log, to say why.
            Err(_) => {
                let mut log = vec![0u8; 64 * 1024];
                load(&mut log, 1).map_err(|source| {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    IterError::Refused {
                        name: name.to_string(),
                        source,
                        log: String::from_utf8_lossy(&log[..end]).into_owned(),
                    }
                })?
            }
        };
        let mut attr = [0u8; 32];
        put32(&mut attr, 0, prog.as_raw_fd() as u32);
        put32(&mut attr, 8, BPF_TRACE_ITER);
        // SAFETY: link create only reads the descriptor in `attr`.
        let link = unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
            .map_err(sys(format!("attach the socket iterator {name}")))?;
        Ok(Self {
            link,
            cgroup: cgroup.to_path_buf(),
        })
    }

    /// Runs the iterator once in each network namespace of the cgroup's
    /// processes, on a thread of its own (setns changes only its thread).
    /// Returns how many namespaces were walked.
    pub fn walk(&self) -> Result<usize> {
        let namespaces = namespaces_of(&self.cgroup);
        let link = self.link.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut walked = 0;
                for ns in namespaces.values() {
                    // A process that exited meanwhile took its path with it.
                    let Ok(f) = fs::File::open(ns) else { continue };
                    // SAFETY: setns on this thread only, with an open fd.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        continue;
                    }
                    let mut attr = [0u8; 8];
                    put32(&mut attr, 0, link as u32);
                    // SAFETY: iterator create only reads the link's descriptor.
                    let iter = unsafe { bpf_fd(BPF_ITER_CREATE, &mut attr) }
                        .map_err(sys("start the iterator"))?;
                    let mut file = fs::File::from(iter);
                    let mut sink = [0u8; 256];
                    // The programs print nothing: reading to the end runs
                    // them over every socket.
                    while file.read(&mut sink).map_err(sys("run the iterator"))? > 0 {}
                    walked += 1;
                }
                Ok(walked)
            })
            .join()
            .unwrap_or_else(|_| Err(sys("iterator thread")(std::io::Error::other("panicked"))))
        })
    }
}

/// One path per network namespace used by a process in `cgroup` or below,
/// keyed by the namespace's (device, inode).
fn namespaces_of(cgroup: &Path) -> BTreeMap<(u64, u64), PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter(|l| !l.is_empty() && *l != "0") {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if let Ok(m) = fs::metadata(&ns) {
                    out.entry((m.dev(), m.ino())).or_insert(ns);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
    }
    out
}
