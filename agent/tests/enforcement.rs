//! Enforcement behaviours on real traffic in network namespaces: audit modes, replies
//! under deny-all, agent restarts and policy updates under a continuous probe stream.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    PROBE_TIMEOUT, counted, egress_policy,
    site::{self, Site},
    start_agent_at,
};
use egret_testbed::{Pod, agent::AgentProcess};

/// client (app: client), server (app: server), other (app: other), all in `shop`,
/// each with a TCP and UDP echo on 8080.
struct Shop {
    site: Site,
    client: Pod,
    server: Pod,
    other: Pod,
}

impl Shop {
    fn new(policies: &str) -> Self {
        let site = Site::new(&site::SHOP, policies);
        let [client, server, other] = [0, 1, 2].map(|i| site.pods[i].clone());
        Self {
            site,
            client,
            server,
            other,
        }
    }
}

impl std::ops::Deref for Shop {
    type Target = Site;

    fn deref(&self) -> &Site {
        &self.site
    }
}

const CLIENT_TO_SERVER_ONLY: &str = "[{to: [{podSelector: {matchLabels: {app: server}}}]}]";

#[test]
fn global_audit_mode_passes_and_counts() {
    if !egret_testbed::require_root("global_audit_mode_passes_and_counts") {
        return;
    }
    let shop = Shop::new(&egress_policy("client", "client", "[]", ""));
    let agent = shop.start(&["--mode", "audit"]);
    let probe = shop
        .client
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(probe.is_connected(), "audit mode drops nothing: {probe}");
    assert!(
        counted(
            &agent,
            &shop.topology,
            shop.client.host_ifindex(),
            "audit_deny"
        ) >= 1
    );
    assert_eq!(
        counted(&agent, &shop.topology, shop.client.host_ifindex(), "deny"),
        0
    );
}

#[test]
fn staged_policy_counts_while_enforcing_policy_drops() {
    if !egret_testbed::require_root("staged_policy_counts_while_enforcing_policy_drops") {
        return;
    }
    let policies = [
        egress_policy("client-staged", "client", "[]", "egret.dev/mode: audit"),
        egress_policy("other-enforced", "other", "[]", ""),
    ]
    .join("---\n");
    let shop = Shop::new(&policies);
    let agent = shop.start(&[]);
    let staged = shop
        .client
        .tcp_connect(shop.server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        staged.is_connected(),
        "a staged policy drops nothing: {staged}"
    );
    let enforced = shop
        .other
        .tcp_connect(shop.server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        enforced.is_timed_out(),
        "the enforcing policy still drops: {enforced}"
    );
    let client = shop.client.host_ifindex();
    assert!(
        counted(&agent, &shop.topology, client, "audit_deny") >= 1,
        "staged denials are counted"
    );
    assert_eq!(counted(&agent, &shop.topology, client, "deny"), 0);
    assert!(counted(&agent, &shop.topology, shop.other.host_ifindex(), "deny") >= 1);
}

#[test]
fn replies_pass_under_deny_all() {
    if !egret_testbed::require_root("replies_pass_under_deny_all") {
        return;
    }
    let shop = Shop::new(&egress_policy("client", "client", "[]", ""));
    let _agent = shop.start(&[]);
    let tcp = shop
        .other
        .tcp_connect(shop.client.addr_v4(8080), PROBE_TIMEOUT);
    assert!(tcp.is_connected(), "TCP reply from a deny-all pod: {tcp}");
    let tcp6 = shop
        .other
        .tcp_connect(shop.client.addr_v6(8080), PROBE_TIMEOUT);
    assert!(tcp6.is_connected(), "TCP reply over IPv6: {tcp6}");
    let udp = shop
        .other
        .udp_request(shop.client.addr_v4(8080), PROBE_TIMEOUT);
    assert!(udp.is_connected(), "UDP reply: {udp}");
    let ping = shop.other.ping(shop.client.ipv4().into(), PROBE_TIMEOUT);
    assert!(ping.is_connected(), "echo reply: {ping}");
    let out = shop
        .client
        .udp_request(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        out.is_blocked(),
        "the deny-all pod itself may send nothing: {out}"
    );
}

