//! Sources and the reconcile loop on real traffic: a watched manifest directory, a
//! Service reached through a real DNAT, pod churn, and the HTTP endpoints.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use common::{PROBE_TIMEOUT, add_pod, egress_policy, start_agent};
use egret_testbed::{
    Pod, Topology,
    manifests::{PodManifest, cluster_yaml, write_file},
};

fn shop_cluster(topology: &Topology) -> (Pod, Pod, Pod) {
    let client = add_pod(topology, "client", 1);
    let server = add_pod(topology, "server", 2);
    let other = add_pod(topology, "other", 3);
    (client, server, other)
}

fn manifests_for(pods: &[(&Pod, &str)]) -> String {
    let labels: Vec<[(&str, &str); 1]> = pods.iter().map(|(_, app)| [("app", *app)]).collect();
    let manifests: Vec<PodManifest<'_>> = pods
        .iter()
        .zip(&labels)
        .map(|((pod, _), labels)| PodManifest {
            pod,
            namespace: "shop",
            labels,
            ports: &[],
        })
        .collect();
    cluster_yaml(&manifests)
}

/// Polls `condition` until it holds or `within` passes; returns how long it took.
fn within(within: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if condition() {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

const FAST: Duration = Duration::from_millis(150);

#[test]
fn manifest_directory_changes_are_enforced_within_a_second() {
    if !egret_testbed::require_root("manifest_directory_changes_are_enforced_within_a_second") {
        return;
    }
    let topology = Topology::new().unwrap();
    let (client, server, other) = shop_cluster(&topology);
    let _echoes = [&server, &other].map(|p| p.serve_tcp(8080).unwrap());
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "cluster.yaml",
        &manifests_for(&[(&client, "client"), (&server, "server"), (&other, "other")]),
    )
    .unwrap();
    let mut agent = start_agent(&topology, dir.path(), &["--resync-seconds", "600"]);
    agent
        .wait_attached(
            &[
                client.host_ifindex(),
                server.host_ifindex(),
                other.host_ifindex(),
            ],
            Duration::from_secs(20),
        )
        .unwrap();
    let reaches_other = || client.tcp_connect(other.addr_v4(8080), FAST).is_connected();
    let reaches_server = || {
        client
            .tcp_connect(server.addr_v4(8080), FAST)
            .is_connected()
    };
    let one_second = Duration::from_secs(1);
    assert!(reaches_other(), "no policy yet");

    // Added: client may reach the server only.
    let only_server = egress_policy(
        "client",
        "client",
        "[{to: [{podSelector: {matchLabels: {app: server}}}]}]",
        "",
    );
    write_file(dir.path(), "policy.yaml", &only_server).unwrap();
    assert!(
        within(one_second, || !reaches_other()).is_some(),
        "added policy not enforced within 1 s\n{}",
        agent.log()
    );
    assert!(reaches_server());

    // Edited: now the other pod only.
    let only_other = egress_policy(
        "client",
        "client",
        "[{to: [{podSelector: {matchLabels: {app: other}}}]}]",
        "",
    );
    write_file(dir.path(), "policy.yaml", &only_other).unwrap();
    assert!(
        within(one_second, || reaches_other() && !reaches_server()).is_some(),
        "edit not enforced within 1 s"
    );

    // Renamed: same policy, new file name; enforcement unchanged.
    std::fs::rename(
        dir.path().join("policy.yaml"),
        dir.path().join("renamed.yaml"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        reaches_other() && !reaches_server(),
        "a renamed file still counts"
    );

    // A broken rule is reported and allows nothing (fail_closed.rs has the rest); an
    // unparsable file is reported and skipped; everything else still counts.
    write_file(dir.path(), "broken.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: shop}\nspec: {podSelector: {matchLabels: {app: other}}, egress: [{to: [{ipBlock: {cidr: nonsense}}]}]}\n").unwrap();
    write_file(dir.path(), "garbage.yaml", "kind: [unclosed\n").unwrap();
    assert!(
        within(one_second, || agent.log().contains(
            "broken.yaml: NetworkPolicy shop/bad: spec.egress[0].to[0].ipBlock.cidr"
        ))
        .is_some(),
        "broken file reported:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("garbage.yaml"),
        "unparsable file reported"
    );
    assert!(
        reaches_other() && !reaches_server(),
        "other files still enforced"
    );

    // Deleted: client is unrestricted again.
    std::fs::remove_file(dir.path().join("renamed.yaml")).unwrap();
    assert!(
        within(one_second, reaches_server).is_some(),
        "deletion not enforced within 1 s"
    );
}

#[test]
fn service_address_follows_its_backends_through_a_real_dnat() {
    if !egret_testbed::require_root("service_address_follows_its_backends_through_a_real_dnat") {
        return;
    }
    let topology = Topology::new().unwrap();
    let (client, server, other) = shop_cluster(&topology);
    let _echo = server.serve_tcp(8080).unwrap();
    // kube-proxy's part: 10.96.0.10:80 -> server:8080, in the node's PREROUTING.
    let rules = format!(
        "table ip egret_test_nat {{\n  chain prerouting {{\n    type nat hook prerouting priority -100\n    ip daddr 10.96.0.10 tcp dport 80 dnat to {}:8080\n  }}\n}}\n",
        server.ipv4()
    );
    let status = topology
        .node_command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(rules.as_bytes())?;
            child.wait()
        });
    assert!(
        status.is_ok_and(|s| s.success()),
        "nft DNAT rule in the node namespace"
    );
    let dir = tempfile::tempdir().unwrap();
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: ['{}'], conditions: {{ready: true}}}}]\n",
        server.ipv4()
    );
    write_file(
        dir.path(),
        "cluster.yaml",
        &manifests_for(&[(&client, "client"), (&server, "server"), (&other, "other")]),
    )
    .unwrap();
    write_file(dir.path(), "service.yaml", &service).unwrap();
    let policies = [
        egress_policy(
            "client",
            "client",
            "[{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 8080}]}]",
            "",
        ),
        egress_policy(
            "other",
            "other",
            "[{to: [{ipBlock: {cidr: 10.96.0.0/12}}]}]",
            "",
        ),
    ]
    .join("---\n");
    write_file(dir.path(), "policies.yaml", &policies).unwrap();
    let mut agent = start_agent(&topology, dir.path(), &[]);
    agent
        .wait_attached(
            &[
                client.host_ifindex(),
                server.host_ifindex(),
                other.host_ifindex(),
            ],
            Duration::from_secs(20),
        )
        .unwrap();

    let vip = std::net::SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80));
    let allowed = client.tcp_connect(vip, PROBE_TIMEOUT);
    assert!(
        allowed.is_connected(),
        "client may reach the backend, so the ClusterIP: {allowed}\n{}",
        agent.log()
    );
    let denied = other.tcp_connect(vip, PROBE_TIMEOUT);
    assert!(
        denied.is_timed_out(),
        "other's policy allows the service CIDR but not the backend: judged as after translation: {denied}"
    );
}

