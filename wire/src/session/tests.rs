//! The session machines driven against each other in memory: a whole
//! migration with the link failing after every message, and what each side
//! refuses from a hostile peer.

use wanmig_types::{ChunkId, MigrationId, features};

use super::*;
use crate::disk::{Chunk, ChunkParams, DiskDone, DiskWrites, Need};
use crate::message::{DiskInfo, Message, PROTOCOL_VERSION, PageData, PageRef, PagesBuilder, VmShape};
use crate::tests::samples;

const DISK: u64 = 1 << 20;

fn shape() -> VmShape {
    VmShape {
        name: "vm".into(),
        memory: vec![(0, 16 << 20)],
        vcpus: 1,
        disks: vec![DiskInfo { size: DISK, path: "d.img".into(), read_only: false }],
        nics: Vec::new(),
    }
}

fn pages(round: u32, n: u64) -> Message {
    let mut b = PagesBuilder::new(round);
    for i in 0..n {
        b.push(PageRef { gpa: i * 4096, data: PageData::Zero });
    }
    Message::Pages(b.finish())
}

/// One message on its way, or the source pausing.
enum Step {
    ToDst(Message),
    ToSrc(Message),
}

/// Drives both machines through a whole migration with disks, the link
/// failing before message `fail_at` crosses; with `early`, the source
/// commits right behind the device state. Returns what the failure means
/// for the source and whether the destination owns the VM.
fn run(fail_at: usize, early: bool) -> (FailureOutcome, bool, usize) {
    let (src, dst, crossed) = drive(fail_at, early);
    (src.on_failure(), dst.owns_vm(), crossed)
}

/// [`run`], returning both machines as the cut left them.
fn drive(fail_at: usize, early: bool) -> (SourceSession, DestSession, usize) {
    let mut src = SourceSession::new();
    let mut dst = DestSession::new();
    let mut crossed = 0usize;
    // Each message crosses if the link still works; the receiving side's
    // answer is computed as its driver would.
    let mut step = |src: &mut SourceSession, dst: &mut DestSession, s: Step| -> bool {
        if crossed == fail_at {
            return false;
        }
        crossed += 1;
        match s {
            Step::ToDst(m) => {
                let stream = stream_of(&m).expect("a migration message");
                dst.on_message(stream, &m).expect("valid for the destination");
            }
            Step::ToSrc(m) => {
                src.on_message(Stream::Control, &m).expect("valid for the source");
            }
        }
        true
    };
    macro_rules! cross {
        ($s:expr) => {
            let s = $s;
            if !step(&mut src, &mut dst, s) {
                return (src, dst, crossed);
            }
        };
    }
    // Chunks of up to half the test disk.
    let params = ChunkParams { max: (DISK / 2) as u32, ..ChunkParams::DEFAULT };
    let hello = src
        .hello(MigrationId([1; 16]), shape(), features::ALL & !features::SYNC_ONLY, params, [7; 32], Vec::new())
        .expect("hello");
    cross!(Step::ToDst(hello));
    let accept = dst.accept(features::ALL, params, &[]).expect("accept");
    cross!(Step::ToSrc(accept));
    // The first copy: two chunks cover the disk; the destination has the first.
    let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
    let half = (DISK / 2) as u32;
    let m = src.manifest(0, 0, 0, &[(half, Some(a)), (half, Some(b))]).expect("manifest");
    cross!(Step::ToDst(m));
    let need = dst.need(0, vec![1]).expect("need");
    cross!(Step::ToSrc(need));
    cross!(Step::ToDst(Message::DiskChunk(Chunk {
        disk: 0,
        offset: u64::from(half),
        id: b,
        data: vec![1; half as usize]
    })));
    // A round of memory.
    cross!(Step::ToDst(pages(src.round(), 3)));
    let done = src.round_done(3).expect("round done");
    cross!(Step::ToDst(done));
    cross!(Step::ToSrc(Message::RoundApplied { round: 0 }));
    // Stop-and-copy.
    src.stop_and_copy().expect("pause");
    cross!(Step::ToDst(pages(src.round(), 2)));
    cross!(Step::ToDst(Message::DiskWrites(DiskWrites { disk: 0, extents: vec![(4096, 4096)], data: vec![9; 4096] })));
    let dd = src.disk_done(DiskDone { disk: 0, size: DISK, digest: [0; 32] }).expect("disk done");
    cross!(Step::ToDst(dd));
    let last = src.round_done(2).expect("last round");
    cross!(Step::ToDst(last));
    dst.on_bulk_end().expect("bulk ends");
    let state = src.device_state(vec![1, 2, 3]).expect("state");
    if early {
        // The Commit travels behind the state; the destination's driver
        // reads it only once it is ready itself.
        let commit = src.commit().expect("early commit");
        cross!(Step::ToDst(state));
        let ready = dst.ready().expect("ready");
        cross!(Step::ToDst(commit));
        cross!(Step::ToSrc(Message::RoundApplied { round: 1 }));
        cross!(Step::ToSrc(ready));
    } else {
        cross!(Step::ToDst(state));
        cross!(Step::ToSrc(Message::RoundApplied { round: 1 }));
        let ready = dst.ready().expect("ready");
        cross!(Step::ToSrc(ready));
        let commit = src.commit().expect("commit");
        cross!(Step::ToDst(commit));
    }
    cross!(Step::ToSrc(Message::CommitAck));
    (src, dst, crossed)
}

