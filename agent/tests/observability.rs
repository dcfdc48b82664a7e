//! What the agent shows after real traffic: the flow log, the per-pod counters and
//! denied-flow metrics, `egret status`, `egret explain` and `egret flows`.

mod common;

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use common::{
    egress_policy,
    site::{self, PodSpec, Site},
};
use egret_testbed::Topology;
use serde_json::Value;

const FAST: Duration = Duration::from_millis(200);

fn metrics(topology: &Topology) -> String {
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", 9090)).expect("metrics port");
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
}

fn egret_json(
    agent: &egret_testbed::agent::AgentProcess,
    topology: &Topology,
    args: &[&str],
) -> Value {
    let output = agent.command(topology, args).output().unwrap();
    assert!(
        output.status.success(),
        "egret {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("egret {args:?} prints JSON: {e}"))
}

#[test]
fn denials_show_up_in_metrics_flow_log_and_cli() {
    if !egret_testbed::require_root("denials_show_up_in_metrics_flow_log_and_cli") {
        return;
    }
    let policies = [
        egress_policy(
            "client-dns-only",
            "client",
            "[{ports: [{protocol: UDP, port: 53}]}]",
            "",
        ),
        egress_policy("staged-deny", "staged", "[]", "egret.dev/mode: audit"),
    ]
    .join("---\n");
    let [client, server, _] = site::SHOP;
    let staged = PodSpec {
        name: "staged",
        namespace: "shop",
        app: "staged",
    };
    let site = Site::new(&[client, server, staged], &policies);
    let topology = &site.topology;
    let [client, server, staged] = [0, 1, 2].map(|i| site.pods[i].clone());
    let flow_log = site.manifests().join("flows.jsonl");
    let flow_log_arg = flow_log.to_str().unwrap().to_owned();
    let agent = site.start(&["--flow-log", &flow_log_arg]);

    // Start following flows before the traffic.
    let follower = {
        let mut command = agent.command(
            topology,
            &[
                "flows",
                "--follow",
                "--namespace",
                "shop",
                "--pod",
                "client",
                "--limit",
                "1",
                "--output",
                "json",
            ],
        );
        command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        client
            .tcp_connect(server.addr_v4(8080), FAST)
            .is_timed_out(),
        "client may only send DNS"
    );
    assert!(
        staged
            .tcp_connect(server.addr_v4(8080), FAST)
            .is_connected(),
        "staged policies drop nothing"
    );

    check_flow_log(&flow_log, &client, &server);

    // `egret flows` saw the client's denial.
    let output = follower.wait_with_output().unwrap();
    let streamed: Value =
        serde_json::from_slice(&output.stdout).expect("egret flows printed a JSON line");
    assert_eq!(streamed["source"]["pod"], "client");

    check_metrics(topology, &server);

    check_status_and_explain(&agent, topology, &server);

    // A deleted pod's series disappear.
    site.write_cluster(|name| name != "client");
    wait_for_series_gone(topology);
}

/// The flow log: one enriched, aggregated line per flow.
fn check_flow_log(
    flow_log: &std::path::Path,
    client: &egret_testbed::Pod,
    server: &egret_testbed::Pod,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(flow_log).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.iter().any(|l| l["audit"] == true) && lines.iter().any(|l| l["verdict"] == "deny")
            || Instant::now() > deadline
        {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let denied = lines
        .iter()
        .find(|l| l["verdict"] == "deny")
        .unwrap_or_else(|| panic!("a deny line: {lines:?}"));
    assert_eq!(denied["source"]["namespace"], "shop");
    assert_eq!(denied["source"]["pod"], "client");
    assert_eq!(denied["source"]["ip"], client.ipv4().to_string());
    assert_eq!(denied["destination"]["ip"], server.ipv4().to_string());
    assert_eq!(
        denied["destination"]["pod"], "server",
        "known pods are named"
    );
    assert_eq!(denied["destination"]["port"], 8080);
    assert_eq!(denied["protocol"], "TCP");
    assert_eq!(denied["reason"], "no_rule_allows");
    assert_eq!(denied["tier"], "networkpolicy");
    assert_eq!(
        denied["policies"],
        serde_json::json!(["shop/client-dns-only"])
    );
    assert!(denied["count"].as_u64().unwrap() >= 1);
    assert!(denied["time"].as_str().unwrap().ends_with('Z'));
    let audited = lines.iter().find(|l| l["audit"] == true).unwrap();
    assert_eq!(
        (
            audited["verdict"].as_str(),
            audited["source"]["pod"].as_str()
        ),
        (Some("audit_deny"), Some("staged"))
    );
}

/// `egret status` lists the endpoints; `egret explain` names the policies.
fn check_status_and_explain(
    agent: &egret_testbed::agent::AgentProcess,
    topology: &Topology,
    server: &egret_testbed::Pod,
) {
    let status = egret_json(agent, topology, &["status", "--output", "json"]);
    let endpoints: Vec<&str> = status["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pod"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints, ["client", "server", "staged"]);
    assert_eq!(status["ready"], true);
    let to = server.ipv4().to_string();
    let explain = egret_json(
        agent,
        topology,
        &[
            "explain",
            "--from",
            "shop/client",
            "--to",
            &to,
            "--port",
            "8080",
            "--output",
            "json",
        ],
    );
    assert_eq!(explain["verdict"], "deny");
    assert_eq!(
        explain["isolated_by"],
        serde_json::json!(["shop/client-dns-only"])
    );
    assert_eq!(explain["to_owner"]["name"], "server");
    let explain = egret_json(
        agent,
        topology,
        &[
            "explain",
            "--from",
            "shop/client",
            "--to",
            &to,
            "--port",
            "53",
            "--protocol",
            "UDP",
            "--output",
            "json",
        ],
    );
    assert_eq!(explain["verdict"], "allow");
    assert_eq!(
        explain["allowed_by"],
        serde_json::json!(["shop/client-dns-only"])
    );
    assert_eq!(
        explain["allowed_by_rules"],
        serde_json::json!(["shop/client-dns-only egress[0]"])
    );
}

/// Metrics: per-pod packet counters by verdict and reason, denied flows by policy set.
fn check_metrics(topology: &Topology, server: &egret_testbed::Pod) {
    let text = metrics(topology);
    for series in [
        "egret_egress_packets_total{namespace=\"shop\",pod=\"client\",verdict=\"deny\",reason=\"no_rule_allows\"}",
        "egret_egress_bytes_total{namespace=\"shop\",pod=\"client\",verdict=\"deny\",reason=\"no_rule_allows\"}",
        "egret_egress_packets_total{namespace=\"shop\",pod=\"staged\",verdict=\"audit_deny\",reason=\"no_rule_allows\"}",
        "egret_denied_flows_total{namespace=\"shop\",pod=\"client\",policy_set=\"shop/client-dns-only\",tier=\"networkpolicy\"}",
        "egret_flow_events_lost_total",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    assert!(
        !text.contains(&server.ipv4().to_string()),
        "destinations never become labels"
    );
}

fn wait_for_series_gone(topology: &Topology) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics(topology).contains("pod=\"client\"") {
        assert!(
            Instant::now() < deadline,
            "client's series still there:\n{}",
            metrics(topology)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
