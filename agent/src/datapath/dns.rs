//! The maps of `domainNames` rules: the patterns the agent writes per policy table,
//! the lifetimes it sets, and what the kernel learnt from DNS answers (read for
//! `status` and metrics).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
};
use egret_common::{
    dns::{
        DNS_STAT_DROPPED, DNS_STAT_EVICTED, DNS_STAT_EXPIRED, DNS_STAT_INVALID, DNS_STAT_LEARNT,
        DNS_STAT_REFRESHED, DNS_STAT_RESPONSES, DnsSettings, Learnt, LearntKey, NameEntry, NameKey,
        SlotKey,
    },
    maps::names,
};

use super::{DatapathError, image::Diff, remove_ignoring_absent, take_map};

/// The patterns table and the lifetimes, as the agent writes them; and what the kernel
/// learnt, which the agent moves or forgets when endpoint numbers change.
pub struct DnsMaps {
    names: HashMap<MapData, NameKey, NameEntry>,
    settings: Array<MapData, DnsSettings>,
    learnt: HashMap<MapData, LearntKey, Learnt>,
    /// An LRU in the kernel; aya reads both kinds of hash map alike.
    slots: HashMap<MapData, SlotKey, [u8; 16]>,
    cursors: HashMap<MapData, NameKey, u32>,
}

impl DnsMaps {
    /// Takes the maps out of the loaded object and sets the default lifetimes (the
    /// agent sets its flags' right after).
    ///
    /// # Errors
    /// When the object lacks them or the settings cannot be written.
    pub fn take_with_defaults(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let mut maps = Self {
            names: take_map(ebpf, names::DNS_NAMES)?,
            settings: take_map(ebpf, names::DNS_SETTINGS)?,
            learnt: take_map(ebpf, names::DNS_LEARNT)?,
            slots: take_map(ebpf, names::DNS_SLOTS)?,
            cursors: take_map(ebpf, names::DNS_CURSOR)?,
        };
        maps.set_settings(DnsSettings::DEFAULT)?;
        Ok(maps)
    }

    /// The patterns the kernel holds.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn read_names(&self) -> Result<BTreeMap<NameKey, NameEntry>, DatapathError> {
        let mut held = BTreeMap::new();
        for item in &self.names {
            let (key, value) = item.map_err(map_err(names::DNS_NAMES))?;
            held.insert(key, value);
        }
        Ok(held)
    }

    /// Writes the upserts of `diff` (before the endpoints that use them).
    ///
    /// # Errors
    /// The first write the kernel refuses.
    pub fn write(
        &mut self,
        diff: &Diff<NameKey, NameEntry>,
        held: &mut BTreeMap<NameKey, NameEntry>,
    ) -> Result<usize, DatapathError> {
        for (key, value) in &diff.upserts {
            self.names
                .insert(key, value, 0)
                .map_err(map_err(names::DNS_NAMES))?;
            held.insert(*key, *value);
        }
        Ok(diff.upserts.len())
    }

    /// Removes the removals of `diff` (after the endpoints stopped using them).
    ///
    /// # Errors
    /// The first removal the kernel refuses.
    pub fn remove(
        &mut self,
        diff: &Diff<NameKey, NameEntry>,
        held: &mut BTreeMap<NameKey, NameEntry>,
    ) -> Result<usize, DatapathError> {
        for key in &diff.removals {
            remove_ignoring_absent(self.names.remove(key)).map_err(map_err(names::DNS_NAMES))?;
            held.remove(key);
        }
        Ok(diff.removals.len())
    }

    /// Sets the lifetimes of learnt addresses (`--dns-min-ttl`, `--dns-grace`).
    ///
    /// # Errors
    /// When the settings map cannot be written.
    pub fn set_settings(&mut self, settings: DnsSettings) -> Result<(), DatapathError> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(names::DNS_SETTINGS))
    }
}

