//! `networking.k8s.io/v1` `NetworkPolicy` -> [`NetworkPolicy`], validated the way the API
//! server validates, so manifest mode rejects what a cluster would reject. Every error
//! names the field.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1 as api,
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use thiserror::Error;

use super::{
    EgressRule, IpBlock, Labels, Mode, NetworkPolicy, Operator, Peer, PodPeer, PolicyRef,
    PortMatch, PortSpec, Protocol, Requirement, Selector,
};

/// Annotation that stages a policy: its denials are counted, not enforced.
pub const MODE_ANNOTATION: &str = "egret.dev/mode";

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct InvalidField {
    /// Path of the offending field, e.g. `spec.egress[0].to[1].ipBlock.cidr`.
    pub field: String,
    pub problem: Problem,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Problem {
    #[error("missing")]
    Missing,
    #[error("{value:?} is not a CIDR: {source}")]
    BadCidr {
        value: String,
        source: ipnet::AddrParseError,
    },
    #[error("{except} is not inside the ipBlock cidr {cidr}")]
    ExceptOutsideCidr { except: IpNet, cidr: IpNet },
    #[error("{except} is not the same address family as the ipBlock cidr {cidr}")]
    ExceptFamily { except: IpNet, cidr: IpNet },
    #[error("unknown protocol {0:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol(String),
    #[error("port {0} is outside 1-65535")]
    PortOutOfRange(i32),
    #[error(
        "{0:?} is not a valid port name (1-15 lowercase letters, digits and '-', with a letter)"
    )]
    BadPortName(String),
    #[error("endPort needs a numeric port")]
    EndPortWithoutNumericPort,
    #[error("endPort {end_port} is below port {port}")]
    EndPortBelowPort { port: u16, end_port: i32 },
    #[error("unknown selector operator {0:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator(String),
    #[error("operator {0} needs at least one value")]
    MissingValues(&'static str),
    #[error("operator {0} takes no values")]
    UnexpectedValues(&'static str),
    #[error("a peer needs one of ipBlock, podSelector or namespaceSelector")]
    EmptyPeer,
    #[error("ipBlock cannot be combined with podSelector or namespaceSelector")]
    BlockWithSelector,
    #[error("unknown policy type {0:?} (expected Ingress or Egress)")]
    UnknownPolicyType(String),
    #[error("{0:?} is not a mode (expected enforce or audit)")]
    UnknownMode(String),
    /// The field does not even have the right shape (read from a manifest file).
    #[error("{0}")]
    Malformed(String),
}

/// A field Egret cannot honour as written, and what it enforces instead: never less
/// than the policy meant.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FailedClosed {
    #[error("{0}; this rule allows nothing (the policy still isolates the pods it selects)")]
    Rule(InvalidField),
    #[error("{0}; the policy is enforced")]
    Mode(InvalidField),
}

/// A policy as Egret enforces it, with what it had to enforce differently.
#[derive(Debug)]
pub struct Converted {
    pub policy: NetworkPolicy,
    pub failed_closed: Vec<FailedClosed>,
}

/// An egress rule that allows nothing: it stands in for an invalid rule, so the rule's
/// index (which status and explain report) and the policy's isolation stay.
#[must_use]
pub fn rule_allowing_nothing() -> EgressRule {
    // `In` an empty set: no label value is in it.
    let nothing = Selector {
        match_labels: Labels::new(),
        match_expressions: vec![Requirement {
            key: "egret.dev/invalid-rule".to_owned(),
            operator: Operator::In(BTreeSet::new()),
        }],
    };
    EgressRule {
        to: vec![Peer::Pods(PodPeer {
            namespaces: Some(nothing.clone()),
            pods: nothing,
        })],
        ports: Vec::new(),
    }
}

fn invalid(field: impl Into<String>, problem: Problem) -> InvalidField {
    InvalidField {
        field: field.into(),
        problem,
    }
}

/// Converts one policy, rejecting every invalid field as the API server would.
/// `default_namespace` fills an absent `metadata.namespace` (manifest files may omit
/// it, as `kubectl apply` allows).
///
/// # Errors
/// The first invalid field found.
pub fn network_policy(
    policy: &api::NetworkPolicy,
    default_namespace: &str,
) -> Result<NetworkPolicy, InvalidField> {
    let converted = network_policy_failing_closed(policy, default_namespace)?;
    match converted.failed_closed.into_iter().next() {
        Some(failed) => Err(match failed {
            FailedClosed::Rule(invalid) | FailedClosed::Mode(invalid) => invalid,
        }),
        None => Ok(converted.policy),
    }
}

