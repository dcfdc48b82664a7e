//! `policy.networking.k8s.io/v1alpha2` `ClusterNetworkPolicy` -> [`ClusterNetworkPolicy`].
//!
//! What the CRD's validation would reject is an error naming the field. A policy whose
//! tier, priority or subject is invalid is skipped (there is no telling which pods it
//! would govern, or in which order). Anything narrower fails closed, as upstream asks
//! of implementations that meet a field they cannot honour: an Accept rule matches
//! nothing through it, a Deny or Pass rule matches everything it would otherwise scope.

use egret_common::maps::TierAction;
use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use super::{ClusterNetworkPolicy, Subject, Tier, TierPeer, TierRule, domain::DomainName};
use crate::policy::{
    Mode, PortMatch, PortSpec, Protocol,
    convert::{MODE_ANNOTATION, is_port_name, selector},
};

pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
pub const KIND: &str = "ClusterNetworkPolicy";

/// The object as the API serves it; only the egress side is read.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterNetworkPolicyObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<Spec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub tier: Option<String>,
    pub priority: Option<i64>,
    pub subject: Option<Map<String, Value>>,
    #[serde(default)]
    pub egress: Vec<Map<String, Value>>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct CnpField {
    /// Path of the offending field, e.g. `spec.egress[0].to[1].networks[0]`.
    pub field: String,
    pub problem: String,
}

/// A policy as Egret enforces it, with what it enforces differently from what is
/// written (each naming the field).
#[derive(Debug)]
pub struct Converted {
    pub policy: ClusterNetworkPolicy,
    pub failed_closed: Vec<CnpField>,
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> CnpField {
    CnpField {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Converts one policy for enforcement.
///
/// # Errors
/// When the policy must be skipped: no name, or an invalid tier, priority or subject.
pub fn cluster_network_policy(object: &ClusterNetworkPolicyObject) -> Result<Converted, CnpField> {
    let name = object
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| problem("metadata.name", "missing"))?;
    let spec = object
        .spec
        .as_ref()
        .ok_or_else(|| problem("spec", "missing"))?;
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(problem(
                "spec.tier",
                format!("{other:?} is not a tier (expected Admin or Baseline)"),
            ));
        }
        None => return Err(problem("spec.tier", "missing")),
    };
    let priority = match spec.priority {
        Some(p) => u32::try_from(p)
            .ok()
            .filter(|p| *p <= 1000)
            .ok_or_else(|| problem("spec.priority", format!("{p} is outside 0-1000")))?,
        None => return Err(problem("spec.priority", "missing")),
    };
    let subject = subject(spec.subject.as_ref())?;
    let mut failed_closed = Vec::new();
    let mode = match object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MODE_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("enforce") => Mode::Enforce,
        Some("audit") => Mode::Audit,
        Some(other) => {
            failed_closed.push(problem(
                format!("metadata.annotations[{MODE_ANNOTATION}]"),
                format!(
                    "{other:?} is not a mode (expected enforce or audit); the policy is enforced"
                ),
            ));
            Mode::Enforce
        }
    };
    if spec.egress.len() > 25 {
        failed_closed.push(problem(
            "spec.egress",
            format!(
                "{} rules (the API allows 25); all are enforced",
                spec.egress.len()
            ),
        ));
    }
    let egress = spec
        .egress
        .iter()
        .enumerate()
        .map(|(i, rule)| egress_rule(rule, &format!("spec.egress[{i}]"), &mut failed_closed))
        .collect();
    Ok(Converted {
        policy: ClusterNetworkPolicy {
            name,
            tier,
            priority,
            subject,
            egress,
            mode,
        },
        failed_closed,
    })
}

fn label_selector(value: &Value, field: &str) -> Result<crate::policy::Selector, CnpField> {
    let parsed: LabelSelector = serde_json::from_value(value.clone())
        .map_err(|e| problem(field, format!("not a label selector: {e}")))?;
    selector(Some(&parsed), field).map_err(|e| problem(e.field, e.problem.to_string()))
}

