//! End to end on real packets: the agent, in a node namespace, enforces an ipBlock egress
//! policy on a pod's host-side interface; allowed connections pass, others are dropped by
//! the kernel and counted.

use std::time::Duration;

use egret_testbed::{
    Pod, Topology,
    manifests::{PodManifest, cluster_yaml, write_file},
};

mod common;

use common::{PROBE_TIMEOUT, add_pod, counted, start_agent};

#[test]
fn ipblock_policy_drops_what_it_does_not_allow() {
    if !egret_testbed::require_root("ipblock_policy_drops_what_it_does_not_allow") {
        return;
    }
    let topology = Topology::new().expect("topology");
    let client = add_pod(&topology, "client", 1);
    let allowed = add_pod(&topology, "allowed", 2);
    let other = add_pod(&topology, "other", 3);
    let _echoes = [&client, &allowed, &other].map(|pod| pod.serve_tcp(8080).unwrap());
    let manifests = write_manifests(&client, &allowed, &other);

    // Before the agent: everything flows.
    assert!(
        client
            .tcp_connect(other.addr_v4(8080), PROBE_TIMEOUT)
            .is_connected()
    );

    let mut agent = start_agent(&topology, manifests.path(), &[]);
    let ifindexes = [&client, &allowed, &other].map(Pod::host_ifindex);
    agent
        .wait_attached(&ifindexes, Duration::from_secs(20))
        .unwrap();

    let to_allowed = client.tcp_connect(allowed.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        to_allowed.is_connected(),
        "client -> allowed (in the ipBlock): {to_allowed}\n{}",
        agent.log()
    );
    let to_other = client.tcp_connect(other.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        to_other.is_timed_out(),
        "client -> other (not in the ipBlock) must be dropped: {to_other}"
    );
    let to_other_v6 = client.tcp_connect(other.addr_v6(8080), PROBE_TIMEOUT);
    assert!(
        to_other_v6.is_timed_out(),
        "client -> other over IPv6 must be dropped: {to_other_v6}"
    );
    // Replies of connections the isolated pod accepted pass, whatever its policy says.
    let to_client = other.tcp_connect(client.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        to_client.is_connected(),
        "replies from the isolated client must pass: {to_client}"
    );
    let to_client_v6 = other.tcp_connect(client.addr_v6(8080), PROBE_TIMEOUT);
    assert!(
        to_client_v6.is_connected(),
        "replies from the isolated client must pass (IPv6): {to_client_v6}"
    );
    // Pods no policy selects are unrestricted.
    let from_other = other.tcp_connect(allowed.addr_v4(8080), PROBE_TIMEOUT);
    assert!(
        from_other.is_connected(),
        "other is not isolated: {from_other}"
    );
    let from_other_v6 = other.tcp_connect(allowed.addr_v6(8080), PROBE_TIMEOUT);
    assert!(
        from_other_v6.is_connected(),
        "other is not isolated (IPv6): {from_other_v6}"
    );

    let denied = counted(&agent, &topology, client.host_ifindex(), "deny");
    assert!(
        denied >= 2,
        "the kernel counted {denied} denied packets for the client, expected the SYNs"
    );
    assert_eq!(
        counted(&agent, &topology, other.host_ifindex(), "deny"),
        0,
        "other was never denied"
    );
}

fn write_manifests(client: &Pod, allowed: &Pod, other: &Pod) -> tempfile::TempDir {
    let manifests = tempfile::tempdir().unwrap();
    let pods = [
        PodManifest {
            pod: client,
            namespace: "shop",
            labels: &[("app", "client")],
            ports: &[],
        },
        PodManifest {
            pod: allowed,
            namespace: "shop",
            labels: &[("app", "db")],
            ports: &[],
        },
        PodManifest {
            pod: other,
            namespace: "shop",
            labels: &[("app", "other")],
            ports: &[],
        },
    ];
    write_file(manifests.path(), "cluster.yaml", &cluster_yaml(&pods)).unwrap();
    write_file(manifests.path(), "policy.yaml", POLICY).unwrap();
    manifests
}

const POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: client-to-db-only
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: client
  policyTypes: [Egress]
  egress:
    - to:
        - ipBlock:
            cidr: 10.77.0.2/32
";
