//! Framed streams: `wanmig-wire` messages on a QUIC stream (or an in-memory
//! one), each frame's length checked against the protocol limit before the
//! receiver allocates it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wanmig_wire::{Message, frame_len};

use crate::error::{TransportError, lost};

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

    /// Ends the stream without waiting: the peer sees the end right behind
    /// what was sent. [`FrameSender::finish`] later waits for delivery.
    pub async fn end(&mut self) -> Result<(), TransportError> {
        let stream = &mut self.stream;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *stream).poll_shutdown(cx) {
            std::task::Poll::Pending => std::task::Poll::Ready(Ok(())),
            done => done,
        })
        .await
        .map_err(lost)
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
