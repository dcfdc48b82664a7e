//! Upgrades from earlier releases. The kernel programs of an earlier release enforce
//! from the tables its agent wrote, through links pinned where agents pin them; today's
//! agent then starts on the same pin directory under a stream of probes and must take
//! over with no wrong verdict, no connection cut, none of the old maps left pinned and
//! its own maps holding the tables.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use egret::datapath::image::{KernelImage, ip_key};
use egret_common::maps::{
    CIDR_CLASS_BIT, FLOW_STATE_ESTABLISHED, FlowEntry, FlowKey, IpKey, PolicyValue, names,
};
use egret_testbed::agent::AgentProcess;

use super::{CLIENT_TO_SERVER_ONLY, Shop, probe_stream};
use crate::common::{PROBE_TIMEOUT, egress_policy, start_agent_at};

/// An earlier release as an upgrade finds it: the kernel object its agent ran and how
/// that agent wrote the object's tables.
struct EarlierRelease {
    /// What assertion messages call it.
    name: &'static str,
    /// The release's `agent-ebpf`, built in a worktree of its commit with
    /// `RUSTC_BOOTSTRAP=1 cargo build -p egret-ebpf --target bpfel-unknown-none -Z
    /// build-std=core --release` (Rust 1.95, bpf-linker 0.13) and `llvm-strip
    /// --strip-debug` (the recipe rebuilds `egret-ebpf-v1.o` byte for byte).
    object: &'static str,
    write_tables: fn(&Path, &KernelImage),
}

/// The first map layout (commit 138e6f3): one conntrack table (`CONNTRACK_V1`) and
/// `COUNTERS_V1`, `SETTINGS_V1`, `FRAGMENTS_V1`, `EVENTS_V1`; endpoint-keyed tables
/// whose policy values hold only the NetworkPolicy allow bits (`POLICY_V1`).
const FIRST_LAYOUT: EarlierRelease = EarlierRelease {
    name: "the first map layout (138e6f3)",
    object: concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/egret-ebpf-v1.o"),
    write_tables: write_first_layout_tables,
};

/// The previous release (commit d84bb3f): endpoint-keyed tables (`ENDPOINT_V1` without
/// a table number, `CIDR_V1`, `POLICY_V2` with today's values) beside today's
/// conntrack (`CT_ESTABLISHED_V2`, `CT_UNASSURED_V2`), counters and settings.
const PREVIOUS_RELEASE: EarlierRelease = EarlierRelease {
    name: "the previous release (d84bb3f)",
    object: concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/egret-ebpf-v2.o"),
    write_tables: write_previous_release_tables,
};

#[test]
fn agent_upgrade_from_the_first_map_layout_keeps_every_verdict_and_flow() {
    if !egret_testbed::require_root(
        "agent_upgrade_from_the_first_map_layout_keeps_every_verdict_and_flow",
    ) {
        return;
    }
    let upgrade = upgrade_from(&FIRST_LAYOUT);
    assert!(
        upgrade
            .agent
            .log()
            .contains("took over the flows of the first map layout"),
        "{}",
        upgrade.agent.log()
    );
    assert!(
        upgrade.held_flows_after.iter().any(|flow| flow.2),
        "the held connection's flow moved into {}: {:?}",
        names::CT_ESTABLISHED,
        upgrade.held_flows_after
    );
}

#[test]
fn agent_upgrade_from_the_previous_release_keeps_every_verdict_and_flow() {
    if !egret_testbed::require_root(
        "agent_upgrade_from_the_previous_release_keeps_every_verdict_and_flow",
    ) {
        return;
    }
    let upgrade = upgrade_from(&PREVIOUS_RELEASE);
    // The conntrack tables kept their names and layout: the flows stay where they are.
    let before = &upgrade.held_flows_before;
    assert!(
        before
            .iter()
            .any(|(_, entry, established)| *established && entry.state == FLOW_STATE_ESTABLISHED),
        "the previous release tracks the held connection in {}: {before:?}",
        names::CT_ESTABLISHED
    );
    for (key, entry, established) in before {
        assert!(
            upgrade.held_flows_after.iter().any(|after| after.0 == *key
                && after.1.origin == entry.origin
                && after.2 == *established),
            "the flow {key:?} ({entry:?}) is still tracked in place after the upgrade: {:?}",
            upgrade.held_flows_after
        );
    }
    assert!(
        !upgrade.agent.log().contains("took over the flows"),
        "no flow table of the previous release needs migrating:\n{}",
        upgrade.agent.log()
    );
}

