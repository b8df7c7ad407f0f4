//! The source's machine.

use std::collections::VecDeque;

use wanmig_types::{ChunkId, MigrationId, PAGE_SIZE, features};

use super::postcopy::PageSpace;
use super::rules::{FailureOutcome, ProtocolError, Stream, check_stream, violation};
use crate::disk::{ChunkParams, DiskDone, Manifest};
use crate::message::{Message, PROTOCOL_VERSION, Settlement, VmShape};
use crate::postcopy::{MAX_DISCARD_RUNS, PostcopyReport};
use wanmig_types::PageRange;

/// Where the source is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Start,
    HelloSent {
        offered: u64,
    },
    /// Pre-copy (`paused` false) or stop-and-copy (`paused` true).
    Transfer {
        paused: bool,
    },
    AwaitReady,
    ReadyToCommit,
    /// `Commit` went with the device state, before `Ready` (the feature
    /// `EARLY_COMMIT`): the destination decides; its `Ready` or its
    /// `Abort` comes next.
    CommittedEarly,
    CommitSent,
    /// Post-copy, acknowledged: the guest runs at the destination, which
    /// still needs pages from here.
    Postcopy,
    Done,
    Aborted(String),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Start => "starting",
            Phase::HelloSent { .. } => "waiting for the destination's answer",
            Phase::Transfer { paused: false } => "in pre-copy",
            Phase::Transfer { paused: true } => "in stop-and-copy",
            Phase::AwaitReady => "waiting for Ready",
            Phase::ReadyToCommit => "ready to commit",
            Phase::CommittedEarly => "committed early, waiting for the destination's decision",
            Phase::CommitSent => "waiting for CommitAck",
            Phase::Postcopy => "in post-copy",
            Phase::Done => "done",
            Phase::Aborted(_) => "aborted",
        }
    }
}

/// A manifest part sent and not yet answered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    disk: u8,
    seq: u32,
    /// Per chunk: whether it has an id (all-zero chunks have none and are
    /// never asked for).
    has_id: Vec<bool>,
}

/// A disk of the VM, as far as the session goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Disk {
    size: u64,
    next_seq: u32,
    next_offset: u64,
    done: bool,
    /// The earlier sync the source offered as this disk's base.
    offered_base: Option<MigrationId>,
    /// The destination starts it from that base: no first copy, only
    /// written blocks, and manifest parts for some runs of them, in order
    /// but with gaps (`next_offset`: where the last part ended).
    based: bool,
}

/// What a message from the destination means for the source's driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The destination takes the VM with these features and chunking.
    Accepted {
        /// Features both sides speak.
        features: u64,
        /// How to cut the disks.
        chunking: ChunkParams,
        /// Per disk, whether it starts from the base offered (see
        /// `Message::Accept`); empty when `features::DISK_BASE` is not agreed.
        based: Vec<bool>,
    },
    /// The destination refused the VM.
    Refused(String),
    /// The destination applied round `0`.
    RoundApplied(u32),
    /// The answer to manifest part `seq` of `disk`: send these chunks
    /// (indices into the part, ascending, each one with an id).
    Need {
        /// Disk index.
        disk: u8,
        /// Manifest part.
        seq: u32,
        /// Chunks to send.
        chunks: Vec<u32>,
    },
    /// The destination holds everything and is ready to run the VM.
    Ready,
    /// The destination runs the VM.
    CommitAcked,
    /// The destination gave up (the reason says why).
    Aborted(String),
    /// Post-copy: the destination waits for these pages (page frame
    /// numbers, in RAM, in the order they faulted; none: the request stream
    /// opens).
    PagesRequested(Vec<u64>),
    /// Post-copy: every page is placed at the destination.
    PostcopyComplete(PostcopyReport),
}

/// Where post-copy stands at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Postcopy {
    /// Pre-copy only (so far).
    Off,
    /// Paused for the switch: the disks' last data goes, then the discards.
    Switching,
    /// `PostcopyStart` sent: pages go on demand and pushed.
    Started,
}

/// The source's side of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSession {
    phase: Phase,
    id: MigrationId,
    features: u64,
    chunking: ChunkParams,
    disks: Vec<Disk>,
    /// The next round number.
    round: u32,
    /// Rounds ended and not yet acknowledged, oldest first.
    unapplied: VecDeque<u32>,
    /// Manifest parts awaiting their answer, in the order sent.
    pending: VecDeque<Pending>,
    /// The secret a `Resume` of this migration carries.
    secret: [u8; 32],
    /// The VM's RAM, to check what the destination asks for.
    space: PageSpace,
    postcopy: Postcopy,
}

