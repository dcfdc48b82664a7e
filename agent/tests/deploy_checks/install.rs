//! The invariants of an install, for the plain manifests and for every chart rendering.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::json;

use super::{
    NAMESPACE,
    args::check_args,
    help::help,
    objects::{Object, decode_all, only},
};

/// What the agent reads, by (API group, resource): nothing else, and only read verbs.
const WATCHED: [(&str, &str); 6] = [
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("networking.k8s.io", "networkpolicies"),
    ("discovery.k8s.io", "endpointslices"),
    ("policy.networking.k8s.io", "clusternetworkpolicies"),
];
const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

/// The agent's capabilities; the README explains each one.
pub const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

/// The agent's `DaemonSet`: the one whose container runs `egret run`.
pub fn agent_daemonset(objects: &[Object]) -> (DaemonSet, PodSpec, Container) {
    let mut found = objects.iter().filter(|object| {
        object.kind() == "DaemonSet"
            && object
                .value
                .pointer("/spec/template/spec/containers/0/args/0")
                == Some(&json!("run"))
    });
    let object = found.next().expect("a DaemonSet running `egret run`");
    assert!(found.next().is_none(), "two agent DaemonSets");
    let daemonset: DaemonSet = object.decode();
    let pod = daemonset.spec.clone().template.spec.unwrap();
    assert_eq!(pod.containers.len(), 1, "the agent pod has one container");
    let container = pod.containers[0].clone();
    (daemonset, pod, container)
}

pub fn check_rbac(objects: &[Object]) {
    for kind in ["Role", "RoleBinding"] {
        assert!(
            objects.iter().all(|o| o.kind() != kind),
            "no namespaced {kind}: the agent reads cluster-wide"
        );
    }
    let role: ClusterRole = only(objects, "ClusterRole").decode();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, READ_VERBS, "verbs of {rule:?}");
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                assert!(
                    granted.insert((group.clone(), resource.clone())),
                    "{group}/{resource} twice"
                );
            }
        }
    }
    let watched: BTreeSet<(String, String)> = WATCHED
        .iter()
        .map(|(group, resource)| ((*group).to_owned(), (*resource).to_owned()))
        .collect();
    assert_eq!(
        granted, watched,
        "the ClusterRole grants exactly what the agent watches"
    );

    let binding: ClusterRoleBinding = only(objects, "ClusterRoleBinding").decode();
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(binding.role_ref.name.as_str()),
        role.metadata.name.as_deref()
    );
    let account: ServiceAccount = only(objects, "ServiceAccount").decode();
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "bound to the agent's ServiceAccount only"
    );
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    let (_, pod, _) = agent_daemonset(objects);
    assert_eq!(
        pod.service_account_name, account.metadata.name,
        "the agent runs as that ServiceAccount"
    );
}

pub fn check_pod(pod: &PodSpec) {
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "cluster DNS from the host network"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(
                |toleration| toleration.operator.as_deref() == Some("Exists")
                    && toleration.key.is_none()
                    && toleration.effect.is_none()
            ),
        "a toleration of every taint, to run on every node"
    );
}

pub fn check_security(container: &Container) {
    let security = container
        .security_context
        .clone()
        .expect("a securityContext");
    assert_ne!(security.privileged, Some(true), "never privileged");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(
        capabilities.drop.unwrap_or_default(),
        ["ALL"],
        "drop ALL first"
    );
    let added: BTreeSet<String> = capabilities.add.unwrap_or_default().into_iter().collect();
    let expected: BTreeSet<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    assert_eq!(added, expected, "exactly the documented capabilities");
    assert!(!added.contains("SYS_ADMIN") && !added.contains("CAP_SYS_ADMIN"));
}

pub fn check_mounts(pod: &PodSpec, container: &Container) {
    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|volume| Some((volume.name.clone(), volume.host_path.clone()?.path)))
        .collect();
    for path in host_paths.values() {
        assert!(
            ["/sys/fs/bpf", "/sys/fs/cgroup", "/var/log/egret"].contains(&path.as_str()),
            "hostPath {path} is none the agent needs"
        );
    }
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mount_of = |host: &str| {
        mounts
            .iter()
            .find(|mount| host_paths.get(&mount.name).map(String::as_str) == Some(host))
            .unwrap_or_else(|| panic!("{host} is not mounted"))
    };
    let bpffs = mount_of("/sys/fs/bpf");
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_ne!(bpffs.read_only, Some(true), "pins are written to bpffs");
    assert_ne!(
        bpffs.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "Bidirectional needs privileged"
    );
    let cgroup = mount_of("/sys/fs/cgroup");
    assert_eq!(cgroup.mount_path, "/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true), "cgroupfs is only read");
}

