//! Change latency as the agent itself measures it: `egret run` on a generated cluster
//! (10k pods and 1k policies; 100k and 10k in a full run), in a node namespace whose
//! 100 local pods are real (namespaces and veths), read two ways: from a manifest
//! directory, and through the Kubernetes source (`--kubeconfig`) from the list/watch
//! test server, the production path. After its first sync, a sequence of changes is
//! made, each awaited and followed by a pause, so that each is a lone change: policy
//! p0, which selects a local pod, gains or loses a port; a replica of a deployment
//! joins on another node, then leaves. Through manifests each is a file renamed into
//! or removed from the directory; through the API server, a watch event (`MODIFIED`,
//! `ADDED`, `DELETED`) on the open watch. p50 and p99 come from the agent's own
//! `egret_programming_latency_seconds` histogram (the bucket deltas around each
//! change, interpolated within a bucket as Prometheus' `histogram_quantile` does);
//! next to them, the time the reconciles themselves took (`reconcile_duration`), and
//! the time from the change (the rename, the event's write) to the kernel holding it,
//! seen from outside in the maps the agent pinned ([`kernel`]).

mod histogram;
mod kernel;

use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use egret_testbed::{
    Topology,
    agent::AgentProcess,
    apiserver::{ClusterApiServer, ClusterChange},
    cluster::GeneratedCluster,
    manifests::write_file,
};
use histogram::Histogram;
use kernel::KernelView;
use serde_json::{Value, json};

use super::{Scale, ScratchDir, memory::Source, wait_for};

/// The agent logs this once its first full reconcile is in the kernel.
const READY_LOG: &str = "first full sync programmed";
/// Where the agent serves `/metrics`, inside the node namespace.
const METRICS: ([u8; 4], u16) = ([127, 0, 0, 1], 9090);
/// The deployment whose replica joins and leaves (as in `agent/benches/control_plane.rs`).
const JOINING_DEPLOYMENT: usize = 5;
/// The changes of one round, in order.
const CHANGES: [&str; 3] = ["policy_edit", "pod_join", "pod_leave"];
/// The kinds the test server serves and the agent watches (its `ClusterNetworkPolicy`
/// path answers `404`, so that kind is not watched): the bench changes nothing before
/// every watch is open, or an event would wait for a watch to open.
const SERVED_KINDS: usize = 5;
/// The outside clock looks at the pinned maps this often (two or three lookups).
const KERNEL_POLL: Duration = Duration::from_micros(200);
/// After each change is counted, the next waits this long: one change to the kernel is
/// a lone change, which finds the agent idle (it batches changes that follow a
/// reconcile within 200 ms, as a burst).
const GAP: Duration = Duration::from_millis(300);

pub fn run(agent: &Path, scale: Scale) -> anyhow::Result<Vec<Value>> {
    // (source, pods, policies, rounds): through manifests every change at 100k
    // re-reads the whole directory (over 10 s a change on two cores), so few rounds
    // there; a watch event costs what the change costs.
    let sizes: &[(Source, usize, usize, usize)] = if scale.quick {
        &[
            (Source::Manifests, 10_000, 1_000, 10),
            (Source::Kubernetes, 10_000, 1_000, 30),
        ]
    } else {
        &[
            (Source::Manifests, 10_000, 1_000, 30),
            (Source::Manifests, 100_000, 10_000, 4),
            (Source::Kubernetes, 10_000, 1_000, 30),
            (Source::Kubernetes, 100_000, 10_000, 20),
        ]
    };
    let mut results = Vec::new();
    for &(source, pods, policies, rounds) in sizes {
        let cluster = GeneratedCluster::new(pods, policies);
        let rows = measure(agent, &cluster, source, rounds)
            .with_context(|| format!("{pods} pods through {}", source.name()))?;
        if let Some(all) = rows.iter().find(|row| row["change"] == "all") {
            eprintln!(
                "bench: agent change latency, {pods} pods through {}: p50 {} ms, p99 {} ms, outside p99 {} ms",
                source.name(),
                all["p50_ms"],
                all["p99_ms"],
                all["outside_p99_ms"]
            );
        }
        results.extend(rows);
    }
    Ok(results)
}

