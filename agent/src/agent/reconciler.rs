//! The one task that owns the snapshot: updates mark it dirty, and a debounced
//! reconcile compiles it, looks at the node, plans the change, applies it and records
//! the outcome.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::warn;

use super::{
    apply::Writer,
    plan,
    record::{Applied, Recorder},
};
use crate::{
    compile::{Compiled, incremental::Compiler},
    datapath::image::Room,
    node::{self, Discovery},
    source::{Signal, Update},
    state::{Changes, ObjectKey, Pod, Snapshot},
};

/// Debounce: reconcile this long after the last update of a burst...
const QUIET: Duration = Duration::from_millis(20);
/// ...but never later than this after the first.
const MAX_DELAY: Duration = Duration::from_millis(200);

pub struct Reconciler {
    pub snapshot: Snapshot,
    /// Compiles what changed since the last reconcile.
    pub compiler: Compiler,
    /// What changed in the snapshot since the last compile.
    pub changes: Changes,
    /// Problems reported last time, so each is logged when it appears, not every resync.
    pub problems: Vec<String>,
    /// Sources that have not yet delivered a complete view: not ready until empty.
    pub pending_sources: BTreeSet<&'static str>,
    /// Arrival times of the changes not yet in the kernel.
    pub batch: Vec<Instant>,
    pub discovery: Discovery,
    pub room: Room,
    pub writer: Writer,
    pub recorder: Recorder,
}

impl Reconciler {
    pub async fn run(
        &mut self,
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
                    self.reconcile().await;
                }
                _ = resync_timer.tick() => {
                    if self.pending_sources.is_empty() || !self.snapshot.pods.is_empty() {
                        self.reconcile().await;
                    }
                }
            }
            self.recorder.tick();
        }
    }

    /// Compile, look, plan, apply, record.
    async fn reconcile(&mut self) {
        let started = Instant::now();
        self.recorder.reconcile_started();
        let compiled = self
            .compiler
            .compile(&self.snapshot, &std::mem::take(&mut self.changes));
        let view = self
            .discovery
            .look(local_pods(&self.snapshot, compiled))
            .await;
        let change = plan::plan(
            &self.snapshot,
            compiled,
            &view,
            self.writer.held(),
            self.room,
        );
        self.recorder.fail_closed(&change.failed_closed);
        let stats = match self.writer.write_tables(&change) {
            Ok(stats) => stats,
            Err(error) => return self.recorder.apply_failed(&error),
        };
        let tracked = change.needs_seeding().then(node::conntrack::read).flatten();
        self.writer.write_links(&change, tracked.as_deref());
        self.recorder.applied(&Applied {
            snapshot: &self.snapshot,
            compiled,
            change: &change,
            stats,
            received: std::mem::take(&mut self.batch),
            started,
        });
        if self.pending_sources.is_empty() && !self.recorder.is_ready() {
            // Every local pod's links now run this agent's programs: what an agent of
            // the first map layout left can be taken over and removed.
            self.writer.retire_legacy_maps();
            self.recorder.ready();
        }
    }

    /// Applies an update to the snapshot; true when a reconcile is due.
    fn absorb(&mut self, update: Update) -> bool {
        match update.apply(&mut self.snapshot, &mut self.changes) {
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
                self.recorder.watch_restarted(kind);
                false
            }
            // The snapshot keeps what the source delivered last, and so does the kernel.
            Signal::Failed { source, problem } => {
                self.recorder.source_failed(source, &problem);
                false
            }
            Signal::Recovered { source } => {
                self.recorder.source_recovered(source);
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
}

/// The pods the compiled tables enforce on this node.
fn local_pods<'a>(
    snapshot: &'a Snapshot,
    compiled: &'a Compiled,
) -> impl Iterator<Item = (&'a ObjectKey, &'a Pod)> {
    compiled
        .tables
        .endpoints
        .keys()
        .filter_map(|key| snapshot.pods.get(key).map(|pod| (key, pod)))
}
