//! `domainNames` rules on real packets: a real DNS server (Debian's dnsmasq) in its own
//! pod namespace serves a test zone; a pod whose ClusterNetworkPolicy allows
//! `api.example.test` and `*.svc.example.test` resolves names through it and connects.
//! The kernel learns each answer on the pod's receive path before the pod reads it, so
//! the first SYN after an answer is already allowed (no retransmit); what the pod never
//! resolved, the bare parent of a wildcard and names outside the rule stay denied;
//! learnt addresses lapse after their TTL plus grace for new connections only, and
//! survive an agent restart.
//!
//! Only `client` is a pod of the cluster the agent sees; the other namespaces stand for
//! hosts outside it (the resolver and the addresses names resolve to), so only names,
//! never selectors, can allow them.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use common::{
    scrape_metrics,
    site::{ECHO_PORT, PodSpec, Site},
    start_agent, start_agent_at,
};
use egret_testbed::{
    Pod,
    agent::AgentProcess,
    dns::{TYPE_A, Transport, resolve},
    require_root, run_in_netns,
};
use serde_json::Value;

/// A denied connect waits this long; nothing but a drop makes it time out.
const DENIED_PROBE: Duration = Duration::from_millis(400);
/// The first SYN is retransmitted after 1 s: a connect well under it had its first SYN
/// answered.
const AT_ONCE: Duration = Duration::from_millis(500);
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// TTL of the zone's records but `brief`'s, seconds.
const TTL: u32 = 30;

/// The pods of a zone, in address order: `client` (10.77.0.1), `resolver` (10.77.0.2),
/// then the hosts names resolve to, each with the dnsmasq records that name it
/// (`{ip}` is its address).
const HOSTS: [(&str, &[&str]); 8] = [
    ("api", &["--host-record=api.example.test,{ip},30"]),
    ("web", &["--host-record=web.svc.example.test,{ip},30"]),
    ("parent", &["--host-record=svc.example.test,{ip},30"]),
    ("other", &["--host-record=other.example.test,{ip},30"]),
    // A CNAME from an outside name to an allowed one: the allowed name's address counts.
    (
        "chained",
        &[
            "--host-record=chained.svc.example.test,{ip},30",
            "--cname=alias.elsewhere.test,chained.svc.example.test,30",
        ],
    ),
    // A CNAME from an allowed name to an outside one: its address counts too.
    (
        "edge",
        &[
            "--host-record=edge.cdn.test,{ip},30",
            "--cname=cdn.svc.example.test,edge.cdn.test,30",
        ],
    ),
    ("tcp", &["--host-record=tcp.svc.example.test,{ip},30"]),
    ("brief", &["--host-record=brief.svc.example.test,{ip},1"]),
];

const POLICY: &str = r"apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: names
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - name: dns
      action: Accept
      to: [{networks: [10.77.0.2/32]}]
      protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]
    - name: api
      action: Accept
      to: [{domainNames: [api.example.test, '*.svc.example.test']}]
      protocols: [{tcp: {destinationPort: {number: 8080}}}]
    - name: rest
      action: Deny
      to: [{networks: [0.0.0.0/0, '::/0']}]
";

/// dnsmasq in the resolver's namespace, stopped when dropped.
struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    /// Starts dnsmasq on `resolver`'s IPv4 address with `records`, and waits (5 s at
    /// most) until it answers.
    fn start(resolver: &Pod, records: &[String], dir: &Path) -> Self {
        let mut command = resolver.command("dnsmasq");
        command
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
            ])
            .arg(format!("--listen-address={}", resolver.ipv4()))
            .args(["--bind-interfaces", "--port=53", "--log-facility=-"])
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg(format!("--local-ttl={TTL}"))
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dnsmasq.log")).unwrap());
        let dnsmasq = Self {
            child: command
                .spawn()
                .expect("dnsmasq starts (cargo xtask setup installs it)"),
        };
        let server = IpAddr::V4(resolver.ipv4());
        let deadline = Instant::now() + Duration::from_secs(5);
        let answering = loop {
            let answer = run_in_netns(resolver.netns(), || {
                resolve(
                    server,
                    "api.example.test",
                    TYPE_A,
                    Transport::Udp,
                    Duration::from_millis(200),
                )
            });
            if answer.is_ok_and(|addresses| !addresses.is_empty()) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            answering,
            "dnsmasq does not answer: {}",
            std::fs::read_to_string(dir.join("dnsmasq.log")).unwrap_or_default()
        );
        dnsmasq
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client pod under [`POLICY`], a resolver, and the hosts of [`HOSTS`].
struct Zone {
    site: Site,
    client: Pod,
    resolver: Pod,
    _dnsmasq: Dnsmasq,
    _dir: tempfile::TempDir,
}

