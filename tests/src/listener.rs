//! Echo servers inside a pod namespace, for probes to talk to.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, listen,
    setsockopt, socket, sockopt,
};

use crate::netns;

/// A transport protocol that probes and listeners speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub(crate) fn sock_protocol(self) -> SockProtocol {
        match self {
            Self::Tcp => SockProtocol::Tcp,
            Self::Udp => SockProtocol::Udp,
            Self::Sctp => SockProtocol::Sctp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        })
    }
}

/// How often the serving threads look at the stop flag.
const TICK: Duration = Duration::from_millis(20);
/// A listener that nobody drops (a leaked one) still stops after this long.
const MAX_LIFETIME: Duration = Duration::from_mins(15);
/// A connection is echoed for this long at most.
const MAX_CONNECTION: Duration = Duration::from_mins(1);
/// Most connections or datagrams handled per wake-up, so the stop flag is seen often.
const MAX_PER_WAKE: usize = 64;
/// How long `serve` waits for the thread to enter the namespace and bind.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// An echo server on a thread inside a pod namespace, bound to the pod's IPv4 and IPv6
/// addresses. Dropping it stops the server and waits for its threads.
#[derive(Debug)]
pub struct Listener {
    protocol: Protocol,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub(crate) fn serve(
        netns: &str,
        protocol: Protocol,
        addresses: [IpAddr; 2],
        port: u16,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = mpsc::channel();
        let thread = {
            let netns = netns.to_owned();
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name(format!("{protocol} echo {port}"))
                .spawn(move || {
                    let sockets = netns::enter(&netns)
                        .and_then(|()| Sockets::bind(protocol, addresses, port));
                    match sockets {
                        Ok(sockets) => {
                            let _ = bound_tx.send(Ok(sockets.port()));
                            sockets.serve(&stop);
                        }
                        Err(error) => {
                            let _ = bound_tx.send(Err(error));
                        }
                    }
                })
                .context("cannot spawn a listener thread")?
        };
        // The thread reports once it is bound, so probes may start as soon as this returns.
        let bound = bound_rx
            .recv_timeout(STARTUP_TIMEOUT)
            .map_err(|_| anyhow!("the listener thread did not start"));
        let mut listener = Self {
            protocol,
            port,
            stop,
            thread: Some(thread),
        };
        listener.port = bound
            .and_then(|port| port)
            .with_context(|| format!("cannot serve {protocol} on port {port} in netns {netns}"))?;
        Ok(listener)
    }

    /// The port served, also when 0 was asked for.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    #[must_use]
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic on the serving thread has been printed already; never panic in drop.
            let _ = thread.join();
        }
    }
}

/// The bound sockets: one per address.
enum Sockets {
    Stream(Vec<TcpListener>),
    Datagram(Vec<UdpSocket>),
}

impl Sockets {
    fn bind(protocol: Protocol, addresses: [IpAddr; 2], port: u16) -> anyhow::Result<Self> {
        let mut port = port;
        let mut streams = Vec::new();
        let mut datagrams = Vec::new();
        for ip in addresses {
            let addr = SocketAddr::new(ip, port);
            if protocol == Protocol::Udp {
                let socket =
                    UdpSocket::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
                socket.set_nonblocking(true)?;
                port = socket.local_addr()?.port();
                datagrams.push(socket);
            } else {
                let listener = listen_stream(protocol, addr)
                    .with_context(|| format!("cannot listen on {protocol} {addr}"))?;
                port = listener.local_addr()?.port();
                streams.push(listener);
            }
        }
        Ok(if protocol == Protocol::Udp {
            Self::Datagram(datagrams)
        } else {
            Self::Stream(streams)
        })
    }

    fn port(&self) -> u16 {
        let addr = match self {
            Self::Stream(listeners) => listeners.first().map(TcpListener::local_addr),
            Self::Datagram(sockets) => sockets.first().map(UdpSocket::local_addr),
        };
        addr.and_then(Result::ok).map_or(0, |addr| addr.port())
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Self::Stream(listeners) => listeners.iter().map(AsFd::as_fd).collect(),
            Self::Datagram(sockets) => sockets.iter().map(AsFd::as_fd).collect(),
        }
    }

    /// Echoes until `stop` is set or the lifetime runs out.
    fn serve(&self, stop: &Arc<AtomicBool>) {
        let end = Instant::now() + MAX_LIFETIME;
        let mut connections: Vec<JoinHandle<()>> = Vec::new();
        // Room for the largest datagram, so echoes come back whole.
        let mut datagram = vec![0; 65_536];
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            let mut fds: Vec<_> = self
                .fds()
                .into_iter()
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            #[expect(clippy::cast_possible_truncation, reason = "TICK is 20 ms")]
            let tick = TICK.as_millis() as u16;
            match poll(&mut fds, tick) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => {
                    // Not expected; keep the loop from spinning.
                    thread::sleep(TICK);
                    continue;
                }
            }
            match self {
                Self::Stream(listeners) => {
                    for listener in listeners {
                        accept_all(listener, stop, &mut connections);
                    }
                    connections.retain(|connection| !connection.is_finished());
                }
                Self::Datagram(sockets) => {
                    for socket in sockets {
                        echo_datagrams(socket, &mut datagram);
                    }
                }
            }
        }
        // Connections see the stop flag within a tick.
        stop.store(true, Ordering::Relaxed);
        for connection in connections {
            let _ = connection.join();
        }
    }
}

/// A listening TCP or SCTP socket, non-blocking, as a `TcpListener`: an SCTP one-to-one socket
/// accepts, reads and writes like a TCP one.
fn listen_stream(protocol: Protocol, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol.sock_protocol(),
    )?;
    // A listener restarted on the same port must not wait for old connections' TIME_WAIT.
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6V6Only, &true)?;
    }
    bind(socket.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&socket, Backlog::new(128)?)?;
    Ok(TcpListener::from(socket))
}

fn accept_all(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    connections: &mut Vec<JoinHandle<()>>,
) {
    for _ in 0..MAX_PER_WAKE {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let stop = Arc::clone(stop);
        let spawned = thread::Builder::new()
            .name("echo connection".to_owned())
            .spawn(move || echo_stream(stream, &stop));
        if let Ok(connection) = spawned {
            connections.push(connection);
        }
    }
}

/// Echoes what the peer sends until it closes, the listener stops, or time runs out.
fn echo_stream(mut stream: TcpStream, stop: &AtomicBool) {
    let end = Instant::now() + MAX_CONNECTION;
    let ready = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(TICK)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))));
    if ready.is_err() {
        return;
    }
    let mut buf = [0; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(read) => {
                if stream.write_all(&buf[..read]).is_err() {
                    return;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn echo_datagrams(socket: &UdpSocket, buf: &mut [u8]) {
    for _ in 0..MAX_PER_WAKE {
        let Ok((read, peer)) = socket.recv_from(buf) else {
            return;
        };
        // A lost echo is the prober's timeout to report, not the server's.
        let _ = socket.send_to(&buf[..read], peer);
    }
}
