//! Header parsing. Reads go through `bpf_skb_load_bytes` (`SkBuff::load`), which keeps
//! the verifier content without bounds-checking direct packet pointers.

use aya_ebpf::programs::sk_buff::SkBuff;
use egret_common::proto;

pub const ETH_HEADER_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1FFF;

const IPV6_HEADER_LEN: usize = 40;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up; real traffic carries one or two.
const IPV6_MAX_EXTENSION_HEADERS: usize = 6;

/// Identifies the fragments of one datagram (RFC 791 / RFC 8200).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub protocol: u8,
    pub pad: [u8; 3],
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the transport header.
    First,
    /// A later fragment: no transport header, its port comes from the first.
    Later,
}

pub struct Packet {
    pub is_ipv6: bool,
    /// IPv4 addresses are IPv4-mapped, as in the maps.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    /// Destination port for TCP, UDP and SCTP; 0 otherwise or for later fragments.
    pub dst_port: u16,
    pub src_port: u16,
    /// ICMP or ICMPv6 echo request or reply: its identifier names the flow.
    pub echo_id: Option<u16>,
    pub fragment: Fragment,
    pub fragment_id: u32,
    /// IPv6 neighbour discovery or multicast listener discovery: link plumbing, not a flow.
    pub is_link_control: bool,
}

impl Packet {
    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, proto::TCP | proto::UDP | proto::SCTP)
    }

    pub fn fragment_key(&self) -> FragmentKey {
        FragmentKey {
            src: self.src,
            dst: self.dst,
            id: self.fragment_id,
            protocol: self.protocol,
            pad: [0; 3],
        }
    }
}

pub enum Parsed {
    NotIp,
    Ip(Packet),
    Malformed,
}

/// Parses the packet whose Ethernet header (if any) ends at `l3`; `ethertype` is
/// the L3 protocol in host order.
pub fn parse(skb: &SkBuff, l3: usize, ethertype: u16) -> Parsed {
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(skb, l3),
        ETH_P_IPV6 => parse_ipv6(skb, l3),
        _ => return Parsed::NotIp,
    };
    parsed.map_or(Parsed::Malformed, Parsed::Ip)
}

/// Ethertype of an Ethernet frame, in host order.
pub fn ethertype(skb: &SkBuff) -> Option<u16> {
    skb.load::<u16>(12).ok().map(u16::from_be)
}

fn parse_ipv4(skb: &SkBuff, l3: usize) -> Option<Packet> {
    let version_ihl: u8 = skb.load(l3).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0F) * 4;
    if header_len < 20 {
        return None;
    }
    let fragment_field = u16::from_be(skb.load::<u16>(l3 + 6).ok()?);
    let fragment_id = u32::from(u16::from_be(skb.load::<u16>(l3 + 4).ok()?));
    let protocol: u8 = skb.load(l3 + 9).ok()?;
    let src: [u8; 4] = skb.load(l3 + 12).ok()?;
    let dst: [u8; 4] = skb.load(l3 + 16).ok()?;
    let fragment = if fragment_field & IPV4_OFFSET_MASK != 0 {
        Fragment::Later
    } else if fragment_field & IPV4_MORE_FRAGMENTS != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    let mut packet = Packet {
        is_ipv6: false,
        src: ipv4_mapped(src),
        dst: ipv4_mapped(dst),
        protocol,
        dst_port: 0,
        src_port: 0,
        echo_id: None,
        fragment,
        fragment_id,
        is_link_control: false,
    };
    if fragment == Fragment::Later {
        return Some(packet);
    }
    let l4 = l3 + header_len;
    if packet.has_ports() {
        let ports: [u8; 4] = skb.load(l4).ok()?;
        packet.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        packet.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    } else if packet.protocol == proto::ICMP {
        let header: [u8; 8] = skb.load(l4).ok()?;
        // 0: echo reply, 8: echo request.
        if matches!(header[0], 0 | 8) {
            packet.echo_id = Some(u16::from_be_bytes([header[4], header[5]]));
        }
    }
    Some(packet)
}

fn parse_ipv6(skb: &SkBuff, l3: usize) -> Option<Packet> {
    let first: u8 = skb.load(l3).ok()?;
    if first >> 4 != 6 {
        return None;
    }
    let mut next: u8 = skb.load(l3 + 6).ok()?;
    let src: [u8; 16] = skb.load(l3 + 8).ok()?;
    let dst: [u8; 16] = skb.load(l3 + 24).ok()?;
    let mut offset = l3 + IPV6_HEADER_LEN;
    let mut fragment = Fragment::None;
    let mut fragment_id = 0;
    for _ in 0..IPV6_MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let header: [u8; 2] = skb.load(offset).ok()?;
                next = header[0];
                offset += (usize::from(header[1]) + 1) * 8;
            }
            IPV6_AUTH => {
                let header: [u8; 2] = skb.load(offset).ok()?;
                next = header[0];
                offset += (usize::from(header[1]) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let header: [u8; 8] = skb.load(offset).ok()?;
                next = header[0];
                let offset_and_flag = u16::from_be_bytes([header[2], header[3]]);
                fragment_id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                fragment = if offset_and_flag & 0xFFF8 != 0 {
                    Fragment::Later
                } else if offset_and_flag & 1 != 0 {
                    Fragment::First
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    Fragment::None
                };
                offset += 8;
            }
            _ => break,
        }
    }
    let mut packet = Packet {
        is_ipv6: true,
        src,
        dst,
        protocol: next,
        dst_port: 0,
        src_port: 0,
        echo_id: None,
        fragment,
        fragment_id,
        is_link_control: false,
    };
    if fragment == Fragment::Later {
        return Some(packet);
    }
    if packet.has_ports() {
        let ports: [u8; 4] = skb.load(offset).ok()?;
        packet.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        packet.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    } else if packet.protocol == proto::ICMPV6 {
        let header: [u8; 8] = skb.load(offset).ok()?;
        // 130-132 and 143: multicast listener discovery; 133-137: neighbour discovery.
        packet.is_link_control = matches!(header[0], 130..=137 | 143);
        // 128: echo request, 129: echo reply.
        if matches!(header[0], 128 | 129) {
            packet.echo_id = Some(u16::from_be_bytes([header[4], header[5]]));
        }
    }
    Some(packet)
}

fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, addr[0], addr[1], addr[2], addr[3],
    ]
}
