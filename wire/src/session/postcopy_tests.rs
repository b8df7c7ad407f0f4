//! Post-copy through both machines: a whole migration with the link
//! failing after every message, and what each side refuses.

use wanmig_types::{ChunkId, MigrationId, PageRange, features};

use super::*;
use crate::disk::{Chunk, ChunkParams, DiskDone, DiskWrites};
use crate::message::{DiskInfo, Message, PROTOCOL_VERSION, PageData, PageRef, PagesBuilder, VmShape};
use crate::postcopy::PostcopyReport;

const DISK: u64 = 1 << 20;
/// 16 MiB of RAM: page frames 0..4096.
const PAGES: u64 = 4096;

fn shape() -> VmShape {
    VmShape {
        name: "vm".into(),
        memory: vec![(0, PAGES * 4096)],
        vcpus: 1,
        disks: vec![DiskInfo { size: DISK, path: "d.img".into(), read_only: false }],
        nics: Vec::new(),
    }
}

const ALL: u64 = features::ALL & !features::SYNC_ONLY;

/// Raw pages at these frames, in round `round`.
fn pages_at(round: u32, pfns: &[u64]) -> Message {
    let raw = [3u8; 4096];
    let mut b = PagesBuilder::new(round);
    for &p in pfns {
        b.push(PageRef { gpa: p * 4096, data: PageData::Raw(&raw) });
    }
    Message::Pages(b.finish())
}

/// Both machines agreed (every feature), the disk's first copy done (one
/// chunk of the whole disk, asked for and sent), round 0's pages sent.
fn agreed() -> (SourceSession, DestSession) {
    let mut src = SourceSession::new();
    let mut dst = DestSession::new();
    let params = ChunkParams { max: DISK as u32, ..ChunkParams::DEFAULT };
    let hello = src.hello(MigrationId([1; 16]), shape(), ALL, params, [7; 32], Vec::new()).expect("hello");
    dst.on_message(Stream::Control, &hello).expect("hello");
    let accept = dst.accept(features::ALL, params, &[]).expect("accept");
    src.on_message(Stream::Control, &accept).expect("accept");
    let id = ChunkId([1; 32]);
    let m = src.manifest(0, 0, 0, &[(DISK as u32, Some(id))]).expect("manifest");
    dst.on_message(Stream::Control, &m).expect("manifest");
    let need = dst.need(0, vec![0]).expect("need");
    src.on_message(Stream::Control, &need).expect("need");
    let chunk = Message::DiskChunk(Chunk { disk: 0, offset: 0, id, data: vec![1; DISK as usize] });
    dst.on_message(Stream::Bulk, &chunk).expect("chunk");
    (src, dst)
}

/// The switch at the source, carried to the destination: the disk closed,
/// the round ended, pages 10..20 and 100 missing. Returns the page flow
/// the destination's pump drives.
fn switched(src: &mut SourceSession, dst: &mut DestSession) -> PostcopyPages {
    src.postcopy_switch().expect("switch");
    let w = Message::DiskWrites(DiskWrites { disk: 0, extents: vec![(0, 4096)], data: vec![2; 4096] });
    dst.on_message(Stream::Bulk, &w).expect("writes");
    let done = src.disk_done(DiskDone { disk: 0, size: DISK, digest: [0; 32] }).expect("disk done");
    dst.on_message(Stream::Bulk, &done).expect("disk done");
    let end = src.round_done(0).expect("round ends");
    assert_eq!(dst.on_message(Stream::Bulk, &end), Ok(DestAction::RoundComplete(0)));
    let missing = [PageRange { first: 10, count: 10 }, PageRange { first: 100, count: 1 }];
    let msgs = src.postcopy_start(&missing).expect("start");
    assert_eq!(msgs.last(), Some(&Message::PostcopyStart { missing: 11 }));
    for m in &msgs[..msgs.len() - 1] {
        assert_eq!(dst.on_message(Stream::Bulk, m), Ok(DestAction::Discarded));
    }
    assert_eq!(dst.on_message(Stream::Bulk, msgs.last().expect("start")), Ok(DestAction::StartPostcopy));
    dst.take_postcopy().expect("the page flow")
}