#[test]
fn exactly_one_side_runs_the_vm_whatever_fails() {
    for early in [false, true] {
        one_side_runs_the_vm(early);
    }
}

fn one_side_runs_the_vm(early: bool) {
    let (_, _, total) = run(usize::MAX, early);
    assert_eq!(total, 17, "the whole exchange");
    let mut outcomes = Vec::new();
    for fail_at in 0..=total {
        let (src, dst_owns, _) = run(fail_at, early);
        match src {
            // Before commit: the source resumes and the destination must not run it.
            FailureOutcome::ResumeSource => assert!(!dst_owns, "both run the VM (fail at {fail_at})"),
            // Commit sent, ack lost: the source stays paused; the destination may run it.
            FailureOutcome::InDoubt => {}
            FailureOutcome::Done | FailureOutcome::Postcopy => {
                assert!(dst_owns, "nobody runs the VM (fail at {fail_at})")
            }
        }
        outcomes.push(src);
    }
    assert!(outcomes.contains(&FailureOutcome::ResumeSource));
    assert!(outcomes.contains(&FailureOutcome::InDoubt));
    assert_eq!(outcomes.last(), Some(&FailureOutcome::Done));
}

/// How a cut after the commit was resolved by resuming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    /// No cut, or one before the commit (the source runs the guest on).
    NoDoubt,
    /// The destination's journal said committed.
    Committed,
    /// The destination's journal said not committed (it ended the attempt).
    NotCommitted,
    /// The destination had parked before deciding: the stop-and-copy went
    /// again and the early commit after it.
    TakenUpAgain,
}

/// After the cut `drive` left, the source resumes as its driver does when
/// `SETTLE_ON_RESUME` is agreed and its commit is out: the destination
/// takes the session up if it parked before `Ready` (its driver parks in
/// `Receiving` and `HaveState`), or answers from its journal: committed
/// when it owns the VM, else not (its driver ended the attempt). Returns
/// whether the source runs the guest, whether the destination owns it, and
/// how it was decided.
fn resume_after_cut(mut src: SourceSession, mut dst: DestSession) -> (bool, bool, Resolved) {
    let id = src.id();
    if src.on_failure() != FailureOutcome::InDoubt {
        return (src.on_failure() == FailureOutcome::ResumeSource, dst.owns_vm(), Resolved::NoDoubt);
    }
    assert_eq!(src.resume_request(), Some(Message::Resume { migration_id: id, secret: [7; 32] }));
    let how = if dst.owns_vm() {
        assert_eq!(src.on_settled(id, Settlement::Committed), Ok(SourceEvent::CommitAcked));
        Resolved::Committed
    } else if !dst.can_resume() {
        dst.abort("the link went while deciding").expect("not committed");
        assert!(matches!(src.on_settled(id, Settlement::NotCommitted), Ok(SourceEvent::Aborted(_))));
        Resolved::NotCommitted
    } else {
        let point = dst.resume(Vec::new()).expect("parked before deciding");
        src.on_resumed(&point).expect("an early commit taken up again");
        assert!(src.stopped() && !src.committed(), "back inside the stop-and-copy, before the commit");
        assert_eq!(src.on_failure(), FailureOutcome::ResumeSource, "nothing is committed there now");
        assert!(src.manifest(0, 9, 0, &[]).is_err() && src.stop_and_copy().is_err(), "the guest stays paused");
        recopy_and_commit(&mut src, &mut dst);
        Resolved::TakenUpAgain
    };
    (src.on_failure() == FailureOutcome::ResumeSource, dst.owns_vm(), how)
}

/// The stop-and-copy sent again over the new connection (the round's
/// pages, the disk closed, the round ended, the state), the early commit
/// behind it, and the destination's answers: the migration ends.
fn recopy_and_commit(src: &mut SourceSession, dst: &mut DestSession) {
    let to_dst = |dst: &mut DestSession, m: &Message| {
        dst.on_message(stream_of(m).expect("a migration message"), m).expect("valid for the destination")
    };
    let round = src.round();
    to_dst(dst, &pages(round, 2));
    to_dst(dst, &src.disk_done(DiskDone { disk: 0, size: DISK, digest: [0; 32] }).expect("disk closed again"));
    to_dst(dst, &src.round_done(2).expect("round ended again"));
    dst.on_bulk_end().expect("bulk ends");
    to_dst(dst, &src.device_state(vec![1, 2, 3]).expect("state again"));
    let commit = src.commit().expect("committed early again");
    let ready = dst.ready().expect("ready");
    assert_eq!(to_dst(dst, &commit), DestAction::Commit);
    for m in [Message::RoundApplied { round }, ready, Message::CommitAck] {
        src.on_message(Stream::Control, &m).expect("valid for the source");
    }
    assert!(src.done());
}

