//! Throughput through a node namespace (client pod -> node -> server pod), with no
//! filter, with Egret enforcing, and with iptables + ipset (`hash:net,port`) and an
//! nftables interval set expressing the same allow list in the node's FORWARD path.
//!
//! The allow list permits the measured flows (the server's address, TCP and UDP port
//! 5201) and holds N other entries: one in ten a /24, the rest /32s, on TCP or UDP
//! ports 1000-4999. Egret gets it as one NetworkPolicy of ipBlock rules selecting the
//! client; iptables and nftables match packets arriving from the client's interface
//! against it and drop what is not on it. Every packet is judged (no conntrack
//! shortcut in any of the three). Before measuring, each filter must drop a TCP
//! connection to a port not on the list, and the flow must pass without one.
//!
//! UDP: `iperf3 -u -b 0 -l 64` (64-byte payloads), counted as packets the node
//! forwarded to the server's interface per second. TCP: `iperf3` bits per second at
//! the receiver. Client pinned to CPU 0, server to CPU 1; the node's forwarding runs
//! in the sender's softirq, on CPU 0.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use egret_testbed::{
    Listener, Pod, Topology,
    agent::AgentProcess,
    manifests::{PodManifest, cluster_yaml, write_file},
};
use serde_json::{Value, json};

use super::{Scale, ScratchDir};

const IPERF_PORT: u16 = 5201;
/// A port the allow list does not hold: each filter must drop connections to it.
const CLOSED_PORT: u16 = 5202;
const UDP_PAYLOAD: &str = "64";
const IPSET_NAME: &str = "egret-bench";
const NFT_TABLE: &str = "egret_bench";

/// What one filter's runs measured.
#[derive(Default)]
struct Samples {
    udp_off: Vec<f64>,
    tcp_off: Vec<f64>,
    udp_on: Vec<f64>,
    tcp_on: Vec<f64>,
    /// Seconds to switch the filter on.
    enable_s: Vec<f64>,
    /// CPU cores Egret's agent used while its runs went on.
    agent_cores: Vec<f64>,
    /// Why there are no runs with the filter.
    gave_up: Option<String>,
}

/// User plus system CPU seconds of a process, from /proc (ticks of 1/100 s, `USER_HZ`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime
    // and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    #[expect(clippy::cast_precision_loss, reason = "ticks far below 2^52")]
    Some(ticks as f64 / 100.0)
}

/// What stays loaded while a filter is switched on and off.
#[derive(Default)]
struct Prepared {
    /// Egret's manifest directory.
    manifests: Option<ScratchDir>,
    /// Egret's CIDR map capacity.
    capacity: usize,
}

struct Plan {
    rule_counts: &'static [usize],
    repeats: usize,
    seconds: u32,
    /// How long Egret's agent may take to program the allow list and attach.
    egret_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    Egret,
    Ipset,
    Nftables,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::Egret => "egret",
            Filter::Ipset => "iptables+ipset",
            Filter::Nftables => "nftables",
        }
    }
}

pub fn run(agent: &Path, scale: Scale) -> anyhow::Result<Vec<Value>> {
    let plan = if scale.quick {
        Plan {
            rule_counts: &[1_000],
            repeats: 2,
            seconds: 2,
            egret_timeout: Duration::from_mins(1),
        }
    } else {
        Plan {
            rule_counts: &[10, 1_000, 100_000],
            repeats: 3,
            seconds: 2,
            egret_timeout: Duration::from_mins(4),
        }
    };
    let bench = Bench::new(agent)?;
    let mut results = Vec::new();
    for &rules in plan.rule_counts {
        for filter in [Filter::Egret, Filter::Ipset, Filter::Nftables] {
            results.push(bench.measure(filter, rules, &plan)?);
        }
    }
    Ok(results)
}

struct Bench<'a> {
    agent: &'a Path,
    topology: Topology,
    client: Pod,
    server: Pod,
    _iperf: ChildGuard,
    _closed: Listener,
}