/// One message on its way, or a local step.
enum Step {
    ToDst(Stream, Message),
    ToSrc(Stream, Message),
    Pump(Stream, Message),
}

/// Both machines and the destination's page flow where a run stopped, and
/// how many messages crossed.
type Stopped = (SourceSession, DestSession, PostcopyPages, usize);

/// A whole post-copy, the link failing before message `fail_at` crosses;
/// `early`: the `Commit` goes with the device state (the destination reads
/// it once it is ready, as its driver does).
fn run(fail_at: usize, early: bool) -> Stopped {
    let (mut src, mut dst) = agreed();
    let mut flow = switched(&mut src, &mut dst);
    let round = flow.round();
    let mut crossed = 0;
    let mut step = |src: &mut SourceSession, dst: &mut DestSession, flow: &mut PostcopyPages, s: Step| -> bool {
        if crossed == fail_at {
            return false;
        }
        crossed += 1;
        match s {
            Step::ToDst(stream, m) => {
                dst.on_message(stream, &m).expect("valid for the destination");
            }
            Step::ToSrc(stream, m) => {
                src.on_message(stream, &m).expect("valid for the source");
            }
            Step::Pump(stream, m) => assert_eq!(flow.on_message(stream, &m), Ok(PageAction::Place)),
        }
        true
    };
    macro_rules! cross {
        ($s:expr) => {
            let s = $s;
            if !step(&mut src, &mut dst, &mut flow, s) {
                return (src, dst, flow, crossed);
            }
        };
    }
    cross!(Step::Pump(Stream::Urgent, pages_at(round, &[])));
    cross!(Step::ToSrc(Stream::Requests, PostcopyPages::opening_request()));
    let state = src.device_state(vec![1, 2, 3]).expect("state");
    let early_commit = early.then(|| src.commit().expect("an early commit"));
    cross!(Step::ToDst(Stream::Control, state));
    // Loading the state faulted on page 15; the answer brings 15..18.
    let ask = flow.request(&[15, 2]).expect("15 is missing");
    assert_eq!(ask, Message::PageRequest { pages: vec![15] }, "page 2 is here");
    cross!(Step::ToSrc(Stream::Requests, ask));
    cross!(Step::Pump(Stream::Urgent, pages_at(round, &[15, 16, 17, 18])));
    cross!(Step::Pump(Stream::Bulk, pages_at(round, &[10, 11, 12, 13, 14])));
    cross!(Step::ToSrc(Stream::Control, Message::RoundApplied { round: 0 }));
    let ready = dst.ready().expect("ready");
    match early_commit {
        // The destination decides: it takes the commit waiting for it,
        // then says Ready.
        Some(commit) => {
            cross!(Step::ToDst(Stream::Control, commit));
            cross!(Step::ToSrc(Stream::Control, ready));
        }
        None => {
            cross!(Step::ToSrc(Stream::Control, ready));
            let commit = src.commit().expect("commit");
            cross!(Step::ToDst(Stream::Control, commit));
        }
    }
    cross!(Step::ToSrc(Stream::Control, Message::CommitAck));
    cross!(Step::Pump(Stream::Bulk, pages_at(round, &[18, 19, 100])));
    assert!(flow.is_complete());
    let complete = dst.postcopy_complete(&flow, PostcopyReport::default()).expect("complete");
    cross!(Step::ToSrc(Stream::Control, complete));
    (src, dst, flow, crossed)
}

