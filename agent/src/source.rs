//! Where cluster state comes from: the API server or a manifest directory. Sources
//! only send [`Update`]s; the reconcile loop owns the snapshot and applies them.

pub mod kube;
pub mod manifest;
pub mod objects;
pub mod trimmed;

use std::{collections::BTreeMap, time::Instant};

use crate::state::{Changes, Snapshot};
pub use crate::state::{Object, ObjectId};

#[derive(Debug)]
pub enum Update {
    /// Everything, afresh (a manifest directory re-read), with what was wrong in it.
    Replace {
        snapshot: Box<Snapshot>,
        problems: Vec<String>,
        received: Instant,
    },
    /// Every object of one kind, afresh (an API list, first or after a re-list).
    ReplaceKind {
        kind: &'static str,
        objects: Vec<Object>,
        received: Instant,
    },
    Apply {
        object: Object,
        received: Instant,
    },
    Delete {
        id: ObjectId,
        received: Instant,
    },
    /// Something outside the snapshot changed (links, routes): reconcile soon.
    Poke {
        received: Instant,
    },
    /// A source has delivered its first complete view.
    Synced {
        source: &'static str,
    },
    /// A watch failed and is being restarted (counted).
    WatchRestarted {
        kind: &'static str,
    },
    /// `source` could not be read: it delivers nothing until it recovers, and what it
    /// delivered last stays in the snapshot (and in the kernel). Sent at each failure.
    Failed {
        source: &'static str,
        problem: String,
    },
    /// `source` reads again after failing.
    Recovered {
        source: &'static str,
    },
}

/// What an update means once applied to the snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    /// The snapshot (or the node's links) changed; `problems` when the source re-read
    /// everything and reported these.
    Changed {
        received: Instant,
        problems: Option<Vec<String>>,
    },
    /// The update held nothing new (a re-read of unchanged files, an object as it
    /// already was): no reconcile is due.
    Unchanged {
        problems: Option<Vec<String>>,
    },
    Synced {
        source: &'static str,
    },
    WatchRestarted {
        kind: &'static str,
    },
    Failed {
        source: &'static str,
        problem: String,
    },
    Recovered {
        source: &'static str,
    },
}

impl Update {
    /// Applies the update to `snapshot`, noting in `changes` which objects it changed.
    pub fn apply(self, snapshot: &mut Snapshot, changes: &mut Changes) -> Signal {
        let signal_changed = |received| Signal::Changed {
            received,
            problems: None,
        };
        match self {
            Update::Replace {
                snapshot: fresh,
                problems,
                received,
            } => {
                if *snapshot == *fresh {
                    return Signal::Unchanged {
                        problems: Some(problems),
                    };
                }
                changes.absorb(Changes::between(snapshot, &fresh));
                *snapshot = *fresh;
                Signal::Changed {
                    received,
                    problems: Some(problems),
                }
            }
            Update::ReplaceKind {
                kind,
                objects,
                received,
            } => {
                if count_of(snapshot, kind) == Some(objects.len())
                    && objects.iter().all(|object| holds(snapshot, object))
                {
                    return Signal::Unchanged { problems: None };
                }
                changes.relisted();
                snapshot.replace_kind(kind, objects);
                signal_changed(received)
            }
            Update::Apply { object, received } => {
                if holds(snapshot, &object) {
                    return Signal::Unchanged { problems: None };
                }
                changes.object(&object);
                snapshot.apply(object);
                signal_changed(received)
            }
            Update::Delete { id, received } => {
                let before = count_of(snapshot, id.kind);
                changes.id(&id);
                snapshot.delete(&id);
                if before.is_some() && count_of(snapshot, id.kind) == before {
                    return Signal::Unchanged { problems: None };
                }
                signal_changed(received)
            }
            Update::Poke { received } => signal_changed(received),
            Update::Synced { source } => Signal::Synced { source },
            Update::WatchRestarted { kind } => Signal::WatchRestarted { kind },
            Update::Failed { source, problem } => Signal::Failed { source, problem },
            Update::Recovered { source } => Signal::Recovered { source },
        }
    }
}

