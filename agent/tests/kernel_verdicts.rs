//! The real kernel programs, judged with `BPF_PROG_TEST_RUN` on crafted frames: every
//! protocol, port range edges, `except`, spoofed sources, fragments, non-IP, conntrack,
//! audit mode and the counters.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use egret::{
    compile::{Ids, Scope, compile},
    datapath::{Capacities, Datapath, TestProgram, image::KernelImage, read_counters},
    source::manifest::Loader,
    state::ObjectKey,
};
use egret_common::{
    Reason, Verdict,
    maps::{SETTINGS_FLAG_AUDIT_ALL, SETTINGS_FLAG_DENY_UNKNOWN, Settings},
};
use egret_testbed::{
    agent::AgentProcess,
    frames::{self, ICMP, SCTP, TCP, UDP},
};

#[path = "kernel_verdicts/conntrack.rs"]
mod conntrack;

const PASS: u32 = 0;
const DROP: u32 = 2;
/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK: u32 = 1;

const MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: me, namespace: t, labels: {app: me}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.1}, {ip: 'fd00:1::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: t, labels: {app: db}}
spec: {nodeName: node-2, containers: [{name: c, image: i}]}
status: {phase: Running, podIPs: [{ip: 10.3.0.1}, {ip: 'fd00:3::1'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: me, namespace: t}
spec:
  podSelector: {matchLabels: {app: me}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.2.0.0/16, except: [10.2.5.0/24]}}]
      ports: [{port: 80}, {protocol: UDP, port: 1000, endPort: 2000}, {protocol: SCTP, port: 9000}]
    - to: [{ipBlock: {cidr: 'fd00:2::/64'}}]
      ports: [{port: 443}]
    - to: [{podSelector: {matchLabels: {app: db}}}]
";

struct Bench {
    datapath: Datapath,
    pin_dir: std::path::PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = egret::datapath::cleanup(&self.pin_dir);
    }
}

impl Bench {
    fn new(settings: Settings) -> Self {
        let pin_dir = AgentProcess::unique_pin_dir();
        let mut datapath = Datapath::open(&pin_dir, Capacities::default()).expect("programs load");
        let mut loader = Loader::default();
        loader.add_text(std::path::Path::new("test.yaml"), MANIFESTS);
        assert!(loader.problems.is_empty(), "{:?}", loader.problems);
        let compiled = compile(
            &loader.snapshot,
            &Scope::Node("node-1".into()),
            &Ids::default(),
        );
        let interfaces = BTreeMap::from([(ObjectKey::new("t", "me"), LOOPBACK)]);
        datapath
            .apply(&KernelImage::build(
                &compiled.tables,
                &interfaces,
                &BTreeMap::new(),
            ))
            .expect("tables written");
        datapath.set_settings(settings).unwrap();
        Self { datapath, pin_dir }
    }

    fn judge(&mut self, frame: &[u8]) -> u32 {
        self.datapath
            .test_run(TestProgram::FromPod, frame, 1)
            .expect("test run")
            .return_code
    }

    fn receive(&mut self, frame: &[u8]) -> u32 {
        self.datapath
            .test_run(TestProgram::ToPod, frame, 1)
            .expect("test run")
            .return_code
    }

    fn counted(&self, verdict: Verdict, reason: Reason) -> u64 {
        read_counters(&self.pin_dir)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.verdict == verdict && k.reason == reason)
            .map(|(_, v)| v.packets)
            .sum()
    }
}

fn v4(last: &str) -> IpAddr {
    last.parse().unwrap()
}

const ME: &str = "10.1.0.1";
const ME6: &str = "fd00:1::1";

fn send(protocol: u8, to: &str, port: u16) -> Vec<u8> {
    let from = if to.contains(':') { ME6 } else { ME };
    frames::packet(v4(from), v4(to), protocol, 40000, port)
}

#[test]
fn verdicts_for_crafted_packets() {
    if !egret_testbed::require_root("verdicts_for_crafted_packets") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let cases: &[(u8, &str, u16, u32, &str)] = &[
        (TCP, "10.2.1.1", 80, PASS, "ipBlock, port"),
        (TCP, "10.2.1.1", 81, DROP, "port not listed"),
        (TCP, "10.2.5.9", 80, DROP, "except"),
        (TCP, "10.3.0.1", 80, PASS, "db pod: any port"),
        (UDP, "10.2.1.1", 999, DROP, "below the range"),
        (UDP, "10.2.1.1", 1000, PASS, "range start"),
        (UDP, "10.2.1.1", 1500, PASS, "range middle"),
        (UDP, "10.2.1.1", 2000, PASS, "range end"),
        (UDP, "10.2.1.1", 2001, DROP, "above the range"),
        (SCTP, "10.2.1.1", 9000, PASS, "SCTP port"),
        (SCTP, "10.2.1.1", 9001, DROP, "SCTP other port"),
        (ICMP, "10.2.1.1", 0, DROP, "ports rule: no ICMP"),
        (ICMP, "10.3.0.1", 0, PASS, "no ports: ICMP"),
        (TCP, "8.8.8.8", 443, DROP, "outside every block"),
        (TCP, "fd00:2::5", 443, PASS, "IPv6 block"),
        (TCP, "fd00:2::5", 444, DROP, "IPv6 other port"),
        (UDP, "fd00:3::1", 53, PASS, "db pod over IPv6"),
        (ICMP, "fd00:2::5", 0, DROP, "ICMPv6 under a ports rule"),
        (ICMP, "fd00:3::1", 0, PASS, "ICMPv6 to db"),
    ];
    for (protocol, to, port, expected, why) in cases {
        let got = bench.judge(&send(*protocol, to, *port));
        assert_eq!(got, *expected, "{why}: proto {protocol} to {to}:{port}");
    }
    let drops = cases.iter().filter(|c| c.3 == DROP).count() as u64;
    assert_eq!(bench.counted(Verdict::Deny, Reason::NoRuleAllows), drops);
    assert_eq!(
        bench.counted(Verdict::Allow, Reason::PolicyAllows),
        cases.len() as u64 - drops
    );
}

