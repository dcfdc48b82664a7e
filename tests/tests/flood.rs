//! Self-test of the traffic generators, with no agent: floods reach the destination's stack
//! with valid checksums at the rate the pressure tests need, churned connections complete,
//! and a frame receiver sees only what tc ingress let through. Needs root; skips otherwise.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::time::Duration;

use egret_testbed::flood::{self, FrameReceiver};
use egret_testbed::frames::{self, ETH_P_LOCAL_EXPERIMENTAL};
use egret_testbed::{Pod, Topology, require_root};

const PORTS: [u16; 6] = [8080, 8081, 8082, 8083, 8084, 8085];
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

fn topology() -> (Topology, Pod, Pod) {
    let topology = Topology::new().expect("topology");
    let client = topology
        .add_pod(
            "client",
            Ipv4Addr::new(10, 77, 0, 1),
            Ipv6Addr::new(0xfd00, 0xe6e7, 0, 0, 0, 0, 0, 1),
        )
        .expect("client");
    let server = topology
        .add_pod(
            "server",
            Ipv4Addr::new(10, 77, 0, 2),
            Ipv6Addr::new(0xfd00, 0xe6e7, 0, 0, 0, 0, 0, 2),
        )
        .expect("server");
    (topology, client, server)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

#[test]
fn floods_reach_the_peer_with_valid_checksums() {
    if !require_root("floods_reach_the_peer_with_valid_checksums") {
        return;
    }
    let (_topology, client, server) = topology();
    let _listeners: Vec<_> = PORTS
        .iter()
        .map(|&port| server.serve_tcp(port).expect("listener"))
        .collect();
    // Resolve the gateway first, so no packet waits on a neighbour entry.
    assert!(
        client
            .tcp_connect(server.addr_v4(8080), Duration::from_secs(3))
            .is_connected()
    );
    let count = 70_000;
    let (src, dst) = (client.ipv4(), server.ipv4());

    let before = flood::snmp_counters(server.netns()).unwrap();
    let udp = flood::udp_flood(client.netns(), src, dst, count).unwrap();
    let after = flood::snmp_counters(server.netns()).unwrap();
    eprintln!("udp: {udp:?}");
    assert_eq!(udp.sent, count);
    let arrived = delta(&before, &after, "Udp.NoPorts") + delta(&before, &after, "Udp.InDatagrams");
    assert!(arrived >= 69_000, "{arrived} of {count} datagrams arrived");
    assert_eq!(delta(&before, &after, "Udp.InCsumErrors"), 0);

    for (name, flood) in [
        ("syn", flood::tcp_syn_flood as fn(_, _, _, _, _) -> _),
        ("ack", flood::tcp_ack_flood),
    ] {
        let before = flood::snmp_counters(server.netns()).unwrap();
        let report = flood(client.netns(), src, dst, &PORTS[..], count).unwrap();
        let after = flood::snmp_counters(server.netns()).unwrap();
        eprintln!("{name}: {report:?}");
        assert_eq!(report.sent, count);
        let arrived = delta(&before, &after, "Tcp.InSegs");
        assert!(
            arrived >= 69_000,
            "{name}: {arrived} of {count} segments arrived"
        );
        assert_eq!(delta(&before, &after, "Tcp.InCsumErrors"), 0, "{name}");
        assert_eq!(delta(&before, &after, "Tcp.InErrs"), 0, "{name}");
    }
}

#[test]
fn churned_connections_complete() {
    if !require_root("churned_connections_complete") {
        return;
    }
    let (_topology, client, server) = topology();
    let _listeners: Vec<_> = PORTS
        .iter()
        .map(|&port| server.serve_tcp(port).expect("listener"))
        .collect();
    flood::set_sysctls(
        client.netns(),
        &[
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ],
    )
    .unwrap();
    let dsts: Vec<_> = PORTS.iter().map(|&port| server.addr_v4(port)).collect();
    let report = flood::tcp_churn(client.netns(), &dsts, 5_000, 4).unwrap();
    eprintln!("churn: {report:?}");
    assert_eq!(
        (report.completed, report.failed),
        (5_000, 0),
        "{:?}",
        report.first_error
    );
}

#[test]
fn frame_receiver_sees_only_what_tc_ingress_passes() {
    if !require_root("frame_receiver_sees_only_what_tc_ingress_passes") {
        return;
    }
    let (topology, client, server) = topology();
    let node = topology.node_netns();
    let host_if = client.host_interface();
    let send_all = |tag: &[u8]| {
        let vlan_marker = [b"vlan-", tag].concat();
        let experimental_marker = [b"x88b5-", tag].concat();
        let nonce: [u8; 6] = [0xE6, 0x7E, tag[0], tag[1], 0, 1];
        let from = SocketAddrV4::new(client.ipv4(), 40_000);
        let to = SocketAddrV4::new(server.ipv4(), 8080);
        let receivers = [
            FrameReceiver::open(node, host_if, ETH_P_IP).unwrap(),
            FrameReceiver::open(node, host_if, ETH_P_LOCAL_EXPERIMENTAL).unwrap(),
            FrameReceiver::open(node, host_if, ETH_P_IPV6).unwrap(),
        ];
        let sent = [
            frames::vlan_tagged(100, &frames::udp_ipv4(from, to, &vlan_marker)),
            frames::ethertype_frame(ETH_P_LOCAL_EXPERIMENTAL, &experimental_marker),
            frames::neighbour_solicitation_to(client.ipv6(), server.ipv6(), server.ipv6(), nonce),
        ];
        flood::send_frames(client.netns(), "eth0", &sent).unwrap();
        let markers: [&[u8]; 3] = [&vlan_marker, &experimental_marker, &nonce];
        receivers
            .iter()
            .zip(markers)
            .map(|(receiver, marker)| {
                receiver
                    .count_each(&[marker], Duration::from_millis(500))
                    .unwrap()[0]
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(send_all(b"01"), [1, 1, 1], "tagged, experimental, NS");

    // A tc ingress filter that drops everything (classic BPF "return TC_ACT_SHOT", which
    // needs no action modules): the receivers see nothing more, being protocol handlers,
    // not taps.
    let tc = |args: &[&str]| {
        let status = topology.node_command("tc").args(args).status().unwrap();
        assert!(status.success(), "tc {args:?}");
    };
    tc(&["qdisc", "add", "dev", host_if, "clsact"]);
    tc(&[
        "filter",
        "add",
        "dev",
        host_if,
        "ingress",
        "protocol",
        "all",
        "bpf",
        "da",
        "bytecode",
        "1,6 0 0 2",
    ]);
    assert_eq!(send_all(b"02"), [0, 0, 0], "after a drop-all tc filter");
}
