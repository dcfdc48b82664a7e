//! The upstream network-policy-api ClusterNetworkPolicy conformance tests that exercise
//! egress (`tests/data/cnp/`, see its README), run through `egret simulate`: for each step,
//! the base fixture plus the step's policies, and every probe of the step in one run.

mod common;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// Upstream v0.2.0 has 16 ClusterNetworkPolicy tests with egress probes.
const UPSTREAM_EGRESS_TESTS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    upstream: Upstream,
    #[expect(dead_code, reason = "documentation for readers of the data")]
    notes: String,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Upstream {
    /// The Go file in kubernetes-sigs/network-policy-api that registers the test.
    file: String,
    /// The test's `ShortName`.
    test: String,
    #[expect(dead_code, reason = "documentation for readers of the data")]
    manifests: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    description: String,
    /// Every policy in force at this step (ClusterNetworkPolicies and NetworkPolicies),
    /// upstream's cumulative patches already applied.
    policies: Vec<Value>,
    probes: Vec<Probe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    /// `namespace/pod`, the client.
    from: String,
    /// `namespace/pod`, the server (probed at its first address, as upstream probes `status.podIP`).
    to: String,
    protocol: Protocol,
    port: u16,
    /// Whether the connection gets through Egret's egress check.
    connect: bool,
    /// Why Egret's expectation is not upstream's (an experimental field Egret fails closed on).
    #[serde(default)]
    egret_differs: Option<String>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// One line of `egret simulate --queries -`.
#[derive(Serialize)]
struct Query<'a> {
    from: &'a str,
    to: &'a str,
    port: u16,
    protocol: &'static str,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/cnp")
}

#[test]
fn upstream_cnp_egress_conformance_cases_pass_through_simulate() {
    let dir = data_dir();
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).expect("cluster.yaml");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "cluster.yaml")
        })
        .collect();
    cases.sort();
    assert_eq!(
        cases.len(),
        UPSTREAM_EGRESS_TESTS,
        "one file per upstream egress test"
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &cases {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let case: Case = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!case.steps.is_empty(), "{file}: no steps");
        for (s, step) in case.steps.iter().enumerate() {
            let context = format!("{file} step {} ({})", s + 1, step.description);
            assert!(!step.probes.is_empty(), "{context}: no probes");
            let manifests = tempfile::tempdir().unwrap();
            std::fs::write(manifests.path().join("cluster.yaml"), &cluster).unwrap();
            let policies: Vec<String> = step
                .policies
                .iter()
                .map(|p| serde_yaml_ng::to_string(p).unwrap())
                .collect();
            std::fs::write(
                manifests.path().join("policies.yaml"),
                policies.join("---\n"),
            )
            .unwrap();
            let queries: String = step
                .probes
                .iter()
                .map(|probe| {
                    let query = Query {
                        from: &probe.from,
                        to: &probe.to,
                        port: probe.port,
                        protocol: probe.protocol.name(),
                    };
                    serde_json::to_string(&query).unwrap() + "\n"
                })
                .collect();
            let (answers, log) = common::simulate(manifests.path(), &queries);
            failures.extend(unexpected_warnings(&log, step).map(|w| format!("{context}: {w}")));
            assert_eq!(
                answers.len(),
                step.probes.len(),
                "{context}: one answer per probe"
            );
            for (probe, answer) in step.probes.iter().zip(&answers) {
                checked += 1;
                if let Some(problem) = disagreement(probe, answer) {
                    failures.push(format!(
                        "{context}: {} -> {} {}/{}: {problem}",
                        probe.from,
                        probe.to,
                        probe.protocol.name(),
                        probe.port,
                    ));
                }
            }
        }
        eprintln!("ran: {} ({})", case.upstream.test, case.upstream.file);
    }
    assert!(
        failures.is_empty(),
        "{} problems over {checked} probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// What is wrong with `answer` for `probe`, if anything.
fn disagreement(probe: &Probe, answer: &serde_json::Value) -> Option<String> {
    if let Some(error) = answer.get("error") {
        return Some(format!("simulate could not answer: {error}"));
    }
    let allowed = match answer["verdict"].as_str() {
        Some("allow") => true,
        Some("deny") => false,
        _ => return Some(format!("no verdict: {answer}")),
    };
    if allowed == probe.connect {
        return None;
    }
    let expected = if probe.connect { "allow" } else { "deny" };
    let said = if allowed { "allow" } else { "deny" };
    let differs = probe
        .egret_differs
        .as_ref()
        .map(|why| format!(" [Egret's expectation, not upstream's: {why}]"))
        .unwrap_or_default();
    Some(format!(
        "expected {expected}, simulate said {said} (reason {}, policies {}){differs}",
        answer["reason"], answer["policies"]
    ))
}

/// Warnings that point at a mistake: the fixture must load cleanly, and a policy only
/// draws a warning when Egret fails closed on a `nodes` peer it does not implement.
fn unexpected_warnings<'a>(log: &'a str, step: &Step) -> impl Iterator<Item = &'a str> {
    let fails_closed = step.policies.iter().any(uses_node_peers);
    log.lines().filter(move |line| {
        line.contains("WARN") && (line.contains("cluster.yaml") || !fails_closed)
    })
}

/// `spec.egress[*].to[*].nodes` is set: an experimental peer Egret does not implement.
fn uses_node_peers(policy: &Value) -> bool {
    policy
        .get("spec")
        .and_then(|spec| spec.get("egress"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|rule| rule.get("to").and_then(Value::as_sequence))
        .flatten()
        .any(|peer| peer.get("nodes").is_some())
}