/// What an upgrade left for a test to judge further, after [`upgrade_from`] checked
/// what every upgrade must keep.
struct Upgrade {
    agent: AgentProcess,
    /// The held connection's entries in today's conntrack tables (key, entry, whether
    /// established) when today's agent started; empty when they were not pinned yet.
    held_flows_before: Vec<(FlowKey, FlowEntry, bool)>,
    /// The same after the upgrade, once the connection echoed again.
    held_flows_after: Vec<(FlowKey, FlowEntry, bool)>,
    _cleanup: PinDirGuard,
}

/// Leaves `release` enforcing over the shop (client may reach only server, server may
/// send nothing), holds a connection from client to server open, then starts today's
/// agent on the same pin directory under a stream of probes. Asserts that no probe saw
/// a wrong verdict, that the held connection still echoes (the server's replies pass
/// only while the connection is tracked), that no legacy map is left pinned, and that
/// today's maps enforce what the release enforced.
fn upgrade_from(release: &EarlierRelease) -> Upgrade {
    let policies = [
        egress_policy("client", "client", CLIENT_TO_SERVER_ONLY, ""),
        egress_policy("server", "server", "[]", ""),
    ]
    .join("---\n");
    let shop = Arc::new(Shop::new(&policies));
    let pin_dir = AgentProcess::unique_pin_dir();
    let cleanup = PinDirGuard(pin_dir.clone());
    let image = enforce_as(release, &shop, &pin_dir);
    let denied = shop
        .client
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(denied.is_timed_out(), "{} enforces: {denied}", release.name);
    let server = shop.server.addr_v4(8080);
    let held = egret_testbed::run_in_netns(shop.client.netns(), || {
        TcpStream::connect_timeout(&server, Duration::from_secs(2))
    })
    .expect("held connection");
    assert!(
        echoes(&held, b"before"),
        "the held connection echoes under {}",
        release.name
    );
    let held_flows_before = if pin_dir.join(names::CT_ESTABLISHED).exists() {
        held_flows(&shop, &pin_dir, &held)
    } else {
        Vec::new()
    };

    // The release's programs judge by these identity numbers until today's programs
    // replace them in the links: nothing may renumber them under those programs (an
    // open map outlives its pin, so it can be read after the upgrade too).
    let release_identities: aya::maps::HashMap<_, IpKey, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(pin_dir.join(EARLIER_IDENTITY)).unwrap(),
        ))
        .unwrap();
    let identities_before = entries(&release_identities);

    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let (shop, done) = (Arc::clone(&shop), Arc::clone(&done));
        thread::spawn(move || probe_stream(&shop, &done))
    };
    thread::sleep(Duration::from_millis(500));
    let agent = start_agent_at(&shop.topology, shop.manifests.path(), &pin_dir, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("ready") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(800));
    done.store(true, Ordering::Relaxed);
    let (probes, wrong) = stream.join().unwrap();
    assert!(probes >= 10, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "{} of {probes} verdicts were wrong across the upgrade from {}:\n{}\nagent:\n{}",
        wrong.len(),
        release.name,
        wrong.join("\n"),
        agent.log()
    );
    assert!(
        echoes(&held, b"after"),
        "the connection accepted under {} still gets its replies:\n{}",
        release.name,
        agent.log()
    );
    assert_eq!(
        entries(&release_identities),
        identities_before,
        "{EARLIER_IDENTITY}, which the programs of {} read, is as their agent left it",
        release.name
    );
    for legacy in names::LEGACY {
        assert!(
            !pin_dir.join(legacy).exists(),
            "{legacy} is unpinned after the upgrade from {}",
            release.name
        );
    }
    assert_links_run_todays_programs(&shop, &pin_dir, release);
    let held_tables = egret::datapath::read_pinned_image(&pin_dir).expect("today's tables");
    assert_eq!(
        enforcement_by_interface(&held_tables),
        enforcement_by_interface(&image),
        "today's maps enforce what {} enforced",
        release.name
    );
    let held_flows_after = held_flows(&shop, &pin_dir, &held);
    Upgrade {
        agent,
        held_flows_before,
        held_flows_after,
        _cleanup: cleanup,
    }
}

