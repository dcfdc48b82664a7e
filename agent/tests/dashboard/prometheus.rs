//! The dashboard against a real Prometheus: Debian's `prometheus` (installed by
//! `cargo xtask setup`) scrapes a real agent every second in the test's node namespace
//! while pods send allowed, denied and audit-denied datagrams. Every query of the
//! dashboard, its variables substituted as Grafana substitutes them, must return the
//! series its panel plots, and the packet and denied-flow counters must agree with
//! the datagrams sent.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    ops::Range,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use egret_testbed::{Pod, Topology};
use serde_json::Value;

use super::{
    Query,
    common::{
        egress_policy,
        site::{PodSpec, Site},
    },
    dashboard, queries,
};

/// Debian's package puts it on the PATH.
const PROMETHEUS: &str = "prometheus";

/// The agent's default `--metrics-addr`, inside the node namespace.
const AGENT_METRICS: &str = "127.0.0.1:9090";

/// What this test puts for Grafana's `$__rate_interval` and `$__range`: longer than
/// the test, so every scrape of it is in the window.
const WINDOW: &str = "5m";

/// Panels whose queries need what this test cannot make happen. Each must return no
/// series (so the list is checked, and shrinks when it can).
const EXCEPTIONS: [(&str, &str); 1] = [(
    "panel \"Watch restarts\"",
    "egret_watch_restarts_total counts restarted API-server watches; a manifest directory, \
     the only source a test without an API server has, has none to restart",
)];

/// Datagrams of each kind in each of the two bursts.
const PER_BURST: u16 = 4;

#[test]
fn every_dashboard_query_returns_its_series_from_a_real_prometheus() {
    if !egret_testbed::require_root(
        "every_dashboard_query_returns_its_series_from_a_real_prometheus",
    ) {
        return;
    }
    let policies = [
        egress_policy(
            "client-udp",
            "client",
            "[{ports: [{protocol: UDP, port: 5000, endPort: 5999}]}]",
            "",
        ),
        egress_policy("staged-nothing", "staged", "[]", "egret.dev/mode: audit"),
    ];
    let pod = |name| PodSpec {
        name,
        namespace: "shop",
        app: name,
    };
    let site = Site::new(
        &[pod("client"), pod("staged"), pod("server")],
        &policies.join("---\n"),
    );
    let topology = &site.topology;
    let [client, staged, server] = [0, 1, 2].map(|i| site.pods[i].clone());
    let _agent = site.start(&[]);
    let prometheus = Prometheus::start(topology);
    prometheus.wait_for("up{job=\"egret\"}", 1.0);

    // Two bursts, so that every counter rises between scrapes (a series that appears
    // with its final value has no rate), with a policy change between them (programming
    // latency is observed on changes).
    let to = server.ipv4();
    for burst in 0..2 {
        let first = burst * PER_BURST;
        datagrams(&client, to, 5000 + first..5000 + first + PER_BURST);
        datagrams(&client, to, 6000 + first..6000 + first + PER_BURST);
        datagrams(&staged, to, 7000 + first..7000 + first + PER_BURST);
        let sent = f64::from(first + PER_BURST);
        check_counts(&prometheus, sent);
        if burst == 0 {
            let latency = "egret_programming_latency_seconds_count";
            let before = prometheus.value(latency).unwrap_or(0.0);
            let unused = egress_policy("selects-nothing", "nobody", "[]", "");
            let all = [&policies[..], &[unused]].concat();
            site.rewrite_policies(&all.join("---\n"));
            prometheus.wait_until(latency, |value| value > before);
        }
    }
    // A few more scrapes after the last change.
    std::thread::sleep(Duration::from_secs(3));

    let dashboard = dashboard();
    let all = queries(&dashboard);
    let variables = variable_values(&prometheus, &all);
    let mut empty = Vec::new();
    for query in all.iter().filter(|q| q.variable_label.is_none()) {
        let expr = grafana_substitutes(&query.expr, &variables);
        let series = prometheus.query(&expr);
        if let Some((_, why)) = EXCEPTIONS.iter().find(|(place, _)| *place == query.place) {
            assert!(
                series.is_empty(),
                "{}: returns series now; drop it from EXCEPTIONS ({why})",
                query.place
            );
            continue;
        }
        if series.is_empty() {
            empty.push(format!("{}: {expr}", query.place));
            continue;
        }
        check_series(query, &expr, &series);
    }
    assert!(
        empty.is_empty(),
        "dashboard queries that return no series:\n{}",
        empty.join("\n")
    );
}

/// The counters, read through Prometheus, against `sent` datagrams of each kind from
/// each pod so far: one packet each, and a flow each (every datagram has a destination
/// port of its own, which is part of a flow record's key).
fn check_counts(prometheus: &Prometheus, sent: f64) {
    let packets = |pod: &str, verdict: &str, reason: &str| {
        format!(
            "sum(egret_egress_packets_total{{namespace=\"shop\",pod=\"{pod}\",verdict=\"{verdict}\",reason=\"{reason}\"}})"
        )
    };
    for (what, query) in [
        ("denied packets", packets("client", "deny", "no_rule_allows")),
        ("allowed packets", packets("client", "allow", "policy")),
        (
            "audit-denied packets",
            packets("staged", "audit_deny", "no_rule_allows"),
        ),
        (
            "denied flows",
            "sum(egret_denied_flows_total{namespace=\"shop\",pod=\"client\",policy_set=\"shop/client-udp\",tier=\"networkpolicy\"})".to_owned(),
        ),
        (
            "audit-denied flows",
            "sum(egret_denied_flows_total{namespace=\"shop\",pod=\"staged\"})".to_owned(),
        ),
    ] {
        let seen = prometheus.wait_until(&query, |value| value >= sent);
        assert!(
            (seen - sent).abs() < f64::EPSILON,
            "{what}: {seen} counted, {sent} sent ({query})"
        );
    }
    // Nothing else of the client's was denied, under any reason.
    let denied = "sum(egret_egress_packets_total{pod=\"client\",verdict=~\"deny|audit_deny\"})";
    let value = prometheus.value(denied);
    assert!(
        value.is_some_and(|value| (value - sent).abs() < f64::EPSILON),
        "{denied}: {value:?}, {sent} sent"
    );
}

