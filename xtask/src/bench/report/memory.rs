//! The report's part on the agent's memory (`memory.rs`): the issue 12 target (through
//! the Kubernetes source) and the table of both sources.

use std::fmt::Write as _;

use serde_json::Value;

use super::{Verdict, count, f, of, u};

/// Rows of the memory stage read from `source`; rows of runs before the Kubernetes
/// source was measured name none and were read from manifests.
pub fn rows<'a>(results: &'a [Value], source: &str) -> Vec<&'a Value> {
    let mut rows: Vec<&Value> = of(results, "agent_memory")
        .filter(|r| r["source"].as_str().unwrap_or("manifests") == source)
        .collect();
    rows.sort_by_key(|r| u(&r["pods"]));
    rows
}

/// Peak RSS per cluster pod above the source's smallest cluster (the baseline), in
/// bytes; `None` for the baseline itself.
fn above_baseline(row: &Value, baseline: &Value) -> Option<f64> {
    let pods = f(&row["pods"]) - f(&baseline["pods"]);
    (pods > 0.0).then(|| (f(&row["vm_hwm_kib"]) - f(&baseline["vm_hwm_kib"])) * 1024.0 / pods)
}

/// Issue 12: agent RSS ≤ 1 KiB per cluster pod above a 1k-pod baseline at 100k pods,
/// through the Kubernetes source.
pub fn target(results: &[Value]) -> Verdict {
    let target = "agent RSS ≤ 1 KiB per cluster pod above a 1k-pod baseline at 100k pods (Kubernetes source)";
    let rows = rows(results, "kubernetes");
    let (Some(baseline), Some(largest)) = (rows.first(), rows.last()) else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: String::new(),
        };
    };
    let Some(per_pod) = above_baseline(largest, baseline) else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: "only one cluster size was measured".into(),
        };
    };
    let at_100k = u(&largest["pods"]) >= 100_000;
    Verdict {
        target,
        measured: format!(
            "{per_pod:.0} B per cluster pod at {} (peak {:.1} MiB; {:.1} MiB at {})",
            count(u(&largest["pods"])),
            f(&largest["vm_hwm_kib"]) / 1024.0,
            f(&baseline["vm_hwm_kib"]) / 1024.0,
            count(u(&baseline["pods"])),
        ),
        met: at_100k.then_some(per_pod <= 1024.0),
        note: if at_100k {
            format!(
                "{}What grows with the cluster is the snapshot (a pod's keys, names, uid, \
                 addresses and named ports; label maps are shared by the replicas of a \
                 deployment), the compile's per-address identity table, and the kernel \
                 image's copy of it. Before trimmed reads and shared labels: 3573 B.",
                if per_pod <= 1024.0 {
                    String::new()
                } else {
                    format!("Over by {:.1}×. ", per_pod / 1024.0)
                }
            )
        } else {
            "not judged: the 100k-pod cluster is not measured in `--quick`".into()
        },
    }
}

pub fn table(out: &mut String, results: &[Value]) {
    let sources = [
        ("kubernetes", "Kubernetes source"),
        ("manifests", "manifests"),
    ];
    if sources
        .iter()
        .all(|(source, _)| rows(results, source).is_empty())
    {
        return;
    }
    out.push_str(
        "### Agent memory\n\n`egret run` in a node namespace whose 100 local pods exist \
         (namespaces and veths), until its first full sync is programmed and its pods attached, \
         plus 2 s, reading the generated cluster two ways: through the Kubernetes source \
         (`--kubeconfig`) from the testbed's list/watch API server, which serves the objects as \
         a cluster does (uid, managedFields, owner references, a kubelet's status: about 2.8 KiB \
         of JSON per pod) in pages of the client's size and holds the watches open; and from a \
         manifest directory holding the cluster as one YAML file. Peak RSS is `VmHWM` from \
         `/proc/<pid>/status`; *above baseline* is its growth per cluster pod over the 1k-pod \
         cluster read the same way. Map memory is the sum of `memlock` over the BPF maps the \
         agent holds (`/proc/<pid>/fdinfo`; the kernel's own accounting, preallocated hash maps \
         at their full capacity).\n\n\
         | source | cluster pods | policies | read | peak RSS | above baseline, per cluster pod | RSS after sync | BPF map memory | start to first sync |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (source, name) in sources {
        let rows = rows(results, source);
        let Some(baseline) = rows.first() else {
            continue;
        };
        for r in &rows {
            let maps = r["maps_by_type"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {:.1}", f(&v["bytes"]) / 1_048_576.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            // Raw results of earlier runs name the manifest's size only.
            let read = if r["input_bytes"].is_null() {
                &r["manifest_bytes"]
            } else {
                &r["input_bytes"]
            };
            let above = above_baseline(r, baseline)
                .map_or_else(|| "(baseline)".to_owned(), |bytes| format!("{bytes:.0} B"));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {:.1} MiB | {:.1} MiB | {above} | {:.1} MiB | {:.1} MiB ({maps}) | {:.1} s |",
                count(u(&r["pods"])),
                count(u(&r["policies"])),
                f(read) / 1_048_576.0,
                f(&r["vm_hwm_kib"]) / 1024.0,
                f(&r["vm_rss_kib"]) / 1024.0,
                f(&r["map_memlock_bytes"]) / 1_048_576.0,
                f(&r["ready_s"]),
            );
        }
    }
    out.push_str(
        "\n*Read* is the JSON of every object served (Kubernetes source) or the manifest file's \
         size. Before issue 12 item 5 (commit d84bb3f, this machine, `cargo xtask bench --stage \
         memory`), peak RSS was 39.8 / 82.8 / 377.1 MiB at 1k / 10k / 100k pods through the \
         Kubernetes source (3573 B per cluster pod above the 1k baseline; first sync at 100k \
         after 47.0 s) and 25.5 / 58.9 / 316.2 MiB through manifests (3079 B): every served \
         object was decoded whole before it was trimmed, every pod held its own label map, and \
         each compile cloned one per peer pod.\n\n",
    );
}
