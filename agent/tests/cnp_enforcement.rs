//! ClusterNetworkPolicy enforcement on real packets in network namespaces: the tier order
//! of issue 13 (Admin, then NetworkPolicy, then Baseline) with TCP and UDP probes, where
//! a denial shows up (flow log, counters, metrics), a priority swap in one reconcile, and
//! the upstream conformance cases of `tests/data/cnp/` over real connections.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use common::{
    PROBE_TIMEOUT, counted_with_reason, egress_policy,
    site::{self, PodSpec, Site},
    start_agent,
};
use egret_testbed::{
    Listener, Pod, ProbeResult, Topology, agent::AgentProcess, manifests::write_file,
};
use serde::Deserialize;
use serde_json::Value;
use serde_yaml_ng::Value as Yaml;

/// A denied probe waits this long; nothing but a drop makes it time out.
const DENIED_PROBE: Duration = Duration::from_millis(400);
/// How long a policy change may take to reach the kernel.
const TAKES_EFFECT: Duration = Duration::from_secs(3);

/// `client`, `server` and `other` (label `app`) in `shop`; `open` (app: open) in `lab`,
/// which no NetworkPolicy isolates. Each serves TCP and UDP echo on 8080.
struct Campus {
    site: Site,
    client: Pod,
    server: Pod,
    other: Pod,
    open: Pod,
}

impl Campus {
    fn new(policies: &str) -> Self {
        let [client, server, other] = site::SHOP;
        let open = PodSpec {
            name: "open",
            namespace: "lab",
            app: "open",
        };
        let site = Site::new(&[client, server, other, open], policies);
        let [client, server, other, open] = [0, 1, 2, 3].map(|i| site.pods[i].clone());
        Self {
            site,
            client,
            server,
            other,
            open,
        }
    }
}

impl std::ops::Deref for Campus {
    type Target = Site;

    fn deref(&self) -> &Site {
        &self.site
    }
}

/// A `ClusterNetworkPolicy` with `subject` and `egress` as YAML flow collections.
fn cluster_policy(name: &str, tier: &str, priority: u32, subject: &str, egress: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {subject}\n  egress: {egress}\n"
    )
}

const EVERY_NAMESPACE: &str = "{namespaces: {}}";
const SHOP: &str = "{namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}";
const TO_SERVER: &str =
    "[{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: server}}}}]";
/// A NetworkPolicy isolating `client`: it may reach `server` only.
const CLIENT_TO_SERVER: &str = "[{to: [{podSelector: {matchLabels: {app: server}}}]}]";

fn documents(policies: &[String]) -> String {
    policies.join("---\n")
}

fn tcp(from: &Pod, to: &Pod) -> ProbeResult {
    from.tcp_connect(to.addr_v4(8080), PROBE_TIMEOUT)
}

fn udp(from: &Pod, to: &Pod) -> ProbeResult {
    from.udp_request(to.addr_v4(8080), PROBE_TIMEOUT)
}

