//! The Kubernetes source behind the real kube-rs client, against a list/watch test
//! server: the snapshot (and so the compiled tables) converges through ADDED, MODIFIED,
//! DELETED, BOOKMARK, `410 Gone` and dropped connections, including objects that
//! changed while the agent was disconnected. The `ClusterNetworkPolicy` CRD may be
//! missing: the kind is then synced and empty, and is picked up when the CRD appears.

mod common;

use std::{
    collections::BTreeSet,
    io::Write,
    time::{Duration, Instant},
};

use common::apiserver::ApiServer;
use egret::{
    compile::{Ids, Scope, compile, lookup},
    source::{self, Signal, Update},
    state::{Changes, ObjectKey, Snapshot},
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
    while !(*synced >= source::kube::KINDS.len() && done(snapshot)) {
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
        if let Signal::Synced { .. } = update.apply(snapshot, &mut Changes::default()) {
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

async fn client_of(server: &ApiServer, dir: &std::path::Path) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig(dir)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

async fn scenario() {
    let server = ApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(pod("web", "web", "10.0.0.1"));
    server.apply(pod("db", "db", "10.0.0.2"));
    server.apply(pod("cache", "cache", "10.0.0.3"));
    server.apply(policy("web-egress", "web", "db"));

    let dir = tempfile::tempdir().unwrap();
    let client = client_of(&server, dir.path()).await;
    let (tx, mut updates) = mpsc::channel(1024);
    tokio::spawn(source::kube::run(client, tx, source::kube::CRD_RECHECK));
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

const NOT_INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: enforcing NetworkPolicies only; ClusterNetworkPolicies are picked up when it appears";
const INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is installed: watching ClusterNetworkPolicies";

/// How often the test's source asks for the CRD (the agent asks every 30 s).
const RECHECK: Duration = Duration::from_millis(200);

thread_local! {
    static LOGGED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What was logged (at info) on the current thread. One global subscriber writes each
/// thread's events to that thread's buffer: a scoped subscriber (`set_default`) misses
/// events when another test thread registers the same callsites first.
struct Log;

impl Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOGGED.with(|logged| logged.borrow_mut().extend_from_slice(bytes));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing (once per test binary).
fn capture_log() {
    static SUBSCRIBER: std::sync::Once = std::sync::Once::new();
    SUBSCRIBER.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| Log)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
    });
}

/// How often `line` was logged on this thread.
fn logged(line: &str) -> usize {
    LOGGED.with(|logged| {
        String::from_utf8_lossy(&logged.borrow())
            .matches(line)
            .count()
    })
}

fn cluster_policy(name: &str, priority: u32) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
            "egress": [{"name": "no-db", "action": "Deny",
                "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]}]}})
}

/// The source's updates applied to a snapshot, with what they said about the sources.
struct Watched {
    updates: mpsc::Receiver<Update>,
    snapshot: Snapshot,
    synced: BTreeSet<&'static str>,
    /// Failures and restarts of the ClusterNetworkPolicy watch.
    troubles: Vec<String>,
}

impl Watched {
    fn absorb(&mut self, update: Update) {
        match update.apply(&mut self.snapshot, &mut Changes::default()) {
            Signal::Synced { source } => {
                assert!(self.synced.insert(source), "{source} synced twice");
            }
            Signal::Failed {
                source: "ClusterNetworkPolicy",
                problem,
            } => {
                self.troubles.push(format!("failed: {problem}"));
            }
            Signal::WatchRestarted {
                kind: "ClusterNetworkPolicy",
            } => {
                self.troubles.push("watch restarted".to_owned());
            }
            _ => {}
        }
    }

    /// Applies updates until `done` holds (or 20 s pass).
    async fn converge(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let update = tokio::time::timeout(remaining, self.updates.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "did not converge: {what}; synced {:?}, cluster policies {:?}",
                        self.synced,
                        self.snapshot.cluster_policies.keys().collect::<Vec<_>>()
                    )
                })
                .expect("source running");
            self.absorb(update);
        }
    }

    /// Applies whatever arrives for `duration`.
    async fn settle(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        while let Ok(update) = tokio::time::timeout_at(deadline, self.updates.recv()).await {
            self.absorb(update.expect("source running"));
        }
    }
}