/// Where a resumed migration goes on from, as the source's machine agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    /// The round to (re)send: the destination has every round before it.
    pub round: u32,
    /// Whether that round had already ended here (its `RoundDone` sent):
    /// what it carried must go again, less what the destination has.
    pub round_was_ended: bool,
    /// Per disk, where its first copy goes on.
    pub disks: Vec<crate::resume::DiskPoint>,
}

impl Default for SourceSession {
    fn default() -> Self {
        Self::new()
    }
}

impl SourceSession {
    /// A session that has sent nothing yet.
    pub fn new() -> Self {
        SourceSession {
            phase: Phase::Start,
            id: MigrationId::default(),
            features: 0,
            chunking: ChunkParams::DEFAULT,
            disks: Vec::new(),
            round: 0,
            unapplied: VecDeque::new(),
            pending: VecDeque::new(),
            secret: [0; 32],
            space: PageSpace::of(&[]),
            postcopy: Postcopy::Off,
        }
    }

    fn unexpected(&self, message: &'static str) -> ProtocolError {
        ProtocolError::Unexpected { state: self.phase.name(), message }
    }

    /// Opens the session: the `Hello` to send, offering `offered` features
    /// and proposing how to cut disk images; `bases`: per disk, the earlier
    /// sync it can start from (see `Message::Hello`; empty for none).
    pub fn hello(
        &mut self,
        migration_id: MigrationId,
        shape: VmShape,
        offered: u64,
        chunking: ChunkParams,
        resume_secret: [u8; 32],
        bases: Vec<Option<MigrationId>>,
    ) -> Result<Message, ProtocolError> {
        if self.phase != Phase::Start {
            return Err(self.unexpected("Hello"));
        }
        let (mut offered, mut bases) = (offered, bases);
        if bases.iter().all(Option::is_none) {
            (offered, bases) = (offered & !features::DISK_BASE, Vec::new());
        } else if bases.len() != shape.disks.len() || offered & features::DISK_BASE == 0 {
            return Err(violation(format!("{} disk bases for {} disks", bases.len(), shape.disks.len())));
        }
        self.id = migration_id;
        self.secret = resume_secret;
        self.chunking = chunking;
        self.disks = (shape.disks.iter().enumerate())
            .map(|(i, d)| Disk {
                size: d.size,
                next_seq: 0,
                next_offset: 0,
                done: false,
                offered_base: bases.get(i).copied().flatten(),
                based: false,
            })
            .collect();
        self.space = PageSpace::of(&shape.memory);
        self.phase = Phase::HelloSent { offered };
        Ok(Message::Hello {
            version: PROTOCOL_VERSION,
            features: offered,
            page_size: PAGE_SIZE as u32,
            migration_id,
            shape,
            chunking,
            resume_secret,
            bases,
        })
    }

    /// The `Resume` that opens a new connection for this migration, after
    /// the link failed before the commit (or, with `SETTLE_ON_RESUME`,
    /// after it and before the destination's decision was heard); `None`
    /// when it cannot resume (not agreed, or decided, or ended).
    ///
    /// In post-copy, before the decision on an early commit was heard, it
    /// is a `SettleQuery` instead: a destination that lost the link before
    /// it committed (before post-copy started there) may have parked to be
    /// resumed at the very point a committed one would give, so the source
    /// asks for the decision first ([`SourceSession::on_settled`]), and
    /// resumes only a destination that runs the guest.
    pub fn resume_request(&self) -> Option<Message> {
        let early_postcopy = self.postcopy == Postcopy::Started && self.phase == Phase::CommittedEarly;
        let live = match self.postcopy {
            // Before the commit the guest can run here again; after it, the
            // destination (if it committed) needs the pages.
            Postcopy::Started if early_postcopy => self.features & features::SETTLE_ON_RESUME != 0,
            Postcopy::Started => matches!(self.phase, Phase::CommitSent | Phase::Postcopy),
            Postcopy::Switching => false,
            Postcopy::Off => match self.phase {
                Phase::Transfer { .. } | Phase::AwaitReady | Phase::ReadyToCommit => true,
                Phase::CommittedEarly | Phase::CommitSent => self.features & features::SETTLE_ON_RESUME != 0,
                _ => false,
            },
        };
        if !live || self.features & features::RESUME == 0 {
            return None;
        }
        Some(match early_postcopy {
            true => Message::SettleQuery { migration_id: self.id },
            false => Message::Resume { migration_id: self.id, secret: self.secret },
        })
    }

