//! `BENCHMARKS.md` from the benchmarks' JSON lines: the targets of issues 8 and 11
//! against what was measured, then every table, each with its method.

use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use serde_json::Value;

use super::Summary;

mod agent_latency;
mod dns;
mod memory;

pub struct Context {
    pub command: String,
    /// When the run ended, as `date -u` prints it.
    pub date: String,
    pub machine: String,
    pub elapsed: Duration,
    pub load_before: String,
    pub load_after: String,
    pub quick: bool,
}

impl Context {
    /// The `"bench": "run"` line that opens the raw results.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "bench": "run",
            "command": self.command,
            "date": self.date,
            "machine": self.machine,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "load_before": self.load_before,
            "load_after": self.load_after,
            "quick": self.quick,
        })
    }

    pub fn from_json(run: &Value) -> Self {
        let text = |key: &str| run[key].as_str().unwrap_or("?").to_owned();
        Self {
            command: text("command"),
            date: text("date"),
            machine: text("machine"),
            elapsed: Duration::try_from_secs_f64(f(&run["elapsed_s"])).unwrap_or_default(),
            load_before: text("load_before"),
            load_after: text("load_after"),
            quick: run["quick"].as_bool().unwrap_or(false),
        }
    }

    /// For raw results that do not say how they were made.
    pub fn unknown(raw: &std::path::Path) -> Self {
        Self {
            command: format!(
                "cargo xtask bench --report-only --results {}",
                raw.display()
            ),
            date: "an unknown date".into(),
            machine: "unknown".into(),
            elapsed: Duration::ZERO,
            load_before: "?".into(),
            load_after: "?".into(),
            quick: false,
        }
    }
}

/// Results of one kind (`"bench"` field).
fn of<'a>(results: &'a [Value], bench: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let bench = bench.to_owned();
    results.iter().filter(move |r| r["bench"] == bench.as_str())
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn u(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// "1k", "100k", "1M" for table sizes.
fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// "262,144".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Thousands as "152.3k", millions as "1.25M".
fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn ns_range(r: &Value) -> String {
    format!(
        "{:.0} [{:.0}–{:.0}]",
        f(&r["median_ns"]),
        f(&r["min_ns"]),
        f(&r["max_ns"])
    )
}

pub fn render(context: &Context, results: &[Value]) -> String {
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Written by `{}` on {}, in {:.1} minutes. Machine: {}. Load average before / after: {} / {} \
         (anything else running on the machine shifts every figure; each is the median of repeated \
         runs, with the range `[min–max]`).\n",
        context.command,
        context.date,
        context.elapsed.as_secs_f64() / 60.0,
        context.machine,
        context.load_before,
        context.load_after,
    );
    if context.quick {
        out.push_str(
            "This is the `--quick` variant: fewer sizes and repeats, no 1M-entry tables, no \
             100k-pod cluster and no 10/100k-rule throughput. Targets it cannot judge say so.\n\n",
        );
    }
    out.push_str(
        "Reproduce: `cargo xtask bench` (about 10 minutes) or `cargo xtask bench --quick` (about \
         2), as root. The library benchmarks also run alone: `cargo bench -p egret --bench \
         compile|datapath|control_plane [-- --quick]`. Raw results: \
         `target/bench-results.jsonl`. Benchmarks never run in `cargo xtask test`.\n\n",
    );
    let failures: Vec<&Value> = of(results, "failure").collect();
    if !failures.is_empty() {
        out.push_str("## Failed stages\n\n");
        for failure in failures {
            let _ = writeln!(
                out,
                "- **{}**: `{}`",
                failure["stage"].as_str().unwrap_or("?"),
                failure["error"].as_str().unwrap_or("?").replace('\n', " ")
            );
        }
        out.push('\n');
    }
    targets(&mut out, results);
    packet_costs(&mut out, results);
    paths(&mut out, results);
    conntrack_pressure(&mut out, results);
    dns::table(&mut out, results);
    throughput(&mut out, results);
    control_plane(&mut out, results);
    out
}

// ---------------------------------------------------------------------------------
// Targets

struct Verdict {
    target: &'static str,
    measured: String,
    met: Option<bool>,
    note: String,
}

fn targets(out: &mut String, results: &[Value]) {
    out.push_str("## Targets\n\n");
    let groups = [
        (
            "Issue 11, datapath v2 (ratios to the empty program measured in the same run)",
            vec![
                established_target(results),
                not_isolated_target(results),
                new_flow_target(results),
                established_growth_target(results),
            ],
        ),
        (
            "Issue 8, tables at scale",
            vec![
                packet_target(results),
                pps_target(results),
                alternatives_target(results),
                latency_target(results),
                compile_target(results),
                memory_target(results),
            ],
        ),
        ("Issue 12, control plane at scale", {
            let mut verdicts = agent_latency::targets(results);
            verdicts.push(compile_target_within(results, 0.3));
            verdicts.push(memory::target(results));
            verdicts.push(ip_block_programming_target(results));
            verdicts.push(pps_target(results));
            verdicts.push(alternatives_target(results));
            verdicts
        }),
    ];
    for (title, verdicts) in groups {
        let _ = writeln!(
            out,
            "### {title}\n\n| target | measured | met | by how much, and what limits it |\n|---|---|---|---|"
        );
        for v in verdicts {
            let met = match v.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {met} | {} |",
                v.target, v.measured, v.note
            );
        }
        out.push('\n');
    }
}

fn not_measured(target: &'static str, note: &str) -> Verdict {
    Verdict {
        target,
        measured: "—".into(),
        met: None,
        note: note.into(),
    }
}

/// "" when `ratio` is within `limit`, else how far over, to open a note.
fn over(ratio: f64, limit: f64) -> String {
    if ratio <= limit {
        String::new()
    } else {
        format!(
            "Over by {:.0}% ({ratio:.2}× against {limit}×). ",
            (ratio / limit - 1.0) * 100.0
        )
    }
}

/// Median ns of the empty program on one layout of the per-packet grid, in one mode.
fn noop_median(results: &[Value], entries: u64, local_pods: u64, mode: &str) -> Option<f64> {
    of(results, "packet")
        .find(|r| {
            r["program"] == "noop"
                && u(&r["entries"]) == entries
                && u(&r["local_pods"]) == local_pods
                && r["mode"] == mode
        })
        .map(|r| f(&r["median_ns"]))
}

/// A cell of the per-packet grid against the empty program on its layout, same mode.
struct ToNoop {
    ratio: f64,
    ns: f64,
    noop: f64,
    entries: u64,
    local_pods: u64,
    family: String,
}

