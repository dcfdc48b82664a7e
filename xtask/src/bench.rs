//! `cargo xtask bench`: runs the benchmarks and writes `BENCHMARKS.md` with the command,
//! the machine and the figures. Never part of `cargo xtask test`.

use std::{fmt::Write as _, process::Command};

use anyhow::Context as _;

use crate::{cargo, workspace_root};

pub fn run(quick: bool) -> anyhow::Result<()> {
    let mut report = String::from("# Benchmarks\n\n");
    let command = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(report, "Written by `{command}`. Machine: {}.\n", machine());

    let compile = compile_bench(quick)?;
    report.push_str("## Control plane: full compile\n\n");
    report.push_str(
        "Generated clusters: deployments of 10 pods sharing labels, 10 per namespace; policies \
         mix deployment-to-deployment rules on a named port, tier-to-team-namespaces rules with a \
         port range, ipBlocks with an except plus DNS, and namespace default-deny. 100 pods on \
         the measured node. `compile` runs on the whole snapshot (target: 100k pods x 10k \
         policies in at most 1 s).\n\n",
    );
    report.push_str("| cluster pods | policies | runs | median | min | max | table entries |\n|---|---|---|---|---|---|---|\n");
    for row in &compile {
        let _ = writeln!(
            report,
            "| {} | {} | {} | {:.3} s | {:.3} s | {:.3} s | {} |",
            row["pods"],
            row["policies"],
            row["runs"],
            row["median_s"].as_f64().unwrap_or(f64::NAN),
            row["min_s"].as_f64().unwrap_or(f64::NAN),
            row["max_s"].as_f64().unwrap_or(f64::NAN),
            row["table_entries"]
        );
    }
    let path = workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!("{report}\nwritten to {}", path.display());
    Ok(())
}

fn compile_bench(quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut command = cargo();
    command.args(["bench", "--package", "egret", "--bench", "compile", "--"]);
    if quick {
        command.arg("--quick");
    }
    let output = command.output().context("running the compile benchmark")?;
    anyhow::ensure!(
        output.status.success(),
        "compile benchmark failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).context("benchmark output"))
        .collect()
}

fn machine() -> String {
    let kernel = Command::new("uname")
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
    format!(
        "{cpus} CPUs ({model}), kernel {}",
        kernel.unwrap_or_default()
    )
}
