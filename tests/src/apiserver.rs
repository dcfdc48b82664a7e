//! A Kubernetes API server, as far as list and watch go, serving a [`GeneratedCluster`]:
//! for benchmarks that run a real agent (`egret run --kubeconfig`) through its
//! production source at 100k pods.
//!
//! Lists are paged as the API server pages them (`limit`, `continue`,
//! `remainingItemCount`, one `resourceVersion` for the whole list), so the client's
//! memory is what it would be against a real cluster. Objects carry what a cluster adds
//! to what was applied (uid, resourceVersion, creationTimestamp, managedFields,
//! ownerReferences, a kubelet's status), which the agent must not keep. Watches are
//! held open; a benchmark changes the cluster with [`ClusterApiServer::change`] (a
//! policy revised, a pod joining or leaving), which every open watch of the kind
//! receives at once as an event, each change at the next resourceVersion ([`watch`]).
//! The `ClusterNetworkPolicy` CRD is not installed (its path answers `404`), and there
//! are no Services or EndpointSlices.
//!
//! Plain HTTP on loopback inside the namespace given (no TLS, no authentication), one
//! thread per connection, every connection answered then closed.

mod watch;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    ops::Bound,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};
pub use watch::ClusterChange;

use crate::{cluster::GeneratedCluster, netns};

/// The resourceVersion of every object of the cluster as generated; each change takes
/// the next one.
const INITIAL_RESOURCE_VERSION: u64 = 1000;

/// The server stops by itself after this, whatever its owner does.
const MAX_LIFETIME: Duration = Duration::from_mins(30);
/// How often the accept loop and held watches look at the stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A watch is closed after this if the client asked for no shorter time (the API
/// server's own default is a few minutes).
const MAX_WATCH: Duration = Duration::from_mins(10);
/// More concurrent connections than this are refused (`503`).
const MAX_CONNECTIONS: usize = 64;
/// A request head larger than this is refused.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One list path and its objects as JSON, by `namespace/name` (the order in which the
/// API server lists them, and what its `continue` tokens point at).
struct Resource {
    path: &'static str,
    list_kind: &'static str,
    api_version: &'static str,
    items: BTreeMap<String, String>,
}

/// What the server serves now: the resources, and what changed since they were
/// generated.
struct Store {
    cluster: GeneratedCluster,
    /// The resourceVersion of the last change ([`INITIAL_RESOURCE_VERSION`] before any).
    resource_version: u64,
    resources: Vec<Resource>,
    watches: watch::Watches,
}

impl Store {
    /// `cluster` as generated, with no change made.
    fn new(cluster: &GeneratedCluster) -> anyhow::Result<Self> {
        Ok(Self {
            cluster: cluster.clone(),
            resource_version: INITIAL_RESOURCE_VERSION,
            resources: render(cluster)?,
            watches: watch::Watches::default(),
        })
    }

    fn resource(&self, path: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.path == path)
    }

    fn resource_mut(&mut self, path: &str) -> Option<&mut Resource> {
        self.resources.iter_mut().find(|r| r.path == path)
    }
}

/// The store, shared by the connections and the owner that changes it.
type SharedStore = Arc<Mutex<Store>>;

/// A connection that panicked left nothing half-changed that matters to a benchmark.
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the server answered, for callers that check the client behaved as a real one
/// does (paged lists, watches held).
#[derive(Debug, Default)]
pub struct Served {
    pub list_pages: AtomicUsize,
    pub watches: AtomicUsize,
    pub not_found: AtomicUsize,
    /// Watch events written to clients (a change reaches every open watch of its kind).
    pub events: AtomicUsize,
}

/// A running server. Dropping it stops it, held watches included.
pub struct ClusterApiServer {
    addr: SocketAddr,
    /// Bytes of every object, as JSON: what a full list of each kind carries.
    object_bytes: usize,
    store: SharedStore,
    stop: Arc<AtomicBool>,
    served: Arc<Served>,
    thread: Option<JoinHandle<()>>,
}