/// Polls `condition` until `within` has passed.
fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_admin_deny_overrides_a_networkpolicy_allow_and_is_named_where_denials_show() {
    if !egret_testbed::require_root(
        "an_admin_deny_overrides_a_networkpolicy_allow_and_is_named_where_denials_show",
    ) {
        return;
    }
    let policies = documents(&[
        egress_policy("client-to-server", "client", CLIENT_TO_SERVER, ""),
        cluster_policy(
            "deny-server-tcp",
            "Admin",
            10,
            SHOP,
            &format!(
                "[{{name: server-tcp, action: Deny, to: {TO_SERVER}, protocols: [{{tcp: {{destinationPort: {{number: 8080}}}}}}]}}]"
            ),
        ),
    ]);
    let campus = Campus::new(&policies);
    let flow_log = campus.manifests.path().join("flows.jsonl");
    let agent = campus.start(&["--flow-log", flow_log.to_str().unwrap()]);

    let denied = campus
        .client
        .tcp_connect(campus.server.addr_v4(8080), DENIED_PROBE);
    assert!(
        denied.is_timed_out(),
        "the Admin Deny drops what the NetworkPolicy allows: {denied}"
    );
    let v6 = campus
        .client
        .tcp_connect(campus.server.addr_v6(8080), DENIED_PROBE);
    assert!(v6.is_timed_out(), "and over IPv6: {v6}");
    let other_protocol = udp(&campus.client, &campus.server);
    assert!(
        other_protocol.is_connected(),
        "the Deny names TCP only; the NetworkPolicy allows UDP: {other_protocol}"
    );

    let client = campus.client.host_ifindex();
    let line = wait_for_flow(&flow_log, |line| {
        line["verdict"] == "deny" && line["source"]["pod"] == "client" && line["protocol"] == "TCP"
    })
    .unwrap_or_else(|| {
        panic!(
            "no deny line for client in the flow log:\n{}",
            std::fs::read_to_string(&flow_log).unwrap_or_default()
        )
    });
    assert_eq!(line["tier"], "admin", "{line}");
    assert_eq!(
        line["rule"], "deny-server-tcp egress[0] (server-tcp)",
        "{line}"
    );
    assert_eq!(line["reason"], "admin_deny", "{line}");
    assert_eq!(line["destination"]["pod"], "server", "{line}");
    assert_eq!(line["destination"]["port"], 8080, "{line}");

    assert!(
        counted_with_reason(&agent, &campus.topology, client, "deny", "admin_deny") >= 1,
        "egret counters: client's drops counted as admin_deny"
    );
    let packets = "egret_egress_packets_total{namespace=\"shop\",pod=\"client\",verdict=\"deny\",reason=\"admin_deny\"}";
    let mut text = String::new();
    let shown = eventually(Duration::from_secs(5), || {
        text = common::scrape_metrics(&campus.topology).unwrap_or_default();
        text.contains(packets) && denied_flows_of(&text, "client", "admin")
    });
    assert!(
        shown,
        "metrics: {packets} and a denied-flow series with tier=\"admin\":\n{text}"
    );
}

/// `egret_denied_flows_total` has a series for `pod` (in shop) with `tier`.
fn denied_flows_of(metrics: &str, pod: &str, tier: &str) -> bool {
    metrics.lines().any(|line| {
        line.starts_with("egret_denied_flows_total{")
            && line.contains("namespace=\"shop\"")
            && line.contains(&format!("pod=\"{pod}\""))
            && line.contains(&format!("tier=\"{tier}\""))
    })
}

/// The first flow log line that `wanted` accepts, waiting up to 5 s for it.
fn wait_for_flow(path: &Path, wanted: impl Fn(&Value) -> bool) -> Option<Value> {
    let mut found = None;
    eventually(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| wanted(line));
        found.is_some()
    });
    found
}

#[test]
fn an_admin_pass_falls_through_to_the_networkpolicy_then_to_a_baseline_deny() {
    if !egret_testbed::require_root(
        "an_admin_pass_falls_through_to_the_networkpolicy_then_to_a_baseline_deny",
    ) {
        return;
    }
    let policies = documents(&[
        egress_policy("client-to-server", "client", CLIENT_TO_SERVER, ""),
        cluster_policy(
            "pass-server",
            "Admin",
            10,
            EVERY_NAMESPACE,
            &format!("[{{name: teams-decide, action: Pass, to: {TO_SERVER}}}]"),
        ),
        // Consulted only if the Pass did not end the Admin tier.
        cluster_policy(
            "deny-server",
            "Admin",
            20,
            EVERY_NAMESPACE,
            &format!("[{{name: server, action: Deny, to: {TO_SERVER}}}]"),
        ),
        cluster_policy(
            "baseline-deny-server",
            "Baseline",
            10,
            EVERY_NAMESPACE,
            &format!("[{{name: server, action: Deny, to: {TO_SERVER}}}]"),
        ),
    ]);
    let campus = Campus::new(&policies);
    let agent = campus.start(&[]);

    for (protocol, probe) in [
        ("TCP", tcp(&campus.client, &campus.server)),
        ("UDP", udp(&campus.client, &campus.server)),
    ] {
        assert!(
            probe.is_connected(),
            "{protocol}: Pass skips the lower Admin Deny, the client's NetworkPolicy allows: {probe}"
        );
    }
    let isolated = campus
        .client
        .tcp_connect(campus.other.addr_v4(8080), DENIED_PROBE);
    assert!(
        isolated.is_timed_out(),
        "the NetworkPolicy still isolates the client: {isolated}"
    );
    let tcp_open = campus
        .open
        .tcp_connect(campus.server.addr_v4(8080), DENIED_PROBE);
    let udp_open = campus
        .open
        .udp_request(campus.server.addr_v4(8080), DENIED_PROBE);
    assert!(
        tcp_open.is_timed_out() && udp_open.is_timed_out(),
        "no NetworkPolicy isolates open: the Pass reaches the Baseline Deny (TCP {tcp_open}, UDP {udp_open})"
    );
    let elsewhere = tcp(&campus.open, &campus.other);
    assert!(
        elsewhere.is_connected(),
        "nothing denies open's other traffic: {elsewhere}"
    );
    let open = campus.open.host_ifindex();
    assert!(counted_with_reason(&agent, &campus.topology, open, "deny", "baseline_deny") >= 2);
    let client = campus.client.host_ifindex();
    assert_eq!(
        counted_with_reason(&agent, &campus.topology, client, "deny", "admin_deny"),
        0,
        "the Admin Deny below the Pass never decided for the client"
    );
}

