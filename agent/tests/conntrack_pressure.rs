//! Connection tracking under pressure, on real traffic in network namespaces: an isolated
//! server's idle connections outlive floods of unassured tuples and a churn of real
//! connections, with the default table sizes and with small ones, and closed connections
//! leave the table.
//!
//! The server's policy allows no egress at all, so everything it sends on a connection passes
//! only because the agent still tracks that connection: a lost entry shows up as a connection
//! that no longer echoes.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use common::{PROBE_TIMEOUT, add_pod, egress_policy, log_tail, scrape_metrics, start_agent};
use egret_testbed::{
    Listener, Pod, Topology,
    agent::AgentProcess,
    flood,
    manifests::{PodManifest, cluster_yaml, write_file},
};

/// These tests keep both cores busy for a while: one at a time.
static HEAVY: Mutex<()> = Mutex::new(());

/// The server's echo ports: the SYN and ACK floods aim at them and the churn connects to
/// them. Six ports × 64,512 source ports leave room for 330k distinct tuples.
const ECHO_PORTS: [u16; 6] = [8080, 8081, 8082, 8083, 8084, 8085];
/// The port of the held connections, whose two ends the test holds itself.
const HELD_PORT: u16 = 9000;
const HELD: usize = 20;
/// How long one held connection may take to echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(3);
/// Threads opening churned connections.
const CHURN_THREADS: usize = 4;

/// client (not isolated) and server (no egress at all), in `shop`, with an agent.
struct Site {
    topology: Topology,
    client: Pod,
    server: Pod,
    agent: AgentProcess,
    _manifests: tempfile::TempDir,
    _echo: Vec<Listener>,
}

impl Site {
    fn new(agent_args: &[&str]) -> Self {
        let topology = Topology::new().expect("topology");
        let client = add_pod(&topology, "client", 1);
        let server = add_pod(&topology, "server", 2);
        let echo = ECHO_PORTS
            .iter()
            .map(|&port| server.serve_tcp(port).expect("echo listener"))
            .collect();
        // The client opens connections faster than TIME_WAIT frees ports.
        flood::set_sysctls(
            client.netns(),
            &[
                ("net.ipv4.ip_local_port_range", "1024 65535"),
                ("net.ipv4.tcp_tw_reuse", "1"),
            ],
        )
        .expect("client sysctls");
        let manifests = tempfile::tempdir().unwrap();
        let pods = [
            PodManifest {
                pod: &client,
                namespace: "shop",
                labels: &[("app", "client")],
                ports: &[],
            },
            PodManifest {
                pod: &server,
                namespace: "shop",
                labels: &[("app", "server")],
                ports: &[],
            },
        ];
        write_file(manifests.path(), "cluster.yaml", &cluster_yaml(&pods)).unwrap();
        write_file(
            manifests.path(),
            "policies.yaml",
            &egress_policy("server-no-egress", "server", "[]", ""),
        )
        .unwrap();
        let mut agent = start_agent(&topology, manifests.path(), agent_args);
        agent
            .wait_attached(
                &[client.host_ifindex(), server.host_ifindex()],
                Duration::from_secs(20),
            )
            .unwrap();
        // The server is isolated: only its connections' entries let it answer.
        let own = server.tcp_connect(client.addr_v4(9), PROBE_TIMEOUT);
        assert!(own.is_timed_out(), "the server may open nothing: {own}");
        Self {
            topology,
            client,
            server,
            agent,
            _manifests: manifests,
            _echo: echo,
        }
    }

    fn echo_addresses(&self) -> Vec<SocketAddr> {
        ECHO_PORTS
            .iter()
            .map(|&port| self.server.addr_v4(port))
            .collect()
    }

    /// The agent's recent log, for failure messages.
    fn log(&self) -> String {
        log_tail(&self.agent, 6_000)
    }
}

/// Connections from the client to the server of which the test holds both ends, so it can
/// make either side speak.
struct HeldConnections {
    /// (client end, server end)
    pairs: Vec<(TcpStream, TcpStream)>,
}

