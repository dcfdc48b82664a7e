//! The deployment artifacts, checked without a cluster: the plain manifests
//! (`deploy/kubernetes/`), the Helm chart (`deploy/helm/egret/`), the `Dockerfile` and the
//! example policies (`deploy/examples/`).
//!
//! Every manifest is decoded into its `k8s-openapi` type, and a field the type does not
//! know fails the test (the API server would drop or reject it). Flags are checked against
//! what `egret run --help` says today, so a flag renamed in the agent breaks this test,
//! not a cluster. External tools are used when this machine has them, with a note when
//! not: `kubectl` (its own YAML reader and kind mapping, offline) and a Helm renderer
//! (a `helm` binary, or the `helm-python-sdk` package from `PyPI`, which embeds Helm's
//! Go engine); without one, the chart's templates are only checked for the same kinds.

mod deploy_checks;

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use deploy_checks::{
    AGENT, NAMESPACE, helm,
    help::help,
    install::{CAPABILITIES, agent_daemonset, check_cleanup, check_install, image_of},
    objects::{Object, decode_all, kubectl_reads, load, only, parse_stream, plain, yaml_files},
    repo,
};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};

const IMAGE_REPOSITORY: &str = "ghcr.io/egret-dev/egret";

// ---------------------------------------------------------------------------------------
// The plain manifests.

#[test]
fn plain_manifests_are_one_directory_that_applies_in_order() {
    let files = yaml_files(&repo().join("deploy/kubernetes"));
    let objects = load(&files);
    let first = &parse_stream("", &std::fs::read_to_string(&files[0]).unwrap())[0];
    assert_eq!(
        first.kind(),
        "Namespace",
        "kubectl applies files in name order: the Namespace first"
    );
    assert_eq!(first.name(), NAMESPACE);
    let kinds: BTreeSet<&str> = objects.iter().map(Object::kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Service"
        ]),
        "only built-in kinds: `kubectl apply -f deploy/kubernetes/` must work on a bare cluster"
    );
    for object in &objects {
        let cluster_scoped =
            ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&object.kind());
        let expected = if cluster_scoped { "" } else { NAMESPACE };
        assert_eq!(object.namespace(), expected, "{}", object.key());
    }
    assert_eq!(
        decode_all(&objects),
        BTreeSet::new(),
        "every object has an API type"
    );
    let mut everything = objects.clone();
    everything.extend(plain("optional"));
    everything.extend(plain("uninstall"));
    assert_eq!(
        decode_all(&everything),
        BTreeSet::from(["monitoring.coreos.com/v1/PodMonitor".to_owned()])
    );
    // Without -R, as `kubectl apply -f deploy/kubernetes/` reads it: no subdirectory.
    kubectl_reads(&repo().join("deploy/kubernetes"), None, &objects);
    for subdir in ["optional", "uninstall"] {
        let path = repo().join("deploy/kubernetes").join(subdir);
        kubectl_reads(&path, None, &plain(subdir));
    }
}

#[test]
fn plain_manifests_hold_the_invariants() {
    let objects = plain("");
    let pending = check_install(&objects);
    assert_eq!(
        pending,
        Vec::<String>::new(),
        "the plain manifests pass no flag the agent lacks"
    );
    let (_, _, container) = agent_daemonset(&objects);
    assert_eq!(
        image_of(&container),
        format!("{IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn pod_monitor_scrapes_the_agents_metrics_port() {
    let objects = plain("");
    let monitor = only(&plain("optional"), "PodMonitor").clone();
    assert_eq!(monitor.namespace(), NAMESPACE);
    let (daemonset, _, container) = agent_daemonset(&objects);
    let pod_labels = daemonset.spec.template.metadata.unwrap().labels.unwrap();
    let selector = monitor
        .value
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            pod_labels.get(key).map(String::as_str),
            value.as_str(),
            "selects the agent pods"
        );
    }
    let endpoint = &monitor.value["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = endpoint["port"].as_str().expect("a named port");
    assert!(
        container
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(port)),
        "port {port}"
    );
}

#[test]
fn uninstall_cleans_every_node_with_the_agents_pin_directory() {
    check_cleanup(&plain("uninstall"), &plain(""));
}