    /// The destination's answer to a `Resume`: checked against what was
    /// sent, it moves the session back to pre-copy at the round the
    /// destination is in, with each disk's first copy at its point there.
    /// After an early commit the destination had not decided (it parked
    /// before `Ready`): the session goes back into the stop-and-copy, the
    /// guest still paused, to send again what the destination lacks, the
    /// device state and the `Commit`.
    pub fn on_resumed(&mut self, point: &crate::resume::ResumePoint) -> Result<Rewind, ProtocolError> {
        if self.resume_request().is_none() {
            return Err(self.unexpected("Resumed"));
        }
        if self.postcopy == Postcopy::Started {
            return self.on_resumed_postcopy(point);
        }
        // A destination that said Ready has decided: it answers from its
        // journal, never takes the session up.
        if self.phase == Phase::CommitSent {
            return Err(self.unexpected("Resumed"));
        }
        let early = self.phase == Phase::CommittedEarly;
        // The stop-and-copy starts once every manifest is answered and the
        // first copy's round applied: the destination holds each disk whole.
        if early && !self.disks_whole(point) {
            return Err(violation(format!(
                "an early commit resumed with a disk's first copy incomplete ({:?})",
                point.disks
            )));
        }
        // The destination is in the oldest round not acknowledged here, or
        // (having applied it) in the next; never elsewhere.
        let oldest = self.unapplied.front().copied().unwrap_or(self.round);
        if point.round < oldest || point.round > self.round {
            return Err(violation(format!(
                "resumed at round {} while {oldest}..={} was possible",
                point.round, self.round
            )));
        }
        if point.disks.len() != self.disks.len() {
            return Err(violation(format!("resumed with {} disks of {}", point.disks.len(), self.disks.len())));
        }
        for (i, (p, d)) in point.disks.iter().zip(&self.disks).enumerate() {
            // A disk started from its base is whole from the start; its
            // parts (runs of written blocks) leave gaps.
            let out_of_place = match d.based {
                true => p.next_seq > d.next_seq || p.next_offset > d.next_offset,
                false => {
                    p.next_seq > d.next_seq
                        || p.next_offset > d.next_offset
                        || (p.next_seq == 0) != (p.next_offset == 0)
                }
            };
            if out_of_place {
                return Err(violation(format!(
                    "disk {i} resumed at part {} / {}, past what was sent",
                    p.next_seq, p.next_offset
                )));
            }
        }
        let round_was_ended = point.round < self.round;
        self.round = point.round;
        self.unapplied.clear();
        self.pending.clear();
        for (p, d) in point.disks.iter().zip(&mut self.disks) {
            (d.next_seq, d.next_offset, d.done) = (p.next_seq, p.next_offset, false);
        }
        self.phase = Phase::Transfer { paused: early };
        Ok(Rewind { round: point.round, round_was_ended, disks: point.disks.clone() })
    }

    /// Whether `point` has every disk's first copy where this side ended it.
    fn disks_whole(&self, point: &crate::resume::ResumePoint) -> bool {
        point.disks.len() == self.disks.len()
            && point
                .disks
                .iter()
                .zip(&self.disks)
                .all(|(p, d)| (p.next_seq, p.next_offset) == (d.next_seq, d.next_offset))
    }