#[test]
fn an_isolating_networkpolicy_overrules_a_baseline_accept() {
    if !egret_testbed::require_root("an_isolating_networkpolicy_overrules_a_baseline_accept") {
        return;
    }
    let policies = documents(&[
        egress_policy("client-to-server", "client", CLIENT_TO_SERVER, ""),
        cluster_policy(
            "baseline-accept-pods",
            "Baseline",
            10,
            EVERY_NAMESPACE,
            "[{name: every-pod, action: Accept, to: [{namespaces: {}}]}]",
        ),
    ]);
    let campus = Campus::new(&policies);
    let agent = campus.start(&[]);

    let tcp_other = campus
        .client
        .tcp_connect(campus.other.addr_v4(8080), DENIED_PROBE);
    let udp_other = campus
        .client
        .udp_request(campus.other.addr_v4(8080), DENIED_PROBE);
    assert!(
        tcp_other.is_timed_out() && udp_other.is_timed_out(),
        "the client's NetworkPolicy decides before the Baseline Accept (TCP {tcp_other}, UDP {udp_other})"
    );
    let allowed = tcp(&campus.client, &campus.server);
    assert!(
        allowed.is_connected(),
        "what the NetworkPolicy allows: {allowed}"
    );
    let open = tcp(&campus.open, &campus.other);
    assert!(open.is_connected(), "open is not isolated: {open}");
    let client = campus.client.host_ifindex();
    assert!(
        counted_with_reason(&agent, &campus.topology, client, "deny", "no_rule_allows") >= 2,
        "the client's drops are the NetworkPolicy's"
    );
    let open = campus.open.host_ifindex();
    assert!(
        counted_with_reason(&agent, &campus.topology, open, "allow", "baseline_accept") >= 1,
        "open's connection was accepted by the Baseline tier"
    );
}

/// Two Admin policies for the same destination: Accept at `accept`, Deny at `deny`.
fn accept_and_deny_server(accept: u32, deny: u32) -> String {
    documents(&[
        cluster_policy(
            "accept-server",
            "Admin",
            accept,
            SHOP,
            &format!("[{{name: server, action: Accept, to: {TO_SERVER}}}]"),
        ),
        cluster_policy(
            "deny-server",
            "Admin",
            deny,
            SHOP,
            &format!("[{{name: server, action: Deny, to: {TO_SERVER}}}]"),
        ),
    ])
}

