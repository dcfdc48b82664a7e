//! The endpoint's flows, tracked the way Linux's conntrack assures them: TCP by state
//! (SYN, SYN-ACK, established, closing), other protocols by whether the peer answered.
//!
//! Two LRU tables: established flows live apart from unassured ones (handshakes,
//! unanswered datagrams, closing connections), so a flood of unanswered tuples evicts
//! only its own kind and never an established connection. A flow is promoted when its
//! handshake completes and demoted at its first FIN; the last ACK or a RST removes it.

use egret_common::{
    maps::{
        CT_STAT_INSERT_FAILED, CT_STAT_INSERTED_ESTABLISHED, CT_STAT_INSERTED_UNASSURED,
        CT_STAT_REMOVED_ESTABLISHED, CT_STAT_REMOVED_UNASSURED, FLOW_FIN_FROM_ENDPOINT,
        FLOW_FIN_FROM_PEER, FLOW_FLAG_LEARNT, FLOW_ORIGIN_INBOUND, FLOW_ORIGIN_OUTBOUND,
        FLOW_STATE_ASSURED, FLOW_STATE_CLOSING, FLOW_STATE_ESTABLISHED, FLOW_STATE_NEW,
        FLOW_STATE_REPLIED, FLOW_STATE_SYN_RECV, FLOW_STATE_SYN_SENT, FlowEntry, FlowKey, Settings,
    },
    proto,
};

