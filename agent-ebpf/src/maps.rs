//! The maps, named as userspace finds them (see `egret_common::maps::names`).
//! Table maps are pinned by name so a restarted agent reuses them in place.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use egret_common::{
    COUNTER_SLOTS, Reason, Verdict,
    maps::{
        CT_STAT_SLOTS, CidrKey, CounterValue, Endpoint, FlowEntry, FlowKey, FragmentKey,
        FragmentVerdict, IpKey, PolicyKey, PolicyValue, Settings, capacity, counter_entries,
    },
};

#[map]
static ENDPOINT_V2: HashMap<u32, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
static ENDPOINT_CG_V2: HashMap<u64, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
static IDENTITY_V2: HashMap<IpKey, u32> = HashMap::pinned(capacity::IDENTITIES, 0);

#[map]
static CIDR_V2: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

#[map]
static POLICY_V3: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

/// Rows of `COUNTER_SLOTS` per endpoint slot; the agent sizes it from its flags.
#[map]
static COUNTERS_V2: PerCpuArray<CounterValue> =
    PerCpuArray::pinned(counter_entries(capacity::COUNTER_ENDPOINTS), 0);

#[map]
static SETTINGS_V2: Array<Settings> = Array::pinned(1, 0);

/// First fragments' verdicts, so later fragments of an allowed datagram pass.
#[map]
static FRAGMENTS_V2: LruHashMap<FragmentKey, FragmentVerdict> =
    LruHashMap::pinned(capacity::FRAGMENTS, 0);

#[map]
static CT_ESTABLISHED_V2: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::pinned(capacity::CT_ESTABLISHED, 0);

#[map]
static CT_UNASSURED_V2: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::pinned(capacity::CT_UNASSURED, 0);

#[map]
static CT_STATS_V2: PerCpuArray<u64> = PerCpuArray::pinned(CT_STAT_SLOTS, 0);

/// `BPF_NOEXIST`: an insert that never replaces, so the insert counters stay exact.
const NO_EXIST: u64 = 1;

#[inline(always)]
pub fn endpoint_by_ifindex(ifindex: u32) -> Option<&'static Endpoint> {
    // SAFETY: endpoint values are replaced whole by userspace, never partially written
    // in place; a reader sees the old or the new value.
    unsafe { ENDPOINT_V2.get(&ifindex) }
}

pub fn endpoint_by_cgroup(cgroup: u64) -> Option<&'static Endpoint> {
    // SAFETY: as for endpoint_by_ifindex.
    unsafe { ENDPOINT_CG_V2.get(&cgroup) }
}

/// The settings; an array lookup the verifier inlines.
#[inline(always)]
pub fn settings() -> &'static Settings {
    SETTINGS_V2.get(0).unwrap_or(&Settings::DEFAULT)
}

pub fn identity(addr: &[u8; 16]) -> Option<u32> {
    // SAFETY: u32 values are written whole.
    unsafe { IDENTITY_V2.get(&IpKey { addr: *addr }) }.copied()
}

pub fn cidr_class(table: u32, addr: &[u8; 16]) -> Option<u32> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        egret_common::maps::CIDR_PREFIX_TABLE + 128,
        CidrKey {
            table: table.to_be_bytes(),
            addr: *addr,
        },
    );
    CIDR_V2.get(&key).copied()
}

/// The entry for `(table, identity or class, protocol, port)`, longest match.
pub fn policy(
    table: u32,
    identity: u32,
    protocol: u8,
    port: u16,
    prefix_len: u32,
) -> Option<&'static PolicyValue> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        prefix_len,
        PolicyKey {
            table: table.to_be_bytes(),
            identity: identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
            pad: 0,
        },
    );
    POLICY_V3.get(&key)
}

/// Counts one packet. Endpoints numbered beyond the array's rows share its last
/// (overflow) row: the count is kept, only its endpoint is blurred.
#[inline(always)]
pub fn count(endpoint: u32, verdict: Verdict, reason: Reason, bytes: u32) {
    let rows = COUNTER_ROWS.load();
    let row = if endpoint < rows {
        endpoint
    } else {
        crate::diagnostics::counter_overflow(endpoint);
        rows
    };
    let index = row * COUNTER_SLOTS + egret_common::counter_slot(verdict, reason);
    if let Some(value) = COUNTERS_V2.get_ptr_mut(index) {
        // SAFETY: per-CPU value; nothing else on this CPU touches it while we run.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
    }
}

/// Endpoint rows of the counter array (the overflow row not included), set by the
/// agent at load time to match the size it gives `COUNTERS_V2`.
#[unsafe(no_mangle)]
static COUNTER_ROWS: Global<u32> = Global::new(capacity::COUNTER_ENDPOINTS);

pub fn ct_stat(slot: u32) {
    if let Some(value) = CT_STATS_V2.get_ptr_mut(slot) {
        // SAFETY: per-CPU value; nothing else on this CPU touches it while we run.
        unsafe { *value += 1 };
    }
}

pub fn remember_fragment(key: &FragmentKey, verdict: &FragmentVerdict) {
    // LRU: an old entry is evicted rather than the insert failing.
    let _ = FRAGMENTS_V2.insert(key, verdict, 0);
}

pub fn fragment_verdict(key: &FragmentKey) -> Option<FragmentVerdict> {
    // SAFETY: values are written whole.
    unsafe { FRAGMENTS_V2.get(key) }.copied()
}

#[inline(always)]
pub fn established_flow(key: &FlowKey) -> Option<*mut FlowEntry> {
    CT_ESTABLISHED_V2.get_ptr_mut(key)
}

#[inline(always)]
pub fn unassured_flow(key: &FlowKey) -> Option<*mut FlowEntry> {
    CT_UNASSURED_V2.get_ptr_mut(key)
}

/// Inserts a flow that is not there yet; false when the kernel refused.
pub fn insert_flow(key: &FlowKey, entry: &FlowEntry, established: bool) -> bool {
    let map = if established {
        &CT_ESTABLISHED_V2
    } else {
        &CT_UNASSURED_V2
    };
    map.insert(key, entry, NO_EXIST).is_ok()
}

/// Removes a flow; false when it was gone already.
pub fn remove_flow(key: &FlowKey, established: bool) -> bool {
    let map = if established {
        &CT_ESTABLISHED_V2
    } else {
        &CT_UNASSURED_V2
    };
    map.remove(key).is_ok()
}
