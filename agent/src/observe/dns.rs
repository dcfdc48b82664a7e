//! `domainNames` rules in what the agent reports: the kernel's DNS counters as metrics,
//! the names and addresses each pod learnt (`egret status`), and which name allowed,
//! or failed to allow, an address (`egret explain`, the flow log). Everything here is
//! read from the pinned maps, so it shows what the kernel holds, whichever agent
//! wrote it.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use egret_common::maps::ENDPOINT_FLAG_DOMAINS;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::{Deserialize, Serialize};

use super::Live;
use crate::{
    compile::{EndpointEntry, Tables},
    datapath::{
        self,
        dns::{LearntAddress, LearntReader},
    },
    state::ObjectKey,
};

/// An address the kernel learnt for a pod, as `egret status` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LearntName {
    /// The `domainNames` entry the answer matched (`api.example.com`, `*.example.com`).
    pub name: String,
    pub address: IpAddr,
    /// The answer's TTL, seconds.
    pub ttl: u32,
    /// Seconds it still admits new connections (TTL, minimum TTL and grace counted);
    /// negative once expired.
    pub expires_in_s: f64,
}

/// What the kernel knows of a destination of a pod with domain rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// A DNS answer gave the pod this address and it admits new connections.
    Learnt,
    /// It did, but its TTL and grace have passed: new connections are judged without it
    /// (connections opened before continue).
    Expired,
    /// No answer for any of the pod's names gave it this address.
    NotResolved,
}

impl DomainState {
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DomainState::Learnt => "learnt",
            DomainState::Expired => "expired",
            DomainState::NotResolved => "not_resolved",
        }
    }
}

/// Which name allowed (or failed to allow) an address: the flow log's and `explain`'s
/// `domain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainNote {
    /// The `domainNames` entry the answer matched; none when nothing was learnt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: DomainState,
}

/// The pattern's name in the endpoint's table, or what is left of it.
fn pattern_name(tables: &Tables, table: u32, pattern: u64) -> String {
    tables.domains.get(&(table, pattern)).map_or_else(
        // Learnt under a name the pod's rules no longer have: it allows nothing.
        || format!("(a removed name, key {pattern:016x})"),
        |entry| entry.name.to_string(),
    )
}

/// The names and addresses the kernel learnt for each pod of `tables`.
///
/// # Errors
/// When the learnt table cannot be read.
pub fn learnt_names(
    reader: &LearntReader,
    tables: &Tables,
    now_ns: u64,
) -> Result<BTreeMap<ObjectKey, Vec<LearntName>>, datapath::DatapathError> {
    let by_number: BTreeMap<u32, (&ObjectKey, &EndpointEntry)> = tables
        .endpoints
        .iter()
        .map(|(pod, entry)| (entry.id, (pod, entry)))
        .collect();
    let mut out: BTreeMap<ObjectKey, Vec<LearntName>> = BTreeMap::new();
    for learnt in reader.all()? {
        let Some((pod, entry)) = by_number.get(&learnt.endpoint) else {
            continue;
        };
        out.entry((*pod).clone()).or_default().push(LearntName {
            name: pattern_name(tables, entry.table, learnt.pattern),
            address: learnt.address,
            ttl: learnt.ttl,
            expires_in_s: learnt.seconds_left(now_ns),
        });
    }
    Ok(out)
}

/// What the kernel knows of `address` for `endpoint` (`None` for a pod without domain
/// rules, whose DNS answers are never read), and the learnt entry while it admits new
/// connections.
///
/// # Errors
/// When the learnt table cannot be read.
pub fn note(
    reader: &LearntReader,
    tables: &Tables,
    endpoint: &EndpointEntry,
    address: IpAddr,
    now_ns: u64,
) -> Result<Option<(DomainNote, Option<LearntAddress>)>, datapath::DatapathError> {
    if endpoint.flags & ENDPOINT_FLAG_DOMAINS == 0 {
        return Ok(None);
    }
    let Some(learnt) = reader.get(endpoint.id, address)? else {
        return Ok(Some((
            DomainNote {
                name: None,
                state: DomainState::NotResolved,
            },
            None,
        )));
    };
    let name = Some(pattern_name(tables, endpoint.table, learnt.pattern));
    // The kernel's test: past `expires_ns`, a new connection does not count it.
    Ok(Some(if now_ns > learnt.expires_ns {
        (
            DomainNote {
                name,
                state: DomainState::Expired,
            },
            None,
        )
    } else {
        (
            DomainNote {
                name,
                state: DomainState::Learnt,
            },
            Some(learnt),
        )
    }))
}

