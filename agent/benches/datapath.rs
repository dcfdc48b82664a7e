//! Per-packet cost of the real kernel programs, measured with `BPF_PROG_TEST_RUN`
//! (the kernel's own average time per run), and the rate at which `Datapath::apply`
//! programs the maps. Needs root and bpffs. Run with `cargo xtask bench` (or
//! `cargo bench -p egret --bench datapath [-- --quick]`); prints JSON lines.
//!
//! Tables of N entries hold N pod addresses in the identity map (dual-stack pods, ten per
//! identity), N prefixes in the CIDR trie and N entries in the policy trie, spread round-robin
//! over the local pods; the pod under test is the endpoint at ifindex 1 (where the
//! kernel runs test programs).
//!
//! A packet of a flow the tracker holds passes on the flow's cached verdict, with no
//! policy lookup, so a frame run many times means what it should only if it never
//! opens a flow, or opens none after its first run. The kinds of packet:
//! - *hit*: a TCP RST to a pod its policy allows. A RST never opens a flow, so every
//!   run is an untracked packet: both conntrack tables miss, then the whole policy lookup.
//! - *miss*: a RST to an address no table knows: denied.
//! - *established*: an ACK of a connection whose handshake went through both programs
//!   (the pod's SYN, the peer's SYN-ACK through `egret_to_pod`, the pod's ACK): one
//!   conntrack lookup and the cached verdict.
//! - *new flow*: a SYN from a source port never used before, run once: the policy
//!   lookup and an insert into the unassured table.
//!
//! Warm: one frame, run many times. Cycling: thousands of frames (destinations, or
//! flows), each run a few times, so lookups find cold cache lines. Single: the same,
//! each frame run once, as a new flow's SYN is. The empty program is measured in every
//! mode, so each ratio to it is like for like.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use egret::{
    compile::{PolicyEntryKey, PortPrefix},
    datapath::{
        Capacities, Datapath, TestProgram,
        image::{KernelImage, cidr_key, ip_key, policy_key},
    },
};
use egret_common::maps::{
    CIDR_CLASS_BIT, ENDPOINT_FLAG_HAS_IPV4, ENDPOINT_FLAG_HAS_IPV6,
    ENDPOINT_FLAG_ISOLATED_ENFORCED, Endpoint, FLOW_ORIGIN_OUTBOUND, FlowKey, POLICY_ALLOW_AUDITED,
    POLICY_ALLOW_ENFORCED, PolicyValue, Settings, names,
};
use egret_testbed::{
    agent::AgentProcess,
    frames::{self, ICMP, TCP, UDP},
};
use ipnet::IpNet;
use serde_json::json;

use crate::support::Summary;

/// `BPF_PROG_TEST_RUN` runs programs as if on the loopback device.
const LOOPBACK: u32 = 1;
const PASS: u32 = 0;
const DROP: u32 = 2;
const ALLOWED_PORT: u16 = 8080;
/// Pods per identity (a deployment's replicas).
const PODS_PER_IDENTITY: usize = 10;
/// Distinct destinations (or flows) in cycling and single mode.
const CYCLE_FRAMES: usize = 4096;
/// Runs of each frame in cycling mode.
const CYCLE_REPEAT: u32 = 8;
const SYN: u8 = frames::TCP_SYN;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// Source port of the untracked RSTs and the denied packets: no flow ever uses it.
const UNTRACKED_PORT: u16 = 40000;
/// Source ports of the established flows, one each from here.
const ESTABLISHED_PORTS: u16 = 20000;
/// Source ports of new flows, a fresh one per frame and round from here, so every
/// SYN opens a flow.
const NEW_FLOW_PORTS: u16 = 32768;
/// The conntrack-pressure run: established flows written into the full tables, and
/// SYNs run to fill the unassured table (of 262,144 and 65,536 by default).
const PRESSURE_ESTABLISHED: usize = 200_000;
const PRESSURE_UNASSURED: usize = 60_000;

struct Plan {
    entries: &'static [usize],
    local_pods: &'static [usize],
    /// Rounds per measurement (after one warm-up round).
    rounds: usize,
    warm_repeat: u32,
    /// Entries per map for the programming-rate measurement.
    programming_entries: usize,
}

fn main() {
    assert!(
        egret_testbed::is_root(),
        "the datapath benchmark loads BPF programs: run it as root"
    );
    let plan = if support::is_quick() {
        Plan {
            entries: &[10, 1_000, 100_000],
            local_pods: &[1, 100],
            rounds: 3,
            warm_repeat: 10_000,
            programming_entries: 100_000,
        }
    } else {
        Plan {
            entries: &[10, 1_000, 100_000, 1_000_000],
            local_pods: &[1, 100],
            rounds: 7,
            warm_repeat: 20_000,
            programming_entries: 100_000,
        }
    };
    assert!(
        (plan.rounds + 1) * CYCLE_FRAMES <= usize::from(u16::MAX - NEW_FLOW_PORTS) + 1,
        "too many rounds: new flows would reuse source ports"
    );
    packet_cost(&plan);
    fixed_costs(&plan);
    conntrack_pressure(&plan);
    programming_rate(&plan);
}

