//! `cargo xtask image`: builds the agent's container image from the repository's
//! `Dockerfile`, on any Debian machine with network access to Debian's mirrors:
//! - the engine is the first that works of docker, podman and buildah; where none does,
//!   podman is installed from Debian (as root);
//! - the runtime base is the Dockerfile's default (distroless) when it can be pulled, and
//!   otherwise an equivalent made here from Debian packages with mmdebstrap
//!   ([`LOCAL_BASE`]), built once and reused;
//! - the agent is compiled in the Dockerfile's build stage, or with `--prebuilt`, taken
//!   from a binary built on this machine (seconds instead of a cold toolchain build).

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::{run_command, setup, workspace_root};

/// The Dockerfile's runtime base when `RUNTIME_BASE` is empty (the published image's).
const DEFAULT_BASE: &str = "gcr.io/distroless/cc-debian12";

/// The stand-in for [`DEFAULT_BASE`] built here from Debian packages.
const LOCAL_BASE: &str = "localhost/egret-base:bookworm";

/// Debian 12, as distroless `cc-debian12` and the Dockerfile's build stage.
const LOCAL_BASE_SUITE: &str = "bookworm";

/// What `distroless/cc` gives the agent: glibc, libgcc, CA certificates, and
/// /etc/services and /etc/protocols (netbase). Their dependencies come along.
const LOCAL_BASE_PACKAGES: &[&str] = &["libc6", "libgcc-s1", "ca-certificates", "netbase"];

/// Run after the packages are extracted (mmdebstrap's extract variant runs no maintainer
/// scripts): the CA bundle that `update-ca-certificates` would make, distroless's two
/// account files, and empty copies of the host's resolv.conf and hostname, which the
/// engine replaces in every container.
const LOCAL_BASE_HOOKS: &[&str] = &[
    r#"cat "$1"/usr/share/ca-certificates/mozilla/*.crt > "$1"/etc/ssl/certs/ca-certificates.crt"#,
    r#"echo 'root:x:0:0:root:/root:/sbin/nologin' > "$1"/etc/passwd"#,
    r#"echo 'root:x:0:' > "$1"/etc/group"#,
    r#": > "$1"/etc/resolv.conf; : > "$1"/etc/hostname"#,
];

/// How long a pull of the default base may take before the local base is used instead
/// (an unreachable registry may drop packets rather than refuse).
const PULL_TIMEOUT: Duration = Duration::from_mins(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    Docker,
    Podman,
    Buildah,
}

impl Engine {
    const ALL: [Engine; 3] = [Engine::Docker, Engine::Podman, Engine::Buildah];

    fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
            Engine::Buildah => "buildah",
        }
    }

    /// The Debian packages that provide the engine; docker's needs a daemon, which is
    /// not Debian's to start here.
    fn debian_packages(self) -> Option<&'static [&'static str]> {
        match self {
            Engine::Docker => None,
            // Debian 12's crun (1.8) refuses hosts with a hybrid cgroup layout; runc runs
            // there, and is what Kubernetes nodes run. The image test uses it.
            Engine::Podman => Some(&["podman", "runc"]),
            Engine::Buildah => Some(&["buildah"]),
        }
    }

    /// A command that succeeds only when the engine can build: docker needs its
    /// daemon; podman and buildah run without one.
    fn probe(self) -> Command {
        let mut command = Command::new(self.program());
        match self {
            Engine::Docker | Engine::Podman => command.arg("info"),
            Engine::Buildah => command.arg("version"),
        };
        command
    }

    fn build(
        self,
        containerfile: &Path,
        context: &Path,
        tag: &str,
        build_args: &[(&str, &str)],
        cache: bool,
    ) -> Command {
        let mut command = Command::new(self.program());
        match self {
            // The Dockerfile's cache mounts need BuildKit (the default since Docker 23),
            // whose cache is not made of images.
            Engine::Docker => command.arg("build").env("DOCKER_BUILDKIT", "1"),
            Engine::Podman => command.arg("build"),
            Engine::Buildah => command.arg("bud"),
        };
        // podman and buildah keep an image of each stage as their cache. Without it:
        // one layer, and no stage image left behind (`--layers=false` alone fails in
        // podman 4.3 on a stage that only renames another, as the Dockerfile's `agent`).
        if !cache {
            match self {
                Engine::Docker => {}
                Engine::Podman => {
                    command.arg("--squash-all");
                }
                Engine::Buildah => {
                    command.arg("--squash");
                }
            }
        }
        command
            .arg("--file")
            .arg(containerfile)
            .args(["--tag", tag]);
        for (name, value) in build_args {
            command.arg("--build-arg").arg(format!("{name}={value}"));
        }
        command.arg(context);
        command
    }

    /// Whether `image` is in the engine's local store.
    fn has_image(self, image: &str) -> bool {
        let mut command = Command::new(self.program());
        match self {
            Engine::Docker => command.args(["image", "inspect", image]),
            Engine::Podman => command.args(["image", "exists", image]),
            Engine::Buildah => command.args(["inspect", "--type", "image", image]),
        };
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    fn pull(self, image: &str) -> Command {
        let mut command = Command::new(self.program());
        command.args(["pull", image]);
        command
    }
}

