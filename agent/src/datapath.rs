//! The only module that talks to the kernel's BPF side: loads the programs with their
//! maps pinned under the pin directory, attaches to pod interfaces, and writes the
//! difference between the tables the kernel holds and the tables it should hold.

pub mod dns;
pub mod events;
pub mod image;
mod pins;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, ProgramError, SchedClassifier,
        TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use egret_common::{
    COUNTER_SLOTS, Reason, Verdict, counter_pair,
    maps::{
        CT_STAT_INSERT_FAILED, CT_STAT_INSERTED_ESTABLISHED, CT_STAT_INSERTED_UNASSURED,
        CT_STAT_REMOVED_ESTABLISHED, CT_STAT_REMOVED_UNASSURED, CT_STAT_WRITTEN_BY_AGENT, CidrKey,
        CounterValue, Endpoint, FLOW_STATE_ASSURED, FLOW_STATE_ESTABLISHED, FlowEntry, FlowKey,
        IpKey, LegacyFlowState, PolicyKey, PolicyValue, Settings, capacity, counter_entries, names,
    },
    proto,
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

/// What to do when the pin directory is not on a bpffs. `ip netns exec` mounts a fresh
/// /sys without the host's bpffs: the usual way to meet these errors.
const BPFFS_HINT: &str = "; pinned maps and links need a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs a directory on one; under `ip netns exec`, which mounts a /sys without the host's bpffs, run in the host's mount namespace instead (nsenter --net=/run/netns/NAME egret run ...)";

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("{} is not on a bpf filesystem{BPFFS_HINT}", path.display())]
    NotBpffs { path: PathBuf },
    #[error(
        "cannot create pin directory {}: {source}{}{BPFFS_HINT}",
        path.display(),
        if source.kind() == std::io::ErrorKind::NotFound {
            " (no bpf filesystem is mounted above it in this mount namespace)"
        } else {
            ""
        }
    )]
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
    #[error("counting this machine's possible CPUs: {source}")]
    Cpus { source: std::io::Error },
}

/// Sizes of the table maps (`max_entries`).
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub endpoints: u32,
    pub identities: u32,
    pub cidrs: u32,
    pub policy: u32,
    /// Endpoint rows of the counter array; endpoints numbered beyond share an overflow row.
    pub counter_endpoints: u32,
    /// Established flows (`CT_ESTABLISHED_V2`).
    pub ct_established: u32,
    /// Unassured and closing flows (`CT_UNASSURED_V2`).
    pub ct_unassured: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            identities: capacity::IDENTITIES,
            cidrs: capacity::CIDRS,
            policy: capacity::POLICY,
            counter_endpoints: capacity::COUNTER_ENDPOINTS,
            ct_established: capacity::CT_ESTABLISHED,
            ct_unassured: capacity::CT_UNASSURED,
        }
    }
}

/// A counter of the kernel's: which endpoint, and which verdict for which reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey {
    /// The endpoint id, or [`CounterKey::OVERFLOW`].
    pub endpoint: u32,
    pub verdict: Verdict,
    pub reason: Reason,
}

impl CounterKey {
    /// The row that endpoints numbered beyond the counter array share.
    pub const OVERFLOW: u32 = u32::MAX;
}

/// The connection tracker's tables and what it did, read from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    pub established_entries: u64,
    pub unassured_entries: u64,
    pub inserted_established: u64,
    pub inserted_unassured: u64,
    pub removed_established: u64,
    pub removed_unassured: u64,
    pub insert_failures: u64,
}

impl ConntrackStats {
    /// Entries the LRU pushed out to make room: inserted, not removed, and gone.
    #[must_use]
    pub fn evicted_established(&self) -> u64 {
        self.inserted_established
            .saturating_sub(self.removed_established)
            .saturating_sub(self.established_entries)
    }

