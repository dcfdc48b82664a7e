//! Shared pieces of the privileged integration tests: pods with predictable addresses,
//! manifests for them, and the agent binary under test.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod apiserver;
pub mod site;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use egret_testbed::{Pod, Topology, agent::AgentProcess};

pub const AGENT: &str = env!("CARGO_BIN_EXE_egret");
/// Long enough for a connect on a busy 2-core machine; denied probes take this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// A pod at `10.77.0.n` and `fd00:e6e7::n`.
pub fn add_pod(topology: &Topology, name: &str, n: u8) -> Pod {
    topology
        .add_pod(
            name,
            Ipv4Addr::new(10, 77, 0, n),
            Ipv6Addr::new(0xfd00, 0xe6e7, 0, 0, 0, 0, 0, u16::from(n)),
        )
        .expect("pod")
}

pub fn start_agent(topology: &Topology, manifests: &Path, args: &[&str]) -> AgentProcess {
    start_agent_at(topology, manifests, &AgentProcess::unique_pin_dir(), args)
}

pub fn start_agent_at(
    topology: &Topology,
    manifests: &Path,
    pin_dir: &Path,
    args: &[&str],
) -> AgentProcess {
    AgentProcess::start(topology, Path::new(AGENT), manifests, pin_dir, args).expect("agent starts")
}

/// Packets the kernel counted for the endpoint on `ifindex` with `verdict`
/// (`allow`, `deny`, `audit_deny`), from `egret counters`.
pub fn counted(agent: &AgentProcess, topology: &Topology, ifindex: u32, verdict: &str) -> u64 {
    counter_rows(agent, topology)
        .iter()
        .filter(|row| row["ifindex"] == ifindex && row["verdict"] == verdict)
        .map(|row| row["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// Like [`counted`], for one `reason` (a `Reason::name()`, such as `vlan`) only.
pub fn counted_with_reason(
    agent: &AgentProcess,
    topology: &Topology,
    ifindex: u32,
    verdict: &str,
    reason: &str,
) -> u64 {
    counter_rows(agent, topology)
        .iter()
        .filter(|row| {
            row["ifindex"] == ifindex && row["verdict"] == verdict && row["reason"] == reason
        })
        .map(|row| row["packets"].as_u64().unwrap_or(0))
        .sum()
}

/// Every row of `egret counters --output json`.
fn counter_rows(agent: &AgentProcess, topology: &Topology) -> Vec<serde_json::Value> {
    let pin_dir = agent.pin_dir().to_str().unwrap().to_owned();
    let output = agent
        .command(
            topology,
            &["counters", "--bpffs", &pin_dir, "--output", "json"],
        )
        .output()
        .expect("egret counters runs");
    assert!(
        output.status.success(),
        "egret counters: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("counters print JSON lines")
        })
        .collect()
}

/// The agent's /metrics page (default address, inside the node namespace), or `None` while
/// it does not answer.
pub fn scrape_metrics(topology: &Topology) -> Option<String> {
    use std::io::{Read as _, Write as _};
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], 9090));
        let mut stream =
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    })
}

/// The last `bytes` of the agent's log (its debug log grows long under load).
pub fn log_tail(agent: &AgentProcess, bytes: usize) -> String {
    let log = agent.log();
    let mut start = log.len().saturating_sub(bytes);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_owned()
}

/// A policy selecting `app: <app>` in namespace `shop` for egress, with `egress` rules
/// given as YAML flow sequences, and optional annotations.
pub fn egress_policy(name: &str, app: &str, egress: &str, annotations: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations: {{{annotations}}}\nspec:\n  podSelector:\n    matchLabels: {{app: {app}}}\n  policyTypes: [Egress]\n  egress: {egress}\n"
    )
}

/// Runs `egret simulate` on `manifests` with `queries` (JSON lines) on stdin; returns
/// the answers and what it logged.
pub fn simulate(manifests: &Path, queries: &str) -> (Vec<serde_json::Value>, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(AGENT)
        .args(["simulate", "--manifests"])
        .arg(manifests)
        .args(["--queries", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("egret simulate starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(queries.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "simulate failed: {log}");
    let answers = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("simulate prints JSON lines"))
        .collect();
    (answers, log)
}

/// Asserts that the text table starting at the line that begins with `header` (and
/// running to the next blank line) lines up: each cell of a column starts where its
/// header does, or, for the `right`-aligned columns, ends where its header ends.
/// Columns are separated by two or more spaces.
pub fn assert_table_aligned(text: &str, header: &str, right: &[&str]) {
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with(header))
        .take_while(|line| !line.trim().is_empty())
        .collect();
    assert!(lines.len() > 1, "a {header:?} table with rows in:\n{text}");
    let columns = table_columns(lines[0]);
    for line in &lines[1..] {
        let chars: Vec<char> = line.chars().collect();
        let at = |i: usize| chars.get(i).copied().unwrap_or(' ');
        for (i, (name, start, end)) in columns.iter().enumerate() {
            let edge = if right.contains(&name.as_str()) {
                at(end - 1) != ' ' && at(*end) == ' '
            } else {
                at(*start) != ' ' && (*start == 0 || at(start - 1) == ' ')
            };
            // The last column may be empty (its cell is trimmed away).
            let empty_last = i == columns.len() - 1 && chars.len() <= *start;
            assert!(
                edge || empty_last,
                "column {name} is not aligned in {header:?} table:\n{}",
                lines.join("\n")
            );
        }
    }
}

/// Each column of a table header: its name, first and one-past-last character.
fn table_columns(header: &str) -> Vec<(String, usize, usize)> {
    let chars: Vec<char> = header.chars().collect();
    let mut columns = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        // A name ends at two spaces or the end of the line.
        while i < chars.len() && !(chars[i] == ' ' && chars.get(i + 1).is_none_or(|c| *c == ' ')) {
            i += 1;
        }
        columns.push((chars[start..i].iter().collect(), start, i));
        while i < chars.len() && chars[i] == ' ' {
            i += 1;
        }
    }
    columns
}
