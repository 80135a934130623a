//! The kernel side of the proxy as the agent drives it: loads the programs,
//! pins maps and links under a bpffs directory, adopts them after a restart,
//! and applies frontends to the maps incrementally.
//!
//! Pinned layout (default `/sys/fs/bpf/skiff/`): `maps/<NAME>` for each map
//! and `links/<program>` for each cgroup link. A link pinned there stays
//! attached when the agent exits, so established and new connections keep
//! working; the next agent reopens the maps, rebuilds what is programmed
//! from them, writes only the differences, and then puts its own programs
//! into the links (so an upgrade takes effect without a gap). A pinned map
//! whose layout differs from this agent's (left by another version) is
//! replaced by an empty one and filled from the cluster's state.
//!
//! Update order for one frontend (a reader never sees a half-written
//! service): new backends, then the slots of the generation that is not
//! live, then the `SERVICES` entry that flips the generation, then removal
//! of backends that left. The kernel's hash-map update of one element is
//! atomic; see `BPF_F_NO_PREALLOC` in the programs. A TCP backend's origin
//! (see [`super::origins`]) is written with the new backends, before any
//! slot names it.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::fs;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
use skiff_ebpf_common::{
    Backend, INLINE_SLOTS, PROTO_UDP, PeerValue, RevNatValue, SLOT_ORIGIN, ServiceKey,
    ServiceValue, SlotKey, SlotValue, maps as names,
};
use tracing::{debug, info, warn};

use super::model::{Frontend, ServiceError, frontend_string};
use super::origins::{self, Origins};

/// The compiled kernel programs (built by build.rs).
pub(super) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff"));

/// The BTF-defined maps, pinned by an explicit path (the others by their
/// definition).
const BTF_PINNED: [&str; 2] = [names::MAGLEV, names::PEERS];

/// Loads the object the way both paths do: every map pinned under
/// `maps_dir` by its name, so that the two share them and a later agent
/// finds them. A pin whose layout differs from the object's (an agent of
/// another version left it) is replaced first, see [`retire_incompatible`].
pub(super) fn load_object(maps_dir: &Path) -> Result<Ebpf> {
    for map in retire_incompatible(maps_dir)? {
        warn!(
            map,
            "the pinned map has another layout (left by another version): replaced with an empty one"
        );
    }
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(maps_dir);
    for name in BTF_PINNED {
        l.map_pin_path(name, maps_dir.join(name));
    }
    Ok(l.load(OBJECT)?)
}

/// Unpins each map under `maps_dir` whose type, key size, value size,
/// entry limit or flags differ from the object's map of that name, and
/// returns their names. The loader would otherwise reuse such a map, and
/// the programs would fail to load against it (or read it with the wrong
/// layout). The unpinned map lives on only while programs of the earlier
/// agent still use it, that is until the links carry the new programs.
fn retire_incompatible(maps_dir: &Path) -> Result<Vec<String>> {
    let obj = aya_obj::Object::parse(OBJECT).map_err(|e| DataplaneError::Object(e.to_string()))?;
    let mut retired = Vec::new();
    for (name, want) in &obj.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err("pinned map"))?;
        let kind = info.map_type().map_err(map_err("pinned map"))?;
        let have = (
            kind as u32,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let wanted = (
            want.map_type(),
            want.key_size(),
            want.value_size(),
            want.max_entries(),
            want.map_flags(),
        );
        if have != wanted {
            debug!(map = %name, ?have, ?wanted, "pinned map layout (type, key, value, entries, flags)");
            fs::remove_file(&path).map_err(io_err(&path))?;
            retired.push(name.clone());
        }
    }
    Ok(retired)
}

