use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use egret_common::{Verdict, proto};
use proptest::prelude::*;

use super::{Ids, Scope, compile, lookup, ports::range_prefixes};
use crate::{
    policy::Protocol,
    state::{ObjectKey, Pod, Snapshot},
    testing::{mk_namespace, mk_pod, mk_policy, named_port, reference_verdict, snapshot},
};

fn verdict(
    snapshot: &Snapshot,
    from: &str,
    to: &str,
    protocol: Option<Protocol>,
    port: u16,
) -> Verdict {
    let compiled = compile(snapshot, &Scope::Cluster, &Ids::default());
    let key = ObjectKey::parse(from).unwrap();
    let endpoint = &compiled.tables.endpoints[&key];
    let to: IpAddr = to.parse().unwrap();
    let number = protocol.map_or(
        if to.is_ipv4() {
            proto::ICMP
        } else {
            proto::ICMPV6
        },
        Protocol::number,
    );
    let compiled_verdict = lookup::decide(&compiled.tables, endpoint, to, number, port).verdict;
    let reference = reference_verdict(snapshot, &snapshot.pods[&key], to, protocol, port);
    assert_eq!(
        compiled_verdict, reference,
        "tables and reference disagree on {from} -> {to} {protocol:?}/{port}"
    );
    compiled_verdict
}

#[test]
fn port_ranges_become_few_aligned_prefixes() {
    assert_eq!(range_prefixes(80, 80), vec![(80, 16)]);
    assert_eq!(range_prefixes(0, 65535), vec![(0, 0)]);
    assert_eq!(range_prefixes(1024, 2047), vec![(1024, 6)]);
    assert_eq!(range_prefixes(1000, 1003), vec![(1000, 14)]);
    assert_eq!(range_prefixes(1, 65535).len(), 16);
    assert!(range_prefixes(1, 65534).len() <= 30);
    for (first, last) in [(1, 1), (7, 900), (30000, 32767), (65535, 65535), (2, 65533)] {
        let prefixes = range_prefixes(first, last);
        let covered: u32 = prefixes
            .iter()
            .map(|(_, len)| 1u32 << (16 - u32::from(*len)))
            .sum();
        assert_eq!(
            covered,
            u32::from(last - first) + 1,
            "{first}-{last} covered exactly once"
        );
    }
}

fn shop() -> Snapshot {
    let mut db = mk_pod("shop", "db", &[("app", "db")], &["10.0.0.3", "fd00::3"]);
    db.named_ports = vec![named_port("postgres", Protocol::Tcp, 5432)];
    snapshot(
        vec![
            mk_namespace("shop", &[("team", "shop")]),
            mk_namespace("tools", &[("team", "infra")]),
        ],
        vec![
            mk_pod("shop", "web", &[("app", "web")], &["10.0.0.1", "fd00::1"]),
            mk_pod("shop", "api", &[("app", "api")], &["10.0.0.2", "fd00::2"]),
            db,
            mk_pod("tools", "scan", &[("app", "scan")], &["10.0.1.1"]),
        ],
        vec![
            mk_policy(
                "metadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.3/32]}}]\n      ports: [{port: 8000, endPort: 8100}]\n",
            ),
            mk_policy(
                "metadata: {name: api, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: postgres}]\n    - to: [{namespaceSelector: {matchLabels: {team: infra}}}]\n",
            ),
        ],
    )
}

#[test]
fn ipblock_except_and_port_ranges() {
    let s = shop();
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2", Some(Protocol::Tcp), 8000),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2", Some(Protocol::Tcp), 8100),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2", Some(Protocol::Tcp), 8101),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2", Some(Protocol::Udp), 8050),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.3", Some(Protocol::Tcp), 8050),
        Verdict::Deny,
        "except"
    );
    assert_eq!(
        verdict(&s, "shop/web", "fd00::2", Some(Protocol::Tcp), 8050),
        Verdict::Deny,
        "IPv4 block only"
    );
    assert_eq!(
        verdict(&s, "shop/web", "10.0.0.2", None, 0),
        Verdict::Deny,
        "ports rule: no ICMP"
    );
}

