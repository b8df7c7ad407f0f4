//! The source's end of the connection: the control stream (sent messages,
//! and the destination's answers fed through the session machine), the
//! bulk stream (encoded, compressed, paced data), and the migration's
//! deadline.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::compress;
use wanmig_mem_sync::encode::{Encoded, PageEncoder};
use wanmig_mem_sync::policy::RateLimit;
use wanmig_transport::{FrameReceiver, FrameSender, TransportError};
use wanmig_types::PAGE_SIZE_U64;
use wanmig_vmm::memory::{DirtyPages, GuestRam};
use wanmig_wire::{Message, PageData, PageRef, PagesBuilder, SourceEvent, SourceSession, Stream};

use super::error::SendError;
use crate::report::WireBytes;

/// Largest encoded batch before it is sent: 1024 whole pages, the unit
/// zstd compresses (4 MiB gave 6% fewer wire bytes than 1 MiB on the test
/// guest, `cargo bench -p wanmig --bench migrate`).
pub const BATCH_BYTES: usize = 4 << 20;
/// How long to wait for the destination's answer to the hello, and at
/// least how long for any later answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an `Abort` may take to reach the destination before the
/// connection is closed anyway.
const ABORT_DELIVERY: Duration = Duration::from_secs(2);

/// The destination's reason, when it aborted: an `Abort` it sent just
/// before dropping the connection may arrive after the failure it causes
/// here (a reset stream), and says much more.
#[derive(Debug, Clone, Default)]
pub struct AbortNote(Arc<Mutex<Option<String>>>);

impl AbortNote {
    fn set(&self, reason: &str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
    }

    /// The destination's reason, if it sent one.
    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Sends on the bulk stream: encodes pages, compresses every data message
/// through the migration's one zstd stream, paces to the bandwidth cap,
/// and keeps count of what went on the wire.
pub struct BulkSender {
    stream: FrameSender,
    encoder: PageEncoder,
    /// One zstd stream for every batch (when the destination speaks zstd).
    zstd: Option<compress::StreamCompressor>,
    limit: Option<RateLimit>,
    last_send: Instant,
    page: [u8; wanmig_types::PAGE_SIZE],
    /// Pages of the round in progress handed to the stream so far (in the
    /// round's order): what a cut may have lost of it.
    pub handed: u64,
}

impl std::fmt::Debug for BulkSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkSender").field("zstd", &self.zstd.is_some()).finish_non_exhaustive()
    }
}

impl BulkSender {
    /// A sender on `stream`; deltas against a cache of `xbzrle_cache` bytes
    /// (0: none), zstd when `zstd`, paced to `rate` bytes/s when given.
    pub fn new(stream: FrameSender, xbzrle_cache: usize, zstd: bool, rate: Option<f64>) -> Result<Self, SendError> {
        let zstd = match zstd {
            true => Some(
                // zstd's threads where its build has them; else on this one.
                compress::StreamCompressor::with_workers(compress::DEFAULT_LEVEL, compress::default_workers())
                    .or_else(|_| compress::StreamCompressor::new(compress::DEFAULT_LEVEL))
                    .map_err(|e| SendError::Refused(format!("zstd: {e}")))?,
            ),
            false => None,
        };
        Ok(BulkSender {
            stream,
            encoder: PageEncoder::new(xbzrle_cache),
            zstd,
            limit: rate.map(RateLimit::new),
            last_send: Instant::now(),
            page: [0; wanmig_types::PAGE_SIZE],
            handed: 0,
        })
    }

    /// Changes the pace (`None`: as fast as the link goes).
    pub fn set_rate(&mut self, rate: Option<f64>) {
        match (&mut self.limit, rate) {
            (Some(l), Some(r)) => l.set_rate(r),
            (l, r) => *l = r.map(RateLimit::new),
        }
    }

