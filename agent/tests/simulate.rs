//! `egret simulate` as a user runs it: manifest files in, JSON lines out.

mod common;

use common::simulate;

const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: n1
  containers: [{name: c, image: i, ports: [{name: pg, containerPort: 5432}]}]
status: {phase: Running, podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Pending}
";

const POLICIES: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-db, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: db}}}]
      ports: [{port: pg}]
    - to: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-staged, namespace: shop, annotations: {egret.dev/mode: audit}}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
";

const BROKEN: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-cidr, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/40}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad-type, namespace: shop}
spec:
  podSelector: {}
  egress: [{ports: [{port: [80]}]}]
";

fn cluster_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    dir
}

#[test]
fn answers_each_query_in_order_with_the_policies_involved() {
    let dir = cluster_dir(&[("cluster.yaml", CLUSTER), ("policies.yaml", POLICIES)]);
    let queries = r#"{"from": "shop/web", "to": "shop/db", "port": 5432, "protocol": "TCP"}
{"from": "shop/web", "to": "shop/db", "port": 5433, "protocol": "TCP"}
{"from": "shop/web", "to": "fd00::2", "port": 5432, "protocol": "TCP"}
{"from": "shop/web", "to": "192.168.7.7", "protocol": "ICMP"}
{"from": "shop/web", "to": "192.168.1.7", "port": 53, "protocol": "UDP"}
{"from": "shop/db", "to": "10.0.0.1", "port": 80, "protocol": "TCP"}
{"from": "shop/nobody", "to": "shop/db", "port": 80, "protocol": "TCP"}
{"from": "shop/web", "to": "shop/pending", "port": 80, "protocol": "TCP"}
{"from": "shop/web", "to": "shop/db", "port": 80, "protocol": "QUIC"}
not json
"#;
    let (answers, _) = simulate(dir.path(), queries);
    assert_eq!(answers.len(), 10, "one line per query");
    let verdicts: Vec<&str> = answers
        .iter()
        .map(|a| a["verdict"].as_str().unwrap_or("error"))
        .collect();
    assert_eq!(
        verdicts,
        [
            "allow", "deny", "allow", "allow", "deny", "deny", "error", "error", "error", "error"
        ]
    );
    assert_eq!(
        answers[0]["policies"],
        serde_json::json!(["shop/web-to-db"]),
        "allowed by"
    );
    assert_eq!(
        answers[1]["policies"],
        serde_json::json!(["shop/web-to-db"]),
        "isolated by"
    );
    assert_eq!(answers[0]["from"], "shop/web", "input fields are echoed");
    assert_eq!(answers[0]["port"], 5432);
    assert_eq!(
        answers[5]["audit"], true,
        "db is only staged: an audit denial"
    );
    assert!(
        answers[6]["error"]
            .as_str()
            .unwrap()
            .contains("unknown pod shop/nobody"),
        "{}",
        answers[6]
    );
    assert!(
        answers[7]["error"].as_str().unwrap().contains("no IP"),
        "{}",
        answers[7]
    );
    assert!(
        answers[8]["error"].as_str().unwrap().contains("QUIC"),
        "{}",
        answers[8]
    );
}

#[test]
fn broken_objects_are_reported_and_the_rest_still_counts() {
    let dir = cluster_dir(&[
        ("cluster.yaml", CLUSTER),
        ("policies.yaml", POLICIES),
        ("broken.yaml", BROKEN),
        ("garbage.yaml", "kind: [unclosed\n"),
    ]);
    let (answers, log) = simulate(
        dir.path(),
        "{\"from\": \"shop/web\", \"to\": \"10.0.0.2\", \"port\": 80, \"protocol\": \"TCP\"}\n",
    );
    assert!(
        log.contains("broken.yaml: NetworkPolicy shop/bad-cidr: spec.egress[0].to[0].ipBlock.cidr"),
        "names file, object and field:\n{log}"
    );
    assert!(
        log.contains("broken.yaml: NetworkPolicy shop/bad-type: spec.egress[0].ports[0].port"),
        "{log}"
    );
    assert!(
        log.contains("garbage.yaml: document 1: YAML does not parse"),
        "{log}"
    );
    // The broken policies select web too: their broken rules allow nothing, and they
    // still isolate it (failing closed), alongside web-to-db.
    assert_eq!(answers[0]["verdict"], "deny");
    assert_eq!(
        answers[0]["policies"],
        serde_json::json!(["shop/bad-cidr", "shop/bad-type", "shop/web-to-db"])
    );
    assert!(log.contains("this rule allows nothing"), "{log}");
}
