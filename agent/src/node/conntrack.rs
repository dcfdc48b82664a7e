//! Flows a pod already had when Egret first attaches to it, read from the kernel's own
//! connection tracking (`/proc/net/nf_conntrack` of the node's network namespace), so
//! connections the pod accepted before are not cut by its egress policy.

use std::net::IpAddr;

use egret_common::{
    maps::{FLOW_ORIGIN_INBOUND, FLOW_ORIGIN_OUTBOUND, FlowKey},
    proto,
};

use super::image::ip_key;

/// One tracked connection: the original and the reply direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub protocol: u8,
    pub original: (IpAddr, IpAddr, u16, u16),
    pub reply: (IpAddr, IpAddr, u16, u16),
}

/// Parses `/proc/net/nf_conntrack`; lines it cannot read are skipped.
#[must_use]
pub fn parse(text: &str) -> Vec<Tracked> {
    text.lines().filter_map(parse_line).collect()
}

/// A tuple as it is read: source, destination, source port, destination port.
type PartialTuple = (Option<IpAddr>, Option<IpAddr>, Option<u16>, Option<u16>);

fn parse_line(line: &str) -> Option<Tracked> {
    let mut fields = line.split_whitespace();
    let _family = fields.next()?;
    let _family_number = fields.next()?;
    let _protocol_name = fields.next()?;
    let protocol: u8 = fields.next()?.parse().ok()?;
    let mut tuples: Vec<PartialTuple> = Vec::new();
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "src" => tuples.push((value.parse().ok(), None, None, None)),
            "dst" => tuples.last_mut()?.1 = value.parse().ok(),
            "sport" => tuples.last_mut()?.2 = value.parse().ok(),
            "dport" => tuples.last_mut()?.3 = value.parse().ok(),
            // ICMP echo: the identifier names the flow, as in the kernel programs.
            "id" => {
                let id = value.parse().ok();
                let tuple = tuples.last_mut()?;
                (tuple.2, tuple.3) = (id, id);
            }
            _ => {}
        }
    }
    let complete = |t: &PartialTuple| Some((t.0?, t.1?, t.2.unwrap_or(0), t.3.unwrap_or(0)));
    let tracked = Tracked {
        protocol,
        original: complete(tuples.first()?)?,
        reply: complete(tuples.get(1)?)?,
    };
    let is_flow = matches!(
        protocol,
        proto::TCP | proto::UDP | proto::SCTP | proto::ICMP | proto::ICMPV6
    );
    is_flow.then_some(tracked)
}

/// The conntrack entries to write for the pods with `addresses`: a connection a pod
/// answered is one it accepted (its replies pass); one it opened is its own.
#[must_use]
pub fn flows_of(tracked: &[Tracked], addresses: &[IpAddr]) -> Vec<(FlowKey, u8)> {
    let key = |(src, dst, src_port, dst_port): (IpAddr, IpAddr, u16, u16), protocol| FlowKey {
        src: ip_key(src).addr,
        dst: ip_key(dst).addr,
        src_port,
        dst_port,
        protocol,
        pad: [0; 3],
    };
    tracked
        .iter()
        .filter_map(|t| {
            if addresses.contains(&t.reply.0) {
                Some((key(t.reply, t.protocol), FLOW_ORIGIN_INBOUND))
            } else if addresses.contains(&t.original.0) {
                Some((key(t.original, t.protocol), FLOW_ORIGIN_OUTBOUND))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.77.0.3 dst=10.77.0.1 sport=40000 dport=8080 src=10.77.0.1 dst=10.77.0.3 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.77.0.1 dst=10.77.0.9 sport=5353 dport=53 src=10.77.0.9 dst=10.77.0.1 sport=53 dport=5353 mark=0 zone=0 use=2
ipv4     2 icmp     1 29 src=10.77.0.3 dst=10.77.0.1 type=8 code=0 id=77 src=10.77.0.1 dst=10.77.0.3 type=0 code=0 id=77 mark=0 zone=0 use=2
ipv6     10 tcp      6 300 ESTABLISHED src=fd00::3 dst=fd00::1 sport=1 dport=443 src=fd00::1 dst=fd00::3 sport=443 dport=1 [ASSURED] mark=0 use=2
ipv4     2 tcp      6 10 ESTABLISHED src=10.9.9.9 dst=10.8.8.8 sport=1 dport=2 src=10.8.8.8 dst=10.9.9.9 sport=2 dport=1 mark=0 use=1
garbage line
";

    #[test]
    fn accepted_and_opened_flows_of_local_pods() {
        let tracked = parse(TABLE);
        assert_eq!(tracked.len(), 5);
        let pods: Vec<IpAddr> = ["10.77.0.1", "fd00::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let flows = flows_of(&tracked, &pods);
        assert_eq!(flows.len(), 4, "the unrelated connection is left out");
        let (accepted, origin) = flows[0];
        assert_eq!(origin, FLOW_ORIGIN_INBOUND);
        assert_eq!(
            (accepted.src_port, accepted.dst_port, accepted.protocol),
            (8080, 40000, proto::TCP)
        );
        assert_eq!(accepted.src, ip_key("10.77.0.1".parse().unwrap()).addr);
        assert_eq!(
            flows[1].1, FLOW_ORIGIN_OUTBOUND,
            "the pod opened the DNS query"
        );
        assert_eq!(
            (flows[2].0.src_port, flows[2].0.dst_port, flows[2].1),
            (77, 77, FLOW_ORIGIN_INBOUND)
        );
        assert_eq!(flows[3].1, FLOW_ORIGIN_INBOUND);
    }
}
