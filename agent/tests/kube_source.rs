//! The Kubernetes source behind the real kube-rs client, against a list/watch test
//! server: the snapshot (and so the compiled tables) converges through ADDED, MODIFIED,
//! DELETED, BOOKMARK, `410 Gone` and dropped connections, including objects that
//! changed while the agent was disconnected.

mod common;

use std::time::{Duration, Instant};

use common::apiserver::ApiServer;
use egret::{
    compile::{Ids, Scope, compile, lookup},
    source::{self, Signal, Update},
    state::{ObjectKey, Snapshot},
};
use egret_common::{Verdict, proto};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": name}}})
}

fn pod(name: &str, app: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn policy(name: &str, app: &str, to_app: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": to_app}}}]}]}})
}

/// Applies updates until `done` holds for the snapshot (or 20 s pass).
async fn converge(
    updates: &mut mpsc::Receiver<Update>,
    snapshot: &mut Snapshot,
    synced: &mut usize,
    what: &str,
    done: impl Fn(&Snapshot) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(*synced >= 5 && done(snapshot)) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(remaining, updates.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "did not converge: {what}; snapshot pods {:?}",
                    snapshot.pods.keys().collect::<Vec<_>>()
                )
            })
            .expect("source running");
        if let Signal::Synced { .. } = update.apply(snapshot) {
            *synced += 1;
        }
    }
}

fn verdict(snapshot: &Snapshot, from: &str, to: &str) -> Verdict {
    let compiled = compile(snapshot, &Scope::Node("node-1".into()), &Ids::default());
    let endpoint = &compiled.tables.endpoints[&ObjectKey::parse(from).unwrap()];
    lookup::decide(
        &compiled.tables,
        endpoint,
        to.parse().unwrap(),
        proto::TCP,
        80,
    )
    .verdict
}

#[test]
fn kube_source_converges_through_every_kind_of_watch_event() {
    if !egret_testbed::require_root("kube_source_converges_through_every_kind_of_watch_event") {
        return;
    }
    // The test server and client talk over loopback inside a namespace of our own.
    let topology = egret_testbed::Topology::new().unwrap();
    egret_testbed::run_in_netns(topology.node_netns(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario());
    });
}

async fn scenario() {
    let server = ApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(pod("web", "web", "10.0.0.1"));
    server.apply(pod("db", "db", "10.0.0.2"));
    server.apply(pod("cache", "cache", "10.0.0.3"));
    server.apply(policy("web-egress", "web", "db"));

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig(dir.path())).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let (tx, mut updates) = mpsc::channel(1024);
    tokio::spawn(source::kube::run(client, tx));
    let (mut snapshot, mut synced) = (Snapshot::default(), 0);

    converge(
        &mut updates,
        &mut snapshot,
        &mut synced,
        "initial list",
        |s| s.pods.len() == 3 && s.policies.len() == 1,
    )
    .await;
    assert_eq!(verdict(&snapshot, "shop/web", "10.0.0.2"), Verdict::Allow);
    assert_eq!(verdict(&snapshot, "shop/web", "10.0.0.3"), Verdict::Deny);

    // MODIFIED: cache becomes a db.
    server.apply(pod("cache", "db", "10.0.0.3"));
    converge(
        &mut updates,
        &mut snapshot,
        &mut synced,
        "modified pod",
        |s| s.pods[&ObjectKey::new("shop", "cache")].labels["app"] == "db",
    )
    .await;
    assert_eq!(verdict(&snapshot, "shop/web", "10.0.0.3"), Verdict::Allow);

    // BOOKMARK: nothing changes, the watch goes on.
    server.bookmark();
    server.apply(pod("api", "api", "10.0.0.4"));
    converge(
        &mut updates,
        &mut snapshot,
        &mut synced,
        "pod after a bookmark",
        |s| s.pods.len() == 4,
    )
    .await;

    // Dropped connections, and changes while disconnected: the watcher resumes from its
    // last version and gets what it missed.
    server.drop_connections();
    server.delete("Pod", "shop", "api");
    server.apply(policy("web-egress", "web", "api"));
    converge(
        &mut updates,
        &mut snapshot,
        &mut synced,
        "changes missed while disconnected",
        |s| s.pods.len() == 3 && verdict(s, "shop/web", "10.0.0.2") == Verdict::Deny,
    )
    .await;

    // 410 Gone: history compacted while disconnected; the watcher re-lists.
    let watches_before = server.requests.lock().unwrap().len();
    server.compact();
    server.drop_connections();
    server.delete("NetworkPolicy", "shop", "web-egress");
    server.apply(pod("late", "late", "10.0.0.5"));
    server.compact();
    converge(
        &mut updates,
        &mut snapshot,
        &mut synced,
        "re-list after 410",
        |s| s.policies.is_empty() && s.pods.contains_key(&ObjectKey::new("shop", "late")),
    )
    .await;
    assert_eq!(
        verdict(&snapshot, "shop/web", "10.0.0.3"),
        Verdict::Allow,
        "no policy: not isolated"
    );
    let requests = server.requests.lock().unwrap();
    assert!(
        requests[watches_before..]
            .iter()
            .any(|r| !r.contains("watch=true") && r.contains("networkpolicies")),
        "a re-list happened: {:?}",
        &requests[watches_before..]
    );
}
