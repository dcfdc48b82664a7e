//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN` tests and per-packet benchmarks.
//! Checksums are left zero: the programs under test never verify them. Builders panic
//! only on payloads larger than an IP packet can be, which tests never make.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const TCP_SYN: u8 = 0x02;

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// A transport header: ports for TCP/UDP/SCTP (with a SYN for TCP), or an ICMP echo.
#[must_use]
pub fn transport(protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    match protocol {
        TCP => {
            l4.extend_from_slice(&src_port.to_be_bytes());
            l4.extend_from_slice(&dst_port.to_be_bytes());
            l4.extend_from_slice(&[
                0, 0, 0, 1, 0, 0, 0, 0, 0x50, TCP_SYN, 0xFF, 0xFF, 0, 0, 0, 0,
            ]);
        }
        UDP | SCTP => {
            l4.extend_from_slice(&src_port.to_be_bytes());
            l4.extend_from_slice(&dst_port.to_be_bytes());
            l4.extend_from_slice(&[0, 8, 0, 0, 0, 0, 0, 0]);
        }
        // Echo request (8) / ICMPv6 echo request (128): type, code, checksum, id, sequence.
        ICMP | ICMPV6 => {
            let echo_request = if protocol == ICMP { 8 } else { 128 };
            l4.extend_from_slice(&[echo_request, 0, 0, 0]);
            l4.extend_from_slice(&src_port.to_be_bytes());
            l4.extend_from_slice(&[0, 1]);
        }
        _ => l4.extend_from_slice(&[0; 8]),
    }
    l4
}

/// An IPv4 packet; `fragment` is `(id, offset in 8-byte units, more fragments)`.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "only for oversized payloads")]
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    fragment: Option<(u16, u16, bool)>,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(ETH_P_IP);
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let (id, offset, more) = fragment.unwrap_or((0x1234, 0, false));
    let flags_offset = offset | if more { 0x2000 } else { 0 };
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&flags_offset.to_be_bytes());
    frame.extend_from_slice(&[64, protocol, 0, 0]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(payload);
    frame
}

/// An IPv6 packet; `fragment` adds a fragment header `(id, offset in 8-byte units, more)`.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "only for oversized payloads")]
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: u8,
    fragment: Option<(u32, u16, bool)>,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = ethernet(ETH_P_IPV6);
    let extension = if fragment.is_some() { 8 } else { 0 };
    let length = u16::try_from(extension + payload.len()).expect("small packet");
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.push(if fragment.is_some() { 44 } else { protocol });
    frame.push(64);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    if let Some((id, offset, more)) = fragment {
        frame.extend_from_slice(&[protocol, 0]);
        frame.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame
}

/// A whole packet from `src` to `dst:dst_port` (IPv4 or IPv6 alike).
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "mixed families are a test bug")]
pub fn packet(src: IpAddr, dst: IpAddr, protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
    let protocol = match (protocol, dst) {
        (ICMP | ICMPV6, IpAddr::V4(_)) => ICMP,
        (ICMP | ICMPV6, IpAddr::V6(_)) => ICMPV6,
        (other, _) => other,
    };
    let l4 = transport(protocol, src_port, dst_port);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, protocol, None, &l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, protocol, None, &l4),
        _ => panic!("mixed address families"),
    }
}

/// An IPv6 neighbour solicitation.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "a literal address")]
pub fn neighbour_solicitation(src: Ipv6Addr) -> Vec<u8> {
    let target = "ff02::1:ff00:1".parse().expect("literal");
    ipv6(src, target, ICMPV6, None, &[135, 0, 0, 0, 0, 0, 0, 0])
}

/// An ARP request.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut frame = ethernet(ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0; 20]);
    frame
}
