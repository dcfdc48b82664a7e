//! The manifest loader on `ClusterNetworkPolicy` documents: read, failing closed, or
//! skipped with the file, kind, name and field named.

use std::path::Path;

use egret_common::maps::TierAction;

use super::*;
use crate::policy::cluster::{Tier, TierPeer};

fn load(text: &str) -> (Snapshot, Vec<String>) {
    let mut loader = Loader::default();
    loader.add_text(Path::new("guards.yaml"), text);
    let problems = loader.problems.iter().map(ToString::to_string).collect();
    (loader.snapshot, problems)
}

/// A policy in the `Admin` tier selecting every namespace, with `egress` as YAML.
fn cnp(name: &str, egress: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{}}}}\n  egress: {egress}\n"
    )
}

const DENY_METADATA: &str =
    "[{name: no-metadata, action: Deny, to: [{networks: [169.254.169.254/32]}]}]";

const NETWORK_POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";

#[test]
fn cluster_network_policies_are_read_beside_network_policies() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}",
        serde_json::to_string(
            &serde_yaml_ng::from_str::<serde_json::Value>(&cnp("in-a-list", DENY_METADATA))
                .unwrap()
        )
        .unwrap()
    );
    let text = [
        cnp("no-metadata", DENY_METADATA),
        NETWORK_POLICY.to_owned(),
        list,
    ]
    .join("---\n");
    let (snapshot, problems) = load(&text);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(snapshot.policies.len(), 1, "the NetworkPolicy is read too");
    assert_eq!(
        snapshot.cluster_policies.keys().collect::<Vec<_>>(),
        ["in-a-list", "no-metadata"]
    );
    let policy = &snapshot.cluster_policies["no-metadata"];
    assert_eq!((policy.tier, policy.priority), (Tier::Admin, 10));
    assert_eq!(policy.egress.len(), 1);
    assert_eq!(policy.egress[0].action, TierAction::Deny);
    assert_eq!(policy.egress[0].name.as_deref(), Some("no-metadata"));
}

#[test]
fn what_egret_cannot_honour_fails_closed_and_is_reported() {
    let egress = "[{action: Deny, to: [{nodes: {matchLabels: {role: control-plane}}}]}, {action: Accept, to: [{networks: [10.0.0.0/8]}]}]";
    let (snapshot, problems) = load(&cnp("guard", egress));
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with(
            "guards.yaml: ClusterNetworkPolicy guard: spec.egress[0].to[0].nodes: this experimental peer is not implemented"
        ),
        "{}",
        problems[0]
    );
    assert!(
        problems[0].ends_with("the rule matches every destination it would otherwise scope"),
        "{}",
        problems[0]
    );
    let policy = &snapshot.cluster_policies["guard"];
    assert_eq!(policy.egress[0].to, [TierPeer::Everything]);
    assert_eq!(policy.egress[1].action, TierAction::Accept);
}

#[test]
fn a_rule_of_the_wrong_shape_denies_everything_and_the_rest_is_read() {
    let egress = "[deny-everything, {action: Accept, to: [{networks: [10.0.0.0/8]}]}]";
    let (snapshot, problems) = load(&cnp("guard", egress));
    assert_eq!(
        problems.len(),
        1,
        "one problem, in the rule's own words: {problems:#?}"
    );
    assert!(
        problems[0].starts_with("guards.yaml: ClusterNetworkPolicy guard: spec.egress[0]: "),
        "{}",
        problems[0]
    );
    assert!(
        problems[0].ends_with("the rule cannot be read and denies every destination"),
        "{}",
        problems[0]
    );
    let policy = &snapshot.cluster_policies["guard"];
    assert_eq!(policy.egress[0].action, TierAction::Deny);
    assert_eq!(policy.egress[0].to, [TierPeer::Everything]);
    assert_eq!(policy.egress[1].action, TierAction::Accept);
}

#[test]
fn a_policy_without_a_readable_tier_priority_or_subject_is_skipped_naming_the_field() {
    let cases = [
        (
            cnp("guard", "[]").replace("tier: Admin", "tier: Platform"),
            "spec.tier: \"Platform\" is not a tier (expected Admin or Baseline)",
        ),
        (
            cnp("guard", "[]").replace("priority: 10", "priority: high"),
            "spec.priority: invalid type: string \"high\"",
        ),
        (
            cnp("guard", "[]").replace("priority: 10", "priority: 1001"),
            "spec.priority: 1001 is outside 0-1000",
        ),
        (
            cnp("guard", "[]").replace("subject: {namespaces: {}}", "subject: {}"),
            "spec.subject: needs exactly one of namespaces or pods",
        ),
        (
            cnp("guard", "[]").replace("{name: guard}", "{labels: {a: b}}"),
            "metadata.name: missing",
        ),
    ];
    for (text, expected) in cases {
        let (snapshot, problems) = load(&text);
        assert!(snapshot.cluster_policies.is_empty(), "skipped: {text}");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let name = if expected.starts_with("metadata.name") {
            "?"
        } else {
            "guard"
        };
        let prefix = format!("guards.yaml: ClusterNetworkPolicy {name}: {expected}");
        assert!(
            problems[0].starts_with(&prefix) && problems[0].ends_with("; the policy is skipped"),
            "{}\nexpected {prefix}…; the policy is skipped",
            problems[0]
        );
    }
}

