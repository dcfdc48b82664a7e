//! Change latency as the agent itself measures it: `egret run` on a manifest directory
//! of a generated cluster (10k pods and 1k policies; 100k and 10k in a full run), in a
//! node namespace whose 100 local pods are real (namespaces and veths). After its first
//! sync, a sequence of changes goes through the directory, each awaited before the
//! next: policy p0, which selects a local pod, gains or loses a port; a replica of a
//! deployment joins on another node, then leaves. p50 and p99 come from the agent's
//! own `egret_programming_latency_seconds` histogram (the bucket deltas around each
//! change, interpolated within a bucket as Prometheus' `histogram_quantile` does);
//! next to them, the time the reconciles themselves took (`reconcile_duration`), and
//! the time from a file's rename to the histogram counting it, seen from outside.

use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use egret_testbed::{
    Topology, agent::AgentProcess, cluster::GeneratedCluster, manifests::write_file,
};
use serde_json::{Value, json};

use super::{Scale, ScratchDir, wait_for};

/// The agent logs this once its first full reconcile is in the kernel.
const READY_LOG: &str = "first full sync programmed";
/// Where the agent serves `/metrics`, inside the node namespace.
const METRICS: ([u8; 4], u16) = ([127, 0, 0, 1], 9090);
/// The deployment whose replica joins and leaves (as in `agent/benches/control_plane.rs`).
const JOINING_DEPLOYMENT: usize = 5;
/// The changes of one round, in order.
const CHANGES: [&str; 3] = ["policy_edit", "pod_join", "pod_leave"];

pub fn run(agent: &Path, scale: Scale) -> anyhow::Result<Vec<Value>> {
    // (pods, policies, rounds): every change at 100k re-reads the whole directory
    // (over 10 s a change on two cores), so few rounds there.
    let sizes: &[(usize, usize, usize)] = if scale.quick {
        &[(10_000, 1_000, 10)]
    } else {
        &[(10_000, 1_000, 30), (100_000, 10_000, 4)]
    };
    let mut results = Vec::new();
    for &(pods, policies, rounds) in sizes {
        let cluster = GeneratedCluster::new(pods, policies);
        results.extend(measure(agent, &cluster, rounds)?);
    }
    Ok(results)
}

fn measure(agent: &Path, cluster: &GeneratedCluster, rounds: usize) -> anyhow::Result<Vec<Value>> {
    let topology = Topology::new()?;
    for (n, index) in cluster.local_indexes().enumerate() {
        let (_, name) = GeneratedCluster::pod_key(index);
        let ipv6 = Ipv6Addr::new(0xfd00, 0xbe, 0, 0, 0, 0, 0, u16::try_from(n + 1)?);
        topology.add_pod(&name, GeneratedCluster::pod_ipv4(index), ipv6)?;
    }
    let manifests = ScratchDir::new("agent-latency")?;
    let dir = manifests.path();
    write_file(dir, "cluster.yaml", &cluster_but_p0(cluster))?;
    write_file(dir, "p0.yaml", &cluster.policy_yaml(0, 0))?;

    let pin_dir = AgentProcess::unique_pin_dir();
    let metrics_addr = std::net::SocketAddr::from(METRICS).to_string();
    let mut process = AgentProcess::start_logging(
        &topology,
        agent,
        dir,
        &pin_dir,
        &["--metrics-addr", &metrics_addr, "--resync-seconds", "3600"],
        "info",
    )?;
    if !wait_for(Duration::from_mins(5), || process.log().contains(READY_LOG)) {
        bail!(
            "the agent did not report its first sync ({READY_LOG:?}):\n{}",
            process.log()
        );
    }
    let ifindexes: Vec<u32> = topology
        .pods()
        .iter()
        .map(egret_testbed::Pod::host_ifindex)
        .collect();
    process.wait_attached(&ifindexes, Duration::from_mins(1))?;

    let mut by_change: BTreeMap<&str, Observed> = BTreeMap::new();
    let mut before = scrape(&topology)?;
    for round in 0..rounds {
        for change in CHANGES {
            let started = Instant::now();
            make(change, round, cluster, dir)?;
            let after = await_programmed(&topology, &before, &process)?;
            let outside = started.elapsed();
            let observed = by_change.entry(change).or_default();
            observed.add(&after.since(&before));
            observed.outside_ms.push(outside.as_secs_f64() * 1e3);
            before = after;
        }
    }
    drop(process);
    if pin_dir.exists() {
        let _ = std::fs::remove_dir_all(&pin_dir);
    }

    let mut all = Observed::default();
    for observed in by_change.values() {
        all.merge(observed);
    }
    let rows = by_change
        .iter()
        .map(|(change, observed)| (*change, observed))
        .chain(std::iter::once(("all", &all)))
        .map(|(change, observed)| observed.row(change, cluster))
        .collect();
    Ok(rows)
}