impl ToNoop {
    fn show(&self) -> String {
        format!(
            "{:.2}× ({} entries, {} local pod(s), {}: {:.0} vs {:.0} ns)",
            self.ratio,
            count(self.entries),
            self.local_pods,
            self.family,
            self.ns,
            self.noop
        )
    }
}

/// The `case` cell in `mode` with the largest ratio to the empty program, among all
/// layouts or those of `entries`.
fn worst_to_noop(
    results: &[Value],
    case: &str,
    mode: &str,
    entries: Option<u64>,
) -> Option<ToNoop> {
    let mut worst: Option<ToNoop> = None;
    for r in of(results, "packet").filter(|r| {
        r["program"] == "from_pod"
            && r["case"] == case
            && r["mode"] == mode
            && entries.is_none_or(|e| u(&r["entries"]) == e)
    }) {
        let (size, local) = (u(&r["entries"]), u(&r["local_pods"]));
        let Some(noop) = noop_median(results, size, local, mode) else {
            continue;
        };
        let ns = f(&r["median_ns"]);
        if worst.as_ref().is_none_or(|w| ns / noop > w.ratio) {
            worst = Some(ToNoop {
                ratio: ns / noop,
                ns,
                noop,
                entries: size,
                local_pods: local,
                family: r["family"].as_str().unwrap_or("?").to_owned(),
            });
        }
    }
    worst
}

/// Where a path's time goes, from the fixed-cost rows: the empty program, the work
/// every packet does before its endpoint's rules, and the rest, which is `what`.
fn breakdown(results: &[Value], path: &str, what: &str) -> String {
    let (Some(noop), Some(fixed), Some(total)) = (
        path_median(results, "noop program"),
        path_median(results, "unknown interface, allowed"),
        path_median(results, path),
    ) else {
        return String::new();
    };
    format!(
        "Of the {total:.0} ns of *{path}* (see *Where the time goes*), {noop:.0} are the empty \
         program's, {:.0} the work every packet does (endpoint lookup, settings, parsing, the \
         clock and the counter: the *unknown interface* path) and {:.0} {what}.",
        fixed - noop,
        total - fixed,
    )
}

fn established_target(results: &[Value]) -> Verdict {
    let target = "established packet of an isolated pod ≤ 3× the empty program";
    let (Some(warm), Some(cycling)) = (
        worst_to_noop(results, "established", "warm", None),
        worst_to_noop(results, "established", "cycling", None),
    ) else {
        return not_measured(target, "");
    };
    let worst = warm.ratio.max(cycling.ratio);
    let path = "isolated, established flow (ACK)";
    let fixed = path_median(results, path)
        .zip(path_median(results, "noop program"))
        .map_or_else(String::new, |(p, n)| {
            format!("; fixed-cost run (1k entries, IPv4): {:.2}×", p / n)
        });
    let cold = packet_median(
        results,
        cycling.entries,
        cycling.local_pods,
        &cycling.family,
        "established",
        "warm",
    )
    .map_or_else(String::new, |warm_ns| {
        format!(
            " On the worst cycling layout, 4,096 flows in turn cost {:.0} ns more than one warm \
             flow, against {:.0} ns more for the empty program: the rest is the program's own \
             lookups finding colder lines.",
            cycling.ns - warm_ns,
            cycling.noop
                - noop_median(results, cycling.entries, cycling.local_pods, "warm")
                    .unwrap_or(f64::NAN),
        )
    });
    Verdict {
        target,
        measured: format!(
            "warm: worst {}; cycling: worst {}{fixed}",
            warm.show(),
            cycling.show()
        ),
        met: Some(worst <= 3.0),
        note: format!(
            "{}{}{cold}",
            over(worst, 3.0),
            breakdown(
                results,
                path,
                "the conntrack lookup (one, in the established table) and the cached verdict"
            ),
        ),
    }
}

fn not_isolated_target(results: &[Value]) -> Verdict {
    let target = "packet of a non-isolated pod ≤ 3× the empty program";
    let established = "not isolated, established flow (ACK)";
    let untracked = "not isolated, untracked (RST)";
    let (Some(noop), Some(e), Some(t)) = (
        path_median(results, "noop program"),
        path_median(results, established),
        path_median(results, untracked),
    ) else {
        return not_measured(target, "");
    };
    let worst = (e / noop).max(t / noop);
    let (path, what) = if t >= e {
        (
            untracked,
            "the two conntrack lookups that miss (established table, then unassured) and the \
             allowing verdict",
        )
    } else {
        (established, "the conntrack lookup and the allowing verdict")
    };
    Verdict {
        target,
        measured: format!(
            "established flow (ACK) {:.2}× ({e:.0} ns); untracked RST {:.2}× ({t:.0} ns); empty \
             program {noop:.0} ns (1k entries, one local pod, IPv4, warm)",
            e / noop,
            t / noop
        ),
        met: Some(worst <= 3.0),
        note: format!("{}{}", over(worst, 3.0), breakdown(results, path, what)),
    }
}

fn new_flow_target(results: &[Value]) -> Verdict {
    let target = "new flow (SYN) at 100k entries ≤ 8× the empty program";
    let Some(worst) = worst_to_noop(results, "new_flow", "single", Some(100_000)) else {
        return not_measured(target, "");
    };
    let hit = packet_median(
        results,
        worst.entries,
        worst.local_pods,
        &worst.family,
        "hit",
        "single",
    );
    let small = packet_median(
        results,
        10,
        worst.local_pods,
        &worst.family,
        "hit",
        "single",
    );
    let limits = hit.map_or_else(String::new, |hit| {
        format!(
            "On that layout, of the {:.0} ns: {:.0} the empty program run once the same way, \
             {:.0} the untracked packet's work (parsing, endpoint, two conntrack misses, the \
             identity, CIDR and policy lookups: the *hit* RST run once{}) and {:.0} opening the \
             flow (the insert into the unassured table, its counter).",
            worst.ns,
            worst.noop,
            hit - worst.noop,
            small.map_or_else(String::new, |small| format!(
                ", of which {:.0} ns is the tables' size: the same RST costs {small:.0} ns at 10 \
                 entries",
                hit - small
            )),
            worst.ns - hit,
        )
    });
    let others: Vec<String> = of(results, "packet")
        .filter(|r| r["case"] == "new_flow" && r["mode"] == "single" && u(&r["entries"]) == 100_000)
        .filter_map(|r| {
            let local = u(&r["local_pods"]);
            let noop = noop_median(results, 100_000, local, "single")?;
            Some(format!(
                "{:.1}× ({local} local pod(s), {})",
                f(&r["median_ns"]) / noop,
                r["family"].as_str().unwrap_or("?")
            ))
        })
        .collect();
    Verdict {
        target,
        measured: format!(
            "worst {}; each SYN opens a flow and runs once, against the empty program run once. \
             All at 100k: {}",
            worst.show(),
            others.join(", ")
        ),
        met: Some(worst.ratio <= 8.0),
        note: format!("{}{limits}", over(worst.ratio, 8.0)),
    }
}

