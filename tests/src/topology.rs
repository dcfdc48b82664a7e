//! A routed, point-to-point CNI topology like Calico's: one "node" namespace that forwards, and
//! one namespace per pod joined to it by a veth pair.
//!
//! ```text
//!   pod netns                      node netns (forwarding, no uplink)
//!   eth0 10.0.0.1/32  <--veth-->  egXXXXXXXX 169.254.1.1/32, fe80::1/64
//!        fd00::1/128                 route 10.0.0.1/32 dev egXXXXXXXX scope link
//!   default via 169.254.1.1 onlink   route fd00::1/128 dev egXXXXXXXX
//!   default via fe80::1
//! ```
//!
//! Every host-side veth carries the same gateway addresses, so each pod sees an identical,
//! on-link gateway and the node answers ARP and NDP for it itself, with no proxy ARP and no
//! duplicate address detection to wait for.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{self, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

use crate::listener::{Listener, Protocol};
use crate::netns::{self, OwnedNetns};
use crate::probe::{self, ProbeResult};

/// The pods' IPv4 gateway, held by every host-side veth.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 gateway, held by every host-side veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Longest pod name accepted; names become part of a namespace name.
const MAX_POD_NAME: usize = 40;

/// Numbers topologies within this process; with the pid it makes names unique on the machine.
static NEXT_TOPOLOGY: AtomicU32 = AtomicU32::new(0);

/// A node namespace and the pods attached to it. Dropping it deletes every namespace it made,
/// also while a failed test unwinds.
pub struct Topology {
    // Fields drop in order: the pods' namespaces go before the node's.
    pods: Mutex<Pods>,
    node: OwnedNetns,
    /// `egt-<pid>-<n>`: every namespace of this topology is named after it.
    prefix: String,
    /// Distinguishes this topology's host interface names from other topologies' in listings.
    id: u16,
}

#[derive(Default)]
struct Pods {
    by_name: BTreeMap<String, PodSlot>,
    next_interface: u16,
}

/// A pod and the namespace that it lives in, which the topology owns.
struct PodSlot {
    pod: Pod,
    netns: OwnedNetns,
}

