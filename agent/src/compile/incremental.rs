//! The compile the agent runs on every change: it keeps what the last compile found
//! (which identity each pod has, who claims each address, each table's layout) and
//! recompiles only what the changed objects touch. [`compile`](super::compile) of the
//! whole snapshot stays the oracle: `incremental/tests.rs` applies random change
//! sequences and checks after every step that both give the same tables and numbers.
//!
//! What a change touches:
//! - a pod: its identity's pod count, the addresses it claims, and, if it is local, its
//!   table key; a new or vanished identity re-lays the tables whose selector peers
//!   choose it; an address changing hands re-lays the tables that read address owners
//!   (named ports in ipBlocks) or Service backends at it;
//! - a NetworkPolicy: the tables whose key holds it, and the table keys of the local
//!   pods of its namespace;
//! - a namespace's labels: the tables with namespace selector peers;
//! - a ClusterNetworkPolicy: the tables of its subjects (ranks move, so every tiered
//!   table), and every local pod's table key;
//! - a Service or EndpointSlice: every table that judges Service addresses.

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use egret_common::{dns::DOMAIN_IDENTITY_BIT, maps::ENDPOINT_FLAG_DOMAINS};
use ipnet::{IpNet, Ipv4Net};
use smallvec::SmallVec;

use super::{
    Compiled, EndpointEntry, Grants, IdentityIndex, IdentityKey, Layout, PolicyEntryKey,
    PortPrefix, Scope, TableKey, tiers::Ranked,
};
use crate::{
    policy::{NetworkPolicy, Peer, PortSpec},
    state::{Changes, ObjectKey, Pod, Snapshot},
};

/// An incremental compiler for one scope. Feed it every change (or
/// [`Changes::everything`]) with the snapshot after the change.
pub struct Compiler {
    scope: Scope,
    compiled: Compiled,
    /// Pods that take part in policy, as last compiled. The keys are shared with
    /// `claims`: this state is kept for every pod of the cluster, so it is kept small.
    pods: HashMap<Arc<ObjectKey>, PodFacts>,
    /// Identity -> how many pods have it.
    identity_pods: BTreeMap<IdentityKey, usize>,
    /// Identity number -> identity.
    identity_keys: HashMap<u32, IdentityKey>,
    /// Address -> the pods claiming it, sorted; the first owns it (nearly every address
    /// has one claimant, held inline).
    claims: BTreeMap<IpAddr, SmallVec<[Arc<ObjectKey>; 1]>>,
    /// Addresses more than one pod claims.
    contested: BTreeSet<IpAddr>,
    /// Local pods -> the key of their table.
    local: BTreeMap<ObjectKey, TableKey>,
    layouts: HashMap<TableKey, Layout>,
    /// Whether the state above reflects a compile (false until the first).
    primed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PodFacts {
    /// The identity's number.
    identity: u32,
    ips: Box<[IpAddr]>,
}

impl Compiler {
    /// A compiler whose first compile numbers things as a compile after `previous`
    /// would.
    #[must_use]
    pub fn new(scope: Scope, previous: super::Ids) -> Self {
        Self {
            scope,
            compiled: Compiled {
                ids: previous,
                ..Compiled::default()
            },
            pods: HashMap::new(),
            identity_pods: BTreeMap::new(),
            identity_keys: HashMap::new(),
            claims: BTreeMap::new(),
            contested: BTreeSet::new(),
            local: BTreeMap::new(),
            layouts: HashMap::new(),
            primed: false,
        }
    }