#[test]
fn selectors_named_ports_and_namespaces() {
    let s = shop();
    assert_eq!(
        verdict(&s, "shop/api", "10.0.0.3", Some(Protocol::Tcp), 5432),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, "shop/api", "fd00::3", Some(Protocol::Tcp), 5432),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, "shop/api", "10.0.0.3", Some(Protocol::Tcp), 5433),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, "shop/api", "10.0.0.1", Some(Protocol::Tcp), 5432),
        Verdict::Deny
    );
    assert_eq!(
        verdict(&s, "shop/api", "10.0.1.1", None, 0),
        Verdict::Allow,
        "no ports: ICMP too"
    );
    assert_eq!(
        verdict(&s, "shop/api", "10.0.1.1", Some(Protocol::Sctp), 9),
        Verdict::Allow
    );
    assert_eq!(
        verdict(&s, "shop/db", "8.8.8.8", Some(Protocol::Udp), 53),
        Verdict::Allow,
        "not isolated"
    );
}

#[test]
fn audit_policies_never_drop() {
    let mut s = shop();
    s.insert_policy(mk_policy(
        "metadata: {name: stage, namespace: shop, annotations: {egret.dev/mode: audit}}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n",
    ));
    assert_eq!(
        verdict(&s, "shop/db", "10.0.0.1", Some(Protocol::Tcp), 80),
        Verdict::AuditDeny
    );
    // An audit policy that allows more does not loosen an enforcing one.
    s.insert_policy(mk_policy(
        "metadata: {name: loose, namespace: shop, annotations: {egret.dev/mode: audit}}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Egress]\n  egress: [{}]\n",
    ));
    assert_eq!(
        verdict(&s, "shop/api", "10.0.0.1", Some(Protocol::Tcp), 80),
        Verdict::Deny
    );
}

#[test]
fn pod_joining_a_namespace_is_one_identity_write() {
    let mut s = shop();
    let before = compile(&s, &Scope::Node("node-1".into()), &Ids::default());
    s.insert_pod(mk_pod("shop", "db-2", &[("app", "db")], &["10.0.0.4"]));
    // Same labels but no named ports: a different identity (named ports resolve per pod).
    let mut db3 = mk_pod("shop", "db-3", &[("app", "db")], &["10.0.0.5"]);
    db3.named_ports = vec![named_port("postgres", Protocol::Tcp, 5432)];
    s.insert_pod(db3);
    let mut after = compile(&s, &Scope::Node("node-1".into()), &before.ids);
    // db-2 and db-3 are local pods themselves: drop their own endpoint rows to compare
    // what the existing endpoints hold.
    after
        .tables
        .endpoints
        .retain(|key, _| before.tables.endpoints.contains_key(key));
    // Tables only the new endpoints use are theirs alone.
    let tables_before: BTreeSet<u32> = before.tables.endpoints.values().map(|e| e.table).collect();
    after
        .tables
        .policy
        .retain(|key, _| tables_before.contains(&key.table));
    after
        .tables
        .cidrs
        .retain(|(table, _), _| tables_before.contains(table));
    assert_eq!(after.tables.cidrs, before.tables.cidrs);
    assert_eq!(after.tables.endpoints, before.tables.endpoints);
    // db-3 shares db's identity: its address is the only new entry it needs.
    let db_identity = before.tables.identities[&"10.0.0.3".parse::<IpAddr>().unwrap()];
    assert_eq!(
        after.tables.identities[&"10.0.0.5".parse::<IpAddr>().unwrap()],
        db_identity
    );
    // db-2 has a new identity; the api endpoint may reach it on no port (no named port),
    // so no policy entry changes for it either.
    assert_eq!(after.tables.policy, before.tables.policy);
}

#[test]
fn replicas_share_one_table() {
    let mut s = shop();
    s.insert_policy(mk_policy(
        "metadata: {name: web-out, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}]}]\n",
    ));
    let one = compile(&s, &Scope::Node("node-1".into()), &Ids::default());
    for (name, ip) in [("web-2", "10.0.0.12"), ("web-3", "10.0.0.13")] {
        s.insert_pod(mk_pod("shop", name, &[("app", "web")], &[ip]));
    }
    let three = compile(&s, &Scope::Node("node-1".into()), &one.ids);
    let web = |name: &str| &three.tables.endpoints[&ObjectKey::new("shop", name)];
    assert_eq!(web("web").table, web("web-2").table);
    assert_eq!(web("web").table, web("web-3").table);
    assert_ne!(web("web").id, web("web-2").id, "counters stay per pod");
    assert_ne!(
        web("web").table,
        three.tables.endpoints[&ObjectKey::new("shop", "api")].table
    );
    // Three replicas cost no entry beyond the one replica's.
    assert_eq!(three.tables.policy, one.tables.policy);
    assert_eq!(three.tables.cidrs, one.tables.cidrs);
}