#[test]
fn a_postcopy_leaves_exactly_one_owner_whatever_fails() {
    for early in [false, true] {
        let (src, dst, _, total) = run(usize::MAX, early);
        assert_eq!((src.on_failure(), dst.owns_vm(), total), (FailureOutcome::Done, true, 12));
        let mut seen = Vec::new();
        for fail_at in 0..=total {
            let (mut src, mut dst, flow, _) = run(fail_at, early);
            let outcome = src.on_failure();
            let dst_owns = dst.owns_vm();
            match outcome {
                FailureOutcome::ResumeSource => assert!(!dst_owns, "both run the VM (fail at {fail_at})"),
                // The source reconnects: a destination that committed
                // takes post-copy up again; one that did not (its attempt
                // failed with the link) answers from its journal, and the
                // guest is the source's again.
                // Committed early, the source first asks for the decision
                // (a destination that parked before it committed would
                // resume at the same point as one that runs the guest).
                FailureOutcome::InDoubt => {
                    let request = src.resume_request().expect("in doubt, yet no resume");
                    let journal = if dst_owns { Settlement::PostcopyRunning } else { Settlement::NotCommitted };
                    if matches!(request, Message::SettleQuery { .. }) {
                        assert!(early, "a settle query after Ready (fail at {fail_at})");
                        let heard = src.on_settled(src.id(), journal).expect("the decision");
                        let want =
                            if dst_owns { SourceEvent::CommitAcked } else { SourceEvent::Aborted(String::new()) };
                        assert_eq!(std::mem::discriminant(&heard), std::mem::discriminant(&want), "fail at {fail_at}");
                    }
                    match (dst_owns, src.on_failure()) {
                        (true, _) => {
                            assert!(matches!(src.resume_request(), Some(Message::Resume { .. })));
                            let point = dst.resume(flow.arrived_runs()).expect("the destination resumes");
                            src.on_resumed(&point).expect("the source takes the point");
                            assert_eq!(src.on_failure(), FailureOutcome::Postcopy);
                        }
                        (false, FailureOutcome::InDoubt) => {
                            let answer = src.on_settled(src.id(), journal);
                            assert!(matches!(answer, Ok(SourceEvent::Aborted(_))), "fail at {fail_at}: {answer:?}");
                        }
                        (false, _) => {}
                    }
                    if !dst_owns {
                        assert_eq!(src.on_failure(), FailureOutcome::ResumeSource, "fail at {fail_at}");
                    }
                }
                // The guest ran at the destination: the source must keep it
                // paused and its pages, and never run it.
                FailureOutcome::Postcopy | FailureOutcome::Done => {
                    assert!(dst_owns, "nobody runs the VM (fail at {fail_at})")
                }
            }
            seen.push(outcome);
        }
        let all =
            [FailureOutcome::ResumeSource, FailureOutcome::InDoubt, FailureOutcome::Postcopy, FailureOutcome::Done];
        for o in all {
            assert!(seen.contains(&o), "{o:?} never happened (early {early}): {seen:?}");
        }
    }
}

#[test]
fn an_early_commit_in_postcopy_is_the_destinations_to_decide() {
    let (mut src, mut dst) = agreed();
    let flow = switched(&mut src, &mut dst);
    let state = src.device_state(vec![1]).expect("state");
    src.commit().expect("the commit goes with the state");
    assert_eq!(src.on_failure(), FailureOutcome::InDoubt);
    // Requests go on while the destination builds the VM.
    let req = Message::PageRequest { pages: vec![12] };
    assert_eq!(src.on_message(Stream::Requests, &req), Ok(SourceEvent::PagesRequested(vec![12])));
    // It aborts (the state does not load): the guest is the source's again.
    let mut aborted = src.clone();
    let abort = Message::Abort { reason: "the device state does not load".into() };
    assert!(matches!(aborted.on_message(Stream::Control, &abort), Ok(SourceEvent::Aborted(_))));
    assert_eq!(aborted.on_failure(), FailureOutcome::ResumeSource);
    // After an outage it asks for the decision before it resumes anything.
    assert_eq!(src.resume_request(), Some(Message::SettleQuery { migration_id: src.id() }));
    // Not committed (the attempt there ended, or parked undecided and was
    // discarded by the query): the guest is the source's again.
    let mut settled = src.clone();
    assert!(matches!(settled.on_settled(src.id(), Settlement::NotCommitted), Ok(SourceEvent::Aborted(_))));
    assert_eq!(settled.on_failure(), FailureOutcome::ResumeSource);
    // Running there: post-copy goes on, resumed.
    let mut running = src.clone();
    assert_eq!(running.on_settled(src.id(), Settlement::PostcopyRunning), Ok(SourceEvent::CommitAcked));
    assert_eq!(running.on_failure(), FailureOutcome::Postcopy);
    assert!(matches!(running.resume_request(), Some(Message::Resume { .. })));
    // Committed with every page there: done. Lost there: nothing decided.
    let mut whole = src.clone();
    assert_eq!(whole.on_settled(src.id(), Settlement::Committed), Ok(SourceEvent::CommitAcked));
    assert!(whole.done());
    assert!(src.clone().on_settled(src.id(), Settlement::PostcopyLost).is_err());
    // It committed: Ready, then the acknowledgement, and the pages go on.
    dst.on_message(Stream::Control, &state).expect("state");
    src.on_message(Stream::Control, &Message::RoundApplied { round: 0 }).expect("applied");
    let ready = dst.ready().expect("ready");
    dst.on_message(Stream::Control, &Message::Commit).expect("commit");
    assert!(dst.owns_vm());
    assert_eq!(src.on_message(Stream::Control, &ready), Ok(SourceEvent::Ready));
    assert!(src.commit().is_err(), "committed already");
    assert_eq!(src.on_message(Stream::Control, &Message::CommitAck), Ok(SourceEvent::CommitAcked));
    assert_eq!(src.on_failure(), FailureOutcome::Postcopy);
    assert!(src.clone().on_settled(src.id(), Settlement::NotCommitted).is_err(), "acknowledged: it committed");
    assert!(!flow.is_complete());
}