/// Probes client -> server (must connect) and client -> other (must be dropped) until
/// `done`; returns (probes, wrong verdicts as text).
fn probe_stream(shop: &Shop, done: &AtomicBool) -> (usize, Vec<String>) {
    let (mut probes, mut wrong) = (0, Vec::new());
    let deadline = Instant::now() + Duration::from_mins(1);
    while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
        let allowed = shop
            .client
            .tcp_connect(shop.server.addr_v4(8080), Duration::from_secs(1));
        if !allowed.is_connected() {
            wrong.push(format!("client -> server: {allowed}"));
        }
        let denied = shop
            .client
            .tcp_connect(shop.other.addr_v4(8080), Duration::from_millis(150));
        if !denied.is_timed_out() {
            wrong.push(format!("client -> other: {denied}"));
        }
        probes += 2;
    }
    (probes, wrong)
}

#[test]
fn agent_restart_keeps_every_verdict() {
    if !egret_testbed::require_root("agent_restart_keeps_every_verdict") {
        return;
    }
    let shop = Arc::new(Shop::new(&egress_policy(
        "client",
        "client",
        CLIENT_TO_SERVER_ONLY,
        "",
    )));
    let pin_dir = AgentProcess::unique_pin_dir();
    let mut first = start_agent_at(&shop.topology, shop.manifests.path(), &pin_dir, &[]);
    first
        .wait_attached(&shop.ifindexes(), Duration::from_secs(20))
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let (shop, done) = (Arc::clone(&shop), Arc::clone(&done));
        thread::spawn(move || probe_stream(&shop, &done))
    };
    thread::sleep(Duration::from_millis(800));
    let first_log = first.stop_keeping_pins();
    // No agent at all for a while: the pinned programs and maps keep enforcing.
    thread::sleep(Duration::from_millis(800));
    let second = start_agent_at(&shop.topology, shop.manifests.path(), &pin_dir, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.log().contains("reconciled") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        second.log().contains("reconciled"),
        "second agent never reconciled:\n{}",
        second.log()
    );
    let took_over = second.log().matches("attached").count();
    assert!(
        took_over >= 3,
        "the second agent swaps its programs into the pinned links:\n{}",
        second.log()
    );
    thread::sleep(Duration::from_millis(800));
    done.store(true, Ordering::Relaxed);
    let (probes, wrong) = stream.join().unwrap();
    assert!(probes >= 10, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "{} of {probes} verdicts were wrong across the restart:\n{}\nfirst agent:\n{first_log}\nsecond agent:\n{}",
        wrong.len(),
        wrong.join("\n"),
        second.log()
    );
    // The restarted agent enforces the same policy from its own tables.
    let denied = shop
        .client
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(denied.is_timed_out(), "{denied}");
}

/// The kernel programs of the first map layout (`CONNTRACK_V1`, `COUNTERS_V1`, ...), as
/// an agent of commit 138e6f3 ran them: `tests/data/egret-ebpf-v1.o`, built from that
/// commit's `agent-ebpf` with `cargo build --target bpfel-unknown-none -Z build-std=core
/// --release` and stripped of debug info.
const FIRST_LAYOUT_OBJECT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/egret-ebpf-v1.o");

