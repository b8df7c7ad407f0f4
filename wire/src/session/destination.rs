//! The destination's machine.

use std::collections::BTreeMap;

use std::collections::VecDeque;

use wanmig_types::{ChunkId, MigrationId, PAGE_SIZE, PageRange, features};

use super::postcopy::{PageSpace, PostcopyPages};
use super::rules::{ProtocolError, Stream, check_stream, violation};
use crate::disk::{ChunkParams, Manifest, Need};
use crate::message::{Message, PROTOCOL_VERSION, VmShape};
use crate::postcopy::PostcopyReport;
use crate::resume::{DiskPoint, ResumePoint};

/// Most chunks asked for and not yet received at once: far above what the
/// source's manifest window (8 parts of 8 MiB, chunks of 16 KiB or more)
/// can produce, and a bound on this host's bookkeeping.
pub const MAX_REQUESTED: usize = 1 << 16;

/// Where the destination is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Deciding {
        offered: u64,
    },
    Receiving,
    /// Device state received; bulk data may still be draining.
    HaveState,
    ReadySent,
    /// Committed in post-copy: the guest runs here; pages still arrive.
    Postcopy,
    Committed,
    Aborted(String),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for Hello",
            Phase::Deciding { .. } => "deciding",
            Phase::Receiving => "receiving",
            Phase::HaveState => "verifying",
            Phase::ReadySent => "waiting for Commit",
            Phase::Postcopy => "in post-copy",
            Phase::Committed => "committed",
            Phase::Aborted(_) => "aborted",
        }
    }
}

/// A manifest part received and not yet answered: its number, offset and
/// chunks (length, id).
type Unanswered = (u32, u64, Vec<(u32, Option<ChunkId>)>);

/// A disk being received, as far as the session goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Disk {
    size: u64,
    next_seq: u32,
    next_offset: u64,
    /// The manifest part received and not yet answered.
    unanswered: Option<Unanswered>,
    /// Parts answered whose chunks have not all arrived, oldest first:
    /// (number, start offset, chunks still to come).
    incomplete: VecDeque<(u32, u64, usize)>,
    done: bool,
    /// The source offered an earlier sync as this disk's base.
    offered_base: bool,
    /// Started from that base: whole from the start; manifest parts come
    /// only for runs of written blocks, in order but with gaps.
    based: bool,
}

impl Disk {
    /// Where everything before is here: the oldest part not complete.
    fn frontier(&self) -> DiskPoint {
        match (self.incomplete.front(), &self.unanswered) {
            (Some(&(seq, at, _)), _) => DiskPoint { next_seq: seq, next_offset: at },
            (None, Some((seq, at, _))) => DiskPoint { next_seq: *seq, next_offset: *at },
            (None, None) => DiskPoint { next_seq: self.next_seq, next_offset: self.next_offset },
        }
    }
}

/// What the destination's driver must do with a message it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestAction {
    /// A valid hello: check the VM's shape against this host, then
    /// [`DestSession::accept`] or [`DestSession::refuse`].
    Decide,
    /// Write the batch's pages (counted in the current round).
    ApplyPages,
    /// Decompress the frame and feed the body to [`DestSession::on_decompressed`].
    Decompress,
    /// Check the chunk against its id, keep it, write it (it was asked for).
    StoreChunk,
    /// The discards go on: nothing to do until `PostcopyStart`.
    Discarded,
    /// Post-copy starts: take the page flow ([`DestSession::take_postcopy`]),
    /// register the missing pages, serve faults; the bulk stream is the
    /// page pump's from here.
    StartPostcopy,
    /// Write the extents (within the disk, which is still open).
    WriteExtents,
    /// Compare the disk with the digest; the disk takes no more data.
    CheckDisk,
    /// Round `0` is complete: make it durable as needed, then send
    /// `RoundApplied`.
    RoundComplete(u32),
    /// Look the part's chunks up and answer with [`DestSession::need`].
    AnswerManifest,
    /// Build the VM from the state (bulk data may still be draining).
    LoadState,
    /// The commit point: the VM is this host's to run.
    Commit,
    /// The source gave up.
    Aborted,
}

