//! The connection tracker's state machine, driven through both programs with
//! `BPF_PROG_TEST_RUN`: `receive` runs `egret_to_pod` (what reaches the endpoint),
//! `judge` runs `egret_from_pod` (what it sends). The endpoint `me` may send only what
//! `MANIFESTS` allows, so a reply passes only while its flow is tracked.

use std::net::{Ipv4Addr, SocketAddrV4};

use egret::datapath::read_flows;
use egret_common::maps::{
    FLOW_FIN_FROM_ENDPOINT, FLOW_FIN_FROM_PEER, FLOW_ORIGIN_INBOUND, FLOW_ORIGIN_OUTBOUND,
    FLOW_STATE_ASSURED, FLOW_STATE_CLOSING, FLOW_STATE_ESTABLISHED, FLOW_STATE_NEW,
    FLOW_STATE_REPLIED, FLOW_STATE_SYN_RECV, FLOW_STATE_SYN_SENT, FlowEntry, Timeouts,
};

use super::*;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// A peer no rule lets `me` reach.
const PEER: &str = "10.9.9.9";
const PEER_PORT: u16 = 5555;
const SERVICE_PORT: u16 = 8080;

/// A TCP segment with `flags` (no options, no payload).
fn tcp(src: &str, dst: &str, src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20);
    l4.extend_from_slice(&src_port.to_be_bytes());
    l4.extend_from_slice(&dst_port.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
    ip(src, dst, TCP, &l4)
}

fn udp(src: &str, dst: &str, src_port: u16, dst_port: u16) -> Vec<u8> {
    frames::packet(v4(src), v4(dst), UDP, src_port, dst_port)
}