#[test]
fn a_cut_after_the_commit_is_resumed_to_exactly_one_owner() {
    for early in [false, true] {
        let (_, _, total) = drive(usize::MAX, early);
        let mut seen = Vec::new();
        for fail_at in 0..=total {
            let (src, dst, _) = drive(fail_at, early);
            let (source_runs, dest_owns, how) = resume_after_cut(src, dst);
            assert!(source_runs != dest_owns, "fail at {fail_at} (early: {early}): {how:?}");
            seen.push(how);
        }
        assert!(seen.contains(&Resolved::Committed) && seen.contains(&Resolved::NotCommitted), "{seen:?}");
        assert_eq!(seen.contains(&Resolved::TakenUpAgain), early, "only an early commit is taken up: {seen:?}");
    }
}

#[test]
fn a_resume_after_the_commit_is_answered_by_the_decision_only() {
    let id = MigrationId([3; 16]);
    // Without SETTLE_ON_RESUME, a commit in doubt waits for `wanmig settle`.
    let mut src = state_sent(features::ALL & !features::SYNC_ONLY & !features::SETTLE_ON_RESUME);
    src.commit().expect("early commit");
    assert!(src.resume_request().is_none());
    assert!(src.on_settled(id, Settlement::Committed).is_err());
    // With it, only the decision about this migration settles it.
    let mut src = state_sent(features::ALL & !features::SYNC_ONLY);
    assert!(src.clone().on_settled(id, Settlement::Committed).is_err(), "committed before any Commit");
    src.commit().expect("early commit");
    for (who, said) in [
        (MigrationId([4; 16]), Settlement::Committed),
        (id, Settlement::Unknown),
        (id, Settlement::PostcopyRunning),
        (id, Settlement::PostcopyLost),
    ] {
        let mut s = src.clone();
        assert!(s.on_settled(who, said).is_err(), "{who} {said:?}");
        assert_eq!(s.on_failure(), FailureOutcome::InDoubt, "{said:?} decides nothing");
    }
    // A destination that said Ready has decided: it never takes the session up.
    let mut after_ready = src.clone();
    after_ready.on_message(Stream::Control, &Message::Ready).expect("ready");
    let point = crate::resume::ResumePoint { round: after_ready.round(), received: Vec::new(), disks: Vec::new() };
    assert!(after_ready.clone().on_resumed(&point).is_err());
    assert_eq!(after_ready.on_settled(id, Settlement::Committed), Ok(SourceEvent::CommitAcked));
    assert!(after_ready.done() && after_ready.resume_request().is_none());
}

/// A destination that accepted the VM with every feature and has answered
/// a manifest of the disk's first half asking for its only chunk.
fn receiving() -> DestSession {
    let mut dst = DestSession::new();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        features: features::ALL & !features::SYNC_ONLY & !features::DISK_BASE,
        page_size: 4096,
        migration_id: MigrationId([2; 16]),
        shape: shape(),
        chunking: ChunkParams::DEFAULT,
        resume_secret: [7; 32],
        bases: Vec::new(),
    };
    dst.on_message(Stream::Control, &hello).expect("hello");
    dst.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect("accept");
    let m = crate::disk::Manifest {
        disk: 0,
        seq: 0,
        offset: 0,
        chunks: vec![crate::disk::ManifestChunk { len: 65536, id: Some(ChunkId([5; 32])) }],
    };
    assert_eq!(dst.on_message(Stream::Control, &Message::DiskManifest(m)), Ok(DestAction::AnswerManifest));
    dst.need(0, vec![0]).expect("need");
    dst
}

/// A source at the end of its stop-and-copy, its device state sent, having
/// agreed `features` with the destination.
fn state_sent(features: u64) -> SourceSession {
    let mut src = SourceSession::new();
    let shape = VmShape { disks: Vec::new(), ..shape() };
    src.hello(MigrationId([3; 16]), shape, features, ChunkParams::DEFAULT, [7; 32], Vec::new()).expect("hello");
    let features = features & !features::DISK_BASE;
    let accept = Message::Accept { features, chunking: ChunkParams::DEFAULT, based: Vec::new() };
    src.on_message(Stream::Control, &accept).expect("accept");
    src.stop_and_copy().expect("pause");
    src.device_state(Vec::new()).expect("state");
    src
}