fn established_growth_target(results: &[Value]) -> Verdict {
    let target = "established-flow cost at 1M entries ÷ at 10 ≤ 1.2";
    let growth = |entries| {
        ["warm", "cycling"].map(|mode| worst_growth(results, entries, mode, &["established"]))
    };
    let show = |g: &Option<(f64, String, f64, f64)>| {
        g.as_ref().map_or_else(
            || "—".into(),
            |(ratio, cell, small, big)| format!("{ratio:.2}× ({cell}, {small:.0} → {big:.0} ns)"),
        )
    };
    let [warm, cycling] = growth(1_000_000);
    let (Some(w), Some(c)) = (&warm, &cycling) else {
        let [warm, cycling] = growth(100_000);
        return Verdict {
            target,
            measured: format!(
                "at 100k instead: warm worst {}; cycling worst {}",
                show(&warm),
                show(&cycling)
            ),
            met: None,
            note: "not measured: this run has no 1M-entry tables (`--quick`)".into(),
        };
    };
    let worst = w.0.max(c.0);
    Verdict {
        target,
        measured: format!(
            "warm: worst {}; cycling: worst {}",
            show(&warm),
            show(&cycling)
        ),
        met: Some(worst <= 1.2),
        note: if worst <= 1.2 {
            "An established packet reads no policy table: its verdict is cached in its flow.".into()
        } else {
            format!(
                "{}An established packet reads no policy table (its verdict is cached), and the \
                 endpoint and conntrack maps it reads hold the same entries in every layout; \
                 what differs is the larger policy maps' footprint in the caches (not measured \
                 apart).",
                over(worst, 1.2)
            )
        },
    }
}

/// Median ns of `from_pod` for one cell.
fn packet_median(
    results: &[Value],
    entries: u64,
    local_pods: u64,
    family: &str,
    case: &str,
    mode: &str,
) -> Option<f64> {
    of(results, "packet")
        .find(|r| {
            r["program"] == "from_pod"
                && u(&r["entries"]) == entries
                && u(&r["local_pods"]) == local_pods
                && r["family"] == family
                && r["case"] == case
                && r["mode"] == mode
        })
        .map(|r| f(&r["median_ns"]))
}

fn path_median(results: &[Value], path: &str) -> Option<f64> {
    of(results, "path")
        .find(|r| r["path"] == path)
        .map(|r| f(&r["median_ns"]))
}

/// The largest ratio of cost at `entries` to cost at 10 among the `mode` cells of
/// `cases`, and which cell it is, with that cell's two medians.
fn worst_growth(
    results: &[Value],
    entries: u64,
    mode: &str,
    cases: &[&str],
) -> Option<(f64, String, f64, f64)> {
    let mut worst: Option<(f64, String, f64, f64)> = None;
    for r in of(results, "packet").filter(|r| {
        r["program"] == "from_pod"
            && u(&r["entries"]) == entries
            && r["mode"] == mode
            && cases.iter().any(|c| r["case"] == *c)
    }) {
        let (Some(family), Some(case)) = (r["family"].as_str(), r["case"].as_str()) else {
            continue;
        };
        let local = u(&r["local_pods"]);
        if let Some(small) = packet_median(results, 10, local, family, case, mode) {
            let big = f(&r["median_ns"]);
            if worst.as_ref().is_none_or(|w| big / small > w.0) {
                worst = Some((
                    big / small,
                    format!("{family} {case}, {local} local pod(s)"),
                    small,
                    big,
                ));
            }
        }
    }
    worst
}

fn packet_target(results: &[Value]) -> Verdict {
    let target = "per-packet cost at 100k entries ≤ 1.2× the cost at 10 (untracked packets: \
                  the policy lookup)";
    let warm = worst_growth(results, 100_000, "warm", &["hit", "miss"]);
    let cycling = worst_growth(results, 100_000, "cycling", &["hit", "miss"]);
    let (Some(warm), Some(cycling)) = (warm, cycling) else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: String::new(),
        };
    };
    let fixed = path_median(results, "unknown interface, allowed");
    let noop = path_median(results, "noop program");
    let judge = |ratio: f64| {
        if ratio <= 1.2 {
            "met".to_owned()
        } else {
            format!("over by {:.0}%", (ratio / 1.2 - 1.0) * 100.0)
        }
    };
    Verdict {
        target,
        measured: format!(
            "warm caches: worst {:.2}× ({}); cycling destinations: worst {:.2}× ({}, {:.0} → {:.0} ns)",
            warm.0, warm.1, cycling.0, cycling.1, cycling.2, cycling.3
        ),
        met: Some(warm.0 <= 1.2 && cycling.0 <= 1.2),
        note: format!(
            "Warm: {}; cycling: {}. With warm caches the tables barely show, because the fixed \
             work dominates (endpoint lookup, parsing and the counter alone: {} ns, an empty \
             program {} ns; see *Where the time goes*). When destinations change, the walk down \
             the identity hash and the LPM tries misses the cache: that is the growth, largest \
             on allowed packets, which take two trie lookups.",
            judge(warm.0),
            judge(cycling.0),
            fixed.map_or_else(|| "?".into(), |x| format!("{x:.0}")),
            noop.map_or_else(|| "?".into(), |x| format!("{x:.0}")),
        ),
    }
}

/// A filter's throughput with it on, and without it in the runs just before.
struct Paired {
    on: Summary,
    off: Summary,
}

impl Paired {
    fn ratio(&self) -> f64 {
        self.on.median() / self.off.median()
    }
}

fn samples(row: &Value, key: &str) -> Vec<f64> {
    row[key]
        .as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default()
}

/// `metric` is `udp_pps` or `tcp_gbps`.
fn paired(results: &[Value], filter: &str, rules: u64, metric: &str) -> Option<Paired> {
    let row =
        of(results, "throughput").find(|r| r["filter"] == filter && u(&r["rules"]) == rules)?;
    Some(Paired {
        on: Summary::of(samples(row, metric))?,
        off: Summary::of(samples(row, &format!("{metric}_off")))?,
    })
}