use crate::{
    maps,
    packet::{Fragment, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SECOND: u64 = 1_000_000_000;
/// `last_seen` is written at most this often: a write per packet would bounce the
/// entry's cache line between CPUs for nothing.
const REFRESH_NS: u64 = NS_PER_SECOND;

/// Which way a packet goes, seen from the endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

/// What the tracker knows of the flow a packet belongs to.
pub struct Tracked {
    pub origin: u8,
    pub policy_epoch: u32,
    /// `FLOW_FLAG_*`.
    pub flags: u8,
}

/// The flow as the endpoint sends it.
#[inline(always)]
pub fn key(packet: &Packet, direction: Direction) -> Option<FlowKey> {
    if packet.fragment == Fragment::Later {
        return None;
    }
    let (src_port, dst_port) = if packet.has_ports() {
        (packet.src_port, packet.dst_port)
    } else {
        let id = packet.echo_id?;
        (id, id)
    };
    Some(match direction {
        Direction::Sent => FlowKey {
            src: packet.src,
            dst: packet.dst,
            src_port,
            dst_port,
            protocol: packet.protocol,
            pad: [0; 3],
        },
        Direction::Received => FlowKey {
            src: packet.dst,
            dst: packet.src,
            src_port: dst_port,
            dst_port: src_port,
            protocol: packet.protocol,
            pad: [0; 3],
        },
    })
}

/// Finds the packet's flow, forgets it if it timed out, refreshes it and moves it
/// along its state machine. One lookup for a packet of an established flow.
#[inline(always)]
pub fn track(
    key: &FlowKey,
    packet: &Packet,
    direction: Direction,
    now: u64,
    settings: &Settings,
) -> Option<Tracked> {
    let (pointer, established) = match maps::established_flow(key) {
        Some(pointer) => (pointer, true),
        None => (maps::unassured_flow(key)?, false),
    };
    // SAFETY: the pointer is to this flow's value in the map. Other CPUs may write the
    // same fields; a race costs at most a stale timestamp or a repeated transition.
    let entry = unsafe { &mut *pointer };
    if now.saturating_sub(entry.last_seen_ns) > timeout_ns(entry.state, settings) {
        remove(key, established);
        return None;
    }
    if now.wrapping_sub(entry.last_seen_ns) >= REFRESH_NS {
        entry.last_seen_ns = now;
    }
    let tracked = Tracked {
        origin: entry.origin,
        policy_epoch: entry.policy_epoch,
        flags: entry.flags,
    };
    let original = (direction == Direction::Sent) == (entry.origin == FLOW_ORIGIN_OUTBOUND);
    if packet.protocol == proto::TCP {
        advance_tcp(key, entry, established, packet.tcp_flags, direction);
    } else if !established {
        advance_other(key, entry, original);
    }
    Some(tracked)
}

/// Records the judge's new verdict epoch for a flow the endpoint opened.
#[inline(always)]
pub fn set_epoch(key: &FlowKey, epoch: u32) {
    let pointer = maps::established_flow(key).or_else(|| maps::unassured_flow(key));
    if let Some(pointer) = pointer {
        // SAFETY: as in `track`.
        unsafe { (*pointer).policy_epoch = epoch };
    }
}

/// Marks a flow just opened as opened through a learnt address (`FLOW_FLAG_LEARNT`).
#[inline(never)]
pub fn mark_learnt(key: &FlowKey) {
    if let Some(pointer) = maps::unassured_flow(key) {
        // SAFETY: as in `track`.
        unsafe { (*pointer).flags |= FLOW_FLAG_LEARNT };
    }
}

/// Starts tracking a flow the endpoint sent (allowed) or received, if the packet may
/// open one: a TCP SYN the endpoint received, any allowed TCP packet but RST and FIN
/// it sent (so flows opened before Egret came are picked up), an echo request, or a
/// datagram. Returns whether a flow was opened.
#[inline(never)]
pub fn open(key: &FlowKey, packet: &Packet, direction: Direction, now: u64, epoch: u32) -> bool {
    let flags = packet.tcp_flags;
    let state = match packet.protocol {
        proto::TCP if flags & (TCP_RST | TCP_FIN) != 0 => return false,
        proto::TCP if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => FLOW_STATE_SYN_SENT,
        proto::TCP if direction == Direction::Received => return false,
        // Mid-stream: established once the endpoint's next ACK goes out.
        proto::TCP => FLOW_STATE_SYN_RECV,
        proto::ICMP | proto::ICMPV6 if !packet.is_echo_request() => return false,
        _ => FLOW_STATE_NEW,
    };
    let entry = FlowEntry {
        last_seen_ns: now,
        policy_epoch: epoch,
        origin: match direction {
            Direction::Sent => FLOW_ORIGIN_OUTBOUND,
            Direction::Received => FLOW_ORIGIN_INBOUND,
        },
        state,
        fin: 0,
        flags: 0,
    };
    insert(key, &entry, false)
}

/// Forgets a flow, in whichever table it is.
pub fn forget(key: &FlowKey) {
    if maps::established_flow(key).is_some() {
        remove(key, true);
    } else {
        remove(key, false);
    }
}

/// Whether the tracker holds a live flow, without touching it: for ICMP errors, which
/// neither refresh nor move a flow.
pub fn holds(key: &FlowKey, now: u64, settings: &Settings) -> bool {
    let pointer = maps::established_flow(key).or_else(|| maps::unassured_flow(key));
    pointer.is_some_and(|pointer| {
        // SAFETY: as in `track`; a read only.
        let entry = unsafe { &*pointer };
        now.saturating_sub(entry.last_seen_ns) <= timeout_ns(entry.state, settings)
    })
}

pub fn is_reply(tracked: &Tracked) -> bool {
    tracked.origin == FLOW_ORIGIN_INBOUND
}

fn timeout_ns(state: u8, settings: &Settings) -> u64 {
    let seconds = match state {
        FLOW_STATE_ESTABLISHED => settings.timeouts.tcp_established,
        FLOW_STATE_ASSURED => settings.timeouts.other_established,
        FLOW_STATE_CLOSING => settings.timeouts.closing,
        FLOW_STATE_SYN_SENT | FLOW_STATE_SYN_RECV | FLOW_STATE_NEW | FLOW_STATE_REPLIED => {
            settings.timeouts.unassured
        }
        _ => {
            crate::diagnostics::impossible_flow_state(state);
            0
        }
    };
    u64::from(seconds) * NS_PER_SECOND
}

#[inline(never)]
fn advance_tcp(
    key: &FlowKey,
    entry: &mut FlowEntry,
    established: bool,
    flags: u8,
    direction: Direction,
) {
    if flags & TCP_RST != 0 {
        remove(key, established);
        return;
    }
    let original = (direction == Direction::Sent) == (entry.origin == FLOW_ORIGIN_OUTBOUND);
    if flags & TCP_FIN != 0 {
        let fin = entry.fin
            | match direction {
                Direction::Sent => FLOW_FIN_FROM_ENDPOINT,
                Direction::Received => FLOW_FIN_FROM_PEER,
            };
        if established {
            // Closing connections leave the established table, so the ones that never
            // see their last ACK age out among the unassured.
            let mut closing = *entry;
            closing.state = FLOW_STATE_CLOSING;
            closing.fin = fin;
            if insert(key, &closing, false) {
                remove(key, true);
            }
        } else {
            entry.state = FLOW_STATE_CLOSING;
            entry.fin = fin;
        }
        return;
    }
    match entry.state {
        FLOW_STATE_SYN_SENT if !original && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
            entry.state = FLOW_STATE_SYN_RECV;
        }
        FLOW_STATE_SYN_RECV if original && flags & (TCP_SYN | TCP_ACK) == TCP_ACK => {
            promote(key, entry, FLOW_STATE_ESTABLISHED);
        }
        FLOW_STATE_CLOSING
            if flags & TCP_ACK != 0 && entry.fin == FLOW_FIN_FROM_ENDPOINT | FLOW_FIN_FROM_PEER =>
        {
            // The last ACK: both sides have closed and been acknowledged.
            remove(key, false);
        }
        _ => {}
    }
}

fn advance_other(key: &FlowKey, entry: &mut FlowEntry, original: bool) {
    match entry.state {
        FLOW_STATE_NEW if !original => entry.state = FLOW_STATE_REPLIED,
        FLOW_STATE_REPLIED if original => promote(key, entry, FLOW_STATE_ASSURED),
        _ => {}
    }
}

/// Moves an unassured flow to the established table. When that table refuses, the
/// flow stays where it is, counted: it still works, only unprotected.
fn promote(key: &FlowKey, entry: &mut FlowEntry, state: u8) {
    let mut assured = *entry;
    assured.state = state;
    if insert(key, &assured, true) {
        remove(key, false);
    } else {
        entry.state = state;
    }
}

fn insert(key: &FlowKey, entry: &FlowEntry, established: bool) -> bool {
    if maps::insert_flow(key, entry, established) {
        maps::ct_stat(if established {
            CT_STAT_INSERTED_ESTABLISHED
        } else {
            CT_STAT_INSERTED_UNASSURED
        });
        true
    } else {
        maps::ct_stat(CT_STAT_INSERT_FAILED);
        crate::diagnostics::insert_failed(established);
        false
    }
}

fn remove(key: &FlowKey, established: bool) {
    if maps::remove_flow(key, established) {
        maps::ct_stat(if established {
            CT_STAT_REMOVED_ESTABLISHED
        } else {
            CT_STAT_REMOVED_UNASSURED
        });
    }
}
