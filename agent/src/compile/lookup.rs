//! The kernel's lookup, done in userspace on the compiled tables: the same identity
//! lookup, CIDR longest match and policy longest match, and the same verdict function
//! (`egret_common::policy_decision`). `egret simulate` and `explain` answer with it, so
//! their answers are the tables' answers. For a pod with `domainNames` rules, what DNS
//! told it about the destination ([`Resolved`]) joins the lookup as the kernel's learnt
//! address does: the most specific of the table's patterns the name matches (the exact
//! name, else the longest `*.` suffix), by the kernel's own keys.

use std::{collections::BTreeSet, net::IpAddr};

use egret_common::{
    Reason, Verdict,
    dns::{exact_key, name_hash, wildcard_key},
    maps::{ENDPOINT_FLAG_DOMAINS, ENDPOINT_FLAGS_FILTERED, tier_rule_parts},
    proto,
};
use ipnet::IpNet;

use super::{Allowance, EndpointEntry, PolicyEntryKey, PortPrefix, Tables, domains::DomainEntry};
use crate::policy::{PolicyRef, RuleRef, cluster::TierRuleRef};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The NetworkPolicy rules that allow the packet (from the entries the lookups
    /// found).
    pub allowed_by: BTreeSet<RuleRef>,
    /// The `ClusterNetworkPolicy` rule that decided, if one did.
    pub decided_by: Option<TierRuleRef>,
    /// The `ClusterNetworkPolicy` rules evaluated before the decision, in order: none
    /// of them matched, or (a Pass) it matched and skipped the rest of its tier.
    pub passed_over: Vec<TierRuleRef>,
    /// The `domainNames` pattern whose entries joined the lookup: the one the resolved
    /// name matched (whether or not its rules cover this port).
    pub domain: Option<DomainEntry>,
}

/// What DNS told the pod about a destination address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// The pod resolved this name to the address (`simulate`).
    Name(&'a str),
    /// The kernel learnt the address for the pod under this pattern key, and it still
    /// admits new connections (`explain`).
    Pattern(u64),
}

impl Decision {
    /// The policies of the rules that allow the packet.
    #[must_use]
    pub fn allowing_policies(&self) -> BTreeSet<PolicyRef> {
        self.allowed_by
            .iter()
            .map(|rule| rule.policy.clone())
            .collect()
    }
}

