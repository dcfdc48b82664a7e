//! Never failing open, on real traffic: a source that cannot be read leaves the last
//! good snapshot enforced (and says so on `/healthz`, in `egret status` and in metrics),
//! and an invalid rule allows nothing while its policy still isolates.

mod common;

use std::{
    io::{Read as _, Write as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{PROBE_TIMEOUT, add_pod, apiserver::ApiServer, egress_policy, start_agent};
use egret_testbed::{
    Pod, Topology,
    agent::AgentProcess,
    manifests::{PodManifest, cluster_yaml, write_file},
};
use serde_json::{Value, json};

/// client (app: client), server (app: server), other (app: other), all in `shop`,
/// each with a TCP echo on 8080.
struct Shop {
    topology: Topology,
    client: Pod,
    server: Pod,
    other: Pod,
    _listeners: Vec<egret_testbed::Listener>,
}

impl Shop {
    fn new() -> Self {
        let topology = Topology::new().expect("topology");
        let client = add_pod(&topology, "client", 1);
        let server = add_pod(&topology, "server", 2);
        let other = add_pod(&topology, "other", 3);
        let listeners = [&client, &server, &other]
            .map(|pod| pod.serve_tcp(8080).unwrap())
            .into();
        Self {
            topology,
            client,
            server,
            other,
            _listeners: listeners,
        }
    }

    fn pods(&self) -> [(&Pod, &'static str); 3] {
        [
            (&self.client, "client"),
            (&self.server, "server"),
            (&self.other, "other"),
        ]
    }

    fn cluster_yaml(&self) -> String {
        let labels = self.pods().map(|(_, app)| [("app", app)]);
        let manifests: Vec<PodManifest<'_>> = self
            .pods()
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

    fn ifindexes(&self) -> [u32; 3] {
        self.pods().map(|(pod, _)| pod.host_ifindex())
    }
}

const CLIENT_TO_SERVER_ONLY: &str = "[{to: [{podSelector: {matchLabels: {app: server}}}]}]";

/// Probes client -> server (must connect) and client -> other (must be dropped) until
/// `done` (or `limit` passes); returns (probes, wrong verdicts as text).
fn probe_stream(shop: &Shop, done: &AtomicBool, limit: Duration) -> (usize, Vec<String>) {
    let (mut probes, mut wrong) = (0, Vec::new());
    let deadline = Instant::now() + limit;
    while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
        let allowed = shop
            .client
            .tcp_connect(shop.server.addr_v4(8080), Duration::from_secs(1));
        if !allowed.is_connected() {
            wrong.push(format!("client -> server: {allowed}"));
        }
        let denied = shop
            .client
            .tcp_connect(shop.other.addr_v4(8080), Duration::from_millis(150));
        if !denied.is_timed_out() {
            wrong.push(format!("client -> other: {denied}"));
        }
        probes += 2;
    }
    (probes, wrong)
}

/// Runs [`probe_stream`] on a thread until the returned flag is set.
fn start_probing(
    shop: &Arc<Shop>,
    limit: Duration,
) -> (Arc<AtomicBool>, thread::JoinHandle<(usize, Vec<String>)>) {
    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let (shop, done) = (Arc::clone(shop), Arc::clone(&done));
        thread::spawn(move || probe_stream(&shop, &done, limit))
    };
    (done, stream)
}

/// A GET on the agent's metrics address inside the node namespace: (status, body).
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

/// `egret status` (text) run against the agent.
fn status(agent: &AgentProcess, topology: &Topology) -> String {
    let output = agent.command(topology, &["status"]).output().unwrap();
    assert!(
        output.status.success(),
        "egret status: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
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
        thread::sleep(Duration::from_millis(100));
    }
}

fn pinned_image(agent: &AgentProcess) -> egret::datapath::image::KernelImage {
    egret::datapath::read_pinned_image(agent.pin_dir()).expect("pinned tables")
}

#[test]
fn manifest_directory_moved_away_keeps_enforcing_and_reports_stale() {
    if !egret_testbed::require_root(
        "manifest_directory_moved_away_keeps_enforcing_and_reports_stale",
    ) {
        return;
    }
    let shop = Arc::new(Shop::new());
    let root = tempfile::tempdir().unwrap();
    let (dir, away) = (root.path().join("manifests"), root.path().join("away"));
    std::fs::create_dir(&dir).unwrap();
    write_file(&dir, "cluster.yaml", &shop.cluster_yaml()).unwrap();
    write_file(
        &dir,
        "policy.yaml",
        &egress_policy("client", "client", CLIENT_TO_SERVER_ONLY, ""),
    )
    .unwrap();
    // A short resync: reconciles run while the directory is away.
    let mut agent = start_agent(&shop.topology, &dir, &["--resync-seconds", "1"]);
    agent
        .wait_attached(&shop.ifindexes(), Duration::from_secs(20))
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || get(
        &shop.topology,
        "/readyz"
    )
    .0 == 200));
    let enforced = pinned_image(&agent);

    let (done, stream) = start_probing(&shop, Duration::from_mins(2));
    thread::sleep(Duration::from_secs(1));
    std::fs::rename(&dir, &away).unwrap();
    let reported = eventually(Duration::from_secs(5), || {
        get(&shop.topology, "/healthz")
            .1
            .contains("source manifests stale since")
    });
    assert!(
        reported,
        "/healthz names the stale source: {:?}\n{}",
        get(&shop.topology, "/healthz"),
        common::log_tail(&agent, 3000)
    );
    let (health, body) = get(&shop.topology, "/healthz");
    assert_eq!(
        health, 200,
        "a stale source is no reason to restart: {body}"
    );
    assert!(body.contains("cannot read manifest directory"), "{body}");
    assert_eq!(get(&shop.topology, "/readyz").0, 200, "readiness stays");
    let text = status(&agent, &shop.topology);
    assert!(
        text.contains("STALE source manifests stale since"),
        "egret status names the stale source:\n{text}"
    );
    // Several resyncs and retries while away.
    thread::sleep(Duration::from_secs(4));
    let metrics = get(&shop.topology, "/metrics").1;
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("egret_source_failures_total{source=\"manifests\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        failures.is_some_and(|n| n >= 2),
        "failed reads counted: {failures:?}"
    );
    assert!(
        metrics.contains("egret_source_stale{source=\"manifests\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        pinned_image(&agent),
        enforced,
        "the kernel keeps the last good tables"
    );

    std::fs::rename(&away, &dir).unwrap();
    let recovered = eventually(Duration::from_secs(5), || {
        get(&shop.topology, "/healthz").1 == "ok\n"
    });
    assert!(
        recovered,
        "recovers once the directory is back: {:?}",
        get(&shop.topology, "/healthz")
    );
    assert!(status(&agent, &shop.topology).contains("sources current"));
    assert!(
        get(&shop.topology, "/metrics")
            .1
            .contains("egret_source_stale{source=\"manifests\"} 0")
    );
    thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    let (probes, wrong) = stream.join().unwrap();
    assert!(probes >= 10, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "{} of {probes} verdicts were wrong:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        common::log_tail(&agent, 3000)
    );
    assert!(agent.log().contains("source readable again"));
}

#[test]
fn invalid_rule_keeps_its_pods_isolated() {
    if !egret_testbed::require_root("invalid_rule_keeps_its_pods_isolated") {
        return;
    }
    let shop = Shop::new();
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "cluster.yaml", &shop.cluster_yaml()).unwrap();
    // client: rule 0 allows the server; rule 1 has an endPort beyond 65535.
    let client = egress_policy(
        "client",
        "client",
        "[{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 8080}]}, \
         {to: [{podSelector: {matchLabels: {app: other}}}], ports: [{port: 8000, endPort: 70000}]}]",
        "",
    );
    // server: its only rule has a bad CIDR; it may send nothing.
    let server = egress_policy(
        "server",
        "server",
        "[{to: [{ipBlock: {cidr: 10.77.0.0/33}}]}]",
        "",
    );
    // other: the pod selector itself is invalid; the policy is skipped.
    let other = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: other, namespace: shop}\n\
                 spec:\n  podSelector: {matchExpressions: [{key: app, operator: Is, values: [other]}]}\n  \
                 policyTypes: [Egress]\n  egress: []\n";
    let policies = [client, server, other.to_owned()].join("---\n");
    write_file(dir.path(), "policies.yaml", &policies).unwrap();
    let mut agent = start_agent(&shop.topology, dir.path(), &[]);
    agent
        .wait_attached(&shop.ifindexes(), Duration::from_secs(20))
        .unwrap();

    let allowed = shop
        .client
        .tcp_connect(shop.server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        allowed.is_connected(),
        "the valid rule still allows: {allowed}\n{}",
        agent.log()
    );
    let denied = shop
        .client
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        denied.is_timed_out(),
        "the invalid rule allows nothing: {denied}"
    );
    let server_out = shop
        .server
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        server_out.is_timed_out(),
        "a policy whose only rule is invalid isolates: {server_out}"
    );
    let other_out = shop
        .other
        .tcp_connect(shop.client.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        other_out.is_connected(),
        "a policy whose selector is invalid is skipped: {other_out}"
    );
    let log = agent.log();
    for named in [
        "policies.yaml: NetworkPolicy shop/client: spec.egress[1].ports[0].endPort: port 70000 is outside 1-65535; this rule allows nothing",
        "policies.yaml: NetworkPolicy shop/server: spec.egress[0].to[0].ipBlock.cidr",
        "policies.yaml: NetworkPolicy shop/other: spec.podSelector.matchExpressions[0].operator",
    ] {
        assert!(log.contains(named), "{named:?} reported:\n{log}");
    }
}

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

