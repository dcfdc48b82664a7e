//! ClusterNetworkPolicy tiers compiled into tables, checked against the direct
//! evaluator of the tier order (`testing::reference_verdict`) on random clusters with
//! NetworkPolicies and ClusterNetworkPolicies of both tiers, through the kernel's
//! lookup model.

use std::{fmt::Write as _, net::IpAddr};

use egret_common::{
    Verdict::{Allow, Deny},
    proto,
};
use proptest::prelude::*;

use super::super::{
    Ids, Scope, compile, lookup,
    tests::{ADDRESSES, CIDRS, PORTS, arb_selector, arb_snapshot},
};
use crate::{
    policy::Protocol,
    state::ObjectKey,
    testing::{mk_cluster_policy, mk_namespace, mk_pod, mk_policy, reference_verdict, snapshot},
};

fn arb_peer() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_selector().prop_map(|s| format!("{{namespaces: {s}}}")),
        (arb_selector(), arb_selector())
            .prop_map(|(n, p)| format!("{{pods: {{namespaceSelector: {n}, podSelector: {p}}}}}")),
        proptest::collection::vec(0..CIDRS.len(), 1..3).prop_map(|cidrs| {
            let cidrs: Vec<String> = cidrs.iter().map(|c| format!("'{}'", CIDRS[*c])).collect();
            format!("{{networks: [{}]}}", cidrs.join(", "))
        }),
        // Not implemented: fails closed.
        Just("{nodes: {}}".to_owned()),
    ]
}

fn arb_protocol() -> impl Strategy<Value = String> {
    let protocol = prop::sample::select(&["tcp", "udp", "sctp"][..]);
    prop_oneof![
        (protocol.clone(), prop::sample::select(&PORTS[..]))
            .prop_map(|(p, n)| format!("{{{p}: {{destinationPort: {{number: {n}}}}}}}")),
        (protocol, prop::sample::select(&PORTS[..]), 1u16..500).prop_map(|(p, n, span)| format!(
            "{{{p}: {{destinationPort: {{range: {{start: {n}, end: {}}}}}}}}}",
            n + span
        )),
        prop::sample::select(&["dns", "web"][..])
            .prop_map(|n| format!("{{destinationNamedPort: {n}}}")),
    ]
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["Accept", "Deny", "Pass"][..]),
        proptest::collection::vec(arb_peer(), 1..3),
        proptest::option::of(proptest::collection::vec(arb_protocol(), 1..3)),
    )
        .prop_map(|(action, to, protocols)| {
            let mut rule = format!("{{action: {action}, to: [{}]", to.join(", "));
            if let Some(protocols) = protocols {
                let _ = write!(rule, ", protocols: [{}]", protocols.join(", "));
            }
            rule.push('}');
            rule
        })
}

