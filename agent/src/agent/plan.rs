//! What one reconcile changes, decided without touching the kernel: the compiled tables,
//! the node view (which interface or cgroup leads to each local pod) and what the
//! kernel holds go in; the tables to write, the links to attach and detach, the pods
//! that fail closed and the counters to keep come out. The writer carries it out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    compile::Compiled,
    datapath::image::{KernelImage, Room},
    node::{NodeView, cgroups::PodCgroup, interfaces::PodInterface},
    state::{ObjectKey, Snapshot},
};

/// What the kernel holds, as far as the plan needs it.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    /// The tables in the kernel's maps.
    pub image: &'a KernelImage,
    /// Interfaces with pinned links: this agent's, or a predecessor's it can take over.
    pub pinned_links: &'a BTreeSet<u32>,
    /// Cgroups with pinned links.
    pub pinned_cgroups: &'a BTreeSet<u64>,
    /// Interfaces this process attached itself: they run its programs already.
    pub attached_links: &'a BTreeSet<u32>,
    /// Cgroups this process attached itself.
    pub attached_cgroups: &'a BTreeSet<u64>,
}

/// Where a link goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Both TC programs on the pod's host-side interface.
    Interface(PodInterface),
    /// The `cgroup_skb` programs on the pod's cgroup.
    Cgroup(PodCgroup),
}

/// One pod to attach to, once its tables are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    pub pod: ObjectKey,
    pub target: Target,
    /// The pod's addresses, when no link judged it before: the flows the node's
    /// conntrack tracks for them become established entries first, so connections the
    /// pod accepted are not cut. Empty when a pinned link already judges the pod.
    pub seed: Vec<IpAddr>,
}

/// The change one reconcile makes, in the order the writer makes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The tables the kernel should hold, fitted to the room in its maps.
    pub image: KernelImage,
    /// Local pods that fail closed (may send nothing) for want of table room.
    pub failed_closed: Vec<ObjectKey>,
    /// Links to make, after the tables are in, so a pod's first packet meets its policy.
    pub attach: Vec<Attach>,
    /// Pinned interface links that no longer lead to a local pod.
    pub detach_interfaces: Vec<u32>,
    /// Pinned cgroup links of cgroups that no longer hold a local pod.
    pub detach_cgroups: Vec<u64>,
    /// Endpoints that keep their counters; the rows of every other are zeroed.
    pub live_endpoints: BTreeSet<u32>,
    /// Where each local pod is enforced, as `egret status` shows it.
    pub attachments: BTreeMap<ObjectKey, String>,
}

impl Change {
    /// True when some pod is to be seeded from the node's conntrack.
    #[must_use]
    pub fn needs_seeding(&self) -> bool {
        self.attach.iter().any(|attach| !attach.seed.is_empty())
    }

    /// Local pods whose endpoint is in the kernel.
    #[must_use]
    pub fn enforced(&self) -> usize {
        self.attachments.len()
    }
}

/// Decides the change that makes the kernel enforce `compiled` on the pods `node` found.
#[must_use]
pub fn plan(
    snapshot: &Snapshot,
    compiled: &Compiled,
    node: &NodeView,
    held: Held<'_>,
    room: Room,
) -> Change {
    // Only pods with tables are enforced, whatever else the node view holds.
    let is_local = |pod: &&ObjectKey| compiled.tables.endpoints.contains_key(*pod);
    let node_interfaces: BTreeMap<&ObjectKey, &PodInterface> = node
        .interfaces
        .iter()
        .filter(|(pod, _)| is_local(pod))
        .collect();
    let node_cgroups: BTreeMap<&ObjectKey, &PodCgroup> = node
        .cgroups
        .iter()
        .filter(|(pod, _)| is_local(pod))
        .collect();
    let interfaces = node_interfaces
        .iter()
        .map(|(pod, interface)| ((*pod).clone(), interface.ifindex))
        .collect();
    let cgroups = node_cgroups
        .iter()
        .map(|(pod, cgroup)| ((*pod).clone(), cgroup.id))
        .collect();
    let mut image = KernelImage::build(&compiled.tables, &interfaces, &cgroups);
    let failed = image.fit(held.image, room);
    let failed_closed = compiled
        .tables
        .endpoints
        .iter()
        .filter(|(_, entry)| failed.contains(&entry.table))
        .map(|(pod, _)| pod.clone())
        .collect();

    let attach = to_attach(snapshot, &node_interfaces, &node_cgroups, held);
    let wanted_links: BTreeSet<u32> = node_interfaces.values().map(|i| i.ifindex).collect();
    let wanted_cgroups: BTreeSet<u64> = node_cgroups.values().map(|c| c.id).collect();

    let live_endpoints = image
        .endpoints
        .values()
        .chain(image.cgroup_endpoints.values())
        .map(|endpoint| endpoint.id)
        .collect();
    let attachments = node_interfaces
        .iter()
        .map(|(pod, i)| {
            (
                (*pod).clone(),
                format!("{} (ifindex {})", i.name, i.ifindex),
            )
        })
        .chain(
            node_cgroups
                .iter()
                .map(|(pod, cgroup)| ((*pod).clone(), format!("cgroup {}", cgroup.id))),
        )
        .collect();
    Change {
        image,
        failed_closed,
        attach,
        detach_interfaces: held
            .pinned_links
            .difference(&wanted_links)
            .copied()
            .collect(),
        detach_cgroups: held
            .pinned_cgroups
            .difference(&wanted_cgroups)
            .copied()
            .collect(),
        live_endpoints,
        attachments,
    }
}

/// The pods whose link this process has not made yet, each seeded unless a pinned link
/// judged it already.
fn to_attach(
    snapshot: &Snapshot,
    interfaces: &BTreeMap<&ObjectKey, &PodInterface>,
    cgroups: &BTreeMap<&ObjectKey, &PodCgroup>,
    held: Held<'_>,
) -> Vec<Attach> {
    let attach = |pod: &ObjectKey, target, is_judged: bool| Attach {
        pod: pod.clone(),
        target,
        seed: match snapshot.pods.get(pod) {
            Some(pod) if !is_judged => pod.ips.clone(),
            _ => Vec::new(),
        },
    };
    let links = interfaces
        .iter()
        .filter(|(_, i)| !held.attached_links.contains(&i.ifindex))
        .map(|(pod, i)| {
            let is_judged = held.pinned_links.contains(&i.ifindex);
            attach(pod, Target::Interface((*i).clone()), is_judged)
        });
    let cgroup_links = cgroups
        .iter()
        .filter(|(_, c)| !held.attached_cgroups.contains(&c.id))
        .map(|(pod, c)| {
            let is_judged = held.pinned_cgroups.contains(&c.id);
            attach(pod, Target::Cgroup((*c).clone()), is_judged)
        });
    links.chain(cgroup_links).collect()
}

#[cfg(test)]
mod tests;
