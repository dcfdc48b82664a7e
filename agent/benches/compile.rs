//! Full-compile time on generated, realistic clusters: deployments of pods sharing
//! labels across namespaces, a mix of selector, namespace and ipBlock policies, 100 pods
//! on the measured node. Run with `cargo xtask bench` (or `cargo bench -p egret --bench compile`).
//! Prints one JSON line per size.

use std::{hint::black_box, time::Instant};

use egret::{
    compile::{Ids, Scope, compile},
    policy::{self, NamedPort, Protocol},
    state::{Namespace, Pod, PodPhase, Snapshot},
};

const PODS_PER_DEPLOYMENT: usize = 10;
const DEPLOYMENTS_PER_NAMESPACE: usize = 10;
const LOCAL_PODS: usize = 100;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[(usize, usize, usize)] = if quick {
        &[(10_000, 1_000, 3)]
    } else {
        &[(10_000, 1_000, 5), (100_000, 10_000, 3)]
    };
    for &(pods, policies, runs) in sizes {
        let started = Instant::now();
        let snapshot = cluster(pods, policies);
        let generated = started.elapsed();
        let mut times = Vec::new();
        let mut entries = 0;
        for _ in 0..runs {
            let started = Instant::now();
            let compiled = black_box(compile(
                &snapshot,
                &Scope::Node("node-0".into()),
                &Ids::default(),
            ));
            times.push(started.elapsed().as_secs_f64());
            entries = compiled.tables.policy.len()
                + compiled.tables.cidrs.len()
                + compiled.tables.identities.len();
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "bench": "compile_full",
                "pods": pods,
                "policies": policies,
                "local_pods": LOCAL_PODS,
                "runs": runs,
                "median_s": times[times.len() / 2],
                "min_s": times[0],
                "max_s": times[times.len() - 1],
                "table_entries": entries,
                "generate_s": generated.as_secs_f64(),
            })
        );
    }
}

fn labels(pairs: &[(&str, String)]) -> policy::Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// `pods` pods in deployments of ten, ten deployments per namespace; `policies` policies.
fn cluster(pods: usize, policies: usize) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let namespaces = pods.div_ceil(PODS_PER_DEPLOYMENT * DEPLOYMENTS_PER_NAMESPACE);
    for n in 0..namespaces {
        snapshot.insert_namespace(Namespace {
            name: format!("ns-{n}"),
            labels: labels(&[
                ("team", format!("team-{}", n % 20)),
                ("env", ["prod", "stage"][n % 2].to_owned()),
            ]),
        });
    }
    let local_every = pods / LOCAL_PODS;
    for i in 0..pods {
        let deployment = i / PODS_PER_DEPLOYMENT;
        let namespace = deployment / DEPLOYMENTS_PER_NAMESPACE;
        let ip = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + u32::try_from(i).unwrap() + 1;
        snapshot.insert_pod(Pod {
            namespace: format!("ns-{namespace}"),
            name: format!("dep-{deployment}-{}", i % PODS_PER_DEPLOYMENT),
            labels: labels(&[
                ("app", format!("dep-{deployment}")),
                ("tier", ["web", "api", "db"][deployment % 3].to_owned()),
            ]),
            node_name: Some(if i % local_every == 0 {
                "node-0".into()
            } else {
                format!("node-{}", 1 + i % 997)
            }),
            host_network: false,
            phase: PodPhase::Running,
            ips: vec![std::net::Ipv4Addr::from(ip).into()],
            uid: format!("uid-{i}"),
            named_ports: vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        });
    }
    for p in 0..policies {
        let namespace = p % namespaces;
        let deployment =
            namespace * DEPLOYMENTS_PER_NAMESPACE + p / namespaces % DEPLOYMENTS_PER_NAMESPACE;
        let yaml = match p % 4 {
            // Deployment to deployment in its namespace, on a named port.
            0 => format!(
                "metadata: {{name: p{p}, namespace: ns-{namespace}}}\nspec:\n  podSelector: {{matchLabels: {{app: dep-{deployment}}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{podSelector: {{matchLabels: {{app: dep-{}}}}}}}]\n      ports: [{{port: http}}]\n",
                namespace * DEPLOYMENTS_PER_NAMESPACE
                    + (deployment + 1) % DEPLOYMENTS_PER_NAMESPACE
            ),
            // A tier to a team's namespaces, a port range.
            1 => format!(
                "metadata: {{name: p{p}, namespace: ns-{namespace}}}\nspec:\n  podSelector: {{matchLabels: {{tier: api}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{namespaceSelector: {{matchLabels: {{team: team-{}}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [db]}}]}}}}]\n      ports: [{{port: 5000, endPort: 5999}}]\n",
                p % 20
            ),
            // External ranges with holes, and DNS.
            2 => format!(
                "metadata: {{name: p{p}, namespace: ns-{namespace}}}\nspec:\n  podSelector: {{matchLabels: {{app: dep-{deployment}}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{ipBlock: {{cidr: 172.{}.0.0/16, except: [172.{}.1.0/24]}}}}]\n      ports: [{{port: 443}}]\n    - ports: [{{protocol: UDP, port: 53}}]\n",
                16 + p % 16,
                16 + p % 16
            ),
            // Namespace default deny.
            _ => format!(
                "metadata: {{name: p{p}, namespace: ns-{namespace}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n"
            ),
        };
        let api: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_yaml_ng::from_str(&yaml).unwrap();
        snapshot.insert_policy(policy::convert::network_policy(&api, "default").unwrap());
    }
    snapshot
}
