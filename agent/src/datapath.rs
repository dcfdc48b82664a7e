//! The only module that talks to the kernel's BPF side: loads the programs with their
//! maps pinned under the pin directory, attaches to pod interfaces, and writes the
//! difference between the tables the kernel holds and the tables it should hold.

pub mod cgroups;
pub mod events;
pub mod image;
pub mod interfaces;
mod pins;
pub mod seed;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use egret_common::maps::{
    CidrKey, CounterKey, CounterValue, Endpoint, FlowKey, FlowState, IpKey, PolicyKey, PolicyValue,
    Settings, capacity, names,
};
use thiserror::Error;
use tracing::{debug, info, warn};

use self::image::{KernelImage, diff};

/// The kernel programs, built by `build.rs` from `agent-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egret"));

/// A TC program and where it attaches on a pod's host-side interface.
#[derive(Clone, Copy, Debug)]
struct TcProgram {
    name: &'static str,
    attach_type: TcAttachType,
    /// Name of its pinned links (`links/<pin_name>_if<ifindex>`).
    pin_name: &'static str,
}

/// Judges what a pod sends: TC ingress of its host-side interface.
const FROM_POD: TcProgram = TcProgram {
    name: "egret_from_pod",
    attach_type: TcAttachType::Ingress,
    pin_name: "from_pod",
};
/// Records the flows a pod accepts: TC egress of its host-side interface.
const TO_POD: TcProgram = TcProgram {
    name: "egret_to_pod",
    attach_type: TcAttachType::Egress,
    pin_name: "to_pod",
};
/// Passes everything; only for measuring the cost floor of a TC program.
const NOOP: TcProgram = TcProgram {
    name: "egret_noop",
    attach_type: TcAttachType::Ingress,
    pin_name: "noop",
};
/// `cgroup_skb` programs on a pod's cgroup (`--attach cgroup`), with their pinned-link names.
const CGROUP_PROGRAMS: [(&str, &str); 2] = [
    ("egret_cgroup_ingress", "cg_ingress"),
    ("egret_cgroup_egress", "cg_egress"),
];

/// Attach order: the recorder first, so replies pass from the first packet the judge sees.
const TC_PROGRAMS: [TcProgram; 2] = [TO_POD, FROM_POD];

/// Default pin directory on a node.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egret";

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("{} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)", path.display())]
    NotBpffs { path: PathBuf },
    #[error("cannot create pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("kernel object lacks {what} {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("attaching to interface {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error("pinning the link on {interface} at {}: {source}", path.display())]
    PinLink {
        interface: String,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("taking over pinned link {}: {source}", path.display())]
    UnpinLink {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the link on {interface} is not a bpf link: {source}")]
    NotFdLink {
        interface: String,
        source: LinkError,
    },
    #[error("reading pinned link {}: {source}", path.display())]
    PinnedLink { path: PathBuf, source: LinkError },
}

/// Sizes of the table maps (`max_entries`).
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub endpoints: u32,
    pub identities: u32,
    pub cidrs: u32,
    pub policy: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            identities: capacity::IDENTITIES,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
        }
    }
}

/// Counts of one apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    endpoints: HashMap<MapData, u32, Endpoint>,
    cgroup_endpoints: HashMap<MapData, u64, Endpoint>,
    identities: HashMap<MapData, IpKey, u32>,
    cidrs: LpmTrie<MapData, CidrKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    settings: Array<MapData, Settings>,
    events: Option<RingBuf<MapData>>,
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    /// What the kernel holds, read once at open and kept in step with every write.
    held: KernelImage,
}

