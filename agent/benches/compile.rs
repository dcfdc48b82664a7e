//! Full-compile time on generated, realistic clusters (see `egret_testbed::cluster`):
//! deployments of pods sharing labels across namespaces, a mix of selector, namespace
//! and ipBlock policies, 100 pods on the measured node; then huge ipBlock lists (cloud
//! allow lists, with excepts) on one of those pods: 100k in one policy, 1M across 100.
//! Run with `cargo xtask bench` (or `cargo bench -p egret --bench compile [-- --quick]`).
//! Prints one JSON line per size.

mod support;

use std::{hint::black_box, time::Instant};

use egret::compile::{Ids, Scope, compile};
use egret_testbed::cluster::{GeneratedCluster, ip_block_policy_yaml};

use crate::support::Summary;

fn main() {
    compile_full();
    compile_ip_blocks();
}

fn compile_full() {
    let sizes: &[(usize, usize, usize)] = if support::is_quick() {
        &[(10_000, 1_000, 3)]
    } else {
        &[(10_000, 1_000, 5), (100_000, 10_000, 3)]
    };
    for &(pods, policies, runs) in sizes {
        let cluster = GeneratedCluster::new(pods, policies);
        let started = Instant::now();
        let snapshot = support::snapshot(&cluster);
        let loaded = started.elapsed();
        let scope = Scope::Node(cluster.node.clone());
        let mut times = Vec::new();
        let mut entries = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let compiled = black_box(compile(&snapshot, &scope, &Ids::default()));
            times.push(started.elapsed().as_secs_f64());
            entries = compiled.tables.policy.len()
                + compiled.tables.cidrs.len()
                + compiled.tables.identities.len();
        }
        support::emit(
            serde_json::json!({
                "bench": "compile_full",
                "pods": pods,
                "policies": policies,
                "local_pods": cluster.local_pods,
                "table_entries": entries,
                "load_s": loaded.as_secs_f64(),
            }),
            Some(Summary::of(times).json("s")),
        );
    }
}

/// `blocks` ipBlocks split over `policies` policies, all selecting one deployment of a
/// 1,000-pod cluster, so one pod on the measured node holds them all.
fn compile_ip_blocks() {
    let sizes: &[(usize, usize, usize)] = if support::is_quick() {
        &[(100_000, 1, 3)]
    } else {
        &[(100_000, 1, 5), (1_000_000, 100, 3)]
    };
    for &(blocks, policies, runs) in sizes {
        let cluster = GeneratedCluster::new(1_000, 0);
        let mut yaml = cluster.yaml();
        for p in 0..policies {
            yaml.push_str(&ip_block_policy_yaml(
                &format!("allow-list-{p}"),
                "ns-0",
                "{matchLabels: {app: dep-0}}",
                blocks / policies,
                p as u64,
            ));
        }
        let started = Instant::now();
        let snapshot = support::manifests(&yaml);
        let loaded = started.elapsed();
        drop(yaml);
        let scope = Scope::Node(cluster.node.clone());
        let mut times = Vec::new();
        let mut cidr_entries = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let compiled = black_box(compile(&snapshot, &scope, &Ids::default()));
            times.push(started.elapsed().as_secs_f64());
            cidr_entries = compiled.tables.cidrs.len();
        }
        support::emit(
            serde_json::json!({
                "bench": "compile_ip_blocks",
                "ip_blocks": blocks,
                "policies": policies,
                "endpoints_holding_them": 1,
                "cidr_entries": cidr_entries,
                "load_s": loaded.as_secs_f64(),
            }),
            Some(Summary::of(times).json("s")),
        );
    }
}
