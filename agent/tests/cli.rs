//! What a user meets at the edges of the `egret` binary: logs without colour codes off a
//! terminal, errors that say what to do about the pin directory, one-line `--help` for
//! every command, manifest documents Egret does not read reported by name, and text
//! tables whose columns line up.

mod common;

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::{AGENT, add_pod, assert_table_aligned, egress_policy, start_agent};
use egret_testbed::{
    Topology,
    manifests::{PodManifest, cluster_yaml, write_file},
};

const ESC: u8 = 0x1b;

fn egret(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        // Short errors: no backtrace appended to the message under test.
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .output()
        .expect("egret runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const DEPLOYMENT: &str =
    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n";
const CONFIG_MAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n";
const OLD_POLICY: &str = "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: legacy, namespace: shop}\nspec: {podSelector: {}}\n";

#[test]
fn logs_to_a_pipe_carry_no_colour_codes_and_name_what_was_not_read() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "app.yaml",
        &[DEPLOYMENT, CONFIG_MAP, OLD_POLICY].join("---\n"),
    )
    .unwrap();
    let manifests = dir.path().to_str().unwrap();
    for format in ["text", "json"] {
        let output = egret(&[
            "simulate",
            "--manifests",
            manifests,
            "--queries",
            "/dev/null",
            "--log-format",
            format,
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let log = stderr(&output);
        // An info line for each unread kind and a warning for the policy: the levels
        // are where colour codes would be.
        assert!(log.contains("INFO"), "{format}: {log}");
        assert!(
            !output.stderr.contains(&ESC),
            "{format} logs to a pipe carry no ANSI escapes:\n{log:?}"
        );
        for named in [
            "app.yaml: Deployment shop/web: not a kind Egret reads; ignored",
            "app.yaml: ConfigMap settings: not a kind Egret reads; ignored",
            "app.yaml: NetworkPolicy shop/legacy: apiVersion: \\\"extensions/v1beta1\\\" is not read (Egret reads networking.k8s.io/v1); the object is skipped",
        ] {
            let named = if format == "text" {
                named.replace("\\\"", "\"")
            } else {
                named.to_owned()
            };
            assert_eq!(log.matches(&named).count(), 1, "{format}: {named}:\n{log}");
        }
    }
}

#[test]
fn a_pin_directory_off_bpffs_is_an_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let not_bpffs = dir.path().join("egret");
    let cases = [
        (
            not_bpffs.to_str().unwrap().to_owned(),
            format!("{} is not on a bpf filesystem", not_bpffs.display()),
        ),
        (
            // Not creatable: sysfs has no such directory, and makes none.
            "/sys/fs/bpf-missing/x".to_owned(),
            "cannot create pin directory /sys/fs/bpf-missing/x: ".to_owned(),
        ),
    ];
    for (bpffs, what) in cases {
        let manifests = dir.path().to_str().unwrap();
        let output = egret(&[
            "run",
            "--node-name",
            "node-1",
            "--manifests",
            manifests,
            "--bpffs",
            &bpffs,
            "--metrics-addr",
            "off",
            "--admin-addr",
            "off",
        ]);
        assert!(!output.status.success(), "egret run --bpffs {bpffs} fails");
        let message = stderr(&output);
        for needed in [
            what.as_str(),
            "mount -t bpf bpf /sys/fs/bpf",
            "--bpffs",
            "`ip netns exec`",
            "nsenter --net=/run/netns/NAME",
        ] {
            assert!(message.contains(needed), "{needed:?} in:\n{message}");
        }
    }
}

#[test]
fn every_command_says_what_it_does_in_one_line() {
    let output = egret(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let commands: Vec<(String, String)> = help
        .lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, about) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            (name.to_owned(), about.trim().to_owned())
        })
        .filter(|(name, _)| name != "help")
        .collect();
    let names: Vec<&str> = commands.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "run", "simulate", "status", "explain", "flows", "counters", "cleanup"
        ]
    );
    for (name, about) in &commands {
        assert!(
            about.len() > 20 && about.len() <= 100,
            "egret --help: {name}: {about:?}"
        );
        let output = egret(&[name, "--help"]);
        assert!(output.status.success(), "egret {name} --help");
        let help = String::from_utf8(output.stdout).unwrap();
        let first = help.lines().next().unwrap_or_default();
        assert_eq!(first, about, "egret {name} --help begins with what it does");
        assert_eq!(
            help.lines().nth(1),
            Some(""),
            "egret {name} --help: what it does fits one line"
        );
        // Short help has each option's text on its line; long help on the next.
        let lines: Vec<&str> = help.lines().collect();
        let is_option = |line: &str| {
            let trimmed = line.trim_start();
            // Deeper lines starting with `-` list possible values.
            trimmed.starts_with('-') && line.len() - trimmed.len() <= 6
        };
        for (i, option) in lines.iter().enumerate() {
            if !is_option(option) {
                continue;
            }
            let same_line = option
                .trim()
                .split_once("  ")
                .is_some_and(|(_, text)| !text.trim().is_empty());
            let next_line = lines
                .get(i + 1)
                .is_some_and(|next| !next.trim().is_empty() && !next.trim_start().starts_with('-'));
            assert!(
                same_line || next_line,
                "egret {name} --help: {option:?} says what it does"
            );
        }
    }
}

