extern crate std;

use std::{borrow::ToOwned, vec, vec::Vec};

use proptest::prelude::*;

use super::{MAX_ADDRESSES, Patterns, exact_key, lowercase, name_hash, walk, wildcard_key};

/// Pattern keys, as the agent would write them for one endpoint.
struct Keys(Vec<u64>);

impl Patterns for Keys {
    fn contains(&self, key: u64) -> bool {
        self.0.contains(&key)
    }
}

fn exact(name: &str) -> u64 {
    exact_key(name_hash(name).expect("a valid name"))
}

fn wildcard(suffix: &str) -> u64 {
    wildcard_key(name_hash(suffix).expect("a valid name"))
}

fn keys() -> Keys {
    Keys(vec![
        exact("api.example.test"),
        wildcard("svc.example.test"),
    ])
}

/// A response under construction: header, one question, answers.
struct Response {
    bytes: Vec<u8>,
    answers: u16,
}

impl Response {
    fn new(question: &str) -> Self {
        let mut bytes = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        encode_name(&mut bytes, question);
        bytes.extend_from_slice(&[0, 1, 0, 1]);
        Response { bytes, answers: 0 }
    }

    /// An answer whose owner is a pointer to the question's name (offset 12).
    fn answer_at_question(self, kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(&[0xC0, 12], kind, ttl, rdata)
    }

    fn answer(self, owner: &str, kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        let mut name = Vec::new();
        encode_name(&mut name, owner);
        self.record(&name, kind, ttl, rdata)
    }

    fn record(mut self, owner: &[u8], kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.bytes.extend_from_slice(owner);
        self.bytes.extend_from_slice(&kind.to_be_bytes());
        self.bytes.extend_from_slice(&1u16.to_be_bytes());
        self.bytes.extend_from_slice(&ttl.to_be_bytes());
        self.bytes
            .extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
        self.bytes.extend_from_slice(rdata);
        self.answers += 1;
        self
    }

    fn bytes(mut self) -> Vec<u8> {
        self.bytes[6..8].copy_from_slice(&self.answers.to_be_bytes());
        self.bytes
    }
}

fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.') {
        out.push(u8::try_from(label.len()).unwrap());
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_name(&mut out, name);
    out
}

fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0; 16];
    addr[10] = 0xFF;
    addr[11] = 0xFF;
    addr[12..].copy_from_slice(&v4);
    addr
}

/// (address, ttl, pattern) learnt, or `None` when the walk failed.
fn learnt(message: &[u8], patterns: &Keys) -> Option<Vec<([u8; 16], u32, u64)>> {
    walk(message, patterns).map(|w| {
        w.learnt()
            .iter()
            .map(|a| (a.addr, a.ttl, a.pattern))
            .collect()
    })
}

const A: u16 = 1;
const CNAME: u16 = 5;
const AAAA: u16 = 28;

#[test]
fn an_exact_name_learns_its_a_and_aaaa_answers() {
    let v6 = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    let message = Response::new("api.example.test")
        .answer_at_question(A, 30, &[192, 0, 2, 1])
        .answer_at_question(AAAA, 40, &v6)
        .bytes();
    assert_eq!(
        learnt(&message, &keys()),
        Some(vec![
            (mapped([192, 0, 2, 1]), 30, exact("api.example.test")),
            (v6, 40, exact("api.example.test")),
        ])
    );
}

#[test]
fn names_match_in_any_case_and_other_names_learn_nothing() {
    let message = Response::new("API.Example.TEST")
        .answer_at_question(A, 30, &[192, 0, 2, 1])
        .bytes();
    assert_eq!(learnt(&message, &keys()).unwrap().len(), 1);
    let message = Response::new("www.example.test")
        .answer_at_question(A, 30, &[192, 0, 2, 1])
        .bytes();
    assert_eq!(learnt(&message, &keys()), Some(vec![]));
}

