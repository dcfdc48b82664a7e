//! The verdict for one packet an endpoint sends: link plumbing passes, spoofed sources
//! drop, tracked flows pass on their cached verdict, then the policy tables decide.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::sk_buff::SkBuff};
use egret_common::{
    Decision, Reason, Verdict,
    maps::{
        ENDPOINT_FLAG_DOMAINS, ENDPOINT_FLAG_FAIL_CLOSED, ENDPOINT_FLAG_HAS_IPV4,
        ENDPOINT_FLAG_HAS_IPV6, ENDPOINT_FLAGS_FILTERED, Endpoint, FLOW_FLAG_LEARNT, FlowKey,
        FragmentVerdict, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_FULL, PolicyValue,
        SETTINGS_FLAG_AUDIT_ALL, SETTINGS_FLAG_DENY_UNKNOWN, SETTINGS_FLAG_EVENTS_ALLOWED,
        SETTINGS_FLAG_KEEP_ESTABLISHED, Settings, TIER_RULE_NONE, UNKNOWN_ENDPOINT_ID,
    },
};

use crate::{
    conntrack::{self, Direction},
    diagnostics, dns, events, maps,
    packet::{self, Fragment, Packet, Parsed},
};

/// What `decide` concluded, and whether the packet opened a new allowed flow.
struct Outcome {
    verdict: Verdict,
    reason: Reason,
    /// The tier rule that decided, for the flow event.
    rule: u32,
    opened_flow: bool,
}

const fn outcome(verdict: Verdict, reason: Reason) -> Outcome {
    Outcome {
        verdict,
        reason,
        rule: TIER_RULE_NONE,
        opened_flow: false,
    }
}

const fn decided(decision: Decision) -> Outcome {
    Outcome {
        verdict: decision.verdict,
        reason: decision.reason,
        rule: decision.rule,
        opened_flow: false,
    }
}

/// Judges the packet, counts it, reports it when worth it, and returns what to do.
#[inline(always)]
pub fn judge(skb: &SkBuff, l3: usize, ethertype: u16, endpoint: Option<&Endpoint>) -> Verdict {
    let settings = maps::settings();
    let mut packet = Packet::EMPTY;
    let parsed = packet::parse(skb, l3, ethertype, &mut packet);
    // One coarse clock read per packet, shared by conntrack and the event budget.
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (endpoint_id, result) = match endpoint {
        Some(endpoint) => (
            endpoint.id,
            decide(skb, parsed, &packet, endpoint, settings, now),
        ),
        None if settings.flags & SETTINGS_FLAG_DENY_UNKNOWN != 0 => (
            UNKNOWN_ENDPOINT_ID,
            outcome(Verdict::Deny, Reason::UnknownEndpoint),
        ),
        None => (
            UNKNOWN_ENDPOINT_ID,
            outcome(Verdict::Allow, Reason::UnknownEndpoint),
        ),
    };
    let verdict =
        if result.verdict == Verdict::Deny && settings.flags & SETTINGS_FLAG_AUDIT_ALL != 0 {
            Verdict::AuditDeny
        } else {
            result.verdict
        };
    let bytes = skb.len();
    maps::count(endpoint_id, verdict, result.reason, bytes);
    let report = verdict != Verdict::Allow
        || (result.opened_flow && settings.flags & SETTINGS_FLAG_EVENTS_ALLOWED != 0);
    if report {
        match parsed {
            Parsed::Ip => events::emit(
                &events::Report {
                    endpoint: endpoint_id,
                    verdict,
                    reason: result.reason,
                    bytes,
                    rule: result.rule,
                    now,
                },
                &packet,
            ),
            Parsed::Malformed => diagnostics::malformed(endpoint_id, ethertype),
            _ => {}
        }
    }
    verdict
}

