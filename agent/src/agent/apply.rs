//! The only writer of maps and links: carries out a [`Change`] the plan decided, in
//! the order that keeps enforcement exact (tables first, add before delete inside
//! `Datapath::apply`; links only once their endpoint's tables are in).

use std::collections::BTreeSet;

use egret_common::maps::{FLOW_ORIGIN_INBOUND, FLOW_ORIGIN_OUTBOUND, FlowKey};
use tracing::{info, warn};

use super::plan::{Attach, Change, Held, Target};
use crate::{
    datapath::{ApplyStats, Datapath, DatapathError, image::ip_key},
    node::conntrack::{self, Origin, PodFlow, Tracked},
};

/// The datapath and the links this process made.
pub struct Writer {
    datapath: Datapath,
    /// Interfaces this process attached (or took over from a predecessor's pinned links).
    attached_links: BTreeSet<u32>,
    /// Cgroups this process attached (or found a predecessor's pinned links on).
    attached_cgroups: BTreeSet<u64>,
    /// Pinned links, as the pin directory listed them at the last [`Writer::held`].
    pinned_links: BTreeSet<u32>,
    pinned_cgroups: BTreeSet<u64>,
}

impl Writer {
    #[must_use]
    pub fn new(datapath: Datapath) -> Self {
        Self {
            datapath,
            attached_links: BTreeSet::new(),
            attached_cgroups: BTreeSet::new(),
            pinned_links: BTreeSet::new(),
            pinned_cgroups: BTreeSet::new(),
        }
    }

    /// What the kernel holds, for the plan; the pinned links are listed afresh (links
    /// a predecessor left, or that `egret cleanup` removed, show up here).
    pub fn held(&mut self) -> Held<'_> {
        self.pinned_links = self.datapath.pinned_links().into_iter().collect();
        self.pinned_cgroups = self.datapath.pinned_cgroup_links().into_iter().collect();
        Held {
            image: self.datapath.held(),
            pinned_links: &self.pinned_links,
            pinned_cgroups: &self.pinned_cgroups,
            attached_links: &self.attached_links,
            attached_cgroups: &self.attached_cgroups,
        }
    }

    /// Makes the maps hold the change's tables.
    ///
    /// # Errors
    /// When a map refuses a write; what was written stays, and the next reconcile
    /// diffs against it.
    pub fn write_tables(&mut self, change: &Change) -> Result<ApplyStats, DatapathError> {
        self.datapath.apply(&change.image)
    }

    /// Attaches and detaches as the change says, seeding newly judged pods from
    /// `tracked` (the node's conntrack, read when [`Change::needs_seeding`]), then
    /// zeroes the counters of endpoints that are gone.
    pub fn write_links(&mut self, change: &Change, tracked: Option<&[Tracked]>) {
        for attach in &change.attach {
            if let Some(tracked) = tracked
                && !attach.seed.is_empty()
            {
                self.seed(attach, tracked);
            }
            self.attach(attach);
        }
        for ifindex in &change.detach_interfaces {
            info!(
                ifindex,
                "detaching from an interface that no longer leads to a local pod"
            );
            self.datapath.detach(*ifindex);
        }
        for cgroup in &change.detach_cgroups {
            self.datapath.detach_cgroup(*cgroup);
        }
        // An interface or cgroup that leads to no local pod now is forgotten, so one
        // that comes back (or an index the kernel reuses) is attached afresh.
        let image = &change.image;
        self.attached_links
            .retain(|ifindex| image.endpoints.contains_key(ifindex));
        self.attached_cgroups
            .retain(|cgroup| image.cgroup_endpoints.contains_key(cgroup));
        if let Err(error) = self.datapath.prune_counters(&change.live_endpoints) {
            warn!(%error, "cannot prune counters of gone pods");
        }
    }

    /// Takes over what an agent of the first map layout left; called once every local
    /// pod's links run this agent's programs.
    pub fn retire_legacy_maps(&mut self) {
        if let Err(error) = self.datapath.retire_legacy_maps() {
            warn!(%error, "cannot take over the first layout's tracked flows");
        }
    }

    fn attach(&mut self, attach: &Attach) {
        let pod = &attach.pod;
        match &attach.target {
            Target::Interface(interface) => {
                match self.datapath.attach(&interface.name, interface.ifindex) {
                    Ok(()) => {
                        self.attached_links.insert(interface.ifindex);
                    }
                    Err(error) => warn!(%pod, %error, "cannot attach"),
                }
            }
            Target::Cgroup(cgroup) => match self.datapath.attach_cgroup(&cgroup.path, cgroup.id) {
                Ok(()) => {
                    self.attached_cgroups.insert(cgroup.id);
                }
                Err(error) => warn!(%pod, %error, "cannot attach to the pod's cgroup"),
            },
        }
    }

    /// Before Egret first judges a pod, the flows the kernel already tracks for it
    /// become conntrack entries: connections it accepted earlier are not cut.
    fn seed(&mut self, attach: &Attach, tracked: &[Tracked]) {
        let pod = &attach.pod;
        let flows: Vec<(FlowKey, u8)> = conntrack::flows_of(tracked, &attach.seed)
            .iter()
            .map(flow_entry)
            .collect();
        if flows.is_empty() {
            return;
        }
        match self.datapath.seed_flows(&flows) {
            Ok(()) => {
                info!(%pod, flows = flows.len(), "seeded established flows from the kernel's conntrack");
            }
            Err(error) => warn!(%pod, %error, "cannot seed established flows"),
        }
    }
}

/// A pod's flow in the conntrack map's layout.
fn flow_entry(flow: &PodFlow) -> (FlowKey, u8) {
    let key = FlowKey {
        src: ip_key(flow.src).addr,
        dst: ip_key(flow.dst).addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        pad: [0; 3],
    };
    let origin = match flow.origin {
        Origin::Inbound => FLOW_ORIGIN_INBOUND,
        Origin::Outbound => FLOW_ORIGIN_OUTBOUND,
    };
    (key, origin)
}
