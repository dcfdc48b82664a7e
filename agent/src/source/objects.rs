//! Kubernetes objects, as read ([`super::trimmed`]) -> the snapshot's types. Shared by
//! every source, so the manifest directory and the API server are read the same way.
//! Objects are taken by value: their strings move into the snapshot.

use std::net::IpAddr;

use thiserror::Error;

use super::trimmed;
use crate::{
    policy::{NamedPort, Protocol},
    state::{EndpointSlice, LabelSets, Namespace, Pod, PodPhase, Service, ServicePort},
};

/// Namespace of objects that do not name one (as `kubectl apply` assumes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn protocol(name: Option<&str>, field: &str) -> Result<Protocol, FieldError> {
    let name = name.unwrap_or("TCP");
    Protocol::from_name(name).ok_or_else(|| {
        field_error(
            field,
            format!("unknown protocol {name:?} (expected TCP, UDP or SCTP)"),
        )
    })
}

fn port_number(value: i32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| field_error(field, format!("{value} is outside 1-65535")))
}

fn address(text: &str, field: &str) -> Result<IpAddr, FieldError> {
    text.parse()
        .map_err(|_| field_error(field, format!("{text:?} is not an IP address")))
}

#[must_use]
pub fn namespace(namespace: trimmed::Namespace) -> Namespace {
    Namespace {
        name: namespace.metadata.name.unwrap_or_default(),
        labels: namespace.metadata.labels.unwrap_or_default(),
    }
}

/// Trims a pod to what policy needs; its labels are shared with the pods of
/// `label_sets` that carry the same ones.
///
/// # Errors
/// An address that does not parse, or a container port with a bad protocol or number.
pub fn pod(pod: trimmed::Pod, label_sets: &mut LabelSets) -> Result<Pod, FieldError> {
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let listed: Vec<(String, &str)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(pod_ips) if !pod_ips.is_empty() => pod_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.as_str()))
            .collect(),
        _ => status
            .and_then(|s| s.pod_ip.as_deref())
            .map(|ip| ("status.podIP".to_owned(), ip))
            .into_iter()
            .collect(),
    };
    let mut ips = Vec::new();
    for (field, text) in listed {
        let ip = address(text, &field)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut named_ports = Vec::new();
    for (c, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let Some(name) = &port.name else { continue };
            let field = format!("spec.containers[{c}].ports[{p}]");
            named_ports.push(NamedPort {
                name: name.clone(),
                protocol: protocol(port.protocol.as_deref(), &format!("{field}.protocol"))?,
                port: port_number(port.container_port, &format!("{field}.containerPort"))?,
            });
        }
    }
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let phase = status
        .and_then(|s| s.phase.as_deref())
        .map_or(PodPhase::Pending, PodPhase::from_name);
    let metadata = pod.metadata;
    ips.shrink_to_fit();
    named_ports.shrink_to_fit();
    Ok(Pod {
        uid: metadata.uid.unwrap_or_default(),
        namespace: metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: metadata.name.unwrap_or_default(),
        labels: label_sets.intern(metadata.labels.unwrap_or_default()),
        node_name: pod.spec.and_then(|s| s.node_name),
        host_network,
        phase,
        ips,
        named_ports,
    })
}

/// A Service's virtual addresses and ports.
///
/// # Errors
/// An address that does not parse, or a port with a bad protocol or number.
pub fn service(service: trimmed::Service) -> Result<Service, FieldError> {
    let spec = service.spec.unwrap_or_default();
    let mut texts: Vec<(String, String)> = Vec::new();
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => {
            texts.extend(
                ips.iter()
                    .enumerate()
                    .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone())),
            );
        }
        _ => texts.extend(
            spec.cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip.clone())),
        ),
    }
    texts.extend(
        spec.external_ips
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.clone())),
    );
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    texts.extend(
        ingress
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, ingress)| {
                ingress
                    .ip
                    .clone()
                    .map(|ip| (format!("status.loadBalancer.ingress[{i}].ip"), ip))
            }),
    );
    let mut virtual_ips = Vec::new();
    for (field, text) in texts {
        // Headless services say "None": they have no virtual address.
        if text.is_empty() || text == "None" {
            continue;
        }
        let ip = address(&text, &field)?;
        if !virtual_ips.contains(&ip) {
            virtual_ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            protocol: protocol(
                port.protocol.as_deref(),
                &format!("spec.ports[{i}].protocol"),
            )?,
            port: port_number(port.port, &format!("spec.ports[{i}].port"))?,
        });
    }
    Ok(Service {
        namespace: service
            .metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: service.metadata.name.unwrap_or_default(),
        virtual_ips,
        ports,
    })
}

/// The ready backends of an EndpointSlice.
///
/// # Errors
/// An address that does not parse, or a port with a bad protocol or number.
pub fn endpoint_slice(slice: trimmed::EndpointSlice) -> Result<EndpointSlice, FieldError> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .unwrap_or_default();
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = port.port else { continue };
        ports.push((
            port.name.clone().unwrap_or_default(),
            protocol(port.protocol.as_deref(), &format!("ports[{i}].protocol"))?,
            port_number(number, &format!("ports[{i}].port"))?,
        ));
    }
    let mut ready_addresses = Vec::new();
    for (e, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        // An absent `ready` means ready (EndpointSlice API semantics).
        if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        for (a, text) in endpoint.addresses.iter().enumerate() {
            ready_addresses.push(address(text, &format!("endpoints[{e}].addresses[{a}]"))?);
        }
    }
    Ok(EndpointSlice {
        namespace: slice
            .metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        name: slice.metadata.name.unwrap_or_default(),
        service,
        ports,
        ready_addresses,
    })
}
