//! A small Kubernetes API server for list/watch: resourceVersions, ADDED / MODIFIED /
//! DELETED, BOOKMARK, `410 Gone` for compacted versions, and dropped connections.
//! `ClusterNetworkPolicy` is a CRD: its path answers `404` until [`ApiServer::install_crd`].
//! Enough for kube-rs's watcher, nothing more.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Resource paths served, with the list kind each returns.
const RESOURCES: [(&str, &str, &str); 6] = [
    ("/api/v1/namespaces", "NamespaceList", "v1"),
    ("/api/v1/pods", "PodList", "v1"),
    ("/api/v1/services", "ServiceList", "v1"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicyList",
        "networking.k8s.io/v1",
    ),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    (
        CLUSTER_POLICIES,
        "ClusterNetworkPolicyList",
        "policy.networking.k8s.io/v1alpha2",
    ),
];

/// The one CRD's path: served only while the CRD is installed.
const CLUSTER_POLICIES: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";

#[derive(Clone)]
struct Event {
    path: &'static str,
    kind: &'static str,
    object: Value,
    resource_version: u64,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// path -> (namespace/name -> object)
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    history: Vec<Event>,
    /// Watches from versions below this get `410 Gone`.
    compacted_below: u64,
}

#[derive(Clone)]
pub struct ApiServer {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Option<Event>>,
    pub addr: SocketAddr,
    /// Watch requests served (to see re-watches and re-lists happen).
    pub requests: Arc<Mutex<Vec<String>>>,
    /// Until then, every request is answered with an error.
    failing_until: Arc<Mutex<Option<Instant>>>,
    /// The `ClusterNetworkPolicy` CRD is installed (else its path answers `404`).
    crd_installed: Arc<AtomicBool>,
}

fn path_of(kind: &str) -> &'static str {
    match kind {
        "Namespace" => RESOURCES[0].0,
        "Pod" => RESOURCES[1].0,
        "Service" => RESOURCES[2].0,
        "NetworkPolicy" => RESOURCES[3].0,
        "EndpointSlice" => RESOURCES[4].0,
        "ClusterNetworkPolicy" => CLUSTER_POLICIES,
        other => panic!("unsupported kind {other}"),
    }
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or(""),
        meta["name"].as_str().unwrap_or("")
    )
}