fn pps_target(results: &[Value]) -> Verdict {
    let target = "Egret UDP pps ≥ 97% of no filter at 1k rules";
    let Some(egret) = paired(results, "egret", 1_000, "udp_pps") else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: String::new(),
        };
    };
    let ratio = egret.ratio();
    let none = egret.off.median();
    let allowed = path_median(results, "isolated, established flow (ACK)");
    let received = path_median(results, "to_pod, established flow (peer's ACK)");
    let agent_cores = of(results, "throughput")
        .find(|r| r["filter"] == "egret" && u(&r["rules"]) == 1_000)
        .and_then(|r| Summary::of(samples(r, "agent_cpu_cores")))
        .map_or(f64::NAN, |s| s.median());
    let explanation = match (allowed, received) {
        (Some(a), Some(r)) => format!(
            "{}Each forwarded datagram of the tracked flow runs `egret_from_pod` on the \
             client's veth (a packet of an established flow in `BPF_PROG_TEST_RUN`: {a:.0} ns, \
             one conntrack lookup, the cached verdict, counter) and `egret_to_pod` on the \
             server's ({r:.0} ns): {:.0}% of the {:.1} µs per packet of \
             the whole path without a filter (iperf3's send included), which alone would give \
             {:.0}%. That fixed per-packet work, not the rule count, is the first limit. The \
             rest of the gap is not in the programs' own timing: the agent used {agent_cores:.2} \
             of the 2 cores during these runs, and the real path probably runs the programs \
             with colder caches than `BPF_PROG_TEST_RUN` does (not verified).",
            if ratio >= 0.97 {
                String::new()
            } else {
                format!("Short by {:.1} points. ", (0.97 - ratio) * 100.0)
            },
            (a + r) / (1e9 / none) * 100.0,
            1e6 / none,
            (1e9 / none) / (1e9 / none + a + r) * 100.0,
        ),
        _ => String::new(),
    };
    Verdict {
        target,
        measured: format!(
            "{:.1}% ({} vs {} pps)",
            ratio * 100.0,
            rate(egret.on.median()),
            rate(none)
        ),
        met: Some(ratio >= 0.97),
        note: explanation,
    }
}

/// Why a filter has no runs at `rules`, if it gave up.
fn gave_up<'a>(results: &'a [Value], filter: &str, rules: u64) -> Option<&'a str> {
    of(results, "throughput").find(|r| r["filter"] == filter && u(&r["rules"]) == rules)?["gave_up"]
        .as_str()
}

fn alternatives_target(results: &[Value]) -> Verdict {
    let target = "Egret UDP pps above iptables+ipset and nftables at 100k rules";
    let ratio = |filter| paired(results, filter, 100_000, "udp_pps").map(|p| p.ratio());
    if let Some(reason) = gave_up(results, "egret", 100_000) {
        return Verdict {
            target,
            measured: format!(
                "Egret not measured: {reason}; iptables+ipset {}, nftables {} of no filter",
                ratio("iptables+ipset").map_or_else(|| "—".into(), |r| format!("{r:.2}")),
                ratio("nftables").map_or_else(|| "—".into(), |r| format!("{r:.2}")),
            ),
            met: Some(false),
            note: "The agent was still compiling and programming the 100k ipBlock rules when \
                   the time ran out: before packets, the control plane limits Egret here \
                   (see the switch-on times under *Throughput*)."
                .into(),
        };
    }
    let (Some(e), Some(i), Some(n)) = (ratio("egret"), ratio("iptables+ipset"), ratio("nftables"))
    else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: "not measured: `--quick` runs only 1k rules".into(),
        };
    };
    let met = e > i && e > n;
    Verdict {
        target,
        measured: format!(
            "Egret ÷ ipset {:.2}×, Egret ÷ nftables {:.2}× (each filter's ratio to its own \
             no-filter runs)",
            e / i,
            e / n
        ),
        met: Some(met),
        note: if met {
            String::new()
        } else {
            format!(
                "Behind the best alternative by {:.0}%. Egret's agent itself used {:.2} of the 2 \
                 cores during these runs, competing with the traffic, on top of the programs' \
                 per-packet work on two interfaces (see the 1k row); ipset's `hash:net,port` \
                 probes one hash per distinct prefix length (two here) whatever the entry count.",
                (1.0 - e / i.max(n)) * 100.0,
                of(results, "throughput")
                    .find(|r| r["filter"] == "egret" && u(&r["rules"]) == 100_000)
                    .and_then(|r| Summary::of(samples(r, "agent_cpu_cores")))
                    .map_or(f64::NAN, |s| s.median()),
            )
        },
    }
}

fn latency_target(results: &[Value]) -> Verdict {
    let target = "one change in the kernel ≤ 50 ms p99 at 10k pods";
    let rows: Vec<&Value> = of(results, "change_latency")
        .filter(|r| u(&r["pods"]) == 10_000)
        .collect();
    let Some(worst) = rows
        .iter()
        .max_by(|a, b| f(&a["p99_ms"]).total_cmp(&f(&b["p99_ms"])))
    else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: String::new(),
        };
    };
    let p99 = f(&worst["p99_ms"]);
    let compile = f(&worst["compile_median_ms"]);
    let full = f(&worst["full_compile_median_ms"]);
    let total = f(&worst["p50_ms"]);
    Verdict {
        target,
        measured: format!(
            "worst p99 {p99:.0} ms ({}); p50 {total:.0} ms",
            worst["change"].as_str().unwrap_or("?")
        ),
        met: Some(p99 <= 50.0),
        note: format!(
            "{}Measured through the library (snapshot → incremental compile → image → apply), not \
             the agent's event-to-kernel histogram (issue 12's rows). The compile of what changed \
             is {compile:.1} ms of the {total:.1} ms median (the whole snapshot would take \
             {full:.0} ms); the map writes are 1–2 entries.",
            if p99 <= 50.0 {
                String::new()
            } else {
                format!("Over by {:.0} ms ({:.1}×). ", p99 - 50.0, p99 / 50.0)
            }
        ),
    }
}

fn compile_target(results: &[Value]) -> Verdict {
    compile_target_within(results, 1.0)
}