/// The destination's side of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestSession {
    phase: Phase,
    id: MigrationId,
    features: u64,
    chunking: ChunkParams,
    disks: Vec<Disk>,
    round: u32,
    round_pages: u64,
    /// Chunks asked for and not yet received: (disk, offset) → (id, length).
    requested: BTreeMap<(u8, u64), (ChunkId, u32, u32)>,
    /// The secret of the hello, which a `Resume` must carry.
    secret: [u8; 32],
    /// Chunk bytes received, against [`DestSession::chunk_quota`].
    chunk_bytes: u64,
    bulk_ended: bool,
    /// The VM's RAM as the hello laid it out.
    space: PageSpace,
    /// Post-copy's page flow: being discarded into, then started (and
    /// taken by the driver).
    postcopy: Option<PostcopyPages>,
    postcopy_started: bool,
}

impl Default for DestSession {
    fn default() -> Self {
        Self::new()
    }
}

impl DestSession {
    /// A session waiting for its hello.
    pub fn new() -> Self {
        DestSession {
            phase: Phase::AwaitHello,
            id: MigrationId::default(),
            features: 0,
            chunking: ChunkParams::DEFAULT,
            disks: Vec::new(),
            round: 0,
            round_pages: 0,
            requested: BTreeMap::new(),
            chunk_bytes: 0,
            secret: [0; 32],
            bulk_ended: false,
            space: PageSpace::of(&[]),
            postcopy: None,
            postcopy_started: false,
        }
    }

    fn unexpected(&self, message: &'static str) -> ProtocolError {
        ProtocolError::Unexpected { state: self.phase.name(), message }
    }

