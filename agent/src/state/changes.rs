//! Which objects of a snapshot changed since it was last compiled: what the incremental
//! compiler needs to know to recompile only what a change touches.

use std::collections::{BTreeMap, BTreeSet};

use super::{Object, ObjectId, ObjectKey, Snapshot};
use crate::policy::PolicyRef;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Anything may have changed: compile the whole snapshot.
    pub everything: bool,
    pub pods: BTreeSet<ObjectKey>,
    /// Namespaces whose labels may have changed (or that came or went).
    pub namespaces: BTreeSet<String>,
    pub policies: BTreeSet<PolicyRef>,
    pub cluster_policies: bool,
    /// A Service or an EndpointSlice.
    pub services: bool,
}

impl Changes {
    #[must_use]
    pub fn everything() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `object` was written (added or replaced).
    pub fn object(&mut self, object: &Object) {
        if self.everything {
            return;
        }
        match object {
            Object::Namespace(namespace) => {
                self.namespaces.insert(namespace.name.clone());
            }
            Object::Pod(pod) => {
                self.pods.insert(pod.key());
            }
            Object::Policy(policy) => {
                self.policies.insert(policy.id.clone());
            }
            Object::ClusterPolicy(_) => self.cluster_policies = true,
            Object::Service(_) | Object::EndpointSlice(_) => self.services = true,
        }
    }

    /// The object `id` names was written or deleted.
    pub fn id(&mut self, id: &ObjectId) {
        if self.everything {
            return;
        }
        let key = &id.key;
        match id.kind {
            "Namespace" => {
                self.namespaces.insert(key.name.clone());
            }
            "Pod" => {
                self.pods.insert(key.clone());
            }
            "NetworkPolicy" => {
                self.policies.insert(PolicyRef {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            }
            "ClusterNetworkPolicy" => self.cluster_policies = true,
            "Service" | "EndpointSlice" => self.services = true,
            // A kind the compiler does not read.
            _ => {}
        }
    }

    /// A list replaced every object of a kind (the first list, or a re-list after the
    /// watch was lost): compile everything rather than note every object.
    pub fn relisted(&mut self) {
        *self = Self::everything();
    }

    /// What differs between two snapshots (a source that replaces the whole of it).
    #[must_use]
    pub fn between(before: &Snapshot, after: &Snapshot) -> Self {
        if before.pods.is_empty() && before.policies.is_empty() {
            // The first read: everything is new, and noting each key would only hold a
            // copy of every one of them until the compile.
            return Self::everything();
        }
        Self {
            everything: false,
            pods: differing(&before.pods, &after.pods),
            namespaces: differing(&before.namespaces, &after.namespaces),
            policies: differing(&before.policies, &after.policies),
            cluster_policies: before.cluster_policies != after.cluster_policies,
            services: before.services != after.services
                || before.endpoint_slices != after.endpoint_slices,
        }
    }

    pub fn absorb(&mut self, other: Changes) {
        if self.everything || other.everything {
            *self = Self::everything();
            return;
        }
        self.pods.extend(other.pods);
        self.namespaces.extend(other.namespaces);
        self.policies.extend(other.policies);
        self.cluster_policies |= other.cluster_policies;
        self.services |= other.services;
    }
}

/// Keys present in one map and not the other, or with different values.
fn differing<K: Ord + Clone, V: PartialEq>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> BTreeSet<K> {
    let gone_or_changed = before
        .iter()
        .filter(|(key, value)| after.get(*key) != Some(*value))
        .map(|(key, _)| key.clone());
    let added = after
        .keys()
        .filter(|key| !before.contains_key(*key))
        .cloned();
    gone_or_changed.chain(added).collect()
}