/// `ip netns exec` mounts a /sys of its own, without the host's bpffs: the agent says
/// so, and what to do, instead of "No such file or directory".
#[test]
fn under_ip_netns_exec_the_agent_says_to_enter_only_the_network_namespace() {
    if !egret_testbed::require_root(
        "under_ip_netns_exec_the_agent_says_to_enter_only_the_network_namespace",
    ) {
        return;
    }
    let topology = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pin_dir = egret_testbed::agent::AgentProcess::unique_pin_dir();
    let output = Command::new("ip")
        .args(["netns", "exec", topology.node_netns(), AGENT, "run"])
        .args(["--node-name", "node-1", "--manifests"])
        .arg(dir.path())
        .arg("--bpffs")
        .arg(&pin_dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let message = stderr(&output);
    assert!(!output.status.success(), "{message}");
    for needed in [
        "no bpf filesystem is mounted above it in this mount namespace",
        "`ip netns exec`",
        "nsenter --net=/run/netns/NAME",
    ] {
        assert!(message.contains(needed), "{needed:?} in:\n{message}");
    }
    assert!(!pin_dir.exists(), "nothing made on the host's bpffs");
}

/// The agent re-reads its manifest directory at every resync; a document it does not
/// read is reported the first time only. `egret status` and `egret counters` print
/// tables whose columns line up.
#[test]
fn the_agent_reports_unread_kinds_once_and_its_tables_line_up() {
    if !egret_testbed::require_root("the_agent_reports_unread_kinds_once_and_its_tables_line_up") {
        return;
    }
    let topology = Topology::new().unwrap();
    let client = add_pod(&topology, "client", 1);
    let server = add_pod(&topology, "server", 2);
    let dir = tempfile::tempdir().unwrap();
    let pods = [
        PodManifest {
            pod: &client,
            namespace: "shop",
            labels: &[("app", "client")],
            ports: &[],
        },
        PodManifest {
            pod: &server,
            namespace: "shop",
            labels: &[("app", "server")],
            ports: &[],
        },
    ];
    write_file(dir.path(), "cluster.yaml", &cluster_yaml(&pods)).unwrap();
    let policy = egress_policy("client-dns-only", "client", "[{ports: [{port: 53}]}]", "");
    write_file(
        dir.path(),
        "app.yaml",
        &[policy.as_str(), CONFIG_MAP].join("---\n"),
    )
    .unwrap();
    let mut agent = start_agent(&topology, dir.path(), &["--resync-seconds", "0.5"]);
    agent
        .wait_attached(
            &[client.host_ifindex(), server.host_ifindex()],
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(
        client
            .tcp_connect(server.addr_v4(8080), common::PROBE_TIMEOUT)
            .is_timed_out()
    );
    // Several resyncs.
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    let unread = "app.yaml: ConfigMap settings: not a kind Egret reads; ignored";
    assert_eq!(log.matches(unread).count(), 1, "{unread:?} once in:\n{log}");

    let text = |args: &[&str]| {
        let output = agent.command(&topology, args).output().unwrap();
        assert!(
            output.status.success(),
            "egret {args:?}: {}",
            stderr(&output)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let status = text(&["status"]);
    assert_table_aligned(&status, "ENDPOINT", &[]);
    assert_table_aligned(&status, "MAP", &["ENTRIES", "CAPACITY", "FILL"]);
    let pin_dir = agent.pin_dir().to_str().unwrap().to_owned();
    let counters = text(&["counters", "--bpffs", &pin_dir]);
    assert_table_aligned(
        &counters,
        "ENDPOINT",
        &["ENDPOINT", "IFINDEX", "PACKETS", "BYTES"],
    );
    assert!(counters.contains("no_rule_allows"), "{counters}");
    assert_explain_lines_up(&text(&[
        "explain",
        "--from",
        "shop/client",
        "--to",
        &server.ipv4().to_string(),
        "--port",
        "8080",
    ]));
}

/// `explain`'s details (`  label: value`) have their values in one column.
fn assert_explain_lines_up(explain: &str) {
    let mut lines = explain.lines();
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("DENY shop/client -> ")),
        "{explain}"
    );
    let value_columns: Vec<usize> = lines
        .map(|line| {
            let colon = line.find(':').expect("label: value");
            colon + 1 + line[colon + 1..].len() - line[colon + 1..].trim_start().len()
        })
        .collect();
    assert!(!value_columns.is_empty(), "{explain}");
    assert!(
        value_columns.iter().all(|c| *c == value_columns[0]),
        "{explain}"
    );
}