/// Where the changes go: the directory the agent reads, or the API server it watches.
enum Feed<'a> {
    Directory(&'a Path),
    ApiServer(&'a ClusterApiServer),
}

impl Feed<'_> {
    /// Makes `change` of round `round`. Through the directory each file appears or goes
    /// by one rename or unlink; through the API server, one watch event is written.
    fn make(&self, change: &str, round: usize, cluster: &GeneratedCluster) -> anyhow::Result<()> {
        // Ports 9001 and 9002 in turn: every edit changes the local pod's entries.
        let revision = u32::try_from(round % 2 + 1)?;
        match self {
            Feed::Directory(dir) => match change {
                "policy_edit" => write_file(dir, "p0.yaml", &cluster.policy_yaml(0, revision)),
                "pod_join" => write_file(
                    dir,
                    "joined.yaml",
                    &cluster.joining_pod_yaml(JOINING_DEPLOYMENT, 0),
                ),
                "pod_leave" => {
                    std::fs::remove_file(dir.join("joined.yaml")).context("removing the joined pod")
                }
                other => bail!("no such change: {other}"),
            },
            Feed::ApiServer(server) => {
                let (deployment, ordinal) = (JOINING_DEPLOYMENT, 0);
                let change = match change {
                    "policy_edit" => ClusterChange::PolicyRevised {
                        policy: 0,
                        revision,
                    },
                    "pod_join" => ClusterChange::PodJoined {
                        deployment,
                        ordinal,
                    },
                    "pod_leave" => ClusterChange::PodLeft {
                        deployment,
                        ordinal,
                    },
                    other => bail!("no such change: {other}"),
                };
                server.change(&change).map(|_| ())
            }
        }
    }
}

fn measure(
    agent: &Path,
    cluster: &GeneratedCluster,
    source: Source,
    rounds: usize,
) -> anyhow::Result<Vec<Value>> {
    let topology = Topology::new()?;
    for (n, index) in cluster.local_indexes().enumerate() {
        let (_, name) = GeneratedCluster::pod_key(index);
        let ipv6 = Ipv6Addr::new(0xfd00, 0xbe, 0, 0, 0, 0, 0, u16::try_from(n + 1)?);
        topology.add_pod(&name, GeneratedCluster::pod_ipv4(index), ipv6)?;
    }
    let scratch = ScratchDir::new("agent-latency")?;
    let dir = scratch.path();
    let pin_dir = AgentProcess::unique_pin_dir();
    // The API server is kept until the agent stops: it holds the agent's watches open.
    let (process, api_server) = start(agent, &topology, cluster, source, dir, &pin_dir)?;
    let feed = match &api_server {
        Some(server) => Feed::ApiServer(server),
        None => Feed::Directory(dir),
    };
    let subject = cluster
        .local_indexes()
        .position(|index| index == kernel::P0_SUBJECT)
        .and_then(|n| topology.pods().get(n).map(egret_testbed::Pod::host_ifindex))
        .context("p0's pod is not local")?;
    let kernel = KernelView::open(&pin_dir, subject)?;
    let by_change = changes(&topology, &process, &feed, &kernel, cluster, rounds)?;
    let events = api_server.as_ref().map(|server| {
        server
            .served()
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
    });
    drop(process);
    drop(api_server);
    if pin_dir.exists() {
        let _ = std::fs::remove_dir_all(&pin_dir);
    }
    if let Some(events) = events {
        // Each change reached the agent as one event, on the watch it had open.
        ensure!(
            events == rounds * CHANGES.len(),
            "the API server wrote {events} watch events for {} changes",
            rounds * CHANGES.len()
        );
    }

    let mut all = Observed::default();
    for observed in by_change.values() {
        all.merge(observed);
    }
    let context = RowContext { source, cluster };
    let rows = by_change
        .iter()
        .map(|(change, observed)| (*change, observed))
        .chain(std::iter::once(("all", &all)))
        .map(|(change, observed)| observed.row(change, &context))
        .collect();
    Ok(rows)
}

