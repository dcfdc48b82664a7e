//! ClusterNetworkPolicy rules into the same per-endpoint entries as NetworkPolicy.
//!
//! Every egress rule of every `ClusterNetworkPolicy` gets a rank: its place in the
//! evaluation order (Admin before Baseline, priority, name, rule order). An entry holds,
//! per tier, the lowest-ranked rule that matches there ([`PolicyValue`]), so joining
//! entries — covering port prefixes, overlapping networks, the identity and the CIDR
//! lookup of one packet — keeps the first match, and the kernel applies the tier order
//! to one joined value: no rule is walked per packet.

use std::collections::BTreeMap;
use std::net::IpAddr;

use egret_common::maps::{PolicyValue, TIER_RANK_MAX, TierAction, tier_rule};
use ipnet::IpNet;

#[cfg(test)]
pub(super) mod tests;

use super::{Allowance, EndpointProgram, Grants, IdentityKey, grants_for};
use crate::{
    policy::{
        Mode, PortMatch, PortSpec,
        cluster::{ClusterNetworkPolicy, Tier, TierPeer, TierRuleRef},
    },
    state::{Pod, Snapshot},
};

/// Every `ClusterNetworkPolicy` in evaluation order, with the rank of its first rule.
pub struct Ranked<'s> {
    pub policies: Vec<(&'s ClusterNetworkPolicy, u32)>,
    /// Rank -> rule, for flow logs and `explain`.
    pub rules: Vec<TierRuleRef>,
}

impl<'s> Ranked<'s> {
    #[must_use]
    pub fn of(snapshot: &'s Snapshot) -> Self {
        let mut policies: Vec<&ClusterNetworkPolicy> = snapshot.cluster_policies.values().collect();
        policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let mut ranked = Ranked {
            policies: Vec::with_capacity(policies.len()),
            rules: Vec::new(),
        };
        for policy in policies {
            let first = u32::try_from(ranked.rules.len()).unwrap_or(TIER_RANK_MAX);
            ranked.policies.push((policy, first));
            ranked
                .rules
                .extend((0..policy.egress.len()).map(|i| policy.rule_ref(i)));
        }
        ranked
    }
}

/// The entry value of one rule: its rank and action in its tier, among all policies,
/// and among enforced ones unless the policy is staged.
pub(super) fn rule_value(tier: Tier, rank: u32, action: TierAction, mode: Mode) -> PolicyValue {
    let rule = tier_rule(rank.min(TIER_RANK_MAX), action);
    let mut value = PolicyValue::NONE;
    let slot = match tier {
        Tier::Admin => &mut value.admin,
        Tier::Baseline => &mut value.baseline,
    };
    slot[1] = rule;
    if mode == Mode::Enforce {
        slot[0] = rule;
    }
    value
}

impl<'s> Ranked<'s> {
    /// The policies with egress rules whose subject is `pod`, in evaluation order, with
    /// the rank of their first rule.
    #[must_use]
    pub fn selecting(
        &self,
        snapshot: &Snapshot,
        pod: &Pod,
    ) -> Vec<(&'s ClusterNetworkPolicy, u32)> {
        let namespace_labels = snapshot.namespace_labels(&pod.namespace);
        self.policies
            .iter()
            .filter(|(policy, _)| {
                !policy.egress.is_empty() && policy.selects(pod, &namespace_labels)
            })
            .copied()
            .collect()
    }
}

impl EndpointProgram {
    /// Adds the rules of the `ClusterNetworkPolicy` objects `selecting` the endpoint.
    pub(super) fn add_cluster_policies(
        &mut self,
        snapshot: &Snapshot,
        owners: &BTreeMap<IpAddr, &Pod>,
        identities: &[(u32, &IdentityKey)],
        selecting: &[(&ClusterNetworkPolicy, u32)],
    ) {
        for (policy, first_rank) in selecting {
            for (index, rule) in policy.egress.iter().enumerate() {
                let rank = first_rank + u32::try_from(index).unwrap_or(0);
                let allowance = Allowance {
                    value: rule_value(policy.tier, rank, rule.action, policy.mode),
                    ..Allowance::default()
                };
                self.add_tier_rule(
                    snapshot,
                    owners,
                    identities,
                    &rule.to,
                    &rule.protocols,
                    &allowance,
                );
            }
        }
    }

    fn add_tier_rule(
        &mut self,
        snapshot: &Snapshot,
        owners: &BTreeMap<IpAddr, &Pod>,
        identities: &[(u32, &IdentityKey)],
        peers: &[TierPeer],
        protocols: &[PortMatch],
        allowance: &Allowance,
    ) {
        let named: Vec<PortMatch> = protocols
            .iter()
            .filter(|p| matches!(p.port, PortSpec::Named(_)))
            .cloned()
            .collect();
        // Addresses that are not pods match no named port.
        let unnamed = grants_for(protocols, None, allowance);
        for peer in peers {
            match peer {
                TierPeer::Networks(networks) => {
                    for net in networks {
                        self.add_block(*net, Vec::new(), &unnamed);
                        if !named.is_empty() {
                            self.add_named_on_pods(owners, *net, &named, allowance);
                        }
                    }
                }
                TierPeer::Everything => {
                    for net in ["0.0.0.0/0", "::/0"] {
                        let net: IpNet = net.parse().expect("literal network");
                        self.add_block(net, Vec::new(), &unnamed);
                        if !named.is_empty() {
                            self.add_named_on_pods(owners, net, &named, allowance);
                        }
                    }
                }
                // Learnt addresses have entries of their own (`compile::domains`).
                TierPeer::DomainNames(_) => {}
                TierPeer::Namespaces(_) | TierPeer::Pods { .. } => {
                    for (identity, key) in identities {
                        let namespace_labels = snapshot.namespace_labels(&key.namespace);
                        let selected = match peer {
                            TierPeer::Namespaces(namespaces) => {
                                namespaces.matches(&namespace_labels)
                            }
                            TierPeer::Pods { namespaces, pods } => {
                                namespaces.matches(&namespace_labels) && pods.matches(&key.labels)
                            }
                            _ => false,
                        };
                        if selected {
                            let grants = grants_for(protocols, Some(&key.named_ports), allowance);
                            self.add_identity(*identity, &grants);
                        }
                    }
                }
            }
        }
    }

    /// Named ports of a networks rule resolve on the pods inside the networks.
    fn add_named_on_pods(
        &mut self,
        owners: &BTreeMap<IpAddr, &Pod>,
        net: IpNet,
        named: &[PortMatch],
        allowance: &Allowance,
    ) {
        for (ip, owner) in owners.iter().filter(|(ip, _)| net.contains(*ip)) {
            let grants: Grants = grants_for(named, Some(&owner.named_ports), allowance);
            self.add_block(IpNet::from(*ip), Vec::new(), &grants);
        }
    }
}