// ---------------------------------------------------------------------------------------
// The README documents what the manifests grant.

#[test]
fn readme_explains_every_capability_and_the_install() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("## Install on a cluster")
        .nth(1)
        .expect("README: an \"Install on a cluster\" section");
    let section = section.split("\n## ").next().unwrap();
    for capability in CAPABILITIES {
        assert!(
            section.contains(&format!("CAP_{capability}")),
            "README: why CAP_{capability}"
        );
    }
    for needed in [
        "CAP_SYS_ADMIN",
        "kubectl -n egret-system get ds",
        "egret cleanup",
        "cargo xtask image",
        "/metrics",
    ] {
        assert!(section.contains(needed), "README install section: {needed}");
    }
}

// ---------------------------------------------------------------------------------------
// The image.

/// Dockerfile instructions, with continuation lines joined and comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (instruction, rest) = current.split_once(' ').unwrap_or((&current, ""));
        instructions.push((instruction.to_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    instructions
}

fn quoted_const<'a>(source: &'a str, name: &str) -> &'a str {
    let line = source
        .lines()
        .find(|line| line.contains(&format!("const {name}")))
        .unwrap_or_else(|| panic!("setup.rs: const {name}"));
    line.split('"').nth(1).unwrap()
}

#[test]
fn image_builds_with_the_setup_toolchain_and_runs_the_agent() {
    let instructions = dockerfile();
    let stages: Vec<usize> = (0..instructions.len())
        .filter(|&i| instructions[i].0 == "FROM")
        .collect();
    assert!(
        stages.len() >= 2,
        "multi-stage: build, then a minimal runtime"
    );
    let last = *stages.last().unwrap();
    let (build, runtime) = instructions.split_at(last);
    let build_name = build[stages[stages.len() - 2]]
        .1
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();

    let runtime_base = &runtime[0].1;
    assert!(
        runtime_base.contains("distroless/cc") || runtime_base.contains("-slim"),
        "a minimal runtime base, not {runtime_base}"
    );
    let entrypoint = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> =
        serde_json::from_str(&entrypoint.1).expect("ENTRYPOINT in exec form");
    assert_eq!(
        entrypoint,
        ["/usr/local/bin/egret"],
        "the image runs the agent binary"
    );
    assert!(
        runtime.iter().any(|(i, rest)| i == "COPY"
            && rest.starts_with(&format!("--from={build_name} "))
            && rest.ends_with(" /usr/local/bin/egret")),
        "the runtime stage copies egret from the build stage"
    );
    for (instruction, rest) in runtime {
        if instruction == "USER" {
            assert!(
                ["0", "0:0", "root"].contains(&rest.as_str()),
                "BPF needs root: USER {rest}"
            );
        }
    }

    let runs: String = build
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, rest)| rest.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "cargo build",
        "--locked",
        "--release",
        "--package egret",
        "/usr/local/bin/egret",
        "rustup component add rust-src",
    ] {
        assert!(runs.contains(needed), "build stage: {needed}");
    }
    let setup = std::fs::read_to_string(repo().join("xtask/src/setup.rs")).unwrap();
    let linker = quoted_const(&setup, "BPF_LINKER_VERSION");
    assert!(
        runs.contains(&format!("bpf-linker --version {linker}")),
        "bpf-linker {linker}, as setup.rs"
    );
    let prefix = quoted_const(&setup, "LLVM_PREFIX");
    assert!(
        runs.contains(&format!("LLVM_PREFIX={prefix}")),
        "LLVM_PREFIX={prefix}, as setup.rs"
    );
    for package in setup
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix("\","))
    {
        if package.starts_with("llvm-") || package.starts_with("libpolly-") {
            assert!(
                runs.contains(package),
                "the build stage installs {package}, as setup.rs"
            );
        }
    }
    let workspace = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let workspace = workspace.replace("rust-version =", "const RUST =");
    let rust = quoted_const(&workspace, "RUST");
    assert!(
        build
            .iter()
            .any(|(i, rest)| i == "ARG" && rest == &format!("RUST_VERSION={rust}")),
        "the build stage's Rust is the workspace's rust-version {rust}"
    );
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(
        ignored.lines().any(|l| l.trim_end_matches('/') == "target"),
        ".dockerignore: target/"
    );
}

