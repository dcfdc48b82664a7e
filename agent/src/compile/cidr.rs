//! An endpoint's address ranges -> CIDR classes for a longest-prefix-match trie.
//!
//! Every address's longest matching prefix, among all the cidrs and excepts of the
//! endpoint's blocks, decides which blocks hold it: a block holds the address exactly
//! when its cidr contains that prefix and none of its excepts does. So one class per
//! prefix is exact, `except` included, and each class carries the union of what the
//! blocks holding it allow.
//!
//! The prefixes are visited once, in trie preorder (sorted by address, then by length),
//! keeping the chain of prefixes that contain the current one on a stack: entering a
//! cidr adds its block's grants, entering an except takes them away again, and leaving
//! a prefix undoes what entering did. So the work is a sort plus one step per cidr and
//! except, however the ranges nest, overlap or repeat (cloud allow lists run to 100k).
//! Taking grants away by count, and computing each distinct union once, relies on
//! `merge_grants` being a join: commutative, associative and idempotent.

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use super::{BlockGrant, Grants, merge_grants, ports::close_over_prefixes};

/// The prefixes of an endpoint's CIDR trie, each naming one of a few distinct grants
/// (a 100k-range allow list has 100k prefixes but a handful of grants).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    /// `(prefix, index in grants)`, shortest prefixes first, then by address; host bits
    /// cleared.
    pub prefixes: Vec<(IpNet, usize)>,
    /// Distinct grants, each named by some prefix.
    pub grants: Vec<Grants>,
}

impl Classes {
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &Grants)> {
        self.prefixes
            .iter()
            .map(|(net, grants)| (*net, &self.grants[*grants]))
    }

    /// The grants the kernel's longest-prefix match finds for `ip`.
    #[must_use]
    pub fn longest_match(&self, ip: IpAddr) -> Option<&Grants> {
        let longest = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        (0..=longest).rev().find_map(|len| {
            let net = IpNet::new(ip, len)
                .expect("length within the family")
                .trunc();
            self.prefixes
                .binary_search_by_key(&(len, net), |(net, _)| (net.prefix_len(), *net))
                .ok()
                .map(|at| &self.grants[self.prefixes[at].1])
        })
    }

    /// Gives each network of `entries` exactly its grants there, in place of whatever
    /// the prefix had (Service addresses are judged apart from the blocks around them).
    pub fn replace(&mut self, entries: BTreeMap<IpNet, Grants>) {
        if entries.is_empty() {
            return;
        }
        self.prefixes.retain(|(net, _)| !entries.contains_key(net));
        let mut index: HashMap<Grants, usize> = self
            .grants
            .iter()
            .enumerate()
            .map(|(at, grants)| (grants.clone(), at))
            .collect();
        for (net, grants) in entries {
            let at = *index.entry(grants).or_insert_with_key(|grants| {
                self.grants.push(grants.clone());
                self.grants.len() - 1
            });
            self.prefixes.push((net, at));
        }
        self.prefixes
            .sort_unstable_by_key(|(net, _)| (net.prefix_len(), *net));
        // Keep every grant named: drop those only replaced prefixes named.
        let mut named = vec![None; self.grants.len()];
        let mut grants = Vec::new();
        for (_, at) in &mut self.prefixes {
            *at = *named[*at].get_or_insert_with(|| {
                grants.push(std::mem::take(&mut self.grants[*at]));
                grants.len() - 1
            });
        }
        self.grants = grants;
    }
}

/// The classes of `blocks`. A prefix whose grants equal those of the nearest prefix
/// above it is left out; an except with nothing granted is kept (with empty grants)
/// whenever something above it grants.
#[must_use]
pub fn classes(blocks: &[BlockGrant]) -> Classes {
    let mut unions = Unions::new(blocks);
    let boundaries = boundaries(blocks, &unions.kinds);

    let mut stack: Vec<Level> = Vec::new();
    let mut out = Classes::default();
    // Union number -> index in `out.grants`, once a prefix names it.
    let mut named: Vec<Option<usize>> = Vec::new();
    let mut start = 0;
    while start < boundaries.len() {
        let prefix = boundaries[start].0;
        let end = start
            + boundaries[start..]
                .iter()
                .take_while(|(net, _)| *net == prefix)
                .count();
        // Leave the prefixes that do not contain this one: in preorder they hold none
        // of what follows either.
        while let Some(level) = stack.last() {
            if level.prefix.contains(&prefix) {
                break;
            }
            for (_, step) in &boundaries[level.steps.clone()] {
                unions.undo(*step);
            }
            stack.pop();
        }
        for (_, step) in &boundaries[start..end] {
            unions.apply(*step);
        }
        let union = unions.current();
        let inherited = stack.last().and_then(|level| level.nearest_kept);
        let redundant = match inherited {
            Some(above) => above == union,
            None => unions.grants(union).is_empty(),
        };
        if !redundant {
            named.resize(named.len().max(union + 1), None);
            let at = *named[union].get_or_insert_with(|| {
                out.grants.push(unions.grants(union).clone());
                out.grants.len() - 1
            });
            out.prefixes.push((prefix, at));
        }
        stack.push(Level {
            prefix,
            steps: start..end,
            nearest_kept: if redundant { inherited } else { Some(union) },
        });
        start = end;
    }
    out.prefixes
        .sort_unstable_by_key(|(net, _)| (net.prefix_len(), *net));
    out
}