/// Converts one policy for enforcement. An invalid egress rule becomes a rule that
/// allows nothing, and an unknown mode is `enforce`: skipping the policy would leave
/// the pods it was written to restrict unrestricted.
///
/// # Errors
/// When it is unknown which pods the policy isolates: no name, or an invalid
/// `podSelector` or `policyTypes`.
pub fn network_policy_failing_closed(
    policy: &api::NetworkPolicy,
    default_namespace: &str,
) -> Result<Converted, InvalidField> {
    let mut failed_closed = Vec::new();
    let name = policy
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", Problem::Missing))?;
    let namespace = policy
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace.to_owned());
    let mode = match policy
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MODE_ANNOTATION))
    {
        None => Mode::Enforce,
        Some(value) => match value.as_str() {
            "enforce" => Mode::Enforce,
            "audit" => Mode::Audit,
            other => {
                failed_closed.push(FailedClosed::Mode(invalid(
                    format!("metadata.annotations[{MODE_ANNOTATION}]"),
                    Problem::UnknownMode(other.to_owned()),
                )));
                Mode::Enforce
            }
        },
    };
    let spec = policy.spec.clone().unwrap_or_default();
    let pod_selector = selector(spec.pod_selector.as_ref(), "spec.podSelector")?;
    let egress_rules = spec.egress.unwrap_or_default();
    // The API server defaults policyTypes to [Ingress], plus Egress when there are egress
    // rules; `Some(vec![])` cannot come from the API server and is treated the same way.
    let isolates_egress = match spec.policy_types.as_deref() {
        None | Some([]) => !egress_rules.is_empty(),
        Some(types) => {
            let mut egress = false;
            for (i, policy_type) in types.iter().enumerate() {
                match policy_type.as_str() {
                    "Egress" => egress = true,
                    "Ingress" => {}
                    other => {
                        return Err(invalid(
                            format!("spec.policyTypes[{i}]"),
                            Problem::UnknownPolicyType(other.to_owned()),
                        ));
                    }
                }
            }
            egress
        }
    };
    let egress = egress_rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            egress_rule(rule, &format!("spec.egress[{i}]")).unwrap_or_else(|problem| {
                failed_closed.push(FailedClosed::Rule(problem));
                rule_allowing_nothing()
            })
        })
        .collect();
    Ok(Converted {
        policy: NetworkPolicy {
            id: PolicyRef { namespace, name },
            pod_selector,
            isolates_egress,
            egress,
            mode,
        },
        failed_closed,
    })
}

fn egress_rule(
    rule: &api::NetworkPolicyEgressRule,
    field: &str,
) -> Result<EgressRule, InvalidField> {
    let to = rule
        .to
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| peer(p, &format!("{field}.to[{i}]")))
        .collect::<Result<_, _>>()?;
    let ports = rule
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| port(p, &format!("{field}.ports[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(EgressRule { to, ports })
}

fn peer(peer: &api::NetworkPolicyPeer, field: &str) -> Result<Peer, InvalidField> {
    match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
        (Some(block), None, None) => ip_block(block, &format!("{field}.ipBlock")).map(Peer::Block),
        (Some(_), _, _) => Err(invalid(field, Problem::BlockWithSelector)),
        (None, None, None) => Err(invalid(field, Problem::EmptyPeer)),
        (None, pods, namespaces) => Ok(Peer::Pods(PodPeer {
            namespaces: namespaces
                .as_ref()
                .map(|s| selector(Some(s), &format!("{field}.namespaceSelector")))
                .transpose()?,
            pods: selector(pods.as_ref(), &format!("{field}.podSelector"))?,
        })),
    }
}

fn ip_block(block: &api::IPBlock, field: &str) -> Result<IpBlock, InvalidField> {
    let cidr = parse_cidr(&block.cidr, &format!("{field}.cidr"))?;
    let mut except = Vec::new();
    for (i, value) in block.except.iter().flatten().enumerate() {
        let except_field = format!("{field}.except[{i}]");
        let net = parse_cidr(value, &except_field)?;
        if matches!(
            (cidr, net),
            (IpNet::V4(_), IpNet::V6(_)) | (IpNet::V6(_), IpNet::V4(_))
        ) {
            return Err(invalid(
                except_field,
                Problem::ExceptFamily { except: net, cidr },
            ));
        }
        // The API server requires each except to be strictly inside the cidr.
        if !cidr.contains(&net) || net.prefix_len() <= cidr.prefix_len() {
            return Err(invalid(
                except_field,
                Problem::ExceptOutsideCidr { except: net, cidr },
            ));
        }
        except.push(net);
    }
    Ok(IpBlock { cidr, except })
}

