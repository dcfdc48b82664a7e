//! Flows the endpoint is part of, so replies to connections it accepted pass whatever
//! its egress policy says. Entries expire after an idle timeout; the map is LRU, so a
//! full table forgets the oldest flows rather than refusing new ones.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use egret_common::maps::{
    FLOW_ORIGIN_INBOUND, FLOW_ORIGIN_OUTBOUND, FLOW_TIMEOUT_OTHER_NS, FLOW_TIMEOUT_TCP_NS, FlowKey,
    FlowState,
};
use egret_common::proto;

use crate::{
    maps,
    packet::{Fragment, Packet},
};

/// The flow as the endpoint sends it, for a packet the endpoint sent.
pub fn sent_key(packet: &Packet) -> Option<FlowKey> {
    let (src_port, dst_port) = ports(packet)?;
    Some(FlowKey {
        src: packet.src,
        dst: packet.dst,
        src_port,
        dst_port,
        protocol: packet.protocol,
        pad: [0; 3],
    })
}

/// The flow as the endpoint sends it, for a packet the endpoint received.
pub fn received_key(packet: &Packet) -> Option<FlowKey> {
    let (src_port, dst_port) = ports(packet)?;
    Some(FlowKey {
        src: packet.dst,
        dst: packet.src,
        src_port: dst_port,
        dst_port: src_port,
        protocol: packet.protocol,
        pad: [0; 3],
    })
}

fn ports(packet: &Packet) -> Option<(u16, u16)> {
    if packet.fragment == Fragment::Later {
        return None;
    }
    if packet.has_ports() {
        return Some((packet.src_port, packet.dst_port));
    }
    packet.echo_id.map(|id| (id, id))
}

fn timeout(protocol: u8) -> u64 {
    if protocol == proto::TCP {
        FLOW_TIMEOUT_TCP_NS
    } else {
        FLOW_TIMEOUT_OTHER_NS
    }
}

/// The origin of a live flow, refreshing it.
pub fn touch(key: &FlowKey) -> Option<u8> {
    let state = maps::flow(key)?;
    // SAFETY: the pointer is to this flow's value in the map; concurrent writers store
    // whole u64/u8 fields, so a torn read costs at most a refreshed timestamp.
    unsafe {
        let now = bpf_ktime_get_ns();
        if now.saturating_sub((*state).last_seen_ns) > timeout(key.protocol) {
            return None;
        }
        (*state).last_seen_ns = now;
        Some((*state).origin)
    }
}

/// A packet reached the endpoint: unless it answers a flow the endpoint opened, the
/// endpoint has accepted a flow, and what it sends back is a reply.
#[inline(never)]
pub fn on_received(packet: &Packet) {
    let Some(key) = received_key(packet) else {
        return;
    };
    if touch(&key).is_some() {
        return;
    }
    record(&key, FLOW_ORIGIN_INBOUND);
}

/// The origin of the live flow the endpoint's packet belongs to, if any.
// Not inlined: the key lives in this frame only, which keeps the verifier's combined
// stack limit (512 bytes) away from the caller's.
#[inline(never)]
pub fn sent_flow_origin(packet: &Packet) -> Option<u8> {
    touch(&sent_key(packet)?)
}

/// The endpoint sent an allowed packet: remember the flow if it opened it. Returns
/// whether the packet opened a flow not seen before.
#[inline(never)]
pub fn on_sent_allowed(packet: &Packet) -> bool {
    let Some(key) = sent_key(packet) else {
        return false;
    };
    if touch(&key).is_some() {
        return false;
    }
    record(&key, FLOW_ORIGIN_OUTBOUND);
    true
}

fn record(key: &FlowKey, origin: u8) {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    maps::record_flow(
        key,
        &FlowState {
            last_seen_ns: now,
            origin,
            pad: [0; 7],
        },
    );
}

pub fn is_reply(origin: u8) -> bool {
    origin == FLOW_ORIGIN_INBOUND
}
