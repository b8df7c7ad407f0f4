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
use s2n_quic::provider::limits::Limits;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wanmig_wire::{ALPN, DecodeError, Message, frame_len};

use crate::identity::{Fingerprint, Identity};
use crate::tls;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Setting up TLS failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Starting the endpoint failed.
    #[error("cannot start a QUIC endpoint on {addr}: {reason}")]
    Start {
        /// Local address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer's certificate is not pinned here.
    #[error("refused the peer: its certificate {0} is not pinned")]
    PeerNotPinned(Fingerprint),
    /// The connection could not be established.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// Why (a refusal by the peer shows as a TLS alert).
        reason: String,
    },
    /// The connection or a stream failed.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The peer sent a frame that does not decode.
    #[error("bad frame from the peer")]
    Decode(#[from] DecodeError),
    /// No frame arrived in time.
    #[error("the peer sent nothing for {0:?}")]
    Timeout(Duration),
}

/// The application close code of a migration its source cancelled.
pub const CLOSE_CANCELLED: u32 = 12;
/// What a side whose peer closed the connection with [`CLOSE_CANCELLED`] hears.
pub const PEER_CANCELLED: &str = "the peer cancelled the migration";

/// A connection or stream error. With TLS 1.3 the client finishes its
/// handshake before the server has checked the client's certificate, so a
/// source that is not pinned at the destination learns it here, from the
/// first stream operation, as a TLS alert: say so.
fn lost(e: impl std::fmt::Display) -> TransportError {
    let s = e.to_string();
    if s.contains(&format!("application::Error({CLOSE_CANCELLED}) by remote")) {
        return TransportError::Lost(PEER_CANCELLED.into());
    }
    if s.contains("HANDSHAKE_FAILURE") || s.contains("certificate") || s.contains("crypto") || s.contains("alert") {
        TransportError::Lost(format!("{s} (the peer refused our certificate: is our fingerprint pinned there?)"))
    } else {
        TransportError::Lost(s)
    }
}

/// Flow-control sizing from the link the migration runs over.
#[derive(Debug, Clone, Copy)]
pub struct LinkTuning {
    /// Expected bandwidth, bits/s.
    pub bandwidth_bps: u64,
    /// Expected round-trip time.
    pub rtt: Duration,
    /// Idle time after which a silent connection is declared lost.
    pub idle_timeout: Duration,
}

