//! Generated, realistic clusters as Kubernetes manifests, for benchmarks: deployments of
//! ten pods sharing labels, ten deployments per namespace, namespaces labelled by team
//! and environment, and policies mixing deployment-to-deployment rules on a named port,
//! tier-to-team-namespaces rules with a port range, ipBlocks with an `except` plus DNS,
//! and namespace default-deny. The same text feeds the compile and latency benchmarks
//! (through the manifest loader) and a real agent (through a manifest directory).

use std::{fmt::Write as _, net::Ipv4Addr};

pub const PODS_PER_DEPLOYMENT: usize = 10;
pub const DEPLOYMENTS_PER_NAMESPACE: usize = 10;

/// The shape of a generated cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedCluster {
    pub pods: usize,
    pub policies: usize,
    /// Pods scheduled on [`GeneratedCluster::node`], spread evenly over the cluster.
    pub local_pods: usize,
    /// The node the measured agent runs as.
    pub node: String,
}

impl GeneratedCluster {
    /// `pods` pods and `policies` policies, 100 of the pods on `node-1` (the node name
    /// [`crate::agent::AgentProcess`] gives the agent).
    #[must_use]
    pub fn new(pods: usize, policies: usize) -> Self {
        Self {
            pods,
            policies,
            local_pods: 100.min(pods),
            node: "node-1".to_owned(),
        }
    }

    #[must_use]
    pub fn namespaces(&self) -> usize {
        self.pods
            .div_ceil(PODS_PER_DEPLOYMENT * DEPLOYMENTS_PER_NAMESPACE)
            .max(1)
    }