impl ClusterApiServer {
    /// Renders `cluster` and serves it on 127.0.0.1 (a free port) of network namespace
    /// `netns`.
    ///
    /// # Errors
    /// When the cluster's manifests do not render as JSON, or the server cannot bind.
    pub fn start(netns: &str, cluster: &GeneratedCluster) -> anyhow::Result<Self> {
        let store = Store::new(cluster)?;
        let object_bytes = store
            .resources
            .iter()
            .flat_map(|resource| resource.items.values())
            .map(String::len)
            .sum();
        let store = Arc::new(Mutex::new(store));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Served::default());
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread = {
            let netns = netns.to_owned();
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            let served = Arc::clone(&counters);
            thread::Builder::new()
                .name("test API server".to_owned())
                .spawn(move || {
                    let listener = netns::enter(&netns).and_then(|()| {
                        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                        listener.set_nonblocking(true)?;
                        Ok(listener)
                    });
                    match listener {
                        Ok(listener) => {
                            let _ = bound_tx.send(listener.local_addr().map_err(Into::into));
                            serve(&listener, &store, &stop, &served);
                        }
                        Err(error) => {
                            let _ = bound_tx.send(Err(error));
                        }
                    }
                })
                .context("cannot spawn the API server thread")?
        };
        let mut server = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            object_bytes,
            store,
            stop,
            served: counters,
            thread: Some(thread),
        };
        server.addr = bound_rx
            .recv_timeout(STARTUP_TIMEOUT)
            .map_err(|_| anyhow!("the API server thread did not start"))?
            .with_context(|| format!("cannot serve the API in netns {netns}"))?;
        Ok(server)
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes of every object served, as JSON.
    #[must_use]
    pub fn object_bytes(&self) -> usize {
        self.object_bytes
    }

    #[must_use]
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// Makes `change` to the served cluster: the lists serve it from now on, and every
    /// open watch of its kind receives its event before this returns (a watch that
    /// opens later from an older resourceVersion receives it first). Returns the
    /// change's resourceVersion.
    ///
    /// # Errors
    /// When the change does not fit the cluster: a policy or a pod leaving that is not
    /// served, a pod joining that is.
    pub fn change(&self, change: &ClusterChange) -> anyhow::Result<u64> {
        watch::change(&mut lock(&self.store), change)
    }

    /// Watches open now, all kinds together.
    #[must_use]
    pub fn open_watches(&self) -> usize {
        lock(&self.store).watches.open()
    }

    /// Writes a kubeconfig pointing at this server into `dir` and returns its path.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: bench, cluster: {{server: 'http://{}'}}}}]\nusers: [{{name: bench, user: {{}}}}]\ncontexts: [{{name: bench, context: {{cluster: bench, user: bench}}}}]\ncurrent-context: bench\n",
            self.addr
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ClusterApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every kind the agent lists, as the API server would return its objects.
fn render(cluster: &GeneratedCluster) -> anyhow::Result<Vec<Resource>> {
    let json = |yaml: &str| -> anyhow::Result<Value> {
        serde_yaml_ng::from_str(yaml).context("a generated manifest is not valid YAML")
    };
    let version = INITIAL_RESOURCE_VERSION;
    let mut namespaces = BTreeMap::new();
    for n in 0..cluster.namespaces() {
        let object = as_served(json(&GeneratedCluster::namespace_yaml(n))?, n, version);
        namespaces.insert(key_of(&object), object.to_string());
    }
    let mut pods = BTreeMap::new();
    for i in 0..cluster.pods {
        let mut object = json(&cluster.pod_yaml(i))?;
        as_scheduled(&mut object, i / crate::cluster::PODS_PER_DEPLOYMENT, i);
        let object = as_served(object, i, version);
        pods.insert(key_of(&object), object.to_string());
    }
    let mut policies = BTreeMap::new();
    for p in 0..cluster.policies {
        let object = as_served(json(&cluster.policy_yaml(p, 0))?, p, version);
        policies.insert(key_of(&object), object.to_string());
    }
    let resource = |path, list_kind, api_version, items| Resource {
        path,
        list_kind,
        api_version,
        items,
    };
    Ok(vec![
        resource("/api/v1/namespaces", "NamespaceList", "v1", namespaces),
        resource("/api/v1/pods", "PodList", "v1", pods),
        resource("/api/v1/services", "ServiceList", "v1", BTreeMap::new()),
        resource(
            "/apis/networking.k8s.io/v1/networkpolicies",
            "NetworkPolicyList",
            "networking.k8s.io/v1",
            policies,
        ),
        resource(
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSliceList",
            "discovery.k8s.io/v1",
            BTreeMap::new(),
        ),
    ])
}

