//! The maps, named as userspace finds them (see `egret_common::maps::names`).
//! Table maps are pinned by name so a restarted agent reuses them in place.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
};
use egret_common::maps::{
    CidrKey, CounterKey, CounterValue, Endpoint, FlowKey, FlowState, IpKey, PolicyKey, PolicyValue,
    Settings, capacity,
};

use crate::packet::FragmentKey;

#[map]
static ENDPOINT_V1: HashMap<u32, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
static ENDPOINT_CG_V1: HashMap<u64, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
static IDENTITY_V1: HashMap<IpKey, u32> = HashMap::pinned(capacity::IDENTITIES, 0);

#[map]
static CIDR_V1: LpmTrie<CidrKey, u32> = LpmTrie::pinned(capacity::CIDRS, 0);

#[map]
static POLICY_V1: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(capacity::POLICY, 0);

#[map]
static COUNTERS_V1: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::pinned(capacity::COUNTERS, 0);

#[map]
static SETTINGS_V1: Array<Settings> = Array::pinned(1, 0);

/// First fragments' destination ports, so later fragments of an allowed datagram pass.
#[map]
static FRAGMENTS_V1: LruHashMap<FragmentKey, u16> = LruHashMap::pinned(capacity::FRAGMENTS, 0);

#[map]
static CONNTRACK_V1: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(capacity::CONNTRACK, 0);

pub fn endpoint_by_ifindex(ifindex: u32) -> Option<&'static Endpoint> {
    // SAFETY: endpoint values are replaced whole by userspace, never partially written
    // in place; a reader sees the old or the new value.
    unsafe { ENDPOINT_V1.get(&ifindex) }
}

pub fn endpoint_by_cgroup(cgroup: u64) -> Option<&'static Endpoint> {
    // SAFETY: as for endpoint_by_ifindex.
    unsafe { ENDPOINT_CG_V1.get(&cgroup) }
}

pub fn settings() -> Settings {
    SETTINGS_V1.get(0).copied().unwrap_or_default()
}

pub fn identity(addr: &[u8; 16]) -> Option<u32> {
    // SAFETY: u32 values are written whole.
    unsafe { IDENTITY_V1.get(&IpKey { addr: *addr }) }.copied()
}

pub fn cidr_class(endpoint: u32, addr: &[u8; 16]) -> Option<u32> {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        egret_common::maps::CIDR_PREFIX_ENDPOINT + 128,
        CidrKey {
            endpoint: endpoint.to_be_bytes(),
            addr: *addr,
        },
    );
    CIDR_V1.get(&key).copied()
}

pub fn policy(endpoint: u32, identity: u32, protocol: u8, port: u16, prefix_len: u32) -> u32 {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        prefix_len,
        PolicyKey {
            endpoint: endpoint.to_be_bytes(),
            identity: identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
            pad: 0,
        },
    );
    POLICY_V1.get(&key).map_or(0, |value| value.flags)
}

pub fn count(endpoint: u32, verdict: u8, reason: u8, bytes: u32) {
    let key = CounterKey {
        endpoint,
        verdict,
        reason,
        pad: [0; 2],
    };
    if let Some(value) = COUNTERS_V1.get_ptr_mut(&key) {
        // SAFETY: per-CPU value; nothing else on this CPU touches it while we run.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += u64::from(bytes);
        }
    } else {
        let value = CounterValue {
            packets: 1,
            bytes: u64::from(bytes),
        };
        // A full counter map loses this count; the verdict stands regardless.
        let _ = COUNTERS_V1.insert(&key, &value, 0);
    }
}

pub fn remember_fragment(key: &FragmentKey, port: u16) {
    // LRU: an old entry is evicted rather than the insert failing.
    let _ = FRAGMENTS_V1.insert(key, &port, 0);
}

pub fn fragment_port(key: &FragmentKey) -> Option<u16> {
    // SAFETY: u16 values are written whole.
    unsafe { FRAGMENTS_V1.get(key) }.copied()
}

pub fn flow(key: &FlowKey) -> Option<*mut FlowState> {
    CONNTRACK_V1.get_ptr_mut(key)
}

pub fn record_flow(key: &FlowKey, state: &FlowState) {
    // LRU: the oldest flow is evicted rather than the insert failing.
    let _ = CONNTRACK_V1.insert(key, state, 0);
}
