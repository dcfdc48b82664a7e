//! `domainNames` peers into per-endpoint pattern entries and their policy entries.
//!
//! Each distinct pattern (`api.example.com`, `*.example.com`) gets a domain identity.
//! A policy table (the endpoints selected by the same policies) gets one
//! `DNS_NAMES_V1` entry per pattern its ClusterNetworkPolicies name, pointing at that
//! identity, and policy entries `(table, identity, ports)`
//! holding what the rules naming the pattern allow, tier and ports included. The kernel
//! learns an answered address under the most specific pattern the name matched, so a
//! pattern's entries also carry everything the patterns covering it allow
//! (`*.example.com` covers `api.example.com` and `*.svc.example.com`): the verdict is
//! that of every rule whose names match, joined, as for any other identity.

use std::collections::{BTreeMap, BTreeSet};

use egret_common::{
    dns::DOMAIN_IDENTITY_BIT,
    maps::{ENDPOINT_FLAG_DOMAINS, TierAction},
};

use super::{
    Allocator, Allowance, Compiled, Grants, grants_for, insert_grants, merge_grants, ports,
    tiers::{Ranked, rule_value},
};
use crate::policy::{
    PortMatch, PortSpec,
    cluster::{TierPeer, domain::DomainName},
};

/// One of an endpoint's patterns, as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEntry {
    /// The pattern's domain identity (`DOMAIN_IDENTITY_BIT` set).
    pub identity: u32,
    pub name: DomainName,
}

/// Adds the domain patterns of every table's ClusterNetworkPolicies: their name
/// entries, identities and policy entries, and `ENDPOINT_FLAG_DOMAINS` on the
/// endpoints of those tables.
pub(super) fn add(compiled: &mut Compiled, previous: &Allocator<String>, ranked: &Ranked) {
    let by_name: BTreeMap<&str, _> = ranked
        .policies
        .iter()
        .map(|(policy, first)| (policy.name.as_str(), (*policy, *first)))
        .collect();
    // Endpoints of one table share its ClusterNetworkPolicies: one of them speaks for all.
    let tables: BTreeMap<u32, &Vec<String>> = compiled
        .tables
        .endpoints
        .values()
        .map(|entry| (entry.table, &entry.cluster_policies))
        .collect();
    let mut table_patterns: Vec<(u32, BTreeMap<DomainName, Grants>)> = Vec::new();
    for (table, cluster_policies) in tables {
        let mut patterns: BTreeMap<DomainName, Grants> = BTreeMap::new();
        for name in cluster_policies {
            let Some((policy, first_rank)) = by_name.get(name.as_str()) else {
                continue;
            };
            for (index, rule) in policy.egress.iter().enumerate() {
                // Convert widened any other action's domainNames to every destination.
                if rule.action != TierAction::Accept {
                    continue;
                }
                let rank = first_rank + u32::try_from(index).unwrap_or(0);
                let allowance = Allowance {
                    value: rule_value(policy.tier, rank, rule.action, policy.mode),
                    ..Allowance::default()
                };
                // A learnt address is not a pod: named ports match nothing there.
                let numbered: Vec<PortMatch> = rule
                    .protocols
                    .iter()
                    .filter(|p| !matches!(p.port, PortSpec::Named(_)))
                    .cloned()
                    .collect();
                if numbered.is_empty() && !rule.protocols.is_empty() {
                    continue;
                }
                let grants = grants_for(&numbered, None, &allowance);
                for peer in &rule.to {
                    if let TierPeer::DomainNames(names) = peer {
                        for name in names {
                            merge_grants(patterns.entry(name.clone()).or_default(), &grants);
                        }
                    }
                }
            }
        }
        if !patterns.is_empty() {
            table_patterns.push((table, patterns));
        }
    }
    let all: BTreeSet<String> = table_patterns
        .iter()
        .flat_map(|(_, patterns)| patterns.keys().map(ToString::to_string))
        .collect();
    compiled.ids.domains = previous.reassign(all, 1);
    let mut with_domains = BTreeSet::new();
    for (table, patterns) in table_patterns {
        with_domains.insert(table);
        for name in patterns.keys() {
            let mut grants = Grants::new();
            for (covering, covering_grants) in &patterns {
                if name.is_covered_by(covering) {
                    merge_grants(&mut grants, covering_grants);
                }
            }
            ports::close_over_prefixes(&mut grants);
            let identity = DOMAIN_IDENTITY_BIT | compiled.ids.domains.id(&name.to_string());
            insert_grants(&mut compiled.tables.policy, table, identity, &grants);
            compiled.tables.domains.insert(
                (table, name.key()),
                DomainEntry {
                    identity,
                    name: name.clone(),
                },
            );
        }
    }
    for entry in compiled.tables.endpoints.values_mut() {
        if with_domains.contains(&entry.table) {
            entry.flags |= ENDPOINT_FLAG_DOMAINS;
        }
    }
}

#[cfg(test)]
mod tests;
