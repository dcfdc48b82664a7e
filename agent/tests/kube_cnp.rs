//! The agent against an API server without the `ClusterNetworkPolicy` CRD, as root: it
//! becomes ready, says once that the CRD is not installed, and enforces NetworkPolicies
//! on real traffic; once the CRD is installed it picks ClusterNetworkPolicies up with
//! no restart (`egret_policies_loaded{kind="ClusterNetworkPolicy"}`).

mod common;

use std::{
    io::{Read as _, Write as _},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use common::{PROBE_TIMEOUT, add_pod, apiserver::ApiServer};
use egret_testbed::{Pod, Topology, agent::AgentProcess};
use serde_json::{Value, json};

const NOT_INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: enforcing NetworkPolicies only; ClusterNetworkPolicies are picked up when it appears";
const INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is installed: watching ClusterNetworkPolicies";

fn pod_object(pod: &Pod, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name(), "namespace": "shop", "uid": format!("uid-{}", pod.name()),
            "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": pod.ipv4().to_string(),
            "podIPs": [{"ip": pod.ipv4().to_string()}, {"ip": pod.ipv6().to_string()}]}})
}

/// An API server for `topology`'s node namespace, served by a runtime whose threads
/// live there.
fn api_server_in(topology: &Topology) -> (tokio::runtime::Runtime, ApiServer) {
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(ApiServer::start());
        (runtime, server)
    })
}

/// A GET on the agent's metrics address inside the node namespace: (status, body).
fn get(topology: &Topology, path: &str) -> (u16, String) {
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", 9090)) else {
            return (0, String::new());
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: egret\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
}

/// Polls `condition` until it holds or `within` passes.
fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agent_without_the_cluster_network_policy_crd_works_and_picks_it_up_later() {
    if !egret_testbed::require_root(
        "agent_without_the_cluster_network_policy_crd_works_and_picks_it_up_later",
    ) {
        return;
    }
    let topology = Topology::new().expect("topology");
    let client = add_pod(&topology, "client", 1);
    let server_pod = add_pod(&topology, "server", 2);
    let other = add_pod(&topology, "other", 3);
    let _listeners: Vec<_> = [&client, &server_pod, &other]
        .map(|pod| pod.serve_tcp(8080).unwrap())
        .into();
    let (runtime, server) = api_server_in(&topology);
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"name": "shop"}}}));
    for (pod, app) in [
        (&client, "client"),
        (&server_pod, "server"),
        (&other, "other"),
    ] {
        server.apply(pod_object(pod, app));
    }
    server.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "client", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}]}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.kubeconfig(dir.path());
    let mut agent = AgentProcess::start_with_kubeconfig(
        &topology,
        Path::new(common::AGENT),
        &kubeconfig,
        &AgentProcess::unique_pin_dir(),
        &[],
    )
    .expect("agent starts");
    let ifindexes = [&client, &server_pod, &other].map(Pod::host_ifindex);
    agent
        .wait_attached(&ifindexes, Duration::from_secs(30))
        .unwrap();

    // Without the CRD: ready, healthy (no stale source), NetworkPolicies enforced.
    assert!(
        eventually(Duration::from_secs(15), || get(&topology, "/readyz").0
            == 200),
        "ready without the CRD: {:?}\n{}",
        get(&topology, "/readyz"),
        common::log_tail(&agent, 3000)
    );
    assert_eq!(get(&topology, "/healthz"), (200, "ok\n".to_owned()));
    assert!(
        client
            .tcp_connect(server_pod.addr_v4(8080), Duration::from_secs(2))
            .is_connected(),
        "the NetworkPolicy allows client -> server"
    );
    assert!(
        client
            .tcp_connect(other.addr_v4(8080), PROBE_TIMEOUT)
            .is_timed_out(),
        "the NetworkPolicy isolates client"
    );
    let metrics = get(&topology, "/metrics").1;
    for series in [
        "egret_policies_loaded{kind=\"NetworkPolicy\"} 1",
        "egret_policies_loaded{kind=\"ClusterNetworkPolicy\"} 0",
    ] {
        assert!(metrics.contains(series), "{series}:\n{metrics}");
    }
    assert_eq!(
        agent.log().matches(NOT_INSTALLED).count(),
        1,
        "said once:\n{}",
        common::log_tail(&agent, 3000)
    );

    crd_installed_later(&topology, &agent, &server, &client, &other);
    drop(agent);
    runtime.shutdown_background();
}

/// The CRD appears with an Admin Deny for client: the agent's next check finds it.
fn crd_installed_later(
    topology: &Topology,
    agent: &AgentProcess,
    server: &ApiServer,
    client: &Pod,
    other: &Pod,
) {
    server.install_crd();
    server.apply(json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy", "metadata": {"name": "no-server"},
        "spec": {"tier": "Admin", "priority": 10,
            "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}},
            "egress": [{"name": "server", "action": "Deny",
                "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "server"}}}}]}]}}));
    let loaded = "egret_policies_loaded{kind=\"ClusterNetworkPolicy\"} 1";
    assert!(
        eventually(Duration::from_secs(45), || get(topology, "/metrics")
            .1
            .contains(loaded)),
        "picked up within the 30 s check:\n{}\n{}",
        get(topology, "/metrics").1,
        common::log_tail(agent, 3000)
    );
    let log = agent.log();
    assert_eq!(log.matches(NOT_INSTALLED).count(), 1, "still said once");
    assert_eq!(log.matches(INSTALLED).count(), 1, "{log}");
    assert!(
        log.contains("ClusterNetworkPolicy loaded") && log.contains("no-server"),
        "the policy is named at debug"
    );
    assert_eq!(get(topology, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(topology, "/readyz").0, 200);
    assert!(
        client
            .tcp_connect(other.addr_v4(8080), PROBE_TIMEOUT)
            .is_timed_out(),
        "the NetworkPolicy still isolates client"
    );
}
