//! Egret: an eBPF egress firewall for Kubernetes `NetworkPolicies`.
//!
//! Data flows one way: `source` -> `state` -> `policy` -> `compile` -> `datapath`.

pub mod admin_client;
pub mod agent;
pub mod compile;
pub mod datapath;
pub mod node;
pub mod observe;
pub mod policy;
pub mod simulate;
pub mod source;
pub mod state;
#[cfg(test)]
mod testing;