/// Program names in the object, in attach order.
pub const PROGRAMS: [&str; 8] = [
    "skiff_connect4",
    "skiff_connect6",
    "skiff_sendmsg4",
    "skiff_sendmsg6",
    "skiff_recvmsg4",
    "skiff_recvmsg6",
    "skiff_getpeername4",
    "skiff_getpeername6",
];

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/skiff";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not on a bpffs and mounting one there failed: {source}")]
    Bpffs { path: PathBuf, source: nix::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("parsing the eBPF object: {0}")]
    Object(String),
    #[error(
        "putting {program} into its pinned link: {source} (the link was unpinned: the next start attaches anew)"
    )]
    Swap {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error("link of {program}: {source}")]
    Link {
        program: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link of {program} at {path}: {source}")]
    PinLink {
        program: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("map {map} is missing from the object")]
    MissingMap { map: &'static str },
    #[error("no pinned maps under {path}: is the proxy installed there?")]
    NotInstalled { path: PathBuf },
    #[error("the frontend table is full ({0} ids in use)")]
    IdsExhausted(u32),
    #[error("{program} on {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: ProgramError,
    },
    #[error("link of {program} on {interface}: {what}")]
    TcLink {
        program: &'static str,
        interface: String,
        what: String,
    },
    #[error("writing a Maglev table through mmap: {0}")]
    Mmap(std::io::Error),
    #[error("--maglev-table-size {0}: must be a prime between 2 and 1048573")]
    TableSize(u32),
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One programmed frontend as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programmed {
    pub value: ServiceValue,
    /// Backend ids in slot order, with what they point to.
    pub backends: Vec<(u32, Backend)>,
    /// Slots written in each generation (for removing stale ones).
    gen_len: [u16; 2],
}

/// What the tables hold, as `Tables::read` rebuilds it.
pub struct Contents {
    pub programmed: BTreeMap<ServiceKey, Programmed>,
    /// Slot and backend entries no frontend refers to (left by an
    /// interrupted update).
    pub stale_slots: Vec<SlotKey>,
    pub stale_backends: Vec<u32>,
}

/// The service tables.
pub struct Tables {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, u32, Backend>,
    /// None where the pins predate it (`proxy list` over an older
    /// agent's maps): then no backend gets an origin, and every connect
    /// keeps its record.
    origins: Option<HashMap<MapData, ServiceKey, RevNatValue>>,
}

impl Tables {
    fn from_maps(take: &mut dyn FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(take(names::SERVICES)?)
                .map_err(map_err(names::SERVICES))?,
            slots: HashMap::try_from(take(names::SLOTS)?).map_err(map_err(names::SLOTS))?,
            backends: HashMap::try_from(take(names::BACKENDS)?)
                .map_err(map_err(names::BACKENDS))?,
            origins: match take(names::ORIGINS) {
                Ok(map) => Some(HashMap::try_from(map).map_err(map_err(names::ORIGINS))?),
                Err(_) => None,
            },
        })
    }

    /// Opens the maps pinned under `pin_dir` (for `proxy list`).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let maps = pin_dir.join("maps");
        if !maps.join(names::SERVICES).exists() {
            return Err(DataplaneError::NotInstalled { path: maps });
        }
        Self::from_maps(&mut |name| {
            let data = MapData::from_pin(maps.join(name)).map_err(map_err(name))?;
            Ok(Map::HashMap(data))
        })
    }

    /// Everything programmed, rebuilt from the maps.
    pub fn read(&self) -> Result<Contents> {
        let mut backends = StdHashMap::new();
        for entry in self.backends.iter() {
            let (id, b) = entry.map_err(map_err(names::BACKENDS))?;
            backends.insert(id, b);
        }
        let mut slots: StdHashMap<(u32, u16), BTreeMap<u16, SlotValue>> = StdHashMap::new();
        for entry in self.slots.iter() {
            let (k, v) = entry.map_err(map_err(names::SLOTS))?;
            slots
                .entry((k.service, k.generation))
                .or_default()
                .insert(k.slot, v);
        }
        let mut out = BTreeMap::new();
        let mut used_backends = BTreeSet::new();
        let mut used_slots = BTreeSet::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(map_err(names::SERVICES))?;
            let mut gen_len = [0u16; 2];
            for g in 0..2u16 {
                if let Some(s) = slots.get(&(value.id, g)) {
                    gen_len[g as usize] = s.keys().next_back().map_or(0, |m| m + 1);
                    used_slots.insert((value.id, g));
                }
            }
            let live = slots.get(&(value.id, value.generation as u16));
            let mut list = Vec::new();
            for slot in 0..value.count {
                let v = live.and_then(|s| s.get(&(slot as u16))).copied();
                // A slot counts only with its BACKENDS entry (written first,
                // removed last), so the two tables agree after an adopt.
                if let Some(v) = v.filter(|v| backends.get(&v.id) == Some(&v.backend)) {
                    used_backends.insert(v.id);
                    list.push((v.id, v.backend));
                }
            }
            out.insert(
                key,
                Programmed {
                    value,
                    backends: list,
                    gen_len,
                },
            );
        }
        let mut stale_slots = Vec::new();
        for ((service, generation), s) in &slots {
            if !used_slots.contains(&(*service, *generation)) {
                stale_slots.extend(s.keys().map(|slot| SlotKey {
                    service: *service,
                    generation: *generation,
                    slot: *slot,
                }));
            }
        }
        let stale_backends = backends
            .keys()
            .filter(|id| !used_backends.contains(id))
            .copied()
            .collect();
        Ok(Contents {
            programmed: out,
            stale_slots,
            stale_backends,
        })
    }
}

