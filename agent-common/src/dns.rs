//! The DNS response walker of `domainNames` rules, shared by the kernel program that
//! reads a pod's DNS answers and by the agent (which hashes its policies' names with
//! the same functions, and property-tests this code).
//!
//! The walk is a bounded state machine: [`Walk::start`] checks the header, and each
//! [`Walk::step`] reads one label or compression pointer (and, at a name's end, the
//! rest of its record), so the kernel runs it under `bpf_loop` and the verifier checks
//! one step, not every iteration. Every loop inside a step has a constant bound
//! (8-byte words per label, labels per name, chain links), and so has the walk: labels
//! per name, compression hops (a pointer must point strictly before every offset the
//! name has used, so pointers cannot loop), answers, steps.
//!
//! Names are matched by hash, never by text. Each label is hashed case-insensitively;
//! the hash of every label-aligned suffix folds right to left over the label hashes,
//! so an exact name is one lookup of the whole name's [`exact_key`] and a `*.` wildcard
//! is one lookup of [`wildcard_key`] per proper suffix (never the whole name: `*.b.c`
//! matches `a.b.c` and `x.a.b.c`, not `b.c`). The most specific match wins (the exact
//! name, then the longest suffix); the agent gives each pattern's entries everything
//! the patterns covering it allow, so the choice never narrows a verdict.
//!
//! A response that is not a well-formed answer (not a response, an error code, not one
//! question, a truncated record, a bad or looping pointer, a name over the bounds)
//! learns nothing.
#![expect(
    clippy::inline_always,
    reason = "the kernel's copy runs under bpf_loop: one step, inlined, is what the verifier checks"
)]
#![expect(
    clippy::cast_possible_truncation,
    reason = "offsets and lengths are below MESSAGE_MAX (4096) and label lengths below 64"
)]

/// Bytes of a message the kernel copies and reads; longer messages are read up to here
/// and whatever record crosses the limit makes the walk fail.
pub const MESSAGE_MAX: usize = 4096;
/// Labels in a name (more: the name is not matched, the walk fails).
pub const MAX_LABELS: usize = 16;
/// Compression pointers followed in one name.
pub const MAX_POINTER_HOPS: usize = 8;
/// Answer records walked in one response.
pub const MAX_ANSWERS: u32 = 32;
/// CNAME targets remembered in one response (a chain of this many links).
pub const MAX_CHAIN: usize = 8;
/// Addresses learnt from one response.
pub const MAX_ADDRESSES: usize = 16;
/// Steps a whole walk takes at most: every label or pointer of the question, of each
/// answer's owner and of each CNAME target, and one more to see the end.
pub const MAX_STEPS: u32 = (2 * MAX_ANSWERS + 1) * (MAX_LABELS + MAX_POINTER_HOPS + 1) as u32 + 1;

const NAME_MAX: usize = 255;
const LABEL_MAX: usize = 63;
const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

const _: () = assert!(MESSAGE_MAX.is_power_of_two());
const _: () = assert!(MAX_LABELS.is_power_of_two());
const _: () = assert!(MAX_CHAIN.is_power_of_two());
const _: () = assert!(MAX_ADDRESSES.is_power_of_two());

/// A DNS message as the walker reads it.
pub trait Message {
    /// Bytes of the message (at most [`MESSAGE_MAX`]).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The byte at `at`, `None` past the end.
    fn byte(&self, at: usize) -> Option<u8>;
    /// Eight bytes from `at` (which is inside the message), little-endian; bytes past
    /// the end may read as anything (the caller masks them).
    fn word(&self, at: usize) -> u64;
}

/// The endpoint's domain patterns, by key ([`exact_key`], [`wildcard_key`]).
pub trait Patterns {
    fn contains(&self, key: u64) -> bool;
}

