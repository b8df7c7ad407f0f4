//! QUIC endpoints and framed streams.
//!
//! A migration uses one connection: a bidirectional control stream opened
//! by the source, and a unidirectional bulk stream for pages. Frames are
//! the `wanmig-wire` encoding; the receiver checks each frame's length
//! against the protocol limit before allocating it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s2n_quic::client::Connect;
use s2n_quic::provider::congestion_controller::{Bbr, Cubic};
use s2n_quic::provider::limits::Limits;
use wanmig_wire::ALPN;

use crate::error::{TransportError, lost};
use crate::frames::{FrameReceiver, FrameSender};
use crate::identity::{Fingerprint, Identity};
use crate::mem;
use crate::tls;

/// The congestion controller of a connection (s2n-quic's own; both pace
/// their sending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CongestionControl {
    /// CUBIC (RFC 9438): loss-based; each loss episode cuts its window to
    /// 0.7 of what it was, and it grows back with the cube of the time
    /// since, so random loss on a long path keeps it well below the link
    /// rate.
    Cubic,
    /// BBR as s2n-quic implements it (draft-cardwell-iccrg-bbr-congestion-
    /// control-02, "BBRv2"): model-based (bottleneck bandwidth and minimum
    /// RTT); it only backs off when a round trip loses more than 2% of
    /// its packets.
    Bbr,
}

/// Flow-control sizing and connection behaviour from the link the
/// migration runs over.
#[derive(Debug, Clone, Copy)]
pub struct LinkTuning {
    /// Expected bandwidth, bits/s.
    pub bandwidth_bps: u64,
    /// Expected round-trip time.
    pub rtt: Duration,
    /// Silence after which a connection is declared lost (QUIC's
    /// `max_idle_timeout`; the smaller of the two ends' values applies).
    ///
    /// Both ends send keep-alive PINGs at ¾ of it (at most every 30 s), so
    /// an idle but healthy connection never times out, whatever this is;
    /// it only bounds how long the *link* may stay silent. The trade-off: a
    /// link outage longer than this kills the connection (the migration
    /// must then reconnect and resume), while a longer value makes a peer
    /// that is really gone (crashed host, rebooted NAT) take that long to
    /// be noticed, during which the source keeps waiting on it. A long
    /// value pays off only with something else watching the peer (the
    /// migration's own answer timeouts). After an outage, QUIC's probe
    /// timer has backed off exponentially, so traffic resumes up to about
    /// the outage's length after the link does (see the transport's WAN
    /// test). Zero is refused (QUIC would read it as "never").
    pub idle_timeout: Duration,
    /// The congestion controller, the same at both ends.
    pub congestion: CongestionControl,
}

impl Default for LinkTuning {
    /// 1 Gbit/s at 100 ms: windows of 25 MB, where s2n-quic's defaults
    /// (3.75 MB) would cap a 100 ms path near 300 Mbit/s; idle timeout
    /// 10 s; BBR.
    ///
    /// BBR because of `transport/benches/wan.rs` (one connection, 50 ms
    /// RTT, three runs): on a clean 1 Gbit/s or 200 Mbit/s link both
    /// controllers carry 86–94% of the link (Cubic up to 7 points more,
    /// in one run 1 point less), but
    /// with 0.1% random loss Cubic carries 1% of 1 Gbit/s (4.5% of
    /// 200 Mbit/s) and BBR 62–77% (68–92%); with 1% loss, 0.3% against
    /// 37–59%. Long paths do lose packets at random, and a migration that
    /// crawls at 10 Mbit/s never converges. The price: BBR fills the
    /// bottleneck's queue more (more tail drops of its own) and takes more
    /// than its share from Cubic flows on a shared bottleneck.
    fn default() -> Self {
        LinkTuning {
            bandwidth_bps: 1_000_000_000,
            rtt: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(10),
            congestion: CongestionControl::Bbr,
        }
    }
}

/// Turns on QUIC keep-alives: a PING at ¾ of the idle timeout (at most
/// every 30 s) whenever the connection is otherwise silent, so that an idle
/// control stream does not let a healthy connection time out. Failure only
/// means the connection is already closed, which its first use reports.
fn keep_alive(mut c: s2n_quic::Connection) -> s2n_quic::Connection {
    let _ = c.keep_alive(true);
    c
}

impl LinkTuning {
    /// Flow-control window: twice the bandwidth-delay product, between
    /// 4 MiB and the protocol's 4 GiB - 1 limit.
    pub fn window(&self) -> u64 {
        let bdp = self.bandwidth_bps as f64 / 8.0 * self.rtt.as_secs_f64();
        ((2.0 * bdp) as u64).clamp(4 << 20, u64::from(u32::MAX))
    }

    /// UDP socket buffer size (receive and send): the window, at most
    /// 64 MiB. A burst at the link's rate must fit while the endpoint's
    /// task is not running; with the kernel's default (208 KiB) the
    /// destination's socket overflowed at 1 Gbit/s and the congestion
    /// controller took the drops for congestion. Set with
    /// `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` where allowed (root, as wanmig
    /// runs), else capped by the kernel at `net.core.rmem_max`/`wmem_max`.
    pub fn socket_buffer(&self) -> usize {
        self.window().min(64 << 20) as usize
    }

