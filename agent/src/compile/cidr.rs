//! An endpoint's address ranges -> CIDR classes for a longest-prefix-match trie.
//!
//! Every address's longest matching prefix, among all the cidrs and excepts of the
//! endpoint's blocks, decides which blocks hold it: a block holds the address exactly
//! when its cidr contains that prefix and none of its excepts does. So one class per
//! prefix is exact, `except` included, and each class carries the union of what the
//! blocks holding it allow.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use super::{BlockGrant, Grants, merge_grants, ports::close_over_prefixes};

/// `(prefix, grants)` for the trie, shortest prefixes first. A prefix whose grants equal
/// those of the nearest prefix above it is left out; an except with nothing granted is
/// kept (with empty grants) whenever something above it grants.
#[must_use]
pub fn classes(blocks: &[BlockGrant]) -> Vec<(IpNet, Grants)> {
    let boundaries: BTreeSet<IpNet> = blocks
        .iter()
        .flat_map(|b| std::iter::once(b.net).chain(b.except.iter().copied()))
        .collect();
    let mut by_length: Vec<IpNet> = boundaries.into_iter().collect();
    by_length.sort_by_key(|net| (net.prefix_len(), *net));

    let mut kept: BTreeMap<IpNet, Grants> = BTreeMap::new();
    let mut out = Vec::new();
    for prefix in by_length {
        let mut grants = Grants::new();
        for block in blocks {
            let holds =
                block.net.contains(&prefix) && !block.except.iter().any(|e| e.contains(&prefix));
            if holds {
                merge_grants(&mut grants, &block.grants);
            }
        }
        close_over_prefixes(&mut grants);
        let inherited = kept
            .iter()
            .filter(|(above, _)| above.contains(&prefix))
            .max_by_key(|(above, _)| above.prefix_len())
            .map(|(_, grants)| grants);
        let redundant = match inherited {
            Some(above) => *above == grants,
            None => grants.is_empty(),
        };
        if !redundant {
            kept.insert(prefix, grants.clone());
            out.push((prefix, grants));
        }
    }
    out
}