impl DnsMaps {
    /// Endpoints that change number (`(old, new)`: an agent restarted and numbered the
    /// pods afresh) keep what the kernel learnt for them: their learnt addresses, rings
    /// and cursors are copied to the new number before the endpoint entry switches to
    /// it, so no answer is lost and no connection sees a gap. Entries already under a
    /// new number that no endpoint holds yet (`held` are the numbers in use) are stale
    /// and go first. Returns the entries copied.
    ///
    /// # Errors
    /// The first read or write the kernel refuses.
    pub fn carry(
        &mut self,
        moves: &BTreeMap<u32, u32>,
        held: &BTreeSet<u32>,
    ) -> Result<usize, DatapathError> {
        if moves.is_empty() {
            return Ok(0);
        }
        let fresh: BTreeSet<u32> = moves
            .values()
            .copied()
            .filter(|id| !held.contains(id))
            .collect();
        self.forget(&fresh)?;
        let learnt = entries(&self.learnt, names::DNS_LEARNT, |key| {
            moves.get(&key.endpoint).map(|new| LearntKey {
                endpoint: *new,
                ..*key
            })
        })?;
        let slots = entries(&self.slots, names::DNS_SLOTS, |key| {
            moves.get(&key.endpoint).map(|new| SlotKey {
                endpoint: *new,
                ..*key
            })
        })?;
        let cursors = entries(&self.cursors, names::DNS_CURSOR, |key| {
            moves.get(&key.owner).map(|new| NameKey {
                owner: *new,
                ..*key
            })
        })?;
        // Rings and cursors before the addresses they account for.
        for (key, value) in &slots {
            self.slots
                .insert(key, value, 0)
                .map_err(map_err(names::DNS_SLOTS))?;
        }
        for (key, value) in &cursors {
            self.cursors
                .insert(key, value, 0)
                .map_err(map_err(names::DNS_CURSOR))?;
        }
        for (key, value) in &learnt {
            self.learnt
                .insert(key, value, 0)
                .map_err(map_err(names::DNS_LEARNT))?;
        }
        Ok(learnt.len())
    }

    /// Forgets what the kernel learnt for endpoint numbers no endpoint holds any more,
    /// so a pod given a freed number later never inherits another pod's answers.
    /// Returns the learnt addresses removed.
    ///
    /// # Errors
    /// The first read or removal the kernel refuses.
    pub fn forget(&mut self, gone: &BTreeSet<u32>) -> Result<usize, DatapathError> {
        if gone.is_empty() {
            return Ok(0);
        }
        let learnt = entries(&self.learnt, names::DNS_LEARNT, |key| {
            gone.contains(&key.endpoint).then_some(*key)
        })?;
        for (key, _) in &learnt {
            remove_ignoring_absent(self.learnt.remove(key)).map_err(map_err(names::DNS_LEARNT))?;
        }
        let slots = entries(&self.slots, names::DNS_SLOTS, |key| {
            gone.contains(&key.endpoint).then_some(*key)
        })?;
        for (key, _) in &slots {
            remove_ignoring_absent(self.slots.remove(key)).map_err(map_err(names::DNS_SLOTS))?;
        }
        let cursors = entries(&self.cursors, names::DNS_CURSOR, |key| {
            gone.contains(&key.owner).then_some(*key)
        })?;
        for (key, _) in &cursors {
            remove_ignoring_absent(self.cursors.remove(key)).map_err(map_err(names::DNS_CURSOR))?;
        }
        Ok(learnt.len())
    }
}

/// The entries of `map` that `pick` keeps, under the key it gives them.
fn entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    pick: impl Fn(&K) -> Option<K>,
) -> Result<Vec<(K, V)>, DatapathError> {
    let mut out = Vec::new();
    for item in map {
        let (key, value) = match item {
            Ok(entry) => entry,
            // An entry the kernel removed while we walked.
            Err(MapError::KeyNotFound) => continue,
            Err(source) => return Err(DatapathError::Map { map: name, source }),
        };
        if let Some(key) = pick(&key) {
            out.push((key, value));
        }
    }
    Ok(out)
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// An address the kernel learnt for an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearntAddress {
    pub endpoint: u32,
    pub address: IpAddr,
    /// The pattern key the answer matched.
    pub pattern: u64,
    pub ttl: u32,
    /// `bpf_ktime_get_coarse_ns` of the expiry (compare with
    /// [`super::monotonic_coarse_ns`]).
    pub expires_ns: u64,
}