impl Datapath {
    /// Loads the programs, creating the pinned maps or reusing those an earlier agent
    /// pinned, and reads what they hold.
    ///
    /// # Errors
    /// When the pin directory is not on bpffs, or the kernel refuses the programs.
    pub fn open(pin_dir: &Path, capacities: Capacities) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        if !pins::is_bpffs(pin_dir) {
            return Err(DatapathError::NotBpffs {
                path: pin_dir.to_owned(),
            });
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::ENDPOINT, capacities.endpoints)
            .map_max_entries(names::ENDPOINT_CGROUP, capacities.endpoints)
            .map_max_entries(names::IDENTITY, capacities.identities)
            .map_max_entries(names::CIDR, capacities.cidrs)
            .map_max_entries(names::POLICY, capacities.policy)
            .load(OBJECT)?;
        for tc in TC_PROGRAMS.into_iter().chain([NOOP]) {
            let program = classifier(&mut ebpf, tc)?;
            program.load().map_err(|source| DatapathError::Program {
                name: tc.name,
                source,
            })?;
        }

        for (name, _) in CGROUP_PROGRAMS {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            program
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        let endpoints = take_map(&mut ebpf, names::ENDPOINT)?;
        let cgroup_endpoints = take_map(&mut ebpf, names::ENDPOINT_CGROUP)?;
        let identities = take_map(&mut ebpf, names::IDENTITY)?;
        let cidrs = take_map(&mut ebpf, names::CIDR)?;
        let policy = take_map(&mut ebpf, names::POLICY)?;
        let settings = take_map(&mut ebpf, names::SETTINGS)?;
        let events = take_map(&mut ebpf, names::EVENTS)?;
        let counters = take_map(&mut ebpf, names::COUNTERS)?;
        let conntrack = take_map(&mut ebpf, names::CONNTRACK)?;
        let mut datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            endpoints,
            cgroup_endpoints,
            identities,
            cidrs,
            policy,
            settings,
            events: Some(events),
            counters,
            conntrack,
            held: KernelImage::default(),
        };
        datapath.held = datapath.read_held()?;
        info!(
            pin_dir = %pin_dir.display(),
            endpoints = datapath.held.endpoints.len(),
            policy_entries = datapath.held.policy.len(),
            "kernel programs loaded; pinned tables reused"
        );
        Ok(datapath)
    }

    fn read_held(&self) -> Result<KernelImage, DatapathError> {
        let mut image = image_of(&self.endpoints, &self.identities, &self.cidrs, &self.policy)?;
        for item in &self.cgroup_endpoints {
            let (k, v) = item.map_err(|source| DatapathError::Map {
                map: names::ENDPOINT_CGROUP,
                source,
            })?;
            image.cgroup_endpoints.insert(k, v);
        }
        Ok(image)
    }

    /// Deletes the counters of endpoints not in `live` (their pods are gone), so no
    /// entry is left behind and their metric series disappear.
    ///
    /// # Errors
    /// When the counters map cannot be read or written.
    pub fn prune_counters(
        &mut self,
        live: &std::collections::BTreeSet<u32>,
    ) -> Result<usize, DatapathError> {
        let map_err = |source| DatapathError::Map {
            map: names::COUNTERS,
            source,
        };
        let stale: Vec<CounterKey> = self
            .counters
            .keys()
            .filter_map(Result::ok)
            .filter(|key| {
                key.endpoint != egret_common::maps::UNKNOWN_ENDPOINT_ID
                    && !live.contains(&key.endpoint)
            })
            .collect();
        for key in &stale {
            remove_ignoring_absent(self.counters.remove(key)).map_err(map_err)?;
        }
        Ok(stale.len())
    }

    /// Writes flows the kernel's connection tracking already knows for a pod Egret has
    /// just attached to (see [`seed`]), so its established connections go on.
    ///
    /// # Errors
    /// When the conntrack map refuses an entry.
    pub fn seed_flows(&mut self, flows: &[(FlowKey, u8)]) -> Result<(), DatapathError> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
        // bpf_ktime_get_ns is CLOCK_MONOTONIC in nanoseconds.
        let now_ns = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(now.tv_nsec).unwrap_or(0);
        for (key, origin) in flows {
            let state = FlowState {
                last_seen_ns: now_ns,
                origin: *origin,
                pad: [0; 7],
            };
            self.conntrack
                .insert(key, state, 0)
                .map_err(|source| DatapathError::Map {
                    map: names::CONNTRACK,
                    source,
                })?;
        }
        Ok(())
    }

    /// The flow event stream; there is one reader, so the first call takes it.
    pub fn take_events(&mut self) -> Option<events::EventReader> {
        self.events.take().map(events::EventReader::new)
    }

    /// The kernel's count of events it could not deliver.
    ///
    /// # Errors
    /// When the counter map is missing.
    pub fn lost_events(&mut self) -> Result<events::LostEvents, DatapathError> {
        let counter = take_map(&mut self.ebpf, names::EVENTS_LOST)?;
        Ok(events::LostEvents { counter })
    }

    /// What the kernel holds now.
    #[must_use]
    pub fn held(&self) -> &KernelImage {
        &self.held
    }

    /// # Errors
    /// When the settings map cannot be written.
    pub fn set_settings(&mut self, settings: Settings) -> Result<(), DatapathError> {
        self.settings
            .set(0, settings, 0)
            .map_err(|source| DatapathError::Map {
                map: names::SETTINGS,
                source,
            })
    }

    /// Makes the kernel hold `desired`. New and changed entries go in before anything
    /// is removed, innermost tables first, so no allowed flow is denied mid-update:
    /// policy entries exist before an identity or class points at them, and an
    /// endpoint's flags change only once its entries are in place.
    ///
    /// # Errors
    /// The first write the kernel refuses (a full map, say). What was written stays
    /// written and is remembered, so the next apply resumes from there.
    pub fn apply(&mut self, desired: &KernelImage) -> Result<ApplyStats, DatapathError> {
        let mut stats = ApplyStats::default();
        let policy = diff(&self.held.policy, &desired.policy);
        let cidrs = diff(&self.held.cidrs, &desired.cidrs);
        let identities = diff(&self.held.identities, &desired.identities);
        let endpoints = diff(&self.held.endpoints, &desired.endpoints);
        let cgroup_endpoints = diff(&self.held.cgroup_endpoints, &desired.cgroup_endpoints);
        let map_err = |map| move |source| DatapathError::Map { map, source };

        for (key, value) in &policy.upserts {
            self.policy
                .insert(&Key::new(key.0, key.1), value, 0)
                .map_err(map_err(names::POLICY))?;
            self.held.policy.insert(*key, *value);
            stats.written += 1;
        }
        for (key, value) in &cidrs.upserts {
            self.cidrs
                .insert(&Key::new(key.0, key.1), value, 0)
                .map_err(map_err(names::CIDR))?;
            self.held.cidrs.insert(*key, *value);
            stats.written += 1;
        }
        for (key, value) in &identities.upserts {
            self.identities
                .insert(key, value, 0)
                .map_err(map_err(names::IDENTITY))?;
            self.held.identities.insert(*key, *value);
            stats.written += 1;
        }
        for (key, value) in &endpoints.upserts {
            self.endpoints
                .insert(key, value, 0)
                .map_err(map_err(names::ENDPOINT))?;
            self.held.endpoints.insert(*key, *value);
            stats.written += 1;
        }
        for (key, value) in &cgroup_endpoints.upserts {
            self.cgroup_endpoints
                .insert(key, value, 0)
                .map_err(map_err(names::ENDPOINT_CGROUP))?;
            self.held.cgroup_endpoints.insert(*key, *value);
            stats.written += 1;
        }
        for key in &cgroup_endpoints.removals {
            remove_ignoring_absent(self.cgroup_endpoints.remove(key))
                .map_err(map_err(names::ENDPOINT_CGROUP))?;
            self.held.cgroup_endpoints.remove(key);
            stats.removed += 1;
        }
        for key in &endpoints.removals {
            remove_ignoring_absent(self.endpoints.remove(key)).map_err(map_err(names::ENDPOINT))?;
            self.held.endpoints.remove(key);
            stats.removed += 1;
        }
        for key in &identities.removals {
            remove_ignoring_absent(self.identities.remove(key))
                .map_err(map_err(names::IDENTITY))?;
            self.held.identities.remove(key);
            stats.removed += 1;
        }
        for key in &cidrs.removals {
            remove_ignoring_absent(self.cidrs.remove(&Key::new(key.0, key.1)))
                .map_err(map_err(names::CIDR))?;
            self.held.cidrs.remove(key);
            stats.removed += 1;
        }
        for key in &policy.removals {
            remove_ignoring_absent(self.policy.remove(&Key::new(key.0, key.1)))
                .map_err(map_err(names::POLICY))?;
            self.held.policy.remove(key);
            stats.removed += 1;
        }
        if stats != ApplyStats::default() {
            debug!(
                written = stats.written,
                removed = stats.removed,
                "tables updated"
            );
        }
        Ok(stats)
    }

    /// Attaches both programs to `interface` (the pod's host side), unless links pinned
    /// by an earlier agent already hold it: those are switched to this agent's programs
    /// atomically, so enforcement never lapses.
    ///
    /// # Errors
    /// When neither tcx nor a clsact qdisc accepts a program.
    pub fn attach(&mut self, interface: &str, ifindex: u32) -> Result<(), DatapathError> {
        for tc in TC_PROGRAMS {
            self.attach_one(tc, interface, ifindex)?;
        }
        info!(%interface, ifindex, "attached");
        Ok(())
    }

    fn attach_one(
        &mut self,
        tc: TcProgram,
        interface: &str,
        ifindex: u32,
    ) -> Result<(), DatapathError> {
        let link_path = pins::link_path(&self.pin_dir, tc.pin_name, ifindex);
        let program = classifier(&mut self.ebpf, tc)?;
        let attach_error = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let link_id = match PinnedLink::from_pin(&link_path) {
            Ok(pinned) => {
                let link = pinned.unpin().map_err(|source| DatapathError::UnpinLink {
                    path: link_path.clone(),
                    source,
                })?;
                let link = SchedClassifierLink::try_from(link).map_err(|source| {
                    DatapathError::PinnedLink {
                        path: link_path.clone(),
                        source,
                    }
                })?;
                program.attach_to_link(link).map_err(attach_error)?
            }
            Err(_) => match program.attach_with_options(
                interface,
                tc.attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            ) {
                Ok(id) => id,
                Err(tcx_error) => {
                    // Kernels before 6.6 have no tcx: use a clsact qdisc (netlink).
                    debug!(%interface, error = %tcx_error, "tcx attach failed; trying clsact");
                    if let Err(error) = aya::programs::tc::qdisc_add_clsact(interface) {
                        debug!(%interface, %error, "clsact qdisc not added (it may exist)");
                    }
                    let id = program
                        .attach_with_options(
                            interface,
                            tc.attach_type,
                            TcAttachOptions::Netlink(NlOptions::default()),
                        )
                        .map_err(attach_error)?;
                    // Netlink filters outlive the agent without a pin.
                    let link = program.take_link(id).map_err(attach_error)?;
                    std::mem::forget(link);
                    return Ok(());
                }
            },
        };
        let link = program.take_link(link_id).map_err(attach_error)?;
        let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::NotFdLink {
            interface: interface.to_owned(),
            source,
        })?;
        fd_link
            .pin(&link_path)
            .map_err(|source| DatapathError::PinLink {
                interface: interface.to_owned(),
                path: link_path.clone(),
                source,
            })?;
        Ok(())
    }

    /// Attaches the cgroup programs to the pod cgroup at `path` (id `cgroup`), unless
    /// links pinned by an earlier agent already hold it (they keep running with the
    /// same pinned maps).
    ///
    /// # Errors
    /// When the cgroup cannot be opened or refuses the programs.
    pub fn attach_cgroup(&mut self, path: &Path, cgroup: u64) -> Result<(), DatapathError> {
        let cgroup_dir = std::fs::File::open(path).map_err(|source| DatapathError::Cgroup {
            path: path.to_owned(),
            source,
        })?;
        for (name, pin_name) in CGROUP_PROGRAMS {
            let link_path = pins::cgroup_link_path(&self.pin_dir, pin_name, cgroup);
            if link_path.exists() {
                continue;
            }
            let program: &mut CgroupSkb = self
                .ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing {
                    what: "program",
                    name,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            // A bpf link never shares a cgroup exclusively: the link API takes no
            // attach flags (Single means none), and other links on the cgroup still run.
            let attach_type = if pin_name == "cg_egress" {
                CgroupSkbAttachType::Egress
            } else {
                CgroupSkbAttachType::Ingress
            };
            let attach_error = |source| DatapathError::Attach {
                interface: path.display().to_string(),
                source,
            };
            let id = program
                .attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link = program.take_link(id).map_err(attach_error)?;
            let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::NotFdLink {
                interface: path.display().to_string(),
                source,
            })?;
            fd_link
                .pin(&link_path)
                .map_err(|source| DatapathError::PinLink {
                    interface: path.display().to_string(),
                    path: link_path.clone(),
                    source,
                })?;
        }
        info!(cgroup = %path.display(), id = cgroup, "attached to the pod's cgroup");
        Ok(())
    }

    /// Cgroup ids that have pinned links.
    #[must_use]
    pub fn pinned_cgroup_links(&self) -> Vec<u64> {
        pins::pinned_cgroup_ids(&self.pin_dir)
    }

    /// Detaches the cgroup programs from cgroup `cgroup` (the pod is gone).
    pub fn detach_cgroup(&mut self, cgroup: u64) {
        for (_, pin_name) in CGROUP_PROGRAMS {
            let path = pins::cgroup_link_path(&self.pin_dir, pin_name, cgroup);
            match PinnedLink::from_pin(&path) {
                Ok(pinned) => drop(pinned.unpin()),
                Err(_) => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Ifindexes that have a pinned link.
    #[must_use]
    pub fn pinned_links(&self) -> Vec<u32> {
        pins::pinned_link_ifindexes(&self.pin_dir, FROM_POD.pin_name)
    }

    /// Detaches and unpins the links on `ifindex` (the pod is gone or no longer local).
    pub fn detach(&mut self, ifindex: u32) {
        for tc in TC_PROGRAMS {
            let path = pins::link_path(&self.pin_dir, tc.pin_name, ifindex);
            match PinnedLink::from_pin(&path) {
                // Dropping the unpinned link closes its last fd: the kernel detaches it.
                Ok(pinned) => match pinned.unpin() {
                    Ok(link) => drop(link),
                    Err(error) => warn!(ifindex, %error, "cannot unpin link"),
                },
                Err(error) => {
                    debug!(ifindex, %error, "no pinned link to detach");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// Which program a `BPF_PROG_TEST_RUN` exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestProgram {
    /// The judge of what pods send.
    FromPod,
    /// The flow recorder of what reaches pods.
    ToPod,
    /// A program that passes everything: the floor of per-packet cost.
    Noop,
}

/// One `BPF_PROG_TEST_RUN`: the program's return code and the kernel's average time.
#[derive(Clone, Copy, Debug)]
pub struct TestRunOutcome {
    /// `TC_ACT_OK` (0) passes, `TC_ACT_SHOT` (2) drops.
    pub return_code: u32,
    pub duration: std::time::Duration,
}

impl Datapath {
    /// Runs a program on an Ethernet frame with `BPF_PROG_TEST_RUN`, `repeat` times. The
    /// kernel runs it as if received on the loopback device, so the endpoint under test
    /// is the one at ifindex 1.
    ///
    /// # Errors
    /// When the kernel refuses the run.
    pub fn test_run(
        &mut self,
        program: TestProgram,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let tc = match program {
            TestProgram::FromPod => FROM_POD,
            TestProgram::ToPod => TO_POD,
            TestProgram::Noop => NOOP,
        };
        let classifier = classifier(&mut self.ebpf, tc)?;
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.repeat = repeat.max(1);
        let result = classifier
            .test_run(options)
            .map_err(|source| DatapathError::Program {
                name: tc.name,
                source,
            })?;
        Ok(TestRunOutcome {
            return_code: result.return_value,
            duration: result.duration,
        })
    }
}

fn classifier(ebpf: &mut Ebpf, tc: TcProgram) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(tc.name)
        .ok_or(DatapathError::Missing {
            what: "program",
            name: tc.name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: tc.name,
            source,
        })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { what: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

fn remove_ignoring_absent(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Per-CPU counters summed, read from the pinned map (works while an agent runs).
///
/// # Errors
/// When the map is not pinned under `pin_dir` or cannot be read.
pub fn read_counters(pin_dir: &Path) -> Result<BTreeMap<CounterKey, CounterValue>, DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: names::COUNTERS,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(names::COUNTERS)).map_err(map_err)?;
    let counters: PerCpuHashMap<MapData, CounterKey, CounterValue> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data)).map_err(map_err)?;
    let mut totals = BTreeMap::new();
    for item in &counters {
        let (key, values) = item.map_err(map_err)?;
        let total = values
            .iter()
            .fold(CounterValue::default(), |sum, v| CounterValue {
                packets: sum.packets + v.packets,
                bytes: sum.bytes + v.bytes,
            });
        totals.insert(key, total);
    }
    Ok(totals)
}

/// Pinned endpoints (ifindex -> endpoint), read from the pinned map.
///
/// # Errors
/// When the map is not pinned under `pin_dir` or cannot be read.
pub fn read_endpoints(pin_dir: &Path) -> Result<BTreeMap<u32, Endpoint>, DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: names::ENDPOINT,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(names::ENDPOINT)).map_err(map_err)?;
    let endpoints: HashMap<MapData, u32, Endpoint> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
    endpoints.iter().map(|item| item.map_err(map_err)).collect()
}

/// Removes everything Egret attached and pinned under `pin_dir`.
///
/// # Errors
/// When the pin directory cannot be read or removed.
pub fn cleanup(pin_dir: &Path) -> std::io::Result<usize> {
    pins::remove_all(pin_dir)
}

/// The tables as pinned under `pin_dir` (works while an agent runs, or after it left).
///
/// # Errors
/// When a map is not pinned there or cannot be read.
pub fn read_pinned_image(pin_dir: &Path) -> Result<KernelImage, DatapathError> {
    fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(
        pin_dir: &Path,
        name: &'static str,
        wrap: fn(MapData) -> aya::maps::Map,
    ) -> Result<T, DatapathError> {
        let map_err = |source| DatapathError::Map { map: name, source };
        let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
        T::try_from(wrap(data)).map_err(map_err)
    }
    image_of(
        &open(pin_dir, names::ENDPOINT, aya::maps::Map::HashMap)?,
        &open(pin_dir, names::IDENTITY, aya::maps::Map::HashMap)?,
        &open(pin_dir, names::CIDR, aya::maps::Map::LpmTrie)?,
        &open(pin_dir, names::POLICY, aya::maps::Map::LpmTrie)?,
    )
}

/// Everything the four table maps hold.
fn image_of(
    endpoints: &HashMap<MapData, u32, Endpoint>,
    identities: &HashMap<MapData, IpKey, u32>,
    cidrs: &LpmTrie<MapData, CidrKey, u32>,
    policy: &LpmTrie<MapData, PolicyKey, PolicyValue>,
) -> Result<KernelImage, DatapathError> {
    let map_err = |map| move |source| DatapathError::Map { map, source };
    let mut image = KernelImage::default();
    for item in endpoints {
        let (k, v) = item.map_err(map_err(names::ENDPOINT))?;
        image.endpoints.insert(k, v);
    }
    for item in identities {
        let (k, v) = item.map_err(map_err(names::IDENTITY))?;
        image.identities.insert(k, v);
    }
    for item in cidrs {
        let (k, v) = item.map_err(map_err(names::CIDR))?;
        image.cidrs.insert((k.prefix_len(), k.data()), v);
    }
    for item in policy {
        let (k, v) = item.map_err(map_err(names::POLICY))?;
        image.policy.insert((k.prefix_len(), k.data()), v);
    }
    Ok(image)
}
