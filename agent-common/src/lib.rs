//! Types shared by Egret's kernel programs and its agent: map names, keys, values,
//! verdicts and drop reasons.
//!
//! Every map name carries its layout version (`_V1`). When a key or value layout
//! changes, the name changes with it, so an upgraded agent never reads a pinned map
//! of the old layout as if it were the new one.
#![no_std]

pub mod maps;

/// What happened to a packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// A denial that audit mode turned into a counted pass.
    AuditDeny = 2,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::AuditDeny];

    #[must_use]
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|v| *v as u8 == value)
    }
}

/// Why a packet got its verdict. Allow reasons and deny reasons share one space so a
/// counter key is one `(endpoint, verdict, reason)` triple.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The endpoint is not isolated for egress: it may send anything.
    NotIsolated = 0,
    /// A policy rule allows the destination, protocol and port.
    PolicyAllows = 1,
    /// Not IP, or IPv6 neighbour discovery / multicast listener traffic.
    NotFiltered = 2,
    /// A reply of a connection the endpoint accepted, or a packet of a flow already allowed.
    Conntrack = 3,
    /// An ICMP or `ICMPv6` error (unreachable, packet too big, time exceeded, parameter
    /// problem) about a flow the connection tracker holds.
    Related = 4,
    /// Isolated, and no rule of any policy selecting the endpoint allows the packet.
    NoRuleAllows = 10,
    /// The source address is not one of the endpoint's addresses.
    SpoofedSource = 11,
    /// The packet arrived on an interface or cgroup the agent has no policy for yet,
    /// and the unknown-pod default is deny.
    UnknownEndpoint = 12,
    /// The endpoint's tables did not fit in the maps: it fails closed.
    TableOverflow = 13,
    /// A non-first IPv4 fragment whose first fragment was not seen or was denied.
    Fragment = 14,
    /// Too short or malformed to read the headers the verdict needs.
    Malformed = 15,
    /// A frame of an isolated endpoint that is neither IP nor ARP.
    NonIp = 16,
    /// An 802.1Q / 802.1ad VLAN-tagged frame of an isolated endpoint: pods send untagged.
    Vlan = 17,
}

impl Reason {
    /// Every reason, in counter-slot order ([`Reason::index`]).
    pub const ALL: [Reason; 13] = [
        Reason::NotIsolated,
        Reason::PolicyAllows,
        Reason::NotFiltered,
        Reason::Conntrack,
        Reason::Related,
        Reason::NoRuleAllows,
        Reason::SpoofedSource,
        Reason::UnknownEndpoint,
        Reason::TableOverflow,
        Reason::Fragment,
        Reason::Malformed,
        Reason::NonIp,
        Reason::Vlan,
    ];

    /// The reason's position in [`Reason::ALL`]: dense, for the counter array.
    #[must_use]
    pub const fn index(self) -> u32 {
        match self {
            Reason::NotIsolated => 0,
            Reason::PolicyAllows => 1,
            Reason::NotFiltered => 2,
            Reason::Conntrack => 3,
            Reason::Related => 4,
            Reason::NoRuleAllows => 5,
            Reason::SpoofedSource => 6,
            Reason::UnknownEndpoint => 7,
            Reason::TableOverflow => 8,
            Reason::Fragment => 9,
            Reason::Malformed => 10,
            Reason::NonIp => 11,
            Reason::Vlan => 12,
        }
    }

    #[must_use]
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == value)
    }

    /// The label value used in metrics and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Reason::NotIsolated => "not_isolated",
            Reason::PolicyAllows => "policy",
            Reason::NotFiltered => "not_filtered",
            Reason::Conntrack => "conntrack",
            Reason::Related => "related",
            Reason::NoRuleAllows => "no_rule_allows",
            Reason::SpoofedSource => "spoofed_source",
            Reason::UnknownEndpoint => "unknown_endpoint",
            Reason::TableOverflow => "table_overflow",
            Reason::Fragment => "fragment",
            Reason::Malformed => "malformed",
            Reason::NonIp => "non_ip",
            Reason::Vlan => "vlan",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{COUNTER_SLOTS, Reason, Verdict, counter_pair, counter_slot};

    #[test]
    fn counter_slots_are_dense_and_invert() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for verdict in Verdict::ALL {
            for reason in Reason::ALL {
                let slot = counter_slot(verdict, reason);
                assert!(
                    !seen[slot as usize],
                    "{verdict:?} {reason:?} shares slot {slot}"
                );
                seen[slot as usize] = true;
                assert_eq!(counter_pair(slot), Some((verdict, reason)));
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(counter_pair(COUNTER_SLOTS), None);
    }
}

/// Reasons per verdict in a counter row.
#[expect(clippy::cast_possible_truncation, reason = "13 reasons")]
const REASONS: u32 = Reason::ALL.len() as u32;

/// Counter slots per endpoint: one per (verdict, reason) pair.
#[expect(clippy::cast_possible_truncation, reason = "3 verdicts")]
pub const COUNTER_SLOTS: u32 = Verdict::ALL.len() as u32 * REASONS;

/// The slot of `(verdict, reason)` within an endpoint's row of `COUNTERS_V2`.
#[must_use]
pub const fn counter_slot(verdict: Verdict, reason: Reason) -> u32 {
    verdict as u32 * REASONS + reason.index()
}

/// The `(verdict, reason)` pair of a counter slot; the inverse of [`counter_slot`].
#[must_use]
pub fn counter_pair(slot: u32) -> Option<(Verdict, Reason)> {
    let reasons = REASONS;
    let verdict = Verdict::from_u8(u8::try_from(slot / reasons).ok()?)?;
    let reason = *Reason::ALL.get((slot % reasons) as usize)?;
    Some((verdict, reason))
}

/// IP protocol numbers the tables distinguish.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// The verdict for a packet of an isolated endpoint, from the endpoint's flags and the
/// `POLICY_ALLOW_*` flags its lookups found. Shared by the kernel programs and the
/// agent's model of them, so both decide alike.
///
/// Enforce-mode policies decide what drops; audit-mode policies only decide what is
/// counted as an audit denial, so staging a policy never drops anything because of it.
#[must_use]
pub fn policy_verdict(endpoint_flags: u32, allowed: u32) -> (Verdict, Reason) {
    use maps::{ENDPOINT_FLAG_ISOLATED_ENFORCED, POLICY_ALLOW_AUDITED, POLICY_ALLOW_ENFORCED};
    let allowed_by_enforced = endpoint_flags & ENDPOINT_FLAG_ISOLATED_ENFORCED == 0
        || allowed & POLICY_ALLOW_ENFORCED != 0;
    let allowed_by_any = allowed & (POLICY_ALLOW_ENFORCED | POLICY_ALLOW_AUDITED) != 0;
    if !allowed_by_enforced {
        (Verdict::Deny, Reason::NoRuleAllows)
    } else if !allowed_by_any {
        (Verdict::AuditDeny, Reason::NoRuleAllows)
    } else {
        (Verdict::Allow, Reason::PolicyAllows)
    }
}
