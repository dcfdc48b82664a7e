//! What `domainNames` rules cost per packet, measured with `BPF_PROG_TEST_RUN` (the
//! kernel's own average time per run). Needs root and bpffs. Run with
//! `cargo xtask bench --stage dns` (or `cargo bench -p egret --bench dns [-- --quick]`);
//! prints JSON lines.
//!
//! The pod under test (the endpoint at ifindex 1, where the kernel runs test programs)
//! is under a ClusterNetworkPolicy naming `api.example.test` and `*.svc.example.test`.
//! Each frame is measured twice in every round, with the endpoint's domain flag set
//! (the pod has domain rules) and cleared (the same tables, no domain rules), so the
//! difference is what domain rules add and nothing else:
//! - *answer*: a realistic DNS reply to the pod (UDP from port 53): `api.example.test`
//!   CNAME `api.edge.cdn.test`, then four A records for it, compressed as resolvers
//!   write them. With domain rules the to-pod program copies and walks it and refreshes
//!   four learnt addresses (the first run learnt them).
//! - *answer, no name matches*: the same shape for `www.elsewhere.test`: walked, nothing
//!   learnt.
//! - *other UDP*: a datagram of the answer's size from port 443: not DNS, never read.
//! - *untracked TCP*: a RST from the pod to an address nothing allows (a RST never
//!   opens a flow, so every run is the whole policy lookup; with domain rules that
//!   includes the look-up of the destination among the learnt addresses).
//! - *established TCP*: an ACK of a connection the pod opened to the resolver (its
//!   handshake through both programs): the tracker's cached verdict.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use egret::{
    compile::{Ids, Scope, compile},
    datapath::{Capacities, Datapath, TestProgram, image::KernelImage},
    state::ObjectKey,
};
use egret_common::maps::ENDPOINT_FLAG_DOMAINS;
use egret_testbed::{
    agent::AgentProcess,
    dns::{DOMAIN_RULES_MANIFESTS as MANIFESTS, Response, TYPE_A, TYPE_CNAME, wire_name},
    frames::{self, TCP},
};
use serde_json::json;

use crate::support::Summary;

/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK: u32 = 1;
const PASS: u32 = 0;
const DROP: u32 = 2;
const ME: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 53);
/// Nothing allows it: the untracked RST's destination.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const SYN: u8 = frames::TCP_SYN;

/// A loaded set of programs under a fresh pin directory, removed on drop, holding the
/// tables of [`MANIFESTS`] with the pod at ifindex 1.
struct Loaded {
    datapath: Datapath,
    pin_dir: PathBuf,
    image: KernelImage,
}

impl Loaded {
    fn open() -> Self {
        let pin_dir = AgentProcess::unique_pin_dir();
        let datapath = Datapath::open(&pin_dir, Capacities::default()).expect("programs load");
        let snapshot = support::manifests(MANIFESTS);
        let compiled = compile(&snapshot, &Scope::Node("node-1".into()), &Ids::default());
        let interfaces = BTreeMap::from([(ObjectKey::new("t", "me"), LOOPBACK)]);
        let image = KernelImage::build(&compiled.tables, &interfaces, &BTreeMap::new());
        assert_ne!(
            image.endpoints[&LOOPBACK].flags & ENDPOINT_FLAG_DOMAINS,
            0,
            "the pod has domain rules"
        );
        Self {
            datapath,
            pin_dir,
            image,
        }
    }

    /// Writes the tables with the pod's domain flag set or cleared.
    fn domain_rules(&mut self, on: bool) {
        let mut image = self.image.clone();
        let endpoint = image.endpoints.get_mut(&LOOPBACK).expect("the pod");
        if on {
            endpoint.flags |= ENDPOINT_FLAG_DOMAINS;
        } else {
            endpoint.flags &= !ENDPOINT_FLAG_DOMAINS;
        }
        self.datapath.apply(&image).expect("tables fit");
    }

    /// The kernel's average ns per run of `frame`, checking the verdict.
    /// Opens a connection from the pod to `peer:port` through both programs (SYN,
    /// SYN-ACK, ACK) and returns the ACK its packets look like from then on.
    fn establish(&mut self, peer: Ipv4Addr, port: u16) -> Vec<u8> {
        let (me, peer) = (IpAddr::V4(ME), IpAddr::V4(peer));
        let segment = |src, dst, src_port, dst_port, flags| {
            let mut frame = frames::packet(src, dst, TCP, src_port, dst_port);
            frame[14 + 20 + 13] = flags;
            frame
        };
        self.run(
            TestProgram::FromPod,
            &segment(me, peer, 40002, port, SYN),
            1,
            PASS,
        );
        let syn_ack = segment(peer, me, port, 40002, SYN | ACK);
        self.run(TestProgram::ToPod, &syn_ack, 1, PASS);
        let ack = segment(me, peer, 40002, port, ACK);
        self.run(TestProgram::FromPod, &ack, 1, PASS);
        ack
    }