impl Zone {
    fn new() -> Self {
        let mut specs = vec![
            PodSpec {
                name: "client",
                namespace: "shop",
                app: "client",
            },
            PodSpec {
                name: "resolver",
                namespace: "outside",
                app: "resolver",
            },
        ];
        specs.extend(HOSTS.iter().map(|(name, _)| PodSpec {
            name,
            namespace: "outside",
            app: name,
        }));
        let site = Site::new(&specs, POLICY);
        // Only the client is a pod of the cluster: the rest are hosts outside it.
        site.write_cluster(|name| name == "client");
        let records: Vec<String> = HOSTS
            .iter()
            .zip(&site.pods[2..])
            .flat_map(|((_, records), pod)| {
                records
                    .iter()
                    .map(|record| record.replace("{ip}", &pod.ipv4().to_string()))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let dnsmasq = Dnsmasq::start(&site.pods[1], &records, dir.path());
        Self {
            client: site.pods[0].clone(),
            resolver: site.pods[1].clone(),
            site,
            _dnsmasq: dnsmasq,
            _dir: dir,
        }
    }

    fn host(&self, name: &str) -> &Pod {
        self.site
            .pods
            .iter()
            .find(|pod| pod.name() == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    fn echo(&self, name: &str) -> SocketAddr {
        self.host(name).addr_v4(ECHO_PORT)
    }

    /// Starts an agent on `pin_dir` (a fresh one when `None`) and waits until it has
    /// programmed the client's tables.
    fn start(&self, pin_dir: Option<&Path>, args: &[&str]) -> AgentProcess {
        let topology = &self.site.topology;
        let mut agent = match pin_dir {
            Some(pin_dir) => start_agent_at(topology, self.site.manifests(), pin_dir, args),
            None => start_agent(topology, self.site.manifests(), args),
        };
        agent
            .wait_attached(&[self.client.host_ifindex()], Duration::from_secs(20))
            .unwrap();
        wait_ready(&agent, self);
        agent
    }

    /// The client asks the resolver for `name`'s A records.
    fn resolve(&self, name: &str, transport: Transport) -> Vec<IpAddr> {
        let server = IpAddr::V4(self.resolver.ipv4());
        run_in_netns(self.client.netns(), || {
            resolve(server, name, TYPE_A, transport, DNS_TIMEOUT)
        })
        .unwrap_or_else(|error| panic!("resolving {name} over {transport:?}: {error:#}"))
    }

    /// The client resolves `name` and expects `host`'s address.
    fn resolve_to(&self, name: &str, host: &str, transport: Transport) {
        let addresses = self.resolve(name, transport);
        assert_eq!(
            addresses,
            [IpAddr::V4(self.host(host).ipv4())],
            "the answer for {name}"
        );
    }

    fn is_denied(&self, host: &str) -> bool {
        self.client
            .tcp_connect(self.echo(host), DENIED_PROBE)
            .is_blocked()
    }

    /// `egret <args> --output json` against the agent, as JSON lines.
    fn ask(&self, agent: &AgentProcess, args: &[&str]) -> Vec<Value> {
        let output = agent
            .command(&self.site.topology, args)
            .args(["--output", "json"])
            .output()
            .expect("egret runs");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// `egret <args>` against the agent, as a person reads it.
    fn text(&self, agent: &AgentProcess, args: &[&str]) -> String {
        let output = agent
            .command(&self.site.topology, args)
            .output()
            .expect("egret runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn status(&self, agent: &AgentProcess) -> Value {
        self.ask(agent, &["status"]).pop().unwrap_or(Value::Null)
    }

    /// `egret explain` for a TCP connection from the client to `host`'s echo port.
    fn explain(&self, agent: &AgentProcess, host: &str) -> Value {
        let to = self.host(host).ipv4().to_string();
        let port = ECHO_PORT.to_string();
        self.ask(
            agent,
            &[
                "explain",
                "--from",
                "shop/client",
                "--to",
                &to,
                "--port",
                &port,
            ],
        )
        .pop()
        .unwrap_or(Value::Null)
    }

    /// The flow records of TCP flows from the client to `host`'s echo port with
    /// `verdict`, waiting (5 s at most) for the flow log's window to close.
    fn flows_to(&self, agent: &AgentProcess, host: &str, verdict: &str) -> Vec<Value> {
        let to = self.host(host).ipv4().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<Value> = self
                .ask(agent, &["flows", "--last", "1000"])
                .into_iter()
                .filter(|flow| {
                    flow["destination"]["ip"] == to.as_str()
                        && flow["protocol"] == "TCP"
                        && flow["verdict"] == verdict
                })
                .collect();
            if !found.is_empty() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Waits (20 s at most) until the agent reports its first sync programmed.
fn wait_ready(agent: &AgentProcess, zone: &Zone) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while zone.status(agent)["ready"] != true {
        assert!(
            Instant::now() < deadline,
            "agent not ready within 20 s:\n{}",
            common::log_tail(agent, 4000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An open connection from the client: how long its connect took and how many
/// segments the kernel retransmitted for it (`TCP_INFO`).
struct Connection {
    stream: TcpStream,
    took: Duration,
    retransmits: u32,
}

impl Connection {
    /// Connects from `pod` to `to`, or says why not (within `timeout`).
    fn open(pod: &Pod, to: SocketAddr, timeout: Duration) -> Result<Self, std::io::Error> {
        run_in_netns(pod.netns(), || {
            let started = Instant::now();
            let stream = TcpStream::connect_timeout(&to, timeout)?;
            let took = started.elapsed();
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let retransmits = total_retransmits(&stream)?;
            Ok(Self {
                stream,
                took,
                retransmits,
            })
        })
    }

    /// Sends a line to the echo server and reads it back.
    fn echoes(&mut self, line: &str) -> bool {
        let sent = format!("{line}\n");
        if self.stream.write_all(sent.as_bytes()).is_err() {
            return false;
        }
        let mut reader = BufReader::new(&self.stream);
        let mut back = String::new();
        reader.read_line(&mut back).is_ok() && back == sent
    }
}

/// `tcpi_total_retrans` of the socket.
fn total_retransmits(stream: &TcpStream) -> std::io::Result<u32> {
    // SAFETY: tcp_info is plain integers; an all-zero value is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut length = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).unwrap_or(0);
    // SAFETY: `info` is writable for `length` bytes, and the kernel writes at most that.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut length,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_total_retrans)
}

/// Connects to `host` right after resolving it and asserts the first SYN was answered.
fn connects_at_once(zone: &Zone, host: &str) -> Connection {
    let mut connection = Connection::open(&zone.client, zone.echo(host), Duration::from_secs(3))
        .unwrap_or_else(|error| panic!("connecting to {host}: {error}"));
    assert!(
        connection.took < AT_ONCE && connection.retransmits == 0,
        "connecting to {host} took {:?} with {} retransmits: the first SYN was not answered",
        connection.took,
        connection.retransmits
    );
    assert!(connection.echoes("hello"), "{host} echoes");
    connection
}

/// The value of the first series of `metric` with `labels` (`key="value"` pairs) in the
/// agent's /metrics.
fn metric(zone: &Zone, metric: &str, labels: &str) -> Option<f64> {
    let page = scrape_metrics(&zone.site.topology)?;
    page.lines()
        .filter(|line| line.starts_with(metric) && line.contains(labels))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn resolved_names_connect_at_once_and_nothing_else_does() {
    if !require_root("resolved_names_connect_at_once_and_nothing_else_does") {
        return;
    }
    let zone = Zone::new();
    let agent = zone.start(None, &["--flow-log-allowed"]);

    // Nothing resolved yet: every host is denied, the allowed names' too.
    for host in ["api", "web", "parent", "other"] {
        assert!(zone.is_denied(host), "{host} before any answer");
    }
    // Another case than the policy's still matches; the first SYN gets through.
    zone.resolve_to("API.Example.Test", "api", Transport::Udp);
    connects_at_once(&zone, "api");
    zone.resolve_to("web.svc.example.test", "web", Transport::Udp);
    connects_at_once(&zone, "web");
    // Only the rule's port.
    assert!(
        zone.client
            .udp_request(zone.echo("web"), DENIED_PROBE)
            .is_blocked(),
        "UDP to web (the rule allows TCP 8080)"
    );
    // The wildcard's bare parent, and a name outside the rule, are answered and denied.
    zone.resolve_to("svc.example.test", "parent", Transport::Udp);
    assert!(
        zone.is_denied("parent"),
        "svc.example.test: the bare parent"
    );
    zone.resolve_to("other.example.test", "other", Transport::Udp);
    assert!(
        zone.is_denied("other"),
        "other.example.test: not a rule's name"
    );
    // CNAME chains within one answer, to and from an allowed name.
    zone.resolve_to("alias.elsewhere.test", "chained", Transport::Udp);
    connects_at_once(&zone, "chained");
    zone.resolve_to("cdn.svc.example.test", "edge", Transport::Udp);
    connects_at_once(&zone, "edge");
    // An answer over TCP.
    assert!(zone.is_denied("tcp"), "tcp before its answer");
    zone.resolve_to("tcp.svc.example.test", "tcp", Transport::Tcp);
    connects_at_once(&zone, "tcp");
    // Resolved by nobody: still denied.
    assert!(zone.is_denied("brief"), "brief was never resolved");

    let learnt = metric(&zone, "egret_dns_addresses_learnt_total", "").unwrap_or(0.0);
    assert!(
        learnt >= 5.0,
        "egret_dns_addresses_learnt_total counts api, web, chained, edge, tcp: {learnt}"
    );

    names_are_visible(&zone, &agent);
    drop(agent);
}

/// explain, the flow log and status name the name behind an address, or its absence,
/// after [`resolved_names_connect_at_once_and_nothing_else_does`]'s lookups.
fn names_are_visible(zone: &Zone, agent: &AgentProcess) {
    let allowed = zone.explain(agent, "web");
    assert_eq!(allowed["verdict"], "allow", "{allowed}");
    assert_eq!(allowed["domain"]["name"], "*.svc.example.test", "{allowed}");
    assert_eq!(allowed["domain"]["state"], "learnt", "{allowed}");
    assert!(
        allowed["decided_by_rule"]
            .as_str()
            .is_some_and(|rule| rule.contains("names egress[1] (api)")),
        "{allowed}"
    );
    let parent = zone.explain(agent, "parent");
    assert_eq!(parent["verdict"], "deny", "{parent}");
    assert_eq!(parent["domain"]["state"], "not_resolved", "{parent}");
    let flows = zone.flows_to(agent, "api", "allow");
    assert!(
        flows
            .iter()
            .any(|flow| flow["domain"]["name"] == "api.example.test"
                && flow["domain"]["state"] == "learnt"
                && flow["rule"] == "names egress[1] (api)"),
        "an allowed flow to api names api.example.test: {flows:?}"
    );
    let flows = zone.flows_to(agent, "other", "deny");
    assert!(
        flows
            .iter()
            .any(|flow| flow["domain"]["state"] == "not_resolved"),
        "a denied flow to other says no name gave it: {flows:?}"
    );
    let status = zone.status(agent);
    let client = &status["endpoints"][0];
    let listed: Vec<(String, String)> = client["learnt"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|learnt| {
            (
                learnt["name"].as_str().unwrap_or("").to_owned(),
                learnt["address"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (name, host) in [
        ("api.example.test", "api"),
        ("*.svc.example.test", "web"),
        ("*.svc.example.test", "chained"),
        ("*.svc.example.test", "edge"),
        ("*.svc.example.test", "tcp"),
    ] {
        let address = zone.host(host).ipv4().to_string();
        assert!(
            listed.contains(&(name.to_owned(), address)),
            "status lists {name} -> {host}: {listed:?}"
        );
    }
    assert_eq!(listed.len(), 5, "and nothing else: {listed:?}");

    // The same, as a person reads it.
    let status = zone.text(agent, &["status"]);
    let header = status
        .lines()
        .find(|line| line.starts_with("ENDPOINT") && line.contains("ADDRESS"))
        .unwrap_or_else(|| panic!("status has a table of learnt names:\n{status}"));
    common::assert_table_aligned(&status, header, &["TTL"]);
    let web = zone.host("web").ipv4().to_string();
    assert!(
        status.lines().any(|line| line.contains("shop/client")
            && line.contains("*.svc.example.test")
            && line.contains(&web)
            && line.contains(" for ")),
        "status lists web's address with its time left:\n{status}"
    );
    let to_web = [
        "explain",
        "--from",
        "shop/client",
        "--to",
        &web,
        "--port",
        "8080",
    ];
    let explained = zone.text(agent, &to_web);
    assert!(
        explained.contains("*.svc.example.test answered this address"),
        "{explained}"
    );
    let parent = zone.host("parent").ipv4().to_string();
    let to_parent = [
        "explain",
        "--from",
        "shop/client",
        "--to",
        &parent,
        "--port",
        "8080",
    ];
    let explained = zone.text(agent, &to_parent);
    assert!(
        explained.contains("no DNS answer for the pod's domainNames gave it this address"),
        "{explained}"
    );
}

#[test]
fn a_learnt_address_lapses_for_new_connections_while_open_ones_continue() {
    if !require_root("a_learnt_address_lapses_for_new_connections_while_open_ones_continue") {
        return;
    }
    let zone = Zone::new();
    // brief's TTL is 1 s: with 1 s of grace it admits new connections for 2 s.
    let agent = zone.start(None, &["--dns-grace", "1"]);
    let answered = Instant::now();
    zone.resolve_to("brief.svc.example.test", "brief", Transport::Udp);
    let mut open = connects_at_once(&zone, "brief");
    let lapsed = answered + Duration::from_millis(2_600);
    std::thread::sleep(lapsed.saturating_duration_since(Instant::now()));
    assert!(
        zone.is_denied("brief"),
        "a new connection after the TTL and grace"
    );
    assert!(
        open.echoes("still here"),
        "the connection opened while the address was valid continues"
    );
    let expired = metric(&zone, "egret_dns_addresses_expired_total", "").unwrap_or(0.0);
    assert!(
        expired >= 1.0,
        "egret_dns_addresses_expired_total: {expired}"
    );
    let explained = zone.explain(&agent, "brief");
    assert_eq!(explained["verdict"], "deny", "{explained}");
    assert_eq!(explained["domain"]["state"], "expired", "{explained}");
    assert_eq!(
        explained["domain"]["name"], "*.svc.example.test",
        "{explained}"
    );
    // Answered again, it admits new connections again.
    zone.resolve_to("brief.svc.example.test", "brief", Transport::Udp);
    connects_at_once(&zone, "brief");
    assert!(
        open.echoes("and still"),
        "the old connection after all that"
    );
}

#[test]
fn an_agent_restart_between_resolving_and_connecting_forgets_nothing() {
    if !require_root("an_agent_restart_between_resolving_and_connecting_forgets_nothing") {
        return;
    }
    let zone = Zone::new();
    let pin_dir = AgentProcess::unique_pin_dir();
    let first = zone.start(Some(&pin_dir), &[]);
    zone.resolve_to("api.example.test", "api", Transport::Udp);
    let _log = first.stop_keeping_pins();
    let second = zone.start(Some(&pin_dir), &[]);
    connects_at_once(&zone, "api");
    assert!(zone.is_denied("web"), "web was never resolved");
    // The restarted agent lists what the first one's kernel learnt.
    let status = zone.status(&second);
    let client = status["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|endpoint| endpoint["pod"] == "client")
        .cloned()
        .unwrap_or(Value::Null);
    let learnt = client["learnt"].to_string();
    assert!(
        learnt.contains("api.example.test")
            && learnt.contains(&zone.host("api").ipv4().to_string()),
        "status lists the client's learnt name and address: {client}"
    );
}