/// A loaded set of programs and maps under a fresh pin directory, removed on drop.
struct Loaded {
    datapath: Datapath,
    pin_dir: PathBuf,
}

impl Loaded {
    fn open(capacities: Capacities) -> Self {
        let pin_dir = AgentProcess::unique_pin_dir();
        let datapath = Datapath::open(&pin_dir, capacities).expect("programs load");
        Self { datapath, pin_dir }
    }

    /// The kernel's average ns per run of `frame`, checking the verdict.
    fn run(&mut self, program: TestProgram, frame: &[u8], repeat: u32, expect: u32) -> f64 {
        let outcome = self
            .datapath
            .test_run(program, frame, repeat)
            .expect("test run");
        assert_eq!(
            outcome.return_code, expect,
            "unexpected verdict: the benchmark's tables are wrong"
        );
        nanos(outcome.duration)
    }

    /// The kernel's ns per run of each frame, `repeat` runs each, averaged over the frames.
    fn mean(&mut self, program: TestProgram, frames: &[Vec<u8>], repeat: u32, expect: u32) -> f64 {
        let total: f64 = frames
            .iter()
            .map(|frame| self.run(program, frame, repeat, expect))
            .sum();
        total / as_f64(frames.len())
    }

    /// Opens a connection from the pod under test the way a real one opens, through
    /// both programs (the pod's SYN, the peer's SYN-ACK, the pod's ACK), and returns
    /// the ACK its packets look like from then on.
    fn establish(&mut self, me: IpAddr, peer: IpAddr, port: u16) -> Vec<u8> {
        let syn = tcp_with_flags(me, peer, port, ALLOWED_PORT, SYN);
        self.run(TestProgram::FromPod, &syn, 1, PASS);
        let syn_ack = tcp_with_flags(peer, me, ALLOWED_PORT, port, SYN | ACK);
        self.run(TestProgram::ToPod, &syn_ack, 1, PASS);
        let ack = tcp_with_flags(me, peer, port, ALLOWED_PORT, ACK);
        self.run(TestProgram::FromPod, &ack, 1, PASS);
        ack
    }

    /// Entries in the established and the unassured table.
    fn flows(&self) -> (u64, u64) {
        let stats = self.datapath.conntrack_stats().expect("conntrack readable");
        (stats.established_entries, stats.unassured_entries)
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = egret::datapath::cleanup(&self.pin_dir);
    }
}

fn nanos(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The address of the pod under test.
    fn me(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 1, 0, 1).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// Addresses that no table holds, spread over a /15 (`IPv4`) or a /64 (`IPv6`).
    fn unknown(self, n: usize) -> IpAddr {
        let spread = u64::try_from(n)
            .expect("small")
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        match self {
            Family::V4 => {
                let low = u32::try_from(spread >> 47).expect("17 bits");
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | low).into()
            }
            Family::V6 => {
                let base = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0));
                Ipv6Addr::from(base | u128::from(spread)).into()
            }
        }
    }
}

/// The tables for one measurement.
#[derive(Clone, Copy, Debug)]
struct Layout {
    entries: usize,
    local_pods: usize,
}

impl Layout {
    fn pods(self) -> usize {
        (self.entries / 2).max(1)
    }

    fn identities(self) -> usize {
        self.pods().div_ceil(PODS_PER_IDENTITY)
    }