/// The loaded (or adopted) dataplane and what it holds.
pub struct Dataplane {
    tables: Tables,
    programmed: BTreeMap<ServiceKey, Programmed>,
    /// Frontends of each service, and the reverse.
    owned: StdHashMap<String, BTreeSet<ServiceKey>>,
    owner: StdHashMap<ServiceKey, String>,
    next_service_id: u32,
    next_backend_id: u32,
    /// Ends connected UDP sockets whose backend left (None where the
    /// kernel cannot: before 6.5).
    terminator: Option<super::terminate::Terminator>,
    /// (frontend, backend) pairs that left since the last sync finished.
    left: Vec<PeerValue>,
    /// Links an earlier agent left, to get this agent's programs after the
    /// first full sync.
    swaps: Vec<Swap>,
    /// TCP backends' origin frontends, as `ORIGINS` holds them.
    origins: Origins,
}

/// A pinned link and the program to put into it.
struct Swap {
    program: &'static str,
    link: std::os::fd::OwnedFd,
    link_path: PathBuf,
    prog: aya::programs::ProgramFd,
}

/// The `PEERS` record a connected socket to `backend` through `key` has.
fn peer_of(key: &ServiceKey, backend: &Backend) -> PeerValue {
    PeerValue {
        frontend: key.addr,
        backend: backend.addr,
        frontend_port: key.port,
        backend_port: backend.port,
        pad: 0,
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    // The pin directory must live on a bpffs; mount one at /sys/fs/bpf if
    // the machine has none (fresh containers and VMs often do not).
    let root = Path::new("/sys/fs/bpf");
    let on_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if pin_dir.starts_with(root) && !on_bpffs(root) {
        fs::create_dir_all(root).map_err(io_err(root))?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| DataplaneError::Bpffs {
            path: root.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

impl Dataplane {
    /// Loads the programs and attaches them to `cgroup`, or adopts what is
    /// already pinned under `pin_dir`. Maps are created on first start and
    /// reused afterwards; links pinned by an earlier agent are kept as they
    /// are (they already run the programs on those same maps).
    pub fn install(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let mut ebpf: Ebpf = load_object(&maps_dir)?;

        let cgroup_file = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        // A cgroup's id is its directory's inode number on cgroup2.
        let cgroup_id = cgroup_file.metadata().map_err(io_err(cgroup))?.ino();
        let mut swaps = Vec::new();
        for program in PROGRAMS {
            let link_path = links_dir.join(program);
            let perr = |source| DataplaneError::Program { program, source };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(program)
                .ok_or(DataplaneError::Program {
                    program,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(perr)?;
            prog.load().map_err(perr)?;
            // A link an earlier agent pinned gets this agent's program once
            // the tables are written (`swap_programs`): the kernel swaps it
            // under running connects, so an upgrade takes effect and no
            // connect goes untranslated, and the earlier programs serve
            // from their maps meanwhile (which matters where a map of
            // another layout was replaced by an empty one). A link on
            // another cgroup (or on none: its cgroup was removed) is
            // dropped instead, with its pin.
            if let Ok(link) = super::sys::open_pinned(&link_path) {
                let on = super::sys::link_cgroup_id(link.as_fd());
                if on.as_ref().is_ok_and(|id| *id == cgroup_id) {
                    let prog = prog
                        .fd()
                        .map_err(perr)?
                        .try_clone()
                        .map_err(io_err(&link_path))?;
                    swaps.push(Swap {
                        program,
                        link,
                        link_path,
                        prog,
                    });
                    continue;
                }
                info!(program, on = ?on, "the pinned link is not on this cgroup: attaching anew");
            }
            // Through bpf_link_create, where "Single" means no flags: cgroup
            // links always coexist with other programs on the cgroup.
            let id = prog
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(perr)?;
            let link = prog.take_link(id).map_err(perr)?;
            let fd: FdLink = link
                .try_into()
                .map_err(|source| DataplaneError::Link { program, source })?;
            // A stale pin (its link gone) is replaced.
            let _ = fs::remove_file(&link_path);
            fd.pin(&link_path)
                .map_err(|source| DataplaneError::PinLink {
                    program,
                    path: link_path.clone(),
                    source,
                })?;
            info!(program, cgroup = %cgroup.display(), "attached");
        }

        let tables = Tables::from_maps(&mut |name| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { map: name })
        })?;
        let mut dp = Self::adopt(tables)?;
        dp.swaps = swaps;
        dp.terminator = match super::terminate::Terminator::load(pin_dir, cgroup) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "no socket termination: connected UDP clients keep a backend that left");
                None
            }
        };
        Ok(dp)
    }

    fn adopt(mut tables: Tables) -> Result<Self> {
        let Contents {
            programmed,
            stale_slots,
            stale_backends,
        } = tables.read()?;
        for k in &stale_slots {
            let _ = tables.slots.remove(k);
        }
        for id in &stale_backends {
            let _ = tables.backends.remove(id);
        }
        let mut existing = Vec::new();
        for entry in tables.origins.iter().flat_map(HashMap::iter) {
            existing.push(entry.map_err(map_err(names::ORIGINS))?);
        }
        let origins = Origins::new(existing, origins::KEEP, Instant::now());
        let next_service_id = programmed
            .values()
            .map(|p| p.value.id)
            .max()
            .map_or(1, |m| m + 1);
        let next_backend_id = programmed
            .values()
            .flat_map(|p| p.backends.iter().map(|(id, _)| *id))
            .max()
            .map_or(1, |m| m + 1);
        info!(
            frontends = programmed.len(),
            stale_slots = stale_slots.len(),
            stale_backends = stale_backends.len(),
            "adopted maps"
        );
        let mut dp = Self {
            tables,
            programmed,
            owned: StdHashMap::new(),
            owner: StdHashMap::new(),
            next_service_id,
            next_backend_id,
            terminator: None,
            left: Vec::new(),
            swaps: Vec::new(),
            origins,
        };
        // What is programmed already uses its backends; one without an
        // origin (an earlier agent had none) gets one now.
        let adopted: Vec<(ServiceKey, Vec<Backend>)> = dp
            .programmed
            .iter()
            .map(|(k, p)| (*k, p.backends.iter().map(|(_, b)| *b).collect()))
            .collect();
        for (key, backends) in &adopted {
            dp.claim_origins(key, backends);
        }
        Ok(dp)
    }

    /// `frontend` now uses `backends` (TCP only): each gets an origin if it
    /// has none, written before any slot names it. A write the map refuses
    /// (full) leaves the backend without one, so its connects keep writing
    /// records, and the next claim tries again.
    fn claim_origins<'a>(
        &mut self,
        frontend: &ServiceKey,
        backends: impl IntoIterator<Item = &'a Backend>,
    ) {
        for key in origins::keys_of(frontend, backends) {
            if let Some((key, value)) = self.origins.claim(key, frontend)
                && let Some(map) = &mut self.tables.origins
            {
                match map.insert(key, value, 0) {
                    Ok(()) => self.origins.set(key, value),
                    Err(e) => debug!(error = %e, "no origin for a backend"),
                }
            }
        }
    }

    /// `frontend` no longer uses `backends`.
    fn release_origins<'a>(
        &mut self,
        frontend: &ServiceKey,
        backends: impl IntoIterator<Item = &'a Backend>,
    ) {
        let now = Instant::now();
        for key in origins::keys_of(frontend, backends) {
            self.origins.release(key, now);
        }
    }

    /// Deletes origins no frontend has used for [`origins::KEEP`].
    fn expire_origins(&mut self) {
        for key in self.origins.expired(Instant::now()) {
            if let Some(map) = &mut self.tables.origins {
                let _ = map.remove(&key);
            }
        }
    }

    /// Ends the connected UDP sockets sent to backends that left.
    fn terminate_left(&mut self) {
        let left = std::mem::take(&mut self.left);
        if let Some(t) = &mut self.terminator
            && let Err(e) = t.terminate(&left)
        {
            warn!(error = %e, pairs = left.len(), "terminating sockets to gone backends failed");
        }
    }

    pub fn programmed(&self) -> &BTreeMap<ServiceKey, Programmed> {
        &self.programmed
    }

    fn alloc_backend_id(&mut self) -> Result<u32> {
        let id = self.next_backend_id;
        self.next_backend_id = id.checked_add(1).ok_or(DataplaneError::IdsExhausted(id))?;
        Ok(id)
    }

    /// Makes the maps hold `f`. Returns whether anything was written.
    pub fn upsert(&mut self, f: &Frontend) -> Result<bool> {
        let old = self.programmed.get(&f.key).cloned();
        if let Some(p) = &old
            && p.value.affinity_timeout == f.affinity_timeout
            && p.value.count as usize == p.backends.len()
            && p.backends.iter().map(|(_, b)| b).eq(f.backends.iter())
        {
            return Ok(false);
        }
        let (id, generation, mut gen_len, old_backends) = match &old {
            Some(p) => (
                p.value.id,
                p.value.generation ^ 1,
                p.gen_len,
                p.backends.clone(),
            ),
            None => {
                let id = self.next_service_id;
                self.next_service_id = id.checked_add(1).ok_or(DataplaneError::IdsExhausted(id))?;
                (id, 0, [0, 0], Vec::new())
            }
        };
        let kept: StdHashMap<Backend, u32> = old_backends.iter().map(|(id, b)| (*b, *id)).collect();

        // 1. backends that are new to this frontend, with their origins
        let new: Vec<Backend> = f
            .backends
            .iter()
            .filter(|b| !kept.contains_key(b))
            .copied()
            .collect();
        self.claim_origins(&f.key, &new);
        let mut fresh = Vec::new();
        let written = self.write_generation(f, id, generation, &mut gen_len, &kept, &mut fresh);
        let (list, value) = match written {
            Ok(written) => written,
            Err(e) => {
                self.undo_generation(&f.key, id, generation, gen_len, &fresh);
                // Not served: the claims go back, so these origins can expire.
                self.release_origins(&f.key, &new);
                return Err(e);
            }
        };
        // 4. backends that left
        let now: BTreeSet<u32> = list.iter().map(|(bid, _)| *bid).collect();
        let mut gone = Vec::new();
        for (bid, b) in &old_backends {
            if !now.contains(bid) {
                let _ = self.tables.backends.remove(bid);
                if f.key.proto == PROTO_UDP {
                    self.left.push(peer_of(&f.key, b));
                }
                gone.push(*b);
            }
        }
        self.release_origins(&f.key, &gone);
        debug!(frontend = %frontend_string(&f.key), backends = list.len(), "programmed");
        self.programmed.insert(
            f.key,
            Programmed {
                value,
                backends: list,
                gen_len,
            },
        );
        Ok(true)
    }

    /// Steps 1 – 3 of [`Dataplane::upsert`]: the frontend's backends
    /// (new ones get ids and `BACKENDS` entries, their ids pushed to
    /// `fresh`), the slots of `generation` (the one not live; `gen_len`
    /// covers every slot written), and the flip that makes it live.
    fn write_generation(
        &mut self,
        f: &Frontend,
        id: u32,
        generation: u32,
        gen_len: &mut [u16; 2],
        kept: &StdHashMap<Backend, u32>,
        fresh: &mut Vec<u32>,
    ) -> Result<(Vec<(u32, Backend)>, ServiceValue)> {
        let mut list = Vec::with_capacity(f.backends.len());
        for b in &f.backends {
            let bid = match kept.get(b) {
                Some(bid) => *bid,
                None => {
                    let bid = self.alloc_backend_id()?;
                    self.tables
                        .backends
                        .insert(bid, *b, 0)
                        .map_err(map_err(names::BACKENDS))?;
                    fresh.push(bid);
                    bid
                }
            };
            list.push((bid, *b));
        }
        // 2. the slots of the generation that is not live
        let values: Vec<SlotValue> = list
            .iter()
            .map(|(bid, backend)| SlotValue {
                backend: *backend,
                id: *bid,
                flags: if self.origins.is_origin(&f.key, backend) {
                    SLOT_ORIGIN
                } else {
                    0
                },
            })
            .collect();
        let g = generation as usize;
        for (slot, v) in values.iter().enumerate() {
            let k = SlotKey {
                service: id,
                generation: generation as u16,
                slot: slot as u16,
            };
            self.tables
                .slots
                .insert(k, *v, 0)
                .map_err(map_err(names::SLOTS))?;
            gen_len[g] = gen_len[g].max(slot as u16 + 1);
        }
        self.remove_slots(id, generation as u16, list.len() as u16..gen_len[g]);
        gen_len[g] = list.len() as u16;
        // 3. the flip, carrying the first slots of the new generation
        let mut inline = [SlotValue::default(); INLINE_SLOTS];
        for (slot, v) in inline.iter_mut().zip(&values) {
            *slot = *v;
        }
        let value = ServiceValue {
            id,
            count: list.len() as u32,
            generation,
            affinity_timeout: f.affinity_timeout,
            inline,
        };
        self.tables
            .services
            .insert(f.key, value, 0)
            .map_err(map_err(names::SERVICES))?;
        Ok((list, value))
    }

    /// Removes the `slots` of frontend `id`'s `generation`.
    fn remove_slots(&mut self, id: u32, generation: u16, slots: std::ops::Range<u16>) {
        for slot in slots {
            let _ = self.tables.slots.remove(&SlotKey {
                service: id,
                generation,
                slot,
            });
        }
    }

    /// What a failed [`Dataplane::write_generation`] left (the flip not
    /// made, so no reader uses `generation`): its slots and the backend
    /// entries it added go, and the frontend keeps no slot count for
    /// that generation. A retry starts clean instead of leaking again.
    fn undo_generation(
        &mut self,
        key: &ServiceKey,
        id: u32,
        generation: u32,
        gen_len: [u16; 2],
        fresh: &[u32],
    ) {
        let g = generation as usize;
        self.remove_slots(id, generation as u16, 0..gen_len[g]);
        for bid in fresh {
            let _ = self.tables.backends.remove(bid);
        }
        if let Some(p) = self.programmed.get_mut(key) {
            p.gen_len[g] = 0;
        }
    }

    /// Removes a frontend: the entry clients look up first, then what it
    /// pointed to.
    pub fn remove(&mut self, key: &ServiceKey) -> Result<bool> {
        let Some(p) = self.programmed.remove(key) else {
            return Ok(false);
        };
        match self.tables.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(names::SERVICES)(e)),
        }
        for generation in 0..2u16 {
            self.remove_slots(p.value.id, generation, 0..p.gen_len[generation as usize]);
        }
        for (bid, b) in &p.backends {
            let _ = self.tables.backends.remove(bid);
            if key.proto == PROTO_UDP {
                self.left.push(peer_of(key, b));
            }
        }
        self.release_origins(key, p.backends.iter().map(|(_, b)| b));
        if let Some(owner) = self.owner.remove(key)
            && let Some(set) = self.owned.get_mut(&owner)
        {
            set.remove(key);
        }
        debug!(frontend = %frontend_string(key), "removed");
        Ok(true)
    }

    /// Programs one service's frontends and removes those it no longer has.
    /// A frontend that another service already owns is refused. Returns the
    /// number of frontends written or removed.
    pub fn sync_service(
        &mut self,
        service: &str,
        frontends: &[Frontend],
    ) -> Result<(usize, Vec<ServiceError>)> {
        let r = self.sync_one(service, frontends);
        self.terminate_left();
        self.expire_origins();
        r
    }

    fn sync_one(
        &mut self,
        service: &str,
        frontends: &[Frontend],
    ) -> Result<(usize, Vec<ServiceError>)> {
        let mut changed = 0;
        let mut errors = Vec::new();
        let wanted: BTreeSet<ServiceKey> = frontends.iter().map(|f| f.key).collect();
        let previous = self.owned.get(service).cloned().unwrap_or_default();
        for key in previous.difference(&wanted) {
            if self.remove(key)? {
                changed += 1;
            }
        }
        let mut mine = BTreeSet::new();
        for f in frontends {
            if let Some(other) = self.owner.get(&f.key)
                && other != service
            {
                errors.push(ServiceError::FrontendTaken {
                    service: service.to_string(),
                    frontend: frontend_string(&f.key),
                    owner: other.clone(),
                });
                continue;
            }
            if self.upsert(f)? {
                changed += 1;
            }
            self.owner.insert(f.key, service.to_string());
            mine.insert(f.key);
        }
        if mine.is_empty() {
            self.owned.remove(service);
        } else {
            self.owned.insert(service.to_string(), mine);
        }
        Ok((changed, errors))
    }

    /// Makes the maps hold exactly `desired`: frontends of services not in
    /// it (including ones adopted from an earlier agent) are removed, the
    /// rest written where they differ.
    pub fn sync_all(
        &mut self,
        desired: &BTreeMap<String, Vec<Frontend>>,
    ) -> Result<(usize, Vec<ServiceError>)> {
        let mut changed = 0;
        // First every service gives up what it no longer wants, so that a
        // frontend moving from one service to another is free when the new
        // owner's turn comes, whatever the order.
        let dropped: Vec<ServiceKey> = self
            .owned
            .iter()
            .flat_map(|(service, keys)| {
                let still = desired.get(service);
                keys.iter()
                    .filter(move |k| !still.is_some_and(|fs| fs.iter().any(|f| f.key == **k)))
                    .copied()
            })
            .collect();
        for key in &dropped {
            // `remove` also takes the key out of its owner's set.
            if self.remove(key)? {
                changed += 1;
            }
        }
        self.owned.retain(|_, keys| !keys.is_empty());
        // Then frontends nobody owns and nobody wants (adopted from an
        // earlier agent) go.
        let wanted: BTreeSet<ServiceKey> = desired.values().flatten().map(|f| f.key).collect();
        let gone: Vec<ServiceKey> = self
            .programmed
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in &gone {
            if self.remove(key)? {
                changed += 1;
            }
        }
        let mut errors = Vec::new();
        for (service, frontends) in desired {
            let (n, e) = self.sync_one(service, frontends)?;
            changed += n;
            errors.extend(e);
        }
        self.terminate_left();
        self.expire_origins();
        self.swap_programs()?;
        Ok((changed, errors))
    }

    /// Puts this agent's programs into the links an earlier agent left
    /// (once: after the first full sync). A link that refuses is unpinned,
    /// so that the next start attaches anew, and the error returned.
    fn swap_programs(&mut self) -> Result<()> {
        for Swap {
            program,
            link,
            link_path,
            prog,
        } in std::mem::take(&mut self.swaps)
        {
            if let Err(source) = super::sys::update_link(link.as_fd(), prog.as_fd()) {
                let _ = fs::remove_file(&link_path);
                return Err(DataplaneError::Swap { program, source });
            }
            info!(program, "replaced the program in the pinned link");
        }
        Ok(())
    }
}

