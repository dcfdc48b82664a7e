//! Snapshot -> the tables the kernel holds for one node. Pure and deterministic: the
//! same snapshot, node and previous [`Ids`] always give the same tables.
//!
//! Layout (see `egret_common::maps`): pods are grouped into identities (namespace,
//! labels, named ports); a global table maps each pod address to its identity. Local
//! endpoints selected by the same policies share one table, which holds policy entries
//! per identity they may reach; ipBlocks and "any destination" rules become the
//! table's CIDR classes. Nothing is stored per (local pod x peer pod), so a pod joining
//! a big namespace is one identity write, and nothing per replica of a deployment.

mod cidr;
pub mod domains;
mod ids;
pub mod incremental;
pub mod lookup;
mod ports;
#[cfg(test)]
mod tests;
pub mod tiers;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use egret_common::maps::{
    CIDR_CLASS_BIT, ENDPOINT_FLAG_HAS_IPV4, ENDPOINT_FLAG_HAS_IPV6, ENDPOINT_FLAG_ISOLATED_AUDITED,
    ENDPOINT_FLAG_ISOLATED_ENFORCED, ENDPOINT_FLAG_TIERED, POLICY_ALLOW_AUDITED,
    POLICY_ALLOW_ENFORCED, PolicyValue,
};
use ipnet::IpNet;

pub use self::{
    ids::{Allocator, Ids},
    ports::PortPrefix,
};
use crate::{
    policy::{
        Labels, Mode, NamedPort, NetworkPolicy, Peer, PodPeer, PodView, PolicyRef, PortMatch,
        PortSpec, RuleRef,
        cluster::{ClusterNetworkPolicy, TierRuleRef},
    },
    state::{ObjectKey, Pod, Snapshot},
};

/// Pods with equal identity keys are interchangeable for every policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    /// Shared with the pods (cloning it for every peer pod at each compile cost a
    /// label map per cluster pod).
    pub labels: Arc<Labels>,
    /// Sorted, so equal sets compare equal.
    pub named_ports: Vec<NamedPort>,
}

impl IdentityKey {
    fn of(pod: &Pod) -> Self {
        let mut named_ports = pod.named_ports.clone();
        named_ports.sort();
        named_ports.dedup();
        Self {
            namespace: pod.namespace.clone(),
            labels: Arc::clone(&pod.labels),
            named_ports,
        }
    }
}

impl PodView for IdentityKey {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn labels(&self) -> &Labels {
        &self.labels
    }
}

/// A local pod's entry: what the kernel keys by interface (or cgroup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub id: u32,
    /// The table holding the endpoint's CIDR and policy entries.
    pub table: u32,
    /// `ENDPOINT_FLAG_*` bits.
    pub flags: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Policies that select the pod for egress; empty when it is not isolated.
    pub isolated_by: BTreeSet<PolicyRef>,
    /// `ClusterNetworkPolicy` objects with egress rules whose subject the pod is, in
    /// evaluation order.
    pub cluster_policies: Vec<String>,
}

/// A policy table entry's key: table, identity (or CIDR class), protocol and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    pub table: u32,
    pub identity: u32,
    pub ports: PortPrefix,
}

/// What an entry allows, and (userspace only) which rules allow it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allowance {
    /// What the entry decides per tier (NetworkPolicy allow bits, the first Admin and
    /// Baseline rules), joined with every shorter entry covering this one.
    pub value: PolicyValue,
    /// Shared: where allow lists of many policies overlap, the classes, their numbers
    /// and every endpoint's entries hold the same long sets.
    pub rules: Arc<BTreeSet<RuleRef>>,
}

impl Allowance {
    fn merge(&mut self, other: &Allowance) {
        self.value.join(&other.value);
        if self.rules.is_empty() {
            self.rules = Arc::clone(&other.rules);
        } else if !Arc::ptr_eq(&self.rules, &other.rules) {
            let missing: Vec<&RuleRef> = other
                .rules
                .iter()
                .filter(|rule| !self.rules.contains(*rule))
                .collect();
            if !missing.is_empty() {
                Arc::make_mut(&mut self.rules).extend(missing.into_iter().cloned());
            }
        }
    }
}

