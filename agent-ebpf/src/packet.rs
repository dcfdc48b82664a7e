//! Header parsing. The common case (IPv4 without options, IPv6 without extension
//! headers, headers in the linear part of the buffer) reads the packet directly, with
//! one bounds check per header and no helper call. Anything else — IP options, IPv6
//! extension headers, headers outside the linear part — falls back to
//! `bpf_skb_load_bytes`, which copes with every layout.

use aya_ebpf::programs::sk_buff::SkBuff;
use egret_common::{
    maps::{FlowKey, FragmentKey},
    proto,
};

pub const ETH_HEADER_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1FFF;

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Extension headers walked before giving up; real traffic carries one or two.
const IPV6_MAX_EXTENSION_HEADERS: usize = 6;

/// Transport bytes the verdict reads: TCP up to its flags, UDP's ports, an ICMP header.
const L4_READ_LEN: usize = 14;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the transport header.
    First,
    /// A later fragment: no transport header, its verdict comes from the first.
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
    /// TCP flags; 0 for other protocols.
    pub tcp_flags: u8,
    /// ICMP or ICMPv6 type; 0 for other protocols.
    pub icmp_type: u8,
    /// ICMP or ICMPv6 echo request or reply: its identifier names the flow.
    pub echo_id: Option<u16>,
    pub fragment: Fragment,
    pub fragment_id: u32,
    /// IPv6 neighbour discovery or multicast listener discovery, sent the way only
    /// link plumbing is (RFC 4861 hop limit 255 / RFC 3810 link-scope multicast).
    pub is_link_control: bool,
    /// An ICMP or ICMPv6 error: the packet it is about starts at `l4 + 8`.
    pub is_icmp_error: bool,
    /// Offset of the transport header from the start of the buffer.
    pub l4: u16,
}

impl Packet {
    /// An empty packet for the parser to fill in place: one slot on the entry's stack,
    /// never copied (the verifier's stack limit is 512 bytes for a whole call chain).
    pub const EMPTY: Packet = Packet {
        is_ipv6: false,
        src: [0; 16],
        dst: [0; 16],
        protocol: 0,
        dst_port: 0,
        src_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        echo_id: None,
        fragment: Fragment::None,
        fragment_id: 0,
        is_link_control: false,
        is_icmp_error: false,
        l4: 0,
    };

    pub fn has_ports(&self) -> bool {
        matches!(self.protocol, proto::TCP | proto::UDP | proto::SCTP)
    }