    /// The endpoint's UDP socket, bound to `addr`, with buffers of
    /// [`LinkTuning::socket_buffer`] (s2n-quic then sets GRO, ECN and
    /// path-MTU options on it as on its own).
    fn io(&self, addr: SocketAddr) -> std::io::Result<s2n_quic::provider::io::Default> {
        use std::os::fd::AsRawFd;
        let socket = std::net::UdpSocket::bind(addr)?;
        let size = libc::c_int::try_from(self.socket_buffer()).unwrap_or(libc::c_int::MAX);
        for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
            let set = |opt| {
                // SAFETY: a valid socket, and a c_int option value of its
                // size, only read by the kernel during the call.
                unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&size as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                }
            };
            // Without CAP_NET_ADMIN, the plain option (capped by the kernel).
            if set(force) != 0 && set(plain) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        s2n_quic::provider::io::Default::builder().with_rx_socket(socket)?.build()
    }

    fn limits(&self) -> Result<Limits, TransportError> {
        if self.idle_timeout.is_zero() {
            return Err(TransportError::Tls("limits: an idle timeout of zero would mean none".into()));
        }
        let w = self.window();
        Limits::new()
            .with_data_window(w)
            .and_then(|l| l.with_bidirectional_local_data_window(w))
            .and_then(|l| l.with_bidirectional_remote_data_window(w))
            .and_then(|l| l.with_unidirectional_data_window(w))
            .and_then(|l| l.with_max_send_buffer_size(w.min(u64::from(u32::MAX)) as u32))
            .and_then(|l| l.with_max_idle_timeout(self.idle_timeout))
            .and_then(|l| l.with_max_handshake_duration(Duration::from_secs(10)))
            .map_err(|e| TransportError::Tls(format!("flow-control limits: {e}")))
    }
}

