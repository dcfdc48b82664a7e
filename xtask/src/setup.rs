//! Installs what a fresh Debian-based machine lacks to build and test Egret, and
//! nothing when everything is present (one `dpkg-query`, two file checks: well under
//! a second).

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{cargo, is_root, run_command};

/// Debian packages: LLVM 22 for bpf-linker (rustc 1.95 uses LLVM 22), and the tools the
/// network tests, the demo and the benchmarks drive (`prometheus`: the dashboard test
/// runs its own server, scraping a test agent).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "iputils-ping",
    "util-linux",
    "iperf3",
    "nftables",
    "iptables",
    "ipset",
    "conntrack",
    "prometheus",
    // The domainNames netns tests' DNS server, started in a pod namespace by the test.
    // The -base package: the binary without a system service on the root namespace.
    "dnsmasq-base",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Renders the Helm chart in the deploy tests (Helm's engine, from `PyPI`; no `helm`
/// binary is packaged for Debian).
const HELM_PYTHON: &str = "helm-python-sdk==0.2.2";

pub fn run() -> anyhow::Result<()> {
    install_apt_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    install_helm_renderer()?;
    mount_bpffs()
}

fn install_helm_renderer() -> anyhow::Result<()> {
    // find_spec looks the module up without importing it: fast when present.
    let present = Command::new("python3")
        .args([
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('helm_python') is None)",
        ])
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    eprintln!("setup: installing {HELM_PYTHON} (renders the Helm chart in tests)");
    run_command(Command::new("python3").args(["-m", "pip", "install", "--quiet", HELM_PYTHON]))
}

fn install_apt_packages() -> anyhow::Result<()> {
    let installed = install_debian_packages(APT_PACKAGES)?;
    if installed.contains(&"prometheus") {
        stop_prometheus_service();
    }
    Ok(())
}

/// Installs those of `packages` that are missing (root only) and returns them: setup's
/// own list, and what other tasks need only when they run (the container engine of
/// `cargo xtask image`).
pub fn install_debian_packages<'a>(packages: &[&'a str]) -> anyhow::Result<Vec<&'a str>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(packages)
        .output()
        .context("running dpkg-query (is this a Debian-based machine?)")?;
    let listed = String::from_utf8_lossy(&output.stdout);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            !listed
                .lines()
                .any(|line| line == format!("{package} installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    require_root(&format!("install {}", missing.join(" ")))?;
    eprintln!("setup: installing {}", missing.join(" "));
    run_command(Command::new("apt-get").arg("update").arg("-q"))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(missing)
}

/// Debian's package starts a Prometheus service where services run (systemd; not in
/// containers, whose `policy-rc.d` forbids it). The tests run their own server, so
/// setup leaves no scraper running on the machine.
fn stop_prometheus_service() {
    if !Path::new("/run/systemd/system").is_dir() {
        return;
    }
    eprintln!("setup: disabling the prometheus service (the tests start their own)");
    let stopped = Command::new("systemctl")
        .args(["disable", "--now", "prometheus"])
        .status()
        .is_ok_and(|status| status.success());
    if !stopped {
        eprintln!("setup: could not disable the prometheus service; it may be running");
    }
}

/// `-Z build-std=core` needs the standard library's source for the toolchain that
/// builds the kernel crate: the one running this xtask.
fn install_rust_src() -> anyhow::Result<()> {
    let output = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = String::from_utf8(output.stdout).context("sysroot is not UTF-8")?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if library.is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding the rust-src component");
    let mut command = Command::new("rustup");
    command.args(["component", "add", "rust-src"]);
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        command.args(["--toolchain", &toolchain]);
    }
    run_command(&mut command)
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains(BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    // Debian ships only `llvm-config-22`; bpf-linker's build looks for `llvm-config`.
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run_command(
        cargo()
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// Pinned maps need a bpffs; nodes have one at /sys/fs/bpf, fresh VMs may not.
fn mount_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    require_root("mount bpffs at /sys/fs/bpf")?;
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("setup needs root to {what}");
    }
    Ok(())
}
