//! Flow events to userspace through a ring buffer, at most `events_per_second` per
//! endpoint; what the budget or a full buffer refuses is counted as lost.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use egret_common::{
    Reason, Verdict,
    maps::{EVENTS_RING_BYTES, EventBudget, FlowEvent, capacity},
};

use crate::packet::Packet;

const WINDOW_NS: u64 = 1_000_000_000;

#[map]
static EVENTS_V2: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[map]
static EVENT_BUDGET_V1: LruHashMap<u32, EventBudget> = LruHashMap::pinned(capacity::ENDPOINTS, 0);

#[map]
static EVENTS_LOST_V1: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// What happened to a packet, for its event.
#[derive(Clone, Copy)]
pub struct Report {
    pub endpoint: u32,
    pub verdict: Verdict,
    pub reason: Reason,
    pub bytes: u32,
    /// The tier rule that decided (`TIER_RULE_NONE`: NetworkPolicy or the default).
    pub rule: u32,
    /// The packet's one clock reading (`bpf_ktime_get_coarse_ns`).
    pub now: u64,
}

// Not inlined, and two arguments: BPF calls take at most five.
#[inline(never)]
pub fn emit(report: &Report, packet: &Packet) {
    let Report {
        endpoint,
        verdict,
        reason,
        bytes,
        rule,
        now,
    } = *report;
    let per_second = crate::maps::settings().events_per_second;
    if !take_budget(endpoint, now, per_second) {
        lost();
        return;
    }
    let Some(mut entry) = EVENTS_V2.reserve::<FlowEvent>(0) else {
        lost();
        return;
    };
    entry.write(FlowEvent {
        timestamp_ns: now,
        endpoint,
        verdict: verdict as u8,
        reason: reason as u8,
        protocol: packet.protocol,
        is_ipv6: u8::from(packet.is_ipv6),
        src: packet.src,
        dst: packet.dst,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        bytes,
        rule,
        pad: 0,
    });
    entry.submit(0);
}

fn take_budget(endpoint: u32, now: u64, per_second: u32) -> bool {
    if per_second == 0 {
        return false;
    }
    match EVENT_BUDGET_V1.get_ptr_mut(&endpoint) {
        Some(budget) => {
            // SAFETY: the value is this endpoint's budget; a race between CPUs can at
            // worst let a few extra events through in one window.
            unsafe {
                if now.saturating_sub((*budget).window_start_ns) >= WINDOW_NS {
                    (*budget).window_start_ns = now;
                    (*budget).emitted = 1;
                    return true;
                }
                if (*budget).emitted >= per_second {
                    return false;
                }
                (*budget).emitted += 1;
            }
            true
        }
        None => {
            let budget = EventBudget {
                window_start_ns: now,
                emitted: 1,
                pad: 0,
            };
            let _ = EVENT_BUDGET_V1.insert(&endpoint, &budget, 0);
            true
        }
    }
}

fn lost() {
    if let Some(count) = EVENTS_LOST_V1.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; nothing else on this CPU touches it while we run.
        unsafe { *count += 1 };
    }
}