/// Leaves `pin_dir` as an agent of `release` would: its tables written, its programs
/// attached to every pod's host interface through links pinned where agents pin them.
/// Returns the tables as today's compiler lays them out.
fn enforce_as(release: &EarlierRelease, shop: &Shop, pin_dir: &Path) -> KernelImage {
    use aya::programs::{
        LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions,
    };
    use egret::{
        compile::{Ids, Scope, compile},
        source::manifest::Loader,
    };

    let mut loader = Loader::default();
    for file in ["cluster.yaml", "policies.yaml"] {
        let path = shop.manifests.path().join(file);
        loader.add_text(&path, &std::fs::read_to_string(&path).unwrap());
    }
    assert!(loader.problems.is_empty(), "{:?}", loader.problems);
    let compiled = compile(
        &loader.snapshot,
        &Scope::Node("node-1".into()),
        &Ids::default(),
    );
    let pods = [&shop.client, &shop.server, &shop.other];
    let interfaces = pods
        .iter()
        .map(|pod| {
            (
                egret::state::ObjectKey::new("shop", pod.name()),
                pod.host_ifindex(),
            )
        })
        .collect();
    let image = KernelImage::build(&compiled.tables, &interfaces, &BTreeMap::new());
    // The release's programs create and pin their maps; its tables are then written as
    // its agent wrote them.
    let object = std::fs::read(release.object)
        .unwrap_or_else(|error| panic!("{} ({}): {error}", release.name, release.object));
    let interface_names: Vec<String> = pods.iter().map(|p| p.host_interface().to_owned()).collect();
    let ifindexes: Vec<u32> = pods.iter().map(|p| p.host_ifindex()).collect();
    let pin_dir = pin_dir.to_owned();
    let write_tables = release.write_tables;
    let name = release.name;
    let written = image.clone();
    egret_testbed::run_in_netns(shop.topology.node_netns(), move || {
        std::fs::create_dir_all(&pin_dir).unwrap();
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(&object)
            .unwrap_or_else(|error| panic!("the programs of {name} load: {error}"));
        write_tables(&pin_dir, &written);
        std::fs::create_dir_all(pin_dir.join("links")).unwrap();
        for (program, attach_type, pin_name) in [
            ("egret_to_pod", TcAttachType::Egress, "to_pod"),
            ("egret_from_pod", TcAttachType::Ingress, "from_pod"),
        ] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(program).unwrap().try_into().unwrap();
            program
                .load()
                .unwrap_or_else(|error| panic!("{pin_name} of {name} verifies: {error}"));
            for (interface, ifindex) in interface_names.iter().zip(&ifindexes) {
                let id = program
                    .attach_with_options(
                        interface,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .expect("tcx attach");
                let link = FdLink::try_from(program.take_link(id).unwrap()).unwrap();
                link.pin(
                    pin_dir
                        .join("links")
                        .join(format!("{pin_name}_if{ifindex}")),
                )
                .expect("link pinned");
            }
        }
    });
    image
}

/// Asserts that every pod's pinned links run programs reading today's pinned endpoint
/// map: the links were swapped, not left running the release's programs on maps that
/// nothing writes any more.
fn assert_links_run_todays_programs(shop: &Shop, pin_dir: &Path, release: &EarlierRelease) {
    use aya::{
        maps::MapInfo,
        programs::{
            links::{FdLink, PinnedLink},
            loaded_programs,
        },
    };

    let endpoints = MapInfo::from_pin(pin_dir.join(names::ENDPOINT))
        .expect("today's endpoint map")
        .id();
    for pod in [&shop.client, &shop.server, &shop.other] {
        for pin_name in ["to_pod", "from_pod"] {
            let path = pin_dir
                .join("links")
                .join(format!("{pin_name}_if{}", pod.host_ifindex()));
            let link = FdLink::from(
                PinnedLink::from_pin(&path)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display())),
            );
            let program = link.info().expect("link info").program_id();
            let maps = loaded_programs()
                .filter_map(Result::ok)
                .find(|info| info.id() == program)
                .and_then(|info| info.map_ids().ok().flatten())
                .unwrap_or_default();
            assert!(
                maps.contains(&endpoints),
                "{} runs today's program (reading {}), not the one of {}: maps {maps:?}",
                path.display(),
                names::ENDPOINT,
                release.name
            );
        }
    }
}