#[test]
fn swapping_two_admin_priorities_flips_the_verdict_in_one_reconcile() {
    if !egret_testbed::require_root(
        "swapping_two_admin_priorities_flips_the_verdict_in_one_reconcile",
    ) {
        return;
    }
    let campus = Campus::new(&accept_and_deny_server(10, 20));
    let agent = campus.start(&[]);
    let tcp_first = tcp(&campus.client, &campus.server);
    let udp_first = udp(&campus.client, &campus.server);
    assert!(
        tcp_first.is_connected() && udp_first.is_connected(),
        "Accept at 10 comes before Deny at 20 (TCP {tcp_first}, UDP {udp_first})"
    );
    let client = campus.client.host_ifindex();
    assert!(counted_with_reason(&agent, &campus.topology, client, "allow", "admin_accept") >= 1);

    for (round, (accept, deny, connects)) in
        [(20, 10, false), (10, 20, true)].into_iter().enumerate()
    {
        let before = agent.log().matches("reconciled").count();
        campus.rewrite_policies(&accept_and_deny_server(accept, deny));
        let flipped = eventually(TAKES_EFFECT, || {
            let probe = campus
                .client
                .tcp_connect(campus.server.addr_v4(8080), DENIED_PROBE);
            if connects {
                probe.is_connected()
            } else {
                probe.is_timed_out()
            }
        });
        assert!(
            flipped,
            "round {round}: Accept at {accept}, Deny at {deny}: the verdict never flipped:\n{}",
            common::log_tail(&agent, 4000)
        );
        let udp_now = campus
            .client
            .udp_request(campus.server.addr_v4(8080), DENIED_PROBE);
        assert_eq!(
            udp_now.is_connected(),
            connects,
            "round {round}: UDP follows: {udp_now}"
        );
        // Both priorities changed in one file write; one reconcile applies them together.
        thread::sleep(Duration::from_millis(500));
        let reconciles = agent.log().matches("reconciled").count() - before;
        assert_eq!(
            reconciles,
            1,
            "round {round}: the swap took {reconciles} reconciles:\n{}",
            common::log_tail(&agent, 4000)
        );
    }
    assert!(counted_with_reason(&agent, &campus.topology, client, "deny", "admin_deny") >= 1);
}

// --- The upstream conformance cases over real packets ------------------------------------

/// A case file of `tests/data/cnp/` (see its README), as far as this test reads it.
#[derive(Deserialize)]
struct Case {
    upstream: Upstream,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Upstream {
    test: String,
}

#[derive(Deserialize)]
struct Step {
    description: String,
    policies: Vec<Yaml>,
    probes: Vec<CaseProbe>,
}

#[derive(Clone, Deserialize)]
struct CaseProbe {
    from: String,
    to: String,
    protocol: String,
    port: u16,
    connect: bool,
}

impl CaseProbe {
    fn describe(&self) -> String {
        format!(
            "{} -> {} {}/{}",
            self.from, self.to, self.protocol, self.port
        )
    }
}

/// A pod of `cluster.yaml`: `namespace/name`, whether it is on the host network, addresses.
struct FixturePod {
    key: String,
    host_network: bool,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

fn cnp_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/cnp")
}

fn fixture_pods(cluster: &str) -> Vec<FixturePod> {
    let mut pods = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(cluster) {
        let object = Yaml::deserialize(document).expect("cluster.yaml parses");
        if object["kind"].as_str() != Some("Pod") {
            continue;
        }
        let text = |value: &Yaml| value.as_str().expect("a string").to_owned();
        let ips: Vec<IpAddr> = object["status"]["podIPs"]
            .as_sequence()
            .expect("status.podIPs")
            .iter()
            .map(|ip| text(&ip["ip"]).parse().expect("an address"))
            .collect();
        let (Some(IpAddr::V4(ipv4)), Some(IpAddr::V6(ipv6))) = (ips.first(), ips.get(1)) else {
            panic!("podIPs are IPv4 then IPv6: {ips:?}");
        };
        pods.push(FixturePod {
            key: format!(
                "{}/{}",
                text(&object["metadata"]["namespace"]),
                text(&object["metadata"]["name"])
            ),
            host_network: object["spec"]["hostNetwork"].as_bool() == Some(true),
            ipv4: *ipv4,
            ipv6: *ipv6,
        });
    }
    pods
}

fn cases() -> Vec<(String, Case)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(cnp_data())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension().is_some_and(|e| e == "yaml")
                && path.file_name().is_some_and(|n| n != "cluster.yaml")
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let case = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            (file, case)
        })
        .collect()
}

/// The fixture's pods (host-network ones aside) at their addresses in a topology, each
/// echoing on every probed port, under one agent reading a manifest directory.
struct LiveFixture {
    // Fields drop in order: the agent stops before the pods go.
    agent: AgentProcess,
    manifests: tempfile::TempDir,
    /// By `namespace/name`: the pod and the address probes go to (`status.podIP`).
    pods: BTreeMap<String, (Pod, Ipv4Addr)>,
    _listeners: Vec<Listener>,
    topology: Topology,
    /// `egret status`'s `last_reconcile` after the last change this test made.
    reconciled: Option<String>,
    /// The policies file as last written.
    written: String,
}