#[test]
fn an_early_commit_is_the_destinations_to_decide() {
    // Not agreed: Commit only after Ready.
    let mut src = state_sent(features::ALL & !features::EARLY_COMMIT);
    assert!(src.commit().is_err(), "a commit before Ready without EARLY_COMMIT");
    // Agreed: the source commits at once and is in doubt until it hears.
    let mut src = state_sent(features::ALL & !features::SYNC_ONLY);
    src.commit().expect("early commit");
    assert!(src.committed());
    assert_eq!(src.on_failure(), FailureOutcome::InDoubt);
    assert!(src.abort("too late").is_err(), "no abort after a commit");
    assert!(src.resume_request().is_some(), "resumed to hear the decision (SETTLE_ON_RESUME)");
    assert!(src.on_message(Stream::Control, &Message::CommitAck).is_err(), "an ack before Ready");
    // The destination aborts: it never commits, and the guest is ours again.
    let mut aborted = src.clone();
    let abort = Message::Abort { reason: "disk 0 does not match".into() };
    assert!(matches!(aborted.on_message(Stream::Control, &abort), Ok(SourceEvent::Aborted(_))));
    assert_eq!(aborted.on_failure(), FailureOutcome::ResumeSource);
    // Or it is ready and runs the guest.
    assert_eq!(src.on_message(Stream::Control, &Message::Ready), Ok(SourceEvent::Ready));
    assert_eq!(src.on_failure(), FailureOutcome::InDoubt);
    assert!(src.on_message(Stream::Control, &abort).is_err(), "an abort after Ready");
    assert_eq!(src.on_message(Stream::Control, &Message::CommitAck), Ok(SourceEvent::CommitAcked));
    assert_eq!(src.on_failure(), FailureOutcome::Done);
}

#[test]
fn the_destination_takes_only_what_it_asked_for_where_it_belongs() {
    let chunk = |id: u8, offset: u64, len: usize| {
        Message::DiskChunk(Chunk { disk: 0, offset, id: ChunkId([id; 32]), data: vec![0; len] })
    };
    let refused = |m: Message, why: &str| {
        let mut d = receiving();
        assert!(d.on_message(Stream::Bulk, &m).is_err(), "{why}");
    };
    refused(chunk(6, 0, 65536), "a chunk nobody asked for");
    refused(chunk(5, 4096, 65536), "the asked-for id at another offset");
    refused(chunk(5, 0, 4096), "the asked-for id with another length");
    let mut d = receiving();
    assert_eq!(d.on_message(Stream::Bulk, &chunk(5, 0, 65536)), Ok(DestAction::StoreChunk));
    assert!(d.on_message(Stream::Bulk, &chunk(5, 0, 65536)).is_err(), "the same chunk twice");
    // On the control stream, bulk data is refused whatever it is.
    let mut d = receiving();
    assert!(matches!(d.on_message(Stream::Control, &chunk(5, 0, 65536)), Err(ProtocolError::WrongStream { .. })));
    // Pages of another round, or a round ending with the wrong count.
    let mut d = receiving();
    assert!(d.on_message(Stream::Bulk, &pages(1, 1)).is_err());
    let mut d = receiving();
    d.on_message(Stream::Bulk, &pages(0, 2)).expect("pages");
    assert!(d.on_message(Stream::Bulk, &Message::RoundDone { round: 0, pages: 3 }).is_err());
    // A manifest out of place, or past the disk's end.
    let mut d = receiving();
    let late = crate::disk::Manifest { disk: 0, seq: 5, offset: 65536, chunks: Vec::new() };
    assert!(d.on_message(Stream::Control, &Message::DiskManifest(late)).is_err());
    let mut d = receiving();
    let past = crate::disk::Manifest {
        disk: 0,
        seq: 1,
        offset: 65536,
        chunks: vec![crate::disk::ManifestChunk { len: DISK as u32, id: None }],
    };
    assert!(d.on_message(Stream::Control, &Message::DiskManifest(past)).is_err());
    // Asking for a chunk without data (a hole) is the destination's own bug.
    let mut d = receiving();
    let holes = crate::disk::Manifest {
        disk: 0,
        seq: 1,
        offset: 65536,
        chunks: vec![crate::disk::ManifestChunk { len: 4096, id: None }],
    };
    d.on_message(Stream::Control, &Message::DiskManifest(holes)).expect("manifest");
    assert!(d.need(0, vec![0]).is_err());
}

#[test]
fn nothing_may_change_a_disk_after_its_digest() {
    let mut d = receiving();
    d.on_message(
        Stream::Bulk,
        &Message::DiskChunk(Chunk { disk: 0, offset: 0, id: ChunkId([5; 32]), data: vec![0; 65536] }),
    )
    .expect("chunk");
    let rest = crate::disk::Manifest {
        disk: 0,
        seq: 1,
        offset: 65536,
        chunks: vec![crate::disk::ManifestChunk { len: (DISK - 65536) as u32, id: None }],
    };
    d.on_message(Stream::Control, &Message::DiskManifest(rest)).expect("manifest");
    d.need(0, Vec::new()).expect("nothing needed");
    let done = Message::DiskDone(DiskDone { disk: 0, size: DISK, digest: [0; 32] });
    assert_eq!(d.on_message(Stream::Bulk, &done), Ok(DestAction::CheckDisk));
    let writes = Message::DiskWrites(DiskWrites { disk: 0, extents: vec![(0, 4096)], data: vec![1; 4096] });
    assert!(d.on_message(Stream::Bulk, &writes).is_err(), "extents after DiskDone");
    assert!(d.on_message(Stream::Bulk, &done).is_err(), "a second DiskDone");
}

