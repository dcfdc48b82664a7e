use egret_common::{
    Reason, Verdict,
    dns::DOMAIN_IDENTITY_BIT,
    maps::{ENDPOINT_FLAG_DOMAINS, ENDPOINT_FLAG_TIERED, PolicyValue},
};

use crate::{
    compile::{Ids, PolicyEntryKey, Scope, Tables, compile},
    policy::cluster::domain::DomainName,
    source::manifest::Loader,
    state::ObjectKey,
};

const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: me, namespace: t, labels: {app: me}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.1.0.1}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: names}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - name: api
      action: Accept
      to: [{domainNames: [API.Example.Test., '*.svc.example.test']}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
    - name: wide
      action: Accept
      to: [{domainNames: ['*.example.test']}]
      protocols: [{tcp: {destinationPort: {number: 80}}}]
    - name: rest
      action: Deny
      to: [{networks: [0.0.0.0/0]}]
";

fn tables() -> Tables {
    let mut loader = Loader::default();
    loader.add_text(std::path::Path::new("c.yaml"), CLUSTER);
    assert!(loader.problems.is_empty(), "{:?}", loader.problems);
    compile(
        &loader.snapshot,
        &Scope::Node("node-1".into()),
        &Ids::default(),
    )
    .tables
}

fn name(text: &str) -> DomainName {
    DomainName::parse(text).unwrap()
}

/// What the kernel decides for a learnt address of `pattern` on a TCP port.
fn decide(tables: &Tables, pattern: &str, port: u16) -> (Verdict, Reason) {
    let endpoint = &tables.endpoints[&ObjectKey::new("t", "me")];
    let entry = &tables.domains[&(endpoint.table, name(pattern).key())];
    let value = crate::compile::lookup::port_candidates(egret_common::proto::TCP, port)
        .find_map(|ports| {
            tables.policy.get(&PolicyEntryKey {
                table: endpoint.table,
                identity: entry.identity,
                ports,
            })
        })
        .map_or(PolicyValue::NONE, |allowance| allowance.value);
    let decision = egret_common::policy_decision(endpoint.flags, &value);
    (decision.verdict, decision.reason)
}

#[test]
fn every_pattern_of_the_tables_policies_gets_an_identity_and_the_flag() {
    let tables = tables();
    let endpoint = &tables.endpoints[&ObjectKey::new("t", "me")];
    assert_ne!(endpoint.flags & ENDPOINT_FLAG_DOMAINS, 0);
    assert_ne!(endpoint.flags & ENDPOINT_FLAG_TIERED, 0);
    let patterns: Vec<String> = tables
        .domains
        .values()
        .map(|entry| {
            assert_ne!(entry.identity & DOMAIN_IDENTITY_BIT, 0);
            entry.name.to_string()
        })
        .collect();
    assert_eq!(patterns.len(), 3, "{patterns:?}");
    for pattern in ["api.example.test", "*.svc.example.test", "*.example.test"] {
        assert!(patterns.contains(&pattern.to_owned()), "{pattern}");
    }
}

#[test]
fn a_patterns_entries_carry_the_rules_that_cover_it() {
    let tables = tables();
    // The exact name: its own rule (443) and the wider wildcard's (80).
    assert_eq!(
        decide(&tables, "api.example.test", 443),
        (Verdict::Allow, Reason::AdminAccept)
    );
    assert_eq!(
        decide(&tables, "api.example.test", 80),
        (Verdict::Allow, Reason::AdminAccept)
    );
    assert_eq!(
        decide(&tables, "*.svc.example.test", 80),
        (Verdict::Allow, Reason::AdminAccept)
    );
    // The wide pattern does not get the narrower ones' port.
    assert_eq!(
        decide(&tables, "*.example.test", 443),
        (Verdict::Allow, Reason::NotIsolated)
    );
}

#[test]
fn domain_numbers_stay_across_compiles() {
    let mut loader = Loader::default();
    loader.add_text(std::path::Path::new("c.yaml"), CLUSTER);
    let scope = Scope::Node("node-1".into());
    let first = compile(&loader.snapshot, &scope, &Ids::default());
    let again = compile(&loader.snapshot, &scope, &first.ids);
    assert_eq!(first.tables.domains, again.tables.domains);
}

#[test]
fn domain_names_outside_accept_rules_or_malformed_fail_closed_with_the_field() {
    let policy = |action: &str, names: &str| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n    - action: {action}\n      to: [{{domainNames: {names}}}]\n"
        )
    };
    let mut loader = Loader::default();
    loader.add_text(
        std::path::Path::new("p.yaml"),
        &policy("Deny", "[api.example.test]"),
    );
    assert_eq!(loader.problems.len(), 1, "{:?}", loader.problems);
    assert!(
        loader.problems[0].to_string().contains(
            "spec.egress[0].to[0].domainNames: domainNames is only allowed in Accept rules"
        ),
        "{}",
        loader.problems[0]
    );
    let rule = &loader
        .snapshot
        .cluster_policies
        .values()
        .next()
        .unwrap()
        .egress[0];
    assert_eq!(rule.to, [crate::policy::cluster::TierPeer::Everything]);

    let mut loader = Loader::default();
    loader.add_text(
        std::path::Path::new("p.yaml"),
        &policy("Accept", "['*.com', ok.example.test]"),
    );
    assert_eq!(loader.problems.len(), 1, "{:?}", loader.problems);
    assert!(
        loader.problems[0]
            .to_string()
            .contains("spec.egress[0].to[0].domainNames[0]: \"*.com\" is not a domain name"),
        "{}",
        loader.problems[0]
    );
    let rule = &loader
        .snapshot
        .cluster_policies
        .values()
        .next()
        .unwrap()
        .egress[0];
    assert!(
        rule.to.is_empty(),
        "the Accept rule matches nothing: {:?}",
        rule.to
    );
}