/// The port the probes, the annotations and the Service must agree on.
pub fn check_metrics(objects: &[Object], daemonset: &DaemonSet, container: &Container) -> i32 {
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|port| port.name.as_deref() == Some("metrics"))
        .expect("a container port named metrics")
        .container_port;
    let probe_target = |probe: &Option<Probe>, what: &str| {
        let get = probe
            .clone()
            .and_then(|probe| probe.http_get)
            .unwrap_or_else(|| panic!("{what}: httpGet"));
        let hits = match &get.port {
            IntOrString::String(name) => name == "metrics",
            IntOrString::Int(number) => *number == port,
        };
        assert!(hits, "{what} probes the metrics port, not {:?}", get.port);
        get.path.unwrap_or_default()
    };
    assert_eq!(
        probe_target(&container.liveness_probe, "liveness"),
        "/healthz",
        "liveness probes /healthz"
    );
    assert_eq!(
        probe_target(&container.readiness_probe, "readiness"),
        "/readyz",
        "readiness probes /readyz"
    );
    if container.startup_probe.is_some() {
        assert_eq!(
            probe_target(&container.startup_probe, "startup"),
            "/healthz"
        );
    }
    let template = daemonset.spec.clone().template.metadata.unwrap_or_default();
    let annotations = template.annotations.unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&port.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );

    let service: Service = only(objects, "Service").decode();
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    let pod_labels = template.labels.unwrap_or_default();
    for (key, value) in spec.selector.unwrap_or_default() {
        assert_eq!(
            pod_labels.get(&key),
            Some(&value),
            "the Service selects the agent pods"
        );
    }
    let service_port = &spec.ports.unwrap()[0];
    assert_eq!(service_port.port, port);
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String("metrics".to_owned()))
    );
    port
}

pub fn check_resources(container: &Container) {
    let resources = container.resources.clone().expect("resources");
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "requests"
    );
    assert!(limits.contains_key("memory"), "a memory limit");
}

/// Everything an install must hold; returns the pending flags the agent is given.
pub fn check_install(objects: &[Object]) -> Vec<String> {
    let help = help("run");
    decode_all(objects);
    check_rbac(objects);
    let (daemonset, pod, container) = agent_daemonset(objects);
    let spec = daemonset.spec.clone();
    let strategy = spec.update_strategy.clone().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy.rolling_update.unwrap().max_unavailable,
        Some(IntOrString::Int(1)),
        "one node at a time: pins carry enforcement across the restart"
    );
    let pod_labels = spec.template.metadata.clone().unwrap().labels.unwrap();
    for (key, value) in spec.selector.match_labels.clone().unwrap() {
        assert_eq!(
            pod_labels.get(&key),
            Some(&value),
            "the selector matches the pods"
        );
    }
    check_pod(&pod);
    check_security(&container);
    check_mounts(&pod, &container);
    let port = check_metrics(objects, &daemonset, &container);
    check_resources(&container);
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|var| var.name == "NODE_NAME")
        .and_then(|var| var.value_from.clone()?.field_ref)
        .expect("NODE_NAME from the downward API");
    assert_eq!(node_name.field_path, "spec.nodeName");
    assert!(
        container
            .args
            .iter()
            .flatten()
            .any(|arg| arg == "--node-name=$(NODE_NAME)"),
        "the agent is told its node"
    );
    assert_eq!(
        bpffs_arg(&container),
        "/sys/fs/bpf/egret",
        "pins under the mounted bpffs"
    );
    let passed = check_args(objects, &container, "run", &help);
    assert!(
        !passed.values.contains_key("--manifests"),
        "in a cluster the agent reads the API server"
    );
    let metrics_addr = match passed.values.get("--metrics-addr") {
        Some(value) => value.clone().unwrap_or_default(),
        None => help.flags["--metrics-addr"]
            .default
            .clone()
            .unwrap_or_default(),
    };
    assert_eq!(
        metrics_addr.rsplit(':').next(),
        Some(port.to_string().as_str()),
        "the agent serves /metrics, /healthz and /readyz on the probed port, not {metrics_addr}"
    );
    passed.pending
}

pub fn bpffs_arg(container: &Container) -> String {
    container
        .args
        .iter()
        .flatten()
        .find_map(|arg| arg.strip_prefix("--bpffs="))
        .expect("--bpffs")
        .to_owned()
}

pub fn image_of(container: &Container) -> String {
    container.image.clone().expect("an image")
}

pub fn check_cleanup(cleanup_objects: &[Object], install: &[Object]) {
    decode_all(cleanup_objects);
    let object = cleanup_objects
        .iter()
        .find(|o| o.kind() == "DaemonSet" && o.name().ends_with("cleanup"))
        .expect("a cleanup DaemonSet: one run per node");
    let daemonset: DaemonSet = object.decode();
    let pod = daemonset.spec.template.spec.unwrap();
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "every node, like the agent"
    );
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "it reads no API object"
    );
    let init = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(init.len(), 1);
    let cleanup = &init[0];
    let passed = check_args(cleanup_objects, cleanup, "cleanup", &help("cleanup"));
    assert!(passed.pending.is_empty());
    let (_, _, agent) = agent_daemonset(install);
    assert_eq!(
        bpffs_arg(cleanup),
        bpffs_arg(&agent),
        "cleans what the agent pinned"
    );
    assert_eq!(image_of(cleanup), image_of(&agent));
    let security = cleanup.security_context.clone().unwrap();
    assert_ne!(security.privileged, Some(true));
    let capabilities = security.capabilities.unwrap();
    assert_eq!(capabilities.drop.unwrap_or_default(), ["ALL"]);
    assert_eq!(capabilities.add, None, "unpinning needs no capability");
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.host_path.clone())
        .expect("hostPath");
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    for container in &pod.containers {
        let security = container.security_context.clone().unwrap();
        assert_eq!(
            security.run_as_non_root,
            Some(true),
            "{} holds the pod, nothing more",
            container.name
        );
    }
}