#[test]
fn a_disk_closed_early_or_a_ready_too_soon_is_refused() {
    let mut d = receiving();
    let done = Message::DiskDone(DiskDone { disk: 0, size: DISK, digest: [0; 32] });
    assert!(d.on_message(Stream::Bulk, &done).is_err(), "the chunk asked for never came");
    let mut d = receiving();
    assert!(d.ready().is_err(), "no device state yet");
    d.on_message(Stream::Control, &Message::DeviceState { state: vec![1] }).expect("state");
    assert!(d.ready().is_err(), "the bulk stream has not ended");
    d.on_bulk_end().expect("end");
    assert!(d.ready().is_err(), "the disk was never completed");
}

#[test]
fn the_source_checks_every_answer_against_what_it_sent() {
    let mut src = SourceSession::new();
    src.hello(
        MigrationId([1; 16]),
        shape(),
        features::ZSTD | features::DISK_COPY,
        ChunkParams::DEFAULT,
        [7; 32],
        Vec::new(),
    )
    .expect("hello");
    // Features never offered.
    let mut s = src.clone();
    assert!(
        s.on_message(
            Stream::Control,
            &Message::Accept { features: features::TUNNEL, chunking: ChunkParams::DEFAULT, based: Vec::new() }
        )
        .is_err()
    );
    src.on_message(
        Stream::Control,
        &Message::Accept { features: features::DISK_COPY, chunking: ChunkParams::DEFAULT, based: Vec::new() },
    )
    .expect("accept");
    let (a, b) = (Some(ChunkId([1; 32])), None);
    src.manifest(0, 0, 0, &[(4096, a), (4096, b)]).expect("manifest");
    let need = |disk, seq, chunks: Vec<u32>| Message::DiskNeed(Need { disk, seq, chunks });
    for (bad, why) in
        [(need(0, 1, vec![0]), "another part"), (need(0, 0, vec![1]), "a hole"), (need(0, 0, vec![2]), "past the part")]
    {
        assert!(src.clone().on_message(Stream::Control, &bad).is_err(), "{why}");
    }
    assert!(src.clone().on_message(Stream::Control, &Message::RoundApplied { round: 0 }).is_err(), "no round ended");
    assert_eq!(
        src.on_message(Stream::Control, &need(0, 0, vec![0])),
        Ok(SourceEvent::Need { disk: 0, seq: 0, chunks: vec![0] })
    );
    assert!(src.on_message(Stream::Control, &need(0, 0, vec![0])).is_err(), "answered twice");
    assert!(src.commit().is_err(), "commit before Ready");
    assert!(src.device_state(Vec::new()).is_err(), "state before the pause");
    src.stop_and_copy().expect("pause");
    assert!(src.device_state(Vec::new()).is_err(), "state before the disk is closed");
    assert!(
        src.disk_done(DiskDone { disk: 0, size: DISK, digest: [0; 32] }).is_err(),
        "the first copy never reached the end"
    );
}

#[test]
fn messages_out_of_order_are_errors_and_abort_works_until_the_commit() {
    for m in samples() {
        let mut d = DestSession::new();
        let ok = match stream_of(&m) {
            Some(s) => d.on_message(s, &m).is_ok(),
            None => d.on_message(Stream::Control, &m).is_ok(),
        };
        let allowed = matches!(m, Message::Abort { .. })
            || (matches!(m, Message::Hello { version, .. } if version == PROTOCOL_VERSION));
        assert_eq!(ok, allowed, "{}", m.name());
    }
    let mut d = receiving();
    for m in [Message::Commit, Message::Ready, crate::tests::hello(PROTOCOL_VERSION)] {
        assert!(d.clone().on_message(Stream::Control, &m).is_err(), "{}", m.name());
    }
    assert_eq!(d.on_message(Stream::Control, &Message::Abort { reason: "x".into() }), Ok(DestAction::Aborted));
    // Another protocol version or page size never gets past the hello.
    for v in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        assert!(DestSession::new().on_message(Stream::Control, &crate::tests::hello(v)).is_err());
    }
    let mut src = SourceSession::new();
    assert!(src.on_message(Stream::Control, &Message::CommitAck).is_err());
    src.hello(MigrationId([1; 16]), shape(), 0, ChunkParams::DEFAULT, [7; 32], Vec::new()).expect("hello");
    src.on_message(
        Stream::Control,
        &Message::Accept { features: 0, chunking: ChunkParams::DEFAULT, based: Vec::new() },
    )
    .expect("accept");
    src.stop_and_copy().expect("pause");
    src.device_state(Vec::new()).expect("state");
    src.on_message(Stream::Control, &Message::Ready).expect("ready");
    src.commit().expect("commit");
    assert!(src.abort("late").is_err(), "no abort after commit");
    assert_eq!(src.on_failure(), FailureOutcome::InDoubt);
}