/// Leaves `pin_dir` as an agent of the first layout would: its tables written (the
/// table maps kept their names and layouts), its programs attached to every pod's host
/// interface through links pinned where agents pin them.
fn enforce_as_the_first_layout(shop: &Shop, pin_dir: &std::path::Path) {
    use aya::programs::{
        LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions,
    };
    use egret::{
        compile::{Ids, Scope, compile},
        datapath::image::KernelImage,
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
    let image = KernelImage::build(
        &compiled.tables,
        &interfaces,
        &std::collections::BTreeMap::new(),
    );
    // The first layout's programs create and pin their maps; today's datapath then finds
    // the table maps by name and writes them, as the first agent did.
    let object = std::fs::read(FIRST_LAYOUT_OBJECT).expect("first-layout object");
    let interface_names: Vec<String> = pods.iter().map(|p| p.host_interface().to_owned()).collect();
    let ifindexes: Vec<u32> = pods.iter().map(|p| p.host_ifindex()).collect();
    let pin_dir = pin_dir.to_owned();
    egret_testbed::run_in_netns(shop.topology.node_netns(), move || {
        std::fs::create_dir_all(&pin_dir).unwrap();
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(&object)
            .expect("first-layout programs load");
        write_first_layout_tables(&pin_dir, &image);
        std::fs::create_dir_all(pin_dir.join("links")).unwrap();
        for (program, attach_type, pin_name) in [
            ("egret_to_pod", TcAttachType::Egress, "to_pod"),
            ("egret_from_pod", TcAttachType::Ingress, "from_pod"),
        ] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(program).unwrap().try_into().unwrap();
            program.load().expect("first-layout program verifies");
            for (name, ifindex) in interface_names.iter().zip(&ifindexes) {
                let id = program
                    .attach_with_options(
                        name,
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
}

/// The first layout's endpoint value: no table number, its id keyed the CIDR and
/// policy tables.
#[repr(C)]
#[derive(Clone, Copy)]
struct FirstLayoutEndpoint {
    id: u32,
    flags: u32,
    ipv4: [u8; 4],
    ipv6: [u8; 16],
}

// SAFETY: `repr(C)`, no padding, plain integers.
unsafe impl aya::Pod for FirstLayoutEndpoint {}

/// Writes `image` into the first layout's maps as its agent did: endpoints without a
/// table number, CIDR and policy entries keyed by endpoint (each endpoint gets its
/// table's entries), policy values holding only the NetworkPolicy allow bits.
fn write_first_layout_tables(
    pin_dir: &std::path::Path,
    image: &egret::datapath::image::KernelImage,
) {
    use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
    use egret_common::maps::{CidrKey, IpKey, PolicyKey};

    let open = |name: &str| MapData::from_pin(pin_dir.join(name)).unwrap();
    let mut endpoints: HashMap<_, u32, FirstLayoutEndpoint> =
        HashMap::try_from(Map::HashMap(open("ENDPOINT_V1"))).unwrap();
    let mut identities: HashMap<_, IpKey, u32> =
        HashMap::try_from(Map::HashMap(open("IDENTITY_V1"))).unwrap();
    let mut cidrs: LpmTrie<_, CidrKey, u32> =
        LpmTrie::try_from(Map::LpmTrie(open("CIDR_V1"))).unwrap();
    let mut policy: LpmTrie<_, PolicyKey, u32> =
        LpmTrie::try_from(Map::LpmTrie(open("POLICY_V1"))).unwrap();
    for (key, identity) in &image.identities {
        identities.insert(key, identity, 0).unwrap();
    }
    for (ifindex, endpoint) in &image.endpoints {
        let first = FirstLayoutEndpoint {
            id: endpoint.id,
            flags: endpoint.flags,
            ipv4: endpoint.ipv4,
            ipv6: endpoint.ipv6,
        };
        endpoints.insert(ifindex, first, 0).unwrap();
        let table = endpoint.table.to_be_bytes();
        let id = endpoint.id.to_be_bytes();
        for ((prefix, key), class) in image.cidrs.iter().filter(|(k, _)| k.1.table == table) {
            let key = CidrKey { table: id, ..*key };
            cidrs.insert(&Key::new(*prefix, key), class, 0).unwrap();
        }
        for ((prefix, key), value) in image.policy.iter().filter(|(k, _)| k.1.table == table) {
            let key = PolicyKey { table: id, ..*key };
            policy
                .insert(&Key::new(*prefix, key), value.flags, 0)
                .unwrap();
        }
    }
}

#[test]
fn agent_upgrade_from_the_first_map_layout_keeps_every_verdict_and_flow() {
    if !egret_testbed::require_root(
        "agent_upgrade_from_the_first_map_layout_keeps_every_verdict_and_flow",
    ) {
        return;
    }
    // The server may send nothing: what it sends on a connection passes only while the
    // connection is tracked.
    let policies = [
        egress_policy("client", "client", CLIENT_TO_SERVER_ONLY, ""),
        egress_policy("server", "server", "[]", ""),
    ]
    .join("---\n");
    let shop = Arc::new(Shop::new(&policies));
    let pin_dir = AgentProcess::unique_pin_dir();
    let _cleanup = PinDirGuard(pin_dir.clone());
    enforce_as_the_first_layout(&shop, &pin_dir);
    let denied = shop
        .client
        .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(denied.is_timed_out(), "the first layout enforces: {denied}");
    let server = shop.server.addr_v4(8080);
    let held = egret_testbed::run_in_netns(shop.client.netns(), || {
        std::net::TcpStream::connect_timeout(&server, Duration::from_secs(2))
    })
    .expect("held connection");
    assert!(
        echoes(&held, b"before"),
        "the held connection echoes under the first layout"
    );

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
        "{} of {probes} verdicts were wrong across the upgrade:\n{}\nagent:\n{}",
        wrong.len(),
        wrong.join("\n"),
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("took over the flows of the first map layout"),
        "{}",
        agent.log()
    );
    assert!(
        echoes(&held, b"after"),
        "the connection accepted under the first layout still gets its replies:\n{}",
        agent.log()
    );
    for legacy in egret_common::maps::names::LEGACY {
        assert!(
            !pin_dir.join(legacy).exists(),
            "{legacy} is unpinned after the takeover"
        );
    }
}

/// Whether `message` comes back whole on `stream` (an echo server's) within 2 s.
fn echoes(mut stream: &std::net::TcpStream, message: &[u8]) -> bool {
    use std::io::{Read as _, Write as _};
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut back = vec![0; message.len()];
    stream.write_all(message).is_ok() && stream.read_exact(&mut back).is_ok() && back == message
}

/// Removes a pin directory the test made itself, also when it fails.
struct PinDirGuard(std::path::PathBuf);

impl Drop for PinDirGuard {
    fn drop(&mut self) {
        let _ = egret::datapath::cleanup(&self.0);
    }
}

#[test]
fn policy_updates_never_drop_an_allowed_flow() {
    if !egret_testbed::require_root("policy_updates_never_drop_an_allowed_flow") {
        return;
    }
    let shop = Arc::new(Shop::new(&egress_policy(
        "client",
        "client",
        CLIENT_TO_SERVER_ONLY,
        "",
    )));
    let _agent = shop.start(&[]);
    let done = Arc::new(AtomicBool::new(false));
    let stream = {
        let (shop, done) = (Arc::clone(&shop), Arc::clone(&done));
        thread::spawn(move || {
            let (mut probes, mut wrong) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_mins(1);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                let allowed = shop
                    .client
                    .tcp_connect(shop.server.addr_v4(8080), Duration::from_secs(1));
                if !allowed.is_connected() {
                    wrong.push(format!("client -> server: {allowed}"));
                }
                probes += 1;
            }
            (probes, wrong)
        })
    };
    // Widen the policy (server and other), then narrow it back, a few times over.
    let wide = "[{to: [{podSelector: {matchLabels: {app: server}}}, {podSelector: {matchLabels: {app: other}}}], ports: [{port: 8080}]}, {to: [{ipBlock: {cidr: 10.77.0.2/32}}]}]";
    for round in 0..3 {
        shop.rewrite_policies(&egress_policy("client", "client", wide, ""));
        let widened = wait_for(|| {
            shop.client
                .tcp_connect(shop.other.addr_v4(8080), PROBE_TIMEOUT)
                .is_connected()
        });
        assert!(widened, "round {round}: the wider policy never took effect");
        shop.rewrite_policies(&egress_policy(
            "client",
            "client",
            CLIENT_TO_SERVER_ONLY,
            "",
        ));
        let narrowed = wait_for(|| {
            shop.client
                .tcp_connect(shop.other.addr_v4(8080), Duration::from_millis(200))
                .is_timed_out()
        });
        assert!(
            narrowed,
            "round {round}: the narrower policy never took effect"
        );
    }
    done.store(true, Ordering::Relaxed);
    let (probes, wrong) = stream.join().unwrap();
    assert!(probes >= 5, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "allowed flow dropped during updates:\n{}",
        wrong.join("\n")
    );
}

/// Polls `condition` for up to 10 s.
fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_full_policy_table_fails_the_biggest_pod_closed_and_spares_the_rest() {
    if !egret_testbed::require_root(
        "a_full_policy_table_fails_the_biggest_pod_closed_and_spares_the_rest",
    ) {
        return;
    }
    // client: many port prefixes (a range); other: one entry. Room for only a few.
    let policies = [
        egress_policy(
            "client",
            "client",
            "[{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 8080}, {port: 1000, endPort: 1999}]}]",
            "",
        ),
        egress_policy("other", "other", CLIENT_TO_SERVER_ONLY, ""),
    ]
    .join("---\n");
    let shop = Shop::new(&policies);
    let agent = shop.start(&["--max-policy-entries", "4"]);
    let client = shop
        .client
        .tcp_connect(shop.server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        client.is_timed_out(),
        "the pod that did not fit fails closed, even for what its policy allows: {client}"
    );
    let other = shop
        .other
        .tcp_connect(shop.server.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        other.is_connected(),
        "other pods keep exact enforcement: {other}"
    );
    let log = agent.log();
    assert!(
        log.contains("fail closed") && log.contains("shop/client"),
        "a clear error names the pod:\n{log}"
    );
    assert!(counted(&agent, &shop.topology, shop.client.host_ifindex(), "deny") >= 1);
}

#[test]
fn connections_accepted_before_the_agent_came_are_not_cut() {
    use std::io::{BufRead as _, Write as _};
    if !egret_testbed::require_root("connections_accepted_before_the_agent_came_are_not_cut") {
        return;
    }
    let shop = Shop::new(&egress_policy("client", "client", "[]", ""));
    // Connection tracking on in the node, as on any node running kube-proxy.
    let rules = "table inet egret_test_ct {\n  chain forward {\n    type filter hook forward priority 0\n    ct state established,related accept\n  }\n}\n";
    let mut nft = shop
        .topology
        .node_command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(
        nft.wait().unwrap().success(),
        "nft conntrack rule in the node namespace"
    );
    // client accepts a connection from other before any agent runs.
    let listener = egret_testbed::run_in_netns(shop.client.netns(), || {
        std::net::TcpListener::bind((shop.client.ipv4(), 9000)).unwrap()
    });
    let target = std::net::SocketAddr::from((shop.client.ipv4(), 9000));
    let from_other = egret_testbed::run_in_netns(shop.other.netns(), || {
        std::net::TcpStream::connect(target).unwrap()
    });
    let (mut accepted, _) = listener.accept().unwrap();
    from_other
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();

    let _agent = shop.start(&[]);
    // The deny-all pod speaks first on the connection it accepted earlier: nothing has
    // arrived since the agent attached, so only the seeded entry lets this through.
    accepted.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    let read = std::io::BufReader::new(&from_other).read_line(&mut line);
    assert!(
        read.as_ref().is_ok_and(|n| *n > 0),
        "the established connection was cut: {read:?}"
    );
    assert_eq!(line, "still here\n");
    // New connections from the deny-all pod are still denied.
    assert!(
        shop.client
            .tcp_connect(shop.other.addr_v4(8080), Duration::from_millis(300))
            .is_timed_out()
    );
}
