//! What a reconcile tells the world: metrics, health and readiness, the admin API's
//! live state and the flow log's names, and the logs that summarise a sync. Writes no
//! map and no link.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tracing::{debug, info, warn};

use super::plan::Change;
use crate::{
    compile::Compiled,
    datapath::{ApplyStats, Capacities, DatapathError},
    observe::{
        EndpointName, Health, KindLabels, Live, LiveTables, MapLabels, Metrics, SourceLabels,
        StateLabels, flows::AddressOwner,
    },
    state::{ObjectKey, Snapshot},
};

/// The maps whose size is configured, with their capacity.
pub fn capacity_rows(capacities: Capacities) -> [(&'static str, u32); 6] {
    use egret_common::maps::names;
    [
        (names::ENDPOINT, capacities.endpoints),
        (names::IDENTITY, capacities.identities),
        (names::CIDR, capacities.cidrs),
        (names::POLICY, capacities.policy),
        (names::CT_ESTABLISHED, capacities.ct_established),
        (names::CT_UNASSURED, capacities.ct_unassured),
    ]
}

/// One reconcile whose change the kernel now holds.
pub struct Applied<'a> {
    pub snapshot: &'a Snapshot,
    /// Copied to the admin API whole.
    pub compiled: &'a Compiled,
    pub change: &'a Change,
    pub stats: ApplyStats,
    /// When each change this reconcile carried reached its source.
    pub received: Vec<Instant>,
    /// Whether the snapshot changed since the last reconcile (a resync or a node-side
    /// change leaves it as it was: what is derived from it alone stays).
    pub snapshot_changed: bool,
    pub started: Instant,
}

pub struct Recorder {
    node: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    live: Arc<Live>,
    capacities: Capacities,
    /// Pods failing closed for want of table room, as last reported.
    failed_closed: Vec<String>,
}

impl Recorder {
    #[must_use]
    pub fn new(
        node: String,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        live: Arc<Live>,
        capacities: Capacities,
    ) -> Self {
        Self {
            node,
            metrics,
            health,
            live,
            capacities,
            failed_closed: Vec::new(),
        }
    }

    pub fn reconcile_started(&self) {
        self.health.reconcile_started();
        self.metrics.reconcile_runs.inc();
    }

    /// The loop is alive, whether or not it reconciled.
    pub fn tick(&self) {
        self.health.tick();
    }

    pub fn watch_restarted(&self, kind: &str) {
        self.metrics
            .watch_restarts
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A source could not be read; the snapshot (and so the kernel) keeps its last
    /// good view.
    pub fn source_failed(&self, source: &str, problem: &str) {
        let labels = SourceLabels {
            source: source.to_owned(),
        };
        self.metrics.source_failures.get_or_create(&labels).inc();
        self.metrics.source_stale.get_or_create(&labels).set(1);
        if self.health.source_failed(source, problem) {
            warn!(source, %problem, "source cannot be read; enforcing its last good snapshot");
        } else {
            debug!(source, %problem, "source still cannot be read");
        }
    }

    pub fn source_recovered(&self, source: &str) {
        let labels = SourceLabels {
            source: source.to_owned(),
        };
        self.metrics.source_stale.get_or_create(&labels).set(0);
        if let Some(stale) = self.health.source_recovered(source) {
            info!(
                source,
                since = stale.since,
                failures = stale.failures,
                "source readable again"
            );
        }
    }

    /// Logs (when it changes) and counts the pods failing closed for want of room.
    pub fn fail_closed(&mut self, pods: &[ObjectKey]) {
        let pods: Vec<String> = pods.iter().map(ToString::to_string).collect();
        let labels = StateLabels {
            state: "fail_closed".to_owned(),
        };
        self.metrics
            .endpoints
            .get_or_create(&labels)
            .set(gauge(pods.len()));
        if pods != self.failed_closed {
            if !pods.is_empty() {
                tracing::error!(
                    pods = %pods.join(", "),
                    "the policy or CIDR table is full: these pods fail closed (they may send nothing) \
                     until policies shrink or --max-policy-entries / --max-cidrs grow"
                );
                self.metrics.table_overflows.inc();
            }
            self.failed_closed = pods;
        }
    }

    pub fn apply_failed(&self, error: &DatapathError) {
        self.metrics.reconcile_failures.inc();
        warn!(%error, "applying tables failed; will retry");
    }

    /// Everything a reconcile whose change is in the kernel reports.
    pub fn applied(&mut self, applied: &Applied<'_>) {
        let now = Instant::now();
        for received in &applied.received {
            self.metrics
                .programming_latency
                .observe(now.duration_since(*received).as_secs_f64());
        }
        self.metrics
            .reconcile_duration
            .observe(applied.started.elapsed().as_secs_f64());
        self.gauges(applied);
        self.name_endpoints(applied.compiled);
        let (image, stats) = (&applied.change.image, applied.stats);
        if stats.written + stats.removed > 0 {
            info!(
                endpoints = image.endpoints.len() + image.cgroup_endpoints.len(),
                identities = image.identities.len(),
                cidrs = image.cidrs.len(),
                policy_entries = image.policy.len(),
                written = stats.written,
                removed = stats.removed,
                elapsed_ms = applied.started.elapsed().as_millis(),
                "reconciled"
            );
        }
        self.share(applied);
    }

    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.health.is_ready()
    }

