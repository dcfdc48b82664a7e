//! DNS on the wire for the `domainNames` tests: responses built byte by byte (for
//! `BPF_PROG_TEST_RUN` and benchmarks), and a small resolver that asks a real server
//! over UDP or TCP from inside a pod's namespace.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// One pod (`t/me`, 10.1.0.1 on node-1) under a ClusterNetworkPolicy that allows its
/// resolver (10.9.0.53), `api.example.test` and `*.svc.example.test` on TCP 443, and
/// denies the rest: the tables the kernel tests and the benchmark of domain rules load.
pub const DOMAIN_RULES_MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: me, namespace: t, labels: {app: me}}
spec: {nodeName: node-1, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.1.0.1}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: names}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - name: dns
      action: Accept
      to: [{networks: [10.9.0.53/32]}]
    - name: api
      action: Accept
      to: [{domainNames: [api.example.test, '*.svc.example.test']}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
    - name: rest
      action: Deny
      to: [{networks: [0.0.0.0/0, '::/0']}]
";

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;

/// A name in wire format, uncompressed.
#[must_use]
#[expect(clippy::missing_panics_doc, reason = "labels of test names are short")]
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(u8::try_from(label.len()).expect("a short label"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A query for `name` of `kind` with recursion desired.
#[must_use]
pub fn query(id: u16, name: &str, kind: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&wire_name(name));
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out
}

/// A response under construction: one question, then answers.
pub struct Response {
    bytes: Vec<u8>,
    answers: u16,
}

impl Response {
    #[must_use]
    pub fn new(question: &str) -> Self {
        let mut bytes = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&wire_name(question));
        bytes.extend_from_slice(&[0, 1, 0, 1]);
        Self { bytes, answers: 0 }
    }

    /// An answer whose owner is the question's name (a compression pointer).
    #[must_use]
    pub fn answer_question(self, kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(&[0xC0, 12], kind, ttl, rdata)
    }

    /// An answer for `owner`, written out.
    #[must_use]
    pub fn answer(self, owner: &str, kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.record(&wire_name(owner), kind, ttl, rdata)
    }

    #[must_use]
    #[expect(clippy::missing_panics_doc, reason = "test records are short")]
    pub fn record(mut self, owner: &[u8], kind: u16, ttl: u32, rdata: &[u8]) -> Self {
        self.bytes.extend_from_slice(owner);
        self.bytes.extend_from_slice(&kind.to_be_bytes());
        self.bytes.extend_from_slice(&1u16.to_be_bytes());
        self.bytes.extend_from_slice(&ttl.to_be_bytes());
        let length = u16::try_from(rdata.len()).expect("short rdata");
        self.bytes.extend_from_slice(&length.to_be_bytes());
        self.bytes.extend_from_slice(rdata);
        self.answers += 1;
        self
    }

    #[must_use]
    pub fn bytes(mut self) -> Vec<u8> {
        self.bytes[6..8].copy_from_slice(&self.answers.to_be_bytes());
        self.bytes
    }
}

/// How a query travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Asks `server` (port 53) for the A or AAAA records of `name` and returns the
/// addresses of the answer (the records' owners are not checked: CNAME chains give
/// their targets' addresses). Call it inside the pod's namespace.
///
/// # Errors
/// When the server does not answer within `timeout`, or the answer is malformed.
pub fn resolve(
    server: IpAddr,
    name: &str,
    kind: u16,
    transport: Transport,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let id = 0x5A5A;
    let question = query(id, name, kind);
    let server = SocketAddr::new(server, 53);
    let answer = match transport {
        Transport::Udp => {
            let bind: SocketAddr = if server.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(timeout))?;
            socket.send_to(&question, server)?;
            let mut buffer = [0u8; 1500];
            let (length, _) = socket.recv_from(&mut buffer).context("no UDP answer")?;
            buffer[..length].to_vec()
        }
        Transport::Tcp => {
            let mut stream = TcpStream::connect_timeout(&server, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            let length = u16::try_from(question.len())?;
            let mut framed = length.to_be_bytes().to_vec();
            framed.extend_from_slice(&question);
            stream.write_all(&framed)?;
            let mut prefix = [0u8; 2];
            stream.read_exact(&mut prefix).context("no TCP answer")?;
            let mut buffer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            stream.read_exact(&mut buffer)?;
            buffer
        }
    };
    addresses(&answer)
}

/// The A and AAAA addresses of a response.
///
/// # Errors
/// When it is malformed.
pub fn addresses(message: &[u8]) -> anyhow::Result<Vec<IpAddr>> {
    let get = |at: usize| message.get(at).copied().context("short answer");
    if message.len() < 12 {
        bail!("short answer");
    }
    let answers = u16::from_be_bytes([message[6], message[7]]);
    let mut at = skip_name(message, 12)? + 4;
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(message, at)?;
        let kind = u16::from_be_bytes([get(at)?, get(at + 1)?]);
        let length = usize::from(u16::from_be_bytes([get(at + 8)?, get(at + 9)?]));
        let rdata = message
            .get(at + 10..at + 10 + length)
            .context("short record")?;
        match (kind, length) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(rdata)?)),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(rdata)?)),
            _ => {}
        }
        at += 10 + length;
    }
    Ok(out)
}

fn skip_name(message: &[u8], mut at: usize) -> anyhow::Result<usize> {
    for _ in 0..128 {
        let length = *message.get(at).context("short name")?;
        match length {
            0 => return Ok(at + 1),
            l if l & 0xC0 == 0xC0 => return Ok(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
    bail!("name too long")
}
