//! Ports as prefixes of the 16-bit port number, so a range (`endPort`) is at most 30
//! trie entries instead of one per port.

use egret_common::maps::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTOCOL};

use super::Grants;
use crate::policy::{NamedPort, PortMatch, PortSpec, resolve_named_port};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortPrefix {
    /// Every protocol (ICMP and the rest included) and every port.
    AnyProtocol,
    /// Ports of `protocol` whose first `len` bits equal those of `port` (`len` 0: all).
    Protocol { protocol: u8, port: u16, len: u8 },
}

impl PortPrefix {
    #[must_use]
    pub fn port(protocol: u8, port: u16) -> Self {
        PortPrefix::Protocol {
            protocol,
            port,
            len: 16,
        }
    }

    /// The trie prefix length of this entry's key.
    #[must_use]
    pub fn trie_prefix_len(self) -> u32 {
        match self {
            PortPrefix::AnyProtocol => POLICY_PREFIX_ANY_PROTOCOL,
            PortPrefix::Protocol { len, .. } => POLICY_PREFIX_ANY_PORT + u32::from(len),
        }
    }

    /// Every packet this prefix matches, `other` matches too.
    #[must_use]
    pub fn contains(self, other: PortPrefix) -> bool {
        match (self, other) {
            (PortPrefix::AnyProtocol, _) => true,
            (PortPrefix::Protocol { .. }, PortPrefix::AnyProtocol) => false,
            (
                PortPrefix::Protocol {
                    protocol,
                    port,
                    len,
                },
                PortPrefix::Protocol {
                    protocol: other_protocol,
                    port: other_port,
                    len: other_len,
                },
            ) => {
                protocol == other_protocol
                    && len <= other_len
                    && same_leading_bits(port, other_port, len)
            }
        }
    }

    /// The prefix matches a packet of `protocol` to `port`.
    #[must_use]
    pub fn matches(self, protocol: u8, port: u16) -> bool {
        self.contains(PortPrefix::port(protocol, port))
    }
}

fn same_leading_bits(a: u16, b: u16, len: u8) -> bool {
    let shift = 16 - u32::from(len);
    u32::from(a) >> shift == u32::from(b) >> shift
}

/// The prefixes one `ports` item allows on a destination declaring `named_ports`.
pub fn prefixes_of(port: &PortMatch, named_ports: Option<&[NamedPort]>) -> Vec<PortPrefix> {
    let protocol = port.protocol.number();
    match &port.port {
        PortSpec::Any => vec![PortPrefix::Protocol {
            protocol,
            port: 0,
            len: 0,
        }],
        PortSpec::Range { first, last } => range_prefixes(*first, *last)
            .into_iter()
            .map(|(port, len)| PortPrefix::Protocol {
                protocol,
                port,
                len,
            })
            .collect(),
        PortSpec::Named(name) => resolve_named_port(named_ports, name, port.protocol)
            .map(|number| PortPrefix::port(protocol, number))
            .into_iter()
            .collect(),
    }
}

/// The fewest aligned prefixes `(start, len)` that cover exactly `first..=last`.
#[must_use]
pub fn range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut prefixes = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        let mut block_bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << block_bits) - 1 > end {
            block_bits -= 1;
        }
        let start_port = u16::try_from(start).expect("start stays within the port range");
        let len = u8::try_from(16 - block_bits).expect("at most 16 bits");
        prefixes.push((start_port, len));
        start += 1 << block_bits;
    }
    prefixes
}

/// The kernel's trie returns only the longest match, so each entry must carry what the
/// shorter entries covering it allow.
pub fn close_over_prefixes(grants: &mut Grants) {
    let snapshot: Vec<_> = grants.iter().map(|(k, v)| (*k, v.clone())).collect();
    for (prefix, allowance) in grants.iter_mut() {
        for (other, other_allowance) in &snapshot {
            if other != prefix && other.contains(*prefix) {
                allowance.merge(other_allowance);
            }
        }
    }
}