impl HeldConnections {
    fn open(site: &Site) -> Self {
        let server = &site.server;
        let listener = egret_testbed::run_in_netns(server.netns(), || {
            TcpListener::bind((server.ipv4(), HELD_PORT)).expect("held listener")
        });
        let dst = server.addr_v4(HELD_PORT);
        let clients: Vec<TcpStream> = egret_testbed::run_in_netns(site.client.netns(), || {
            (0..HELD)
                .map(|n| {
                    TcpStream::connect_timeout(&dst, ECHO_TIMEOUT)
                        .unwrap_or_else(|e| panic!("held connection {n}: {e}"))
                })
                .collect()
        });
        // Every connect completed, so every connection waits in the accept queue; the
        // non-blocking accept and the deadline only guard against a broken stack.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + ECHO_TIMEOUT;
        let mut servers = Vec::new();
        while servers.len() < HELD {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    servers.push(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "accepted {} of {HELD}",
                        servers.len()
                    );
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        let pairs = clients
            .into_iter()
            .map(|client| {
                let local = client.local_addr().unwrap();
                let at = servers
                    .iter()
                    .position(|server| server.peer_addr().unwrap() == local)
                    .expect("the server end of a held connection");
                (client, servers.swap_remove(at))
            })
            .collect();
        let held = Self { pairs };
        let failures = held.failures("opening");
        assert!(failures.is_empty(), "{failures:?}");
        held
    }

    /// Has every connection echo once (the client writes, the server end reads and writes
    /// back, the client reads); returns what went wrong.
    fn failures(&self, round: &str) -> Vec<String> {
        self.pairs
            .iter()
            .enumerate()
            .filter_map(|(n, (client, server))| {
                let message = format!("{round} {n}\n");
                echo(client, server, message.as_bytes())
                    .err()
                    .map(|e| format!("connection {n} ({}): {e}", client.local_addr().unwrap()))
            })
            .collect()
    }

    /// Closes both ends of every connection.
    fn close(self) {
        for (client, server) in self.pairs {
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn echo(client: &TcpStream, server: &TcpStream, message: &[u8]) -> std::io::Result<()> {
    for stream in [client, server] {
        stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
        stream.set_write_timeout(Some(ECHO_TIMEOUT))?;
    }
    let mut buf = vec![0; message.len()];
    (&*client).write_all(message)?;
    (&*server).read_exact(&mut buf)?;
    // The isolated server's answer: only the connection's entry lets it through.
    (&*server).write_all(&buf)?;
    (&*client).read_exact(&mut buf)?;
    if buf != message {
        return Err(std::io::Error::other("garbled echo"));
    }
    Ok(())
}

/// Every held connection still echoes, and a new connection opens within `within`.
fn assert_connections_survive(site: &Site, held: &HeldConnections, after: &str, within: Duration) {
    let failures = held.failures(after);
    assert!(
        failures.is_empty(),
        "after {after}, {} of {HELD} idle connections no longer echo:\n{}\nagent log:\n{}",
        failures.len(),
        failures.join("\n"),
        site.log()
    );
    let deadline = Instant::now() + within;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let probe = site
            .client
            .tcp_connect(site.server.addr_v4(ECHO_PORTS[0]), Duration::from_secs(2));
        if probe.is_connected() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {after}, no new connection in {within:?} ({attempts} attempts, last: {probe})\nagent log:\n{}",
            site.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// What the server's stack counted, so a burst is known to have reached it.
fn server_counter(site: &Site, keys: &[&str]) -> u64 {
    let counters = flood::snmp_counters(site.server.netns()).expect("server snmp");
    keys.iter()
        .map(|key| counters.get(*key).copied().unwrap_or(0))
        .sum()
}

/// At least 95 in 100 of a burst must arrive (a veth queue may overflow now and then).
fn assert_arrived(what: &str, arrived: u64, count: usize) {
    let count = count as u64;
    assert!(
        arrived * 100 >= count * 95,
        "{what}: only {arrived} of {count} reached the server's stack"
    );
}

/// 330k-style bursts of UDP, SYNs and bare ACKs, then `churn` short connections, checking the
/// held connections after each.
fn floods_and_churn(
    site: &Site,
    held: &HeldConnections,
    burst: usize,
    churn: usize,
    new_within: Duration,
) {
    let (client, server) = (&site.client, &site.server);

    let before = server_counter(site, &["Udp.NoPorts", "Udp.InDatagrams"]);
    let report =
        flood::udp_flood(client.netns(), client.ipv4(), server.ipv4(), burst).expect("UDP flood");
    eprintln!("UDP burst: {report:?}");
    assert_eq!(report.sent, burst);
    let arrived = server_counter(site, &["Udp.NoPorts", "Udp.InDatagrams"]) - before;
    assert_arrived("UDP", arrived, burst);
    assert_connections_survive(site, held, &format!("{burst} UDP datagrams"), new_within);

    for (name, send) in [
        ("SYN", flood::tcp_syn_flood as fn(_, _, _, _, _) -> _),
        ("ACK", flood::tcp_ack_flood),
    ] {
        let before = server_counter(site, &["Tcp.InSegs"]);
        let report = send(
            client.netns(),
            client.ipv4(),
            server.ipv4(),
            &ECHO_PORTS[..],
            burst,
        )
        .unwrap_or_else(|e| panic!("{name} flood: {e:#}"));
        eprintln!("{name} burst: {report:?}");
        assert_eq!(report.sent, burst);
        assert_eq!(
            server_counter(site, &["Tcp.InCsumErrors"]),
            0,
            "the {name}s carry valid checksums"
        );
        let arrived = server_counter(site, &["Tcp.InSegs"]) - before;
        assert_arrived(name, arrived, burst);
        assert_connections_survive(site, held, &format!("{burst} {name}s"), new_within);
    }

    let report = flood::tcp_churn(client.netns(), &site.echo_addresses(), churn, CHURN_THREADS)
        .expect("connection churn");
    eprintln!("churn: {report:?}");
    assert!(
        report.failed * 1_000 <= churn,
        "{} of {churn} short connections failed (first: {:?})\nagent log:\n{}",
        report.failed,
        report.first_error,
        site.log()
    );
    assert_connections_survive(
        site,
        held,
        &format!("{churn} short connections"),
        new_within,
    );
}

#[test]
fn idle_connections_outlive_floods_and_churn() {
    if !egret_testbed::require_root("idle_connections_outlive_floods_and_churn") {
        return;
    }
    let _heavy = HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
    let site = Site::new(&[]);
    let held = HeldConnections::open(&site);
    floods_and_churn(&site, &held, 330_000, 300_000, Duration::from_secs(5));
}

#[test]
fn idle_connections_outlive_floods_and_churn_in_small_tables() {
    if !egret_testbed::require_root("idle_connections_outlive_floods_and_churn_in_small_tables") {
        return;
    }
    let _heavy = HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
    let site = Site::new(&[
        "--conntrack-established",
        "256",
        "--conntrack-unassured",
        "4096",
    ]);
    let held = HeldConnections::open(&site);
    // Bursts five times the unassured table; churn far beyond the established one.
    floods_and_churn(&site, &held, 20_000, 20_000, Duration::from_secs(5));
    // The floods pushed unassured flows out of their full table, and nothing ever had
    // to make room among the established ones.
    let page = scrape_metrics(&site.topology).expect("metrics");
    let evicted = |kind: &str| {
        page.lines()
            .find(|line| {
                line.starts_with("egret_conntrack_evictions_total{")
                    && line.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {kind} evictions in /metrics:\n{page}"))
    };
    assert!(
        evicted("unassured") > 0.0,
        "the floods overflowed the unassured table"
    );
    assert!(
        evicted("established") == 0.0,
        "no established flow was evicted:\n{page}"
    );
}

/// `egret_conntrack_entries{kind="established"}` summed over its series, or `None` while
/// the agent does not answer.
fn established_entries(topology: &Topology) -> Option<u64> {
    let page = scrape_metrics(topology)?;
    let values: Vec<u64> = page
        .lines()
        .filter(|line| {
            line.starts_with("egret_conntrack_entries{") && line.contains("kind=\"established\"")
        })
        .filter_map(|line| {
            let value = line.rsplit(' ').next()?;
            value
                .parse()
                .ok()
                .or_else(|| value.strip_suffix(".0")?.parse().ok())
        })
        .collect();
    assert!(
        !values.is_empty(),
        "no egret_conntrack_entries{{kind=\"established\"}} in /metrics:\n{page}"
    );
    Some(values.iter().sum())
}

/// Polls the established-entry count until `done` holds, for up to `timeout`; returns the
/// last count and how long it took.
fn wait_for_entries(
    topology: &Topology,
    timeout: Duration,
    done: impl Fn(u64) -> bool,
) -> (Option<u64>, Duration) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        last = established_entries(topology);
        if last.is_some_and(&done) {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    (last, start.elapsed())
}

#[test]
fn closed_connections_leave_the_table() {
    if !egret_testbed::require_root("closed_connections_leave_the_table") {
        return;
    }
    let _heavy = HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
    let site = Site::new(&[]);
    let held = HeldConnections::open(&site);
    // Each open connection is tracked once or twice (the server's inbound flow, and maybe
    // the client's outbound one).
    let (open, _) = wait_for_entries(&site.topology, Duration::from_secs(10), |n| {
        n >= HELD as u64
    });
    let open = open.expect("the agent serves /metrics");
    eprintln!("{open} established entries for {HELD} open connections");
    assert!(
        (HELD as u64..=2 * HELD as u64).contains(&open),
        "{open} established entries for {HELD} open connections"
    );

    // Short connections, each closed by both sides (the churn waits for the server's FIN).
    let report = flood::tcp_churn(
        site.client.netns(),
        &site.echo_addresses(),
        200,
        CHURN_THREADS,
    )
    .expect("connection churn");
    assert_eq!(report.failed, 0, "{:?}", report.first_error);
    let (after_churn, took) =
        wait_for_entries(&site.topology, Duration::from_secs(15), |n| n == open);
    assert_eq!(
        after_churn,
        Some(open),
        "200 closed connections still counted as established after {took:?}\nagent log:\n{}",
        site.log()
    );
    eprintln!("closed connections left the established table within {took:?}");

    held.close();
    let (after_close, took) = wait_for_entries(&site.topology, Duration::from_secs(15), |n| n == 0);
    assert_eq!(
        after_close,
        Some(0),
        "the {HELD} held connections, closed, still counted after {took:?}\nagent log:\n{}",
        site.log()
    );
}
