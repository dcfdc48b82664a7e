//! Runs an `egret` agent inside a topology's node namespace, with its own pin directory,
//! and removes everything it pinned when dropped (even when the test panicked).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Topology;

static NEXT_AGENT: AtomicU32 = AtomicU32::new(0);

/// Where test agents pin; each gets a unique directory below it.
const TEST_BPFFS: &str = "/sys/fs/bpf";

/// A running agent. Dropping it stops the process and unpins its maps and links.
pub struct AgentProcess {
    binary: PathBuf,
    child: Option<Child>,
    pin_dir: PathBuf,
    log: PathBuf,
    /// Leave the pins on drop: a successor agent takes them over.
    keep_pins: bool,
}

impl AgentProcess {
    /// A fresh, unique pin directory for one test's agent(s).
    #[must_use]
    pub fn unique_pin_dir() -> PathBuf {
        let n = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
        Path::new(TEST_BPFFS).join(format!("egret-test-{}-{n}", std::process::id()))
    }

    /// Starts `binary run --manifests DIR --node-name node-1 --bpffs PIN_DIR ARGS...` in the
    /// node namespace; its log goes to `PIN_DIR`'s name under the temp directory.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start(
        topology: &Topology,
        binary: &Path,
        manifests: &Path,
        pin_dir: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_logging(
            topology,
            binary,
            manifests,
            pin_dir,
            args,
            "egret=debug,info",
        )
    }

    /// [`AgentProcess::start`] with `log_filter` as the agent's `RUST_LOG`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_logging(
        topology: &Topology,
        binary: &Path,
        manifests: &Path,
        pin_dir: &Path,
        args: &[&str],
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let source = ("--manifests", manifests);
        Self::spawn(topology, binary, source, pin_dir, args, log_filter)
    }

    /// Like [`AgentProcess::start`], reading an API server (`--kubeconfig KUBECONFIG`)
    /// instead of a manifest directory.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_with_kubeconfig(
        topology: &Topology,
        binary: &Path,
        kubeconfig: &Path,
        pin_dir: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let source = ("--kubeconfig", kubeconfig);
        Self::spawn(topology, binary, source, pin_dir, args, "egret=debug,info")
    }

    /// [`AgentProcess::start_with_kubeconfig`] with `log_filter` as the agent's
    /// `RUST_LOG`.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_with_kubeconfig_logging(
        topology: &Topology,
        binary: &Path,
        kubeconfig: &Path,
        pin_dir: &Path,
        args: &[&str],
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let source = ("--kubeconfig", kubeconfig);
        Self::spawn(topology, binary, source, pin_dir, args, log_filter)
    }

    fn spawn(
        topology: &Topology,
        binary: &Path,
        (source_flag, source): (&str, &Path),
        pin_dir: &Path,
        args: &[&str],
        log_filter: &str,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "{}.log",
            pin_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("egret-test")
        ));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = topology
            .node_command(binary)
            .arg("run")
            .arg(source_flag)
            .arg(source)
            .args(["--node-name", "node-1", "--bpffs"])
            .arg(pin_dir)
            .args(args)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            binary: binary.to_owned(),
            child: Some(child),
            pin_dir: pin_dir.to_owned(),
            log,
            keep_pins: false,
        })
    }

    /// The agent's process id, while it runs (`nsenter` execs the agent in place).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The agent's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent has attached to every interface in `ifindexes` (its pinned
    /// links exist), or fails after `timeout` with the agent's log.
    ///
    /// # Errors
    /// On timeout, or when the agent exited.
    pub fn wait_attached(&mut self, ifindexes: &[u32], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = ifindexes.iter().all(|i| {
                self.pin_dir
                    .join("links")
                    .join(format!("from_pod_if{i}"))
                    .exists()
            });
            if all {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("agent exited ({status}) before attaching:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not attach to {ifindexes:?} within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL after 5 s) and leaves its pins in place.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A command running this agent's binary with `args` (e.g. `counters`) in the node
    /// namespace.
    #[must_use]
    pub fn command(&self, topology: &Topology, args: &[&str]) -> Command {
        let mut command = topology.node_command(&self.binary);
        command.args(args);
        command
    }
}

impl AgentProcess {
    /// Stops the agent the way an upgrade does: its maps and links stay pinned for the
    /// next agent on the same pin directory. Returns the agent's log.
    #[must_use]
    pub fn stop_keeping_pins(mut self) -> String {
        self.stop();
        self.keep_pins = true;
        self.log()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        if self.keep_pins {
            return;
        }
        let _ = Command::new(&self.binary)
            .arg("cleanup")
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.log);
    }
}