/// Starts the agent on `source` in the node namespace of `topology` and waits until it
/// has programmed its first sync, attached to every local pod and (Kubernetes source)
/// opened its watches. Returns it with the API server it reads (Kubernetes source).
fn start(
    agent: &Path,
    topology: &Topology,
    cluster: &GeneratedCluster,
    source: Source,
    dir: &Path,
    pin_dir: &Path,
) -> anyhow::Result<(AgentProcess, Option<ClusterApiServer>)> {
    let metrics_addr = std::net::SocketAddr::from(METRICS).to_string();
    let args = ["--metrics-addr", &metrics_addr, "--resync-seconds", "3600"];
    let mut api_server = None;
    let mut process = match source {
        Source::Manifests => {
            write_file(dir, "cluster.yaml", &cluster_but_p0(cluster))?;
            write_file(dir, "p0.yaml", &cluster.policy_yaml(0, 0))?;
            AgentProcess::start_logging(topology, agent, dir, pin_dir, &args, "info")?
        }
        Source::Kubernetes => {
            let server = ClusterApiServer::start(topology.node_netns(), cluster)?;
            let kubeconfig = server.write_kubeconfig(dir)?;
            api_server = Some(server);
            AgentProcess::start_with_kubeconfig_logging(
                topology,
                agent,
                &kubeconfig,
                pin_dir,
                &args,
                "info",
            )?
        }
    };
    if !wait_for(Duration::from_mins(5), || process.log().contains(READY_LOG)) {
        bail!(
            "the agent did not report its first sync ({READY_LOG:?}):\n{}",
            process.log()
        );
    }
    let ifindexes: Vec<u32> = topology
        .pods()
        .iter()
        .map(egret_testbed::Pod::host_ifindex)
        .collect();
    process.wait_attached(&ifindexes, Duration::from_mins(1))?;
    if let Some(server) = &api_server {
        // A watcher lists, reports the list, then opens its watch.
        if !wait_for(Duration::from_secs(30), || {
            server.open_watches() >= SERVED_KINDS
        }) {
            bail!(
                "the agent opened {} of {SERVED_KINDS} watches within 30 s:\n{}",
                server.open_watches(),
                process.log()
            );
        }
    }
    Ok((process, api_server))
}

/// Makes `rounds` rounds of [`CHANGES`] through `feed`, each awaited before the next
/// and followed by [`GAP`]; what the agent's histograms and the outside clock saw, by
/// change.
fn changes(
    topology: &Topology,
    process: &AgentProcess,
    feed: &Feed<'_>,
    kernel: &KernelView,
    cluster: &GeneratedCluster,
    rounds: usize,
) -> anyhow::Result<BTreeMap<&'static str, Observed>> {
    let mut by_change: BTreeMap<&str, Observed> = BTreeMap::new();
    let mut before = scrape(topology)?;
    for round in 0..rounds {
        for change in CHANGES {
            ensure!(
                !kernel.holds(change, round)?,
                "the kernel holds {change} of round {round} before it was made"
            );
            let started = Instant::now();
            feed.make(change, round, cluster)?;
            let outside = await_kernel(kernel, change, round, process)?;
            let after = await_counted(topology, &before, process)?;
            let observed = by_change.entry(change).or_default();
            observed.add(&after.since(&before));
            observed
                .outside_ms
                .push(outside.duration_since(started).as_secs_f64() * 1e3);
            before = after;
            std::thread::sleep(GAP);
        }
    }
    Ok(by_change)
}

/// Every object of the cluster but policy p0, which lives in a file of its own.
fn cluster_but_p0(cluster: &GeneratedCluster) -> String {
    let mut yaml = String::with_capacity(cluster.pods * 400 + cluster.policies * 500);
    for n in 0..cluster.namespaces() {
        yaml.push_str(&GeneratedCluster::namespace_yaml(n));
    }
    for index in 0..cluster.pods {
        yaml.push_str(&cluster.pod_yaml(index));
    }
    for p in 1..cluster.policies {
        yaml.push_str(&cluster.policy_yaml(p, 0));
    }
    yaml
}

/// Polls the pinned maps every [`KERNEL_POLL`] until the kernel holds `change`; when
/// it first did.
fn await_kernel(
    kernel: &KernelView,
    change: &str,
    round: usize,
    process: &AgentProcess,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_mins(2);
    while Instant::now() < deadline {
        if kernel.holds(change, round)? {
            return Ok(Instant::now());
        }
        std::thread::sleep(KERNEL_POLL);
    }
    bail!(
        "the kernel did not hold {change} of round {round} within 2 minutes:\n{}",
        process.log()
    )
}

