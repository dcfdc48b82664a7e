//! The report's part on `domainNames` (`agent/benches/dns.rs`): what reading a DNS
//! answer adds to the to-pod program, and that other packets of a pod with domain rules
//! pay nothing measurable.

use std::fmt::Write as _;

use serde_json::Value;

use super::{f, ns_range, of};

/// The row of `case` with or without domain rules.
fn row<'a>(results: &'a [Value], case: &str, domain_rules: bool) -> Option<&'a Value> {
    of(results, "dns").find(|r| r["case"] == case && r["domain_rules"] == domain_rules)
}

/// What each case costs with and without domain rules, and the difference.
pub fn table(out: &mut String, results: &[Value]) {
    let cases: Vec<&str> = of(results, "dns").filter_map(|r| r["case"].as_str()).fold(
        Vec::new(),
        |mut cases, case| {
            if !cases.contains(&case) {
                cases.push(case);
            }
            cases
        },
    );
    if cases.is_empty() {
        return;
    }
    out.push_str(
        "## What domain rules cost per packet\n\n\
         `BPF_PROG_TEST_RUN` of the same frame to (or from) one pod whose \
         ClusterNetworkPolicy names `api.example.test` and `*.svc.example.test`, with the \
         endpoint's domain flag set (the pod has domain rules) and cleared (the same tables, \
         no domain rules), alternating within each round (warm, one frame run many times). \
         *answer*: a DNS reply over UDP for `api.example.test`, a CNAME to \
         `api.edge.cdn.test` and four A records for it, compressed as resolvers write them \
         (the to-pod program copies it, walks it under `bpf_loop` and refreshes four learnt \
         addresses). *answer, no name matches*: the same shape for another name (walked, \
         nothing learnt). *other UDP*: a datagram of the answer's size from port 443 (never \
         read). *untracked TCP*: a RST from the pod to an address nothing allows (the whole \
         policy lookup; with domain rules it includes the look-up among learnt addresses). \
         *established TCP*: an ACK of a connection the pod opened (the tracker's cached \
         verdict).\n\n\
         | case | program | without domain rules (ns) | with (ns) | added |\n|---|---|---|---|---|\n",
    );
    for case in cases {
        let (Some(without), Some(with)) = (row(results, case, false), row(results, case, true))
        else {
            continue;
        };
        let (base, cost) = (f(&without["median_ns"]), f(&with["median_ns"]));
        let _ = writeln!(
            out,
            "| {case} | {} | {} | {} | {:+.0} ns ({:+.0}%) |",
            with["program"].as_str().unwrap_or("?"),
            ns_range(without),
            ns_range(with),
            cost - base,
            (cost / base - 1.0) * 100.0
        );
    }
    out.push('\n');
}
