//! The upstream Kubernetes NetworkPolicy e2e tests that have egress rules, ported as data
//! (`tests/data/netpol-e2e/`, see its README), run through `egret simulate`: every
//! (from, to) pair of the 9x9 reachability matrix, for each probed port and protocol.

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;
const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    upstream: String,
    #[allow(dead_code, reason = "documentation for readers of the data")]
    notes: Option<String>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    description: String,
    #[serde(default)]
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<serde_yaml_ng::Value>,
    probes: Vec<ProbeMatrix>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeMatrix {
    port: u16,
    protocol: String,
    matrix: String,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/netpol-e2e")
}

#[test]
fn upstream_egress_cases_match_their_reachability_matrices() {
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
    assert!(
        cases.len() >= 14,
        "expected the ported cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    let mut checked = 0;
    for path in &cases {
        let case: Case = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for (s, step) in case.steps.iter().enumerate() {
            assert!(
                step.namespace_labels.is_empty() && step.pod_labels.is_empty(),
                "{}: label overrides are not supported by this runner yet",
                path.display()
            );
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
            for probe in &step.probes {
                let expected = parse_matrix(&probe.matrix);
                let observed = simulate_matrix(manifests.path(), probe.port, &probe.protocol);
                for (i, from) in PODS.iter().enumerate() {
                    for (j, to) in PODS.iter().enumerate() {
                        checked += 1;
                        if expected[i][j] != observed[i][j] {
                            failures.push(format!(
                                "{} step {} ({}): {from} -> {to} {}/{}: expected {}, simulate said {}",
                                path.file_name().unwrap().to_string_lossy(),
                                s + 1,
                                step.description,
                                probe.protocol,
                                probe.port,
                                verdict_word(expected[i][j]),
                                verdict_word(observed[i][j]),
                            ));
                        }
                    }
                }
            }
        }
        eprintln!("ok: {}", case.upstream);
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} flows disagree:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn verdict_word(allowed: bool) -> &'static str {
    if allowed { "allow" } else { "deny" }
}

fn parse_matrix(text: &str) -> Vec<Vec<bool>> {
    let rows: Vec<Vec<bool>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .map(|cell| match cell {
                    "." => true,
                    "X" => false,
                    other => panic!("matrix cell {other:?}"),
                })
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), 9, "9 rows");
    assert!(rows.iter().all(|r| r.len() == 9), "9 columns");
    rows
}

/// Runs `egret simulate` for all 81 pairs and returns allow/deny per pair.
fn simulate_matrix(manifests: &Path, port: u16, protocol: &str) -> Vec<Vec<bool>> {
    let mut queries = String::new();
    for from in PODS {
        for to in PODS {
            queries.push_str(
                &serde_json::json!({"from": from, "to": to, "port": port, "protocol": protocol})
                    .to_string(),
            );
            queries.push('\n');
        }
    }
    let (answers, log) = common::simulate(manifests, &queries);
    assert!(!log.contains("WARN"), "manifests reported problems: {log}");
    assert_eq!(answers.len(), 81);
    answers
        .chunks(9)
        .map(|row| {
            row.iter()
                .map(|a| match a["verdict"].as_str() {
                    Some("allow") => true,
                    Some("deny") => false,
                    _ => panic!("no verdict: {a}"),
                })
                .collect()
        })
        .collect()
}