/// Parses a CIDR; host bits are accepted and cleared, as the API server accepts them.
fn parse_cidr(value: &str, field: &str) -> Result<IpNet, InvalidField> {
    value
        .trim()
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|source| {
            invalid(
                field,
                Problem::BadCidr {
                    value: value.to_owned(),
                    source,
                },
            )
        })
}

fn port(port: &api::NetworkPolicyPort, field: &str) -> Result<PortMatch, InvalidField> {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(name) => Protocol::from_name(name).ok_or_else(|| {
            invalid(
                format!("{field}.protocol"),
                Problem::UnknownProtocol(name.to_owned()),
            )
        })?,
    };
    let spec = match (&port.port, port.end_port) {
        (None, None) => PortSpec::Any,
        (None | Some(IntOrString::String(_)), Some(_)) => {
            return Err(invalid(
                format!("{field}.endPort"),
                Problem::EndPortWithoutNumericPort,
            ));
        }
        (Some(IntOrString::Int(number)), end_port) => {
            let first = port_number(*number, &format!("{field}.port"))?;
            let last = match end_port {
                None => first,
                Some(end) => {
                    let last = port_number(end, &format!("{field}.endPort"))?;
                    if last < first {
                        return Err(invalid(
                            format!("{field}.endPort"),
                            Problem::EndPortBelowPort {
                                port: first,
                                end_port: end,
                            },
                        ));
                    }
                    last
                }
            };
            PortSpec::Range { first, last }
        }
        (Some(IntOrString::String(name)), None) => {
            if !is_port_name(name) {
                return Err(invalid(
                    format!("{field}.port"),
                    Problem::BadPortName(name.clone()),
                ));
            }
            PortSpec::Named(name.clone())
        }
    };
    Ok(PortMatch {
        protocol,
        port: spec,
    })
}

fn port_number(value: i32, field: &str) -> Result<u16, InvalidField> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, Problem::PortOutOfRange(value)))
}

/// An IANA service name (RFC 6335), which container port names must be.
#[must_use]
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// Converts a label selector; `None` (absent) is the empty selector, which selects all.
///
/// # Errors
/// An unknown operator, or values where the operator needs none (or the reverse).
pub fn selector(selector: Option<&LabelSelector>, field: &str) -> Result<Selector, InvalidField> {
    let Some(selector) = selector else {
        return Ok(Selector::everything());
    };
    let match_labels = selector.match_labels.clone().unwrap_or_default();
    let match_expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, expression)| {
            let field = format!("{field}.matchExpressions[{i}]");
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            let operator = match expression.operator.as_str() {
                "In" => Operator::In(non_empty(values, "In", &field)?),
                "NotIn" => Operator::NotIn(non_empty(values, "NotIn", &field)?),
                "Exists" => no_values(&values, "Exists", &field).map(|()| Operator::Exists)?,
                "DoesNotExist" => {
                    no_values(&values, "DoesNotExist", &field).map(|()| Operator::DoesNotExist)?
                }
                other => {
                    return Err(invalid(
                        format!("{field}.operator"),
                        Problem::UnknownOperator(other.to_owned()),
                    ));
                }
            };
            Ok(Requirement {
                key: expression.key.clone(),
                operator,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Selector {
        match_labels,
        match_expressions,
    })
}

fn non_empty(
    values: BTreeSet<String>,
    operator: &'static str,
    field: &str,
) -> Result<BTreeSet<String>, InvalidField> {
    if values.is_empty() {
        return Err(invalid(
            format!("{field}.values"),
            Problem::MissingValues(operator),
        ));
    }
    Ok(values)
}

fn no_values(
    values: &BTreeSet<String>,
    operator: &'static str,
    field: &str,
) -> Result<(), InvalidField> {
    if values.is_empty() {
        Ok(())
    } else {
        Err(invalid(
            format!("{field}.values"),
            Problem::UnexpectedValues(operator),
        ))
    }
}
