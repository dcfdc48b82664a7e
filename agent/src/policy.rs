//! `NetworkPolicy` egress semantics as plain types and pure functions.
//!
//! Nothing here knows about Kubernetes API types or the kernel: [`convert`] turns
//! `networking.k8s.io/v1` objects into these types (validating them), and `compile`
//! turns them into tables.

pub mod cluster;
pub mod convert;
mod selector;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;

pub use self::selector::{Operator, Requirement, Selector};

pub type Labels = BTreeMap<String, String>;

/// `namespace/name` of a policy, as users write it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One egress rule of one policy: `namespace/name egress[index]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: PolicyRef,
    /// Index in the policy's `spec.egress`.
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} egress[{}]", self.policy, self.rule)
    }
}

/// Whether a policy's would-be denials drop packets or are only counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    #[default]
    Enforce,
    /// Staged with the `egret.dev/mode: audit` annotation.
    Audit,
}

/// The egress side of one `NetworkPolicy`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub id: PolicyRef,
    pub pod_selector: Selector,
    /// `Egress` is in `policyTypes` (explicitly, or by the API server's defaulting rule).
    pub isolates_egress: bool,
    pub egress: Vec<EgressRule>,
    pub mode: Mode,
}

/// One egress rule. Empty `to` allows every destination; empty `ports` every port and
/// protocol (the API treats an empty list and an absent one alike).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRule {
    pub to: Vec<Peer>,
    pub ports: Vec<PortMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Block(IpBlock),
    Pods(PodPeer),
}

/// `cidr` minus every `except`; host bits of the CIDRs are already cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlock {
    #[must_use]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

/// Pods chosen by selectors. `namespaces: None` means the policy's own namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPeer {
    pub namespaces: Option<Selector>,
    pub pods: Selector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => egret_common::proto::TCP,
            Protocol::Udp => egret_common::proto::UDP,
            Protocol::Sctp => egret_common::proto::SCTP,
        }
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the API's protocol names (case-sensitive, as the API server validates).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// `port` absent: every port of the protocol.
    Any,
    /// `port` with an optional `endPort`: `first..=last`.
    Range { first: u16, last: u16 },
    /// A container port name, resolved on each destination pod.
    Named(String),
}

/// A container port a pod declares with a name, for named-port rules.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What the semantics need to know about a pod.
pub trait PodView {
    fn namespace(&self) -> &str;
    fn labels(&self) -> &Labels;
}

impl NetworkPolicy {
    /// The policy applies to `pod` (same namespace, pod selector matches). Whether the
    /// pod may be a subject at all (hostNetwork, IP) is the caller's concern.
    #[must_use]
    pub fn selects(&self, pod: &impl PodView) -> bool {
        pod.namespace() == self.id.namespace && self.pod_selector.matches(pod.labels())
    }
}

impl PodPeer {
    /// The peer chooses `pod`, given the labels of the pod's namespace.
    #[must_use]
    pub fn matches(
        &self,
        policy_namespace: &str,
        pod: &impl PodView,
        namespace_labels: &Labels,
    ) -> bool {
        let namespace_matches = match &self.namespaces {
            None => pod.namespace() == policy_namespace,
            Some(selector) => selector.matches(namespace_labels),
        };
        namespace_matches && self.pods.matches(pod.labels())
    }
}

impl PortMatch {
    /// The destination port `port` (of `protocol`) is allowed by this match on a
    /// destination declaring `named_ports` (`None` when the destination is not a pod).
    #[must_use]
    pub fn allows(&self, protocol: Protocol, port: u16, named_ports: Option<&[NamedPort]>) -> bool {
        if protocol != self.protocol {
            return false;
        }
        match &self.port {
            PortSpec::Any => true,
            PortSpec::Range { first, last } => (*first..=*last).contains(&port),
            PortSpec::Named(name) => resolve_named_port(named_ports, name, protocol) == Some(port),
        }
    }
}

/// The number a pod declares for the port named `name` with `protocol`.
#[must_use]
pub fn resolve_named_port(
    named_ports: Option<&[NamedPort]>,
    name: &str,
    protocol: Protocol,
) -> Option<u16> {
    named_ports?
        .iter()
        .find(|p| p.name == name && p.protocol == protocol)
        .map(|p| p.port)
}