/// A served object's key: `namespace/name` (`name` alone for a cluster-scoped one).
fn key_of(object: &Value) -> String {
    let metadata = &object["metadata"];
    let name = metadata["name"].as_str().unwrap_or_default();
    match metadata["namespace"].as_str() {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

/// What the API server adds to every object it stores: uid (from `index`),
/// resourceVersion, creationTimestamp, and the field manager's record of who set what.
fn as_served(mut object: Value, index: usize, resource_version: u64) -> Value {
    let metadata = &mut object["metadata"];
    metadata["uid"] = json!(format!("6f1c2d3e-0000-4000-8000-{index:012x}"));
    metadata["resourceVersion"] = json!(resource_version.to_string());
    metadata["creationTimestamp"] = json!("2025-11-20T09:00:00Z");
    metadata["managedFields"] = json!([
        {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
         "time": "2025-11-20T09:00:00Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:metadata": {"f:annotations": {".": {},
            "f:kubectl.kubernetes.io/last-applied-configuration": {}}, "f:labels": {".": {}}},
            "f:spec": {}}},
        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
         "time": "2025-11-20T09:00:01Z", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:status": {"f:conditions": {}}}}
    ]);
    object
}

/// What a `ReplicaSet` (of `deployment`) and a kubelet add to a pod: owner, generated
/// name, defaults, and a running status (its container id from `index`).
fn as_scheduled(pod: &mut Value, deployment: usize, index: usize) {
    let metadata = &mut pod["metadata"];
    metadata["generateName"] = json!(format!("dep-{deployment}-7d9f8c6b5-"));
    metadata["labels"]["pod-template-hash"] = json!("7d9f8c6b5");
    metadata["annotations"] = json!({"kubectl.kubernetes.io/restartedAt": "2025-11-20T09:00:00Z"});
    metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": format!("dep-{deployment}-7d9f8c6b5"), "uid": format!("0b1c2d3e-0000-4000-8000-{deployment:012x}"),
        "controller": true, "blockOwnerDeletion": true}]);
    let spec = &mut pod["spec"];
    spec["restartPolicy"] = json!("Always");
    spec["dnsPolicy"] = json!("ClusterFirst");
    spec["serviceAccountName"] = json!("default");
    spec["terminationGracePeriodSeconds"] = json!(30);
    spec["tolerations"] = json!([
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
    ]);
    spec["volumes"] = json!([{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}]);
    if let Some(container) = spec["containers"].get_mut(0) {
        container["imagePullPolicy"] = json!("IfNotPresent");
        container["resources"] =
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}});
        container["env"] = json!([{"name": "LOG_LEVEL", "value": "info"}]);
        container["volumeMounts"] = json!([{"name": "kube-api-access", "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]);
    }
    let status = &mut pod["status"];
    status["hostIP"] = json!("192.168.0.10");
    status["startTime"] = json!("2025-11-20T09:00:02Z");
    status["qosClass"] = json!("Burstable");
    status["conditions"] = json!(["Initialized", "Ready", "ContainersReady", "PodScheduled"]
        .map(|kind| json!({"type": kind, "status": "True", "lastTransitionTime": "2025-11-20T09:00:03Z"})));
    status["containerStatuses"] = json!([{"name": "main", "ready": true, "started": true,
        "restartCount": 0, "image": "app:1.0", "imageID": "docker.io/library/app@sha256:0123456789abcdef",
        "containerID": format!("containerd://{index:064x}"),
        "state": {"running": {"startedAt": "2025-11-20T09:00:03Z"}}}]);
}

/// Accepts until `stop` is set or the lifetime runs out; then waits for connections.
fn serve(
    listener: &TcpListener,
    store: &SharedStore,
    stop: &Arc<AtomicBool>,
    served: &Arc<Served>,
) {
    let end = Instant::now() + MAX_LIFETIME;
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match listener.accept() {
            Ok((stream, _)) => {
                connections.retain(|connection| !connection.is_finished());
                if connections.len() >= MAX_CONNECTIONS {
                    let _ = respond(stream, "503 Service Unavailable", "too many connections");
                    continue;
                }
                let (store, stop, served) =
                    (Arc::clone(store), Arc::clone(stop), Arc::clone(served));
                let spawned = thread::Builder::new()
                    .name("API connection".to_owned())
                    .spawn(move || {
                        let _ = answer(stream, &store, &stop, &served);
                    });
                if let Ok(connection) = spawned {
                    connections.push(connection);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(_) => thread::sleep(TICK),
        }
    }
    // Held watches see the stop flag within a tick.
    stop.store(true, Ordering::Relaxed);
    for connection in connections {
        let _ = connection.join();
    }
}

/// A request's path and query parameters.
struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn read_request(stream: &TcpStream) -> io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut head = 0;
    let mut request_line = String::new();
    head += reader.read_line(&mut request_line)?;
    // The headers say nothing this server needs; read past them.
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line)?;
        head += read;
        if read == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if head > MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    Ok(Request {
        path: path.to_owned(),
        query,
    })
}