// ---------------------------------------------------------------------------------------
// The Helm chart.

#[test]
fn helm_chart_renders_the_plain_manifests() {
    let mut plain_kinds: BTreeSet<String> = plain("").iter().map(|o| o.kind().to_owned()).collect();
    plain_kinds.insert("PodMonitor".to_owned());
    let Some(renderer) = helm::renderer() else {
        assert_eq!(
            helm::template_kinds(),
            plain_kinds,
            "the chart's templates hold the plain manifests' kinds"
        );
        return;
    };
    let (text, objects) = helm::rendered(&renderer, &json!({"namespace": {"create": true}}));
    helm::assert_same_objects(&plain(""), &objects);
    assert_eq!(
        check_install(&objects),
        Vec::<String>::new(),
        "default values pass no flag the agent lacks"
    );
    kubectl_reads(Path::new("-"), Some(&text), &objects);

    let (_, with_monitor) = helm::rendered(
        &renderer,
        &json!({"metrics": {"podMonitor": {"enabled": true}}}),
    );
    let monitors: Vec<Object> = with_monitor
        .into_iter()
        .filter(|o| o.kind() == "PodMonitor")
        .collect();
    helm::assert_same_objects(&plain("optional"), &monitors);

    let (_, uninstall) = helm::rendered(&renderer, &json!({"cleanup": {"enabled": true}}));
    assert!(
        uninstall
            .iter()
            .all(|o| !(o.kind() == "DaemonSet" && o.name() == "egret")),
        "cleanup replaces the agent, which would pin everything again"
    );
    let cleanup: Vec<Object> = uninstall
        .into_iter()
        .filter(|o| o.kind() == "DaemonSet")
        .collect();
    helm::assert_same_objects(&plain("uninstall"), &cleanup);
    check_cleanup(&cleanup, &objects);
}