#[test]
fn pod_churn_leaves_nothing_behind() {
    if !egret_testbed::require_root("pod_churn_leaves_nothing_behind") {
        return;
    }
    let topology = Topology::new().unwrap();
    let (client, server, other) = shop_cluster(&topology);
    let _echo = [&server, &other].map(|p| p.serve_tcp(8080).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let stable = [(&client, "client"), (&server, "server"), (&other, "other")];
    write_file(dir.path(), "cluster.yaml", &manifests_for(&stable)).unwrap();
    // Every pod in the namespace may reach the server only.
    write_file(
        dir.path(),
        "policy.yaml",
        &egress_policy(
            "all",
            "client",
            "[{to: [{podSelector: {matchLabels: {app: server}}}]}]",
            "",
        )
        .replace("matchLabels: {app: client}", "{}"),
    )
    .unwrap();
    let mut agent = start_agent(&topology, dir.path(), &[]);
    agent
        .wait_attached(
            &[
                client.host_ifindex(),
                server.host_ifindex(),
                other.host_ifindex(),
            ],
            Duration::from_secs(20),
        )
        .unwrap();

    let started = Instant::now();
    let mut cycles = 0u8;
    while started.elapsed() < Duration::from_secs(30) && cycles < 200 {
        let n = 10 + cycles % 200;
        let name = format!("churn{cycles}");
        let pod = add_pod(&topology, &name, n);
        let mut pods = stable.to_vec();
        pods.push((&pod, "churn"));
        write_file(dir.path(), "cluster.yaml", &manifests_for(&pods)).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        if cycles.is_multiple_of(5) {
            // Spot check while churning: once attached, the new pod is isolated like
            // the rest (before that it is not yet known: the unknown-pod corner).
            agent
                .wait_attached(&[pod.host_ifindex()], Duration::from_secs(5))
                .unwrap();
            let probe = pod.tcp_connect(other.addr_v4(8080), FAST);
            assert!(
                !probe.is_connected(),
                "{name} must not reach other: {probe}\n{}",
                agent.log()
            );
        }
        topology.remove_pod(&name).unwrap();
        write_file(dir.path(), "cluster.yaml", &manifests_for(&stable)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        cycles += 1;
    }
    assert!(cycles >= 10, "only {cycles} churn cycles ran");

    // Settled: every verdict is right...
    let settled = within(Duration::from_secs(5), || {
        egret::datapath::read_pinned_image(agent.pin_dir())
            .is_ok_and(|image| image.endpoints.len() == 3)
    });
    assert!(
        settled.is_some(),
        "endpoints settle to the three stable pods\n{}",
        agent.log()
    );
    assert!(
        client
            .tcp_connect(server.addr_v4(8080), PROBE_TIMEOUT)
            .is_connected()
    );
    assert!(client.tcp_connect(other.addr_v4(8080), FAST).is_timed_out());
    assert_nothing_left(&agent, &stable.map(|(p, _)| p.host_ifindex()));
}

/// The kernel holds exactly the three stable pods: no entry of a churned pod is left.
fn assert_nothing_left(agent: &egret_testbed::agent::AgentProcess, stable_ifindexes: &[u32]) {
    let image = egret::datapath::read_pinned_image(agent.pin_dir()).unwrap();
    assert!(
        image.endpoints.keys().all(|i| stable_ifindexes.contains(i)),
        "endpoints: {:?}",
        image.endpoints.keys()
    );
    assert_eq!(image.identities.len(), 6, "three pods, two addresses each");
    let live: Vec<u32> = image.endpoints.values().map(|e| e.table).collect();
    assert!(
        image
            .policy
            .keys()
            .all(|(_, k)| live.contains(&u32::from_be_bytes(k.table))),
        "policy entries of tables no endpoint uses"
    );
    assert!(
        image
            .cidrs
            .keys()
            .all(|(_, k)| live.contains(&u32::from_be_bytes(k.table))),
        "CIDR entries of tables no endpoint uses"
    );
    let links = std::fs::read_dir(agent.pin_dir().join("links"))
        .unwrap()
        .count();
    assert_eq!(
        links,
        2 * 3,
        "two pinned links per stable pod, none for churned ones"
    );
}

/// A GET inside the node namespace; returns (status, body).
fn get(topology: &Topology, path: &str) -> (u16, String) {
    egret_testbed::run_in_netns(topology.node_netns(), || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", 9090)).expect("metrics port");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: egret\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
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

#[test]
fn health_readiness_and_metrics() {
    if !egret_testbed::require_root("health_readiness_and_metrics") {
        return;
    }
    let topology = Topology::new().unwrap();
    let (client, server, other) = shop_cluster(&topology);
    let _echo = other.serve_tcp(8080).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let all = [(&client, "client"), (&server, "server"), (&other, "other")];
    write_file(dir.path(), "cluster.yaml", &manifests_for(&all)).unwrap();
    write_file(
        dir.path(),
        "policy.yaml",
        &egress_policy("client", "client", "[]", ""),
    )
    .unwrap();
    let mut agent = start_agent(&topology, dir.path(), &[]);
    agent
        .wait_attached(&all.map(|(p, _)| p.host_ifindex()), Duration::from_secs(20))
        .unwrap();
    let ready = within(Duration::from_secs(5), || {
        get(&topology, "/readyz").0 == 200
    });
    assert!(ready.is_some(), "ready after the first sync");
    assert_eq!(get(&topology, "/healthz").0, 200);
    assert!(client.tcp_connect(other.addr_v4(8080), FAST).is_timed_out());
    let (status, metrics) = get(&topology, "/metrics");
    assert_eq!(status, 200);
    let denied = "egret_egress_packets_total{namespace=\"shop\",pod=\"client\",verdict=\"deny\",reason=\"no_rule_allows\"}";
    assert!(
        metrics.contains(denied),
        "denials counted per pod:\n{metrics}"
    );
    let families = [
        "egret_programming_latency_seconds_bucket",
        "egret_reconcile_runs_total",
        "egret_map_entries{map=\"POLICY_V3\"}",
        "egret_map_capacity{map=\"POLICY_V3\"}",
        "egret_policies_loaded{kind=\"NetworkPolicy\"} 1",
        "egret_policies_loaded{kind=\"ClusterNetworkPolicy\"} 0",
        "egret_endpoints{state=\"enforced\"} 3",
    ];
    for family in families {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    // A deleted pod's series disappear.
    write_file(dir.path(), "cluster.yaml", &manifests_for(&all[1..])).unwrap();
    let gone = within(Duration::from_secs(5), || {
        !get(&topology, "/metrics").1.contains("pod=\"client\"")
    });
    assert!(gone.is_some(), "client's series removed after the pod left");
}
