//! What the benchmark binaries share: the generated cluster as a snapshot, and
//! summaries of repeated measurements printed as JSON lines for `cargo xtask bench`.
#![allow(dead_code, reason = "each benchmark binary uses a part")]

use std::path::Path;

use egret::{source::manifest::Loader, state::Snapshot};
use egret_testbed::cluster::GeneratedCluster;

/// Whether the binary was asked for a short run (`-- --quick`).
pub fn is_quick() -> bool {
    std::env::args().any(|a| a == "--quick")
}

/// The generated cluster, read through the same loader the agent uses.
///
/// # Panics
/// When the generator writes something the loader rejects: a benchmark bug.
pub fn snapshot(cluster: &GeneratedCluster) -> Snapshot {
    manifests(&cluster.yaml())
}

/// A snapshot of manifest text that must load without problems.
///
/// # Panics
/// When the text has problems: a benchmark bug.
pub fn manifests(yaml: &str) -> Snapshot {
    let mut loader = Loader::default();
    loader.add_text(Path::new("generated.yaml"), yaml);
    assert!(
        loader.problems.is_empty(),
        "generated manifests have problems: {:?}",
        loader.problems.first().map(ToString::to_string)
    );
    loader.snapshot
}

/// Median, extremes and chosen percentiles of samples.
#[derive(Clone, Debug)]
pub struct Summary {
    sorted: Vec<f64>,
}

impl Summary {
    /// # Panics
    /// When `samples` is empty.
    pub fn of(mut samples: Vec<f64>) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_by(f64::total_cmp);
        Self { sorted: samples }
    }

    /// Nearest-rank percentile (`q` in 0..=1).
    pub fn percentile(&self, q: f64) -> f64 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short vector"
        )]
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1]
    }

    pub fn median(&self) -> f64 {
        let n = self.sorted.len();
        if n % 2 == 1 {
            self.sorted[n / 2]
        } else {
            f64::midpoint(self.sorted[n / 2 - 1], self.sorted[n / 2])
        }
    }

    /// `{"runs", "median", "min", "max"}` with `unit` appended to the value keys
    /// (`median_ns`, ...).
    pub fn json(&self, unit: &str) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert("runs".into(), self.sorted.len().into());
        map.insert(format!("median_{unit}"), self.median().into());
        map.insert(format!("min_{unit}"), self.sorted[0].into());
        map.insert(
            format!("max_{unit}"),
            self.sorted[self.sorted.len() - 1].into(),
        );
        map
    }
}

/// Prints one result line: `fields` plus the summary's.
pub fn emit(
    fields: serde_json::Value,
    summary: Option<serde_json::Map<String, serde_json::Value>>,
) {
    let mut line = match fields {
        serde_json::Value::Object(map) => map,
        other => panic!("benchmark fields must be an object, not {other}"),
    };
    line.extend(summary.unwrap_or_default());
    println!("{}", serde_json::Value::Object(line));
}
