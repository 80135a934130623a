//! The TC path as the agent drives it: attaches `skiff_ingress` and
//! `skiff_egress` (tcx links, pinned) to the node's interfaces, and writes
//! the external backend sets into `EXTERNAL`, `EXT_BACKENDS` and one Maglev
//! table each in `MAGLEV`.
//!
//! Pinned layout, beside the socket path's: `maps/EXTERNAL`,
//! `maps/EXT_BACKENDS`, `maps/MAGLEV`, `maps/FLOWS`, `maps/REV_FLOWS`,
//! `maps/FRAGS`, and `links/tc-ingress-<ifindex>` /
//! `links/tc-egress-<ifindex>`. Tracked flows, the ports of fragmented
//! datagrams in flight and the links outlive the agent; the next one
//! rewrites every table from the cluster's state, drops what nobody uses,
//! and then swaps its own programs into the same links (atomically), so
//! established and new external flows keep flowing across a restart or an
//! upgrade.
//!
//! Update order for a set (a reader never sees a half-written set): new
//! backend ids, then a new Maglev table swapped in whole, then the
//! frontends, then removal of the backend ids that left. A set that cannot
//! be written (a map full) is taken back to what it was, so that retrying
//! it at every sync takes nothing more; the other sets are written.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::fs;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{HashMap, HashOfMaps, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use skiff_ebpf_common::{
    ExtBackend, ExtMember, ExternalValue, MAGLEV_INNER_FLAGS, ServiceKey, maps as names,
};
use tracing::{debug, info, warn};

use super::dataplane::{DataplaneError, io_err, map_err};
use super::maglev;
use super::model::{ExternalSet, frontend_string};

/// The TC programs of the node's interfaces: (name, hook, pin prefix).
const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("skiff_ingress", TcAttachType::Ingress, "tc-ingress-"),
    ("skiff_egress", TcAttachType::Egress, "tc-egress-"),
];

/// The TC program of pod-facing interfaces, likewise.
const POD_PROGRAM: (&str, TcAttachType, &str) =
    ("skiff_from_pods", TcAttachType::Ingress, "tc-pods-");

const BPF_MAP_TYPE_ARRAY: u32 = 2;

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// How the TC path is set up on this node.
#[derive(Clone, Debug)]
pub struct ExternalConfig {
    /// Interfaces to serve on; empty means every interface with a global
    /// IPv4 or IPv6 address that is not a bridge (rescanned, so that an overlay
    /// device made later is picked up).
    pub interfaces: Vec<String>,
    /// Pod-facing interfaces: a local backend routed through one of them
    /// is reached directly from the node's interfaces, and its replies
    /// leave directly, without the node's forwarding path. Empty means
    /// every bridge (rescanned).
    pub pod_interfaces: Vec<String>,
    /// Slots per Maglev table (prime).
    pub maglev_size: u32,
}

/// The interfaces found on the node for the TC path, used where the
/// config names none (see [`auto_interfaces`]).
#[derive(Clone, Debug, Default)]
pub struct Interfaces {
    /// Interfaces with a global address that are not bridges.
    pub node: Vec<String>,
    /// Bridges.
    pub pods: Vec<String>,
}

/// One set as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    table: u32,
    frontends: Vec<ServiceKey>,
    backends: Vec<ExtBackend>,
    flags: u32,
    affinity_timeout: u32,
}

/// A set between its two halves (see `External::stage`), with what its
/// first half wrote, so that `External::unstage` can take it back.
struct Staged {
    set: ExternalSet,
    table: u32,
    old: Option<Programmed>,
    /// Ids acquired so far, one per backend of `set`, in order.
    ids: Vec<u32>,
    /// `EXT_MEMBERS` entries written for backends `old` lacked.
    joined: Vec<ExtMember>,
    /// Its table went into `new_tables` (new content) or `dropped_tables`.
    queued: bool,
    dropping: bool,
}

const BPF_MAP_UPDATE_BATCH: u32 = 26;
const BPF_MAP_DELETE_BATCH: u32 = 27;

