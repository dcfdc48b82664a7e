//! Types shared by Egret's kernel programs and its agent: map names, keys, values,
//! verdicts and drop reasons.
//!
//! Every map name carries its layout version (`_V1`). When a key or value layout
//! changes, the name changes with it, so an upgraded agent never reads a pinned map
//! of the old layout as if it were the new one.
#![no_std]

pub mod dns;
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
    /// An Admin-tier ClusterNetworkPolicy rule accepts it.
    AdminAccept = 5,
    /// A Baseline-tier ClusterNetworkPolicy rule accepts it.
    BaselineAccept = 6,
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
    /// An Admin-tier ClusterNetworkPolicy rule denies it.
    AdminDeny = 18,
    /// A Baseline-tier ClusterNetworkPolicy rule denies it.
    BaselineDeny = 19,
}

impl Reason {
    /// Every reason, in counter-slot order ([`Reason::index`]).
    pub const ALL: [Reason; 17] = [
        Reason::NotIsolated,
        Reason::PolicyAllows,
        Reason::NotFiltered,
        Reason::Conntrack,
        Reason::Related,
        Reason::AdminAccept,
        Reason::BaselineAccept,
        Reason::NoRuleAllows,
        Reason::SpoofedSource,
        Reason::UnknownEndpoint,
        Reason::TableOverflow,
        Reason::Fragment,
        Reason::Malformed,
        Reason::NonIp,
        Reason::Vlan,
        Reason::AdminDeny,
        Reason::BaselineDeny,
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
            Reason::AdminAccept => 5,
            Reason::BaselineAccept => 6,
            Reason::NoRuleAllows => 7,
            Reason::SpoofedSource => 8,
            Reason::UnknownEndpoint => 9,
            Reason::TableOverflow => 10,
            Reason::Fragment => 11,
            Reason::Malformed => 12,
            Reason::NonIp => 13,
            Reason::Vlan => 14,
            Reason::AdminDeny => 15,
            Reason::BaselineDeny => 16,
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
            Reason::AdminAccept => "admin_accept",
            Reason::BaselineAccept => "baseline_accept",
            Reason::NoRuleAllows => "no_rule_allows",
            Reason::SpoofedSource => "spoofed_source",
            Reason::UnknownEndpoint => "unknown_endpoint",
            Reason::TableOverflow => "table_overflow",
            Reason::Fragment => "fragment",
            Reason::Malformed => "malformed",
            Reason::NonIp => "non_ip",
            Reason::Vlan => "vlan",
            Reason::AdminDeny => "admin_deny",
            Reason::BaselineDeny => "baseline_deny",
        }
    }
}

/// Reasons per verdict in a counter row.
#[expect(clippy::cast_possible_truncation, reason = "17 reasons")]
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

/// What decided a packet that the policy tables were consulted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The ClusterNetworkPolicy rule that decided ([`maps::tier_rule`]), or
    /// [`maps::TIER_RULE_NONE`] when NetworkPolicy or the default did.
    pub rule: u32,
}

/// The verdict for a packet of a filtered endpoint, from the endpoint's flags and the
/// joined [`maps::PolicyValue`] its lookups found. Shared by the kernel programs and the
/// agent's model of them, so both decide alike.
///
/// The order (SIG Network's ClusterNetworkPolicy): the Admin tier's first matching rule
/// decides (Accept allows, Deny drops, Pass skips to NetworkPolicy); then, if a
/// NetworkPolicy isolates the endpoint, NetworkPolicy decides (allowed if any rule
/// allows); then the Baseline tier's first matching rule; then allow.
///
/// Enforce-mode policies decide what drops; staged (audit-mode) policies only decide
/// what is counted as an audit denial, so staging a policy never drops anything because
/// of it: the order is evaluated once over enforced policies and once over all.
#[must_use]
#[inline(always)]
pub fn policy_decision(endpoint_flags: u32, value: &maps::PolicyValue) -> Decision {
    use maps::{
        ENDPOINT_FLAG_ISOLATED_AUDITED, ENDPOINT_FLAG_ISOLATED_ENFORCED, POLICY_ALLOW_AUDITED,
        POLICY_ALLOW_ENFORCED,
    };
    let enforced = tier_order(
        value.admin[0],
        endpoint_flags & ENDPOINT_FLAG_ISOLATED_ENFORCED != 0,
        value.flags & POLICY_ALLOW_ENFORCED != 0,
        value.baseline[0],
    );
    if enforced.verdict == Verdict::Deny {
        return enforced;
    }
    let all = tier_order(
        value.admin[1],
        endpoint_flags & (ENDPOINT_FLAG_ISOLATED_ENFORCED | ENDPOINT_FLAG_ISOLATED_AUDITED) != 0,
        value.flags & (POLICY_ALLOW_ENFORCED | POLICY_ALLOW_AUDITED) != 0,
        value.baseline[1],
    );
    if all.verdict == Verdict::Deny {
        return Decision {
            verdict: Verdict::AuditDeny,
            ..all
        };
    }
    enforced
}