/// What `cargo xtask image` was asked for.
pub struct Options {
    pub tag: String,
    pub engine: Option<Engine>,
    /// An agent binary built on this machine, copied into the runtime stage.
    pub prebuilt: Option<PathBuf>,
    /// The runtime base; `None`: distroless, or [`LOCAL_BASE`] when it cannot be pulled.
    pub base: Option<String>,
}

/// Builds the image.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let engine = usable_engine(options.engine)?;
    let base = match &options.base {
        Some(base) => Some(base.clone()),
        None => fallback_base(engine)?,
    };
    let mut build_args = Vec::new();
    if let Some(base) = &base {
        build_args.push(("RUNTIME_BASE", base.as_str()));
    }
    let root = workspace_root();
    // A prebuilt binary is the whole build context: the Dockerfile's build stage, which
    // copies the sources, is skipped.
    let prebuilt_context = options
        .prebuilt
        .as_deref()
        .map(prebuilt_context)
        .transpose()?;
    let context = match &prebuilt_context {
        Some(scratch) => {
            build_args.push(("AGENT_SOURCE", "prebuilt"));
            scratch.path()
        }
        None => &root,
    };
    // A prebuilt binary changes at every build: nothing is worth caching.
    let cache = prebuilt_context.is_none();
    let mut build = engine.build(
        &root.join("Dockerfile"),
        context,
        &options.tag,
        &build_args,
        cache,
    );
    let tag = &options.tag;
    eprintln!(
        "image: building {tag} with {} (agent: {}; runtime base: {})",
        engine.program(),
        options
            .prebuilt
            .as_deref()
            .map_or("compiled in the build stage".to_owned(), |path| path
                .display()
                .to_string()),
        base.as_deref().unwrap_or(DEFAULT_BASE),
    );
    run_command(&mut build).with_context(|| {
        let hint = if options.prebuilt.is_some() {
            ""
        } else {
            "\nThe build stage starts from docker.io/library/rust; where that cannot be \
             pulled, build the agent here (`cargo xtask build --release`) and pass \
             `--prebuilt target/release/egret`."
        };
        format!("building the image with {}{hint}", engine.program())
    })?;
    eprintln!("image: built {tag}");
    Ok(())
}

/// Makes podman usable for the image test, installing it where it is missing, and runc,
/// which the test runs containers with, where podman came without it.
pub fn podman_for_tests() -> anyhow::Result<()> {
    usable_engine(Some(Engine::Podman))?;
    setup::install_debian_packages(&["runc"]).map(|_| ())
}

/// `wanted`, or the first engine that works; where none works, installs `wanted` (podman
/// by default) from Debian.
fn usable_engine(wanted: Option<Engine>) -> anyhow::Result<Engine> {
    let candidates = wanted.map_or(Engine::ALL.to_vec(), |engine| vec![engine]);
    let mut tried = Vec::new();
    for &candidate in &candidates {
        match check(candidate) {
            Ok(()) => return Ok(candidate),
            Err(Unusable::NotInstalled) => {
                tried.push(format!("{}: not installed", candidate.program()));
            }
            Err(Unusable::NotWorking(reason)) => tried.push(format!(
                "{}: installed but not usable: {reason}",
                candidate.program()
            )),
        }
    }
    let install = wanted.unwrap_or(Engine::Podman);
    let Some(packages) = install.debian_packages() else {
        bail!(
            "{} cannot build here\n  {}\nStart Docker's daemon, or leave out --engine to \
             have podman installed.",
            install.program(),
            tried.join("\n  ")
        );
    };
    eprintln!(
        "image: no usable container engine ({}); installing {} from Debian",
        tried.join("; "),
        install.program()
    );
    setup::install_debian_packages(packages).with_context(|| {
        format!(
            "no container engine is available to build the image\n  {}\n\
             Installing {} failed: install podman or buildah, or start Docker's daemon, then \
             run `cargo xtask image` again.",
            tried.join("\n  "),
            install.program()
        )
    })?;
    match check(install) {
        Ok(()) => Ok(install),
        Err(Unusable::NotInstalled) => bail!("{} is still not installed", install.program()),
        Err(Unusable::NotWorking(reason)) => {
            bail!(
                "{} was installed but does not work: {reason}",
                install.program()
            )
        }
    }
}

/// Why an engine cannot build here.
enum Unusable {
    NotInstalled,
    NotWorking(String),
}

