//! The flow log: kernel flow events aggregated over a short window into one JSON line
//! per flow, enriched with the pods and Services at both ends and the policies that
//! isolate the source. The last records are kept in memory ([`FlowHistory`]) for
//! `egret flows`.

mod history;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use egret_common::{
    Reason, Verdict,
    maps::{FlowEvent, tier_rule_parts},
    proto,
};
use prometheus_client::{
    encoding::EncodeLabelSet, metrics::counter::Counter, metrics::family::Family,
};
use serde::{Deserialize, Serialize};

pub use self::history::{DEFAULT_FLOW_HISTORY, FlowHistory, FlowQuery, Timestamp};

use super::{
    EndpointNames,
    dns::{DomainLookup, DomainNote},
    kernel::verdict_name,
};
use crate::{policy::cluster::TierRuleRef, state::ObjectKey};

/// Every `ClusterNetworkPolicy` rule by rank, refreshed by the reconcile loop, so a flow
/// event's rank names its rule.
pub type TierRules = Arc<RwLock<Vec<TierRuleRef>>>;

/// The tier that decided a verdict of `reason`: `admin`, `networkpolicy`, `baseline`,
/// or `none` (not a policy decision: spoofing, fragments, link layer, ...).
#[must_use]
pub fn tier_of(reason: Reason) -> &'static str {
    match reason {
        Reason::AdminAccept | Reason::AdminDeny => "admin",
        Reason::PolicyAllows | Reason::NoRuleAllows => "networkpolicy",
        Reason::BaselineAccept | Reason::BaselineDeny => "baseline",
        _ => "none",
    }
}

/// What an address is, for enriching flows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddressOwner {
    /// `pod` or `service`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// Addresses of known pods and Services, refreshed by the reconcile loop.
pub type AddressBook = Arc<RwLock<BTreeMap<IpAddr, AddressOwner>>>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// One line of the flow log, as the agent writes it and `egret flows` reads it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowRecord {
    /// When the window closed (RFC 3339, milliseconds, UTC).
    pub time: Timestamp,
    /// `allow`, `deny` or `audit_deny`.
    pub verdict: String,
    /// Counted, not dropped (audit mode or a staged policy).
    pub audit: bool,
    pub reason: String,
    /// The tier that decided: `admin`, `networkpolicy`, `baseline` or `none`.
    pub tier: String,
    /// The `ClusterNetworkPolicy` rule that decided (`name egress[i] (rule name)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub protocol: String,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// The policies isolating the source pod.
    pub policies: Vec<String>,
    /// Packets of this flow in the window.
    pub count: u64,
    /// For a pod with `domainNames` rules: the name whose DNS answer gave it the
    /// destination, and whether that still admits new connections, as the kernel holds
    /// it when the record is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainNote>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedFlowLabels {
    pub namespace: String,
    pub pod: String,
    pub policy_set: String,
    /// See [`tier_of`].
    pub tier: String,
}

/// Where the log goes.
#[derive(Clone, Debug)]
pub enum Sink {
    Stdout,
    /// A file, rotated to `PATH.1` .. `PATH.3` past `max_bytes`.
    File {
        path: PathBuf,
        max_bytes: u64,
    },
}

/// Endpoint, source, destination, port, protocol, verdict, reason, deciding tier rule.
type FlowKey = (u32, [u8; 16], [u8; 16], u16, u8, u8, u8, u32);

/// Aggregates events and writes records; cheap to clone handles live in [`super::Live`].
pub struct FlowLog {
    pub names: EndpointNames,
    pub addresses: AddressBook,
    pub tier_rules: TierRules,
    pub denied_flows: Family<DeniedFlowLabels, Counter>,
    /// The last records, and every new one, for the admin API.
    pub history: FlowHistory,
    /// Where notes on learnt DNS answers come from; `None`: no notes.
    pub domains: Option<DomainLookup>,
    pending: BTreeMap<FlowKey, u64>,
    /// Label sets of `denied_flows` created so far.
    series: std::collections::HashSet<DeniedFlowLabels>,
    sink: Sink,
}

impl FlowLog {
    #[must_use]
    pub fn new(
        sink: Sink,
        names: EndpointNames,
        addresses: AddressBook,
        tier_rules: TierRules,
        denied_flows: Family<DeniedFlowLabels, Counter>,
        history: usize,
    ) -> Self {
        Self {
            names,
            addresses,
            tier_rules,
            denied_flows,
            history: FlowHistory::new(history),
            domains: None,
            pending: BTreeMap::new(),
            series: std::collections::HashSet::new(),
            sink,
        }
    }