/// One BPF_MAP_UPDATE_BATCH (with `values`) or BPF_MAP_DELETE_BATCH of
/// u32 keys and values on the map `fd`.
fn batch(
    cmd: u32,
    fd: std::os::fd::RawFd,
    keys: &[u32],
    values: Option<&[u32]>,
) -> std::io::Result<()> {
    // union bpf_attr's batch member: in_batch, out_batch, keys, values
    // (u64 each), count, map_fd (u32 each), elem_flags, flags (u64 each).
    let mut attr = [0u8; 56];
    attr[16..24].copy_from_slice(&(keys.as_ptr() as u64).to_ne_bytes());
    if let Some(v) = values {
        if v.len() != keys.len() {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        attr[24..32].copy_from_slice(&(v.as_ptr() as u64).to_ne_bytes());
    }
    attr[32..36].copy_from_slice(&(keys.len() as u32).to_ne_bytes());
    attr[36..40].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: `attr` is a live buffer of the length given; the kernel
    // reads `count` keys (and values) from the slices it points to, which
    // outlive the call, and writes back only `count`.
    unsafe { super::sys::sys_bpf(cmd, &mut attr)? };
    let done = u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]);
    if done as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "batch did {done} of {}",
            keys.len()
        )));
    }
    Ok(())
}

/// What an earlier agent left, dropped after the first full sync unless
/// used again.
#[derive(Default)]
struct Adopted {
    frontends: Vec<ServiceKey>,
    tables: Vec<u32>,
    members: Vec<ExtMember>,
}

pub struct External {
    ebpf: Ebpf,
    cfg: ExternalConfig,
    links_dir: PathBuf,
    frontends: HashMap<MapData, ServiceKey, ExternalValue>,
    backends: HashMap<MapData, u32, ExtBackend>,
    /// Which backends each set has, for ClientIP affinity's check.
    members: HashMap<MapData, ExtMember, u8>,
    maglev: HashOfMaps<MapData, u32, MapData>,
    /// The same map, for batch updates (aya has none).
    maglev_raw: MapData,
    /// Tables built and not yet in `MAGLEV`, and tables to drop from it.
    new_tables: Vec<(u32, MapData)>,
    dropped_tables: Vec<u32>,
    /// By set name.
    sets: BTreeMap<String, Programmed>,
    /// Set names of each service.
    sets_of: StdHashMap<String, BTreeSet<String>>,
    /// The set each frontend belongs to.
    owner: StdHashMap<ServiceKey, String>,
    /// Backend ids and how many sets use each.
    backend_ids: StdHashMap<ExtBackend, (u32, usize)>,
    next_table: u32,
    next_backend: u32,
    adopted: Option<Adopted>,
    /// Interfaces (by index) whose links this agent has set up.
    attached: BTreeMap<u32, String>,
    /// Pod-facing interfaces (by index) likewise, also in `EXT_POD_DEVS`.
    pod_attached: BTreeMap<u32, String>,
    pod_devs: HashMap<MapData, u32, u8>,
    /// Links an earlier agent left (program, interface, link), to get this
    /// agent's programs after the first full sync.
    swaps: Vec<(&'static str, String, SchedClassifierLink)>,
}

impl External {
    /// Loads the TC programs (the maps are the pinned ones under
    /// `pin_dir/maps`, shared with the socket path's object) and attaches
    /// them.
    /// `auto` is what [`auto_interfaces`] found, used unless the config
    /// names interfaces.
    pub fn install(pin_dir: &Path, cfg: ExternalConfig, auto: &Interfaces) -> Result<Self> {
        if !(2..=1_048_573).contains(&cfg.maglev_size) || !maglev::is_prime(cfg.maglev_size) {
            return Err(DataplaneError::TableSize(cfg.maglev_size));
        }
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let mut ebpf = super::dataplane::load_object(&maps_dir)?;
        for (program, _, _) in PROGRAMS.into_iter().chain([POD_PROGRAM]) {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|source| DataplaneError::Program { program, source })?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { map: name })
        };
        let frontends: HashMap<MapData, ServiceKey, ExternalValue> =
            HashMap::try_from(take(names::EXTERNAL)?).map_err(map_err(names::EXTERNAL))?;
        let backends: HashMap<MapData, u32, ExtBackend> =
            HashMap::try_from(take(names::EXT_BACKENDS)?).map_err(map_err(names::EXT_BACKENDS))?;
        let maglev: HashOfMaps<MapData, u32, MapData> =
            HashOfMaps::try_from(take(names::MAGLEV)?).map_err(map_err(names::MAGLEV))?;
        let members: HashMap<MapData, ExtMember, u8> =
            HashMap::try_from(take(names::EXT_MEMBERS)?).map_err(map_err(names::EXT_MEMBERS))?;
        let pod_devs: HashMap<MapData, u32, u8> =
            HashMap::try_from(take(names::EXT_POD_DEVS)?).map_err(map_err(names::EXT_POD_DEVS))?;
        let maglev_raw =
            MapData::from_pin(maps_dir.join(names::MAGLEV)).map_err(map_err(names::MAGLEV))?;