    fn pod_address(pod: usize, family: Family) -> IpAddr {
        let pod = u32::try_from(pod).expect("fewer than 2^32 pods");
        match family {
            Family::V4 => Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + pod).into(),
            Family::V6 => Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 0)) + u128::from(pod),
            )
            .into(),
        }
    }

    fn identity_of(pod: usize) -> u32 {
        u32::try_from(1 + pod / PODS_PER_IDENTITY).expect("small")
    }

    /// Entries per map that belong to the pod under test (endpoint 1).
    fn own_entries(self) -> usize {
        self.entries.div_ceil(self.local_pods)
    }

    /// Tables sized to the entries; conntrack at its default sizes, except that the
    /// unassured table holds every new flow a run opens (2 families × 4,096 × 8
    /// rounds) twice over, so no new flow's insert evicts.
    fn capacities(self) -> Capacities {
        let size = u32::try_from(self.entries + 1024).expect("small");
        Capacities {
            endpoints: u32::try_from(self.local_pods + 16).expect("small"),
            identities: size,
            cidrs: size,
            policy: size,
            ct_unassured: 131_072,
            ..Capacities::default()
        }
    }

    fn endpoint(index: usize) -> (u32, Endpoint) {
        let n = u32::try_from(index).expect("small");
        let ifindex = if index == 0 { LOOPBACK } else { 1000 + n };
        let ipv4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 1)) + n);
        let ipv6 =
            Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)) + u128::from(n));
        (
            ifindex,
            Endpoint {
                id: n + 1,
                flags: ENDPOINT_FLAG_ISOLATED_ENFORCED
                    | ENDPOINT_FLAG_HAS_IPV4
                    | ENDPOINT_FLAG_HAS_IPV6,
                ipv4: ipv4.octets(),
                ipv6: ipv6.octets(),
                // Each endpoint its own table: the benchmark's pods share no policies.
                table: n + 1,
            },
        )
    }

    /// The endpoint's table (1-based) and the endpoint's own index of table entry `k`.
    fn owner(self, k: usize) -> (u32, usize) {
        (
            u32::try_from(1 + k % self.local_pods).expect("small"),
            k / self.local_pods,
        )
    }

    fn cidr(own_index: usize) -> IpNet {
        let n = own_index / 2;
        if own_index.is_multiple_of(2) {
            // 100.0.0.0 upwards in /24s: far from the pods and the unknown addresses.
            let net =
                u32::from(Ipv4Addr::new(100, 0, 0, 0)) + u32::try_from(n).expect("small") * 256;
            IpNet::new(Ipv4Addr::from(net).into(), 24).expect("valid prefix")
        } else {
            let net = u128::from(Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 0))
                + (u128::from(u32::try_from(n).expect("small")) << 64);
            IpNet::new(Ipv6Addr::from(net).into(), 64).expect("valid prefix")
        }
    }

    /// (identity, port) of the endpoint's `own_index`th policy entry: every identity on
    /// the allowed port first, then on the ports above it.
    fn grant(self, own_index: usize) -> (u32, u16) {
        let identities = self.identities();
        (
            u32::try_from(1 + own_index % identities).expect("small"),
            ALLOWED_PORT + u16::try_from(own_index / identities).expect("few ports"),
        )
    }

    fn image(self) -> KernelImage {
        let mut image = KernelImage::default();
        for index in 0..self.local_pods {
            let (ifindex, endpoint) = Self::endpoint(index);
            image.endpoints.insert(ifindex, endpoint);
        }
        for pod in 0..self.pods() {
            for family in [Family::V4, Family::V6] {
                image.identities.insert(
                    ip_key(Self::pod_address(pod, family)),
                    Self::identity_of(pod),
                );
            }
        }
        for k in 0..self.entries {
            let (table, own) = self.owner(k);
            let class = CIDR_CLASS_BIT | u32::try_from(1 + own % 16).expect("small");
            let (key, value) = (cidr_key(table, Self::cidr(own)), class);
            image.cidrs.insert(key, value);
            let (identity, port) = self.grant(own);
            image.policy.insert(
                policy_key(&PolicyEntryKey {
                    table,
                    identity,
                    ports: PortPrefix::port(TCP, port),
                }),
                PolicyValue::allowing(POLICY_ALLOW_ENFORCED),
            );
        }
        image
    }

    /// Destinations the pod under test may reach on the allowed port, spread over the
    /// pods that have them, at most `limit`.
    fn allowed_destinations(self, family: Family, limit: usize) -> Vec<IpAddr> {
        let allowed_identities = self.own_entries().min(self.identities());
        let pods = (allowed_identities * PODS_PER_IDENTITY).min(self.pods());
        let step = pods.div_ceil(limit).max(1);
        (0..pods)
            .step_by(step)
            .map(|pod| Self::pod_address(pod, family))
            .collect()
    }
}

/// A TCP SYN from the pod under test: if allowed, it opens a flow on its first run.
fn frame_to(family: Family, destination: IpAddr) -> Vec<u8> {
    frames::packet(family.me(), destination, TCP, UNTRACKED_PORT, ALLOWED_PORT)
}

/// A TCP segment with `flags` (no options, no payload): `frames::packet` makes SYNs only.
fn tcp_with_flags(src: IpAddr, dst: IpAddr, src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut l4 = frames::transport(TCP, src_port, dst_port);
    // Ports, sequence and acknowledgment numbers, data offset, then the flags.
    l4[13] = flags;
    ip_packet(src, dst, TCP, &l4)
}

fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => frames::ipv4(s, d, protocol, None, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => frames::ipv6(s, d, protocol, None, l4),
        _ => panic!("mixed address families"),
    }
}

/// A kind of packet the per-packet grid measures (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Hit,
    Miss,
    Established,
    NewFlow,
}

