//! The kernel's per-endpoint counters as Prometheus series, read from the pinned map at
//! each scrape (so a gone pod's series disappear with its counters).

use std::path::PathBuf;

use egret_common::{Reason, Verdict};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
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
            let (Some(name), Some(verdict), Some(reason)) = (
                names.get(&key.endpoint),
                Verdict::from_u8(key.verdict),
                Reason::from_u8(key.reason),
            ) else {
                continue;
            };
            let labels = PacketLabels {
                namespace: name.pod.namespace.clone(),
                pod: name.pod.name.clone(),
                verdict: verdict_name(verdict),
                reason: reason.name(),
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