/// A message held in a byte slice (the agent, tests).
impl Message for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self).min(MESSAGE_MAX)
    }

    fn byte(&self, at: usize) -> Option<u8> {
        if at < Message::len(self) {
            self.get(at).copied()
        } else {
            None
        }
    }

    fn word(&self, at: usize) -> u64 {
        let mut bytes = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            if let Some(b) = self.get(at + i) {
                bytes[i] = *b;
            }
            i += 1;
        }
        u64::from_le_bytes(bytes)
    }
}

/// A name that a CNAME record made part of an allowed name's answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChainLink {
    /// [`name_hash`] of the CNAME's target.
    pub name: u64,
    /// The pattern key that allowed the chain.
    pub pattern: u64,
}

/// An address the response gave for an allowed name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Answer {
    /// IPv4-mapped or IPv6, as in the policy maps.
    pub addr: [u8; 16],
    /// The record's TTL, seconds.
    pub ttl: u32,
    pub pad: u32,
    /// The pattern key ([`exact_key`] or [`wildcard_key`]) the owner name matched.
    pub pattern: u64,
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More records to read.
    Continue,
    /// Every record walked: `answers` holds what to learn.
    Done,
    /// The message is not a well-formed answer: learn nothing.
    Invalid,
}

/// Which name the walk is reading.
const NAME_QUESTION: u32 = 0;
const NAME_OWNER: u32 = 1;
const NAME_TARGET: u32 = 2;

const PHASE_NAME: u32 = 0;
const PHASE_DONE: u32 = 2;
const PHASE_INVALID: u32 = 3;

/// Steps to read one name: a label or a pointer each, and the end.
const NAME_STEPS: u32 = (MAX_LABELS + MAX_POINTER_HOPS + 1) as u32;

/// The walk of one response. Plain data so the kernel can keep it in a per-CPU map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// Offset of the next record (while reading a CNAME target: of the record after).
    pub offset: u32,
    /// Answer records still to read.
    pub answers_left: u32,
    pub phase: u32,
    pub chain_len: u32,
    pub found: u32,
    /// Addresses of allowed names beyond [`MAX_ADDRESSES`], not learnt.
    pub overflow: u32,
    /// The name being read: which one, where the next label is, where the name ends
    /// in its record (0: no pointer seen yet), the lowest offset it used, its labels,
    /// bytes, pointers followed and steps taken.
    pub name_kind: u32,
    pub at: u32,
    pub end: u32,
    pub lowest: u32,
    pub labels_read: u32,
    pub length: u32,
    pub hops: u32,
    pub name_steps: u32,
    /// The pattern of the CNAME record whose target is being read.
    pub pattern: u64,
    pub chain: [ChainLink; MAX_CHAIN],
    pub answers: [Answer; MAX_ADDRESSES],
    /// Scratch: the label hashes of the name being read, then its suffix hashes.
    pub labels: [u64; MAX_LABELS],
}

impl Walk {
    pub const EMPTY: Walk = Walk {
        offset: 0,
        answers_left: 0,
        phase: PHASE_INVALID,
        chain_len: 0,
        found: 0,
        overflow: 0,
        name_kind: 0,
        at: 0,
        end: 0,
        lowest: 0,
        labels_read: 0,
        length: 0,
        hops: 0,
        name_steps: 0,
        pattern: 0,
        chain: [ChainLink {
            name: 0,
            pattern: 0,
        }; MAX_CHAIN],
        answers: [Answer {
            addr: [0; 16],
            ttl: 0,
            pad: 0,
            pattern: 0,
        }; MAX_ADDRESSES],
        labels: [0; MAX_LABELS],
    };

