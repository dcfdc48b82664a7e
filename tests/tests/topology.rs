//! Self-test of the testbed: the topology carries traffic the way a routed CNI would, and leaves
//! nothing behind. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use egret_testbed::{Pod, ProbeResult, Topology, require_root};

/// Long enough for a first packet's ARP/NDP on a loaded 2-core machine.
const ALLOW: Duration = Duration::from_secs(3);
/// For probes expected to fail: how long to wait for a drop.
const BLOCK: Duration = Duration::from_secs(1);

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn pod_v4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, n)
}

fn pod_v6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xe6e7, 0, 0, 0, 0, 0, u16::from(n))
}

fn topology_with_pods(count: u8) -> (Topology, Vec<Pod>) {
    let topology = Topology::new().expect("create topology");
    let pods = (1..=count)
        .map(|n| {
            topology
                .add_pod(&format!("pod{n}"), pod_v4(n), pod_v6(n))
                .expect("add pod")
        })
        .collect();
    (topology, pods)
}

/// Namespaces that `ip netns list` shows.
fn listed_netns() -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(output.status.success(), "ip netns list: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn stdout_of(mut command: Command) -> String {
    let output = command.output().expect("run command");
    assert!(output.status.success(), "{command:?}: {output:?}");
    String::from_utf8(output.stdout).expect("utf-8 output")
}

fn both_families(pod: &Pod, port: u16) -> [SocketAddr; 2] {
    [pod.addr_v4(port), pod.addr_v6(port)]
}

fn assert_result(result: &ProbeResult, expected: fn(&ProbeResult) -> bool, what: &str) {
    assert!(expected(result), "{what}: got {result}");
}

#[test]
fn traffic_flows_between_pods_over_v4_and_v6() {
    if !require_root("traffic_flows_between_pods_over_v4_and_v6") {
        return;
    }
    let (_topology, pods) = topology_with_pods(3);
    let listeners: Vec<_> = pods
        .iter()
        .flat_map(|pod| {
            [
                pod.serve_tcp(TCP_PORT).expect("serve tcp"),
                pod.serve_udp(UDP_PORT).expect("serve udp"),
            ]
        })
        .collect();
    for from in &pods {
        for to in pods.iter().filter(|to| to.name() != from.name()) {
            let route = format!("{} -> {}", from.name(), to.name());
            for dst in both_families(to, TCP_PORT) {
                let result = from.tcp_connect(dst, ALLOW);
                assert_result(
                    &result,
                    ProbeResult::is_connected,
                    &format!("{route} tcp {dst}"),
                );
            }
            for dst in both_families(to, UDP_PORT) {
                let result = from.udp_request(dst, ALLOW);
                assert_result(
                    &result,
                    ProbeResult::is_connected,
                    &format!("{route} udp {dst}"),
                );
            }
            for dst in [IpAddr::V4(to.ipv4()), IpAddr::V6(to.ipv6())] {
                let result = from.ping(dst, ALLOW);
                assert_result(
                    &result,
                    ProbeResult::is_connected,
                    &format!("{route} ping {dst}"),
                );
            }
        }
    }
    drop(listeners);
}

#[test]
fn pods_are_wired_as_documented() {
    if !require_root("pods_are_wired_as_documented") {
        return;
    }
    let (topology, pods) = topology_with_pods(2);
    let listed = listed_netns();
    for name in topology.netns_names() {
        assert!(listed.contains(&name), "{name} not in {listed:?}");
    }
    for pod in &pods {
        assert!(pod.host_interface().len() <= 15, "{}", pod.host_interface());
        let mut link = topology.node_command("ip");
        link.args(["-o", "link", "show", "dev", pod.host_interface()]);
        let link = stdout_of(link);
        assert!(
            link.starts_with(&format!(
                "{}: {}@",
                pod.host_ifindex(),
                pod.host_interface()
            )),
            "{link}"
        );
        let mut addrs = pod.command("ip");
        addrs.args(["-o", "addr", "show", "dev", "eth0"]);
        let addrs = stdout_of(addrs);
        assert!(addrs.contains(&format!("{}/32", pod.ipv4())), "{addrs}");
        assert!(addrs.contains(&format!("{}/128", pod.ipv6())), "{addrs}");
        assert!(!addrs.contains("tentative"), "{addrs}");
    }
    let mut routes = topology.node_command("ip");
    routes.args(["-6", "route", "show"]);
    let routes = stdout_of(routes);
    for pod in &pods {
        assert!(
            routes.contains(&format!("{} dev {}", pod.ipv6(), pod.host_interface())),
            "{routes}"
        );
    }
    let forwarding = stdout_of({
        let mut sysctl = topology.node_command("cat");
        sysctl.args([
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ]);
        sysctl
    });
    assert_eq!(forwarding, "1\n1\n");
    assert!(topology.pod("pod1").is_some());
    assert!(topology.pod("nope").is_none());
    assert!(topology.add_pod("pod1", pod_v4(9), pod_v6(9)).is_err());
    assert!(topology.add_pod("other", pod_v4(1), pod_v6(9)).is_err());
    assert!(topology.add_pod("bad/name", pod_v4(9), pod_v6(9)).is_err());
    assert_eq!(topology.pods().len(), 2);
}