/// A listening destination.
pub struct Listener {
    server: s2n_quic::Server,
    refused: tls::Refusals,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("addr", &self.server.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Listener {
    /// Listens on `addr`, accepting only sources whose fingerprints are in `pins`.
    pub fn bind(
        addr: SocketAddr,
        id: &Identity,
        pins: &[Fingerprint],
        tuning: LinkTuning,
    ) -> Result<Self, TransportError> {
        let refused: tls::Refusals = Arc::new(Mutex::new(None));
        let tls = tls::server(id, pins, ALPN, refused.clone()).map_err(|e| TransportError::Tls(e.to_string()))?;
        let start = |reason: String| TransportError::Start { addr: addr.to_string(), reason };
        let builder = s2n_quic::Server::builder()
            .with_tls(tls)
            .map_err(|e| start(e.to_string()))?
            .with_io(tuning.io(addr).map_err(|e| start(e.to_string()))?)
            .map_err(|e| start(e.to_string()))?
            .with_limits(tuning.limits()?)
            .map_err(|e| start(e.to_string()))?
            .with_endpoint_limits(crate::limits::HandshakeLimits)
            .map_err(|e| start(e.to_string()))?
            .with_event(crate::peer::PeerCert)
            .map_err(|e| start(e.to_string()))?;
        let server = match tuning.congestion {
            CongestionControl::Cubic => builder.with_congestion_controller(Cubic::default()).map(|b| b.start()),
            CongestionControl::Bbr => builder.with_congestion_controller(Bbr::default()).map(|b| b.start()),
        }
        .map_err(|e| start(e.to_string()))?
        .map_err(|e| start(e.to_string()))?;
        Ok(Listener { server, refused })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.server.local_addr().map_err(lost)
    }

    /// The next authenticated connection. Sources refused for an unpinned
    /// certificate never show up here; [`Listener::take_refusal`] names them.
    pub async fn accept(&mut self) -> Option<Conn> {
        self.server.accept().await.map(|c| Conn::new(keep_alive(c)))
    }

    /// The fingerprint of the last source refused, if any since the last call.
    pub fn take_refusal(&self) -> Option<Fingerprint> {
        self.refused.lock().ok()?.take()
    }
}

/// Connects to a destination whose fingerprint is in `pins`.
pub async fn connect(
    addr: SocketAddr,
    id: &Identity,
    pins: &[Fingerprint],
    tuning: LinkTuning,
) -> Result<Conn, TransportError> {
    let refused: tls::Refusals = Arc::new(Mutex::new(None));
    let tls = tls::client(id, pins, ALPN, refused.clone()).map_err(|e| TransportError::Tls(e.to_string()))?;
    let local: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid address");
    let start = |reason: String| TransportError::Start { addr: local.to_string(), reason };
    let builder = s2n_quic::Client::builder()
        .with_tls(tls)
        .map_err(|e| start(e.to_string()))?
        .with_io(tuning.io(local).map_err(|e| start(e.to_string()))?)
        .map_err(|e| start(e.to_string()))?
        .with_limits(tuning.limits()?)
        .map_err(|e| start(e.to_string()))?;
    let client = match tuning.congestion {
        CongestionControl::Cubic => builder.with_congestion_controller(Cubic::default()).map(|b| b.start()),
        CongestionControl::Bbr => builder.with_congestion_controller(Bbr::default()).map(|b| b.start()),
    }
    .map_err(|e| start(e.to_string()))?
    .map_err(|e| start(e.to_string()))?;
    match client.connect(Connect::new(addr).with_server_name("wanmig")).await {
        Ok(c) => {
            let mut conn = Conn::new(keep_alive(c));
            if let ConnInner::Quic { _client, .. } = &mut conn.inner {
                *_client = Some(client);
            }
            Ok(conn)
        }
        Err(e) => {
            if let Some(fp) = refused.lock().ok().and_then(|mut r| r.take()) {
                return Err(TransportError::PeerNotPinned(fp));
            }
            Err(TransportError::Connect { addr, reason: lost(e).to_string() })
        }
    }
}

/// An authenticated connection: QUIC between hosts, or an in-memory pair
/// ([`Conn::mem_pair`]) for tests that drive both ends in one process.
pub struct Conn {
    inner: ConnInner,
}

enum ConnInner {
    Quic {
        handle: s2n_quic::connection::Handle,
        acceptor: s2n_quic::connection::StreamAcceptor,
        // The client endpoint must live as long as its connection.
        _client: Option<s2n_quic::Client>,
    },
    Mem(mem::MemConn),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Conn {
    fn new(c: s2n_quic::Connection) -> Self {
        let (handle, acceptor) = c.split();
        Conn { inner: ConnInner::Quic { handle, acceptor, _client: None } }
    }

    /// Two connected in-memory ends (one to open streams, one to accept
    /// them, though either may do both) and the handle that cuts them:
    /// for tests that drive both ends of a migration in one process.
    pub fn mem_pair() -> (Conn, Conn, mem::Link) {
        let (a, b, link) = mem::pair();
        (Conn { inner: ConnInner::Mem(a) }, Conn { inner: ConnInner::Mem(b) }, link)
    }

    /// The peer's address (none for an in-memory pair).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            ConnInner::Quic { handle, .. } => handle.remote_addr().ok(),
            ConnInner::Mem(_) => None,
        }
    }

    /// The fingerprint of the certificate the peer authenticated with (the
    /// pin it matched): known on a listener's connections, `None` on a
    /// client's and on an in-memory pair.
    pub fn peer_fingerprint(&self) -> Option<Fingerprint> {
        match &self.inner {
            ConnInner::Quic { handle, .. } => {
                handle.query_event_context(|c: &crate::peer::PeerFingerprint| c.0).ok().flatten()
            }
            ConnInner::Mem(_) => None,
        }
    }

    /// Opens a two-way stream: the control stream (source side), or the
    /// network tunnel's after the commit.
    pub async fn open_control(&mut self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        match &mut self.inner {
            ConnInner::Quic { handle, .. } => {
                let s = handle.open_bidirectional_stream().await.map_err(lost)?;
                let (rx, tx) = s.split();
                Ok((FrameSender::new(tx), FrameReceiver::new(rx)))
            }
            ConnInner::Mem(m) => m.open_bidi().await,
        }
    }

    /// Accepts a two-way stream the peer opened.
    pub async fn accept_control(&mut self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        match &mut self.inner {
            ConnInner::Quic { acceptor, .. } => {
                let s = acceptor
                    .accept_bidirectional_stream()
                    .await
                    .map_err(lost)?
                    .ok_or_else(|| lost("the peer closed the connection"))?;
                let (rx, tx) = s.split();
                Ok((FrameSender::new(tx), FrameReceiver::new(rx)))
            }
            ConnInner::Mem(m) => m.accept_bidi().await,
        }
    }

    /// Opens a one-way bulk stream (source side).
    pub async fn open_bulk(&mut self) -> Result<FrameSender, TransportError> {
        match &mut self.inner {
            ConnInner::Quic { handle, .. } => Ok(FrameSender::new(handle.open_send_stream().await.map_err(lost)?)),
            ConnInner::Mem(m) => m.open_uni().await,
        }
    }

    /// Accepts a one-way bulk stream (destination side).
    pub async fn accept_bulk(&mut self) -> Result<FrameReceiver, TransportError> {
        match &mut self.inner {
            ConnInner::Quic { acceptor, .. } => {
                let s = acceptor
                    .accept_receive_stream()
                    .await
                    .map_err(lost)?
                    .ok_or_else(|| lost("the peer closed the connection"))?;
                Ok(FrameReceiver::new(s))
            }
            ConnInner::Mem(m) => m.accept_uni().await,
        }
    }

    /// Closes the connection with an application error code.
    pub fn close(&self, code: u32) {
        match &self.inner {
            ConnInner::Quic { handle, .. } => handle.close(code.into()),
            ConnInner::Mem(m) => m.close(code),
        }
    }
}
