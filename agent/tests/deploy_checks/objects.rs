//! Manifests as JSON values, and their strict decoding into `k8s-openapi` types.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::repo;

#[derive(Clone, Debug)]
pub struct Object {
    pub source: String,
    pub value: Value,
}

impl Object {
    pub fn field(&self, pointer: &str) -> &str {
        self.value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn kind(&self) -> &str {
        self.field("/kind")
    }

    pub fn name(&self) -> &str {
        self.field("/metadata/name")
    }

    pub fn namespace(&self) -> &str {
        self.field("/metadata/namespace")
    }

    /// `kind/namespace/name`, the identity of an applied object.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.kind(), self.namespace(), self.name())
    }

    /// The name `kubectl -o name` prints: lowercase kind, dot, API group, slash, name.
    pub fn kubectl_name(&self) -> String {
        let api_version = self.field("/apiVersion");
        let kind = self.kind().to_lowercase();
        match api_version.split_once('/') {
            Some((group, _)) => format!("{kind}.{group}/{}", self.name()),
            None => format!("{kind}/{}", self.name()),
        }
    }

    pub fn validate<T: DeserializeOwned + Serialize>(&self) {
        let _typed: T = self.decode();
    }

    /// Decodes into `T` and fails on any field `T` does not read back the same.
    pub fn decode<T: DeserializeOwned + Serialize>(&self) -> T {
        let typed: T = serde_json::from_value(self.value.clone())
            .unwrap_or_else(|error| panic!("{}: {}: {error}", self.source, self.key()));
        let read_back = serde_json::to_value(&typed).unwrap();
        let mut lost = Vec::new();
        fields_lost(&self.value, &read_back, "", &mut lost);
        assert!(
            lost.is_empty(),
            "{}: {}: fields the API type does not hold: {lost:?}",
            self.source,
            self.key()
        );
        typed
    }
}

/// Paths where `read_back` lacks or changes what `written` says.
pub fn fields_lost(written: &Value, read_back: &Value, path: &str, lost: &mut Vec<String>) {
    match (written, read_back) {
        (Value::Object(written), Value::Object(read_back)) => {
            for (key, value) in written {
                match read_back.get(key) {
                    Some(back) => fields_lost(value, back, &format!("{path}.{key}"), lost),
                    None => lost.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(written), Value::Array(read_back)) if written.len() == read_back.len() => {
            for (index, (value, back)) in written.iter().zip(read_back).enumerate() {
                fields_lost(value, back, &format!("{path}[{index}]"), lost);
            }
        }
        _ if written == read_back => {}
        _ => lost.push(format!("{path}: wrote {written}, reads back {read_back}")),
    }
}

pub fn parse_stream(source: &str, text: &str) -> Vec<Object> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{source}: {error}"))
        })
        .filter(|value| !value.is_null())
        .map(|value| Object {
            source: source.to_owned(),
            value,
        })
        .collect()
}

pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    files
}

pub fn load(files: &[PathBuf]) -> Vec<Object> {
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            let source = file
                .strip_prefix(repo())
                .unwrap_or(file)
                .display()
                .to_string();
            parse_stream(&source, &text)
        })
        .collect()
}

pub fn plain(subdir: &str) -> Vec<Object> {
    load(&yaml_files(&repo().join("deploy/kubernetes").join(subdir)))
}

pub fn only<'a>(objects: &'a [Object], kind: &str) -> &'a Object {
    let mut found = objects.iter().filter(|object| object.kind() == kind);
    let first = found.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(found.next().is_none(), "more than one {kind}");
    first
}

pub fn named<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|object| object.kind() == kind && object.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Decodes every object whose type `k8s-openapi` has; returns the kinds it could not.
pub fn decode_all(objects: &[Object]) -> BTreeSet<String> {
    let mut untyped = BTreeSet::new();
    for object in objects {
        match (object.field("/apiVersion"), object.kind()) {
            ("v1", "Namespace") => object.validate::<Namespace>(),
            ("v1", "ServiceAccount") => object.validate::<ServiceAccount>(),
            ("v1", "ConfigMap") => object.validate::<ConfigMap>(),
            ("v1", "Service") => object.validate::<Service>(),
            ("apps/v1", "DaemonSet") => object.validate::<DaemonSet>(),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => object.validate::<ClusterRole>(),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                object.validate::<ClusterRoleBinding>();
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => object.validate::<NetworkPolicy>(),
            (api_version, kind) => {
                untyped.insert(format!("{api_version}/{kind}"));
            }
        }
    }
    untyped
}

/// kubectl, offline: `annotate --local` reads files (or `-`, stdin) with kubectl's own YAML
/// decoder and maps every kind, without an API server (apply and create need one even
/// for a client-side dry run). Skipped, with a note, where kubectl is missing.
pub fn kubectl_reads(path: &Path, stdin: Option<&str>, expected: &[Object]) {
    let mut command = Command::new("kubectl");
    command
        .args([
            "annotate",
            "--local",
            "--dry-run=client",
            "-o",
            "name",
            "-f",
        ])
        .arg(path)
        .arg("egret.dev/checked=true")
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let Ok(mut child) = command.spawn() else {
        eprintln!("note: no kubectl on this machine: skipping its client-side check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let wanted: Vec<String> = expected.iter().map(Object::kubectl_name).collect();
    assert_eq!(names, wanted, "kubectl reads the same objects");
}