#[inline(always)]
fn decide(
    skb: &SkBuff,
    parsed: Parsed,
    packet: &Packet,
    endpoint: &Endpoint,
    settings: &Settings,
    now: u64,
) -> Outcome {
    // Isolated by a NetworkPolicy, or the subject of a ClusterNetworkPolicy.
    let is_filtered = endpoint.flags & ENDPOINT_FLAGS_FILTERED != 0;
    match parsed {
        Parsed::Ip => {}
        Parsed::Arp => return outcome(Verdict::Allow, Reason::NotFiltered),
        _ if !is_filtered => return outcome(Verdict::Allow, Reason::NotFiltered),
        Parsed::Vlan => return outcome(Verdict::Deny, Reason::Vlan),
        Parsed::NotIp => return outcome(Verdict::Deny, Reason::NonIp),
        Parsed::Malformed => return outcome(Verdict::Deny, Reason::Malformed),
    }
    if packet.is_link_control {
        return outcome(Verdict::Allow, Reason::NotFiltered);
    }
    if !is_own_address(endpoint, packet) {
        return outcome(Verdict::Deny, Reason::SpoofedSource);
    }
    if endpoint.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0 {
        return outcome(Verdict::Deny, Reason::TableOverflow);
    }
    if packet.fragment == Fragment::Later {
        return later_fragment(packet, is_filtered);
    }
    if packet.is_icmp_error && is_related(skb, packet, now, settings) {
        return outcome(Verdict::Allow, Reason::Related);
    }
    let Some(key) = conntrack::key(packet, Direction::Sent) else {
        // Not a flow (an ICMP message that is neither echo nor a known error).
        return untracked(endpoint, packet, is_filtered, now);
    };
    let result = match conntrack::track(&key, packet, Direction::Sent, now, settings) {
        Some(flow) => tracked(endpoint, packet, &key, &flow, is_filtered, settings, now),
        None => new_flow(endpoint, packet, &key, is_filtered, settings, now),
    };
    if packet.fragment == Fragment::First && is_filtered && result.verdict != Verdict::Deny {
        remember_fragment(packet, &result);
    }
    result
}

/// A packet of a flow the tracker holds: a reply passes; a flow the endpoint opened
/// passes on its cached verdict while the policy epoch holds, and is judged again
/// once after a policy change (unless established flows are kept).
#[inline(always)]
fn tracked(
    endpoint: &Endpoint,
    packet: &Packet,
    key: &FlowKey,
    flow: &conntrack::Tracked,
    is_filtered: bool,
    settings: &Settings,
    now: u64,
) -> Outcome {
    if conntrack::is_reply(flow)
        || !is_filtered
        || flow.policy_epoch == settings.policy_epoch
        || settings.flags & SETTINGS_FLAG_KEEP_ESTABLISHED != 0
    {
        return outcome(Verdict::Allow, Reason::Conntrack);
    }
    let at = Moment {
        epoch: settings.policy_epoch,
        now,
        learnt: flow.flags & FLOW_FLAG_LEARNT != 0,
    };
    rejudge(endpoint, packet, key, &at)
}

/// When a flow is judged again: the epoch to record, the clock, and whether the flow
/// was opened through a learnt address (BPF calls take five arguments at most).
struct Moment {
    epoch: u32,
    now: u64,
    learnt: bool,
}

/// The policy changed since the flow was last judged. A flow opened through a learnt
/// address is judged as if the address had not expired: expiry is not a policy change.
#[inline(never)]
fn rejudge(endpoint: &Endpoint, packet: &Packet, key: &FlowKey, at: &Moment) -> Outcome {
    let decision = policy_decision(endpoint, packet, at.now, at.learnt).decision;
    if decision.verdict == Verdict::Deny {
        // Cut: the flow is forgotten, so its next packet is judged as new and denied.
        conntrack::forget(key);
        return decided(decision);
    }
    conntrack::set_epoch(key, at.epoch);
    outcome(Verdict::Allow, Reason::Conntrack)
}

#[inline(always)]
fn new_flow(
    endpoint: &Endpoint,
    packet: &Packet,
    key: &FlowKey,
    is_filtered: bool,
    settings: &Settings,
    now: u64,
) -> Outcome {
    let (mut result, via_learnt) = if is_filtered {
        let judged = policy_decision(endpoint, packet, now, false);
        (decided(judged.decision), judged.via_learnt)
    } else {
        (outcome(Verdict::Allow, Reason::NotIsolated), false)
    };
    result.opened_flow = result.verdict != Verdict::Deny
        && conntrack::open(key, packet, Direction::Sent, now, settings.policy_epoch);
    if result.opened_flow && via_learnt {
        conntrack::mark_learnt(key);
    }
    result
}

/// A packet that names no flow: judged on its own every time.
#[inline(never)]
fn untracked(endpoint: &Endpoint, packet: &Packet, is_filtered: bool, now: u64) -> Outcome {
    if !is_filtered {
        return outcome(Verdict::Allow, Reason::NotIsolated);
    }
    decided(policy_decision(endpoint, packet, now, false).decision)
}

