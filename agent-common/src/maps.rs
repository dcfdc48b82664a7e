//! Map names and layouts.
//!
//! Lookup order in the kernel, for a packet a pod sends:
//! 1. `ENDPOINT_V2[ifindex]` (or `ENDPOINT_CG_V2[cgroup id]`) -> [`Endpoint`]: which
//!    local pod sent it, its addresses (anti-spoofing), whether it is isolated, and
//!    which table holds its rules. Pods selected by the same policies (the replicas
//!    of a deployment) share one table, so 100 replicas under a 10k-CIDR policy hold
//!    10k entries, not 1M.
//! 2. `IDENTITY_V2[destination]` -> pod identity: every pod in the cluster, by address.
//!    Pods that share namespace, labels and named ports share one identity, so a pod
//!    joining a large namespace is one write here and nothing per local pod.
//! 3. `CIDR_V2[(table, destination)]` -> CIDR class: the table's ipBlocks (with
//!    `except` already carved out) and "any destination" rules, longest match.
//! 4. `POLICY_V3[(table, identity or class, protocol, port)]` -> [`PolicyValue`],
//!    longest match over the port bits, so port ranges are a handful of prefixes.

/// Map names, also the file names under the pin directory.
pub mod names {
    pub const ENDPOINT: &str = "ENDPOINT_V2";
    /// cgroup id (of the pod's cgroup) -> endpoint, for `--attach cgroup`.
    pub const ENDPOINT_CGROUP: &str = "ENDPOINT_CG_V2";
    /// Address -> identity, numbered as the policy keys are. `_V2` though its layout
    /// is that of `IDENTITY_V1`: an upgraded agent numbers identities afresh, and the
    /// earlier layouts' programs, which run until the links are swapped, must keep
    /// finding the numbers their own policy table (`POLICY_V1`, `POLICY_V2`) is keyed by.
    pub const IDENTITY: &str = "IDENTITY_V2";
    /// `(table, network)` -> CIDR class.
    pub const CIDR: &str = "CIDR_V2";
    /// `(table, identity or class, protocol, port)` -> [`super::PolicyValue`]: what
    /// each tier decides there.
    pub const POLICY: &str = "POLICY_V3";
    /// Per-CPU array: one row of [`crate::COUNTER_SLOTS`] counters per endpoint slot.
    pub const COUNTERS: &str = "COUNTERS_V2";
    pub const SETTINGS: &str = "SETTINGS_V2";
    /// Flows that completed a handshake (TCP) or saw traffic both ways and then more
    /// (other protocols): nothing unassured is ever inserted here, so no flood of
    /// unanswered tuples can evict them.
    pub const CT_ESTABLISHED: &str = "CT_ESTABLISHED_V2";
    /// Flows not (or no longer) established: handshakes, unanswered datagrams, closing
    /// connections. An LRU of its own: a flood evicts only its own kind.
    pub const CT_UNASSURED: &str = "CT_UNASSURED_V2";
    /// Per-CPU array of conntrack event counts, indexed by `CT_STAT_*`.
    pub const CT_STATS: &str = "CT_STATS_V2";
    pub const FRAGMENTS: &str = "FRAGMENTS_V2";
    pub const EVENTS: &str = "EVENTS_V2";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET_V1";
    pub const EVENTS_LOST: &str = "EVENTS_LOST_V1";
    /// `(policy table, domain pattern)` -> domain identity (`crate::dns::NameEntry`).
    pub const DNS_NAMES: &str = "DNS_NAMES_V1";
    /// `(endpoint, address)` -> what a DNS answer taught (`crate::dns::Learnt`).
    pub const DNS_LEARNT: &str = "DNS_LEARNT_V1";
    /// `(endpoint, pattern, slot)` -> address: each pattern's ring of learnt addresses.
    pub const DNS_SLOTS: &str = "DNS_SLOTS_V1";
    /// `(endpoint, pattern)` -> next ring slot.
    pub const DNS_CURSOR: &str = "DNS_CURSOR_V1";
    pub const DNS_SETTINGS: &str = "DNS_SETTINGS_V1";
    /// Per-CPU counts by `crate::dns::DNS_STAT_*`.
    pub const DNS_STATS: &str = "DNS_STATS_V1";
    /// Maps of earlier layouts that an upgraded agent takes over and then removes
    /// (the endpoint-keyed tables went when tables became shared by pods).
    pub const LEGACY: [&str; 11] = [
        "CONNTRACK_V1",
        "COUNTERS_V1",
        "SETTINGS_V1",
        "FRAGMENTS_V1",
        "POLICY_V1",
        "EVENTS_V1",
        "ENDPOINT_V1",
        "ENDPOINT_CG_V1",
        "CIDR_V1",
        "POLICY_V2",
        "IDENTITY_V1",
    ];
    /// The single-table conntrack of the first layout (a [`super::FlowKey`] ->
    /// [`super::LegacyFlowState`] LRU), migrated into the new tables on upgrade.
    pub const LEGACY_CONNTRACK: &str = "CONNTRACK_V1";
}