#[inline(always)]
fn tier_order(admin: u32, isolated: bool, allowed: bool, baseline: u32) -> Decision {
    use maps::{TIER_RULE_NONE, TierAction, tier_rule_parts};
    let decided = |verdict, reason, rule| Decision {
        verdict,
        reason,
        rule,
    };
    match tier_rule_parts(admin) {
        Some((_, TierAction::Accept)) => {
            return decided(Verdict::Allow, Reason::AdminAccept, admin);
        }
        Some((_, TierAction::Deny)) => return decided(Verdict::Deny, Reason::AdminDeny, admin),
        Some((_, TierAction::Pass)) | None => {}
    }
    if isolated {
        return if allowed {
            decided(Verdict::Allow, Reason::PolicyAllows, TIER_RULE_NONE)
        } else {
            decided(Verdict::Deny, Reason::NoRuleAllows, TIER_RULE_NONE)
        };
    }
    match tier_rule_parts(baseline) {
        Some((_, TierAction::Accept)) => decided(Verdict::Allow, Reason::BaselineAccept, baseline),
        Some((_, TierAction::Deny)) => decided(Verdict::Deny, Reason::BaselineDeny, baseline),
        // Pass in the Baseline tier has nothing below it to pass to but the default.
        Some((_, TierAction::Pass)) | None => {
            decided(Verdict::Allow, Reason::NotIsolated, TIER_RULE_NONE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{COUNTER_SLOTS, Reason, Verdict, counter_pair, counter_slot, policy_decision};
    use crate::maps::{
        ENDPOINT_FLAG_ISOLATED_AUDITED, ENDPOINT_FLAG_ISOLATED_ENFORCED, POLICY_ALLOW_AUDITED,
        POLICY_ALLOW_ENFORCED, PolicyValue, TIER_RULE_NONE, TierAction, tier_rule,
    };

    fn tiers(admin: Option<(u32, TierAction)>, baseline: Option<(u32, TierAction)>) -> PolicyValue {
        let rule =
            |r: Option<(u32, TierAction)>| r.map_or(TIER_RULE_NONE, |(rank, a)| tier_rule(rank, a));
        PolicyValue {
            flags: 0,
            admin: [rule(admin); 2],
            baseline: [rule(baseline); 2],
        }
    }

    #[test]
    fn the_tiers_decide_in_order() {
        use TierAction::{Accept, Deny, Pass};
        let isolated = ENDPOINT_FLAG_ISOLATED_ENFORCED;
        let decide = |flags, value: PolicyValue| {
            let d = policy_decision(flags, &value);
            (d.verdict, d.reason)
        };
        // Admin decides over a NetworkPolicy allow.
        let mut value = tiers(Some((3, Deny)), None);
        value.flags = POLICY_ALLOW_ENFORCED;
        assert_eq!(decide(isolated, value), (Verdict::Deny, Reason::AdminDeny));
        // Admin Accept over an isolating NetworkPolicy that allows nothing.
        assert_eq!(
            decide(isolated, tiers(Some((3, Accept)), None)),
            (Verdict::Allow, Reason::AdminAccept)
        );
        // Pass: NetworkPolicy decides when it isolates...
        assert_eq!(
            decide(isolated, tiers(Some((3, Pass)), Some((9, Accept)))),
            (Verdict::Deny, Reason::NoRuleAllows)
        );
        // ...and the Baseline tier when it does not.
        assert_eq!(
            decide(0, tiers(Some((3, Pass)), Some((9, Deny)))),
            (Verdict::Deny, Reason::BaselineDeny)
        );
        // A Baseline Accept is overruled by an isolating NetworkPolicy.
        assert_eq!(
            decide(isolated, tiers(None, Some((9, Accept)))),
            (Verdict::Deny, Reason::NoRuleAllows)
        );
        assert_eq!(
            decide(0, tiers(None, None)),
            (Verdict::Allow, Reason::NotIsolated)
        );
    }

    #[test]
    fn the_first_rule_is_the_lowest_joined_value() {
        use TierAction::{Accept, Deny};
        let mut by_identity = tiers(Some((7, Accept)), None);
        by_identity.join(&tiers(Some((4, Deny)), Some((2, Accept))));
        assert_eq!(by_identity.admin[0], tier_rule(4, Deny));
        assert_eq!(by_identity.baseline[0], tier_rule(2, Accept));
        let decision = policy_decision(0, &by_identity);
        assert_eq!(decision.rule, tier_rule(4, Deny));
    }

    #[test]
    fn staged_rules_only_count() {
        use TierAction::Deny;
        // A staged Admin Deny: enforced sees no rule, all sees the Deny.
        let staged = PolicyValue {
            flags: 0,
            admin: [TIER_RULE_NONE, tier_rule(1, Deny)],
            baseline: [TIER_RULE_NONE; 2],
        };
        let decision = policy_decision(0, &staged);
        assert_eq!(
            (decision.verdict, decision.reason),
            (Verdict::AuditDeny, Reason::AdminDeny)
        );
        // A staged NetworkPolicy isolating without allowing, as before tiers.
        let audited = PolicyValue::allowing(0);
        let decision = policy_decision(ENDPOINT_FLAG_ISOLATED_AUDITED, &audited);
        assert_eq!(decision.verdict, Verdict::AuditDeny);
        let allowed = PolicyValue::allowing(POLICY_ALLOW_AUDITED);
        let decision = policy_decision(ENDPOINT_FLAG_ISOLATED_AUDITED, &allowed);
        assert_eq!(decision.verdict, Verdict::Allow);
    }

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
