//! The cluster snapshot: plain data, trimmed to what the policy engine reads.
//! Sources fill it; the compiler reads it. Nothing here talks to the API or the kernel.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use crate::policy::{
    Labels, NamedPort, NetworkPolicy, PodView, PolicyRef, Protocol, cluster::ClusterNetworkPolicy,
};

pub use self::changes::Changes;

mod changes;

/// The label the API server puts on every namespace (Kubernetes >= 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`.
    #[must_use]
    pub fn parse(value: &str) -> Option<Self> {
        let (namespace, name) = value.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains('/'))
            .then(|| Self::new(namespace, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    #[must_use]
    pub fn from_name(name: &str) -> Self {
        match name {
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            "Pending" => PodPhase::Pending,
            _ => PodPhase::Unknown,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Shared by the pods that carry the same labels (see [`LabelSets`]).
    pub labels: Arc<Labels>,
    pub node_name: Option<String>,
    pub host_network: bool,
    pub phase: PodPhase,
    /// `status.podIPs` (or `status.podIP`): at most one address per family.
    pub ips: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
    /// `metadata.uid`: names the pod's cgroup (`--attach cgroup`).
    pub uid: String,
}

impl Pod {
    #[must_use]
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// A pod that policies can select and that selectors can match as a peer:
    /// it has an address of its own and has not finished. hostNetwork pods share the
    /// node's address, so policies never apply to them and peers never match them.
    #[must_use]
    pub fn takes_part(&self) -> bool {
        !self.host_network
            && !self.ips.is_empty()
            && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    #[must_use]
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    #[must_use]
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }
}

impl PodView for Pod {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn labels(&self) -> &Labels {
        &self.labels
    }
}

/// Label sets handed out shared: the replicas of a deployment carry the same labels,
/// so a cluster of 100k pods in 10k deployments holds 10k label maps, not 100k (a
/// map of three labels costs about 700 bytes). A source keeps one while it reads, and
/// every pod it makes takes its labels from it.
#[derive(Debug, Default)]
pub struct LabelSets {
    sets: HashSet<Arc<Labels>>,
    /// How many sets were left at the last pruning: the next one is due when there
    /// are twice as many.
    kept: usize,
}

impl LabelSets {
    /// Sets held before the first pruning.
    const FIRST_PRUNING: usize = 1024;

    /// `labels`, shared with every earlier pod that carried the same ones.
    pub fn intern(&mut self, labels: Labels) -> Arc<Labels> {
        if let Some(shared) = self.sets.get(&labels) {
            return Arc::clone(shared);
        }
        if self.sets.len() >= (2 * self.kept).max(Self::FIRST_PRUNING) {
            // Sets that no pod holds any more: pods were deleted or relabelled.
            self.sets.retain(|set| Arc::strong_count(set) > 1);
            self.kept = self.sets.len();
        }
        let shared = Arc::new(labels);
        self.sets.insert(Arc::clone(&shared));
        shared
    }

    /// Distinct label sets held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

/// A port a Service exposes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    /// Matches the EndpointSlice port of the same name (empty when unnamed).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A Service's virtual addresses: what kube-proxy translates to a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Cluster IPs, external IPs and load-balancer ingress IPs; empty for headless
    /// services, which have no virtual address.
    pub virtual_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

/// One EndpointSlice: backends of a Service, with ports already resolved to numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    /// (port name, protocol, number).
    pub ports: Vec<(String, Protocol, u16)>,
    /// Addresses of ready endpoints.
    pub ready_addresses: Vec<IpAddr>,
}

/// Everything the compiler needs, keyed for deterministic iteration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<PolicyRef, NetworkPolicy>,
    /// `ClusterNetworkPolicy` objects by name (cluster-scoped).
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
}

impl Snapshot {
    /// Labels of a namespace. A namespace the snapshot has not seen still carries the
    /// name label the API server would give it.
    #[must_use]
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        self.namespaces.get(namespace).map_or_else(
            || Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())]),
            |ns| ns.labels.clone(),
        )
    }

    pub fn insert_namespace(&mut self, mut namespace: Namespace) {
        namespace
            .labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| namespace.name.clone());
        self.namespaces.insert(namespace.name.clone(), namespace);
    }

    pub fn insert_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.key(), pod);
    }

    pub fn insert_policy(&mut self, policy: NetworkPolicy) {
        self.policies.insert(policy.id.clone(), policy);
    }

    pub fn insert_cluster_policy(&mut self, policy: ClusterNetworkPolicy) {
        self.cluster_policies.insert(policy.name.clone(), policy);
    }

    pub fn insert_service(&mut self, service: Service) {
        self.services
            .insert(ObjectKey::new(&service.namespace, &service.name), service);
    }

    pub fn insert_endpoint_slice(&mut self, slice: EndpointSlice) {
        self.endpoint_slices
            .insert(ObjectKey::new(&slice.namespace, &slice.name), slice);
    }

    /// Ready backends of `service` for its port named `port_name`: (address, number).
    #[must_use]
    pub fn backends(&self, service: &Service, port: &ServicePort) -> Vec<(IpAddr, u16)> {
        let mut backends: Vec<(IpAddr, u16)> = self
            .endpoint_slices
            .values()
            .filter(|s| s.namespace == service.namespace && s.service == service.name)
            .flat_map(|slice| {
                let number = slice
                    .ports
                    .iter()
                    .find(|(name, protocol, _)| *name == port.name && *protocol == port.protocol)
                    .map(|(_, _, number)| *number);
                slice
                    .ready_addresses
                    .iter()
                    .filter_map(move |ip| number.map(|n| (*ip, n)))
            })
            .collect();
        backends.sort_unstable();
        backends.dedup();
        backends
    }

    /// The pod whose address is `ip`, among pods that take part in policy.
    #[must_use]
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .values()
            .find(|pod| pod.takes_part() && pod.ips.contains(&ip))
    }
}