    /// Starts the walk of `message` in place: checks that it is a successful response
    /// to one question. Returns false (and the walk is invalid) otherwise.
    #[inline(always)]
    pub fn start<M: Message + ?Sized>(&mut self, message: &M) -> bool {
        self.phase = PHASE_INVALID;
        self.chain_len = 0;
        self.found = 0;
        self.overflow = 0;
        if message.len() < HEADER_LEN {
            return false;
        }
        let (Some(flags), Some(rcode), Some(questions), Some(answers)) = (
            message.byte(2),
            message.byte(3),
            read_u16(message, 4),
            read_u16(message, 6),
        ) else {
            return false;
        };
        // QR set, a standard query (opcode 0), no error (rcode 0).
        if flags & 0x80 == 0 || flags & 0x78 != 0 || rcode & 0x0F != 0 || questions != 1 {
            return false;
        }
        self.answers_left = if u32::from(answers) < MAX_ANSWERS {
            u32::from(answers)
        } else {
            MAX_ANSWERS
        };
        self.begin_name(HEADER_LEN as u32, NAME_QUESTION);
        true
    }

    /// Reads one label or pointer of the current name, and when the name ends, what
    /// follows it in its record.
    #[inline(always)]
    pub fn step<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
    ) -> Step {
        let step = match self.phase {
            PHASE_NAME => match self.name_step(message) {
                Some(true) => self.name_done(message, patterns),
                Some(false) => Step::Continue,
                None => Step::Invalid,
            },
            PHASE_DONE => Step::Done,
            _ => Step::Invalid,
        };
        match step {
            Step::Continue => {}
            Step::Done => self.phase = PHASE_DONE,
            Step::Invalid => self.phase = PHASE_INVALID,
        }
        step
    }

    /// Every record was walked and the message is well-formed.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.phase == PHASE_DONE
    }

    /// The addresses learnt, once the walk is [`Step::Done`].
    #[must_use]
    pub fn learnt(&self) -> &[Answer] {
        if self.phase == PHASE_DONE {
            &self.answers[..(self.found as usize).min(MAX_ADDRESSES)]
        } else {
            &[]
        }
    }

    fn begin_name(&mut self, at: u32, kind: u32) {
        self.phase = PHASE_NAME;
        self.name_kind = kind;
        self.at = at;
        self.end = 0;
        self.lowest = at;
        self.labels_read = 0;
        self.length = 0;
        self.hops = 0;
        self.name_steps = 0;
    }

    /// One label or pointer: `Some(true)` at the name's end, `None` when malformed.
    #[inline(always)]
    fn name_step<M: Message + ?Sized>(&mut self, message: &M) -> Option<bool> {
        self.name_steps += 1;
        if self.name_steps > NAME_STEPS {
            return None;
        }
        let at = self.at as usize;
        let byte = message.byte(at)?;
        match byte & 0xC0 {
            0 if byte == 0 => {
                if self.end == 0 {
                    self.end = self.at + 1;
                }
                Some(true)
            }
            0 => {
                let label = byte as usize;
                let count = self.labels_read as usize;
                if count >= MAX_LABELS || at + 1 + label > message.len() {
                    return None;
                }
                self.length += label as u32 + 1;
                if self.length as usize >= NAME_MAX {
                    return None;
                }
                self.labels[count & (MAX_LABELS - 1)] = label_hash(message, at + 1, label);
                self.labels_read += 1;
                self.at += 1 + label as u32;
                Some(false)
            }
            0xC0 => {
                let low = message.byte(at + 1)?;
                let target = u32::from(byte & 0x3F) << 8 | u32::from(low);
                // Strictly before every offset the name has used: no loops.
                if target >= self.lowest || self.hops as usize >= MAX_POINTER_HOPS {
                    return None;
                }
                if self.end == 0 {
                    self.end = self.at + 2;
                }
                self.hops += 1;
                self.lowest = target;
                self.at = target;
                Some(false)
            }
            // 0x40 and 0x80: extended label types (RFC 6891 retired them).
            _ => None,
        }
    }

    /// The current name is read: act on it, and start the next name or finish.
    #[inline(always)]
    fn name_done<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
    ) -> Step {
        let count = self.labels_read as usize;
        let end = self.end as usize;
        let name = fold_suffixes(&mut self.labels, count);
        match self.name_kind {
            NAME_QUESTION => {
                // QTYPE and QCLASS.
                if end + 4 > message.len() {
                    return Step::Invalid;
                }
                if let Some(pattern) = match_pattern(&self.labels, count, patterns) {
                    self.link(name, pattern);
                }
                self.offset = (end + 4) as u32;
                self.next_record()
            }
            NAME_OWNER => self.record(message, patterns, name, count, end),
            _ => {
                if end > self.offset as usize {
                    return Step::Invalid;
                }
                self.link(name, self.pattern);
                self.next_record()
            }
        }
    }

    fn next_record(&mut self) -> Step {
        if self.answers_left == 0 {
            return Step::Done;
        }
        self.answers_left -= 1;
        self.begin_name(self.offset, NAME_OWNER);
        Step::Continue
    }

    /// An answer record whose owner name (suffix hashes in `labels`) ends at `end`.
    #[inline(always)]
    fn record<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
        name: u64,
        count: usize,
        end: usize,
    ) -> Step {
        let (Some(kind), Some(class), Some(ttl_high), Some(ttl_low), Some(length)) = (
            read_u16(message, end),
            read_u16(message, end + 2),
            read_u16(message, end + 4),
            read_u16(message, end + 6),
            read_u16(message, end + 8),
        ) else {
            return Step::Invalid;
        };
        let rdata = end + 10;
        let next = rdata + length as usize;
        if next > message.len() {
            return Step::Invalid;
        }
        self.offset = next as u32;
        let pattern = match match_pattern(&self.labels, count, patterns) {
            Some(pattern) => Some(pattern),
            None => self.chained(name),
        };
        let Some(pattern) = pattern else {
            return self.next_record();
        };
        if class != CLASS_IN {
            return self.next_record();
        }
        // A TTL with the top bit set is read as 0 (RFC 2181 section 8).
        let ttl = (u32::from(ttl_high) << 16 | u32::from(ttl_low)) & 0x7FFF_FFFF;
        match (kind, length) {
            (TYPE_A, 4) => {
                let mut addr = [0u8; 16];
                addr[10] = 0xFF;
                addr[11] = 0xFF;
                if !copy_bytes(message, rdata, &mut addr, 12, 4) {
                    return Step::Invalid;
                }
                self.remember(addr, ttl, pattern);
            }
            (TYPE_AAAA, 16) => {
                let mut addr = [0u8; 16];
                if !copy_bytes(message, rdata, &mut addr, 0, 16) {
                    return Step::Invalid;
                }
                self.remember(addr, ttl, pattern);
            }
            (TYPE_CNAME, _) => {
                self.pattern = pattern;
                self.begin_name(rdata as u32, NAME_TARGET);
                return Step::Continue;
            }
            _ => {}
        }
        self.next_record()
    }

    /// The pattern a CNAME chain gave `name`.
    fn chained(&self, name: u64) -> Option<u64> {
        let mut i = 0;
        while i < MAX_CHAIN {
            if i >= self.chain_len as usize {
                break;
            }
            let link = &self.chain[i & (MAX_CHAIN - 1)];
            if link.name == name {
                return Some(link.pattern);
            }
            i += 1;
        }
        None
    }

    fn link(&mut self, name: u64, pattern: u64) {
        let i = self.chain_len as usize;
        if i < MAX_CHAIN {
            self.chain[i & (MAX_CHAIN - 1)] = ChainLink { name, pattern };
            self.chain_len += 1;
        }
    }

    fn remember(&mut self, addr: [u8; 16], ttl: u32, pattern: u64) {
        let i = self.found as usize;
        if i < MAX_ADDRESSES {
            self.answers[i & (MAX_ADDRESSES - 1)] = Answer {
                addr,
                ttl,
                pad: 0,
                pattern,
            };
            self.found += 1;
        } else {
            self.overflow += 1;
        }
    }
}

