//! Per-packet cost of the real kernel programs, measured with `BPF_PROG_TEST_RUN`
//! (the kernel's own average time per run), and the rate at which `Datapath::apply`
//! programs the maps. Needs root and bpffs. Run with `cargo xtask bench` (or
//! `cargo bench -p egret --bench datapath [-- --quick]`); prints JSON lines.
//!
//! Tables of N entries hold N pod addresses in `IDENTITY_V1` (dual-stack pods, ten per
//! identity), N prefixes in `CIDR_V1` and N entries in `POLICY_V1`, spread round-robin
//! over the local pods; the pod under test is the endpoint at ifindex 1 (where the
//! kernel runs test programs). A hit is a TCP SYN to a pod its policy allows; a miss
//! is one to an address no table knows, which is denied.
//!
//! Warm: one frame, run many times. Cycling: thousands of frames to different
//! destinations, each run a few times, so lookups find cold cache lines.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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
    ENDPOINT_FLAG_ISOLATED_ENFORCED, Endpoint, POLICY_ALLOW_AUDITED, POLICY_ALLOW_ENFORCED,
    PolicyValue, Settings,
};
use egret_testbed::{
    agent::AgentProcess,
    frames::{self, TCP},
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
/// Distinct destinations in cycling mode.
const CYCLE_FRAMES: usize = 4096;
/// Runs of each frame in cycling mode.
const CYCLE_REPEAT: u32 = 8;

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
    packet_cost(&plan);
    fixed_costs(&plan);
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

    fn capacities(self) -> Capacities {
        let size = u32::try_from(self.entries + 1024).expect("small");
        Capacities {
            endpoints: u32::try_from(self.local_pods + 16).expect("small"),
            identities: size,
            cidrs: size,
            policy: size,
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
            },
        )
    }

    /// The endpoint (1-based) and the endpoint's own index of table entry `k`.
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
            let (endpoint, own) = self.owner(k);
            let class = CIDR_CLASS_BIT | u32::try_from(1 + own % 16).expect("small");
            let (key, value) = (cidr_key(endpoint, Self::cidr(own)), class);
            image.cidrs.insert(key, value);
            let (identity, port) = self.grant(own);
            image.policy.insert(
                policy_key(&PolicyEntryKey {
                    endpoint,
                    identity,
                    ports: PortPrefix::port(TCP, port),
                }),
                PolicyValue {
                    flags: POLICY_ALLOW_ENFORCED,
                },
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

fn frame_to(family: Family, destination: IpAddr) -> Vec<u8> {
    frames::packet(family.me(), destination, TCP, 40000, ALLOWED_PORT)
}

/// One kind of packet measured on a layout.
struct Cell {
    family: Family,
    hit: bool,
    warm: Vec<f64>,
    cycling: Vec<f64>,
    warm_frame: Vec<u8>,
    cycle_frames: Vec<Vec<u8>>,
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
    // Round 0 warms up (and opens the flows the hits belong to); it is not recorded.
    for round in 0..=plan.rounds {
        for (_, loaded, noop, cells) in &mut layouts {
            let ns = loaded.run(TestProgram::Noop, &noop_frame, plan.warm_repeat, PASS);
            if round > 0 {
                noop.push(ns);
            }
            for cell in cells.iter_mut() {
                let expect = if cell.hit { PASS } else { DROP };
                let warm = loaded.run(
                    TestProgram::FromPod,
                    &cell.warm_frame,
                    plan.warm_repeat,
                    expect,
                );
                let total: f64 = cell
                    .cycle_frames
                    .iter()
                    .map(|frame| loaded.run(TestProgram::FromPod, frame, CYCLE_REPEAT, expect))
                    .sum();
                if round > 0 {
                    cell.warm.push(warm);
                    cell.cycling.push(total / as_f64(cell.cycle_frames.len()));
                }
            }
        }
    }
    for (layout, loaded, noop, cells) in layouts {
        support::emit(
            json!({
                "bench": "packet",
                "program": "noop",
                "entries": layout.entries,
                "local_pods": layout.local_pods,
                "family": "ipv4",
                "case": "pass",
                "mode": "warm",
            }),
            Some(Summary::of(noop).json("ns")),
        );
        for cell in cells {
            for (mode, samples, frames) in [
                ("warm", cell.warm, 1),
                ("cycling", cell.cycling, cell.cycle_frames.len()),
            ] {
                support::emit(
                    json!({
                        "bench": "packet",
                        "program": "from_pod",
                        "entries": layout.entries,
                        "local_pods": layout.local_pods,
                        "family": cell.family.name(),
                        "case": if cell.hit { "hit" } else { "miss" },
                        "mode": mode,
                        "frames": frames,
                    }),
                    Some(Summary::of(samples).json("ns")),
                );
            }
        }
        drop(loaded);
    }
}

/// Loads one layout's tables and prepares its frames.
fn load_layout(layout: Layout) -> (Layout, Loaded, Vec<f64>, Vec<Cell>) {
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
        for hit in [true, false] {
            let destinations: Vec<IpAddr> = if hit {
                layout.allowed_destinations(family, CYCLE_FRAMES)
            } else {
                (0..CYCLE_FRAMES).map(|n| family.unknown(n)).collect()
            };
            cells.push(Cell {
                family,
                hit,
                warm: Vec::new(),
                cycling: Vec::new(),
                warm_frame: frame_to(family, destinations[0]),
                cycle_frames: destinations.iter().map(|d| frame_to(family, *d)).collect(),
            });
        }
    }
    (layout, loaded, Vec::new(), cells)
}

