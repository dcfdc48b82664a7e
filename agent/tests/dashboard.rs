//! The Grafana dashboard (`deploy/grafana/egret-dashboard.json`) against what the agent
//! exposes: every metric a panel or template variable queries must be one the agent
//! serves on `/metrics`, and the file must be a dashboard Grafana imports.
//!
//! What the agent exposes is read from the agent itself, without root: a
//! [`Metrics`] registry encoded as Prometheus text, with one series created in each
//! labelled family (an empty family is not encoded at all). The kernel's counters
//! appear there only once pinned maps hold data, so they are listed by hand below.
//! Label names are checked too: a matcher or grouping on a label no metric of the query
//! has is an empty panel.
//!
//! Then the real thing (`dashboard/prometheus.rs`, privileged): Debian's Prometheus
//! scrapes a real agent while pods send traffic, and every query of the dashboard must
//! return the series its panel plots.

mod common;
#[path = "dashboard/prometheus.rs"]
mod prometheus;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use egret::observe::{KindLabels, MapLabels, Metrics, StateLabels, flows::DeniedFlowLabels};
use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/egret-dashboard.json";

/// The kernel's per-pod counters (`observe/kernel.rs`, `KernelCounters`), read from the
/// pinned counter map at each scrape: with no agent running they have no descriptor,
/// so they are not in the encoded registry. Full names, with the registry prefix.
const KERNEL_FAMILIES: [(&str, &str, &[&str]); 2] = [
    ("egret_egress_packets", "counter", &KERNEL_LABELS),
    ("egret_egress_bytes", "counter", &KERNEL_LABELS),
];
/// `PacketLabels` in `observe/kernel.rs`.
const KERNEL_LABELS: [&str; 4] = ["namespace", "pod", "verdict", "reason"];

/// Labels Prometheus itself gives every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Grafana's own variables, valid in any query.
const GRAFANA_VARIABLES: [&str; 4] = ["__rate_interval", "__interval", "__range", "__range_s"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the agent crate lives one level below the workspace root")
        .to_path_buf()
}

fn dashboard() -> Value {
    let path = repo().join(DASHBOARD);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().unwrap_or("(untitled)")
}

/// A query the dashboard runs.
#[derive(Clone, Debug)]
struct Query {
    /// `panel "Title"` or `variable "name"`.
    place: String,
    expr: String,
    /// The panel's `legendFormat` (`{{namespace}}/{{pod}}`); empty for variables.
    legend: String,
    /// The label a `label_values(…, label)` variable lists.
    variable_label: Option<String>,
}

/// Every query the dashboard runs: panel targets and variable queries.
fn queries(dashboard: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?}: a target without expr", title(panel)));
            queries.push(Query {
                place: format!("panel {:?}", title(panel)),
                expr: expr.to_owned(),
                legend: target["legendFormat"].as_str().unwrap_or("").to_owned(),
                variable_label: None,
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_default();
        // `label_values(METRIC_SELECTOR, label)`: the selector is PromQL, the label is not.
        let split = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.rsplit_once(','));
        queries.push(Query {
            place: format!("variable {:?}", variable["name"].as_str().unwrap_or("")),
            expr: split.map_or(query, |(selector, _)| selector).to_owned(),
            legend: String::new(),
            variable_label: split.map(|(_, label)| label.trim_end_matches(')').trim().to_owned()),
        });
    }
    queries
}

/// The agent's registry with one series in each labelled family: prometheus-client
/// writes nothing, not even `# TYPE`, for a family without series, and the agent only
/// creates them as it runs. A family added to [`Metrics`] and used on the dashboard
/// fails the test until it gets a series here.
fn populated_metrics() -> Metrics {
    let metrics = Metrics::new(PathBuf::from("/nonexistent/egret-dashboard-test"));
    let state = StateLabels {
        state: "enforced".to_owned(),
    };
    metrics.endpoints.get_or_create(&state).set(1);
    let map = MapLabels {
        map: "POLICY_V3".to_owned(),
    };
    metrics.map_entries.get_or_create(&map).set(1);
    metrics.map_capacity.get_or_create(&map).set(2);
    let kind = KindLabels {
        kind: "Pod".to_owned(),
    };
    metrics.watch_restarts.get_or_create(&kind).inc();
    let policy_kind = KindLabels {
        kind: "ClusterNetworkPolicy".to_owned(),
    };
    metrics.policies.get_or_create(&policy_kind).set(1);
    let denied = DeniedFlowLabels {
        namespace: "shop".to_owned(),
        pod: "web".to_owned(),
        policy_set: "shop/default-deny".to_owned(),
        tier: "networkpolicy".to_owned(),
    };
    metrics.denied_flows.get_or_create(&denied).inc();
    metrics
}

