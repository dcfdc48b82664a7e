//! `egret simulate`: would this flow be allowed, and why? Answers come from the
//! compiled tables through the model of the kernel's lookup (`compile::lookup`), so a
//! simulation checks the compiler, not a second implementation of the rules.

use std::{collections::BTreeSet, net::IpAddr};

use egret_common::{Verdict, proto};
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{
    compile::{self, Compiled, Ids, Scope, lookup},
    policy::{PolicyRef, Protocol, cluster::TierRuleRef},
    state::{ObjectKey, Snapshot},
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    from: String,
    to: String,
    #[serde(default)]
    port: Option<u32>,
    protocol: String,
    /// The name the pod resolved to `to` (DNS context for `domainNames` rules).
    #[serde(default)]
    resolved: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("not a query: {0}")]
    Parse(String),
    #[error("from: {0:?} is not namespace/name")]
    BadSource(String),
    #[error("from: unknown pod {0}")]
    UnknownSource(ObjectKey),
    #[error("from: pod {0} has no IP address, so it sends nothing")]
    SourceWithoutIp(ObjectKey),
    #[error("to: {0:?} is neither namespace/name nor an IP address")]
    BadDestination(String),
    #[error("to: unknown pod {0}")]
    UnknownDestination(ObjectKey),
    #[error("to: pod {0} has no IP address")]
    DestinationWithoutIp(ObjectKey),
    #[error("protocol: {0:?} is not TCP, UDP, SCTP or ICMP")]
    BadProtocol(String),
    #[error("port: {protocol} needs a port in 1-65535")]
    MissingPort { protocol: String },
    #[error("port: ICMP has no ports")]
    IcmpPort,
}

/// The cluster compiled for simulation (every pod gets endpoint tables).
pub struct Simulator<'a> {
    snapshot: &'a Snapshot,
    compiled: Compiled,
}

/// One answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub verdict: Verdict,
    pub reason: &'static str,
    /// Allow: the policies whose rules allow the flow (empty when not isolated).
    /// Deny: the policies that isolate the pod.
    pub policies: BTreeSet<PolicyRef>,
    /// The `ClusterNetworkPolicy` rule that decided, if one did.
    pub rule: Option<TierRuleRef>,
    /// The `domainNames` entry the resolved name matched (`*.example.com`), if any.
    pub domain: Option<String>,
}

impl<'a> Simulator<'a> {
    #[must_use]
    pub fn new(snapshot: &'a Snapshot) -> Self {
        let compiled = compile::compile(snapshot, &Scope::Cluster, &Ids::default());
        Self { snapshot, compiled }
    }

