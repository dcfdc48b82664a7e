//! `cargo xtask <task>`: everything a fresh machine needs, in one place.

mod bench;
mod demo;
mod image;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Egret developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: apt packages, rust-src, bpf-linker. Idempotent.
    Setup,
    /// Build the agent (and its embedded kernel programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test, the privileged network tests included (needs root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Build a small cluster in network namespaces, enforce example policies, and
    /// print what each probed flow was expected to do and what it really did.
    Demo,
    /// Run the benchmarks and write BENCHMARKS.md (never part of `test`).
    Bench {
        /// A shorter run (under 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Run nothing: render BENCHMARKS.md again from the raw results of a run.
        #[arg(long, conflicts_with = "quick")]
        report_only: bool,
        /// With --report-only: the raw results [default: target/bench-results.jsonl].
        #[arg(long, requires = "report_only")]
        results: Option<std::path::PathBuf>,
        /// With --report-only: where to write the report, `-` for standard output
        /// [default: BENCHMARKS.md].
        #[arg(long, requires = "report_only")]
        output: Option<std::path::PathBuf>,
    },
    /// Build the agent's container image from the Dockerfile, with docker, podman or
    /// buildah (whichever works here).
    Image {
        /// Name and tag of the image.
        #[arg(long, default_value = "egret:dev")]
        tag: String,
        /// Use this engine instead of the first one that works.
        #[arg(long, value_enum)]
        engine: Option<image::Engine>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build_agent(release).map(|_| ())
        }
        Task::Test { cargo_args } => {
            setup::run()?;
            test(&cargo_args)
        }
        Task::Bench {
            report_only: true,
            results,
            output,
            ..
        } => bench::report_only(results.as_deref(), output.as_deref()),
        Task::Bench { quick, .. } => {
            setup::run()?;
            bench::run(quick)
        }
        Task::Demo => {
            setup::run()?;
            let agent = build_agent(true)?;
            demo::run(&agent)
        }
        Task::Image { tag, engine } => image::run(&tag, engine),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

fn run_command(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds `egret` and returns the path of the binary.
fn build_agent(release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut command = cargo();
    command.args(["build", "--package", "egret", "--bin", "egret"]);
    if release {
        command.arg("--release");
    }
    run_command(&mut command)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root().join("target").join(profile).join("egret"))
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the network tests need root: run `cargo xtask test` as root");
    }
    let mut command = cargo();
    // The kernel crate only builds for the BPF target (agent/build.rs builds it).
    command.args([
        "test",
        "--workspace",
        "--exclude",
        "egret-ebpf",
        "--no-fail-fast",
    ]);
    command.arg("--").args(cargo_args);
    run_command(&mut command)
}

/// Effective uid 0, read from /proc so xtask needs no libc bindings.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}
