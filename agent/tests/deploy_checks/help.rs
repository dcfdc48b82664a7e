//! What the binary accepts, read from its own `--help`.

use std::{collections::BTreeMap, process::Command};

use super::AGENT;

#[derive(Debug, Default)]
pub struct FlagHelp {
    pub takes_value: bool,
    pub possible_values: Vec<String>,
    pub default: Option<String>,
    pub env: Option<String>,
}

#[derive(Debug)]
pub struct Help {
    pub flags: BTreeMap<String, FlagHelp>,
    /// Flags the usage line requires.
    pub required: Vec<String>,
}

pub fn help(subcommand: &str) -> Help {
    let output = Command::new(AGENT)
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(output.status.success(), "egret {subcommand} --help failed");
    parse_help(&String::from_utf8(output.stdout).unwrap())
}

/// Reads clap's long help: option lines (indented at most 6 columns) and the
/// `[default: …]`, `[env: …]` and possible values that follow each.
pub fn parse_help(text: &str) -> Help {
    let mut flags: BTreeMap<String, FlagHelp> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_possible_values = false;
    let mut required = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(usage) = line.strip_prefix("Usage:") {
            required = usage
                .split_whitespace()
                .filter(|token| token.starts_with("--"))
                .map(str::to_owned)
                .collect();
            continue;
        }
        if indent <= 6 && trimmed.starts_with('-') {
            let long = trimmed
                .find("--")
                .map(|at| &trimmed[at..])
                .unwrap_or_default();
            let name: String = long
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.insert(
                name.clone(),
                FlagHelp {
                    takes_value: trimmed.contains('<'),
                    ..FlagHelp::default()
                },
            );
            current = Some(name);
            in_possible_values = false;
            continue;
        }
        let Some(flag) = current.as_ref().and_then(|name| flags.get_mut(name)) else {
            continue;
        };
        if let Some(value) = bracketed(trimmed, "[default: ") {
            flag.default = Some(value.to_owned());
        } else if let Some(value) = bracketed(trimmed, "[env: ") {
            flag.env = Some(
                value
                    .trim_end_matches('=')
                    .split('=')
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        } else if let Some(values) = bracketed(trimmed, "[possible values: ") {
            flag.possible_values = values.split(", ").map(str::to_owned).collect();
        } else if trimmed == "Possible values:" {
            in_possible_values = true;
        } else if in_possible_values && let Some(item) = trimmed.strip_prefix("- ") {
            let value = item.split(':').next().unwrap().trim();
            flag.possible_values.push(value.to_owned());
        }
    }
    Help { flags, required }
}

pub fn bracketed<'a>(line: &'a str, opening: &str) -> Option<&'a str> {
    line.strip_prefix(opening)?.strip_suffix(']')
}
