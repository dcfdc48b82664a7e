//! Writes Kubernetes manifests describing a topology's pods, for `egret run --manifests`.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;

use crate::Pod;

/// A pod as the manifests describe it: the topology pod plus Kubernetes metadata.
pub struct PodManifest<'a> {
    pub pod: &'a Pod,
    pub namespace: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    /// Named container ports: (name, protocol, number).
    pub ports: &'a [(&'a str, &'a str, u16)],
}

/// YAML for Namespaces (with a `name` label each) and Pods on `node-1`, with the pods'
/// IPv4 and IPv6 addresses in `status.podIPs`.
#[must_use]
pub fn cluster_yaml(pods: &[PodManifest<'_>]) -> String {
    let mut namespaces: Vec<&str> = pods.iter().map(|p| p.namespace).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut yaml = String::new();
    for namespace in namespaces {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n  labels:\n    name: {namespace}\n"
        );
    }
    for manifest in pods {
        let pod = manifest.pod;
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n",
            pod.name(),
            manifest.namespace
        );
        for (key, value) in manifest.labels {
            let _ = writeln!(yaml, "    {key}: \"{value}\"");
        }
        if manifest.labels.is_empty() {
            yaml.push_str("    {}\n");
        }
        let _ = write!(
            yaml,
            "spec:\n  nodeName: node-1\n  containers:\n    - name: main\n      image: busybox\n"
        );
        if !manifest.ports.is_empty() {
            yaml.push_str("      ports:\n");
            for (name, protocol, number) in manifest.ports {
                let _ = writeln!(
                    yaml,
                    "        - {{name: {name}, protocol: {protocol}, containerPort: {number}}}"
                );
            }
        }
        let _ = write!(
            yaml,
            "status:\n  phase: Running\n  podIP: {v4}\n  podIPs:\n    - ip: {v4}\n    - ip: \"{v6}\"\n",
            v4 = pod.ipv4(),
            v6 = pod.ipv6()
        );
    }
    yaml
}

/// Writes `contents` to `dir/name` atomically (write, then rename), as a watcher expects.
///
/// # Errors
/// When the file cannot be written.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, contents)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, dir.join(name)).with_context(|| format!("renaming into {name}"))
}