/// Walks a whole response (the agent and tests; the kernel steps under `bpf_loop`).
/// `None` when it is not a well-formed answer.
pub fn walk<M: Message + ?Sized, P: Patterns + ?Sized>(message: &M, patterns: &P) -> Option<Walk> {
    let mut walk = Walk::EMPTY;
    if !walk.start(message) {
        return None;
    }
    for _ in 0..MAX_STEPS {
        match walk.step(message, patterns) {
            Step::Continue => {}
            Step::Done => return Some(walk),
            Step::Invalid => return None,
        }
    }
    None
}

fn read_u16<M: Message + ?Sized>(message: &M, at: usize) -> Option<u16> {
    Some(u16::from(message.byte(at)?) << 8 | u16::from(message.byte(at + 1)?))
}

fn copy_bytes<M: Message + ?Sized>(
    message: &M,
    from: usize,
    into: &mut [u8; 16],
    at: usize,
    count: usize,
) -> bool {
    let mut i = 0;
    while i < 16 {
        if i >= count {
            break;
        }
        let Some(b) = message.byte(from + i) else {
            return false;
        };
        into[(at + i) & 15] = b;
        i += 1;
    }
    true
}

/// Reads the name at `start` into per-label hashes (`labels[..count]`), following
/// compression pointers. Returns the label count and the offset after the name as it
/// sits in its record.
#[inline(always)]
fn read_name<M: Message + ?Sized>(
    message: &M,
    start: usize,
    labels: &mut [u64; MAX_LABELS],
) -> Option<(usize, usize)> {
    let mut at = start;
    // Where the name ends in its record: after the first pointer, or the root label.
    let mut end = 0;
    // A pointer must point strictly before every offset this name has used.
    let mut lowest = start;
    let mut count = 0;
    let mut length = 0;
    let mut i = 0;
    while i < MAX_LABELS + MAX_POINTER_HOPS + 1 {
        let byte = message.byte(at)?;
        match byte & 0xC0 {
            0 if byte == 0 => {
                if end == 0 {
                    end = at + 1;
                }
                return Some((count, end));
            }
            0 => {
                let label = byte as usize;
                if count >= MAX_LABELS || at + 1 + label > message.len() {
                    return None;
                }
                length += label + 1;
                if length >= NAME_MAX {
                    return None;
                }
                labels[count & (MAX_LABELS - 1)] = label_hash(message, at + 1, label);
                count += 1;
                at += 1 + label;
            }
            0xC0 => {
                let low = message.byte(at + 1)?;
                let target = ((byte & 0x3F) as usize) << 8 | low as usize;
                if target >= lowest {
                    return None;
                }
                if end == 0 {
                    end = at + 2;
                }
                lowest = target;
                at = target;
            }
            // 0x40 and 0x80: extended label types (RFC 6891 retired them).
            _ => return None,
        }
        i += 1;
    }
    None
}