#[test]
fn a_cluster_network_policy_defined_twice_keeps_the_first() {
    let text = [cnp("guard", DENY_METADATA), cnp("guard", "[]")].join("---\n");
    let (snapshot, problems) = load(&text);
    assert_eq!(snapshot.cluster_policies["guard"].egress.len(), 1);
    assert_eq!(
        problems,
        [
            "guards.yaml: ClusterNetworkPolicy guard: defined again (first in guards.yaml); the first definition is used"
        ]
    );
}

#[test]
fn other_kinds_and_other_api_versions_are_reported_never_skipped_in_silence() {
    let text = [
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n",
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: old, namespace: shop}\nspec: {podSelector: {}}\n",
        &cnp("guard", "[]").replace("v1alpha2", "v1beta1"),
        "kind: Pod\nmetadata: {name: web, namespace: shop}\n",
        "apiVersion: v1\nmetadata: {name: nameless}\n",
        NETWORK_POLICY,
    ]
    .join("---\n");
    let mut loader = Loader::default();
    loader.add_text(Path::new("app.yaml"), &text);
    let unread: Vec<String> = loader.unread.iter().map(ToString::to_string).collect();
    assert_eq!(
        unread,
        [
            "app.yaml: Deployment shop/web: not a kind Egret reads; ignored",
            "app.yaml: ConfigMap settings: not a kind Egret reads; ignored",
        ]
    );
    let problems: Vec<String> = loader.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "app.yaml: NetworkPolicy shop/old: apiVersion: \"networking.k8s.io/v1beta1\" is not read (Egret reads networking.k8s.io/v1); the object is skipped",
            "app.yaml: ClusterNetworkPolicy guard: apiVersion: \"policy.networking.k8s.io/v1beta1\" is not read (Egret reads policy.networking.k8s.io/v1alpha2); the object is skipped",
            "app.yaml: Pod shop/web: apiVersion: missing (Egret reads v1); the object is skipped",
            "app.yaml: (no kind) nameless: kind: missing; the document is skipped",
        ]
    );
    assert_eq!(
        loader.snapshot.policies.len(),
        1,
        "the NetworkPolicy in the apiVersion Egret reads is read"
    );
    assert!(loader.snapshot.cluster_policies.is_empty());
    assert!(loader.snapshot.pods.is_empty());
}

fn documents(text: &str) -> Vec<String> {
    Documents::new(text.as_bytes())
        .collect::<std::io::Result<_>>()
        .unwrap()
}

#[test]
fn a_stream_is_split_at_its_document_markers_only() {
    let text = "# leading comment\na: 1\n---\nb: 2\n--- {c: 3}\n# about d\n---\nd: |\n  --- not a marker, indented\n  ---also not\n...\n%YAML 1.2\n---\ne: 5\n";
    assert_eq!(
        documents(text),
        [
            "# leading comment\na: 1\n",
            "---\nb: 2\n",
            "--- {c: 3}\n# about d\n",
            "---\nd: |\n  --- not a marker, indented\n  ---also not\n...\n",
            "%YAML 1.2\n---\ne: 5\n",
        ]
    );
    assert_eq!(documents("---\n---\nx: 1\n"), ["---\n", "---\nx: 1\n"]);
    assert_eq!(documents("# only a comment\n"), ["# only a comment\n"]);
    assert!(documents("").is_empty());
    assert_eq!(
        documents("----\nx: 1\n"),
        ["----\nx: 1\n"],
        "four dashes are content"
    );
}

#[test]
fn documents_read_one_at_a_time_give_what_the_whole_text_gave() {
    let text = format!(
        "{}---\n{NETWORK_POLICY}---\n# an empty document\n---\napiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: shop, labels: {{team: a}}}}}}\n- {{apiVersion: v1, kind: Pod, metadata: {{name: web, namespace: shop, labels: {{app: web}}}}, status: {{podIP: 10.0.0.1}}}}\n",
        cnp("no-metadata", DENY_METADATA)
    );
    let (snapshot, problems) = load(&text);
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(snapshot.policies.len(), 1);
    assert_eq!(snapshot.cluster_policies.len(), 1);
    assert_eq!(snapshot.namespaces["shop"].labels["team"], "a");
    let web = &snapshot.pods[&crate::state::ObjectKey::new("shop", "web")];
    assert_eq!(web.labels["app"], "web");
    assert_eq!(web.ips, ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
}

#[test]
fn a_document_that_does_not_parse_hides_only_itself() {
    let text = format!(
        "{NETWORK_POLICY}---\nkind: [unclosed\n---\n{}",
        cnp("guard", "[]")
    );
    let (snapshot, problems) = load(&text);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("guards.yaml: document 2: YAML does not parse"),
        "{}",
        problems[0]
    );
    assert_eq!(snapshot.policies.len(), 1);
    assert_eq!(
        snapshot.cluster_policies.keys().collect::<Vec<_>>(),
        ["guard"],
        "the document after the broken one is read"
    );
}

#[test]
fn replicas_read_from_manifests_share_their_labels() {
    let pod = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: web}}}}\nstatus: {{podIP: 10.0.0.{}}}\n",
            name.len()
        )
    };
    let (snapshot, _) = load(&[pod("a"), pod("bb")].join("---\n"));
    let labels: Vec<_> = snapshot.pods.values().map(|p| &p.labels).collect();
    assert_eq!(labels.len(), 2);
    assert!(std::sync::Arc::ptr_eq(labels[0], labels[1]));
}