#[test]
fn a_wildcard_matches_one_or_more_labels_never_the_bare_parent() {
    for (name, allowed) in [
        ("a.svc.example.test", true),
        ("a.b.svc.example.test", true),
        ("A.SVC.example.test", true),
        ("svc.example.test", false),
        ("xsvc.example.test", false),
        ("example.test", false),
    ] {
        let message = Response::new(name)
            .answer_at_question(A, 5, &[10, 0, 0, 1])
            .bytes();
        let found = learnt(&message, &keys()).unwrap();
        assert_eq!(!found.is_empty(), allowed, "{name}");
        if allowed {
            assert_eq!(found[0].2, wildcard("svc.example.test"), "{name}");
        }
    }
}

#[test]
fn the_most_specific_pattern_wins() {
    let patterns = Keys(vec![
        wildcard("example.test"),
        wildcard("svc.example.test"),
        exact("a.svc.example.test"),
    ]);
    let pattern_of = |name: &str| {
        let message = Response::new(name)
            .answer_at_question(A, 5, &[10, 0, 0, 1])
            .bytes();
        learnt(&message, &patterns).unwrap()[0].2
    };
    assert_eq!(
        pattern_of("a.svc.example.test"),
        exact("a.svc.example.test")
    );
    assert_eq!(
        pattern_of("b.svc.example.test"),
        wildcard("svc.example.test")
    );
    assert_eq!(pattern_of("svc.example.test"), wildcard("example.test"));
}

#[test]
fn cname_chains_carry_the_allowed_name_forward_and_lead_to_allowed_names() {
    // The question is allowed; its CNAME target's address is learnt for it.
    let message = Response::new("api.example.test")
        .answer_at_question(CNAME, 60, &wire_name("edge.cdn.test"))
        .answer("edge.cdn.test", CNAME, 60, &wire_name("lb.cdn.test"))
        .answer("lb.cdn.test", A, 20, &[198, 51, 100, 9])
        .bytes();
    assert_eq!(
        learnt(&message, &keys()),
        Some(vec![(
            mapped([198, 51, 100, 9]),
            20,
            exact("api.example.test")
        )])
    );
    // The question is not allowed, the chain leads to an allowed name.
    let message = Response::new("alias.other.test")
        .answer_at_question(CNAME, 60, &wire_name("x.svc.example.test"))
        .answer("x.svc.example.test", A, 20, &[198, 51, 100, 10])
        .bytes();
    assert_eq!(
        learnt(&message, &keys()),
        Some(vec![(
            mapped([198, 51, 100, 10]),
            20,
            wildcard("svc.example.test")
        )])
    );
    // Addresses of names outside the chain are not learnt.
    let message = Response::new("api.example.test")
        .answer("unrelated.test", A, 20, &[198, 51, 100, 11])
        .bytes();
    assert_eq!(learnt(&message, &keys()), Some(vec![]));
}

#[test]
fn errors_truncation_and_bad_pointers_learn_nothing() {
    let good = Response::new("api.example.test")
        .answer_at_question(A, 30, &[192, 0, 2, 1])
        .bytes();
    assert!(learnt(&good, &keys()).is_some());
    // NXDOMAIN, a query, more than one question.
    for (at, value) in [(3, 0x83), (2, 0x01), (5, 2)] {
        let mut bad = good.clone();
        bad[at] = value;
        assert_eq!(learnt(&bad, &keys()), None, "byte {at} = {value:#x}");
    }
    for cut in 0..good.len() {
        assert_eq!(learnt(&good[..cut], &keys()), None, "cut at {cut}");
    }
    // The answer's owner points at itself, forward, or into a loop.
    let header_and_question = Response::new("api.example.test").bytes();
    let owner_at = header_and_question.len();
    for owner in [
        [0xC0, u8::try_from(owner_at).unwrap()],
        [0xC0, u8::try_from(owner_at + 2).unwrap()],
        [0xC0 | 0x3F, 0xFF],
    ] {
        let message = Response::new("api.example.test")
            .record(&owner, A, 30, &[192, 0, 2, 1])
            .bytes();
        assert_eq!(learnt(&message, &keys()), None, "owner {owner:?}");
    }
    // Two names pointing at each other.
    let mut message = Response::new("api.example.test").bytes();
    let at = u8::try_from(message.len()).unwrap();
    message.extend_from_slice(&[1, b'a', 0xC0, at + 4, 1, b'b', 0xC0, at]);
    message.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 1]);
    message[7] = 1;
    assert_eq!(learnt(&message[..], &keys()), None);
}

