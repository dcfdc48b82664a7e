//! The sweep against the definition: random, overlapping, nested and repeated ranges
//! with excepts (IPv4 and IPv6, host bits set), checked two ways: the classes equal those
//! of the direct quadratic construction, and the longest match over them gives every
//! address exactly the union of the grants of the blocks holding it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use egret_common::maps::{POLICY_ALLOW_AUDITED, POLICY_ALLOW_ENFORCED};
use ipnet::IpNet;
use proptest::prelude::*;

use super::classes;
use egret_common::proto;

use crate::{
    compile::{
        Allowance, BlockGrant, Grants, Ids, PortPrefix, Scope, compile, lookup, merge_grants,
        ports::close_over_prefixes,
    },
    policy::{IpBlock, Peer, PolicyRef, Protocol, RuleRef},
    testing::{mk_namespace, mk_pod, mk_policy, named_port, reference_verdict, snapshot},
};

/// The construction the sweep replaced, kept as its oracle: for every cidr and except,
/// the union of the blocks holding it, left out when the nearest kept prefix above
/// already says the same.
fn direct_classes(blocks: &[BlockGrant]) -> Vec<(IpNet, Grants)> {
    let boundaries: BTreeSet<IpNet> = blocks
        .iter()
        .flat_map(|b| std::iter::once(b.net).chain(b.except.iter().copied()))
        .collect();
    let mut by_length: Vec<IpNet> = boundaries.into_iter().collect();
    by_length.sort_by_key(|net| (net.prefix_len(), *net));
    let mut kept: BTreeMap<IpNet, Grants> = BTreeMap::new();
    let mut out = Vec::new();
    for prefix in by_length {
        let mut grants = Grants::new();
        for block in blocks {
            if block.net.contains(&prefix) && !block.except.iter().any(|e| e.contains(&prefix)) {
                merge_grants(&mut grants, &block.grants);
            }
        }
        close_over_prefixes(&mut grants);
        let inherited = kept
            .iter()
            .filter(|(above, _)| above.contains(&prefix))
            .max_by_key(|(above, _)| above.prefix_len())
            .map(|(_, grants)| grants);
        let redundant = match inherited {
            Some(above) => *above == grants,
            None => grants.is_empty(),
        };
        if !redundant {
            kept.insert(prefix, grants.clone());
            out.push((prefix, grants));
        }
    }
    out
}

/// What the rules give `addr`: the union of the grants of the blocks holding it.
fn expected_at(blocks: &[BlockGrant], addr: IpAddr) -> Grants {
    let mut grants = Grants::new();
    for block in blocks {
        let ip_block = IpBlock {
            cidr: block.net.trunc(),
            except: block.except.iter().map(IpNet::trunc).collect(),
        };
        if ip_block.contains(addr) {
            merge_grants(&mut grants, &block.grants);
        }
    }
    close_over_prefixes(&mut grants);
    grants
}

/// What a longest-prefix match over the classes gives `addr` (nothing: no grants).
fn looked_up(classes: &BTreeMap<IpNet, Grants>, addr: IpAddr) -> Grants {
    let longest = if addr.is_ipv4() { 32 } else { 128 };
    (0..=longest)
        .rev()
        .find_map(|len| classes.get(&IpNet::new(addr, len).unwrap().trunc()))
        .cloned()
        .unwrap_or_default()
}

/// Prefix lengths that nest within a small universe (`10.0.0.0/20`, `fd00::/116`), plus a
/// few that cover all of it, so random ranges overlap often.
const V4_LENGTHS: [u8; 16] = [0, 8, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32];
const V6_LENGTHS: [u8; 16] = [
    0, 64, 112, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128,
];

/// An address of the universe of one family, with `bits` random low bits.
fn address(v6: bool, bits: u16) -> IpAddr {
    if v6 {
        let base = u128::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0));
        IpAddr::V6(Ipv6Addr::from(base | u128::from(bits & 0xFFF)))
    } else {
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
        IpAddr::V4(Ipv4Addr::from(base | u32::from(bits & 0xFFF)))
    }
}

/// A network with its host bits left as drawn (the API server accepts them).
fn network(v6: bool, bits: u16, length: usize) -> IpNet {
    let len = if v6 {
        V6_LENGTHS[length]
    } else {
        V4_LENGTHS[length]
    };
    IpNet::new(address(v6, bits), len).unwrap()
}

