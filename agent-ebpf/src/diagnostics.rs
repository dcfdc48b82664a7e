//! Rare kernel-side conditions, logged through aya-log to the agent's `tracing` output
//! (target `egret::kernel`). The agent sets the level at load time from its filter, so
//! with the target off each call costs one load and a branch; none is on the path
//! every packet takes.

use aya_log_ebpf::{debug, error, warn};

/// The connection tracker could not insert a flow.
#[inline(never)]
pub fn insert_failed(established: bool) {
    warn!(
        &(),
        "conntrack: the {} table refused a flow",
        if established {
            "established"
        } else {
            "unassured"
        }
    );
}

/// An endpoint numbered beyond the counter array's rows: counted in the overflow row.
#[inline(never)]
pub fn counter_overflow(endpoint: u32) {
    debug!(
        &(),
        "counters: endpoint {} counted in the overflow row", endpoint
    );
}

/// The parser gave up on a packet's headers.
#[inline(never)]
pub fn malformed(endpoint: u32, ethertype: u16) {
    debug!(
        &(),
        "parser: endpoint {} sent a malformed packet (ethertype {:x})", endpoint, ethertype
    );
}

/// A flow entry in a state the tracker never writes.
#[inline(never)]
pub fn impossible_flow_state(state: u8) {
    error!(&(), "conntrack: flow entry in unknown state {}", state);
}
