//! The agent's memory on generated clusters of 1k, 10k and 100k pods, read two ways:
//! through the Kubernetes source (`egret run --kubeconfig`) from a list/watch API
//! server serving the cluster (the production path: paged lists of objects as a
//! cluster serves them, watches held open), and from a manifest directory holding the
//! cluster as one YAML file. The agent runs in a node namespace whose 100 local pods
//! are real (namespaces and veths) until its first full sync is programmed; then its
//! peak resident memory (`VmHWM`), its resident memory, and the BPF memory of the maps
//! it holds (`memlock` in fdinfo). The 1k-pod cluster is the baseline: what the agent
//! needs whatever the cluster's size.

use std::{collections::BTreeMap, net::Ipv6Addr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use egret_testbed::{
    Topology, agent::AgentProcess, apiserver::ClusterApiServer, cluster::GeneratedCluster,
    manifests::write_file,
};
use serde_json::{Value, json};

use super::{Scale, ScratchDir, wait_for};

/// The agent logs this once its first full reconcile is in the kernel.
const READY_LOG: &str = "first full sync programmed";

/// Where the measured agent reads the cluster from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--kubeconfig`: the API server.
    Kubernetes,
    /// `--manifests`: a directory of YAML.
    Manifests,
}

impl Source {
    /// As the raw results and the report name it.
    pub fn name(self) -> &'static str {
        match self {
            Source::Kubernetes => "kubernetes",
            Source::Manifests => "manifests",
        }
    }
}

pub fn run(agent: &Path, scale: Scale) -> anyhow::Result<Vec<Value>> {
    // The 1k-pod cluster shows what the agent needs whatever the cluster's size.
    let sizes: &[(usize, usize)] = if scale.quick {
        &[(1_000, 100), (10_000, 1_000)]
    } else {
        &[(1_000, 100), (10_000, 1_000), (100_000, 10_000)]
    };
    let mut results = Vec::new();
    for source in [Source::Kubernetes, Source::Manifests] {
        for &(pods, policies) in sizes {
            let cluster = GeneratedCluster::new(pods, policies);
            let row = measure(agent, &cluster, source)
                .with_context(|| format!("{} pods through {}", pods, source.name()))?;
            eprintln!(
                "bench: agent memory, {pods} pods through {}: peak {} KiB",
                source.name(),
                row["vm_hwm_kib"]
            );
            results.push(row);
        }
    }
    Ok(results)
}

fn measure(agent: &Path, cluster: &GeneratedCluster, source: Source) -> anyhow::Result<Value> {
    let topology = Topology::new()?;
    let started = std::time::Instant::now();
    for (n, index) in cluster.local_indexes().enumerate() {
        let (_, name) = GeneratedCluster::pod_key(index);
        let ipv6 = Ipv6Addr::new(0xfd00, 0xbe, 0, 0, 0, 0, 0, u16::try_from(n + 1)?);
        topology.add_pod(&name, GeneratedCluster::pod_ipv4(index), ipv6)?;
    }
    let pods_made = started.elapsed();
    let scratch = ScratchDir::new("memory")?;
    let pin_dir = AgentProcess::unique_pin_dir();
    let args = ["--metrics-addr", "off", "--resync-seconds", "3600"];
    // Kept until the agent is measured: the server holds its watches open.
    let mut api_server = None;
    let (started, mut process, input_bytes) = match source {
        Source::Kubernetes => {
            let server = ClusterApiServer::start(topology.node_netns(), cluster)?;
            let kubeconfig = server.write_kubeconfig(scratch.path())?;
            let bytes = server.object_bytes();
            api_server = Some(server);
            let started = std::time::Instant::now();
            let process = AgentProcess::start_with_kubeconfig(
                &topology,
                agent,
                &kubeconfig,
                &pin_dir,
                &args,
            )?;
            (started, process, bytes)
        }
        Source::Manifests => {
            let yaml = cluster.yaml();
            write_file(scratch.path(), "cluster.yaml", &yaml)?;
            let started = std::time::Instant::now();
            let process = AgentProcess::start(&topology, agent, scratch.path(), &pin_dir, &args)?;
            (started, process, yaml.len())
        }
    };
    // A 100k-pod cluster takes a few seconds to read and compile on two cores.
    if !wait_for(Duration::from_mins(5), || process.log().contains(READY_LOG)) {
        bail!(
            "the agent did not report its first sync ({READY_LOG:?}):\n{}",
            process.log()
        );
    }
    let ready = started.elapsed();
    let ifindexes: Vec<u32> = topology
        .pods()
        .iter()
        .map(egret_testbed::Pod::host_ifindex)
        .collect();
    process.wait_attached(&ifindexes, Duration::from_mins(1))?;
    // Let a reconcile or two pass: the peak is what a running agent reached.
    std::thread::sleep(Duration::from_secs(2));
    let pid = process.pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let hwm_kib = field("VmHWM:").context("no VmHWM")?;
    let rss_kib = field("VmRSS:").context("no VmRSS")?;
    let maps = map_memory(pid)?;
    let map_bytes: u64 = maps.values().map(|(_, bytes)| bytes).sum();
    let (list_pages, watches) = api_server.as_ref().map_or((0, 0), |server| {
        let served = server.served();
        (
            served.list_pages.load(std::sync::atomic::Ordering::Relaxed),
            served.watches.load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    drop(process);
    drop(api_server);
    let _ = egret_cleanup(&pin_dir);
    Ok(json!({
        "bench": "agent_memory",
        "source": source.name(),
        "pods": cluster.pods,
        "policies": cluster.policies,
        "local_pods": topology.pods().len(),
        "input_bytes": input_bytes,
        "vm_hwm_kib": hwm_kib,
        "vm_rss_kib": rss_kib,
        "map_memlock_bytes": map_bytes,
        "maps_by_type": maps.into_iter().map(|(k, (n, b))| (k, json!({"maps": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "ready_s": ready.as_secs_f64(),
        "local_pods_setup_s": pods_made.as_secs_f64(),
        "list_pages": list_pages,
        "watches": watches,
    }))
}

/// BPF map memory the process holds, by map type: (maps, bytes), each map once.
fn map_memory(pid: u32) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut by_type: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let value = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        let (Some(map_type), Some(id), Some(memlock)) =
            (value("map_type:"), value("map_id:"), value("memlock:"))
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let entry = by_type.entry(map_type_name(&map_type)).or_default();
        entry.0 += 1;
        entry.1 += memlock.parse::<u64>().unwrap_or(0);
    }
    Ok(by_type)
}

/// `enum bpf_map_type` numbers of the maps Egret uses.
fn map_type_name(number: &str) -> String {
    match number {
        "1" => "hash",
        "2" => "array",
        "5" => "percpu_hash",
        "6" => "percpu_array",
        "9" => "lru_hash",
        "11" => "lpm_trie",
        "27" => "ringbuf",
        other => return format!("type {other}"),
    }
    .to_owned()
}

/// Removes the agent's pins if its own cleanup left any.
fn egret_cleanup(pin_dir: &Path) -> std::io::Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
    }
    Ok(())
}