/// Port prefix -> allowance, for one (endpoint, identity or class).
pub type Grants = BTreeMap<PortPrefix, Allowance>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub endpoints: BTreeMap<ObjectKey, EndpointEntry>,
    /// Pod address -> identity, for every pod in the cluster that takes part in policy.
    pub identities: BTreeMap<IpAddr, u32>,
    /// (table, network) -> CIDR class (an identity with `CIDR_CLASS_BIT` set).
    pub cidrs: BTreeMap<(u32, IpNet), u32>,
    pub policy: BTreeMap<PolicyEntryKey, Allowance>,
    /// Every `ClusterNetworkPolicy` rule by rank, as entries and flow events name them.
    pub tier_rules: Vec<TierRuleRef>,
    /// (table, pattern key) -> a `domainNames` pattern of the table's endpoints.
    pub domains: BTreeMap<(u32, u64), domains::DomainEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub tables: Tables,
    /// Pass back in next time so unchanged things keep their numbers.
    pub ids: Ids,
    /// Pods whose address another pod already claims; the first (by name) keeps it.
    pub address_conflicts: Vec<(ObjectKey, IpAddr)>,
}

/// Which pods get endpoint tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The pods scheduled on this node (the agent).
    Node(String),
    /// Every pod (simulation).
    Cluster,
}

impl Scope {
    fn includes(&self, pod: &Pod) -> bool {
        match self {
            Scope::Node(node) => pod.node_name.as_deref() == Some(node.as_str()),
            Scope::Cluster => true,
        }
    }
}

/// Compiles the snapshot for the pods in `scope`.
#[must_use]
pub fn compile(snapshot: &Snapshot, scope: &Scope, previous: &Ids) -> Compiled {
    let mut compiled = Compiled::default();
    let peers: Vec<&Pod> = snapshot
        .pods
        .values()
        .filter(|pod| pod.takes_part())
        .collect();

    let (identity_keys, pod_identities) = number_identities(&mut compiled, previous, &peers);
    let identities = IdentityIndex::new(
        snapshot,
        identity_keys
            .iter()
            .map(|key| (compiled.ids.identities.id(key), key))
            .collect(),
    );
    // The first pod (by namespace/name) that claims an address keeps it, as
    // `Snapshot::pod_by_ip` does.
    let mut owners: BTreeMap<IpAddr, &Pod> = BTreeMap::new();
    for (pod, identity) in peers.iter().zip(pod_identities) {
        for ip in &pod.ips {
            if owners.contains_key(ip) {
                compiled.address_conflicts.push((pod.key(), *ip));
            } else {
                owners.insert(*ip, pod);
                compiled.tables.identities.insert(*ip, identity);
            }
        }
    }

    let local: Vec<&Pod> = peers
        .iter()
        .copied()
        .filter(|pod| scope.includes(pod))
        .collect();
    compiled.ids.endpoints = previous
        .endpoints
        .reassign(local.iter().map(|pod| pod.key()), 1);

    // Everything an endpoint gets follows from the set of policies selecting it, so pods
    // selected by the same policies (the replicas of a deployment) share one table.
    let ranked = tiers::Ranked::of(snapshot);
    let mut layouts: Vec<Layout> = Vec::new();
    let mut layout_of: HashMap<TableKey, usize> = HashMap::new();
    let mut endpoint_layouts: Vec<(&Pod, Vec<String>, usize)> = Vec::with_capacity(local.len());
    for pod in &local {
        let (key, selecting, selecting_cluster) = TableKey::of(snapshot, &ranked, pod);
        let cluster_policies = key.cluster_policies.clone();
        let layout = *layout_of.entry(key).or_insert_with(|| {
            layouts.push(Layout::build(
                snapshot,
                &owners,
                &identities,
                &compiled.tables.identities,
                &selecting,
                &selecting_cluster,
            ));
            layouts.len() - 1
        });
        endpoint_layouts.push((pod, cluster_policies, layout));
    }
    let mut keys: Vec<(TableKey, usize)> = layout_of.into_iter().collect();
    keys.sort_unstable();
    compiled.ids.tables = previous
        .tables
        .reassign(keys.iter().map(|(key, _)| key.clone()), 1);
    let mut table_numbers = vec![0; layouts.len()];
    for (key, layout) in &keys {
        table_numbers[*layout] = compiled.ids.tables.id(key);
    }
    for (pod, cluster_policies, layout) in endpoint_layouts {
        let entry = EndpointEntry::of(
            pod,
            compiled.ids.endpoints.id(&pod.key()),
            table_numbers[layout],
            &layouts[layout].program,
            cluster_policies,
        );
        compiled.tables.endpoints.insert(pod.key(), entry);
    }
    let signatures: BTreeSet<&Grants> = layouts
        .iter()
        .flat_map(|layout| &layout.classes.grants)
        .collect();
    compiled.ids.classes = previous
        .classes
        .reassign(signatures.into_iter().cloned(), 1);
    for (layout, table) in layouts.iter().zip(&table_numbers) {
        layout.write(&mut compiled.tables, &compiled.ids.classes, *table);
    }
    domains::add(&mut compiled, &previous.domains, &ranked);
    compiled.tables.tier_rules = ranked.rules;
    compiled
}