    #[must_use]
    pub fn evicted_unassured(&self) -> u64 {
        self.inserted_unassured
            .saturating_sub(self.removed_unassured)
            .saturating_sub(self.unassured_entries)
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
    counters: PerCpuArray<MapData, CounterValue>,
    counter_rows: u32,
    established_flows: HashMap<MapData, FlowKey, FlowEntry>,
    ct_stats: PerCpuArray<MapData, u64>,
    /// `domainNames` patterns and lifetimes.
    dns: dns::DnsMaps,
    /// The settings last written, with the current policy epoch.
    settings_value: Settings,
    /// Endpoint ids whose counter rows may be non-zero.
    counted_endpoints: std::collections::BTreeSet<u32>,
    /// Kernel log records (aya-log), when the `egret::kernel` target is enabled.
    kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
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
        let kernel_log_level = KernelLog::level();
        // 0 turns every kernel log statement off: one load and a branch each.
        let aya_log_level: u8 = kernel_log_level.map_or(0, |level| level as u8);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(names::ENDPOINT, capacities.endpoints)
            .map_max_entries(names::ENDPOINT_CGROUP, capacities.endpoints)
            .map_max_entries(names::IDENTITY, capacities.identities)
            .map_max_entries(names::CIDR, capacities.cidrs)
            .map_max_entries(names::POLICY, capacities.policy)
            .map_max_entries(
                names::COUNTERS,
                counter_entries(capacities.counter_endpoints),
            )
            .map_max_entries(names::CT_ESTABLISHED, capacities.ct_established)
            .map_max_entries(names::CT_UNASSURED, capacities.ct_unassured)
            .override_global("COUNTER_ROWS", &capacities.counter_endpoints, true)
            .override_global(aya_log::LEVEL, &aya_log_level, true)
            .load(OBJECT)?;
        let kernel_log = kernel_log_level.and_then(|_| {
            aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog)
                .inspect_err(|error| warn!(%error, "kernel log records unavailable"))
                .ok()
        });
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
        let established_flows = take_map(&mut ebpf, names::CT_ESTABLISHED)?;
        let ct_stats = take_map(&mut ebpf, names::CT_STATS)?;
        let mut datapath = Self {
            dns: dns::DnsMaps::take_with_defaults(&mut ebpf)?,
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
            counter_rows: capacities.counter_endpoints,
            established_flows,
            ct_stats,
            settings_value: Settings::DEFAULT,
            counted_endpoints: std::collections::BTreeSet::new(),
            kernel_log,
            held: KernelImage::default(),
        };
        datapath.held = datapath.read_held()?;
        // Go on from the epoch an earlier agent left: any other number would do, but
        // a fresh one makes every cached verdict be judged once more against our tables.
        if let Ok(previous) = datapath.settings.get(&0, 0) {
            datapath.settings_value.policy_epoch = previous.policy_epoch.wrapping_add(1);
        }
        datapath.counted_endpoints = datapath
            .held
            .endpoints
            .values()
            .chain(datapath.held.cgroup_endpoints.values())
            .map(|endpoint| endpoint.id)
            .collect();
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
        image.dns_names = self.dns.read_names()?;
        Ok(image)
    }

    /// Zeroes the counter rows of endpoints not in `live` (their pods are gone), so
    /// their metric series disappear and a later endpoint given the number starts at 0.
    ///
    /// # Errors
    /// When the counters map cannot be written.
    pub fn prune_counters(
        &mut self,
        live: &std::collections::BTreeSet<u32>,
    ) -> Result<usize, DatapathError> {
        let stale: Vec<u32> = self
            .counted_endpoints
            .iter()
            .copied()
            .filter(|id| *id != egret_common::maps::UNKNOWN_ENDPOINT_ID && !live.contains(id))
            .collect();
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus { source })?;
        let zero = || {
            PerCpuValues::try_from(vec![CounterValue::default(); cpus])
                .map_err(|source| DatapathError::Cpus { source })
        };
        for id in &stale {
            self.counted_endpoints.remove(id);
            if *id >= self.counter_rows {
                continue;
            }
            for slot in 0..COUNTER_SLOTS {
                self.counters
                    .set(id * COUNTER_SLOTS + slot, zero()?, 0)
                    .map_err(|source| DatapathError::Map {
                        map: names::COUNTERS,
                        source,
                    })?;
            }
        }
        Ok(stale.len())
    }

    /// Writes flows the kernel's connection tracking already knows for a pod Egret has
    /// just attached to (see [`crate::node::conntrack`]), so its established connections go on.
    ///
    /// # Errors
    /// When the conntrack map refuses an entry.
    pub fn seed_flows(&mut self, flows: &[(FlowKey, u8)]) -> Result<(), DatapathError> {
        let now_ns = monotonic_coarse_ns();
        for (key, origin) in flows {
            self.write_established_flow(key, *origin, now_ns)?;
        }
        self.count_written_flows(flows.len())
    }

    /// Writes a flow the kernel programs did not see open as established: the kernel's
    /// own conntrack (or an earlier agent's table) vouches for it.
    fn write_established_flow(
        &mut self,
        key: &FlowKey,
        origin: u8,
        last_seen_ns: u64,
    ) -> Result<(), DatapathError> {
        let entry = FlowEntry {
            last_seen_ns,
            policy_epoch: self.settings_value.policy_epoch,
            origin,
            state: if key.protocol == proto::TCP {
                FLOW_STATE_ESTABLISHED
            } else {
                FLOW_STATE_ASSURED
            },
            fin: 0,
            flags: 0,
        };
        self.established_flows
            .insert(key, entry, 0)
            .map_err(|source| DatapathError::Map {
                map: names::CT_ESTABLISHED,
                source,
            })?;
        Ok(())
    }

    /// Adds flows userspace wrote to their counter, so the kernel's insert counts and
    /// the entries present still tell how many the LRU evicted.
    fn count_written_flows(&mut self, written: usize) -> Result<(), DatapathError> {
        if written == 0 {
            return Ok(());
        }
        let map_err = |source| DatapathError::Map {
            map: names::CT_STATS,
            source,
        };
        let mut values: Vec<u64> = self
            .ct_stats
            .get(&CT_STAT_WRITTEN_BY_AGENT, 0)
            .map_err(map_err)?
            .iter()
            .copied()
            .collect();
        if let Some(first) = values.first_mut() {
            *first += written as u64;
        }
        let values =
            PerCpuValues::try_from(values).map_err(|source| DatapathError::Cpus { source })?;
        self.ct_stats
            .set(CT_STAT_WRITTEN_BY_AGENT, values, 0)
            .map_err(map_err)
    }

    /// Takes over what an agent of the first map layout left pinned: its tracked flows
    /// move into the new tables (so replies of connections accepted before the upgrade
    /// still pass), then its maps are unpinned. Call once the links run the new
    /// programs, so the old programs no longer write the old table.
    ///
    /// # Errors
    /// When a legacy map cannot be read, or the new table refuses a flow.
    pub fn retire_legacy_maps(&mut self) -> Result<usize, DatapathError> {
        let legacy = self.pin_dir.join(names::LEGACY_CONNTRACK);
        let mut migrated = 0;
        if legacy.exists() {
            let map_err = |source| DatapathError::Map {
                map: names::LEGACY_CONNTRACK,
                source,
            };
            let data = MapData::from_pin(&legacy).map_err(map_err)?;
            let flows: HashMap<MapData, FlowKey, LegacyFlowState> =
                HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err)?;
            let entries: Vec<(FlowKey, LegacyFlowState)> =
                flows.iter().filter_map(Result::ok).collect();
            // The old table's clock was bpf_ktime_get_ns, on the same base as ours.
            for (key, state) in &entries {
                self.write_established_flow(key, state.origin, state.last_seen_ns)?;
            }
            migrated = entries.len();
            self.count_written_flows(migrated)?;
        }
        for name in names::LEGACY {
            let path = self.pin_dir.join(name);
            if path.exists() {
                let _ = std::fs::remove_file(&path);
            }
        }
        if migrated > 0 {
            info!(
                flows = migrated,
                "took over the flows of the first map layout"
            );
        }
        Ok(migrated)
    }

    /// The connection tracker's entry counts (a walk of both tables' keys) and the
    /// kernel's insert and remove counts.
    ///
    /// # Errors
    /// When a table cannot be read.
    pub fn conntrack_stats(&self) -> Result<ConntrackStats, DatapathError> {
        read_conntrack_stats(&self.pin_dir)
    }

    /// The kernel's log records (aya-log), when `egret::kernel` is enabled; there is
    /// one reader, so the first call takes it.
    pub fn take_kernel_log(&mut self) -> Option<aya_log::EbpfLogger<KernelLog>> {
        self.kernel_log.take()
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
    /// Sets how long learnt DNS answers admit new connections (`--dns-min-ttl`,
    /// `--dns-grace`).
    ///
    /// # Errors
    /// When the settings map cannot be written.
    pub fn set_dns_settings(
        &mut self,
        settings: egret_common::dns::DnsSettings,
    ) -> Result<(), DatapathError> {
        self.dns.set_settings(settings)
    }

    #[must_use]
    pub fn held(&self) -> &KernelImage {
        &self.held
    }

    /// # Errors
    /// When the settings map cannot be written.
    /// The policy epoch is the datapath's own: it changes with every apply that
    /// changes a table, whatever `settings` carries.
    pub fn set_settings(&mut self, settings: Settings) -> Result<(), DatapathError> {
        self.settings_value = Settings {
            policy_epoch: self.settings_value.policy_epoch,
            ..settings
        };
        self.write_settings()
    }

    fn write_settings(&mut self) -> Result<(), DatapathError> {
        self.settings
            .set(0, self.settings_value, 0)
            .map_err(|source| DatapathError::Map {
                map: names::SETTINGS,
                source,
            })
    }

    /// The policy epoch the kernel judges by now.
    #[must_use]
    pub fn policy_epoch(&self) -> u32 {
        self.settings_value.policy_epoch
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
        let dns_names = diff(&self.held.dns_names, &desired.dns_names);
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
        // Patterns before the endpoints whose flags make the kernel read them.
        stats.written += self.dns.write(&dns_names, &mut self.held.dns_names)?;
        // What the kernel learnt for a pod follows it to a new number before the switch.
        let numbers_before = endpoint_numbers(&self.held);
        let renumbered = renumbered(&self.held, &endpoints.upserts, &cgroup_endpoints.upserts);
        self.dns.carry(&renumbered, &numbers_before)?;
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
        stats.removed += self.dns.remove(&dns_names, &mut self.held.dns_names)?;
        let numbers_after = endpoint_numbers(&self.held);
        self.dns
            .forget(&numbers_before.difference(&numbers_after).copied().collect())?;
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
            // Tables changed: flows judged before are judged again on their next packet.
            self.settings_value.policy_epoch = self.settings_value.policy_epoch.wrapping_add(1);
            self.write_settings()?;
            self.counted_endpoints.extend(
                self.held
                    .endpoints
                    .values()
                    .chain(self.held.cgroup_endpoints.values())
                    .map(|endpoint| endpoint.id),
            );
            debug!(
                written = stats.written,
                removed = stats.removed,
                epoch = self.settings_value.policy_epoch,
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

/// The endpoint numbers `held` uses (interfaces and cgroups).
fn endpoint_numbers(held: &KernelImage) -> std::collections::BTreeSet<u32> {
    held.endpoints
        .values()
        .chain(held.cgroup_endpoints.values())
        .map(|endpoint| endpoint.id)
        .collect()
}

/// Old number -> new number of the endpoints whose entry `upserts` renumber.
fn renumbered(
    held: &KernelImage,
    upserts: &[(u32, Endpoint)],
    cgroup_upserts: &[(u64, Endpoint)],
) -> BTreeMap<u32, u32> {
    let interface_moves = upserts
        .iter()
        .filter_map(|(key, new)| Some((held.endpoints.get(key)?.id, new.id)));
    let cgroup_moves = cgroup_upserts
        .iter()
        .filter_map(|(key, new)| Some((held.cgroup_endpoints.get(key)?.id, new.id)));
    interface_moves
        .chain(cgroup_moves)
        .filter(|(old, new)| old != new)
        .collect()
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

/// Per-CPU counters summed, read from the pinned map (works while an agent runs): the
/// rows of the pinned endpoints, the unknown-endpoint row and the overflow row; zero
/// counts are left out.
///
/// # Errors
/// When the maps are not pinned under `pin_dir` or cannot be read.
pub fn read_counters(pin_dir: &Path) -> Result<BTreeMap<CounterKey, CounterValue>, DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: names::COUNTERS,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(names::COUNTERS)).map_err(map_err)?;
    let counters: PerCpuArray<MapData, CounterValue> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err)?;
    let rows = counters.len() / COUNTER_SLOTS - 1;
    let mut endpoints: std::collections::BTreeSet<u32> = read_endpoints(pin_dir)?
        .values()
        .map(|endpoint| endpoint.id)
        .collect();
    if let Ok(cgroup) = read_cgroup_endpoints(pin_dir) {
        endpoints.extend(cgroup.values().map(|endpoint| endpoint.id));
    }
    endpoints.insert(egret_common::maps::UNKNOWN_ENDPOINT_ID);
    let mut totals = BTreeMap::new();
    for (endpoint, row) in endpoints
        .into_iter()
        .filter(|id| *id < rows)
        .map(|id| (id, id))
        .chain([(CounterKey::OVERFLOW, rows)])
    {
        for slot in 0..COUNTER_SLOTS {
            let values = counters
                .get(&(row * COUNTER_SLOTS + slot), 0)
                .map_err(map_err)?;
            let total = values
                .iter()
                .fold(CounterValue::default(), |sum, v| CounterValue {
                    packets: sum.packets + v.packets,
                    bytes: sum.bytes + v.bytes,
                });
            if total.packets == 0 {
                continue;
            }
            if let Some((verdict, reason)) = counter_pair(slot) {
                totals.insert(
                    CounterKey {
                        endpoint,
                        verdict,
                        reason,
                    },
                    total,
                );
            }
        }
    }
    Ok(totals)
}

/// The connection tracker's state from the pinned maps.
///
/// # Errors
/// When a table is not pinned under `pin_dir` or cannot be read.
pub fn read_conntrack_stats(pin_dir: &Path) -> Result<ConntrackStats, DatapathError> {
    fn keys(pin_dir: &Path, name: &'static str) -> Result<u64, DatapathError> {
        let map_err = |source| DatapathError::Map { map: name, source };
        let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
        let flows: HashMap<MapData, FlowKey, FlowEntry> =
            HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err)?;
        Ok(flows.keys().flatten().count() as u64)
    }
    let map_err = |source| DatapathError::Map {
        map: names::CT_STATS,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(names::CT_STATS)).map_err(map_err)?;
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err)?;
    let stat = |slot: u32| -> Result<u64, DatapathError> {
        Ok(stats.get(&slot, 0).map_err(map_err)?.iter().sum())
    };
    Ok(ConntrackStats {
        established_entries: keys(pin_dir, names::CT_ESTABLISHED)?,
        unassured_entries: keys(pin_dir, names::CT_UNASSURED)?,
        inserted_established: stat(CT_STAT_INSERTED_ESTABLISHED)? + stat(CT_STAT_WRITTEN_BY_AGENT)?,
        inserted_unassured: stat(CT_STAT_INSERTED_UNASSURED)?,
        removed_established: stat(CT_STAT_REMOVED_ESTABLISHED)?,
        removed_unassured: stat(CT_STAT_REMOVED_UNASSURED)?,
        insert_failures: stat(CT_STAT_INSERT_FAILED)?,
    })
}

