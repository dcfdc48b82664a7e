//! What the agent tells the outside world: Prometheus metrics (one registry under the
//! `egret_` prefix), readiness and liveness, served over HTTP by [`http`].

pub mod flows;
pub mod http;
mod kernel;

use std::{
    collections::BTreeMap,
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
    pub policies: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    pub watch_restarts: Family<KindLabels, Counter>,
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
            programming_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            endpoints: Family::default(),
            policies: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            watch_restarts: Family::default(),
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
            "NetworkPolicies in the snapshot",
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
        registry.register(
            "table_overflows",
            "Times a full policy or CIDR table made pods fail closed",
            metrics.table_overflows.clone(),
        );
        registry.register_collector(Box::new(kernel::KernelCounters::new(
            pin_dir.clone(),
            metrics.endpoint_names.clone(),
        )));
        registry.register_collector(Box::new(kernel::ConntrackTables::new(pin_dir)));
        Self {
            registry,
            ..metrics
        }
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

/// Readiness and liveness of the reconcile loop.
pub struct Health {
    ready: AtomicBool,
    progress: Mutex<Progress>,
    /// The loop must make progress at least this often to count as alive.
    stall_after: Duration,
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
        }
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
}