/// An except strictly inside `net` (as the API server requires), or, with `wild`,
/// anywhere in the universe (inside, around, outside or equal to the cidr).
fn except_of(net: IpNet, bits: u16, length: usize, wild: bool) -> IpNet {
    let v6 = matches!(net, IpNet::V6(_));
    let drawn = network(v6, bits, length);
    if wild {
        return drawn;
    }
    let max = net.max_prefix_len();
    if net.prefix_len() == max {
        return net;
    }
    let len = net.prefix_len() + 1 + u8::try_from(length).unwrap() % (max - net.prefix_len());
    let keep = |addr: u128, len: u8| {
        let mask = u128::MAX
            .checked_shl(u32::from(if v6 { 128 } else { 32 } - len))
            .unwrap_or(0);
        addr & mask
    };
    let value = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let low = value(drawn.addr()) & !keep(u128::MAX, net.prefix_len());
    let addr = keep(value(net.addr()), net.prefix_len()) | low;
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::from(addr))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(addr).unwrap()))
    };
    IpNet::new(addr, len).unwrap()
}

/// One of a few grants: rules of two policies (one audited), on a few port prefixes.
fn grants(choice: u8) -> Grants {
    let rule = |name: &str, rule| RuleRef {
        policy: PolicyRef {
            namespace: "x".into(),
            name: name.into(),
        },
        rule,
    };
    let allow = |flags, rule| Allowance {
        value: egret_common::maps::PolicyValue::allowing(flags),
        rules: Arc::new(BTreeSet::from([rule])),
    };
    let tcp = |port, len| PortPrefix::Protocol {
        protocol: proto::TCP,
        port,
        len,
    };
    let (prefixes, allowance) = match choice % 6 {
        0 => (
            vec![PortPrefix::AnyProtocol],
            allow(POLICY_ALLOW_ENFORCED, rule("a", 0)),
        ),
        1 => (
            vec![tcp(443, 16)],
            allow(POLICY_ALLOW_ENFORCED, rule("a", 1)),
        ),
        2 => (vec![tcp(0, 0)], allow(POLICY_ALLOW_ENFORCED, rule("b", 0))),
        3 => (
            vec![tcp(443, 16), tcp(8000, 12)],
            allow(POLICY_ALLOW_AUDITED, rule("c", 0)),
        ),
        4 => (
            vec![tcp(8000, 12)],
            allow(POLICY_ALLOW_ENFORCED, rule("b", 1)),
        ),
        _ => (
            vec![PortPrefix::AnyProtocol],
            allow(POLICY_ALLOW_AUDITED, rule("c", 1)),
        ),
    };
    prefixes
        .into_iter()
        .map(|prefix| (prefix, allowance.clone()))
        .collect()
}

#[derive(Clone, Debug)]
struct RawBlock {
    v6: bool,
    bits: u16,
    length: usize,
    excepts: Vec<(u16, usize, bool)>,
    grants: u8,
}

/// Low address bits that pods get and blocks often start at: range edges, so blocks
/// start or end exactly at pods.
const POD_BITS: [u16; 8] = [0x001, 0x0FF, 0x100, 0x2A5, 0x7FF, 0x800, 0xFFE, 0xFFF];

fn arb_bits() -> impl Strategy<Value = u16> {
    prop_oneof![any::<u16>(), prop::sample::select(&POD_BITS[..])]
}

fn arb_block() -> impl Strategy<Value = RawBlock> {
    (
        prop::bool::weighted(0.3),
        arb_bits(),
        0..V4_LENGTHS.len(),
        proptest::collection::vec(
            (arb_bits(), 0..V4_LENGTHS.len(), prop::bool::weighted(0.1)),
            0..4,
        ),
        0u8..6,
    )
        .prop_map(|(v6, bits, length, excepts, grants)| RawBlock {
            v6,
            bits,
            length,
            excepts,
            grants,
        })
}

/// Blocks as drawn (host bits set), some of them repeated, and the same blocks with
/// host bits cleared, as the policy converter hands them over.
fn arb_blocks() -> impl Strategy<Value = (Vec<BlockGrant>, Vec<BlockGrant>)> {
    (
        proptest::collection::vec(arb_block(), 1..24),
        proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    )
        .prop_map(|(raw, repeats)| {
            let mut blocks: Vec<BlockGrant> = raw
                .iter()
                .map(|raw| {
                    let net = network(raw.v6, raw.bits, raw.length);
                    BlockGrant {
                        net,
                        except: raw
                            .excepts
                            .iter()
                            .map(|(bits, length, wild)| except_of(net, *bits, *length, *wild))
                            .collect(),
                        grants: Arc::new(grants(raw.grants)),
                    }
                })
                .collect();
            for repeat in repeats {
                blocks.push(blocks[repeat.index(raw.len())].clone());
            }
            let cleared = blocks
                .iter()
                .map(|block| BlockGrant {
                    net: block.net.trunc(),
                    except: block.except.iter().map(IpNet::trunc).collect(),
                    grants: Arc::clone(&block.grants),
                })
                .collect();
            (blocks, cleared)
        })
}

