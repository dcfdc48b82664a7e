//! The DNS response walker of `domainNames` rules, shared by the kernel program that
//! reads a pod's DNS answers and by the agent (which hashes its policies' names with
//! the same functions, and property-tests this code).
//!
//! The walk is a bounded state machine: [`Walk::start`] checks the header, and each
//! [`Walk::step`] reads one record (the question, then one answer), so the kernel runs
//! it under `bpf_loop` and the verifier checks one step, not every iteration. Every
//! loop inside a step has a constant bound: labels per name, compression hops (a
//! pointer must point strictly before every offset the name has used, so pointers
//! cannot loop), 8-byte words per label, chain links, addresses.
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
/// Steps a whole walk takes at most: the question and every answer.
pub const MAX_STEPS: u32 = MAX_ANSWERS + 1;

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

const PHASE_QUESTION: u32 = 0;
const PHASE_ANSWERS: u32 = 1;
const PHASE_DONE: u32 = 2;
const PHASE_INVALID: u32 = 3;

/// The walk of one response. Plain data so the kernel can keep it in a per-CPU map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Walk {
    /// Offset of the next record.
    pub offset: u32,
    /// Answer records still to read.
    pub answers_left: u32,
    pub phase: u32,
    pub chain_len: u32,
    pub found: u32,
    /// Addresses of allowed names beyond [`MAX_ADDRESSES`], not learnt.
    pub overflow: u32,
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
        self.offset = HEADER_LEN as u32;
        self.answers_left = if u32::from(answers) < MAX_ANSWERS {
            u32::from(answers)
        } else {
            MAX_ANSWERS
        };
        self.phase = PHASE_QUESTION;
        true
    }

    /// Reads one record.
    #[inline(always)]
    pub fn step<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
    ) -> Step {
        let step = match self.phase {
            PHASE_QUESTION => self.question(message, patterns),
            PHASE_ANSWERS if self.answers_left == 0 => Step::Done,
            PHASE_ANSWERS => self.answer(message, patterns),
            PHASE_DONE => Step::Done,
            _ => Step::Invalid,
        };
        self.phase = match step {
            Step::Continue => PHASE_ANSWERS,
            Step::Done => PHASE_DONE,
            Step::Invalid => PHASE_INVALID,
        };
        step
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

    fn question<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
    ) -> Step {
        let Some((count, end)) = read_name(message, self.offset as usize, &mut self.labels) else {
            return Step::Invalid;
        };
        // QTYPE and QCLASS.
        if end + 4 > message.len() {
            return Step::Invalid;
        }
        let name = fold_suffixes(&mut self.labels, count);
        if let Some(pattern) = match_pattern(&self.labels, count, patterns) {
            self.link(name, pattern);
        }
        self.offset = (end + 4) as u32;
        Step::Continue
    }

    fn answer<M: Message + ?Sized, P: Patterns + ?Sized>(
        &mut self,
        message: &M,
        patterns: &P,
    ) -> Step {
        self.answers_left -= 1;
        let Some((count, end)) = read_name(message, self.offset as usize, &mut self.labels) else {
            return Step::Invalid;
        };
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
        let name = fold_suffixes(&mut self.labels, count);
        let pattern = match match_pattern(&self.labels, count, patterns) {
            Some(pattern) => Some(pattern),
            None => self.chained(name),
        };
        let Some(pattern) = pattern else {
            return Step::Continue;
        };
        if class != CLASS_IN {
            return Step::Continue;
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
                let Some((count, target_end)) = read_name(message, rdata, &mut self.labels) else {
                    return Step::Invalid;
                };
                if target_end > next {
                    return Step::Invalid;
                }
                let target = fold_suffixes(&mut self.labels, count);
                self.link(target, pattern);
            }
            _ => {}
        }
        Step::Continue
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
    for _ in 0..=MAX_STEPS {
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