/// Default capacities; the agent can size every map from its flags.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4_096;
    pub const IDENTITIES: u32 = 262_144;
    pub const CIDRS: u32 = 131_072;
    pub const POLICY: u32 = 524_288;
    /// Endpoint rows of the counter array; endpoints numbered beyond it share the
    /// overflow row, which `/metrics` shows, so no count is ever lost.
    pub const COUNTER_ENDPOINTS: u32 = 1_024;
    pub const CT_ESTABLISHED: u32 = 262_144;
    pub const CT_UNASSURED: u32 = 65_536;
    pub const FRAGMENTS: u32 = 8_192;
    /// Addresses learnt from DNS answers, all endpoints together.
    pub const DNS_LEARNT: u32 = 65_536;
    /// Domain patterns, all endpoints together.
    pub const DNS_NAMES: u32 = 16_384;
}

/// Rows of `COUNTERS_V2` for `endpoints` endpoint slots: one per slot and the overflow row.
#[must_use]
pub const fn counter_entries(endpoints: u32) -> u32 {
    (endpoints + 1) * crate::COUNTER_SLOTS
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

/// Bit length of the table part of a [`CidrKey`]; add 96 + the IPv4 prefix length
/// for an IPv4 network (stored IPv4-mapped), or the IPv6 prefix length.
pub const CIDR_PREFIX_TABLE: u32 = 32;

/// A local pod, as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's number in the counters, events and learnt DNS answers.
    pub id: u32,
    /// `ENDPOINT_FLAG_*` bits.
    pub flags: u32,
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    /// The number of the CIDR and policy table the endpoint's rules are in, shared by
    /// the endpoints selected by the same policies.
    pub table: u32,
}

/// A policy in enforce mode selects the endpoint for egress.
pub const ENDPOINT_FLAG_ISOLATED_ENFORCED: u32 = 1;
/// A policy in audit mode selects the endpoint for egress.
pub const ENDPOINT_FLAG_ISOLATED_AUDITED: u32 = 1 << 1;
/// The endpoint's tables did not fit: deny everything it sends.
pub const ENDPOINT_FLAG_FAIL_CLOSED: u32 = 1 << 2;
/// A ClusterNetworkPolicy (Admin or Baseline tier) has the endpoint as its subject:
/// its packets are looked up even when no NetworkPolicy isolates it.
pub const ENDPOINT_FLAG_TIERED: u32 = 1 << 5;
/// Flags under which an endpoint's packets are judged, not passed unlooked.
pub const ENDPOINT_FLAGS_FILTERED: u32 =
    ENDPOINT_FLAG_ISOLATED_ENFORCED | ENDPOINT_FLAG_ISOLATED_AUDITED | ENDPOINT_FLAG_TIERED;
pub const ENDPOINT_FLAG_HAS_IPV4: u32 = 1 << 3;
pub const ENDPOINT_FLAG_HAS_IPV6: u32 = 1 << 4;
/// A ClusterNetworkPolicy gives the endpoint `domainNames` rules: the DNS answers it
/// receives are read, and its packets' destinations looked up among the learnt ones.
pub const ENDPOINT_FLAG_DOMAINS: u32 = 1 << 6;

/// An address, IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`), so one map holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    pub addr: [u8; 16],
}

/// Data part of an LPM key of `CIDR_V2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Table number ([`Endpoint::table`]), big-endian.
    pub table: [u8; 4],
    /// IPv4-mapped or IPv6 address.
    pub addr: [u8; 16],
}

/// Data part of an LPM key of `POLICY_V3`. Fields are byte arrays in network order
/// because the trie compares bits from the first byte on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Table number ([`Endpoint::table`]).
    pub table: [u8; 4],
    pub identity: [u8; 4],
    pub protocol: u8,
    pub port: [u8; 2],
    pub pad: u8,
}

/// What a policy entry decides, tier by tier. Values [`join`](PolicyValue::join): a
/// NetworkPolicy allowance is a union, a ClusterNetworkPolicy tier's answer is its
/// first matching rule (the lowest rank). Because both are joins, an entry can already
/// hold the join of every shorter entry covering it (the trie returns only the longest
/// match), and the identity and CIDR lookups of one packet combine by joining too.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// `POLICY_ALLOW_*`: NetworkPolicy rules allowing it.
    pub flags: u32,
    /// The first matching Admin-tier rule ([`tier_rule`]), among enforced policies
    /// (`[0]`) and among all, staged ones included (`[1]`); [`TIER_RULE_NONE`] if none.
    pub admin: [u32; 2],
    /// The same for the Baseline tier.
    pub baseline: [u32; 2],
}

