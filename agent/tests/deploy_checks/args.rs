//! The flags a container passes, checked against the binary's `--help`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Container};

use super::{
    help::{FlagHelp, Help},
    objects::{Object, named},
};

/// Flags the agent is gaining. The chart passes them only for non-default values, so a
/// default install never does; a render that sets those values may use them before
/// `egret run --help` lists them.
pub const PENDING_FLAGS: [&str; 3] = ["--attach", "--flow-log", "--flow-log-allowed"];

/// Environment variables the agent reads besides its flags' own.
const AGENT_ENV: [&str; 1] = ["RUST_LOG"];

/// The flags a container passes, with `$(VAR)` resolved.
#[derive(Debug, Default)]
pub struct Passed {
    pub values: BTreeMap<String, Option<String>>,
    /// Flags from `PENDING_FLAGS` that the binary does not accept yet.
    pub pending: Vec<String>,
}

/// Checks every flag of `args` against `help`, resolving `$(VAR)` the way the kubelet
/// does (from `env` and the `ConfigMaps` of `envFrom`).
pub fn check_args(
    objects: &[Object],
    container: &Container,
    subcommand: &str,
    help: &Help,
) -> Passed {
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(
        container.command, None,
        "the image's entrypoint (egret) runs"
    );
    assert_eq!(args.first().map(String::as_str), Some(subcommand));
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let mut config_keys: BTreeSet<String> = BTreeSet::new();
    for source in container.env_from.iter().flatten() {
        let name = source
            .config_map_ref
            .as_ref()
            .expect("envFrom a ConfigMap")
            .name
            .clone();
        let config: ConfigMap = named(objects, "ConfigMap", &name).decode();
        for (key, value) in config.data.unwrap_or_default() {
            config_keys.insert(key.clone());
            env.insert(key, value);
        }
    }
    for var in container.env.iter().flatten() {
        let value = var
            .value
            .clone()
            .unwrap_or_else(|| format!("<{}>", var.name));
        env.insert(var.name.clone(), value);
    }
    let mut referenced = BTreeSet::new();
    let mut passed = Passed::default();
    for arg in &args[1..] {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(resolve(value, &env, &mut referenced))),
            None => (arg.as_str(), None),
        };
        assert!(flag.starts_with("--"), "{arg}: write flags as --flag=value");
        let twice = passed.values.insert(flag.to_owned(), value.clone());
        assert!(twice.is_none(), "{flag} passed twice");
        let Some(accepted) = help.flags.get(flag) else {
            assert!(
                PENDING_FLAGS.contains(&flag),
                "`egret {subcommand}` has no flag {flag}"
            );
            passed.pending.push(flag.to_owned());
            continue;
        };
        check_value(flag, value.as_deref(), accepted);
    }
    for key in &config_keys {
        assert!(
            referenced.contains(key)
                || AGENT_ENV.contains(&key.as_str())
                || help.flags.values().any(|f| f.env.as_ref() == Some(key)),
            "ConfigMap key {key} is passed to no flag"
        );
    }
    for flag in &help.required {
        let by_env = help.flags[flag]
            .env
            .as_ref()
            .is_some_and(|var| env.contains_key(var));
        assert!(
            passed.values.contains_key(flag) || by_env,
            "required {flag} is neither passed nor in the environment"
        );
    }
    passed
}

pub fn resolve(
    value: &str,
    env: &BTreeMap<String, String>,
    referenced: &mut BTreeSet<String>,
) -> String {
    let mut resolved = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        let end = rest[start..].find(')').expect("a closed $(") + start;
        let var = &rest[start + 2..end];
        let value = env.get(var).unwrap_or_else(|| {
            panic!("$({var}) is set by neither env nor the ConfigMap: it would stay verbatim")
        });
        referenced.insert(var.to_owned());
        resolved.push_str(&rest[..start]);
        resolved.push_str(value);
        rest = &rest[end + 1..];
    }
    resolved.push_str(rest);
    resolved
}

pub fn check_value(flag: &str, value: Option<&str>, accepted: &FlagHelp) {
    let Some(value) = value else {
        assert!(!accepted.takes_value, "{flag} needs a value");
        return;
    };
    assert!(
        accepted.takes_value,
        "{flag} is a switch and takes no value"
    );
    if value.starts_with('<') {
        return; // From the downward API: known only on the node.
    }
    if !accepted.possible_values.is_empty() {
        assert!(
            accepted.possible_values.iter().any(|v| v == value),
            "{flag}={value}: not one of {:?}",
            accepted.possible_values
        );
    } else if accepted
        .default
        .as_deref()
        .is_some_and(|d| d.parse::<f64>().is_ok())
    {
        assert!(value.parse::<f64>().is_ok(), "{flag}={value}: not a number");
    }
}