/// Issue 8 asked for the 100k × 10k full compile within 1 s, issue 12 within 0.3 s.
fn compile_target_within(results: &[Value], bound: f64) -> Verdict {
    let target = if bound < 1.0 {
        "full compile of 100k pods × 10k policies ≤ 0.3 s"
    } else {
        "full compile of 100k pods × 10k policies ≤ 1 s"
    };
    match of(results, "compile_full").find(|r| u(&r["pods"]) == 100_000) {
        Some(r) => {
            let median = f(&r["median_s"]);
            Verdict {
                target,
                measured: format!(
                    "{median:.2} s [{:.2}–{:.2}]",
                    f(&r["min_s"]),
                    f(&r["max_s"])
                ),
                met: Some(median <= bound),
                note: if median <= bound {
                    format!("{:.0}% of headroom.", (bound - median) / bound * 100.0)
                } else {
                    format!("Over by {:.0}%.", (median - bound) / bound * 100.0)
                },
            }
        }
        None => Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: "the 100k-pod cluster is not compiled in `--quick`".into(),
        },
    }
}

/// A 100k-CIDR policy programmed: the throughput stage's agent start to both pods'
/// interfaces attached with their tables in, at 100k rules (one policy of 100k
/// `ipBlock`s), less the same at 10 rules (program load and attach, which every start
/// pays whatever the policy).
fn ip_block_programming_target(results: &[Value]) -> Verdict {
    let target = "a 100k-CIDR policy programmed in ≤ 2 s";
    let enable = |rules: u64| {
        of(results, "throughput")
            .find(|r| r["filter"] == "egret" && u(&r["rules"]) == rules)
            .and_then(|r| Summary::of(samples(r, "enable_s")))
            .map(|s| s.median())
    };
    let (Some(large), Some(small)) = (enable(100_000), enable(10)) else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: "not measured: `--quick` runs only 1k rules".into(),
        };
    };
    let programmed = large - small;
    Verdict {
        target,
        measured: format!(
            "{programmed:.2} s (agent start to enforcing: {large:.2} s at 100k rules, {small:.2} s at 10)"
        ),
        met: Some(programmed <= 2.0),
        note: "From the throughput stage's start-up times (*Throughput through a node*), each the \
               median of its runs; the difference is what the 100k ipBlocks add: reading the \
               manifest, compiling (see *Full compile*, huge ipBlock lists) and writing the \
               entries."
            .into(),
    }
}