const _: () = assert!(size_of::<PolicyValue>() == 20);

impl PolicyValue {
    /// Nothing allows, no tier rule matches.
    pub const NONE: PolicyValue = PolicyValue {
        flags: 0,
        admin: [TIER_RULE_NONE; 2],
        baseline: [TIER_RULE_NONE; 2],
    };

    /// Only NetworkPolicy allowances (`POLICY_ALLOW_*` bits).
    #[must_use]
    pub const fn allowing(flags: u32) -> PolicyValue {
        PolicyValue {
            flags,
            ..PolicyValue::NONE
        }
    }

    #[expect(clippy::inline_always, reason = "on every policy lookup in the kernel")]
    #[inline(always)]
    pub fn join(&mut self, other: &PolicyValue) {
        self.flags |= other.flags;
        self.admin[0] = min(self.admin[0], other.admin[0]);
        self.admin[1] = min(self.admin[1], other.admin[1]);
        self.baseline[0] = min(self.baseline[0], other.baseline[0]);
        self.baseline[1] = min(self.baseline[1], other.baseline[1]);
    }
}

impl Default for PolicyValue {
    fn default() -> Self {
        Self::NONE
    }
}

#[expect(clippy::inline_always, reason = "on every policy lookup in the kernel")]
#[inline(always)]
const fn min(a: u32, b: u32) -> u32 {
    if a < b { a } else { b }
}

/// What a ClusterNetworkPolicy rule does with the traffic it matches.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TierAction {
    Accept = 0,
    Deny = 1,
    /// Skip the rest of the tier: NetworkPolicy (from Admin) decides.
    Pass = 2,
}

/// No rule of the tier matches; joins as the identity of `min`.
pub const TIER_RULE_NONE: u32 = u32::MAX;

/// A tier rule as an entry holds it: its rank (its place in the evaluation order of
/// every ClusterNetworkPolicy rule: tier, priority, rule order) above its action, so
/// that the lower of two is the rule evaluated first.
#[must_use]
pub const fn tier_rule(rank: u32, action: TierAction) -> u32 {
    (rank << 2) | action as u32
}

/// The rank and action of a [`tier_rule`] value; `None` for [`TIER_RULE_NONE`].
#[must_use]
pub const fn tier_rule_parts(rule: u32) -> Option<(u32, TierAction)> {
    if rule == TIER_RULE_NONE {
        return None;
    }
    let action = match rule & 3 {
        0 => TierAction::Accept,
        1 => TierAction::Deny,
        _ => TierAction::Pass,
    };
    Some((rule >> 2, action))
}

/// Highest rank a rule can have (ranks are 30 bits).
pub const TIER_RANK_MAX: u32 = (1 << 30) - 2;

/// Allowed by a rule of a policy in enforce mode.
pub const POLICY_ALLOW_ENFORCED: u32 = 1;
/// Allowed by a rule of a policy in audit mode.
pub const POLICY_ALLOW_AUDITED: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// Node-wide settings, one element of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `SETTINGS_FLAG_*` bits.
    pub flags: u32,
    /// Flow events each endpoint may emit per second; the rest are counted as lost.
    pub events_per_second: u32,
    /// Changes whenever the policy tables change. A flow's cached verdict holds only
    /// for the epoch it was judged in, so a policy change reaches established flows on
    /// their next packet.
    pub policy_epoch: u32,
    /// Idle seconds before a flow is forgotten, by conntrack state.
    pub timeouts: Timeouts,
    pub pad: u32,
}

/// Idle timeouts of the connection tracker, in seconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A handshake in progress, an unanswered datagram flow.
    pub unassured: u32,
    /// A TCP connection after its handshake.
    pub tcp_established: u32,
    /// A non-TCP flow that saw traffic both ways and then more.
    pub other_established: u32,
    /// A TCP connection after a FIN.
    pub closing: u32,
}

impl Timeouts {
    pub const DEFAULT: Timeouts = Timeouts {
        unassured: 60,
        tcp_established: 6 * 3_600,
        other_established: 180,
        closing: 10,
    };
}

impl Settings {
    pub const DEFAULT: Settings = Settings {
        flags: 0,
        events_per_second: DEFAULT_EVENTS_PER_SECOND,
        policy_epoch: 0,
        timeouts: Timeouts::DEFAULT,
        pad: 0,
    };
}

