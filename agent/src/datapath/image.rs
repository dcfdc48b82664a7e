//! The compiled tables in the kernel's key and value layouts, and the difference
//! between two such images. Pure: the writer applies what this computes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egret_common::dns::{NameEntry, NameKey};
use egret_common::maps::{CIDR_PREFIX_TABLE, CidrKey, Endpoint, IpKey, PolicyKey, PolicyValue};
use ipnet::IpNet;

use crate::{
    compile::{PolicyEntryKey, PortPrefix, Tables},
    state::ObjectKey,
};

/// An LPM trie key: prefix length and data, ordered for diffing.
pub type LpmKey<K> = (u32, K);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelImage {
    /// ifindex -> endpoint.
    pub endpoints: BTreeMap<u32, Endpoint>,
    /// cgroup id -> endpoint (`--attach cgroup`).
    pub cgroup_endpoints: BTreeMap<u64, Endpoint>,
    pub identities: BTreeMap<IpKey, u32>,
    pub cidrs: BTreeMap<LpmKey<CidrKey>, u32>,
    pub policy: BTreeMap<LpmKey<PolicyKey>, PolicyValue>,
    /// (table, domain pattern) -> domain identity (`DNS_NAMES_V1`).
    pub dns_names: BTreeMap<NameKey, NameEntry>,
}

impl KernelImage {
    /// Lays out `tables` for the kernel; endpoints appear only for pods whose
    /// interface (pod -> ifindex) or cgroup (pod -> cgroup id) is known.
    #[must_use]
    pub fn build(
        tables: &Tables,
        interfaces: &BTreeMap<ObjectKey, u32>,
        cgroups: &BTreeMap<ObjectKey, u64>,
    ) -> Self {
        let mut image = KernelImage::default();
        for (pod, entry) in &tables.endpoints {
            let endpoint = Endpoint {
                id: entry.id,
                flags: entry.flags,
                ipv4: entry.ipv4.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
                ipv6: entry.ipv6.unwrap_or(Ipv6Addr::UNSPECIFIED).octets(),
                table: entry.table,
            };
            if let Some(ifindex) = interfaces.get(pod) {
                image.endpoints.insert(*ifindex, endpoint);
            }
            if let Some(cgroup) = cgroups.get(pod) {
                image.cgroup_endpoints.insert(*cgroup, endpoint);
            }
        }
        image.identities = tables
            .identities
            .iter()
            .map(|(ip, identity)| (ip_key(*ip), *identity))
            .collect();
        image.cidrs = tables
            .cidrs
            .iter()
            .map(|((table, net), class)| (cidr_key(*table, *net), *class))
            .collect();
        image.policy = tables
            .policy
            .iter()
            .map(|(key, allowance)| (policy_key(key), allowance.value))
            .collect();
        for ((table, pattern), entry) in &tables.domains {
            image.dns_names.insert(
                NameKey {
                    owner: *table,
                    pad: 0,
                    pattern: *pattern,
                },
                NameEntry {
                    identity: entry.identity,
                    pad: 0,
                },
            );
        }
        image
    }

