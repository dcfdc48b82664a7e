//! The agent's container image, run the way the `DaemonSet` runs it: built from the
//! Dockerfile by `cargo xtask image --prebuilt` around this test's agent binary, then
//! started by podman in a test node's network namespace (the `DaemonSet`'s `hostNetwork`)
//! with the host's bpffs, the security context of `deploy/kubernetes/30-daemonset.yaml`
//! (every capability dropped but its four, read-only root, no privilege escalation) and
//! a manifest directory mounted read-only. It must enforce a policy on real packets, and
//! `egret cleanup` from the same image must remove every pin.
//!
//! `cargo xtask test` runs it, installing podman from Debian where it is missing, and
//! passes its own path as `EGRET_XTASK`; without it the test is skipped, saying why.

mod common;

use std::{
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{AGENT, PROBE_TIMEOUT, add_pod, egress_policy};
use egret_testbed::{
    Pod, ProbeResult, Topology,
    agent::AgentProcess,
    manifests::{PodManifest, cluster_yaml, write_file},
};

const PODMAN: &str = "podman";
/// The first build on a fresh machine makes the base image from Debian packages.
const BUILD_TIMEOUT: Duration = Duration::from_mins(10);
const PODMAN_TIMEOUT: Duration = Duration::from_mins(1);
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the container sees the test's manifest directory.
const MANIFESTS: &str = "/etc/egret/manifests";
/// The capabilities the `DaemonSet` adds, with their numbers in capability.h.
const DAEMONSET_CAPABILITIES: [(&str, u32); 4] = [
    ("BPF", 39),
    ("NET_ADMIN", 12),
    ("PERFMON", 38),
    ("SYS_RESOURCE", 24),
];

#[test]
fn image_enforces_a_policy_run_like_the_daemonset() {
    if !egret_testbed::require_root("image_enforces_a_policy_run_like_the_daemonset") {
        return;
    }
    let Some(xtask) = std::env::var_os("EGRET_XTASK") else {
        let reason = std::env::var("EGRET_IMAGE_TEST_SKIP").unwrap_or_else(|_| {
            "run it with `cargo xtask test`, which provides podman and EGRET_XTASK".to_owned()
        });
        eprintln!("skipping image_enforces_a_policy_run_like_the_daemonset: {reason}");
        return;
    };
    let name = format!("egret-image-test-{}", std::process::id());
    let scratch = tempfile::tempdir().unwrap();
    let image = Image::build(
        Path::new(&xtask),
        &agent_without_debug_info(scratch.path()),
        &format!("localhost/{name}:latest"),
    );

    let topology = Topology::new().expect("topology");
    let client = add_pod(&topology, "client", 1);
    let server = add_pod(&topology, "server", 2);
    let other = add_pod(&topology, "other", 3);
    let _listeners = [&server, &other].map(|pod| pod.serve_tcp(8080).expect("listener"));
    let manifests = tempfile::tempdir().unwrap();
    let pods = [(&client, "client"), (&server, "server"), (&other, "other")]
        .map(|(pod, app)| (pod, [("app", app)]));
    let pod_manifests: Vec<PodManifest<'_>> = pods
        .iter()
        .map(|(pod, labels)| PodManifest {
            pod,
            namespace: "shop",
            labels,
            ports: &[],
        })
        .collect();
    write_file(
        manifests.path(),
        "cluster.yaml",
        &cluster_yaml(&pod_manifests),
    )
    .unwrap();
    let only_server = "[{to: [{podSelector: {matchLabels: {app: server}}}]}]";
    let policy = egress_policy("client", "client", only_server, "");
    write_file(manifests.path(), "policy.yaml", &policy).unwrap();

    let pins = Pins(AgentProcess::unique_pin_dir());
    let pin_dir = pins.0.to_str().unwrap().to_owned();
    let like_the_daemonset = daemonset_flags(&topology);
    let mut agent = Container::start(
        &name,
        Command::new(PODMAN)
            .args(["run", "--detach", "--name", &name])
            .args(&like_the_daemonset)
            .arg("--volume")
            .arg(format!("{}:{MANIFESTS}:ro", manifests.path().display()))
            .args(["--env", "RUST_LOG=egret=debug,info", &image.tag])
            .args(["run", "--manifests", MANIFESTS, "--node-name", "node-1"])
            .args(["--bpffs", &pin_dir]),
    );
    agent.wait_attached(&pins.0, &[&client, &server, &other]);
    agent.assert_confined(&topology);

    let allowed = client.tcp_connect(server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        allowed.is_connected(),
        "client -> server is allowed: {allowed}\n{}",
        agent.logs()
    );
    let denied = client.tcp_connect(other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        denied.is_timed_out(),
        "client -> other is dropped: {denied}\n{}",
        agent.logs()
    );

    agent.stop();
    assert!(
        pins.0.join("links").is_dir(),
        "the agent leaves its programs attached when it stops"
    );
    let cleanup_name = format!("{name}-cleanup");
    let _removed_if_left = Container {
        name: cleanup_name.clone(),
    };
    let cleanup = run_bounded(
        Command::new(PODMAN)
            .args(["run", "--rm", "--name", &cleanup_name])
            .args(&like_the_daemonset)
            .args([&image.tag, "cleanup", "--bpffs", &pin_dir]),
        PODMAN_TIMEOUT,
    );
    assert!(
        cleanup.status.success(),
        "egret cleanup in the image: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert!(!pins.0.exists(), "egret cleanup removed {pin_dir}");
    let unenforced = connects_soon(&client, other.addr_v4(8080));
    assert!(
        unenforced.is_connected(),
        "nothing drops after cleanup: {unenforced}"
    );
}

/// A copy of the test's agent in `dir` without its debug info, as a release image
/// carries it: a quarter of the size, and the image builds in a third of the time. The
/// agent itself where binutils' objcopy is missing.
fn agent_without_debug_info(dir: &Path) -> PathBuf {
    let stripped = dir.join("egret");
    let status = Command::new("objcopy")
        .args(["--strip-debug", AGENT])
        .arg(&stripped)
        .status();
    if status.is_ok_and(|status| status.success()) {
        stripped
    } else {
        PathBuf::from(AGENT)
    }
}

/// `podman run` flags for what `deploy/kubernetes/30-daemonset.yaml` asks of the
/// container runtime, read from it: the node's network namespace (here the test node's),
/// the host's bpffs and cgroup tree, and the container's security context.
fn daemonset_flags(topology: &Topology) -> Vec<String> {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/30-daemonset.yaml"),
    )
    .unwrap();
    let daemonset: serde_json::Value = serde_yaml_ng::from_str(&manifest).unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let security = &pod["containers"][0]["securityContext"];
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|capability| capability.as_str().unwrap())
        .collect();
    assert_eq!(added, DAEMONSET_CAPABILITIES.map(|(name, _)| name));
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["seccompProfile"]["type"], "Unconfined");
    let (nofile, nproc) = container_limits();
    vec![
        // Kubernetes nodes run runc; Debian 12's crun also refuses hybrid cgroup layouts.
        "--runtime=runc".to_owned(),
        format!("--network=ns:/run/netns/{}", topology.node_netns()),
        "--volume=/sys/fs/bpf:/sys/fs/bpf:rslave".to_owned(),
        "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro".to_owned(),
        "--user=0:0".to_owned(),
        "--cap-drop=all".to_owned(),
        format!("--cap-add={}", added.join(",")),
        // Kubernetes mounts nothing writable over a read-only root; podman would.
        "--read-only".to_owned(),
        "--read-only-tmpfs=false".to_owned(),
        "--security-opt=no-new-privileges".to_owned(),
        "--security-opt=seccomp=unconfined".to_owned(),
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

/// Open files and processes for the container: podman's defaults (2^20 each) would raise
/// hard limits, which needs `CAP_SYS_RESOURCE`, and root lacks it in some CI sandboxes.
/// This process's own limits can always be set; more processes than `pid_max` cannot
/// exist (and podman runs with no more).
fn container_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = |name: &str| {
        let line = limits
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("/proc/self/limits: {name}"));
        // Name (with spaces), soft, hard, units.
        let hard = line.split_whitespace().rev().nth(1).unwrap();
        hard.parse::<u64>().unwrap_or(u64::MAX)
    };
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (
        hard("Max open files").min(1 << 20),
        hard("Max processes").min(pid_max),
    )
}

