use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use egret_common::maps::ENDPOINT_FLAG_FAIL_CLOSED;

use super::*;
use crate::{
    compile::{self, Ids, Scope},
    testing::{mk_namespace, mk_pod, mk_policy, snapshot},
};

/// web and api are isolated (web by a CIDR list), db is not; remote runs elsewhere.
fn shop() -> Snapshot {
    let mut remote = mk_pod("shop", "remote", &[("app", "web")], &["10.0.9.1"]);
    remote.node_name = Some("node-2".to_owned());
    snapshot(
        vec![mk_namespace("shop", &[])],
        vec![
            mk_pod("shop", "web", &[("app", "web")], &["10.0.0.1", "fd00::1"]),
            mk_pod("shop", "api", &[("app", "api")], &["10.0.0.2"]),
            mk_pod("shop", "db", &[("app", "db")], &["10.0.0.3"]),
            remote,
        ],
        vec![
            mk_policy(
                "metadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{ipBlock: {cidr: 192.0.2.0/24}}, {ipBlock: {cidr: 198.51.100.0/24}}, {ipBlock: {cidr: 203.0.113.0/24}}]\n      ports: [{port: 443}, {port: 80}]\n",
            ),
            mk_policy(
                "metadata: {name: api, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: 5432}]\n",
            ),
        ],
    )
}

fn compiled(snapshot: &Snapshot) -> Compiled {
    compile::compile(snapshot, &Scope::Node("node-1".to_owned()), &Ids::default())
}

fn key(pod: &str) -> ObjectKey {
    ObjectKey::new("shop", pod)
}

fn interface(ifindex: u32, name: &str) -> PodInterface {
    PodInterface {
        ifindex,
        name: name.to_owned(),
    }
}

fn cgroup(id: u64) -> PodCgroup {
    PodCgroup {
        path: PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{id}")),
        id,
    }
}

/// web on ifindex 5, api on 6; db's interface is not up yet; the view also holds a
/// pod of another node (a stale route), which the plan must ignore.
fn tc_view() -> NodeView {
    NodeView {
        interfaces: BTreeMap::from([
            (key("web"), interface(5, "veth-web")),
            (key("api"), interface(6, "veth-api")),
            (key("remote"), interface(9, "veth-stale")),
        ]),
        cgroups: BTreeMap::new(),
    }
}

const ROOMY: Room = Room {
    cidrs: 1_000,
    policy: 1_000,
};

/// What the kernel holds and which links exist.
#[derive(Default)]
struct Kernel {
    image: KernelImage,
    pinned_links: BTreeSet<u32>,
    pinned_cgroups: BTreeSet<u64>,
    attached_links: BTreeSet<u32>,
    attached_cgroups: BTreeSet<u64>,
}

impl Kernel {
    fn held(&self) -> Held<'_> {
        Held {
            image: &self.image,
            pinned_links: &self.pinned_links,
            pinned_cgroups: &self.pinned_cgroups,
            attached_links: &self.attached_links,
            attached_cgroups: &self.attached_cgroups,
        }
    }

    /// The kernel after a writer carried out `change` without a failure.
    fn after(change: &Change) -> Self {
        let mut kernel = Kernel {
            image: change.image.clone(),
            ..Kernel::default()
        };
        for attach in &change.attach {
            match &attach.target {
                Target::Interface(interface) => {
                    kernel.pinned_links.insert(interface.ifindex);
                    kernel.attached_links.insert(interface.ifindex);
                }
                Target::Cgroup(cgroup) => {
                    kernel.pinned_cgroups.insert(cgroup.id);
                    kernel.attached_cgroups.insert(cgroup.id);
                }
            }
        }
        kernel
    }
}

