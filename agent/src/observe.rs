//! What the agent tells the outside world: Prometheus metrics (one registry under the
//! `egret_` prefix), readiness and liveness, served over HTTP by [`http`].

pub mod dns;
pub mod flows;
pub mod http;
mod kernel;

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::ObjectKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// Local endpoints the kernel counts for, by endpoint id: the labels of their series.
pub type EndpointNames = Arc<RwLock<BTreeMap<u32, EndpointName>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointName {
    pub pod: ObjectKey,
    /// `ns/name` of the policies isolating the pod, comma-separated (bounded: a pod is
    /// selected by few policies), or empty.
    pub policy_set: String,
}

pub struct Metrics {
    registry: Registry,
    pub denied_flows: Family<flows::DeniedFlowLabels, Counter>,
    pub table_overflows: Counter,
    pub events_lost: Counter,
    pub reconcile_runs: Counter,
    pub reconcile_failures: Counter,
    pub reconcile_duration: Histogram,
    pub programming_latency: Histogram,
    pub endpoints: Family<StateLabels, Gauge>,
    /// By kind: `NetworkPolicy`, `ClusterNetworkPolicy`.
    pub policies: Family<KindLabels, Gauge>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    pub watch_restarts: Family<KindLabels, Counter>,
    pub source_failures: Family<SourceLabels, Counter>,
    pub source_stale: Family<SourceLabels, Gauge>,
    pub endpoint_names: EndpointNames,
}

impl Metrics {
    /// A registry with every metric; `pin_dir` is where the kernel's counters are read
    /// from at each scrape.
    #[must_use]
    pub fn new(pin_dir: PathBuf) -> Self {
        let mut registry = Registry::with_prefix("egret");
        let metrics = Self {
            reconcile_runs: Counter::default(),
            reconcile_failures: Counter::default(),
            reconcile_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            // Fine from 1 to 100 ms, where one change to the kernel should land
            // (BENCHMARKS.md, "One change to the kernel"), and fine enough up to 2.5 s
            // for a large manifest directory, whose every change is a whole re-read, so
            // p50 and p99 read from the buckets say something.
            programming_latency: Histogram::new([
                0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025,
                0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25,
                1.5, 2.0, 2.5, 5.0, 10.0,
            ]),
            endpoints: Family::default(),
            policies: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            watch_restarts: Family::default(),
            source_failures: Family::default(),
            source_stale: Family::default(),
            endpoint_names: EndpointNames::default(),
            denied_flows: Family::default(),
            table_overflows: Counter::default(),
            events_lost: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "denied_flows",
            "Denied (or audit-denied) flows per window, by source pod and the policies isolating it",
            metrics.denied_flows.clone(),
        );
        registry.register(
            "flow_events_lost",
            "Flow events the kernel could not report (rate limit, full buffer)",
            metrics.events_lost.clone(),
        );
        registry.register(
            "reconcile_runs",
            "Reconciles run",
            metrics.reconcile_runs.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed to apply",
            metrics.reconcile_failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to compile the snapshot and apply the difference",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "programming_latency_seconds",
            "From a change's arrival (watch event, file change) to the kernel holding the result",
            metrics.programming_latency.clone(),
        );
        registry.register(
            "endpoints",
            "Local pods by state",
            metrics.endpoints.clone(),
        );
        registry.register(
            "policies_loaded",
            "Policies in the snapshot, by kind (NetworkPolicy, ClusterNetworkPolicy)",
            metrics.policies.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each kernel table",
            metrics.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of each kernel table",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "watch_restarts",
            "Watches restarted after an error",
            metrics.watch_restarts.clone(),
        );
        metrics.register_source_health(&mut registry);
        registry.register(
            "table_overflows",
            "Times a full policy or CIDR table made pods fail closed",
            metrics.table_overflows.clone(),
        );
        registry.register_collector(Box::new(kernel::KernelCounters::new(
            pin_dir.clone(),
            metrics.endpoint_names.clone(),
        )));
        registry.register_collector(Box::new(dns::DnsCounters::new(&pin_dir)));
        registry.register_collector(Box::new(kernel::ConntrackTables::new(pin_dir)));
        Self {
            registry,
            ..metrics
        }
    }

