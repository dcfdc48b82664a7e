//! Probes: one connection, datagram or echo request from inside a pod, reduced to what the
//! sender observed.
//!
//! Socket probes run on a short-lived thread that has joined the pod's namespace (`setns` is per
//! thread, so the rest of the test process stays where it was). Ping runs iputils `ping`
//! through `nsenter`.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockopt, socket, sockopt,
};

use crate::listener::Protocol;
use crate::netns;

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The connection opened (or the datagram or echo request was answered) and the payload came
    /// back intact.
    Connected,
    /// The destination's stack answered "nobody here": a TCP RST, an SCTP ABORT, an ICMP port
    /// unreachable. The traffic got through; no one listened.
    Refused,
    /// Nothing came back in time: what a silent drop looks like.
    TimedOut,
    /// An ICMP host or network unreachable came back, or the pod has no route.
    Unreachable,
    /// The sender's stack refused (`EPERM`/`EACCES`): a local hook rejected the traffic, or an
    /// `ICMPv6` "administratively prohibited" came back.
    Denied,
    /// The kernel lacks the protocol (SCTP on a kernel built without it).
    Unsupported,
    /// Anything else, such as a garbled echo or a probe that could not run.
    Failed(String),
}

impl ProbeResult {
    #[must_use]
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected)
    }

    #[must_use]
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Refused)
    }

    #[must_use]
    pub fn is_timed_out(&self) -> bool {
        matches!(self, Self::TimedOut)
    }

    #[must_use]
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported)
    }

    /// The traffic reached the destination's stack: it was answered, or refused for want of a
    /// listener. An egress policy allowed it.
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Connected | Self::Refused)
    }

    /// The traffic never reached a listener's stack: dropped, rejected or unroutable.
    #[must_use]
    pub fn is_blocked(&self) -> bool {
        matches!(self, Self::TimedOut | Self::Unreachable | Self::Denied)
    }

    /// Reads an error from a socket call.
    fn from_io(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Self::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Self::TimedOut,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Self::Unreachable,
            io::ErrorKind::PermissionDenied => Self::Denied,
            _ => match error.raw_os_error().map(Errno::from_raw) {
                Some(Errno::EPROTONOSUPPORT | Errno::ESOCKTNOSUPPORT) => Self::Unsupported,
                _ => Self::Failed(error.to_string()),
            },
        }
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connected => f.write_str("connected"),
            Self::Refused => f.write_str("refused"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Unreachable => f.write_str("unreachable"),
            Self::Denied => f.write_str("denied"),
            Self::Unsupported => f.write_str("unsupported"),
            Self::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

/// Tells probes' payloads apart, so an echo meant for another probe never counts.
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

fn payload(protocol: Protocol) -> String {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    format!(
        "egret-testbed {protocol} probe {} {token}\n",
        std::process::id()
    )
}

/// Time left before `deadline`, or `None` once it has passed (a socket timeout of zero would be
/// an error, not "no time").
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}

/// Runs `probe` on a thread inside `netns`.
fn in_pod(netns: &str, probe: impl FnOnce() -> ProbeResult + Send) -> ProbeResult {
    netns::run_in(netns, probe).unwrap_or_else(|error| ProbeResult::Failed(format!("{error:#}")))
}

/// Connects a TCP or SCTP stream to `dst` and has one line echoed back.
pub(crate) fn stream_exchange(
    netns: &str,
    protocol: Protocol,
    dst: SocketAddr,
    timeout: Duration,
) -> ProbeResult {
    in_pod(netns, || {
        let deadline = Instant::now() + timeout;
        match connect_stream(protocol, dst, deadline) {
            Ok(stream) => exchange_line(stream, protocol, deadline),
            Err(error) => ProbeResult::from_io(&error),
        }
    })
}

