//! `cargo xtask image`: builds the agent's container image from the repository's
//! `Dockerfile` with the first container engine that works here: docker, podman or
//! buildah. The build runs entirely inside the engine (its build stage installs the
//! toolchain), so this task needs nothing from `cargo xtask setup`.

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::{run_command, workspace_root};

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

    fn build(self, tag: &str) -> Command {
        let root = workspace_root();
        let mut command = Command::new(self.program());
        match self {
            // The Dockerfile's cache mounts need BuildKit (the default since Docker 23).
            Engine::Docker => command.arg("build").env("DOCKER_BUILDKIT", "1"),
            Engine::Podman => command.arg("build"),
            Engine::Buildah => command.arg("bud"),
        };
        command
            .arg("--file")
            .arg(root.join("Dockerfile"))
            .args(["--tag", tag])
            .arg(&root);
        command
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
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("no output")
        .to_owned();
    Err(Unusable::NotWorking(format!(
        "{} ({reason})",
        output.status
    )))
}

/// Builds the image as `tag` with `engine`, or with the first engine that works.
pub fn run(tag: &str, engine: Option<Engine>) -> anyhow::Result<()> {
    let candidates = engine.map_or(Engine::ALL.to_vec(), |engine| vec![engine]);
    let mut tried = Vec::new();
    for candidate in candidates {
        match check(candidate) {
            Ok(()) => {
                eprintln!("image: building {tag} with {}", candidate.program());
                run_command(&mut candidate.build(tag))
                    .with_context(|| format!("building the image with {}", candidate.program()))?;
                eprintln!("image: built {tag}");
                return Ok(());
            }
            Err(Unusable::NotInstalled) => {
                tried.push(format!("{}: not installed", candidate.program()));
            }
            Err(Unusable::NotWorking(reason)) => {
                tried.push(format!(
                    "{}: installed but not usable: {reason}",
                    candidate.program()
                ));
            }
        }
    }
    bail!(
        "no container engine is available to build the image\n  {}\n\
         Install podman or buildah, or start Docker's daemon, then run `cargo xtask image` again.",
        tried.join("\n  ")
    )
}
