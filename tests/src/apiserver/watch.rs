//! Changes to the served cluster, and the watches that deliver them.
//!
//! A change takes the next resourceVersion, is written at once to every watch open on
//! its kind (`{"type":"MODIFIED","object":{…}}`, one JSON object a line, the object
//! shaped as the lists serve it, carrying that resourceVersion), and is kept: a watch
//! opened later from an older resourceVersion (a client resuming after a watch timed
//! out) receives every change of its kind since, first. A watch from a version older
//! than the cluster as generated gets `410 Expired`, as from an API server that no
//! longer holds it.

use std::{
    io::{self, Read as _, Write as _},
    net::TcpStream,
    sync::{Arc, Mutex, atomic::AtomicBool, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    INITIAL_RESOURCE_VERSION, MAX_WATCH, Request, Served, Store, TICK, as_scheduled, as_served,
    key_of, lock, status,
};

const PODS: &str = "/api/v1/pods";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// A change to the generated cluster, as a benchmark makes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterChange {
    /// Policy `policy` becomes [`crate::cluster::GeneratedCluster::policy_yaml`] at `revision` (the
    /// first rule gains TCP port `9000 + revision`): `MODIFIED`.
    PolicyRevised { policy: usize, revision: u32 },
    /// [`crate::cluster::GeneratedCluster::joining_pod_yaml`] of `deployment` and `ordinal` is
    /// scheduled and running: `ADDED`.
    PodJoined { deployment: usize, ordinal: usize },
    /// That pod is gone: `DELETED`.
    PodLeft { deployment: usize, ordinal: usize },
}

/// The kind of a watch event, as the API server writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as its watch line.
struct Event {
    resource_version: u64,
    path: &'static str,
    line: Arc<str>,
}

/// A watch open on one kind: its connection's thread receives the lines of new events.
struct OpenWatch {
    id: u64,
    path: &'static str,
    sender: mpsc::Sender<Arc<str>>,
}

/// Every change made, and the watches open.
#[derive(Default)]
pub(super) struct Watches {
    history: Vec<Event>,
    open: Vec<OpenWatch>,
    next_id: u64,
}

impl Watches {
    pub(super) fn open(&self) -> usize {
        self.open.len()
    }

    /// Sends `event` to the watches open on its kind and keeps it.
    fn publish(&mut self, event: Event) {
        self.open.retain(|watch| {
            watch.path != event.path || watch.sender.send(Arc::clone(&event.line)).is_ok()
        });
        self.history.push(event);
    }
}

/// Makes `change` in `store` and sends its event; returns its resourceVersion.
pub(super) fn change(store: &mut Store, change: &ClusterChange) -> anyhow::Result<u64> {
    let version = store.resource_version + 1;
    let json = |yaml: &str| -> anyhow::Result<Value> {
        serde_yaml_ng::from_str(yaml).context("a generated manifest is not valid YAML")
    };
    let cluster = &store.cluster;
    let (path, event_type, object) = match *change {
        ClusterChange::PolicyRevised { policy, revision } => {
            let object = as_served(
                json(&cluster.policy_yaml(policy, revision))?,
                policy,
                version,
            );
            (POLICIES, EventType::Modified, object)
        }
        ClusterChange::PodJoined {
            deployment,
            ordinal,
        } => {
            let mut object = json(&cluster.joining_pod_yaml(deployment, ordinal))?;
            // An index no generated pod has: its own uid and container.
            as_scheduled(&mut object, deployment, cluster.pods + ordinal);
            (
                PODS,
                EventType::Added,
                as_served(object, cluster.pods + ordinal, version),
            )
        }
        ClusterChange::PodLeft {
            deployment,
            ordinal,
        } => {
            let joined = json(&cluster.joining_pod_yaml(deployment, ordinal))?;
            let served = store
                .resource(PODS)
                .and_then(|pods| pods.items.get(&key_of(&joined)))
                .with_context(|| format!("pod {} is not served", key_of(&joined)))?;
            // The object as it was last, at the version of its deletion.
            let mut object: Value = serde_json::from_str(served)?;
            object["metadata"]["resourceVersion"] = json!(version.to_string());
            (PODS, EventType::Deleted, object)
        }
    };
    let key = key_of(&object);
    let served = store
        .resource(path)
        .with_context(|| format!("{path} is not served"))?
        .items
        .contains_key(&key);
    match (event_type, served) {
        (EventType::Added, true) => bail!("{key} is already served: it cannot be added"),
        (EventType::Modified | EventType::Deleted, false) => {
            bail!("{key} is not served: it cannot be changed")
        }
        _ => {}
    }
    let line = json!({"type": event_type.name(), "object": object}).to_string() + "\n";
    // The event goes out before the list changes: the lock is held throughout, so no
    // client sees one without the other, and the change's clock starts at the write.
    store.watches.publish(Event {
        resource_version: version,
        path,
        line: line.into(),
    });
    let items = &mut store
        .resource_mut(path)
        .with_context(|| format!("{path} is not served"))?
        .items;
    if event_type == EventType::Deleted {
        items.remove(&key);
    } else {
        items.insert(key, object.to_string());
    }
    store.resource_version = version;
    Ok(version)
}