fn memory_target(results: &[Value]) -> Verdict {
    let target = "≤ 1 KiB agent memory per cluster pod (10k and 100k pods; manifests)";
    let rows = memory::rows(results, "manifests");
    let judged: Vec<&&Value> = rows.iter().filter(|r| u(&r["pods"]) >= 10_000).collect();
    let (Some(smallest), false) = (rows.first(), judged.is_empty()) else {
        return Verdict {
            target,
            measured: "—".into(),
            met: None,
            note: String::new(),
        };
    };
    let per_pod = |r: &Value| f(&r["vm_hwm_kib"]) * 1024.0 / f(&r["pods"]);
    let marginal = |r: &Value| {
        (f(&r["vm_hwm_kib"]) - f(&smallest["vm_hwm_kib"])) * 1024.0
            / (f(&r["pods"]) - f(&smallest["pods"]))
    };
    let measured = judged
        .iter()
        .map(|r| {
            format!(
                "{:.0} B/pod at {} ({:.0} B/pod above the {}-pod cluster)",
                per_pod(r),
                count(u(&r["pods"])),
                marginal(r),
                count(u(&smallest["pods"]))
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let worst = judged.iter().map(|r| per_pod(r)).fold(0.0, f64::max);
    Verdict {
        target,
        measured: format!("peak RSS {measured}"),
        met: Some(worst <= 1024.0),
        note: format!(
            "{}The agent peaks at {:.0} MiB on a {}-pod cluster: that part does not grow with \
             the cluster. What grows is the snapshot, the compile and the kernel image's copy of \
             the tables, and while a document is read its text and value; the kernel's maps are \
             apart (see *Agent memory*, and issue 12's target through the Kubernetes source).",
            if worst <= 1024.0 {
                String::new()
            } else {
                format!("Over by {:.1}×. ", worst / 1024.0)
            },
            f(&smallest["vm_hwm_kib"]) / 1024.0,
            count(u(&smallest["pods"])),
        ),
    }
}

// ---------------------------------------------------------------------------------
// Per-packet cost

fn packet_costs(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "packet").collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "## Per-packet cost (`BPF_PROG_TEST_RUN`, ns per packet)\n\n\
         The real `egret_from_pod` program on 54-byte (IPv4) or 74-byte (IPv6) TCP segments, as \
         the kernel times them. Tables of N entries: N pod addresses in the identity map (dual-stack \
         pods, ten per identity), N prefixes in the CIDR trie (/24 and /64) and N entries in \
         the policy trie, spread over the local pods; the maps are sized to N, the conntrack tables \
         to their defaults (the unassured one doubled, so new flows never evict). A packet of a \
         tracked flow skips the policy lookup, so each kind is measured with frames that mean \
         the same on every run:\n\n\
         - *hit*: a RST to a pod the policy allows. A RST never opens a flow, so every run is an \
         untracked packet: both conntrack tables miss, then the identity and policy lookups \
         (the CIDR trie misses): the whole policy lookup.\n\
         - *miss*: a RST to an address no table holds: conntrack, identity and CIDR miss; \
         denied and counted (beyond the default budget of 100 a second, no event).\n\
         - *established*: an ACK of a connection opened through both programs first (the pod's \
         SYN through `egret_from_pod`, the server's SYN-ACK through `egret_to_pod`, the pod's \
         ACK): one lookup in the established table, then the verdict cached with the policy \
         epoch.\n\
         - *new flow*: a SYN from a source port never used before, so every run opens a flow: \
         both conntrack tables miss, the policy lookup, then an insert into the unassured \
         table.\n\n\
         Each cell is `median [min–max]`, then its ratio to the empty program measured on the \
         same layout in the same mode and rounds. Every layout is loaded at once and every \
         round measures all of them, so drift hits all sizes alike.\n\n",
    );
    for (mode, about) in [
        (
            "warm",
            "one frame run 10–20k times per measurement: caches warm",
        ),
        (
            "cycling",
            "4,096 frames in turn, each run 8 times (*hit*: the allowed destinations, up to \
             4,096, as few as 5 at 10 entries; *miss*: 4,096 unknown destinations; \
             *established*: 4,096 connections over the allowed destinations): the lookups walk \
             cold cache lines. The figure is the mean over the frames",
        ),
        (
            "single",
            "4,096 frames in turn, each run once, as a new flow's SYN is: between two runs the \
             `BPF_PROG_TEST_RUN` syscall builds a fresh packet, so caches are colder still and \
             the empty program costs more than warm. *New flow* is measured only this way; \
             *hit* and *established* beside it show what opening the flow adds",
        ),
    ] {
        packet_table(out, results, &rows, mode, about);
    }
}

/// One mode's table of the per-packet grid: sizes across, a row per local-pod count,
/// family and kind of packet.
fn packet_table(out: &mut String, results: &[Value], rows: &[&Value], mode: &str, about: &str) {
    let sizes: BTreeSet<u64> = rows.iter().map(|r| u(&r["entries"])).collect();
    let locals: BTreeSet<u64> = rows.iter().map(|r| u(&r["local_pods"])).collect();
    let cases: Vec<&str> = ["hit", "miss", "established", "new_flow"]
        .into_iter()
        .filter(|case| rows.iter().any(|r| r["case"] == *case && r["mode"] == mode))
        .collect();
    if cases.is_empty() {
        return;
    }
    let _ = writeln!(out, "### {mode}: {about}\n");
    out.push_str("| local pods | family | packet |");
    for size in &sizes {
        let _ = write!(out, " {} entries |", count(*size));
    }
    let ratio_sizes: Vec<u64> = sizes.iter().copied().filter(|s| *s >= 100_000).collect();
    for size in &ratio_sizes {
        let _ = write!(out, " {} ÷ 10 |", count(*size));
    }
    out.push_str("\n|---|---|---|");
    for _ in sizes.iter().chain(&ratio_sizes) {
        out.push_str("---|");
    }
    out.push('\n');
    for local in &locals {
        let _ = write!(out, "| {local} | ipv4 | empty program (floor) |");
        for size in &sizes {
            let cell = rows.iter().find(|r| {
                r["program"] == "noop"
                    && u(&r["entries"]) == *size
                    && u(&r["local_pods"]) == *local
                    && r["mode"] == mode
            });
            let _ = write!(
                out,
                " {} |",
                cell.map_or_else(|| "—".into(), |r| ns_range(r))
            );
        }
        for _ in 0..ratio_sizes.len() {
            out.push_str(" |");
        }
        out.push('\n');
        for family in ["ipv4", "ipv6"] {
            for case in &cases {
                let _ = write!(out, "| {local} | {family} | {} |", case.replace('_', " "));
                for size in &sizes {
                    let cell = rows.iter().find(|r| {
                        r["program"] == "from_pod"
                            && u(&r["entries"]) == *size
                            && u(&r["local_pods"]) == *local
                            && r["family"] == family
                            && r["case"] == *case
                            && r["mode"] == mode
                    });
                    let shown = cell.map_or_else(
                        || "—".into(),
                        |r| {
                            let ratio = noop_median(results, *size, *local, mode)
                                .map_or_else(String::new, |noop| {
                                    format!(", {:.1}×", f(&r["median_ns"]) / noop)
                                });
                            format!("{}{ratio}", ns_range(r))
                        },
                    );
                    let _ = write!(out, " {shown} |");
                }
                for size in &ratio_sizes {
                    let ratio = packet_median(results, *size, *local, family, case, mode)
                        .zip(packet_median(results, 10, *local, family, case, mode))
                        .map_or_else(|| "—".into(), |(big, small)| format!("{:.2}×", big / small));
                    let _ = write!(out, " {ratio} |");
                }
                out.push('\n');
            }
        }
    }
    out.push('\n');
}

/// What a path of the fixed-cost run measures.
fn path_about(path: &str) -> &'static str {
    match path {
        "noop program" => "an empty program: the floor, the test run's own overhead included",
        "unknown interface, allowed" => {
            "no endpoint at the interface: the endpoint lookup, settings, parsing, the clock and \
             the counter, the work every packet does"
        }
        "not isolated, established flow (ACK)" => {
            "a pod no policy isolates, a packet of its established connection: one conntrack \
             lookup, allowed"
        }
        "not isolated, untracked (RST)" => {
            "the same pod's RST, which opens no flow: both conntrack tables miss, allowed"
        }
        "spoofed source, denied" => "a source address not the pod's: denied before conntrack",
        "isolated, established flow (ACK)" => {
            "an isolated pod's established connection: one lookup in the established table, the \
             verdict cached with the policy epoch"
        }
        "isolated, unassured flow (its SYN again)" => {
            "a connection awaiting its SYN-ACK: the established table misses, the unassured one \
             hits, the cached verdict"
        }
        "isolated, allowed, untracked (RST)" => {
            "a RST to the allowed server, which opens no flow: both conntrack tables miss, then \
             the identity, CIDR and policy lookups"
        }
        "related ICMP error (port unreachable)" => {
            "the pod's port unreachable about a datagram it received: the quoted header read, \
             its flow found in conntrack, allowed as related"
        }
        "later fragment of an allowed packet" => {
            "a non-first fragment whose first fragment was allowed: one lookup in the fragment \
             table"
        }
        "to_pod, established flow (peer's ACK)" => {
            "`egret_to_pod` on the server's ACK of the established connection: one conntrack \
             lookup"
        }
        "isolated, denied; events off" => {
            "a SYN to an unknown address: conntrack, identity and CIDR miss, denied and counted; \
             no event (budget 0)"
        }
        "isolated, denied; 100 events/s" => "the same, at the default event budget",
        "isolated, denied; every denial an event" => "the same, every denial an event",
        _ => "",
    }
}

