//! The link layer and ICMP on real traffic in network namespaces: what an isolated pod may
//! not slip past the filter (VLAN-tagged and non-IP frames, neighbour discovery to a global
//! address), and the ICMP errors and fragments of allowed flows, which must pass.
//!
//! Whether a frame got past the filter is read in the node namespace with a
//! [`FrameReceiver`] on the pod's host-side veth: it is a protocol handler, served after tc
//! ingress, so it sees only what the agent's program let through (a tcpdump-style tap would
//! see every frame, dropped or not).

mod common;

use std::{
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use common::{PROBE_TIMEOUT, counted_with_reason, egress_policy, log_tail, site};
use egret_testbed::{
    GATEWAY_V6, Pod,
    agent::AgentProcess,
    flood::{self, FrameReceiver},
    frames::{self, ETH_P_LOCAL_EXPERIMENTAL, ICMP, TCP},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// How long a receiver waits for frames sent just before.
const RECEIVE: Duration = Duration::from_millis(800);
/// Copies of each crafted frame sent, so one lost on the way cannot pass for a drop.
const COPIES: usize = 3;

/// The client may reach the server on TCP and UDP 8080, nothing else. UDP is allowed so that a
/// tagged datagram would pass if the filter judged only its IP header.
const CLIENT_TO_SERVER_8080: &str = "[{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{protocol: TCP, port: 8080}, {protocol: UDP, port: 8080}]}]";

/// client (app: client), server (app: server), other (app: other) in `shop`, each with a TCP
/// and UDP echo on 8080, and an agent enforcing `policies`.
struct Shop {
    site: site::Site,
    client: Pod,
    server: Pod,
    other: Pod,
    agent: AgentProcess,
}

impl Shop {
    fn new(policies: &str) -> Self {
        let site = site::Site::new(&site::SHOP, policies);
        let agent = site.start(&[]);
        let [client, server, other] = [0, 1, 2].map(|i| site.pods[i].clone());
        Self {
            site,
            client,
            server,
            other,
            agent,
        }
    }

    /// A receiver of `ethertype` frames that got past tc ingress on `pod`'s host veth.
    fn receiver(&self, pod: &Pod, ethertype: u16) -> FrameReceiver {
        FrameReceiver::open(
            self.site.topology.node_netns(),
            pod.host_interface(),
            ethertype,
        )
        .expect("frame receiver")
    }

    fn denied(&self, pod: &Pod, reason: &str) -> u64 {
        counted_with_reason(
            &self.agent,
            &self.site.topology,
            pod.host_ifindex(),
            "deny",
            reason,
        )
    }

    fn related(&self, pod: &Pod) -> u64 {
        counted_with_reason(
            &self.agent,
            &self.site.topology,
            pod.host_ifindex(),
            "allow",
            "related",
        )
    }

    fn log(&self) -> String {
        log_tail(&self.agent, 6_000)
    }
}

fn copies(frame: &[u8]) -> Vec<Vec<u8>> {
    vec![frame.to_vec(); COPIES]
}

#[test]
fn tagged_and_non_ip_frames_from_an_isolated_pod_are_dropped() {
    if !egret_testbed::require_root("tagged_and_non_ip_frames_from_an_isolated_pod_are_dropped") {
        return;
    }
    let site = Shop::new(&egress_policy(
        "client",
        "client",
        CLIENT_TO_SERVER_8080,
        "",
    ));
    let to = SocketAddrV4::new(site.server.ipv4(), 8080);
    // The same frames from the isolated client and from `other`, which no policy isolates:
    // what reaches the node from `other` shows that the receivers work.
    for (pod, isolated) in [(&site.client, true), (&site.other, false)] {
        let from = SocketAddrV4::new(pod.ipv4(), 40_000);
        let tagged_marker = format!("egret tagged from {}", pod.name()).into_bytes();
        let plain_marker = format!("egret plain from {}", pod.name()).into_bytes();
        let experimental_marker = format!("egret 88b5 from {}", pod.name()).into_bytes();
        let ipv4 = site.receiver(pod, ETH_P_IP);
        let experimental = site.receiver(pod, ETH_P_LOCAL_EXPERIMENTAL);
        let mut sent = copies(&frames::vlan_tagged(
            100,
            &frames::udp_ipv4(from, to, &tagged_marker),
        ));
        sent.extend(copies(&frames::ethertype_frame(
            ETH_P_LOCAL_EXPERIMENTAL,
            &experimental_marker,
        )));
        sent.extend(copies(&frames::udp_ipv4(from, to, &plain_marker)));
        flood::send_frames(pod.netns(), "eth0", &sent).expect("send frames");

        // The kernel strips the tag into metadata before tc, so the tagged datagram arrives
        // as IPv4.
        let [tagged, plain] = ipv4
            .count_each(&[&tagged_marker, &plain_marker], RECEIVE)
            .unwrap()[..]
        else {
            unreachable!()
        };
        let experimental = experimental
            .count_each(&[&experimental_marker], RECEIVE)
            .unwrap()[0];
        let name = pod.name();
        assert!(
            plain >= 1,
            "{name}: an allowed untagged datagram reaches the node"
        );
        if isolated {
            assert_eq!(
                (tagged, experimental),
                (0, 0),
                "{name}: tagged and ethertype-0x88B5 frames get past the filter\nagent log:\n{}",
                site.log()
            );
        } else {
            assert!(
                tagged >= 1 && experimental >= 1,
                "{name} is not isolated: its frames pass unchanged (tagged {tagged}, 0x88B5 {experimental})"
            );
        }
    }
    assert!(
        site.denied(&site.client, "vlan") >= 1,
        "tagged frames are denied with reason vlan"
    );
    assert!(
        site.denied(&site.client, "non_ip") >= 1,
        "unknown ethertypes are denied with reason non_ip"
    );
}

#[test]
fn neighbour_solicitation_to_a_global_address_is_dropped_while_ipv6_works() {
    if !egret_testbed::require_root(
        "neighbour_solicitation_to_a_global_address_is_dropped_while_ipv6_works",
    ) {
        return;
    }
    let site = Shop::new(&egress_policy(
        "client",
        "client",
        CLIENT_TO_SERVER_8080,
        "",
    ));
    // The client's first IPv6 traffic: the gateway's neighbour discovery has to pass.
    let before = site
        .client
        .tcp_connect(site.server.addr_v6(8080), PROBE_TIMEOUT * 3);
    assert!(before.is_connected(), "IPv6 TCP to the server: {before}");

    let solicited_node: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    let server = site.server.ipv6();
    for (pod, isolated) in [(&site.client, true), (&site.other, false)] {
        let global_nonce = [0xE6, 0x7E, 0x01, pod.ipv4().octets()[3], 0, 1];
        let link_nonce = [0xE6, 0x7E, 0x02, pod.ipv4().octets()[3], 0, 2];
        let ipv6 = site.receiver(pod, ETH_P_IPV6);
        // To the server's own (global) address, about it: no link needs that.
        let mut sent = copies(&frames::neighbour_solicitation_to(
            pod.ipv6(),
            server,
            server,
            global_nonce,
        ));
        // To the gateway's solicited-node group, about the gateway: what links need.
        sent.extend(copies(&frames::neighbour_solicitation_to(
            pod.ipv6(),
            solicited_node,
            GATEWAY_V6,
            link_nonce,
        )));
        flood::send_frames(pod.netns(), "eth0", &sent).expect("send frames");
        let [global, link] = ipv6
            .count_each(&[&global_nonce, &link_nonce], RECEIVE)
            .unwrap()[..]
        else {
            unreachable!()
        };
        let name = pod.name();
        assert!(
            link >= 1,
            "{name}: a solicitation to the solicited-node group passes"
        );
        if isolated {
            assert_eq!(
                global,
                0,
                "{name}: a solicitation to a global address gets past the filter\nagent log:\n{}",
                site.log()
            );
        } else {
            assert!(
                global >= 1,
                "{name} is not isolated: its solicitation passes"
            );
        }
    }
    let after = site
        .client
        .tcp_connect(site.server.addr_v6(8080), PROBE_TIMEOUT * 3);
    assert!(after.is_connected(), "IPv6 TCP still works: {after}");
}

#[test]
fn an_isolated_udp_servers_port_unreachable_reaches_the_client() {
    if !egret_testbed::require_root("an_isolated_udp_servers_port_unreachable_reaches_the_client") {
        return;
    }
    let site = Shop::new(&egress_policy("server", "server", "[]", ""));
    // Port 9999 is closed: the server's stack answers port unreachable, which its policy
    // allows only as an error about the client's datagram.
    for dst in [site.server.addr_v4(9999), site.server.addr_v6(9999)] {
        let probe = site.client.udp_request(dst, PROBE_TIMEOUT * 3);
        assert!(
            probe.is_refused(),
            "{dst}: the client's connected socket sees ECONNREFUSED, got {probe}\nagent log:\n{}",
            site.log()
        );
    }
    assert!(
        site.related(&site.server) >= 2,
        "the errors are counted as related"
    );
    let own = site
        .server
        .udp_request(site.client.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        own.is_blocked(),
        "the server itself may send nothing: {own}"
    );
}

#[test]
fn a_4000_byte_udp_reply_from_an_isolated_server_arrives_whole() {
    if !egret_testbed::require_root("a_4000_byte_udp_reply_from_an_isolated_server_arrives_whole") {
        return;
    }
    let site = Shop::new(&egress_policy("server", "server", "[]", ""));
    for dst in [site.server.addr_v4(8080), site.server.addr_v6(8080)] {
        let outcome = egret_testbed::run_in_netns(site.client.netns(), || large_echo(dst, 4_000));
        assert!(
            outcome.is_ok(),
            "{dst}: the 4,000-byte reply (three fragments) did not come back whole: {outcome:?}\nagent log:\n{}",
            site.log()
        );
    }
}

/// Sends `size` bytes to the echo server at `dst` and waits for them to come back whole;
/// three attempts of 1.5 s.
fn large_echo(dst: SocketAddr, size: usize) -> Result<(), String> {
    let local: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
    socket.connect(dst).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_millis(1_500)))
        .map_err(|e| e.to_string())?;
    #[expect(clippy::cast_possible_truncation, reason = "a byte pattern")]
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0; 65_536];
    let mut last = String::from("nothing came back");
    for _ in 0..3 {
        socket.send(&payload).map_err(|e| e.to_string())?;
        match socket.recv(&mut buf) {
            Ok(read) if buf[..read] == payload[..] => return Ok(()),
            Ok(read) => last = format!("{read} bytes, not the {size} sent"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[test]
fn fragmentation_needed_about_an_allowed_flow_reaches_the_client() {
    if !egret_testbed::require_root("fragmentation_needed_about_an_allowed_flow_reaches_the_client")
    {
        return;
    }
    let site = Shop::new(&egress_policy("server", "server", "[]", ""));
    let server = SocketAddrV4::new(site.server.ipv4(), 8080);
    // A connection the client opened to the isolated server, echoing.
    let stream = egret_testbed::run_in_netns(site.client.netns(), || {
        std::net::TcpStream::connect_timeout(&server.into(), PROBE_TIMEOUT * 3)
            .expect("client connects to the server")
    });
    let SocketAddr::V4(flow) = stream.local_addr().unwrap() else {
        unreachable!("an IPv4 connection")
    };
    // The same message about a flow that never existed: an isolated pod's new ICMP, denied.
    let stranger = SocketAddrV4::new(*flow.ip(), 1023);
    let tracked = frames::fragmentation_needed(flow, server, TCP, 1_400);
    let untracked = frames::fragmentation_needed(stranger, server, TCP, 1_400);

    let arriving = FrameReceiver::open(site.client.netns(), "eth0", ETH_P_IP).expect("receiver");
    for message in [&untracked, &tracked] {
        flood::send_ipv4(site.server.netns(), site.client.ipv4(), ICMP, message)
            .expect("the server sends ICMP");
    }
    let counts = arriving
        .count_each(&[&tracked, &untracked], RECEIVE)
        .unwrap();
    assert!(
        counts[0] >= 1,
        "fragmentation needed about the client's flow never reached it\nagent log:\n{}",
        site.log()
    );
    assert_eq!(
        counts[1], 0,
        "fragmentation needed about no tracked flow passed"
    );
    assert!(
        site.related(&site.server) >= 1,
        "the error is counted as related"
    );
    drop(stream);
}

#[test]
fn kernel_diagnostics_reach_the_log_only_when_asked() {
    if !egret_testbed::require_root("kernel_diagnostics_reach_the_log_only_when_asked") {
        return;
    }
    let mut site = Shop::new(&egress_policy(
        "client",
        "client",
        CLIENT_TO_SERVER_8080,
        "",
    ));
    // An IPv4 ethertype over a header of version 5: the parser gives up on it.
    let malformed = frames::ethertype_frame(ETH_P_IP, &[0x55; 40]);
    let send = |site: &Shop| {
        flood::send_frames(site.client.netns(), "eth0", &copies(&malformed)).expect("sent");
    };
    send(&site);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while site.denied(&site.client, "malformed") < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        site.denied(&site.client, "malformed") >= 1,
        "{}",
        site.log()
    );
    assert!(
        !site.agent.log().contains(KERNEL_TARGET),
        "egret=debug alone leaves the kernel's records off:\n{}",
        site.log()
    );

    // The same agent with the kernel target named in RUST_LOG.
    site.agent = AgentProcess::start_logging(
        &site.site.topology,
        std::path::Path::new(common::AGENT),
        site.site.manifests(),
        &AgentProcess::unique_pin_dir(),
        &[],
        "egret=debug,info,egret::kernel=debug",
    )
    .expect("agent starts");
    site.agent
        .wait_attached(&site.site.ifindexes(), Duration::from_secs(20))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let logged = |agent: &AgentProcess| {
        agent
            .log()
            .lines()
            .any(|line| line.contains(KERNEL_TARGET) && line.contains("malformed"))
    };
    while !logged(&site.agent) && std::time::Instant::now() < deadline {
        send(&site);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        logged(&site.agent),
        "the parser's record reaches the log under egret::kernel:\n{}",
        site.log()
    );
}

const KERNEL_TARGET: &str = "egret::kernel";
