//! A directory of Kubernetes YAML (or JSON) as a cluster: Namespaces, Pods (with
//! `status.podIP(s)`), `NetworkPolicies`, `ClusterNetworkPolicies`
//! (`policy.networking.k8s.io/v1alpha2`), Services, `EndpointSlices`. Multi-document
//! files and `List`s are fine. A broken document or object, or one of these kinds in
//! an apiVersion Egret does not read, is a problem (file, kind, name, field) and is
//! skipped; everything else still counts. Documents of other kinds (Deployments,
//! `ConfigMaps`, ...) are listed as [`Manifests::unread`], never skipped in silence.

use std::{
    fmt,
    io::BufRead,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::networking::v1 as networking, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use serde_yaml_ng::Value;
use thiserror::Error;
use tracing::{info, warn};

use super::{
    objects::{self, DEFAULT_NAMESPACE},
    trimmed,
};
use crate::{
    policy::{
        self,
        cluster::convert::{self as cluster, ClusterNetworkPolicyObject, CnpField},
    },
    state::{LabelSets, Snapshot},
};

/// What a manifest directory holds, and what was wrong with it.
#[derive(Debug, Default)]
pub struct Manifests {
    pub snapshot: Snapshot,
    pub problems: Vec<ManifestError>,
    /// Documents of kinds Egret does not read, in the order found.
    pub unread: Vec<Unread>,
    /// Files read, in order.
    pub files: Vec<PathBuf>,
}

/// The kinds Egret reads, each in the one apiVersion it reads.
pub const KINDS: [(&str, &str); 6] = [
    ("Namespace", "v1"),
    ("Pod", "v1"),
    ("NetworkPolicy", "networking.k8s.io/v1"),
    (cluster::KIND, cluster::API_VERSION),
    ("Service", "v1"),
    ("EndpointSlice", "discovery.k8s.io/v1"),
];

/// A document of a kind Egret does not read (a Deployment, a `ConfigMap`, ...): not a
/// problem, but reported (at `info`) so that nothing is skipped in silence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unread(pub ObjectLocation);

impl fmt::Display for Unread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not a kind Egret reads; ignored", self.0)
    }
}

/// Where a broken object was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectLocation {
    pub file: PathBuf,
    pub kind: String,
    /// `namespace/name`, or just `name` for cluster-scoped objects, or `?` when absent.
    pub name: String,
}