#[test]
fn cluster_network_policies_are_picked_up_when_their_crd_appears() {
    if !egret_testbed::require_root("cluster_network_policies_are_picked_up_when_their_crd_appears")
    {
        return;
    }
    let topology = egret_testbed::Topology::new().unwrap();
    egret_testbed::run_in_netns(topology.node_netns(), || {
        capture_log();
        // The runtime has one thread, this one: every task logs here.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(crd_scenario());
    });
}

async fn crd_scenario() {
    let server = ApiServer::start().await;
    server.apply(namespace("shop"));
    server.apply(pod("web", "web", "10.0.0.1"));
    server.apply(pod("db", "db", "10.0.0.2"));
    server.apply(pod("cache", "cache", "10.0.0.3"));
    server.apply(policy("web-egress", "web", "db"));
    let dir = tempfile::tempdir().unwrap();
    let (tx, updates) = mpsc::channel(1024);
    tokio::spawn(source::kube::run(
        client_of(&server, dir.path()).await,
        tx,
        RECHECK,
    ));
    let mut watched = Watched {
        updates,
        snapshot: Snapshot::default(),
        synced: BTreeSet::new(),
        troubles: Vec::new(),
    };

    // No CRD: every kind syncs (so readiness is not held back), NetworkPolicies count.
    watched
        .converge("every kind synced without the CRD", |w| {
            w.synced.len() == source::kube::KINDS.len()
                && w.snapshot.pods.len() == 3
                && w.snapshot.policies.len() == 1
        })
        .await;
    assert_eq!(
        verdict(&watched.snapshot, "shop/web", "10.0.0.2"),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&watched.snapshot, "shop/web", "10.0.0.3"),
        Verdict::Deny
    );
    let asked = || {
        server
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains("clusternetworkpolicies"))
            .count()
    };
    let asked_before = asked();
    watched.settle(RECHECK * 6).await;
    assert!(
        asked() >= asked_before + 3,
        "the CRD is asked for every {RECHECK:?}: {:?}",
        server.requests.lock().unwrap()
    );
    assert_eq!(logged(NOT_INSTALLED), 1, "said once, not at every check");
    assert!(watched.snapshot.cluster_policies.is_empty());

    // The CRD appears with a policy: picked up, then followed.
    server.install_crd();
    server.apply(cluster_policy("no-db", 10));
    watched
        .converge("the policy after the CRD appeared", |w| {
            w.snapshot.cluster_policies.contains_key("no-db")
        })
        .await;
    assert_eq!(watched.snapshot.cluster_policies["no-db"].priority, 10);
    assert_eq!(logged(INSTALLED), 1);
    server.apply(cluster_policy("no-db", 20));
    watched
        .converge("a modified policy", |w| {
            w.snapshot.cluster_policies["no-db"].priority == 20
        })
        .await;
    server.apply(cluster_policy("other", 30));
    server.delete("ClusterNetworkPolicy", "", "no-db");
    watched
        .converge("a deleted policy", |w| {
            w.snapshot.cluster_policies.keys().collect::<Vec<_>>() == ["other"]
        })
        .await;

    crd_removed_and_installed_again(&server, &mut watched).await;
}

/// The CRD goes, and its policies with it: waiting again, said again, no failure; then
/// it comes back.
async fn crd_removed_and_installed_again(server: &ApiServer, watched: &mut Watched) {
    server.uninstall_crd();
    watched
        .converge("the CRD removed", |w| {
            w.snapshot.cluster_policies.is_empty() && logged(NOT_INSTALLED) == 2
        })
        .await;
    watched.settle(RECHECK * 3).await;
    assert_eq!(logged(NOT_INSTALLED), 2);
    server.install_crd();
    server.apply(cluster_policy("back", 1));
    watched
        .converge("the CRD installed again", |w| {
            w.snapshot.cluster_policies.contains_key("back")
        })
        .await;
    assert_eq!(
        watched.snapshot.policies.len(),
        1,
        "NetworkPolicies stayed throughout"
    );
    assert!(
        watched.troubles.is_empty(),
        "a missing CRD is no failure: {:?}",
        watched.troubles
    );
}
