//! `domainNames` rules in the kernel: DNS answers reaching an endpoint that has domain
//! rules are read before the endpoint sees them, and every address given for one of
//! its names is learnt (with its TTL) for that endpoint alone. The verdict then looks
//! a destination up among the learnt addresses.
//!
//! The message is copied into a per-CPU buffer and walked by the shared
//! [`egret_common::dns::Walk`] under `bpf_loop`, so the verifier checks one record's
//! step once instead of every iteration of every loop.

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, generated::bpf_loop},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::sk_buff::SkBuff,
};
use egret_common::{
    dns::{
        Answer, DNS_STAT_DROPPED, DNS_STAT_EVICTED, DNS_STAT_EXPIRED, DNS_STAT_INVALID,
        DNS_STAT_LEARNT, DNS_STAT_REFRESHED, DNS_STAT_RESPONSES, DNS_STAT_SLOTS, DnsSettings,
        LEARNT_FLAG_EXPIRY_COUNTED, Learnt, LearntKey, MAX_ADDRESSES, MAX_STEPS, MESSAGE_MAX,
        Message, NameEntry, NameKey, Patterns, SLOTS_PER_NAME, SlotKey, Step, Walk,
    },
    maps::{Endpoint, capacity},
    proto,
};

use crate::packet::Packet;

/// DNS servers answer from this port (RFC 1035), over UDP and TCP.
const DNS_PORT: u16 = 53;
const NS_PER_SECOND: u64 = 1_000_000_000;
const SLACK: usize = 64;

#[map]
static DNS_NAMES_V1: HashMap<NameKey, NameEntry> = HashMap::pinned(capacity::DNS_NAMES, 0);

#[map]
static DNS_LEARNT_V1: HashMap<LearntKey, Learnt> = HashMap::pinned(capacity::DNS_LEARNT, 0);

/// An LRU, sized like the learnt table: a ring slot of a pattern long gone may go.
#[map]
static DNS_SLOTS_V1: LruHashMap<SlotKey, [u8; 16]> = LruHashMap::pinned(capacity::DNS_LEARNT, 0);

#[map]
static DNS_CURSOR_V1: LruHashMap<NameKey, u32> = LruHashMap::pinned(capacity::DNS_NAMES, 0);

#[map]
static DNS_SETTINGS_V1: Array<DnsSettings> = Array::pinned(1, 0);

#[map]
static DNS_STATS_V1: PerCpuArray<u64> = PerCpuArray::pinned(DNS_STAT_SLOTS, 0);

/// The message and the walk's state: far beyond the 512-byte stack.
#[map]
static DNS_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    /// The endpoint's policy table: whose patterns the walk matches.
    table: u32,
    len: u32,
    /// The endpoint whose addresses are learnt, and when.
    endpoint: u32,
    pad: u32,
    now: u64,
    walk: Walk,
    /// Spare bytes past `MESSAGE_MAX`: a word read at a masked offset stays inside, and
    /// so do the reads the compiler makes at a masked base plus a small constant.
    bytes: [u8; MESSAGE_MAX + SLACK],
}

struct Buffer<'a> {
    bytes: &'a [u8; MESSAGE_MAX + SLACK],
    len: usize,
}

impl Message for Buffer<'_> {
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn byte(&self, at: usize) -> Option<u8> {
        if at < self.len {
            Some(self.bytes[at & (MESSAGE_MAX - 1)])
        } else {
            None
        }
    }

    #[inline(always)]
    fn word(&self, at: usize) -> u64 {
        let at = at & (MESSAGE_MAX - 1);
        // SAFETY: `at + 8 <= MESSAGE_MAX + SLACK`, inside the array.
        unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(at).cast::<u64>()) }
    }
}

/// The patterns of one policy table, as the agent wrote them.
struct TablePatterns(u32);

impl Patterns for TablePatterns {
    #[inline(always)]
    fn contains(&self, pattern: u64) -> bool {
        let key = NameKey {
            owner: self.0,
            pad: 0,
            pattern,
        };
        // SAFETY: only presence is read.
        unsafe { DNS_NAMES_V1.get(&key) }.is_some()
    }
}