impl LiveFixture {
    fn start(cluster: &str, fixture: &[FixturePod], ports: &BTreeSet<(String, u16)>) -> Self {
        let topology = Topology::new().expect("topology");
        let mut pods = BTreeMap::new();
        let mut listeners = Vec::new();
        for fixture_pod in fixture.iter().filter(|pod| !pod.host_network) {
            let name = fixture_pod.key.split_once('/').unwrap().1;
            let pod = topology
                .add_pod(name, fixture_pod.ipv4, fixture_pod.ipv6)
                .expect("pod");
            for (protocol, port) in ports {
                let listener = match protocol.as_str() {
                    "TCP" => pod.serve_tcp(*port),
                    _ => pod.serve_udp(*port),
                };
                listeners.push(
                    listener.unwrap_or_else(|e| panic!("{name} serving {protocol}/{port}: {e:#}")),
                );
            }
            pods.insert(fixture_pod.key.clone(), (pod, fixture_pod.ipv4));
        }
        let manifests = tempfile::tempdir().unwrap();
        write_file(manifests.path(), "cluster.yaml", cluster).unwrap();
        write_file(manifests.path(), "policies.yaml", "").unwrap();
        // Reconciles only when the policies file changes, so a new `last_reconcile` is ours.
        let mut agent = start_agent(&topology, manifests.path(), &["--resync-seconds", "600"]);
        let ifindexes: Vec<u32> = pods.values().map(|(pod, _)| pod.host_ifindex()).collect();
        agent
            .wait_attached(&ifindexes, Duration::from_secs(30))
            .unwrap();
        let mut reconciled = None;
        let settled = eventually(Duration::from_secs(10), || {
            let now = last_reconcile(&agent, &topology);
            let stable = now.is_some() && now == reconciled;
            reconciled = now;
            thread::sleep(Duration::from_millis(400));
            stable
        });
        assert!(settled, "the agent never settled:\n{}", agent.log());
        Self {
            agent,
            manifests,
            pods,
            _listeners: listeners,
            topology,
            reconciled,
            written: String::new(),
        }
    }

