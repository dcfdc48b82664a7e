//! Rendering the Helm chart, and comparing what it renders with the plain manifests.

use std::{collections::BTreeSet, process::Command};

use serde_json::Value;

use super::{
    NAMESPACE,
    objects::{Object, parse_stream, yaml_files},
    repo,
};

pub const CHART: &str = "deploy/helm/egret";

/// A Kubernetes version the chart supports (its `kubeVersion` is >= 1.30), for a `helm`
/// binary whose built-in default may be older.
const KUBE_VERSION: &str = "1.33.0";

/// Lints (strictly) and renders the chart through Helm's Go engine, embedded in the
/// `helm-python-sdk` package; prints a YAML stream.
const PYTHON_RENDER: &str = r#"
import json, sys
import helm_python
chart_path, values = sys.argv[1], json.loads(sys.argv[2])
report = helm_python.lint(chart_path, values, strict=True, namespace="egret-system")
problems = report["errors"] + [m for m in report["messages"] if m["severity"] >= 2]
if problems:
    sys.exit(f"helm lint: {problems}")
chart = helm_python.Chart.load(chart_path)
rendered = chart.render(values, name="egret", namespace="egret-system", is_install=True)
for path in sorted(rendered):
    if path.endswith(".yaml"):
        print(f"---\n# Source: {path}\n{rendered[path]}")
"#;

pub enum Renderer {
    Helm,
    Python,
}

pub fn renderer() -> Option<Renderer> {
    let works = |command: &mut Command| command.output().is_ok_and(|o| o.status.success());
    if works(Command::new("helm").arg("version")) {
        Some(Renderer::Helm)
    } else if works(Command::new("python3").args(["-c", "import helm_python"])) {
        Some(Renderer::Python)
    } else {
        eprintln!(
            "note: no Helm renderer here (a `helm` binary, or `pip install helm-python-sdk`): \
             checking the chart's templates for the same kinds only"
        );
        None
    }
}

/// The chart rendered as release `egret` in egret-system with `values`, or Helm's error.
pub fn render(renderer: &Renderer, values: &Value) -> Result<String, String> {
    let chart = repo().join(CHART);
    let output = match renderer {
        Renderer::Helm => {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), values.to_string()).unwrap();
            let lint = Command::new("helm")
                .args(["lint", "--strict", "--kube-version", KUBE_VERSION])
                .arg(&chart)
                .arg("-f")
                .arg(file.path())
                .output()
                .unwrap();
            if !lint.status.success() {
                return Err(String::from_utf8_lossy(&lint.stdout).into_owned());
            }
            Command::new("helm")
                .args(["template", "egret", "--namespace", NAMESPACE])
                .args(["--kube-version", KUBE_VERSION])
                .arg(&chart)
                .arg("-f")
                .arg(file.path())
                .output()
                .unwrap()
        }
        Renderer::Python => Command::new("python3")
            .args(["-c", PYTHON_RENDER])
            .arg(&chart)
            .arg(values.to_string())
            .output()
            .unwrap(),
    };
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

pub fn rendered(renderer: &Renderer, values: &Value) -> (String, Vec<Object>) {
    let text =
        render(renderer, values).unwrap_or_else(|error| panic!("helm with {values}: {error}"));
    let objects = parse_stream(&format!("helm template ({values})"), &text);
    (text, objects)
}

/// `rendered` says everything `plain` says: the same values, except that labels and
/// annotations may add to them.
pub fn covers(plain: &Value, rendered: &Value, path: &str, differences: &mut Vec<String>) {
    match (plain, rendered) {
        (Value::Object(plain), Value::Object(rendered)) => {
            let extra_allowed = path.ends_with("labels") || path.ends_with("annotations");
            for (key, value) in plain {
                match rendered.get(key) {
                    Some(other) => covers(value, other, &format!("{path}.{key}"), differences),
                    None => differences.push(format!("{path}.{key}: missing")),
                }
            }
            for key in rendered.keys().filter(|key| !plain.contains_key(*key)) {
                if !extra_allowed {
                    differences.push(format!("{path}.{key}: only in the chart"));
                }
            }
        }
        (Value::Array(plain), Value::Array(rendered)) if plain.len() == rendered.len() => {
            for (index, (a, b)) in plain.iter().zip(rendered).enumerate() {
                covers(a, b, &format!("{path}[{index}]"), differences);
            }
        }
        _ if plain == rendered => {}
        _ => differences.push(format!(
            "{path}: {plain} in deploy/kubernetes, {rendered} in the chart"
        )),
    }
}

pub fn assert_same_objects(plain: &[Object], rendered: &[Object]) {
    let plain_keys: BTreeSet<String> = plain.iter().map(Object::key).collect();
    let rendered_keys: BTreeSet<String> = rendered.iter().map(Object::key).collect();
    assert_eq!(
        plain_keys, rendered_keys,
        "the chart renders the plain manifests' objects"
    );
    for object in plain {
        let other = rendered.iter().find(|o| o.key() == object.key()).unwrap();
        let mut differences = Vec::new();
        covers(&object.value, &other.value, "", &mut differences);
        assert!(differences.is_empty(), "{}: {differences:#?}", object.key());
    }
}

/// Without a renderer: each template's top-level kinds are those of the plain manifests.
pub fn template_kinds() -> BTreeSet<String> {
    let dir = repo().join(CHART).join("templates");
    yaml_files(&dir)
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            text.lines()
                .filter_map(|line| line.strip_prefix("kind: ").map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect()
}