#[test]
fn a_sync_carries_no_pages_and_no_state() {
    let mut d = DestSession::new();
    let mut hello = crate::tests::hello(PROTOCOL_VERSION);
    if let Message::Hello { features: f, .. } = &mut hello {
        *f = features::SYNC_ONLY | features::DISK_COPY;
    }
    d.on_message(Stream::Control, &hello).expect("hello");
    d.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect("accept");
    assert!(d.clone().on_message(Stream::Bulk, &pages(0, 1)).is_err());
    assert!(d.on_message(Stream::Control, &Message::DeviceState { state: vec![1] }).is_err());
}

#[test]
fn a_resume_point_is_checked_against_what_was_sent() {
    use crate::resume::{DiskPoint, ResumePoint};
    let mut src = SourceSession::new();
    src.hello(
        MigrationId([1; 16]),
        shape(),
        features::DISK_COPY | features::RESUME,
        ChunkParams::DEFAULT,
        [7; 32],
        Vec::new(),
    )
    .expect("hello");
    assert!(src.resume_request().is_none(), "nothing to resume before the destination accepted");
    src.on_message(
        Stream::Control,
        &Message::Accept {
            features: features::DISK_COPY | features::RESUME,
            chunking: ChunkParams::DEFAULT,
            based: Vec::new(),
        },
    )
    .expect("accept");
    let id = ChunkId([1; 32]);
    src.manifest(0, 0, 0, &[(4096, Some(id))]).expect("manifest");
    src.on_message(Stream::Control, &Message::DiskNeed(Need { disk: 0, seq: 0, chunks: vec![0] })).expect("need");
    src.manifest(0, 1, 4096, &[(4096, Some(id))]).expect("manifest");
    src.round_done(0).expect("round 0 ended");
    let point = |round, seq, offset| ResumePoint {
        round,
        received: Vec::new(),
        disks: vec![DiskPoint { next_seq: seq, next_offset: offset }],
    };
    for (bad, why) in [
        (point(2, 1, 4096), "a round never sent"),
        (point(1, 3, 12288), "a part never sent"),
        (point(0, 1, 0), "a part without its offset"),
    ] {
        assert!(src.clone().on_resumed(&bad).is_err(), "{why}");
    }
    assert_eq!(src.resume_request(), Some(Message::Resume { migration_id: MigrationId([1; 16]), secret: [7; 32] }));
    let rewind = src.on_resumed(&point(0, 1, 4096)).expect("a point within what was sent");
    assert_eq!((rewind.round, rewind.round_was_ended), (0, true));
    assert_eq!(src.round(), 0);
    // The second part goes again, under its number.
    src.manifest(0, 1, 4096, &[(4096, Some(id))]).expect("re-sent");
    // After the commit there is nothing to resume.
    let mut late = SourceSession::new();
    late.hello(MigrationId([1; 16]), shape(), features::RESUME, ChunkParams::DEFAULT, [7; 32], Vec::new())
        .expect("hello");
    late.on_message(
        Stream::Control,
        &Message::Accept { features: features::RESUME, chunking: ChunkParams::DEFAULT, based: Vec::new() },
    )
    .expect("accept");
    late.stop_and_copy().expect("pause");
    late.device_state(Vec::new()).expect("state");
    late.on_message(Stream::Control, &Message::Ready).expect("ready");
    late.commit().expect("commit");
    assert!(late.resume_request().is_none());
}

#[test]
fn chunks_are_held_to_the_agreed_size_and_the_migrations_quota() {
    let mut d = receiving();
    assert_eq!(d.chunk_quota(), DISK, "the quota is the declared disk sizes");
    d.on_message(
        Stream::Bulk,
        &Message::DiskChunk(Chunk { disk: 0, offset: 0, id: ChunkId([5; 32]), data: vec![0; 65536] }),
    )
    .expect("chunk");
    assert_eq!(d.chunk_bytes(), 65536);
    // A chunk with data longer than the agreed maximum (256 KiB), or of no
    // length at all, is refused with its manifest.
    for len in [ChunkParams::DEFAULT.max + 1, 0] {
        let mut d = receiving();
        d.on_message(
            Stream::Bulk,
            &Message::DiskChunk(Chunk { disk: 0, offset: 0, id: ChunkId([5; 32]), data: vec![0; 65536] }),
        )
        .expect("chunk");
        let big = crate::disk::Manifest {
            disk: 0,
            seq: 1,
            offset: 65536,
            chunks: vec![crate::disk::ManifestChunk { len, id: Some(ChunkId([6; 32])) }],
        };
        let e = d.on_message(Stream::Control, &Message::DiskManifest(big)).expect_err("too long");
        assert!(e.to_string().contains("agreed: at most"), "{e}");
    }
}