    /// Writes `policies` as the policies file and waits for the agent's reconcile; `false`
    /// when none came (the agent reconciles only when what it reads changed).
    fn apply(&mut self, policies: &[Yaml]) -> bool {
        let text = policies
            .iter()
            .map(|p| serde_yaml_ng::to_string(p).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        if text == self.written {
            return true;
        }
        write_file(self.manifests.path(), "policies.yaml", &text).unwrap();
        self.written = text;
        let before = self.reconciled.clone();
        let mut now = None;
        let changed = eventually(Duration::from_secs(5), || {
            now = last_reconcile(&self.agent, &self.topology);
            now.is_some() && now != before
        });
        if changed {
            self.reconciled = now;
        }
        changed
    }

    /// Runs `probes` at once, each over a real connection; what is wrong with each.
    fn run(&self, probes: &[&CaseProbe]) -> Vec<Option<String>> {
        thread::scope(|scope| {
            let handles: Vec<_> = probes
                .iter()
                .map(|probe| scope.spawn(|| self.check(probe)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn check(&self, probe: &CaseProbe) -> Option<String> {
        let (from, _) = &self.pods[&probe.from];
        let (_, to) = &self.pods[&probe.to];
        let destination = SocketAddr::from((*to, probe.port));
        let timeout = if probe.connect {
            Duration::from_secs(2)
        } else {
            DENIED_PROBE
        };
        let result = match probe.protocol.as_str() {
            "TCP" => from.tcp_connect(destination, timeout),
            "UDP" => from.udp_request(destination, timeout),
            other => unreachable!("only TCP and UDP probes run, not {other}"),
        };
        // Upstream's Deny drops silently: a denied probe must time out; a refusal is wrong.
        let right = if probe.connect {
            result.is_connected()
        } else {
            result.is_timed_out()
        };
        let expected = if probe.connect { "connect" } else { "time out" };
        (!right).then(|| format!("expected {expected}, the packet {result}"))
    }

    /// What the running agent's tables say about `probe` (`egret explain`), for a report.
    fn explain(&self, probe: &CaseProbe) -> String {
        let to = self.pods[&probe.to].1.to_string();
        let port = probe.port.to_string();
        let args = [
            "explain",
            "--from",
            &probe.from,
            "--to",
            &to,
            "--port",
            &port,
            "--protocol",
            &probe.protocol,
            "--output",
            "json",
        ];
        let output = self.agent.command(&self.topology, &args).output();
        match output.map(|o| serde_json::from_slice::<Value>(&o.stdout)) {
            Ok(Ok(answer)) => format!(
                "egret explain says {} (reason {}, tier {}, decided by {}, passed over {})",
                answer["verdict"],
                answer["reason"],
                answer["tier"],
                answer["decided_by_rule"],
                answer["passed_over_rules"]
            ),
            other => format!("explain failed: {other:?}"),
        }
    }
}

/// `egret status`'s `last_reconcile`, or `None` while the agent does not answer.
fn last_reconcile(agent: &AgentProcess, topology: &Topology) -> Option<String> {
    let output = agent
        .command(topology, &["status", "--output", "json"])
        .output()
        .ok()?;
    let status: Value = serde_json::from_slice(&output.stdout).ok()?;
    status["last_reconcile"].as_str().map(str::to_owned)
}

#[test]
fn upstream_cnp_egress_conformance_cases_hold_for_real_packets() {
    if !egret_testbed::require_root("upstream_cnp_egress_conformance_cases_hold_for_real_packets") {
        return;
    }
    let started = Instant::now();
    let cluster = std::fs::read_to_string(cnp_data().join("cluster.yaml")).unwrap();
    let fixture = fixture_pods(&cluster);
    let host_network: BTreeSet<&str> = fixture
        .iter()
        .filter(|pod| pod.host_network)
        .map(|pod| pod.key.as_str())
        .collect();
    let cases = cases();
    assert_eq!(cases.len(), 16, "one file per upstream egress test");

    // What runs: TCP and UDP probes. SCTP is left out because this kernel has no SCTP.
    // Probes to host-network pods (centaur-*) are left out too: they hold node-1's own
    // address, which a netns topology cannot model (its node namespace only forwards, and
    // no pod there can also be the node).
    let runs = |probe: &CaseProbe| {
        matches!(probe.protocol.as_str(), "TCP" | "UDP")
            && !host_network.contains(probe.to.as_str())
    };
    let ports: BTreeSet<(String, u16)> = cases
        .iter()
        .flat_map(|(_, case)| case.steps.iter().flat_map(|s| &s.probes))
        .filter(|probe| runs(probe))
        .map(|probe| (probe.protocol.clone(), probe.port))
        .collect();
    let mut live = LiveFixture::start(&cluster, &fixture, &ports);

    let (mut mismatches, mut notes) = (Vec::new(), Vec::new());
    let (mut ran, mut left_out, mut steps) = (0, 0, 0);
    for (file, case) in &cases {
        for (s, step) in case.steps.iter().enumerate() {
            let context = format!(
                "{file} ({}) step {} ({})",
                case.upstream.test,
                s + 1,
                step.description
            );
            let probes: Vec<&CaseProbe> = step.probes.iter().filter(|p| runs(p)).collect();
            left_out += step.probes.len() - probes.len();
            if probes.is_empty() {
                continue;
            }
            steps += 1;
            if !live.apply(&step.policies) {
                notes.push(format!("{context}: no reconcile after the write"));
            }
            for (probe, problem) in probes.iter().zip(live.run(&probes)) {
                ran += 1;
                if let Some(problem) = problem {
                    mismatches.push(format!(
                        "{context}: {}: {problem}; {}",
                        probe.describe(),
                        live.explain(probe)
                    ));
                }
            }
        }
    }
    eprintln!(
        "{} cases, {steps} steps, {ran} probes over real packets ({left_out} SCTP or host-network probes left out) in {:.1?}",
        cases.len(),
        started.elapsed()
    );
    for note in &notes {
        eprintln!("note: {note}");
    }
    assert!(ran >= 100, "only {ran} probes ran");
    assert!(
        mismatches.is_empty(),
        "{} of {ran} probes disagree with the data (and simulate):\n{}\nagent log tail:\n{}",
        mismatches.len(),
        mismatches.join("\n"),
        common::log_tail(&live.agent, 3000)
    );
}