#[test]
fn helm_values_become_flags_the_agent_reads() {
    let Some(renderer) = helm::renderer() else {
        return;
    };
    let values = json!({
        "agent": {"mode": "audit", "unknownPod": "deny", "established": "keep", "attach": "cgroup"},
        "flowLog": {"file": "flows.jsonl", "allowed": true},
        "metrics": {"port": 9962},
    });
    let (_, objects) = helm::rendered(&renderer, &values);
    let pending = check_install(&objects);
    if !pending.is_empty() {
        eprintln!("note: values used flags `egret run --help` does not list yet: {pending:?}");
    }
    let config: ConfigMap = only(&objects, "ConfigMap").decode();
    let data = config.data.unwrap();
    for (key, value) in [
        ("EGRET_MODE", "audit"),
        ("EGRET_UNKNOWN_POD", "deny"),
        ("EGRET_ESTABLISHED", "keep"),
        ("EGRET_ATTACH", "cgroup"),
    ] {
        assert_eq!(data.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(data["EGRET_METRICS_ADDR"], "0.0.0.0:9962");
    let (_, pod, container) = agent_daemonset(&objects);
    assert_eq!(
        container.ports.unwrap()[0].container_port,
        9962,
        "probes and annotations follow (checked above)"
    );
    let args = container.args.unwrap();
    assert!(args.contains(&"--flow-log-allowed".to_owned()));
    let flow_log = &data["EGRET_FLOW_LOG"];
    let log_dir = container
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == "flow-log")
        .expect("a flow-log mount");
    assert!(
        flow_log.starts_with(&format!("{}/", log_dir.mount_path)),
        "{flow_log} is on the mounted directory"
    );
    assert!(
        pod.volumes
            .unwrap()
            .iter()
            .any(|v| v.name == "flow-log" && v.host_path.is_some())
    );

    let refused = helm::render(&renderer, &json!({"agent": {"mode": "block"}}));
    assert!(
        refused.is_err(),
        "values.schema.json refuses a mode the agent does not have"
    );
}

#[test]
fn helm_schema_offers_the_values_the_agent_accepts() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join(helm::CHART).join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let help = help("run");
    for (value, flag) in [
        ("mode", "--mode"),
        ("unknownPod", "--unknown-pod"),
        ("established", "--established"),
        ("logFormat", "--log-format"),
    ] {
        let offered: BTreeSet<&str> = schema["properties"]["agent"]["properties"][value]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("schema: agent.{value} enum"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let accepted: BTreeSet<&str> = help.flags[flag]
            .possible_values
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            offered, accepted,
            "agent.{value} offers what {flag} accepts"
        );
    }
    let chart = std::fs::read_to_string(repo().join(helm::CHART).join("Chart.yaml")).unwrap();
    assert!(
        chart
            .lines()
            .any(|l| l == format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"))),
        "the chart's appVersion is the agent's version"
    );
}

// ---------------------------------------------------------------------------------------
// The example policies.

fn simulate(dir: &Path, queries: &str) -> (Vec<Value>, String) {
    let mut child = Command::new(AGENT)
        .args(["simulate", "--manifests"])
        .arg(dir)
        .args(["--queries", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(queries.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "egret simulate: {stderr}");
    let answers = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (answers, stderr)
}

#[test]
fn example_manifests_load_without_problems() {
    let examples = repo().join("deploy/examples");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 2, "the shop cluster and the policies");
    for dir in dirs {
        decode_all(&load(&yaml_files(&dir)));
        let (_, problems) = simulate(&dir, "");
        assert_eq!(problems, "", "{}: egret reports problems", dir.display());
    }
}

/// Pods for the example policies: kube-dns, two shop pods, a payments and an analytics pod.
const EXAMPLE_CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Namespace
metadata: {name: analytics}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: gateway, namespace: payments, labels: {app: gateway}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reports, namespace: analytics, labels: {app: reports}}
spec: {nodeName: n1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.3.1}
";

#[test]
fn example_policies_allow_and_deny_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.yaml"), EXAMPLE_CLUSTER).unwrap();
    for file in yaml_files(&repo().join("deploy/examples/policies")) {
        std::fs::copy(&file, dir.path().join(file.file_name().unwrap())).unwrap();
    }
    // (from, to, port, protocol, verdict, audit-only denial)
    let cases = [
        ("shop/web", "kube-system/coredns", 53, "UDP", "allow", false),
        ("shop/web", "kube-system/coredns", 53, "TCP", "allow", false),
        ("shop/web", "kube-system/coredns", 80, "TCP", "deny", false),
        ("shop/web", "203.0.113.10", 443, "TCP", "allow", false),
        ("shop/web", "203.0.113.10", 80, "TCP", "deny", false),
        ("shop/web", "10.1.2.3", 443, "TCP", "deny", false),
        ("shop/web", "169.254.169.254", 443, "TCP", "deny", false),
        ("shop/web", "payments/gateway", 8443, "TCP", "deny", false),
        ("shop/api", "payments/gateway", 8443, "TCP", "allow", false),
        ("shop/api", "payments/gateway", 9000, "UDP", "allow", false),
        ("shop/api", "203.0.113.10", 443, "TCP", "deny", false),
        ("analytics/reports", "shop/api", 8080, "TCP", "allow", false),
        (
            "analytics/reports",
            "kube-system/coredns",
            53,
            "UDP",
            "allow",
            false,
        ),
        (
            "analytics/reports",
            "payments/gateway",
            8443,
            "TCP",
            "deny",
            true,
        ),
        (
            "payments/gateway",
            "203.0.113.10",
            25,
            "TCP",
            "allow",
            false,
        ),
    ];
    let queries = cases
        .iter()
        .map(|(from, to, port, protocol, ..)| {
            json!({"from": from, "to": to, "port": port, "protocol": protocol}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (answers, problems) = simulate(dir.path(), &queries);
    assert_eq!(problems, "");
    assert_eq!(answers.len(), cases.len());
    for (case, answer) in cases.iter().zip(&answers) {
        let (from, to, port, protocol, verdict, audit) = case;
        assert_eq!(
            answer["verdict"], *verdict,
            "{from} -> {to}:{port}/{protocol}: {answer}"
        );
        assert_eq!(
            answer["audit"].as_bool().unwrap_or(false),
            *audit,
            "{from} -> {to}:{port}/{protocol}: {answer}"
        );
    }
}