    /// Sends `pages` of `ram` as round `round`; returns (pages, wire bytes).
    pub async fn send_pages(
        &mut self,
        ram: &GuestRam,
        pages: &DirtyPages,
        round: u32,
        wire: &mut WireBytes,
    ) -> Result<(u64, u64), SendError> {
        let mem = ram.mem();
        let (mut sent_pages, mut sent_bytes) = (0u64, 0u64);
        let mut b = PagesBuilder::new(round);
        self.handed = 0;
        for region in &pages.regions {
            for range in &region.ranges {
                for p in range.first..range.end() {
                    let gpa = region.start.0 + p * PAGE_SIZE_U64;
                    // A copy: the guest may be writing this page right now;
                    // if so it is dirty again and goes in a later round.
                    mem.read_slice(&mut self.page, GuestAddress(gpa)).map_err(|e| SendError::Refused(e.to_string()))?;
                    let data = match self.encoder.encode(gpa, &self.page) {
                        Encoded::Zero => PageData::Zero,
                        Encoded::Delta => PageData::Delta(self.encoder.delta()),
                        Encoded::Raw => PageData::Raw(&self.page),
                    };
                    b.push(PageRef { gpa, data });
                    if b.is_full() || b.bytes() >= BATCH_BYTES {
                        sent_pages += u64::from(b.len());
                        self.handed = sent_pages;
                        let full = std::mem::replace(&mut b, PagesBuilder::new(round));
                        sent_bytes += self.send(&Message::Pages(full.finish()), wire).await? as u64;
                    }
                }
            }
        }
        if !b.is_empty() {
            sent_pages += u64::from(b.len());
            self.handed = sent_pages;
            sent_bytes += self.send(&Message::Pages(b.finish()), wire).await? as u64;
        }
        let enc = self.encoder.stats;
        (wire.raw_pages, wire.delta_pages, wire.zero_pages) = (enc.raw_pages, enc.delta_pages, enc.zero_pages);
        Ok((sent_pages, sent_bytes))
    }

    /// Sends a data message (pages, a chunk, written extents) compressed
    /// when agreed, or any other bulk message as it is; returns wire bytes.
    pub async fn send(&mut self, msg: &Message, wire: &mut WireBytes) -> Result<usize, SendError> {
        let frame = msg.encode();
        let is_pages = matches!(msg, Message::Pages(_));
        if is_pages {
            wire.pages_uncompressed += frame.len() as u64;
        }
        // Once in the stream, every data message must go through it (the
        // peer's decoder needs all of the history).
        let frame = match (&mut self.zstd, msg) {
            (Some(z), Message::Pages(_) | Message::DiskChunk(_) | Message::DiskWrites(_)) => {
                let body = &frame[4..];
                let data = z.compress(body).map_err(|e| SendError::Refused(format!("zstd: {e}")))?;
                Message::Compressed { raw_len: body.len() as u32, data }.encode()
            }
            _ => frame,
        };
        let n = self.stream.send_encoded(&frame).await?;
        if is_pages {
            wire.pages += n as u64;
        } else if !matches!(msg, Message::RoundDone { .. }) {
            wire.disk += n as u64;
        }
        wire.total += n as u64;
        if let Some(limit) = &mut self.limit {
            let wait = limit.spend(n as u64, self.last_send.elapsed());
            self.last_send = Instant::now();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(n)
    }

    /// Ends the bulk stream once everything on it was delivered.
    pub async fn finish(&mut self) -> Result<(), SendError> {
        Ok(self.stream.finish().await?)
    }

    /// Ends the stream at once (its end follows what was sent); `finish`
    /// waits for delivery.
    pub async fn end(&mut self) -> Result<(), SendError> {
        Ok(self.stream.end().await?)
    }
}

/// The source's two streams, its session machine and its deadline.
pub struct Link {
    /// The control stream.
    pub ctl: FrameSender,
    answers: mpsc::Receiver<Result<Message, TransportError>>,
    /// The bulk stream.
    pub bulk: BulkSender,
    /// The session machine: what was agreed, what is owed.
    pub session: SourceSession,
    /// When the migration gives up (before the commit).
    pub deadline: Instant,
    note: AbortNote,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("session", &self.session.state_name()).finish_non_exhaustive()
    }
}

