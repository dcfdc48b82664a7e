use super::{
    Mode, Operator, Peer, PortSpec, Protocol,
    convert::{Problem, network_policy},
};
use crate::testing::{mk_pod, named_port};

fn convert(yaml: &str) -> Result<super::NetworkPolicy, super::convert::InvalidField> {
    let api: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_yaml_ng::from_str(yaml).unwrap();
    network_policy(&api, "default")
}

fn rejection(yaml: &str) -> (String, Problem) {
    let error = convert(yaml).expect_err("policy must be rejected");
    (error.field, error.problem)
}

const HEADER: &str =
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

fn with_spec(spec: &str) -> String {
    format!("{HEADER}spec:\n{spec}")
}

#[test]
fn policy_types_default_to_egress_only_when_there_are_egress_rules() {
    let with_rules = convert(&with_spec("  podSelector: {}\n  egress: [{}]\n")).unwrap();
    assert!(with_rules.isolates_egress);
    let ingress_only = convert(&with_spec("  podSelector: {}\n  ingress: [{}]\n")).unwrap();
    assert!(!ingress_only.isolates_egress);
    let explicit = convert(&with_spec("  podSelector: {}\n  policyTypes: [Egress]\n")).unwrap();
    assert!(
        explicit.isolates_egress,
        "Egress with no rules isolates: deny all"
    );
    assert!(explicit.egress.is_empty());
    let ingress_typed = convert(&with_spec(
        "  podSelector: {}\n  policyTypes: [Ingress]\n  egress: [{}]\n",
    ))
    .unwrap();
    assert!(
        !ingress_typed.isolates_egress,
        "explicit policyTypes win over the rules present"
    );
}

#[test]
fn empty_peer_lists_and_port_lists_mean_everything() {
    let policy = convert(&with_spec(
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n    - to: []\n      ports: []\n",
    ))
    .unwrap();
    assert!(policy.egress[0].to.is_empty());
    assert!(policy.egress[0].ports.is_empty());
}

#[test]
fn cidr_with_host_bits_is_its_network_and_except_must_be_inside() {
    let policy = convert(&with_spec(
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.1.2.3/16, except: [10.1.9.0/24]}\n",
    ))
    .unwrap();
    let Peer::Block(block) = &policy.egress[0].to[0] else {
        panic!("ipBlock expected")
    };
    assert_eq!(block.cidr.to_string(), "10.1.0.0/16");
    assert!(block.contains("10.1.3.4".parse().unwrap()));
    assert!(!block.contains("10.1.9.200".parse().unwrap()));

    let (field, problem) = rejection(&with_spec(
        "  podSelector: {}\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.1.0.0/16, except: [10.2.0.0/24]}\n",
    ));
    assert_eq!(field, "spec.egress[0].to[0].ipBlock.except[0]");
    assert!(matches!(problem, Problem::ExceptOutsideCidr { .. }));

    let (field, problem) = rejection(&with_spec(
        "  podSelector: {}\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.1.0.0/33}\n",
    ));
    assert_eq!(field, "spec.egress[0].to[0].ipBlock.cidr");
    assert!(matches!(problem, Problem::BadCidr { .. }));

    let (_, problem) = rejection(&with_spec(
        "  podSelector: {}\n  egress:\n    - to:\n        - ipBlock: {cidr: 10.1.0.0/16, except: ['fd00::/64']}\n",
    ));
    assert!(matches!(problem, Problem::ExceptFamily { .. }));
}

#[test]
fn ports_default_to_tcp_and_validate_ranges_and_names() {
    let policy = convert(&with_spec(
        "  podSelector: {}\n  egress:\n    - ports:\n        - port: 80\n        - {protocol: UDP, port: 1000, endPort: 2000}\n        - {protocol: SCTP, port: serve-81}\n        - {protocol: UDP}\n",
    ))
    .unwrap();
    let ports = &policy.egress[0].ports;
    assert_eq!(ports[0].protocol, Protocol::Tcp);
    assert_eq!(
        ports[0].port,
        PortSpec::Range {
            first: 80,
            last: 80
        }
    );
    assert_eq!(
        ports[1].port,
        PortSpec::Range {
            first: 1000,
            last: 2000
        }
    );
    assert_eq!(ports[2].port, PortSpec::Named("serve-81".into()));
    assert_eq!(ports[3].port, PortSpec::Any);

    let cases = [
        (
            "{port: http, endPort: 90}",
            "spec.egress[0].ports[0].endPort",
        ),
        ("{endPort: 90}", "spec.egress[0].ports[0].endPort"),
        (
            "{port: 100, endPort: 90}",
            "spec.egress[0].ports[0].endPort",
        ),
        ("{port: 0}", "spec.egress[0].ports[0].port"),
        ("{port: 70000}", "spec.egress[0].ports[0].port"),
        ("{port: Not_A_Name}", "spec.egress[0].ports[0].port"),
        (
            "{protocol: ICMP, port: 1}",
            "spec.egress[0].ports[0].protocol",
        ),
        (
            "{protocol: tcp, port: 1}",
            "spec.egress[0].ports[0].protocol",
        ),
    ];
    for (port, field) in cases {
        let (got, problem) = rejection(&with_spec(&format!(
            "  podSelector: {{}}\n  egress:\n    - ports: [{port}]\n"
        )));
        assert_eq!(got, field, "{port}: {problem}");
    }
}