/// Kills the child (a process this benchmark started) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl<'a> Bench<'a> {
    fn new(agent: &'a Path) -> anyhow::Result<Self> {
        let topology = Topology::new()?;
        let client = topology.add_pod(
            "client",
            Ipv4Addr::new(10, 77, 0, 1),
            Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1),
        )?;
        let server = topology.add_pod(
            "server",
            Ipv4Addr::new(10, 77, 0, 2),
            Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2),
        )?;
        let iperf = server
            .command("taskset")
            .args(["-c", "1", "iperf3", "-s", "-B"])
            .arg(server.ipv4().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? cargo xtask setup installs it)")?;
        let iperf = ChildGuard(iperf);
        let closed = server.serve_tcp(CLOSED_PORT)?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            agent,
            topology,
            client,
            server,
            _iperf: iperf,
            _closed: closed,
        })
    }

    /// Each repeat measures without the filter, then with it, so every ratio compares
    /// runs minutes apart at most.
    fn measure(&self, filter: Filter, rules: usize, plan: &Plan) -> anyhow::Result<Value> {
        eprintln!("  throughput: {} at {rules} rules", filter.name());
        let list = allow_list(rules, self.server.ipv4());
        let prepared = self.prepare(filter, &list)?;
        let outcome = self.repeat(filter, &prepared, plan);
        let cleared = self.clear(filter);
        let samples = outcome?;
        cleared?;
        Ok(json!({
            "bench": "throughput",
            "filter": filter.name(),
            "rules": rules,
            "enable_s": samples.enable_s,
            "agent_cpu_cores": samples.agent_cores,
            "gave_up": samples.gave_up,
            "udp_pps_off": samples.udp_off,
            "tcp_gbps_off": samples.tcp_off,
            "udp_pps": samples.udp_on,
            "tcp_gbps": samples.tcp_on,
        }))
    }

    /// iptables and nftables switch on and off around every repeat. Egret's agent starts
    /// once, after the runs without it: it takes long to compile a large allow list.
    fn repeat(&self, filter: Filter, prepared: &Prepared, plan: &Plan) -> anyhow::Result<Samples> {
        let mut samples = Samples::default();
        let runs_per_switch = if filter == Filter::Egret {
            vec![plan.repeats]
        } else {
            vec![1; plan.repeats]
        };
        for runs in runs_per_switch {
            self.expect_closed_port(true, "without a filter")?;
            for _ in 0..runs {
                samples.udp_off.push(self.udp_pps(plan.seconds)?);
                samples.tcp_off.push(self.tcp_gbps(plan.seconds)?);
            }
            let started = std::time::Instant::now();
            let agent = match self.enable(filter, prepared, plan) {
                Ok(agent) => agent,
                // Egret may not program a large allow list in the time allowed: that is
                // a result, and the other filters are still worth measuring.
                Err(error) if filter == Filter::Egret => {
                    eprintln!("  throughput: egret gave up: {error:#}");
                    samples.gave_up = Some(format!(
                        "the agent had not programmed the allow list and attached after {} s",
                        plan.egret_timeout.as_secs()
                    ));
                    return Ok(samples);
                }
                Err(error) => return Err(error),
            };
            samples.enable_s.push(started.elapsed().as_secs_f64());
            let measured = self.runs_with_filter(filter, agent.as_ref(), runs, plan, &mut samples);
            drop(agent);
            let disabled = self.disable(filter);
            measured?;
            disabled?;
        }
        Ok(samples)
    }

    /// `runs` measurements with the filter on; with Egret, also the CPU its agent used
    /// meanwhile (it competes with the traffic for the two cores).
    fn runs_with_filter(
        &self,
        filter: Filter,
        agent: Option<&AgentProcess>,
        runs: usize,
        plan: &Plan,
        samples: &mut Samples,
    ) -> anyhow::Result<()> {
        self.expect_closed_port(false, filter.name())?;
        let pid = agent.and_then(AgentProcess::pid);
        let before = pid.and_then(cpu_seconds);
        let started = std::time::Instant::now();
        for _ in 0..runs {
            samples.udp_on.push(self.udp_pps(plan.seconds)?);
            samples.tcp_on.push(self.tcp_gbps(plan.seconds)?);
        }
        if let (Some(before), Some(after)) = (before, pid.and_then(cpu_seconds)) {
            samples
                .agent_cores
                .push((after - before) / started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Before each measurement: a port the allow list omits connects without a filter
    /// and is dropped with one.
    fn expect_closed_port(&self, connects: bool, what: &str) -> anyhow::Result<()> {
        let probe = || {
            self.client
                .tcp_connect(self.server.addr_v4(CLOSED_PORT), Duration::from_secs(2))
        };
        if connects {
            // A busy machine (namespaces of an earlier benchmark still being torn down)
            // can delay the first handshake: try a few times.
            let mut last = probe();
            for _ in 0..4 {
                if last.is_connected() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_secs(1));
                last = probe();
            }
            ensure!(
                last.is_connected(),
                "{what}, port {CLOSED_PORT} should connect: {last:?}"
            );
            Ok(())
        } else {
            let result = probe();
            ensure!(
                !result.is_connected(),
                "{what} does not drop what its allow list omits"
            );
            Ok(())
        }
    }

    /// Loads what stays loaded across repeats: the ipset, the nftables set, Egret's
    /// manifests.
    fn prepare(&self, filter: Filter, list: &[Entry]) -> anyhow::Result<Prepared> {
        match filter {
            Filter::Egret => {
                let dir = ScratchDir::new("throughput")?;
                let pods = [
                    PodManifest {
                        pod: &self.client,
                        namespace: "bench",
                        labels: &[("app", "client")],
                        ports: &[],
                    },
                    PodManifest {
                        pod: &self.server,
                        namespace: "bench",
                        labels: &[("app", "server")],
                        ports: &[],
                    },
                ];
                write_file(dir.path(), "cluster.yaml", &cluster_yaml(&pods))?;
                write_file(dir.path(), "policy.yaml", &egret_policy(list))?;
                Ok(Prepared {
                    manifests: Some(dir),
                    capacity: list.len() + 1024,
                })
            }
            Filter::Ipset => {
                let mut script = format!(
                    "create {IPSET_NAME} hash:net,port family inet maxelem {}\n",
                    list.len() + 16
                );
                for entry in list {
                    let _ = writeln!(
                        script,
                        "add {IPSET_NAME} {}/{},{}:{}",
                        entry.net, entry.prefix, entry.protocol, entry.port
                    );
                }
                self.node(&["ipset", "restore"], Some(&script))?;
                Ok(Prepared::default())
            }
            Filter::Nftables => {
                let elements: Vec<String> = list
                    .iter()
                    .map(|e| {
                        if e.prefix == 32 {
                            format!("{} . {} . {}", e.net, e.protocol, e.port)
                        } else {
                            format!("{}/{} . {} . {}", e.net, e.prefix, e.protocol, e.port)
                        }
                    })
                    .collect();
                let script = format!(
                    "table inet {NFT_TABLE} {{\n  set allow {{\n    type ipv4_addr . inet_proto . inet_service\n    flags interval\n    elements = {{\n{}\n    }}\n  }}\n}}\n",
                    elements.join(",\n")
                );
                self.node(&["nft", "-f", "-"], Some(&script))?;
                Ok(Prepared::default())
            }
        }
    }

    /// Puts the filter in the packets' path; the returned agent keeps Egret's there.
    fn enable(
        &self,
        filter: Filter,
        prepared: &Prepared,
        plan: &Plan,
    ) -> anyhow::Result<Option<AgentProcess>> {
        let client_if = self.client.host_interface();
        match filter {
            Filter::Egret => {
                let manifests = prepared.manifests.as_ref().context("manifests")?;
                let capacity = prepared.capacity.to_string();
                let mut agent = AgentProcess::start(
                    &self.topology,
                    self.agent,
                    manifests.path(),
                    &AgentProcess::unique_pin_dir(),
                    &[
                        "--metrics-addr",
                        "off",
                        "--resync-seconds",
                        "3600",
                        "--max-cidrs",
                        &capacity,
                    ],
                )?;
                agent.wait_attached(
                    &[self.client.host_ifindex(), self.server.host_ifindex()],
                    plan.egret_timeout,
                )?;
                Ok(Some(agent))
            }
            Filter::Ipset => {
                self.node(
                    &[
                        "iptables",
                        "-A",
                        "FORWARD",
                        "-i",
                        client_if,
                        "-m",
                        "set",
                        "!",
                        "--match-set",
                        IPSET_NAME,
                        "dst,dst",
                        "-j",
                        "DROP",
                    ],
                    None,
                )?;
                Ok(None)
            }
            Filter::Nftables => {
                let script = format!(
                    "add chain inet {NFT_TABLE} forward {{ type filter hook forward priority 0; policy accept; }}\nadd rule inet {NFT_TABLE} forward iifname \"{client_if}\" ip daddr . meta l4proto . th dport != @allow drop\n"
                );
                self.node(&["nft", "-f", "-"], Some(&script))?;
                Ok(None)
            }
        }
    }

    /// Takes the filter out of the path, leaving no hook behind. Egret's agent, dropped
    /// by the caller, has already unpinned (and so detached) everything.
    fn disable(&self, filter: Filter) -> anyhow::Result<()> {
        match filter {
            Filter::Egret => Ok(()),
            // The iptables-nft tables (and their hooks) go; the ipset stays.
            Filter::Ipset => self.node(&["nft", "flush", "ruleset"], None),
            Filter::Nftables => self.node(
                &["nft", "delete", "chain", "inet", NFT_TABLE, "forward"],
                None,
            ),
        }
    }

    /// Removes what `prepare` loaded.
    fn clear(&self, filter: Filter) -> anyhow::Result<()> {
        match filter {
            Filter::Egret => Ok(()),
            Filter::Ipset => self.node(&["ipset", "destroy", IPSET_NAME], None),
            Filter::Nftables => self.node(&["nft", "flush", "ruleset"], None),
        }
    }

    fn node(&self, command: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
        let mut child = self
            .topology
            .node_command(command[0])
            .args(&command[1..])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", command[0]))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .with_context(|| format!("writing to {}", command[0]))?;
        }
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "{} failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    /// Runs iperf3 in the client pod and returns its JSON report.
    fn iperf(&self, seconds: u32, extra: &[&str]) -> anyhow::Result<Value> {
        let seconds = seconds.to_string();
        let limit = (u64::from(seconds.parse::<u32>()?) + 20).to_string();
        let output = self
            .client
            .command("timeout")
            .args([
                &limit,
                "taskset",
                "-c",
                "0",
                "iperf3",
                "-J",
                "--connect-timeout",
                "3000",
                "-t",
                &seconds,
                "-c",
            ])
            .arg(self.server.ipv4().to_string())
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .context("running iperf3")?;
        let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "iperf3 printed no JSON: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        if let Some(error) = report.get("error") {
            bail!("iperf3: {error}");
        }
        Ok(report)
    }

    /// 64-byte UDP datagrams as fast as iperf3 sends them: packets the node forwarded
    /// to the server's interface per second of sending.
    fn udp_pps(&self, seconds: u32) -> anyhow::Result<f64> {
        let before = self.forwarded_packets()?;
        let report = self.iperf(seconds, &["-u", "-b", "0", "-l", UDP_PAYLOAD])?;
        let after = self.forwarded_packets()?;
        let sent_seconds = report["end"]["sum_sent"]["seconds"]
            .as_f64()
            .context("iperf3 report lacks end.sum_sent.seconds")?;
        #[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
        let forwarded = (after - before) as f64;
        Ok(forwarded / sent_seconds)
    }

    fn tcp_gbps(&self, seconds: u32) -> anyhow::Result<f64> {
        let report = self.iperf(seconds, &[])?;
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|bps| bps / 1e9)
            .context("iperf3 report lacks end.sum_received.bits_per_second")
    }

    /// Packets the node sent into the server pod's veth.
    fn forwarded_packets(&self) -> anyhow::Result<u64> {
        let output = Command::new("ip")
            .args([
                "-n",
                self.topology.node_netns(),
                "-s",
                "-j",
                "link",
                "show",
                "dev",
            ])
            .arg(self.server.host_interface())
            .output()
            .context("running ip -s link")?;
        let links: Value = serde_json::from_slice(&output.stdout).context("ip -j output")?;
        links[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .context("ip -s -j link lacks stats64.tx.packets")
    }
}

