//! Stable numbers for endpoints, identities and CIDR classes across compilations.

use std::collections::{BTreeMap, BTreeSet};

use super::{Grants, IdentityKey, TableKey};
use crate::state::ObjectKey;

/// Numbers handed out to keys. A key keeps its number while it exists; a new key never
/// gets a number the previous allocation used, so one update never gives an old number
/// a new meaning while the kernel may still hold the old one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocator<K: Ord> {
    ids: BTreeMap<K, u32>,
    /// Numbers in use by a holder this allocation does not know (the kernel's tables
    /// as a restarted agent finds them): never handed out by the next `reassign`.
    reserved: BTreeSet<u32>,
}

impl<K: Ord> Default for Allocator<K> {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            reserved: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone> Allocator<K> {
    /// An empty allocation whose next `reassign` avoids `numbers`.
    #[must_use]
    pub fn reserving(numbers: impl IntoIterator<Item = u32>) -> Self {
        Self {
            ids: BTreeMap::new(),
            reserved: numbers.into_iter().collect(),
        }
    }

    /// The allocation for exactly `keys`, numbering new keys from `first` up.
    #[must_use]
    pub fn reassign(&self, keys: impl IntoIterator<Item = K>, first: u32) -> Self {
        let keys: BTreeSet<K> = keys.into_iter().collect();
        let mut used: BTreeSet<u32> = self.ids.values().chain(&self.reserved).copied().collect();
        let mut ids = BTreeMap::new();
        let mut fresh = Vec::new();
        for key in keys {
            match self.ids.get(&key) {
                Some(id) => {
                    ids.insert(key, *id);
                }
                None => fresh.push(key),
            }
        }
        let mut next = first;
        for key in fresh {
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            ids.insert(key, next);
        }
        Self {
            ids,
            reserved: BTreeSet::new(),
        }
    }

    /// Moves the allocation on by a change of its keys: what [`reassign`] gives for
    /// the keys held, less `removed`, plus `added`, without walking the keys that stay.
    /// `added` must hold only keys the allocation does not, `removed` only keys it does.
    ///
    /// [`reassign`]: Allocator::reassign
    pub fn advance(&mut self, removed: &[K], added: impl IntoIterator<Item = K>, first: u32) {
        let mut added: Vec<K> = added.into_iter().collect();
        added.sort_unstable();
        added.dedup();
        // As in `reassign`, the numbers of removed keys and the reserved ones stay out of
        // use for this one step.
        let mut used: BTreeSet<u32> = std::mem::take(&mut self.reserved);
        for key in removed {
            if let Some(number) = self.ids.remove(key) {
                used.insert(number);
            }
        }
        if added.is_empty() {
            return;
        }
        let mut held: BTreeSet<u32> = self.ids.values().copied().collect();
        held.extend(used);
        let mut next = first;
        for key in added {
            while held.contains(&next) {
                next += 1;
            }
            held.insert(next);
            self.ids.insert(key, next);
        }
    }

    #[must_use]
    pub fn contains(&self, key: &K) -> bool {
        self.ids.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.ids.keys()
    }

    /// The number of a key the allocation holds.
    ///
    /// # Panics
    /// When `key` was not part of the allocation: a compiler bug.
    #[must_use]
    pub fn id(&self, key: &K) -> u32 {
        self.ids[key]
    }

    #[must_use]
    pub fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.ids.iter().map(|(k, v)| (k, *v))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    pub endpoints: Allocator<ObjectKey>,
    pub identities: Allocator<IdentityKey>,
    pub classes: Allocator<Grants>,
    pub tables: Allocator<TableKey>,
    /// Domain patterns (`*.example.com`), numbered below `DOMAIN_IDENTITY_BIT`.
    pub domains: Allocator<String>,
}