/// Opens a stream socket of `protocol` (TCP or SCTP one-to-one, which behave alike from here
/// on) connected to `dst`, waiting until `deadline` at most.
pub(crate) fn connect_stream(
    protocol: Protocol,
    dst: SocketAddr,
    deadline: Instant,
) -> io::Result<TcpStream> {
    let family = match dst {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol.sock_protocol(),
    )?;
    match connect(socket.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(errno) => return Err(errno.into()),
    }
    // Wait for the handshake; every pass either returns or spends time, so it ends by the
    // deadline (the count bound only guards against a poll that returns early forever).
    for _ in 0..1_000 {
        let Some(left) = remaining(deadline) else {
            break;
        };
        let left = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, left) {
            Ok(0) | Err(Errno::EINTR) => {}
            Ok(_) => {
                let error = getsockopt(&socket, sockopt::SocketError)?;
                if error != 0 {
                    return Err(io::Error::from_raw_os_error(error));
                }
                // SCTP is a stream socket like TCP here: read, write and timeouts all apply.
                let stream = TcpStream::from(socket);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(errno) => return Err(errno.into()),
        }
    }
    Err(io::ErrorKind::TimedOut.into())
}

/// Sends a line and reads it back.
fn exchange_line(mut stream: TcpStream, protocol: Protocol, deadline: Instant) -> ProbeResult {
    let sent = payload(protocol);
    let outcome = (|| -> io::Result<Option<Vec<u8>>> {
        let Some(left) = remaining(deadline) else {
            return Ok(None);
        };
        stream.set_write_timeout(Some(left))?;
        stream.write_all(sent.as_bytes())?;
        let mut echoed = Vec::with_capacity(sent.len());
        let mut buf = [0; 512];
        // Each read brings at least one byte or ends the loop, so the line bounds the count.
        while echoed.len() < sent.len() {
            let Some(left) = remaining(deadline) else {
                return Ok(None);
            };
            stream.set_read_timeout(Some(left))?;
            let read = stream.read(&mut buf)?;
            if read == 0 {
                break;
            }
            echoed.extend_from_slice(&buf[..read]);
        }
        Ok(Some(echoed))
    })();
    match outcome {
        Ok(Some(echoed)) if echoed == sent.as_bytes() => ProbeResult::Connected,
        Ok(Some(echoed)) => ProbeResult::Failed(format!(
            "connected, but the echo was {:?}",
            String::from_utf8_lossy(&echoed)
        )),
        Ok(None) => ProbeResult::TimedOut,
        Err(error) => ProbeResult::from_io(&error),
    }
}

/// How many times a UDP probe sends its datagram, spread over the timeout.
const UDP_ATTEMPTS: u32 = 3;

/// Sends a datagram to `dst` and waits for the same bytes to come back.
pub(crate) fn udp_request(netns: &str, dst: SocketAddr, timeout: Duration) -> ProbeResult {
    in_pod(netns, || {
        let deadline = Instant::now() + timeout;
        match udp_exchange(dst, timeout, deadline) {
            Ok(result) => result,
            Err(error) => ProbeResult::from_io(&error),
        }
    })
}