const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;
const LABEL_SEED: u64 = 0x243F_6A88_85A3_08D3;
const ROOT: u64 = 0x1319_8A2E_0370_7344;
const EXACT_TAG: u64 = 0xA409_3822_299F_31D0;
const WILDCARD_TAG: u64 = 0x082E_FA98_EC4E_6C89;

#[inline(always)]
const fn mix(x: u64) -> u64 {
    let x = x.wrapping_mul(MULTIPLIER);
    x ^ (x >> 29)
}

/// Eight bytes with ASCII `A`-`Z` made lowercase (DNS names compare case-insensitively,
/// RFC 4343), all at once.
#[inline(always)]
const fn lowercase(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = word & !HIGH;
    // Per byte, no carry: the high bit says `>= 'A'`, then `> 'Z'`.
    let from_a = low7 + ONES * (0x80 - b'A' as u64);
    let past_z = low7 + ONES * (0x80 - b'Z' as u64 - 1);
    let upper = from_a & !past_z & !word & HIGH;
    word | (upper >> 2)
}

/// The hash of one label of `length` bytes at `at`, case-insensitive.
#[inline(always)]
fn label_hash<M: Message + ?Sized>(message: &M, at: usize, length: usize) -> u64 {
    let mut hash = mix(LABEL_SEED ^ length as u64);
    let mut i = 0;
    // 63 bytes at most: eight words.
    while i < LABEL_MAX.div_ceil(8) {
        let offset = i * 8;
        if offset >= length {
            break;
        }
        let mut word = message.word(at + offset);
        let left = length - offset;
        if left < 8 {
            word &= (1u64 << (left * 8)) - 1;
        }
        hash = mix(hash ^ lowercase(word));
        i += 1;
    }
    hash
}