/// The image under test, removed when dropped.
struct Image {
    tag: String,
}

impl Image {
    fn build(xtask: &Path, agent: &Path, tag: &str) -> Self {
        let image = Self {
            tag: tag.to_owned(),
        };
        let started = Instant::now();
        let output = run_bounded(
            Command::new(xtask)
                .args(["image", "--engine", PODMAN, "--tag", tag, "--prebuilt"])
                .arg(agent),
            BUILD_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "cargo xtask image --prebuilt failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("built {tag} in {:?}", started.elapsed());
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run_quietly(Command::new(PODMAN).args(["rmi", "--force", &self.tag]));
    }
}

/// A container started in the background, removed (killed if need be) when dropped.
struct Container {
    name: String,
}

impl Container {
    fn start(name: &str, run: &mut Command) -> Self {
        let container = Self {
            name: name.to_owned(),
        };
        let output = run_bounded(run, PODMAN_TIMEOUT);
        assert!(
            output.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        container
    }

    fn inspect(&self, format: &str) -> String {
        let output = run_bounded(
            Command::new(PODMAN).args(["container", "inspect", "--format", format, &self.name]),
            PODMAN_TIMEOUT,
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn logs(&self) -> String {
        let output = run_bounded(
            Command::new(PODMAN).args(["logs", &self.name]),
            PODMAN_TIMEOUT,
        );
        format!(
            "agent log:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Waits until the agent pinned a link on every pod's host interface.
    fn wait_attached(&mut self, pin_dir: &Path, pods: &[&Pod]) {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let attached = pods.iter().all(|pod| {
                pin_dir
                    .join("links")
                    .join(format!("from_pod_if{}", pod.host_ifindex()))
                    .exists()
            });
            if attached {
                return;
            }
            assert!(
                self.inspect("{{.State.Running}}") == "true",
                "the agent's container exited ({}) before attaching\n{}",
                self.inspect("{{.State.ExitCode}}"),
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "the agent did not attach within {ATTACH_TIMEOUT:?}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's process holds the `DaemonSet`'s capabilities and nothing more, cannot
    /// gain privileges, has a read-only root, and lives in the node's network namespace.
    fn assert_confined(&self, topology: &Topology) {
        let pid = self.inspect("{{.State.Pid}}");
        let proc = Path::new("/proc").join(&pid);
        let status = std::fs::read_to_string(proc.join("status")).unwrap();
        let own_status = std::fs::read_to_string("/proc/self/status").unwrap();
        let granted = DAEMONSET_CAPABILITIES
            .iter()
            .fold(0_u64, |mask, (_, number)| mask | (1 << number));
        let own_bounding = capabilities(&own_status, "CapBnd:");
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                capabilities(&status, set),
                granted & own_bounding,
                "{set} the DaemonSet's four capabilities (those this host grants)"
            );
        }
        assert_eq!(
            status_field(&status, "NoNewPrivs:"),
            "1",
            "allowPrivilegeEscalation: false"
        );
        let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).unwrap();
        let root = mountinfo
            .lines()
            .map(|line| line.split(' ').collect::<Vec<_>>())
            // The last mount on / is the one the process sees.
            .rfind(|fields| fields[4] == "/")
            .expect("a root mount");
        assert!(
            root[5].split(',').any(|option| option == "ro"),
            "read-only root: {root:?}"
        );
        let netns = |path: PathBuf| std::fs::metadata(path).unwrap().ino();
        assert_eq!(
            netns(proc.join("ns/net")),
            netns(Path::new("/run/netns").join(topology.node_netns())),
            "the agent runs in the node's network namespace"
        );
    }

    /// Stops the agent as the kubelet does (SIGTERM, then SIGKILL after a grace period).
    fn stop(&mut self) {
        let output = run_bounded(
            Command::new(PODMAN).args(["stop", "--time", "10", &self.name]),
            PODMAN_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "podman stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ =
            run_quietly(Command::new(PODMAN).args(["rm", "--force", "--time", "0", &self.name]));
    }
}

/// A field of a `/proc/PID/status` file.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
        .trim()
}

/// A capability set of a `/proc/PID/status` file, as a mask.
fn capabilities(status: &str, set: &str) -> u64 {
    u64::from_str_radix(status_field(status, set), 16).unwrap()
}

/// The test's pin directory; whatever is left in it is removed when dropped (the
/// host's agent binary is the same as the image's).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = run_quietly(
                Command::new(AGENT)
                    .arg("cleanup")
                    .arg("--bpffs")
                    .arg(&self.0),
            );
        }
    }
}

/// Runs `command` to completion, killing it after `timeout` (then panicking).
fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {command:?}: {error}"));
    let readers = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .map(|mut pipe| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let [stdout, stderr] = readers.map(|reader| reader.join().unwrap_or_default());
    Output {
        status,
        stdout,
        stderr,
    }
}

/// For guards: runs `command` with a bound, ignoring its output, never panicking.
fn run_quietly(command: &mut Command) -> Option<()> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + PODMAN_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().ok()?.is_some() {
            return Some(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A connection from `pod` to `to`, retried for a few seconds until it connects: the
/// kernel releases an unpinned link from a work queue, so the detach can trail the unlink.
fn connects_soon(pod: &Pod, to: std::net::SocketAddr) -> ProbeResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let probe = pod.tcp_connect(to, PROBE_TIMEOUT);
        if probe.is_connected() || Instant::now() >= deadline {
            return probe;
        }
    }
}