    /// The result of the last compile.
    #[must_use]
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// Brings the tables up to `snapshot`, which differs from the last compiled one by
    /// `changes` (at most).
    pub fn compile(&mut self, snapshot: &Snapshot, changes: &Changes) -> &Compiled {
        let everything;
        let changes = if changes.everything || !self.primed {
            everything = self.start_over(snapshot);
            &everything
        } else {
            changes
        };
        self.primed = true;
        let ranked = Ranked::of(snapshot);

        let moved = if changes.everything {
            // Every pod, without a list of every key: the cluster may be large.
            let gone: Vec<ObjectKey> = self
                .pods
                .keys()
                .filter(|key| !snapshot.pods.contains_key(&***key))
                .map(|key| ObjectKey::clone(key))
                .collect();
            self.update_pods(snapshot, snapshot.pods.keys().chain(&gone))
        } else {
            self.update_pods(snapshot, changes.pods.iter())
        };
        let local_stale = self.update_local(snapshot, &ranked, changes);
        let stale = self.stale_layouts(snapshot, &ranked, changes, &moved);
        let relaid = self.relay(snapshot, &ranked, &stale, &local_stale);
        if relaid || changes.cluster_policies {
            self.redo_domains(&ranked);
        }
        self.compiled.tables.tier_rules = ranked.rules;
        &self.compiled
    }

    /// The changes that make this compile redo everything (every namespace, policy,
    /// cached table, cluster policy and service; the pods are walked directly). The
    /// numbers stay, as the previous ones.
    fn start_over(&mut self, snapshot: &Snapshot) -> Changes {
        let mut changes = Changes {
            everything: true,
            cluster_policies: true,
            services: true,
            ..Changes::default()
        };
        changes
            .namespaces
            .extend(snapshot.namespaces.keys().cloned());
        changes.policies.extend(snapshot.policies.keys().cloned());
        for key in self.layouts.keys() {
            changes.policies.extend(key.policies.iter().cloned());
        }
        changes
    }

    /// Updates identities and address owners for the changed pods. Returns what moved.
    fn update_pods<'k>(
        &mut self,
        snapshot: &Snapshot,
        changed: impl Iterator<Item = &'k ObjectKey>,
    ) -> Moved {
        let mut candidates: BTreeSet<IdentityKey> = BTreeSet::new();
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        // Pods that now take part, numbered once the identities are; their identities
        // held once each (the first compile sees every pod of the cluster here).
        let mut joined: Vec<(Arc<ObjectKey>, usize, Box<[IpAddr]>)> = Vec::new();
        let mut joined_identities: HashMap<IdentityKey, usize> = HashMap::new();
        for key in changed {
            let now = snapshot
                .pods
                .get(key)
                .filter(|pod| pod.takes_part())
                .map(|pod| (IdentityKey::of(pod), pod.ips.clone().into_boxed_slice()));
            if let (Some(before), Some((identity, ips))) = (self.pods.get(key), &now)
                && before.ips == *ips
                && self.identity_keys.get(&before.identity) == Some(identity)
            {
                continue;
            }
            if let Some(identity) = self.release(key, &mut touched) {
                candidates.insert(identity);
            }
            if let Some((identity, ips)) = now {
                let key = self.claim(key, &identity, &ips, &mut touched);
                let next = joined_identities.len();
                let index = if let Some(index) = joined_identities.get(&identity) {
                    *index
                } else {
                    candidates.insert(identity.clone());
                    joined_identities.insert(identity, next);
                    next
                };
                joined.push((key, index, ips));
            }
        }
        let allocator = &mut self.compiled.ids.identities;
        let (removed, added): (Vec<IdentityKey>, Vec<IdentityKey>) = candidates
            .into_iter()
            .filter(|key| allocator.contains(key) != self.identity_pods.contains_key(key))
            .partition(|key| allocator.contains(key));
        for key in &removed {
            if let Some(number) = allocator.get(key) {
                self.identity_keys.remove(&number);
            }
        }
        allocator.advance(&removed, added.iter().cloned(), 1);
        for key in &added {
            self.identity_keys.insert(allocator.id(key), key.clone());
        }
        let mut numbers = vec![0; joined_identities.len()];
        for (identity, index) in joined_identities {
            numbers[index] = allocator.id(&identity);
        }
        for (key, index, ips) in joined {
            self.pods.insert(
                key,
                PodFacts {
                    identity: numbers[index],
                    ips,
                },
            );
        }

        self.settle_addresses(&touched);
        Moved {
            identities: removed.into_iter().chain(added).collect(),
            addresses: touched,
        }
    }