/// How full one pinned map is, as `proxy maps` prints it.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    /// The kernel's map type, as aya names it.
    pub kind: String,
    /// Entries held; an array always holds `max_entries`.
    pub entries: u64,
    pub max_entries: u32,
}

/// The fill of every map pinned under `pin_dir`, by name: how close the
/// tables are to their sizes (an LRU past it evicts, a hash refuses).
pub fn map_fill(pin_dir: &Path) -> Result<Vec<MapFill>> {
    use aya::maps::MapType;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let dir = pin_dir.join("maps");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let path = entry.map_err(io_err(&dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err("pinned map"))?;
        let kind = info.map_type().map_err(map_err("pinned map"))?;
        let entries = match kind {
            // Socket storage has no size and cannot be walked: it holds one
            // record per live translated socket, freed with the socket.
            MapType::SkStorage => continue,
            MapType::Array | MapType::PerCpuArray | MapType::ArrayOfMaps => {
                u64::from(info.max_entries())
            }
            _ => {
                let fd = info.fd().map_err(map_err("pinned map"))?;
                // A per-CPU map's value is one slot per possible CPU, each
                // rounded up to 8 bytes.
                let value_size = match kind {
                    MapType::PerCpuHash | MapType::LruPerCpuHash => {
                        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1));
                        (info.value_size() as usize).next_multiple_of(8) * cpus
                    }
                    _ => info.value_size() as usize,
                };
                count_entries(fd.as_fd().as_raw_fd(), info.key_size() as usize, value_size)
                    .map_err(io_err(&path))?
            }
        };
        out.push(MapFill {
            name,
            kind: format!("{kind:?}"),
            entries,
            max_entries: info.max_entries(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Entries of the map behind `fd`: read in batches where the map kind
/// allows it, else walked key by key.
fn count_entries(fd: i32, key_size: usize, value_size: usize) -> std::io::Result<u64> {
    match count_batched(fd, key_size, value_size)? {
        Some(n) => Ok(n),
        None => count_keys(fd, key_size),
    }
}

/// Entries of the map behind `fd`, read `BATCH` at a time with
/// `BPF_MAP_LOOKUP_BATCH`: a full 262 144-entry table in 64 calls instead
/// of one call per key. None for a map kind without batch lookup.
fn count_batched(fd: i32, key_size: usize, value_size: usize) -> std::io::Result<Option<u64>> {
    use super::sys::{put32, put64, sys_bpf};
    const BPF_MAP_LOOKUP_BATCH: u32 = 24;
    const BATCH: usize = 4096;
    /// The kernel's ENOTSUPP, which batch calls answer for map kinds that
    /// have none.
    const ENOTSUPP: i32 = 524;
    // The position tokens are a bucket number for hash maps and a key for
    // others.
    let token = key_size.max(8);
    let mut in_batch = vec![0u8; token];
    let mut out_batch = vec![0u8; token];
    let mut keys = vec![0u8; key_size.max(1) * BATCH];
    let mut values = vec![0u8; value_size.max(1) * BATCH];
    let mut n = 0u64;
    let mut first = true;
    loop {
        // union bpf_attr's batch: in_batch, out_batch, keys, values,
        // count, map_fd, elem_flags, flags.
        let mut attr = [0u8; 56];
        put64(
            &mut attr,
            0,
            if first { 0 } else { in_batch.as_ptr() as u64 },
        );
        put64(&mut attr, 8, out_batch.as_mut_ptr() as u64);
        put64(&mut attr, 16, keys.as_mut_ptr() as u64);
        put64(&mut attr, 24, values.as_mut_ptr() as u64);
        put32(&mut attr, 32, BATCH as u32);
        put32(&mut attr, 36, fd as u32);
        // SAFETY: the kernel writes at most `count` (BATCH) keys and values
        // into buffers that long, and one token of at most the key's size
        // (or a u32) into out_batch.
        let r = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // The kernel writes back how many it copied, also with ENOENT
        // (the last, partial batch).
        let count = u64::from(u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]));
        if let Err(e) = r {
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(Some(n + count)),
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => Ok(None),
                _ => Err(e),
            };
        }
        n += count;
        first = false;
        std::mem::swap(&mut in_batch, &mut out_batch);
    }
}