/// The address -> identity map of both earlier releases.
const EARLIER_IDENTITY: &str = "IDENTITY_V1";

/// Everything an identity map holds.
fn entries(
    identities: &aya::maps::HashMap<aya::maps::MapData, IpKey, u32>,
) -> BTreeMap<IpKey, u32> {
    identities
        .iter()
        .map(|entry| entry.expect("identity entry"))
        .collect()
}

/// The endpoint value of the first layout and of the previous release: no table
/// number, its id keyed the CIDR and policy tables.
#[repr(C)]
#[derive(Clone, Copy)]
struct EndpointWithoutTable {
    id: u32,
    flags: u32,
    ipv4: [u8; 4],
    ipv6: [u8; 16],
}

const _: () = assert!(size_of::<EndpointWithoutTable>() == 28);

// SAFETY: `repr(C)`, no padding, plain integers.
unsafe impl aya::Pod for EndpointWithoutTable {}

/// Writes `image` into the first layout's maps as its agent did: endpoint-keyed tables
/// whose policy values hold only the NetworkPolicy allow bits.
fn write_first_layout_tables(pin_dir: &Path, image: &KernelImage) {
    write_endpoint_keyed_tables(pin_dir, image, "POLICY_V1", |value| value.flags);
}

/// Writes `image` into the previous release's maps as its agent did: endpoint-keyed
/// tables whose policy values are today's, and the settings.
fn write_previous_release_tables(pin_dir: &Path, image: &KernelImage) {
    use aya::maps::{Array, Map, MapData};
    use egret_common::maps::Settings;

    write_endpoint_keyed_tables(pin_dir, image, "POLICY_V2", |value| *value);
    // Its agent wrote the settings at start. Its conntrack expires flows by their idle
    // timeouts: the zeroed entry the programs create would forget every flow at its
    // next packet. The epoch is the one a first agent starts at.
    let data = MapData::from_pin(pin_dir.join(names::SETTINGS)).unwrap();
    let mut settings: Array<_, Settings> = Array::try_from(Map::Array(data)).unwrap();
    let written = Settings {
        policy_epoch: 1,
        ..Settings::DEFAULT
    };
    settings.set(0, written, 0).unwrap();
}

/// Writes `image` into endpoint-keyed tables (`ENDPOINT_V1`, `IDENTITY_V1`, `CIDR_V1`
/// and the policy map `policy_map`, valued by `policy_value`): each endpoint gets its
/// table's CIDR and policy entries under its own id.
fn write_endpoint_keyed_tables<V: aya::Pod>(
    pin_dir: &Path,
    image: &KernelImage,
    policy_map: &str,
    policy_value: fn(&PolicyValue) -> V,
) {
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    use egret_common::maps::{CidrKey, PolicyKey};

    let open = |name: &str| {
        MapData::from_pin(pin_dir.join(name)).unwrap_or_else(|error| panic!("{name}: {error}"))
    };
    let mut endpoints: HashMap<_, u32, EndpointWithoutTable> =
        HashMap::try_from(Map::HashMap(open("ENDPOINT_V1"))).unwrap();
    let mut identities: HashMap<_, IpKey, u32> =
        HashMap::try_from(Map::HashMap(open(EARLIER_IDENTITY))).unwrap();
    let mut cidrs: LpmTrie<_, CidrKey, u32> =
        LpmTrie::try_from(Map::LpmTrie(open("CIDR_V1"))).unwrap();
    let mut policy: LpmTrie<_, PolicyKey, V> =
        LpmTrie::try_from(Map::LpmTrie(open(policy_map))).unwrap();
    for (key, identity) in &image.identities {
        identities.insert(key, identity, 0).unwrap();
    }
    for (ifindex, endpoint) in &image.endpoints {
        let without_table = EndpointWithoutTable {
            id: endpoint.id,
            flags: endpoint.flags,
            ipv4: endpoint.ipv4,
            ipv6: endpoint.ipv6,
        };
        endpoints.insert(ifindex, without_table, 0).unwrap();
        let table = endpoint.table.to_be_bytes();
        let id = endpoint.id.to_be_bytes();
        for ((prefix, key), class) in image.cidrs.iter().filter(|(k, _)| k.1.table == table) {
            let key = CidrKey { table: id, ..*key };
            cidrs.insert(&Key::new(*prefix, key), class, 0).unwrap();
        }
        for ((prefix, key), value) in image.policy.iter().filter(|(k, _)| k.1.table == table) {
            let key = PolicyKey { table: id, ..*key };
            policy
                .insert(&Key::new(*prefix, key), policy_value(value), 0)
                .unwrap();
        }
    }
}