fn ip(src: &str, dst: &str, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (v4(src), v4(dst)) {
        (IpAddr::V4(s), IpAddr::V4(d)) => frames::ipv4(s, d, protocol, None, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => frames::ipv6(s, d, protocol, None, l4),
        _ => panic!("mixed families"),
    }
}

/// The one tracked flow between `me` and `peer`, with the table it is in.
fn flow(bench: &Bench, peer: &str) -> Option<(FlowEntry, bool)> {
    let peer = match v4(peer) {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    let flows: Vec<_> = read_flows(&bench.pin_dir)
        .unwrap()
        .into_iter()
        .filter(|(key, _, _)| key.dst == peer)
        .collect();
    assert!(flows.len() <= 1, "one flow per peer here: {flows:?}");
    flows
        .first()
        .map(|(_, entry, established)| (*entry, *established))
}

fn state(bench: &Bench, peer: &str) -> Option<(u8, bool)> {
    flow(bench, peer).map(|(entry, established)| (entry.state, established))
}

#[test]
fn an_accepted_tcp_connection_goes_through_every_state() {
    if !egret_testbed::require_root("an_accepted_tcp_connection_goes_through_every_state") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let from_peer = |flags| tcp(PEER, ME, PEER_PORT, SERVICE_PORT, flags);
    let to_peer = |flags| tcp(ME, PEER, SERVICE_PORT, PEER_PORT, flags);

    assert_eq!(bench.receive(&from_peer(ACK)), PASS);
    assert_eq!(state(&bench, PEER), None, "a bare ACK opens nothing");
    assert_eq!(bench.judge(&to_peer(SYN | ACK)), DROP, "untracked: judged");

    bench.receive(&from_peer(SYN));
    assert_eq!(state(&bench, PEER), Some((FLOW_STATE_SYN_SENT, false)));
    assert_eq!(flow(&bench, PEER).unwrap().0.origin, FLOW_ORIGIN_INBOUND);
    assert_eq!(
        bench.judge(&to_peer(SYN | ACK)),
        PASS,
        "the SYN-ACK is a reply"
    );
    assert_eq!(state(&bench, PEER), Some((FLOW_STATE_SYN_RECV, false)));
    bench.receive(&from_peer(ACK));
    assert_eq!(
        state(&bench, PEER),
        Some((FLOW_STATE_ESTABLISHED, true)),
        "the handshake's last ACK moves the flow to the established table"
    );
    assert_eq!(bench.judge(&to_peer(ACK)), PASS);
    assert_eq!(bench.counted(Verdict::Allow, Reason::Conntrack), 2);

    assert_eq!(bench.judge(&to_peer(FIN | ACK)), PASS);
    let (entry, established) = flow(&bench, PEER).unwrap();
    assert_eq!(
        (entry.state, established, entry.fin),
        (FLOW_STATE_CLOSING, false, FLOW_FIN_FROM_ENDPOINT),
        "a FIN moves the flow back among the unassured"
    );
    bench.receive(&from_peer(FIN | ACK));
    assert_eq!(
        flow(&bench, PEER).unwrap().0.fin,
        FLOW_FIN_FROM_ENDPOINT | FLOW_FIN_FROM_PEER
    );
    assert_eq!(bench.judge(&to_peer(ACK)), PASS, "the last ACK passes...");
    assert_eq!(state(&bench, PEER), None, "...and the flow is gone");
    assert_eq!(bench.judge(&to_peer(ACK)), DROP, "nothing after it");
}

#[test]
fn a_reset_forgets_the_flow() {
    if !egret_testbed::require_root("a_reset_forgets_the_flow") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    bench.receive(&tcp(PEER, ME, PEER_PORT, SERVICE_PORT, SYN));
    assert_eq!(
        bench.judge(&tcp(ME, PEER, SERVICE_PORT, PEER_PORT, SYN | ACK)),
        PASS
    );
    bench.receive(&tcp(PEER, ME, PEER_PORT, SERVICE_PORT, RST));
    assert_eq!(state(&bench, PEER), None);
    assert_eq!(
        bench.judge(&tcp(ME, PEER, SERVICE_PORT, PEER_PORT, ACK)),
        DROP
    );
}

#[test]
fn an_opened_tcp_connection_is_established_after_its_handshake() {
    if !egret_testbed::require_root("an_opened_tcp_connection_is_established_after_its_handshake") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let server = "10.2.1.1";
    assert_eq!(bench.judge(&tcp(ME, server, 40000, 80, SYN)), PASS);
    let (entry, established) = flow(&bench, server).unwrap();
    assert_eq!(
        (entry.state, entry.origin, established),
        (FLOW_STATE_SYN_SENT, FLOW_ORIGIN_OUTBOUND, false)
    );
    bench.receive(&tcp(server, ME, 80, 40000, SYN | ACK));
    assert_eq!(state(&bench, server), Some((FLOW_STATE_SYN_RECV, false)));
    assert_eq!(bench.judge(&tcp(ME, server, 40000, 80, ACK)), PASS);
    assert_eq!(state(&bench, server), Some((FLOW_STATE_ESTABLISHED, true)));
    assert_eq!(bench.counted(Verdict::Allow, Reason::PolicyAllows), 1);
    assert_eq!(
        bench.counted(Verdict::Allow, Reason::Conntrack),
        1,
        "after the first packet the cached verdict answers"
    );
}

#[test]
fn datagram_flows_are_assured_when_used_after_a_reply() {
    if !egret_testbed::require_root("datagram_flows_are_assured_when_used_after_a_reply") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let server = "10.2.1.1";
    assert_eq!(bench.judge(&udp(ME, server, 40000, 1500)), PASS);
    assert_eq!(state(&bench, server), Some((FLOW_STATE_NEW, false)));
    bench.receive(&udp(server, ME, 1500, 40000));
    assert_eq!(state(&bench, server), Some((FLOW_STATE_REPLIED, false)));
    assert_eq!(bench.judge(&udp(ME, server, 40000, 1500)), PASS);
    assert_eq!(state(&bench, server), Some((FLOW_STATE_ASSURED, true)));

    // Accepted: a datagram from a peer; the endpoint's answer is a reply.
    bench.receive(&udp(PEER, ME, PEER_PORT, 53));
    assert_eq!(state(&bench, PEER), Some((FLOW_STATE_NEW, false)));
    assert_eq!(bench.judge(&udp(ME, PEER, 53, PEER_PORT)), PASS);
    assert_eq!(state(&bench, PEER), Some((FLOW_STATE_REPLIED, false)));
    assert_eq!(
        bench.judge(&udp(ME, PEER, 53, PEER_PORT + 1)),
        DROP,
        "another tuple is not a reply"
    );
}

#[test]
fn every_state_times_out() {
    if !egret_testbed::require_root("every_state_times_out") {
        return;
    }
    let mut bench = Bench::new(Settings {
        timeouts: Timeouts {
            unassured: 1,
            tcp_established: 1,
            other_established: 1,
            closing: 1,
        },
        ..Settings::DEFAULT
    });
    // One flow per state, each from its own peer, all accepted by `me`.
    let peers = ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5"];
    // SYN seen.
    bench.receive(&tcp(peers[0], ME, PEER_PORT, SERVICE_PORT, SYN));
    // Established.
    bench.receive(&tcp(peers[1], ME, PEER_PORT, SERVICE_PORT, SYN));
    bench.judge(&tcp(ME, peers[1], SERVICE_PORT, PEER_PORT, SYN | ACK));
    bench.receive(&tcp(peers[1], ME, PEER_PORT, SERVICE_PORT, ACK));
    // Closing.
    bench.receive(&tcp(peers[2], ME, PEER_PORT, SERVICE_PORT, SYN));
    bench.receive(&tcp(peers[2], ME, PEER_PORT, SERVICE_PORT, FIN));
    // Datagram, unanswered.
    bench.receive(&udp(peers[3], ME, PEER_PORT, 53));
    // Datagram, assured.
    bench.receive(&udp(peers[4], ME, PEER_PORT, 53));
    bench.judge(&udp(ME, peers[4], 53, PEER_PORT));
    bench.receive(&udp(peers[4], ME, PEER_PORT, 53));
    let states: Vec<_> = peers.iter().map(|p| state(&bench, p)).collect();
    assert_eq!(
        states,
        [
            Some((FLOW_STATE_SYN_SENT, false)),
            Some((FLOW_STATE_ESTABLISHED, true)),
            Some((FLOW_STATE_CLOSING, false)),
            Some((FLOW_STATE_NEW, false)),
            Some((FLOW_STATE_ASSURED, true)),
        ]
    );
    // Within the timeout, every reply passes.
    assert_eq!(
        bench.judge(&tcp(ME, peers[1], SERVICE_PORT, PEER_PORT, ACK)),
        PASS
    );
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let replies = [
        tcp(ME, peers[0], SERVICE_PORT, PEER_PORT, SYN | ACK),
        tcp(ME, peers[1], SERVICE_PORT, PEER_PORT, ACK),
        tcp(ME, peers[2], SERVICE_PORT, PEER_PORT, ACK),
        udp(ME, peers[3], 53, PEER_PORT),
        udp(ME, peers[4], 53, PEER_PORT),
    ];
    for (reply, peer) in replies.iter().zip(peers) {
        assert_eq!(bench.judge(reply), DROP, "the flow with {peer} timed out");
        assert_eq!(state(&bench, peer), None, "and left the table");
    }
}

#[test]
fn a_policy_change_rejudges_cached_verdicts_once() {
    if !egret_testbed::require_root("a_policy_change_rejudges_cached_verdicts_once") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let server = "10.2.1.1";
    bench.judge(&tcp(ME, server, 40000, 80, SYN));
    let epoch = bench.datapath.policy_epoch();
    assert_eq!(flow(&bench, server).unwrap().0.policy_epoch, epoch);
    // A change that still allows the flow: the next packet is judged again, once.
    let mut image = bench.datapath.held().clone();
    image.identities.clear();
    bench.datapath.apply(&image).unwrap();
    assert_ne!(bench.datapath.policy_epoch(), epoch, "tables changed");
    let judged_before = bench.counted(Verdict::Allow, Reason::PolicyAllows);
    assert_eq!(bench.judge(&tcp(ME, server, 40000, 80, ACK)), PASS);
    assert_eq!(
        flow(&bench, server).unwrap().0.policy_epoch,
        bench.datapath.policy_epoch(),
        "the verdict is cached for the new epoch"
    );
    assert_eq!(bench.judge(&tcp(ME, server, 40000, 80, ACK)), PASS);
    assert_eq!(
        bench.counted(Verdict::Allow, Reason::PolicyAllows),
        judged_before,
        "re-judged flows count as tracked"
    );
    // An apply that changes nothing keeps the epoch.
    let epoch = bench.datapath.policy_epoch();
    bench.datapath.apply(&image).unwrap();
    assert_eq!(bench.datapath.policy_epoch(), epoch);
    // A change that denies it cuts it, and forgets it.
    image.policy.clear();
    image.cidrs.clear();
    bench.datapath.apply(&image).unwrap();
    assert_eq!(bench.judge(&tcp(ME, server, 40000, 80, ACK)), DROP);
    assert_eq!(state(&bench, server), None);
}

#[test]
fn icmp_errors_about_tracked_flows_are_related() {
    if !egret_testbed::require_root("icmp_errors_about_tracked_flows_are_related") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let me: Ipv4Addr = ME.parse().unwrap();
    let peer: Ipv4Addr = PEER.parse().unwrap();
    // A peer's datagram to a closed port; `me` answers "port unreachable" quoting it.
    bench.receive(&udp(PEER, ME, PEER_PORT, 9));
    let unreachable = |port| {
        let mut message = frames::fragmentation_needed(
            SocketAddrV4::new(peer, PEER_PORT),
            SocketAddrV4::new(me, port),
            UDP,
            0,
        );
        message[1] = 3; // port unreachable
        frames::ipv4(me, peer, ICMP, None, &message)
    };
    assert_eq!(bench.judge(&unreachable(9)), PASS);
    assert_eq!(bench.counted(Verdict::Allow, Reason::Related), 1);
    assert_eq!(
        bench.judge(&unreachable(10)),
        DROP,
        "about a flow nobody tracks"
    );
    // "Fragmentation needed" about a flow `me` opened, quoting its own packet.
    let server: Ipv4Addr = "10.2.1.1".parse().unwrap();
    bench.judge(&udp(ME, "10.2.1.1", 40000, 1500));
    let too_big = frames::fragmentation_needed(
        SocketAddrV4::new(me, 40000),
        SocketAddrV4::new(server, 1500),
        UDP,
        1400,
    );
    assert_eq!(
        bench.judge(&frames::ipv4(me, peer, ICMP, None, &too_big)),
        PASS
    );
    assert_eq!(bench.counted(Verdict::Allow, Reason::Related), 2);
}

#[test]
fn fragments_of_a_reply_follow_the_first() {
    if !egret_testbed::require_root("fragments_of_a_reply_follow_the_first") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let (me, peer): (Ipv4Addr, Ipv4Addr) = (ME.parse().unwrap(), PEER.parse().unwrap());
    bench.receive(&udp(PEER, ME, PEER_PORT, 53));
    let first = frames::ipv4(
        me,
        peer,
        UDP,
        Some((77, 0, true)),
        &frames::transport(UDP, 53, PEER_PORT),
    );
    let later = |id| frames::ipv4(me, peer, UDP, Some((id, 185, false)), &[0; 64]);
    assert_eq!(bench.judge(&first), PASS, "the first fragment is a reply");
    assert_eq!(bench.judge(&later(77)), PASS, "its later fragments follow");
    assert_eq!(bench.judge(&later(78)), DROP, "another datagram's do not");
    assert_eq!(bench.counted(Verdict::Deny, Reason::Fragment), 1);
}

#[test]
fn isolated_endpoints_send_no_unjudged_frames() {
    if !egret_testbed::require_root("isolated_endpoints_send_no_unjudged_frames") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let allowed = send(TCP, "10.2.1.1", 80);
    assert_eq!(bench.judge(&allowed), PASS);
    assert_eq!(bench.judge(&frames::vlan_tagged(7, &allowed)), DROP);
    assert_eq!(bench.counted(Verdict::Deny, Reason::Vlan), 1);
    assert_eq!(
        bench.judge(&frames::ethertype_frame(0x88B5, &[0; 46])),
        DROP
    );
    assert_eq!(bench.counted(Verdict::Deny, Reason::NonIp), 1);
    assert_eq!(bench.judge(&frames::arp()), PASS);
    let me6: Ipv6Addr = ME6.parse().unwrap();
    let link_local: Ipv6Addr = "fe80::2".parse().unwrap();
    let global: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let to_gateway =
        frames::neighbour_solicitation_to(link_local, "fe80::1".parse().unwrap(), global, [1; 6]);
    assert_eq!(
        bench.judge(&to_gateway),
        PASS,
        "NS to a link-local neighbour"
    );
    let to_global = frames::neighbour_solicitation_to(me6, global, global, [2; 6]);
    assert_eq!(bench.judge(&to_global), DROP, "NS to a global address");
    let mut low_hop = to_gateway.clone();
    low_hop[14 + 7] = 64;
    assert_eq!(
        bench.judge(&low_hop),
        DROP,
        "NS that could have been routed"
    );
}
