//! The `egret` binary: the only place errors meet the user.

mod table;

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use egret::{
    admin_client,
    agent::{self, AttachMode, Established, GlobalMode, UnknownPod},
    datapath::{self, Capacities, DEFAULT_PIN_DIR},
    observe::{
        dns::{DomainNote, DomainState, LearntName},
        flows::{DEFAULT_FLOW_HISTORY, FlowQuery, FlowRecord, Sink, Timestamp},
    },
    simulate::Simulator,
    source::manifest,
};
use egret_common::{Verdict, dns::DnsSettings, maps::Timeouts};
use table::{Align, Table};

#[derive(Parser)]
#[command(
    name = "egret",
    version,
    about = "eBPF egress firewall for Kubernetes NetworkPolicies"
)]
struct Cli {
    /// Log format (logs go to stderr; text is coloured only on a terminal).
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
        /// "port": 80, "protocol": "TCP"|"UDP"|"SCTP"|"ICMP"}, and optionally
        /// "resolved": "api.example.com", the name the pod resolved to that IP (for
        /// domainNames rules). `-` reads stdin.
        #[arg(long)]
        queries: PathBuf,
    },
    /// Show what the running agent enforces: endpoints, policies, map fill, readiness.
    Status {
        #[command(flatten)]
        agent: AgentAddr,
        /// Text (a table) or JSON.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Explain whether a flow would be allowed by the running agent's tables, and why.
    Explain {
        /// Source pod, namespace/name (a pod on this node).
        #[arg(long)]
        from: String,
        /// Destination address.
        #[arg(long)]
        to: std::net::IpAddr,
        /// Destination port (not for ICMP).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// TCP, UDP, SCTP or ICMP.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[command(flatten)]
        agent: AgentAddr,
        /// Text or JSON.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the running agent's recent flows (the last 20 by default), or follow new ones.
    Flows {
        /// Only flows from this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only flows from this pod.
        #[arg(long)]
        pod: Option<String>,
        /// Only this verdict: `allow`, `deny` or `audit_deny`.
        #[arg(long)]
        verdict: Option<String>,
        /// Only flows since this long ago (`90s`, `5m`, `1h`) or this RFC 3339 time.
        #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
        since: Option<Timestamp>,
        /// Only the last N of the recent flows that match.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// Keep printing new flows as they come (after the recent ones --since or --last
        /// asks for).
        #[arg(long, short)]
        follow: bool,
        /// Stop after printing this many flows.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[command(flatten)]
        agent: AgentAddr,
        /// Text (a table) or JSON lines, as in the flow log.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the kernel's per-endpoint packet counters from the pinned maps.
    Counters {
        /// Pin directory of the running agent.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
        /// Text (a table) or JSON lines.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove everything Egret attached and pinned (enforcement stops).
    Cleanup {
        /// Pin directory of the agent.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct AgentAddr {
    /// The running agent's admin address (its --admin-addr).
    #[arg(long = "agent", default_value = DEFAULT_ADMIN_ADDR)]
    addr: std::net::SocketAddr,
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
    /// Address of the admin API that `egret status`, `explain` and `flows` use; keep it
    /// local (it tells who may talk to whom); `off` disables it.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR, value_parser = parse_metrics_addr)]
    admin_addr: MetricsAddr,
    /// Where the flow log goes: `-` for stdout, or a file (rotated past 10 MiB, 3 kept).
    #[arg(long, default_value = "-")]
    flow_log: PathBuf,
    /// Log new allowed flows too, not only denials.
    #[arg(long)]
    flow_log_allowed: bool,
    /// Flow records kept in memory for `egret flows` to show after the fact (under 1 KiB
    /// each); 0 keeps none.
    #[arg(long, default_value_t = DEFAULT_FLOW_HISTORY)]
    flow_history: usize,
    /// This node's name: pods with this spec.nodeName are enforced here.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// Where to attach: tc (each pod's host-side interface) or cgroup (each pod's
    /// cgroup v2, found from the pod's UID).
    #[arg(long, value_enum, default_value_t = AttachMode::Tc)]
    attach: AttachMode,
    /// The cgroup v2 tree searched for pod cgroups (with --attach cgroup); default:
    /// the cgroup2 mount.
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
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
    /// Endpoint rows of the packet counters; pods numbered beyond share one overflow row.
    #[arg(long, default_value_t = Capacities::default().counter_endpoints)]
    max_counted_endpoints: u32,
    /// Capacity of the established-flow table (TCP after its handshake, other flows
    /// answered and used again). Unassured flows can never evict these.
    #[arg(long, default_value_t = Capacities::default().ct_established)]
    conntrack_established: u32,
    /// Capacity of the unassured-flow table (handshakes, unanswered datagrams, closing
    /// connections); an LRU, so a flood only evicts its own kind.
    #[arg(long, default_value_t = Capacities::default().ct_unassured)]
    conntrack_unassured: u32,
    /// Seconds an unassured flow (a handshake, an unanswered datagram) is kept idle.
    #[arg(long, default_value_t = Timeouts::DEFAULT.unassured)]
    conntrack_timeout_unassured: u32,
    /// Seconds an established TCP connection is kept idle.
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_established)]
    conntrack_timeout_tcp_established: u32,
    /// Seconds an established non-TCP flow (UDP, SCTP, ICMP echo) is kept idle.
    #[arg(long, default_value_t = Timeouts::DEFAULT.other_established)]
    conntrack_timeout_other_established: u32,
    /// Seconds a TCP connection that saw a FIN is kept idle before it is forgotten.
    #[arg(long, default_value_t = Timeouts::DEFAULT.closing)]
    conntrack_timeout_closing: u32,
    /// domainNames rules: an address a DNS answer gave a pod admits new connections for
    /// at least this many seconds, even when the answer's TTL is shorter.
    #[arg(long, value_name = "SECONDS", default_value_t = DnsSettings::DEFAULT.min_ttl_s)]
    dns_min_ttl: u32,
    /// domainNames rules: seconds a learnt address still admits new connections after
    /// its TTL (open connections continue regardless).
    #[arg(long, value_name = "SECONDS", default_value_t = DnsSettings::DEFAULT.grace_s)]
    dns_grace: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => run(args),
        Command::Simulate { manifests, queries } => simulate(&manifests, &queries),
        Command::Counters { bpffs, output } => counters(&bpffs, output),
        Command::Status { agent, output } => status(agent.addr, output),
        Command::Explain {
            from,
            to,
            port,
            protocol,
            agent,
            output,
        } => {
            let path = format!(
                "/v1/explain?from={}&to={}&port={port}&protocol={}",
                admin_client::encode(&from),
                admin_client::encode(&to.to_string()),
                admin_client::encode(&protocol)
            );
            let answer = admin_client::get_json(agent.addr, &path)?;
            print_explain(&answer, output)?;
            Ok(())
        }
        Command::Flows {
            namespace,
            pod,
            verdict,
            since,
            last,
            follow,
            limit,
            agent,
            output,
        } => {
            // Like `hubble observe`: the last few flows, unless asked for more or to follow.
            let last = last.or((!follow && since.is_none()).then_some(DEFAULT_LAST_FLOWS));
            let query = FlowQuery {
                namespace,
                pod,
                verdict,
                since,
                last,
                follow,
            };
            flows(agent.addr, &query, limit, output)
        }
        Command::Cleanup { bpffs } => {
            let removed = datapath::cleanup(&bpffs)
                .with_context(|| format!("cleaning up {}", bpffs.display()))?;
            println!("removed {removed} pinned objects under {}", bpffs.display());
            Ok(())
        }
    }
}

const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9091";
/// What `egret flows` prints with neither `--last`, `--since` nor `--follow`.
const DEFAULT_LAST_FLOWS: usize = 20;
const FLOW_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;

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

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(value: &str) -> Result<Timestamp, String> {
    if let Ok(ago) = humantime::parse_duration(value) {
        return SystemTime::now()
            .checked_sub(ago)
            .map(Timestamp)
            .ok_or_else(|| format!("{value:?} reaches before 1970"));
    }
    value.parse().map_err(|_| {
        format!("{value:?} is neither a duration (`90s`, `5m`, `1h`) nor an RFC 3339 time")
    })
}

/// The `tracing` target of the kernel programs' log records.
const KERNEL_LOG_TARGET: &str = "egret::kernel";

fn init_logging(format: LogFormat) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    // The kernel's own diagnostics (aya-log records, target `egret::kernel`) stay off
    // unless RUST_LOG names them: `egret=debug` alone does not turn them on.
    let directives = if directives.contains(KERNEL_LOG_TARGET) {
        directives
    } else {
        format!("{directives},{KERNEL_LOG_TARGET}=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: not in files, pipes, `kubectl logs`.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
        admin_addr: args.admin_addr.0,
        flow_history: args.flow_history,
        flow_log: if args.flow_log.as_os_str() == "-" {
            Sink::Stdout
        } else {
            Sink::File {
                path: args.flow_log,
                max_bytes: FLOW_LOG_MAX_BYTES,
            }
        },
        events_allowed: args.flow_log_allowed,
        pin_dir: args.bpffs,
        attach: args.attach,
        cgroup_root: args.cgroup_root,
        mode: args.mode,
        unknown_pod: args.unknown_pod,
        established: args.established,
        events_per_second: args.events_per_second,
        capacities: Capacities {
            endpoints: args.max_endpoints,
            identities: args.max_identities,
            cidrs: args.max_cidrs,
            policy: args.max_policy_entries,
            counter_endpoints: args.max_counted_endpoints,
            ct_established: args.conntrack_established,
            ct_unassured: args.conntrack_unassured,
        },
        conntrack_timeouts: Timeouts {
            unassured: args.conntrack_timeout_unassured,
            tcp_established: args.conntrack_timeout_tcp_established,
            other_established: args.conntrack_timeout_other_established,
            closing: args.conntrack_timeout_closing,
        },
        dns: DnsSettings {
            min_ttl_s: args.dns_min_ttl,
            grace_s: args.dns_grace,
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
    let loaded = manifest::load_dir(manifests)?;
    for problem in &loaded.problems {
        tracing::warn!("{problem}");
    }
    for unread in &loaded.unread {
        tracing::info!("{unread}");
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
    let mut table = Table::new(&[
        ("ENDPOINT", Align::Right),
        ("IFINDEX", Align::Right),
        ("VERDICT", Align::Left),
        ("REASON", Align::Left),
        ("PACKETS", Align::Right),
        ("BYTES", Align::Right),
    ]);
    for (key, value) in counters {
        let ifindex = endpoints
            .iter()
            .find(|(_, e)| e.id == key.endpoint)
            .map(|(i, _)| *i);
        let verdict = match key.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::AuditDeny => "audit_deny",
        };
        let reason = key.reason.name();
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
            Output::Text => table.row(vec![
                key.endpoint.to_string(),
                ifindex.map_or_else(|| "-".to_owned(), |i| i.to_string()),
                verdict.to_owned(),
                reason.to_owned(),
                value.packets.to_string(),
                value.bytes.to_string(),
            ]),
        }
    }
    if matches!(output, Output::Text) {
        table.print(&mut stdout)?;
    }
    Ok(())
}

fn status(addr: std::net::SocketAddr, output: Output) -> anyhow::Result<()> {
    let status = admin_client::get_json(addr, "/v1/status")?;
    let mut stdout = std::io::stdout().lock();
    if matches!(output, Output::Json) {
        writeln!(stdout, "{status}")?;
        return Ok(());
    }
    let yes = |v: &serde_json::Value| {
        if v.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    writeln!(
        stdout,
        "node {}   ready {}   healthy {}   attach {}   policies {}",
        status["node"].as_str().unwrap_or("?"),
        yes(&status["ready"]),
        yes(&status["healthy"]),
        status["attach_mode"].as_str().unwrap_or("?"),
        status["policies"]
    )?;
    writeln!(
        stdout,
        "last reconcile {} ({:.1} ms)",
        status["last_reconcile"].as_str().unwrap_or("never"),
        status["last_reconcile_ms"].as_f64().unwrap_or(0.0)
    )?;
    let stale: Vec<egret::observe::StaleSource> =
        serde_json::from_value(status["stale_sources"].clone()).unwrap_or_default();
    if stale.is_empty() {
        writeln!(stdout, "sources current")?;
    }
    for source in &stale {
        writeln!(stdout, "STALE {source}")?;
    }
    writeln!(stdout)?;
    let list = joined;
    let mut endpoints = Table::new(&[
        ("ENDPOINT", Align::Left),
        ("STATE", Align::Left),
        ("ATTACHED TO", Align::Left),
        ("IPS", Align::Left),
        ("ISOLATED BY", Align::Left),
    ]);
    for endpoint in status["endpoints"].as_array().into_iter().flatten() {
        endpoints.row(vec![
            format!(
                "{}/{}",
                endpoint["namespace"].as_str().unwrap_or(""),
                endpoint["pod"].as_str().unwrap_or("")
            ),
            endpoint["state"].as_str().unwrap_or("").to_owned(),
            endpoint["attachment"].as_str().unwrap_or("-").to_owned(),
            list(&endpoint["ips"]),
            policies_of(
                &list(&endpoint["isolated_by"]),
                &list(&endpoint["cluster_policies"]),
            ),
        ]);
    }
    endpoints.print(&mut stdout)?;
    writeln!(stdout)?;
    print_learnt(&mut stdout, &status)?;
    let mut maps = Table::new(&[
        ("MAP", Align::Left),
        ("ENTRIES", Align::Right),
        ("CAPACITY", Align::Right),
        ("FILL", Align::Right),
    ]);
    for map in status["maps"].as_array().into_iter().flatten() {
        let (entries, capacity) = (
            map["entries"].as_f64().unwrap_or(0.0),
            map["capacity"].as_f64().unwrap_or(1.0),
        );
        maps.row(vec![
            map["map"].as_str().unwrap_or("").to_owned(),
            map["entries"].to_string(),
            map["capacity"].to_string(),
            format!("{:.1}%", 100.0 * entries / capacity.max(1.0)),
        ]);
    }
    maps.print(&mut stdout)?;
    Ok(())
}

/// The names and addresses each pod learnt from DNS answers (pods with `domainNames`
/// rules), for `status`; nothing when none did.
fn print_learnt(out: &mut impl std::io::Write, status: &serde_json::Value) -> anyhow::Result<()> {
    let mut learnt = Table::new(&[
        ("ENDPOINT", Align::Left),
        ("NAME", Align::Left),
        ("ADDRESS", Align::Left),
        ("TTL", Align::Right),
        ("ADMITS NEW CONNECTIONS", Align::Left),
    ]);
    let mut any = false;
    for endpoint in status["endpoints"].as_array().into_iter().flatten() {
        let names: Vec<LearntName> =
            serde_json::from_value(endpoint["learnt"].clone()).unwrap_or_default();
        for name in names {
            any = true;
            let left = if name.expires_in_s >= 0.0 {
                format!("for {:.0} s", name.expires_in_s.ceil())
            } else {
                format!("no (expired {:.0} s ago)", (-name.expires_in_s).floor())
            };
            learnt.row(vec![
                format!(
                    "{}/{}",
                    endpoint["namespace"].as_str().unwrap_or(""),
                    endpoint["pod"].as_str().unwrap_or("")
                ),
                name.name,
                name.address.to_string(),
                name.ttl.to_string(),
                left,
            ]);
        }
    }
    if any {
        learnt.print(out)?;
        writeln!(out)?;
    }
    Ok(())
}

/// The policies governing a pod, for `status`: the NetworkPolicies isolating it, then
/// the ClusterNetworkPolicies whose subject it is.
fn policies_of(isolated_by: &str, cluster_policies: &str) -> String {
    match (isolated_by.is_empty(), cluster_policies.is_empty()) {
        (true, true) => "(not isolated)".to_owned(),
        (false, true) => isolated_by.to_owned(),
        (true, false) => format!("cluster: {cluster_policies}"),
        (false, false) => format!("{isolated_by}; cluster: {cluster_policies}"),
    }
}

/// The strings of a JSON array, comma-separated (empty for anything else).
fn joined(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_explain(answer: &serde_json::Value, output: Output) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if matches!(output, Output::Json) {
        return writeln!(stdout, "{answer}");
    }
    let list = joined;
    let owner = &answer["to_owner"];
    let owner = if owner.is_null() {
        String::new()
    } else {
        format!(
            " ({} {}/{})",
            owner["kind"].as_str().unwrap_or(""),
            owner["namespace"].as_str().unwrap_or(""),
            owner["name"].as_str().unwrap_or("")
        )
    };
    writeln!(
        stdout,
        "{} {} -> {}{} {}/{}: {}",
        answer["verdict"].as_str().unwrap_or("?").to_uppercase(),
        answer["from"].as_str().unwrap_or(""),
        answer["to"].as_str().unwrap_or(""),
        owner,
        answer["protocol"].as_str().unwrap_or(""),
        answer["port"],
        answer["reason"].as_str().unwrap_or("")
    )?;
    let mut details = Vec::new();
    if let Ok(note) = serde_json::from_value::<DomainNote>(answer["domain"].clone()) {
        details.push((
            "domain",
            domain_detail(&note, &answer["domain_expires_in_s"]),
        ));
    }
    let passed_over = list(&answer["passed_over_rules"]);
    if !passed_over.is_empty() {
        details.push(("passed over", passed_over));
    }
    if let Some(rule) = answer["decided_by_rule"].as_str() {
        details.push(("decided by", rule.to_owned()));
    } else {
        match answer["verdict"].as_str() {
            Some("allow") if !list(&answer["allowed_by"]).is_empty() => {
                details.push(("allowed by", list(&answer["allowed_by_rules"])));
            }
            Some("allow") => details.push(("allowed by", "no policy isolates the pod".to_owned())),
            _ => details.push((
                "isolated by",
                format!(
                    "{} (no rule of theirs allows it)",
                    list(&answer["isolated_by"])
                ),
            )),
        }
    }
    table::print_details(&mut stdout, &details)
}

/// What `explain` says of the DNS answers behind an address.
fn domain_detail(note: &DomainNote, expires_in_s: &serde_json::Value) -> String {
    let name = note.name.as_deref().unwrap_or("?");
    match note.state {
        DomainState::Learnt => format!(
            "{name} answered this address (admits new connections for {:.0} s)",
            expires_in_s.as_f64().unwrap_or(0.0).ceil()
        ),
        DomainState::Expired => format!(
            "{name} answered this address, but its TTL and grace have passed: new \
             connections are judged without it until it is resolved again (open ones continue)"
        ),
        DomainState::NotResolved => {
            "no DNS answer for the pod's domainNames gave it this address".to_owned()
        }
    }
}

/// `egret flows`: the agent answers with the flows `query` asks for, one JSON line each.
fn flows(
    addr: std::net::SocketAddr,
    query: &FlowQuery,
    limit: Option<usize>,
    output: Output,
) -> anyhow::Result<()> {
    const COLUMNS: [(&str, Align); 8] = [
        ("TIME", Align::Left),
        ("VERDICT", Align::Left),
        ("SOURCE", Align::Left),
        ("DESTINATION", Align::Left),
        ("PROTO", Align::Left),
        ("COUNT", Align::Right),
        ("REASON", Align::Left),
        ("DECIDED BY", Align::Left),
    ];
    /// Room for typical cells, so a followed stream stays aligned from its first rows.
    const MINIMUM_WIDTHS: [usize; 8] = [24, 10, 28, 34, 5, 5, 14, 0];
    let mut stdout = std::io::stdout().lock();
    let mut table = Table::new(&COLUMNS);
    let mut streaming = None;
    if query.follow && matches!(output, Output::Text) {
        streaming = Some(Table::streaming(&COLUMNS, &MINIMUM_WIDTHS, &mut stdout)?);
        stdout.flush()?;
    }
    let (mut shown, mut failure) = (0, None);
    admin_client::follow(addr, &query.path(), |line| {
        let printed = match output {
            Output::Json => writeln!(stdout, "{line}").and_then(|()| stdout.flush()),
            Output::Text => serde_json::from_value::<FlowRecord>(line)
                .map_err(|error| {
                    std::io::Error::other(format!(
                        "the agent sent a flow record this egret cannot read \
                         (are they different versions?): {error}"
                    ))
                })
                .and_then(|record| {
                    let row = flow_row(&record);
                    if let Some(streaming) = &mut streaming {
                        streaming
                            .row(&mut stdout, &row)
                            .and_then(|()| stdout.flush())
                    } else {
                        table.row(row);
                        Ok(())
                    }
                }),
        };
        if let Err(error) = printed {
            failure = Some(error);
            return false;
        }
        shown += 1;
        limit.is_none_or(|limit| shown < limit)
    })?;
    if let Some(error) = failure {
        return Err(error.into());
    }
    if streaming.is_none() && matches!(output, Output::Text) {
        table.print(&mut stdout)?;
    }
    Ok(())
}

/// A flow's cells under `egret flows`' columns.
fn flow_row(flow: &FlowRecord) -> Vec<String> {
    let name =
        |end: &egret::observe::flows::Endpoint| match (&end.namespace, &end.pod, &end.service) {
            (Some(ns), Some(pod), _) => Some(format!("{ns}/{pod}")),
            (Some(ns), None, Some(service)) => Some(format!("svc {ns}/{service}")),
            _ => None,
        };
    let at = |end: &egret::observe::flows::Endpoint, address: String| {
        name(end).map_or_else(|| address.clone(), |name| format!("{name} ({address})"))
    };
    let destination = flow.destination.port.map_or_else(
        || flow.destination.ip.to_string(),
        |port| std::net::SocketAddr::new(flow.destination.ip, port).to_string(),
    );
    let mut decided_by = match (&flow.rule, flow.policies.is_empty()) {
        (Some(rule), _) => rule.clone(),
        (None, false) => flow.policies.join(","),
        (None, true) => "-".to_owned(),
    };
    if let Some(domain) = &flow.domain {
        let note = match (&domain.name, domain.state) {
            (Some(name), DomainState::Learnt) => format!(" via {name}"),
            (Some(name), state) => format!(" ({name} {})", state.name()),
            (None, state) => format!(" ({})", state.name()),
        };
        decided_by.push_str(&note);
    }
    vec![
        flow.time.to_string(),
        flow.verdict.clone(),
        at(&flow.source, flow.source.ip.to_string()),
        at(&flow.destination, destination),
        flow.protocol.clone(),
        flow.count.to_string(),
        flow.reason.clone(),
        decided_by,
    ]
}
