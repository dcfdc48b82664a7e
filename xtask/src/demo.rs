//! `cargo xtask demo`: a small cluster in network namespaces, the agent enforcing example
//! policies on it, a table of what each probed flow was expected to do and did, then
//! what the agent shows of it: `egret status`, metrics and the flow log.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context as _;
use egret_testbed::{
    Pod, ProbeResult, Topology,
    agent::AgentProcess,
    manifests::{PodManifest, cluster_yaml, write_file},
};

const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Flow-log records the demo shows after the metrics.
const FLOW_LOG_LINES: usize = 6;

const POLICIES: &str = r"# The API may only talk to the database, on its named port.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: api-to-db
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: api}
  policyTypes: [Egress]
  egress:
    - to:
        - podSelector:
            matchLabels: {app: db}
      ports:
        - port: postgres
---
# The frontend may reach the shop's subnet on 8080, except the database.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: frontend-egress
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: frontend}
  policyTypes: [Egress]
  egress:
    - to:
        - ipBlock:
            cidr: 10.88.0.0/24
            except: [10.88.0.3/32]
        - ipBlock:
            cidr: fd00:88::/64
            except: [fd00:88::3/128]
      ports:
        - protocol: TCP
          port: 8080
";

enum Probe {
    Tcp(SocketAddr),
    Ping(std::net::IpAddr),
}

struct Flow<'a> {
    from: &'a Pod,
    to: &'a Pod,
    probe: Probe,
    expect_allowed: bool,
    why: &'static str,
}

pub fn run(agent: &Path) -> anyhow::Result<()> {
    let topology = Topology::new().context("building the node namespace")?;
    let frontend = add_pod(&topology, "frontend", 1)?;
    let api = add_pod(&topology, "api", 2)?;
    let db = add_pod(&topology, "db", 3)?;
    let scanner = add_pod(&topology, "scanner", 4)?;
    let _listeners = [
        api.serve_tcp(8080)?,
        api.serve_tcp(9090)?,
        db.serve_tcp(5432)?,
        frontend.serve_tcp(8080)?,
    ];

    let manifests = tempdir()?;
    let pods = [
        PodManifest {
            pod: &frontend,
            namespace: "shop",
            labels: &[("app", "frontend")],
            ports: &[],
        },
        PodManifest {
            pod: &api,
            namespace: "shop",
            labels: &[("app", "api")],
            ports: &[("http", "TCP", 8080)],
        },
        PodManifest {
            pod: &db,
            namespace: "shop",
            labels: &[("app", "db")],
            ports: &[("postgres", "TCP", 5432)],
        },
        PodManifest {
            pod: &scanner,
            namespace: "tools",
            labels: &[("app", "scanner")],
            ports: &[],
        },
    ];
    write_file(&manifests, "cluster.yaml", &cluster_yaml(&pods))?;
    write_file(&manifests, "policies.yaml", POLICIES)?;
    println!("Manifests in {}:\n\n{POLICIES}", manifests.display());

    let pin_dir = AgentProcess::unique_pin_dir();
    let mut egret = AgentProcess::start(&topology, agent, &manifests, &pin_dir, &[])?;
    let ifindexes: Vec<u32> = [&frontend, &api, &db, &scanner]
        .iter()
        .map(|p| p.host_ifindex())
        .collect();
    egret.wait_attached(&ifindexes, Duration::from_secs(30))?;

    let flows = flows(&frontend, &api, &db, &scanner);
    let wrong = print_table(&flows);

    // Let the flow log's one-second window close so denied flows are counted.
    std::thread::sleep(Duration::from_millis(1200));
    println!("\negret status:");
    let status = egret.command(&topology, &["status"]).output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    println!("\nMetrics excerpt (GET /metrics on the node):");
    for line in metrics(&topology)?.lines().filter(|l| is_excerpt(l)) {
        println!("  {line}");
    }
    // The other half of the story: which flows were denied, to where, and by what.
    println!("\nFlow log, the last {FLOW_LOG_LINES} flows (egret flows --last {FLOW_LOG_LINES}):");
    let last = FLOW_LOG_LINES.to_string();
    let flow_log = egret
        .command(&topology, &["flows", "--last", &last])
        .output()?;
    let shown = if flow_log.status.success() {
        &flow_log.stdout
    } else {
        &flow_log.stderr
    };
    for line in String::from_utf8_lossy(shown).lines() {
        println!("  {line}");
    }
    drop(egret);
    std::fs::remove_dir_all(&manifests).ok();
    anyhow::ensure!(wrong == 0, "{wrong} flows did not behave as expected");
    println!(
        "\nAll {} flows behaved as expected; the topology is torn down.",
        flows.len()
    );
    Ok(())
}