#[test]
fn the_destination_takes_only_pages_it_lacks_whole() {
    let (mut src, mut dst) = agreed();
    let flow = switched(&mut src, &mut dst);
    let r = flow.round();
    let refused = |stream, m: Message, why: &str| {
        let e = flow.clone().on_message(stream, &m).expect_err(why);
        eprintln!("{why}: {e}");
    };
    refused(Stream::Bulk, pages_at(r, &[5]), "a page it holds (the guest may have written it)");
    refused(Stream::Urgent, pages_at(r, &[PAGES + 1]), "a page that is not RAM");
    refused(Stream::Bulk, pages_at(r + 1, &[10]), "pages of another round");
    refused(Stream::Control, pages_at(r, &[10]), "pages on the control stream");
    refused(Stream::Requests, pages_at(r, &[10]), "pages on the request stream");
    refused(Stream::Bulk, Message::RoundDone { round: r, pages: 0 }, "pre-copy's messages");
    let mut b = PagesBuilder::new(r);
    b.push(PageRef { gpa: 10 * 4096, data: PageData::Delta(&[1, 2]) });
    refused(Stream::Bulk, Message::Pages(b.finish()), "a delta: its base was dropped");
    let mut zero = PagesBuilder::new(r);
    zero.push(PageRef { gpa: 100 * 4096, data: PageData::Zero });
    let mut f = flow.clone();
    assert_eq!(f.on_message(Stream::Urgent, &Message::Pages(zero.finish())), Ok(PageAction::Place));
    assert_eq!(f.on_message(Stream::Bulk, &pages_at(r, &[100])), Ok(PageAction::Place), "pushed and requested both");
    assert_eq!(f.still_missing(), 10);
    assert_eq!(f.arrived_runs(), vec![PageRange { first: 100, count: 1 }]);
    assert_eq!(f.request(&[100, 5, 4096]), None, "nothing asked for that is here or not RAM");
    let compressed = Message::Compressed { raw_len: 10, data: vec![1] };
    assert_eq!(f.on_message(Stream::Urgent, &compressed), Ok(PageAction::Decompress));
    assert!(f.on_decompressed(Stream::Urgent, &Message::PostcopyStart { missing: 0 }).is_err());
    // The migration ends only once every page came.
    assert!(dst.clone().postcopy_complete(&f, PostcopyReport::default()).is_err(), "before the commit");
    dst.on_message(Stream::Control, &Message::DeviceState { state: vec![1] }).expect("state");
    dst.ready().expect("ready");
    dst.on_message(Stream::Control, &Message::Commit).expect("commit");
    assert!(dst.owns_vm() && dst.clone().abort("x").is_err(), "the guest runs here: no abort");
    assert!(dst.clone().postcopy_complete(&f, PostcopyReport::default()).is_err(), "pages missing");
    f.on_message(Stream::Bulk, &pages_at(r, &(10..20).collect::<Vec<_>>())).expect("the rest");
    dst.postcopy_complete(&f, PostcopyReport::default()).expect("complete");
    assert!(dst.owns_vm());
}

