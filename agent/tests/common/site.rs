//! A small cluster for the netns tests: pods (each serving TCP and UDP echo on 8080) in
//! their namespaces, described with `policies` in a manifest directory an agent enforces.

use std::{path::Path, time::Duration};

use egret_testbed::{
    Listener, Pod, Topology,
    agent::AgentProcess,
    manifests::{PodManifest, cluster_yaml, write_file},
};

use super::{add_pod, start_agent};

/// The echo port every pod serves, TCP and UDP.
pub const ECHO_PORT: u16 = 8080;

/// One pod of a [`Site`]: its name, namespace and `app` label.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub app: &'a str,
}

pub struct Site {
    pub topology: Topology,
    /// In the order they were given; pod `i` has addresses `10.77.0.(i+1)`.
    pub pods: Vec<Pod>,
    pub manifests: tempfile::TempDir,
    /// (namespace, app) of each pod, for rewriting `cluster.yaml`.
    placements: Vec<(String, String)>,
    _listeners: Vec<Listener>,
}

impl Site {
    /// # Panics
    /// When the topology or a listener cannot be made.
    pub fn new(pods: &[PodSpec<'_>], policies: &str) -> Self {
        let topology = Topology::new().expect("topology");
        let made: Vec<Pod> = pods
            .iter()
            .zip(1..)
            .map(|(spec, n)| add_pod(&topology, spec.name, n))
            .collect();
        let mut listeners = Vec::new();
        for pod in &made {
            listeners.push(pod.serve_tcp(ECHO_PORT).unwrap());
            listeners.push(pod.serve_udp(ECHO_PORT).unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "policies.yaml", policies).unwrap();
        let site = Self {
            topology,
            pods: made,
            manifests: dir,
            placements: pods
                .iter()
                .map(|spec| (spec.namespace.to_owned(), spec.app.to_owned()))
                .collect(),
            _listeners: listeners,
        };
        site.write_cluster(|_| true);
        site
    }

    /// Writes `cluster.yaml` with the pods `keep` accepts (by name): a pod left out is
    /// gone from the cluster for the agent.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_cluster(&self, keep: impl Fn(&str) -> bool) {
        let labels: Vec<[(&str, &str); 1]> = self
            .placements
            .iter()
            .map(|(_, app)| [("app", app.as_str())])
            .collect();
        let manifests: Vec<PodManifest<'_>> = self
            .pods
            .iter()
            .zip(&self.placements)
            .zip(&labels)
            .filter(|((pod, _), _)| keep(pod.name()))
            .map(|((pod, (namespace, _)), labels)| PodManifest {
                pod,
                namespace,
                labels,
                ports: &[],
            })
            .collect();
        write_file(self.manifests(), "cluster.yaml", &cluster_yaml(&manifests)).unwrap();
    }
    #[must_use]
    pub fn ifindexes(&self) -> Vec<u32> {
        self.pods.iter().map(Pod::host_ifindex).collect()
    }

    #[must_use]
    pub fn manifests(&self) -> &Path {
        self.manifests.path()
    }

    /// Starts an agent on the site and waits until every pod is attached.
    ///
    /// # Panics
    /// When the agent does not attach within 20 s.
    #[must_use]
    pub fn start(&self, args: &[&str]) -> AgentProcess {
        let mut agent = start_agent(&self.topology, self.manifests(), args);
        agent
            .wait_attached(&self.ifindexes(), Duration::from_secs(20))
            .unwrap();
        agent
    }

    /// Replaces the policies file; the agent enforces it within a second.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn rewrite_policies(&self, policies: &str) {
        write_file(self.manifests(), "policies.yaml", policies).unwrap();
    }
}

/// `client`, `server` and `other` in `shop` (each its name as `app`).
pub const SHOP: [PodSpec<'static>; 3] = [
    PodSpec {
        name: "client",
        namespace: "shop",
        app: "client",
    },
    PodSpec {
        name: "server",
        namespace: "shop",
        app: "server",
    },
    PodSpec {
        name: "other",
        namespace: "shop",
        app: "other",
    },
];
