//! Map names and layouts.
//!
//! Lookup order in the kernel, for a packet a pod sends:
//! 1. `ENDPOINT_V1[ifindex]` (or `ENDPOINT_CG_V1[cgroup id]`) -> [`Endpoint`]: which
//!    local pod sent it, its addresses (anti-spoofing) and whether it is isolated.
//! 2. `IDENTITY_V1[destination]` -> pod identity: every pod in the cluster, by address.
//!    Pods that share namespace, labels and named ports share one identity, so a pod
//!    joining a large namespace is one write here and nothing per local pod.
//! 3. `CIDR_V1[(endpoint, destination)]` -> CIDR class: the endpoint's ipBlocks
//!    (with `except` already carved out) and "any destination" rules, longest match.
//! 4. `POLICY_V1[(endpoint, identity or class, protocol, port)]` -> [`PolicyValue`],
//!    longest match over the port bits, so port ranges are a handful of prefixes.

/// Map names, also the file names under the pin directory.
pub mod names {
    pub const ENDPOINT: &str = "ENDPOINT_V1";
    /// cgroup id (of the pod's cgroup) -> endpoint, for `--attach cgroup`.
    pub const ENDPOINT_CGROUP: &str = "ENDPOINT_CG_V1";
    pub const IDENTITY: &str = "IDENTITY_V1";
    pub const CIDR: &str = "CIDR_V1";
    pub const POLICY: &str = "POLICY_V1";
    pub const COUNTERS: &str = "COUNTERS_V1";
    pub const SETTINGS: &str = "SETTINGS_V1";
    pub const CONNTRACK: &str = "CONNTRACK_V1";
    pub const FRAGMENTS: &str = "FRAGMENTS_V1";
    pub const EVENTS: &str = "EVENTS_V1";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET_V1";
    pub const EVENTS_LOST: &str = "EVENTS_LOST_V1";
}

/// Default capacities; the agent can size every map from its flags.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4_096;
    pub const IDENTITIES: u32 = 262_144;
    pub const CIDRS: u32 = 131_072;
    pub const POLICY: u32 = 524_288;
    pub const COUNTERS: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
}

/// Ancestor levels a cgroup program looks at to find the pod's cgroup above a
/// container's (kubelet nests pod cgroups two or three levels below the root).
pub const CGROUP_MAX_LEVELS: u32 = 8;

/// Identities with this bit set are CIDR classes of one endpoint, never pods.
pub const CIDR_CLASS_BIT: u32 = 0x8000_0000;

/// Bit length of the endpoint + identity part of a [`PolicyKey`]: a prefix of this
/// length matches every protocol and port.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 64;
/// A prefix of this length matches one protocol, every port.
pub const POLICY_PREFIX_ANY_PORT: u32 = 72;
/// A prefix of this length matches one protocol and one port.
pub const POLICY_PREFIX_FULL: u32 = 88;

/// Bit length of the endpoint part of a [`CidrKey`]; add 96 + the IPv4 prefix length
/// for an IPv4 network (stored IPv4-mapped), or the IPv6 prefix length.
pub const CIDR_PREFIX_ENDPOINT: u32 = 32;

/// A local pod, as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's number in the policy and CIDR tables and in the counters.
    pub id: u32,
    /// `ENDPOINT_FLAG_*` bits.
    pub flags: u32,
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
}

/// A policy in enforce mode selects the endpoint for egress.
pub const ENDPOINT_FLAG_ISOLATED_ENFORCED: u32 = 1;
/// A policy in audit mode selects the endpoint for egress.
pub const ENDPOINT_FLAG_ISOLATED_AUDITED: u32 = 1 << 1;
/// The endpoint's tables did not fit: deny everything it sends.
pub const ENDPOINT_FLAG_FAIL_CLOSED: u32 = 1 << 2;
pub const ENDPOINT_FLAG_HAS_IPV4: u32 = 1 << 3;
pub const ENDPOINT_FLAG_HAS_IPV6: u32 = 1 << 4;

/// An address, IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`), so one map holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    pub addr: [u8; 16],
}

/// Data part of an LPM key of `CIDR_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Endpoint id, big-endian.
    pub endpoint: [u8; 4],
    /// IPv4-mapped or IPv6 address.
    pub addr: [u8; 16],
}