/// Keys in the map behind `fd`, walked with `BPF_MAP_GET_NEXT_KEY`.
fn count_keys(fd: i32, key_size: usize) -> std::io::Result<u64> {
    use super::sys::{put32, put64, sys_bpf};
    const BPF_MAP_GET_NEXT_KEY: u32 = 4;
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0u64;
    let mut first = true;
    loop {
        // union bpf_attr for this command: map_fd, pad, key, next_key.
        let mut attr = [0u8; 24];
        put32(&mut attr, 0, fd as u32);
        put64(&mut attr, 8, if first { 0 } else { key.as_ptr() as u64 });
        put64(&mut attr, 16, next.as_mut_ptr() as u64);
        // SAFETY: the kernel reads key_size bytes of `key` and writes as
        // many to `next`, both that long.
        match unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// Time spent in each attached program and its run count, while the
/// kernel counts (`kernel.bpf_stats_enabled` = 1): what each connect,
/// sendmsg or recvmsg costs in the programs.
pub fn program_stats(pin_dir: &Path) -> Vec<(&'static str, std::time::Duration, u64)> {
    let ids: StdHashMap<u32, &'static str> = PROGRAMS
        .iter()
        .filter_map(|program| {
            let link = pin_dir.join("links").join(program);
            Some((super::sys::link_program_id(&link).ok()?, *program))
        })
        .collect();
    stats_of(&ids)
}

/// Run time and count (kernel.bpf_stats_enabled) of the programs with
/// these ids, by name: one pass over the loaded programs.
pub(super) fn stats_of(
    ids: &StdHashMap<u32, &'static str>,
) -> Vec<(&'static str, std::time::Duration, u64)> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| Some((*ids.get(&p.id())?, p.run_time(), p.run_count())))
        .collect()
}

/// Detaches the programs (by unpinning their links) and removes the pinned
/// maps: the inverse of `install`.
pub fn uninstall(pin_dir: &Path) -> Result<()> {
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(pin_dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::{count_batched, count_keys};
    use crate::proxy::sys::{put32, put64, sys_bpf};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    /// A map of `kind` with u64 keys and 40-byte values holding `n` entries.
    fn filled(kind: u32, max: u32, n: u64) -> OwnedFd {
        const BPF_MAP_CREATE: u32 = 0;
        const BPF_MAP_UPDATE_ELEM: u32 = 2;
        let mut attr = [0u8; 72];
        put32(&mut attr, 0, kind);
        put32(&mut attr, 4, 8);
        put32(&mut attr, 8, 40);
        put32(&mut attr, 12, max);
        // SAFETY: map creation reads only the attribute block.
        let fd =
            unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }.expect("creating a map (needs root)");
        // SAFETY: a new fd the kernel just returned, owned here alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let value = [7u8; 40];
        for k in 0..n {
            let key = (k * 7919).to_ne_bytes();
            let mut attr = [0u8; 32];
            put32(&mut attr, 0, fd.as_raw_fd() as u32);
            put64(&mut attr, 8, key.as_ptr() as u64);
            put64(&mut attr, 16, value.as_ptr() as u64);
            // SAFETY: the kernel reads the key and value, both of the map's
            // sizes.
            unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.expect("map update");
        }
        fd
    }

    #[test]
    fn batch_counts_agree_with_the_key_walk_across_several_batches() {
        const HASH: u32 = 1;
        const LRU_HASH: u32 = 9;
        for (kind, n) in [(HASH, 0), (HASH, 1), (HASH, 10_000), (LRU_HASH, 9_000)] {
            let fd = filled(kind, 16_384, n);
            let fd = fd.as_raw_fd();
            let batched = count_batched(fd, 8, 40).expect("batch count");
            assert_eq!(batched, Some(n), "kind {kind}");
            assert_eq!(count_keys(fd, 8).expect("key walk"), n, "kind {kind}");
        }
    }
}
