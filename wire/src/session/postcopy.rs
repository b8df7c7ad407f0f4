//! The post-copy page flow: which pages the destination may receive once
//! the guest has moved, and what it may ask for.
//!
//! ```text
//! source                                        destination
//! Transfer ──DiskWrites*, DiskDone per disk, RoundDone[B]──▶ (the switch:
//!          ──PostcopyDiscard*, PostcopyStart───────────[B]──▶  guest paused here)
//!          ──Pages (empty: opens it)──────────────────[U]──▶ registers the missing
//!          ◀──────────────PageRequest (empty: opens it)──[R]─  pages (userfaultfd)
//!          ──DeviceState──────────────────────────────[C]──▶ builds the VM (may fault)
//!          ◀──────────────────────────────PageRequest*──[R]─  a vCPU or device faulted
//!          ──Pages* (asked for, with neighbours)──────[U]──▶
//!          ──Pages* (pushed around the faults)────────[B]──▶
//!          ◀───────────────────────────────────Ready────[C]─
//!          ──Commit───────────────────────────────────[C]──▶ runs the guest
//!          ◀────────────────────────────────CommitAck────[C]─
//!          ... requests and pages until every missing page is there ...
//!          ◀─────────────────────────PostcopyComplete────[C]─
//! ```
//!
//! With `features::EARLY_COMMIT` the `Commit` follows the `DeviceState` at
//! once and the destination decides, as in pre-copy: it commits once the
//! VM is built (its `Ready` and `CommitAck` then come back together), or
//! aborts. That takes a round trip out of the guest's downtime.
//!
//! `[U]` is the urgent stream, `[R]` the request stream (both one-way,
//! opened at the switch). Pages in post-copy are whole or zero (never a
//! delta: the destination dropped the page it would apply to) and must be
//! among the pages the discards named; each may arrive twice (pushed and
//! requested), never a page the destination holds (the guest may have
//! written it since). Before `Commit` a failure resumes the guest at the
//! source as in pre-copy (its memory is whole), as does a destination
//! that answers a resume after the `Commit` with its journal's "not
//! committed" (the guest never ran there). Otherwise, after it, neither side
//! alone holds the guest: a failure of the link is ridden out by resuming
//! on a new connection (the destination says which of the pages arrived,
//! and asks again for those its vCPUs wait on), and the source keeps every
//! page until `PostcopyComplete`.

use wanmig_types::{PAGE_SIZE, PageRange, features};

use super::rules::{ProtocolError, Stream, violation};
use crate::message::{Message, PageData, Pages};

/// Guest page frame numbers laid out as one index space over the VM's RAM
/// regions (as the hello declared them), for bitmaps of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSpace {
    /// Per region: its first page frame number, its pages, its first index.
    regions: Vec<(u64, u64, u64)>,
    pages: u64,
}

impl PageSpace {
    /// The space of RAM regions `memory` ((guest-physical start, length),
    /// page-aligned, as in the hello).
    pub fn of(memory: &[(u64, u64)]) -> Self {
        let mut base = 0u64;
        let mut regions = Vec::with_capacity(memory.len());
        for &(start, len) in memory {
            let pages = len / PAGE_SIZE as u64;
            regions.push((start / PAGE_SIZE as u64, pages, base));
            base = base.saturating_add(pages);
        }
        PageSpace { regions, pages: base }
    }

    /// Pages in all.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The index of page frame `pfn`, if it is RAM.
    pub fn index(&self, pfn: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|&&(first, n, _)| pfn >= first && pfn - first < n)
            .map(|&(first, _, b)| b + pfn - first)
    }

    /// The page frame of index `i` (`i` below [`PageSpace::pages`]).
    pub fn pfn(&self, i: u64) -> Option<u64> {
        self.regions.iter().find(|&&(_, n, b)| i >= b && i - b < n).map(|&(first, _, b)| first + i - b)
    }
}

/// A bitmap over a [`PageSpace`] with a count of set bits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bitmap {
    words: Vec<u64>,
    set: u64,
}

impl Bitmap {
    fn new(pages: u64) -> Self {
        Bitmap { words: vec![0; pages.div_ceil(64) as usize], set: 0 }
    }

    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; whether it was clear.
    fn set(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        self.set += u64::from(!was);
        !was
    }

    /// Runs of set bits, as page frame numbers of `space`.
    fn runs(&self, space: &PageSpace) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let i = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let Some(pfn) = space.pfn(i) else { continue };
                match out.last_mut() {
                    Some(last) if last.end() == pfn => last.count += 1,
                    _ => out.push(PageRange { first: pfn, count: 1 }),
                }
            }
        }
        out
    }
}

/// What the destination's driver does with a message of the post-copy page
/// flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAction {
    /// Place the batch's pages (each checked: whole or zero, one the
    /// discards named).
    Place,
    /// Decompress the frame (with that stream's decoder) and feed the body
    /// to [`PostcopyPages::on_decompressed`].
    Decompress,
}