impl Topology {
    /// Creates the node namespace, with loopback up and IPv4 and IPv6 forwarding on.
    ///
    /// # Errors
    /// When a namespace cannot be made (not root, iproute2 missing) or configured.
    pub fn new() -> anyhow::Result<Self> {
        let seq = NEXT_TOPOLOGY.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("egt-{}-{seq}", process::id());
        let node = OwnedNetns::create(&format!("{prefix}-node"))?;
        netns::ip(Some(node.name()), &["link", "set", "lo", "up"])?;
        netns::write_sysctls(
            node.name(),
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                // Host veths made from now on skip DAD on their automatic link-local address.
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        Ok(Self {
            pods: Mutex::default(),
            node,
            prefix,
            #[expect(
                clippy::cast_possible_truncation,
                reason = "only a hint in interface names; uniqueness comes from the namespace"
            )]
            id: seq as u16,
        })
    }

    /// The node namespace's name (under /run/netns).
    #[must_use]
    pub fn node_netns(&self) -> &str {
        self.node.name()
    }

    /// A command that runs `program` inside the node namespace, through `nsenter` so that the
    /// program still sees the host's /sys/fs/bpf. Add arguments to it as usual.
    pub fn node_command(&self, program: impl AsRef<OsStr>) -> Command {
        netns::command_in(self.node.name(), program)
    }

    /// Adds a pod with its own namespace, an `eth0` holding `ipv4/32` and `ipv6/128`, default
    /// routes through the node, and the node's routes back to it.
    ///
    /// # Errors
    /// When the name is taken or not `[A-Za-z0-9_-]{1,40}`, an address is used by another pod or
    /// is not a unicast address a pod could hold, or the namespace or links cannot be made.
    pub fn add_pod(&self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> anyhow::Result<Pod> {
        validate_pod(name, ipv4, ipv6)?;
        let mut pods = self.lock_pods();
        ensure!(
            !pods.by_name.contains_key(name),
            "pod {name} exists already"
        );
        if let Some(other) = pods
            .by_name
            .values()
            .find(|slot| slot.pod.ipv4() == ipv4 || slot.pod.ipv6() == ipv6)
        {
            bail!("pod {} already holds {ipv4} or {ipv6}", other.pod.name());
        }
        let host_interface = format!("eg{:04x}{:04x}", self.id, pods.next_interface);
        pods.next_interface = pods.next_interface.wrapping_add(1);

        let netns = OwnedNetns::create(&format!("{}-pod-{name}", self.prefix))?;
        // On failure from here, dropping `netns` deletes the pod namespace; the veth goes too.
        let host_ifindex = self
            .wire_pod(&netns, &host_interface, ipv4, ipv6)
            .inspect_err(|_| {
                let _ = netns::ip(Some(self.node.name()), &["link", "del", &host_interface]);
            })
            .with_context(|| format!("cannot wire pod {name}"))?;
        let pod = Pod {
            inner: Arc::new(PodInfo {
                name: name.to_owned(),
                netns: netns.name().to_owned(),
                host_interface,
                host_ifindex,
                ipv4,
                ipv6,
            }),
        };
        pods.by_name.insert(
            name.to_owned(),
            PodSlot {
                pod: pod.clone(),
                netns,
            },
        );
        Ok(pod)
    }

    /// Creates the veth pair and addresses and routes on both sides; returns the host side's
    /// ifindex in the node namespace.
    fn wire_pod(
        &self,
        pod_netns: &OwnedNetns,
        host_if: &str,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> anyhow::Result<u32> {
        let node = self.node.name();
        let pod = pod_netns.name();
        // eth0's automatic link-local address, made when the veth is, then skips DAD too.
        netns::write_sysctls(
            pod,
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        // The pair is born in the node namespace with its peer already in the pod's: no link of
        // the test ever exists in the root namespace.
        netns::ip_batch(
            node,
            &[
                format!("link add {host_if} type veth peer name eth0 netns {pod}"),
                format!("addr add {GATEWAY_V4}/32 dev {host_if}"),
                format!("addr add {GATEWAY_V6}/64 dev {host_if} nodad"),
                format!("link set {host_if} up"),
            ],
        )?;
        netns::ip_batch(
            pod,
            &[
                "link set lo up".to_owned(),
                "link set eth0 up".to_owned(),
                format!("addr add {ipv4}/32 dev eth0"),
                format!("addr add {ipv6}/128 dev eth0 nodad"),
                format!("route add 0.0.0.0/0 via {GATEWAY_V4} dev eth0 onlink"),
                // `::/0`, not `default`: in a batch `default` alone would mean IPv4.
                format!("route add ::/0 via {GATEWAY_V6} dev eth0"),
            ],
        )?;
        netns::ip_batch(
            node,
            &[
                format!("route add {ipv4}/32 dev {host_if} scope link"),
                format!("route add {ipv6}/128 dev {host_if}"),
            ],
        )?;
        let ifindex = netns::run_in(node, || nix::net::if_::if_nametoindex(host_if))?
            .with_context(|| format!("no interface {host_if} in netns {node}"))?;
        Ok(ifindex)
    }

    /// Deletes a pod: its veth (and with it the node's routes to it) at once, then its namespace.
    /// Handles to the pod stay valid, but their probes and commands fail.
    ///
    /// # Errors
    /// When there is no such pod, or the veth or namespace cannot be deleted.
    pub fn remove_pod(&self, name: &str) -> anyhow::Result<()> {
        let slot = self
            .lock_pods()
            .by_name
            .remove(name)
            .with_context(|| format!("no pod {name}"))?;
        // Deleting the namespace alone would leave the veth and routes to the kernel's
        // asynchronous namespace cleanup; the pod would linger, reachable, for a while.
        let unlinked = netns::ip(
            Some(self.node.name()),
            &["link", "del", slot.pod.host_interface()],
        );
        slot.netns.delete()?;
        unlinked
    }

    /// The pod called `name`, if it exists.
    #[must_use]
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.lock_pods()
            .by_name
            .get(name)
            .map(|slot| slot.pod.clone())
    }

    /// Every pod, by name.
    #[must_use]
    pub fn pods(&self) -> Vec<Pod> {
        self.lock_pods()
            .by_name
            .values()
            .map(|slot| slot.pod.clone())
            .collect()
    }

    /// The names of every namespace that this topology holds now, node first.
    #[must_use]
    pub fn netns_names(&self) -> Vec<String> {
        let pods = self.lock_pods();
        std::iter::once(self.node.name().to_owned())
            .chain(
                pods.by_name
                    .values()
                    .map(|slot| slot.pod.netns().to_owned()),
            )
            .collect()
    }

    fn lock_pods(&self) -> MutexGuard<'_, Pods> {
        // Nothing that holds the lock leaves the map half-updated, so a poisoned one is fine.
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("node", &self.node.name())
            .field("pods", &self.pods())
            .finish_non_exhaustive()
    }
}

fn validate_pod(name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> anyhow::Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_POD_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "pod name {name:?} is not [A-Za-z0-9_-]{{1,{MAX_POD_NAME}}}"
    );
    ensure!(
        !(ipv4.is_unspecified()
            || ipv4.is_loopback()
            || ipv4.is_multicast()
            || ipv4.is_broadcast()
            || ipv4.is_link_local()),
        "{ipv4} cannot be a pod address"
    );
    ensure!(
        !(ipv6.is_unspecified()
            || ipv6.is_loopback()
            || ipv6.is_multicast()
            || ipv6.is_unicast_link_local()),
        "{ipv6} cannot be a pod address"
    );
    Ok(())
}