    /// The destination's answer to a `Resume` once the attempt there is
    /// over, or to the `SettleQuery` of a post-copy committed early: its
    /// journal's decision about migration `id` (with `SETTLE_ON_RESUME`
    /// agreed). Committed (only after `Commit`): the VM is the
    /// destination's (in post-copy: with every page). Not committed: it
    /// never will be, the guest is this side's again. A post-copy running
    /// there: committed, and the session goes on in post-copy, to be
    /// resumed (`CommitAcked`; [`SourceSession::resume_request`] is a
    /// `Resume` now). Anything else decides nothing: the session stays where
    /// it was (after the commit: in doubt).
    pub fn on_settled(&mut self, id: MigrationId, outcome: Settlement) -> Result<SourceEvent, ProtocolError> {
        if self.resume_request().is_none() || self.features & features::SETTLE_ON_RESUME == 0 {
            return Err(self.unexpected("SettleAnswer"));
        }
        if id != self.id {
            return Err(violation(format!("a settle answer about migration {id}, not {}", self.id)));
        }
        let undecided = matches!(self.phase, Phase::CommittedEarly | Phase::CommitSent);
        match outcome {
            Settlement::Committed if self.committed() => {
                self.phase = Phase::Done;
                Ok(SourceEvent::CommitAcked)
            }
            Settlement::PostcopyRunning if self.postcopy == Postcopy::Started && undecided => {
                self.phase = Phase::Postcopy;
                Ok(SourceEvent::CommitAcked)
            }
            // In post-copy too, before the acknowledgement: the guest never
            // ran there, and its memory here is whole.
            Settlement::NotCommitted if self.postcopy == Postcopy::Off || undecided => {
                let reason = "the destination did not commit (it ended the attempt)".to_string();
                self.phase = Phase::Aborted(reason.clone());
                Ok(SourceEvent::Aborted(reason))
            }
            o => Err(violation(format!("the destination answered {o:?} to a resume while {}", self.phase.name()))),
        }
    }

    /// The destination took a post-copy up again: it committed (a resume
    /// after `Commit` finds it in post-copy or nowhere), it is in post-copy's
    /// round, and it holds every disk whole.
    fn on_resumed_postcopy(&mut self, point: &crate::resume::ResumePoint) -> Result<Rewind, ProtocolError> {
        if point.round != self.round || !self.disks_whole(point) {
            return Err(violation(format!(
                "post-copy resumed at round {} (post-copy is round {}) or with a disk incomplete",
                point.round, self.round
            )));
        }
        if let Some(r) = point.received.iter().find(|r| (r.first..r.end()).any(|p| self.space.index(p).is_none())) {
            return Err(violation(format!("resumed with pages {:#x}+{} that are not RAM", r.first, r.count)));
        }
        self.phase = Phase::Postcopy;
        Ok(Rewind { round: point.round, round_was_ended: false, disks: point.disks.clone() })
    }

    /// A message from the destination, on `stream`.
    pub fn on_message(&mut self, stream: Stream, msg: &Message) -> Result<SourceEvent, ProtocolError> {
        check_stream(stream, msg)?;
        // Requests may come as soon as post-copy starts (the request stream
        // opens before the device state goes) and until it completes.
        let postcopy_live = matches!(
            self.phase,
            Phase::Transfer { paused: true }
                | Phase::AwaitReady
                | Phase::ReadyToCommit
                | Phase::CommittedEarly
                | Phase::CommitSent
                | Phase::Postcopy
        );
        match (&self.phase, msg) {
            (_, Message::PageRequest { pages }) if self.postcopy == Postcopy::Started && postcopy_live => {
                if let Some(p) = pages.iter().find(|&&p| self.space.index(p).is_none()) {
                    return Err(violation(format!("a request for page {p:#x}, which is not RAM")));
                }
                Ok(SourceEvent::PagesRequested(pages.clone()))
            }
            (Phase::CommitSent, Message::CommitAck) if self.postcopy == Postcopy::Started => {
                self.phase = Phase::Postcopy;
                Ok(SourceEvent::CommitAcked)
            }
            (Phase::Postcopy, Message::PostcopyComplete(report)) => {
                self.phase = Phase::Done;
                Ok(SourceEvent::PostcopyComplete(report.clone()))
            }
            (Phase::HelloSent { offered }, Message::Accept { features: f, chunking, based }) => {
                if f & !offered != 0 {
                    return Err(violation(format!(
                        "the destination accepted features {f:#x} not offered ({offered:#x})"
                    )));
                }
                chunking.check().map_err(|e| violation(format!("the destination's chunking: {e}")))?;
                self.on_based(*f, based)?;
                (self.features, self.chunking) = (*f, *chunking);
                self.phase = Phase::Transfer { paused: false };
                Ok(SourceEvent::Accepted { features: *f, chunking: *chunking, based: based.clone() })
            }
            (Phase::HelloSent { .. }, Message::Refuse { reason }) => {
                self.phase = Phase::Aborted(format!("refused: {reason}"));
                Ok(SourceEvent::Refused(reason.clone()))
            }
            (Phase::Transfer { .. } | Phase::AwaitReady | Phase::CommittedEarly, Message::RoundApplied { round }) => {
                match self.unapplied.front() {
                    Some(r) if r == round => {
                        self.unapplied.pop_front();
                        Ok(SourceEvent::RoundApplied(*round))
                    }
                    due => Err(violation(format!("RoundApplied for round {round} while {due:?} was due"))),
                }
            }
            (Phase::Transfer { .. }, Message::DiskNeed(n)) => self.on_need(n.disk, n.seq, &n.chunks),
            (Phase::AwaitReady | Phase::CommittedEarly, Message::Ready) => {
                if !self.unapplied.is_empty() {
                    return Err(violation(format!("Ready before rounds {:?} were applied", self.unapplied)));
                }
                self.phase = match self.phase {
                    Phase::CommittedEarly => Phase::CommitSent,
                    _ => Phase::ReadyToCommit,
                };
                Ok(SourceEvent::Ready)
            }
            (Phase::CommitSent, Message::CommitAck) => {
                self.phase = Phase::Done;
                Ok(SourceEvent::CommitAcked)
            }
            // An early commit is the destination's to decide: its Abort
            // (journalled there first) means it never commits.
            (
                Phase::HelloSent { .. }
                | Phase::Transfer { .. }
                | Phase::AwaitReady
                | Phase::ReadyToCommit
                | Phase::CommittedEarly,
                Message::Abort { reason },
            ) => {
                self.phase = Phase::Aborted(format!("destination aborted: {reason}"));
                Ok(SourceEvent::Aborted(reason.clone()))
            }
            (_, m) => Err(self.unexpected(m.name())),
        }
    }

