//! `egret run`: sources send updates; one task owns the snapshot, and a debounced
//! reconcile compiles the whole of it and makes the kernel hold the result. Nothing
//! writes a map except this loop's apply step.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use egret_common::maps::{
    SETTINGS_FLAG_AUDIT_ALL, SETTINGS_FLAG_DENY_UNKNOWN, SETTINGS_FLAG_EVENTS_ALLOWED,
    SETTINGS_FLAG_KEEP_ESTABLISHED, Settings,
};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::{apply::Writer, reconciler::Reconciler, record::Recorder};
use crate::{
    compile::{Allocator, Ids, Scope, incremental::Compiler},
    datapath::{
        Capacities, Datapath, DatapathError,
        image::{KernelImage, Room},
    },
    node::{
        Discovery,
        interfaces::{self, InterfaceError},
    },
    observe::{
        Health, Live, MapLabels, Metrics,
        dns::DomainLookup,
        flows::{FlowLog, Sink, WINDOW},
        http,
    },
    source::{self, Update},
    state::{Changes, Snapshot},
};

mod apply;
mod plan;
mod reconciler;
mod record;

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

/// Where the programs attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TC on each pod's host-side interface (found from the node's route to the pod).
    #[default]
    Tc,
    /// `cgroup_skb` on each pod's cgroup (found from the pod's UID), cgroup v2.
    Cgroup,
}

impl AttachMode {
    fn name(self) -> &'static str {
        match self {
            AttachMode::Tc => "tc",
            AttachMode::Cgroup => "cgroup",
        }
    }
}

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    Manifests(PathBuf),
    /// The API server: in-cluster config, or this kubeconfig.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub source: SourceConfig,
    pub pin_dir: PathBuf,
    pub attach: AttachMode,
    /// The cgroup v2 tree searched for pod cgroups; `None`: the cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    pub mode: GlobalMode,
    pub unknown_pod: UnknownPod,
    pub established: Established,
    /// Flow events each endpoint may report per second.
    pub events_per_second: u32,
    /// Report new allowed flows too, not only denials.
    pub events_allowed: bool,
    pub capacities: Capacities,
    /// Idle timeouts of the connection tracker.
    pub conntrack_timeouts: egret_common::maps::Timeouts,
    /// Full re-read and reconcile at least this often (a safety net under events).
    pub resync: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Where `egret status`, `explain` and `flows` reach the agent; `None`: not served.
    pub admin_addr: Option<SocketAddr>,
    pub flow_log: Sink,
    /// Flow records kept in memory for `egret flows`.
    pub flow_history: usize,
    /// Lifetimes of addresses learnt from DNS answers (`--dns-min-ttl`, `--dns-grace`).
    pub dns: egret_common::dns::DnsSettings,
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Interfaces(#[from] InterfaceError),
    #[error("connecting to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("reading the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("serving metrics on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs until `shutdown` resolves. Enforcement stays pinned in place afterwards.
///
/// # Errors
/// When the kernel programs cannot be loaded, the API server cannot be configured, or
/// the metrics address cannot be bound; failures of single reconciles are logged,
/// counted and retried.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let mut datapath = Datapath::open(&config.pin_dir, config.capacities)?;
    datapath.set_settings(settings(&config))?;
    datapath.set_dns_settings(config.dns)?;
    let metrics = Arc::new(Metrics::new(config.pin_dir.clone()));
    for (map, capacity) in record::capacity_rows(config.capacities) {
        metrics
            .map_capacity
            .get_or_create(&MapLabels {
                map: map.to_owned(),
            })
            .set(i64::from(capacity));
    }
    let health = Arc::new(Health::new((config.resync * 3).max(Duration::from_mins(1))));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = config.metrics_addr {
        let observed = http::Observed {
            metrics: Arc::clone(&metrics),
            health: Arc::clone(&health),
        };
        let listener_shutdown = wait_for(shutdown_rx.clone());
        let server = http::serve(addr, observed, listener_shutdown);
        let bound = tokio::spawn(server);
        // Surface a bind error now rather than from a detached task.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if bound.is_finished() {
            return match bound.await {
                Ok(Err(source)) => Err(AgentError::Serve { addr, source }),
                _ => Ok(()),
            };
        }
    }

    let live = Arc::new(Live::new(config.pin_dir.clone()));
    let flow_log = flow_log(&config, &metrics, &live);
    if let Some(addr) = config.admin_addr {
        let admin = http::Admin {
            live: Arc::clone(&live),
            health: Arc::clone(&health),
            flows: flow_log.history.clone(),
            attach_mode: config.attach.name(),
        };
        let server = http::serve_admin(addr, admin, wait_for(shutdown_rx.clone()));
        tokio::spawn(async move {
            if let Err(error) = server.await {
                warn!(%addr, %error, "cannot serve the admin API");
            }
        });
    }
    if let Some(logger) = datapath.take_kernel_log() {
        tokio::spawn(forward_kernel_log(logger));
    }
    if let Some(reader) = datapath.take_events() {
        let lost = datapath.lost_events()?;
        let lost_metric = metrics.events_lost.clone();
        tokio::spawn(follow_flows(reader, lost, lost_metric, flow_log));
    }

    let (updates, received) = mpsc::channel(4096);
    let pending_sources = start_sources(&config, updates).await?;

    let discovery = match config.attach {
        AttachMode::Tc => Discovery::interfaces()?,
        AttachMode::Cgroup => Discovery::cgroups(config.cgroup_root.clone()),
    };
    let mut reconciler = Reconciler {
        snapshot: Snapshot::default(),
        compiler: Compiler::new(
            Scope::Node(config.node_name.clone()),
            ids_avoiding(datapath.held()),
        ),
        changes: Changes::default(),
        unrecorded_changes: false,
        problems: Vec::new(),
        pending_sources,
        batch: Vec::new(),
        discovery,
        room: Room {
            cidrs: config.capacities.cidrs as usize,
            policy: config.capacities.policy as usize,
        },
        writer: Writer::new(datapath),
        recorder: Recorder::new(
            config.node_name.clone(),
            metrics,
            health,
            live,
            config.capacities,
        ),
    };
    reconciler.run(received, config.resync, shutdown).await;
    let _ = shutdown_tx.send(true);
    info!(
        "shutting down; enforcement stays pinned under {}",
        config.pin_dir.display()
    );
    Ok(())
}