/// Data part of an LPM key of `POLICY_V1`. Fields are byte arrays in network order
/// because the trie compares bits from the first byte on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint: [u8; 4],
    pub identity: [u8; 4],
    pub protocol: u8,
    pub port: [u8; 2],
    pub pad: u8,
}

/// What a policy entry allows. An entry's flags already include those of every
/// shorter entry that covers it: the trie returns only the longest match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyValue {
    pub flags: u32,
}

/// Allowed by a rule of a policy in enforce mode.
pub const POLICY_ALLOW_ENFORCED: u32 = 1;
/// Allowed by a rule of a policy in audit mode.
pub const POLICY_ALLOW_AUDITED: u32 = 1 << 1;

/// Key of the per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub endpoint: u32,
    /// [`crate::Verdict`] as `u8`.
    pub verdict: u8,
    /// [`crate::Reason`] as `u8`.
    pub reason: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Node-wide settings, one element of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// `SETTINGS_FLAG_*` bits.
    pub flags: u32,
    /// Flow events each endpoint may emit per second; the rest are counted as lost.
    pub events_per_second: u32,
}

/// Packets from interfaces with no endpoint entry are denied (`--unknown-pod deny`).
pub const SETTINGS_FLAG_DENY_UNKNOWN: u32 = 1;
/// Every denial is an audit denial (`--mode audit`).
pub const SETTINGS_FLAG_AUDIT_ALL: u32 = 1 << 1;

/// Established flows an endpoint sent that a policy change stopped allowing keep
/// flowing (`--established keep`); by default they are cut.
pub const SETTINGS_FLAG_KEEP_ESTABLISHED: u32 = 1 << 2;

/// A flow as the endpoint sends it: `src` is the endpoint's address. ICMP echo uses
/// the echo identifier as both ports, so a request and its reply share a key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` of the last packet either way.
    pub last_seen_ns: u64,
    /// `FLOW_ORIGIN_*`.
    pub origin: u8,
    pub pad: [u8; 7],
}

/// The endpoint accepted the flow: what it sends back is a reply.
pub const FLOW_ORIGIN_INBOUND: u8 = 1;
/// The endpoint opened the flow, and its policy allowed it.
pub const FLOW_ORIGIN_OUTBOUND: u8 = 2;

/// Idle time after which a TCP flow is forgotten.
pub const FLOW_TIMEOUT_TCP_NS: u64 = 3_600 * 1_000_000_000;
/// Idle time after which a UDP, SCTP or ICMP flow is forgotten.
pub const FLOW_TIMEOUT_OTHER_NS: u64 = 120 * 1_000_000_000;

/// Emit a flow event for every new flow an endpoint is allowed to open, not only for
/// denials (`--flow-log-allowed`).
pub const SETTINGS_FLAG_EVENTS_ALLOWED: u32 = 1 << 3;

/// Default for [`Settings::events_per_second`].
pub const DEFAULT_EVENTS_PER_SECOND: u32 = 100;

/// Bytes of the flow event ring buffer.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// A packet worth telling userspace about: a denial (or audit denial), or the first
/// packet of an allowed flow when allowed flows are logged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (monotonic since boot).
    pub timestamp_ns: u64,
    pub endpoint: u32,
    /// [`crate::Verdict`] as `u8`.
    pub verdict: u8,
    /// [`crate::Reason`] as `u8`.
    pub reason: u8,
    pub protocol: u8,
    /// 1 for IPv6; IPv4 addresses are IPv4-mapped.
    pub is_ipv6: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub bytes: u32,
}

/// Per-endpoint event budget for the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventBudget {
    pub window_start_ns: u64,
    pub emitted: u32,
    pub pad: u32,
}

/// Endpoint id used in counters for packets from an unknown interface or cgroup.
pub const UNKNOWN_ENDPOINT_ID: u32 = 0;

#[cfg(feature = "user")]
mod user {
    use super::{
        CidrKey, CounterKey, CounterValue, Endpoint, EventBudget, FlowEvent, FlowKey, FlowState,
        IpKey, PolicyKey, PolicyValue, Settings,
    };

    // SAFETY: every type is #[repr(C)], made of integers and byte arrays, with explicit
    // padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for EventBudget {}
}
