//! `egret simulate` with a DNS context: `"resolved"` is the name the pod resolved to the
//! destination, and the answer is the kernel's once it learnt that answer (the most
//! specific of the pod's `domainNames` patterns, its rules' ports, the tier order).

mod common;

use common::simulate;
use serde_json::Value;

const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: lab, labels: {app: plain}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: names}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}, podSelector: {}}}
  egress:
    - name: api
      action: Accept
      to: [{domainNames: [api.example.test]}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
    - name: svc
      action: Accept
      to: [{domainNames: ['*.svc.example.test']}]
      protocols: [{tcp: {destinationPort: {number: 8080}}}]
    - name: rest
      action: Deny
      to: [{networks: [0.0.0.0/0]}]
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab, labels: {kubernetes.io/metadata.name: lab}}
";

fn ask(queries: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).unwrap();
    let (answers, log) = simulate(dir.path(), &(queries.join("\n") + "\n"));
    assert!(!log.contains("WARN"), "the manifests load cleanly: {log}");
    answers
}

fn query(to_port: u16, resolved: Option<&str>) -> String {
    let resolved = resolved.map_or_else(String::new, |name| format!(r#", "resolved": "{name}""#));
    format!(
        r#"{{"from": "shop/web", "to": "203.0.113.7", "port": {to_port}, "protocol": "TCP"{resolved}}}"#
    )
}

#[test]
fn a_resolved_name_allows_as_the_kernel_would() {
    let cases: [(u16, Option<&str>, &str, Option<&str>); 10] = [
        // No DNS context: the address is only an address.
        (443, None, "deny", None),
        (
            443,
            Some("api.example.test"),
            "allow",
            Some("api.example.test"),
        ),
        // Case and the trailing dot do not matter.
        (
            443,
            Some("API.Example.Test."),
            "allow",
            Some("api.example.test"),
        ),
        // Only the rule's port.
        (
            80,
            Some("api.example.test"),
            "deny",
            Some("api.example.test"),
        ),
        // One or more labels in front of the wildcard's suffix; never the bare parent.
        (
            8080,
            Some("a.svc.example.test"),
            "allow",
            Some("*.svc.example.test"),
        ),
        (
            8080,
            Some("x.y.svc.example.test"),
            "allow",
            Some("*.svc.example.test"),
        ),
        (8080, Some("svc.example.test"), "deny", None),
        // Names outside the rules, and a sibling of the exact name.
        (443, Some("www.api.example.test"), "deny", None),
        (443, Some("example.test"), "deny", None),
        // A pattern answers only for its own rule's ports.
        (
            443,
            Some("a.svc.example.test"),
            "deny",
            Some("*.svc.example.test"),
        ),
    ];
    let queries: Vec<String> = cases
        .iter()
        .map(|(port, resolved, _, _)| query(*port, *resolved))
        .collect();
    let answers = ask(&queries.iter().map(String::as_str).collect::<Vec<_>>());
    for ((port, resolved, verdict, domain), answer) in cases.iter().zip(&answers) {
        assert_eq!(
            answer["verdict"], *verdict,
            "port {port}, resolved {resolved:?}: {answer}"
        );
        assert_eq!(
            answer["domain"].as_str(),
            *domain,
            "port {port}, resolved {resolved:?}: {answer}"
        );
    }
    // An allow names the Accept rule of the name.
    assert_eq!(
        answers[1]["rule"], "names egress[0] (api)",
        "{}",
        answers[1]
    );
    assert_eq!(
        answers[4]["rule"], "names egress[1] (svc)",
        "{}",
        answers[4]
    );
    assert_eq!(
        answers[0]["rule"], "names egress[2] (rest)",
        "{}",
        answers[0]
    );
}

#[test]
fn a_pod_without_domain_rules_ignores_the_dns_context() {
    let answers = ask(&[
        r#"{"from": "lab/plain", "to": "203.0.113.7", "port": 443, "protocol": "TCP", "resolved": "api.example.test"}"#,
    ]);
    assert_eq!(answers[0]["verdict"], "allow", "{}", answers[0]);
    assert_eq!(answers[0]["reason"], "not_isolated", "{}", answers[0]);
    assert!(answers[0].get("domain").is_none(), "{}", answers[0]);
}