/// Starts the configured source and the link/route watcher; returns the sources the
/// agent must hear a complete view from before it is ready.
async fn start_sources(
    config: &Config,
    updates: mpsc::Sender<Update>,
) -> Result<BTreeSet<&'static str>, AgentError> {
    let pending_sources = match &config.source {
        SourceConfig::Manifests(dir) => {
            let (dir, updates, resync) = (dir.clone(), updates.clone(), config.resync);
            tokio::spawn(source::manifest::watch(dir, updates, resync));
            BTreeSet::from([source::manifest::SOURCE])
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_ref()).await?;
            tokio::spawn(source::kube::run(
                client,
                updates.clone(),
                source::kube::CRD_RECHECK,
            ));
            source::kube::KINDS.into_iter().collect()
        }
    };
    let (link_tx, mut link_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(error) = interfaces::watch_changes(link_tx).await {
            warn!(%error, "cannot watch links and routes; relying on resyncs");
        }
    });
    tokio::spawn(async move {
        while link_rx.recv().await.is_some() {
            if updates
                .send(Update::Poke {
                    received: Instant::now(),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    Ok(pending_sources)
}

/// The flow log, naming pods, addresses, tier rules and the DNS answers behind them.
fn flow_log(config: &Config, metrics: &Metrics, live: &Arc<Live>) -> FlowLog {
    let mut flow_log = FlowLog::new(
        config.flow_log.clone(),
        metrics.endpoint_names.clone(),
        live.addresses.clone(),
        live.tier_rules.clone(),
        metrics.denied_flows.clone(),
        config.flow_history,
    );
    flow_log.domains = Some(DomainLookup::new(Arc::clone(live)));
    flow_log
}

/// Reads flow events as they come and writes the aggregated flow log every window.
async fn follow_flows(
    reader: crate::datapath::events::EventReader,
    lost: crate::datapath::events::LostEvents,
    lost_metric: prometheus_client::metrics::counter::Counter,
    mut log: FlowLog,
) {
    // SAFETY: the reader owns the ring buffer's fd for its whole life and always
    // returns that same fd; the AsyncFd owns the reader.
    let registered = unsafe { tokio::io::unix::AsyncFd::register(reader) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "cannot poll the flow event ring buffer; no flow log");
            return;
        }
    };
    let mut window = tokio::time::interval(WINDOW);
    let mut lost_seen = lost.total();
    loop {
        tokio::select! {
            readable = ring.readable_mut() => {
                let Ok(mut guard) = readable else { return };
                while let Some(event) = guard.get_inner_mut().next_event() {
                    log.record(&event);
                }
                guard.clear_ready();
            }
            _ = window.tick() => {
                log.flush();
                log.prune();
                let total = lost.total();
                lost_metric.inc_by(total.saturating_sub(lost_seen));
                lost_seen = total;
            }
        }
    }
}

/// Forwards the kernel's log records (aya-log) to `tracing` as they come.
async fn forward_kernel_log(logger: aya_log::EbpfLogger<crate::datapath::KernelLog>) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always
    // returns that same fd; the AsyncFd owns the logger.
    let registered = unsafe { tokio::io::unix::AsyncFd::register(logger) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, "cannot poll the kernel log ring buffer; no kernel log");
            return;
        }
    };
    loop {
        let Ok(mut guard) = ring.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

async fn wait_for(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

fn settings(config: &Config) -> Settings {
    let mut settings = Settings {
        events_per_second: config.events_per_second,
        timeouts: config.conntrack_timeouts,
        ..Settings::DEFAULT
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
    if config.events_allowed {
        settings.flags |= SETTINGS_FLAG_EVENTS_ALLOWED;
    }
    settings
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, AgentError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?,
    };
    Ok(kube::Client::try_from(config)?)
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
        tables: Allocator::reserving(
            held.endpoints
                .values()
                .chain(held.cgroup_endpoints.values())
                .map(|e| e.table)
                .chain(
                    held.cidrs
                        .keys()
                        .map(|(_, key)| u32::from_be_bytes(key.table)),
                )
                .chain(
                    held.policy
                        .keys()
                        .map(|(_, key)| u32::from_be_bytes(key.table)),
                ),
        ),
        domains: Allocator::reserving(
            held.dns_names
                .values()
                .map(|entry| entry.identity & !egret_common::dns::DOMAIN_IDENTITY_BIT),
        ),
    }
}
