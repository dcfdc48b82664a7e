//! `egret flows` like `hubble observe`: the agent keeps its last flow records, and
//! `egret flows` prints them after the fact (`--last`, `--since`, the filters), or
//! follows new ones (`--follow`).

mod common;

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime},
};

use common::{
    assert_table_aligned, egress_policy,
    site::{PodSpec, Site},
};
use egret::observe::flows::{FlowRecord, Timestamp};
use egret_testbed::{Pod, agent::AgentProcess};

const FAST: Duration = Duration::from_millis(200);

struct Cluster {
    site: Site,
    agent: AgentProcess,
    client: Pod,
    scanner: Pod,
    server: Pod,
}

impl Cluster {
    /// `shop/client` may only send DNS, `tools/scanner` nothing; both send to `shop/server`.
    /// The agent keeps 100 flow records.
    fn new(args: &[&str]) -> Self {
        let policies = [
            egress_policy("client-dns-only", "client", "[{ports: [{port: 53}]}]", ""),
            egress_policy("scanner-nothing", "scanner", "[]", "").replace("shop", "tools"),
        ]
        .join("---\n");
        let pod = |name, namespace| PodSpec {
            name,
            namespace,
            app: name,
        };
        let site = Site::new(
            &[
                pod("client", "shop"),
                pod("scanner", "tools"),
                pod("server", "shop"),
            ],
            &policies,
        );
        let mut all = vec!["--flow-history", "100"];
        all.extend(args);
        let agent = site.start(&all);
        let [client, scanner, server] = [0, 1, 2].map(|i| site.pods[i].clone());
        Self {
            site,
            agent,
            client,
            scanner,
            server,
        }
    }

