//! Traffic at volume from inside a pod: floods of crafted IPv4 packets with distinct
//! 4-tuples, many short TCP connections, whole Ethernet frames; and a receiver that sees only
//! the frames a host interface's tc ingress let through.
//!
//! Floods build their packets in user space and hand them to a raw socket (`IPPROTO_RAW`,
//! which implies `IP_HDRINCL`) in batches with `sendmmsg`, so hundreds of thousands of packets
//! take seconds. The kernel routes them like any packet of the pod, through its veth and the
//! node. Every loop is bounded by its count and by [`FLOOD_TIME_LIMIT`].

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::mem;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::frames::{self, TCP, UDP};
use crate::netns;

/// A flood, or a churn of connections, that has not finished by then fails.
pub const FLOOD_TIME_LIMIT: Duration = Duration::from_mins(5);

/// The source ports floods cycle through: all but the well-known ones.
const FIRST_PORT: u16 = 1024;
const PORTS: usize = 65_536 - FIRST_PORT as usize;

/// Packets per `sendmmsg`.
const BATCH: usize = 256;
/// Room for the largest crafted packet (IPv4 + TCP headers, or IPv4 + UDP + a short payload).
const PACKET_ROOM: usize = 64;

const TCP_ACK: u8 = 0x10;

/// What a flood or churn did.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    /// Packets handed to the kernel, or connections made.
    pub sent: usize,
    pub elapsed: Duration,
}

/// `count` UDP datagrams from `src` to `dst`, from inside `pod_netns`, each with its own
/// (source port, destination port) pair: both ports change with every datagram, over
/// 1024..=65535 each. Checksums are valid.
///
/// # Errors
/// When the raw socket cannot be opened (not root), a send fails other than for want of
/// buffer space, or the flood outlasts [`FLOOD_TIME_LIMIT`].
pub fn udp_flood(
    pod_netns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    count: usize,
) -> anyhow::Result<FloodReport> {
    ensure!(
        count <= PORTS * PORTS,
        "{count} datagrams cannot all differ"
    );
    flood(pod_netns, dst, count, |index, packet| {
        let (src_port, step) = tuple(index);
        // (a, b) -> (a, a + b): a bijection on pairs, so no two datagrams share both ports.
        let dst_port = port((usize::from(src_port - FIRST_PORT) + step) % PORTS);
        let payload = u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes();
        udp_packet(packet, src, dst, src_port, dst_port, index, &payload)
    })
}

/// `count` TCP SYNs from `src` to `dst`, from inside `pod_netns`: source ports cycle through
/// 1024..=65535 while the destination port moves among `dst_ports`, so every SYN has its own
/// 4-tuple as long as `count` is at most 64,512 × `dst_ports.len()`. IPv4 and TCP checksums
/// are valid; sequence numbers are pseudo-random.
///
/// # Errors
/// As [`udp_flood`], and when `dst_ports` is empty or too short for `count` distinct tuples.
pub fn tcp_syn_flood(
    pod_netns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dst_ports: &[u16],
    count: usize,
) -> anyhow::Result<FloodReport> {
    tcp_flood(pod_netns, src, dst, dst_ports, count, frames::TCP_SYN)
}

/// Like [`tcp_syn_flood`], with bare ACKs (the ACK flag alone, pseudo-random sequence and
/// acknowledgement numbers): segments of connections that never existed.
///
/// # Errors
/// As [`tcp_syn_flood`].
pub fn tcp_ack_flood(
    pod_netns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dst_ports: &[u16],
    count: usize,
) -> anyhow::Result<FloodReport> {
    tcp_flood(pod_netns, src, dst, dst_ports, count, TCP_ACK)
}

fn tcp_flood(
    pod_netns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dst_ports: &[u16],
    count: usize,
    flags: u8,
) -> anyhow::Result<FloodReport> {
    ensure!(!dst_ports.is_empty(), "no destination ports");
    ensure!(
        count <= PORTS * dst_ports.len(),
        "{count} segments need more than {} destination ports to differ",
        dst_ports.len()
    );
    let mut random = XorShift::new(0x5EED_0000 ^ u64::from(flags));
    flood(pod_netns, dst, count, |index, packet| {
        let (src_port, step) = tuple(index);
        // As in `udp_flood`: (a, b) -> (a, a + b) mod ports, distinct while b < ports.
        let dst_port = dst_ports[(usize::from(src_port - FIRST_PORT) + step) % dst_ports.len()];
        let (seq, ack) = random.pair();
        let ack = if flags & TCP_ACK == 0 { 0 } else { ack };
        tcp_packet(
            packet,
            src,
            dst,
            (src_port, dst_port),
            (seq, ack),
            flags,
            index,
        )
    })
}