    /// Forgets what pod `key` took part with: its identity's count and the addresses
    /// it claimed (added to `touched`). Returns its identity.
    fn release(&mut self, key: &ObjectKey, touched: &mut BTreeSet<IpAddr>) -> Option<IdentityKey> {
        let (key, before) = self.pods.remove_entry(key)?;
        let identity = self.identity_keys[&before.identity].clone();
        if let Some(count) = self.identity_pods.get_mut(&identity) {
            *count -= 1;
            if *count == 0 {
                self.identity_pods.remove(&identity);
            }
        }
        for ip in &before.ips {
            if let Some(claimants) = self.claims.get_mut(ip) {
                claimants.retain(|claimant| *claimant != key);
                if claimants.is_empty() {
                    self.claims.remove(ip);
                }
            }
            touched.insert(*ip);
        }
        Some(identity)
    }

    /// Counts pod `key` under `identity` and claims its addresses (added to
    /// `touched`). Returns the key, shared.
    fn claim(
        &mut self,
        key: &ObjectKey,
        identity: &IdentityKey,
        ips: &[IpAddr],
        touched: &mut BTreeSet<IpAddr>,
    ) -> Arc<ObjectKey> {
        let key = Arc::new(key.clone());
        if let Some(count) = self.identity_pods.get_mut(identity) {
            *count += 1;
        } else {
            self.identity_pods.insert(identity.clone(), 1);
        }
        for ip in ips {
            let claimants = self.claims.entry(*ip).or_default();
            if let Err(at) = claimants.binary_search(&key) {
                claimants.insert(at, Arc::clone(&key));
            }
            touched.insert(*ip);
        }
        key
    }

    /// Writes the identity of each touched address's owner (or removes the address).
    fn settle_addresses(&mut self, touched: &BTreeSet<IpAddr>) {
        let table = &mut self.compiled.tables.identities;
        for ip in touched {
            let claimants = self.claims.get(ip);
            if claimants.is_some_and(|c| c.len() > 1) {
                self.contested.insert(*ip);
            } else {
                self.contested.remove(ip);
            }
            let owner = claimants.and_then(|claimants| claimants.first());
            match owner.and_then(|owner| self.pods.get(&**owner)) {
                Some(facts) => {
                    table.insert(*ip, facts.identity);
                }
                None => {
                    table.remove(ip);
                }
            }
        }
        if !touched.is_empty() {
            self.compiled.address_conflicts = self.address_conflicts();
        }
    }

    /// Pods whose address another pod already claims, in the order the full compile
    /// finds them (by pod, then by the pod's address order).
    fn address_conflicts(&self) -> Vec<(ObjectKey, IpAddr)> {
        let mut conflicts: Vec<(&ObjectKey, usize, IpAddr)> = self
            .contested
            .iter()
            .filter_map(|ip| Some((ip, self.claims.get(ip)?)))
            .flat_map(|(ip, claimants)| {
                claimants.iter().skip(1).map(move |pod| {
                    let pod: &ObjectKey = pod;
                    let position = self.pods[pod].ips.iter().position(|i| i == ip);
                    (pod, position.unwrap_or(usize::MAX), *ip)
                })
            })
            .collect();
        conflicts.sort();
        conflicts
            .into_iter()
            .map(|(pod, _, ip)| (pod.clone(), ip))
            .collect()
    }