        let mut adopted = Adopted::default();
        let mut next_table = 1;
        for key in maglev.keys() {
            let key = key.map_err(map_err(names::MAGLEV))?;
            adopted.tables.push(key);
            next_table = next_table.max(key + 1);
        }
        for entry in frontends.iter() {
            let (key, _) = entry.map_err(map_err(names::EXTERNAL))?;
            adopted.frontends.push(key);
        }
        for key in members.keys() {
            adopted
                .members
                .push(key.map_err(map_err(names::EXT_MEMBERS))?);
        }
        let mut backend_ids = StdHashMap::new();
        let mut next_backend = 1;
        for entry in backends.iter() {
            let (id, b) = entry.map_err(map_err(names::EXT_BACKENDS))?;
            backend_ids.insert(b, (id, 0));
            next_backend = next_backend.max(id + 1);
        }
        info!(
            frontends = adopted.frontends.len(),
            tables = adopted.tables.len(),
            backends = backend_ids.len(),
            "adopted the external tables"
        );
        let mut ext = Self {
            ebpf,
            cfg,
            links_dir,
            frontends,
            backends,
            members,
            maglev,
            maglev_raw,
            new_tables: Vec::new(),
            dropped_tables: Vec::new(),
            sets: BTreeMap::new(),
            sets_of: StdHashMap::new(),
            owner: StdHashMap::new(),
            backend_ids,
            next_table,
            next_backend,
            adopted: Some(adopted),
            attached: BTreeMap::new(),
            pod_attached: BTreeMap::new(),
            pod_devs,
            swaps: Vec::new(),
        };
        ext.attach_interfaces(auto)?;
        Ok(ext)
    }

    /// Interfaces by index: those `configured`, or else those found.
    fn by_index(configured: &[String], found: &[String]) -> BTreeMap<u32, String> {
        let names = if configured.is_empty() {
            found
        } else {
            configured
        };
        names
            .iter()
            .filter_map(|n| {
                let index = nix::net::if_::if_nametoindex(n.as_str()).ok()?;
                Some((index, n.clone()))
            })
            .collect()
    }

    /// Attaches the programs to interfaces that lack them and drops the
    /// links of interfaces that are gone. Returns how many were attached.
    pub fn attach_interfaces(&mut self, auto: &Interfaces) -> Result<usize> {
        let wanted = Self::by_index(&self.cfg.interfaces, &auto.node);
        let pods = Self::by_index(&self.cfg.pod_interfaces, &auto.pods);
        let mut attached = 0;
        for (index, name) in &wanted {
            if self.attached.get(index) == Some(name) {
                continue;
            }
            for (program, hook, prefix) in PROGRAMS {
                let pin = self.links_dir.join(format!("{prefix}{index}"));
                self.attach(program, hook, name, &pin, LinkOrder::default())?;
            }
            info!(interface = %name, ifindex = index, "serving external traffic");
            self.attached.insert(*index, name.clone());
            attached += 1;
        }
        for (index, name) in &pods {
            if self.pod_attached.get(index) == Some(name) {
                continue;
            }
            let (program, hook, prefix) = POD_PROGRAM;
            let pin = self.links_dir.join(format!("{prefix}{index}"));
            // A local backend's replies are caught before anything else on
            // the interface sends them on: the overlay's encap program
            // would tunnel one to a pod client on another node
            // untranslated.
            self.attach(program, hook, name, &pin, LinkOrder::first())?;
            // Only once the replies are caught there do flows go there
            // directly.
            self.pod_devs
                .insert(index, 1, 0)
                .map_err(map_err(names::EXT_POD_DEVS))?;
            info!(interface = %name, ifindex = index, "reaching local backends directly");
            self.pod_attached.insert(*index, name.clone());
            attached += 1;
        }
        // Links of interfaces that are no longer wanted (or were deleted:
        // the kernel detached those already) go.
        let entries = fs::read_dir(&self.links_dir).map_err(io_err(&self.links_dir))?;
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some((prefix, index)) = PROGRAMS
                .iter()
                .chain([&POD_PROGRAM])
                .find_map(|(_, _, prefix)| Some((*prefix, file.strip_prefix(prefix)?)))
                .and_then(|(prefix, i)| Some((prefix, i.parse::<u32>().ok()?)))
            else {
                continue;
            };
            if prefix == POD_PROGRAM.2 {
                if !pods.contains_key(&index) {
                    // No new flow goes there directly before its replies
                    // stop being caught there.
                    let _ = self.pod_devs.remove(&index);
                    debug!(link = %file, "dropping the link of a gone pod interface");
                    let _ = fs::remove_file(entry.path());
                    self.pod_attached.remove(&index);
                }
            } else if !wanted.contains_key(&index) {
                debug!(link = %file, "dropping the link of a gone interface");
                let _ = fs::remove_file(entry.path());
                self.attached.remove(&index);
            }
        }
        // Entries whose interface has no link (a deleted interface, or
        // left by an earlier agent) go too.
        let stale: Vec<u32> = self
            .pod_devs
            .keys()
            .flatten()
            .filter(|i| !self.pod_attached.contains_key(i))
            .collect();
        for index in stale {
            let _ = self.pod_devs.remove(&index);
        }
        Ok(attached)
    }

    /// Puts `program` on `interface`: into the link pinned at `pin` if an
    /// earlier agent left one (replacing its program atomically), else
    /// through a new tcx link at `order` in the interface's chain, pinned there.
    fn attach(
        &mut self,
        program: &'static str,
        hook: TcAttachType,
        interface: &str,
        pin: &Path,
        order: LinkOrder,
    ) -> Result<()> {
        let link_err = |what: String| DataplaneError::TcLink {
            program,
            interface: interface.to_string(),
            what,
        };
        let attach_err = |source| DataplaneError::Attach {
            program,
            interface: interface.to_string(),
            source,
        };
        let existing = PinnedLink::from_pin(pin)
            .ok()
            .map(FdLink::from)
            .and_then(|fd| SchedClassifierLink::try_from(fd).ok());
        let prog = classifier(&mut self.ebpf, program)?;
        let id = match existing {
            // Before the first full sync, the earlier programs keep serving
            // from their tables until these are written (see `sync_all`).
            Some(link) if self.adopted.is_some() => {
                self.swaps.push((program, interface.to_string(), link));
                return Ok(());
            }
            Some(link) => {
                debug!(
                    program,
                    interface, "replacing the program in the pinned link"
                );
                prog.attach_to_link(link).map_err(attach_err)?
            }
            None => {
                let _ = fs::remove_file(pin);
                prog.attach_with_options(interface, hook, TcAttachOptions::TcxOrder(order))
                    .map_err(attach_err)?
            }
        };
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd: FdLink = link.try_into().map_err(|e| link_err(format!("{e}")))?;
        if !pin.exists() {
            fd.pin(pin).map_err(|e| link_err(format!("pinning: {e}")))?;
        }
        Ok(())
    }

    /// Puts this agent's programs into the links an earlier agent left
    /// (after the first full sync). The kernel swaps each atomically.
    fn swap_programs(&mut self) -> Result<()> {
        for (program, interface, link) in std::mem::take(&mut self.swaps) {
            let attach_err = |source| DataplaneError::Attach {
                program,
                interface: interface.clone(),
                source,
            };
            let prog = classifier(&mut self.ebpf, program)?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            // The link stays pinned; this handle is only ours to drop.
            drop(prog.take_link(id).map_err(attach_err)?);
            info!(program, interface = %interface, "replaced the program in the pinned link");
        }
        Ok(())
    }

    fn alloc_table(&mut self) -> Result<u32> {
        let id = self.next_table;
        self.next_table = id.checked_add(1).ok_or(DataplaneError::IdsExhausted(id))?;
        Ok(id)
    }

    /// The id of `b`, written to `EXT_BACKENDS` if new, with one more user.
    fn acquire(&mut self, b: &ExtBackend) -> Result<u32> {
        if let Some((id, users)) = self.backend_ids.get_mut(b) {
            *users += 1;
            return Ok(*id);
        }
        let id = self.next_backend;
        self.next_backend = id.checked_add(1).ok_or(DataplaneError::IdsExhausted(id))?;
        self.backends
            .insert(id, *b, 0)
            .map_err(map_err(names::EXT_BACKENDS))?;
        self.backend_ids.insert(*b, (id, 1));
        Ok(id)
    }

    /// One user less for `b`; its id goes with the last.
    fn release(&mut self, b: &ExtBackend) {
        if let Some((id, users)) = self.backend_ids.get_mut(b) {
            *users = users.saturating_sub(1);
            if *users == 0 {
                let id = *id;
                let _ = self.backends.remove(&id);
                self.backend_ids.remove(b);
            }
        }
    }

    /// A new Maglev table of backend ids, filled through mmap.
    fn build_table(&self, ids: &[u32], backends: &[ExtBackend]) -> Result<MapData> {
        let slots = maglev::table(backends, self.cfg.maglev_size);
        let entries: Vec<u32> = slots.iter().map(|i| ids[*i as usize]).collect();
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            4,
            4,
            self.cfg.maglev_size,
            MAGLEV_INNER_FLAGS,
        );
        let data = MapData::create(obj, "skiff_maglev", None).map_err(map_err(names::MAGLEV))?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as usize;
        // Array elements sit 8 bytes apart whatever the value size: each
        // u32 id fills the first half of its own u64.
        let words: Vec<u64> = entries
            .iter()
            .map(|id| {
                let mut w = [0u8; 8];
                w[..4].copy_from_slice(&id.to_ne_bytes());
                u64::from_ne_bytes(w)
            })
            .collect();
        let len = (words.len() * 8).next_multiple_of(page);
        // SAFETY: a shared mapping of the array's own memory, of its size
        // rounded up to pages (what the kernel maps for mmapable arrays),
        // written and unmapped before anything else sees the map.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            );
            if ptr == libc::MAP_FAILED {
                return Err(DataplaneError::Mmap(std::io::Error::last_os_error()));
            }
            std::ptr::copy_nonoverlapping(words.as_ptr(), ptr.cast::<u64>(), words.len());
            libc::munmap(ptr, len);
        }
        Ok(data)
    }

    /// First half of writing `set`: its backend ids, and its table built
    /// and queued for `MAGLEV`. None when the maps already hold it. On an
    /// error nothing of it is left: the ids it acquired are released and
    /// the members it wrote removed.
    fn stage(&mut self, set: &ExternalSet) -> Result<Option<Staged>> {
        let old = self.sets.get(&set.name).cloned();
        if let Some(o) = &old
            && o.frontends == set.frontends
            && o.backends == set.backends
            && o.flags == set.flags
            && o.affinity_timeout == set.affinity_timeout
        {
            return Ok(None);
        }
        let table = match &old {
            Some(o) => o.table,
            None => self.alloc_table()?,
        };
        let mut st = Staged {
            set: set.clone(),
            table,
            old,
            ids: Vec::with_capacity(set.backends.len()),
            joined: Vec::new(),
            queued: false,
            dropping: false,
        };
        match self.fill(&mut st) {
            Ok(()) => Ok(Some(st)),
            Err(e) => {
                self.unstage(st);
                Err(e)
            }
        }
    }

    /// `stage`'s writes, each recorded in `st` as it is made.
    fn fill(&mut self, st: &mut Staged) -> Result<()> {
        for b in &st.set.backends {
            let id = self.acquire(b)?;
            st.ids.push(id);
        }
        // New members before the table that names them: an affinity entry
        // for a new backend is honoured from its first flow on. (Backends
        // are sorted.)
        for (b, backend) in st.set.backends.iter().zip(&st.ids) {
            if st
                .old
                .as_ref()
                .is_some_and(|o| o.backends.binary_search(b).is_ok())
            {
                continue;
            }
            let member = ExtMember {
                table: st.table,
                backend: *backend,
            };
            self.members
                .insert(member, 1, 0)
                .map_err(map_err(names::EXT_MEMBERS))?;
            st.joined.push(member);
        }
        if st
            .old
            .as_ref()
            .is_none_or(|o| o.backends != st.set.backends)
        {
            if st.set.backends.is_empty() {
                self.dropped_tables.push(st.table);
                st.dropping = true;
            } else {
                let data = self.build_table(&st.ids, &st.set.backends)?;
                self.new_tables.push((st.table, data));
                st.queued = true;
            }
        }
        Ok(())
    }

    /// Takes back a staged set whose table did not go into `MAGLEV`: the
    /// set stays as it was programmed (or absent), and no id, member or
    /// queued table of the attempt remains.
    fn unstage(&mut self, st: Staged) {
        for m in &st.joined {
            let _ = self.members.remove(m);
        }
        if st.queued {
            self.new_tables.retain(|(t, _)| *t != st.table);
        }
        if st.dropping {
            self.dropped_tables.retain(|t| *t != st.table);
        }
        for b in &st.set.backends[..st.ids.len()] {
            self.release(b);
        }
        debug!(set = %st.set.name, "external set not written; left as it was");
    }

    /// Second half, once its table is in `MAGLEV`: the frontends, then the
    /// backend ids that left. A frontend that cannot be written is left
    /// out of the set as programmed (so the next sync writes it again) and
    /// its error returned once the rest is done: the set's ids are then
    /// counted exactly once.
    fn commit(&mut self, st: Staged) -> Result<()> {
        let Staged {
            set, table, old, ..
        } = st;
        let value = ExternalValue {
            table,
            size: if set.backends.is_empty() {
                0
            } else {
                self.cfg.maglev_size
            },
            flags: set.flags,
            affinity_timeout: set.affinity_timeout,
        };
        let mut mine = Vec::new();
        let mut failed = None;
        for key in &set.frontends {
            if let Some(other) = self.owner.get(key)
                && other != &set.name
            {
                warn!(frontend = %frontend_string(key), set = %set.name, owner = %other, "external frontend already served for another service");
                continue;
            }
            if let Err(e) = self.frontends.insert(key, value, 0) {
                failed.get_or_insert(map_err(names::EXTERNAL)(e));
                continue;
            }
            self.owner.insert(*key, set.name.clone());
            mine.push(*key);
        }
        if let Some(o) = &old {
            for key in o.frontends.iter().filter(|k| !mine.contains(k)) {
                if self.owner.get(key) == Some(&set.name) {
                    let _ = self.frontends.remove(key);
                    self.owner.remove(key);
                }
            }
            for b in o
                .backends
                .iter()
                .filter(|b| set.backends.binary_search(b).is_err())
            {
                self.leave(table, b);
            }
            for b in &o.backends {
                self.release(b);
            }
        }
        debug!(set = %set.name, frontends = mine.len(), backends = set.backends.len(), "external set programmed");
        self.sets.insert(
            set.name,
            Programmed {
                table,
                frontends: mine,
                backends: set.backends,
                flags: set.flags,
                affinity_timeout: set.affinity_timeout,
            },
        );
        failed.map_or(Ok(()), Err)
    }

    /// Takes a set's frontends out; its table goes with the next flush.
    fn remove_set(&mut self, name: &str) {
        let Some(p) = self.sets.remove(name) else {
            return;
        };
        for key in &p.frontends {
            if self.owner.get(key).map(String::as_str) == Some(name) {
                let _ = self.frontends.remove(key);
                self.owner.remove(key);
            }
        }
        self.dropped_tables.push(p.table);
        for b in &p.backends {
            self.leave(p.table, b);
            self.release(b);
        }
        debug!(set = name, "external set removed");
    }

    /// `b` is no longer a backend of the set with `table`: clients kept on
    /// it by affinity are sent by the Maglev table again.
    fn leave(&mut self, table: u32, b: &ExtBackend) {
        if let Some((backend, _)) = self.backend_ids.get(b) {
            let _ = self.members.remove(&ExtMember {
                table,
                backend: *backend,
            });
        }
    }

    /// Puts the queued tables into `MAGLEV`, in one batch: each write to a
    /// map of maps waits for an RCU grace period (milliseconds), once per
    /// call. On an error, the keys of the tables that did not go in, and
    /// the error.
    fn flush_new_tables(&mut self) -> Option<(BTreeSet<u32>, DataplaneError)> {
        let tables = std::mem::take(&mut self.new_tables);
        if tables.is_empty() {
            return None;
        }
        let keys: Vec<u32> = tables.iter().map(|(k, _)| *k).collect();
        let fds: Vec<u32> = tables
            .iter()
            .map(|(_, d)| d.fd().as_fd().as_raw_fd() as u32)
            .collect();
        if let Err(e) = batch(BPF_MAP_UPDATE_BATCH, self.maglev_fd(), &keys, Some(&fds)) {
            debug!(error = %e, "no batch update; one table at a time");
            for (i, (key, data)) in tables.iter().enumerate() {
                if let Err(e) = self.maglev.insert(key, data, 0) {
                    return Some((
                        keys[i..].iter().copied().collect(),
                        map_err(names::MAGLEV)(e),
                    ));
                }
            }
        }
        None
    }

    /// Removes the tables nobody points to any more, in one batch.
    fn flush_dropped_tables(&mut self) {
        let keys = std::mem::take(&mut self.dropped_tables);
        if keys.is_empty() {
            return;
        }
        if batch(BPF_MAP_DELETE_BATCH, self.maglev_fd(), &keys, None).is_err() {
            for key in &keys {
                let _ = self.maglev.remove(key);
            }
        }
    }

    fn maglev_fd(&self) -> std::os::fd::RawFd {
        self.maglev_raw.fd().as_fd().as_raw_fd()
    }

    /// Writes `sets` of the named services (replacing what they had) in
    /// three passes: tables, then frontends, then what left. A set that
    /// cannot be written stays as it was (or absent) and the others are
    /// written; the first error is returned after.
    fn write(&mut self, services: &[(&str, &[ExternalSet])]) -> Result<usize> {
        let mut changed = 0;
        let mut staged = Vec::new();
        let mut failed = None;
        let mut touched = Vec::with_capacity(services.len());
        for (service, sets) in services {
            let wanted: BTreeSet<String> = sets.iter().map(|s| s.name.clone()).collect();
            let previous = self.sets_of.remove(*service).unwrap_or_default();
            for name in previous.difference(&wanted) {
                self.remove_set(name);
                changed += 1;
            }
            for set in *sets {
                match self.stage(set) {
                    Ok(Some(st)) => staged.push(st),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(set = %set.name, error = %e, "external set not written");
                        failed.get_or_insert(e);
                    }
                }
            }
            touched.push((*service, wanted));
        }
        if let Some((missing, e)) = self.flush_new_tables() {
            let (kept, lost): (Vec<_>, Vec<_>) = staged
                .into_iter()
                .partition(|st| !(st.queued && missing.contains(&st.table)));
            for st in lost {
                warn!(set = %st.set.name, error = %e, "external set not written");
                self.unstage(st);
            }
            staged = kept;
            failed.get_or_insert(e);
        }
        changed += staged.len();
        for st in staged {
            if let Err(e) = self.commit(st) {
                failed.get_or_insert(e);
            }
        }
        self.flush_dropped_tables();
        // Each service's sets are the ones the maps hold.
        for (service, wanted) in touched {
            let have: BTreeSet<String> = wanted
                .into_iter()
                .filter(|n| self.sets.contains_key(n))
                .collect();
            if !have.is_empty() {
                self.sets_of.insert(service.to_string(), have);
            }
        }
        failed.map_or(Ok(changed), Err)
    }

    /// Programs one service's sets and removes those it no longer has.
    /// Returns the number of sets written or removed.
    pub fn sync_service(&mut self, service: &str, sets: &[ExternalSet]) -> Result<usize> {
        self.write(&[(service, sets)])
    }

    /// Makes the maps hold exactly `desired` (sets by service), and drops
    /// what an earlier agent left that nobody wants.
    pub fn sync_all(&mut self, desired: &BTreeMap<String, Vec<ExternalSet>>) -> Result<usize> {
        let gone: Vec<String> = self
            .sets_of
            .keys()
            .filter(|s| !desired.contains_key(*s))
            .cloned()
            .collect();
        let mut all: Vec<(&str, &[ExternalSet])> =
            gone.iter().map(|s| (s.as_str(), &[][..])).collect();
        all.extend(desired.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        let mut changed = self.write(&all)?;
        if let Some(adopted) = self.adopted.take() {
            let in_use: BTreeSet<u32> = self.sets.values().map(|p| p.table).collect();
            for key in adopted.frontends {
                if !self.owner.contains_key(&key) {
                    let _ = self.frontends.remove(&key);
                    changed += 1;
                }
            }
            for m in adopted
                .members
                .iter()
                .filter(|m| !in_use.contains(&m.table))
            {
                let _ = self.members.remove(m);
            }
            self.dropped_tables
                .extend(adopted.tables.into_iter().filter(|t| !in_use.contains(t)));
            self.flush_dropped_tables();
            let unused: Vec<ExtBackend> = self
                .backend_ids
                .iter()
                .filter(|(_, (_, users))| *users == 0)
                .map(|(b, _)| *b)
                .collect();
            for b in unused {
                if let Some((id, _)) = self.backend_ids.remove(&b) {
                    let _ = self.backends.remove(&id);
                }
            }
        }
        self.swap_programs()?;
        Ok(changed)
    }
}