    pub fn ready(&self) {
        info!("first full sync programmed: ready");
        self.health.set_ready();
    }

    fn gauges(&self, applied: &Applied<'_>) {
        let snapshot = applied.snapshot;
        for (kind, count) in [
            ("NetworkPolicy", snapshot.policies.len()),
            ("ClusterNetworkPolicy", snapshot.cluster_policies.len()),
        ] {
            let labels = KindLabels {
                kind: kind.to_owned(),
            };
            self.metrics
                .policies
                .get_or_create(&labels)
                .set(gauge(count));
        }
        let enforced = applied.change.enforced();
        let waiting = applied.compiled.tables.endpoints.len() - enforced;
        for (state, count) in [("enforced", enforced), ("not_attached", waiting)] {
            let labels = StateLabels {
                state: state.to_owned(),
            };
            self.metrics
                .endpoints
                .get_or_create(&labels)
                .set(gauge(count));
        }
        for (map, count) in applied.change.image.entry_counts() {
            let labels = MapLabels {
                map: map.to_owned(),
            };
            self.metrics
                .map_entries
                .get_or_create(&labels)
                .set(gauge(count));
        }
    }

    /// The pod and policy set behind each endpoint number, for counters and flows.
    fn name_endpoints(&self, compiled: &Compiled) {
        let names: BTreeMap<u32, EndpointName> = compiled
            .tables
            .endpoints
            .iter()
            .map(|(pod, entry)| {
                let policy_set = entry
                    .isolated_by
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                (
                    entry.id,
                    EndpointName {
                        pod: pod.clone(),
                        policy_set,
                    },
                )
            })
            .collect();
        *self
            .metrics
            .endpoint_names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
    }

    /// Hands the tables just programmed to the admin API and the flow log.
    fn share(&self, applied: &Applied<'_>) {
        let Applied {
            snapshot,
            compiled,
            change,
            started,
            ..
        } = applied;
        // Rebuilt in place, and only when the snapshot changed: it names every pod of
        // the cluster, and a resync of an idle agent should cost nothing.
        if applied.snapshot_changed {
            refill_address_owners(
                &mut self
                    .live
                    .addresses
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                snapshot,
            );
        }
        self.live
            .tier_rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone_from(&compiled.tables.tier_rules);
        let pod_ips = compiled
            .tables
            .endpoints
            .keys()
            .filter_map(|key| {
                snapshot
                    .pods
                    .get(key)
                    .map(|pod| (key.clone(), pod.ips.clone()))
            })
            .collect();
        let maps = change
            .image
            .entry_counts()
            .into_iter()
            .zip(capacity_rows(self.capacities))
            .map(|((map, entries), (_, capacity))| (map, entries, capacity))
            .collect();
        let tables = LiveTables {
            node: self.node.clone(),
            tables: compiled.tables.clone(),
            attachments: change.attachments.clone(),
            pod_ips,
            policies: snapshot.policies.len(),
            maps,
            reconciled_at: std::time::SystemTime::now(),
            reconcile_duration: started.elapsed(),
        };
        *self
            .live
            .tables
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(tables));
    }
}

/// Who each pod and service address belongs to, as flow records name it.
fn refill_address_owners(
    addresses: &mut BTreeMap<std::net::IpAddr, AddressOwner>,
    snapshot: &Snapshot,
) {
    addresses.clear();
    for pod in snapshot.pods.values().filter(|p| p.takes_part()) {
        for ip in &pod.ips {
            let owner = AddressOwner {
                kind: "pod",
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            };
            addresses.entry(*ip).or_insert(owner);
        }
    }
    for service in snapshot.services.values() {
        for ip in &service.virtual_ips {
            let owner = AddressOwner {
                kind: "service",
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            };
            addresses.entry(*ip).or_insert(owner);
        }
    }
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
