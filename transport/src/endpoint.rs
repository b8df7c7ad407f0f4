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
use wanmig_wire::ALPN;

use crate::error::{TransportError, lost};
use crate::frames::{FrameReceiver, FrameSender};
use crate::identity::{Fingerprint, Identity};
use crate::mem;
use crate::tls;

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