#[test]
fn selectors_validate_operators() {
    let policy = convert(&with_spec(
        "  podSelector:\n    matchExpressions:\n      - {key: tier, operator: NotIn, values: [db]}\n      - {key: team, operator: Exists}\n  egress: [{}]\n",
    ))
    .unwrap();
    assert!(matches!(
        policy.pod_selector.match_expressions[0].operator,
        Operator::NotIn(_)
    ));
    let bad = [
        "{key: a, operator: In}",
        "{key: a, operator: Exists, values: [x]}",
        "{key: a, operator: Matches, values: [x]}",
    ];
    for expression in bad {
        let (field, problem) = rejection(&with_spec(&format!(
            "  podSelector:\n    matchExpressions: [{expression}]\n"
        )));
        assert!(
            field.starts_with("spec.podSelector.matchExpressions[0]"),
            "{expression}: {field}: {problem}"
        );
    }
}

#[test]
fn peers_need_exactly_one_kind() {
    let (field, problem) = rejection(&with_spec("  podSelector: {}\n  egress:\n    - to: [{}]\n"));
    assert_eq!(
        (field.as_str(), problem),
        ("spec.egress[0].to[0]", Problem::EmptyPeer)
    );
    let (_, problem) = rejection(&with_spec(
        "  podSelector: {}\n  egress:\n    - to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
    ));
    assert_eq!(problem, Problem::BlockWithSelector);
}

#[test]
fn mode_annotation_stages_a_policy() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\n  annotations: {egret.dev/mode: audit}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n";
    assert_eq!(convert(yaml).unwrap().mode, Mode::Audit);
    let (field, _) = rejection(&yaml.replace("audit}", "loud}"));
    assert_eq!(field, "metadata.annotations[egret.dev/mode]");
}

#[test]
fn selector_semantics() {
    let policy = convert(&with_spec(
        "  podSelector:\n    matchLabels: {app: web}\n    matchExpressions:\n      - {key: tier, operator: NotIn, values: [db]}\n      - {key: legacy, operator: DoesNotExist}\n      - {key: env, operator: In, values: [prod, stage]}\n  egress: [{}]\n",
    ))
    .unwrap();
    let pod = |pairs: &[(&str, &str)]| mk_pod("x", "p", pairs, &["10.0.0.1"]);
    assert!(
        policy.selects(&pod(&[("app", "web"), ("env", "prod")])),
        "NotIn matches a pod without the key"
    );
    assert!(!policy.selects(&pod(&[("app", "web"), ("env", "prod"), ("tier", "db")])));
    assert!(!policy.selects(&pod(&[("app", "web"), ("env", "prod"), ("legacy", "")])));
    assert!(!policy.selects(&pod(&[("app", "web"), ("env", "dev")])));
    assert!(
        !policy.selects(&mk_pod("y", "p", &[("app", "web"), ("env", "prod")], &[])),
        "other namespace"
    );
}

#[test]
fn named_ports_resolve_by_name_and_protocol() {
    let ports = [
        named_port("dns", Protocol::Udp, 53),
        named_port("dns-tcp", Protocol::Tcp, 53),
    ];
    let policy = convert(&with_spec(
        "  podSelector: {}\n  egress:\n    - ports: [{protocol: UDP, port: dns}]\n",
    ))
    .unwrap();
    let rule = &policy.egress[0].ports[0];
    assert!(rule.allows(Protocol::Udp, 53, Some(&ports)));
    assert!(!rule.allows(Protocol::Tcp, 53, Some(&ports)));
    assert!(
        !rule.allows(Protocol::Udp, 53, None),
        "a named port matches nothing that is not a pod"
    );
    assert!(!rule.allows(Protocol::Udp, 54, Some(&ports)));
}