impl Default for Settings {
    fn default() -> Self {
        Self::DEFAULT
    }
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

/// A flow in `CONNTRACK_V1`, the first layout: kept to migrate it on upgrade.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LegacyFlowState {
    pub last_seen_ns: u64,
    pub origin: u8,
    pub pad: [u8; 7],
}

/// A tracked flow, in `CT_ESTABLISHED_V2` or `CT_UNASSURED_V2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// `bpf_ktime_get_coarse_ns` of the last packet either way, written at most once a
    /// second.
    pub last_seen_ns: u64,
    /// [`Settings::policy_epoch`] when the endpoint's policy last allowed the flow.
    pub policy_epoch: u32,
    /// `FLOW_ORIGIN_*`.
    pub origin: u8,
    /// `FLOW_STATE_*`.
    pub state: u8,
    /// `FLOW_FIN_*` bits: which sides have closed.
    pub fin: u8,
    /// `FLOW_FLAG_*` bits.
    pub flags: u8,
}

const _: () = assert!(size_of::<FlowEntry>() == 16);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<Settings>() == 32);

/// TCP: the opener's SYN seen.
pub const FLOW_STATE_SYN_SENT: u8 = 1;
/// TCP: the acceptor's SYN-ACK seen.
pub const FLOW_STATE_SYN_RECV: u8 = 2;
/// TCP: the opener acknowledged the SYN-ACK; lives in `CT_ESTABLISHED_V2`.
pub const FLOW_STATE_ESTABLISHED: u8 = 3;
/// TCP: a FIN seen; back in `CT_UNASSURED_V2` until the last ACK or the timeout.
pub const FLOW_STATE_CLOSING: u8 = 4;
/// Other protocols: traffic seen one way only.
pub const FLOW_STATE_NEW: u8 = 5;
/// Other protocols: the reply seen.
pub const FLOW_STATE_REPLIED: u8 = 6;
/// Other protocols: the opener sent again after the reply; lives in `CT_ESTABLISHED_V2`.
pub const FLOW_STATE_ASSURED: u8 = 7;

/// The flow was opened to an address learnt from a DNS answer: it outlives the
/// address's expiry, which is not a policy change.
pub const FLOW_FLAG_LEARNT: u8 = 1;

/// The endpoint sent a FIN.
pub const FLOW_FIN_FROM_ENDPOINT: u8 = 1;
/// The peer sent a FIN.
pub const FLOW_FIN_FROM_PEER: u8 = 1 << 1;

/// `CT_STATS_V2` slots.
pub const CT_STAT_INSERTED_UNASSURED: u32 = 0;
pub const CT_STAT_INSERTED_ESTABLISHED: u32 = 1;
pub const CT_STAT_REMOVED_UNASSURED: u32 = 2;
pub const CT_STAT_REMOVED_ESTABLISHED: u32 = 3;
/// Inserts the kernel refused (a promotion that did not fit, memory pressure).
pub const CT_STAT_INSERT_FAILED: u32 = 4;
/// Established flows the agent wrote (seeded from the kernel's conntrack, migrated on
/// upgrade); only userspace writes this slot.
pub const CT_STAT_WRITTEN_BY_AGENT: u32 = 5;
pub const CT_STAT_SLOTS: u32 = 6;

/// Identifies the fragments of one datagram (RFC 791 / RFC 8200).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// The verdict of a datagram's first fragment, which its later fragments follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentVerdict {
    pub dst_port: u16,
    /// [`crate::Verdict`] as `u8`.
    pub verdict: u8,
    /// [`crate::Reason`] as `u8`.
    pub reason: u8,
}

/// The endpoint accepted the flow: what it sends back is a reply.
pub const FLOW_ORIGIN_INBOUND: u8 = 1;
/// The endpoint opened the flow, and its policy allowed it.
pub const FLOW_ORIGIN_OUTBOUND: u8 = 2;

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
    /// The ClusterNetworkPolicy rule that decided ([`tier_rule`]), or
    /// [`TIER_RULE_NONE`] when NetworkPolicy or the default did.
    pub rule: u32,
    pub pad: u32,
}

const _: () = assert!(size_of::<FlowEvent>() == 64);

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
        CidrKey, CounterValue, Endpoint, EventBudget, FlowEntry, FlowEvent, FlowKey, FragmentKey,
        FragmentVerdict, IpKey, LegacyFlowState, PolicyKey, PolicyValue, Settings,
    };

    // SAFETY: every type is #[repr(C)], made of integers and byte arrays, with explicit
    // padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for LegacyFlowState {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentVerdict {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for EventBudget {}
}