fn udp_exchange(dst: SocketAddr, timeout: Duration, deadline: Instant) -> io::Result<ProbeResult> {
    let local = match dst {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected, so an ICMP port unreachable comes back as ECONNREFUSED.
    socket.connect(dst)?;
    let sent = payload(Protocol::Udp);
    let mut buf = [0; 512];
    // Datagrams may be lost; resend a few times rather than wait out the whole timeout once.
    for attempt in 1..=UDP_ATTEMPTS {
        let attempt_end = (Instant::now() + timeout / UDP_ATTEMPTS).min(deadline);
        socket.send(sent.as_bytes())?;
        // Each pass receives a datagram or ends the attempt.
        for _ in 0..16 {
            let wait_until = if attempt == UDP_ATTEMPTS {
                deadline
            } else {
                attempt_end
            };
            let Some(left) = remaining(wait_until) else {
                break;
            };
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                Ok(read) if buf[..read] == *sent.as_bytes() => return Ok(ProbeResult::Connected),
                // A stray datagram: keep waiting for ours.
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(ProbeResult::TimedOut)
}

/// Time that `ping` may take beyond its own timeout before it is killed (process start-up).
const PING_GRACE: Duration = Duration::from_secs(3);

/// Sends one echo request with iputils `ping` inside the pod.
pub(crate) fn ping(netns: &str, dst: IpAddr, timeout: Duration) -> ProbeResult {
    // `-W` takes whole seconds reliably across iputils versions.
    // nsenter's own failures exit 1 too, like a ping that got no reply; rule out the common one.
    if !netns::netns_path(netns).exists() {
        return ProbeResult::Failed(format!("no netns {netns}"));
    }
    let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let mut command = netns::command_in(netns, "ping");
    command
        .arg(if dst.is_ipv4() { "-4" } else { "-6" })
        .args(["-n", "-c", "1", "-W", &seconds.max(1).to_string()])
        .arg(dst.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return ProbeResult::Failed(format!("cannot run ping: {error}")),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds) + PING_GRACE;
    // Bounded by the deadline; the count bound covers a clock that stands still.
    let mut status = None;
    for _ in 0..10_000 {
        match child.try_wait() {
            Ok(Some(exited)) => {
                status = Some(exited);
                break;
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => break,
        }
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return ProbeResult::TimedOut;
    };
    // ping has exited, so its (short) output is complete in the pipes.
    let mut output = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut output);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut output);
    }
    match status.code() {
        Some(0) => ProbeResult::Connected,
        // iputils prints "Destination Host Unreachable", "Destination unreachable: No route",
        // or "connect: Network is unreachable" when the pod has no route.
        _ if output.to_ascii_lowercase().contains("unreachable") => ProbeResult::Unreachable,
        _ if output.contains("prohibited") || output.contains("not permitted") => {
            ProbeResult::Denied
        }
        // The summary line tells a ping that got no reply from one that could not run.
        Some(1) if output.contains("transmitted") => ProbeResult::TimedOut,
        _ => ProbeResult::Failed(format!("ping {dst}: {status}: {}", output.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_map_to_what_the_sender_saw() {
        let cases = [
            (Errno::ECONNREFUSED, ProbeResult::Refused),
            (Errno::ETIMEDOUT, ProbeResult::TimedOut),
            (Errno::EHOSTUNREACH, ProbeResult::Unreachable),
            (Errno::ENETUNREACH, ProbeResult::Unreachable),
            (Errno::EPERM, ProbeResult::Denied),
            (Errno::EACCES, ProbeResult::Denied),
            (Errno::EPROTONOSUPPORT, ProbeResult::Unsupported),
            (Errno::ESOCKTNOSUPPORT, ProbeResult::Unsupported),
        ];
        for (errno, expected) in cases {
            assert_eq!(ProbeResult::from_io(&errno.into()), expected, "{errno}");
        }
        assert!(matches!(
            ProbeResult::from_io(&Errno::EMFILE.into()),
            ProbeResult::Failed(_)
        ));
    }

    #[test]
    fn allowed_and_blocked_never_overlap() {
        let all = [
            ProbeResult::Connected,
            ProbeResult::Refused,
            ProbeResult::TimedOut,
            ProbeResult::Unreachable,
            ProbeResult::Denied,
            ProbeResult::Unsupported,
            ProbeResult::Failed("x".to_owned()),
        ];
        for result in &all {
            assert!(!(result.is_allowed() && result.is_blocked()), "{result}");
        }
        assert_eq!(ProbeResult::TimedOut.to_string(), "timed out");
        assert_eq!(
            ProbeResult::Failed("why".to_owned()).to_string(),
            "failed: why"
        );
    }

    #[test]
    fn deadline_in_the_past_leaves_no_time() {
        assert_eq!(remaining(Instant::now()), None);
        assert!(remaining(Instant::now() + Duration::from_secs(5)).is_some());
    }
}