#[test]
fn a_destination_resumes_from_what_it_holds() {
    let mut d = receiving();
    d.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect_err("accepted already");
    let mut d2 = DestSession::new();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        features: features::DISK_COPY | features::RESUME | features::ZSTD,
        page_size: 4096,
        migration_id: MigrationId([2; 16]),
        shape: shape(),
        chunking: ChunkParams::DEFAULT,
        resume_secret: [9; 32],
        bases: Vec::new(),
    };
    d2.on_message(Stream::Control, &hello).expect("hello");
    d2.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect("accept");
    assert!(d2.is_secret(&[9; 32]) && !d2.is_secret(&[8; 32]));
    let part = |seq, offset, id: u8| crate::disk::Manifest {
        disk: 0,
        seq,
        offset,
        chunks: vec![crate::disk::ManifestChunk { len: 65536, id: Some(ChunkId([id; 32])) }],
    };
    // Part 0 complete, part 1 asked for and not arrived, part 2 unanswered.
    d2.on_message(Stream::Control, &Message::DiskManifest(part(0, 0, 1))).expect("part 0");
    d2.need(0, vec![0]).expect("need 0");
    let chunk =
        |offset, id: u8| Message::DiskChunk(Chunk { disk: 0, offset, id: ChunkId([id; 32]), data: vec![0; 65536] });
    d2.on_message(Stream::Bulk, &chunk(0, 1)).expect("chunk 0");
    d2.on_message(Stream::Control, &Message::DiskManifest(part(1, 65536, 2))).expect("part 1");
    d2.need(0, vec![0]).expect("need 1");
    d2.on_message(Stream::Control, &Message::DiskManifest(part(2, 131072, 3))).expect("part 2");
    d2.on_message(Stream::Bulk, &pages(0, 2)).expect("pages");
    let received = vec![wanmig_types::PageRange { first: 0, count: 2 }];
    let point = d2.resume(received.clone()).expect("resume");
    assert_eq!(point.round, 0);
    assert_eq!(point.received, received);
    assert_eq!(point.disks, vec![crate::resume::DiskPoint { next_seq: 1, next_offset: 65536 }]);
    // The source goes on from there: part 1 again, round 0's pages again.
    assert!(d2.on_message(Stream::Bulk, &chunk(65536, 2)).is_err(), "nothing is asked for any more");
    d2.on_message(Stream::Control, &Message::DiskManifest(part(1, 65536, 2))).expect("part 1 again");
    d2.need(0, Vec::new()).expect("it came from the store meanwhile");
    d2.on_message(Stream::Bulk, &pages(0, 3)).expect("pages again");
    d2.on_message(Stream::Bulk, &Message::RoundDone { round: 0, pages: 3 }).expect("the round's count starts over");
    // Not once the device state was taken up and Ready sent.
    let mut late = d2.clone();
    late.on_message(Stream::Control, &Message::DeviceState { state: vec![1] }).expect("state");
    assert!(late.can_resume(), "a device state that came is sent again");
    // Without RESUME agreed there is nothing to take up.
    let mut no = DestSession::new();
    let mut hello = crate::tests::hello(PROTOCOL_VERSION);
    if let Message::Hello { features: f, .. } = &mut hello {
        *f = features::DISK_COPY;
    }
    no.on_message(Stream::Control, &hello).expect("hello");
    no.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect("accept");
    assert!(!no.can_resume() && no.resume(Vec::new()).is_err());
}

/// Two disks, the source offering a base for the first only.
fn two_disks() -> VmShape {
    let d = |p: &str| DiskInfo { size: DISK, path: p.into(), read_only: false };
    VmShape { disks: vec![d("a.img"), d("b.img")], ..shape() }
}