#[test]
fn spoofed_sources_drop_and_link_plumbing_passes() {
    if !egret_testbed::require_root("spoofed_sources_drop_and_link_plumbing_passes") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let spoofed = frames::packet(v4("10.1.0.99"), v4("10.3.0.1"), TCP, 1, 80);
    assert_eq!(
        bench.judge(&spoofed),
        DROP,
        "another source address, to an allowed destination"
    );
    let spoofed6 = frames::packet(v4("fd00:1::99"), v4("fd00:3::1"), TCP, 1, 80);
    assert_eq!(bench.judge(&spoofed6), DROP);
    assert_eq!(bench.counted(Verdict::Deny, Reason::SpoofedSource), 2);
    assert_eq!(bench.judge(&frames::arp()), PASS, "ARP");
    assert_eq!(
        bench.judge(&frames::neighbour_solicitation("fe80::1".parse().unwrap())),
        PASS,
        "NDP"
    );
    assert_eq!(bench.counted(Verdict::Allow, Reason::NotFiltered), 2);
}

#[test]
fn later_fragments_follow_their_first() {
    if !egret_testbed::require_root("later_fragments_follow_their_first") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let (me, allowed): (Ipv4Addr, Ipv4Addr) = (ME.parse().unwrap(), "10.2.1.1".parse().unwrap());
    let first = |id, port| {
        frames::ipv4(
            me,
            allowed,
            UDP,
            Some((id, 0, true)),
            &frames::transport(UDP, 5, port),
        )
    };
    let later = |id| frames::ipv4(me, allowed, UDP, Some((id, 4, false)), &[0; 16]);
    assert_eq!(
        bench.judge(&first(77, 1500)),
        PASS,
        "first fragment, allowed port"
    );
    assert_eq!(
        bench.judge(&later(77)),
        PASS,
        "later fragment of an allowed datagram"
    );
    assert_eq!(
        bench.judge(&first(78, 81)),
        DROP,
        "first fragment, port not allowed"
    );
    assert_eq!(
        bench.judge(&later(78)),
        DROP,
        "later fragment of a denied datagram"
    );
    assert_eq!(
        bench.judge(&later(79)),
        DROP,
        "later fragment whose first was never seen"
    );

    let (me6, allowed6): (Ipv6Addr, Ipv6Addr) =
        (ME6.parse().unwrap(), "fd00:2::5".parse().unwrap());
    let first6 = |id, port| {
        frames::ipv6(
            me6,
            allowed6,
            TCP,
            Some((id, 0, true)),
            &frames::transport(TCP, 5, port),
        )
    };
    let later6 = |id| frames::ipv6(me6, allowed6, TCP, Some((id, 8, false)), &[0; 16]);
    assert_eq!(bench.judge(&first6(5, 443)), PASS);
    assert_eq!(bench.judge(&later6(5)), PASS);
    assert_eq!(bench.judge(&first6(6, 80)), DROP);
    assert_eq!(bench.judge(&later6(6)), DROP);
    assert_eq!(bench.counted(Verdict::Deny, Reason::Fragment), 3);
}

#[test]
fn replies_to_accepted_flows_pass_under_any_policy() {
    if !egret_testbed::require_root("replies_to_accepted_flows_pass_under_any_policy") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    let (me, client): (IpAddr, IpAddr) = (v4(ME), v4("192.0.2.7"));
    let reply = frames::packet(me, client, TCP, 8080, 5555);
    assert_eq!(
        bench.judge(&reply),
        DROP,
        "no flow yet: policy denies 192.0.2.7"
    );
    assert_eq!(
        bench.receive(&frames::packet(client, me, TCP, 5555, 8080)),
        PASS,
        "the to-pod program never drops"
    );
    assert_eq!(bench.judge(&reply), PASS, "reply of an accepted flow");
    assert_eq!(
        bench.judge(&frames::packet(me, client, TCP, 8080, 5556)),
        DROP,
        "another flow"
    );
    // ICMP echo: the reply to an accepted request passes; the echo id names the flow.
    let request = frames::packet(client, me, ICMP, 42, 0);
    let mut echo_reply = frames::packet(me, client, ICMP, 42, 0);
    echo_reply[14 + 20] = 0;
    assert_eq!(bench.judge(&echo_reply), DROP);
    bench.receive(&request);
    assert_eq!(bench.judge(&echo_reply), PASS);
    assert_eq!(bench.counted(Verdict::Allow, Reason::Conntrack), 2);
}