/// What an endpoint enforces, with the numbers an agent chooses (endpoint, table,
/// identity and class numbers) replaced by what they stand for, so two agents' tables
/// compare equal exactly when they enforce the same.
#[derive(Debug, PartialEq, Eq)]
struct Enforcement {
    flags: u32,
    ipv4: [u8; 4],
    ipv6: [u8; 16],
    /// (prefix length, destination, protocol, port) -> what the entry decides.
    policy: BTreeMap<(u32, Destination, u8, [u8; 2]), PolicyValue>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Destination {
    /// A pod identity: the addresses that hold it.
    Pods(BTreeSet<IpKey>),
    /// A CIDR class: the (prefix length, address) networks of the table that hold it.
    Networks(BTreeSet<(u32, [u8; 16])>),
    /// A number neither the identities nor the table's networks name.
    Unnamed(u32),
}

/// ifindex -> what its endpoint enforces.
fn enforcement_by_interface(image: &KernelImage) -> BTreeMap<u32, Enforcement> {
    let mut pods: BTreeMap<u32, BTreeSet<IpKey>> = BTreeMap::new();
    for (address, identity) in &image.identities {
        pods.entry(*identity).or_default().insert(*address);
    }
    let enforcement = |endpoint: &egret_common::maps::Endpoint| {
        let table = endpoint.table.to_be_bytes();
        let mut networks: BTreeMap<u32, BTreeSet<(u32, [u8; 16])>> = BTreeMap::new();
        for ((prefix, key), class) in image.cidrs.iter().filter(|(k, _)| k.1.table == table) {
            networks
                .entry(*class)
                .or_default()
                .insert((*prefix, key.addr));
        }
        let destination = |identity: u32| {
            let named = if identity & CIDR_CLASS_BIT == 0 {
                pods.get(&identity).cloned().map(Destination::Pods)
            } else {
                networks.get(&identity).cloned().map(Destination::Networks)
            };
            named.unwrap_or(Destination::Unnamed(identity))
        };
        let policy = image
            .policy
            .iter()
            .filter(|(k, _)| k.1.table == table)
            .map(|((prefix, key), value)| {
                let identity = destination(u32::from_be_bytes(key.identity));
                ((*prefix, identity, key.protocol, key.port), *value)
            })
            .collect();
        Enforcement {
            flags: endpoint.flags,
            ipv4: endpoint.ipv4,
            ipv6: endpoint.ipv6,
            policy,
        }
    };
    image
        .endpoints
        .iter()
        .map(|(ifindex, endpoint)| (*ifindex, enforcement(endpoint)))
        .collect()
}

/// The held connection's entries (client to server's 8080) in today's conntrack
/// tables: (key, entry, whether established).
fn held_flows(shop: &Shop, pin_dir: &Path, held: &TcpStream) -> Vec<(FlowKey, FlowEntry, bool)> {
    let port = held.local_addr().unwrap().port();
    let client = ip_key(shop.client.ipv4().into()).addr;
    let server = ip_key(shop.server.ipv4().into()).addr;
    egret::datapath::read_flows(pin_dir)
        .expect("today's conntrack tables")
        .into_iter()
        .filter(|(key, _, _)| {
            let tuple = (key.src, key.src_port, key.dst, key.dst_port);
            key.protocol == 6
                && (tuple == (client, port, server, 8080) || tuple == (server, 8080, client, port))
        })
        .collect()
}

/// Whether `message` comes back whole on `stream` (an echo server's) within 2 s.
fn echoes(mut stream: &TcpStream, message: &[u8]) -> bool {
    use std::io::{Read as _, Write as _};
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut back = vec![0; message.len()];
    stream.write_all(message).is_ok() && stream.read_exact(&mut back).is_ok() && back == message
}

/// Removes a pin directory the test made itself, also when it fails.
struct PinDirGuard(PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = egret::datapath::cleanup(&self.0);
    }
}