/// Numbers the identities of `peers` into `compiled.ids`. Returns the distinct
/// identities, ordered, and each peer's identity number.
fn number_identities(
    compiled: &mut Compiled,
    previous: &Ids,
    peers: &[&Pod],
) -> (Vec<IdentityKey>, Vec<u32>) {
    // Pods grouped through a hash (a deployment's replicas share their label map, so
    // equal keys compare at once); only the distinct keys are ordered.
    let mut distinct: HashMap<IdentityKey, usize> = HashMap::new();
    let pod_keys: Vec<usize> = peers
        .iter()
        .map(|pod| {
            let next = distinct.len();
            *distinct.entry(IdentityKey::of(pod)).or_insert(next)
        })
        .collect();
    let mut keys: Vec<(IdentityKey, usize)> = distinct.into_iter().collect();
    keys.sort_unstable();
    compiled.ids.identities = previous
        .identities
        .reassign(keys.iter().map(|(key, _)| key.clone()), 1);
    let mut numbers = vec![0; keys.len()];
    for (key, index) in &keys {
        numbers[*index] = compiled.ids.identities.id(key);
    }
    let pod_numbers = pod_keys.into_iter().map(|index| numbers[index]).collect();
    (keys.into_iter().map(|(key, _)| key).collect(), pod_numbers)
}

/// What makes a table: the policies selecting its endpoints for egress, and the
/// `ClusterNetworkPolicy` objects whose subject they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableKey {
    pub policies: Vec<PolicyRef>,
    pub cluster_policies: Vec<String>,
}

type Selecting<'s> = (
    TableKey,
    Vec<&'s NetworkPolicy>,
    Vec<(&'s ClusterNetworkPolicy, u32)>,
);

impl TableKey {
    /// The key of `pod`'s table, with the policies (and cluster policies, ranked) that
    /// select it.
    fn of<'s>(snapshot: &'s Snapshot, ranked: &tiers::Ranked<'s>, pod: &Pod) -> Selecting<'s> {
        // A NetworkPolicy selects pods of its own namespace only.
        let first = PolicyRef {
            namespace: pod.namespace.clone(),
            name: String::new(),
        };
        let selecting: Vec<&NetworkPolicy> = snapshot
            .policies
            .range(first..)
            .take_while(|(id, _)| id.namespace == pod.namespace)
            .map(|(_, policy)| policy)
            .filter(|p| p.isolates_egress && p.selects(pod))
            .collect();
        let selecting_cluster = ranked.selecting(snapshot, pod);
        let key = TableKey {
            policies: selecting.iter().map(|p| p.id.clone()).collect(),
            cluster_policies: selecting_cluster
                .iter()
                .map(|(p, _)| p.name.clone())
                .collect(),
        };
        (key, selecting, selecting_cluster)
    }
}

impl EndpointEntry {
    fn of(
        pod: &Pod,
        id: u32,
        table: u32,
        program: &EndpointProgram,
        cluster_policies: Vec<String>,
    ) -> Self {
        EndpointEntry {
            id,
            table,
            flags: program.flags | address_flags(pod),
            ipv4: pod.ipv4(),
            ipv6: pod.ipv6(),
            isolated_by: program.isolated_by.clone(),
            cluster_policies,
        }
    }
}

/// What the endpoints selected by one set of policies get: their rules, and the CIDR
/// classes those rules and the Service addresses make.
struct Layout {
    program: EndpointProgram,
    classes: cidr::Classes,
}