#[test]
fn numbers_stay_stable_across_compilations() {
    let s = shop();
    let first = compile(&s, &Scope::Node("node-1".into()), &Ids::default());
    let second = compile(&s, &Scope::Node("node-1".into()), &first.ids);
    assert_eq!(first.tables, second.tables);
    let mut changed = s.clone();
    changed.pods.remove(&ObjectKey::new("shop", "web"));
    let third = compile(&changed, &Scope::Node("node-1".into()), &second.ids);
    let api = ObjectKey::new("shop", "api");
    assert_eq!(
        third.tables.endpoints[&api].id,
        second.tables.endpoints[&api].id
    );
}

// ---- property test: compiled tables through the kernel-lookup model == the rules ----

const LABEL_VALUES: [&str; 3] = ["a", "b", "c"];
pub(super) const ADDRESSES: [&str; 10] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.1.1",
    "10.0.1.2",
    "fd00::1",
    "fd00::2",
    "fd00::1:1",
    "10.0.0.9",
    "192.168.0.1",
];
pub(super) const CIDRS: [&str; 8] = [
    "10.0.0.0/16",
    "10.0.0.0/24",
    "10.0.0.2/31",
    "10.0.1.0/24",
    "0.0.0.0/0",
    "fd00::/64",
    "fd00::/112",
    "::/0",
];
pub(super) const PORTS: [u16; 6] = [53, 80, 81, 443, 1000, 1001];

pub(super) fn arb_labels() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(
        (
            prop::sample::select(&["app", "tier"][..]),
            prop::sample::select(&LABEL_VALUES[..]),
        ),
        0..3,
    )
    .prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

pub(super) fn arb_selector() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{}".to_owned()),
        (
            prop::sample::select(&["app", "tier"][..]),
            prop::sample::select(&LABEL_VALUES[..])
        )
            .prop_map(|(k, v)| format!("{{matchLabels: {{{k}: {v}}}}}")),
        (
            prop::sample::select(&["In", "NotIn"][..]),
            prop::sample::select(&LABEL_VALUES[..])
        )
            .prop_map(|(op, v)| format!(
                "{{matchExpressions: [{{key: app, operator: {op}, values: [{v}]}}]}}"
            )),
        prop::sample::select(&["Exists", "DoesNotExist"][..])
            .prop_map(|op| format!("{{matchExpressions: [{{key: tier, operator: {op}}}]}}")),
    ]
}

fn arb_peer() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_selector().prop_map(|s| format!("{{podSelector: {s}}}")),
        arb_selector().prop_map(|s| format!("{{namespaceSelector: {s}}}")),
        (arb_selector(), arb_selector())
            .prop_map(|(n, p)| format!("{{namespaceSelector: {n}, podSelector: {p}}}")),
        (0..CIDRS.len(), proptest::option::of(0..ADDRESSES.len())).prop_map(|(c, e)| {
            let cidr: ipnet::IpNet = CIDRS[c].parse().unwrap();
            let except = e
                .map(|e| ADDRESSES[e].parse::<IpAddr>().unwrap())
                .filter(|ip| cidr.contains(ip) && cidr.prefix_len() < cidr.max_prefix_len())
                .map(|ip| format!(", except: ['{}']", ipnet::IpNet::from(ip)))
                .unwrap_or_default();
            format!("{{ipBlock: {{cidr: '{cidr}'{except}}}}}")
        }),
    ]
}