/// A handle to a pod; cheap to clone. The [`Topology`] owns the pod's namespace.
#[derive(Clone, Debug)]
pub struct Pod {
    inner: Arc<PodInfo>,
}

#[derive(Debug)]
struct PodInfo {
    name: String,
    netns: String,
    host_interface: String,
    host_ifindex: u32,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Pod {
    /// The name given to [`Topology::add_pod`].
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The pod namespace's name (under /run/netns).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The host side of the pod's veth, in the node namespace: where a CNI-style datapath
    /// attaches its per-pod programs.
    #[must_use]
    pub fn host_interface(&self) -> &str {
        &self.inner.host_interface
    }

    /// The ifindex of [`Pod::host_interface`] in the node namespace.
    #[must_use]
    pub fn host_ifindex(&self) -> u32 {
        self.inner.host_ifindex
    }

    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        self.inner.ipv4
    }

    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        self.inner.ipv6
    }

    /// The pod's IPv4 address with `port`.
    #[must_use]
    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4()), port)
    }

    /// The pod's IPv6 address with `port`.
    #[must_use]
    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6()), port)
    }

    /// A command that runs `program` inside the pod namespace (through `nsenter`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns::command_in(self.netns(), program)
    }

    /// Connects over TCP from this pod and has a line echoed back.
    #[must_use]
    pub fn tcp_connect(&self, dst: SocketAddr, timeout: Duration) -> ProbeResult {
        probe::stream_exchange(self.netns(), Protocol::Tcp, dst, timeout)
    }

    /// Connects over SCTP from this pod and has a line echoed back; [`ProbeResult::Unsupported`]
    /// when the kernel has no SCTP.
    #[must_use]
    pub fn sctp_connect(&self, dst: SocketAddr, timeout: Duration) -> ProbeResult {
        probe::stream_exchange(self.netns(), Protocol::Sctp, dst, timeout)
    }

    /// Sends a UDP datagram from this pod and waits for its echo.
    #[must_use]
    pub fn udp_request(&self, dst: SocketAddr, timeout: Duration) -> ProbeResult {
        probe::udp_request(self.netns(), dst, timeout)
    }

    /// Sends one ICMP or `ICMPv6` echo request from this pod and waits for the reply.
    #[must_use]
    pub fn ping(&self, dst: IpAddr, timeout: Duration) -> ProbeResult {
        probe::ping(self.netns(), dst, timeout)
    }

    /// Serves TCP echo on `port` of the pod's IPv4 and IPv6 addresses (`0`: any free port, see
    /// [`Listener::port`]) until the listener is dropped.
    ///
    /// # Errors
    /// When the port is taken or the thread cannot enter the namespace.
    pub fn serve_tcp(&self, port: u16) -> anyhow::Result<Listener> {
        Listener::serve(self.netns(), Protocol::Tcp, self.addresses(), port)
    }

    /// Serves UDP echo, like [`Pod::serve_tcp`].
    ///
    /// # Errors
    /// As [`Pod::serve_tcp`].
    pub fn serve_udp(&self, port: u16) -> anyhow::Result<Listener> {
        Listener::serve(self.netns(), Protocol::Udp, self.addresses(), port)
    }

    /// Serves SCTP echo, like [`Pod::serve_tcp`].
    ///
    /// # Errors
    /// As [`Pod::serve_tcp`], and when the kernel has no SCTP.
    pub fn serve_sctp(&self, port: u16) -> anyhow::Result<Listener> {
        Listener::serve(self.netns(), Protocol::Sctp, self.addresses(), port)
    }

    fn addresses(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.ipv4()), IpAddr::V6(self.ipv6())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_and_addresses_are_checked() {
        let v4 = Ipv4Addr::new(10, 0, 0, 1);
        let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        assert!(validate_pod("web-1_a", v4, v6).is_ok());
        for name in ["", "a/b", "a b", "node.x", &"x".repeat(MAX_POD_NAME + 1)] {
            assert!(validate_pod(name, v4, v6).is_err(), "{name:?}");
        }
        for bad in [Ipv4Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST, GATEWAY_V4] {
            assert!(validate_pod("p", bad, v6).is_err(), "{bad}");
        }
        for bad in [Ipv6Addr::UNSPECIFIED, Ipv6Addr::LOCALHOST, GATEWAY_V6] {
            assert!(validate_pod("p", v4, bad).is_err(), "{bad}");
        }
    }
}