impl Default for LinkTuning {
    /// 1 Gbit/s at 100 ms: windows of 25 MB, where s2n-quic's defaults
    /// (3.75 MB) would cap a 100 ms path near 300 Mbit/s.
    fn default() -> Self {
        LinkTuning {
            bandwidth_bps: 1_000_000_000,
            rtt: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

impl LinkTuning {
    /// Flow-control window: twice the bandwidth-delay product, between
    /// 4 MiB and the protocol's 4 GiB - 1 limit.
    pub fn window(&self) -> u64 {
        let bdp = self.bandwidth_bps as f64 / 8.0 * self.rtt.as_secs_f64();
        ((2.0 * bdp) as u64).clamp(4 << 20, u64::from(u32::MAX))
    }

    fn limits(&self) -> Result<Limits, TransportError> {
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
        let server = s2n_quic::Server::builder()
            .with_tls(tls)
            .map_err(|e| start(e.to_string()))?
            .with_io(addr)
            .map_err(|e| start(e.to_string()))?
            .with_limits(tuning.limits()?)
            .map_err(|e| start(e.to_string()))?
            .with_endpoint_limits(crate::limits::HandshakeLimits)
            .map_err(|e| start(e.to_string()))?
            .with_event(crate::peer::PeerCert)
            .map_err(|e| start(e.to_string()))?
            .start()
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
        self.server.accept().await.map(Conn::new)
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
    let client = s2n_quic::Client::builder()
        .with_tls(tls)
        .map_err(|e| start(e.to_string()))?
        .with_io(local)
        .map_err(|e| start(e.to_string()))?
        .with_limits(tuning.limits()?)
        .map_err(|e| start(e.to_string()))?
        .start()
        .map_err(|e| start(e.to_string()))?;
    match client.connect(Connect::new(addr).with_server_name("wanmig")).await {
        Ok(c) => {
            let mut conn = Conn::new(c);
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
/// ([`crate::mem::pair`]) for tests that drive both ends in one process.
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
    Mem(crate::mem::MemConn),
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

    pub(crate) fn mem(m: crate::mem::MemConn) -> Self {
        Conn { inner: ConnInner::Mem(m) }
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

/// A stream's writing half, whatever carries it.
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// A stream's reading half.
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;

/// Sends frames on a stream.
pub struct FrameSender {
    stream: WriteHalf,
    /// A send was interrupted (its future dropped) part way through a
    /// frame: the stream is no longer at a frame boundary.
    torn: bool,
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender").finish_non_exhaustive()
    }
}

impl FrameSender {
    pub(crate) fn new(stream: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        FrameSender { stream: Box::new(stream), torn: false }
    }

    /// Sends one message; returns the bytes put on the stream.
    pub async fn send(&mut self, msg: &Message) -> Result<usize, TransportError> {
        self.send_encoded(&msg.encode()).await
    }

    /// Sends an already encoded frame.
    ///
    /// Cancel-safe in the sense that matters: if the future is dropped part
    /// way through a frame, every later send fails instead of writing after
    /// half a frame.
    pub async fn send_encoded(&mut self, frame: &[u8]) -> Result<usize, TransportError> {
        if self.torn {
            return Err(TransportError::Lost("an earlier send on this stream was interrupted mid-frame".into()));
        }
        self.torn = true;
        self.stream.write_all(frame).await.map_err(lost)?;
        self.torn = false;
        Ok(frame.len())
    }

    /// Waits until everything sent was delivered, then ends the stream.
    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.stream.shutdown().await.map_err(lost)
    }
}

/// Receives frames from a stream.
///
/// [`FrameReceiver::recv`] is cancel-safe: a partly read frame stays in the
/// receiver, so it can race another stream in `tokio::select!` and lose
/// without losing bytes.
pub struct FrameReceiver {
    stream: ReadHalf,
    header: [u8; 4],
    header_filled: usize,
    buf: Vec<u8>,
    body_filled: usize,
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver").finish_non_exhaustive()
    }
}

impl FrameReceiver {
    pub(crate) fn new(stream: impl AsyncRead + Send + Unpin + 'static) -> Self {
        FrameReceiver { stream: Box::new(stream), header: [0; 4], header_filled: 0, buf: Vec::new(), body_filled: 0 }
    }

    /// The next message, or `None` when the peer ended the stream cleanly
    /// between frames. Only single `read` calls are awaited (each either
    /// completes or reads nothing), and progress lives in `self`.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        while self.header_filled < 4 {
            let n = self.stream.read(&mut self.header[self.header_filled..]).await.map_err(lost)?;
            if n == 0 {
                return match self.header_filled {
                    0 => Ok(None),
                    _ => Err(TransportError::Lost("the stream ended inside a frame header".into())),
                };
            }
            self.header_filled += n;
            if self.header_filled == 4 {
                let len = frame_len(self.header)?;
                self.buf.resize(len, 0);
                self.body_filled = 0;
            }
        }
        while self.body_filled < self.buf.len() {
            let n = self.stream.read(&mut self.buf[self.body_filled..]).await.map_err(lost)?;
            if n == 0 {
                return Err(TransportError::Lost("the stream ended inside a frame".into()));
            }
            self.body_filled += n;
        }
        self.header_filled = 0;
        Ok(Some(Message::decode(&self.buf)?))
    }

    /// Like [`FrameReceiver::recv`], failing after `timeout` of silence.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, TransportError> {
        tokio::time::timeout(timeout, self.recv()).await.map_err(|_| TransportError::Timeout(timeout))?
    }
}
