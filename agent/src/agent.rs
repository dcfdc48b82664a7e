//! `egret run`: sources send updates; one task owns the snapshot, and a debounced
//! reconcile compiles the whole of it and makes the kernel hold the result. Nothing
//! writes a map except this loop's apply step.

use std::{
    collections::{BTreeMap, BTreeSet},
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

use crate::{
    compile::{self, Allocator, Ids, Scope},
    datapath::{
        Capacities, Datapath, DatapathError,
        image::{KernelImage, Room},
        interfaces::{self, InterfaceError, Resolver},
    },
    observe::{
        EndpointName, Health, KindLabels, Live, LiveTables, MapLabels, Metrics, SourceLabels,
        StateLabels,
        flows::{AddressOwner, FlowLog, Sink, WINDOW},
        http,
    },
    source::{self, Signal, Update},
    state::{ObjectKey, Snapshot},
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

/// Debounce: reconcile this long after the last update of a burst...
const QUIET: Duration = Duration::from_millis(20);
/// ...but never later than this after the first.
const MAX_DELAY: Duration = Duration::from_millis(200);

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
    let metrics = Arc::new(Metrics::new(config.pin_dir.clone()));
    for (map, capacity) in capacity_rows(config.capacities) {
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

    let live = Arc::new(Live::default());
    let flow_log = FlowLog::new(
        config.flow_log.clone(),
        metrics.endpoint_names.clone(),
        live.addresses.clone(),
        live.tier_rules.clone(),
        metrics.denied_flows.clone(),
        config.flow_history,
    );
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

    let mut reconciler = Reconciler {
        node: config.node_name.clone(),
        snapshot: Snapshot::default(),
        ids: ids_avoiding(datapath.held()),
        problems: Vec::new(),
        attached: BTreeSet::new(),
        pending_sources,
        batch: Vec::new(),
        resolver: Resolver::new()?,
        metrics,
        health,
        live,
        capacities: config.capacities,
        failed_closed: Vec::new(),
        attach: config.attach,
        cgroup_root: config
            .cgroup_root
            .clone()
            .or_else(crate::datapath::cgroups::cgroup2_root),
    };
    reconciler
        .run(&mut datapath, received, config.resync, shutdown)
        .await;
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

fn capacity_rows(capacities: Capacities) -> [(&'static str, u32); 6] {
    use egret_common::maps::names;
    [
        (names::ENDPOINT, capacities.endpoints),
        (names::IDENTITY, capacities.identities),
        (names::CIDR, capacities.cidrs),
        (names::POLICY, capacities.policy),
        (names::CT_ESTABLISHED, capacities.ct_established),
        (names::CT_UNASSURED, capacities.ct_unassured),
    ]
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
    }
}

struct Reconciler {
    node: String,
    snapshot: Snapshot,
    ids: Ids,
    /// Problems reported last time, so each is logged when it appears, not every resync.
    problems: Vec<String>,
    /// Interfaces this process attached (or took over from a predecessor's pinned links).
    attached: BTreeSet<u32>,
    /// Sources that have not yet delivered a complete view: not ready until empty.
    pending_sources: BTreeSet<&'static str>,
    /// Arrival times of the changes not yet in the kernel.
    batch: Vec<Instant>,
    resolver: Resolver,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    live: Arc<Live>,
    capacities: Capacities,
    /// Pods failing closed for want of table room, as last reported.
    failed_closed: Vec<String>,
    attach: AttachMode,
    cgroup_root: Option<PathBuf>,
}

impl Reconciler {
    async fn run(
        &mut self,
        datapath: &mut Datapath,
        mut updates: mpsc::Receiver<Update>,
        resync: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut resync_timer = tokio::time::interval(resync);
        resync_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let deadline = due.unwrap_or_else(|| tokio::time::Instant::now() + resync);
            tokio::select! {
                () = &mut shutdown => return,
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    if self.absorb(update) {
                        let first = self.batch.first().copied().map_or_else(tokio::time::Instant::now, Into::into);
                        due = Some((tokio::time::Instant::now() + QUIET).min(first + MAX_DELAY));
                    }
                }
                () = tokio::time::sleep_until(deadline), if due.is_some() => {
                    due = None;
                    self.reconcile(datapath).await;
                }
                _ = resync_timer.tick() => {
                    if self.pending_sources.is_empty() || !self.snapshot.pods.is_empty() {
                        self.reconcile(datapath).await;
                    }
                }
            }
            self.health.tick();
        }
    }

    /// Applies an update to the snapshot; true when a reconcile is due.
    fn absorb(&mut self, update: Update) -> bool {
        match update.apply(&mut self.snapshot) {
            Signal::Changed { received, problems } => {
                self.report_problems(problems);
                self.batch.push(received);
                true
            }
            // Nothing new (a re-read of unchanged files, a pod's status): no reconcile.
            Signal::Unchanged { problems } => {
                self.report_problems(problems);
                false
            }
            Signal::Synced { source } => {
                self.pending_sources.remove(source);
                self.pending_sources.is_empty()
            }
            Signal::WatchRestarted { kind } => {
                self.metrics
                    .watch_restarts
                    .get_or_create(&KindLabels {
                        kind: kind.to_owned(),
                    })
                    .inc();
                false
            }
            // The snapshot keeps what the source delivered last, and so does the kernel.
            Signal::Failed { source, problem } => {
                let labels = SourceLabels {
                    source: source.to_owned(),
                };
                self.metrics.source_failures.get_or_create(&labels).inc();
                self.metrics.source_stale.get_or_create(&labels).set(1);
                if self.health.source_failed(source, &problem) {
                    warn!(source, %problem, "source cannot be read; enforcing its last good snapshot");
                } else {
                    tracing::debug!(source, %problem, "source still cannot be read");
                }
                false
            }
            Signal::Recovered { source } => {
                let labels = SourceLabels {
                    source: source.to_owned(),
                };
                self.metrics.source_stale.get_or_create(&labels).set(0);
                if let Some(stale) = self.health.source_recovered(source) {
                    info!(
                        source,
                        since = stale.since,
                        failures = stale.failures,
                        "source readable again"
                    );
                }
                false
            }
        }
    }

    /// Logs the problems a source reported when they differ from last time.
    fn report_problems(&mut self, problems: Option<Vec<String>>) {
        if let Some(problems) = problems
            && problems != self.problems
        {
            for problem in &problems {
                warn!("{problem}");
            }
            self.problems = problems;
        }
    }

    async fn reconcile(&mut self, datapath: &mut Datapath) {
        let started = Instant::now();
        self.health.reconcile_started();
        self.metrics.reconcile_runs.inc();
        let compiled = compile::compile(&self.snapshot, &Scope::Node(self.node.clone()), &self.ids);
        let (ifindexes, cgroups) = match self.attach {
            AttachMode::Tc => (self.pod_interfaces(&compiled).await, BTreeMap::new()),
            AttachMode::Cgroup => (BTreeMap::new(), self.pod_cgroups(&compiled)),
        };
        let mut image = KernelImage::build(
            &compiled.tables,
            &ifindexes
                .iter()
                .map(|(pod, (ifindex, _))| (pod.clone(), *ifindex))
                .collect(),
            &cgroups
                .iter()
                .map(|(pod, cgroup)| (pod.clone(), cgroup.id))
                .collect(),
        );
        let room = Room {
            cidrs: self.capacities.cidrs as usize,
            policy: self.capacities.policy as usize,
        };
        let failed = image.fit(datapath.held(), room);
        self.report_overflow(&compiled, &failed);
        let stats = match datapath.apply(&image) {
            Ok(stats) => stats,
            Err(error) => {
                self.metrics.reconcile_failures.inc();
                warn!(%error, "applying tables failed; will retry");
                return;
            }
        };
        // Attach only once the endpoint's tables are in, so its first packet is judged
        // by its policy.
        self.attach_interfaces(datapath, &ifindexes);
        self.attach_cgroups(datapath, &cgroups);
        // Where each local pod is enforced, as status shows it.
        let attachments: BTreeMap<ObjectKey, String> = ifindexes
            .into_iter()
            .map(|(pod, (ifindex, name))| (pod, format!("{name} (ifindex {ifindex})")))
            .chain(
                cgroups
                    .into_iter()
                    .map(|(pod, cgroup)| (pod, format!("cgroup {}", cgroup.id))),
            )
            .collect();
        let live: BTreeSet<u32> = image
            .endpoints
            .values()
            .chain(image.cgroup_endpoints.values())
            .map(|e| e.id)
            .collect();
        if let Err(error) = datapath.prune_counters(&live) {
            warn!(%error, "cannot prune counters of gone pods");
        }

        self.publish(&compiled, &attachments, &image, started);
        if stats.written + stats.removed > 0 {
            info!(
                endpoints = image.endpoints.len() + image.cgroup_endpoints.len(),
                identities = image.identities.len(),
                cidrs = image.cidrs.len(),
                policy_entries = image.policy.len(),
                written = stats.written,
                removed = stats.removed,
                elapsed_ms = started.elapsed().as_millis(),
                "reconciled"
            );
        }
        if self.pending_sources.is_empty() && !self.health.is_ready() {
            // Every local pod's links now run this agent's programs: what an agent of
            // the first map layout left can be taken over and removed.
            if let Err(error) = datapath.retire_legacy_maps() {
                warn!(%error, "cannot take over the first layout's tracked flows");
            }
            info!("first full sync programmed: ready");
            self.health.set_ready();
        }
        self.share(compiled, attachments, &image, started);
    }

    /// The host interface of each local pod (TC mode).
    async fn pod_interfaces(
        &self,
        compiled: &compile::Compiled,
    ) -> BTreeMap<ObjectKey, (u32, String)> {
        let local = compiled.tables.endpoints.keys().filter_map(|key| {
            self.snapshot
                .pods
                .get(key)
                .map(|pod| (key, pod.ips.as_slice()))
        });
        let (interfaces, problems) = self.resolver.resolve(local).await;
        for problem in &problems {
            tracing::debug!("{problem}");
        }
        interfaces
            .into_iter()
            .map(|(pod, i)| (pod, (i.ifindex, i.name)))
            .collect()
    }

    /// The cgroup of each local pod (cgroup mode).
    fn pod_cgroups(
        &self,
        compiled: &compile::Compiled,
    ) -> BTreeMap<ObjectKey, crate::datapath::cgroups::PodCgroup> {
        let Some(root) = &self.cgroup_root else {
            warn!("no cgroup v2 hierarchy found: pass --cgroup-root");
            return BTreeMap::new();
        };
        let local = compiled.tables.endpoints.keys().filter_map(|key| {
            self.snapshot
                .pods
                .get(key)
                .map(|pod| (key, pod.uid.as_str()))
        });
        crate::datapath::cgroups::find(root, local)
    }

    /// Attaches to new pod interfaces (taking over a predecessor's pinned links the
    /// first time) and detaches from interfaces that no longer lead to a local pod.
    fn attach_interfaces(
        &mut self,
        datapath: &mut Datapath,
        interfaces: &BTreeMap<ObjectKey, (u32, String)>,
    ) {
        let pinned_before: BTreeSet<u32> = datapath.pinned_links().into_iter().collect();
        for (pod, (ifindex, name)) in interfaces {
            if self.attached.contains(ifindex) {
                continue;
            }
            if !pinned_before.contains(ifindex) {
                self.seed_flows(datapath, pod);
            }
            match datapath.attach(name, *ifindex) {
                Ok(()) => {
                    self.attached.insert(*ifindex);
                }
                Err(error) => warn!(%pod, %error, "cannot attach"),
            }
        }
        let wanted: BTreeSet<u32> = interfaces.values().map(|(ifindex, _)| *ifindex).collect();
        self.attached.retain(|ifindex| wanted.contains(ifindex));
        let pinned: BTreeSet<u32> = datapath.pinned_links().into_iter().collect();
        for ifindex in pinned.difference(&wanted) {
            info!(
                ifindex,
                "detaching from an interface that no longer leads to a local pod"
            );
            datapath.detach(*ifindex);
        }
    }

    /// Attaches to new pod cgroups and detaches from the cgroups of gone pods.
    fn attach_cgroups(
        &mut self,
        datapath: &mut Datapath,
        cgroups: &BTreeMap<ObjectKey, crate::datapath::cgroups::PodCgroup>,
    ) {
        let pinned_before: BTreeSet<u64> = datapath.pinned_cgroup_links().into_iter().collect();
        for (pod, cgroup) in cgroups {
            if !pinned_before.contains(&cgroup.id) {
                self.seed_flows(datapath, pod);
            }
            if let Err(error) = datapath.attach_cgroup(&cgroup.path, cgroup.id) {
                warn!(%pod, %error, "cannot attach to the pod's cgroup");
            }
        }
        let wanted: BTreeSet<u64> = cgroups.values().map(|c| c.id).collect();
        for cgroup in datapath.pinned_cgroup_links() {
            if !wanted.contains(&cgroup) {
                datapath.detach_cgroup(cgroup);
            }
        }
    }

    /// Before Egret first judges a pod, the flows the kernel already tracks for it
    /// become conntrack entries: connections it accepted earlier are not cut.
    fn seed_flows(&self, datapath: &mut Datapath, pod: &ObjectKey) {
        let Some(addresses) = self.snapshot.pods.get(pod).map(|p| p.ips.clone()) else {
            return;
        };
        // Absent when the node does no connection tracking: nothing to seed.
        let Ok(table) = std::fs::read_to_string("/proc/net/nf_conntrack") else {
            return;
        };
        let flows =
            crate::datapath::seed::flows_of(&crate::datapath::seed::parse(&table), &addresses);
        if flows.is_empty() {
            return;
        }
        match datapath.seed_flows(&flows) {
            Ok(()) => {
                info!(%pod, flows = flows.len(), "seeded established flows from the kernel's conntrack");
            }
            Err(error) => warn!(%pod, %error, "cannot seed established flows"),
        }
    }

    /// Logs (when it changes) and counts the pods failing closed for want of room.
    fn report_overflow(&mut self, compiled: &compile::Compiled, failed: &[u32]) {
        let pods: Vec<String> = compiled
            .tables
            .endpoints
            .iter()
            .filter(|(_, entry)| failed.contains(&entry.id))
            .map(|(pod, _)| pod.to_string())
            .collect();
        let labels = StateLabels {
            state: "fail_closed".to_owned(),
        };
        self.metrics
            .endpoints
            .get_or_create(&labels)
            .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
        if pods != self.failed_closed {
            if !pods.is_empty() {
                tracing::error!(
                    pods = %pods.join(", "),
                    "the policy or CIDR table is full: these pods fail closed (they may send nothing) \
                     until policies shrink or --max-policy-entries / --max-cidrs grow"
                );
                self.metrics.table_overflows.inc();
            }
            self.failed_closed = pods;
        }
    }

    /// Hands the tables just programmed to the admin API and the flow log.
    fn share(
        &mut self,
        compiled: compile::Compiled,
        attachments: BTreeMap<ObjectKey, String>,
        image: &KernelImage,
        started: Instant,
    ) {
        self.ids = compiled.ids;
        let mut addresses = BTreeMap::new();
        for pod in self.snapshot.pods.values().filter(|p| p.takes_part()) {
            for ip in &pod.ips {
                let owner = AddressOwner {
                    kind: "pod",
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                };
                addresses.entry(*ip).or_insert(owner);
            }
        }
        for service in self.snapshot.services.values() {
            for ip in &service.virtual_ips {
                let owner = AddressOwner {
                    kind: "service",
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                };
                addresses.entry(*ip).or_insert(owner);
            }
        }
        *self
            .live
            .addresses
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = addresses;
        self.live
            .tier_rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone_from(&compiled.tables.tier_rules);
        let pod_ips = compiled
            .tables
            .endpoints
            .keys()
            .filter_map(|key| {
                self.snapshot
                    .pods
                    .get(key)
                    .map(|pod| (key.clone(), pod.ips.clone()))
            })
            .collect();
        let maps = image
            .entry_counts()
            .into_iter()
            .zip(capacity_rows(self.capacities))
            .map(|((map, entries), (_, capacity))| (map, entries, capacity))
            .collect();
        let tables = LiveTables {
            node: self.node.clone(),
            tables: compiled.tables,
            attachments,
            pod_ips,
            policies: self.snapshot.policies.len(),
            maps,
            reconciled_at: std::time::SystemTime::now(),
            reconcile_duration: started.elapsed(),
        };
        *self
            .live
            .tables
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(tables));
    }

    fn publish(
        &mut self,
        compiled: &compile::Compiled,
        attachments: &BTreeMap<ObjectKey, String>,
        image: &KernelImage,
        started: Instant,
    ) {
        let now = Instant::now();
        for received in self.batch.drain(..) {
            self.metrics
                .programming_latency
                .observe(now.duration_since(received).as_secs_f64());
        }
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        for (kind, count) in [
            ("NetworkPolicy", self.snapshot.policies.len()),
            ("ClusterNetworkPolicy", self.snapshot.cluster_policies.len()),
        ] {
            let labels = KindLabels {
                kind: kind.to_owned(),
            };
            self.metrics
                .policies
                .get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let enforced = attachments.len();
        let waiting = compiled.tables.endpoints.len() - enforced;
        for (state, count) in [("enforced", enforced), ("not_attached", waiting)] {
            let labels = StateLabels {
                state: state.to_owned(),
            };
            self.metrics
                .endpoints
                .get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        for (map, count) in image.entry_counts() {
            let labels = MapLabels {
                map: map.to_owned(),
            };
            self.metrics
                .map_entries
                .get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let names: BTreeMap<u32, EndpointName> = compiled
            .tables
            .endpoints
            .iter()
            .map(|(pod, entry)| {
                let policy_set = entry
                    .isolated_by
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                (
                    entry.id,
                    EndpointName {
                        pod: pod.clone(),
                        policy_set,
                    },
                )
            })
            .collect();
        *self
            .metrics
            .endpoint_names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
    }
}