    /// `egret flows ARGS --output json`, read as the agent's own record type.
    fn flows(&self, args: &[&str]) -> Vec<FlowRecord> {
        let mut all = vec!["flows"];
        all.extend(args);
        all.extend(["--output", "json"]);
        let output = self
            .agent
            .command(&self.site.topology, &all)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "egret flows {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("egret flows prints flow records: {e}: {line}"))
            })
            .collect()
    }

    /// Denied probes from `pod` to the server's `port`; returns once the agent holds
    /// the flow's record.
    fn denied(&self, pod: &Pod, port: u16) {
        assert!(
            pod.tcp_connect(self.server.addr_v4(port), FAST)
                .is_timed_out(),
            "{} -> :{port} is denied",
            pod.name()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.flows(&["--last", "100"]).iter().any(|f| {
            f.source.pod.as_deref() == Some(pod.name()) && f.destination.port == Some(port)
        }) {
            assert!(Instant::now() < deadline, "no record of {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `egret flows --follow ARGS --output json`, running.
    fn follow(&self, args: &[&str]) -> Child {
        let mut all = vec!["flows", "--follow", "--output", "json"];
        all.extend(args);
        let child = self
            .agent
            .command(&self.site.topology, &all)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Connected before what it must see happens.
        std::thread::sleep(Duration::from_millis(500));
        child
    }
}

fn ports(records: &[FlowRecord]) -> Vec<(String, u16)> {
    records
        .iter()
        .map(|r| {
            (
                r.source.pod.clone().unwrap_or_default(),
                r.destination.port.unwrap_or(0),
            )
        })
        .collect()
}

fn followed(child: Child) -> Vec<FlowRecord> {
    let output = child.wait_with_output().unwrap();
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn recent_flows_are_listed_after_the_fact_and_followed() {
    if !egret_testbed::require_root("recent_flows_are_listed_after_the_fact_and_followed") {
        return;
    }
    let cluster = Cluster::new(&[]);
    let (client, scanner) = (&cluster.client, &cluster.scanner);
    assert!(cluster.flows(&[]).is_empty(), "nothing denied yet");

    cluster.denied(client, 8080);
    // Windows of their own, so that `--since` can tell them apart.
    std::thread::sleep(Duration::from_millis(1100));
    let between = Timestamp(SystemTime::now()).to_string();
    cluster.denied(scanner, 8081);
    cluster.denied(client, 8082);

    // After the fact, oldest first: the last 20 by default.
    let all = cluster.flows(&[]);
    let expected = [
        ("client".to_owned(), 8080),
        ("scanner".to_owned(), 8081),
        ("client".to_owned(), 8082),
    ];
    assert_eq!(ports(&all), expected);
    let first = &all[0];
    assert_eq!(
        (
            first.verdict.as_str(),
            first.reason.as_str(),
            first.source.namespace.as_deref()
        ),
        ("deny", "no_rule_allows", Some("shop"))
    );
    assert_eq!(first.destination.pod.as_deref(), Some("server"));
    assert_eq!(first.policies, ["shop/client-dns-only"]);

    assert_eq!(ports(&cluster.flows(&["--last", "1"])), expected[2..]);
    assert_eq!(ports(&cluster.flows(&["--last", "2"])), expected[1..]);
    assert_eq!(ports(&cluster.flows(&["--since", &between])), expected[1..]);
    assert_eq!(
        ports(&cluster.flows(&["--since", "10m"])),
        expected,
        "a duration back from now"
    );
    assert_eq!(
        ports(&cluster.flows(&["--since", &between, "--last", "1"])),
        expected[2..]
    );

    // The filters, on the recent flows.
    assert_eq!(
        ports(&cluster.flows(&["--pod", "client"])),
        [expected[0].clone(), expected[2].clone()]
    );
    assert_eq!(
        ports(&cluster.flows(&["--namespace", "tools"])),
        expected[1..2]
    );
    assert_eq!(
        ports(&cluster.flows(&["--pod", "client", "--last", "1"])),
        expected[2..],
        "the last N of those that match"
    );
    assert!(cluster.flows(&["--verdict", "allow"]).is_empty());
    assert_eq!(cluster.flows(&["--verdict", "deny"]).len(), 3);

    // Text: a table whose columns line up.
    let output = cluster
        .agent
        .command(&cluster.site.topology, &["flows"])
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(text.lines().count(), 4, "a header and three flows:\n{text}");
    assert_table_aligned(&text, "TIME", &["COUNT"]);
    assert!(
        text.contains("shop/client (10.77.0.1)")
            && text.contains("shop/server (10.77.0.3:8080)")
            && text.contains("shop/client-dns-only"),
        "{text}"
    );

    // Following: only new flows, filtered...
    let new_only = cluster.follow(&["--pod", "client", "--limit", "1"]);
    // ...or the last recent ones first.
    let with_history = cluster.follow(&["--namespace", "shop", "--last", "1", "--limit", "2"]);
    cluster.denied(scanner, 8083);
    cluster.denied(client, 8084);
    assert_eq!(
        ports(&followed(new_only)),
        [("client".to_owned(), 8084)],
        "--follow alone prints new flows of its pod only"
    );
    assert_eq!(
        ports(&followed(with_history)),
        [("client".to_owned(), 8082), ("client".to_owned(), 8084)]
    );
}

/// The ring is bounded: past `--flow-history`, the oldest records go.
#[test]
fn the_agent_keeps_only_the_last_flow_history_records() {
    if !egret_testbed::require_root("the_agent_keeps_only_the_last_flow_history_records") {
        return;
    }
    // No event of the burst may be lost to the rate limit.
    let cluster = Cluster::new(&["--events-per-second", "10000"]);
    // Distinct destination ports make distinct records, in one window or several.
    for port in 9000..9105 {
        assert!(
            cluster
                .client
                .tcp_connect(cluster.server.addr_v4(port), Duration::from_millis(20))
                .is_timed_out()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let kept = loop {
        let kept = cluster.flows(&["--last", "1000"]);
        if kept.last().and_then(|f| f.destination.port) == Some(9104) {
            break kept;
        }
        assert!(Instant::now() < deadline, "the last probe's record");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(kept.len(), 100, "--flow-history 100");
    let kept_ports: Vec<u16> = kept.iter().filter_map(|f| f.destination.port).collect();
    let mut sorted = kept_ports.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (9005..9105).collect::<Vec<_>>(), "the last 100");
}
