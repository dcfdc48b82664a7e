//! `cargo xtask bench`: runs the benchmarks and writes `BENCHMARKS.md` with the command,
//! the machine, medians and ranges, and the targets of issue 8 against what was measured.
//! Never part of `cargo xtask test`.
//!
//! Library-level benchmarks are `agent/benches/*.rs` (compile, per-packet cost through
//! `BPF_PROG_TEST_RUN`, programming rate and change latency); they print JSON lines.
//! Process-level ones run here: the agent's memory on generated clusters, and
//! throughput through a network-namespace node with Egret, iptables + ipset and
//! nftables.
//!
//! The raw results (`target/bench-results.jsonl`) start with a `"bench": "run"` line
//! describing the run, so `cargo xtask bench --report-only` can render the report
//! again from them, after a change to the report's code, running nothing.

mod agent_latency;
mod memory;
mod report;
mod throughput;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use crate::{build_agent, cargo, is_root, workspace_root};

/// One stage of `cargo xtask bench`, for `--stage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// `agent/benches/compile.rs`.
    Compile,
    /// `agent/benches/datapath.rs`.
    Datapath,
    /// `agent/benches/control_plane.rs`.
    ControlPlane,
    /// `agent/benches/dns.rs`: what `domainNames` rules add per packet.
    Dns,
    /// The agent's memory through the Kubernetes source and manifests.
    Memory,
    /// Throughput through a node with Egret, iptables + ipset and nftables.
    Throughput,
    /// Change latency from the running agent's own histogram.
    AgentLatency,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Compile => "compile",
            Stage::Datapath => "datapath",
            Stage::ControlPlane => "control_plane",
            Stage::Dns => "dns",
            Stage::Memory => "memory",
            Stage::Throughput => "throughput",
            Stage::AgentLatency => "agent_latency",
        }
    }
}

/// Runs one stage and prints the report of its results alone; BENCHMARKS.md is not
/// touched (a full run writes it). Raw results go to `target/bench-results-STAGE.jsonl`,
/// which `--report-only --results` renders again.
pub fn run_stage(stage: Stage, quick: bool) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the benchmarks load BPF programs and build network namespaces: run `cargo xtask bench` as root"
    );
    let scale = Scale { quick };
    let load_before = load_average();
    let started = Instant::now();
    let results = match stage {
        Stage::Compile | Stage::Datapath | Stage::ControlPlane | Stage::Dns => {
            cargo_bench(stage.name(), &["--no-run"])?;
            let quick_arg: &[&str] = if quick { &["--", "--quick"] } else { &[] };
            cargo_bench(stage.name(), quick_arg)?
        }
        Stage::Memory => memory::run(&build_agent(true)?, scale)?,
        Stage::Throughput => throughput::run(&build_agent(true)?, scale)?,
        Stage::AgentLatency => agent_latency::run(&build_agent(true)?, scale)?,
    };
    let context = report::Context {
        command: format!(
            "cargo xtask bench --stage {}{}",
            stage.name().replace('_', "-"),
            if quick { " --quick" } else { "" }
        ),
        date: date(),
        machine: machine(),
        elapsed: started.elapsed(),
        load_before,
        load_after: load_average(),
        quick,
    };
    let raw = workspace_root()
        .join("target")
        .join(format!("bench-results-{}.jsonl", stage.name()));
    let lines: Vec<String> = std::iter::once(context.to_json())
        .chain(results.iter().cloned())
        .map(|line| line.to_string())
        .collect();
    std::fs::write(&raw, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", raw.display()))?;
    print!("{}", report::render(&context, &results));
    eprintln!("raw results: {}", raw.display());
    Ok(())
}

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub quick: bool,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the benchmarks load BPF programs and build network namespaces: run `cargo xtask bench` as root"
    );
    let scale = Scale { quick };
    let command = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let command = command.to_owned();
    // Build everything first, so build time is not benchmark time.
    let agent = build_agent(true)?;
    for bench in BENCHES {
        cargo_bench(bench, &["--no-run"])?;
    }

    let load_before = load_average();
    let started = Instant::now();
    let mut results: Vec<Value> = Vec::new();
    let quick_arg: &[&str] = if quick { &["--", "--quick"] } else { &[] };
    for bench in BENCHES {
        eprintln!("bench: {bench}");
        results.extend(cargo_bench(bench, quick_arg)?);
    }
    // A stage that fails is reported and the others still run: a long run is not lost.
    let mut failures = Vec::new();
    for (stage, outcome) in [
        (
            "agent memory",
            memory::run as fn(&Path, Scale) -> anyhow::Result<Vec<Value>>,
        ),
        ("throughput", throughput::run),
        ("agent change latency", agent_latency::run),
    ]
    .map(|(stage, run)| {
        eprintln!("bench: {stage}");
        (stage, run(&agent, scale))
    }) {
        match outcome {
            Ok(rows) => results.extend(rows),
            Err(error) => {
                eprintln!("bench: {stage} failed: {error:#}");
                results.push(serde_json::json!({
                    "bench": "failure",
                    "stage": stage,
                    "error": format!("{error:#}"),
                }));
                failures.push(stage);
            }
        }
    }
    let elapsed = started.elapsed();

    let context = report::Context {
        command,
        date: date(),
        machine: machine(),
        elapsed,
        load_before,
        load_after: load_average(),
        quick,
    };
    let raw = raw_results();
    let lines: Vec<String> = std::iter::once(context.to_json())
        .chain(results.iter().cloned())
        .map(|line| line.to_string())
        .collect();
    std::fs::write(&raw, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", raw.display()))?;
    let markdown = report::render(&context, &results);
    let path = workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{markdown}\nwritten to {} (raw results: {})",
        path.display(),
        raw.display()
    );
    ensure!(
        failures.is_empty(),
        "benchmark stages failed: {}",
        failures.join(", ")
    );
    Ok(())
}