/// The `index`-th tuple: a source port, and how many times the source ports have wrapped.
fn tuple(index: usize) -> (u16, usize) {
    (port(index % PORTS), index / PORTS)
}

fn port(offset: usize) -> u16 {
    FIRST_PORT + u16::try_from(offset % PORTS).unwrap_or(0)
}

/// A small, fast pseudo-random sequence (xorshift64); reproducible from its seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn pair(&mut self) -> (u32, u32) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        #[expect(clippy::cast_possible_truncation, reason = "splitting 64 bits in two")]
        (self.0 as u32, (self.0 >> 32) as u32)
    }
}

/// Writes the IPv4 header of a packet of `total` bytes into `packet[..20]`, checksum included
/// (the kernel fills it in for `IP_HDRINCL` anyway, but the packet is valid as built).
fn ipv4_header(
    packet: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    total: usize,
    id: usize,
) {
    let total = u16::try_from(total).unwrap_or(u16::MAX);
    #[expect(clippy::cast_possible_truncation, reason = "the id only needs to vary")]
    let id = id as u16;
    packet[0] = 0x45;
    packet[1] = 0;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    // Don't fragment, TTL 64.
    packet[6..10].copy_from_slice(&[0x40, 0, 64, protocol]);
    packet[10..12].fill(0);
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    let checksum = frames::internet_checksum(&[&packet[..20]]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// Builds an IPv4 UDP datagram into `packet`; returns its length.
fn udp_packet(
    packet: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    id: usize,
    payload: &[u8],
) -> usize {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    ipv4_header(packet, src, dst, UDP, total, id);
    let udp = &mut packet[20..total];
    let length = u16::try_from(udp_len).unwrap_or(u16::MAX);
    udp[..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    udp[4..6].copy_from_slice(&length.to_be_bytes());
    udp[6..8].fill(0);
    udp[8..].copy_from_slice(payload);
    let pseudo = frames::ipv4_pseudo_header(src, dst, UDP, length);
    let checksum = match frames::internet_checksum(&[&pseudo, udp]) {
        0 => 0xFFFF,
        sum => sum,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    total
}

/// Builds an IPv4 TCP segment without options or data into `packet`; returns its length.
fn tcp_packet(
    packet: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (src_port, dst_port): (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
    id: usize,
) -> usize {
    let total = 40;
    ipv4_header(packet, src, dst, TCP, total, id);
    let tcp = &mut packet[20..total];
    tcp[..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    // Data offset 5 words; window 64,240; checksum and urgent pointer zero for now.
    tcp[12..20].copy_from_slice(&[0x50, flags, 0xFA, 0xF0, 0, 0, 0, 0]);
    let pseudo = frames::ipv4_pseudo_header(src, dst, TCP, 20);
    let checksum = frames::internet_checksum(&[&pseudo, tcp]);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    total
}

/// Sends `count` packets to `dst` that `build(index, buffer)` writes (returning the length),
/// over a raw IPv4 socket inside `pod_netns`.
fn flood(
    pod_netns: &str,
    dst: Ipv4Addr,
    count: usize,
    build: impl FnMut(usize, &mut [u8]) -> usize + Send,
) -> anyhow::Result<FloodReport> {
    netns::run_in(pod_netns, || send_batches(dst, count, build))?
        .with_context(|| format!("flooding {dst} from netns {pod_netns}"))
}

fn send_batches(
    dst: Ipv4Addr,
    count: usize,
    mut build: impl FnMut(usize, &mut [u8]) -> usize,
) -> anyhow::Result<FloodReport> {
    let socket = raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)
        .context("cannot open a raw IPv4 socket")?;
    let address = sockaddr_in(dst);
    let mut buffers = vec![[0_u8; PACKET_ROOM]; BATCH];
    let start = Instant::now();
    let deadline = start + FLOOD_TIME_LIMIT;
    let mut sent = 0;
    while sent < count {
        let batch = BATCH.min(count - sent);
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(batch);
        for (offset, buffer) in buffers.iter_mut().take(batch).enumerate() {
            let length = build(sent + offset, buffer);
            iovecs.push(libc::iovec {
                iov_base: buffer.as_mut_ptr().cast::<c_void>(),
                iov_len: length,
            });
        }
        let mut headers: Vec<libc::mmsghdr> = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: `mmsghdr` is a plain C struct for which all zeroes is a valid value.
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_name = (&raw const address).cast_mut().cast::<c_void>();
                header.msg_hdr.msg_namelen = socklen_of::<libc::sockaddr_in>();
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        let mut done = 0;
        // Every pass sends at least one packet or waits; the deadline bounds the waiting.
        while done < batch {
            ensure!(
                Instant::now() < deadline,
                "sent only {} of {count} packets in {FLOOD_TIME_LIMIT:?}",
                sent + done
            );
            let pending = u32::try_from(batch - done).unwrap_or(u32::MAX);
            // SAFETY: `headers[done..]` holds `pending` initialised headers whose name and
            // iovec pointers point at `address` and `buffers`, all alive for the call.
            let result = unsafe {
                libc::sendmmsg(socket.as_raw_fd(), headers[done..].as_mut_ptr(), pending, 0)
            };
            if let Ok(accepted) = usize::try_from(result) {
                done += accepted;
                continue;
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // The device queue is full: let it drain.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                    thread::sleep(Duration::from_micros(200));
                }
                _ => return Err(error).context("sendmmsg on a raw socket"),
            }
        }
        sent += batch;
    }
    Ok(FloodReport {
        sent,
        elapsed: start.elapsed(),
    })
}

/// Opens `count` TCP connections from inside `pod_netns`, spread over `dsts` in turn, on
/// `threads` threads: each connects, has 8 bytes echoed, shuts its side down and waits for the
/// peer's FIN, so both sides have closed when it ends. Needs echo servers at `dsts`.
///
/// A connection that fails is counted, not retried. The pod opens connections faster than
/// `TIME_WAIT` frees ports: widen its `net.ipv4.ip_local_port_range` and set
/// `net.ipv4.tcp_tw_reuse` first (see [`set_sysctls`]).
///
/// # Errors
/// When a thread cannot enter the namespace, or the churn outlasts [`FLOOD_TIME_LIMIT`].
pub fn tcp_churn(
    pod_netns: &str,
    dsts: &[SocketAddr],
    count: usize,
    threads: usize,
) -> anyhow::Result<ChurnReport> {
    ensure!(!dsts.is_empty(), "no destinations");
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let first_error = Mutex::new(None);
    let start = Instant::now();
    let deadline = start + FLOOD_TIME_LIMIT;
    thread::scope(|scope| -> anyhow::Result<()> {
        let mut workers = Vec::new();
        for n in 0..threads.max(1) {
            let (next, failed, first_error) = (&next, &failed, &first_error);
            let worker = thread::Builder::new()
                .name(format!("churn {n}"))
                .spawn_scoped(scope, move || -> anyhow::Result<()> {
                    netns::enter(pod_netns)?;
                    // Each pass takes a fresh index, so `count` bounds the passes.
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= count || Instant::now() > deadline {
                            return Ok(());
                        }
                        if let Err(error) = echo_once(dsts[index % dsts.len()], index) {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert_with(|| error.to_string());
                        }
                    }
                })
                .context("cannot spawn a churn thread")?;
            workers.push(worker);
        }
        for worker in workers {
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })?;
    let attempted = next.load(Ordering::Relaxed).min(count);
    if attempted < count {
        bail!("made only {attempted} of {count} connections in {FLOOD_TIME_LIMIT:?}");
    }
    let failed = failed.into_inner();
    Ok(ChurnReport {
        completed: count - failed,
        failed,
        first_error: first_error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        elapsed: start.elapsed(),
    })
}

/// What [`tcp_churn`] saw.
#[derive(Clone, Debug)]
pub struct ChurnReport {
    /// Connections that echoed and closed cleanly.
    pub completed: usize,
    pub failed: usize,
    /// The first failure, as text.
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

/// Longest a churned connection may take for each step.
const CHURN_STEP_TIMEOUT: Duration = Duration::from_secs(5);

fn echo_once(dst: SocketAddr, index: usize) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&dst, CHURN_STEP_TIMEOUT)?;
    stream.set_read_timeout(Some(CHURN_STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(CHURN_STEP_TIMEOUT))?;
    let sent = (index as u64).to_be_bytes();
    stream.write_all(&sent)?;
    let mut echoed = [0; 8];
    stream.read_exact(&mut echoed)?;
    if echoed != sent {
        return Err(io::Error::other(format!(
            "echo was {echoed:?}, not {sent:?}"
        )));
    }
    stream.shutdown(Shutdown::Write)?;
    // The server closes once it reads our FIN; its FIN reads as end of stream.
    let mut rest = [0; 16];
    match stream.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(io::Error::other("data after the echo")),
    }
}

/// Writes sysctls (`net.ipv4.tcp_tw_reuse`-style keys) of `netns`.
///
/// # Errors
/// When a key does not exist or cannot be written.
pub fn set_sysctls(netns: &str, settings: &[(&str, &str)]) -> anyhow::Result<()> {
    netns::write_sysctls(netns, settings)
}

/// The namespace's protocol counters from `/proc/net/snmp`, keyed `Udp.NoPorts`,
/// `Tcp.InSegs`, `Tcp.InCsumErrors` and so on: how a test tells that a flood reached the
/// destination's stack, checksums verified. Signed fields that are negative are left out.
///
/// # Errors
/// When the namespace cannot be entered or the file read.
pub fn snmp_counters(netns: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    // /proc/net follows the process's namespace; thread-self follows this thread's.
    let text = netns::run_in(netns, || fs::read_to_string("/proc/thread-self/net/snmp"))?
        .with_context(|| format!("reading /proc/net/snmp of netns {netns}"))?;
    Ok(parse_snmp(&text))
}

/// Pairs each header line (`Udp: InDatagrams NoPorts ...`) with the value line after it.
fn parse_snmp(text: &str) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((protocol, names)), Some((_, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(value) = value.parse() {
                counters.insert(format!("{protocol}.{name}"), value);
            }
        }
    }
    counters
}

/// Sends each of `frames` whole, as it is, on `interface` inside `pod_netns` (`eth0` for a
/// pod), over an `AF_PACKET` raw socket: the stack adds nothing, so VLAN tags, any ethertype
/// and hand-made IPv6 go out exactly as built.
///
/// # Errors
/// When there is no such interface, the socket cannot be opened, or a frame is not sent whole.
pub fn send_frames(pod_netns: &str, interface: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    netns::run_in(pod_netns, || -> anyhow::Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface {interface}"))?;
        // Protocol 0: the socket only sends; it receives nothing.
        let socket = raw_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
            .context("cannot open an AF_PACKET socket")?;
        for frame in frames {
            ensure!(
                frame.len() >= 14,
                "a frame of {} bytes has no header",
                frame.len()
            );
            let mut address = sockaddr_ll(ifindex, u16::from_be_bytes([frame[12], frame[13]]));
            address.sll_halen = 6;
            address.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `address` are valid for the lengths given, for the call.
            let result = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    frame.as_ptr().cast::<c_void>(),
                    frame.len(),
                    0,
                    (&raw const address).cast::<libc::sockaddr>(),
                    socklen_of::<libc::sockaddr_ll>(),
                )
            };
            let sent = usize::try_from(result)
                .map_err(|_| io::Error::last_os_error())
                .with_context(|| format!("sending a {}-byte frame on {interface}", frame.len()))?;
            ensure!(sent == frame.len(), "sent {sent} of {} bytes", frame.len());
        }
        Ok(())
    })?
    .with_context(|| format!("sending frames in netns {pod_netns}"))
}