impl Link {
    /// Takes over an agreed session: everything the destination says from
    /// now on is read by a task of its own, so an `Abort` is seen between
    /// batches.
    pub fn new(
        ctl: FrameSender,
        mut rx: FrameReceiver,
        bulk: BulkSender,
        session: SourceSession,
        deadline: Instant,
    ) -> (Self, AbortNote) {
        let note = AbortNote::default();
        let (tx, answers) = mpsc::channel(16);
        let heard = note.clone();
        tokio::spawn(async move {
            loop {
                let r = rx.recv().await;
                let last = !matches!(r, Ok(Some(_)));
                let item = match r {
                    Ok(Some(m)) => {
                        if let Message::Abort { reason } = &m {
                            heard.set(reason);
                        }
                        Ok(m)
                    }
                    Ok(None) => Err(TransportError::Lost("the destination closed the control stream".into())),
                    Err(e) => Err(e),
                };
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        (Link { ctl, answers, bulk, session, deadline, note: note.clone() }, note)
    }

    /// The destination's next message, through the session machine. It may
    /// take a while: a round ends when the destination has applied it, and a
    /// highly compressible round can sit in flight as many times the flow-
    /// control window of page data. So wait until the migration's own
    /// deadline (and at least [`ANSWER_TIMEOUT`]). An `Abort` is an error
    /// carrying the destination's reason.
    pub async fn next_event(&mut self) -> Result<SourceEvent, SendError> {
        let wait = self.deadline.saturating_duration_since(Instant::now()).max(ANSWER_TIMEOUT);
        let msg = match tokio::time::timeout(wait, self.answers.recv()).await {
            Err(_) => return Err(SendError::Timeout(wait)),
            Ok(None) => return Err(SendError::Closed),
            Ok(Some(r)) => r?,
        };
        match self.session.on_message(Stream::Control, &msg)? {
            SourceEvent::Aborted(reason) => Err(SendError::Peer(format!("destination aborted: {reason}"))),
            SourceEvent::Refused(reason) => Err(SendError::Peer(format!("refused: {reason}"))),
            e => Ok(e),
        }
    }

    /// The destination's next message if one is already here (see
    /// [`Link::next_event`]), without waiting.
    pub fn try_event(&mut self) -> Option<Result<SourceEvent, SendError>> {
        let msg = match self.answers.try_recv() {
            Ok(r) => r,
            Err(mpsc::error::TryRecvError::Empty) => return None,
            Err(mpsc::error::TryRecvError::Disconnected) => return Some(Err(SendError::Closed)),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => return Some(Err(e.into())),
        };
        Some(match self.session.on_message(Stream::Control, &msg) {
            Err(e) => Err(e.into()),
            Ok(SourceEvent::Aborted(reason)) => Err(SendError::Peer(format!("destination aborted: {reason}"))),
            Ok(SourceEvent::Refused(reason)) => Err(SendError::Peer(format!("refused: {reason}"))),
            Ok(e) => Ok(e),
        })
    }

    /// Sends a control message; returns its wire bytes.
    pub async fn send_ctl(&mut self, msg: &Message, wire: &mut WireBytes) -> Result<usize, SendError> {
        let n = self.ctl.send(msg).await?;
        wire.total += n as u64;
        Ok(n)
    }

    /// Ends the current round and waits until the destination applied it.
    pub async fn end_round(&mut self, pages: u64, wire: &mut WireBytes) -> Result<u32, SendError> {
        let done = self.session.round_done(pages)?;
        let Message::RoundDone { round, .. } = done else { unreachable!("round_done returns a RoundDone") };
        self.bulk.send(&done, wire).await?;
        match self.next_event().await? {
            // The machine holds acknowledgements to the order of the rounds.
            SourceEvent::RoundApplied(_) => Ok(round),
            e => Err(SendError::Peer(format!("{e:?} while round {round} was being applied"))),
        }
    }

    /// Tells the destination why we give up and waits for it to have heard
    /// (best effort, bounded: the link may be what failed). Closing the
    /// connection right after a send would drop what is still in flight.
    /// Returns whether it was delivered.
    pub async fn abort(&mut self, reason: &str) -> bool {
        let Ok(abort) = self.session.abort(reason) else { return false };
        let ctl = &mut self.ctl;
        let told = tokio::time::timeout(ABORT_DELIVERY, async {
            ctl.send(&abort).await?;
            ctl.finish().await
        })
        .await;
        matches!(told, Ok(Ok(())))
    }

    /// The destination's own reason, if it aborted (waiting briefly for it
    /// to arrive behind the failure it caused).
    pub async fn peer_reason(&self) -> Option<String> {
        for _ in 0..10 {
            if let Some(r) = self.note.take() {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}