/// A panel's answer: the labels its legend names on every series, and numbers.
fn check_series(query: &Query, expr: &str, series: &[Value]) {
    let legend_labels: Vec<&str> = query
        .legend
        .split("{{")
        .skip(1)
        .filter_map(|rest| rest.split_once("}}"))
        .map(|(label, _)| label.trim())
        .collect();
    for one in series {
        for label in &legend_labels {
            assert!(
                one["metric"][label].is_string(),
                "{}: the legend's {label} on {one} ({expr})",
                query.place
            );
        }
        let value: f64 = one["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        assert!(
            value.is_finite(),
            "{}: a number, not {value}, in {one} ({expr})",
            query.place
        );
    }
}

/// What Grafana's "All" puts for each `label_values(…)` variable: every value, as a
/// regular expression (`(a|b)`), the variables it depends on substituted first.
fn variable_values(prometheus: &Prometheus, all: &[Query]) -> Vec<(String, String)> {
    let mut values: Vec<(String, String)> = Vec::new();
    for query in all {
        let Some(label) = &query.variable_label else {
            continue;
        };
        let name = query
            .place
            .trim_start_matches("variable ")
            .trim_matches('"')
            .to_owned();
        let selector = grafana_substitutes(&query.expr, &values);
        let mut found: Vec<String> = prometheus
            .query(&selector)
            .iter()
            .filter_map(|series| series["metric"][label].as_str().map(str::to_owned))
            .collect();
        found.sort();
        found.dedup();
        assert!(
            !found.is_empty(),
            "{}: no values of {label} ({selector})",
            query.place
        );
        values.push((name, format!("({})", found.join("|"))));
    }
    values
}

/// `expr` with the dashboard's variables and Grafana's own intervals substituted.
fn grafana_substitutes(expr: &str, variables: &[(String, String)]) -> String {
    let mut expr = expr
        .replace("$__rate_interval", WINDOW)
        .replace("$__range", WINDOW)
        .replace("$__interval", "1s");
    for (name, value) in variables {
        expr = expr
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    expr
}

/// Datagrams from `pod` to `to`, one to each of `ports`, each from a socket of its own.
fn datagrams(pod: &Pod, to: Ipv4Addr, ports: Range<u16>) {
    egret_testbed::run_in_netns(pod.netns(), || {
        for port in ports {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("a UDP socket");
            socket.send_to(b"egret", (to, port)).expect("sent");
        }
    });
}

/// A Prometheus server in the node namespace, scraping the agent every second, with
/// its data in a temporary directory; killed when dropped.
struct Prometheus<'t> {
    topology: &'t Topology,
    child: Child,
    address: SocketAddr,
    data: tempfile::TempDir,
}

impl<'t> Prometheus<'t> {
    fn start(topology: &'t Topology) -> Self {
        let version = std::process::Command::new(PROMETHEUS)
            .arg("--version")
            .output();
        assert!(
            version.is_ok_and(|v| v.status.success()),
            "no `{PROMETHEUS}` binary: `cargo xtask setup` installs Debian's package"
        );
        let data = tempfile::tempdir().unwrap();
        let config = data.path().join("prometheus.yml");
        // honor_labels: the agent's `namespace` and `pod` are the pod's (see README).
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 - job_name: egret\n  honor_labels: true\n  static_configs: [{{targets: ['{AGENT_METRICS}']}}]\n"
            ),
        )
        .unwrap();
        let address = egret_testbed::run_in_netns(topology.node_netns(), || {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
        });
        let log = std::fs::File::create(data.path().join("prometheus.log")).unwrap();
        let child = topology
            .node_command(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            topology,
            child,
            address,
            data,
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        while prometheus.get("/-/ready").map(|(status, _)| status) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` over HTTP/1.0 from inside the node namespace: status and body.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        egret_testbed::run_in_netns(self.topology.node_netns(), || {
            let mut stream =
                TcpStream::connect_timeout(&self.address, Duration::from_secs(2)).ok()?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .ok()?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let status = response.split_whitespace().nth(1)?.parse().ok()?;
            let (_, body) = response.split_once("\r\n\r\n")?;
            Some((status, body.to_owned()))
        })
    }

    /// The series of an instant query (`/api/v1/query`).
    fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!(
            "/api/v1/query?query={}",
            egret::admin_client::encode(promql)
        );
        let (status, body) = self
            .get(&path)
            .unwrap_or_else(|| panic!("prometheus answers:\n{}", self.log()));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{promql}: {status} {body}: {e}"));
        assert_eq!(answer["status"], "success", "{promql}: {body}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of the first series of `promql`, if any.
    fn value(&self, promql: &str) -> Option<f64> {
        self.query(promql)
            .first()
            .and_then(|series| series["value"][1].as_str()?.parse().ok())
    }

    /// Waits (20 s at most) for `promql` to have a value that `done` accepts; returns it.
    fn wait_until(&self, promql: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.value(promql);
            if let Some(value) = value.filter(|v| done(*v)) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} is {value:?} after 20 s; prometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_for(&self, promql: &str, wanted: f64) {
        self.wait_until(promql, |value| (value - wanted).abs() < f64::EPSILON);
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