/// Every object of the cluster but policy p0, which lives in a file of its own.
fn cluster_but_p0(cluster: &GeneratedCluster) -> String {
    let mut yaml = String::with_capacity(cluster.pods * 400 + cluster.policies * 500);
    for n in 0..cluster.namespaces() {
        yaml.push_str(&GeneratedCluster::namespace_yaml(n));
    }
    for index in 0..cluster.pods {
        yaml.push_str(&cluster.pod_yaml(index));
    }
    for p in 1..cluster.policies {
        yaml.push_str(&cluster.policy_yaml(p, 0));
    }
    yaml
}

/// One change through the directory: each file appears or goes by one rename or unlink.
fn make(change: &str, round: usize, cluster: &GeneratedCluster, dir: &Path) -> anyhow::Result<()> {
    match change {
        // Ports 9001 and 9002 in turn: every edit changes the local pod's entries.
        "policy_edit" => {
            let revision = u32::try_from(round % 2 + 1)?;
            write_file(dir, "p0.yaml", &cluster.policy_yaml(0, revision))
        }
        "pod_join" => write_file(
            dir,
            "joined.yaml",
            &cluster.joining_pod_yaml(JOINING_DEPLOYMENT, 0),
        ),
        "pod_leave" => {
            std::fs::remove_file(dir.join("joined.yaml")).context("removing the joined pod")
        }
        other => bail!("no such change: {other}"),
    }
}

/// Polls `/metrics` until the histogram has counted one more change.
fn await_programmed(
    topology: &Topology,
    before: &Scrape,
    process: &AgentProcess,
) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + Duration::from_mins(2);
    while Instant::now() < deadline {
        if let Ok(now) = scrape(topology)
            && now.latency.count > before.latency.count
        {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!(
        "the agent did not program a change within 2 minutes:\n{}",
        process.log()
    )
}

/// The two histograms of one `/metrics` page.
#[derive(Clone, Debug, Default)]
struct Scrape {
    latency: Histogram,
    reconcile: Histogram,
}

impl Scrape {
    fn since(&self, earlier: &Scrape) -> Scrape {
        Scrape {
            latency: self.latency.since(&earlier.latency),
            reconcile: self.reconcile.since(&earlier.reconcile),
        }
    }
}

fn scrape(topology: &Topology) -> anyhow::Result<Scrape> {
    use std::io::{Read as _, Write as _};
    let page = egret_testbed::run_in_netns(topology.node_netns(), || {
        let address = std::net::SocketAddr::from(METRICS);
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut page = String::new();
        stream.read_to_string(&mut page)?;
        anyhow::Ok(page)
    })?;
    let scrape = Scrape {
        latency: Histogram::parse(&page, "egret_programming_latency_seconds"),
        reconcile: Histogram::parse(&page, "egret_reconcile_duration_seconds"),
    };
    ensure!(
        !scrape.latency.buckets.is_empty(),
        "no egret_programming_latency_seconds histogram on /metrics"
    );
    Ok(scrape)
}

/// A Prometheus histogram: cumulative counts by upper bound (seconds, `+Inf` last).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// The histogram `name` from a text exposition page; empty when absent.
    pub fn parse(page: &str, name: &str) -> Self {
        let mut histogram = Histogram::default();
        let bucket = format!("{name}_bucket{{le=\"");
        for line in page.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Some(bound) = series.strip_prefix(&bucket) {
                let bound = bound.trim_end_matches("\"}");
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().unwrap_or(f64::NAN)
                };
                if let Ok(count) = value.parse() {
                    histogram.buckets.push((bound, count));
                }
            } else if series == format!("{name}_sum") {
                histogram.sum = value.parse().unwrap_or(0.0);
            } else if series == format!("{name}_count") {
                histogram.count = value.parse().unwrap_or(0);
            }
        }
        histogram
    }

    /// What was observed between `earlier` and this scrape of the same histogram.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before: BTreeMap<u64, u64> = earlier
            .buckets
            .iter()
            .map(|(bound, count)| (bound.to_bits(), *count))
            .collect();
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(bound, count)| {
                    let earlier = before.get(&bound.to_bits()).copied().unwrap_or(0);
                    (*bound, count.saturating_sub(earlier))
                })
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Adds the observations of `other` (same buckets).
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.iter().map(|(bound, _)| (*bound, 0)).collect();
        }
        for ((_, count), (_, more)) in self.buckets.iter_mut().zip(&other.buckets) {
            *count += more;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    /// The `q` quantile (seconds), linear within its bucket, and that bucket's bounds;
    /// in the `+Inf` bucket, the last finite bound (a floor).
    pub fn quantile(&self, q: f64) -> Option<(f64, (f64, f64))> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * as_f64(total);
        let (mut lower, mut below) = (0.0, 0);
        for &(bound, cumulative) in &self.buckets {
            if as_f64(cumulative) >= rank {
                if bound.is_infinite() {
                    return Some((lower, (lower, bound)));
                }
                let in_bucket = as_f64(cumulative - below);
                let fraction = (rank - as_f64(below)) / in_bucket;
                return Some((lower + (bound - lower) * fraction, (lower, bound)));
            }
            (lower, below) = (bound, cumulative);
        }
        None
    }
}