fn answer(
    stream: TcpStream,
    store: &Mutex<Store>,
    stop: &AtomicBool,
    served: &Served,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let request = read_request(&stream)?;
    let Some(path) = lock(store).resource(&request.path).map(|r| r.path) else {
        served.not_found.fetch_add(1, Ordering::Relaxed);
        // What the API server answers for a resource no CRD defines (the
        // ClusterNetworkPolicy CRD is not installed here), and for anything else it does
        // not serve.
        return respond(stream, "404 Not Found", "404 page not found");
    };
    if matches!(
        request.query.get("watch").map(String::as_str),
        Some("true" | "1")
    ) {
        served.watches.fetch_add(1, Ordering::Relaxed);
        return watch::stream(stream, &request, path, store, stop, served);
    }
    served.list_pages.fetch_add(1, Ordering::Relaxed);
    match list_page(&lock(store), path, &request) {
        Ok(body) => respond_json(stream, &body),
        Err(status) => respond_status(stream, &status),
    }
}

/// A `continue` token: the list's resourceVersion, how many items came before, and the
/// last key served (hex, so the token needs no escaping in a query).
fn continue_token(resource_version: u64, served: usize, last_key: &str) -> String {
    let mut token = format!("{resource_version}.{served}.");
    for byte in last_key.bytes() {
        let _ = write!(token, "{byte:02x}");
    }
    token
}

fn parse_continue_token(token: &str) -> Option<(u64, usize, String)> {
    let mut parts = token.splitn(3, '.');
    let resource_version = parts.next()?.parse().ok()?;
    let served = parts.next()?.parse().ok()?;
    let hex = parts.next()?;
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(hex.get(at..at + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((resource_version, served, String::from_utf8(bytes).ok()?))
}

/// One page of the list at `path`, or the `Status` the API server answers instead: a
/// page asked for by a `continue` token of a list whose objects changed since is
/// `410 Expired`, as when the API server no longer holds that version (it serves
/// consistent lists; this server keeps one version).
fn list_page(store: &Store, path: &str, request: &Request) -> Result<String, Value> {
    let resource = store
        .resource(path)
        .ok_or_else(|| status(404, "NotFound", "the resource is not served"))?;
    let (before, after) = match request.query.get("continue") {
        None => (0, Bound::Unbounded),
        Some(token) => {
            let (version, before, last_key) = parse_continue_token(token)
                .ok_or_else(|| status(400, "BadRequest", "invalid continue token"))?;
            if version != store.resource_version {
                return Err(status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (before, Bound::Excluded(last_key))
        }
    };
    let limit = request
        .query
        .get("limit")
        .and_then(|limit| limit.parse::<usize>().ok())
        .filter(|limit| *limit > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<(&String, &String)> = resource
        .items
        .range::<String, _>((after, Bound::Unbounded))
        .take(limit)
        .collect();
    let remaining = resource.items.len().saturating_sub(before + page.len());
    let mut body = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{}\"",
        resource.list_kind, resource.api_version, store.resource_version
    );
    if remaining > 0
        && let Some((last_key, _)) = page.last()
    {
        let token = continue_token(store.resource_version, before + page.len(), last_key);
        let _ = write!(
            body,
            ",\"continue\":\"{token}\",\"remainingItemCount\":{remaining}"
        );
    }
    body.push_str("},\"items\":[");
    for (n, (_, item)) in page.iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    Ok(body)
}

/// A `Status` object as the API server answers errors with.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn respond_status(mut stream: TcpStream, status: &Value) -> io::Result<()> {
    let body = status.to_string();
    let code = status["code"].as_u64().unwrap_or(500);
    let reason = status["reason"].as_str().unwrap_or("Error");
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn respond_json(mut stream: TcpStream, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

fn respond(mut stream: TcpStream, status: &str, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_pods_read_as_the_generated_ones_with_what_a_cluster_adds() {
        let cluster = GeneratedCluster::new(30, 4);
        let resources = render(&cluster).unwrap();
        let pods = &resources.iter().find(|r| r.path == "/api/v1/pods").unwrap();
        assert_eq!(pods.items.len(), 30);
        let pod: Value = serde_json::from_str(&pods.items["ns-0/dep-1-2"]).unwrap();
        assert_eq!(pod["metadata"]["name"], "dep-1-2");
        assert_eq!(pod["metadata"]["namespace"], "ns-0");
        assert_eq!(pod["metadata"]["labels"]["app"], "dep-1");
        assert_eq!(pod["status"]["podIP"], "10.0.0.13");
        assert_eq!(pod["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(
            pod["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
        assert!(pod["metadata"]["managedFields"].is_array());
        assert!(
            pods.items["ns-0/dep-1-2"].len() > 2_000,
            "a pod as served is several times what was applied: {} bytes",
            pods.items["ns-0/dep-1-2"].len()
        );
        let policies = resources
            .iter()
            .find(|r| r.list_kind == "NetworkPolicyList")
            .unwrap();
        assert_eq!(policies.items.len(), 4);
        let policy: Value = serde_json::from_str(&policies.items["ns-0/p2"]).unwrap();
        assert_eq!(
            policy["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"],
            "172.18.0.0/16"
        );
    }
}