/// The verdict for a packet `endpoint` sends to `dst` (`protocol` number, destination
/// `port`; 0 for protocols without ports), with no DNS answer for `dst`.
#[must_use]
pub fn decide(
    tables: &Tables,
    endpoint: &EndpointEntry,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> Decision {
    decide_resolved(tables, endpoint, dst, protocol, port, None)
}

/// Like [`decide`], for a pod that DNS told `resolved` about `dst`.
#[must_use]
pub fn decide_resolved(
    tables: &Tables,
    endpoint: &EndpointEntry,
    dst: IpAddr,
    protocol: u8,
    port: u16,
    resolved: Option<Resolved<'_>>,
) -> Decision {
    if endpoint.flags & ENDPOINT_FLAGS_FILTERED == 0 {
        return Decision {
            verdict: Verdict::Allow,
            reason: Reason::NotIsolated,
            allowed_by: BTreeSet::new(),
            decided_by: None,
            passed_over: Vec::new(),
            domain: None,
        };
    }
    let mut found = Allowance::default();
    if let Some(identity) = tables.identities.get(&dst)
        && let Some(allowance) = policy_match(tables, endpoint.table, *identity, protocol, port)
    {
        found.merge(allowance);
    }
    if let Some(class) = cidr_match(tables, endpoint.table, dst)
        && let Some(allowance) = policy_match(tables, endpoint.table, class, protocol, port)
    {
        found.merge(allowance);
    }
    // The kernel reads learnt addresses only for endpoints with domain rules.
    let domain = resolved
        .filter(|_| endpoint.flags & ENDPOINT_FLAG_DOMAINS != 0)
        .and_then(|resolved| domain_match(tables, endpoint.table, resolved));
    if let Some(domain) = &domain
        && let Some(allowance) =
            policy_match(tables, endpoint.table, domain.identity, protocol, port)
    {
        found.merge(allowance);
    }
    let decision = egret_common::policy_decision(endpoint.flags, &found.value);
    let decided_rank = tier_rule_parts(decision.rule).map(|(rank, _)| rank as usize);
    // Before an Admin or Baseline decision: every rule ranked above it; before a
    // NetworkPolicy decision: the Admin tier; before the default: both tiers.
    let evaluated_before = |rank: usize, rule: &TierRuleRef| match decided_rank {
        Some(decided) => rank < decided,
        None if matches!(decision.reason, Reason::PolicyAllows | Reason::NoRuleAllows) => {
            rule.tier == crate::policy::cluster::Tier::Admin
        }
        None => true,
    };
    let passed_over = tables
        .tier_rules
        .iter()
        .enumerate()
        .filter(|(rank, rule)| {
            endpoint.cluster_policies.contains(&rule.policy) && evaluated_before(*rank, rule)
        })
        .map(|(_, rule)| rule.clone())
        .collect();
    Decision {
        verdict: decision.verdict,
        reason: decision.reason,
        allowed_by: std::sync::Arc::unwrap_or_clone(found.rules),
        decided_by: decided_rank
            .and_then(|rank| tables.tier_rules.get(rank))
            .cloned(),
        passed_over,
        domain,
    }
}

/// The table's pattern for what DNS said: for a name, the exact name's entry, else
/// the longest proper suffix's `*.` entry (as the kernel's walker picks it).
fn domain_match(tables: &Tables, table: u32, resolved: Resolved<'_>) -> Option<DomainEntry> {
    let entry = |key: u64| tables.domains.get(&(table, key)).cloned();
    match resolved {
        Resolved::Pattern(key) => entry(key),
        Resolved::Name(name) => {
            let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
            if let Some(found) = name_hash(&name).and_then(|hash| entry(exact_key(hash))) {
                return Some(found);
            }
            name.match_indices('.').find_map(|(dot, _)| {
                let suffix = &name[dot + 1..];
                entry(wildcard_key(name_hash(suffix)?))
            })
        }
    }
}

/// Longest match in the table's CIDR entries.
fn cidr_match(tables: &Tables, table: u32, dst: IpAddr) -> Option<u32> {
    let max = match dst {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (0..=max).rev().find_map(|len| {
        let net = IpNet::new(dst, len)
            .expect("length within the family")
            .trunc();
        tables.cidrs.get(&(table, net)).copied()
    })
}

/// Longest match in the policy table, as the kernel keys it.
fn policy_match(
    tables: &Tables,
    table: u32,
    identity: u32,
    protocol: u8,
    port: u16,
) -> Option<&Allowance> {
    port_candidates(protocol, port).find_map(|ports| {
        tables.policy.get(&PolicyEntryKey {
            table,
            identity,
            ports,
        })
    })
}

/// The keys a lookup tries, longest first, as the kernel keys them: ports only for
/// TCP, UDP and SCTP; other protocols match "whole protocol" and "any protocol" entries.
pub(super) fn port_candidates(protocol: u8, port: u16) -> impl Iterator<Item = PortPrefix> {
    let has_ports = matches!(protocol, proto::TCP | proto::UDP | proto::SCTP);
    let (port, longest) = if has_ports { (port, 16) } else { (0, 0) };
    (0..=longest)
        .rev()
        .map(move |len| {
            let shift = 16 - u32::from(len);
            let masked = u16::try_from((u32::from(port) >> shift) << shift & 0xFFFF).unwrap_or(0);
            PortPrefix::Protocol {
                protocol,
                port: masked,
                len,
            }
        })
        .chain(std::iter::once(PortPrefix::AnyProtocol))
}