/// Polls `/metrics` until the histogram has counted one more change (the agent
/// records it right after its maps and links are written).
fn await_counted(
    topology: &Topology,
    before: &Scrape,
    process: &AgentProcess,
) -> anyhow::Result<Scrape> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(now) = scrape(topology)
            && now.latency.count > before.latency.count
        {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!(
        "the agent did not count a change the kernel holds within 30 s:\n{}",
        process.log()
    )
}

/// The two histograms of one `/metrics` page.
#[derive(Clone, Debug, Default)]
struct Scrape {
    latency: Histogram,
    reconcile: Histogram,
}

impl Scrape {
    fn since(&self, earlier: &Scrape) -> Scrape {
        Scrape {
            latency: self.latency.since(&earlier.latency),
            reconcile: self.reconcile.since(&earlier.reconcile),
        }
    }
}

fn scrape(topology: &Topology) -> anyhow::Result<Scrape> {
    use std::io::{Read as _, Write as _};
    let page = egret_testbed::run_in_netns(topology.node_netns(), || {
        let address = std::net::SocketAddr::from(METRICS);
        let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut page = String::new();
        stream.read_to_string(&mut page)?;
        anyhow::Ok(page)
    })?;
    let scrape = Scrape {
        latency: Histogram::parse(&page, "egret_programming_latency_seconds"),
        reconcile: Histogram::parse(&page, "egret_reconcile_duration_seconds"),
    };
    ensure!(
        !scrape.latency.buckets.is_empty(),
        "no egret_programming_latency_seconds histogram on /metrics"
    );
    Ok(scrape)
}

/// What every row of one measurement shares.
struct RowContext<'a> {
    source: Source,
    cluster: &'a GeneratedCluster,
}

/// What the agent's histograms and the outside clock saw for one kind of change.
#[derive(Default)]
struct Observed {
    latency: Histogram,
    reconcile: Histogram,
    outside_ms: Vec<f64>,
}

impl Observed {
    fn add(&mut self, delta: &Scrape) {
        self.latency.add(&delta.latency);
        self.reconcile.add(&delta.reconcile);
    }

    fn merge(&mut self, other: &Observed) {
        self.latency.add(&other.latency);
        self.reconcile.add(&other.reconcile);
        self.outside_ms.extend_from_slice(&other.outside_ms);
    }

    fn row(&self, change: &str, context: &RowContext<'_>) -> Value {
        let cluster = context.cluster;
        let ms = |seconds: f64| seconds * 1e3;
        let quantile = |q| {
            self.latency
                .quantile(q)
                .map(|(at, (low, high))| (ms(at), [ms(low), ms(high)]))
        };
        let (p50, p50_bucket) = quantile(0.5).unzip();
        let (p99, p99_bucket) = quantile(0.99).unzip();
        json!({
            "bench": "agent_change_latency",
            "source": context.source.name(),
            "change": change,
            "pods": cluster.pods,
            "policies": cluster.policies,
            "changes": self.outside_ms.len(),
            "observed": self.latency.count,
            "p50_ms": p50,
            "p50_bucket_ms": p50_bucket,
            "p99_ms": p99,
            "p99_bucket_ms": p99_bucket,
            "mean_ms": mean_ms(&self.latency),
            "reconciles": self.reconcile.count,
            "reconcile_mean_ms": mean_ms(&self.reconcile),
            "outside_p50_ms": nearest_rank(&self.outside_ms, 0.5),
            "outside_p99_ms": nearest_rank(&self.outside_ms, 0.99),
            "outside_clock": "pinned maps",
            "kernel_poll_ms": KERNEL_POLL.as_secs_f64() * 1e3,
            "gap_ms": GAP.as_secs_f64() * 1e3,
        })
    }
}

/// The `q` quantile of `samples` by nearest rank.
fn nearest_rank(samples: &[f64], q: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * as_f64(sorted.len() as u64)).ceil();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank between 0 and the number of samples"
    )]
    let index = (rank as usize).saturating_sub(1);
    sorted.get(index).copied()
}

fn mean_ms(histogram: &Histogram) -> Option<f64> {
    (histogram.count > 0).then(|| histogram.sum / as_f64(histogram.count) * 1e3)
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}