#[test]
fn the_top_ttl_bit_reads_as_zero_and_overflow_is_counted() {
    let message = Response::new("api.example.test")
        .answer_at_question(A, 0x8000_0010, &[192, 0, 2, 1])
        .bytes();
    assert_eq!(learnt(&message, &keys()).unwrap()[0].1, 0x10);
    let mut response = Response::new("api.example.test");
    for i in 0..20u8 {
        response = response.answer_at_question(A, 30, &[192, 0, 2, i]);
    }
    let walked = walk(&response.bytes()[..], &keys()).unwrap();
    assert_eq!(walked.learnt().len(), MAX_ADDRESSES);
    assert_eq!(walked.overflow, 4);
}

#[test]
fn lowercase_touches_only_ascii_capitals() {
    for byte in 0..=255u8 {
        let word = u64::from_le_bytes([byte, b'Z', byte, b'a', 0xC1, b'@', b'[', byte]);
        let expected = word.to_le_bytes().map(|b| b.to_ascii_lowercase());
        assert_eq!(lowercase(word).to_le_bytes(), expected, "{byte:#x}");
    }
}

#[test]
fn name_hashes_ignore_case_and_refuse_what_the_wire_cannot_hold() {
    assert_eq!(name_hash("API.example.Test"), name_hash("api.example.test"));
    assert_ne!(name_hash("a.b"), name_hash("b.a"));
    assert_ne!(name_hash("ab.c"), name_hash("a.bc"));
    assert_eq!(name_hash(""), None);
    assert_eq!(name_hash("a..b"), None);
    assert_eq!(name_hash(&"x".repeat(64)), None);
    assert_eq!(name_hash(&["a"; 17].join(".")), None);
    assert!(name_hash(&["a"; 16].join(".")).is_some());
}

fn valid_response() -> impl Strategy<Value = Vec<u8>> {
    (0u8..4, 1u8..6).prop_map(|(cnames, addresses)| {
        let mut response = Response::new("api.example.test");
        let mut owner = "api.example.test".to_owned();
        for i in 0..cnames {
            let target = std::format!("c{i}.cdn.test");
            response = response.answer(&owner, CNAME, 60, &wire_name(&target));
            owner = target;
        }
        for i in 0..addresses {
            response = response.answer(&owner, A, 30, &[203, 0, 113, i]);
        }
        response.bytes()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any bytes: the walk ends, never panics, and learns only for known patterns.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let patterns = keys();
        if let Some(walked) = walk(&bytes[..], &patterns) {
            for answer in walked.learnt() {
                prop_assert!(patterns.0.contains(&answer.pattern));
            }
        }
    }

    /// A valid response cut short learns nothing.
    #[test]
    fn truncated_responses_learn_nothing(message in valid_response(), cut in 0usize..400) {
        prop_assert!(!learnt(&message, &keys()).unwrap().is_empty());
        let cut = cut % message.len();
        prop_assert_eq!(learnt(&message[..cut], &keys()), None);
    }

    /// Corrupted responses never panic; every address learnt is one of the message's
    /// four-byte runs (never invented) for a known pattern.
    #[test]
    fn corrupted_responses_learn_only_what_they_say(
        message in valid_response(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut message = message;
        for (at, value) in flips {
            let at = at % message.len();
            message[at] = value;
        }
        let patterns = keys();
        if let Some(walked) = walk(&message[..], &patterns) {
            for answer in walked.learnt() {
                prop_assert!(patterns.0.contains(&answer.pattern));
                prop_assert!(message.windows(4).any(|w| w == &answer.addr[12..]));
            }
        }
    }

    /// Pointers anywhere in a name: a pointer to itself or forward never resolves.
    #[test]
    fn looping_pointers_learn_nothing(target in 0u16..0x3FFF) {
        let base = Response::new("api.example.test").bytes();
        let owner_at = u16::try_from(base.len()).unwrap();
        let pointer = 0xC000 | target;
        let message = Response::new("api.example.test")
            .record(&pointer.to_be_bytes(), A, 30, &[192, 0, 2, 1])
            .bytes();
        let found = learnt(&message, &keys());
        if target >= owner_at {
            prop_assert_eq!(found, None);
        }
    }
}