/// Sends `message` to `dst` over a raw IPv4 socket of `protocol` inside `pod_netns`: the
/// pod's stack adds the IPv4 header (its own address as source) and routes it, so this is how
/// a pod sends ICMP it built itself, such as [`frames::fragmentation_needed`].
///
/// # Errors
/// When the socket cannot be opened or the message is not sent whole.
pub fn send_ipv4(
    pod_netns: &str,
    dst: Ipv4Addr,
    protocol: u8,
    message: &[u8],
) -> anyhow::Result<()> {
    netns::run_in(pod_netns, || -> anyhow::Result<()> {
        let socket = raw_socket(libc::AF_INET, libc::SOCK_RAW, i32::from(protocol))
            .context("cannot open a raw IPv4 socket")?;
        let address = sockaddr_in(dst);
        // SAFETY: `message` and `address` are valid for the lengths given, for the call.
        let result = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                message.as_ptr().cast::<c_void>(),
                message.len(),
                0,
                (&raw const address).cast::<libc::sockaddr>(),
                socklen_of::<libc::sockaddr_in>(),
            )
        };
        let sent = usize::try_from(result)
            .map_err(|_| io::Error::last_os_error())
            .with_context(|| format!("sending to {dst}"))?;
        ensure!(
            sent == message.len(),
            "sent {sent} of {} bytes",
            message.len()
        );
        Ok(())
    })?
    .with_context(|| format!("sending protocol {protocol} in netns {pod_netns}"))
}