    /// Recomputes the table keys of the local pods a change may move; numbers the
    /// endpoints. Returns the local pods whose entries must be rewritten.
    fn update_local(
        &mut self,
        snapshot: &Snapshot,
        ranked: &Ranked<'_>,
        changes: &Changes,
    ) -> BTreeSet<ObjectKey> {
        let everyone = changes.cluster_policies
            || (!changes.namespaces.is_empty() && !snapshot.cluster_policies.is_empty());
        let mut recheck: BTreeSet<ObjectKey> = if everyone {
            self.local
                .keys()
                .cloned()
                .chain(
                    snapshot
                        .pods
                        .values()
                        .filter(|p| self.scope.includes(p))
                        .map(Pod::key),
                )
                .collect()
        } else {
            changes.pods.clone()
        };
        for policy in &changes.policies {
            let first = ObjectKey::new(policy.namespace.clone(), String::new());
            recheck.extend(
                self.local
                    .range(first..)
                    .take_while(|(pod, _)| pod.namespace == policy.namespace)
                    .map(|(pod, _)| pod.clone()),
            );
        }
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for key in &recheck {
            let pod = snapshot
                .pods
                .get(key)
                .filter(|pod| pod.takes_part() && self.scope.includes(pod));
            match pod {
                Some(pod) => {
                    let (table, _, _) = TableKey::of(snapshot, ranked, pod);
                    if self.local.insert(key.clone(), table).is_none() {
                        added.push(key.clone());
                    }
                }
                None => {
                    if self.local.remove(key).is_some() {
                        removed.push(key.clone());
                    }
                }
            }
        }
        self.compiled.ids.endpoints.advance(&removed, added, 1);
        recheck
    }

