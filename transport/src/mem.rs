//! An in-memory connection pair with the same streams and frames as QUIC,
//! for tests that drive both ends of a migration in one process without a
//! network, and cut the link at a chosen point.
//!
//! `Conn::mem_pair` returns two connections joined by tokio duplex pipes (each stream
//! buffers up to its window, then back-pressures, as flow control would)
//! and a [`Link`] handle that cuts the connection now or after a number of
//! bytes have crossed it in either direction. A cut fails every pending
//! and later read, write, open and accept on both ends, as a dead link or a
//! crashed peer would; a close by either end does the same. A stalled link
//! delivers nothing until it is cut (an outage the ends have not yet
//! noticed: their writes still succeed).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{Notify, mpsc};

use crate::error::{CLOSE_CANCELLED, PEER_CANCELLED, TransportError};
use crate::frames::{FrameReceiver, FrameSender};

/// Bytes a stream buffers before its writer waits.
const WINDOW: usize = 1 << 20;

/// The shared fate of a connection pair.
#[derive(Debug, Default)]
struct Fate {
    cut: AtomicBool,
    /// Bytes that may still cross before the link is cut (`u64::MAX`: no limit).
    budget: AtomicU64,
    /// Bytes that crossed so far.
    crossed: AtomicU64,
    readers: Mutex<Vec<Arc<Mutex<Option<Waker>>>>>,
    notify: Notify,
    /// Set when an end closed with [`CLOSE_CANCELLED`].
    cancelled: AtomicBool,
    /// Nothing is delivered (reads wait) until the cut: an outage.
    stalled: AtomicBool,
}

impl Fate {
    fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        for r in readers.iter() {
            if let Some(w) = r.lock().unwrap_or_else(|e| e.into_inner()).take() {
                w.wake();
            }
        }
        self.notify.notify_waiters();
    }

    async fn wait_cut(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.is_cut() {
                return;
            }
            n.await;
        }
    }

    fn reader_slot(&self) -> Arc<Mutex<Option<Waker>>> {
        let slot = Arc::new(Mutex::new(None));
        self.readers.lock().unwrap_or_else(|e| e.into_inner()).push(slot.clone());
        slot
    }
}

impl Fate {
    fn reset(&self) -> io::Error {
        let why = if self.cancelled.load(Ordering::SeqCst) { PEER_CANCELLED } else { "the in-memory link was cut" };
        io::Error::new(io::ErrorKind::ConnectionReset, why)
    }
}

