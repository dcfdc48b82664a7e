//! Kubernetes objects as Egret reads them, from the API server and from manifests: only
//! the fields the snapshot takes. Everything else in a served object (managedFields,
//! annotations, owner references, the rest of a pod's spec, container statuses, ...)
//! is skipped while the JSON or YAML is read, so it is never allocated: a 100k-pod list
//! costs the agent what the snapshot keeps, not what the API server sends.
//!
//! Field names and shapes are the Kubernetes API's (`core/v1`, `discovery/v1`,
//! `networking/v1`); where the API would reject a value of the wrong type, so does
//! reading it here, and the error names the field.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    api::networking::v1 as networking, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Resource,
    core::{ClusterResourceScope, NamespaceResourceScope},
};
use serde::{Deserialize, Deserializer};

/// `metadata`, keeping what Egret reads (name, namespace, uid, labels) and what the
/// watcher needs to resume (resourceVersion).
fn trimmed_metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Read {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<BTreeMap<String, String>>,
    }
    let read = Option::<Read>::deserialize(deserializer)?;
    Ok(read.map_or_else(ObjectMeta::default, |read| ObjectMeta {
        name: read.name,
        namespace: read.namespace,
        uid: read.uid,
        resource_version: read.resource_version,
        labels: read.labels,
        ..ObjectMeta::default()
    }))
}

/// A `Resource` for a trimmed type: the API path and kind are those of the full one.
macro_rules! served_as {
    ($type:ty, $kind:literal, $group:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl Resource for $type {
            type DynamicType = ();
            type Scope = $scope;

            fn kind((): &()) -> Cow<'_, str> {
                $kind.into()
            }

            fn group((): &()) -> Cow<'_, str> {
                $group.into()
            }

            fn version((): &()) -> Cow<'_, str> {
                $version.into()
            }

            fn plural((): &()) -> Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// `v1` Namespace: its name and labels.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Namespace {
    #[serde(default, deserialize_with = "trimmed_metadata")]
    pub metadata: ObjectMeta,
}

served_as!(
    Namespace,
    "Namespace",
    "",
    "v1",
    "namespaces",
    ClusterResourceScope
);

/// `v1` Pod: what selects it, where it runs, its addresses and named ports.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default, deserialize_with = "trimmed_metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

served_as!(Pod, "Pod", "", "v1", "pods", NamespaceResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Container {
    pub ports: Option<Vec<ContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub container_port: i32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// `v1` Service: its virtual addresses and ports.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "trimmed_metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

served_as!(
    Service,
    "Service",
    "",
    "v1",
    "services",
    NamespaceResourceScope
);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: i32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
}

/// `discovery.k8s.io/v1` EndpointSlice: its Service (a label), ports and ready
/// addresses.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "trimmed_metadata")]
    pub metadata: ObjectMeta,
    pub ports: Option<Vec<EndpointPort>>,
    pub endpoints: Option<Vec<Endpoint>>,
}

served_as!(
    EndpointSlice,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices",
    NamespaceResourceScope
);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    pub ready: Option<bool>,
}

/// `networking.k8s.io/v1` NetworkPolicy with trimmed metadata; its spec is read whole
/// (policy conversion reads all of it).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NetworkPolicy {
    #[serde(default, deserialize_with = "trimmed_metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<networking::NetworkPolicySpec>,
}

served_as!(
    NetworkPolicy,
    "NetworkPolicy",
    "networking.k8s.io",
    "v1",
    "networkpolicies",
    NamespaceResourceScope
);

impl NetworkPolicy {
    /// As the policy converter takes it.
    #[must_use]
    pub fn into_full(self) -> networking::NetworkPolicy {
        networking::NetworkPolicy {
            metadata: self.metadata,
            spec: self.spec,
        }
    }
}

#[cfg(test)]
mod tests;