    /// Pod `index`'s address: 10.0.0.1 upwards.
    #[must_use]
    #[expect(
        clippy::missing_panics_doc,
        reason = "benchmarks stay far below 2^24 pods"
    )]
    pub fn pod_ipv4(index: usize) -> Ipv4Addr {
        let offset = u32::try_from(index).expect("fewer than 2^32 pods") + 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + offset)
    }

    /// Whether pod `index` runs on the measured node.
    #[must_use]
    pub fn is_local(&self, index: usize) -> bool {
        self.local_pods > 0 && index.is_multiple_of((self.pods / self.local_pods).max(1))
    }

    /// Indexes of the pods on the measured node.
    pub fn local_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.pods)
            .filter(|i| self.is_local(*i))
            .take(self.local_pods)
    }

    /// `(namespace, name)` of pod `index`.
    #[must_use]
    pub fn pod_key(index: usize) -> (String, String) {
        let deployment = index / PODS_PER_DEPLOYMENT;
        (
            format!("ns-{}", deployment / DEPLOYMENTS_PER_NAMESPACE),
            format!("dep-{deployment}-{}", index % PODS_PER_DEPLOYMENT),
        )
    }

    /// Every Namespace, Pod and `NetworkPolicy`, as one multi-document YAML text.
    #[must_use]
    pub fn yaml(&self) -> String {
        let mut yaml = String::with_capacity(self.pods * 400 + self.policies * 500);
        for n in 0..self.namespaces() {
            yaml.push_str(&Self::namespace_yaml(n));
        }
        for i in 0..self.pods {
            yaml.push_str(&self.pod_yaml(i));
        }
        for p in 0..self.policies {
            yaml.push_str(&self.policy_yaml(p, 0));
        }
        yaml
    }

    #[must_use]
    pub fn namespace_yaml(n: usize) -> String {
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: team-{}, env: {}}}}}\n",
            n % 20,
            ["prod", "stage"][n % 2]
        )
    }

    /// Pod `index` of the cluster.
    #[must_use]
    pub fn pod_yaml(&self, index: usize) -> String {
        let (namespace, name) = Self::pod_key(index);
        let node = if self.is_local(index) {
            self.node.clone()
        } else {
            format!("node-{}", 2 + index % 997)
        };
        Self::pod_document(
            &namespace,
            &name,
            index / PODS_PER_DEPLOYMENT,
            &node,
            Self::pod_ipv4(index),
        )
    }

    /// One more replica of `deployment` (same labels, so the same identity), on a
    /// node other than the measured one, at 10.250.0.0 + `ordinal`: a pod joining.
    #[must_use]
    #[expect(clippy::missing_panics_doc, reason = "benchmarks add a few pods")]
    pub fn joining_pod_yaml(&self, deployment: usize, ordinal: usize) -> String {
        let ip = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + u32::try_from(ordinal).expect("few");
        Self::pod_document(
            &format!("ns-{}", deployment / DEPLOYMENTS_PER_NAMESPACE),
            &format!("dep-{deployment}-joined-{ordinal}"),
            deployment,
            "node-2",
            Ipv4Addr::from(ip),
        )
    }

    fn pod_document(
        namespace: &str,
        name: &str,
        deployment: usize,
        node: &str,
        ip: Ipv4Addr,
    ) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: dep-{deployment}, tier: {}}}}}\nspec: {{nodeName: {node}, containers: [{{name: main, image: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
            ["web", "api", "db"][deployment % 3],
        )
    }

    /// Policy `p`; a `revision` above 0 adds TCP port `9000 + revision` to its first
    /// rule (a policy edit), except for default-deny policies, which have no rule.
    #[must_use]
    pub fn policy_yaml(&self, p: usize, revision: u32) -> String {
        let namespaces = self.namespaces();
        let namespace = p % namespaces;
        let deployment =
            namespace * DEPLOYMENTS_PER_NAMESPACE + p / namespaces % DEPLOYMENTS_PER_NAMESPACE;
        let extra = if revision > 0 {
            format!(", {{port: {}}}", 9000 + revision)
        } else {
            String::new()
        };
        let mut yaml = format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{p}, namespace: ns-{namespace}}}\nspec:\n"
        );
        let _ = match p % 4 {
            // Deployment to deployment in its namespace, on a named port.
            0 => write!(
                yaml,
                "  podSelector: {{matchLabels: {{app: dep-{deployment}}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{podSelector: {{matchLabels: {{app: dep-{}}}}}}}]\n      ports: [{{port: http}}{extra}]\n",
                namespace * DEPLOYMENTS_PER_NAMESPACE
                    + (deployment + 1) % DEPLOYMENTS_PER_NAMESPACE
            ),
            // A tier to a team's namespaces, a port range.
            1 => write!(
                yaml,
                "  podSelector: {{matchLabels: {{tier: api}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{namespaceSelector: {{matchLabels: {{team: team-{}}}}}, podSelector: {{matchExpressions: [{{key: tier, operator: In, values: [db]}}]}}}}]\n      ports: [{{port: 5000, endPort: 5999}}{extra}]\n",
                p % 20
            ),
            // External ranges with holes, and DNS.
            2 => write!(
                yaml,
                "  podSelector: {{matchLabels: {{app: dep-{deployment}}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{ipBlock: {{cidr: 172.{b}.0.0/16, except: [172.{b}.1.0/24]}}}}]\n      ports: [{{port: 443}}{extra}]\n    - ports: [{{protocol: UDP, port: 53}}]\n",
                b = 16 + p % 16
            ),
            // Namespace default deny.
            _ => write!(yaml, "  podSelector: {{}}\n  policyTypes: [Egress]\n"),
        };
        yaml
    }
}