impl ApiServer {
    /// Serves on 127.0.0.1 of the current network namespace (call it from a thread
    /// that entered the test's namespace).
    pub async fn start() -> Self {
        let (events, _) = broadcast::channel(1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            store: Arc::default(),
            events,
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            failing_until: Arc::default(),
            crd_installed: Arc::default(),
        };
        let app = Router::new()
            .fallback(get(handle))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: 'http://{}'}}}}]\nusers: [{{name: test, user: {{}}}}]\ncontexts: [{{name: test, context: {{cluster: test, user: test}}}}]\ncurrent-context: test\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn record(&self, kind: &'static str, event_kind: &'static str, mut object: Value) {
        let path = path_of(kind);
        let mut store = self.store.lock().unwrap();
        store.resource_version += 1;
        let resource_version = store.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let key = key_of(&object);
        let objects = store.objects.entry(path).or_default();
        if event_kind == "DELETED" {
            objects.remove(&key);
        } else {
            objects.insert(key, object.clone());
        }
        let event = Event {
            path,
            kind: event_kind,
            object,
            resource_version,
        };
        store.history.push(event.clone());
        drop(store);
        let _ = self.events.send(Some(event));
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, object: Value) {
        let kind: &'static str = match object["kind"].as_str().unwrap() {
            "Namespace" => "Namespace",
            "Pod" => "Pod",
            "Service" => "Service",
            "NetworkPolicy" => "NetworkPolicy",
            "EndpointSlice" => "EndpointSlice",
            "ClusterNetworkPolicy" => {
                assert!(
                    self.crd_installed.load(Ordering::SeqCst),
                    "install the ClusterNetworkPolicy CRD first"
                );
                "ClusterNetworkPolicy"
            }
            other => panic!("unsupported kind {other}"),
        };
        let exists = self
            .store
            .lock()
            .unwrap()
            .objects
            .get(path_of(kind))
            .is_some_and(|o| o.contains_key(&key_of(&object)));
        self.record(kind, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    pub fn delete(&self, kind: &'static str, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let object = self
            .store
            .lock()
            .unwrap()
            .objects
            .get(path_of(kind))
            .and_then(|o| o.get(&key))
            .cloned();
        if let Some(object) = object {
            self.record(kind, "DELETED", object);
        }
    }

    /// Sends a BOOKMARK at the current version on every open watch.
    pub fn bookmark(&self) {
        let resource_version = self.store.lock().unwrap().resource_version;
        for (path, kind, api_version) in RESOURCES {
            let object = json!({"kind": kind.trim_end_matches("List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": resource_version.to_string()}});
            let _ = self.events.send(Some(Event {
                path,
                kind: "BOOKMARK",
                object,
                resource_version,
            }));
        }
    }

    /// Closes every open watch connection.
    pub fn drop_connections(&self) {
        let _ = self.events.send(None);
    }

    /// Answers every request with `500 Internal Server Error` for `duration`, after
    /// closing the open watches, as an API server (or the way to it) going down does.
    pub fn fail_for(&self, duration: Duration) {
        *self.failing_until.lock().unwrap() = Some(Instant::now() + duration);
        self.drop_connections();
    }

    fn is_failing(&self) -> bool {
        self.failing_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Installs the `ClusterNetworkPolicy` CRD: its path is served from now on.
    pub fn install_crd(&self) {
        self.crd_installed.store(true, Ordering::SeqCst);
    }

    /// Removes the `ClusterNetworkPolicy` CRD, as Kubernetes does: its objects are
    /// deleted (watchers see DELETED), then its watches end and its path answers `404`.
    pub fn uninstall_crd(&self) {
        let names: Vec<String> = self
            .store
            .lock()
            .unwrap()
            .objects
            .get(CLUSTER_POLICIES)
            .map(|objects| {
                objects
                    .values()
                    .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            self.delete("ClusterNetworkPolicy", "", &name);
        }
        self.crd_installed.store(false, Ordering::SeqCst);
        self.drop_connections();
    }

    /// Forgets history: watches resuming from an older version get `410 Gone`.
    pub fn compact(&self) {
        let mut store = self.store.lock().unwrap();
        store.compacted_below = store.resource_version + 1;
        store.history.clear();
    }
}

async fn handle(
    State(server): State<ApiServer>,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let Some((path, list_kind, api_version)) =
        RESOURCES.iter().find(|(p, _, _)| *p == uri.path()).copied()
    else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    server.requests.lock().unwrap().push(uri.to_string());
    if server.is_failing() {
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the test server is failing", "reason": "InternalError", "code": 500});
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            status.to_string(),
        )
            .into_response();
    }
    if path == CLUSTER_POLICIES && !server.crd_installed.load(Ordering::SeqCst) {
        // What the API server answers for a resource no CRD defines.
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    }
    if query.get("watch").map(String::as_str) != Some("true") {
        let store = server.store.lock().unwrap();
        let items: Vec<Value> = store
            .objects
            .get(path)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default();
        let body = json!({"kind": list_kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": store.resource_version.to_string()}, "items": items});
        return ([("content-type", "application/json")], body.to_string()).into_response();
    }
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let receiver = server.events.subscribe();
    let (backlog, gone) = {
        let store = server.store.lock().unwrap();
        let gone = since < store.compacted_below.saturating_sub(1);
        let backlog: Vec<Event> = store
            .history
            .iter()
            .filter(|e| e.path == path && e.resource_version > since)
            .cloned()
            .collect();
        (backlog, gone)
    };
    let stream = watch_body(backlog, gone, path, receiver);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn line(event: &Event) -> Bytes {
    Bytes::from(format!(
        "{}\n",
        json!({"type": event.kind, "object": event.object})
    ))
}

/// The watch body: a `410` error, or the backlog then live events, until dropped.
fn watch_body(
    backlog: Vec<Event>,
    gone: bool,
    path: &'static str,
    mut receiver: broadcast::Receiver<Option<Event>>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        if gone {
            let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}});
            let _ = tx.send(Bytes::from(format!("{status}\n"))).await;
            return;
        }
        let mut sent = 0;
        for event in &backlog {
            if tx.send(line(event)).await.is_err() {
                return;
            }
            sent = event.resource_version;
        }
        loop {
            match receiver.recv().await {
                Ok(Some(event)) if event.path == path => {
                    // Events recorded while the backlog was read arrive twice: skip them.
                    if event.kind != "BOOKMARK" && event.resource_version <= sent {
                        continue;
                    }
                    if tx.send(line(&event)).await.is_err() {
                        return;
                    }
                    sent = sent.max(event.resource_version);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok(bytes), rx))
    })
}