    /// The disks the destination starts from their bases: only ones offered
    /// one, and then whole from the start.
    fn on_based(&mut self, features: u64, based: &[bool]) -> Result<(), ProtocolError> {
        if features & features::DISK_BASE == 0 {
            return Ok(());
        }
        if based.len() != self.disks.len() || features & features::DISK_COPY == 0 {
            return Err(violation(format!("{} based flags for {} copied disks", based.len(), self.disks.len())));
        }
        for (i, (d, &b)) in self.disks.iter_mut().zip(based).enumerate() {
            if b && d.offered_base.is_none() {
                return Err(violation(format!("disk {i} started from a base the source did not offer")));
            }
            d.based = b;
        }
        Ok(())
    }

    fn on_need(&mut self, disk: u8, seq: u32, chunks: &[u32]) -> Result<SourceEvent, ProtocolError> {
        let Some(p) = self.pending.front() else {
            return Err(violation(format!("an answer to manifest {disk}/{seq}, which was never sent")));
        };
        if (p.disk, p.seq) != (disk, seq) {
            return Err(violation(format!("the answer to manifest {disk}/{seq} while {}/{} was due", p.disk, p.seq)));
        }
        // Indices arrive strictly ascending (the codec's gaps); each must name
        // a chunk of the part that has an id.
        if let Some(&bad) = chunks.iter().find(|&&i| !p.has_id.get(i as usize).copied().unwrap_or(false)) {
            return Err(violation(format!("manifest {disk}/{seq} has no chunk {bad} with data to send")));
        }
        self.pending.pop_front();
        Ok(SourceEvent::Need { disk, seq, chunks: chunks.to_vec() })
    }

    /// Features agreed (0 before the destination accepted).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The chunking agreed (the proposal until the destination answered).
    pub fn chunking(&self) -> ChunkParams {
        self.chunking
    }

    /// Per disk, whether the destination starts it from the base offered
    /// (all false when none does).
    pub fn based(&self) -> Vec<bool> {
        self.disks.iter().map(|d| d.based).collect()
    }

    /// The migration's id.
    pub fn id(&self) -> MigrationId {
        self.id
    }

    /// The round pages and disk data belong to now.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Rounds ended and not yet applied by the destination.
    pub fn unapplied_rounds(&self) -> usize {
        self.unapplied.len()
    }

    /// Manifest parts not yet answered.
    pub fn unanswered_manifests(&self) -> usize {
        self.pending.len()
    }

