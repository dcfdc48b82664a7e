//! The `egret` binary: the only place errors meet the user.

use std::{
    io::{BufRead as _, Write as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use egret::{
    agent::{self, Established, GlobalMode, UnknownPod},
    datapath::{self, Capacities, DEFAULT_PIN_DIR},
    simulate::Simulator,
    source::manifest,
};
use egret_common::{Reason, Verdict};

#[derive(Parser)]
#[command(
    name = "egret",
    version,
    about = "eBPF egress firewall for Kubernetes NetworkPolicies"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce the egress side of `NetworkPolicies` on this node's pods.
    Run(RunArgs),
    /// Answer "would this flow be allowed, and why" from manifest files, offline.
    Simulate {
        /// Directory of Kubernetes YAML: Namespaces, Pods, `NetworkPolicies`.
        #[arg(long)]
        manifests: PathBuf,
        /// JSON lines, one query each: {"from": "ns/pod", "to": "ns/pod" | "IP",
        /// "port": 80, "protocol": "TCP"|"UDP"|"SCTP"|"ICMP"}. `-` reads stdin.
        #[arg(long)]
        queries: PathBuf,
    },
    /// Print the kernel's per-endpoint packet counters from the pinned maps.
    Counters {
        /// Pin directory of the running agent.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove everything Egret attached and pinned (enforcement stops).
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Enforce a directory of Kubernetes YAML (Namespaces, Pods with status.podIP(s),
    /// NetworkPolicies, Services, EndpointSlices), watched for changes, instead of
    /// reading the API server.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; default: in-cluster config, then $KUBECONFIG
    /// and ~/.kube/config.
    #[arg(long, conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz; `off` disables it.
    #[arg(long, default_value = "0.0.0.0:9090", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// This node's name: pods with this spec.nodeName are enforced here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// enforce: drop what no policy allows; audit: count it and let it pass.
    #[arg(long, value_enum, default_value_t = GlobalMode::Enforce)]
    mode: GlobalMode,
    /// What happens to packets from a pod interface the agent has no policy for yet.
    #[arg(long, value_enum, default_value_t = UnknownPod::Allow)]
    unknown_pod: UnknownPod,
    /// What happens to flows a pod opened when a policy change stops allowing them:
    /// cut (judge every packet) or keep (until the flow goes idle).
    #[arg(long, value_enum, default_value_t = Established::Cut)]
    established: Established,
    /// Flow events (denials) each pod may report per second; the rest are counted as lost.
    #[arg(long, default_value_t = egret_common::maps::DEFAULT_EVENTS_PER_SECOND)]
    events_per_second: u32,
    /// Reconcile everything at least this often (seconds), besides reacting to changes.
    #[arg(long, default_value_t = 10.0)]
    resync_seconds: f64,
    /// Capacity of the endpoint map (local pods).
    #[arg(long, default_value_t = Capacities::default().endpoints)]
    max_endpoints: u32,
    /// Capacity of the identity map (pod addresses in the cluster).
    #[arg(long, default_value_t = Capacities::default().identities)]
    max_identities: u32,
    /// Capacity of the CIDR map (ipBlock prefixes, all local pods).
    #[arg(long, default_value_t = Capacities::default().cidrs)]
    max_cidrs: u32,
    /// Capacity of the policy map (allow entries, all local pods).
    #[arg(long, default_value_t = Capacities::default().policy)]
    max_policy_entries: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run(args),
        Command::Simulate { manifests, queries } => simulate(&manifests, &queries),
        Command::Counters { bpffs, output } => counters(&bpffs, output),
        Command::Cleanup { bpffs } => {
            let removed = datapath::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            println!("removed {removed} pinned objects under {}", bpffs.display());
            Ok(())
        }
    }
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(value: &str) -> Result<MetricsAddr, String> {
    if value == "off" {
        return Ok(MetricsAddr(None));
    }
    value
        .parse()
        .map(|addr| MetricsAddr(Some(addr)))
        .map_err(|e| format!("{value:?} is not host:port or `off`: {e}"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let resync = Duration::try_from_secs_f64(args.resync_seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--resync-seconds must be a positive number")?;
    let config = agent::Config {
        node_name: args.node_name,
        source: match (args.manifests, args.kubeconfig) {
            (Some(dir), _) => agent::SourceConfig::Manifests(dir),
            (None, kubeconfig) => agent::SourceConfig::Kubernetes { kubeconfig },
        },
        metrics_addr: args.metrics_addr.0,
        events_allowed: false,
        pin_dir: args.bpffs,
        mode: args.mode,
        unknown_pod: args.unknown_pod,
        established: args.established,
        events_per_second: args.events_per_second,
        capacities: Capacities {
            endpoints: args.max_endpoints,
            identities: args.max_identities,
            cidrs: args.max_cidrs,
            policy: args.max_policy_entries,
        },
        resync,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        agent::run(config, shutdown_signal())
            .await
            .context("egret run")
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn simulate(manifests: &std::path::Path, queries: &std::path::Path) -> anyhow::Result<()> {
    let loaded = manifest::load_dir(manifests);
    for problem in &loaded.problems {
        tracing::warn!("{problem}");
    }
    let simulator = Simulator::new(&loaded.snapshot);
    let input: Box<dyn std::io::BufRead> = if queries.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(queries)
            .with_context(|| format!("opening {}", queries.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut stdout = std::io::stdout().lock();
    for line in input.lines() {
        let line = line.context("reading queries")?;
        if line.trim().is_empty() {
            continue;
        }
        writeln!(stdout, "{}", simulator.answer_line(&line))?;
    }
    Ok(())
}

fn counters(pin_dir: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let endpoints =
        datapath::read_endpoints(pin_dir).context("reading endpoints (is an agent running?)")?;
    let counters = datapath::read_counters(pin_dir).context("reading counters")?;
    let mut stdout = std::io::stdout().lock();
    for (key, value) in counters {
        let ifindex = endpoints
            .iter()
            .find(|(_, e)| e.id == key.endpoint)
            .map(|(i, _)| *i);
        let verdict = match Verdict::from_u8(key.verdict) {
            Some(Verdict::Allow) => "allow",
            Some(Verdict::Deny) => "deny",
            Some(Verdict::AuditDeny) => "audit_deny",
            None => "unknown",
        };
        let reason = Reason::from_u8(key.reason).map_or("unknown", Reason::name);
        match output {
            Output::Json => writeln!(
                stdout,
                "{}",
                serde_json::json!({
                    "endpoint": key.endpoint,
                    "ifindex": ifindex,
                    "verdict": verdict,
                    "reason": reason,
                    "packets": value.packets,
                    "bytes": value.bytes,
                })
            )?,
            Output::Text => writeln!(
                stdout,
                "endpoint {:>5} ifindex {:>6} {:<10} {:<16} packets {:>10} bytes {:>12}",
                key.endpoint,
                ifindex.map_or_else(|| "-".to_owned(), |i| i.to_string()),
                verdict,
                reason,
                value.packets,
                value.bytes
            )?,
        }
    }
    Ok(())
}