impl fmt::Display for ObjectLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.file.display(), self.kind, self.name)
    }
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot read: {source}", file.display())]
    ReadFile {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: document {document}: YAML does not parse: {source}", file.display())]
    Yaml {
        file: PathBuf,
        document: usize,
        source: serde_yaml_ng::Error,
    },
    /// A kind Egret reads, in another apiVersion: nothing of the object is read.
    #[error(
        "{location}: apiVersion: {} (Egret reads {expected}); the object is skipped",
        api_version.as_deref().map_or_else(|| "missing".to_owned(), |v| format!("{v:?} is not read"))
    )]
    UnknownApiVersion {
        location: ObjectLocation,
        api_version: Option<String>,
        expected: &'static str,
    },
    #[error("{location}: {field}: {message}")]
    Malformed {
        location: ObjectLocation,
        field: String,
        message: String,
    },
    #[error("{location}: {source}")]
    Invalid {
        location: ObjectLocation,
        source: Box<policy::convert::InvalidField>,
    },
    #[error("{location}: {source}")]
    FailedClosed {
        location: ObjectLocation,
        source: Box<policy::convert::FailedClosed>,
    },
    /// A `ClusterNetworkPolicy` Egret cannot enforce at all: nothing of it is enforced.
    #[error("{location}: {source}; the policy is skipped")]
    ClusterPolicySkipped {
        location: ObjectLocation,
        source: CnpField,
    },
    /// A `ClusterNetworkPolicy` field Egret enforces more strictly than written.
    #[error("{location}: {source}")]
    ClusterPolicyFailedClosed {
        location: ObjectLocation,
        source: CnpField,
    },
    #[error("{location}: defined again (first in {}); the first definition is used", first.display())]
    Duplicate {
        location: ObjectLocation,
        first: PathBuf,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order.
///
/// # Errors
/// When the directory, or one of its files, cannot be read: a partial view would
/// silently drop the objects that could not be read.
pub fn load_dir(dir: &Path) -> Result<Manifests, ManifestError> {
    let read_dir_error = |source| ManifestError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let is_manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut loader = Loader::default();
    for file in &files {
        let read_file_error = |source| ManifestError::ReadFile {
            file: file.clone(),
            source,
        };
        let reader = std::fs::File::open(file).map_err(read_file_error)?;
        loader
            .add_reader(file, std::io::BufReader::new(reader))
            .map_err(read_file_error)?;
    }
    Ok(Manifests {
        snapshot: loader.snapshot,
        problems: loader.problems,
        unread: loader.unread,
        files,
    })
}

/// Builds a snapshot from manifest texts; `add_text` may be called per file.
#[derive(Default)]
pub struct Loader {
    pub snapshot: Snapshot,
    pub problems: Vec<ManifestError>,
    pub unread: Vec<Unread>,
    seen: std::collections::BTreeMap<(String, String), PathBuf>,
    label_sets: LabelSets,
}

impl Loader {
    pub fn add_text(&mut self, file: &Path, text: &str) {
        // Lines of a string always read; were one not to, it would be said.
        if let Err(source) = self.add_reader(file, text.as_bytes()) {
            self.problems.push(ManifestError::ReadFile {
                file: file.to_owned(),
                source,
            });
        }
    }

    /// Reads `file`'s YAML stream one document at a time: only one document's text and
    /// value are held at once, never the whole file. A document that does not parse is
    /// a problem, and the next one is read.
    ///
    /// # Errors
    /// When `reader` fails, or what it reads is not UTF-8.
    pub fn add_reader(&mut self, file: &Path, reader: impl BufRead) -> std::io::Result<()> {
        let mut index = 0;
        for text in Documents::new(reader) {
            let text = text?;
            for document in serde_yaml_ng::Deserializer::from_str(&text) {
                index += 1;
                match Value::deserialize(document) {
                    Ok(Value::Null) => {}
                    Ok(value) => self.add_value(file, value),
                    Err(source) => {
                        self.problems.push(ManifestError::Yaml {
                            file: file.to_owned(),
                            document: index,
                            source,
                        });
                        // Whatever is left of this document cannot be located.
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn add_value(&mut self, file: &Path, value: Value) {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind == "List" || kind.ends_with("List") {
            if let Value::Mapping(mut list) = value
                && let Some(Value::Sequence(items)) = list.remove("items")
            {
                for item in items {
                    self.add_value(file, item);
                }
            }
            return;
        }
        let location = locate(file, &kind, &value);
        if kind.is_empty() {
            self.problems.push(ManifestError::Malformed {
                location: ObjectLocation {
                    kind: "(no kind)".to_owned(),
                    ..location
                },
                field: "kind".to_owned(),
                message: "missing; the document is skipped".to_owned(),
            });
            return;
        }
        let Some(&(_, expected)) = KINDS.iter().find(|(known, _)| *known == kind) else {
            // Other kinds (Deployments, ConfigMaps, ...) are not ours to read.
            self.unread.push(Unread(location));
            return;
        };
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        if api_version != Some(expected) {
            self.problems.push(ManifestError::UnknownApiVersion {
                location,
                api_version: api_version.map(str::to_owned),
                expected,
            });
            return;
        }
        let namespaced_name = location.name.clone();
        if let Some(first) = self.seen.get(&(kind.clone(), namespaced_name.clone())) {
            self.problems.push(ManifestError::Duplicate {
                location,
                first: first.clone(),
            });
            return;
        }
        self.seen
            .insert((kind.clone(), namespaced_name), file.to_owned());
        let result = match kind.as_str() {
            "Namespace" => typed::<trimmed::Namespace>(&location, &value)
                .map(|ns| self.snapshot.insert_namespace(objects::namespace(ns))),
            "Pod" => typed::<trimmed::Pod>(&location, &value)
                .and_then(|pod| {
                    objects::pod(pod, &mut self.label_sets).map_err(|e| malformed(&location, e))
                })
                .map(|pod| self.snapshot.insert_pod(pod)),
            "Service" => typed::<trimmed::Service>(&location, &value)
                .and_then(|service| objects::service(service).map_err(|e| malformed(&location, e)))
                .map(|service| self.snapshot.insert_service(service)),
            "EndpointSlice" => typed::<trimmed::EndpointSlice>(&location, &value)
                .and_then(|slice| {
                    objects::endpoint_slice(slice).map_err(|e| malformed(&location, e))
                })
                .map(|slice| self.snapshot.insert_endpoint_slice(slice)),
            cluster::KIND => self.add_cluster_policy(&location, value),
            _ => self.add_policy(&location, value),
        };
        if let Err(problem) = result {
            self.problems.push(problem);
        }
    }

    /// Adds a policy, failing closed on invalid rules: a rule that cannot be read, even
    /// one of the wrong shape, allows nothing, and the policy still isolates its pods.
    fn add_policy(
        &mut self,
        location: &ObjectLocation,
        mut value: Value,
    ) -> Result<(), ManifestError> {
        use policy::convert::{FailedClosed, InvalidField, Problem};
        let mut failed_closed = Vec::new();
        let mut malformed_rules = Vec::new();
        let policy = loop {
            match typed::<networking::NetworkPolicy>(location, &value) {
                Ok(policy) => break policy,
                Err(ManifestError::Malformed { field, message, .. })
                    if let Some(rule) = egress_rule_index(&field)
                        && !malformed_rules.contains(&rule) =>
                {
                    // Read the rest with an empty rule in its place; it is replaced below.
                    let slot = value
                        .get_mut("spec")
                        .and_then(|spec| spec.get_mut("egress"))
                        .and_then(|egress| egress.get_mut(rule));
                    let Some(slot) = slot else {
                        return Err(ManifestError::Malformed {
                            location: location.clone(),
                            field,
                            message,
                        });
                    };
                    *slot = Value::Mapping(serde_yaml_ng::Mapping::new());
                    malformed_rules.push(rule);
                    failed_closed.push(FailedClosed::Rule(InvalidField {
                        field,
                        problem: Problem::Malformed(message),
                    }));
                }
                Err(other) => return Err(other),
            }
        };
        let mut converted =
            policy::convert::network_policy_failing_closed(&policy, DEFAULT_NAMESPACE).map_err(
                |source| ManifestError::Invalid {
                    location: location.clone(),
                    source: Box::new(source),
                },
            )?;
        for rule in malformed_rules {
            converted.policy.egress[rule] = policy::convert::rule_allowing_nothing();
        }
        failed_closed.append(&mut converted.failed_closed);
        self.problems.extend(
            failed_closed
                .into_iter()
                .map(|source| ManifestError::FailedClosed {
                    location: location.clone(),
                    source: Box::new(source),
                }),
        );
        self.snapshot.insert_policy(converted.policy);
        Ok(())
    }
}

impl Loader {
    /// Adds a `ClusterNetworkPolicy`. A policy whose tier, priority or subject cannot be
    /// read is skipped; narrower problems fail closed (see [`cluster`]), and an egress
    /// rule of the wrong shape stands as a rule that denies everything it could scope.
    fn add_cluster_policy(
        &mut self,
        location: &ObjectLocation,
        mut value: Value,
    ) -> Result<(), ManifestError> {
        let skipped = |field: &str, problem: String| ManifestError::ClusterPolicySkipped {
            location: location.clone(),
            source: CnpField {
                field: field.to_owned(),
                problem,
            },
        };
        let mut malformed_rules: Vec<(usize, CnpField)> = Vec::new();
        let object = loop {
            match typed::<ClusterNetworkPolicyObject>(location, &value) {
                Ok(object) => break object,
                Err(ManifestError::Malformed { field, message, .. }) => {
                    let slot = egress_rule_index(&field)
                        .filter(|rule| malformed_rules.iter().all(|(seen, _)| seen != rule))
                        .and_then(|rule| {
                            let slot = value
                                .get_mut("spec")
                                .and_then(|spec| spec.get_mut("egress"))
                                .and_then(|egress| egress.get_mut(rule))?;
                            Some((rule, slot))
                        });
                    let Some((rule, slot)) = slot else {
                        return Err(skipped(&field, message));
                    };
                    // Read the rest with an empty rule in its place: the converter makes
                    // it a Deny of everything, as upstream asks of an unreadable rule.
                    *slot = Value::Mapping(serde_yaml_ng::Mapping::new());
                    malformed_rules.push((
                        rule,
                        CnpField {
                            field,
                            problem: format!(
                                "{message}; the rule cannot be read and denies every destination"
                            ),
                        },
                    ));
                }
                Err(other) => return Err(other),
            }
        };
        let converted = cluster::cluster_network_policy(&object).map_err(|source| {
            ManifestError::ClusterPolicySkipped {
                location: location.clone(),
                source,
            }
        })?;
        // The converter's words about a stand-in rule would describe the stand-in.
        let mut failed_closed: Vec<CnpField> = converted
            .failed_closed
            .into_iter()
            .filter(|problem| {
                egress_rule_index(&problem.field)
                    .is_none_or(|rule| malformed_rules.iter().all(|(seen, _)| *seen != rule))
            })
            .collect();
        failed_closed.extend(malformed_rules.into_iter().map(|(_, problem)| problem));
        // In rule order (a stable sort keeps the converter's order within a rule).
        failed_closed.sort_by_key(|problem| egress_rule_index(&problem.field));
        self.problems
            .extend(failed_closed.into_iter().map(|source| {
                ManifestError::ClusterPolicyFailedClosed {
                    location: location.clone(),
                    source,
                }
            }));
        self.snapshot.insert_cluster_policy(converted.policy);
        Ok(())
    }
}

/// A YAML stream's documents, split as it is read: a document starts at a `---` line
/// and ends before the next one, or with a `...` line. YAML forbids either marker at
/// the start of a line inside a document (in block scalars too), so a line that starts
/// with one always is one. Comments and directives before a `---` go with the document
/// it starts.
struct Documents<R> {
    reader: R,
    /// The start of the next document, read while finding the end of one.
    next: Option<String>,
}

impl<R: BufRead> Documents<R> {
    fn new(reader: R) -> Self {
        Self { reader, next: None }
    }
}

/// `line` is `marker` alone or followed by a space (content, a comment, a tag).
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

impl<R: BufRead> Iterator for Documents<R> {
    type Item = std::io::Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut document = self.next.take().unwrap_or_default();
        // Whether the document holds more than comments, blank lines and directives.
        let mut has_content = is_marker(&document, "---");
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return (!document.is_empty()).then_some(Ok(document)),
                Ok(_) => {}
                Err(error) => return Some(Err(error)),
            }
            if is_marker(&line, "---") && has_content {
                self.next = Some(line);
                return Some(Ok(document));
            }
            let ends = is_marker(&line, "...");
            let trimmed = line.trim_start();
            has_content |= !(trimmed.is_empty()
                || trimmed.starts_with('#')
                || (!has_content && line.starts_with('%')));
            document.push_str(&line);
            if ends {
                return Some(Ok(document));
            }
        }
    }
}

/// `N` when `field` is inside `spec.egress[N]`.
fn egress_rule_index(field: &str) -> Option<usize> {
    field
        .strip_prefix("spec.egress[")?
        .split_once(']')?
        .0
        .parse()
        .ok()
}

fn locate(file: &Path, kind: &str, value: &Value) -> ObjectLocation {
    let metadata = value.get("metadata");
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    // Of the kinds Egret does not read, it cannot tell which are namespaced.
    let is_read = KINDS.iter().any(|(read, _)| *read == kind);
    let name = match (kind, field("namespace"), field("name")) {
        ("Namespace" | cluster::KIND, _, Some(name)) => name.to_owned(),
        (_, Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        (_, None, Some(name)) if is_read => format!("{DEFAULT_NAMESPACE}/{name}"),
        (_, None, Some(name)) => name.to_owned(),
        (_, _, None) => "?".to_owned(),
    };
    ObjectLocation {
        file: file.to_owned(),
        kind: kind.to_owned(),
        name,
    }
}

fn typed<T: serde::de::DeserializeOwned + HasMetadata>(
    location: &ObjectLocation,
    value: &Value,
) -> Result<T, ManifestError> {
    let object: T =
        serde_path_to_error::deserialize(value).map_err(|error| ManifestError::Malformed {
            location: location.clone(),
            field: error.path().to_string(),
            message: error.inner().to_string(),
        })?;
    if object.metadata().name.as_deref().is_none_or(str::is_empty) {
        return Err(ManifestError::Malformed {
            location: location.clone(),
            field: "metadata.name".to_owned(),
            message: "missing".to_owned(),
        });
    }
    Ok(object)
}

trait HasMetadata {
    fn metadata(&self) -> &ObjectMeta;
}

impl HasMetadata for trimmed::Namespace {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for trimmed::Pod {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for trimmed::Service {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for trimmed::EndpointSlice {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

fn malformed(location: &ObjectLocation, error: objects::FieldError) -> ManifestError {
    ManifestError::Malformed {
        location: location.clone(),
        field: error.field,
        message: error.message,
    }
}

impl HasMetadata for networking::NetworkPolicy {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for ClusterNetworkPolicyObject {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

/// The manifest directory's name as a source, in updates, metrics and status.
pub const SOURCE: &str = "manifests";

/// While the directory cannot be read, it is tried again this often.
const RETRY: Duration = Duration::from_secs(1);

/// Watches `dir` (inotify) and sends the whole directory, re-read, after every change
/// (debounced) and at least every `resync`. When the directory or a file in it cannot
/// be read, it sends [`super::Update::Failed`] instead of a snapshot, so the last good
/// one stays enforced, and tries again every second, watching the directory afresh
/// (it may have been moved away and back, or replaced). Stops when the receiver is
/// gone.
pub async fn watch(
    dir: PathBuf,
    updates: tokio::sync::mpsc::Sender<super::Update>,
    resync: Duration,
) {
    let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = None;
    let (mut failing, mut synced) = (false, false);
    // Reported once each, not at every re-read.
    let mut unread_before: Vec<Unread> = Vec::new();
    // When the first change of the burst being read was seen: programming latency
    // counts from there, the burst's wait and the re-read included.
    let mut first_change: Option<std::time::Instant> = None;
    loop {
        let received = first_change.take().unwrap_or_else(std::time::Instant::now);
        if watcher.is_none() {
            watcher = watch_contents(&dir, changed_tx.clone());
        }
        let loaded = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || load_dir(&dir)).await
        };
        let loaded = match loaded {
            Ok(loaded) => loaded.map_err(|error| error.to_string()),
            Err(error) => Err(format!("reading {}: {error}", dir.display())),
        };
        let mut sent = Vec::new();
        match loaded {
            Ok(manifests) => {
                for unread in &manifests.unread {
                    if !unread_before.contains(unread) {
                        info!("{unread}");
                    }
                }
                unread_before = manifests.unread;
                if watcher.is_none() {
                    warn!(dir = %dir.display(), "cannot watch the manifest directory; changes are read at each resync");
                }
                if failing {
                    failing = false;
                    sent.push(super::Update::Recovered { source: SOURCE });
                }
                sent.push(super::Update::Replace {
                    snapshot: Box::new(manifests.snapshot),
                    problems: manifests.problems.iter().map(ToString::to_string).collect(),
                    received,
                });
                if !synced {
                    synced = true;
                    sent.push(super::Update::Synced { source: SOURCE });
                }
            }
            Err(problem) => {
                failing = true;
                // The watch follows the directory it was set on, wherever that went.
                watcher = None;
                sent.push(super::Update::Failed {
                    source: SOURCE,
                    problem,
                });
            }
        }
        for update in sent {
            if updates.send(update).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = changed.recv() => {
                first_change = Some(std::time::Instant::now());
                // Editors and `kubectl` write in bursts: wait for the burst to end.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changed.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(if failing { RETRY } else { resync }) => {}
        }
    }
}

/// An inotify watch on `dir` that reports changes to its contents on `changed`; `None`
/// when `dir` cannot be watched (it may not exist).
fn watch_contents(
    dir: &Path,
    changed: tokio::sync::mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{
        EventKind, Watcher as _,
        event::{AccessKind, AccessMode},
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Opening and reading files is no change, and the loader's own reads would
        // otherwise make every re-read cause the next one.
        let is_read = |kind: &EventKind| {
            matches!(kind, EventKind::Access(access)
                if !matches!(access, AccessKind::Close(AccessMode::Write)))
        };
        if event.is_ok_and(|event| !is_read(&event.kind)) {
            let _ = changed.send(());
        }
    });
    let mut watcher = watcher.ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .ok()?;
    Some(watcher)
}

#[cfg(test)]
mod tests;
