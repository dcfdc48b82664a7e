//! The incremental compiler against the full compile: random change sequences (pods
//! join, leave, move and relabel; namespaces relabel; NetworkPolicies and
//! ClusterNetworkPolicies come, change and go; Services and their backends change),
//! applied a few at a time as the agent's debounce batches them, and after every step
//! the incremental tables and numbers equal a full compile's from the same numbers.

use std::fmt::Write as _;

use proptest::prelude::*;

use super::Compiler;
use crate::{
    compile::{
        Compiled, Ids, Scope, compile,
        tests::{ADDRESSES, PodSpec, arb_labels, arb_pod, arb_policy, arb_selector},
        tiers::tests::arb_cluster_policy,
    },
    policy::Protocol,
    state::{Changes, EndpointSlice, Object, ObjectId, ObjectKey, Service, ServicePort, Snapshot},
    testing::{mk_cluster_policy, mk_namespace, mk_policy},
};

const POD_SLOTS: usize = 8;
const POLICY_SLOTS: usize = 5;
const CLUSTER_SLOTS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// Writes pod `slot` (on this node or another), or deletes it.
    Pod(usize, Option<(PodSpec, bool)>),
    Namespace(&'static str, Option<Vec<(String, String)>>),
    Policy(usize, Option<String>),
    Cluster(usize, Option<String>),
    /// The Service's backends (indexes into `ADDRESSES`), or no Service.
    Service(Option<Vec<usize>>),
    /// The agent's resync, or a source that replaced everything.
    Everything,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..POD_SLOTS, proptest::option::weighted(0.8, (arb_pod(), prop::bool::weighted(0.6))))
            .prop_map(|(slot, pod)| Op::Pod(slot, pod)),
        2 => (
            prop::sample::select(&["x", "y", "z"][..]),
            proptest::option::weighted(0.9, arb_labels())
        )
            .prop_map(|(name, labels)| Op::Namespace(name, labels)),
        3 => (0..POLICY_SLOTS)
            .prop_flat_map(|slot| (Just(slot), proptest::option::weighted(0.75, arb_policy(slot))))
            .prop_map(|(slot, policy)| Op::Policy(slot, policy)),
        1 => (0..CLUSTER_SLOTS)
            .prop_flat_map(|slot| {
                (Just(slot), proptest::option::weighted(0.7, arb_cluster_policy(slot)))
            })
            .prop_map(|(slot, policy)| Op::Cluster(slot, policy)),
        1 => (0..CLUSTER_SLOTS)
            .prop_flat_map(|slot| (Just(slot), arb_domain_policy(slot)))
            .prop_map(|(slot, policy)| Op::Cluster(slot, Some(policy))),
        1 => proptest::option::weighted(0.8, proptest::collection::vec(0..ADDRESSES.len(), 0..3))
            .prop_map(Op::Service),
        1 => Just(Op::Everything),
    ]
}

/// A ClusterNetworkPolicy `c{slot}` whose Accept rule names domains.
fn arb_domain_policy(slot: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["Admin", "Baseline"][..]),
        arb_selector(),
        proptest::sample::subsequence(
            &["api.example.test", "*.example.test", "*.svc.example.test", "db.other.test"][..],
            1..3,
        ),
        prop::sample::select(&["", ", protocols: [{tcp: {destinationPort: {number: 443}}}]"][..]),
    )
        .prop_map(move |(tier, subject, names, protocols)| {
            let names: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
            format!(
                "metadata: {{name: c{slot}}}\nspec:\n  tier: {tier}\n  priority: 1\n  subject: {{namespaces: {subject}}}\n  egress: [{{action: Accept, to: [{{domainNames: [{}]}}]{protocols}}}]\n",
                names.join(", ")
            )
        })
}