fn flows<'a>(frontend: &'a Pod, api: &'a Pod, db: &'a Pod, scanner: &'a Pod) -> Vec<Flow<'a>> {
    vec![
        Flow {
            from: frontend,
            to: api,
            probe: Probe::Tcp(api.addr_v4(8080)),
            expect_allowed: true,
            why: "ipBlock, port 8080",
        },
        Flow {
            from: frontend,
            to: api,
            probe: Probe::Tcp(api.addr_v6(8080)),
            expect_allowed: true,
            why: "IPv6 ipBlock, port 8080",
        },
        Flow {
            from: frontend,
            to: api,
            probe: Probe::Tcp(api.addr_v4(9090)),
            expect_allowed: false,
            why: "port 9090 not listed",
        },
        Flow {
            from: frontend,
            to: db,
            probe: Probe::Tcp(db.addr_v4(5432)),
            expect_allowed: false,
            why: "db is in the except",
        },
        Flow {
            from: frontend,
            to: api,
            probe: Probe::Ping(api.ipv4().into()),
            expect_allowed: false,
            why: "rule has ports: no ICMP",
        },
        Flow {
            from: api,
            to: db,
            probe: Probe::Tcp(db.addr_v4(5432)),
            expect_allowed: true,
            why: "podSelector, named port",
        },
        Flow {
            from: api,
            to: db,
            probe: Probe::Tcp(db.addr_v6(5432)),
            expect_allowed: true,
            why: "same, over IPv6",
        },
        Flow {
            from: api,
            to: frontend,
            probe: Probe::Tcp(frontend.addr_v4(8080)),
            expect_allowed: false,
            why: "not the db",
        },
        Flow {
            from: scanner,
            to: db,
            probe: Probe::Tcp(db.addr_v4(5432)),
            expect_allowed: true,
            why: "scanner not isolated",
        },
        Flow {
            from: scanner,
            to: api,
            probe: Probe::Tcp(api.addr_v4(8080)),
            expect_allowed: true,
            why: "api's replies pass",
        },
        Flow {
            from: scanner,
            to: api,
            probe: Probe::Ping(api.ipv4().into()),
            expect_allowed: true,
            why: "echo reply passes",
        },
    ]
}

/// Probes each flow, prints a row for it, and returns how many behaved unexpectedly.
fn print_table(flows: &[Flow<'_>]) -> usize {
    println!(
        "{:<24} {:<22} {:<9} {:<10} why",
        "flow", "to", "expected", "observed"
    );
    let mut wrong = 0;
    for flow in flows {
        let (target, result) = match flow.probe {
            Probe::Tcp(addr) => (
                format!("{addr} tcp"),
                flow.from.tcp_connect(addr, PROBE_TIMEOUT),
            ),
            Probe::Ping(ip) => (format!("{ip} icmp"), flow.from.ping(ip, PROBE_TIMEOUT)),
        };
        let observed = observed(&result);
        let expected = if flow.expect_allowed { "allow" } else { "drop" };
        let ok = expected == observed;
        wrong += usize::from(!ok);
        println!(
            "{:<24} {:<22} {:<9} {:<10} {}{}",
            format!("{} -> {}", flow.from.name(), flow.to.name()),
            target,
            expected,
            observed,
            flow.why,
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }

    wrong
}

/// The node's `/metrics`, fetched from inside the node namespace.
fn metrics(topology: &Topology) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", 9090))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
}

/// Series worth showing: per-pod denials and the control plane's vital signs.
fn is_excerpt(line: &str) -> bool {
    (line.starts_with("egret_egress_packets_total") && line.contains("verdict=\"deny\""))
        || line.starts_with("egret_denied_flows_total")
        || line.starts_with("egret_endpoints{")
        || line.starts_with("egret_policies_loaded")
        || line.starts_with("egret_map_entries{")
        || line.starts_with("egret_programming_latency_seconds_count")
}

fn observed(result: &ProbeResult) -> &'static str {
    if result.is_allowed() {
        "allow"
    } else if result.is_blocked() {
        "drop"
    } else {
        "error"
    }
}

fn add_pod(topology: &Topology, name: &str, n: u16) -> anyhow::Result<Pod> {
    let last = u8::try_from(n)?;
    topology.add_pod(
        name,
        std::net::Ipv4Addr::new(10, 88, 0, last),
        std::net::Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, n),
    )
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("egret-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