    fn in_transfer(&self, what: &'static str) -> Result<bool, ProtocolError> {
        match self.phase {
            Phase::Transfer { paused } => Ok(paused),
            _ => Err(self.unexpected(what)),
        }
    }

    /// A manifest part of the first copy (before the pause).
    pub fn manifest(
        &mut self,
        disk: u8,
        seq: u32,
        offset: u64,
        chunks: &[(u32, Option<ChunkId>)],
    ) -> Result<Message, ProtocolError> {
        if self.in_transfer("DiskManifest")? || self.features & features::DISK_COPY == 0 {
            return Err(self.unexpected("DiskManifest"));
        }
        let d = self.disks.get_mut(disk as usize).ok_or_else(|| violation(format!("no disk {disk}")))?;
        let len: u64 = chunks.iter().map(|(l, _)| u64::from(*l)).sum();
        let in_place = if d.based { offset >= d.next_offset } else { offset == d.next_offset };
        if d.done || seq != d.next_seq || !in_place || offset.checked_add(len).is_none_or(|e| e > d.size) {
            return Err(violation(format!("manifest {disk}/{seq} at {offset} out of place")));
        }
        d.next_seq += 1;
        d.next_offset = offset + len;
        self.pending.push_back(Pending { disk, seq, has_id: chunks.iter().map(|(_, id)| id.is_some()).collect() });
        let chunks = chunks.iter().map(|&(len, id)| crate::disk::ManifestChunk { len, id }).collect();
        Ok(Message::DiskManifest(Manifest { disk, seq, offset, chunks }))
    }

    /// Ends the current round (its pages and disk data are all sent).
    pub fn round_done(&mut self, pages: u64) -> Result<Message, ProtocolError> {
        self.in_transfer("RoundDone")?;
        let round = self.round;
        self.round = round.checked_add(1).ok_or_else(|| violation("rounds are exhausted".into()))?;
        self.unapplied.push_back(round);
        Ok(Message::RoundDone { round, pages })
    }

    /// The guest has been paused to move in post-copy: post-copy was
    /// agreed, and every copied disk's first copy is complete (a disk goes
    /// whole before the guest moves: its last written blocks and digest go
    /// in the switch, as in a stop-and-copy).
    pub fn postcopy_switch(&mut self) -> Result<(), ProtocolError> {
        let copying = self.features & features::DISK_COPY != 0;
        match self.phase {
            Phase::Transfer { paused: false }
                if self.pending.is_empty()
                    && self.features & features::POSTCOPY != 0
                    && self.features & features::SYNC_ONLY == 0 =>
            {
                if let Some(i) = self.disks.iter().position(|d| copying && !d.based && d.next_offset != d.size) {
                    return Err(violation(format!("post-copy before disk {i}'s first copy was complete")));
                }
                self.phase = Phase::Transfer { paused: true };
                self.postcopy = Postcopy::Switching;
                Ok(())
            }
            _ => Err(self.unexpected("post-copy switch")),
        }
    }

    /// The end of the switch (every copied disk closed, the round ended):
    /// the `PostcopyDiscard`s naming `missing` (runs of page frame numbers,
    /// ascending, disjoint, in RAM) and the `PostcopyStart` after them.
    pub fn postcopy_start(&mut self, missing: &[PageRange]) -> Result<Vec<Message>, ProtocolError> {
        if self.postcopy != Postcopy::Switching {
            return Err(self.unexpected("PostcopyStart"));
        }
        let copying = self.features & features::DISK_COPY != 0;
        if let Some(i) = self.disks.iter().position(|d| copying && !d.done) {
            return Err(violation(format!("post-copy starts before disk {i} was closed")));
        }
        let mut next = 0;
        for r in missing {
            if r.count == 0
                || r.first < next
                || self.space.index(r.first).is_none()
                || self.space.index(r.end() - 1).is_none()
            {
                return Err(violation(format!("missing pages {:#x}+{} out of order or not RAM", r.first, r.count)));
            }
            next = r.end();
        }
        let total = missing.iter().map(|r| r.count).sum();
        let mut out: Vec<Message> =
            missing.chunks(MAX_DISCARD_RUNS as usize).map(|c| Message::PostcopyDiscard { pages: c.to_vec() }).collect();
        out.push(Message::PostcopyStart { missing: total });
        self.postcopy = Postcopy::Started;
        Ok(out)
    }

