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
/// ...but never later than this after the first. A change that finds the loop idle
/// (synced, nothing pending, no reconcile for this long) is reconciled at once.
const MAX_DELAY: Duration = Duration::from_millis(200);

/// When the reconcile of a change that arrived `now` is due. `pending`: the reconcile
/// already due; `first`: when the oldest change not yet in the kernel arrived.
fn due_after_change(
    now: Instant,
    pending: Option<Instant>,
    first: Instant,
    last_reconcile: Option<Instant>,
    synced: bool,
) -> Instant {
    let idle = synced
        && pending.is_none()
        && last_reconcile.is_none_or(|at| now.duration_since(at) >= MAX_DELAY);
    if idle {
        // A lone change: the incremental compile makes it cheap, so it need not wait
        // for a burst that is not coming.
        now
    } else {
        (now + QUIET).min(first + MAX_DELAY)
    }
}

pub struct Reconciler {
    pub snapshot: Snapshot,
    /// Compiles what changed since the last reconcile.
    pub compiler: Compiler,
    /// What changed in the snapshot since the last compile.
    pub changes: Changes,
    /// The snapshot changed since the admin API's view of it was last refreshed.
    pub unrecorded_changes: bool,
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
        let mut due: Option<Instant> = None;
        let mut last_reconcile: Option<Instant> = None;
        loop {
            let deadline = due.unwrap_or_else(|| Instant::now() + resync);
            tokio::select! {
                // A reconcile that is due goes before more updates: a flood of them
                // never delays it past MAX_DELAY.
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep_until(deadline.into()), if due.is_some() => {
                    due = None;
                    self.reconcile().await;
                    last_reconcile = Some(Instant::now());
                }
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    let mut changed = self.take(update);
                    // Whatever else has already arrived joins this reconcile.
                    while let Ok(update) = updates.try_recv() {
                        changed |= self.take(update);
                    }
                    if changed {
                        let now = Instant::now();
                        let first = self.batch.first().copied().unwrap_or(now);
                        let synced = self.pending_sources.is_empty();
                        due = Some(due_after_change(now, due, first, last_reconcile, synced));
                    }
                }
                _ = resync_timer.tick() => {
                    // The resync looks at the node afresh, whatever netlink said.
                    self.discovery.forget();
                    if self.pending_sources.is_empty() || !self.snapshot.pods.is_empty() {
                        self.reconcile().await;
                        last_reconcile = Some(Instant::now());
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
        let changes = std::mem::take(&mut self.changes);
        // Kept until a reconcile records it: one whose apply fails records nothing.
        self.unrecorded_changes |= !changes.is_empty();
        let compiled = self.compiler.compile(&self.snapshot, &changes);
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
            snapshot_changed: std::mem::take(&mut self.unrecorded_changes),
            started,
        });
        if self.pending_sources.is_empty() && !self.recorder.is_ready() {
            // Every local pod's links now run this agent's programs: what an agent of
            // the first map layout left can be taken over and removed.
            self.writer.retire_legacy_maps();
            self.recorder.ready();
        }
    }

    /// Takes one update in; true when a reconcile is due.
    fn take(&mut self, update: Update) -> bool {
        if matches!(update, Update::Poke { .. }) {
            // A pod's link or route changed: its interface must be looked up again.
            self.discovery.forget();
        }
        self.absorb(update)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_change_is_reconciled_at_once_and_a_burst_is_batched() {
        let now = Instant::now();
        let long_ago = now.checked_sub(Duration::from_secs(5));
        // Idle and synced: at once.
        assert_eq!(due_after_change(now, None, now, long_ago, true), now);
        assert_eq!(due_after_change(now, None, now, None, true), now);
        // Before every source has synced: the first lists are batched.
        assert_eq!(
            due_after_change(now, None, now, long_ago, false),
            now + QUIET
        );
        // Right after a reconcile (a burst goes on): batched...
        let just_now = now.checked_sub(Duration::from_millis(5));
        assert_eq!(
            due_after_change(now, None, now, just_now, true),
            now + QUIET
        );
        // ...and never later than MAX_DELAY after the burst's first change.
        let first = now
            .checked_sub(MAX_DELAY.saturating_sub(Duration::from_millis(5)))
            .unwrap();
        assert_eq!(
            due_after_change(now, Some(now), first, just_now, true),
            first + MAX_DELAY
        );
    }
}