    pub fn record(&mut self, event: &FlowEvent) {
        let key = (
            event.endpoint,
            event.src,
            event.dst,
            event.dst_port,
            event.protocol,
            event.verdict,
            event.reason,
            event.rule,
        );
        *self.pending.entry(key).or_default() += 1;
    }

    /// Writes one record per flow seen since the last flush.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let time = Timestamp(SystemTime::now());
        let records: Vec<FlowRecord> = {
            let names = self
                .names
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let addresses = self
                .addresses
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let tier_rules = self
                .tier_rules
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let domains = self.domains.as_ref().and_then(DomainLookup::now);
            std::mem::take(&mut self.pending)
                .into_iter()
                .map(
                    |((endpoint, src, dst, dst_port, protocol, verdict, reason, rule), count)| {
                        let name = names.get(&endpoint);
                        let verdict = Verdict::from_u8(verdict).unwrap_or(Verdict::Deny);
                        let source_ip = address(src);
                        let destination_ip = address(dst);
                        let owner = addresses.get(&destination_ip);
                        let reason = Reason::from_u8(reason);
                        let rule = tier_rule_parts(rule)
                            .and_then(|(rank, _)| tier_rules.get(rank as usize))
                            .map(ToString::to_string);
                        FlowRecord {
                            time,
                            verdict: verdict_name(verdict).to_owned(),
                            audit: verdict == Verdict::AuditDeny,
                            reason: reason.map_or("unknown", Reason::name).to_owned(),
                            tier: reason.map_or("none", tier_of).to_owned(),
                            rule,
                            protocol: protocol_name(protocol),
                            source: Endpoint {
                                namespace: name.map(|n| n.pod.namespace.clone()),
                                pod: name.map(|n| n.pod.name.clone()),
                                service: None,
                                ip: source_ip,
                                port: None,
                            },
                            destination: Endpoint {
                                namespace: owner.map(|o| o.namespace.clone()),
                                pod: owner.filter(|o| o.kind == "pod").map(|o| o.name.clone()),
                                service: owner
                                    .filter(|o| o.kind == "service")
                                    .map(|o| o.name.clone()),
                                ip: destination_ip,
                                port: has_ports(protocol).then_some(dst_port),
                            },
                            policies: name
                                .map(|n| {
                                    n.policy_set
                                        .split(',')
                                        .filter(|p| !p.is_empty())
                                        .map(str::to_owned)
                                        .collect()
                                })
                                .unwrap_or_default(),
                            count,
                            domain: domains
                                .as_ref()
                                .and_then(|domains| domains.note(endpoint, destination_ip)),
                        }
                    },
                )
                .collect()
        };
        let mut text = String::new();
        for record in &records {
            if record.verdict != "allow"
                && let (Some(namespace), Some(pod)) = (&record.source.namespace, &record.source.pod)
            {
                let labels = DeniedFlowLabels {
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    policy_set: record.policies.join(","),
                    tier: record.tier.clone(),
                };
                self.denied_flows.get_or_create(&labels).inc();
                self.series.insert(labels);
            }
            if let Ok(line) = serde_json::to_string(record) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        self.history.extend(records);
        if let Err(error) = self.write(text.as_bytes()) {
            tracing::warn!(%error, "cannot write the flow log");
        }
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        match &self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(bytes),
            Sink::File { path, max_bytes } => {
                if std::fs::metadata(path).is_ok_and(|m| m.len() + bytes.len() as u64 > *max_bytes)
                {
                    rotate(path);
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?
                    .write_all(bytes)
            }
        }
    }

    /// Removes the denied-flow series of pods that are gone, so label sets stay bounded.
    pub fn prune(&mut self) {
        let names = self
            .names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live: std::collections::BTreeSet<&ObjectKey> = names.values().map(|n| &n.pod).collect();
        let family = &self.denied_flows;
        self.series.retain(|labels| {
            let alive = live.contains(&ObjectKey::new(&labels.namespace, &labels.pod));
            if !alive {
                family.remove(labels);
            }
            alive
        });
    }
}

const KEPT_ROTATIONS: u32 = 3;

fn rotate(path: &std::path::Path) {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    for n in (1..KEPT_ROTATIONS).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    let _ = std::fs::rename(path, numbered(1));
}

fn address(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    v6.to_ipv4_mapped()
        .map_or(IpAddr::V6(v6), |v4: Ipv4Addr| IpAddr::V4(v4))
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, proto::TCP | proto::UDP | proto::SCTP)
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// How often aggregated flows are written.
pub const WINDOW: Duration = Duration::from_secs(1);
