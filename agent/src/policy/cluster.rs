//! `ClusterNetworkPolicy` (SIG Network's `policy.networking.k8s.io/v1alpha2`) egress
//! semantics as plain types, and a direct evaluator of the tier order: the oracle the
//! compiled tables are tested against, and what `explain` prints its trace from.
//!
//! Order, for a packet from pod P: the Admin tier's policies selecting P by priority
//! (lower first; ties by name), their rules in order, the first rule that matches
//! decides (Accept allows, Deny drops, Pass skips to NetworkPolicy); then, if a
//! NetworkPolicy isolates P, it decides; then the Baseline tier the same way (Pass
//! there falls to the default); then allow.

pub mod convert;
pub mod domain;

use std::{fmt, net::IpAddr};

use egret_common::maps::TierAction;
use ipnet::IpNet;

use self::domain::DomainName;
use super::{Labels, Mode, NamedPort, PodView, PortMatch, Protocol, Selector};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl Tier {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

/// The egress side of one `ClusterNetworkPolicy`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNetworkPolicy {
    /// Cluster-scoped: a name is all there is.
    pub name: String,
    pub tier: Tier,
    /// 0–1000, lower first within the tier.
    pub priority: u32,
    pub subject: Subject,
    pub egress: Vec<TierRule>,
    pub mode: Mode,
}

/// Which pods the policy applies to (host-network pods never).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every pod of the matching namespaces.
    Namespaces(Selector),
    /// Pods matching both selectors.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
}

/// One egress rule: `action` for traffic to any of `to` on any of `protocols` (empty:
/// every protocol and port, ICMP included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierRule {
    pub name: Option<String>,
    pub action: TierAction,
    pub to: Vec<TierPeer>,
    pub protocols: Vec<PortMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierPeer {
    /// Every pod of the matching namespaces.
    Namespaces(Selector),
    /// Pods matching both selectors.
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// Addresses, pods' included.
    Networks(Vec<IpNet>),
    /// Addresses that DNS answered the subject pod for a matching name (Accept rules
    /// only), learnt by the kernel from the answers the pod receives.
    DomainNames(Vec<DomainName>),
    /// Every destination: what a Deny or Pass rule with a peer Egret cannot honour
    /// matches, so it fails closed (upstream's rule for unknown peers).
    Everything,
}

/// A rule of a `ClusterNetworkPolicy`, as flow logs and `explain` name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TierRuleRef {
    pub tier: Tier,
    pub policy: String,
    /// Index in `spec.egress`.
    pub rule: usize,
    pub rule_name: Option<String>,
    pub action: TierAction,
}

impl fmt::Display for TierRuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} egress[{}]", self.policy, self.rule)?;
        if let Some(name) = &self.rule_name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

impl ClusterNetworkPolicy {
    /// The policy applies to `pod`, given its namespace's labels. Whether the pod may
    /// be a subject at all (host network, address) is the caller's concern.
    #[must_use]
    pub fn selects(&self, pod: &impl PodView, namespace_labels: &Labels) -> bool {
        match &self.subject {
            Subject::Namespaces(namespaces) => namespaces.matches(namespace_labels),
            Subject::Pods { namespaces, pods } => {
                namespaces.matches(namespace_labels) && pods.matches(pod.labels())
            }
        }
    }

    /// Evaluation order across policies: tier, then priority, then name (upstream
    /// leaves equal priorities to the implementation; a name makes it deterministic).
    #[must_use]
    pub fn order_key(&self) -> (Tier, u32, &str) {
        (self.tier, self.priority, &self.name)
    }

    #[must_use]
    pub fn rule_ref(&self, index: usize) -> TierRuleRef {
        let rule = &self.egress[index];
        TierRuleRef {
            tier: self.tier,
            policy: self.name.clone(),
            rule: index,
            rule_name: rule.name.clone(),
            action: rule.action,
        }
    }
}

/// A packet's destination as the rules see it.
pub struct Destination<'a, P: PodView> {
    pub address: IpAddr,
    /// The pod at the address, with its namespace's labels and named ports.
    pub pod: Option<(&'a P, &'a Labels, &'a [NamedPort])>,
    pub protocol: u8,
    /// 0 for protocols without ports.
    pub port: u16,
    /// The name the source pod resolved to `address` and that is still valid (a DNS
    /// answer it received), for `domainNames` peers.
    pub resolved: Option<&'a str>,
}

impl TierPeer {
    #[must_use]
    pub fn matches<P: PodView>(&self, destination: &Destination<'_, P>) -> bool {
        match self {
            TierPeer::Everything => true,
            TierPeer::Networks(networks) => networks
                .iter()
                .any(|net| net.contains(&destination.address)),
            TierPeer::DomainNames(names) => destination
                .resolved
                .is_some_and(|resolved| names.iter().any(|name| name.matches(resolved))),
            TierPeer::Namespaces(namespaces) => destination
                .pod
                .is_some_and(|(_, namespace_labels, _)| namespaces.matches(namespace_labels)),
            TierPeer::Pods { namespaces, pods } => {
                destination.pod.is_some_and(|(pod, namespace_labels, _)| {
                    namespaces.matches(namespace_labels) && pods.matches(pod.labels())
                })
            }
        }
    }
}

impl TierRule {
    #[must_use]
    pub fn matches<P: PodView>(&self, destination: &Destination<'_, P>) -> bool {
        self.to.iter().any(|peer| peer.matches(destination)) && self.protocols_match(destination)
    }

    fn protocols_match<P: PodView>(&self, destination: &Destination<'_, P>) -> bool {
        if self.protocols.is_empty() {
            return true;
        }
        let protocol = match destination.protocol {
            egret_common::proto::TCP => Protocol::Tcp,
            egret_common::proto::UDP => Protocol::Udp,
            egret_common::proto::SCTP => Protocol::Sctp,
            // `protocols` only names TCP, UDP and SCTP ports.
            _ => return false,
        };
        let named_ports = destination.pod.map(|(_, _, named)| named);
        self.protocols
            .iter()
            .any(|p| p.allows(protocol, destination.port, named_ports))
    }
}

/// How one tier rule took part in a decision, for `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Evaluated before the decision and did not match.
    NotMatched(TierRuleRef),
    /// A Pass rule that matched: the rest of its tier was skipped.
    Passed(TierRuleRef),
    /// The rule that decided.
    Decided(TierRuleRef),
}

/// The first rule of `tier` (among `policies`, which select the packet's source) that
/// matches the destination, with the rules evaluated before it. `policies` must be in
/// [`ClusterNetworkPolicy::order_key`] order.
#[must_use]
pub fn first_match<'p, P: PodView>(
    policies: impl IntoIterator<Item = &'p ClusterNetworkPolicy>,
    tier: Tier,
    destination: &Destination<'_, P>,
) -> (Option<TierRuleRef>, Vec<Step>) {
    let mut trace = Vec::new();
    for policy in policies.into_iter().filter(|p| p.tier == tier) {
        for (index, rule) in policy.egress.iter().enumerate() {
            let reference = policy.rule_ref(index);
            if rule.matches(destination) {
                let step = if rule.action == TierAction::Pass {
                    Step::Passed(reference.clone())
                } else {
                    Step::Decided(reference.clone())
                };
                trace.push(step);
                return (Some(reference), trace);
            }
            trace.push(Step::NotMatched(reference));
        }
    }
    (None, trace)
}