/// The sample names the agent serves, each with its label names: families from the
/// `# TYPE` lines of the encoded registry plus the kernel families (a counter's
/// samples end in `_total`, a histogram's in `_bucket`, `_sum` and `_count`), labels
/// from the samples.
fn exposed() -> BTreeMap<String, BTreeSet<String>> {
    let text = populated_metrics().encode();
    let mut families: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect();
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in text.lines().filter(|line| !line.starts_with('#')) {
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        let names = labels.entry(sample[..name_end].to_owned()).or_default();
        if sample[name_end..].starts_with('{') {
            let chars: Vec<char> = sample[name_end..].chars().collect();
            names.extend(matcher_labels(&chars, 0).0);
        }
    }
    for (name, kind, kernel_labels) in KERNEL_FAMILIES {
        families.insert(name.to_owned(), kind.to_owned());
        labels.insert(format!("{name}_total"), set(kernel_labels));
    }
    assert!(
        families.len() > 10,
        "the encoded registry has its families:\n{text}"
    );
    let mut samples = BTreeMap::new();
    for (name, kind) in families {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for suffix in suffixes {
            let sample = format!("{name}{suffix}");
            let names = labels.get(&sample).cloned().unwrap_or_default();
            samples.insert(sample, names);
        }
    }
    samples
}

/// Query-language words that are not metric names when not followed by `(`.
const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
/// Modifiers followed by a parenthesised list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// What a Prometheus query reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reads {
    /// Metric names, each with the label names its matchers use.
    selectors: BTreeMap<String, BTreeSet<String>>,
    /// Label names in `by`, `without`, `on`, `ignoring` and `group_*` lists.
    grouping: BTreeSet<String>,
}

/// The metrics a Prometheus query selects: identifiers outside label matchers,
/// strings, ranges and grouping lists that are neither functions or aggregations
/// (followed by `(`, `by` or `without`) nor keywords.
fn reads(expr: &str) -> Reads {
    let chars: Vec<char> = expr.chars().collect();
    let mut reads = Reads::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = matcher_labels(&chars, i).1,
            '[' => i = skip_until(&chars, i, ']'),
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if is_identifier_start(c) => {
                let (word, end) = identifier(&chars, i);
                i = end;
                let next = skip_whitespace(&chars, i);
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    if chars.get(next) == Some(&'(') {
                        let (labels, end) = label_list(&chars, next);
                        reads.grouping.extend(labels);
                        i = end;
                    }
                    continue;
                }
                let is_call = chars.get(next) == Some(&'(')
                    || chars.get(next).copied().is_some_and(is_identifier_start)
                        && matches!(identifier(&chars, next).0.as_str(), "by" | "without");
                if is_call || KEYWORDS.contains(&lower.as_str()) {
                    continue;
                }
                let labels = reads.selectors.entry(word).or_default();
                if chars.get(next) == Some(&'{') {
                    let (matched, end) = matcher_labels(&chars, next);
                    labels.extend(matched);
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
    reads
}

fn is_identifier_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

/// The identifier starting at `start`, and the index just past it.
fn identifier(chars: &[char], start: usize) -> (String, usize) {
    let mut i = start;
    while i < chars.len()
        && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
    {
        i += 1;
    }
    (chars[start..i].iter().collect(), i)
}

fn skip_whitespace(chars: &[char], start: usize) -> usize {
    let mut i = start;
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The label names of the matchers (or sample labels) in the `{…}` opening at `start`,
/// and the index just past it.
fn matcher_labels(chars: &[char], start: usize) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '}' => return (labels, i + 1),
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if is_identifier_start(c) => {
                let (label, end) = identifier(chars, i);
                labels.push(label);
                i = end;
            }
            _ => i += 1,
        }
    }
    (labels, i)
}

/// The label names in the `(…)` opening at `start`, and the index just past it.
fn label_list(chars: &[char], start: usize) -> (Vec<String>, usize) {
    let end = skip_until(chars, start, ')');
    let inner: String = chars[start + 1..end.saturating_sub(1).max(start + 1)]
        .iter()
        .collect();
    let labels = inner
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    (labels, end)
}