fn ips(addresses: &[&str]) -> Vec<IpAddr> {
    addresses.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn a_fresh_node_attaches_and_seeds_every_local_pod_it_found() {
    let snapshot = shop();
    let compiled = compiled(&snapshot);
    let change = plan(
        &snapshot,
        &compiled,
        &tc_view(),
        Kernel::default().held(),
        ROOMY,
    );

    let id = |pod: &str| compiled.tables.endpoints[&key(pod)].id;
    assert_eq!(
        change
            .image
            .endpoints
            .iter()
            .map(|(ifindex, e)| (*ifindex, e.id))
            .collect::<Vec<_>>(),
        vec![(5, id("web")), (6, id("api"))],
        "endpoints only for local pods whose interface was found"
    );
    assert_eq!(
        change.attach,
        vec![
            Attach {
                pod: key("api"),
                target: Target::Interface(interface(6, "veth-api")),
                seed: ips(&["10.0.0.2"]),
            },
            Attach {
                pod: key("web"),
                target: Target::Interface(interface(5, "veth-web")),
                seed: ips(&["10.0.0.1", "fd00::1"]),
            },
        ]
    );
    assert!(change.needs_seeding());
    assert!(change.detach_interfaces.is_empty() && change.detach_cgroups.is_empty());
    assert!(change.failed_closed.is_empty());
    assert_eq!(
        change.live_endpoints,
        BTreeSet::from([id("web"), id("api")])
    );
    assert_eq!(
        change.attachments,
        BTreeMap::from([
            (key("api"), "veth-api (ifindex 6)".to_owned()),
            (key("web"), "veth-web (ifindex 5)".to_owned()),
        ])
    );
    assert_eq!(change.enforced(), 2);
    assert_eq!(
        compiled.tables.endpoints.len(),
        3,
        "db has tables but is not enforced yet"
    );
    assert!(
        change.image.cidrs.len() >= 3,
        "web's CIDR list is in the image"
    );
}

#[test]
fn a_second_plan_against_what_the_first_made_changes_nothing() {
    let snapshot = shop();
    let compiled = compiled(&snapshot);
    let first = plan(
        &snapshot,
        &compiled,
        &tc_view(),
        Kernel::default().held(),
        ROOMY,
    );
    let kernel = Kernel::after(&first);
    let second = plan(&snapshot, &compiled, &tc_view(), kernel.held(), ROOMY);
    assert_eq!(second.image, kernel.image, "no table entry to write");
    assert!(second.attach.is_empty(), "{:?}", second.attach);
    assert!(second.detach_interfaces.is_empty());
    assert!(!second.needs_seeding());
    assert_eq!(second.attachments, first.attachments);
}

#[test]
fn a_predecessors_links_are_taken_over_without_seeding_and_stale_ones_detached() {
    let snapshot = shop();
    let compiled = compiled(&snapshot);
    let kernel = Kernel {
        // web's link is this process's; api's a predecessor's; 7 led to a pod now gone.
        pinned_links: BTreeSet::from([5, 6, 7]),
        attached_links: BTreeSet::from([5]),
        ..Kernel::default()
    };
    let change = plan(&snapshot, &compiled, &tc_view(), kernel.held(), ROOMY);
    assert_eq!(
        change.attach,
        vec![Attach {
            pod: key("api"),
            target: Target::Interface(interface(6, "veth-api")),
            seed: Vec::new(),
        }],
        "a pinned link judged api already: its flows are in the conntrack map"
    );
    assert_eq!(change.detach_interfaces, vec![7]);
}

#[test]
fn a_pod_that_leaves_loses_its_link_and_its_counters() {
    let mut snapshot = shop();
    let first = plan(
        &snapshot,
        &compiled(&snapshot),
        &tc_view(),
        Kernel::default().held(),
        ROOMY,
    );
    let kernel = Kernel::after(&first);
    let web = first.image.endpoints[&5].id;
    snapshot.pods.remove(&key("web"));
    let compiled = compiled(&snapshot);
    let mut view = tc_view();
    view.interfaces.remove(&key("web"));
    let change = plan(&snapshot, &compiled, &view, kernel.held(), ROOMY);
    assert_eq!(change.detach_interfaces, vec![5]);
    assert!(!change.live_endpoints.contains(&web));
    assert!(!change.image.endpoints.contains_key(&5));
    assert!(change.attach.is_empty());
    assert!(
        change.image.cidrs.is_empty(),
        "web's CIDR entries go with it"
    );
}

#[test]
fn cgroup_mode_attaches_to_cgroups_and_detaches_from_gone_ones() {
    let snapshot = shop();
    let compiled = compiled(&snapshot);
    let view = NodeView {
        interfaces: BTreeMap::new(),
        cgroups: BTreeMap::from([(key("web"), cgroup(100)), (key("db"), cgroup(101))]),
    };
    let kernel = Kernel {
        pinned_cgroups: BTreeSet::from([100, 200]),
        ..Kernel::default()
    };
    let change = plan(&snapshot, &compiled, &view, kernel.held(), ROOMY);
    assert!(change.image.endpoints.is_empty());
    assert_eq!(
        change
            .image
            .cgroup_endpoints
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![100, 101]
    );
    assert_eq!(
        change.attach,
        vec![
            Attach {
                pod: key("db"),
                target: Target::Cgroup(cgroup(101)),
                seed: ips(&["10.0.0.3"]),
            },
            Attach {
                pod: key("web"),
                target: Target::Cgroup(cgroup(100)),
                seed: Vec::new(),
            },
        ]
    );
    assert_eq!(change.detach_cgroups, vec![200]);
    assert!(change.detach_interfaces.is_empty());
    assert_eq!(change.attachments[&key("web")], "cgroup 100");

    let again = plan(
        &snapshot,
        &compiled,
        &view,
        Kernel::after(&change).held(),
        ROOMY,
    );
    assert!(again.attach.is_empty(), "attached cgroups are left alone");
}

#[test]
fn tables_that_do_not_fit_fail_the_largest_endpoint_closed() {
    let snapshot = shop();
    let compiled = compiled(&snapshot);
    let full = plan(
        &snapshot,
        &compiled,
        &tc_view(),
        Kernel::default().held(),
        ROOMY,
    );
    let room = Room {
        cidrs: full.image.cidrs.len(),
        policy: full.image.policy.len() - 1,
    };
    let change = plan(
        &snapshot,
        &compiled,
        &tc_view(),
        Kernel::default().held(),
        room,
    );
    // web holds the CIDR list and two ports on it: more entries than api's one peer.
    assert_eq!(change.failed_closed, vec![key("web")]);
    let web = &change.image.endpoints[&5];
    assert_ne!(web.flags & ENDPOINT_FLAG_FAIL_CLOSED, 0);
    assert_eq!(
        change.image.endpoints[&6].flags & ENDPOINT_FLAG_FAIL_CLOSED,
        0
    );
    assert!(
        change.image.policy.len() < full.image.policy.len() && !change.image.policy.is_empty(),
        "api keeps its entries"
    );
    assert!(
        change.live_endpoints.contains(&web.id),
        "a pod failing closed is still enforced: its counters stay"
    );
}