/// Addresses worth asking about: every range's first and last address and their
/// neighbours, and random ones.
fn probes(blocks: &[BlockGrant], random: &[(bool, u16)]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = random
        .iter()
        .map(|(v6, bits)| address(*v6, *bits))
        .collect();
    for net in blocks
        .iter()
        .flat_map(|b| std::iter::once(b.net).chain(b.except.iter().copied()))
    {
        for edge in [net.network(), net.broadcast()] {
            out.push(edge);
            match edge {
                IpAddr::V4(v4) => {
                    let n = u32::from(v4);
                    out.push(IpAddr::V4(n.wrapping_sub(1).into()));
                    out.push(IpAddr::V4(n.wrapping_add(1).into()));
                }
                IpAddr::V6(v6) => {
                    let n = u128::from(v6);
                    out.push(IpAddr::V6(n.wrapping_sub(1).into()));
                    out.push(IpAddr::V6(n.wrapping_add(1).into()));
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn classes_give_every_address_the_union_of_the_blocks_holding_it(
        (blocks, cleared) in arb_blocks(),
        random in proptest::collection::vec((any::<bool>(), any::<u16>()), 16),
    ) {
        let swept = classes(&blocks);
        let listed: Vec<(IpNet, Grants)> =
            swept.iter().map(|(net, grants)| (net, grants.clone())).collect();
        prop_assert_eq!(&listed, &direct_classes(&cleared), "sweep and direct construction differ");
        let distinct: BTreeSet<&Grants> = swept.grants.iter().collect();
        prop_assert_eq!(distinct.len(), swept.grants.len(), "grants listed once");
        prop_assert!(
            (0..swept.grants.len()).all(|g| swept.prefixes.iter().any(|(_, named)| *named == g)),
            "every grant named"
        );
        let table: BTreeMap<IpNet, Grants> = listed.iter().cloned().collect();
        prop_assert_eq!(table.len(), listed.len(), "one class per prefix");
        for addr in probes(&blocks, &random) {
            let expected = expected_at(&blocks, addr);
            prop_assert_eq!(&looked_up(&table, addr), &expected, "at {}", addr);
            prop_assert_eq!(
                &swept.longest_match(addr).cloned().unwrap_or_default(),
                &expected,
                "longest_match at {}",
                addr
            );
        }
    }
}

#[test]
fn except_holes_and_repeats() {
    let block = |net: &str, except: &[&str], choice| BlockGrant {
        net: net.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
        grants: Arc::new(grants(choice)),
    };
    let blocks = [
        block("10.0.0.0/16", &["10.0.1.0/24", "10.0.1.128/25"], 0),
        block("10.0.0.0/16", &["10.0.1.0/24"], 0),
        block("10.0.1.0/24", &[], 1),
        block("10.0.2.7/24", &["10.0.2.0/24"], 2),
    ];
    let out: BTreeMap<IpNet, Grants> = classes(&blocks)
        .iter()
        .map(|(net, grants)| (net, grants.clone()))
        .collect();
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[&net("10.0.0.0/16")], grants(0));
    assert_eq!(
        out[&net("10.0.1.0/24")],
        grants(1),
        "the hole holds only the block inside it"
    );
}

// ---- the same ranges written as policies, through the compiler and the kernel lookup ----

/// An ipBlock peer as YAML; excepts strictly inside the cidr, host bits as drawn.
fn peer_yaml(raw: &RawBlock) -> String {
    let net = network(raw.v6, raw.bits, raw.length);
    let excepts: Vec<String> = raw
        .excepts
        .iter()
        .map(|(bits, length, _)| except_of(net, *bits, *length, false))
        .filter(|except| except.prefix_len() > net.prefix_len())
        .map(|except| format!("'{except}'"))
        .collect();
    if excepts.is_empty() {
        format!("{{ipBlock: {{cidr: '{net}'}}}}")
    } else {
        format!(
            "{{ipBlock: {{cidr: '{net}', except: [{}]}}}}",
            excepts.join(", ")
        )
    }
}

const RULE_PORTS: [&str; 5] = [
    "",
    ", ports: [{port: 443}]",
    ", ports: [{protocol: UDP}]",
    ", ports: [{port: web}]",
    ", ports: [{port: 8000, endPort: 8015}]",
];

fn arb_rule() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(arb_block(), 1..10),
        proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
        0..RULE_PORTS.len(),
    )
        .prop_map(|(blocks, repeats, ports)| {
            let mut peers: Vec<String> = blocks.iter().map(peer_yaml).collect();
            for repeat in repeats {
                peers.push(peers[repeat.index(blocks.len())].clone());
            }
            format!("{{to: [{}]{}}}", peers.join(", "), RULE_PORTS[ports])
        })
}

fn arb_policy(index: usize) -> impl Strategy<Value = String> {
    (proptest::collection::vec(arb_rule(), 1..4), any::<bool>()).prop_map(
        move |(rules, audit)| {
            let annotations = if audit {
                ", annotations: {egret.dev/mode: audit}"
            } else {
                ""
            };
            format!(
                "metadata: {{name: p{index}, namespace: x{annotations}}}\nspec:\n  podSelector: {{matchLabels: {{app: a}}}}\n  policyTypes: [Egress]\n  egress: [{}]\n",
                rules.join(", ")
            )
        },
    )
}

/// Pods in the universe (so ipBlocks cover them and named ports resolve on them).
fn arb_pods() -> impl Strategy<Value = Vec<crate::state::Pod>> {
    proptest::collection::vec(
        (
            prop::sample::select(&POD_BITS[..]),
            proptest::option::of(prop::sample::select(&POD_BITS[..])),
            prop::sample::select(&[None, Some(443u16), Some(8080)][..]),
            any::<bool>(),
        ),
        1..5,
    )
    .prop_map(|pods| {
        let mut seen = BTreeSet::new();
        pods.into_iter()
            .enumerate()
            .map(|(i, (v4, v6, web, labelled))| {
                let ips: Vec<String> = std::iter::once(address(false, v4))
                    .chain(v6.map(|bits| address(true, bits)))
                    .filter(|ip| seen.insert(*ip))
                    .map(|ip| ip.to_string())
                    .collect();
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let labels: &[(&str, &str)] = if labelled { &[("app", "a")] } else { &[] };
                let mut pod = mk_pod("x", &format!("pod{i}"), labels, &ips);
                pod.named_ports = web
                    .map(|port| named_port("web", Protocol::Tcp, port))
                    .into_iter()
                    .collect();
                pod
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ip_block_lists_compile_to_tables_that_agree_with_the_rules(
        pods in arb_pods(),
        policies in (1usize..4).prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>()),
        random in proptest::collection::vec((any::<bool>(), any::<u16>()), 8),
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 40),
        packets in proptest::collection::vec(
            (
                prop::sample::select(&[Some(Protocol::Tcp), Some(Protocol::Udp), None][..]),
                prop::sample::select(&[443u16, 8080, 8005, 53][..]),
            ),
            40,
        ),
    ) {
        let policies: Vec<_> = policies.iter().map(|yaml| mk_policy(yaml)).collect();
        let snapshot = snapshot(vec![mk_namespace("x", &[])], pods, policies);
        let blocks: Vec<BlockGrant> = snapshot
            .policies
            .values()
            .flat_map(|policy| &policy.egress)
            .flat_map(|rule| &rule.to)
            .filter_map(|peer| match peer {
                Peer::Block(block) => Some(BlockGrant {
                    net: block.cidr,
                    except: block.except.clone(),
                    grants: Arc::default(),
                }),
                Peer::Pods(_) => None,
            })
            .collect();
        let mut destinations = probes(&blocks, &random);
        destinations.extend(snapshot.pods.values().flat_map(|pod| pod.ips.iter().copied()));
        let compiled = compile(&snapshot, &Scope::Cluster, &Ids::default());
        for (key, pod) in &snapshot.pods {
            let Some(endpoint) = compiled.tables.endpoints.get(key) else {
                prop_assert!(!pod.takes_part(), "{} takes part but has no endpoint", key);
                continue;
            };
            for (pick, (protocol, port)) in picks.iter().zip(&packets) {
                let to = destinations[pick.index(destinations.len())];
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
fn service_addresses_replace_what_the_blocks_give_them() {
    let block = |net: &str, choice| BlockGrant {
        net: net.parse().unwrap(),
        except: Vec::new(),
        grants: Arc::new(grants(choice)),
    };
    let mut out = classes(&[block("10.0.0.0/24", 0), block("10.0.0.5/32", 1)]);
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    out.replace(BTreeMap::from([
        (net("10.0.0.5/32"), grants(2)),
        (net("10.0.0.9/32"), grants(0)),
        (net("fd00::1/128"), Grants::new()),
    ]));
    let listed: Vec<(IpNet, Grants)> = out.iter().map(|(n, g)| (n, g.clone())).collect();
    assert_eq!(
        listed,
        vec![
            (net("10.0.0.0/24"), grants(0)),
            (net("10.0.0.5/32"), grants(2)),
            (net("10.0.0.9/32"), grants(0)),
            (net("fd00::1/128"), Grants::new()),
        ]
    );
    assert_eq!(out.grants.len(), 3, "grants(1) is named no more: {out:?}");
    let at = |ip: &str| out.longest_match(ip.parse().unwrap()).cloned();
    assert_eq!(at("10.0.0.5"), Some(grants(2)));
    assert_eq!(at("10.0.0.6"), Some(grants(0)));
    assert_eq!(at("10.0.1.6"), None);
}