impl Layout {
    /// Writes the layout's entries as table `table`: its identity grants, and its CIDR
    /// classes numbered by content (`classes` holds every class of this compile).
    fn write(&self, tables: &mut Tables, classes: &Allocator<Grants>, table: u32) {
        for (identity, grants) in &self.program.identity_grants {
            insert_grants(&mut tables.policy, table, *identity, grants);
        }
        let numbers: Vec<u32> = self
            .classes
            .grants
            .iter()
            .map(|grants| CIDR_CLASS_BIT | classes.id(grants))
            .collect();
        for (net, grants) in &self.classes.prefixes {
            tables.cidrs.insert((table, *net), numbers[*grants]);
        }
        for (grants, class) in self.classes.grants.iter().zip(&numbers) {
            insert_grants(&mut tables.policy, table, *class, grants);
        }
    }

    /// `addresses`: pod address -> identity, as the identity table holds it.
    fn build(
        snapshot: &Snapshot,
        owners: &BTreeMap<IpAddr, &Pod>,
        identities: &IdentityIndex,
        addresses: &BTreeMap<IpAddr, u32>,
        selecting: &[&NetworkPolicy],
        selecting_cluster: &[(&ClusterNetworkPolicy, u32)],
    ) -> Self {
        let mut program =
            EndpointProgram::build(snapshot, owners, identities, selecting, selecting_cluster);
        let mut classes = cidr::classes(&program.blocks);
        if program.flags != 0 {
            // A Service address is judged by its backends alone (as after translation),
            // so its entry replaces whatever the blocks around it would allow.
            let services = service_grants(snapshot, &program, &classes, addresses);
            classes.replace(services);
        }
        // The blocks are in the classes now; a cached layout need not keep them.
        program.blocks = Vec::new();
        Self { program, classes }
    }
}

/// What the endpoint may send to each Service address: a service port is allowed
/// exactly when every ready backend of it (at its own target port) is allowed.
fn service_grants(
    snapshot: &Snapshot,
    program: &EndpointProgram,
    classes: &cidr::Classes,
    identities: &BTreeMap<IpAddr, u32>,
) -> BTreeMap<IpNet, Grants> {
    let mut out = BTreeMap::new();
    for service in snapshot
        .services
        .values()
        .filter(|s| !s.virtual_ips.is_empty())
    {
        let mut grants = Grants::new();
        for port in &service.ports {
            let backends = snapshot.backends(service, port);
            if backends.is_empty() {
                continue;
            }
            let protocol = port.protocol.number();
            let mut worst: Option<(u8, PolicyValue)> = None;
            let mut rules = BTreeSet::new();
            for (ip, number) in backends {
                let allowance = program.allowance_at(classes, identities, ip, protocol, number);
                rules.extend(allowance.rules.iter().cloned());
                // The Service port gets the entry of its most restricted backend: the
                // kernel's verdict on it is then that backend's, so the port is
                // allowed exactly when every backend is (the same order of tiers, the
                // same endpoint flags, decide it).
                let decision = egret_common::policy_decision(program.flags, &allowance.value);
                let severity = match decision.verdict {
                    egret_common::Verdict::Allow => 0,
                    egret_common::Verdict::AuditDeny => 1,
                    egret_common::Verdict::Deny => 2,
                };
                if worst.as_ref().is_none_or(|(s, _)| severity > *s) {
                    worst = Some((severity, allowance.value));
                }
            }
            if let Some((_, value)) = worst {
                grants.insert(
                    PortPrefix::port(protocol, port.port),
                    Allowance {
                        value,
                        rules: Arc::new(rules),
                    },
                );
            }
        }
        ports::close_over_prefixes(&mut grants);
        for ip in &service.virtual_ips {
            out.insert(IpNet::from(*ip), grants.clone());
        }
    }
    out
}

fn address_flags(pod: &Pod) -> u32 {
    let mut flags = 0;
    if pod.ipv4().is_some() {
        flags |= ENDPOINT_FLAG_HAS_IPV4;
    }
    if pod.ipv6().is_some() {
        flags |= ENDPOINT_FLAG_HAS_IPV6;
    }
    flags
}

fn insert_grants(
    policy: &mut BTreeMap<PolicyEntryKey, Allowance>,
    table: u32,
    identity: u32,
    grants: &Grants,
) {
    for (ports, allowance) in grants {
        policy.insert(
            PolicyEntryKey {
                table,
                identity,
                ports: *ports,
            },
            allowance.clone(),
        );
    }
}