    /// Answers one JSON query line; the result is the query's fields plus the answer,
    /// or plus `"error"`.
    #[must_use]
    pub fn answer_line(&self, line: &str) -> Value {
        let mut output = if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) {
            fields
        } else {
            let mut fields = Map::new();
            fields.insert("query".into(), Value::String(line.to_owned()));
            fields
        };
        match self.answer_json(line) {
            Ok(answer) => {
                let verdict = match answer.verdict {
                    Verdict::Allow => "allow",
                    Verdict::Deny | Verdict::AuditDeny => "deny",
                };
                output.insert("verdict".into(), verdict.into());
                if answer.verdict == Verdict::AuditDeny {
                    // Only audit-mode policies deny it: counted, not dropped.
                    output.insert("audit".into(), true.into());
                }
                output.insert("reason".into(), answer.reason.into());
                if let Some(rule) = &answer.rule {
                    output.insert("tier".into(), rule.tier.name().to_lowercase().into());
                    output.insert("rule".into(), rule.to_string().into());
                }
                if let Some(domain) = &answer.domain {
                    output.insert("domain".into(), domain.clone().into());
                }
                let policies = answer
                    .policies
                    .iter()
                    .map(|p| Value::String(p.to_string()))
                    .collect();
                output.insert("policies".into(), Value::Array(policies));
            }
            Err(error) => {
                output.insert("error".into(), error.to_string().into());
            }
        }
        Value::Object(output)
    }

    fn answer_json(&self, line: &str) -> Result<Answer, QueryError> {
        let query: Query =
            serde_json::from_str(line).map_err(|e| QueryError::Parse(e.to_string()))?;
        let (protocol, port) = match query.protocol.as_str() {
            "ICMP" => {
                if query.port.is_some() {
                    return Err(QueryError::IcmpPort);
                }
                (None, 0)
            }
            name => {
                let protocol = Protocol::from_name(name)
                    .ok_or_else(|| QueryError::BadProtocol(name.to_owned()))?;
                let port = query
                    .port
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| QueryError::MissingPort {
                        protocol: name.to_owned(),
                    })?;
                (Some(protocol), port)
            }
        };
        let source = ObjectKey::parse(&query.from)
            .ok_or_else(|| QueryError::BadSource(query.from.clone()))?;
        let destination = self.destination(&query.to)?;
        self.answer_resolved(
            &source,
            destination,
            protocol,
            port,
            query.resolved.as_deref(),
        )
    }

    fn destination(&self, to: &str) -> Result<IpAddr, QueryError> {
        if let Ok(ip) = to.parse::<IpAddr>() {
            return Ok(ip);
        }
        let key = ObjectKey::parse(to).ok_or_else(|| QueryError::BadDestination(to.to_owned()))?;
        let pod = self
            .snapshot
            .pods
            .get(&key)
            .ok_or_else(|| QueryError::UnknownDestination(key.clone()))?;
        pod.ips
            .first()
            .copied()
            .ok_or(QueryError::DestinationWithoutIp(key))
    }

    /// The answer for a flow from `source` to `destination` (`protocol` `None`: ICMP).
    ///
    /// # Errors
    /// When the source pod is unknown or has no address.
    pub fn answer(
        &self,
        source: &ObjectKey,
        destination: IpAddr,
        protocol: Option<Protocol>,
        port: u16,
    ) -> Result<Answer, QueryError> {
        self.answer_resolved(source, destination, protocol, port, None)
    }

    /// Like [`Simulator::answer`], for a pod that resolved `resolved` to `destination`:
    /// answered as the kernel would once it learnt that DNS answer.
    ///
    /// # Errors
    /// When the source pod is unknown or has no address.
    pub fn answer_resolved(
        &self,
        source: &ObjectKey,
        destination: IpAddr,
        protocol: Option<Protocol>,
        port: u16,
        resolved: Option<&str>,
    ) -> Result<Answer, QueryError> {
        let pod = self
            .snapshot
            .pods
            .get(source)
            .ok_or_else(|| QueryError::UnknownSource(source.clone()))?;
        let Some(endpoint) = self.compiled.tables.endpoints.get(source) else {
            if pod.ips.is_empty() {
                return Err(QueryError::SourceWithoutIp(source.clone()));
            }
            // hostNetwork and finished pods are never subjects of a policy.
            return Ok(Answer {
                verdict: Verdict::Allow,
                reason: "not_isolated",
                policies: BTreeSet::new(),
                rule: None,
                domain: None,
            });
        };
        let protocol_number = match (protocol, destination) {
            (Some(protocol), _) => protocol.number(),
            (None, IpAddr::V4(_)) => proto::ICMP,
            (None, IpAddr::V6(_)) => proto::ICMPV6,
        };
        let decision = lookup::decide_resolved(
            &self.compiled.tables,
            endpoint,
            destination,
            protocol_number,
            port,
            resolved.map(lookup::Resolved::Name),
        );
        let policies = match (decision.verdict, &decision.decided_by) {
            // A ClusterNetworkPolicy rule decided: it is named in `rule`.
            (_, Some(_)) => BTreeSet::new(),
            (Verdict::Allow, None) => decision.allowing_policies(),
            (Verdict::Deny | Verdict::AuditDeny, None) => endpoint.isolated_by.clone(),
        };
        Ok(Answer {
            verdict: decision.verdict,
            reason: decision.reason.name(),
            policies,
            rule: decision.decided_by,
            domain: decision.domain.map(|entry| entry.name.to_string()),
        })
    }
}