/// A fragment after the first follows the first fragment's verdict.
#[inline(never)]
fn later_fragment(packet: &Packet, is_filtered: bool) -> Outcome {
    if !is_filtered {
        return outcome(Verdict::Allow, Reason::NotIsolated);
    }
    match maps::fragment_verdict(&packet.fragment_key()) {
        Some(first) => match (
            Verdict::from_u8(first.verdict),
            Reason::from_u8(first.reason),
        ) {
            (Some(verdict), Some(reason)) => outcome(verdict, reason),
            _ => outcome(Verdict::Deny, Reason::Fragment),
        },
        None => outcome(Verdict::Deny, Reason::Fragment),
    }
}

#[inline(never)]
fn remember_fragment(packet: &Packet, first: &Outcome) {
    maps::remember_fragment(
        &packet.fragment_key(),
        &FragmentVerdict {
            dst_port: packet.dst_port,
            verdict: first.verdict as u8,
            reason: first.reason as u8,
        },
    );
}

/// An ICMP error about a flow the tracker holds, in either direction.
#[inline(never)]
fn is_related(skb: &SkBuff, packet: &Packet, now: u64, settings: &Settings) -> bool {
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        protocol: 0,
        pad: [0; 3],
    };
    packet::quoted_flow(skb, packet, &mut key).is_some() && conntrack::holds(&key, now, settings)
}

fn is_own_address(endpoint: &Endpoint, packet: &Packet) -> bool {
    if packet.is_ipv6 {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV6 != 0 && packet.src == endpoint.ipv6
    } else {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV4 != 0 && packet.src[12..] == endpoint.ipv4
    }
}

/// What the tables said, and whether a learnt address took part.
struct Judged {
    decision: Decision,
    via_learnt: bool,
}

/// The policy tables' answer: the entries for the destination's identity, for its
/// CIDR class and (for an endpoint with domain rules) for the domain identity of a
/// learnt address, joined, then the tier order over the result. `even_expired`: a
/// learnt address counts after its expiry (a flow opened through it).
#[inline(never)]
fn policy_decision(endpoint: &Endpoint, packet: &Packet, now: u64, even_expired: bool) -> Judged {
    let prefix_len = if packet.has_ports() {
        POLICY_PREFIX_FULL
    } else {
        POLICY_PREFIX_ANY_PORT
    };
    let (protocol, port) = (packet.protocol, packet.dst_port);
    let mut found = PolicyValue::NONE;
    if let Some(identity) = maps::identity(&packet.dst)
        && let Some(value) = maps::policy(endpoint.table, identity, protocol, port, prefix_len)
    {
        found.join(value);
    }
    if let Some(class) = maps::cidr_class(endpoint.table, &packet.dst)
        && let Some(value) = maps::policy(endpoint.table, class, protocol, port, prefix_len)
    {
        found.join(value);
    }
    let mut via_learnt = false;
    if endpoint.flags & ENDPOINT_FLAG_DOMAINS != 0
        && let Some(domain) = dns::learnt_identity(endpoint, &packet.dst, now, even_expired)
        && let Some(value) = maps::policy(endpoint.table, domain, protocol, port, prefix_len)
    {
        found.join(value);
        via_learnt = true;
    }
    Judged {
        decision: egret_common::policy_decision(endpoint.flags, &found),
        via_learnt,
    }
}

/// A packet reaching the endpoint: moves its flow along, or starts tracking a flow the
/// endpoint accepts, so the endpoint's replies pass. A DNS answer to an endpoint with
/// domain rules is read first (`endpoint` is only looked up for those).
#[inline(always)]
pub fn observe_received(
    skb: &SkBuff,
    l3: usize,
    ethertype: u16,
    endpoint: impl FnOnce() -> Option<&'static Endpoint>,
) {
    let mut packet = Packet::EMPTY;
    if packet::parse(skb, l3, ethertype, &mut packet) != Parsed::Ip {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if dns::is_answer(&packet)
        && let Some(endpoint) = endpoint()
        && endpoint.flags & ENDPOINT_FLAG_DOMAINS != 0
    {
        dns::learn(skb, &packet, endpoint, now);
    }
    let Some(key) = conntrack::key(&packet, Direction::Received) else {
        return;
    };
    let settings = maps::settings();
    if conntrack::track(&key, &packet, Direction::Received, now, settings).is_none() {
        conntrack::open(
            &key,
            &packet,
            Direction::Received,
            now,
            settings.policy_epoch,
        );
    }
}
