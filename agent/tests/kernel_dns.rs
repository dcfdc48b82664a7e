//! The kernel's side of `domainNames`, with `BPF_PROG_TEST_RUN`: DNS answers run
//! through the to-pod program are learnt for the endpoint (UDP and TCP, CNAME chains,
//! case, wildcards), and the from-pod program then allows exactly the learnt
//! addresses on the rule's ports; malformed answers learn nothing.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
};

use egret::{
    compile::{Ids, Scope, compile},
    datapath::{
        Capacities, Datapath, TestProgram, dns::read_learnt, dns::read_stats, image::KernelImage,
    },
    source::manifest::Loader,
    state::ObjectKey,
};
use egret_common::dns::DnsSettings;
use egret_testbed::{
    agent::AgentProcess,
    dns::{DOMAIN_RULES_MANIFESTS as MANIFESTS, Response, TYPE_A, TYPE_CNAME, wire_name},
    frames::{self, TCP},
};

const PASS: u32 = 0;
const DROP: u32 = 2;
/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK: u32 = 1;
const ME: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 53);

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
    fn new() -> Self {
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
        Self { datapath, pin_dir }
    }

    fn run(&mut self, program: TestProgram, frame: &[u8]) -> u32 {
        self.datapath
            .test_run(program, frame, 1)
            .expect("test run")
            .return_code
    }

    /// A DNS answer over UDP reaching the endpoint.
    fn receive_udp(&mut self, message: &[u8]) -> u32 {
        let frame = frames::udp_ipv4(
            SocketAddrV4::new(RESOLVER, 53),
            SocketAddrV4::new(ME, 40000),
            message,
        );
        self.run(TestProgram::ToPod, &frame)
    }

    /// A DNS answer over TCP (one segment, the 2-byte length first).
    fn receive_tcp(&mut self, message: &[u8]) -> u32 {
        let mut segment = Vec::new();
        segment.extend_from_slice(&53u16.to_be_bytes());
        segment.extend_from_slice(&40001u16.to_be_bytes());
        segment.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 1, 0x50, 0x18, 0xFF, 0xFF, 0, 0, 0, 0]);
        segment.extend_from_slice(&u16::try_from(message.len()).unwrap().to_be_bytes());
        segment.extend_from_slice(message);
        let frame = frames::ipv4(RESOLVER, ME, TCP, None, &segment);
        self.run(TestProgram::ToPod, &frame)
    }

    /// A SYN from the endpoint to `to:port`.
    fn connect(&mut self, to: Ipv4Addr, port: u16) -> u32 {
        let frame = frames::packet(IpAddr::V4(ME), IpAddr::V4(to), TCP, 41000 + port, port);
        self.run(TestProgram::FromPod, &frame)
    }

    fn learnt(&self) -> Vec<IpAddr> {
        read_learnt(&self.pin_dir)
            .unwrap()
            .into_iter()
            .map(|a| a.address)
            .collect()
    }
}

fn a(last: u8) -> (Ipv4Addr, [u8; 4]) {
    let addr = Ipv4Addr::new(192, 0, 2, last);
    (addr, addr.octets())
}