/// One object of any kind the snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Policy(NetworkPolicy),
    /// A `ClusterNetworkPolicy` (cluster-scoped: its key has an empty namespace).
    ClusterPolicy(ClusterNetworkPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

/// Kind and `namespace/name` (empty namespace for cluster-scoped kinds: Namespaces,
/// ClusterNetworkPolicies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectId {
    pub kind: &'static str,
    pub key: ObjectKey,
}

impl Snapshot {
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Namespace(namespace) => self.insert_namespace(namespace),
            Object::Pod(pod) => self.insert_pod(pod),
            Object::Policy(policy) => self.insert_policy(policy),
            Object::ClusterPolicy(policy) => self.insert_cluster_policy(policy),
            Object::Service(service) => self.insert_service(service),
            Object::EndpointSlice(slice) => self.insert_endpoint_slice(slice),
        }
    }

    pub fn delete(&mut self, id: &ObjectId) {
        let key = &id.key;
        match id.kind {
            "Namespace" => {
                self.namespaces.remove(&key.name);
            }
            "Pod" => {
                self.pods.remove(key);
            }
            "NetworkPolicy" => {
                self.policies.remove(&PolicyRef {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            }
            "ClusterNetworkPolicy" => {
                self.cluster_policies.remove(&key.name);
            }
            "Service" => {
                self.services.remove(key);
            }
            "EndpointSlice" => {
                self.endpoint_slices.remove(key);
            }
            _ => {}
        }
    }

    /// Replaces every object of `kind` (a fresh list from the API server).
    pub fn replace_kind(&mut self, kind: &str, objects: Vec<Object>) {
        match kind {
            "Namespace" => self.namespaces.clear(),
            "Pod" => self.pods.clear(),
            "NetworkPolicy" => self.policies.clear(),
            "ClusterNetworkPolicy" => self.cluster_policies.clear(),
            "Service" => self.services.clear(),
            "EndpointSlice" => self.endpoint_slices.clear(),
            _ => {}
        }
        for object in objects {
            self.apply(object);
        }
    }
}

#[cfg(test)]
mod tests;