fn paths(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "path").collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "## Where the time goes, and the cost of counters and events\n\n\
         `egret_from_pod` (and `egret_to_pod` once) along each of its paths (1k entries, one \
         local pod, IPv4, warm), alternating within each round. The flows the tracked paths \
         need are opened once beforehand through the programs themselves. Between paths the \
         pod's endpoint entry changes (isolated, not isolated, absent), which moves the policy \
         epoch: a tracked flow's first packet after that is judged again, once in 10–20k runs. \
         Counters are always on: every path below, except the empty program and \
         `egret_to_pod`, updates one per-CPU counter. Flow events are compared on the same denied \
         packet with `Settings.events_per_second` 0 (off), 100 (the default: after 100 events a \
         second the budget check refuses, and the denial is counted as a lost event), and \
         unlimited with a reader draining the ring buffer on the other CPU (every denial \
         reserves, fills and submits an event; its cost depends on how the reader keeps up, \
         hence the wide range).\n\n\
         | path | what it measures | ns per packet | events lost / packets |\n|---|---|---|---|\n",
    );
    for r in rows {
        let path = r["path"].as_str().unwrap_or("?");
        let _ = writeln!(
            out,
            "| {path} | {} | {} | {} / {} |",
            path_about(path),
            ns_range(r),
            u(&r["events_lost"]),
            u(&r["packets"])
        );
    }
    let off = path_median(results, "isolated, denied; events off");
    let default = path_median(results, "isolated, denied; 100 events/s");
    let every = path_median(results, "isolated, denied; every denial an event");
    if let (Some(off), Some(default), Some(every)) = (off, default, every) {
        let _ = writeln!(
            out,
            "\nEvents at the default budget cost {:+.0} ns per denied packet against events off \
             ({:+.0}%); reporting every denial costs {:+.0} ns ({:+.0}%). Even with events off a \
             denial is counted in `EVENTS_LOST_V1` (the budget of 0 refuses it).\n",
            default - off,
            (default / off - 1.0) * 100.0,
            every - off,
            (every / off - 1.0) * 100.0,
        );
    }
}

fn conntrack_pressure(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "conntrack_pressure").collect();
    let find = |tables: &str, mode: &str| {
        rows.iter()
            .find(|r| r["tables"] == tables && r["mode"] == mode)
            .copied()
    };
    let (Some(empty), Some(full)) = (find("empty", "warm"), find("full", "warm")) else {
        return;
    };
    let _ = writeln!(
        out,
        "## Conntrack under pressure\n\n\
         An established connection's ACK (1k entries, one local pod, IPv4) with both conntrack \
         tables at their default capacities ({} established, {} unassured) nearly full, against \
         the same nearly empty, alternating in the same rounds. *Full*: {} established flows \
         written the way the agent seeds them from the kernel's conntrack, the 4,096 measured \
         connections opened through both programs, then {} SYNs of the pod to allowed servers, \
         left unanswered (they stay in the unassured table). *Empty*: the 4,096 measured \
         connections only. Modes as in the per-packet tables: one flow run 10–20k times \
         (warm); the 4,096 flows in turn, 8 runs each (cycling) or once each (single).\n\n\
         | mode | empty tables | full tables | full ÷ empty |\n|---|---|---|---|",
        thousands(u(&full["established_capacity"])),
        thousands(u(&full["unassured_capacity"])),
        thousands(u(&full["seeded_established"])),
        thousands(u(&full["unanswered_syns"])),
    );
    for mode in ["warm", "cycling", "single"] {
        let (Some(e), Some(fl)) = (find("empty", mode), find("full", mode)) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {mode} | {} | {} | {:.2}× |",
            ns_range(e),
            ns_range(fl),
            f(&fl["median_ns"]) / f(&e["median_ns"]),
        );
    }
    let tables = |r: &Value| {
        format!(
            "{} established and {} unassured entries, {} and {} evicted, {} failed inserts",
            thousands(u(&r["established_entries"])),
            thousands(u(&r["unassured_entries"])),
            u(&r["evicted_established"]),
            u(&r["evicted_unassured"]),
            u(&r["insert_failures"]),
        )
    };
    let _ = writeln!(
        out,
        "\nAt the end of the run: empty tables {}; full tables {}.\n",
        tables(empty),
        tables(full),
    );
}

// ---------------------------------------------------------------------------------
// Throughput

fn throughput(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "throughput").collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "## Throughput through a node (pod → node → pod)\n\n\
         Two pods behind a forwarding node namespace (veth pairs, routed like Calico). The allow \
         list holds the measured flow (server address, TCP and UDP port 5201) plus N other \
         entries (one in ten a /24, the rest /32s, TCP/UDP ports 1000–4999). *Egret*: one \
         NetworkPolicy of N+2 ipBlock rules selecting the client, the agent enforcing (programs \
         on both pods' veths). *iptables+ipset*: `-A FORWARD -i <client veth> -m set ! \
         --match-set allow dst,dst -j DROP` with a `hash:net,port` set (iptables-nft backend). \
         *nftables*: `iifname <client veth> ip daddr . meta l4proto . th dport != @allow drop` \
         with an interval set. Every packet is judged (no conntrack shortcut anywhere). UDP: \
         iperf3 `-u -b 0 -l 64`, packets the node forwarded into the server's veth per second. \
         TCP: iperf3 receiver throughput. Client on CPU 0, server on CPU 1; forwarding runs in \
         the sender's softirq. iptables and nftables are switched on and off around every \
         repeat (their sets stay loaded): one run without, one with. Egret's agent starts once, \
         after Egret's runs without it, because a large allow list takes long to compile; its \
         CPU use during its runs is reported below the tables. Before any run with a filter, it \
         must drop a port it does not list. A ratio is the filter's median over the median of \
         its own no-filter runs; Egret ÷ X divides those ratios.\n\n",
    );
    let sizes: BTreeSet<u64> = rows.iter().map(|r| u(&r["rules"])).collect();
    for (metric, unit, show) in [
        (
            "udp_pps",
            "UDP 64-byte datagrams, packets/s",
            rate as fn(f64) -> String,
        ),
        (
            "tcp_gbps",
            "TCP, Gbit/s",
            (|x: f64| format!("{x:.2}")) as fn(f64) -> String,
        ),
    ] {
        let all_off: Vec<f64> = rows
            .iter()
            .flat_map(|r| samples(r, &format!("{metric}_off")))
            .collect();
        let Some(base) = Summary::of(all_off) else {
            continue;
        };
        let _ = writeln!(
            out,
            "### {unit}\n\nNo filter, all runs: {} [{}–{}], {} runs.\n",
            show(base.median()),
            show(base.min()),
            show(base.max()),
            base.sorted.len()
        );
        out.push_str(
            "| rules | Egret | iptables+ipset | nftables | Egret ÷ ipset | Egret ÷ nftables |\n|---|---|---|---|---|---|\n",
        );
        for size in &sizes {
            let cell = |filter| paired(results, filter, *size, metric);
            let (egret, ipset, nft) = (cell("egret"), cell("iptables+ipset"), cell("nftables"));
            let show_cell = |p: &Option<Paired>| {
                p.as_ref().map_or_else(
                    || "—".into(),
                    |p| {
                        format!(
                            "**{:.2}**: {} [{}–{}] vs {}",
                            p.ratio(),
                            show(p.on.median()),
                            show(p.on.min()),
                            show(p.on.max()),
                            show(p.off.median()),
                        )
                    },
                )
            };
            let versus = |other: &Option<Paired>| {
                egret.as_ref().zip(other.as_ref()).map_or_else(
                    || "—".into(),
                    |(e, o)| format!("{:.2}×", e.ratio() / o.ratio()),
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                count(*size),
                gave_up(results, "egret", *size).map_or_else(|| show_cell(&egret), str::to_owned),
                show_cell(&ipset),
                show_cell(&nft),
                versus(&ipset),
                versus(&nft)
            );
        }
        out.push_str("\n(**ratio to no filter**: with the filter, median [range] vs without it, median.)\n\n");
    }
    switch_times(out, &rows);
}