/// One end of an in-memory stream.
struct MemStream {
    pipe: DuplexStream,
    fate: Arc<Fate>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl MemStream {
    fn new(pipe: DuplexStream, fate: &Arc<Fate>) -> Self {
        MemStream { pipe, fate: fate.clone(), waker: fate.reader_slot() }
    }
}

impl AsyncRead for MemStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.fate.is_cut() {
            return Poll::Ready(Err(self.fate.reset()));
        }
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // Checked again after registering: a cut in between is not missed.
        if self.fate.is_cut() {
            return Poll::Ready(Err(self.fate.reset()));
        }
        // Woken by the cut, which loses what was written meanwhile.
        if self.fate.stalled.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.fate.is_cut() {
            return Poll::Ready(Err(self.fate.reset()));
        }
        let budget = self.fate.budget.load(Ordering::SeqCst);
        let crossed = self.fate.crossed.load(Ordering::SeqCst);
        let allowed = budget.saturating_sub(crossed);
        if allowed == 0 {
            self.fate.cut();
            return Poll::Ready(Err(self.fate.reset()));
        }
        let n = buf.len().min(usize::try_from(allowed).unwrap_or(usize::MAX));
        match Pin::new(&mut self.pipe).poll_write(cx, &buf[..n]) {
            Poll::Ready(Ok(k)) => {
                self.fate.crossed.fetch_add(k as u64, Ordering::SeqCst);
                Poll::Ready(Ok(k))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fate.is_cut() {
            return Poll::Ready(Err(self.fate.reset()));
        }
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fate.is_cut() {
            return Poll::Ready(Err(self.fate.reset()));
        }
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

/// A stream the peer opened, waiting to be accepted.
enum Opened {
    Bidi(DuplexStream),
    Uni(DuplexStream),
}

/// One end of an in-memory connection (inside a [`Conn`]).
pub(crate) struct MemConn {
    fate: Arc<Fate>,
    to_peer: mpsc::UnboundedSender<Opened>,
    incoming: mpsc::UnboundedReceiver<Opened>,
    bidi: VecDeque<DuplexStream>,
    uni: VecDeque<DuplexStream>,
}

impl MemConn {
    fn lost(&self) -> TransportError {
        TransportError::Lost(self.fate.reset().to_string())
    }

    fn open(&self, kind: fn(DuplexStream) -> Opened) -> Result<DuplexStream, TransportError> {
        if self.fate.is_cut() {
            return Err(self.lost());
        }
        let (mine, theirs) = tokio::io::duplex(WINDOW);
        self.to_peer.send(kind(theirs)).map_err(|_| self.lost())?;
        Ok(mine)
    }

    pub(crate) async fn open_bidi(&mut self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        let s = self.open(Opened::Bidi)?;
        let (rx, tx) = tokio::io::split(MemStream::new(s, &self.fate));
        Ok((FrameSender::new(tx), FrameReceiver::new(rx)))
    }

    pub(crate) async fn open_uni(&mut self) -> Result<FrameSender, TransportError> {
        let s = self.open(Opened::Uni)?;
        Ok(FrameSender::new(MemStream::new(s, &self.fate)))
    }

    pub(crate) async fn accept_bidi(&mut self) -> Result<(FrameSender, FrameReceiver), TransportError> {
        let s = self.accept(true).await?;
        let (rx, tx) = tokio::io::split(MemStream::new(s, &self.fate));
        Ok((FrameSender::new(tx), FrameReceiver::new(rx)))
    }

    pub(crate) async fn accept_uni(&mut self) -> Result<FrameReceiver, TransportError> {
        let s = self.accept(false).await?;
        Ok(FrameReceiver::new(MemStream::new(s, &self.fate)))
    }

    /// The next stream of the kind asked for that the peer opened; streams
    /// of the other kind wait in their queue.
    async fn accept(&mut self, bidi: bool) -> Result<DuplexStream, TransportError> {
        loop {
            if self.fate.is_cut() {
                return Err(self.lost());
            }
            let queued = if bidi { self.bidi.pop_front() } else { self.uni.pop_front() };
            if let Some(s) = queued {
                return Ok(s);
            }
            let fate = self.fate.clone();
            tokio::select! {
                o = self.incoming.recv() => match o {
                    Some(Opened::Bidi(s)) => self.bidi.push_back(s),
                    Some(Opened::Uni(s)) => self.uni.push_back(s),
                    None => return Err(TransportError::Lost("the peer closed the connection".into())),
                },
                () = fate.wait_cut() => return Err(self.lost()),
            }
        }
    }

    pub(crate) fn close(&self, code: u32) {
        if code == CLOSE_CANCELLED {
            self.fate.cancelled.store(true, Ordering::SeqCst);
        }
        self.fate.cut();
    }
}

/// Cuts an in-memory connection pair, as a dead link or a crashed peer would.
#[derive(Debug, Clone)]
pub struct Link {
    fate: Arc<Fate>,
}

impl Link {
    /// Cuts the link now.
    pub fn cut(&self) {
        self.fate.cut();
    }

    /// Cuts the link once `bytes` more have crossed it (both directions
    /// together); the write that reaches the limit is cut short.
    pub fn cut_after(&self, bytes: u64) {
        let crossed = self.fate.crossed.load(Ordering::SeqCst);
        self.fate.budget.store(crossed.saturating_add(bytes), Ordering::SeqCst);
    }

    /// Stops delivering, as a link outage does before the connection
    /// times out: reads at both ends wait, and what is written meanwhile
    /// (up to each stream's window) is held, and lost at the cut.
    pub fn stall(&self) {
        self.fate.stalled.store(true, Ordering::SeqCst);
    }

    /// Whether it has been cut (or closed by an end).
    pub fn is_cut(&self) -> bool {
        self.fate.is_cut()
    }

    /// Bytes that crossed it so far, both directions.
    pub fn crossed(&self) -> u64 {
        self.fate.crossed.load(Ordering::SeqCst)
    }
}

/// Two connected ends and the handle that cuts them (wrapped into
/// `Conn`s by `Conn::mem_pair`).
pub(crate) fn pair() -> (MemConn, MemConn, Link) {
    let fate = Arc::new(Fate { budget: AtomicU64::new(u64::MAX), ..Fate::default() });
    let (a_tx, a_rx) = mpsc::unbounded_channel();
    let (b_tx, b_rx) = mpsc::unbounded_channel();
    let end = |to_peer, incoming| MemConn {
        fate: fate.clone(),
        to_peer,
        incoming,
        bidi: VecDeque::new(),
        uni: VecDeque::new(),
    };
    let (a, b) = (end(b_tx, a_rx), end(a_tx, b_rx));
    (a, b, Link { fate })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wanmig_wire::Message;

    use crate::endpoint::Conn;

    #[tokio::test]
    async fn frames_cross_both_kinds_of_stream() {
        let (mut a, mut b, link) = Conn::mem_pair();
        let (mut tx, mut rx) = a.open_control().await.expect("open");
        let mut bulk = a.open_bulk().await.expect("open bulk");
        tx.send(&Message::Ready).await.expect("send");
        bulk.send(&Message::RoundApplied { round: 3 }).await.expect("send bulk");
        bulk.finish().await.expect("finish");
        // Accepted in the other order than opened.
        let mut b_bulk = b.accept_bulk().await.expect("accept bulk");
        let (mut b_tx, mut b_rx) = b.accept_control().await.expect("accept");
        assert_eq!(b_rx.recv().await.expect("recv"), Some(Message::Ready));
        assert_eq!(b_bulk.recv().await.expect("recv"), Some(Message::RoundApplied { round: 3 }));
        assert_eq!(b_bulk.recv().await.expect("end"), None);
        b_tx.send(&Message::CommitAck).await.expect("reply");
        assert_eq!(rx.recv().await.expect("recv"), Some(Message::CommitAck));
        assert!(link.crossed() > 0 && !link.is_cut());
    }

    #[tokio::test]
    async fn a_cut_fails_pending_and_later_operations_at_both_ends() {
        let (mut a, mut b, link) = Conn::mem_pair();
        let (mut tx, _rx) = a.open_control().await.expect("open");
        let (_b_tx, mut b_rx) = b.accept_control().await.expect("accept");
        let waiting = tokio::spawn(async move { b_rx.recv().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        link.cut();
        let r = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("joined");
        assert!(r.is_err(), "a pending read fails: {r:?}");
        assert!(tx.send(&Message::Ready).await.is_err());
        assert!(a.open_bulk().await.is_err());
        assert!(tokio::time::timeout(Duration::from_secs(5), b.accept_bulk()).await.expect("no hang").is_err());
    }

    #[tokio::test]
    async fn a_stalled_link_takes_writes_delivers_nothing_and_loses_them_at_the_cut() {
        let (mut a, mut b, link) = Conn::mem_pair();
        let (mut tx, _rx) = a.open_control().await.expect("open");
        let (_b_tx, mut b_rx) = b.accept_control().await.expect("accept");
        link.stall();
        tx.send(&Message::Ready).await.expect("a write still succeeds");
        let waiting = tokio::spawn(async move { b_rx.recv().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing is delivered while stalled");
        link.cut();
        let r = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("joined");
        assert!(r.is_err(), "what was written in the outage is lost: {r:?}");
    }

    #[tokio::test]
    async fn a_byte_budget_cuts_the_link_where_it_runs_out() {
        let (mut a, mut b, link) = Conn::mem_pair();
        link.cut_after(10);
        let (mut tx, _rx) = a.open_control().await.expect("open");
        let (_b_tx, mut b_rx) = b.accept_control().await.expect("accept");
        tx.send(&Message::Ready).await.expect("5 bytes fit");
        assert_eq!(b_rx.recv().await.expect("recv"), Some(Message::Ready));
        assert!(tx.send(&Message::Abort { reason: "long enough to pass the budget".into() }).await.is_err());
        assert!(link.is_cut());
        assert!(b_rx.recv().await.is_err(), "the half-sent frame never arrives whole");
    }
}
