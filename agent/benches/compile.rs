//! Full-compile time on generated, realistic clusters (see `egret_testbed::cluster`):
//! deployments of pods sharing labels across namespaces, a mix of selector, namespace
//! and ipBlock policies, 100 pods on the measured node. Run with `cargo xtask bench`
//! (or `cargo bench -p egret --bench compile [-- --quick]`). Prints one JSON line per size.

mod support;

use std::{hint::black_box, time::Instant};

use egret::compile::{Ids, Scope, compile};
use egret_testbed::cluster::GeneratedCluster;

use crate::support::Summary;

fn main() {
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
