//! Enforcement behaviours on real traffic in network namespaces: audit modes, replies
//! under deny-all, agent restarts, upgrades from earlier releases (`upgrade`) and policy
//! updates under a continuous probe stream.

mod common;
#[path = "enforcement/upgrade.rs"]
mod upgrade;

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