/// Renders the report again from raw results (by default those of the last run) into
/// `output` (by default `BENCHMARKS.md`; `-` for standard output), running nothing.
/// Results without a `run` line (say, one benchmark's JSON lines) render with the
/// run's details marked unknown.
pub fn report_only(results: Option<&Path>, output: Option<&Path>) -> anyhow::Result<()> {
    let raw = results.map_or_else(raw_results, Path::to_path_buf);
    let text =
        std::fs::read_to_string(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let mut results = json_lines(&text)?;
    let context = results
        .iter()
        .position(|r| r["bench"] == "run")
        .map_or_else(
            || report::Context::unknown(&raw),
            |at| report::Context::from_json(&results.remove(at)),
        );
    let markdown = report::render(&context, &results);
    let path = output.map_or_else(|| workspace_root().join("BENCHMARKS.md"), Path::to_path_buf);
    if path == Path::new("-") {
        print!("{markdown}");
    } else {
        std::fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("written to {} from {}", path.display(), raw.display());
    }
    Ok(())
}

fn raw_results() -> std::path::PathBuf {
    workspace_root().join("target").join("bench-results.jsonl")
}

/// Now, as the report prints it.
fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The benchmark binaries of the `egret` package, in the order they run.
const BENCHES: [&str; 4] = ["compile", "datapath", "dns", "control_plane"];

/// Runs `cargo bench -p egret --bench NAME ARGS` and returns its JSON lines.
fn cargo_bench(name: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut command = cargo();
    command
        .current_dir(workspace_root())
        .args(["bench", "--quiet", "--package", "egret", "--bench", name])
        .args(args);
    let output = command
        .output()
        .with_context(|| format!("running the {name} benchmark"))?;
    ensure!(
        output.status.success(),
        "{name} benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    json_lines(&String::from_utf8_lossy(&output.stdout))
}

fn json_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).context("benchmark output"))
        .collect()
}

/// Median and extremes of a few samples.
#[derive(Clone, Debug)]
pub struct Summary {
    sorted: Vec<f64>,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        Some(Self { sorted: samples })
    }

    pub fn median(&self) -> f64 {
        let n = self.sorted.len();
        if n % 2 == 1 {
            self.sorted[n / 2]
        } else {
            f64::midpoint(self.sorted[n / 2 - 1], self.sorted[n / 2])
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted[0]
    }

    pub fn max(&self) -> f64 {
        self.sorted[self.sorted.len() - 1]
    }
}

/// `/proc/loadavg`'s first three fields: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| {
            format!(", {} GiB RAM", kib / (1024 * 1024))
        });
    format!(
        "{cpus} CPUs ({model}){memory}, kernel {}",
        kernel.unwrap_or_default()
    )
}

/// A fresh directory under the temp directory, removed on drop.
pub struct ScratchDir {
    path: std::path::PathBuf,
}

impl ScratchDir {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("egret-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Polls `done` every 100 ms until it is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done()
}