    /// Whether the session is in its stop-and-copy (the guest paused for
    /// it): the pages, the disks' last data and the device state go now.
    pub fn stopped(&self) -> bool {
        self.phase == Phase::Transfer { paused: true }
    }

    /// Whether the guest moves (or moved) in post-copy.
    pub fn is_postcopy(&self) -> bool {
        self.postcopy == Postcopy::Started
    }

    /// The guest has been paused for the final copy.
    pub fn stop_and_copy(&mut self) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Transfer { paused: false } if self.pending.is_empty() => {
                self.phase = Phase::Transfer { paused: true };
                Ok(())
            }
            _ => Err(self.unexpected("stop-and-copy")),
        }
    }

    /// A disk's last word (inside the stop-and-copy, after its last extents).
    pub fn disk_done(&mut self, done: DiskDone) -> Result<Message, ProtocolError> {
        if !self.in_transfer("DiskDone")? {
            return Err(self.unexpected("DiskDone"));
        }
        let d = self.disks.get_mut(done.disk as usize).ok_or_else(|| violation(format!("no disk {}", done.disk)))?;
        if d.done || d.size != done.size || (!d.based && d.next_offset != d.size) {
            return Err(violation(format!("disk {} cannot be closed here", done.disk)));
        }
        d.done = true;
        Ok(Message::DiskDone(done))
    }

    /// Whether data (extents) may still be sent for `disk`.
    pub fn disk_open(&self, disk: u8) -> bool {
        self.disks.get(disk as usize).is_some_and(|d| !d.done)
    }

    /// The `DeviceState` that ends the stop-and-copy: every copied disk
    /// closed first.
    pub fn device_state(&mut self, state: Vec<u8>) -> Result<Message, ProtocolError> {
        if !self.in_transfer("DeviceState")? {
            return Err(self.unexpected("DeviceState"));
        }
        let copying = self.features & features::DISK_COPY != 0;
        if let Some(i) = self.disks.iter().position(|d| copying && !d.done) {
            return Err(violation(format!("device state before disk {i} was closed")));
        }
        if self.postcopy == Postcopy::Switching {
            return Err(violation("device state before PostcopyStart".into()));
        }
        self.phase = Phase::AwaitReady;
        Ok(Message::DeviceState { state })
    }

    /// The commit point: after this the source never runs the guest again
    /// (unless the destination aborts an early commit). After `Ready`; or,
    /// with `EARLY_COMMIT` agreed, right after the device state, leaving
    /// the decision to the destination, which saves the round trip that
    /// waiting for `Ready` costs the guest's downtime.
    pub fn commit(&mut self) -> Result<Message, ProtocolError> {
        self.phase = match self.phase {
            Phase::ReadyToCommit => Phase::CommitSent,
            Phase::AwaitReady if self.features & features::EARLY_COMMIT != 0 => Phase::CommittedEarly,
            _ => return Err(self.unexpected("Commit")),
        };
        Ok(Message::Commit)
    }

    /// Gives up (before commit): the `Abort` to send, if the link still works.
    pub fn abort(&mut self, reason: &str) -> Result<Message, ProtocolError> {
        if self.committed() {
            return Err(self.unexpected("Abort"));
        }
        self.phase = Phase::Aborted(reason.into());
        Ok(Message::Abort { reason: reason.into() })
    }

    /// Whether the session ended before the commit, and why.
    pub fn aborted(&self) -> Option<&str> {
        match &self.phase {
            Phase::Aborted(r) => Some(r),
            _ => None,
        }
    }

    /// Whether `Commit` was sent (the source must never run the VM again).
    pub fn committed(&self) -> bool {
        matches!(self.phase, Phase::CommittedEarly | Phase::CommitSent | Phase::Postcopy | Phase::Done)
    }

    /// Whether the destination acknowledged the commit.
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// What any failure in this state means.
    pub fn on_failure(&self) -> FailureOutcome {
        match self.phase {
            Phase::CommittedEarly | Phase::CommitSent => FailureOutcome::InDoubt,
            Phase::Postcopy => FailureOutcome::Postcopy,
            Phase::Done => FailureOutcome::Done,
            _ => FailureOutcome::ResumeSource,
        }
    }

    /// A name for the current state, for messages.
    pub fn state_name(&self) -> &'static str {
        self.phase.name()
    }
}
