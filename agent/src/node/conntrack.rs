//! Flows a pod already had when Egret first attaches to it, read from the kernel's own
//! connection tracking (`/proc/net/nf_conntrack` of the node's network namespace), so
//! connections the pod accepted before are not cut by its egress policy.

use std::net::IpAddr;

use egret_common::proto;

/// Where the kernel's connection tracking table of this network namespace is read.
const PROC_TABLE: &str = "/proc/net/nf_conntrack";

/// The connections the node's conntrack tracks now; `None` when the node does no
/// connection tracking (the table is absent): then there is nothing to seed.
#[must_use]
pub fn read() -> Option<Vec<Tracked>> {
    std::fs::read_to_string(PROC_TABLE)
        .ok()
        .map(|text| parse(&text))
}

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

/// Who opened a flow, seen from the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The pod accepted it: its replies pass whatever its egress policy says.
    Inbound,
    /// The pod opened it.
    Outbound,
}

/// One flow of a pod, in the direction the pod sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodFlow {
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub origin: Origin,
}

/// The flows of the pod with `addresses`: a connection the pod answered is one it
/// accepted; one it opened is its own.
#[must_use]
pub fn flows_of(tracked: &[Tracked], addresses: &[IpAddr]) -> Vec<PodFlow> {
    let flow =
        |(src, dst, src_port, dst_port): (IpAddr, IpAddr, u16, u16), protocol, origin| PodFlow {
            protocol,
            src,
            dst,
            src_port,
            dst_port,
            origin,
        };
    tracked
        .iter()
        .filter_map(|t| {
            if addresses.contains(&t.reply.0) {
                Some(flow(t.reply, t.protocol, Origin::Inbound))
            } else if addresses.contains(&t.original.0) {
                Some(flow(t.original, t.protocol, Origin::Outbound))
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
        let accepted = flows[0];
        assert_eq!(accepted.origin, Origin::Inbound);
        assert_eq!(
            (accepted.src_port, accepted.dst_port, accepted.protocol),
            (8080, 40000, proto::TCP)
        );
        assert_eq!(accepted.src, "10.77.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            flows[1].origin,
            Origin::Outbound,
            "the pod opened the DNS query"
        );
        assert_eq!(
            (flows[2].src_port, flows[2].dst_port, flows[2].origin),
            (77, 77, Origin::Inbound)
        );
        assert_eq!(flows[3].origin, Origin::Inbound);
    }
}