#[test]
fn discards_are_checked_where_they_come() {
    // Not agreed, inside a round, past RAM, or a start that miscounts.
    let (_, mut dst) = agreed();
    dst.on_message(Stream::Bulk, &pages_at(0, &[1])).expect("a page of round 0");
    let discard = |first, count| Message::PostcopyDiscard { pages: vec![PageRange { first, count }] };
    assert!(dst.clone().on_message(Stream::Bulk, &discard(1, 1)).is_err(), "inside round 0");
    dst.on_message(Stream::Bulk, &Message::RoundDone { round: 0, pages: 1 }).expect("round 0 ends");
    assert!(dst.clone().on_message(Stream::Bulk, &discard(PAGES - 1, 2)).is_err(), "past RAM");
    assert!(dst.clone().on_message(Stream::Control, &discard(1, 1)).is_err(), "on the control stream");
    let mut d = dst.clone();
    d.on_message(Stream::Bulk, &discard(1, 4)).expect("discard");
    d.on_message(Stream::Bulk, &discard(3, 4)).expect("overlapping: counted once");
    assert!(d.clone().on_message(Stream::Bulk, &Message::PostcopyStart { missing: 8 }).is_err(), "6 were named");
    assert_eq!(d.on_message(Stream::Bulk, &Message::PostcopyStart { missing: 6 }), Ok(DestAction::StartPostcopy));
    assert!(d.on_message(Stream::Bulk, &discard(1, 1)).is_err(), "after the start");
    assert!(d.clone().on_bulk_end().is_err(), "the bulk stream is the pump's");
    let flow = d.take_postcopy().expect("the flow");
    assert_eq!((flow.named(), flow.named_runs()), (6, vec![PageRange { first: 1, count: 6 }]));
    assert!(d.take_postcopy().is_none(), "taken once");
    // Without POSTCOPY agreed.
    let mut d = DestSession::new();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        features: features::ZSTD,
        page_size: 4096,
        migration_id: MigrationId([2; 16]),
        shape: shape(),
        chunking: ChunkParams::DEFAULT,
        resume_secret: [7; 32],
        bases: Vec::new(),
    };
    d.on_message(Stream::Control, &hello).expect("hello");
    d.accept(features::ALL, ChunkParams::DEFAULT, &[]).expect("accept");
    assert!(d.on_message(Stream::Bulk, &discard(1, 1)).is_err(), "post-copy was not offered");
}