/// A prefix on the path from the root to the one being visited.
struct Level {
    prefix: IpNet,
    /// Its steps, as a range of the sorted boundaries.
    steps: std::ops::Range<usize>,
    /// The union the longest kept prefix containing this one (itself included) stands
    /// for: what the trie answers here.
    nearest_kept: Option<usize>,
}

/// What entering a prefix does to the blocks holding it: a block of grants `kind`
/// starts holding it (its cidr) or stops (one of its excepts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Enter(usize),
    Except(usize),
}

/// Every cidr and except that changes which blocks hold an address, sorted in trie
/// preorder, with what it changes. Host bits are cleared. A block whose except covers
/// its whole cidr holds nothing and is left out; an except outside its cidr, or inside
/// another except of the same block, changes nothing and is left out too.
fn boundaries(blocks: &[BlockGrant], kinds: &[usize]) -> Vec<(IpNet, Step)> {
    let mut out = Vec::with_capacity(blocks.len());
    let mut excepts = Vec::new();
    for (block, kind) in blocks.iter().zip(kinds) {
        let net = block.net.trunc();
        excepts.clear();
        excepts.extend(block.except.iter().map(IpNet::trunc));
        if excepts.iter().any(|except| except.contains(&net)) {
            continue;
        }
        excepts.retain(|except| net.contains(except));
        excepts.sort_unstable();
        out.push((net, Step::Enter(*kind)));
        let mut outermost: Option<IpNet> = None;
        for except in &excepts {
            if outermost.is_some_and(|outer| outer.contains(except)) {
                continue;
            }
            outermost = Some(*except);
            out.push((*except, Step::Except(*kind)));
        }
    }
    out.sort_unstable();
    out
}

/// The grants of the blocks holding the current prefix, kept as a count per distinct
/// block grants (`kind`), and each distinct union of them computed once.
struct Unions<'a> {
    /// Distinct block grants.
    distinct: Vec<&'a Grants>,
    /// Each block's index in `distinct`.
    kinds: Vec<usize>,
    /// How many blocks of each kind hold the current prefix (none: absent).
    holding: BTreeMap<usize, usize>,
    /// Kinds holding -> union number.
    by_kinds: HashMap<Vec<usize>, usize>,
    /// Union number -> grants; equal grants get one number.
    grants: Vec<Grants>,
    by_grants: HashMap<Grants, usize>,
}

impl<'a> Unions<'a> {
    fn new(blocks: &'a [BlockGrant]) -> Self {
        // The blocks of one rule share their grants: compare contents once per rule.
        let mut by_rule: HashMap<*const Grants, usize> = HashMap::new();
        let mut index: HashMap<&Grants, usize> = HashMap::new();
        let mut distinct = Vec::new();
        let kinds = blocks
            .iter()
            .map(|block| {
                *by_rule
                    .entry(Arc::as_ptr(&block.grants))
                    .or_insert_with(|| {
                        let grants: &Grants = &block.grants;
                        *index.entry(grants).or_insert_with(|| {
                            distinct.push(grants);
                            distinct.len() - 1
                        })
                    })
            })
            .collect();
        Self {
            distinct,
            kinds,
            holding: BTreeMap::new(),
            by_kinds: HashMap::new(),
            grants: Vec::new(),
            by_grants: HashMap::new(),
        }
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Enter(kind) => self.add(kind),
            Step::Except(kind) => self.remove(kind),
        }
    }

    fn undo(&mut self, step: Step) {
        match step {
            Step::Enter(kind) => self.remove(kind),
            Step::Except(kind) => self.add(kind),
        }
    }

    fn add(&mut self, kind: usize) {
        *self.holding.entry(kind).or_default() += 1;
    }

    /// Only a block holding the prefix is taken away: its cidr contains each of its
    /// (outermost) excepts, so it was entered before and is still on the path.
    fn remove(&mut self, kind: usize) {
        let count = self
            .holding
            .get_mut(&kind)
            .expect("an except is visited inside its own cidr");
        *count -= 1;
        if *count == 0 {
            self.holding.remove(&kind);
        }
    }

    /// The number of the union of the grants of the blocks holding the current prefix.
    fn current(&mut self) -> usize {
        let kinds: Vec<usize> = self.holding.keys().copied().collect();
        match self.by_kinds.entry(kinds) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let mut union = Grants::new();
                for kind in entry.key() {
                    merge_grants(&mut union, self.distinct[*kind]);
                }
                close_over_prefixes(&mut union);
                let number = match self.by_grants.entry(union) {
                    Entry::Occupied(known) => *known.get(),
                    Entry::Vacant(new) => {
                        self.grants.push(new.key().clone());
                        *new.insert(self.grants.len() - 1)
                    }
                };
                *entry.insert(number)
            }
        }
    }

    fn grants(&self, union: usize) -> &Grants {
        &self.grants[union]
    }
}

#[cfg(test)]
mod tests;