fn arb_port() -> impl Strategy<Value = String> {
    let protocol = prop::sample::select(&["TCP", "UDP", "SCTP"][..]);
    prop_oneof![
        protocol.clone().prop_map(|p| format!("{{protocol: {p}}}")),
        (protocol.clone(), prop::sample::select(&PORTS[..]))
            .prop_map(|(p, n)| format!("{{protocol: {p}, port: {n}}}")),
        (
            protocol.clone(),
            prop::sample::select(&PORTS[..]),
            0u16..500
        )
            .prop_map(|(p, n, span)| format!(
                "{{protocol: {p}, port: {n}, endPort: {}}}",
                n + span
            )),
        (protocol, prop::sample::select(&["dns", "web"][..]))
            .prop_map(|(p, n)| format!("{{protocol: {p}, port: {n}}}")),
    ]
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        proptest::option::of(proptest::collection::vec(arb_peer(), 0..3)),
        proptest::option::of(proptest::collection::vec(arb_port(), 0..3)),
    )
        .prop_map(|(to, ports)| {
            let mut rule = String::from("{");
            if let Some(to) = to {
                let _ = write!(rule, "to: [{}], ", to.join(", "));
            }
            if let Some(ports) = ports {
                let _ = write!(rule, "ports: [{}]", ports.join(", "));
            }
            rule.push('}');
            rule
        })
}

pub(super) fn arb_policy(index: usize) -> impl Strategy<Value = String> {
    (
        prop::sample::select(&["x", "y"][..]),
        arb_selector(),
        proptest::collection::vec(arb_rule(), 0..3),
        prop::sample::select(&["[Egress]", "[Ingress, Egress]", "[Ingress]", "absent"][..]),
        any::<bool>(),
    )
        .prop_map(move |(namespace, selector, rules, types, audit)| {
            let annotations = if audit { ", annotations: {egret.dev/mode: audit}" } else { "" };
            let types = if types == "absent" { String::new() } else { format!("  policyTypes: {types}\n") };
            format!(
                "metadata: {{name: p{index}, namespace: {namespace}{annotations}}}\nspec:\n  podSelector: {selector}\n{types}  egress: [{}]\n",
                rules.join(", ")
            )
        })
}

