//! The kernel's per-endpoint counters as Prometheus series, read from the pinned map at
//! each scrape (so a gone pod's series disappear with its counters).

use std::path::PathBuf;

use egret_common::Verdict;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::EndpointNames;
use crate::datapath;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    namespace: String,
    pod: String,
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Debug)]
pub(super) struct KernelCounters {
    pin_dir: PathBuf,
    names: EndpointNames,
}

impl KernelCounters {
    pub(super) fn new(pin_dir: PathBuf, names: EndpointNames) -> Self {
        Self { pin_dir, names }
    }
}

pub(crate) fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::AuditDeny => "audit_deny",
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(counters) = datapath::read_counters(&self.pin_dir) else {
            return Ok(());
        };
        let names = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rows = Vec::new();
        for (key, value) in &counters {
            let (namespace, pod) = match names.get(&key.endpoint) {
                Some(name) => (name.pod.namespace.clone(), name.pod.name.clone()),
                // Endpoints numbered beyond the counter array share one row.
                None if key.endpoint == datapath::CounterKey::OVERFLOW => {
                    (String::new(), "(overflow)".to_owned())
                }
                None => continue,
            };
            let labels = PacketLabels {
                namespace,
                pod,
                verdict: verdict_name(key.verdict),
                reason: key.reason.name(),
            };
            rows.push((labels, value.packets, value.bytes));
        }
        let mut packets = encoder.encode_descriptor(
            "egress_packets",
            "Packets pods sent, by verdict and reason",
            None,
            MetricType::Counter,
        )?;
        for (labels, count, _) in &rows {
            ConstCounter::new(*count).encode(packets.encode_family(labels)?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "egress_bytes",
            "Bytes pods sent, by verdict and reason",
            None,
            MetricType::Counter,
        )?;
        for (labels, _, count) in &rows {
            ConstCounter::new(*count).encode(bytes.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    kind: &'static str,
}

/// The connection tracker's two tables: entries (a walk of their keys at each scrape),
/// inserts, failed inserts and what the LRU evicted.
#[derive(Debug)]
pub(super) struct ConntrackTables {
    pin_dir: PathBuf,
}

impl ConntrackTables {
    pub(super) fn new(pin_dir: PathBuf) -> Self {
        Self { pin_dir }
    }
}

impl Collector for ConntrackTables {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stats) = datapath::read_conntrack_stats(&self.pin_dir) else {
            return Ok(());
        };
        let established = TableLabels {
            kind: "established",
        };
        let unassured = TableLabels { kind: "unassured" };
        let mut entries = encoder.encode_descriptor(
            "conntrack_entries",
            "Flows in the connection tracker, by table (established: handshake done; \
             unassured: handshakes, unanswered and closing flows)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, count) in [
            (&established, stats.established_entries),
            (&unassured, stats.unassured_entries),
        ] {
            ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                .encode(entries.encode_family(labels)?)?;
        }
        let mut inserts = encoder.encode_descriptor(
            "conntrack_inserts",
            "Flows entered into each connection tracker table",
            None,
            MetricType::Counter,
        )?;
        for (labels, count) in [
            (&established, stats.inserted_established),
            (&unassured, stats.inserted_unassured),
        ] {
            ConstCounter::new(count).encode(inserts.encode_family(labels)?)?;
        }
        let mut evictions = encoder.encode_descriptor(
            "conntrack_evictions",
            "Flows a full connection tracker table pushed out to make room (inserted, \
             neither removed nor present)",
            None,
            MetricType::Counter,
        )?;
        for (labels, count) in [
            (&established, stats.evicted_established()),
            (&unassured, stats.evicted_unassured()),
        ] {
            ConstCounter::new(count).encode(evictions.encode_family(labels)?)?;
        }
        let failures = encoder.encode_descriptor(
            "conntrack_insert_failures",
            "Flows the kernel could not enter into a connection tracker table",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.insert_failures).encode(failures)?;
        Ok(())
    }
}
