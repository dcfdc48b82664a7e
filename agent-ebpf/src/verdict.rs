//! The verdict for one packet an endpoint sends: link plumbing passes, spoofed sources
//! drop, then the endpoint's policy tables decide.

use aya_ebpf::programs::sk_buff::SkBuff;
use egret_common::{
    Reason, Verdict,
    maps::{
        ENDPOINT_FLAG_FAIL_CLOSED, ENDPOINT_FLAG_HAS_IPV4, ENDPOINT_FLAG_HAS_IPV6,
        ENDPOINT_FLAG_ISOLATED_AUDITED, ENDPOINT_FLAG_ISOLATED_ENFORCED, Endpoint,
        POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_FULL, SETTINGS_FLAG_AUDIT_ALL,
        SETTINGS_FLAG_DENY_UNKNOWN, SETTINGS_FLAG_KEEP_ESTABLISHED, UNKNOWN_ENDPOINT_ID,
    },
};

use crate::{
    conntrack, maps,
    packet::{self, Fragment, Packet, Parsed},
};

/// Judges the packet, counts it, and returns what to do with it.
pub fn judge(skb: &SkBuff, l3: usize, ethertype: u16, endpoint: Option<&Endpoint>) -> Verdict {
    let settings = maps::settings();
    let (endpoint_id, (verdict, reason)) = match endpoint {
        Some(endpoint) => {
            let keep_established = settings.flags & SETTINGS_FLAG_KEEP_ESTABLISHED != 0;
            (
                endpoint.id,
                decide(skb, l3, ethertype, endpoint, keep_established),
            )
        }
        None if settings.flags & SETTINGS_FLAG_DENY_UNKNOWN != 0 => (
            UNKNOWN_ENDPOINT_ID,
            (Verdict::Deny, Reason::UnknownEndpoint),
        ),
        None => (
            UNKNOWN_ENDPOINT_ID,
            (Verdict::Allow, Reason::UnknownEndpoint),
        ),
    };
    let verdict = if verdict == Verdict::Deny && settings.flags & SETTINGS_FLAG_AUDIT_ALL != 0 {
        Verdict::AuditDeny
    } else {
        verdict
    };
    maps::count(endpoint_id, verdict as u8, reason as u8, skb.len());
    verdict
}

fn decide(
    skb: &SkBuff,
    l3: usize,
    ethertype: u16,
    endpoint: &Endpoint,
    keep_established: bool,
) -> (Verdict, Reason) {
    let is_isolated =
        endpoint.flags & (ENDPOINT_FLAG_ISOLATED_ENFORCED | ENDPOINT_FLAG_ISOLATED_AUDITED) != 0;
    let mut packet = match packet::parse(skb, l3, ethertype) {
        Parsed::NotIp => return (Verdict::Allow, Reason::NotFiltered),
        Parsed::Malformed if is_isolated => return (Verdict::Deny, Reason::Malformed),
        Parsed::Malformed => return (Verdict::Allow, Reason::NotIsolated),
        Parsed::Ip(packet) => packet,
    };
    if packet.is_link_control {
        return (Verdict::Allow, Reason::NotFiltered);
    }
    if !is_own_address(endpoint, &packet) {
        return (Verdict::Deny, Reason::SpoofedSource);
    }
    if endpoint.flags & ENDPOINT_FLAG_FAIL_CLOSED != 0 {
        return (Verdict::Deny, Reason::TableOverflow);
    }
    if let Some(origin) = conntrack::sent_flow_origin(&packet) {
        if conntrack::is_reply(origin) || keep_established {
            return (Verdict::Allow, Reason::Conntrack);
        }
    }
    if !is_isolated {
        conntrack::on_sent_allowed(&packet);
        return (Verdict::Allow, Reason::NotIsolated);
    }
    if packet.fragment == Fragment::Later {
        match maps::fragment_port(&packet.fragment_key()) {
            Some(port) => packet.dst_port = port,
            None => return (Verdict::Deny, Reason::Fragment),
        }
    }
    let outcome = policy_verdict(endpoint, &packet);
    if outcome.0 != Verdict::Deny {
        if packet.fragment == Fragment::First {
            maps::remember_fragment(&packet.fragment_key(), packet.dst_port);
        }
        conntrack::on_sent_allowed(&packet);
    }
    outcome
}

fn is_own_address(endpoint: &Endpoint, packet: &Packet) -> bool {
    if packet.is_ipv6 {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV6 != 0 && packet.src == endpoint.ipv6
    } else {
        endpoint.flags & ENDPOINT_FLAG_HAS_IPV4 != 0 && packet.src[12..] == endpoint.ipv4
    }
}

fn policy_verdict(endpoint: &Endpoint, packet: &Packet) -> (Verdict, Reason) {
    let prefix_len = if packet.has_ports() {
        POLICY_PREFIX_FULL
    } else {
        POLICY_PREFIX_ANY_PORT
    };
    let mut allowed = 0;
    if let Some(identity) = maps::identity(&packet.dst) {
        allowed |= maps::policy(
            endpoint.id,
            identity,
            packet.protocol,
            packet.dst_port,
            prefix_len,
        );
    }
    if let Some(class) = maps::cidr_class(endpoint.id, &packet.dst) {
        allowed |= maps::policy(
            endpoint.id,
            class,
            packet.protocol,
            packet.dst_port,
            prefix_len,
        );
    }
    egret_common::policy_verdict(endpoint.flags, allowed)
}

/// A packet reaching the endpoint: remember the flow so the endpoint's replies pass.
pub fn observe_received(skb: &SkBuff, l3: usize, ethertype: u16) {
    if let Parsed::Ip(packet) = packet::parse(skb, l3, ethertype) {
        conntrack::on_received(&packet);
    }
}
