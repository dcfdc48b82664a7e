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
        /// Skip the image test. Without this flag, podman is installed from Debian where
        /// no engine is present, and the test is skipped, saying why, only if that fails.
        #[arg(long)]
        no_image: bool,
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
        /// Run only this stage and print its part of the report; BENCHMARKS.md is left
        /// as it is (raw results: target/bench-results-STAGE.jsonl).
        #[arg(long, value_enum, conflicts_with = "report_only")]
        stage: Option<bench::Stage>,
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
    /// buildah (whichever works here; podman is installed from Debian where none does).
    Image {
        /// Name and tag of the image.
        #[arg(long, default_value = "egret:dev")]
        tag: String,
        /// Use this engine instead of the first one that works.
        #[arg(long, value_enum)]
        engine: Option<image::Engine>,
        /// Copy this agent binary, built on this machine (e.g. target/release/egret),
        /// into the image instead of compiling it in the build stage. It must need no
        /// newer glibc than Debian 12's.
        #[arg(long, value_name = "PATH")]
        prebuilt: Option<std::path::PathBuf>,
        /// Runtime base image [default: gcr.io/distroless/cc-debian12, or where it cannot
        /// be pulled, localhost/egret-base:bookworm, made here from Debian packages].
        #[arg(long, value_name = "IMAGE")]
        base: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build_agent(release).map(|_| ())
        }
        Task::Test {
            no_image,
            cargo_args,
        } => {
            setup::run()?;
            test(&cargo_args, !no_image)
        }
        Task::Bench {
            report_only: true,
            results,
            output,
            ..
        } => bench::report_only(results.as_deref(), output.as_deref()),
        Task::Bench { quick, stage, .. } => {
            setup::run()?;
            match stage {
                Some(stage) => bench::run_stage(stage, quick),
                None => bench::run(quick),
            }
        }
        Task::Demo => {
            setup::run()?;
            let agent = build_agent(true)?;
            demo::run(&agent)
        }
        Task::Image {
            tag,
            engine,
            prebuilt,
            base,
        } => image::run(&image::Options {
            tag,
            engine,
            prebuilt,
            base,
        }),
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

fn test(cargo_args: &[String], image_test: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the network tests need root: run `cargo xtask test` as root");
    }
    let mut command = cargo();
    // agent/tests/image.rs builds the image through this very binary, and runs it with
    // podman; without EGRET_XTASK it is skipped, printing EGRET_IMAGE_TEST_SKIP.
    let skip_image = if image_test {
        image::podman_for_tests()
            .err()
            .map(|error| format!("no container engine: {error:#}"))
    } else {
        Some("cargo xtask test --no-image".to_owned())
    };
    match skip_image {
        None => {
            let xtask = std::env::current_exe().context("locating the xtask binary")?;
            command.env("EGRET_XTASK", xtask);
        }
        Some(reason) => {
            eprintln!("test: skipping the image test: {reason}");
            command
                .env_remove("EGRET_XTASK")
                .env("EGRET_IMAGE_TEST_SKIP", reason);
        }
    }
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