#[test]
fn answers_teach_the_endpoint_exactly_the_allowed_names_addresses() {
    if !egret_testbed::require_root(
        "answers_teach_the_endpoint_exactly_the_allowed_names_addresses",
    ) {
        return;
    }
    let mut bench = Bench::new();
    let (api, api_rdata) = a(1);
    assert_eq!(bench.connect(api, 443), DROP, "never resolved");
    let answer = Response::new("API.Example.Test")
        .answer_question(TYPE_A, 30, &api_rdata)
        .bytes();
    assert_eq!(bench.receive_udp(&answer), PASS, "the answer itself passes");
    assert_eq!(bench.connect(api, 443), PASS, "learnt, in another case");
    assert_eq!(bench.connect(api, 80), DROP, "not the rule's port");

    // The bare parent of a wildcard teaches nothing; a name under it does.
    let (parent, parent_rdata) = a(2);
    let answer = Response::new("svc.example.test")
        .answer_question(TYPE_A, 30, &parent_rdata)
        .bytes();
    bench.receive_udp(&answer);
    assert_eq!(bench.connect(parent, 443), DROP, "bare parent");
    let (deep, deep_rdata) = a(3);
    let answer = Response::new("x.y.svc.example.test")
        .answer_question(TYPE_A, 30, &deep_rdata)
        .bytes();
    bench.receive_udp(&answer);
    assert_eq!(
        bench.connect(deep, 443),
        PASS,
        "two labels under the wildcard"
    );

    // A CNAME chain to an allowed name, over TCP.
    let (chained, chained_rdata) = a(4);
    let answer = Response::new("alias.other.test")
        .answer_question(TYPE_CNAME, 30, &wire_name("b.svc.example.test"))
        .answer("b.svc.example.test", TYPE_A, 30, &chained_rdata)
        .bytes();
    assert_eq!(bench.receive_tcp(&answer), PASS);
    assert_eq!(bench.connect(chained, 443), PASS, "CNAME chain over TCP");

    // Malformed: a looping pointer, a truncated answer.
    let (looped, looped_rdata) = a(5);
    let header = Response::new("api.example.test").bytes();
    let owner = u8::try_from(header.len()).unwrap();
    let answer = Response::new("api.example.test")
        .record(&[0xC0, owner], TYPE_A, 30, &looped_rdata)
        .bytes();
    bench.receive_udp(&answer);
    let (cut, cut_rdata) = a(6);
    let answer = Response::new("api.example.test")
        .answer_question(TYPE_A, 30, &cut_rdata)
        .bytes();
    bench.receive_udp(&answer[..answer.len() - 1]);
    assert_eq!(bench.connect(looped, 443), DROP, "looping pointer");
    assert_eq!(bench.connect(cut, 443), DROP, "truncated");

    let mut learnt = bench.learnt();
    learnt.sort();
    assert_eq!(learnt, [api, deep, chained].map(IpAddr::V4));
    let stats = read_stats(&bench.pin_dir).unwrap();
    assert_eq!(stats.learnt, 3, "{stats:?}");
    assert_eq!(stats.invalid, 2, "{stats:?}");
}

#[test]
fn an_address_expires_for_new_flows_and_a_name_keeps_its_newest_answers() {
    if !egret_testbed::require_root(
        "an_address_expires_for_new_flows_and_a_name_keeps_its_newest_answers",
    ) {
        return;
    }
    let mut bench = Bench::new();
    bench
        .datapath
        .set_dns_settings(DnsSettings {
            min_ttl_s: 0,
            grace_s: 0,
        })
        .unwrap();
    let (api, api_rdata) = a(1);
    let answer = Response::new("api.example.test")
        .answer_question(TYPE_A, 1, &api_rdata)
        .bytes();
    bench.receive_udp(&answer);
    assert_eq!(bench.connect(api, 443), PASS);
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    // The flow opened while the address was valid goes on; a new one is denied.
    assert_eq!(bench.connect(api, 443), PASS, "the open flow");
    let fresh = frames::packet(IpAddr::V4(ME), IpAddr::V4(api), TCP, 50000, 443);
    assert_eq!(
        bench.run(TestProgram::FromPod, &fresh),
        DROP,
        "a new flow after expiry"
    );
    assert_eq!(read_stats(&bench.pin_dir).unwrap().expired, 1);

    // 130 answers of one wildcard: its ring keeps the newest 128.
    for i in 0..130u32 {
        let [_, _, x, y] = i.to_be_bytes();
        let answer = Response::new(&format!("h{i}.svc.example.test"))
            .answer_question(TYPE_A, 300, &[198, 18, x, y])
            .bytes();
        bench.receive_udp(&answer);
    }
    let learnt = bench.learnt();
    let ring: Vec<&IpAddr> = learnt
        .iter()
        .filter(|a| a.to_string().starts_with("198.18."))
        .collect();
    assert_eq!(ring.len(), 128);
    assert!(!learnt.contains(&IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0))));
    assert!(!learnt.contains(&IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))));
    assert!(learnt.contains(&IpAddr::V4(Ipv4Addr::new(198, 18, 0, 129))));
    assert_eq!(read_stats(&bench.pin_dir).unwrap().evicted, 2);
}