impl LearntAddress {
    fn new(key: &LearntKey, value: &Learnt) -> Self {
        let v6 = std::net::Ipv6Addr::from(key.addr);
        let address = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        Self {
            endpoint: key.endpoint,
            address,
            pattern: value.pattern,
            ttl: value.ttl,
            expires_ns: value.expires_ns,
        }
    }

    /// Seconds the address still admits new connections at `now_ns` (the kernel's
    /// clock); negative once it expired.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanosecond differences far below 2^52"
    )]
    pub fn seconds_left(&self, now_ns: u64) -> f64 {
        (self.expires_ns as f64 - now_ns as f64) / 1e9
    }
}

/// The pinned table of learnt addresses, opened once (works while an agent runs).
pub struct LearntReader {
    map: HashMap<MapData, LearntKey, Learnt>,
}

impl LearntReader {
    /// # Errors
    /// When the map is not pinned.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = MapData::from_pin(pin_dir.join(names::DNS_LEARNT))
            .map_err(map_err(names::DNS_LEARNT))?;
        let map =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(names::DNS_LEARNT))?;
        Ok(Self { map })
    }

    /// What the kernel learnt about `address` for `endpoint`, if anything.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn get(
        &self,
        endpoint: u32,
        address: IpAddr,
    ) -> Result<Option<LearntAddress>, DatapathError> {
        let addr = match address {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let key = LearntKey { endpoint, addr };
        match self.map.get(&key, 0) {
            Ok(value) => Ok(Some(LearntAddress::new(&key, &value))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map {
                map: names::DNS_LEARNT,
                source,
            }),
        }
    }

    /// Every learnt address, by endpoint and address.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn all(&self) -> Result<Vec<LearntAddress>, DatapathError> {
        let mut out: Vec<LearntAddress> = entries(&self.map, names::DNS_LEARNT, |key| Some(*key))?
            .iter()
            .map(|(key, value)| LearntAddress::new(key, value))
            .collect();
        out.sort_by_key(|a| (a.endpoint, a.address));
        Ok(out)
    }
}

/// Every learnt address, from the pinned map (works while an agent runs).
///
/// # Errors
/// When the map is not pinned or cannot be read.
pub fn read_learnt(pin_dir: &Path) -> Result<Vec<LearntAddress>, DatapathError> {
    LearntReader::open(pin_dir)?.all()
}

/// What the kernel did with DNS answers, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub responses: u64,
    pub invalid: u64,
    pub learnt: u64,
    pub refreshed: u64,
    pub expired: u64,
    pub evicted: u64,
    pub dropped: u64,
}

/// The kernel's DNS counters, from the pinned map.
///
/// # Errors
/// When the map is not pinned or cannot be read.
pub fn read_stats(pin_dir: &Path) -> Result<DnsStats, DatapathError> {
    let data =
        MapData::from_pin(pin_dir.join(names::DNS_STATS)).map_err(map_err(names::DNS_STATS))?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(map_err(names::DNS_STATS))?;
    let slot = |index: u32| -> Result<u64, DatapathError> {
        Ok(map
            .get(&index, 0)
            .map_err(map_err(names::DNS_STATS))?
            .iter()
            .sum())
    };
    Ok(DnsStats {
        responses: slot(DNS_STAT_RESPONSES)?,
        invalid: slot(DNS_STAT_INVALID)?,
        learnt: slot(DNS_STAT_LEARNT)?,
        refreshed: slot(DNS_STAT_REFRESHED)?,
        expired: slot(DNS_STAT_EXPIRED)?,
        evicted: slot(DNS_STAT_EVICTED)?,
        dropped: slot(DNS_STAT_DROPPED)?,
    })
}