pub(in crate::compile) fn arb_cluster_policy(index: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["Admin", "Baseline"][..]),
        // Few priorities, so ties (ordered by name) happen.
        0u32..3,
        prop_oneof![
            arb_selector().prop_map(|s| format!("{{namespaces: {s}}}")),
            (arb_selector(), arb_selector()).prop_map(|(n, p)| format!(
                "{{pods: {{namespaceSelector: {n}, podSelector: {p}}}}}"
            )),
        ],
        proptest::collection::vec(arb_rule(), 0..4),
        prop::bool::weighted(0.2),
    )
        .prop_map(move |(tier, priority, subject, rules, audit)| {
            let annotations = if audit {
                ", annotations: {egret.dev/mode: audit}"
            } else {
                ""
            };
            format!(
                "metadata: {{name: c{index}{annotations}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n  egress: [{}]\n",
                rules.join(", ")
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiled_tiers_agree_with_the_tier_order(
        mut cluster in arb_snapshot(),
        policies in (0usize..5).prop_flat_map(|n| (0..n).map(arb_cluster_policy).collect::<Vec<_>>()),
        destinations in proptest::collection::vec(0..ADDRESSES.len(), 4),
        protocols in proptest::collection::vec(prop::sample::select(&[Some(Protocol::Tcp), Some(Protocol::Udp), Some(Protocol::Sctp), None][..]), 4),
        ports in proptest::collection::vec(prop::sample::select(&[53u16, 80, 81, 443, 1000, 1001, 1300, 8080][..]), 4),
    ) {
        for policy in &policies {
            let policy = mk_cluster_policy(policy);
            cluster.cluster_policies.insert(policy.name.clone(), policy);
        }
        let compiled = compile(&cluster, &Scope::Cluster, &Ids::default());
        for (key, pod) in &cluster.pods {
            let Some(endpoint) = compiled.tables.endpoints.get(key) else {
                prop_assert!(!pod.takes_part(), "{key} takes part but has no endpoint");
                continue;
            };
            for ((destination, protocol), port) in destinations.iter().zip(&protocols).zip(&ports) {
                let to: IpAddr = ADDRESSES[*destination].parse().unwrap();
                let (number, port) = match protocol {
                    Some(p) => (p.number(), *port),
                    None => (if to.is_ipv4() { proto::ICMP } else { proto::ICMPV6 }, 0),
                };
                let got = lookup::decide(&compiled.tables, endpoint, to, number, port).verdict;
                let want = reference_verdict(&cluster, pod, to, *protocol, port);
                prop_assert_eq!(got, want, "{} -> {} {:?}/{}", key, to, protocol, port);
            }
        }
    }
}

/// The guardrail cases, by hand: an Admin Deny over a NetworkPolicy allow; a
/// Pass to NetworkPolicy and then to a Baseline Deny; a Baseline Accept overruled by an
/// isolating NetworkPolicy; a priority change reorders two policies.
#[test]
fn tier_order_by_hand() {
    let mut s = snapshot(
        vec![mk_namespace("shop", &[]), mk_namespace("ops", &[])],
        vec![
            mk_pod("shop", "web", &[("app", "web")], &["10.0.0.1"]),
            mk_pod("shop", "db", &[("app", "db")], &["10.0.0.2"]),
            mk_pod("ops", "tool", &[("app", "tool")], &["10.0.1.1"]),
        ],
        vec![mk_policy(
            "metadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}]}]\n",
        )],
    );
    let verdict = |s: &crate::state::Snapshot, from: &str, to: &str| {
        let compiled = compile(s, &Scope::Cluster, &Ids::default());
        let endpoint = &compiled.tables.endpoints[&ObjectKey::parse(from).unwrap()];
        let decision = lookup::decide(
            &compiled.tables,
            endpoint,
            to.parse().unwrap(),
            proto::TCP,
            5432,
        );
        (decision.verdict, decision.reason.name())
    };
    assert_eq!(verdict(&s, "shop/web", "10.0.0.2"), (Allow, "policy"));
    let insert = |s: &mut crate::state::Snapshot, yaml: &str| {
        let policy = mk_cluster_policy(yaml);
        s.cluster_policies.insert(policy.name.clone(), policy);
    };
    insert(
        &mut s,
        "metadata: {name: no-db}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}]\n",
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2"),
        (Deny, "admin_deny"),
        "Admin Deny over a NetworkPolicy allow"
    );
    insert(
        &mut s,
        "metadata: {name: pass-db}\nspec:\n  tier: Admin\n  priority: 5\n  subject: {namespaces: {}}\n  egress: [{action: Pass, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}]\n",
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2"),
        (Allow, "policy"),
        "Pass, then the NetworkPolicy allows"
    );
    insert(
        &mut s,
        "metadata: {name: baseline}\nspec:\n  tier: Baseline\n  priority: 1\n  subject: {namespaces: {}}\n  egress: [{action: Deny, to: [{namespaces: {}}]}]\n",
    );
    assert_eq!(
        verdict(&s, "ops/tool", "10.0.0.2"),
        (Deny, "baseline_deny"),
        "Pass, no NetworkPolicy, Baseline Deny"
    );
    insert(
        &mut s,
        "metadata: {name: baseline-web}\nspec:\n  tier: Baseline\n  priority: 0\n  subject: {namespaces: {}}\n  egress: [{action: Accept, to: [{networks: ['10.0.1.0/24']}]}]\n",
    );
    assert_eq!(
        verdict(&s, "ops/tool", "10.0.1.1"),
        (Allow, "baseline_accept")
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.1.1"),
        (Deny, "no_rule_allows"),
        "web's isolating NetworkPolicy decides: the Baseline Accept does not apply"
    );
    insert(
        &mut s,
        "metadata: {name: pass-db}\nspec:\n  tier: Admin\n  priority: 50\n  subject: {namespaces: {}}\n  egress: [{action: Pass, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}]\n",
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2"),
        (Deny, "admin_deny"),
        "priority 50 puts the Pass after the Deny"
    );
}