/// Frames of one ethertype arriving on one interface, as the kernel hands them to protocol
/// handlers.
///
/// The socket is bound to that ethertype, not to all of them: the kernel delivers such a
/// socket a frame only after tc ingress has let it through, whereas `ETH_P_ALL` taps (what
/// tcpdump uses) see every frame before tc. Bound to a pod's host-side veth in the node
/// namespace, it counts what the egress filter passed. The kernel has already moved an
/// 802.1Q tag into the packet's metadata by then, so a tagged IPv4 frame arrives as
/// `0x0800` (and reads untagged).
pub struct FrameReceiver {
    socket: OwnedFd,
    interface: String,
}

/// The most frames one [`FrameReceiver::count_each`] reads.
const MAX_FRAMES_READ: usize = 1_000_000;

impl FrameReceiver {
    /// Starts receiving `ethertype` frames on `interface` of `netns`; frames queue until read.
    ///
    /// # Errors
    /// When there is no such interface or the socket cannot be opened.
    pub fn open(netns: &str, interface: &str, ethertype: u16) -> anyhow::Result<Self> {
        let socket = netns::run_in(netns, || -> anyhow::Result<OwnedFd> {
            let ifindex = nix::net::if_::if_nametoindex(interface)
                .with_context(|| format!("no interface {interface}"))?;
            // Protocol 0 until bound: an unbound socket of a protocol would queue that
            // protocol's frames from every interface.
            let socket = raw_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
                .context("cannot open an AF_PACKET socket")?;
            let address = sockaddr_ll(ifindex, ethertype);
            // SAFETY: `address` is a valid `sockaddr_ll` of the length given.
            let result = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    (&raw const address).cast::<libc::sockaddr>(),
                    socklen_of::<libc::sockaddr_ll>(),
                )
            };
            if result != 0 {
                return Err(io::Error::last_os_error()).context("binding to the interface");
            }
            Ok(socket)
        })?
        .with_context(|| format!("receiving on {interface} in netns {netns}"))?;
        Ok(Self {
            socket,
            interface: interface.to_owned(),
        })
    }

    /// Reads frames for `wait` and counts, for each of `markers`, the frames that contain it
    /// anywhere.
    ///
    /// # Errors
    /// When reading fails.
    pub fn count_each(&self, markers: &[&[u8]], wait: Duration) -> anyhow::Result<Vec<usize>> {
        let deadline = Instant::now() + wait;
        let mut buffer = vec![0_u8; 65_536];
        let mut matching = vec![0; markers.len()];
        for _ in 0..MAX_FRAMES_READ {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let mut poll = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one valid `pollfd` for the call.
            let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
            if ready <= 0 {
                continue;
            }
            // SAFETY: `buffer` is valid for writes of its length for the call.
            let read = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast::<c_void>(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(read) = usize::try_from(read) else {
                let error = io::Error::last_os_error();
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(error).with_context(|| format!("reading frames on {}", self.interface));
            };
            for (marker, count) in markers.iter().zip(&mut matching) {
                if contains(&buffer[..read], marker) {
                    *count += 1;
                }
            }
        }
        Ok(matching)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// A socket as an owned descriptor, closed on drop.
fn raw_socket(domain: i32, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: `sockaddr_in` is a plain C struct for which all zeroes is a valid value.
    let mut address: libc::sockaddr_in = unsafe { mem::zeroed() };
    address.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or_default();
    address.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    address
}

/// A link-layer address for `ifindex` and `ethertype` (given in host order).
fn sockaddr_ll(ifindex: u32, ethertype: u16) -> libc::sockaddr_ll {
    // SAFETY: `sockaddr_ll` is a plain C struct for which all zeroes is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).unwrap_or_default();
    address.sll_protocol = ethertype.to_be();
    address.sll_ifindex = i32::try_from(ifindex).unwrap_or(i32::MAX);
    address
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn udp_tuples_differ_and_both_ports_move() {
        let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut seen = HashSet::new();
        let mut buffer = [0; PACKET_ROOM];
        let mut previous = (0, 0);
        // Across a wrap of the source ports.
        for index in (0..2_000).chain(PORTS - 1_000..PORTS + 1_000) {
            let (src_port, step) = tuple(index);
            let dst_port = port((usize::from(src_port - FIRST_PORT) + step) % PORTS);
            assert!(seen.insert((src_port, dst_port)), "{index} repeats a tuple");
            assert!(src_port != previous.0 && dst_port != previous.1, "{index}");
            previous = (src_port, dst_port);
            let length = udp_packet(&mut buffer, src, dst, src_port, dst_port, index, &[1, 2]);
            let packet = &buffer[..length];
            assert_eq!(
                frames::internet_checksum(&[&packet[..20]]),
                0,
                "IPv4 checksum"
            );
            let pseudo = frames::ipv4_pseudo_header(src, dst, UDP, 10);
            assert_eq!(frames::internet_checksum(&[&pseudo, &packet[20..]]), 0);
        }
    }

    #[test]
    fn tcp_segments_verify_and_cover_every_tuple() {
        let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let ports = [8080, 8081, 8082, 8083, 8084, 8085];
        let mut random = XorShift::new(1);
        let mut buffer = [0; PACKET_ROOM];
        let mut seen = HashSet::new();
        for index in 0..PORTS * ports.len() {
            let (src_port, step) = tuple(index);
            let dst_port = ports[(usize::from(src_port - FIRST_PORT) + step) % ports.len()];
            assert!(seen.insert((src_port, dst_port)), "{index} repeats a tuple");
            if index % 9_973 == 0 {
                let (seq, ack) = random.pair();
                let length = tcp_packet(
                    &mut buffer,
                    src,
                    dst,
                    (src_port, dst_port),
                    (seq, ack),
                    TCP_ACK,
                    index,
                );
                let packet = &buffer[..length];
                assert_eq!(frames::internet_checksum(&[&packet[..20]]), 0);
                let pseudo = frames::ipv4_pseudo_header(src, dst, TCP, 20);
                assert_eq!(frames::internet_checksum(&[&pseudo, &packet[20..]]), 0);
                assert_eq!(packet[33], TCP_ACK);
            }
        }
    }

    #[test]
    fn tcp_checksum_matches_a_known_segment() {
        // 10.0.0.1:1024 -> 10.0.0.2:80, SYN, seq 1, window 64,240, by hand: pseudo-header
        // 0x0A00+0x0001+0x0A00+0x0002+0x0006+0x0014, header 0x0400+0x0050+0x0000+0x0001
        // +0x5002+0xFAF0; total 0x1_6360, folded 0x6361, complement 0x9C9E.
        let mut buffer = [0; PACKET_ROOM];
        tcp_packet(
            &mut buffer,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            (1024, 80),
            (1, 0),
            frames::TCP_SYN,
            0,
        );
        assert_eq!(buffer[36..38], [0x9C, 0x9E]);
    }

    #[test]
    fn snmp_pairs_names_with_values() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm MaxConn InSegs\nTcp: 1 -1 42\nUdp: InDatagrams NoPorts\nUdp: 7 3\n";
        let counters = parse_snmp(text);
        assert_eq!(counters.get("Tcp.InSegs"), Some(&42));
        assert_eq!(counters.get("Udp.NoPorts"), Some(&3));
        assert_eq!(
            counters.get("Tcp.MaxConn"),
            None,
            "negative fields are left out"
        );
    }

    #[test]
    fn markers_are_found_anywhere() {
        assert!(contains(b"..egret..", b"egret"));
        assert!(!contains(b"egre", b"egret"));
    }
}