#[test]
fn connect_without_listener_is_refused() {
    if !require_root("connect_without_listener_is_refused") {
        return;
    }
    let (_topology, pods) = topology_with_pods(2);
    let (client, server) = (&pods[0], &pods[1]);
    for dst in both_families(server, 9) {
        let result = client.tcp_connect(dst, ALLOW);
        assert_eq!(result, ProbeResult::Refused, "tcp {dst}");
        assert!(result.is_allowed() && !result.is_blocked());
        let result = client.udp_request(dst, ALLOW);
        assert_eq!(result, ProbeResult::Refused, "udp {dst}");
    }
    // A dropped listener stops serving.
    let listener = server.serve_tcp(0).expect("serve tcp");
    let dst = server.addr_v6(listener.port());
    assert!(client.tcp_connect(dst, ALLOW).is_connected());
    drop(listener);
    assert_eq!(client.tcp_connect(dst, ALLOW), ProbeResult::Refused);
}

#[test]
fn unrouted_addresses_are_not_reached() {
    if !require_root("unrouted_addresses_are_not_reached") {
        return;
    }
    let (_topology, pods) = topology_with_pods(1);
    let pod = &pods[0];
    // Inside the pods' test range but given to no pod: the node has no route for them and no
    // uplink, so it answers unreachable (or, when rate-limited, says nothing).
    let nowhere_v4 = Ipv4Addr::new(10, 77, 255, 1);
    let nowhere_v6 = Ipv6Addr::new(0xfd00, 0xe6e7, 0, 0, 0, 0, 0xffff, 1);
    for ip in [IpAddr::V4(nowhere_v4), IpAddr::V6(nowhere_v6)] {
        let result = pod.tcp_connect(SocketAddr::new(ip, 80), BLOCK);
        assert_result(&result, ProbeResult::is_blocked, &format!("tcp {ip}"));
        let result = pod.udp_request(SocketAddr::new(ip, 53), BLOCK);
        assert_result(&result, ProbeResult::is_blocked, &format!("udp {ip}"));
        let result = pod.ping(ip, BLOCK);
        assert_result(&result, ProbeResult::is_blocked, &format!("ping {ip}"));
    }
}