#[test]
fn the_source_moves_the_guest_only_with_its_disks_whole_and_checks_requests() {
    let mut src = SourceSession::new();
    let params = ChunkParams { max: DISK as u32, ..ChunkParams::DEFAULT };
    src.hello(MigrationId([1; 16]), shape(), ALL, params, [7; 32], Vec::new()).expect("hello");
    src.on_message(
        Stream::Control,
        &Message::Accept { features: ALL & !features::DISK_BASE, chunking: params, based: Vec::new() },
    )
    .expect("accept");
    assert!(src.clone().postcopy_switch().is_err(), "the disk's first copy has not started");
    let mut no = SourceSession::new();
    no.hello(
        MigrationId([1; 16]),
        VmShape { disks: Vec::new(), ..shape() },
        features::ZSTD,
        params,
        [7; 32],
        Vec::new(),
    )
    .expect("hello");
    no.on_message(Stream::Control, &Message::Accept { features: features::ZSTD, chunking: params, based: Vec::new() })
        .expect("accept");
    assert!(no.postcopy_switch().is_err(), "post-copy was not agreed");

    let (mut src, _) = agreed();
    assert!(src.postcopy_start(&[]).is_err(), "no switch yet");
    src.postcopy_switch().expect("switch");
    assert!(src.device_state(vec![1]).is_err(), "the disk is still open");
    assert!(src.clone().postcopy_start(&[]).is_err(), "the disk is still open");
    src.disk_done(DiskDone { disk: 0, size: DISK, digest: [0; 32] }).expect("done");
    assert!(src.clone().device_state(vec![1]).is_err(), "before PostcopyStart");
    let req = |pages: Vec<u64>| Message::PageRequest { pages };
    assert!(src.clone().on_message(Stream::Requests, &req(vec![1])).is_err(), "a request before the start");
    for (bad, why) in [
        (vec![PageRange { first: 5, count: 1 }, PageRange { first: 2, count: 1 }], "descending"),
        (vec![PageRange { first: PAGES - 1, count: 2 }], "past RAM"),
    ] {
        assert!(src.clone().postcopy_start(&bad).is_err(), "{why}");
    }
    src.postcopy_start(&[PageRange { first: 0, count: PAGES }]).expect("start: every page missing");
    assert!(src.is_postcopy() && src.resume_request().is_none(), "before the commit a failure resumes here");
    // The request stream opens as soon as post-copy starts, before the
    // device state goes (loading it may fault).
    assert_eq!(src.clone().on_message(Stream::Requests, &req(vec![1])), Ok(SourceEvent::PagesRequested(vec![1])));
    src.device_state(vec![1]).expect("state");
    assert_eq!(src.on_message(Stream::Requests, &req(vec![7, 3])), Ok(SourceEvent::PagesRequested(vec![7, 3])));
    assert!(src.clone().on_message(Stream::Requests, &req(vec![PAGES])).is_err(), "not RAM");
    assert!(src.clone().on_message(Stream::Control, &req(vec![1])).is_err(), "on the control stream");
    src.on_message(Stream::Control, &Message::Ready).expect("ready");
    assert_eq!(src.on_failure(), FailureOutcome::ResumeSource);
    src.commit().expect("commit");
    assert_eq!(src.on_failure(), FailureOutcome::InDoubt);
    assert!(src.resume_request().is_some(), "after the commit the pages must get there");
    let done = Message::PostcopyComplete(PostcopyReport::default());
    assert!(src.clone().on_message(Stream::Control, &done).is_err(), "before the acknowledgement");
    src.on_message(Stream::Control, &Message::CommitAck).expect("ack");
    assert_eq!(src.on_failure(), FailureOutcome::Postcopy);
    assert!(src.abort("late").is_err() && src.committed() && !src.done());
    src.on_message(Stream::Requests, &req(vec![9])).expect("requests go on");
    assert_eq!(src.on_message(Stream::Control, &done), Ok(SourceEvent::PostcopyComplete(PostcopyReport::default())));
    assert!(src.done() && src.on_message(Stream::Requests, &req(vec![9])).is_err());
}

#[test]
fn a_postcopy_resumes_after_its_commit_from_the_pages_that_arrived() {
    let (mut src, mut dst) = agreed();
    let mut flow = switched(&mut src, &mut dst);
    let r = flow.round();
    let state = src.device_state(vec![1]).expect("state");
    dst.on_message(Stream::Control, &state).expect("state");
    assert!(!dst.can_resume(), "before the commit a failure ends the attempt");
    src.on_message(Stream::Control, &Message::RoundApplied { round: 0 }).expect("applied");
    src.on_message(Stream::Control, &dst.ready().expect("ready")).expect("ready");
    dst.on_message(Stream::Control, &src.commit().expect("commit")).expect("commit");
    flow.on_message(Stream::Bulk, &pages_at(r, &[10, 11])).expect("pages");
    // The acknowledgement is lost with the link: the source is in doubt,
    // and must reconnect rather than settle (the pages are needed).
    assert!(dst.can_resume());
    let point = dst.resume(flow.arrived_runs()).expect("resume");
    assert_eq!((point.round, point.received.clone()), (r, vec![PageRange { first: 10, count: 2 }]));
    let mut bad = point.clone();
    bad.round = r + 1;
    assert!(src.clone().on_resumed(&bad).is_err(), "another round");
    let mut bad = point.clone();
    bad.disks[0].next_offset = 0;
    assert!(src.clone().on_resumed(&bad).is_err(), "a disk that is not whole");
    let mut bad = point.clone();
    bad.received = vec![PageRange { first: PAGES, count: 1 }];
    assert!(src.clone().on_resumed(&bad).is_err(), "pages that are not RAM");
    let rewind = src.on_resumed(&point).expect("resumed");
    assert_eq!((rewind.round, rewind.round_was_ended), (r, false));
    assert_eq!(src.on_failure(), FailureOutcome::Postcopy, "a destination that resumed has committed");
    // The resumed destination asks again for what its vCPUs wait on.
    assert_eq!(flow.request(&[11, 12]), Some(Message::PageRequest { pages: vec![12] }));
}
