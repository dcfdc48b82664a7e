//! A Kubernetes API server, as far as list and watch go, serving a [`GeneratedCluster`]:
//! for benchmarks that run a real agent (`egret run --kubeconfig`) through its
//! production source at 100k pods.
//!
//! Lists are paged as the API server pages them (`limit`, `continue`,
//! `remainingItemCount`, one `resourceVersion` for the whole list), so the client's
//! memory is what it would be against a real cluster. Objects carry what a cluster adds
//! to what was applied (uid, resourceVersion, creationTimestamp, managedFields,
//! ownerReferences, a kubelet's status), which the agent must not keep. Watches are
//! held open and deliver nothing: the cluster does not change. The
//! `ClusterNetworkPolicy` CRD is not installed (its path answers `404`), and there are
//! no Services or EndpointSlices.
//!
//! Plain HTTP on loopback inside the namespace given (no TLS, no authentication), one
//! thread per connection, every connection answered then closed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde_json::{Value, json};

use crate::{cluster::GeneratedCluster, netns};

/// The resourceVersion of everything: the cluster never changes.
const RESOURCE_VERSION: &str = "1000";

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

/// One list path and its objects, rendered once as JSON.
struct Resource {
    path: &'static str,
    list_kind: &'static str,
    api_version: &'static str,
    items: Vec<String>,
}

/// What the server answered, for callers that check the client behaved as a real one
/// does (paged lists, watches held).
#[derive(Debug, Default)]
pub struct Served {
    pub list_pages: AtomicUsize,
    pub watches: AtomicUsize,
    pub not_found: AtomicUsize,
}

/// A running server. Dropping it stops it, held watches included.
pub struct ClusterApiServer {
    addr: SocketAddr,
    /// Bytes of every object, as JSON: what a full list of each kind carries.
    object_bytes: usize,
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
        let resources = Arc::new(render(cluster)?);
        let object_bytes = resources
            .iter()
            .flat_map(|resource| &resource.items)
            .map(String::len)
            .sum();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Served::default());
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread = {
            let netns = netns.to_owned();
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
                            serve(&listener, &resources, &stop, &served);
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
    let mut namespaces = Vec::with_capacity(cluster.namespaces());
    for n in 0..cluster.namespaces() {
        let object = json(&GeneratedCluster::namespace_yaml(n))?;
        namespaces.push(as_served(object, n).to_string());
    }
    let mut pods = Vec::with_capacity(cluster.pods);
    for i in 0..cluster.pods {
        let mut object = json(&cluster.pod_yaml(i))?;
        as_scheduled(&mut object, i);
        pods.push(as_served(object, i).to_string());
    }
    let mut policies = Vec::with_capacity(cluster.policies);
    for p in 0..cluster.policies {
        let object = json(&cluster.policy_yaml(p, 0))?;
        policies.push(as_served(object, p).to_string());
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
        resource("/api/v1/services", "ServiceList", "v1", Vec::new()),
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
            Vec::new(),
        ),
    ])
}

/// What the API server adds to every object it stores: uid, resourceVersion,
/// creationTimestamp, and the field manager's record of who set what.
fn as_served(mut object: Value, index: usize) -> Value {
    let metadata = &mut object["metadata"];
    metadata["uid"] = json!(format!("6f1c2d3e-0000-4000-8000-{index:012x}"));
    metadata["resourceVersion"] = json!(RESOURCE_VERSION);
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

/// What a `ReplicaSet` and a kubelet add to a pod: owner, generated name, defaults, and a
/// running status.
fn as_scheduled(pod: &mut Value, index: usize) {
    let deployment = index / crate::cluster::PODS_PER_DEPLOYMENT;
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
    resources: &Arc<Vec<Resource>>,
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
                let (resources, stop, served) =
                    (Arc::clone(resources), Arc::clone(stop), Arc::clone(served));
                let spawned = thread::Builder::new()
                    .name("API connection".to_owned())
                    .spawn(move || {
                        let _ = answer(stream, &resources, &stop, &served);
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
    resources: &[Resource],
    stop: &AtomicBool,
    served: &Served,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let request = read_request(&stream)?;
    let Some(resource) = resources.iter().find(|r| r.path == request.path) else {
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
        return hold_watch(stream, &request, stop);
    }
    served.list_pages.fetch_add(1, Ordering::Relaxed);
    let from: usize = request
        .query
        .get("continue")
        .and_then(|token| token.parse().ok())
        .unwrap_or(0);
    let limit = request
        .query
        .get("limit")
        .and_then(|limit| limit.parse::<usize>().ok())
        .filter(|limit| *limit > 0)
        .unwrap_or(usize::MAX);
    let total = resource.items.len();
    let from = from.min(total);
    let to = from.saturating_add(limit).min(total);
    let mut body = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{RESOURCE_VERSION}\"",
        resource.list_kind, resource.api_version
    );
    if to < total {
        let _ = write!(
            body,
            ",\"continue\":\"{to}\",\"remainingItemCount\":{}",
            total - to
        );
    }
    body.push_str("},\"items\":[");
    for (n, item) in resource.items[from..to].iter().enumerate() {
        if n > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    respond_json(stream, &body)
}

/// Answers a watch with its headers, then nothing (no object changes), until the
/// client's `timeoutSeconds` (at most [`MAX_WATCH`]), the client going away, or the
/// server stopping.
fn hold_watch(mut stream: TcpStream, request: &Request, stop: &AtomicBool) -> io::Result<()> {
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|seconds| seconds.parse().ok())
        .map_or(MAX_WATCH, |seconds| {
            Duration::from_secs(seconds).min(MAX_WATCH)
        });
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
    )?;
    stream.set_read_timeout(Some(TICK))?;
    let end = Instant::now() + timeout;
    let mut byte = [0; 1];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match io::Read::read(&mut stream, &mut byte) {
            // The client closed the watch.
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
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
        let pod: Value = serde_json::from_str(&pods.items[12]).unwrap();
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
            pods.items[12].len() > 2_000,
            "a pod as served is several times what was applied: {} bytes",
            pods.items[12].len()
        );
        let policies = resources
            .iter()
            .find(|r| r.list_kind == "NetworkPolicyList")
            .unwrap();
        assert_eq!(policies.items.len(), 4);
        let policy: Value = serde_json::from_str(&policies.items[2]).unwrap();
        assert_eq!(
            policy["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"],
            "172.18.0.0/16"
        );
    }
}
