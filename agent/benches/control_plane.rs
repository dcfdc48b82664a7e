//! How long one change takes to reach the kernel, through the library: the changed
//! object goes into the snapshot, then the incremental compiler (given what changed, as
//! the agent's reconcile does), `KernelImage::build` and `Datapath::apply` (diff and map
//! writes). The full compile of the same snapshot is timed beside it.
//! Watch delivery and the agent's debounce are not included. Generated cluster of 10k
//! pods and 1k policies (see `egret_testbed::cluster`), 100 of them local. Needs root
//! and bpffs. Run with `cargo xtask bench` (or `cargo bench -p egret --bench
//! control_plane [-- --quick]`); prints JSON lines.

mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use egret::{
    compile::{Ids, Scope, compile, incremental::Compiler},
    datapath::{Capacities, Datapath, image::KernelImage},
    state::{Changes, ObjectKey, Pod, Snapshot},
};
use egret_testbed::{agent::AgentProcess, cluster::GeneratedCluster};
use serde_json::json;

use crate::support::Summary;

/// The deployment whose pods join and leave: in a namespace with local pods.
const JOINING_DEPLOYMENT: usize = 5;

fn main() {
    assert!(
        egret_testbed::is_root(),
        "the control-plane benchmark loads BPF programs: run it as root"
    );
    let sizes: &[(usize, usize, usize)] = if support::is_quick() {
        &[(10_000, 1_000, 30)]
    } else {
        &[(10_000, 1_000, 100), (100_000, 10_000, 30)]
    };
    for &(pods, policies, samples) in sizes {
        measure(&GeneratedCluster::new(pods, policies), samples);
    }
}

/// Changes to one generated cluster, `samples` of each kind.
fn measure(cluster: &GeneratedCluster, samples: usize) {
    let snapshot = support::snapshot(cluster);
    let interfaces: BTreeMap<ObjectKey, u32> = cluster
        .local_indexes()
        .zip(1000..)
        .map(|(index, ifindex)| {
            let (namespace, name) = GeneratedCluster::pod_key(index);
            (ObjectKey::new(namespace, name), ifindex)
        })
        .collect();
    let pin_dir = AgentProcess::unique_pin_dir();
    let datapath = Datapath::open(&pin_dir, Capacities::default()).expect("programs load");
    let mut pipeline = Pipeline {
        snapshot,
        scope: Scope::Node(cluster.node.clone()),
        interfaces,
        compiler: Compiler::new(Scope::Node(cluster.node.clone()), Ids::default()),
        datapath,
    };

    let initial = pipeline.reconcile(&Changes::everything());
    support::emit(
        json!({
            "bench": "initial_sync",
            "pods": cluster.pods,
            "policies": cluster.policies,
            "compile_s": initial.compile.as_secs_f64(),
            "build_s": initial.build.as_secs_f64(),
            "apply_s": initial.apply.as_secs_f64(),
            "entries_written": initial.entries,
        }),
        None,
    );

    // Policy p0 selects deployment 0, which has a local pod: each edit (an extra port,
    // 9001 and 9002 in turn) changes that endpoint's entries.
    let edits: Vec<_> = [1, 2]
        .iter()
        .map(|revision| {
            let snapshot = support::manifests(&cluster.policy_yaml(0, *revision));
            snapshot.policies.into_values().next().expect("one policy")
        })
        .collect();
    let joining: Pod = support::manifests(&cluster.joining_pod_yaml(JOINING_DEPLOYMENT, 0))
        .pods
        .into_values()
        .next()
        .expect("one pod");

    let mut policy_edit = Vec::new();
    let mut pod_join = Vec::new();
    let mut pod_leave = Vec::new();
    for i in 0..samples {
        let edit = edits[i % edits.len()].clone();
        let mut changes = Changes::default();
        changes.policies.insert(edit.id.clone());
        pipeline.snapshot.insert_policy(edit);
        policy_edit.push(pipeline.reconcile(&changes));
        let mut changes = Changes::default();
        changes.pods.insert(joining.key());
        pipeline.snapshot.insert_pod(joining.clone());
        pod_join.push(pipeline.reconcile(&changes));
        pipeline.snapshot.pods.remove(&joining.key());
        pod_leave.push(pipeline.reconcile(&changes));
    }
    for (change, timings) in [
        ("policy_edit", policy_edit),
        ("pod_join", pod_join),
        ("pod_leave", pod_leave),
    ] {
        let total = Summary::of(timings.iter().map(|t| ms(t.total())).collect());
        let stage = |f: fn(&Timing) -> Duration| {
            Summary::of(timings.iter().map(|t| ms(f(t))).collect()).median()
        };
        let mut fields = json!({
            "bench": "change_latency",
            "change": change,
            "pods": cluster.pods,
            "policies": cluster.policies,
            "p50_ms": total.percentile(0.5),
            "p99_ms": total.percentile(0.99),
            "compile_median_ms": stage(|t| t.compile),
            "full_compile_median_ms": stage(|t| t.full_compile),
            "build_median_ms": stage(|t| t.build),
            "apply_median_ms": stage(|t| t.apply),
            "entries_median": Summary::of(timings.iter().map(|t| as_f64(t.entries)).collect()).median(),
        });
        if let Some(object) = fields.as_object_mut() {
            object.extend(total.json("ms"));
        }
        support::emit(fields, None);
    }
    drop(pipeline);
    let _ = egret::datapath::cleanup(&pin_dir);
}

/// State in, kernel out: what the agent's reconcile does after its sources.
struct Pipeline {
    snapshot: Snapshot,
    scope: Scope,
    interfaces: BTreeMap<ObjectKey, u32>,
    compiler: Compiler,
    datapath: Datapath,
}

struct Timing {
    compile: Duration,
    /// The full compile of the same snapshot, for comparison (not in the total).
    full_compile: Duration,
    build: Duration,
    apply: Duration,
    /// Entries written and removed.
    entries: usize,
}

impl Timing {
    fn total(&self) -> Duration {
        self.compile + self.build + self.apply
    }
}

impl Pipeline {
    fn reconcile(&mut self, changes: &Changes) -> Timing {
        let previous = self.compiler.compiled().ids.clone();
        let started = Instant::now();
        let compiled = self.compiler.compile(&self.snapshot, changes);
        let incremental = started.elapsed();
        let started = Instant::now();
        let full = compile(&self.snapshot, &self.scope, &previous);
        let full_compile = started.elapsed();
        // A figure for wrong tables would mean nothing.
        assert!(
            *compiled == full,
            "the incremental compile differs from the full one"
        );
        let started = Instant::now();
        let image = KernelImage::build(&compiled.tables, &self.interfaces, &BTreeMap::new());
        let build = started.elapsed();
        let started = Instant::now();
        let stats = self.datapath.apply(&image).expect("tables fit");
        let apply = started.elapsed();
        Timing {
            compile: incremental,
            full_compile,
            build,
            apply,
            entries: stats.written + stats.removed,
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn as_f64(n: usize) -> f64 {
    n as f64
}