/// The issue asks for a minute of errors.
const OUTAGE: Duration = Duration::from_mins(1);

#[test]
fn api_server_errors_change_nothing_enforced() {
    if !egret_testbed::require_root("api_server_errors_change_nothing_enforced") {
        return;
    }
    api_server_errors_for(OUTAGE);
}

fn api_server_errors_for(outage: Duration) {
    let shop = Arc::new(Shop::new());
    let (runtime, server) = api_server_in(&shop.topology);
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"name": "shop"}}}));
    for (pod, app) in shop.pods() {
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
        &shop.topology,
        Path::new(common::AGENT),
        &kubeconfig,
        &AgentProcess::unique_pin_dir(),
        &["--resync-seconds", "2"],
    )
    .expect("agent starts");
    agent
        .wait_attached(&shop.ifindexes(), Duration::from_secs(30))
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || get(
        &shop.topology,
        "/readyz"
    )
    .0 == 200));
    let enforced = pinned_image(&agent);

    let (done, stream) = start_probing(&shop, outage + Duration::from_mins(1));
    thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    server.fail_for(outage);
    let reported = eventually(Duration::from_secs(15), || {
        get(&shop.topology, "/healthz").1.contains(" stale since ")
    });
    assert!(
        reported,
        "/healthz names the stale kinds: {:?}\n{}",
        get(&shop.topology, "/healthz"),
        common::log_tail(&agent, 3000)
    );
    assert!(status(&agent, &shop.topology).contains("STALE source "));
    assert_eq!(get(&shop.topology, "/readyz").0, 200, "readiness stays");
    thread::sleep(outage.saturating_sub(started.elapsed()));
    assert_eq!(
        pinned_image(&agent),
        enforced,
        "a minute of errors changed the kernel's tables"
    );
    let metrics = get(&shop.topology, "/metrics").1;
    assert!(
        metrics.contains("egret_source_failures_total{source=\"Pod\"}"),
        "failures counted per kind:\n{metrics}"
    );

    // The server answers again: every kind recovers, and the agent follows changes.
    let recovered = eventually(Duration::from_secs(30), || {
        get(&shop.topology, "/healthz").1 == "ok\n"
    });
    assert!(
        recovered,
        "recovers once the server answers: {:?}",
        get(&shop.topology, "/healthz")
    );
    done.store(true, Ordering::Relaxed);
    let (probes, wrong) = stream.join().unwrap();
    assert!(probes >= 20, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "{} of {probes} verdicts were wrong:\n{}\n{}",
        wrong.len(),
        wrong.join("\n"),
        common::log_tail(&agent, 3000)
    );
    server.delete("NetworkPolicy", "shop", "client");
    let followed = eventually(Duration::from_secs(40), || {
        shop.client
            .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT)
            .is_connected()
    });
    assert!(
        followed,
        "a change after the outage is enforced\n{}",
        common::log_tail(&agent, 3000)
    );
    drop(agent);
    runtime.shutdown_background();
}