impl Case {
    const ALL: [Case; 4] = [Case::Hit, Case::Miss, Case::Established, Case::NewFlow];

    fn name(self) -> &'static str {
        match self {
            Case::Hit => "hit",
            Case::Miss => "miss",
            Case::Established => "established",
            Case::NewFlow => "new_flow",
        }
    }

    fn expect(self) -> u32 {
        if self == Case::Miss { DROP } else { PASS }
    }

    /// A new flow's SYN runs once, by definition; the untracked hit and the
    /// established ACK are also run once per frame, to set beside it.
    fn modes(self) -> &'static [Mode] {
        match self {
            Case::Hit | Case::Established => &[Mode::Warm, Mode::Cycling, Mode::Single],
            Case::Miss => &[Mode::Warm, Mode::Cycling],
            Case::NewFlow => &[Mode::Single],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Warm,
    Cycling,
    Single,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Warm, Mode::Cycling, Mode::Single];

    fn name(self) -> &'static str {
        match self {
            Mode::Warm => "warm",
            Mode::Cycling => "cycling",
            Mode::Single => "single",
        }
    }

    fn repeat(self, plan: &Plan) -> u32 {
        match self {
            Mode::Warm => plan.warm_repeat,
            Mode::Cycling => CYCLE_REPEAT,
            Mode::Single => 1,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One kind of packet measured on a layout.
struct Cell {
    family: Family,
    case: Case,
    /// The frames of cycling and single mode; the first is warm mode's. Empty for a
    /// new flow, whose frames are made afresh every round.
    frames: Vec<Vec<u8>>,
    destinations: Vec<IpAddr>,
    /// By `Mode::index`.
    samples: [Vec<f64>; 3],
}

impl Cell {
    fn new(family: Family, case: Case, destinations: Vec<IpAddr>, frames: Vec<Vec<u8>>) -> Self {
        Self {
            family,
            case,
            frames,
            destinations,
            samples: Default::default(),
        }
    }

    fn measure(&self, loaded: &mut Loaded, mode: Mode, round: usize, plan: &Plan) -> f64 {
        let (repeat, expect) = (mode.repeat(plan), self.case.expect());
        match (mode, self.case) {
            (Mode::Warm, _) => loaded.run(TestProgram::FromPod, &self.frames[0], repeat, expect),
            (_, Case::NewFlow) => {
                loaded.mean(TestProgram::FromPod, &self.new_flows(round), repeat, expect)
            }
            _ => loaded.mean(TestProgram::FromPod, &self.frames, repeat, expect),
        }
    }

    /// SYNs to the allowed destinations in turn, each from a source port no earlier
    /// round used.
    fn new_flows(&self, round: usize) -> Vec<Vec<u8>> {
        (0..CYCLE_FRAMES)
            .map(|i| {
                let port = u16::try_from(round * CYCLE_FRAMES + i)
                    .ok()
                    .and_then(|n| NEW_FLOW_PORTS.checked_add(n))
                    .expect("checked in main: the ports suffice");
                let destination = self.destinations[i % self.destinations.len()];
                tcp_with_flags(self.family.me(), destination, port, ALLOWED_PORT, SYN)
            })
            .collect()
    }
}

/// A layout's programs and maps, its empty-program samples by mode, and its cells.
struct LayoutRun {
    layout: Layout,
    loaded: Loaded,
    noop: [Vec<f64>; 3],
    cells: Vec<Cell>,
}

/// Every layout is loaded at once (one set of programs and maps each), and every
/// round measures all of them, so drift on a shared machine hits all sizes alike.
fn packet_cost(plan: &Plan) {
    let mut layouts = Vec::new();
    for &local_pods in plan.local_pods {
        for &entries in plan.entries {
            layouts.push(load_layout(Layout {
                entries,
                local_pods,
            }));
        }
    }
    let noop_frame = frame_to(Family::V4, Family::V4.unknown(0));
    let noop_frames = vec![noop_frame.clone(); CYCLE_FRAMES];
    // Round 0 warms up; it is not recorded.
    for round in 0..=plan.rounds {
        for run in &mut layouts {
            for mode in Mode::ALL {
                let repeat = mode.repeat(plan);
                let ns = match mode {
                    Mode::Warm => run.loaded.run(TestProgram::Noop, &noop_frame, repeat, PASS),
                    _ => run
                        .loaded
                        .mean(TestProgram::Noop, &noop_frames, repeat, PASS),
                };
                if round > 0 {
                    run.noop[mode.index()].push(ns);
                }
            }
            for cell in &mut run.cells {
                for &mode in cell.case.modes() {
                    let ns = cell.measure(&mut run.loaded, mode, round, plan);
                    if round > 0 {
                        cell.samples[mode.index()].push(ns);
                    }
                }
            }
        }
    }
    for run in layouts {
        let layout = run.layout;
        for (mode, samples) in Mode::ALL.into_iter().zip(run.noop) {
            support::emit(
                json!({
                    "bench": "packet",
                    "program": "noop",
                    "entries": layout.entries,
                    "local_pods": layout.local_pods,
                    "family": "ipv4",
                    "case": "pass",
                    "mode": mode.name(),
                    "repeat": mode.repeat(plan),
                }),
                Some(Summary::of(samples).json("ns")),
            );
        }
        for cell in run.cells {
            for &mode in cell.case.modes() {
                let frames = match mode {
                    Mode::Warm => 1,
                    Mode::Cycling | Mode::Single if cell.case == Case::NewFlow => CYCLE_FRAMES,
                    Mode::Cycling | Mode::Single => cell.frames.len(),
                };
                support::emit(
                    json!({
                        "bench": "packet",
                        "program": "from_pod",
                        "entries": layout.entries,
                        "local_pods": layout.local_pods,
                        "family": cell.family.name(),
                        "case": cell.case.name(),
                        "mode": mode.name(),
                        "repeat": mode.repeat(plan),
                        "frames": frames,
                    }),
                    Some(Summary::of(cell.samples[mode.index()].clone()).json("ns")),
                );
            }
        }
        drop(run.loaded);
    }
}

/// Loads one layout's tables, opens its established flows and prepares its frames.
fn load_layout(layout: Layout) -> LayoutRun {
    let mut loaded = Loaded::open(layout.capacities());
    let started = Instant::now();
    let image = layout.image();
    let built = started.elapsed();
    let started = Instant::now();
    let stats = loaded.datapath.apply(&image).expect("tables fit");
    let applied = started.elapsed();
    drop(image);
    support::emit(
        json!({
            "bench": "table_load",
            "entries": layout.entries,
            "local_pods": layout.local_pods,
            "written": stats.written,
            "build_s": built.as_secs_f64(),
            "apply_s": applied.as_secs_f64(),
            "entries_per_s": as_f64(stats.written) / applied.as_secs_f64(),
        }),
        None,
    );
    loaded
        .datapath
        .set_settings(Settings::default())
        .expect("settings");
    let mut cells = Vec::new();
    for family in [Family::V4, Family::V6] {
        let me = family.me();
        let allowed = layout.allowed_destinations(family, CYCLE_FRAMES);
        for case in Case::ALL {
            let (destinations, frames) = match case {
                Case::Hit => {
                    let frames = allowed
                        .iter()
                        .map(|d| tcp_with_flags(me, *d, UNTRACKED_PORT, ALLOWED_PORT, RST))
                        .collect();
                    (allowed.clone(), frames)
                }
                Case::Miss => {
                    let unknown: Vec<IpAddr> =
                        (0..CYCLE_FRAMES).map(|n| family.unknown(n)).collect();
                    let frames = unknown
                        .iter()
                        .map(|d| tcp_with_flags(me, *d, UNTRACKED_PORT, ALLOWED_PORT, RST))
                        .collect();
                    (unknown, frames)
                }
                // As many flows as cycling has frames, over the allowed destinations
                // (few at small sizes) from distinct source ports.
                Case::Established => {
                    let frames = (0..CYCLE_FRAMES)
                        .map(|i| {
                            let port = ESTABLISHED_PORTS + u16::try_from(i).expect("few flows");
                            loaded.establish(me, allowed[i % allowed.len()], port)
                        })
                        .collect();
                    (allowed.clone(), frames)
                }
                Case::NewFlow => (allowed.clone(), Vec::new()),
            };
            cells.push(Cell::new(family, case, destinations, frames));
        }
    }
    let (established, _) = loaded.flows();
    assert_eq!(
        established,
        2 * u64::try_from(CYCLE_FRAMES).expect("small"),
        "every handshake should leave its flow in the established table"
    );
    LayoutRun {
        layout,
        loaded,
        noop: Default::default(),
        cells,
    }
}

/// One way through the programs, for the breakdown of their fixed cost.
struct Path {
    name: &'static str,
    program: TestProgram,
    /// The pod under test's endpoint entry (`None`: unknown interface).
    endpoint: Option<Endpoint>,
    settings: Settings,
    frame: Vec<u8>,
    expect: u32,
    samples: Vec<f64>,
    /// Denials (or their events) the kernel counted as lost flow events.
    lost: u64,
}

/// The programs along each of their paths, from the cheapest to the whole policy
/// lookup, and a denied packet with flow events off, at the default budget, and with
/// every denial reported to a reader draining the ring buffer on the other CPU. 1,000
/// entries, one local pod; the paths alternate within each round.
fn fixed_costs(plan: &Plan) {
    let layout = Layout {
        entries: 1_000,
        local_pods: 1,
    };
    let mut loaded = Loaded::open(layout.capacities());
    let image = layout.image();
    loaded.datapath.apply(&image).expect("tables fit");
    let frames = PathFrames::open(&mut loaded, layout);
    let mut paths = paths(&frames, image.endpoints[&LOOPBACK]);

    let mut reader = loaded.datapath.take_events().expect("one reader");
    let lost = loaded.datapath.lost_events().expect("lost counter");
    let stop = Arc::new(AtomicBool::new(false));
    let drained = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut events = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                match reader.next_event() {
                    Some(_) => events += 1,
                    None => std::thread::yield_now(),
                }
            }
            events
        }
    });
    for round in 0..=plan.rounds {
        for path in &mut paths {
            let mut wanted = image.clone();
            match path.endpoint {
                Some(endpoint) => wanted.endpoints.insert(LOOPBACK, endpoint),
                None => wanted.endpoints.remove(&LOOPBACK),
            };
            // A changed endpoint entry moves the policy epoch: a tracked flow's first
            // packet afterwards is judged again, once in `warm_repeat` runs.
            loaded.datapath.apply(&wanted).expect("tables fit");
            loaded
                .datapath
                .set_settings(path.settings)
                .expect("settings");
            let lost_before = lost.total();
            let ns = loaded.run(path.program, &path.frame, plan.warm_repeat, path.expect);
            if round > 0 {
                path.samples.push(ns);
                path.lost += lost.total() - lost_before;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let delivered = drained.join().expect("reader thread");
    let runs = u64::try_from(plan.rounds).expect("few") * u64::from(plan.warm_repeat);
    for path in paths {
        support::emit(
            json!({
                "bench": "path",
                "path": path.name,
                "events_per_second": path.settings.events_per_second,
                "packets": runs,
                "events_lost": path.lost,
                "events_delivered_all_paths": delivered,
            }),
            Some(Summary::of(path.samples).json("ns")),
        );
    }
}

/// The frames of `fixed_costs`' paths.
struct PathFrames {
    established: Vec<u8>,
    peer_ack: Vec<u8>,
    unassured: Vec<u8>,
    untracked: Vec<u8>,
    related: Vec<u8>,
    later_fragment: Vec<u8>,
    denied: Vec<u8>,
    spoofed: Vec<u8>,
}

impl PathFrames {
    /// Makes the frames, and opens through the programs the flows the tracked paths
    /// need: a connection to an allowed server, established; a SYN to it still
    /// awaiting its SYN-ACK; a stranger's datagram to a closed port of the pod (which
    /// the pod answers with a port unreachable); and the first fragment of an allowed
    /// packet.
    fn open(loaded: &mut Loaded, layout: Layout) -> Self {
        let me = Family::V4.me();
        let server = layout.allowed_destinations(Family::V4, 1)[0];
        let (IpAddr::V4(me4), IpAddr::V4(server4), IpAddr::V4(stranger)) =
            (me, server, Family::V4.unknown(7))
        else {
            unreachable!("IPv4 addresses");
        };

        let established = loaded.establish(me, server, ESTABLISHED_PORTS);
        let unassured = tcp_with_flags(me, server, ESTABLISHED_PORTS + 1, ALLOWED_PORT, SYN);
        loaded.run(TestProgram::FromPod, &unassured, 1, PASS);

        let datagram = frames::packet(stranger.into(), me, UDP, 5555, 9);
        loaded.run(TestProgram::ToPod, &datagram, 1, PASS);
        let mut message = frames::fragmentation_needed(
            SocketAddrV4::new(stranger, 5555),
            SocketAddrV4::new(me4, 9),
            UDP,
            0,
        );
        message[1] = 3; // port unreachable (the programs never verify checksums)

        let first = frames::ipv4(
            me4,
            server4,
            TCP,
            Some((77, 0, true)),
            &frames::transport(TCP, ESTABLISHED_PORTS + 2, ALLOWED_PORT),
        );
        loaded.run(TestProgram::FromPod, &first, 1, PASS);

        let impostor = Ipv4Addr::new(10, 1, 0, 99).into();
        Self {
            established,
            peer_ack: tcp_with_flags(server, me, ALLOWED_PORT, ESTABLISHED_PORTS, ACK),
            unassured,
            untracked: tcp_with_flags(me, server, UNTRACKED_PORT, ALLOWED_PORT, RST),
            related: frames::ipv4(me4, stranger, ICMP, None, &message),
            later_fragment: frames::ipv4(me4, server4, TCP, Some((77, 185, false)), &[0; 64]),
            denied: frame_to(Family::V4, Family::V4.unknown(1)),
            spoofed: frames::packet(impostor, Family::V4.unknown(1), TCP, 40000, ALLOWED_PORT),
        }
    }
}

/// The paths of `fixed_costs`, with the endpoint entry each needs.
#[expect(clippy::too_many_lines, reason = "a table of paths, one tuple each")]
fn paths(frames: &PathFrames, isolated: Endpoint) -> Vec<Path> {
    let open = Some(Endpoint {
        flags: isolated.flags & !ENDPOINT_FLAG_ISOLATED_ENFORCED,
        ..isolated
    });
    let iso = Some(isolated);
    let (from, to, noop) = (TestProgram::FromPod, TestProgram::ToPod, TestProgram::Noop);
    let f = frames;
    // Name, program, endpoint entry, events per second, frame, expected return code.
    let table: [(&'static str, _, _, u32, &Vec<u8>, _); 14] = [
        ("noop program", noop, iso, 0, &f.untracked, PASS),
        (
            "unknown interface, allowed",
            from,
            None,
            0,
            &f.untracked,
            PASS,
        ),
        (
            "not isolated, established flow (ACK)",
            from,
            open,
            0,
            &f.established,
            PASS,
        ),
        (
            "not isolated, untracked (RST)",
            from,
            open,
            0,
            &f.untracked,
            PASS,
        ),
        ("spoofed source, denied", from, iso, 0, &f.spoofed, DROP),
        (
            "isolated, established flow (ACK)",
            from,
            iso,
            0,
            &f.established,
            PASS,
        ),
        (
            "isolated, unassured flow (its SYN again)",
            from,
            iso,
            0,
            &f.unassured,
            PASS,
        ),
        (
            "isolated, allowed, untracked (RST)",
            from,
            iso,
            0,
            &f.untracked,
            PASS,
        ),
        (
            "related ICMP error (port unreachable)",
            from,
            iso,
            0,
            &f.related,
            PASS,
        ),
        (
            "later fragment of an allowed packet",
            from,
            iso,
            0,
            &f.later_fragment,
            PASS,
        ),
        (
            "to_pod, established flow (peer's ACK)",
            to,
            iso,
            0,
            &f.peer_ack,
            PASS,
        ),
        (
            "isolated, denied; events off",
            from,
            iso,
            0,
            &f.denied,
            DROP,
        ),
        (
            "isolated, denied; 100 events/s",
            from,
            iso,
            100,
            &f.denied,
            DROP,
        ),
        (
            "isolated, denied; every denial an event",
            from,
            iso,
            u32::MAX,
            &f.denied,
            DROP,
        ),
    ];
    table
        .into_iter()
        .map(
            |(name, program, endpoint, events_per_second, frame, expect)| Path {
                name,
                program,
                endpoint,
                settings: Settings {
                    events_per_second,
                    ..Settings::DEFAULT
                },
                frame: frame.clone(),
                expect,
                samples: Vec::new(),
                lost: 0,
            },
        )
        .collect()
}

/// The tables of the conntrack-pressure run: the programs and maps, the measured
/// flows' ACKs, and the samples by `Mode::index`.
struct PressureTables {
    name: &'static str,
    loaded: Loaded,
    acks: Vec<Vec<u8>>,
    samples: [Vec<f64>; 3],
}

/// An established flow's ACK with both conntrack tables (at their default sizes)
/// nearly full, against the same with them nearly empty, in the same rounds. The full
/// tables get `PRESSURE_ESTABLISHED` flows written as the agent seeds them, and
/// `PRESSURE_UNASSURED` SYNs of the pod to allowed servers, which stay unanswered.
fn conntrack_pressure(plan: &Plan) {
    let layout = Layout {
        entries: 1_000,
        local_pods: 1,
    };
    let capacities = Capacities {
        ct_unassured: Capacities::default().ct_unassured,
        ..layout.capacities()
    };
    let image = layout.image();
    let me = Family::V4.me();
    let allowed = layout.allowed_destinations(Family::V4, CYCLE_FRAMES);
    let mut tables = Vec::new();
    for name in ["empty", "full"] {
        let mut loaded = Loaded::open(capacities);
        loaded.datapath.apply(&image).expect("tables fit");
        if name == "full" {
            loaded
                .datapath
                .seed_flows(&seeded_flows(me))
                .expect("seeded flows fit");
        }
        let acks = (0..CYCLE_FRAMES)
            .map(|i| {
                let port = ESTABLISHED_PORTS + u16::try_from(i).expect("few flows");
                loaded.establish(me, allowed[i % allowed.len()], port)
            })
            .collect();
        if name == "full" {
            for i in 0..PRESSURE_UNASSURED {
                let port = u16::try_from(1024 + i / allowed.len())
                    .ok()
                    .filter(|port| *port < ESTABLISHED_PORTS)
                    .expect("enough allowed servers for distinct flows");
                let syn = tcp_with_flags(me, allowed[i % allowed.len()], port, ALLOWED_PORT, SYN);
                loaded.run(TestProgram::FromPod, &syn, 1, PASS);
            }
        }
        tables.push(PressureTables {
            name,
            loaded,
            acks,
            samples: Default::default(),
        });
    }
    let modes = Mode::ALL;
    for round in 0..=plan.rounds {
        for table in &mut tables {
            for mode in modes {
                let repeat = mode.repeat(plan);
                let ns = match mode {
                    Mode::Warm => {
                        table
                            .loaded
                            .run(TestProgram::FromPod, &table.acks[0], repeat, PASS)
                    }
                    _ => table
                        .loaded
                        .mean(TestProgram::FromPod, &table.acks, repeat, PASS),
                };
                if round > 0 {
                    table.samples[mode.index()].push(ns);
                }
            }
        }
    }
    for table in tables {
        let stats = table
            .loaded
            .datapath
            .conntrack_stats()
            .expect("conntrack readable");
        for mode in modes {
            support::emit(
                json!({
                    "bench": "conntrack_pressure",
                    "tables": table.name,
                    "seeded_established": if table.name == "full" { PRESSURE_ESTABLISHED } else { 0 },
                    "unanswered_syns": if table.name == "full" { PRESSURE_UNASSURED } else { 0 },
                    "mode": mode.name(),
                    "repeat": mode.repeat(plan),
                    "frames": if mode == Mode::Warm { 1 } else { table.acks.len() },
                    "established_entries": stats.established_entries,
                    "unassured_entries": stats.unassured_entries,
                    "established_capacity": capacities.ct_established,
                    "unassured_capacity": capacities.ct_unassured,
                    "evicted_established": stats.evicted_established(),
                    "evicted_unassured": stats.evicted_unassured(),
                    "insert_failures": stats.insert_failures,
                }),
                Some(Summary::of(table.samples[mode.index()].clone()).json("ns")),
            );
        }
    }
}

/// Established TCP flows of the pod under test to servers no table knows
/// (172.16.0.0/14), as the agent seeds them from the kernel's conntrack.
fn seeded_flows(me: IpAddr) -> Vec<(FlowKey, u8)> {
    let IpAddr::V4(me) = me else {
        unreachable!("the pressure run is IPv4");
    };
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    (0..PRESSURE_ESTABLISHED)
        .map(|k| {
            let server = Ipv4Addr::from(base + u32::try_from(k).expect("small"));
            let key = FlowKey {
                src: me.to_ipv6_mapped().octets(),
                dst: server.to_ipv6_mapped().octets(),
                src_port: 50000,
                dst_port: 443,
                protocol: TCP,
                pad: [0; 3],
            };
            (key, FLOW_ORIGIN_OUTBOUND)
        })
        .collect()
}

/// Entries per second through `Datapath::apply`, per map and operation, from empty
/// maps of `plan.programming_entries` capacity.
fn programming_rate(plan: &Plan) {
    let layout = Layout {
        entries: plan.programming_entries,
        local_pods: 100,
    };
    let mut loaded = Loaded::open(layout.capacities());
    let full = layout.image();
    let mut updated = full.clone();
    for value in updated.policy.values_mut() {
        value.flags = POLICY_ALLOW_ENFORCED | POLICY_ALLOW_AUDITED;
    }
    let identities = KernelImage {
        identities: full.identities.clone(),
        ..KernelImage::default()
    };
    let with_cidrs = KernelImage {
        cidrs: full.cidrs.clone(),
        ..identities.clone()
    };
    // Each step differs from the one before in one map only.
    let steps: [(&str, &str, &KernelImage); 7] = [
        (names::IDENTITY, "insert", &identities),
        (names::CIDR, "insert", &with_cidrs),
        (names::POLICY, "insert", &full),
        (names::POLICY, "update", &updated),
        (names::POLICY, "delete", &with_cidrs),
        (names::CIDR, "delete", &identities),
        (names::IDENTITY, "delete", &KernelImage::default()),
    ];
    let mut rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let rounds = plan.rounds.min(3);
    for _ in 0..rounds {
        for (i, (_, _, image)) in steps.iter().enumerate() {
            let started = Instant::now();
            let stats = loaded.datapath.apply(image).expect("tables fit");
            let elapsed = started.elapsed().as_secs_f64();
            let entries = stats.written + stats.removed;
            rates.entry(i).or_default().push(as_f64(entries) / elapsed);
        }
    }
    for (i, (map, operation, _)) in steps.iter().enumerate() {
        support::emit(
            json!({
                "bench": "programming",
                "map": map,
                "operation": operation,
                "entries": plan.programming_entries,
            }),
            Some(Summary::of(rates.remove(&i).unwrap_or_default()).json("per_s")),
        );
    }
}

#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn as_f64(n: usize) -> f64 {
    n as f64
}
