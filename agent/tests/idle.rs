//! An idle agent rests: with nothing changing, it reconciles only on its resync timer,
//! however much its own attach work or the node's links chatter on netlink.

mod common;

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use common::{
    egress_policy, scrape_metrics,
    site::{self, Site},
};
use egret_testbed::Topology;

/// The value of an unlabelled counter in a `/metrics` page.
fn counter(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent runs");
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    let ticks = u64::try_from(ticks).unwrap_or(100);
    Duration::from_millis(fields.iter().sum::<u64>() * 1000 / ticks)
}

fn reconcile_runs(topology: &Topology) -> u64 {
    scrape_metrics(topology)
        .and_then(|page| counter(&page, "egret_reconcile_runs_total"))
        .expect("the agent serves egret_reconcile_runs_total")
}

const RESYNC_SECONDS: u64 = 10;
const WATCHED: Duration = Duration::from_secs(30);

#[test]
fn idle_agent_reconciles_only_on_resync() {
    if !egret_testbed::require_root("idle_agent_reconciles_only_on_resync") {
        return;
    }
    // A thousand CIDRs, as in the measurement that found the agent busy.
    let mut blocks = String::from("[{to: [");
    for i in 0..1000u32 {
        let _ = write!(
            blocks,
            "{{ipBlock: {{cidr: 172.{}.{}.0/24}}}},",
            16 + i / 256,
            i % 256
        );
    }
    blocks.push_str("{podSelector: {matchLabels: {app: server}}}]}]");
    let site = Site::new(
        &site::SHOP[..2],
        &egress_policy("client", "client", &blocks, ""),
    );
    let topology = &site.topology;
    let resync = RESYNC_SECONDS.to_string();
    let agent = site.start(&["--resync-seconds", &resync]);
    // Let the first sync and its attach work settle.
    std::thread::sleep(Duration::from_secs(2));

    let pid = agent.pid().expect("the agent runs");
    let started = Instant::now();
    let before = reconcile_runs(topology);
    let cpu_before = cpu_time(pid);
    std::thread::sleep(WATCHED.saturating_sub(started.elapsed()));
    let after = reconcile_runs(topology);
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    eprintln!(
        "idle for {WATCHED:?}: {} reconciles, {cpu:?} of CPU",
        after - before
    );
    let allowed = WATCHED.as_secs() / RESYNC_SECONDS + 1;
    assert!(
        after - before <= allowed,
        "{} reconciles in {WATCHED:?} with nothing changing (at most {allowed}: one per \
         {RESYNC_SECONDS} s resync)\n{}",
        after - before,
        common::log_tail(&agent, 4000)
    );
    // A generous bound: the resyncs' compiles, not a loop re-reading the manifests.
    assert!(
        cpu < WATCHED / 6,
        "the idle agent used {cpu:?} of CPU in {WATCHED:?}"
    );
}