    /// An ICMP or ICMPv6 echo request: the only ICMP message that opens a flow.
    pub fn is_echo_request(&self) -> bool {
        self.echo_id.is_some() && matches!(self.icmp_type, 8 | 128)
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

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The packet was filled in.
    Ip,
    Arp,
    /// 802.1Q or 802.1ad tagged.
    Vlan,
    /// Neither IP, ARP nor VLAN.
    NotIp,
    Malformed,
}

/// Parses the frame. `l3` is where the IP header starts (after the Ethernet header for
/// TC, 0 for cgroup programs); `ethertype` is the L3 protocol in host order.
#[inline(always)]
pub fn parse(skb: &SkBuff, l3: usize, ethertype: u16, packet: &mut Packet) -> Parsed {
    let parsed = match ethertype {
        ETH_P_IP => {
            parse_ipv4_direct(skb, l3, packet).is_some() || parse_ipv4(skb, l3, packet).is_some()
        }
        ETH_P_IPV6 => {
            parse_ipv6_direct(skb, l3, packet).is_some() || parse_ipv6(skb, l3, packet).is_some()
        }
        ETH_P_ARP => return Parsed::Arp,
        ETH_P_8021Q | ETH_P_8021AD => return Parsed::Vlan,
        _ => return Parsed::NotIp,
    };
    if parsed {
        Parsed::Ip
    } else {
        Parsed::Malformed
    }
}

/// Ethertype of an Ethernet frame, in host order.
#[inline(always)]
pub fn ethertype(skb: &SkBuff) -> Option<u16> {
    match direct::<2>(skb, 12) {
        Some(bytes) => Some(u16::from_be_bytes(*bytes)),
        None => skb.load::<u16>(12).ok().map(u16::from_be),
    }
}

/// `N` bytes at `offset`, read in place when they lie in the linear part.
#[inline(always)]
fn direct<const N: usize>(skb: &SkBuff, offset: usize) -> Option<&[u8; N]> {
    // SAFETY: reading the context's data pointers; the verifier turns them into packet
    // pointers, and the comparison below is the bounds check it requires.
    let (start, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    let at = start + offset;
    if at + N > end {
        return None;
    }
    // SAFETY: [at, at + N) lies within the packet's linear data, checked above.
    Some(unsafe { &*(at as *const [u8; N]) })
}

/// IPv4 without options, headers linear: the common case.
#[inline(always)]
fn parse_ipv4_direct(skb: &SkBuff, l3: usize, packet: &mut Packet) -> Option<()> {
    let header = direct::<{ IPV4_HEADER_LEN + 8 }>(skb, l3)?;
    if header[0] != 0x45 {
        return None;
    }
    let fragment_field = u16::from_be_bytes([header[6], header[7]]);
    *packet = Packet {
        is_ipv6: false,
        src: ipv4_mapped([header[12], header[13], header[14], header[15]]),
        dst: ipv4_mapped([header[16], header[17], header[18], header[19]]),
        protocol: header[9],
        fragment: ipv4_fragment(fragment_field),
        fragment_id: u32::from(u16::from_be_bytes([header[4], header[5]])),
        l4: (l3 + IPV4_HEADER_LEN) as u16,
        ..Packet::EMPTY
    };
    if packet.fragment != Fragment::Later {
        let mut l4 = [0; 8];
        l4.copy_from_slice(&header[IPV4_HEADER_LEN..]);
        read_transport(packet, &l4);
        if packet.protocol == proto::TCP {
            packet.tcp_flags = direct::<L4_READ_LEN>(skb, l3 + IPV4_HEADER_LEN)?[13];
        }
    }
    Some(())
}

/// IPv6 straight to the transport header, headers linear: the common case.
#[inline(always)]
fn parse_ipv6_direct(skb: &SkBuff, l3: usize, packet: &mut Packet) -> Option<()> {
    let header = direct::<{ IPV6_HEADER_LEN + 8 }>(skb, l3)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let next = header[6];
    if !matches!(next, proto::TCP | proto::UDP | proto::SCTP | proto::ICMPV6) {
        return None;
    }
    let mut src = [0; 16];
    src.copy_from_slice(&header[8..24]);
    let mut dst = [0; 16];
    dst.copy_from_slice(&header[24..40]);
    *packet = Packet {
        is_ipv6: true,
        src,
        dst,
        protocol: next,
        fragment: Fragment::None,
        fragment_id: 0,
        l4: (l3 + IPV6_HEADER_LEN) as u16,
        ..Packet::EMPTY
    };
    let mut l4 = [0; 8];
    l4.copy_from_slice(&header[IPV6_HEADER_LEN..]);
    read_transport(packet, &l4);
    if next == proto::TCP {
        packet.tcp_flags = direct::<L4_READ_LEN>(skb, l3 + IPV6_HEADER_LEN)?[13];
    } else {
        packet.is_link_control = is_ipv6_link_control(packet, header[7]);
    }
    Some(())
}

/// Ports and ICMP fields from the first 8 bytes of the transport header.
#[inline(always)]
fn read_transport(packet: &mut Packet, l4: &[u8; 8]) {
    if packet.has_ports() {
        packet.src_port = u16::from_be_bytes([l4[0], l4[1]]);
        packet.dst_port = u16::from_be_bytes([l4[2], l4[3]]);
    } else if packet.protocol == proto::ICMP {
        packet.icmp_type = l4[0];
        // 0: echo reply, 8: echo request.
        if matches!(l4[0], 0 | 8) {
            packet.echo_id = Some(u16::from_be_bytes([l4[4], l4[5]]));
        }
        // 3: destination unreachable, 11: time exceeded, 12: parameter problem.
        packet.is_icmp_error = matches!(l4[0], 3 | 11 | 12);
    } else if packet.protocol == proto::ICMPV6 {
        packet.icmp_type = l4[0];
        // 128: echo request, 129: echo reply.
        if matches!(l4[0], 128 | 129) {
            packet.echo_id = Some(u16::from_be_bytes([l4[4], l4[5]]));
        }
        // 1: destination unreachable, 2: packet too big, 3: time exceeded,
        // 4: parameter problem.
        packet.is_icmp_error = matches!(l4[0], 1..=4);
    }
}

/// Neighbour discovery (133–137) with hop limit 255 to a link-local address or
/// link-scope multicast (solicited-node, all-nodes, all-routers), or multicast listener
/// discovery (130–132, 143) to link-scope multicast: what a link needs, nothing routable.
#[inline(always)]
fn is_ipv6_link_control(packet: &Packet, hop_limit: u8) -> bool {
    if packet.protocol != proto::ICMPV6 {
        return false;
    }
    let link_scope_multicast = packet.dst[0] == 0xFF && packet.dst[1] == 0x02;
    let link_local = packet.dst[0] == 0xFE && packet.dst[1] & 0xC0 == 0x80;
    match packet.icmp_type {
        133..=137 => hop_limit == 255 && (link_local || link_scope_multicast),
        130..=132 | 143 => link_scope_multicast,
        _ => false,
    }
}

fn ipv4_fragment(field: u16) -> Fragment {
    if field & IPV4_OFFSET_MASK != 0 {
        Fragment::Later
    } else if field & IPV4_MORE_FRAGMENTS != 0 {
        Fragment::First
    } else {
        Fragment::None
    }
}

#[inline(never)]
fn parse_ipv4(skb: &SkBuff, l3: usize, packet: &mut Packet) -> Option<()> {
    let version_ihl: u8 = skb.load(l3).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0F) * 4;
    if header_len < IPV4_HEADER_LEN {
        return None;
    }
    let fragment_field = u16::from_be(skb.load::<u16>(l3 + 6).ok()?);
    let fragment_id = u32::from(u16::from_be(skb.load::<u16>(l3 + 4).ok()?));
    let protocol: u8 = skb.load(l3 + 9).ok()?;
    let src: [u8; 4] = skb.load(l3 + 12).ok()?;
    let dst: [u8; 4] = skb.load(l3 + 16).ok()?;
    let l4 = l3 + header_len;
    *packet = Packet {
        is_ipv6: false,
        src: ipv4_mapped(src),
        dst: ipv4_mapped(dst),
        protocol,
        fragment: ipv4_fragment(fragment_field),
        fragment_id,
        l4: l4 as u16,
        ..Packet::EMPTY
    };
    if packet.fragment != Fragment::Later {
        load_transport(skb, packet, l4)?;
    }
    Some(())
}

#[inline(never)]
fn parse_ipv6(skb: &SkBuff, l3: usize, packet: &mut Packet) -> Option<()> {
    let first: u8 = skb.load(l3).ok()?;
    if first >> 4 != 6 {
        return None;
    }
    let mut next: u8 = skb.load(l3 + 6).ok()?;
    let hop_limit: u8 = skb.load(l3 + 7).ok()?;
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
    *packet = Packet {
        is_ipv6: true,
        src,
        dst,
        protocol: next,
        fragment,
        fragment_id,
        l4: offset as u16,
        ..Packet::EMPTY
    };
    if fragment != Fragment::Later {
        load_transport(skb, packet, offset)?;
        packet.is_link_control = is_ipv6_link_control(packet, hop_limit);
    }
    Some(())
}

fn load_transport(skb: &SkBuff, packet: &mut Packet, l4: usize) -> Option<()> {
    if packet.has_ports() || matches!(packet.protocol, proto::ICMP | proto::ICMPV6) {
        let header: [u8; 8] = skb.load(l4).ok()?;
        read_transport(packet, &header);
    }
    if packet.protocol == proto::TCP {
        packet.tcp_flags = skb.load::<u8>(l4 + 13).ok()?;
    }
    Some(())
}

/// The flow an ICMP error is about, as the endpoint sends it, written into `key`: the
/// error quotes a packet the endpoint received (an error it raises about a peer's
/// packet) or one it sent. Read with `bpf_skb_load_bytes`: errors are rare.
#[inline(never)]
pub fn quoted_flow(skb: &SkBuff, packet: &Packet, key: &mut FlowKey) -> Option<()> {
    let inner = usize::from(packet.l4) + 8;
    // Quoted source and destination go into the key as they are; swapped below if the
    // quoted packet came to the endpoint.
    let l4 = if packet.is_ipv6 {
        let first: u8 = skb.load(inner).ok()?;
        if first >> 4 != 6 {
            return None;
        }
        key.protocol = skb.load(inner + 6).ok()?;
        key.src = skb.load(inner + 8).ok()?;
        key.dst = skb.load(inner + 24).ok()?;
        inner + IPV6_HEADER_LEN
    } else {
        let version_ihl: u8 = skb.load(inner).ok()?;
        if version_ihl >> 4 != 4 || version_ihl & 0x0F < 5 {
            return None;
        }
        key.protocol = skb.load(inner + 9).ok()?;
        key.src = ipv4_mapped(skb.load(inner + 12).ok()?);
        key.dst = ipv4_mapped(skb.load(inner + 16).ok()?);
        inner + usize::from(version_ihl & 0x0F) * 4
    };
    let first: [u8; 8] = skb.load(l4).ok()?;
    match key.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            key.src_port = u16::from_be_bytes([first[0], first[1]]);
            key.dst_port = u16::from_be_bytes([first[2], first[3]]);
        }
        // An echo request or reply quoted: its identifier names the flow.
        proto::ICMP | proto::ICMPV6 if matches!(first[0], 0 | 8 | 128 | 129) => {
            let id = u16::from_be_bytes([first[4], first[5]]);
            (key.src_port, key.dst_port) = (id, id);
        }
        _ => return None,
    }
    if key.dst == packet.src {
        core::mem::swap(&mut key.src, &mut key.dst);
        core::mem::swap(&mut key.src_port, &mut key.dst_port);
        Some(())
    } else if key.src == packet.src {
        Some(())
    } else {
        None
    }
}

fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, addr[0], addr[1], addr[2], addr[3],
    ]
}