#[test]
fn audit_mode_counts_instead_of_dropping() {
    if !egret_testbed::require_root("audit_mode_counts_instead_of_dropping") {
        return;
    }
    let mut bench = Bench::new(Settings {
        flags: SETTINGS_FLAG_AUDIT_ALL,
        events_per_second: 0,
        ..Settings::DEFAULT
    });
    assert_eq!(bench.judge(&send(TCP, "8.8.8.8", 443)), PASS);
    assert_eq!(bench.judge(&send(TCP, "10.2.1.1", 80)), PASS);
    assert_eq!(bench.counted(Verdict::AuditDeny, Reason::NoRuleAllows), 1);
    assert_eq!(bench.counted(Verdict::Deny, Reason::NoRuleAllows), 0);
}

#[test]
fn unknown_interfaces_follow_the_unknown_pod_setting() {
    if !egret_testbed::require_root("unknown_interfaces_follow_the_unknown_pod_setting") {
        return;
    }
    let mut bench = Bench::new(Settings::default());
    bench.datapath.apply(&KernelImage::default()).unwrap();
    assert_eq!(
        bench.judge(&send(TCP, "8.8.8.8", 443)),
        PASS,
        "default: allow"
    );
    bench
        .datapath
        .set_settings(Settings {
            flags: SETTINGS_FLAG_DENY_UNKNOWN,
            events_per_second: 0,
            ..Settings::DEFAULT
        })
        .unwrap();
    assert_eq!(
        bench.judge(&send(TCP, "8.8.8.8", 443)),
        DROP,
        "--unknown-pod deny"
    );
    assert_eq!(bench.counted(Verdict::Deny, Reason::UnknownEndpoint), 1);
}

#[test]
fn denials_become_rate_limited_flow_events() {
    if !egret_testbed::require_root("denials_become_rate_limited_flow_events") {
        return;
    }
    let mut bench = Bench::new(Settings {
        events_per_second: 3,
        ..Settings::DEFAULT
    });
    let mut events = bench.datapath.take_events().expect("one reader");
    let lost = bench.datapath.lost_events().unwrap();
    let before = lost.total();
    assert_eq!(bench.judge(&send(TCP, "10.2.1.1", 80)), PASS);
    assert!(
        events.next_event().is_none(),
        "allowed flows are not reported unless asked"
    );
    for port in 1..=5 {
        assert_eq!(bench.judge(&send(UDP, "fd00:2::5", port)), DROP);
    }
    let mut seen = Vec::new();
    while let Some(event) = events.next_event() {
        seen.push(event);
    }
    assert_eq!(seen.len(), 3, "three events per second per endpoint");
    assert_eq!(lost.total() - before, 2, "the rest are counted as lost");
    let first = seen[0];
    assert_eq!(
        (first.verdict, first.reason),
        (Verdict::Deny as u8, Reason::NoRuleAllows as u8)
    );
    assert_eq!(
        (
            first.protocol,
            first.is_ipv6,
            first.dst_port,
            first.src_port
        ),
        (UDP, 1, 1, 40000)
    );
    assert_eq!(first.src, ME6.parse::<Ipv6Addr>().unwrap().octets());
    assert_eq!(first.dst, "fd00:2::5".parse::<Ipv6Addr>().unwrap().octets());
    assert_ne!(first.endpoint, 0);
}

#[test]
fn established_flows_are_cut_or_kept_when_policy_changes() {
    if !egret_testbed::require_root("established_flows_are_cut_or_kept_when_policy_changes") {
        return;
    }
    for (flags, expected, mode) in [
        (0, DROP, "cut"),
        (
            egret_common::maps::SETTINGS_FLAG_KEEP_ESTABLISHED,
            PASS,
            "keep",
        ),
    ] {
        let mut bench = Bench::new(Settings {
            flags,
            events_per_second: 0,
            ..Settings::DEFAULT
        });
        let packet = send(TCP, "10.2.1.1", 80);
        assert_eq!(
            bench.judge(&packet),
            PASS,
            "{mode}: allowed while the policy allows it"
        );
        // The policy stops allowing anything: the endpoint stays isolated, its entries go.
        let mut image = bench.datapath.held().clone();
        image.policy.clear();
        image.cidrs.clear();
        bench.datapath.apply(&image).unwrap();
        assert_eq!(
            bench.judge(&send(TCP, "10.2.1.1", 81)),
            DROP,
            "{mode}: new flows are judged by the new policy"
        );
        assert_eq!(
            bench.judge(&packet),
            expected,
            "{mode}: the established flow"
        );
    }
}