/// Removes its watch from the open ones when the connection ends, however it ends.
struct Registered<'a> {
    store: &'a Mutex<Store>,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(self.store)
            .watches
            .open
            .retain(|watch| watch.id != self.id);
    }
}

/// Answers a watch of `path`: the changes since the client's `resourceVersion`, then
/// each new one as it is made, until the client's `timeoutSeconds` (at most
/// [`MAX_WATCH`]), the client going away, or the server stopping.
pub(super) fn stream(
    mut stream: TcpStream,
    request: &Request,
    path: &'static str,
    store: &Mutex<Store>,
    stop: &AtomicBool,
    served: &Served,
) -> io::Result<()> {
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|seconds| seconds.parse().ok())
        .map_or(MAX_WATCH, |seconds| {
            Duration::from_secs(seconds).min(MAX_WATCH)
        });
    // Absent or "0": from now on, as the API server does for a watch without a list.
    let since = request
        .query
        .get("resourceVersion")
        .and_then(|version| version.parse::<u64>().ok())
        .filter(|version| *version > 0);
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
    )?;
    if since.is_some_and(|since| since < INITIAL_RESOURCE_VERSION) {
        let expired = status(410, "Expired", "too old resource version");
        let line = json!({"type": "ERROR", "object": expired}).to_string() + "\n";
        return stream.write_all(line.as_bytes());
    }
    let (sender, events) = mpsc::channel();
    // Under one lock: no change falls between the backlog and the subscription.
    let (registered, backlog) = {
        let mut store = lock(store);
        let watches = &mut store.watches;
        let backlog: Vec<Arc<str>> = since.map_or_else(Vec::new, |since| {
            watches
                .history
                .iter()
                .filter(|event| event.path == path && event.resource_version > since)
                .map(|event| Arc::clone(&event.line))
                .collect()
        });
        let id = watches.next_id;
        watches.next_id += 1;
        watches.open.push(OpenWatch { id, path, sender });
        (id, backlog)
    };
    let _registered = Registered {
        store,
        id: registered,
    };
    for line in backlog {
        stream.write_all(line.as_bytes())?;
        served.events.fetch_add(1, Ordering::Relaxed);
    }
    let end = Instant::now() + timeout;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match events.recv_timeout(TICK) {
            Ok(line) => {
                stream.write_all(line.as_bytes())?;
                served.events.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if has_closed(&mut stream)? {
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
    Ok(())
}

/// Whether the client closed the connection (it sends nothing on a watch; whatever it
/// sends is read and ignored).
fn has_closed(stream: &mut TcpStream) -> io::Result<bool> {
    stream.set_nonblocking(true)?;
    let mut byte = [0; 1];
    let closed = match stream.read(&mut byte) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(error) => Err(error),
    };
    stream.set_nonblocking(false)?;
    closed
}

#[cfg(test)]
mod tests;
