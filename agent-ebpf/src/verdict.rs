//! The verdict for one packet an endpoint sends: link plumbing passes, spoofed sources
//! drop, then the endpoint's policy tables decide.

use aya_ebpf::programs::sk_buff::SkBuff;
use egret_common::{
    Reason, Verdict,
    maps::{
        ENDPOINT_FLAG_FAIL_CLOSED, ENDPOINT_FLAG_HAS_IPV4, ENDPOINT_FLAG_HAS_IPV6,
        ENDPOINT_FLAG_ISOLATED_AUDITED, ENDPOINT_FLAG_ISOLATED_ENFORCED, Endpoint,
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_FULL, SETTINGS_FLAG_AUDIT_ALL,
        SETTINGS_FLAG_DENY_UNKNOWN, SETTINGS_FLAG_EVENTS_ALLOWED, SETTINGS_FLAG_KEEP_ESTABLISHED,
        UNKNOWN_ENDPOINT_ID,
    },
};

use crate::{
    conntrack, events, maps,
    packet::{self, Fragment, Packet, Parsed},
};

/// What `decide` concluded, and whether the packet opened a new allowed flow.
struct Outcome {
    verdict: Verdict,
    reason: Reason,
    opened_flow: bool,
}

const fn outcome(verdict: Verdict, reason: Reason) -> Outcome {
    Outcome {
        verdict,
        reason,
        opened_flow: false,
    }
}

/// Judges the packet, counts it, reports it when worth it, and returns what to do.
pub fn judge(skb: &SkBuff, l3: usize, ethertype: u16, endpoint: Option<&Endpoint>) -> Verdict {
    let settings = maps::settings();
    let parsed = packet::parse(skb, l3, ethertype);
    let (endpoint_id, result) = match endpoint {
        Some(endpoint) => {
            let keep_established = settings.flags & SETTINGS_FLAG_KEEP_ESTABLISHED != 0;
            (endpoint.id, decide(&parsed, endpoint, keep_established))
        }
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
    maps::count(endpoint_id, verdict as u8, result.reason as u8, bytes);
    let report = verdict != Verdict::Allow
        || (result.opened_flow && settings.flags & SETTINGS_FLAG_EVENTS_ALLOWED != 0);
    if report && let Parsed::Ip(packet) = &parsed {
        events::emit(endpoint_id, verdict, result.reason, packet, bytes);
    }
    verdict
}

fn decide(parsed: &Parsed, endpoint: &Endpoint, keep_established: bool) -> Outcome {
    let is_isolated =
        endpoint.flags & (ENDPOINT_FLAG_ISOLATED_ENFORCED | ENDPOINT_FLAG_ISOLATED_AUDITED) != 0;
    let packet = match parsed {
        Parsed::NotIp => return outcome(Verdict::Allow, Reason::NotFiltered),
        Parsed::Malformed if is_isolated => return outcome(Verdict::Deny, Reason::Malformed),
        Parsed::Malformed => return outcome(Verdict::Allow, Reason::NotIsolated),
        Parsed::Ip(packet) => packet,
    };
    if packet.is_link_control {
        return outcome(Verdict::Allow, Reason::NotFiltered);
    }
    if !is_own_address(endpoint, packet) {
        return outcome(Verdict::Deny, Reason::SpoofedSource);
    }
    if endpoint.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0 {
        return outcome(Verdict::Deny, Reason::TableOverflow);
    }
    if let Some(origin) = conntrack::sent_flow_origin(packet)
        && (conntrack::is_reply(origin) || keep_established)
    {
        return outcome(Verdict::Allow, Reason::Conntrack);
    }
    if !is_isolated {
        let opened_flow = conntrack::on_sent_allowed(packet);
        return Outcome {
            verdict: Verdict::Allow,
            reason: Reason::NotIsolated,
            opened_flow,
        };
    }
    let mut dst_port = packet.dst_port;
    if packet.fragment == Fragment::Later {
        match maps::fragment_port(&packet.fragment_key()) {
            Some(port) => dst_port = port,
            None => return outcome(Verdict::Deny, Reason::Fragment),
        }
    }
    let (verdict, reason) = policy_verdict(endpoint, packet, dst_port);
    let mut opened_flow = false;
    if verdict != Verdict::Deny {
        if packet.fragment == Fragment::First {
            maps::remember_fragment(&packet.fragment_key(), dst_port);
        }
        opened_flow = conntrack::on_sent_allowed(packet);
    }
    Outcome {
        verdict,
        reason,
        opened_flow,
    }
}

fn is_own_address(endpoint: &Endpoint, packet: &Packet) -> bool {
    if packet.is_ipv6 {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV6 != 0 && packet.src == endpoint.ipv6
    } else {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV4 != 0 && packet.src[12..] == endpoint.ipv4
    }
}

fn policy_verdict(endpoint: &Endpoint, packet: &Packet, dst_port: u16) -> (Verdict, Reason) {
    let prefix_len = if packet.has_ports() {
        POLICY_PREFIX_FULL
    } else {
        POLICY_PREFIX_ANY_PORT
    };
    let mut allowed = 0;
    if let Some(identity) = maps::identity(&packet.dst) {
        allowed |= maps::policy(endpoint.id, identity, packet.protocol, dst_port, prefix_len);
    }
    if let Some(class) = maps::cidr_class(endpoint.id, &packet.dst) {
        allowed |= maps::policy(endpoint.id, class, packet.protocol, dst_port, prefix_len);
    }
    egret_common::policy_verdict(endpoint.flags, allowed)
}

/// A packet reaching the endpoint: remember the flow so the endpoint's replies pass.
pub fn observe_received(skb: &SkBuff, l3: usize, ethertype: u16) {
    if let Parsed::Ip(packet) = packet::parse(skb, l3, ethertype) {
        conntrack::on_received(&packet);
    }
}