/// Applies `op` to the snapshot and records what it changed, as the agent's sources do.
fn apply(snapshot: &mut Snapshot, changes: &mut Changes, op: &Op) {
    match op {
        Op::Pod(slot, pod) => {
            let key = ObjectKey::new("x", format!("p{slot}"));
            // A pod keeps its namespace: delete it wherever it was, then write it.
            for namespace in ["x", "y", "z"] {
                let id = ObjectId {
                    kind: "Pod",
                    key: ObjectKey::new(namespace, key.name.clone()),
                };
                snapshot.delete(&id);
                changes.id(&id);
            }
            if let Some((spec, local)) = pod {
                let mut pod = spec.pod(&key.name);
                if !local {
                    pod.node_name = Some("node-2".to_owned());
                }
                let object = Object::Pod(pod);
                changes.object(&object);
                snapshot.apply(object);
            }
        }
        Op::Namespace(name, labels) => {
            let id = ObjectId {
                kind: "Namespace",
                key: ObjectKey::new("", *name),
            };
            changes.id(&id);
            match labels {
                Some(labels) => {
                    let pairs: Vec<(&str, &str)> = labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    snapshot.apply(Object::Namespace(mk_namespace(name, &pairs)));
                }
                None => snapshot.delete(&id),
            }
        }
        Op::Policy(slot, policy) => {
            // arb_policy(slot) names its policy p{slot} in namespace x or y.
            for namespace in ["x", "y"] {
                let id = ObjectId {
                    kind: "NetworkPolicy",
                    key: ObjectKey::new(namespace, format!("p{slot}")),
                };
                snapshot.delete(&id);
                changes.id(&id);
            }
            if let Some(yaml) = policy {
                let object = Object::Policy(mk_policy(yaml));
                changes.object(&object);
                snapshot.apply(object);
            }
        }
        Op::Cluster(slot, policy) => {
            let id = ObjectId {
                kind: "ClusterNetworkPolicy",
                key: ObjectKey::new("", format!("c{slot}")),
            };
            snapshot.delete(&id);
            changes.id(&id);
            if let Some(yaml) = policy {
                let object = Object::ClusterPolicy(mk_cluster_policy(yaml));
                changes.object(&object);
                snapshot.apply(object);
            }
        }
        Op::Service(backends) => {
            for kind in ["Service", "EndpointSlice"] {
                let id = ObjectId {
                    kind,
                    key: ObjectKey::new("x", "svc"),
                };
                snapshot.delete(&id);
                changes.id(&id);
            }
            if let Some(backends) = backends {
                snapshot.apply(Object::Service(Service {
                    namespace: "x".into(),
                    name: "svc".into(),
                    virtual_ips: vec!["10.96.0.10".parse().expect("address")],
                    ports: vec![ServicePort {
                        name: "web".into(),
                        protocol: Protocol::Tcp,
                        port: 80,
                    }],
                }));
                snapshot.apply(Object::EndpointSlice(EndpointSlice {
                    namespace: "x".into(),
                    name: "svc".into(),
                    service: "svc".into(),
                    ports: vec![("web".into(), Protocol::Tcp, 1000)],
                    ready_addresses: backends
                        .iter()
                        .map(|a| ADDRESSES[*a].parse().expect("address"))
                        .collect(),
                }));
            }
        }
        Op::Everything => *changes = Changes::everything(),
    }
}

fn mismatch(incremental: &Compiled, full: &Compiled) -> String {
    let mut out = String::new();
    let mut part = |name: &str, a: String, b: String| {
        if a != b {
            let _ = writeln!(out, "{name}:\n  incremental {a}\n  full        {b}");
        }
    };
    let (a, b) = (&incremental.tables, &full.tables);
    part(
        "ids",
        format!("{:?}", incremental.ids),
        format!("{:?}", full.ids),
    );
    part(
        "endpoints",
        format!("{:?}", a.endpoints),
        format!("{:?}", b.endpoints),
    );
    part(
        "identities",
        format!("{:?}", a.identities),
        format!("{:?}", b.identities),
    );
    part("cidrs", format!("{:?}", a.cidrs), format!("{:?}", b.cidrs));
    part(
        "policy",
        format!("{:?}", a.policy),
        format!("{:?}", b.policy),
    );
    part(
        "domains",
        format!("{:?}", a.domains),
        format!("{:?}", b.domains),
    );
    part(
        "tier rules",
        format!("{:?}", a.tier_rules),
        format!("{:?}", b.tier_rules),
    );
    part(
        "conflicts",
        format!("{:?}", incremental.address_conflicts),
        format!("{:?}", full.address_conflicts),
    );
    out
}

proptest! {
    // 160 sequences of 1 to 40 batches of 1 to 3 changes: about 3,000 compared steps.
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn incremental_tables_equal_a_full_compile_after_every_step(
        batches in proptest::collection::vec(proptest::collection::vec(arb_op(), 1..4), 1..40),
    ) {
        let scope = Scope::Node("node-1".to_owned());
        let mut snapshot = Snapshot::default();
        snapshot.insert_namespace(mk_namespace("x", &[("app", "a")]));
        let mut compiler = Compiler::new(scope.clone(), Ids::default());
        compiler.compile(&snapshot, &Changes::everything());
        for (step, batch) in batches.iter().enumerate() {
            let mut changes = Changes::default();
            for op in batch {
                apply(&mut snapshot, &mut changes, op);
            }
            let previous = compiler.compiled().ids.clone();
            let incremental = compiler.compile(&snapshot, &changes);
            let full = compile(&snapshot, &scope, &previous);
            prop_assert!(
                *incremental == full,
                "step {step} ({batch:?}) differs:\n{}",
                mismatch(incremental, &full)
            );
        }
    }
}