/// The identities of the cluster, and the same grouped by namespace with the namespace's
/// labels: a selector peer picks namespaces first, so a rule is matched against the
/// identities of the namespaces it reaches, not against every identity of the cluster.
struct IdentityIndex<'a> {
    all: Vec<(u32, &'a IdentityKey)>,
    namespaces: BTreeMap<&'a str, NamespaceIdentities<'a>>,
}

/// A namespace's labels and identities.
#[derive(Default)]
struct NamespaceIdentities<'a> {
    labels: Labels,
    identities: Vec<(u32, &'a IdentityKey)>,
}

impl<'a> IdentityIndex<'a> {
    fn new(snapshot: &Snapshot, all: Vec<(u32, &'a IdentityKey)>) -> Self {
        let mut namespaces: BTreeMap<&str, NamespaceIdentities> = BTreeMap::new();
        for (identity, key) in &all {
            namespaces
                .entry(key.namespace.as_str())
                .or_insert_with(|| NamespaceIdentities {
                    labels: snapshot.namespace_labels(&key.namespace),
                    identities: Vec::new(),
                })
                .identities
                .push((*identity, *key));
        }
        Self { all, namespaces }
    }

    /// The identities `peer`, in a policy of `policy_namespace`, chooses.
    fn chosen_by<'s>(
        &'s self,
        peer: &'s PodPeer,
        policy_namespace: &'s str,
    ) -> impl Iterator<Item = (u32, &'a IdentityKey)> + 's {
        let reachable: Box<dyn Iterator<Item = &'s NamespaceIdentities<'a>>> =
            match &peer.namespaces {
                None => Box::new(self.namespaces.get(policy_namespace).into_iter()),
                Some(selector) => Box::new(
                    self.namespaces
                        .values()
                        .filter(|namespace| selector.matches(&namespace.labels)),
                ),
            };
        reachable.flat_map(move |namespace| {
            namespace
                .identities
                .iter()
                .filter(move |(_, key)| peer.matches(policy_namespace, *key, &namespace.labels))
                .copied()
        })
    }
}

/// One address range an endpoint's rules allow, with what they allow there (shared by
/// the blocks of one rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockGrant {
    pub net: IpNet,
    pub except: Vec<IpNet>,
    pub grants: Arc<Grants>,
}

/// Everything one local endpoint may send, before it is laid out in tables.
struct EndpointProgram {
    flags: u32,
    isolated_by: BTreeSet<PolicyRef>,
    identity_grants: BTreeMap<u32, Grants>,
    blocks: Vec<BlockGrant>,
}

impl EndpointProgram {
    /// The program of an endpoint that the policies `selecting` (those selecting it for
    /// egress) isolate.
    fn build(
        snapshot: &Snapshot,
        owners: &BTreeMap<IpAddr, &Pod>,
        identities: &IdentityIndex,
        selecting: &[&NetworkPolicy],
        selecting_cluster: &[(&ClusterNetworkPolicy, u32)],
    ) -> Self {
        let mut program = EndpointProgram {
            flags: 0,
            isolated_by: BTreeSet::new(),
            identity_grants: BTreeMap::new(),
            blocks: Vec::new(),
        };
        for policy in selecting.iter().copied() {
            program.isolated_by.insert(policy.id.clone());
            program.flags |= match policy.mode {
                Mode::Enforce => ENDPOINT_FLAG_ISOLATED_ENFORCED,
                Mode::Audit => ENDPOINT_FLAG_ISOLATED_AUDITED,
            };
            program.add_policy(owners, identities, policy);
        }
        if !selecting_cluster.is_empty() {
            program.flags |= ENDPOINT_FLAG_TIERED;
            program.add_cluster_policies(snapshot, owners, &identities.all, selecting_cluster);
        }
        for grants in program.identity_grants.values_mut() {
            ports::close_over_prefixes(grants);
        }
        program
    }

