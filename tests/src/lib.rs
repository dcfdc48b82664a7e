//! Network-namespace test topologies for Egret: a routed, point-to-point CNI layout like
//! Calico's, built from scratch in namespaces that this library creates and deletes, plus probes
//! and echo listeners that run inside the pods.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! let topology = egret_testbed::Topology::new()?;
//! let client = topology.add_pod("client", "10.0.0.1".parse()?, "fd00:e6e7::1".parse()?)?;
//! let server = topology.add_pod("server", "10.0.0.2".parse()?, "fd00:e6e7::2".parse()?)?;
//! let _echo = server.serve_tcp(8080)?;
//! assert!(client.tcp_connect(server.addr_v4(8080), Duration::from_secs(2)).is_connected());
//! # anyhow::Ok(())
//! ```
//!
//! # Containment
//! Nothing here touches the root namespace: veth pairs are created inside the node namespace
//! with their peer already in the pod's, and the node namespace has no uplink and no default
//! route. Probes must only ever target addresses of pods in a topology the test made (or
//! addresses that the node does not route, to see them fail): traffic to anything else has
//! nowhere to go, and keeping it that way is the caller's duty as much as this library's.
//!
//! # Bounds
//! Every wait has a timeout and every loop a bound in count and time: probes take their
//! timeout, listeners stop when dropped (and after 15 minutes regardless).
//!
//! # Privilege
//! Creating namespaces needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`); tests call
//! [`require_root`] first.

pub mod agent;
pub mod apiserver;
pub mod cluster;
pub mod dns;
pub mod flood;
pub mod frames;
mod listener;
pub mod manifests;
mod netns;
pub mod pinned;
mod probe;
mod topology;

pub use listener::{Listener, Protocol};
pub use probe::ProbeResult;
pub use topology::{GATEWAY_V4, GATEWAY_V6, Pod, Topology};

/// Whether the process runs as root, as the topology needs.
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For privileged tests: `true` when running as root; otherwise prints that `test` is skipped
/// and returns `false`.
///
/// ```no_run
/// if !egret_testbed::require_root("pods_talk") {
///     return;
/// }
/// ```
#[must_use]
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!("skipping {test}: network namespaces need root");
    false
}

/// Runs `work` on a new thread inside network namespace `netns` (namespaces are per
/// thread) and returns its result; a panic in `work` is resumed here.
///
/// # Panics
/// When the namespace cannot be entered.
pub fn run_in_netns<T: Send>(netns: &str, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            netns::enter(netns).expect("entering the test's network namespace");
            work()
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