/// The index just past the string literal opening at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index just past the `close` that ends the group opening at `start`, stepping over
/// string literals (a label value may hold `}` or `)`).
fn skip_until(chars: &[char], start: usize, close: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == close => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn the_query_reader_finds_selected_metrics_and_their_labels() {
    let expr = r#"histogram_quantile(0.99, sum by (le) (rate(egret_a_bucket{x=~"a|}b", y="$pod"}[$__rate_interval]))) / ignoring(map) group_left(le) egret_b > bool 0.5e3 and on() vector(1) offset 5m or sum without (z) (egret_c)"#;
    assert_eq!(
        reads(expr),
        Reads {
            selectors: BTreeMap::from([
                ("egret_a_bucket".to_owned(), set(&["x", "y"])),
                ("egret_b".to_owned(), set(&[])),
                ("egret_c".to_owned(), set(&[])),
            ]),
            grouping: set(&["le", "map", "z"]),
        }
    );
}

#[test]
fn every_metric_on_the_dashboard_is_one_the_agent_exposes() {
    let exposed = exposed();
    let dashboard = dashboard();
    let queries = queries(&dashboard);
    assert!(!queries.is_empty(), "the dashboard runs queries");
    let mut used = BTreeSet::new();
    for Query { place, expr, .. } in &queries {
        let reads = reads(expr);
        assert!(
            !reads.selectors.is_empty(),
            "{place}: no metric in {expr:?}"
        );
        let mut available: BTreeSet<String> = set(&TARGET_LABELS);
        for (name, matched) in &reads.selectors {
            let labels = exposed.get(name).unwrap_or_else(|| {
                panic!(
                    "{place}: {name} is not a metric the agent exposes (in {expr:?});\n\
                     the agent exposes: {:#?}",
                    exposed.keys()
                )
            });
            for label in matched {
                assert!(
                    labels.contains(label) || TARGET_LABELS.contains(&label.as_str()),
                    "{place}: {name} has no label {label:?} (it has {labels:?})"
                );
            }
            available.extend(labels.iter().cloned());
            used.insert(name.clone());
        }
        for label in &reads.grouping {
            assert!(
                available.contains(label),
                "{place}: groups by {label:?}, which none of its metrics has (in {expr:?})"
            );
        }
    }
    // The panels the dashboard exists for.
    for needed in [
        "egret_egress_packets_total",
        "egret_egress_bytes_total",
        "egret_denied_flows_total",
        "egret_programming_latency_seconds_bucket",
        "egret_map_entries",
        "egret_map_capacity",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
}

#[test]
fn the_kernel_families_listed_here_are_the_ones_the_collector_writes() {
    // A rename in observe/kernel.rs must show up here, since no root-free scrape can.
    let source = std::fs::read_to_string(repo().join("agent/src/observe/kernel.rs"))
        .expect("reading agent/src/observe/kernel.rs");
    for (name, _, _) in KERNEL_FAMILIES {
        let unprefixed = name.strip_prefix("egret_").expect("the registry prefix");
        assert!(
            source.contains(&format!("\"{unprefixed}\"")),
            "observe/kernel.rs no longer writes {unprefixed:?}: update KERNEL_FAMILIES"
        );
    }
    for label in KERNEL_LABELS {
        assert!(
            source.contains(&format!("    {label}: ")),
            "observe/kernel.rs: PacketLabels has no {label:?}: update KERNEL_LABELS"
        );
    }
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let dashboard = dashboard();
    for field in ["title", "uid"] {
        let value = dashboard[field].as_str().unwrap_or_default();
        assert!(!value.is_empty(), "a non-empty {field}");
    }
    let uid = dashboard["uid"].as_str().unwrap_or_default();
    assert!(
        uid.len() <= 40 && uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "Grafana uids are at most 40 of [A-Za-z0-9-]: {uid:?}"
    );
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "a Grafana 10 schema version"
    );
    assert!(
        dashboard["id"].is_null(),
        "no instance id: import assigns one"
    );

    // The data source is an import-time input, referenced as ${DS_PROMETHEUS}.
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS input of type prometheus"
    );

    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    for (name, from) in [("namespace", "namespace"), ("pod", "pod")] {
        let variable = variables
            .get(name)
            .unwrap_or_else(|| panic!("a {name} variable"));
        let query = variable["query"]["query"].as_str().unwrap_or_default();
        assert!(
            query.starts_with("label_values(egret_egress_packets_total")
                && query.ends_with(&format!(", {from})")),
            "{name}: label_values(egret_egress_packets_total…, {from}), not {query:?}"
        );
    }

    let mut ids = BTreeSet::new();
    let panels = panels(&dashboard);
    assert!(panels.len() > 5, "panels");
    for panel in panels {
        let title = title(panel);
        assert!(!title.is_empty(), "every panel has a title");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?}: an id"));
        assert!(ids.insert(id), "panel {title:?}: id {id} is unique");
        let grid = &panel["gridPos"];
        let (x, w, h) = (grid["x"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
        assert!(
            matches!((x, w, h), (Some(x), Some(w), Some(h)) if w > 0 && h > 0 && x + w <= 24)
                && grid["y"].is_u64(),
            "panel {title:?}: gridPos within the 24-column grid: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert!(panel["type"].is_string(), "panel {title:?}: a type");
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?}: the imported data source"
        );
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("panel {title:?}: targets"));
        let mut refs = BTreeSet::new();
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.is_empty(),
                "panel {title:?}: every target has an expr"
            );
            let ref_id = target["refId"].as_str().unwrap_or_default();
            assert!(
                !ref_id.is_empty() && refs.insert(ref_id),
                "panel {title:?}: refIds present and unique"
            );
            assert_eq!(
                target["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {title:?}: targets use the imported data source"
            );
            for variable in variables_in(expr) {
                assert!(
                    variables.contains_key(variable.as_str())
                        || GRAFANA_VARIABLES.contains(&variable.as_str()),
                    "panel {title:?}: ${variable} is not a dashboard variable"
                );
            }
        }
    }
}

/// `$name` references in a query.
fn variables_in(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}