fn subject(subject: Option<&Map<String, Value>>) -> Result<Subject, CnpField> {
    let subject = subject.ok_or_else(|| problem("spec.subject", "missing"))?;
    if subject.len() != 1 {
        return Err(problem(
            "spec.subject",
            "needs exactly one of namespaces or pods",
        ));
    }
    let (key, value) = subject.iter().next().expect("one entry");
    match key.as_str() {
        "namespaces" => Ok(Subject::Namespaces(label_selector(
            value,
            "spec.subject.namespaces",
        )?)),
        "pods" => {
            let (namespaces, pods) = namespaced_pod(value, "spec.subject.pods")?;
            Ok(Subject::Pods { namespaces, pods })
        }
        other => Err(problem(
            format!("spec.subject.{other}"),
            "unknown subject (expected namespaces or pods)",
        )),
    }
}

fn namespaced_pod(
    value: &Value,
    field: &str,
) -> Result<(crate::policy::Selector, crate::policy::Selector), CnpField> {
    let object = value
        .as_object()
        .ok_or_else(|| problem(field, "not an object"))?;
    let everything = Value::Object(Map::new());
    let namespaces = label_selector(
        object.get("namespaceSelector").unwrap_or(&everything),
        &format!("{field}.namespaceSelector"),
    )?;
    let pods = label_selector(
        object
            .get("podSelector")
            .ok_or_else(|| problem(format!("{field}.podSelector"), "missing"))?,
        &format!("{field}.podSelector"),
    )?;
    Ok((namespaces, pods))
}

fn egress_rule(rule: &Map<String, Value>, field: &str, failed: &mut Vec<CnpField>) -> TierRule {
    let name = rule.get("name").and_then(Value::as_str).map(str::to_owned);
    let action = match rule.get("action").and_then(Value::as_str) {
        Some("Accept") => TierAction::Accept,
        Some("Deny") => TierAction::Deny,
        Some("Pass") => TierAction::Pass,
        other => {
            failed.push(problem(
                format!("{field}.action"),
                format!(
                    "{} (expected Accept, Deny or Pass); the rule denies what it matches",
                    other.map_or_else(
                        || "missing".to_owned(),
                        |a| format!("{a:?} is not an action")
                    )
                ),
            ));
            TierAction::Deny
        }
    };
    // Failing closed widens a Deny or Pass rule and narrows an Accept rule.
    let widen = action != TierAction::Accept;
    let mut to = Vec::new();
    match rule.get("to").and_then(Value::as_array) {
        Some(peers) if !peers.is_empty() => {
            for (i, peer_value) in peers.iter().enumerate() {
                let peer_field = format!("{field}.to[{i}]");
                match peer(peer_value, &peer_field) {
                    Ok(TierPeer::DomainNames(_)) if widen => {
                        // NPEP-133: domain names only ever allow.
                        failed.push(fail_closed(
                            problem(
                                format!("{peer_field}.domainNames"),
                                "domainNames is only allowed in Accept rules",
                            ),
                            widen,
                        ));
                        to.push(TierPeer::Everything);
                    }
                    Ok(peer) => to.push(peer),
                    Err(error) => {
                        failed.push(fail_closed(error, widen));
                        if widen {
                            to.push(TierPeer::Everything);
                        }
                    }
                }
            }
        }
        _ => failed.push(fail_closed(
            problem(format!("{field}.to"), "missing or empty"),
            widen,
        )),
    }
    if widen && to.is_empty() {
        to.push(TierPeer::Everything);
    }
    // Upstream: a Pass rule that fails closed is a Deny rule, not a wider Pass.
    let action = if action == TierAction::Pass && to.contains(&TierPeer::Everything) {
        TierAction::Deny
    } else {
        action
    };
    let mut protocols = Vec::new();
    if let Some(entries) = rule.get("protocols") {
        let entries = entries.as_array().cloned().unwrap_or_default();
        let mut broken = entries.is_empty();
        if broken {
            failed.push(fail_closed(
                problem(
                    format!("{field}.protocols"),
                    "empty (leave it out to match every protocol)",
                ),
                widen,
            ));
        }
        for (i, entry) in entries.iter().enumerate() {
            match protocol(entry, &format!("{field}.protocols[{i}]")) {
                Ok(matches) => protocols.extend(matches),
                Err(error) => {
                    broken = true;
                    failed.push(fail_closed(error, widen));
                }
            }
        }
        if broken {
            if widen {
                // Every protocol and port: the widest scope the rule could have meant.
                protocols.clear();
            } else if protocols.is_empty() {
                // Nothing valid left: the Accept rule matches nothing.
                to.clear();
            }
        }
    }
    TierRule {
        name,
        action,
        to,
        protocols,
    }
}

