//! Builders for tests, and a reference evaluator: the DESIGN.md rules applied directly
//! to a packet, with no tables, to check the compiler against.

use std::net::IpAddr;

use egret_common::Verdict;

use crate::{
    policy::{self, Labels, Mode, NamedPort, NetworkPolicy, Peer, PodView, Protocol},
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
        labels: labels(pairs),
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

/// The verdict the rules give, evaluated directly. `protocol: None` is ICMP.
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
    let selecting: Vec<&NetworkPolicy> = snapshot
        .policies
        .values()
        .filter(|p| p.isolates_egress && p.selects(source))
        .collect();
    if selecting.is_empty() {
        return Verdict::Allow;
    }
    let destination_pod = snapshot.pod_by_ip(destination);
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
    let enforced: Vec<_> = selecting
        .iter()
        .filter(|p| p.mode == Mode::Enforce)
        .collect();
    let allowed_by_enforced = enforced.iter().any(|p| allows(p));
    let allowed_by_any = selecting.iter().any(|p| allows(p));
    if !enforced.is_empty() && !allowed_by_enforced {
        Verdict::Deny
    } else if !allowed_by_any {
        Verdict::AuditDeny
    } else {
        Verdict::Allow
    }
}