    /// The cached layouts a change makes stale.
    fn stale_layouts(
        &self,
        snapshot: &Snapshot,
        ranked: &Ranked<'_>,
        changes: &Changes,
        moved: &Moved,
    ) -> BTreeSet<TableKey> {
        if changes.everything {
            return self.layouts.keys().cloned().collect();
        }
        let backends_moved = !moved.addresses.is_empty()
            && snapshot.endpoint_slices.values().any(|slice| {
                slice
                    .ready_addresses
                    .iter()
                    .any(|ip| moved.addresses.contains(ip))
            });
        let cluster_named_ports = ranked.policies.iter().any(|(policy, _)| {
            policy.egress.iter().any(|rule| {
                rule.protocols
                    .iter()
                    .any(|p| matches!(p.port, PortSpec::Named(_)))
            })
        });
        self.layouts
            .iter()
            .filter(|(key, layout)| {
                let tiered = !key.cluster_policies.is_empty();
                let judges_services = layout.program.flags != 0;
                key.policies.iter().any(|id| changes.policies.contains(id))
                    || (tiered && changes.cluster_policies)
                    || (tiered && !moved.identities.is_empty())
                    || (tiered && cluster_named_ports && !moved.addresses.is_empty())
                    || (tiered && !changes.namespaces.is_empty())
                    || (judges_services && (changes.services || backends_moved))
                    || key.policies.iter().any(|id| {
                        snapshot.policies.get(id).is_none_or(|policy| {
                            policy_is_touched(snapshot, policy, changes, moved)
                        })
                    })
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Rebuilds stale and new layouts, drops unused ones, and rewrites the tables and
    /// endpoint entries they change. True when any table or endpoint entry changed.
    fn relay(
        &mut self,
        snapshot: &Snapshot,
        ranked: &Ranked<'_>,
        stale: &BTreeSet<TableKey>,
        local_stale: &BTreeSet<ObjectKey>,
    ) -> bool {
        let used: BTreeSet<&TableKey> = self.local.values().collect();
        let gone: Vec<TableKey> = self
            .layouts
            .keys()
            .filter(|key| !used.contains(key))
            .cloned()
            .collect();
        let fresh: BTreeSet<TableKey> = used
            .iter()
            .filter(|key| !self.layouts.contains_key(**key) || stale.contains(**key))
            .map(|key| (*key).clone())
            .collect();
        for key in &gone {
            self.layouts.remove(key);
        }
        let mut rebuilt = Vec::with_capacity(fresh.len());
        if !fresh.is_empty() {
            let identity_keys: Vec<(u32, &IdentityKey)> = self
                .identity_pods
                .keys()
                .map(|key| (self.compiled.ids.identities.id(key), key))
                .collect();
            let identities = IdentityIndex::new(snapshot, identity_keys);
            // Only named ports in address rules read who owns an address: most
            // changes need not walk every pod for it.
            let owners = if fresh.iter().any(|key| reads_owners(snapshot, ranked, key)) {
                self.owners(snapshot)
            } else {
                BTreeMap::new()
            };
            for key in &fresh {
                let pod = self
                    .local
                    .iter()
                    .find(|(_, table)| *table == key)
                    .and_then(|(pod, _)| snapshot.pods.get(pod))
                    .expect("a used table has a local pod");
                let (_, selecting, selecting_cluster) = TableKey::of(snapshot, ranked, pod);
                let layout = Layout::build(
                    snapshot,
                    &owners,
                    &identities,
                    &self.compiled.tables.identities,
                    &selecting,
                    &selecting_cluster,
                );
                rebuilt.push((key.clone(), layout));
            }
        }

        // Tables and classes are numbered as the full compile numbers them.
        let allocator = &mut self.compiled.ids.tables;
        let removed: Vec<TableKey> = gone.clone();
        let added: Vec<TableKey> = fresh
            .iter()
            .filter(|key| !allocator.contains(key))
            .cloned()
            .collect();
        let rewritten: Vec<u32> = gone
            .iter()
            .chain(&fresh)
            .filter_map(|key| allocator.get(key))
            .collect();
        allocator.advance(&removed, added, 1);
        self.layouts.extend(rebuilt);
        self.number_classes();

        for table in rewritten {
            remove_table(&mut self.compiled.tables, table);
        }
        for key in &fresh {
            let table = self.compiled.ids.tables.id(key);
            self.layouts[key].write(&mut self.compiled.tables, &self.compiled.ids.classes, table);
        }

        // Endpoint entries: of the pods that moved, and of every pod whose table was
        // re-laid (its flags and isolating policies come from the layout).
        let endpoints = &mut self.compiled.tables.endpoints;
        let before = endpoints.len();
        endpoints.retain(|pod, _| self.local.contains_key(pod));
        let mut changed = !gone.is_empty() || !fresh.is_empty() || endpoints.len() != before;
        for (pod_key, table_key) in &self.local {
            if !local_stale.contains(pod_key)
                && !fresh.contains(table_key)
                && endpoints.contains_key(pod_key)
            {
                continue;
            }
            let Some(pod) = snapshot.pods.get(pod_key) else {
                continue;
            };
            let entry = EndpointEntry::of(
                pod,
                self.compiled.ids.endpoints.id(pod_key),
                self.compiled.ids.tables.id(table_key),
                &self.layouts[table_key].program,
                table_key.cluster_policies.clone(),
            );
            endpoints.insert(pod_key.clone(), entry);
            changed = true;
        }
        changed
    }

    /// Lays out the domain names of every table again (their entries follow from the
    /// tables' ClusterNetworkPolicies and are few), numbered as the full compile numbers
    /// them.
    fn redo_domains(&mut self, ranked: &Ranked<'_>) {
        let tables = &mut self.compiled.tables;
        let with_domains: BTreeSet<u32> = tables.domains.keys().map(|(table, _)| *table).collect();
        for table in with_domains {
            let first = PolicyEntryKey {
                table,
                identity: DOMAIN_IDENTITY_BIT,
                ports: PortPrefix::AnyProtocol,
            };
            let domain_entries: Vec<PolicyEntryKey> = tables
                .policy
                .range(first..)
                .take_while(|(key, _)| {
                    key.table == table && key.identity & DOMAIN_IDENTITY_BIT != 0
                })
                .map(|(key, _)| *key)
                .collect();
            for key in domain_entries {
                tables.policy.remove(&key);
            }
        }
        tables.domains.clear();
        for entry in tables.endpoints.values_mut() {
            entry.flags &= !ENDPOINT_FLAG_DOMAINS;
        }
        let previous = std::mem::take(&mut self.compiled.ids.domains);
        super::domains::add(&mut self.compiled, &previous, ranked);
    }

    /// Numbers every class of every layout by content, as the full compile does.
    fn number_classes(&mut self) {
        let signatures: BTreeSet<&Grants> = self
            .layouts
            .values()
            .flat_map(|layout| &layout.classes.grants)
            .collect();
        let allocator = &mut self.compiled.ids.classes;
        let removed: Vec<Grants> = allocator
            .keys()
            .filter(|grants| !signatures.contains(grants))
            .cloned()
            .collect();
        let added: Vec<Grants> = signatures
            .into_iter()
            .filter(|grants| !allocator.contains(grants))
            .cloned()
            .collect();
        allocator.advance(&removed, added, 1);
    }

    /// Address -> owning pod, for the layouts that read owners.
    fn owners<'s>(&self, snapshot: &'s Snapshot) -> BTreeMap<IpAddr, &'s Pod> {
        self.claims
            .iter()
            .filter_map(|(ip, claimants)| {
                let owner: &ObjectKey = claimants.first()?;
                Some((*ip, snapshot.pods.get(owner)?))
            })
            .collect()
    }
}

/// What the pod changes of one step moved.
struct Moved {
    /// Identities that appeared or vanished.
    identities: Vec<IdentityKey>,
    /// Addresses whose claimants changed.
    addresses: BTreeSet<IpAddr>,
}

/// Whether a policy's compiled rules may read what moved: identities its selector
/// peers choose (or all identities, for a rule to anywhere with named ports), the
/// labels of namespaces its namespace selectors read, and owners of addresses inside
/// its ipBlocks when a rule has named ports.
fn policy_is_touched(
    snapshot: &Snapshot,
    policy: &NetworkPolicy,
    changes: &Changes,
    moved: &Moved,
) -> bool {
    policy.egress.iter().any(|rule| {
        let has_named = rule
            .ports
            .iter()
            .any(|p| matches!(p.port, PortSpec::Named(_)));
        if rule.to.is_empty() {
            return has_named && !moved.identities.is_empty();
        }
        rule.to.iter().any(|peer| match peer {
            Peer::Block(block) => {
                has_named
                    && moved
                        .addresses
                        .range(block.cidr.network()..=block.cidr.broadcast())
                        .next()
                        .is_some()
            }
            Peer::Pods(peer) => {
                (peer.namespaces.is_some() && !changes.namespaces.is_empty())
                    || moved.identities.iter().any(|key| {
                        peer.matches(
                            &policy.id.namespace,
                            key,
                            &snapshot.namespace_labels(&key.namespace),
                        )
                    })
            }
        })
    })
}

/// Whether the layout of `key` reads address owners: a rule with named ports and
/// address peers (the named ports resolve on the pods inside them).
fn reads_owners(snapshot: &Snapshot, ranked: &Ranked<'_>, key: &TableKey) -> bool {
    let named = |ports: &[crate::policy::PortMatch]| {
        ports.iter().any(|p| matches!(p.port, PortSpec::Named(_)))
    };
    let policies = key
        .policies
        .iter()
        .filter_map(|id| snapshot.policies.get(id))
        .any(|policy| {
            policy.egress.iter().any(|rule| {
                named(&rule.ports) && rule.to.iter().any(|peer| matches!(peer, Peer::Block(_)))
            })
        });
    let cluster = ranked
        .policies
        .iter()
        .filter(|(policy, _)| key.cluster_policies.contains(&policy.name))
        .any(|(policy, _)| policy.egress.iter().any(|rule| named(&rule.protocols)));
    policies || cluster
}

/// Removes every CIDR and policy entry of `table`.
fn remove_table(tables: &mut super::Tables, table: u32) {
    let first = PolicyEntryKey {
        table,
        identity: 0,
        ports: PortPrefix::AnyProtocol,
    };
    let policy: Vec<PolicyEntryKey> = tables
        .policy
        .range(first..)
        .take_while(|(key, _)| key.table == table)
        .map(|(key, _)| *key)
        .collect();
    for key in policy {
        tables.policy.remove(&key);
    }
    let lowest = IpNet::V4(Ipv4Net::default());
    let cidrs: Vec<(u32, IpNet)> = tables
        .cidrs
        .range((table, lowest)..)
        .take_while(|((t, _), _)| *t == table)
        .map(|(key, _)| *key)
        .collect();
    for key in cidrs {
        tables.cidrs.remove(&key);
    }
}