/// The same corners without a kernel: the loader's snapshot, compiled, judged by the
/// model of the kernel's lookup.
#[test]
fn invalid_rules_compile_to_rules_allowing_nothing() {
    use egret::{
        compile::{Ids, Scope, compile, lookup},
        source::manifest::Loader,
        state::ObjectKey,
    };
    use egret_common::{Verdict, proto};
    let cluster = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
        spec: {nodeName: node-1, containers: [{name: c, image: i}]}\n\
        status: {phase: Running, podIP: 10.0.0.1}\n";
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {name: web, namespace: shop, annotations: {egret.dev/mode: Audit}}\n\
        spec:\n  podSelector: {matchLabels: {app: web}}\n  egress:\n\
        \x20   - to: [{ipBlock: {cidr: 192.168.0.0/16}}]\n\
        \x20   - ports: [{protocol: QUIC, port: 443}]\n\
        \x20   - ports: [{port: [80]}]\n\
        \x20   - to: [{ipBlock: {cidr: 172.16.0.0/12}}]\n";
    let mut loader = Loader::default();
    loader.add_text(Path::new("cluster.yaml"), cluster);
    loader.add_text(Path::new("policy.yaml"), policy);
    let problems: Vec<String> = loader.problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0]
            .starts_with("policy.yaml: NetworkPolicy shop/web: spec.egress[2].ports[0].port: ")
    );
    assert!(
        problems[0]
            .ends_with("this rule allows nothing (the policy still isolates the pods it selects)")
    );
    assert!(problems[1].contains("metadata.annotations[egret.dev/mode]: \"Audit\" is not a mode"));
    assert!(problems[1].ends_with("the policy is enforced"));
    assert!(problems[2].contains("spec.egress[1].ports[0].protocol: unknown protocol \"QUIC\""));

    let snapshot = loader.snapshot;
    let compiled = compile(&snapshot, &Scope::Node("node-1".into()), &Ids::default());
    let web = &compiled.tables.endpoints[&ObjectKey::new("shop", "web")];
    let verdict = |to: &str, port| {
        lookup::decide(&compiled.tables, web, to.parse().unwrap(), proto::TCP, port).verdict
    };
    assert_eq!(
        verdict("192.168.1.1", 80),
        Verdict::Allow,
        "rule 0 is valid"
    );
    assert_eq!(verdict("172.16.1.1", 80), Verdict::Allow, "rule 3 is valid");
    assert_eq!(
        verdict("8.8.8.8", 443),
        Verdict::Deny,
        "enforced, not audited; rule 1 allows nothing"
    );
    assert_eq!(
        verdict("8.8.8.8", 80),
        Verdict::Deny,
        "rule 2 allows nothing"
    );
}

#[test]
fn unreadable_directory_is_an_error_not_an_empty_cluster() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("missing");
    let error = egret::source::manifest::load_dir(&missing).expect_err("no directory");
    assert!(
        error.to_string().contains("cannot read manifest directory"),
        "{error}"
    );
}