impl External {
    /// Time spent in the TC programs and their run counts, while the
    /// kernel counts (`kernel.bpf_stats_enabled` = 1): what a packet costs
    /// in them.
    pub fn program_stats(&self) -> Vec<(&'static str, std::time::Duration, u64)> {
        let mut ids: StdHashMap<u32, &'static str> = StdHashMap::new();
        let links = self
            .attached
            .keys()
            .flat_map(|i| PROGRAMS.iter().map(move |p| (*i, p)))
            .chain(self.pod_attached.keys().map(|i| (*i, &POD_PROGRAM)));
        for (index, (program, _, prefix)) in links {
            let link = self.links_dir.join(format!("{prefix}{index}"));
            if let Ok(id) = super::sys::link_program_id(&link) {
                ids.insert(id, *program);
            }
        }
        super::dataplane::stats_of(&ids)
    }
}

/// The TC program `program` of the object.
fn classifier<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(program)
        .ok_or(DataplaneError::Program {
            program,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program { program, source })
}

/// Every interface with a global IPv4 or IPv6 address that is not
/// loopback and not a bridge (pods sit behind the bridge; their traffic to
/// frontends is translated at the socket), and every bridge: the pods'.
pub async fn auto_interfaces() -> Interfaces {
    let bridges: BTreeSet<String> = match skiff_netlink::Netlink::open() {
        Ok(nl) => nl
            .links()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("bridge"))
            .map(|l| l.name)
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot list links for the TC path");
            return Interfaces::default();
        }
    };
    let mut out = BTreeSet::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Interfaces::default();
    };
    for a in addrs {
        let Some(sa) = a.address.as_ref() else {
            continue;
        };
        let global = if let Some(v4) = sa.as_sockaddr_in() {
            let ip = v4.ip();
            !ip.is_loopback() && !ip.is_link_local()
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            let ip = v6.ip();
            !ip.is_loopback() && !ip.is_unicast_link_local()
        } else {
            false
        };
        if global && !bridges.contains(&a.interface_name) {
            out.insert(a.interface_name);
        }
    }
    Interfaces {
        node: out.into_iter().collect(),
        pods: bridges.into_iter().collect(),
    }
}