#[derive(Debug, Clone)]
pub(super) struct PodSpec {
    namespace: &'static str,
    labels: Vec<(String, String)>,
    addresses: Vec<usize>,
    named: Vec<(&'static str, Protocol, u16)>,
    host_network: bool,
}

impl PodSpec {
    pub(super) fn pod(&self, name: &str) -> Pod {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let addresses: Vec<&str> = self.addresses.iter().map(|a| ADDRESSES[*a]).collect();
        let mut pod = mk_pod(self.namespace, name, &labels, &addresses);
        // At most one address per family, as Kubernetes guarantees.
        let mut seen = (false, false);
        pod.ips.retain(|ip| {
            let slot = if ip.is_ipv4() {
                &mut seen.0
            } else {
                &mut seen.1
            };
            !std::mem::replace(slot, true)
        });
        let mut names = BTreeSet::new();
        pod.named_ports = self
            .named
            .iter()
            .filter(|(name, _, _)| names.insert(*name))
            .map(|(name, protocol, port)| named_port(name, *protocol, *port))
            .collect();
        pod.host_network = self.host_network;
        pod
    }
}

pub(super) fn arb_pod() -> impl Strategy<Value = PodSpec> {
    (
        prop::sample::select(&["x", "y", "z"][..]),
        arb_labels(),
        proptest::collection::vec(0..ADDRESSES.len(), 1..3),
        proptest::collection::vec(
            (
                prop::sample::select(&["dns", "web"][..]),
                prop::sample::select(&[Protocol::Tcp, Protocol::Udp][..]),
                prop::sample::select(&PORTS[..]),
            ),
            0..2,
        ),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(namespace, labels, addresses, named, host_network)| PodSpec {
                namespace,
                labels,
                addresses,
                named,
                host_network,
            },
        )
}

pub(super) fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        proptest::collection::vec(arb_pod(), 1..6),
        (0usize..4).prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>()),
        arb_labels(),
    )
        .prop_map(|(pods, policies, y_labels)| {
            let mut s = Snapshot::default();
            s.insert_namespace(mk_namespace("x", &[("app", "a")]));
            let y: Vec<(&str, &str)> = y_labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            s.insert_namespace(mk_namespace("y", &y));
            for (i, spec) in pods.iter().enumerate() {
                s.insert_pod(spec.pod(&format!("p{i}")));
            }
            for policy in policies {
                s.insert_policy(mk_policy(&policy));
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiled_tables_agree_with_the_rules(
        snapshot in arb_snapshot(),
        destinations in proptest::collection::vec(0..ADDRESSES.len(), 4),
        protocols in proptest::collection::vec(prop::sample::select(&[Some(Protocol::Tcp), Some(Protocol::Udp), Some(Protocol::Sctp), None][..]), 4),
        ports in proptest::collection::vec(prop::sample::select(&[53u16, 80, 81, 443, 1000, 1001, 1300, 8080][..]), 4),
    ) {
        let compiled = compile(&snapshot, &Scope::Cluster, &Ids::default());
        for (key, pod) in &snapshot.pods {
            let Some(endpoint) = compiled.tables.endpoints.get(key) else {
                prop_assert!(!pod.takes_part(), "{key} takes part but has no endpoint");
                continue;
            };
            for ((destination, protocol), port) in destinations.iter().zip(&protocols).zip(&ports) {
                let to: IpAddr = ADDRESSES[*destination].parse().unwrap();
                let (number, port) = match protocol {
                    Some(p) => (p.number(), *port),
                    None => (if to.is_ipv4() { proto::ICMP } else { proto::ICMPV6 }, 0),
                };
                let got = lookup::decide(&compiled.tables, endpoint, to, number, port).verdict;
                let want = reference_verdict(&snapshot, pod, to, *protocol, port);
                prop_assert_eq!(got, want, "{} -> {} {:?}/{}", key, to, protocol, port);
            }
        }
    }
}

#[test]
fn service_address_is_allowed_when_every_ready_backend_is() {
    use crate::state::{EndpointSlice, Service, ServicePort};
    let mut s = shop();
    // db: two ready backends, 10.0.0.3 (allowed for api on postgres 5432) and
    // 10.0.1.1 (tools/scan: api may reach the infra team on any port).
    s.insert_service(Service {
        namespace: "shop".into(),
        name: "db".into(),
        virtual_ips: vec!["10.96.0.10".parse().unwrap()],
        ports: vec![ServicePort {
            name: "sql".into(),
            protocol: Protocol::Tcp,
            port: 80,
        }],
    });
    let slice = |name: &str, port: u16, ready: &[&str]| EndpointSlice {
        namespace: "shop".into(),
        name: name.into(),
        service: "db".into(),
        ports: vec![("sql".into(), Protocol::Tcp, port)],
        ready_addresses: ready.iter().map(|ip| ip.parse().unwrap()).collect(),
    };
    s.insert_endpoint_slice(slice("db-a", 5432, &["10.0.0.3"]));
    s.insert_endpoint_slice(slice("db-b", 5432, &["10.0.1.1"]));
    let compiled = compile(&s, &Scope::Cluster, &Ids::default());
    let decide = |from: &str, port: u16| {
        let endpoint = &compiled.tables.endpoints[&ObjectKey::parse(from).unwrap()];
        lookup::decide(
            &compiled.tables,
            endpoint,
            "10.96.0.10".parse().unwrap(),
            proto::TCP,
            port,
        )
        .verdict
    };
    assert_eq!(
        decide("shop/api", 80),
        Verdict::Allow,
        "both backends allowed at their target port"
    );
    assert_eq!(decide("shop/api", 81), Verdict::Deny, "not a service port");
    // web may reach 10.0.0.0/16 on 8000-8100 only: the backends' 5432 is not allowed,
    // even though the service address itself is outside every block web has.
    assert_eq!(decide("shop/web", 80), Verdict::Deny);

    // A backend the pod may not reach makes the whole service port denied.
    s.insert_endpoint_slice(slice("db-c", 5432, &["10.0.0.1"]));
    let compiled = compile(&s, &Scope::Cluster, &Ids::default());
    let endpoint = &compiled.tables.endpoints[&ObjectKey::parse("shop/api").unwrap()];
    let verdict = lookup::decide(
        &compiled.tables,
        endpoint,
        "10.96.0.10".parse().unwrap(),
        proto::TCP,
        80,
    )
    .verdict;
    assert_eq!(
        verdict,
        Verdict::Deny,
        "web (10.0.0.1) is not allowed for api"
    );
}
