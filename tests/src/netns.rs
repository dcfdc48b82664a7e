//! Named network namespaces (`/run/netns/<name>`, the ones `ip netns` manages), and ways to run
//! code and commands inside them.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::{panic, thread};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` bind-mounts the namespaces it creates.
const NETNS_DIR: &str = "/run/netns";

/// The bind mount that names the network namespace `name`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// A named network namespace that this process created. Dropping it deletes the name; the
/// kernel tears the namespace down once nothing (socket, thread, process) holds it any more.
#[derive(Debug)]
pub(crate) struct OwnedNetns {
    name: String,
    deleted: bool,
}

impl OwnedNetns {
    /// Creates the namespace `name`, failing if it exists already.
    pub(crate) fn create(name: &str) -> anyhow::Result<Self> {
        // The first `ip netns add` on a machine makes /run/netns a shared mount; two first
        // runs racing each other stack two mounts on it. Serialise creation in this process.
        static CREATE: Mutex<()> = Mutex::new(());
        let guard = CREATE.lock().unwrap_or_else(PoisonError::into_inner);
        ip(None, &["netns", "add", name])?;
        drop(guard);
        Ok(Self {
            name: name.to_owned(),
            deleted: false,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Deletes the namespace now, reporting failure (drop only logs it).
    pub(crate) fn delete(mut self) -> anyhow::Result<()> {
        self.deleted = true;
        ip(None, &["netns", "delete", &self.name])
    }
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop runs while a failed test unwinds: report, never panic.
        if let Err(error) = ip(None, &["netns", "delete", &self.name]) {
            eprintln!("egret-testbed: leaving netns {}: {error:#}", self.name);
        }
    }
}

/// Runs `ip [-n netns] args...` and fails with its stderr if it fails.
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("ip");
    if let Some(netns) = netns {
        command.args(["-n", netns]);
    }
    command.args(args);
    run(command, None).with_context(|| format!("ip {}", args.join(" ")))
}

/// Runs each line of `commands` as `ip -n netns <line>` in one `ip -batch` process, stopping at
/// the first that fails.
pub(crate) fn ip_batch(netns: &str, commands: &[String]) -> anyhow::Result<()> {
    let mut command = Command::new("ip");
    command.args(["-n", netns, "-batch", "-"]);
    let script = commands.join("\n") + "\n";
    run(command, Some(&script)).with_context(|| format!("ip -n {netns} -batch:\n{script}"))
}

fn run(mut command: Command, stdin: Option<&str>) -> anyhow::Result<()> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .context("cannot start ip (is iproute2 installed?)")?;
    if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A failed write means ip exited early; its status and stderr say why.
        let _ = pipe.write_all(script.as_bytes());
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A command that runs `program` inside the namespace. `nsenter` switches only the network
/// namespace; `ip netns exec` would also remount /sys, hiding /sys/fs/bpf from the program.
pub(crate) fn command_in(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg("--")
        .arg(program);
    command
}

/// Moves the calling thread into the namespace. Network namespaces are per thread, so this
/// leaves the rest of the process where it was; call it only on a thread made for the purpose.
pub(crate) fn enter(netns: &str) -> anyhow::Result<()> {
    let path = netns_path(netns);
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("cannot enter netns {netns}"))?;
    Ok(())
}

/// Runs `f` on a short-lived thread inside the namespace and returns what it returns. A panic
/// in `f` resumes on the calling thread.
pub(crate) fn run_in<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    thread::scope(|scope| {
        let thread = thread::Builder::new()
            .name(format!("netns {netns}"))
            .spawn_scoped(scope, || -> anyhow::Result<T> {
                enter(netns)?;
                Ok(f())
            })
            .context("cannot spawn a thread")?;
        thread
            .join()
            .unwrap_or_else(|payload| panic::resume_unwind(payload))
    })
}

/// Writes sysctls (`net.ipv4.ip_forward`-style keys) of the namespace. /proc/sys/net shows the
/// namespace of the thread that opens it, so a thread inside the namespace can write them.
pub(crate) fn write_sysctls(netns: &str, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    run_in(netns, || {
        for (key, value) in settings {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            fs::write(&path, value)
                .with_context(|| format!("cannot set {key} = {value} in netns {netns}"))?;
        }
        Ok(())
    })?
}