/// What the agent's histograms and the outside clock saw for one kind of change.
#[derive(Default)]
struct Observed {
    latency: Histogram,
    reconcile: Histogram,
    outside_ms: Vec<f64>,
}

impl Observed {
    fn add(&mut self, delta: &Scrape) {
        self.latency.add(&delta.latency);
        self.reconcile.add(&delta.reconcile);
    }

    fn merge(&mut self, other: &Observed) {
        self.latency.add(&other.latency);
        self.reconcile.add(&other.reconcile);
        self.outside_ms.extend_from_slice(&other.outside_ms);
    }

    fn row(&self, change: &str, cluster: &GeneratedCluster) -> Value {
        let ms = |seconds: f64| seconds * 1e3;
        let quantile = |q| {
            self.latency
                .quantile(q)
                .map(|(at, (low, high))| (ms(at), [ms(low), ms(high)]))
        };
        let (p50, p50_bucket) = quantile(0.5).unzip();
        let (p99, p99_bucket) = quantile(0.99).unzip();
        json!({
            "bench": "agent_change_latency",
            "change": change,
            "pods": cluster.pods,
            "policies": cluster.policies,
            "changes": self.outside_ms.len(),
            "observed": self.latency.count,
            "p50_ms": p50,
            "p50_bucket_ms": p50_bucket,
            "p99_ms": p99,
            "p99_bucket_ms": p99_bucket,
            "mean_ms": mean_ms(&self.latency),
            "reconciles": self.reconcile.count,
            "reconcile_mean_ms": mean_ms(&self.reconcile),
            "outside_p50_ms": nearest_rank(&self.outside_ms, 0.5),
            "outside_p99_ms": nearest_rank(&self.outside_ms, 0.99),
        })
    }
}

/// The `q` quantile of `samples` by nearest rank.
fn nearest_rank(samples: &[f64], q: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * as_f64(sorted.len() as u64)).ceil();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank between 0 and the number of samples"
    )]
    let index = (rank as usize).saturating_sub(1);
    sorted.get(index).copied()
}

fn mean_ms(histogram: &Histogram) -> Option<f64> {
    (histogram.count > 0).then(|| histogram.sum / as_f64(histogram.count) * 1e3)
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP egret_programming_latency_seconds From a change's arrival to the kernel.
# TYPE egret_programming_latency_seconds histogram
egret_programming_latency_seconds_sum 0.12
egret_programming_latency_seconds_count 10
egret_programming_latency_seconds_bucket{le=\"0.005\"} 0
egret_programming_latency_seconds_bucket{le=\"0.01\"} 4
egret_programming_latency_seconds_bucket{le=\"0.02\"} 9
egret_programming_latency_seconds_bucket{le=\"+Inf\"} 10
egret_reconcile_duration_seconds_count 3
";

    #[test]
    fn quantiles_interpolate_within_the_bucket_of_the_rank() {
        let histogram = Histogram::parse(PAGE, "egret_programming_latency_seconds");
        assert_eq!(histogram.count, 10);
        assert_eq!(histogram.buckets.len(), 4);
        // Rank 5 of 10: the first of five observations in (0.01, 0.02].
        let (p50, bucket) = histogram.quantile(0.5).unwrap();
        assert!((p50 - 0.012).abs() < 1e-9, "{p50}");
        assert_eq!(bucket, (0.01, 0.02));
        // Rank 9.9: in the +Inf bucket, so only a floor can be said.
        let (p99, bucket) = histogram.quantile(0.99).unwrap();
        assert!((p99 - 0.02).abs() < 1e-9 && bucket.1.is_infinite());
    }

    #[test]
    fn deltas_count_only_what_came_between_two_scrapes() {
        let before = Histogram::parse(PAGE, "egret_programming_latency_seconds");
        let after = Histogram::parse(
            &PAGE
                .replace("count 10", "count 11")
                .replace("0.12", "0.15")
                .replace("\"0.02\"} 9", "\"0.02\"} 10")
                .replace("\"+Inf\"} 10", "\"+Inf\"} 11"),
            "egret_programming_latency_seconds",
        );
        let delta = after.since(&before);
        assert_eq!(delta.count, 1);
        assert_eq!(
            delta.buckets,
            vec![(0.005, 0), (0.01, 0), (0.02, 1), (f64::INFINITY, 1)]
        );
        let (p99, bucket) = delta.quantile(0.99).unwrap();
        assert_eq!(bucket, (0.01, 0.02));
        assert!(p99 > 0.01 && p99 <= 0.02);
        let mut total = Histogram::default();
        total.add(&delta);
        total.add(&delta);
        assert_eq!(total.count, 2);
        assert_eq!(total.buckets[2], (0.02, 2));
    }
}