/// Turns the label hashes `labels[..count]` into suffix hashes in place (`labels[i]`:
/// the suffix from label `i`), and returns the whole name's.
#[inline(always)]
fn fold_suffixes(labels: &mut [u64; MAX_LABELS], count: usize) -> u64 {
    let mut suffix = ROOT;
    let mut i = MAX_LABELS;
    while i > 0 {
        i -= 1;
        if i < count {
            let slot = &mut labels[i & (MAX_LABELS - 1)];
            suffix = mix(suffix.rotate_left(23) ^ *slot);
            *slot = suffix;
        }
    }
    suffix
}

/// The most specific pattern of `patterns` the name (suffix hashes `labels[..count]`)
/// matches: the exact name, else the longest proper suffix with a wildcard.
#[inline(always)]
fn match_pattern<P: Patterns + ?Sized>(
    labels: &[u64; MAX_LABELS],
    count: usize,
    patterns: &P,
) -> Option<u64> {
    if count == 0 {
        return None;
    }
    let exact = exact_key(labels[0]);
    if patterns.contains(exact) {
        return Some(exact);
    }
    let mut i = 1;
    while i < MAX_LABELS {
        if i >= count {
            break;
        }
        let key = wildcard_key(labels[i & (MAX_LABELS - 1)]);
        if patterns.contains(key) {
            return Some(key);
        }
        i += 1;
    }
    None
}

/// The key of an exact name pattern, from the name's [`name_hash`].
#[must_use]
pub const fn exact_key(name: u64) -> u64 {
    mix(name ^ EXACT_TAG)
}

/// The key of a `*.` pattern, from the [`name_hash`] of the part after `*.`.
#[must_use]
pub const fn wildcard_key(suffix: u64) -> u64 {
    mix(suffix ^ WILDCARD_TAG)
}

/// The hash of a dotted name (no trailing dot, no `*.`), as the walker computes it
/// from the wire; `None` for a name the walker could not match (empty or too-long
/// labels, too many labels, too long).
#[must_use]
pub fn name_hash(name: &str) -> Option<u64> {
    let mut wire = [0u8; NAME_MAX + 1];
    let mut at = 0;
    for label in name.split('.') {
        let bytes = label.as_bytes();
        if bytes.is_empty() || bytes.len() > LABEL_MAX || at + 1 + bytes.len() >= NAME_MAX {
            return None;
        }
        wire[at] = bytes.len() as u8;
        wire[at + 1..at + 1 + bytes.len()].copy_from_slice(bytes);
        at += 1 + bytes.len();
    }
    wire[at] = 0;
    let mut labels = [0u64; MAX_LABELS];
    let (count, _) = read_name(&wire[..=at], 0, &mut labels)?;
    Some(fold_suffixes(&mut labels, count))
}

#[cfg(test)]
mod tests;

/// Learnt addresses kept per (endpoint, pattern): a ring of this many slots, so a name
/// that answers with ever new addresses pushes out its own oldest, never another's.
pub const SLOTS_PER_NAME: u32 = 128;