/// One way through the program, for the breakdown of its fixed cost.
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

/// `FromPod` along each of its paths, from the cheapest to the whole policy lookup,
/// and a denied packet with flow events off, at the default budget, and with every
/// denial reported to a reader draining the ring buffer on the other CPU. 1,000
/// entries, one local pod; the paths alternate within each round.
fn fixed_costs(plan: &Plan) {
    let layout = Layout {
        entries: 1_000,
        local_pods: 1,
    };
    let mut loaded = Loaded::open(layout.capacities());
    let image = layout.image();
    loaded.datapath.apply(&image).expect("tables fit");
    let mut paths = paths(layout, image.endpoints[&LOOPBACK]);

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

/// Name, program, endpoint entry, events per second, frame, expected return code.
type PathRow<'a> = (
    &'static str,
    TestProgram,
    Option<Endpoint>,
    u32,
    &'a Vec<u8>,
    u32,
);

/// The paths of `fixed_costs`, with the frames and endpoint entry each needs.
fn paths(layout: Layout, isolated: Endpoint) -> Vec<Path> {
    let open = Endpoint {
        flags: isolated.flags & !ENDPOINT_FLAG_ISOLATED_ENFORCED,
        ..isolated
    };
    let me = Family::V4.me();
    let allowed = frame_to(Family::V4, layout.allowed_destinations(Family::V4, 1)[0]);
    let denied = frame_to(Family::V4, Family::V4.unknown(1));
    let stranger = Ipv4Addr::new(10, 1, 0, 99).into();
    let spoofed = frames::packet(stranger, Family::V4.unknown(1), TCP, 40000, ALLOWED_PORT);
    // What the server's veth sees of the allowed flow, for `egret_to_pod`.
    let peer = Layout::pod_address(0, Family::V4);
    let received = frames::packet(peer, me, TCP, 40000, ALLOWED_PORT);
    let (from, to, noop) = (TestProgram::FromPod, TestProgram::ToPod, TestProgram::Noop);
    let (isolated, open) = (Some(isolated), Some(open));
    let table: [PathRow<'_>; 9] = [
        ("noop program", noop, isolated, 0, &allowed, PASS),
        ("unknown interface, allowed", from, None, 0, &allowed, PASS),
        ("not isolated, allowed", from, open, 0, &allowed, PASS),
        ("spoofed source, denied", from, isolated, 0, &spoofed, DROP),
        ("isolated, allowed", from, isolated, 0, &allowed, PASS),
        ("to_pod, received", to, isolated, 0, &received, PASS),
        (
            "isolated, denied; events off",
            from,
            isolated,
            0,
            &denied,
            DROP,
        ),
        (
            "isolated, denied; 100 events/s",
            from,
            isolated,
            100,
            &denied,
            DROP,
        ),
        (
            "isolated, denied; every denial an event",
            from,
            isolated,
            u32::MAX,
            &denied,
            DROP,
        ),
    ];
    table
        .into_iter()
        .map(
            |(name, program, endpoint, per_second, frame, expect)| Path {
                name,
                program,
                endpoint,
                settings: Settings {
                    events_per_second: per_second,
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
        ("IDENTITY_V1", "insert", &identities),
        ("CIDR_V1", "insert", &with_cidrs),
        ("POLICY_V1", "insert", &full),
        ("POLICY_V1", "update", &updated),
        ("POLICY_V1", "delete", &with_cidrs),
        ("CIDR_V1", "delete", &identities),
        ("IDENTITY_V1", "delete", &KernelImage::default()),
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