    fn run(&mut self, program: TestProgram, frame: &[u8], repeat: u32, expect: u32) -> f64 {
        let outcome = self
            .datapath
            .test_run(program, frame, repeat)
            .expect("test run");
        assert_eq!(
            outcome.return_code, expect,
            "unexpected verdict: the benchmark's tables are wrong"
        );
        outcome.duration.as_secs_f64() * 1e9
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = egret::datapath::cleanup(&self.pin_dir);
    }
}

/// A reply for `question` as a resolver writes it: a CNAME to `target`, then
/// `addresses` A records owned by the CNAME's target (a pointer into its rdata).
fn cname_answer(question: &str, target: &str, addresses: u8) -> Vec<u8> {
    // Header (12) + question (name, type, class), then the CNAME's owner pointer (2),
    // type, class, TTL and length (10): its rdata starts 12 bytes after the question.
    let cname_rdata = 12 + wire_name(question).len() + 4 + 2 + 10;
    let owner = [0xC0, u8::try_from(cname_rdata).expect("a short question")];
    let mut response = Response::new(question).answer_question(TYPE_CNAME, 300, &wire_name(target));
    for n in 1..=addresses {
        response = response.record(&owner, TYPE_A, 60, &[192, 0, 2, n]);
    }
    response.bytes()
}

/// One frame measured with and without domain rules.
struct Case {
    name: &'static str,
    program: TestProgram,
    frame: Vec<u8>,
    expect: u32,
    /// ns per run: [without domain rules, with].
    samples: [Vec<f64>; 2],
}

fn main() {
    assert!(
        egret_testbed::is_root(),
        "the DNS benchmark loads BPF programs: run it as root"
    );
    let (rounds, repeat) = if support::is_quick() {
        (3, 10_000)
    } else {
        (7, 20_000)
    };
    let mut loaded = Loaded::open();
    let reply = |message: &[u8]| {
        frames::udp_ipv4(
            SocketAddrV4::new(RESOLVER, 53),
            SocketAddrV4::new(ME, 40000),
            message,
        )
    };
    let answer = cname_answer("api.example.test", "api.edge.cdn.test", 4);
    let unmatched = cname_answer("www.elsewhere.test", "www.edge.cdn.test", 4);
    let other_udp = frames::udp_ipv4(
        SocketAddrV4::new(RESOLVER, 443),
        SocketAddrV4::new(ME, 40000),
        &answer,
    );
    let untracked = {
        let mut frame = frames::packet(IpAddr::V4(ME), IpAddr::V4(STRANGER), TCP, 40001, 443);
        // Ethernet 14 + IPv4 20 + the flags byte at 13 of the TCP header.
        frame[14 + 20 + 13] = RST;
        frame
    };
    let established = loaded.establish(RESOLVER, 8080);
    let mut cases = [
        ("answer", TestProgram::ToPod, reply(&answer), PASS),
        (
            "answer, no name matches",
            TestProgram::ToPod,
            reply(&unmatched),
            PASS,
        ),
        ("other UDP", TestProgram::ToPod, other_udp, PASS),
        ("untracked TCP", TestProgram::FromPod, untracked, DROP),
        ("established TCP", TestProgram::FromPod, established, PASS),
    ]
    .map(|(name, program, frame, expect)| Case {
        name,
        program,
        frame,
        expect,
        samples: [Vec::new(), Vec::new()],
    });
    // Round 0 warms up (and learns the answer's addresses once).
    for round in 0..=rounds {
        for with_rules in [false, true] {
            loaded.domain_rules(with_rules);
            for case in &mut cases {
                let ns = loaded.run(case.program, &case.frame, repeat, case.expect);
                if round > 0 {
                    case.samples[usize::from(with_rules)].push(ns);
                }
            }
        }
    }
    let learnt = egret::datapath::dns::read_learnt(&loaded.pin_dir).expect("learnt table");
    assert_eq!(
        learnt.len(),
        4,
        "the answer taught its four addresses and the unmatched one none"
    );
    for case in cases {
        let [without, with] = case.samples;
        for (domain_rules, samples) in [(false, without), (true, with)] {
            support::emit(
                json!({
                    "bench": "dns",
                    "case": case.name,
                    "program": match case.program {
                        TestProgram::FromPod => "from_pod",
                        _ => "to_pod",
                    },
                    "domain_rules": domain_rules,
                    "frame_bytes": case.frame.len(),
                    "runs_each": repeat,
                }),
                Some(Summary::of(samples).json("ns")),
            );
        }
    }
}