/// A `NetworkPolicy` named `name` in `namespace`, selecting pods by `pod_selector` (YAML,
/// e.g. `{}`), whose one egress rule (TCP 443) allows `blocks` generated ipBlocks: the
/// shape of a cloud provider's published allow list. About one in seven is IPv6; ranges
/// are mostly /20 to /32 with a few /16s and rarer /12s, in sixteen /8s (and /40s of
/// IPv6) that `seed` picks, so the ranges of one list overlap and nest, and lists of
/// different seeds overlap in part. One in eight has one or two `except`s;
/// one in sixteen is written with host bits set. `seed` varies the list,
/// deterministically.
#[must_use]
#[expect(
    clippy::missing_panics_doc,
    reason = "only conversions of numbers known to be small"
)]
pub fn ip_block_policy_yaml(
    name: &str,
    namespace: &str,
    pod_selector: &str,
    blocks: usize,
    seed: u64,
) -> String {
    let mut yaml = String::with_capacity(blocks * 64 + 256);
    let _ = write!(
        yaml,
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  podSelector: {pod_selector}\n  policyTypes: [Egress]\n  egress:\n    - ports: [{{port: 443}}]\n      to:\n"
    );
    let mut random = SplitMix(seed);
    for i in 0..blocks {
        let host_bits = i % 16 == 5;
        let excepts = match i % 8 {
            3 => 1,
            7 => 2,
            _ => 0,
        };
        let (cidr, except) = if i % 7 == 6 {
            // /40 to /128 in sixteen of the /40s of 2600:1f00::/32.
            let len = [40, 44, 48, 48, 52, 56, 56, 64, 64, 128][random.below(10)];
            let window = (seed * 5 + random.next() % 16) % 256;
            let high = 0x2600_1f00_0000_0000_u64 | window << 24 | (random.next() >> 40);
            let addr = (u128::from(high) << 64) | u128::from(random.next());
            let net = |len: u32, addr: u128| {
                let masked = if host_bits {
                    addr
                } else {
                    addr & !(u128::MAX.checked_shr(len).unwrap_or(0))
                };
                format!("{}/{len}", std::net::Ipv6Addr::from(masked))
            };
            let except = (0..excepts)
                .filter(|_| len < 128)
                .map(|_| {
                    let sub = len + 1 + u32::try_from(random.below(8)).expect("small");
                    let sub = sub.min(128);
                    let noise = u128::from(random.next()) << 64 | u128::from(random.next());
                    let keep = !(u128::MAX.checked_shr(len).unwrap_or(0));
                    net(sub, (addr & keep) | (noise & !keep))
                })
                .collect::<Vec<_>>();
            (net(len, addr), except)
        } else {
            let len = match random.below(4096) {
                0 => 12,
                1..16 => 16,
                16..128 => 18,
                draw => [
                    20, 21, 22, 23, 24, 24, 24, 24, 25, 26, 27, 28, 29, 30, 32, 32,
                ][draw % 16],
            };
            let window = seed % 223 * 37 + u64::try_from(random.below(16)).expect("small") * 13;
            let octet = 1 + u32::try_from(window % 223).expect("below 223");
            let addr = octet << 24 | (u32::try_from(random.next() >> 40).expect("24 bits"));
            let net = |len: u32, addr: u32| {
                let masked = if host_bits {
                    addr
                } else {
                    addr & !(u32::MAX.checked_shr(len).unwrap_or(0))
                };
                format!("{}/{len}", Ipv4Addr::from(masked))
            };
            let except = (0..excepts)
                .filter(|_| len < 32)
                .map(|_| {
                    let sub = (len + 1 + u32::try_from(random.below(6)).expect("small")).min(32);
                    let keep = !(u32::MAX.checked_shr(len).unwrap_or(0));
                    let noise = u32::try_from(random.next() >> 32).expect("32 bits");
                    net(sub, (addr & keep) | (noise & !keep))
                })
                .collect::<Vec<_>>();
            (net(len, addr), except)
        };
        if except.is_empty() {
            let _ = writeln!(yaml, "        - ipBlock: {{cidr: '{cidr}'}}");
        } else {
            let _ = writeln!(
                yaml,
                "        - ipBlock: {{cidr: '{cidr}', except: ['{}']}}",
                except.join("', '")
            );
        }
    }
    yaml
}

/// A small, fast, seedable generator (splitmix64), so generated lists need no crate.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("fits")).expect("below n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pods_are_spread_and_counted() {
        let cluster = GeneratedCluster::new(10_000, 1_000);
        let local: Vec<usize> = cluster.local_indexes().collect();
        assert_eq!(local.len(), 100);
        assert_eq!(local[1], 100);
        assert_eq!(cluster.namespaces(), 100);
        assert_eq!(GeneratedCluster::pod_ipv4(255), Ipv4Addr::new(10, 0, 1, 0));
    }

    #[test]
    fn a_revision_changes_only_rules() {
        let cluster = GeneratedCluster::new(1_000, 100);
        assert_ne!(cluster.policy_yaml(0, 0), cluster.policy_yaml(0, 1));
        assert_eq!(cluster.policy_yaml(3, 0), cluster.policy_yaml(3, 1));
    }
}