fn check(engine: Engine) -> Result<(), Unusable> {
    let output = match engine.probe().output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(Unusable::NotInstalled);
        }
        Err(error) => return Err(Unusable::NotWorking(error.to_string())),
    };
    if output.status.success() {
        return Ok(());
    }
    Err(Unusable::NotWorking(format!(
        "{} ({})",
        output.status,
        first_line(&output.stderr)
    )))
}

fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("no output")
        .to_owned()
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or("no output")
        .to_owned()
}

/// `None` when the Dockerfile's default base is there or can be pulled; otherwise
/// [`LOCAL_BASE`], built first if the engine does not hold it yet.
fn fallback_base(engine: Engine) -> anyhow::Result<Option<String>> {
    if engine.has_image(DEFAULT_BASE) {
        return Ok(None);
    }
    let reason = match output_within(&mut engine.pull(DEFAULT_BASE), PULL_TIMEOUT) {
        Ok(output) if output.status.success() => return Ok(None),
        // The last line: the error, after the progress.
        Ok(output) => last_line(&output.stderr),
        Err(error) => format!("{error:#}"),
    };
    eprintln!("image: cannot pull {DEFAULT_BASE} ({reason}); using {LOCAL_BASE} instead");
    if engine.has_image(LOCAL_BASE) {
        eprintln!(
            "image: {LOCAL_BASE} was built earlier (`{} rmi {LOCAL_BASE}` to rebuild it)",
            engine.program()
        );
    } else {
        build_local_base(engine)?;
    }
    Ok(Some(LOCAL_BASE.to_owned()))
}

/// Makes [`LOCAL_BASE`]: the packages distroless/cc carries, extracted from Debian's
/// archive by mmdebstrap into a tarball, then imported with a `FROM scratch` build (one
/// way for all three engines).
fn build_local_base(engine: Engine) -> anyhow::Result<()> {
    setup::install_debian_packages(&["mmdebstrap"])
        .context("mmdebstrap makes the local base image")?;
    eprintln!(
        "image: making {LOCAL_BASE} from Debian {LOCAL_BASE_SUITE}: {}",
        LOCAL_BASE_PACKAGES.join(", ")
    );
    let scratch = ScratchDir::new("egret-base")?;
    let rootfs = scratch.path().join("rootfs.tar");
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--variant=extract", "--format=tar"])
        .arg(format!("--include={}", LOCAL_BASE_PACKAGES.join(",")));
    for hook in LOCAL_BASE_HOOKS {
        mmdebstrap.arg(format!("--extract-hook={hook}"));
    }
    mmdebstrap.arg(LOCAL_BASE_SUITE).arg(&rootfs);
    run_command(&mut mmdebstrap)?;
    let containerfile = scratch.path().join("Containerfile");
    fs::write(&containerfile, "FROM scratch\nADD rootfs.tar /\n")
        .with_context(|| format!("writing {}", containerfile.display()))?;
    run_command(&mut engine.build(&containerfile, scratch.path(), LOCAL_BASE, &[], false))
        .with_context(|| format!("importing {LOCAL_BASE}"))
}

/// A build context holding only `binary`, as `egret`.
fn prebuilt_context(binary: &Path) -> anyhow::Result<ScratchDir> {
    let metadata =
        fs::metadata(binary).with_context(|| format!("--prebuilt {}", binary.display()))?;
    if !metadata.is_file() {
        bail!("--prebuilt {}: not a file", binary.display());
    }
    let scratch = ScratchDir::new("egret-image-context")?;
    let target = scratch.path().join("egret");
    // A hard link spares copying a debug binary's few hundred MB; across filesystems, copy.
    if fs::hard_link(binary, &target).is_err() {
        fs::copy(binary, &target)
            .with_context(|| format!("copying {} into the build context", binary.display()))?;
    }
    Ok(scratch)
}

/// A directory under `target/` for this process, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let path = workspace_root()
            .join("target")
            .join(format!("{name}-{}", std::process::id()));
        // Left over from a killed run of a process with the same pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `command` and returns its output, killing it after `timeout`.
fn output_within(command: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    // Read while waiting, so that a chatty command never blocks on a full pipe.
    let reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let stderr = reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: Vec::new(),
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_defaults_to_the_base_we_fall_back_from() {
        let dockerfile = fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
        assert!(
            dockerfile.contains(&format!(
                "FROM ${{RUNTIME_BASE:-{DEFAULT_BASE}}} AS runtime"
            )),
            "the runtime stage's default base is {DEFAULT_BASE}"
        );
        assert!(dockerfile.contains("FROM ${AGENT_SOURCE:-build} AS agent"));
        assert!(dockerfile.contains("FROM scratch AS prebuilt\nCOPY egret "));
    }
}