/// How many objects of `kind` the snapshot holds; `None` for a kind not counted here,
/// whose updates always count as changes.
fn count_of(snapshot: &Snapshot, kind: &str) -> Option<usize> {
    match kind {
        "Namespace" => Some(snapshot.namespaces.len()),
        "Pod" => Some(snapshot.pods.len()),
        "NetworkPolicy" => Some(snapshot.policies.len()),
        "ClusterNetworkPolicy" => Some(snapshot.cluster_policies.len()),
        "Service" => Some(snapshot.services.len()),
        "EndpointSlice" => Some(snapshot.endpoint_slices.len()),
        _ => None,
    }
}

/// The snapshot already holds `object` exactly as given: applying it changes nothing.
/// (Pod status and other fields the snapshot trims change often; such updates must not
/// cost a reconcile.) An object of a kind not compared here is never held.
fn holds(snapshot: &Snapshot, object: &Object) -> bool {
    fn within<K: Ord, V: PartialEq>(part: &BTreeMap<K, V>, whole: &BTreeMap<K, V>) -> bool {
        part.iter()
            .all(|(key, value)| whole.get(key) == Some(value))
    }
    // Inserted alone, as the snapshot would insert it (defaults included).
    let mut alone = Snapshot::default();
    alone.apply(object.clone());
    let compared = alone.namespaces.len()
        + alone.pods.len()
        + alone.policies.len()
        + alone.cluster_policies.len()
        + alone.services.len()
        + alone.endpoint_slices.len();
    compared == 1
        && within(&alone.namespaces, &snapshot.namespaces)
        && within(&alone.pods, &snapshot.pods)
        && within(&alone.policies, &snapshot.policies)
        && within(&alone.cluster_policies, &snapshot.cluster_policies)
        && within(&alone.services, &snapshot.services)
        && within(&alone.endpoint_slices, &snapshot.endpoint_slices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mk_pod, mk_policy};

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn updates_that_change_nothing_signal_nothing() {
        let mut snapshot = Snapshot::default();
        let pod = mk_pod("shop", "web", &[("app", "web")], &["10.0.0.1"]);
        let apply = |object: Object| Update::Apply {
            object,
            received: now(),
        };
        assert!(matches!(
            apply(Object::Pod(pod.clone())).apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));
        assert!(matches!(
            apply(Object::Pod(pod.clone())).apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged { .. }
        ));
        let relabelled = mk_pod("shop", "web", &[("app", "db")], &["10.0.0.1"]);
        assert!(matches!(
            apply(Object::Pod(relabelled)).apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));
        let namespace = crate::state::Namespace {
            name: "shop".into(),
            ..Default::default()
        };
        assert!(matches!(
            apply(Object::Namespace(namespace.clone()))
                .apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));
        assert!(
            matches!(
                apply(Object::Namespace(namespace)).apply(&mut snapshot, &mut Changes::default()),
                Signal::Unchanged { .. }
            ),
            "the name label the snapshot adds is no change"
        );

        let same = Update::Replace {
            snapshot: Box::new(snapshot.clone()),
            problems: vec!["a problem".into()],
            received: now(),
        };
        assert_eq!(
            same.apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged {
                problems: Some(vec!["a problem".into()])
            }
        );
        let relist = Update::ReplaceKind {
            kind: "Pod",
            objects: snapshot.pods.values().cloned().map(Object::Pod).collect(),
            received: now(),
        };
        assert!(matches!(
            relist.apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged { .. }
        ));
        let shorter = Update::ReplaceKind {
            kind: "Pod",
            objects: Vec::new(),
            received: now(),
        };
        assert!(matches!(
            shorter.apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));

        let policy = mk_policy(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec: {podSelector: {}}\n",
        );
        let id = ObjectId {
            kind: "NetworkPolicy",
            key: crate::state::ObjectKey::new("shop", "p"),
        };
        let delete = || Update::Delete {
            id: id.clone(),
            received: now(),
        };
        assert!(matches!(
            delete().apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged { .. }
        ));
        apply(Object::Policy(policy)).apply(&mut snapshot, &mut Changes::default());
        assert!(matches!(
            delete().apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));
    }

    #[test]
    fn updates_note_what_they_changed() {
        let mut snapshot = Snapshot::default();
        let web = mk_pod("shop", "web", &[("app", "web")], &["10.0.0.1"]);
        let mut changes = Changes::default();
        Update::Apply {
            object: Object::Pod(web.clone()),
            received: now(),
        }
        .apply(&mut snapshot, &mut changes);
        assert_eq!(changes.pods, [web.key()].into());

        // A source that replaces everything: only what differs is noted.
        let mut fresh = snapshot.clone();
        let db = mk_pod("shop", "db", &[("app", "db")], &["10.0.0.2"]);
        fresh.insert_pod(db.clone());
        let mut changes = Changes::default();
        Update::Replace {
            snapshot: Box::new(fresh),
            problems: Vec::new(),
            received: now(),
        }
        .apply(&mut snapshot, &mut changes);
        assert_eq!(changes.pods, [db.key()].into());
        assert!(changes.policies.is_empty() && !changes.everything);

        let mut changes = Changes::default();
        Update::Delete {
            id: ObjectId {
                kind: "Pod",
                key: web.key(),
            },
            received: now(),
        }
        .apply(&mut snapshot, &mut changes);
        assert_eq!(changes.pods, [web.key()].into());
    }

    fn mk_cluster_policy(name: &str, priority: u32) -> Object {
        let object: crate::policy::cluster::convert::ClusterNetworkPolicyObject =
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}}}\nspec: {{tier: Admin, priority: {priority}, subject: {{namespaces: {{}}}}, egress: [{{action: Deny, to: [{{networks: [10.0.0.0/8]}}]}}]}}\n"
            ))
            .unwrap();
        let converted = crate::policy::cluster::convert::cluster_network_policy(&object).unwrap();
        Object::ClusterPolicy(converted.policy)
    }

    #[test]
    fn cluster_policies_are_applied_replaced_and_deleted_by_name() {
        let mut snapshot = Snapshot::default();
        let apply = |object: Object, snapshot: &mut Snapshot| {
            Update::Apply {
                object,
                received: now(),
            }
            .apply(snapshot, &mut Changes::default())
        };
        assert!(matches!(
            apply(mk_cluster_policy("guard", 10), &mut snapshot),
            Signal::Changed { .. }
        ));
        assert_eq!(snapshot.cluster_policies["guard"].priority, 10);
        assert!(
            matches!(
                apply(mk_cluster_policy("guard", 10), &mut snapshot),
                Signal::Unchanged { .. }
            ),
            "an unchanged ClusterNetworkPolicy costs no reconcile"
        );
        assert!(matches!(
            apply(mk_cluster_policy("guard", 20), &mut snapshot),
            Signal::Changed { .. }
        ));
        assert_eq!(snapshot.cluster_policies["guard"].priority, 20);

        let relist = |objects: Vec<Object>| Update::ReplaceKind {
            kind: "ClusterNetworkPolicy",
            objects,
            received: now(),
        };
        assert!(matches!(
            relist(vec![mk_cluster_policy("guard", 20)])
                .apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged { .. }
        ));
        assert!(matches!(
            relist(vec![
                mk_cluster_policy("guard", 20),
                mk_cluster_policy("other", 5)
            ])
            .apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));

        let delete = |name: &str| Update::Delete {
            id: ObjectId {
                kind: "ClusterNetworkPolicy",
                key: crate::state::ObjectKey::new("", name),
            },
            received: now(),
        };
        assert!(matches!(
            delete("other").apply(&mut snapshot, &mut Changes::default()),
            Signal::Changed { .. }
        ));
        assert!(matches!(
            delete("other").apply(&mut snapshot, &mut Changes::default()),
            Signal::Unchanged { .. }
        ));
        assert_eq!(
            snapshot.cluster_policies.keys().collect::<Vec<_>>(),
            ["guard"]
        );
        assert!(
            snapshot.policies.is_empty(),
            "NetworkPolicies are a kind apart"
        );
    }
}