    #[must_use]
    pub fn entry_counts(&self) -> [(&'static str, usize); 4] {
        use egret_common::maps::names;
        [
            (names::ENDPOINT, self.endpoints.len()),
            (names::IDENTITY, self.identities.len()),
            (names::CIDR, self.cidrs.len()),
            (names::POLICY, self.policy.len()),
        ]
    }
}

/// IPv4 addresses are stored IPv4-mapped so one key type holds both families.
#[must_use]
pub fn ip_key(ip: IpAddr) -> IpKey {
    let addr = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    IpKey { addr }
}

#[must_use]
pub fn cidr_key(table: u32, net: IpNet) -> LpmKey<CidrKey> {
    let (addr, prefix_len) = match net {
        IpNet::V4(v4) => (
            v4.addr().to_ipv6_mapped().octets(),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (v6.addr().octets(), u32::from(v6.prefix_len())),
    };
    (
        CIDR_PREFIX_TABLE + prefix_len,
        CidrKey {
            table: table.to_be_bytes(),
            addr,
        },
    )
}

#[must_use]
pub fn policy_key(key: &PolicyEntryKey) -> LpmKey<PolicyKey> {
    let (protocol, port) = match key.ports {
        PortPrefix::AnyProtocol => (0, 0),
        PortPrefix::Protocol { protocol, port, .. } => (protocol, port),
    };
    (
        key.ports.trie_prefix_len(),
        PolicyKey {
            table: key.table.to_be_bytes(),
            identity: key.identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
            pad: 0,
        },
    )
}

/// What to write and what to delete to turn `held` into `desired`.
#[derive(Debug, PartialEq, Eq)]
pub struct Diff<K, V> {
    pub upserts: Vec<(K, V)>,
    pub removals: Vec<K>,
}

impl<K, V> Diff<K, V> {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// One walk over both maps in key order (a lookup per key would cost a tree descent
/// each: the identity table holds every pod address of the cluster).
#[must_use]
pub fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    held: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Diff<K, V> {
    use std::cmp::Ordering;
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    let mut held = held.iter().peekable();
    let mut desired = desired.iter().peekable();
    loop {
        match (held.peek(), desired.peek()) {
            (None, None) => break,
            (Some((key, _)), None) => {
                removals.push(**key);
                held.next();
            }
            (None, Some((key, value))) => {
                upserts.push((**key, **value));
                desired.next();
            }
            (Some((held_key, held_value)), Some((key, value))) => match held_key.cmp(key) {
                Ordering::Less => {
                    removals.push(**held_key);
                    held.next();
                }
                Ordering::Greater => {
                    upserts.push((**key, **value));
                    desired.next();
                }
                Ordering::Equal => {
                    if held_value != value {
                        upserts.push((**key, **value));
                    }
                    held.next();
                    desired.next();
                }
            },
        }
    }
    Diff { upserts, removals }
}

/// How many keys of `held` `desired` lacks (what an apply keeps until its removals).
fn missing_from<K: Ord, V, W>(held: &BTreeMap<K, V>, desired: &BTreeMap<K, W>) -> usize {
    let mut desired = desired.keys().peekable();
    let mut missing = 0;
    for key in held.keys() {
        while desired.next_if(|d| *d < key).is_some() {}
        if desired.next_if(|d| *d == key).is_none() {
            missing += 1;
        }
    }
    missing
}

/// Room in each table, after what `held` will keep occupying during the next apply
/// (entries are removed only after new ones are in).
#[derive(Clone, Copy, Debug)]
pub struct Room {
    pub cidrs: usize,
    pub policy: usize,
}

impl KernelImage {
    /// Makes the image fit the maps: while the CIDR or policy entries exceed their
    /// room, the table with the most entries loses all of them and the endpoints using
    /// it fail closed (`ENDPOINT_FLAG_FAIL_CLOSED`: they may send nothing), so every
    /// other endpoint keeps exact enforcement. Returns the tables that were dropped.
    pub fn fit(&mut self, held: &KernelImage, capacity: Room) -> Vec<u32> {
        use egret_common::maps::ENDPOINT_FLAG_FAIL_CLOSED;
        let mut failed = Vec::new();
        loop {
            // What the apply would hold at its fullest: everything desired plus what is
            // held and not yet removed.
            let policy_peak = self.policy.len() + missing_from(&held.policy, &self.policy);
            let cidr_peak = self.cidrs.len() + missing_from(&held.cidrs, &self.cidrs);
            if policy_peak <= capacity.policy && cidr_peak <= capacity.cidrs {
                break;
            }
            let mut sizes: BTreeMap<u32, usize> = BTreeMap::new();
            for (_, key) in self.policy.keys() {
                *sizes.entry(u32::from_be_bytes(key.table)).or_default() += 1;
            }
            for (_, key) in self.cidrs.keys() {
                *sizes.entry(u32::from_be_bytes(key.table)).or_default() += 1;
            }
            // Largest first; ties by id, so the choice is deterministic.
            let Some((&victim, _)) = sizes
                .iter()
                .max_by_key(|(id, size)| (**size, std::cmp::Reverse(**id)))
            else {
                break;
            };
            self.policy
                .retain(|(_, key), _| u32::from_be_bytes(key.table) != victim);
            self.cidrs
                .retain(|(_, key), _| u32::from_be_bytes(key.table) != victim);
            failed.push(victim);
        }
        for endpoint in self
            .endpoints
            .values_mut()
            .chain(self.cgroup_endpoints.values_mut())
        {
            if failed.contains(&endpoint.table) {
                endpoint.flags |= ENDPOINT_FLAG_FAIL_CLOSED;
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{diff, missing_from};

    proptest! {
        #[test]
        fn a_diff_turns_held_into_desired_and_writes_only_what_differs(
            held in proptest::collection::btree_map(0u8..40, 0u8..3, 0..30),
            desired in proptest::collection::btree_map(0u8..40, 0u8..3, 0..30),
        ) {
            let change = diff(&held, &desired);
            let mut applied: BTreeMap<u8, u8> = held.clone();
            for (key, value) in &change.upserts {
                prop_assert_ne!(held.get(key), Some(value), "{} rewritten unchanged", key);
                applied.insert(*key, *value);
            }
            for key in &change.removals {
                prop_assert!(!desired.contains_key(key));
                applied.remove(key);
            }
            prop_assert_eq!(&applied, &desired);
            let missing = held.keys().filter(|k| !desired.contains_key(k)).count();
            prop_assert_eq!(missing_from(&held, &desired), missing);
        }
    }
}