/// Domain notes for the flow log: the tables the agent last programmed, and the
/// kernel's learnt addresses.
#[derive(Clone)]
pub struct DomainLookup {
    live: Arc<Live>,
}

impl DomainLookup {
    #[must_use]
    pub fn new(live: Arc<Live>) -> Self {
        Self { live }
    }

    /// The tables and the learnt addresses as they are now, for the notes of one flush
    /// of the flow log; `None` before the first reconcile or without the pinned map.
    #[must_use]
    pub fn now(&self) -> Option<DomainView> {
        let live = self
            .live
            .tables
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        Some(DomainView {
            by_number: live
                .tables
                .endpoints
                .values()
                .filter(|entry| entry.flags & ENDPOINT_FLAG_DOMAINS != 0)
                .map(|entry| (entry.id, entry.clone()))
                .collect(),
            reader: LearntReader::open(&self.live.pin_dir).ok()?,
            now_ns: datapath::monotonic_coarse_ns(),
            live,
        })
    }
}

/// See [`DomainLookup::now`].
pub struct DomainView {
    live: Arc<super::LiveTables>,
    /// The endpoints with domain rules, by number.
    by_number: BTreeMap<u32, EndpointEntry>,
    reader: LearntReader,
    now_ns: u64,
}

impl DomainView {
    /// The note for a flow from endpoint number `endpoint` to `address`; `None` when
    /// the pod has no domain rules or the table cannot be read.
    #[must_use]
    pub fn note(&self, endpoint: u32, address: IpAddr) -> Option<DomainNote> {
        let entry = self.by_number.get(&endpoint)?;
        note(&self.reader, &self.live.tables, entry, address, self.now_ns)
            .ok()
            .flatten()
            .map(|(note, _)| note)
    }
}

/// The kernel's DNS counters (`DNS_STATS_V1`) and the learnt table's size, read at
/// each scrape.
#[derive(Debug)]
pub(super) struct DnsCounters {
    pin_dir: PathBuf,
}

impl DnsCounters {
    pub(super) fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_owned(),
        }
    }
}

impl Collector for DnsCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stats) = datapath::dns::read_stats(&self.pin_dir) else {
            return Ok(());
        };
        let counters = [
            (
                "dns_responses",
                "DNS responses to pods with domainNames rules that the kernel read",
                stats.responses,
            ),
            (
                "dns_invalid_responses",
                "DNS responses that were not well-formed answers (nothing learnt)",
                stats.invalid,
            ),
            (
                "dns_addresses_learnt",
                "Addresses learnt from DNS answers for a pod's domainNames (new, or newly for another name)",
                stats.learnt,
            ),
            (
                "dns_addresses_refreshed",
                "Learnt addresses answered again (their expiry moved on)",
                stats.refreshed,
            ),
            (
                "dns_addresses_expired",
                "Learnt addresses a new connection found past their TTL and grace",
                stats.expired,
            ),
            (
                "dns_addresses_evicted",
                "Learnt addresses pushed out by newer answers for the same name (its ring of 128 was full)",
                stats.evicted,
            ),
            (
                "dns_addresses_dropped",
                "Answer addresses not learnt: over 16 in one response, or the learnt table was full",
                stats.dropped,
            ),
        ];
        for (name, help, count) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(count).encode(metric)?;
        }
        if let Ok(learnt) = datapath::dns::read_learnt(&self.pin_dir) {
            let metric = encoder.encode_descriptor(
                "dns_learnt_addresses",
                "Addresses the learnt table holds, expired ones included",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(learnt.len()).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{DomainNote, DomainState};

    #[test]
    fn notes_read_back_as_written() {
        let note = DomainNote {
            name: Some("*.svc.example.test".to_owned()),
            state: DomainState::Expired,
        };
        let text = serde_json::to_string(&note).unwrap();
        assert_eq!(text, r#"{"name":"*.svc.example.test","state":"expired"}"#);
        assert_eq!(serde_json::from_str::<DomainNote>(&text).unwrap(), note);
        let unresolved = r#"{"state":"not_resolved"}"#;
        assert_eq!(
            serde_json::from_str::<DomainNote>(unresolved).unwrap(),
            DomainNote {
                name: None,
                state: DomainState::NotResolved
            }
        );
    }
}