fn fail_closed(mut error: CnpField, widen: bool) -> CnpField {
    error.problem.push_str(if widen {
        "; the rule matches every destination it would otherwise scope"
    } else {
        "; the Accept rule matches nothing through it"
    });
    error
}

fn peer(value: &Value, field: &str) -> Result<TierPeer, CnpField> {
    let object = value.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        problem(
            field,
            "needs exactly one of namespaces, pods, networks or domainNames",
        )
    })?;
    let (key, value) = object.iter().next().expect("one entry");
    let field = format!("{field}.{key}");
    match key.as_str() {
        "namespaces" => Ok(TierPeer::Namespaces(label_selector(value, &field)?)),
        "pods" => {
            let (namespaces, pods) = namespaced_pod(value, &field)?;
            Ok(TierPeer::Pods { namespaces, pods })
        }
        "networks" => {
            let items = value
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| problem(&field, "needs at least one CIDR"))?;
            let mut networks = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let text = item.as_str().unwrap_or_default();
                let net: IpNet = text.parse().map_err(|e| {
                    problem(
                        format!("{field}[{i}]"),
                        format!("{text:?} is not a CIDR: {e}"),
                    )
                })?;
                networks.push(net.trunc());
            }
            Ok(TierPeer::Networks(networks))
        }
        "domainNames" => {
            let items = value
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| problem(&field, "needs at least one domain name"))?;
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let text = item.as_str().unwrap_or_default();
                let name = DomainName::parse(text)
                    .map_err(|error| problem(format!("{field}[{i}]"), error))?;
                names.push(name);
            }
            names.sort();
            names.dedup();
            Ok(TierPeer::DomainNames(names))
        }
        "nodes" => Err(problem(
            field,
            "this experimental peer is not implemented by Egret",
        )),
        _ => Err(problem(
            field,
            "unknown peer (the CRD may be newer than Egret)",
        )),
    }
}

/// One `protocols` entry: `tcp|udp|sctp: {destinationPort: {number | range}}`, or
/// `destinationNamedPort` (the port's own protocol applies, so it is tried on each).
fn protocol(value: &Value, field: &str) -> Result<Vec<PortMatch>, CnpField> {
    let object = value.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
        problem(
            field,
            "needs exactly one of tcp, udp, sctp or destinationNamedPort",
        )
    })?;
    let (key, value) = object.iter().next().expect("one entry");
    let field = format!("{field}.{key}");
    let protocol = match key.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "destinationNamedPort" => {
            let name = value.as_str().unwrap_or_default();
            if !is_port_name(name) {
                return Err(problem(field, format!("{name:?} is not a valid port name")));
            }
            return Ok([Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                .into_iter()
                .map(|protocol| PortMatch {
                    protocol,
                    port: PortSpec::Named(name.to_owned()),
                })
                .collect());
        }
        _ => return Err(problem(field, "unknown protocol")),
    };
    let port = value
        .get("destinationPort")
        .and_then(Value::as_object)
        .ok_or_else(|| problem(format!("{field}.destinationPort"), "missing"))?;
    let port_field = format!("{field}.destinationPort");
    let number = |v: Option<&Value>, f: &str| -> Result<u16, CnpField> {
        v.and_then(Value::as_i64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| problem(f, "needs a port number in 1-65535"))
    };
    let spec = match (port.get("number"), port.get("range")) {
        (Some(n), None) => {
            let n = number(Some(n), &format!("{port_field}.number"))?;
            PortSpec::Range { first: n, last: n }
        }
        (None, Some(range)) => {
            let first = number(range.get("start"), &format!("{port_field}.range.start"))?;
            let last = number(range.get("end"), &format!("{port_field}.range.end"))?;
            if first >= last {
                return Err(problem(
                    format!("{port_field}.range"),
                    format!("start {first} must be below end {last}"),
                ));
            }
            PortSpec::Range { first, last }
        }
        _ => return Err(problem(port_field, "needs exactly one of number or range")),
    };
    Ok(vec![PortMatch {
        protocol,
        port: spec,
    }])
}
