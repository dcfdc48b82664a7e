//! `--attach cgroup`: the programs attach to each pod's cgroup v2 (found from its UID,
//! kubelet-style), and judge what processes in that cgroup send.

mod common;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{add_pod, egress_policy, start_agent};
use egret_testbed::{Pod, Topology, manifests::write_file};

/// A kubelet-like cgroup tree for one pod, removed on drop.
struct PodCgroup {
    root: PathBuf,
    pod: PathBuf,
}

impl PodCgroup {
    fn new(uid: &str) -> Self {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let cgroup2 = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("a cgroup v2 hierarchy");
        let root = cgroup2.join(format!("egret-test-{}-{uid}", std::process::id()));
        let pod = root
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ));
        std::fs::create_dir_all(&pod).unwrap();
        Self { root, pod }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.pod).unwrap().ino()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Leaf first; the probe processes have exited, so the cgroups are empty.
        let mut dir = self.pod.clone();
        while dir.starts_with(&self.root) {
            let _ = std::fs::remove_dir(&dir);
            if !dir.pop() {
                break;
            }
        }
    }
}

/// A TCP connect from a process in `pod`'s network namespace, inside `cgroup` when
/// given: true when it connected.
fn connects(pod: &Pod, cgroup: Option<&Path>, target: std::net::SocketAddr) -> bool {
    let join = cgroup
        .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display()))
        .unwrap_or_default();
    let script = format!(
        "{join}exec timeout 1 bash -c '</dev/tcp/{}/{}'",
        target.ip(),
        target.port()
    );
    pod.command("bash")
        .args(["-c", &script])
        .status()
        .is_ok_and(|s| s.success())
}

fn manifests(pods: &[(&Pod, &str, &str)]) -> String {
    pods.iter()
        .map(|(pod, app, uid)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: shop, uid: {uid}, labels: {{app: {app}}}}}\nspec: {{nodeName: node-1, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}, {{ip: '{}'}}]}}\n",
                pod.name(),
                pod.ipv4(),
                pod.ipv6()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn cgroup_mode_judges_what_the_pods_processes_send() {
    if !egret_testbed::require_root("cgroup_mode_judges_what_the_pods_processes_send") {
        return;
    }
    let topology = Topology::new().unwrap();
    let client = add_pod(&topology, "client", 1);
    let server = add_pod(&topology, "server", 2);
    let other = add_pod(&topology, "other", 3);
    let _echoes = [&server, &other].map(|p| p.serve_tcp(8080).unwrap());
    let uid = "6b9f3c2e-1111-4c5d-9e8f-000000000001";
    let cgroup = PodCgroup::new(uid);

    let dir = tempfile::tempdir().unwrap();
    let pods = [
        (&client, "client", uid),
        (&server, "server", "u-server"),
        (&other, "other", "u-other"),
    ];
    write_file(dir.path(), "cluster.yaml", &manifests(&pods)).unwrap();
    write_file(
        dir.path(),
        "policy.yaml",
        &egress_policy(
            "client",
            "client",
            "[{to: [{podSelector: {matchLabels: {app: server}}}]}]",
            "",
        ),
    )
    .unwrap();
    let cgroup_root = cgroup.root.to_str().unwrap().to_owned();
    let agent = start_agent(
        &topology,
        dir.path(),
        &["--attach", "cgroup", "--cgroup-root", &cgroup_root],
    );
    let link = agent
        .pin_dir()
        .join("links")
        .join(format!("cg_egress_cg{}", cgroup.id()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !link.exists() {
        assert!(
            Instant::now() < deadline,
            "never attached to the pod's cgroup:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    assert!(
        connects(&client, Some(&cgroup.pod), server.addr_v4(8080)),
        "allowed by policy\n{}",
        agent.log()
    );
    assert!(
        connects(&client, Some(&cgroup.pod), server.addr_v6(8080)),
        "allowed over IPv6 too"
    );
    assert!(
        !connects(&client, Some(&cgroup.pod), other.addr_v4(8080)),
        "denied for the pod's processes"
    );
    // The endpoint is its cgroup, not its address: a process outside it is not judged.
    assert!(
        connects(&client, None, other.addr_v4(8080)),
        "a process outside the pod's cgroup"
    );
    let pin_dir = agent.pin_dir().to_str().unwrap().to_owned();
    let output = agent
        .command(
            &topology,
            &["counters", "--bpffs", &pin_dir, "--output", "json"],
        )
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r["verdict"] == "deny" && r["endpoint"] != 0),
        "denials are counted under the pod's endpoint: {rows:?}"
    );
}