/// A packet reaching an endpoint with domain rules: if it is a DNS answer, learns what
/// it says. The caller has parsed it; `l4` is its transport header's offset.
#[inline(always)]
pub fn is_answer(packet: &Packet) -> bool {
    packet.src_port == DNS_PORT && matches!(packet.protocol, proto::UDP | proto::TCP)
}

#[inline(never)]
pub fn learn(skb: &SkBuff, packet: &Packet, endpoint: &Endpoint, now: u64) {
    let Some(start) = message_start(skb, packet) else {
        return;
    };
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch; nothing else on this CPU uses it while we run.
    let scratch = unsafe { &mut *scratch };
    stat(DNS_STAT_RESPONSES);
    let (offset, limit) = start;
    let available = (skb.len() as usize).saturating_sub(offset);
    let mut len = if available < limit { available } else { limit };
    if len > MESSAGE_MAX {
        len = MESSAGE_MAX;
    }
    if len < 12 {
        stat(DNS_STAT_INVALID);
        return;
    }
    // SAFETY: `len` is at most MESSAGE_MAX, inside the buffer.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            skb.skb.cast(),
            offset as u32,
            scratch.bytes.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if loaded != 0 {
        stat(DNS_STAT_INVALID);
        return;
    }
    scratch.len = len as u32;
    scratch.table = endpoint.table;
    let started = {
        let message = Buffer {
            bytes: &scratch.bytes,
            len,
        };
        scratch.walk.start(&message)
    };
    if !started {
        stat(DNS_STAT_INVALID);
        return;
    }
    // The context must point to the stack (or be null): the step finds the per-CPU
    // scratch itself.
    // SAFETY: a helper call with a callback of the signature bpf_loop expects.
    unsafe {
        bpf_loop(
            MAX_STEPS,
            step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    if !scratch.walk.is_done() {
        stat(DNS_STAT_INVALID);
        return;
    }
    let overflow = scratch.walk.overflow;
    scratch.now = now;
    scratch.endpoint = endpoint.id;
    // One address per iteration: the verifier checks one write, not sixteen.
    // SAFETY: a helper call with a callback of the signature bpf_loop expects.
    unsafe {
        bpf_loop(
            scratch.walk.found.min(MAX_ADDRESSES as u32),
            remember_one as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    for _ in 0..overflow.min(MAX_ADDRESSES as u32) {
        stat(DNS_STAT_DROPPED);
    }
}

/// Learns the walk's `index`th address, under `bpf_loop`.
extern "C" fn remember_one(index: u32, _context: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch, as in `step`.
    let scratch = unsafe { &*scratch };
    let settings = DNS_SETTINGS_V1.get(0).unwrap_or(&DnsSettings::DEFAULT);
    let answer = &scratch.walk.answers[index as usize & (MAX_ADDRESSES - 1)];
    remember(
        scratch.endpoint,
        answer,
        scratch.now,
        settings.min_ttl_s,
        settings.grace_s,
    );
    0
}

/// One record of the walk, under `bpf_loop`: 0 goes on, 1 stops.
extern "C" fn step(_index: u32, _context: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch; `learn`, which filled it, waits for this loop.
    let scratch = unsafe { &mut *scratch };
    let len = (scratch.len as usize).min(MESSAGE_MAX);
    let message = Buffer {
        bytes: &scratch.bytes,
        len,
    };
    match scratch.walk.step(&message, &TablePatterns(scratch.table)) {
        Step::Continue => 0,
        Step::Done | Step::Invalid => 1,
    }
}

/// Where the DNS message starts and how long it says it is: after the UDP header, or
/// after the TCP header and the message's 2-byte length (one message per segment).
#[inline(always)]
fn message_start(skb: &SkBuff, packet: &Packet) -> Option<(usize, usize)> {
    let l4 = packet.l4 as usize;
    match packet.protocol {
        proto::UDP => Some((l4 + 8, MESSAGE_MAX)),
        _ => {
            let data_offset: u8 = skb.load(l4 + 12).ok()?;
            let header = ((data_offset >> 4) as usize) * 4;
            if header < 20 {
                return None;
            }
            let length: u16 = skb.load(l4 + header).ok()?;
            Some((l4 + header + 2, u16::from_be(length) as usize))
        }
    }
}

/// Writes one learnt address: refreshes it when the same pattern taught it before,
/// else takes the pattern's next ring slot (pushing out the oldest address there).
#[inline(always)]
fn remember(endpoint: u32, answer: &Answer, now: u64, min_ttl: u32, grace: u32) {
    let ttl = if answer.ttl < min_ttl {
        min_ttl
    } else {
        answer.ttl
    };
    let expires_ns = now + (u64::from(ttl) + u64::from(grace)) * NS_PER_SECOND;
    let key = LearntKey {
        endpoint,
        addr: answer.addr,
    };
    if let Some(held) = DNS_LEARNT_V1.get_ptr_mut(&key) {
        // SAFETY: this entry's value; a racing writer costs at most a stale expiry.
        let held = unsafe { &mut *held };
        if held.pattern == answer.pattern {
            if expires_ns > held.expires_ns {
                held.expires_ns = expires_ns;
            }
            held.learnt_ns = now;
            held.ttl = answer.ttl;
            held.flags = 0;
            stat(DNS_STAT_REFRESHED);
            return;
        }
    }
    let cursor_key = NameKey {
        owner: endpoint,
        pad: 0,
        pattern: answer.pattern,
    };
    let slot = match DNS_CURSOR_V1.get_ptr_mut(&cursor_key) {
        // SAFETY: this pattern's cursor; a race may give two answers one slot, which
        // only loses the older of them early.
        Some(cursor) => unsafe {
            let slot = *cursor;
            *cursor = slot.wrapping_add(1);
            slot
        },
        None => {
            let _ = DNS_CURSOR_V1.insert(&cursor_key, &1, 0);
            0
        }
    } % SLOTS_PER_NAME;
    let slot_key = SlotKey {
        endpoint,
        slot,
        pattern: answer.pattern,
    };
    // SAFETY: values are written whole.
    if let Some(old) = unsafe { DNS_SLOTS_V1.get(&slot_key) } {
        let old_key = LearntKey {
            endpoint,
            addr: *old,
        };
        // SAFETY: as above; a read.
        let still_ours =
            unsafe { DNS_LEARNT_V1.get(&old_key) }.is_some_and(|old| old.pattern == answer.pattern);
        if old_key.addr != answer.addr && still_ours {
            let _ = DNS_LEARNT_V1.remove(&old_key);
            stat(DNS_STAT_EVICTED);
        }
    }
    let _ = DNS_SLOTS_V1.insert(&slot_key, &answer.addr, 0);
    let learnt = Learnt {
        expires_ns,
        pattern: answer.pattern,
        learnt_ns: now,
        ttl: answer.ttl,
        flags: 0,
    };
    if DNS_LEARNT_V1.insert(&key, &learnt, 0).is_ok() {
        stat(DNS_STAT_LEARNT);
    } else {
        stat(DNS_STAT_DROPPED);
    }
}

/// The domain identity of a learnt destination, while it admits connections: before
/// its expiry, or at any time for a flow opened through it (`even_expired`).
#[inline(always)]
pub fn learnt_identity(
    endpoint: &Endpoint,
    addr: &[u8; 16],
    now: u64,
    even_expired: bool,
) -> Option<u32> {
    let key = LearntKey {
        endpoint: endpoint.id,
        addr: *addr,
    };
    let learnt = DNS_LEARNT_V1.get_ptr_mut(&key)?;
    // SAFETY: this entry's value; only the flag is written, racing writers agree.
    let learnt = unsafe { &mut *learnt };
    if now > learnt.expires_ns && !even_expired {
        if learnt.flags & LEARNT_FLAG_EXPIRY_COUNTED == 0 {
            learnt.flags |= LEARNT_FLAG_EXPIRY_COUNTED;
            stat(DNS_STAT_EXPIRED);
        }
        return None;
    }
    let name = NameKey {
        owner: endpoint.table,
        pad: 0,
        pattern: learnt.pattern,
    };
    // SAFETY: values are written whole.
    unsafe { DNS_NAMES_V1.get(&name) }.map(|entry| entry.identity)
}

fn stat(slot: u32) {
    if let Some(value) = DNS_STATS_V1.get_ptr_mut(slot) {
        // SAFETY: per-CPU value; nothing else on this CPU touches it while we run.
        unsafe { *value += 1 };
    }
}