/// How long each filter took to switch on.
fn switch_times(out: &mut String, rows: &[&Value]) {
    let setups: Vec<String> = rows
        .iter()
        .map(|r| {
            let time = Summary::of(samples(r, "enable_s"))
                .map_or_else(|| "gave up".to_owned(), |s| format!("{:.2} s", s.median()));
            format!(
                "{} at {}: {time}",
                r["filter"].as_str().unwrap_or("?"),
                count(u(&r["rules"])),
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "Time to switch a filter on (Egret: agent start to both interfaces attached, tables \
         programmed; iptables and nftables: the rule, with the set already loaded): {}.\n",
        setups.join("; ")
    );
    let agent_cpu: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let cores = Summary::of(samples(r, "agent_cpu_cores"))?;
            Some(format!(
                "{:.2} at {}",
                cores.median(),
                count(u(&r["rules"]))
            ))
        })
        .collect();
    if !agent_cpu.is_empty() {
        let _ = writeln!(
            out,
            "CPU cores Egret's agent itself used while its runs went on (out of 2; it competes \
             with the traffic): {}.\n",
            agent_cpu.join("; ")
        );
    }
}

// ---------------------------------------------------------------------------------
// Control plane

fn control_plane(out: &mut String, results: &[Value]) {
    out.push_str("## Control plane\n\n");
    compile_table(out, results);
    latency_table(out, results);
    agent_latency::table(out, results);
    programming_table(out, results);
    memory::table(out, results);
}

fn compile_table(out: &mut String, results: &[Value]) {
    out.push_str(
        "### Full compile\n\nGenerated clusters (`egret_testbed::cluster`): deployments of 10 \
         pods sharing labels, 10 per namespace; policies mix deployment-to-deployment rules on a \
         named port, tier-to-team-namespaces rules with a port range, ipBlocks with an except \
         plus DNS, and namespace default-deny. 100 pods on the measured node. `compile` runs on \
         the whole snapshot, read through the manifest loader beforehand.\n\n\
         | cluster pods | policies | runs | median | range | table entries | loading the YAML |\n|---|---|---|---|---|---|---|\n",
    );
    for r in of(results, "compile_full") {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} s | {:.3}–{:.3} s | {} | {:.1} s |",
            count(u(&r["pods"])),
            count(u(&r["policies"])),
            u(&r["runs"]),
            f(&r["median_s"]),
            f(&r["min_s"]),
            f(&r["max_s"]),
            u(&r["table_entries"]),
            f(&r["load_s"]),
        );
    }
    out.push('\n');
}

fn latency_table(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "change_latency").collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "### One change to the kernel, through the library\n\nThe changed object goes into the \
         snapshot, then the incremental compiler is told what changed (as the agent's reconcile \
         is), `KernelImage::build`, and `Datapath::apply` (diff plus map writes) on real pinned \
         maps. Watch delivery and the agent's debounce are not included (the agent's own \
         event-to-kernel histogram, below, covers those). *Full compile* is the whole snapshot \
         compiled from scratch, timed beside each step and not part of the total; every step \
         checks that both give the same tables. *policy edit*: a policy selecting a local pod \
         gains or loses a port; *pod join/leave*: a replica of an existing deployment appears \
         or goes on another node.\n\n\
         | cluster pods | policies | change | runs | p50 | p99 | range | incremental compile (median) | full compile (median) | build | apply | entries written |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1}–{:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            count(u(&r["pods"])),
            count(u(&r["policies"])),
            r["change"].as_str().unwrap_or("?").replace('_', " "),
            u(&r["runs"]),
            f(&r["p50_ms"]),
            f(&r["p99_ms"]),
            f(&r["min_ms"]),
            f(&r["max_ms"]),
            f(&r["compile_median_ms"]),
            f(&r["full_compile_median_ms"]),
            f(&r["build_median_ms"]),
            f(&r["apply_median_ms"]),
            f(&r["entries_median"]),
        );
    }
    if let Some(r) = of(results, "initial_sync").next() {
        let _ = writeln!(
            out,
            "\nFirst full sync of the same cluster into empty maps: compile {:.0} ms, build {:.1} ms, \
             apply {:.0} ms for {} entries.",
            f(&r["compile_s"]) * 1e3,
            f(&r["build_s"]) * 1e3,
            f(&r["apply_s"]) * 1e3,
            u(&r["entries_written"]),
        );
    }
    out.push('\n');
}

fn programming_table(out: &mut String, results: &[Value]) {
    let rows: Vec<&Value> = of(results, "programming").collect();
    if rows.is_empty() {
        return;
    }
    out.push_str(
        "### Map programming rate (`Datapath::apply`)\n\nEntries per second through \
         `Datapath::apply` (diff included), one map at a time, 100k entries, from empty maps; \
         each step differs from the last in one map.\n\n\
         | map | operation | entries/s | range |\n|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {}–{} |",
            r["map"].as_str().unwrap_or("?"),
            r["operation"].as_str().unwrap_or("?"),
            rate(f(&r["median_per_s"])),
            rate(f(&r["min_per_s"])),
            rate(f(&r["max_per_s"])),
        );
    }
    let loads: Vec<String> = of(results, "table_load")
        .filter(|r| u(&r["written"]) >= 100_000)
        .map(|r| {
            format!(
                "{} entries × 3 maps, {} local pod(s): {} in {:.2} s ({}/s)",
                count(u(&r["entries"])),
                u(&r["local_pods"]),
                u(&r["written"]),
                f(&r["apply_s"]),
                rate(f(&r["entries_per_s"]))
            )
        })
        .collect();
    if !loads.is_empty() {
        let _ = writeln!(
            out,
            "\nWhole-table loads of the per-packet benchmark (all three maps in one apply): {}.",
            loads.join("; ")
        );
    }
    out.push('\n');
}