/// The tracked flows of both tables (for tests and `egret status`), established first.
///
/// # Errors
/// When a table is not pinned under `pin_dir` or cannot be read.
pub fn read_flows(pin_dir: &Path) -> Result<Vec<(FlowKey, FlowEntry, bool)>, DatapathError> {
    let mut flows = Vec::new();
    for (name, established) in [(names::CT_ESTABLISHED, true), (names::CT_UNASSURED, false)] {
        let map_err = |source| DatapathError::Map { map: name, source };
        let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err)?;
        let table: HashMap<MapData, FlowKey, FlowEntry> =
            HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(map_err)?;
        for item in &table {
            let (key, entry) = item.map_err(map_err)?;
            flows.push((key, entry, established));
        }
    }
    Ok(flows)
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the kernel programs' clock
/// (`bpf_ktime_get_coarse_ns`).
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Kernel log records (aya-log) as `tracing` events of target `egret::kernel`.
#[derive(Debug, Clone, Copy)]
pub struct KernelLog;

impl KernelLog {
    /// The most verbose level the subscriber takes for `egret::kernel`, if any: the
    /// kernel writes nothing more verbose, and nothing at all when it is off.
    fn level() -> Option<aya_log::Level> {
        use tracing::Level;
        [
            (Level::TRACE, aya_log::Level::Trace),
            (Level::DEBUG, aya_log::Level::Debug),
            (Level::INFO, aya_log::Level::Info),
            (Level::WARN, aya_log::Level::Warn),
            (Level::ERROR, aya_log::Level::Error),
        ]
        .into_iter()
        .find(|(level, _)| match *level {
            Level::TRACE => tracing::enabled!(target: "egret::kernel", Level::TRACE),
            Level::DEBUG => tracing::enabled!(target: "egret::kernel", Level::DEBUG),
            Level::INFO => tracing::enabled!(target: "egret::kernel", Level::INFO),
            Level::WARN => tracing::enabled!(target: "egret::kernel", Level::WARN),
            _ => tracing::enabled!(target: "egret::kernel", Level::ERROR),
        })
        .map(|(_, level)| level)
    }
}

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "egret::kernel", "{message}"),
            log::Level::Warn => tracing::warn!(target: "egret::kernel", "{message}"),
            log::Level::Info => tracing::info!(target: "egret::kernel", "{message}"),
            log::Level::Debug => tracing::debug!(target: "egret::kernel", "{message}"),
            log::Level::Trace => tracing::trace!(target: "egret::kernel", "{message}"),
        }
    }

    fn flush(&self) {}
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

/// Pinned endpoints of `--attach cgroup` (cgroup id -> endpoint).
///
/// # Errors
/// When the map is not pinned under `pin_dir` or cannot be read.
pub fn read_cgroup_endpoints(pin_dir: &Path) -> Result<BTreeMap<u64, Endpoint>, DatapathError> {
    let map_err = |source| DatapathError::Map {
        map: names::ENDPOINT_CGROUP,
        source,
    };
    let data = MapData::from_pin(pin_dir.join(names::ENDPOINT_CGROUP)).map_err(map_err)?;
    let endpoints: HashMap<MapData, u64, Endpoint> =
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
