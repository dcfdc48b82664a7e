//! `egret run`: one loop that reads the sources, compiles the whole snapshot, and makes
//! the kernel hold the result. Nothing writes a map except this loop's apply step.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use egret_common::maps::{
    SETTINGS_FLAG_AUDIT_ALL, SETTINGS_FLAG_DENY_UNKNOWN, SETTINGS_FLAG_KEEP_ESTABLISHED, Settings,
};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    compile::{self, Allocator, Ids, Scope},
    datapath::{
        Capacities, Datapath, DatapathError,
        image::KernelImage,
        interfaces::{InterfaceError, Resolver},
    },
    source::manifest,
    state::ObjectKey,
};

/// What happens to every denial.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GlobalMode {
    /// Drop what no policy allows.
    #[default]
    Enforce,
    /// Count what no policy allows as an audit denial, and let it pass.
    Audit,
}

/// What the kernel does with packets from an interface it has no endpoint for yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownPod {
    #[default]
    Allow,
    Deny,
}

/// What happens to a flow the pod opened when a policy change stops allowing it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Established {
    /// Judge every packet against the current policy: the flow is cut.
    #[default]
    Cut,
    /// Let flows that were allowed when they opened run until they go idle.
    Keep,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub mode: GlobalMode,
    pub unknown_pod: UnknownPod,
    pub established: Established,
    /// Flow events each endpoint may report per second.
    pub events_per_second: u32,
    pub capacities: Capacities,
    /// Full re-read and reconcile at least this often.
    pub resync: Duration,
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Interfaces(#[from] InterfaceError),
}

/// Runs until `shutdown` resolves. Enforcement stays pinned in place afterwards.
///
/// # Errors
/// When the kernel programs cannot be loaded or the netlink socket cannot be opened;
/// failures of single reconciles are logged and retried.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut datapath = Datapath::open(&config.pin_dir, config.capacities)?;
    let mut settings = Settings {
        flags: 0,
        events_per_second: config.events_per_second,
    };
    if config.mode == GlobalMode::Audit {
        settings.flags |= SETTINGS_FLAG_AUDIT_ALL;
    }
    if config.unknown_pod == UnknownPod::Deny {
        settings.flags |= SETTINGS_FLAG_DENY_UNKNOWN;
    }
    if config.established == Established::Keep {
        settings.flags |= SETTINGS_FLAG_KEEP_ESTABLISHED;
    }
    datapath.set_settings(settings)?;
    let resolver = Resolver::new()?;
    let mut reconciler = Reconciler {
        ids: ids_avoiding(datapath.held()),
        last_problems: Vec::new(),
        attached: BTreeSet::new(),
    };
    tokio::pin!(shutdown);
    loop {
        reconciler
            .reconcile(&config, &mut datapath, &resolver)
            .await;
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(config.resync) => {}
        }
    }
    info!(
        "shutting down; enforcement stays pinned under {}",
        config.pin_dir.display()
    );
    Ok(())
}

/// After a restart the kernel holds numbers this agent did not hand out: the first
/// compile avoids them, so no number changes meaning while old entries remain.
fn ids_avoiding(held: &KernelImage) -> Ids {
    Ids {
        endpoints: Allocator::reserving(held.endpoints.values().map(|e| e.id)),
        identities: Allocator::reserving(held.identities.values().copied()),
        classes: Allocator::reserving(
            held.cidrs
                .values()
                .map(|class| class & !egret_common::maps::CIDR_CLASS_BIT),
        ),
    }
}

struct Reconciler {
    ids: Ids,
    last_problems: Vec<String>,
    /// Interfaces this process attached (or took over from a predecessor's pinned links).
    attached: BTreeSet<u32>,
}

impl Reconciler {
    async fn reconcile(&mut self, config: &Config, datapath: &mut Datapath, resolver: &Resolver) {
        let started = std::time::Instant::now();
        let manifests = manifest::load_dir(&config.manifests);
        let compiled = compile::compile(
            &manifests.snapshot,
            &Scope::Node(config.node_name.clone()),
            &self.ids,
        );

        let local = compiled.tables.endpoints.keys().filter_map(|key| {
            manifests
                .snapshot
                .pods
                .get(key)
                .map(|pod| (key, pod.ips.as_slice()))
        });
        let (interfaces, interface_problems) = resolver.resolve(local).await;

        let mut problems: Vec<String> =
            manifests.problems.iter().map(ToString::to_string).collect();
        problems.extend(interface_problems.iter().map(ToString::to_string));
        problems.extend(
            compiled.address_conflicts.iter().map(|(pod, ip)| {
                format!("pod {pod}: address {ip} is already another pod's; ignored")
            }),
        );
        // Report each problem when it appears, not on every resync.
        if problems != self.last_problems {
            for problem in &problems {
                warn!("{problem}");
            }
            self.last_problems = problems;
        }

        let ifindexes: BTreeMap<ObjectKey, u32> = interfaces
            .iter()
            .map(|(pod, interface)| (pod.clone(), interface.ifindex))
            .collect();
        let image = KernelImage::build(&compiled.tables, &ifindexes);
        let stats = match datapath.apply(&image) {
            Ok(stats) => stats,
            Err(error) => {
                warn!(%error, "applying tables failed; will retry");
                return;
            }
        };
        // Attach only once the endpoint's tables are in: its first packet is judged
        // by its policy, not by the unknown-pod default.
        // Links a predecessor pinned are taken over (atomically switched to this
        // agent's programs) the first time this agent sees their pod.
        for (pod, interface) in &interfaces {
            if self.attached.contains(&interface.ifindex) {
                continue;
            }
            match datapath.attach(&interface.name, interface.ifindex) {
                Ok(()) => {
                    self.attached.insert(interface.ifindex);
                }
                Err(error) => warn!(%pod, %error, "cannot attach"),
            }
        }
        let wanted: BTreeSet<u32> = ifindexes.values().copied().collect();
        let pinned: BTreeSet<u32> = datapath.pinned_links().into_iter().collect();
        self.attached.retain(|ifindex| wanted.contains(ifindex));
        for ifindex in pinned.difference(&wanted) {
            info!(
                ifindex,
                "detaching from an interface that no longer leads to a local pod"
            );
            datapath.detach(*ifindex);
        }
        if stats.written + stats.removed > 0 {
            info!(
                endpoints = image.endpoints.len(),
                identities = image.identities.len(),
                cidrs = image.cidrs.len(),
                policy_entries = image.policy.len(),
                written = stats.written,
                removed = stats.removed,
                elapsed_ms = started.elapsed().as_millis(),
                "reconciled"
            );
        }
        self.ids = compiled.ids;
    }
}