    fn agreed(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// A message from the source, on `stream`: what to do with it.
    pub fn on_message(&mut self, stream: Stream, msg: &Message) -> Result<DestAction, ProtocolError> {
        check_stream(stream, msg)?;
        match (&self.phase, msg) {
            (
                Phase::AwaitHello,
                Message::Hello { version, page_size, features: f, migration_id, shape, resume_secret, bases, .. },
            ) => {
                if *version != PROTOCOL_VERSION || *page_size as usize != PAGE_SIZE {
                    return Err(violation(format!(
                        "protocol version {version} / page size {page_size} not supported (this host: {PROTOCOL_VERSION} / {PAGE_SIZE})"
                    )));
                }
                if f & features::DISK_BASE != 0 && bases.len() != shape.disks.len() {
                    return Err(violation(format!("{} disk bases for {} disks", bases.len(), shape.disks.len())));
                }
                self.id = *migration_id;
                self.secret = *resume_secret;
                self.disks = disks_of(shape);
                for (d, b) in self.disks.iter_mut().zip(bases) {
                    d.offered_base = b.is_some();
                }
                self.space = PageSpace::of(&shape.memory);
                self.phase = Phase::Deciding { offered: *f };
                Ok(DestAction::Decide)
            }
            (Phase::Receiving | Phase::HaveState, Message::Pages(p)) if !self.bulk_ended => {
                if self.agreed(features::SYNC_ONLY) {
                    return Err(violation("pages in a disk-only sync".into()));
                }
                if p.round != self.round {
                    return Err(violation(format!("pages of round {} during round {}", p.round, self.round)));
                }
                self.round_pages += p.len() as u64;
                Ok(DestAction::ApplyPages)
            }
            (Phase::Receiving | Phase::HaveState, Message::Compressed { .. }) if !self.bulk_ended => {
                if !self.agreed(features::ZSTD) {
                    return Err(violation("a compressed frame, but zstd was not agreed".into()));
                }
                Ok(DestAction::Decompress)
            }
            (Phase::Receiving | Phase::HaveState, Message::DiskChunk(c)) if !self.bulk_ended => {
                self.on_chunk(c.disk, c.offset, c.id, c.data.len())
            }
            (Phase::Receiving | Phase::HaveState, Message::DiskWrites(w)) if !self.bulk_ended => {
                let d = self.open_disk(w.disk)?;
                if let Some(&(o, l)) =
                    w.extents.iter().find(|&&(o, l)| o.checked_add(u64::from(l)).is_none_or(|e| e > d.size))
                {
                    return Err(violation(format!("extent {o}+{l} past the end of disk {}", w.disk)));
                }
                Ok(DestAction::WriteExtents)
            }
            (Phase::Receiving | Phase::HaveState, Message::DiskDone(done)) if !self.bulk_ended => {
                let (disk, outstanding) = (done.disk, self.requested.keys().any(|k| k.0 == done.disk));
                let d = self.open_disk(disk)?;
                let first_copy_done = d.based || d.next_offset == d.size;
                if done.size != d.size || !first_copy_done || d.unanswered.is_some() || outstanding {
                    return Err(violation(format!("disk {disk} closed before all of it arrived")));
                }
                self.disks[disk as usize].done = true;
                Ok(DestAction::CheckDisk)
            }
            (Phase::Receiving | Phase::HaveState, Message::RoundDone { round, pages }) if !self.bulk_ended => {
                if *round != self.round || *pages != self.round_pages {
                    return Err(violation(format!(
                        "round {round} ends with {pages} pages; round {} has {} pages here",
                        self.round, self.round_pages
                    )));
                }
                self.round = round.checked_add(1).ok_or_else(|| violation("rounds are exhausted".into()))?;
                self.round_pages = 0;
                Ok(DestAction::RoundComplete(*round))
            }
            (Phase::Receiving | Phase::HaveState, Message::PostcopyDiscard { pages }) if !self.bulk_ended => {
                self.postcopy_pages()?.discard(pages)?;
                Ok(DestAction::Discarded)
            }
            (Phase::Receiving | Phase::HaveState, Message::PostcopyStart { missing }) if !self.bulk_ended => {
                let round = self.round;
                self.postcopy_pages()?.start(*missing, round)?;
                (self.bulk_ended, self.postcopy_started) = (true, true);
                Ok(DestAction::StartPostcopy)
            }
            (Phase::Receiving, Message::DiskManifest(m)) => self.on_manifest(m),
            (Phase::Receiving, Message::DeviceState { state }) => {
                if self.agreed(features::SYNC_ONLY) != state.is_empty() {
                    return Err(violation("device state in a disk-only sync, or none in a migration".into()));
                }
                self.phase = Phase::HaveState;
                Ok(DestAction::LoadState)
            }
            (Phase::ReadySent, Message::Commit) => {
                self.phase = if self.postcopy_started { Phase::Postcopy } else { Phase::Committed };
                Ok(DestAction::Commit)
            }
            (
                Phase::AwaitHello | Phase::Deciding { .. } | Phase::Receiving | Phase::HaveState | Phase::ReadySent,
                Message::Abort { reason },
            ) => {
                self.phase = Phase::Aborted(format!("source aborted: {reason}"));
                Ok(DestAction::Aborted)
            }
            (_, m) => Err(self.unexpected(m.name())),
        }
    }

    /// The post-copy page flow being discarded into: post-copy agreed, a
    /// migration (not a sync), between rounds, and not started yet.
    fn postcopy_pages(&mut self) -> Result<&mut PostcopyPages, ProtocolError> {
        if !self.agreed(features::POSTCOPY) || self.agreed(features::SYNC_ONLY) {
            return Err(violation("post-copy, but it was not agreed".into()));
        }
        if self.round_pages != 0 || self.postcopy_started {
            return Err(violation(format!("post-copy discards inside round {}, or after its start", self.round)));
        }
        let (space, agreed) = (&self.space, self.features);
        Ok(self.postcopy.get_or_insert_with(|| PostcopyPages::new(space.clone(), agreed)))
    }

    /// After [`DestAction::StartPostcopy`]: the page flow, for the driver's
    /// page pump (once).
    pub fn take_postcopy(&mut self) -> Option<PostcopyPages> {
        if self.postcopy_started { self.postcopy.take() } else { None }
    }

    /// Whether the guest moved in post-copy.
    pub fn is_postcopy(&self) -> bool {
        self.postcopy_started
    }

    /// Every page is here (`pages`, the flow the pump drove, says so): the
    /// `PostcopyComplete` to send, with `report`. The migration is over.
    pub fn postcopy_complete(
        &mut self,
        pages: &PostcopyPages,
        report: PostcopyReport,
    ) -> Result<Message, ProtocolError> {
        if self.phase != Phase::Postcopy {
            return Err(self.unexpected("PostcopyComplete"));
        }
        if !pages.is_complete() {
            return Err(violation(format!("post-copy complete with {} pages missing", pages.still_missing())));
        }
        self.phase = Phase::Committed;
        Ok(Message::PostcopyComplete(report))
    }

    /// The body of a `Compressed` frame, decoded: only data may hide there.
    pub fn on_decompressed(&mut self, msg: &Message) -> Result<DestAction, ProtocolError> {
        match msg {
            Message::Pages(_) | Message::DiskChunk(_) | Message::DiskWrites(_) => self.on_message(Stream::Bulk, msg),
            m => Err(violation(format!("{} inside a compressed frame", m.name()))),
        }
    }

    /// The source ended the bulk stream: no data may follow.
    pub fn on_bulk_end(&mut self) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Receiving | Phase::HaveState if !self.bulk_ended => {
                if self.round_pages != 0 {
                    return Err(violation(format!("the bulk stream ended inside round {}", self.round)));
                }
                self.bulk_ended = true;
                Ok(())
            }
            _ => Err(self.unexpected("end of the bulk stream")),
        }
    }

    fn open_disk(&self, disk: u8) -> Result<&Disk, ProtocolError> {
        if !self.agreed(features::DISK_COPY) {
            return Err(violation("disk data, but no disk is being copied".into()));
        }
        let d =
            self.disks.get(disk as usize).ok_or_else(|| violation(format!("disk {disk} of {}", self.disks.len())))?;
        if d.done {
            return Err(violation(format!("data for disk {disk} after its DiskDone")));
        }
        Ok(d)
    }

    fn on_chunk(&mut self, disk: u8, offset: u64, id: ChunkId, len: usize) -> Result<DestAction, ProtocolError> {
        self.open_disk(disk)?;
        match self.requested.get(&(disk, offset)).copied() {
            Some((want, l, seq)) if want == id && l as usize == len => {
                let total = self.chunk_bytes + len as u64;
                if total > self.chunk_quota() {
                    return Err(violation(format!(
                        "{total} bytes of chunks exceed this migration's quota of {} (its disks' declared sizes)",
                        self.chunk_quota()
                    )));
                }
                self.chunk_bytes = total;
                self.requested.remove(&(disk, offset));
                let d = &mut self.disks[disk as usize];
                if let Some(part) = d.incomplete.iter_mut().find(|p| p.0 == seq) {
                    part.2 -= 1;
                }
                while d.incomplete.front().is_some_and(|p| p.2 == 0) {
                    d.incomplete.pop_front();
                }
                Ok(DestAction::StoreChunk)
            }
            _ => Err(violation(format!("chunk {id:?} at {offset} of disk {disk} was not asked for"))),
        }
    }

    /// Most chunk bytes this migration may deliver: the sum of its disks'
    /// declared sizes. Each byte of an image is described once, by one
    /// manifest, and only chunks asked for from those manifests are taken,
    /// so an honest source never comes near it; the bound holds whatever
    /// the bookkeeping above ever allows (a re-request, say).
    pub fn chunk_quota(&self) -> u64 {
        self.disks.iter().map(|d| d.size).fold(0, u64::saturating_add)
    }

    /// Chunk bytes received so far.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    fn on_manifest(&mut self, m: &Manifest) -> Result<DestAction, ProtocolError> {
        self.open_disk(m.disk)?;
        if self.disks.iter().any(|d| d.unanswered.is_some()) {
            return Err(violation(format!("manifest {}/{} before the last one was answered", m.disk, m.seq)));
        }
        let d = &mut self.disks[m.disk as usize];
        let in_place = if d.based { m.offset >= d.next_offset } else { m.offset == d.next_offset };
        if m.seq != d.next_seq || !in_place {
            return Err(violation(format!(
                "manifest {} of disk {} at {} while {} at {} was due",
                m.seq, m.disk, m.offset, d.next_seq, d.next_offset
            )));
        }
        // A chunk with data is cut with the agreed parameters (a hole may be
        // any length: it costs nothing).
        let max = self.chunking.max;
        if let Some(c) = m.chunks.iter().find(|c| c.len == 0 || (c.id.is_some() && c.len > max)) {
            return Err(violation(format!(
                "manifest {} of disk {} has a chunk of {} bytes (agreed: at most {max})",
                m.seq, m.disk, c.len
            )));
        }
        let d = &mut self.disks[m.disk as usize];
        let end = m.offset.checked_add(m.len()).filter(|&e| e <= d.size);
        let end =
            end.ok_or_else(|| violation(format!("manifest {} of disk {} goes past the image's end", m.seq, m.disk)))?;
        d.next_seq += 1;
        d.next_offset = end;
        d.unanswered = Some((m.seq, m.offset, m.chunks.iter().map(|c| (c.len, c.id)).collect()));
        Ok(DestAction::AnswerManifest)
    }

    /// The answer to the manifest part just received: the chunks (indices,
    /// ascending) this host lacks. Only those may arrive.
    pub fn need(&mut self, disk: u8, needed: Vec<u32>) -> Result<Message, ProtocolError> {
        let d = self.disks.get_mut(disk as usize).ok_or_else(|| violation(format!("no disk {disk}")))?;
        let Some((seq, offset, chunks)) = d.unanswered.take() else {
            return Err(violation(format!("no manifest of disk {disk} to answer")));
        };
        let mut at = offset;
        let mut starts = Vec::with_capacity(chunks.len());
        for (len, id) in &chunks {
            starts.push((at, *len, *id));
            at += u64::from(*len);
        }
        let mut last = None;
        for &i in &needed {
            let Some(&(start, len, Some(id))) = starts.get(i as usize).filter(|_| last.is_none_or(|l| i > l)) else {
                d.unanswered = Some((seq, offset, chunks));
                return Err(violation(format!("cannot ask for chunk {i} of manifest {disk}/{seq}")));
            };
            last = Some(i);
            if self.requested.len() >= MAX_REQUESTED {
                return Err(violation(format!("more than {MAX_REQUESTED} chunks asked for at once")));
            }
            self.requested.insert((disk, start), (id, len, seq));
        }
        if !needed.is_empty() {
            d.incomplete.push_back((seq, offset, needed.len()));
        }
        Ok(Message::DiskNeed(Need { disk, seq, chunks: needed }))
    }

    /// Whether `secret` is this migration's (compared in constant time).
    pub fn is_secret(&self, secret: &[u8; 32]) -> bool {
        self.secret.iter().zip(secret).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// Whether the session can go on over a new connection: resuming was
    /// agreed, and the device state has not been taken up (before `Ready`),
    /// or the guest runs here in post-copy. (Between a post-copy's start and
    /// its commit a failure ends the attempt: the source's memory is whole.)
    pub fn can_resume(&self) -> bool {
        let pre = matches!(self.phase, Phase::Receiving | Phase::HaveState) && !self.postcopy_started;
        self.agreed(features::RESUME) && (pre || self.phase == Phase::Postcopy)
    }

    /// Takes the session up again after the link failed: what this side
    /// holds (the round it is in, `received`: the pages of that round it
    /// applied, as page-frame runs; each disk's first copy up to its oldest
    /// incomplete part), and the session goes back to receiving from there
    /// (a device state or disk digests that came are forgotten: they come
    /// again).
    pub fn resume(&mut self, received: Vec<PageRange>) -> Result<ResumePoint, ProtocolError> {
        if !self.can_resume() {
            return Err(self.unexpected("Resume"));
        }
        if self.phase == Phase::Postcopy {
            // Every disk was complete before the commit; the round is
            // post-copy's, `received` the pages of it that arrived.
            let disks = self.disks.iter().map(|d| DiskPoint { next_seq: d.next_seq, next_offset: d.next_offset });
            return Ok(ResumePoint { round: self.round, received, disks: disks.collect() });
        }
        let disks = self.disks.iter().map(Disk::frontier).collect();
        for d in &mut self.disks {
            let at = d.frontier();
            (d.next_seq, d.next_offset) = (at.next_seq, at.next_offset);
            d.unanswered = None;
            d.incomplete.clear();
            d.done = false;
        }
        self.requested.clear();
        self.round_pages = 0;
        self.bulk_ended = false;
        self.phase = Phase::Receiving;
        Ok(ResumePoint { round: self.round, received, disks })
    }

    /// Accepts the VM: the `Accept` to send, with the features both sides
    /// speak (of those offered, the ones in `local`), the chunking to use
    /// and, per disk, whether its image starts from the base the source
    /// offered (`based`: empty, or one flag per disk; a disk whose base
    /// this host does not hold gets a first copy).
    pub fn accept(&mut self, local: u64, chunking: ChunkParams, based: &[bool]) -> Result<Message, ProtocolError> {
        let Phase::Deciding { offered } = self.phase else { return Err(self.unexpected("Accept")) };
        let mut agreed = offered & local & features::ALL;
        if agreed & features::DISK_COPY == 0 || !based.contains(&true) {
            agreed &= !features::DISK_BASE;
        }
        if agreed & features::DISK_BASE != 0 {
            if based.len() != self.disks.len() {
                return Err(violation(format!("{} based flags for {} disks", based.len(), self.disks.len())));
            }
            if let Some(i) = self.disks.iter().zip(based).position(|(d, &b)| b && !d.offered_base) {
                return Err(violation(format!("disk {i} has no base offered to start from")));
            }
            for (d, &b) in self.disks.iter_mut().zip(based) {
                d.based = b;
            }
        }
        self.features = agreed;
        self.chunking = chunking;
        self.phase = Phase::Receiving;
        let based = match agreed & features::DISK_BASE {
            0 => Vec::new(),
            _ => based.to_vec(),
        };
        Ok(Message::Accept { features: self.features, chunking, based })
    }

    /// Refuses the VM.
    pub fn refuse(&mut self, reason: &str) -> Result<Message, ProtocolError> {
        match self.phase {
            Phase::AwaitHello | Phase::Deciding { .. } => {
                self.phase = Phase::Aborted(reason.into());
                Ok(Message::Refuse { reason: reason.into() })
            }
            _ => Err(self.unexpected("Refuse")),
        }
    }

    /// Everything arrived and checks out: the `Ready` to send.
    pub fn ready(&mut self) -> Result<Message, ProtocolError> {
        if self.phase != Phase::HaveState || !self.bulk_ended {
            return Err(self.unexpected("Ready"));
        }
        if self.agreed(features::DISK_COPY) {
            if let Some(i) = self.disks.iter().position(|d| !d.done) {
                return Err(violation(format!("disk {i} was never completed")));
            }
        }
        self.phase = Phase::ReadySent;
        Ok(Message::Ready)
    }

    /// Gives up (before commit).
    pub fn abort(&mut self, reason: &str) -> Result<Message, ProtocolError> {
        if matches!(self.phase, Phase::Committed | Phase::Postcopy) {
            return Err(self.unexpected("Abort"));
        }
        self.phase = Phase::Aborted(reason.into());
        Ok(Message::Abort { reason: reason.into() })
    }

    /// Features agreed (0 before the hello is accepted).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The migration's id (from its hello).
    pub fn id(&self) -> MigrationId {
        self.id
    }

    /// The round being received.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Chunks asked for and not yet received.
    pub fn outstanding_chunks(&self) -> usize {
        self.requested.len()
    }

    /// Whether the session ended before the commit, and why.
    pub fn aborted(&self) -> Option<&str> {
        match &self.phase {
            Phase::Aborted(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the VM is this side's to run (in post-copy: with pages
    /// still at the source).
    pub fn owns_vm(&self) -> bool {
        matches!(self.phase, Phase::Committed | Phase::Postcopy)
    }

    /// A name for the current state, for messages.
    pub fn state_name(&self) -> &'static str {
        self.phase.name()
    }
}

fn disks_of(shape: &VmShape) -> Vec<Disk> {
    shape
        .disks
        .iter()
        .map(|d| Disk {
            size: d.size,
            next_seq: 0,
            next_offset: 0,
            unanswered: None,
            incomplete: VecDeque::new(),
            done: false,
            offered_base: false,
            based: false,
        })
        .collect()
}
