//! Whether the kernel holds a change, read from the maps the agent pinned: the outside
//! clock of the latency stage, which asks the agent nothing while a change is on its
//! way (a scrape of `/metrics` costs the agent milliseconds on two cores).

use std::{
    mem::{offset_of, size_of},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, bail};
use egret_common::maps::{Endpoint, POLICY_PREFIX_FULL, PolicyKey, names};
use egret_testbed::{cluster::GeneratedCluster, pinned::PinnedMap};

/// Policy p0 selects deployment 0, whose pod 0 is local, and allows it deployment 1
/// (`cluster::policy_yaml`, kind 0): the revision's port is allowed from the local
/// pod's table to the identity of deployment 1's pods.
pub const P0_SUBJECT: usize = 0;
const P0_PEER: usize = 10;
/// `IPPROTO_TCP`.
const TCP: u8 = 6;

pub struct KernelView {
    identities: PinnedMap,
    policy: PinnedMap,
    /// The table of p0's local pod.
    table: u32,
    /// The identity of the pods p0 allows.
    peer: u32,
    /// Where the joining pod is ([`GeneratedCluster::joining_pod_yaml`], ordinal 0).
    joining: Ipv4Addr,
}

/// An `IDENTITY` key: the address, IPv4-mapped.
fn ip_key(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

impl KernelView {
    /// Opens the maps under `pin_dir` and finds p0's table and peer identity; the
    /// interface of p0's local pod is `subject_ifindex`.
    pub fn open(pin_dir: &Path, subject_ifindex: u32) -> anyhow::Result<Self> {
        let open = |name: &str| PinnedMap::open(&pin_dir.join(name));
        let endpoints = open(names::ENDPOINT)?;
        let identities = open(names::IDENTITY)?;
        let endpoint = endpoints
            .lookup(&subject_ifindex.to_ne_bytes())?
            .with_context(|| format!("no endpoint for ifindex {subject_ifindex} (p0's pod)"))?;
        if endpoint.len() != size_of::<Endpoint>() {
            bail!("{} values are not endpoints", names::ENDPOINT);
        }
        let at = offset_of!(Endpoint, table);
        let table = u32::from_ne_bytes(endpoint[at..at + 4].try_into()?);
        let peer_ip = GeneratedCluster::pod_ipv4(P0_PEER);
        let peer = identities
            .lookup(&ip_key(peer_ip))?
            .with_context(|| format!("no identity for {peer_ip} (p0's peer)"))?;
        let peer = u32::from_ne_bytes(peer.get(..4).context("a short identity")?.try_into()?);
        Ok(Self {
            identities,
            policy: open(names::POLICY)?,
            table,
            peer,
            joining: Ipv4Addr::new(10, 250, 0, 0),
        })
    }

    /// Whether p0's table allows its peer TCP `port`.
    fn allows(&self, port: u16) -> anyhow::Result<bool> {
        let key = PolicyKey {
            table: self.table.to_be_bytes(),
            identity: self.peer.to_be_bytes(),
            protocol: TCP,
            port: port.to_be_bytes(),
            pad: 0,
        };
        // An LPM key: the prefix length, then the data (`PolicyKey`, all bytes).
        let mut bytes = POLICY_PREFIX_FULL.to_ne_bytes().to_vec();
        bytes.extend_from_slice(&key.table);
        bytes.extend_from_slice(&key.identity);
        bytes.push(key.protocol);
        bytes.extend_from_slice(&key.port);
        bytes.push(key.pad);
        debug_assert_eq!(bytes.len(), 4 + size_of::<PolicyKey>());
        Ok(self.policy.lookup(&bytes)?.is_some())
    }

    /// Whether the kernel holds `change` of round `round` (as `Feed::make` makes it).
    pub fn holds(&self, change: &str, round: usize) -> anyhow::Result<bool> {
        let joined =
            || Ok::<_, anyhow::Error>(self.identities.lookup(&ip_key(self.joining))?.is_some());
        match change {
            // Revision 1 or 2 adds port 9001 or 9002; the other revision's port goes.
            "policy_edit" => {
                let revision = u16::try_from(round % 2 + 1)?;
                Ok(self.allows(9000 + revision)? && !self.allows(9000 + 3 - revision)?)
            }
            "pod_join" => joined(),
            "pod_leave" => Ok(!joined()?),
            other => bail!("no such change: {other}"),
        }
    }
}