#[test]
fn a_disk_started_from_its_base_gets_only_written_blocks_and_resumes_whole() {
    let offered = features::DISK_COPY | features::DISK_BASE | features::RESUME | features::SYNC_ONLY;
    let base = Some(MigrationId([4; 16]));
    let mut src = SourceSession::new();
    let hello = src
        .hello(MigrationId([5; 16]), two_disks(), offered, ChunkParams::DEFAULT, [7; 32], vec![base, None])
        .expect("hello");
    let mut dst = DestSession::new();
    dst.on_message(Stream::Control, &hello).expect("hello");
    assert!(dst.clone().accept(features::ALL, ChunkParams::DEFAULT, &[true, true]).is_err(), "disk 1 offered none");
    assert!(dst.clone().accept(features::ALL, ChunkParams::DEFAULT, &[true]).is_err(), "one flag per disk");
    let accept = dst.accept(features::ALL, ChunkParams::DEFAULT, &[true, false]).expect("accept");
    assert!(matches!(&accept, Message::Accept { based, .. } if based == &[true, false]));
    assert_eq!(
        src.clone().on_message(Stream::Control, &accept),
        Ok(SourceEvent::Accepted { features: offered, chunking: ChunkParams::DEFAULT, based: vec![true, false] })
    );
    // A source that never offered a base for disk 1 refuses to have it based.
    let forged = Message::Accept { features: offered, chunking: ChunkParams::DEFAULT, based: vec![true, true] };
    assert!(src.clone().on_message(Stream::Control, &forged).is_err());
    src.on_message(Stream::Control, &accept).expect("accept");

    // Disk 0 has no first copy: a part for a run of written blocks may
    // leave a gap, but never goes back; disk 1's first copy has no gaps.
    let run = |seq, offset| crate::disk::Manifest {
        disk: 0,
        seq,
        offset,
        chunks: vec![crate::disk::ManifestChunk { len: 65536, id: Some(ChunkId([1; 32])) }],
    };
    assert!(src.clone().manifest(1, 0, 65536, &[(65536, None)]).is_err(), "disk 1 starts at 0");
    let m0 = src.manifest(0, 0, 131072, &[(65536, Some(ChunkId([1; 32])))]).expect("a run of disk 0");
    assert_eq!(m0, Message::DiskManifest(run(0, 131072)));
    assert!(src.clone().manifest(0, 1, 65536, &[(65536, None)]).is_err(), "never back");
    assert_eq!(dst.on_message(Stream::Control, &m0), Ok(DestAction::AnswerManifest));
    src.on_message(Stream::Control, &dst.need(0, vec![0]).expect("need")).expect("need");
    assert!(dst.clone().on_message(Stream::Control, &Message::DiskManifest(run(1, 0))).is_err(), "never back");
    let m1 = src.manifest(1, 0, 0, &[(DISK as u32, None)]).expect("disk 1's first copy");
    assert_eq!(dst.on_message(Stream::Control, &m1), Ok(DestAction::AnswerManifest));
    src.on_message(Stream::Control, &dst.need(1, Vec::new()).expect("need")).expect("need");
    // Written blocks of the based disk arrive anywhere in it.
    let w = Message::DiskWrites(DiskWrites { disk: 0, extents: vec![(DISK - 4096, 4096)], data: vec![9; 4096] });
    assert_eq!(dst.on_message(Stream::Bulk, &w), Ok(DestAction::WriteExtents));

    // Cut here, disk 0's part asked for and not arrived: it goes again
    // from that part; the copied disk is whole.
    let point = dst.resume(Vec::new()).expect("resume");
    assert_eq!(
        point.disks,
        vec![
            crate::resume::DiskPoint { next_seq: 0, next_offset: 131072 },
            crate::resume::DiskPoint { next_seq: 1, next_offset: DISK },
        ]
    );
    let mut wrong = point.clone();
    wrong.disks[0] = crate::resume::DiskPoint { next_seq: 2, next_offset: 131072 };
    assert!(src.clone().on_resumed(&wrong).is_err(), "a part never sent");
    src.on_resumed(&point).expect("the source agrees");

    // Both disks close with their digests.
    src.stop_and_copy().expect("pause");
    for disk in 0..2 {
        let done = src.disk_done(DiskDone { disk, size: DISK, digest: [disk; 32] }).expect("done");
        assert_eq!(dst.on_message(Stream::Bulk, &done), Ok(DestAction::CheckDisk));
    }
}

#[test]
fn a_base_is_agreed_only_when_some_disk_starts_from_one() {
    let offered = features::DISK_COPY | features::DISK_BASE;
    let mut src = SourceSession::new();
    let none = src.hello(MigrationId([5; 16]), two_disks(), offered, ChunkParams::DEFAULT, [7; 32], vec![None, None]);
    let Ok(Message::Hello { features: f, bases, .. }) = none else { panic!("{none:?}") };
    assert_eq!((f & features::DISK_BASE, bases.len()), (0, 0), "nothing to offer: not offered");
    let mut short = SourceSession::new();
    let hello = short.hello(
        MigrationId([5; 16]),
        two_disks(),
        offered,
        ChunkParams::DEFAULT,
        [7; 32],
        vec![Some(MigrationId([4; 16]))],
    );
    assert!(hello.is_err(), "one base per disk");
    let mut dst = DestSession::new();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        features: offered,
        page_size: 4096,
        migration_id: MigrationId([5; 16]),
        shape: two_disks(),
        chunking: ChunkParams::DEFAULT,
        resume_secret: [7; 32],
        bases: vec![Some(MigrationId([4; 16])), None],
    };
    dst.on_message(Stream::Control, &hello).expect("hello");
    // This host holds no base: the feature is dropped, both disks are copied.
    let accept = dst.accept(features::ALL, ChunkParams::DEFAULT, &[false, false]).expect("accept");
    assert!(
        matches!(accept, Message::Accept { features: f, based, .. } if f & features::DISK_BASE == 0 && based.is_empty())
    );
    let mut bad = DestSession::new();
    let Message::Hello { version, features, page_size, migration_id, shape, chunking, resume_secret, .. } = hello
    else {
        unreachable!("built above")
    };
    let hello = Message::Hello {
        version,
        features,
        page_size,
        migration_id,
        shape,
        chunking,
        resume_secret,
        bases: vec![None],
    };
    assert!(bad.on_message(Stream::Control, &hello).is_err(), "one base per disk");
}
