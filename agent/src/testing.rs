//! Builders for tests, and a reference evaluator: the DESIGN.md rules applied directly
//! to a packet, with no tables, to check the compiler against.

use std::net::IpAddr;

use egret_common::{Verdict, maps::TierAction};

use crate::{
    policy::{
        self, Labels, Mode, NamedPort, NetworkPolicy, Peer, PodView, Protocol,
        cluster::{
            ClusterNetworkPolicy, Destination, Tier, convert::ClusterNetworkPolicyObject,
            first_match,
        },
    },
    state::{Namespace, Pod, PodPhase, Snapshot},
};

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn mk_namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.to_owned(),
        labels: labels(pairs),
    }
}

/// A running pod on `node-1` with the given addresses.
pub fn mk_pod(namespace: &str, name: &str, pairs: &[(&str, &str)], ips: &[&str]) -> Pod {
    Pod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: std::sync::Arc::new(labels(pairs)),
        node_name: Some("node-1".to_owned()),
        host_network: false,
        phase: PodPhase::Running,
        ips: ips
            .iter()
            .map(|ip| ip.parse().expect("test address"))
            .collect(),
        named_ports: Vec::new(),
        uid: String::new(),
    }
}

pub fn named_port(name: &str, protocol: Protocol, port: u16) -> NamedPort {
    NamedPort {
        name: name.to_owned(),
        protocol,
        port,
    }
}

/// A policy from YAML (a `networking.k8s.io/v1` `NetworkPolicy`), converted and validated.
pub fn mk_policy(yaml: &str) -> NetworkPolicy {
    let api: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_yaml_ng::from_str(yaml).expect("test policy YAML parses");
    policy::convert::network_policy(&api, "default").expect("test policy is valid")
}

pub fn snapshot(
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<NetworkPolicy>,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for namespace in namespaces {
        snapshot.insert_namespace(namespace);
    }
    for pod in pods {
        snapshot.insert_pod(pod);
    }
    for policy in policies {
        snapshot.insert_policy(policy);
    }
    snapshot
}

/// A `ClusterNetworkPolicy` from YAML (`metadata` and `spec`), converted.
pub fn mk_cluster_policy(yaml: &str) -> ClusterNetworkPolicy {
    let object: ClusterNetworkPolicyObject =
        serde_yaml_ng::from_str(yaml).expect("test policy YAML parses");
    policy::cluster::convert::cluster_network_policy(&object)
        .expect("test policy is valid")
        .policy
}

/// The verdict the rules give, evaluated directly: the Admin tier, NetworkPolicy, the
/// Baseline tier, then allow; once over enforced policies (what drops) and once over
/// all (what is counted as an audit denial). `protocol: None` is ICMP.
pub fn reference_verdict(
    snapshot: &Snapshot,
    source: &Pod,
    destination: IpAddr,
    protocol: Option<Protocol>,
    port: u16,
) -> Verdict {
    if !source.takes_part() {
        return Verdict::Allow;
    }
    let destination_pod = snapshot.pod_by_ip(destination);
    let selecting: Vec<&NetworkPolicy> = snapshot
        .policies
        .values()
        .filter(|p| p.isolates_egress && p.selects(source))
        .collect();
    let allows = |policy: &NetworkPolicy| {
        policy.egress.iter().any(|rule| {
            let peer_ok = rule.to.is_empty()
                || rule.to.iter().any(|peer| match peer {
                    Peer::Block(block) => block.contains(destination),
                    Peer::Pods(peer) => destination_pod.is_some_and(|pod| {
                        peer.matches(
                            &policy.id.namespace,
                            pod,
                            &snapshot.namespace_labels(pod.namespace()),
                        )
                    }),
                });
            let port_ok = rule.ports.is_empty()
                || protocol.is_some_and(|protocol| {
                    rule.ports.iter().any(|p| {
                        p.allows(
                            protocol,
                            port,
                            destination_pod.map(|pod| pod.named_ports.as_slice()),
                        )
                    })
                });
            peer_ok && port_ok
        })
    };
    let source_labels = snapshot.namespace_labels(&source.namespace);
    let mut cluster: Vec<&ClusterNetworkPolicy> = snapshot
        .cluster_policies
        .values()
        .filter(|p| p.selects(source, &source_labels))
        .collect();
    cluster.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let destination_labels = destination_pod
        .map(|pod| snapshot.namespace_labels(&pod.namespace))
        .unwrap_or_default();
    let target = Destination {
        address: destination,
        pod: destination_pod.map(|pod| (pod, &destination_labels, pod.named_ports.as_slice())),
        protocol: protocol.map_or(
            if destination.is_ipv4() {
                egret_common::proto::ICMP
            } else {
                egret_common::proto::ICMPV6
            },
            Protocol::number,
        ),
        port: if protocol.is_some() { port } else { 0 },
        resolved: None,
    };
    let decide = |enforced_only: bool| {
        let counts = |mode: Mode| !enforced_only || mode == Mode::Enforce;
        let tier_policies = cluster.iter().copied().filter(|p| counts(p.mode));
        let (admin, _) = first_match(tier_policies.clone(), Tier::Admin, &target);
        match admin.map(|rule| rule.action) {
            Some(TierAction::Accept) => return true,
            Some(TierAction::Deny) => return false,
            Some(TierAction::Pass) | None => {}
        }
        let isolating: Vec<&&NetworkPolicy> = selecting.iter().filter(|p| counts(p.mode)).collect();
        if !isolating.is_empty() {
            return isolating.iter().any(|p| allows(p));
        }
        let (baseline, _) = first_match(tier_policies, Tier::Baseline, &target);
        !matches!(baseline.map(|rule| rule.action), Some(TierAction::Deny))
    };
    if !decide(true) {
        Verdict::Deny
    } else if !decide(false) {
        Verdict::AuditDeny
    } else {
        Verdict::Allow
    }
}