    fn add_policy(
        &mut self,
        owners: &BTreeMap<IpAddr, &Pod>,
        identities: &IdentityIndex,
        policy: &NetworkPolicy,
    ) {
        let flags = match policy.mode {
            Mode::Enforce => POLICY_ALLOW_ENFORCED,
            Mode::Audit => POLICY_ALLOW_AUDITED,
        };
        for (index, rule) in policy.egress.iter().enumerate() {
            let allowance = Allowance {
                value: PolicyValue::allowing(flags),
                rules: Arc::new(BTreeSet::from([RuleRef {
                    policy: policy.id.clone(),
                    rule: index,
                }])),
            };
            let has_named = rule
                .ports
                .iter()
                .any(|p| matches!(p.port, PortSpec::Named(_)));
            // Addresses that are not pods match no named port.
            let unnamed = Arc::new(grants_for(&rule.ports, None, &allowance));
            let named_on = |named_ports: &[NamedPort]| {
                let named: Vec<PortMatch> = rule
                    .ports
                    .iter()
                    .filter(|p| matches!(p.port, PortSpec::Named(_)))
                    .cloned()
                    .collect();
                grants_for(&named, Some(named_ports), &allowance)
            };
            if rule.to.is_empty() {
                for net in ["0.0.0.0/0", "::/0"] {
                    let net = net.parse().expect("literal network");
                    self.add_shared_block(net, Vec::new(), &unnamed);
                }
                if has_named {
                    for (identity, key) in &identities.all {
                        self.add_identity(*identity, &named_on(&key.named_ports));
                    }
                }
            }
            for peer in &rule.to {
                match peer {
                    Peer::Block(block) => {
                        self.add_shared_block(block.cidr, block.except.clone(), &unnamed);
                        if has_named {
                            // A named port in an ipBlock rule resolves on the pods inside it.
                            let inside = owners
                                .range(block.cidr.network()..=block.cidr.broadcast())
                                .filter(|(ip, _)| block.contains(**ip));
                            for (ip, owner) in inside {
                                let grants = named_on(&owner.named_ports);
                                self.add_block(IpNet::from(*ip), Vec::new(), &grants);
                            }
                        }
                    }
                    Peer::Pods(selector) => {
                        for (identity, key) in identities.chosen_by(selector, &policy.id.namespace)
                        {
                            let grants =
                                grants_for(&rule.ports, Some(&key.named_ports), &allowance);
                            self.add_identity(identity, &grants);
                        }
                    }
                }
            }
        }
    }

    /// What this endpoint's grants allow for one packet, looked up as the kernel does.
    fn allowance_at(
        &self,
        classes: &cidr::Classes,
        identities: &BTreeMap<IpAddr, u32>,
        ip: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Allowance {
        let mut found = Allowance::default();
        let by_identity = identities
            .get(&ip)
            .and_then(|id| self.identity_grants.get(id));
        let by_class = classes.longest_match(ip);
        for grants in [by_identity, by_class].into_iter().flatten() {
            if let Some(allowance) =
                lookup::port_candidates(protocol, port).find_map(|p| grants.get(&p))
            {
                found.merge(allowance);
            }
        }
        found
    }

    fn add_identity(&mut self, identity: u32, grants: &Grants) {
        if grants.is_empty() {
            return;
        }
        let entry = self.identity_grants.entry(identity).or_default();
        merge_grants(entry, grants);
    }

    fn add_block(&mut self, net: IpNet, except: Vec<IpNet>, grants: &Grants) {
        self.add_shared_block(net, except, &Arc::new(grants.clone()));
    }

    /// Adds a block whose grants other blocks (of the same rule) share.
    fn add_shared_block(&mut self, net: IpNet, except: Vec<IpNet>, grants: &Arc<Grants>) {
        if grants.is_empty() {
            return;
        }
        self.blocks.push(BlockGrant {
            net,
            except,
            grants: Arc::clone(grants),
        });
    }
}

fn merge_grants(into: &mut Grants, from: &Grants) {
    for (ports, allowance) in from {
        into.entry(*ports).or_default().merge(allowance);
    }
}

/// The port prefixes a rule's `ports` allow on a destination with `named_ports`
/// (`None`: not a pod). Empty `ports` allows every protocol and port.
fn grants_for(
    ports: &[PortMatch],
    named_ports: Option<&[NamedPort]>,
    allowance: &Allowance,
) -> Grants {
    let mut grants = Grants::new();
    let prefixes: Vec<PortPrefix> = if ports.is_empty() {
        vec![PortPrefix::AnyProtocol]
    } else {
        ports
            .iter()
            .flat_map(|p| ports::prefixes_of(p, named_ports))
            .collect()
    };
    for prefix in prefixes {
        grants.entry(prefix).or_default().merge(allowance);
    }
    grants
}
