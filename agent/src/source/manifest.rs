//! A directory of Kubernetes YAML (or JSON) as a cluster: Namespaces, Pods (with
//! `status.podIP(s)`), `NetworkPolicies`. Multi-document files and `List`s are fine.
//! A broken document or object is reported (file, kind, name, field) and skipped;
//! everything else still counts.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;
use serde_yaml_ng::Value;
use thiserror::Error;

use super::objects::{self, DEFAULT_NAMESPACE};
use crate::{policy, state::Snapshot};

/// What a manifest directory holds, and what was wrong with it.
#[derive(Debug, Default)]
pub struct Manifests {
    pub snapshot: Snapshot,
    pub problems: Vec<ManifestError>,
    /// Files read, in order.
    pub files: Vec<PathBuf>,
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
    #[error("{location}: defined again (first in {}); the first definition is used", first.display())]
    Duplicate {
        location: ObjectLocation,
        first: PathBuf,
    },
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order.
#[must_use]
pub fn load_dir(dir: &Path) -> Manifests {
    let mut manifests = Manifests::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(source) => {
            manifests.problems.push(ManifestError::ReadDir {
                dir: dir.to_owned(),
                source,
            });
            return manifests;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    let mut loader = Loader::default();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => loader.add_text(file, &text),
            Err(source) => loader.problems.push(ManifestError::ReadFile {
                file: file.clone(),
                source,
            }),
        }
    }
    manifests.snapshot = loader.snapshot;
    manifests.problems = loader.problems;
    manifests.files = files;
    manifests
}

/// Builds a snapshot from manifest texts; `add_text` may be called per file.
#[derive(Default)]
pub struct Loader {
    pub snapshot: Snapshot,
    pub problems: Vec<ManifestError>,
    seen: std::collections::BTreeMap<(String, String), PathBuf>,
}

impl Loader {
    pub fn add_text(&mut self, file: &Path, text: &str) {
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            match Value::deserialize(document) {
                Ok(Value::Null) => {}
                Ok(value) => self.add_value(file, value),
                Err(source) => {
                    self.problems.push(ManifestError::Yaml {
                        file: file.to_owned(),
                        document: index + 1,
                        source,
                    });
                    // A syntax error ends the stream: later documents cannot be located.
                    break;
                }
            }
        }
    }

    fn add_value(&mut self, file: &Path, value: Value) {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if kind == "List" || kind.ends_with("List") {
            if let Some(Value::Sequence(items)) = value.get("items") {
                for item in items.clone() {
                    self.add_value(file, item);
                }
            }
            return;
        }
        let location = locate(file, &kind, &value);
        let namespaced_name = location.name.clone();
        match kind.as_str() {
            "Namespace" | "Pod" | "NetworkPolicy" | "Service" | "EndpointSlice" => {
                if let Some(first) = self.seen.get(&(kind.clone(), namespaced_name.clone())) {
                    self.problems.push(ManifestError::Duplicate {
                        location,
                        first: first.clone(),
                    });
                    return;
                }
                self.seen
                    .insert((kind.clone(), namespaced_name), file.to_owned());
            }
            // Other kinds (Deployments, ConfigMaps, ...) are not ours to read.
            _ => return,
        }
        let result = match kind.as_str() {
            "Namespace" => typed::<core::Namespace>(&location, value)
                .map(|ns| self.snapshot.insert_namespace(objects::namespace(&ns))),
            "Pod" => typed::<core::Pod>(&location, value)
                .and_then(|pod| objects::pod(&pod).map_err(|e| malformed(&location, e)))
                .map(|pod| self.snapshot.insert_pod(pod)),
            "Service" => typed::<core::Service>(&location, value)
                .and_then(|service| objects::service(&service).map_err(|e| malformed(&location, e)))
                .map(|service| self.snapshot.insert_service(service)),
            "EndpointSlice" => typed::<discovery::EndpointSlice>(&location, value)
                .and_then(|slice| {
                    objects::endpoint_slice(&slice).map_err(|e| malformed(&location, e))
                })
                .map(|slice| self.snapshot.insert_endpoint_slice(slice)),
            _ => typed::<networking::NetworkPolicy>(&location, value).and_then(|policy| {
                policy::convert::network_policy(&policy, DEFAULT_NAMESPACE)
                    .map(|policy| self.snapshot.insert_policy(policy))
                    .map_err(|source| ManifestError::Invalid {
                        location: location.clone(),
                        source: Box::new(source),
                    })
            }),
        };
        if let Err(problem) = result {
            self.problems.push(problem);
        }
    }
}

fn locate(file: &Path, kind: &str, value: &Value) -> ObjectLocation {
    let metadata = value.get("metadata");
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    let name = match (kind, field("namespace"), field("name")) {
        ("Namespace", _, Some(name)) => name.to_owned(),
        (_, Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        (_, None, Some(name)) => format!("{DEFAULT_NAMESPACE}/{name}"),
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
    value: Value,
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

impl HasMetadata for core::Namespace {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for core::Pod {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for core::Service {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl HasMetadata for discovery::EndpointSlice {
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

/// Watches `dir` (inotify) and sends the whole directory, re-read, after every change
/// (debounced) and at least every `resync`. Stops when the receiver is gone.
///
/// # Errors
/// When the directory cannot be watched.
pub async fn watch(
    dir: PathBuf,
    updates: tokio::sync::mpsc::Sender<super::Update>,
    resync: std::time::Duration,
) -> Result<(), notify::Error> {
    use notify::Watcher as _;
    let (changed_tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changed_tx.send(());
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let mut first = true;
    loop {
        let received = std::time::Instant::now();
        let manifests = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || load_dir(&dir))
                .await
                .unwrap_or_default()
        };
        let problems = manifests.problems.iter().map(ToString::to_string).collect();
        let update = super::Update::Replace {
            snapshot: Box::new(manifests.snapshot),
            problems,
            received,
        };
        if updates.send(update).await.is_err() {
            return Ok(());
        }
        if first {
            first = false;
            if updates
                .send(super::Update::Synced {
                    source: "manifests",
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        tokio::select! {
            changed_now = changed.recv() => {
                if changed_now.is_none() {
                    return Ok(());
                }
                // Editors and `kubectl` write in bursts: wait for the burst to end.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                while changed.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(resync) => {}
        }
    }
}
