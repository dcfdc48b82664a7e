//! Where cluster state comes from: the API server or a manifest directory. Sources
//! only send [`Update`]s; the reconcile loop owns the snapshot and applies them.

pub mod kube;
pub mod manifest;
pub mod objects;

use std::time::Instant;

use crate::state::Snapshot;
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
    Synced {
        source: &'static str,
    },
    WatchRestarted {
        kind: &'static str,
    },
}

impl Update {
    /// Applies the update to `snapshot`.
    pub fn apply(self, snapshot: &mut Snapshot) -> Signal {
        match self {
            Update::Replace {
                snapshot: fresh,
                problems,
                received,
            } => {
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
                snapshot.replace_kind(kind, objects);
                Signal::Changed {
                    received,
                    problems: None,
                }
            }
            Update::Apply { object, received } => {
                snapshot.apply(object);
                Signal::Changed {
                    received,
                    problems: None,
                }
            }
            Update::Delete { id, received } => {
                snapshot.delete(&id);
                Signal::Changed {
                    received,
                    problems: None,
                }
            }
            Update::Poke { received } => Signal::Changed {
                received,
                problems: None,
            },
            Update::Synced { source } => Signal::Synced { source },
            Update::WatchRestarted { kind } => Signal::WatchRestarted { kind },
        }
    }
}