    fn register_source_health(&self, registry: &mut Registry) {
        registry.register(
            "source_failures",
            "Failed reads of a source (the manifest directory, a watched kind); its last good snapshot stays enforced",
            self.source_failures.clone(),
        );
        registry.register(
            "source_stale",
            "1 while a source cannot be read and its last good snapshot is enforced",
            self.source_stale.clone(),
        );
    }

    /// The text exposition of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Readiness and liveness of the reconcile loop, and the sources that cannot be read.
pub struct Health {
    ready: AtomicBool,
    progress: Mutex<Progress>,
    /// The loop must make progress at least this often to count as alive.
    stall_after: Duration,
    stale: Mutex<BTreeMap<String, StaleSource>>,
}

/// A source that cannot be read; its last good snapshot is what the kernel enforces.
/// The admin API's status carries these, and `egret status` prints them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaleSource {
    pub source: String,
    /// The first failure of this run of failures, RFC 3339.
    pub since: String,
    /// Failed reads since then.
    pub failures: u64,
    /// The latest failure.
    pub problem: String,
}

impl fmt::Display for StaleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "source {} stale since {} ({} failed reads; enforcing its last good snapshot): {}",
            self.source, self.since, self.failures, self.problem
        )
    }
}

struct Progress {
    last_tick: Instant,
    reconcile_started: Option<Instant>,
}

impl Health {
    #[must_use]
    pub fn new(stall_after: Duration) -> Self {
        Self {
            ready: AtomicBool::new(false),
            progress: Mutex::new(Progress {
                last_tick: Instant::now(),
                reconcile_started: None,
            }),
            stall_after,
            stale: Mutex::default(),
        }
    }

    /// `source` failed to read; true when it was not stale before.
    pub fn source_failed(&self, source: &str, problem: &str) -> bool {
        let mut stale = self
            .stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = stale.entry(source.to_owned());
        let first = matches!(entry, std::collections::btree_map::Entry::Vacant(_));
        let source = entry.or_insert_with(|| StaleSource {
            source: source.to_owned(),
            since: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            failures: 0,
            problem: String::new(),
        });
        source.failures += 1;
        problem.clone_into(&mut source.problem);
        first
    }

    /// `source` reads again; what it was while stale, if it was.
    pub fn source_recovered(&self, source: &str) -> Option<StaleSource> {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(source)
    }

    #[must_use]
    pub fn stale_sources(&self) -> Vec<StaleSource> {
        self.stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The first full sync is in the kernel.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn reconcile_started(&self) {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        progress.reconcile_started = Some(Instant::now());
        progress.last_tick = Instant::now();
    }

    /// The loop finished a reconcile or is idle, waiting for changes.
    pub fn tick(&self) {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        progress.reconcile_started = None;
        progress.last_tick = Instant::now();
    }

    /// `None` when alive; otherwise what is stuck.
    #[must_use]
    pub fn stalled(&self) -> Option<String> {
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(started) = progress.reconcile_started
            && started.elapsed() > self.stall_after
        {
            return Some(format!(
                "a reconcile has been running for {:?}",
                started.elapsed()
            ));
        }
        let silent = progress.last_tick.elapsed();
        (silent > self.stall_after)
            .then(|| format!("the reconcile loop has not run for {silent:?}"))
    }
}

/// The last tables the kernel was given, for `status` and `explain`.
#[derive(Debug)]
pub struct LiveTables {
    pub node: String,
    pub tables: crate::compile::Tables,
    /// Where each enforced local pod is attached (interface or cgroup).
    pub attachments: BTreeMap<ObjectKey, String>,
    pub pod_ips: BTreeMap<ObjectKey, Vec<std::net::IpAddr>>,
    pub policies: usize,
    /// (map, entries, capacity).
    pub maps: Vec<(&'static str, usize, u32)>,
    pub reconciled_at: std::time::SystemTime,
    pub reconcile_duration: Duration,
}

/// Shared between the reconcile loop (writer) and the admin endpoints (readers).
#[derive(Default)]
pub struct Live {
    pub tables: RwLock<Option<Arc<LiveTables>>>,
    pub addresses: flows::AddressBook,
    pub tier_rules: flows::TierRules,
    /// Where the kernel's maps are pinned (what it learnt from DNS is read there).
    pub pin_dir: PathBuf,
}

impl Live {
    #[must_use]
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            pin_dir,
            ..Self::default()
        }
    }
}
