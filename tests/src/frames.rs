//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN` tests, per-packet benchmarks and the
//! link-layer netns tests. The packet builders leave checksums zero, since the programs under
//! test never verify them; the builders of traffic that a real stack receives
//! ([`udp_ipv4`], [`neighbour_solicitation_to`], [`fragmentation_needed`]) fill in valid ones.
//! Builders panic only on payloads larger than an IP packet can be, which tests never make.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
/// IEEE 802 "local experimental ethertype 1": an ethertype no stack handles.
pub const ETH_P_LOCAL_EXPERIMENTAL: u16 = 0x88B5;

/// Destination and source MAC addresses, then the ethertype.
const ETHERNET_LEN: usize = 14;
const IPV4_HEADER_LEN: usize = 20;

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
    let mut frame = ipv6(src, target, ICMPV6, None, &[135, 0, 0, 0, 0, 0, 0, 0]);
    // RFC 4861: neighbour discovery travels with hop limit 255, so it cannot be routed.
    frame[14 + 7] = 255;
    frame
}

/// An ARP request.
#[must_use]
pub fn arp() -> Vec<u8> {
    let mut frame = ethernet(ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0; 20]);
    frame
}

/// The Internet checksum (RFC 1071) of `parts` read as one byte string: the ones' complement
/// of the ones' complement sum of its 16-bit big-endian words, an odd last byte padded with
/// zero. Returned in host order; store it with `to_be_bytes`.
#[must_use]
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    // A part of odd length leaves its last byte as the high half of the next word.
    let mut pending: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match pending.take() {
                Some(high) => sum += u64::from(u16::from_be_bytes([high, byte])),
                None => pending = Some(byte),
            }
        }
    }
    if let Some(high) = pending {
        sum += u64::from(u16::from_be_bytes([high, 0]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// The IPv4 pseudo-header that TCP and UDP checksums cover.
#[must_use]
pub fn ipv4_pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> [u8; 12] {
    let mut header = [0; 12];
    header[..4].copy_from_slice(&src.octets());
    header[4..8].copy_from_slice(&dst.octets());
    header[9] = protocol;
    header[10..].copy_from_slice(&length.to_be_bytes());
    header
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) that upper-layer checksums cover.
#[must_use]
pub fn ipv6_pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, length: u32) -> [u8; 40] {
    let mut header = [0; 40];
    header[..16].copy_from_slice(&src.octets());
    header[16..32].copy_from_slice(&dst.octets());
    header[32..36].copy_from_slice(&length.to_be_bytes());
    header[39] = protocol;
    header
}

/// Fills in the header checksum of the IPv4 header at the start of `header`.
fn fill_ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let checksum = internet_checksum(&[&header[..IPV4_HEADER_LEN]]);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// A UDP datagram from `src` to `dst` as a whole IPv4 frame, with valid IPv4 and UDP
/// checksums.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "only for oversized payloads")]
pub fn udp_ipv4(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let length = u16::try_from(8 + payload.len()).expect("small datagram");
    let mut udp = Vec::with_capacity(usize::from(length));
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&length.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = ipv4_pseudo_header(*src.ip(), *dst.ip(), UDP, length);
    // A computed zero goes on the wire as all ones: zero means "no checksum" in UDP.
    let checksum = match internet_checksum(&[&pseudo, &udp]) {
        0 => 0xFFFF,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = ipv4(*src.ip(), *dst.ip(), UDP, None, &udp);
    fill_ipv4_checksum(&mut frame[ETHERNET_LEN..]);
    frame
}

/// `frame` with an 802.1Q tag for VLAN `vid` (priority 0) inserted between its MAC addresses
/// and its ethertype, as a pod would send to reach another VLAN on the node's link.
#[must_use]
pub fn vlan_tagged(vid: u16, frame: &[u8]) -> Vec<u8> {
    let (macs, rest) = frame.split_at(12);
    let mut tagged = Vec::with_capacity(frame.len() + 4);
    tagged.extend_from_slice(macs);
    tagged.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    tagged.extend_from_slice(&(vid & 0x0FFF).to_be_bytes());
    tagged.extend_from_slice(rest);
    tagged
}

/// A frame of any `ethertype` carrying `payload`, such as [`ETH_P_LOCAL_EXPERIMENTAL`].
#[must_use]
pub fn ethertype_frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = ethernet(ethertype);
    frame.extend_from_slice(payload);
    frame
}

/// A neighbour solicitation as a host's stack would send it: hop limit 255 and a valid
/// `ICMPv6` checksum, from `src` to `dst` asking for `target`. It carries a nonce option
/// (RFC 3971, section 5.3.2) holding `nonce`, so a receiver can tell it from the stack's own.
/// Sent to a global `dst` it is the neighbour discovery that no link needs.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "a fixed-size message")]
pub fn neighbour_solicitation_to(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    nonce: [u8; 6],
) -> Vec<u8> {
    // Type 135, code 0, checksum, reserved; the target; option 14 (nonce), one 8-byte unit.
    let mut message = vec![135, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    message.extend_from_slice(&[14, 1]);
    message.extend_from_slice(&nonce);
    let length = u32::try_from(message.len()).expect("small message");
    let pseudo = ipv6_pseudo_header(src, dst, ICMPV6, length);
    let checksum = internet_checksum(&[&pseudo, &message]);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = ipv6(src, dst, ICMPV6, None, &message);
    // Hop limit: neighbour discovery from anything but a neighbour (255) is ignored.
    frame[ETHERNET_LEN + 7] = 255;
    frame
}

/// The ICMP "fragmentation needed" (type 3, code 4) message that a hop would send back about
/// the flow `from -> to` of `protocol`, advertising `mtu`: it embeds the IPv4 header of a
/// 1,500-byte packet of the flow (don't-fragment set, valid header checksum) and the first
/// 8 bytes of its transport header (the ports, then sequence number zero for TCP or length
/// and checksum for UDP). Returns the ICMP message with a valid checksum: send it over a raw
/// ICMP socket, or wrap it with [`ipv4`] for a frame.
#[must_use]
pub fn fragmentation_needed(
    from: SocketAddrV4,
    to: SocketAddrV4,
    protocol: u8,
    mtu: u16,
) -> Vec<u8> {
    let mut embedded = Vec::with_capacity(IPV4_HEADER_LEN + 8);
    embedded.extend_from_slice(&[0x45, 0]);
    embedded.extend_from_slice(&1500_u16.to_be_bytes());
    embedded.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
    embedded.extend_from_slice(&from.ip().octets());
    embedded.extend_from_slice(&to.ip().octets());
    fill_ipv4_checksum(&mut embedded);
    embedded.extend_from_slice(&from.port().to_be_bytes());
    embedded.extend_from_slice(&to.port().to_be_bytes());
    embedded.extend_from_slice(&[0; 4]);
    // Type, code, checksum, unused, next-hop MTU (RFC 1191), then the packet's start.
    let mut message = vec![3, 4, 0, 0, 0, 0];
    message.extend_from_slice(&mtu.to_be_bytes());
    message.extend_from_slice(&embedded);
    let checksum = internet_checksum(&[&message]);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_known_vectors() {
        // RFC 1071 section 3: the words sum to 0xDDF2, so the checksum is 0x220D.
        let rfc1071 = [0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7];
        assert_eq!(internet_checksum(&[&rfc1071]), 0x220D);
        // Split at odd offsets, the parts still read as one string.
        assert_eq!(
            internet_checksum(&[&rfc1071[..3], &rfc1071[3..5], &rfc1071[5..]]),
            0x220D
        );
        // A captured IPv4 header (192.168.0.1 -> 192.168.0.199, UDP) whose checksum is 0xB861.
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xB8, 0x61, 0xC0, 0xA8,
            0x00, 0x01, 0xC0, 0xA8, 0x00, 0xC7,
        ];
        assert_eq!(
            internet_checksum(&[&header]),
            0,
            "a valid header sums to zero"
        );
        fill_ipv4_checksum(&mut header);
        assert_eq!(header[10..12], [0xB8, 0x61]);
        // An odd length is padded with a zero byte.
        assert_eq!(internet_checksum(&[&[0xAB]]), !0xAB00);
    }

    #[test]
    fn udp_checksum_matches_a_known_datagram() {
        // 10.0.0.1:1234 -> 10.0.0.2:80 carrying "hi", summed by hand: pseudo-header
        // 0x0A00+0x0001+0x0A00+0x0002+0x0011+0x000A, header 0x04D2+0x0050+0x000A, data
        // 0x6869; total 0x81B3, complement 0x7E4C.
        let frame = udp_ipv4(
            "10.0.0.1:1234".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
            b"hi",
        );
        let udp = &frame[ETHERNET_LEN + IPV4_HEADER_LEN..];
        assert_eq!(udp[6..8], [0x7E, 0x4C]);
        assert_eq!(
            internet_checksum(&[&frame[ETHERNET_LEN..ETHERNET_LEN + IPV4_HEADER_LEN]]),
            0
        );
    }

    #[test]
    fn icmp_messages_verify() {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let frame = neighbour_solicitation_to(src, dst, dst, [1, 2, 3, 4, 5, 6]);
        assert_eq!(frame[ETHERNET_LEN + 7], 255, "hop limit");
        let message = &frame[ETHERNET_LEN + 40..];
        let length = u32::try_from(message.len()).unwrap();
        let pseudo = ipv6_pseudo_header(src, dst, ICMPV6, length);
        assert_eq!(internet_checksum(&[&pseudo, message]), 0);

        let from = "10.0.0.1:40000".parse().unwrap();
        let to = "10.0.0.2:8080".parse().unwrap();
        let message = fragmentation_needed(from, to, TCP, 1400);
        assert_eq!(message[..2], [3, 4]);
        assert_eq!(message[6..8], 1400_u16.to_be_bytes());
        assert_eq!(internet_checksum(&[&message]), 0);
        let embedded = &message[8..];
        assert_eq!(internet_checksum(&[&embedded[..IPV4_HEADER_LEN]]), 0);
        assert_eq!(embedded[20..22], 40000_u16.to_be_bytes());
        assert_eq!(embedded[22..24], 8080_u16.to_be_bytes());
    }

    #[test]
    fn vlan_tag_sits_before_the_ethertype() {
        let frame = ethertype_frame(ETH_P_LOCAL_EXPERIMENTAL, b"x");
        let tagged = vlan_tagged(100, &frame);
        assert_eq!(tagged[..12], frame[..12]);
        assert_eq!(tagged[12..16], [0x81, 0x00, 0x00, 100]);
        assert_eq!(tagged[16..], frame[12..]);
    }
}