/// The destination's side of the post-copy page flow: the pages the
/// discards named, which of them arrived, and what may be asked for.
/// Made by [`super::DestSession`] at `PostcopyStart` and handed to the
/// driver's page pump; handed back to finish ([`super::DestSession::postcopy_complete`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopyPages {
    space: PageSpace,
    round: u32,
    zstd: bool,
    /// Named by the discards: missing at the switch.
    named: Bitmap,
    /// Of those, arrived since.
    arrived: Bitmap,
    started: bool,
}

impl PostcopyPages {
    /// Before any discard: nothing missing. Made only once the driver has
    /// accepted the VM's shape (its memory checked against this host), so
    /// the bitmaps are sized by memory this host has.
    pub(crate) fn new(space: PageSpace, features_agreed: u64) -> Self {
        let pages = space.pages();
        PostcopyPages {
            space,
            round: 0,
            zstd: features_agreed & features::ZSTD != 0,
            named: Bitmap::new(pages),
            arrived: Bitmap::new(pages),
            started: false,
        }
    }

    /// The discards of a `PostcopyDiscard`: each page must be RAM.
    pub(crate) fn discard(&mut self, runs: &[PageRange]) -> Result<(), ProtocolError> {
        for r in runs {
            for pfn in r.first..r.end() {
                let i = self.space.index(pfn).ok_or_else(|| violation(format!("discard of page {pfn:#x}, not RAM")))?;
                self.named.set(i);
            }
        }
        Ok(())
    }

    /// `PostcopyStart`: the discards are complete, and named `missing` pages.
    pub(crate) fn start(&mut self, missing: u64, round: u32) -> Result<(), ProtocolError> {
        if missing != self.named.set {
            return Err(violation(format!(
                "post-copy starts with {missing} pages missing; the discards named {}",
                self.named.set
            )));
        }
        (self.round, self.started) = (round, true);
        Ok(())
    }

    /// A message on `stream` after the start: pages pushed (bulk) or asked
    /// for (urgent).
    pub fn on_message(&mut self, stream: Stream, msg: &Message) -> Result<PageAction, ProtocolError> {
        let unexpected = || ProtocolError::Unexpected { state: "in post-copy", message: msg.name() };
        if !self.started || !matches!(stream, Stream::Bulk | Stream::Urgent) {
            return Err(unexpected());
        }
        match msg {
            Message::Pages(p) => self.on_pages(stream, p).map(|()| PageAction::Place),
            Message::Compressed { .. } if self.zstd => Ok(PageAction::Decompress),
            Message::Compressed { .. } => Err(violation("a compressed frame, but zstd was not agreed".into())),
            _ => Err(unexpected()),
        }
    }

    /// The body of a `Compressed` frame on `stream`: only pages may hide there.
    pub fn on_decompressed(&mut self, stream: Stream, msg: &Message) -> Result<PageAction, ProtocolError> {
        match msg {
            Message::Pages(_) => self.on_message(stream, msg),
            m => Err(violation(format!("{} inside a compressed post-copy frame", m.name()))),
        }
    }

    fn on_pages(&mut self, stream: Stream, p: &Pages) -> Result<(), ProtocolError> {
        if p.round != self.round {
            return Err(violation(format!("post-copy pages of round {} (post-copy is round {})", p.round, self.round)));
        }
        for page in p.iter() {
            let pfn = page.gpa / PAGE_SIZE as u64;
            let i = self.space.index(pfn).filter(|&i| self.named.get(i));
            let Some(i) = i else {
                return Err(violation(format!("page {:#x} on the {stream} stream was not missing here", page.gpa)));
            };
            if matches!(page.data, PageData::Delta(_)) {
                return Err(violation(format!("a delta for page {:#x} in post-copy (it has no base here)", page.gpa)));
            }
            self.arrived.set(i);
        }
        Ok(())
    }

    /// The `PageRequest` for faulted pages `pfns` (in fault order), keeping
    /// those still missing; `None` when none is.
    pub fn request(&self, pfns: &[u64]) -> Option<Message> {
        let pages: Vec<u64> = pfns
            .iter()
            .copied()
            .filter(|&p| self.space.index(p).is_some_and(|i| self.named.get(i) && !self.arrived.get(i)))
            .take(crate::postcopy::MAX_REQUEST_PAGES as usize)
            .collect();
        (!pages.is_empty()).then_some(Message::PageRequest { pages })
    }

    /// The empty request that opens the request stream.
    pub fn opening_request() -> Message {
        Message::PageRequest { pages: Vec::new() }
    }

    /// Whether every page the discards named arrived.
    pub fn is_complete(&self) -> bool {
        self.started && self.arrived.set == self.named.set
    }

    /// Pages named and not arrived.
    pub fn still_missing(&self) -> u64 {
        self.named.set - self.arrived.set
    }

    /// Pages the discards named.
    pub fn named(&self) -> u64 {
        self.named.set
    }

    /// The pages the discards named, as runs of page frame numbers (what
    /// the driver registers as missing).
    pub fn named_runs(&self) -> Vec<PageRange> {
        self.named.runs(&self.space)
    }

    /// The named pages that arrived, as runs of page frame numbers (what a
    /// resume need not send again).
    pub fn arrived_runs(&self) -> Vec<PageRange> {
        self.arrived.runs(&self.space)
    }

    /// The round post-copy pages carry.
    pub fn round(&self) -> u32 {
        self.round
    }
}