#[test]
fn removed_pod_is_unreachable_and_can_come_back() {
    if !require_root("removed_pod_is_unreachable_and_can_come_back") {
        return;
    }
    let (topology, pods) = topology_with_pods(3);
    let (a, b, gone) = (&pods[0], &pods[1], &pods[2]);
    let _a_echo = a.serve_tcp(TCP_PORT).expect("serve tcp");
    let _b_echo = b.serve_tcp(TCP_PORT).expect("serve tcp");
    {
        let _echo = gone.serve_tcp(TCP_PORT).expect("serve tcp");
        assert!(a.tcp_connect(gone.addr_v4(TCP_PORT), ALLOW).is_connected());
    }

    topology.remove_pod(gone.name()).expect("remove pod");
    assert!(!listed_netns().contains(&gone.netns().to_owned()));
    let mut link = topology.node_command("ip");
    link.args(["link", "show", "dev", gone.host_interface()]);
    assert!(!link.output().expect("run ip").status.success());
    assert!(topology.remove_pod(gone.name()).is_err());
    assert!(topology.pod(gone.name()).is_none());
    for from in [a, b] {
        for dst in both_families(gone, TCP_PORT) {
            let result = from.tcp_connect(dst, BLOCK);
            assert_result(&result, ProbeResult::is_blocked, &format!("tcp {dst}"));
        }
        let result = from.ping(IpAddr::V4(gone.ipv4()), BLOCK);
        assert_result(&result, ProbeResult::is_blocked, "ping removed pod");
    }
    // The other pods lost nothing: every host veth held the same gateway addresses.
    for (from, to) in [(a, b), (b, a)] {
        for dst in both_families(to, TCP_PORT) {
            let result = from.tcp_connect(dst, ALLOW);
            assert_result(&result, ProbeResult::is_connected, &format!("tcp {dst}"));
        }
    }

    // Churn: the same name and addresses come back on a new veth.
    let back = topology
        .add_pod(gone.name(), gone.ipv4(), gone.ipv6())
        .expect("re-add pod");
    assert_ne!(back.host_interface(), gone.host_interface());
    let _echo = back.serve_tcp(TCP_PORT).expect("serve tcp");
    for dst in both_families(&back, TCP_PORT) {
        let result = a.tcp_connect(dst, ALLOW);
        assert_result(&result, ProbeResult::is_connected, &format!("tcp {dst}"));
    }
}

#[test]
fn dropping_the_topology_deletes_its_namespaces() {
    if !require_root("dropping_the_topology_deletes_its_namespaces") {
        return;
    }
    let (topology, pods) = topology_with_pods(2);
    let names = topology.netns_names();
    assert_eq!(names.len(), 3);
    // A listener still running in a pod must not keep its name alive.
    let echo = pods[0].serve_udp(UDP_PORT).expect("serve udp");
    drop(topology);
    let listed = listed_netns();
    for name in &names {
        assert!(!listed.contains(name), "{name} left behind");
    }
    drop(echo);
}

#[test]
fn cleanup_runs_when_a_test_panics() {
    if !require_root("cleanup_runs_when_a_test_panics") {
        return;
    }
    let names = Mutex::new(Vec::new());
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let (topology, _pods) = topology_with_pods(2);
        *names.lock().expect("lock") = topology.netns_names();
        panic!("a failing test");
    }));
    assert!(outcome.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 3);
    let listed = listed_netns();
    for name in &names {
        assert!(!listed.contains(name), "{name} left behind");
    }
}

#[test]
fn sctp_works_or_is_reported_unsupported() {
    if !require_root("sctp_works_or_is_reported_unsupported") {
        return;
    }
    let (_topology, pods) = topology_with_pods(2);
    let (client, server) = (&pods[0], &pods[1]);
    let result = client.sctp_connect(server.addr_v4(9), ALLOW);
    if result.is_unsupported() {
        eprintln!("this kernel has no SCTP");
        assert!(server.serve_sctp(9).is_err());
        return;
    }
    assert_eq!(result, ProbeResult::Refused, "sctp without a listener");
    let _echo = server.serve_sctp(9).expect("serve sctp");
    for dst in both_families(server, 9) {
        let result = client.sctp_connect(dst, ALLOW);
        assert_result(&result, ProbeResult::is_connected, &format!("sctp {dst}"));
    }
}

/// What the root namespace shows of links and routes.
fn root_network() -> String {
    [
        &["link", "show"][..],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ]
    .iter()
    .map(|args| {
        let mut ip = Command::new("ip");
        ip.args(*args);
        stdout_of(ip)
    })
    .collect()
}

#[test]
fn root_namespace_is_untouched() {
    if !require_root("root_namespace_is_untouched") {
        return;
    }
    // Other tests run in parallel, but none of them may touch the root namespace either.
    let before = root_network();
    let (topology, pods) = topology_with_pods(2);
    let _echo = pods[1].serve_tcp(TCP_PORT).expect("serve tcp");
    assert!(
        pods[0]
            .tcp_connect(pods[1].addr_v4(TCP_PORT), ALLOW)
            .is_connected()
    );
    assert_eq!(root_network(), before, "root namespace changed");
    drop(topology);
    assert_eq!(root_network(), before, "root namespace changed");
}