/// One allow-list entry: destination network, protocol (`tcp`/`udp`), port.
struct Entry {
    net: Ipv4Addr,
    prefix: u8,
    protocol: &'static str,
    port: u16,
}

/// The measured flows' two entries and `others` more: one in ten a /24 in
/// 10.128.0.0/9, the rest /32s in 172.16.0.0/12, TCP or UDP, ports 1000-4999.
fn allow_list(others: usize, server: Ipv4Addr) -> Vec<Entry> {
    let mut list = vec![
        Entry {
            net: server,
            prefix: 32,
            protocol: "tcp",
            port: IPERF_PORT,
        },
        Entry {
            net: server,
            prefix: 32,
            protocol: "udp",
            port: IPERF_PORT,
        },
    ];
    for i in 0..others {
        let n = u32::try_from(i).expect("fewer than 2^32 rules");
        let (net, prefix) = if i % 10 == 0 {
            (u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (n / 10) * 256, 24)
        } else {
            (u32::from(Ipv4Addr::new(172, 16, 0, 0)) + n, 32)
        };
        list.push(Entry {
            net: Ipv4Addr::from(net),
            prefix,
            protocol: if (i / 3) % 2 == 0 { "tcp" } else { "udp" },
            port: 1000 + u16::try_from(i % 4000).expect("small"),
        });
    }
    list
}

/// One `NetworkPolicy` selecting the client, one ipBlock rule per entry.
fn egret_policy(list: &[Entry]) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-list, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n",
    );
    for entry in list {
        let _ = writeln!(
            yaml,
            "    - {{to: [{{ipBlock: {{cidr: {}/{}}}}}], ports: [{{protocol: {}, port: {}}}]}}",
            entry.net,
            entry.prefix,
            entry.protocol.to_uppercase(),
            entry.port
        );
    }
    yaml
}