/// Key of `DNS_NAMES_V1` (a pattern of the endpoints of one policy table) and of
/// `DNS_CURSOR_V1` (a pattern's ring cursor, per endpoint).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    /// The policy table (`DNS_NAMES_V1`) or the endpoint (`DNS_CURSOR_V1`).
    pub owner: u32,
    pub pad: u32,
    /// [`exact_key`] or [`wildcard_key`].
    pub pattern: u64,
}

/// Value of `DNS_NAMES_V1`: the domain identity whose `POLICY_V2` entries say what a
/// learnt address of the pattern allows (the rules' tiers and ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameEntry {
    pub identity: u32,
    pub pad: u32,
}

/// Key of `DNS_LEARNT_V1`: an address a DNS answer gave one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LearntKey {
    pub endpoint: u32,
    /// IPv4-mapped or IPv6.
    pub addr: [u8; 16],
}

/// Value of `DNS_LEARNT_V1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Learnt {
    /// `bpf_ktime_get_coarse_ns` after which the address admits no new connection:
    /// when learnt, plus max(TTL, minimum TTL), plus the grace.
    pub expires_ns: u64,
    /// The pattern key the answer matched; its `DNS_NAMES_V1` entry gives the identity.
    pub pattern: u64,
    /// When the answer was (last) seen.
    pub learnt_ns: u64,
    /// The answer's TTL, seconds.
    pub ttl: u32,
    /// `LEARNT_FLAG_*`.
    pub flags: u32,
}

/// The expiry of the entry has been counted (`DNS_STAT_EXPIRED`).
pub const LEARNT_FLAG_EXPIRY_COUNTED: u32 = 1;

/// Key of `DNS_SLOTS_V1`: one slot of a pattern's ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub endpoint: u32,
    pub slot: u32,
    pub pattern: u64,
}

/// Lifetimes of learnt addresses (`DNS_SETTINGS_V1`, one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// A TTL below this many seconds counts as this (`--dns-min-ttl`).
    pub min_ttl_s: u32,
    /// Seconds an address stays after its TTL (`--dns-grace`).
    pub grace_s: u32,
}

impl DnsSettings {
    pub const DEFAULT: DnsSettings = DnsSettings {
        min_ttl_s: 0,
        grace_s: 5,
    };
}

/// `DNS_STATS_V1` slots (per-CPU counts).
pub const DNS_STAT_RESPONSES: u32 = 0;
/// Responses that were not well-formed answers: nothing learnt.
pub const DNS_STAT_INVALID: u32 = 1;
/// Addresses written (new, or now for another pattern).
pub const DNS_STAT_LEARNT: u32 = 2;
/// Addresses answered again: their expiry moved on.
pub const DNS_STAT_REFRESHED: u32 = 3;
/// Learnt addresses found past their expiry by a new connection.
pub const DNS_STAT_EXPIRED: u32 = 4;
/// Learnt addresses pushed out by a newer answer for the same name (the ring is full).
pub const DNS_STAT_EVICTED: u32 = 5;
/// Addresses not learnt: over the per-response limit, or the table refused them.
pub const DNS_STAT_DROPPED: u32 = 6;
pub const DNS_STAT_SLOTS: u32 = 7;

const _: () = assert!(size_of::<Learnt>() == 32);
const _: () = assert!(size_of::<LearntKey>() == 20);
const _: () = assert!(size_of::<NameKey>() == 16);
const _: () = assert!(size_of::<SlotKey>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::{DnsSettings, Learnt, LearntKey, NameEntry, NameKey, SlotKey};

    // SAFETY: #[repr(C)] integers and byte arrays with explicit padding: any bit
    // pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for NameEntry {}
    unsafe impl aya::Pod for LearntKey {}
    unsafe impl aya::Pod for Learnt {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for DnsSettings {}
}

/// Domain identities (one per pattern, in the policy tables' identity field) have this
/// bit set: they are neither pods nor CIDR classes.
pub const DOMAIN_IDENTITY_BIT: u32 = 0x4000_0000;
