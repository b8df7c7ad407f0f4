//! What a hostile source, a full host, a local user or a crash can do to a
//! destination (issue 12): each test plays the part against real `wanmig`
//! processes. Most speak the protocol directly ([`RawSource`]: a pinned
//! source that sends what it likes) rather than through `wanmig send`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wanmig_control::{self as control, Request};
use wanmig_migrate::report::Outcome as MigrateOutcome;
use wanmig_transport::{Conn, FrameReceiver, FrameSender, Identity, LinkTuning};
use wanmig_types::{ChunkId, MigrationId, features};
use wanmig_wire::{Chunk, ChunkParams, DiskInfo, Manifest, ManifestChunk, Message, VmShape};

use crate::harness::{Keys, Receiver, VmDir, VmProcess, check_guest, migrate_request, require_kvm};

/// A pinned source that speaks the protocol by hand.
struct RawSource {
    rt: tokio::runtime::Runtime,
    conn: Conn,
    tx: FrameSender,
    rx: FrameReceiver,
    id: MigrationId,
}

impl RawSource {
    fn connect(addr: &str, keys: &Keys) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let identity = Identity::load(&keys.src).expect("source identity");
        let pin = keys.dst_fp.parse().expect("fingerprint");
        let addr = addr.parse().expect("address");
        let (conn, tx, rx) = rt.block_on(async {
            let mut conn =
                wanmig_transport::connect(addr, &identity, &[pin], LinkTuning::default()).await.expect("connect");
            let (tx, rx) = conn.open_control().await.expect("control stream");
            (conn, tx, rx)
        });
        RawSource { rt, conn, tx, rx, id: MigrationId::new() }
    }

    fn send(&mut self, m: &Message) {
        self.rt.block_on(self.tx.send(m)).expect("send");
    }

    /// The next control message, or `None` after `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<Message> {
        self.rt.block_on(self.rx.recv_timeout(timeout)).ok().flatten()
    }

    /// Sends a hello for `shape` offering `offered`; returns the answer.
    fn hello(&mut self, shape: VmShape, offered: u64) -> Message {
        // Offering every feature, it names no base for any disk.
        let bases = vec![None; shape.disks.len()];
        let hello = Message::Hello {
            version: wanmig_wire::message::PROTOCOL_VERSION,
            features: offered,
            page_size: 4096,
            migration_id: self.id,
            shape,
            chunking: ChunkParams::DEFAULT,
            resume_secret: [3; 32],
            bases,
        };
        self.send(&hello);
        self.recv(Duration::from_secs(20)).expect("an answer to the hello")
    }

    fn open_bulk(&mut self) -> FrameSender {
        self.rt.block_on(self.conn.open_bulk()).expect("bulk stream")
    }
}

/// A VM of `memory_mib` with `disks` (name, size) and no NIC.
fn shape(name: &str, memory_mib: u64, disks: &[(&str, u64)]) -> VmShape {
    VmShape {
        name: name.into(),
        memory: wanmig_vmm::layout::ram_regions(memory_mib << 20).into_iter().map(|(a, l)| (a.0, l)).collect(),
        vcpus: 1,
        disks: disks.iter().map(|&(n, size)| DiskInfo { size, path: format!("/src/{n}"), read_only: false }).collect(),
        nics: Vec::new(),
    }
}

fn reason(m: &Message) -> String {
    match m {
        Message::Refuse { reason } | Message::Abort { reason } => reason.clone(),
        other => panic!("expected a refusal, got {}", other.name()),
    }
}

fn dir_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::Builder::new().prefix("wanmig-it-").tempdir().expect("tmp");
    let d = t.path().join(name);
    (t, d)
}

/// Item 3: sizes a source declares are held against this host before
/// anything moves, and the refusal says by how much.
#[test]
fn a_vm_larger_than_the_host_is_refused_at_its_hello_with_the_figures() {
    let (t, dst_dir) = dir_of("dst");
    let keys = Keys::new(t.path());
    let dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    // 60 GiB of RAM (the VMM's maximum) on a host with less available.
    let mut src = RawSource::connect(&dst.addr, &keys);
    let r = reason(&src.hello(shape("big", 60 * 1024, &[]), features::ALL & !features::SYNC_ONLY));
    assert!(r.contains("not enough memory: the VM needs 63616 MiB (61440 MiB of RAM, 2176 MiB for"), "{r}");
    assert!(r.contains("MiB available"), "{r}");
    eprintln!("refusal: {r}");
    // Eight 4 TiB disks.
    let disks: Vec<(String, u64)> = (0..8).map(|i| (format!("d{i}.img"), 4u64 << 40)).collect();
    let disks: Vec<(&str, u64)> = disks.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let mut src = RawSource::connect(&dst.addr, &keys);
    let r = reason(&src.hello(shape("wide", 64, &disks), features::ALL & !features::SYNC_ONLY));
    assert!(r.starts_with("not enough"), "{r}");
    eprintln!("refusal: {r}");
    // One 4 TiB disk: memory suffices, disk space does not.
    let mut src = RawSource::connect(&dst.addr, &keys);
    let r = reason(&src.hello(shape("deep", 64, &[("d.img", 4 << 40)]), features::ALL & !features::SYNC_ONLY));
    assert!(r.contains("not enough disk space: the VM's disks need 8388608 MiB under"), "{r}");
    eprintln!("refusal: {r}");
    // Nothing was created for any of them.
    let made: Vec<_> = std::fs::read_dir(&dst_dir).expect("ls").flatten().map(|e| e.file_name()).collect();
    assert!(made.iter().all(|n| !n.to_string_lossy().contains(".img")), "{made:?}");
}

/// Item 2: a chunk nobody asked for ends the attempt and is not kept; a
/// failed attempt's chunks stay only under its expiring root; a refused
/// hello leaves the store's chunking unrecorded.
#[test]
fn unasked_chunks_are_refused_and_a_failed_attempt_leaves_its_chunks_under_an_expiring_root() {
    let (t, dst_dir) = dir_of("dst");
    let keys = Keys::new(t.path());
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let offered = features::DISK_COPY;
    // An unasked chunk.
    let data = vec![0x5au8; 65536];
    let unasked = Chunk { disk: 0, offset: 0, id: ChunkId::of(&data), data: data.clone() };
    let mut src = RawSource::connect(&dst.addr, &keys);
    let answer = src.hello(shape("vm", 64, &[("d.img", 1 << 20)]), offered);
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    let mut bulk = src.open_bulk();
    src.rt.block_on(bulk.send(&Message::DiskChunk(unasked))).expect("send");
    let r = reason(&src.recv(Duration::from_secs(20)).expect("an abort"));
    assert!(r.contains("was not asked for"), "{r}");
    dst.wait_log("discarded: protocol error: chunk", Duration::from_secs(10));
    // An attempt that got its chunk, then died.
    let other = vec![0x6bu8; 65536];
    let id = ChunkId::of(&other);
    let mut src = RawSource::connect(&dst.addr, &keys);
    let answer = src.hello(shape("vm", 64, &[("d.img", 1 << 20)]), offered);
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    let part = Manifest {
        disk: 0,
        seq: 0,
        offset: 0,
        chunks: vec![ManifestChunk { len: 65536, id: Some(id) }, ManifestChunk { len: (1 << 20) - 65536, id: None }],
    };
    src.send(&Message::DiskManifest(part));
    assert!(matches!(src.recv(Duration::from_secs(20)), Some(Message::DiskNeed(n)) if n.chunks == [0]));
    let mut bulk = src.open_bulk();
    src.rt.block_on(bulk.send(&Message::DiskChunk(Chunk { disk: 0, offset: 0, id, data: other }))).expect("send");
    // A round's end: acknowledged once everything before it is applied.
    src.rt.block_on(bulk.send(&Message::RoundDone { round: 0, pages: 0 })).expect("send");
    assert_eq!(src.recv(Duration::from_secs(20)), Some(Message::RoundApplied { round: 0 }));
    src.send(&Message::Abort { reason: "the source gives up".into() });
    dst.wait_log("source aborted: the source gives up", Duration::from_secs(20));
    dst.kill();
    let store = wanmig_dedup::ChunkStore::open(&dst_dir.join("chunks")).expect("store");
    assert!(!store.contains(&ChunkId::of(&data)).expect("lookup"), "the unasked chunk is not kept");
    let roots = store.roots().expect("roots");
    let root = roots.iter().find(|r| r.name == format!("attempt/vm/{}", src.id.short())).expect("the attempt's root");
    assert!(root.expires_unix_secs.is_some_and(|t| t >= root.set_unix_secs + 24 * 3600 - 1), "{root:?}");
    assert!(store.root(&root.name).expect("root").expect("ids").contains(&id));
    let no_grace = wanmig_dedup::Retention { grace: Duration::ZERO, ..Default::default() };
    store.gc(&no_grace).expect("gc");
    assert!(store.contains(&id).expect("lookup"), "kept for a retry while its root lives");
    assert_eq!(
        store.meta("chunking").expect("meta").as_deref(),
        Some("16384/65536/262144"),
        "recorded with the first chunk kept"
    );
}

/// Item 8 (part): a new store is bound to a source's chunking only by a
/// chunk it keeps, not by a hello that was refused or an attempt that
/// ended before sending any chunk.
#[test]
fn a_hello_refused_or_aborted_before_any_chunk_records_no_chunking_in_a_new_store() {
    let (t, dst_dir) = dir_of("dst");
    let keys = Keys::new(t.path());
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let mut src = RawSource::connect(&dst.addr, &keys);
    let answer = src.hello(shape("vm", 64, &[("d.img", 1 << 20)]), features::DISK_COPY);
    assert!(matches!(answer, Message::Accept { .. }), "{answer:?}");
    src.send(&Message::Abort { reason: "changed my mind".into() });
    dst.wait_log("source aborted: changed my mind", Duration::from_secs(20));
    dst.kill();
    let chunking = |dir: &Path| wanmig_dedup::ChunkStore::open(&dir.join("chunks")).expect("store").meta("chunking");
    assert_eq!(chunking(&dst_dir).expect("meta"), None, "an attempt that sent no chunk");
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let mut src = RawSource::connect(&dst.addr, &keys);
    reason(&src.hello(shape("big", 60 * 1024, &[("d.img", 1 << 20)]), features::DISK_COPY));
    dst.kill();
    assert_eq!(chunking(&dst_dir).expect("meta"), None, "a refused hello");
}

/// Item 5: two `receive`s sharing a `--disk-dir`: the second cannot take a
/// name the first has reserved.
#[test]
fn a_reserved_image_name_is_refused_to_a_second_receive() {
    let (t, shared) = dir_of("images");
    let keys = Keys::new(t.path());
    std::fs::create_dir_all(&shared).expect("mkdir");
    let args = [OsStr::new("--disk-dir"), shared.as_os_str()];
    let a = Receiver::copying(&keys, &keys.src_fp, &t.path().join("a"), &args);
    let b = Receiver::copying(&keys, &keys.src_fp, &t.path().join("b"), &args);
    let mut first = RawSource::connect(&a.addr, &keys);
    assert!(matches!(
        first.hello(shape("one", 64, &[("d.img", 1 << 20)]), features::DISK_COPY),
        Message::Accept { .. }
    ));
    let mut second = RawSource::connect(&b.addr, &keys);
    let r = reason(&second.hello(shape("two", 64, &[("d.img", 1 << 20)]), features::DISK_COPY));
    assert!(r.contains("d.img already exists here"), "{r}");
    assert!(shared.join("d.img").exists(), "the final name is reserved at admission");
    drop(first);
    drop((a, b));
}

/// Item 7: while one source holds the destination, a second is refused as
/// busy at once and settle queries are answered; a source that keeps the
/// connection alive but sends nothing whole is dropped after the idle
/// timeout, and the next source is taken.
#[test]
fn a_second_source_is_refused_as_busy_and_a_stalled_one_is_dropped_after_the_deadline() {
    let (t, dst_dir) = dir_of("dst");
    let keys = Keys::new(t.path());
    let idle = [OsStr::new("--idle-timeout"), OsStr::new("4s")];
    let dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &idle);
    let mut stalled = RawSource::connect(&dst.addr, &keys);
    // It offers resume: a stall is no outage, and is not waited for.
    assert!(matches!(stalled.hello(shape("first", 64, &[]), features::RESUME), Message::Accept { .. }));
    // The stalled source trickles a frame a byte at a time on its bulk
    // stream: the connection stays busy, no message ever completes.
    let mut bulk = stalled.open_bulk();
    let frame = Message::Abort { reason: "x".repeat(2000) }.encode();
    let trickle = stalled.rt.spawn(async move {
        for b in frame.chunks(1) {
            if bulk.send_encoded(b).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let t0 = Instant::now();
    let mut second = RawSource::connect(&dst.addr, &keys);
    let r = reason(&second.hello(shape("second", 64, &[]), 0));
    assert!(r.starts_with("busy:") && r.contains("VM first"), "{r}");
    assert!(t0.elapsed() < Duration::from_secs(3), "refused at once, not after {:?}", t0.elapsed());
    let mut asker = RawSource::connect(&dst.addr, &keys);
    asker.send(&Message::SettleQuery { migration_id: MigrationId::new() });
    assert!(
        matches!(asker.recv(Duration::from_secs(5)), Some(Message::SettleAnswer { .. })),
        "settle queries are answered meanwhile"
    );
    // The deadline: 4 s without a whole message.
    dst.wait_log("the peer sent nothing for 4s", Duration::from_secs(15));
    let dropped_after = t0.elapsed();
    assert!(!dst.log().contains("for it to resume"), "a stalled source kept for a resume: {}", dst.log());
    assert!(dropped_after >= Duration::from_secs(3), "{dropped_after:?}");
    eprintln!("the stalled source was dropped {dropped_after:?} after the second source came");
    trickle.abort();
    let mut next = RawSource::connect(&dst.addr, &keys);
    assert!(matches!(next.hello(shape("next", 64, &[]), 0), Message::Accept { .. }), "the slot is free again");
}

/// Item 8: after a crash, the next `receive` in the same directory removes
/// the incoming images, reservations and control sockets the dead one left.
#[test]
fn a_crashed_receives_leftovers_are_removed_at_the_next_start() {
    let (t, dst_dir) = dir_of("dst");
    let keys = Keys::new(t.path());
    std::fs::create_dir_all(&dst_dir).expect("mkdir");
    let stale_sock = dst_dir.join("wanmig-gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale_sock).expect("bind"));
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let mut src = RawSource::connect(&dst.addr, &keys);
    assert!(matches!(src.hello(shape("vm", 64, &[("d.img", 1 << 20)]), features::DISK_COPY), Message::Accept { .. }));
    let incoming = dst_dir.join(format!("d.img.{}.incoming", src.id.short()));
    dst.kill(); // SIGKILL: nothing runs on the way out
    assert!(incoming.exists(), "a crash leaves the incoming image");
    let again = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let log = again.log();
    assert!(log.contains("removed the incoming image") && log.contains("is gone"), "{log}");
    assert!(!incoming.exists() && !dst_dir.join("d.img").exists(), "{log}");
    assert!(!stale_sock.exists(), "{log}");
    let rec = std::fs::read_to_string(dst_dir.join("journal").join(format!("{}.json", src.id))).expect("record");
    assert!(rec.contains("\"aborted\""), "{rec}");
}

/// Item 1: with shared disks, the destination's VM uses the image checked
/// at admission, whatever the path names later: a source that swaps the
/// image for a link to another file of the same size mid-migration does
/// not get the destination's VM to open that file.
#[test]
fn a_shared_image_swapped_for_a_link_mid_migration_is_not_followed() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 4\ndisk_kib = 64");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 10);
    let dst_dir = vm.path("dst");
    let dst = Receiver::start(&keys, &keys.src_fp, &dst_dir, &[]);
    let secret = vm.path("secret.img");
    std::fs::write(&secret, vec![0xabu8; 8 << 20]).expect("a file of the image's size");
    let mut req = migrate_request(&dst.addr, &keys, None, false);
    if let Request::Migrate { migration } = &mut req {
        migration.max_bandwidth_bps = Some(16_000_000);
    }
    let socket = src.socket().to_path_buf();
    let moving = std::thread::spawn(move || control::request_with_progress(&socket, &req, &mut |_| {}));
    // Once admitted (journalled), the source side swaps the image for a link.
    let journal = dst_dir.join("journal");
    let start = Instant::now();
    while std::fs::read_dir(&journal).map_or(0, |d| d.count()) == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "never admitted: {}", dst.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let original = vm.path("disk.orig");
    std::fs::rename(&vm.disk, &original).expect("move the image");
    std::os::unix::fs::symlink(&secret, &vm.disk).expect("link");
    let resp = moving.join().expect("thread").expect("answer");
    assert_eq!(resp.outcome, Some(MigrateOutcome::Migrated), "{resp:?} {}", dst.log());
    let at_dst = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
    let p = at_dst.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > 0);
    at_dst.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > p.disk_done + 20);
    // The guest's writes land in the image it had, not in the linked file.
    check_guest(&at_dst, &vm.path("after"), &original);
    assert!(std::fs::read(&secret).expect("read").iter().all(|&b| b == 0xab), "the linked file was written");
    at_dst.shutdown();
}

/// Item 6: a control-socket client cannot make the VMM write a snapshot
/// through a symbolic link or over an existing snapshot.
#[test]
fn snapshots_go_neither_through_links_nor_over_files() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1");
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    let elsewhere = vm.path("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let linked = vm.path("linked");
    std::os::unix::fs::symlink(&elsewhere, &linked).expect("link");
    let refused =
        |dir: &Path| match control::request(src.socket(), &Request::Snapshot { dir: dir.into(), resume: true }) {
            Err(control::ControlError::Refused(e)) => e,
            other => panic!("a snapshot into {} was not refused: {other:?}", dir.display()),
        };
    let e = refused(&linked);
    assert!(e.contains("symbolic link"), "{e}");
    assert!(std::fs::read_dir(&elsewhere).expect("ls").next().is_none(), "nothing written through the link");
    let used = vm.path("used");
    std::fs::create_dir(&used).expect("mkdir");
    std::fs::write(used.join("state.bin"), b"precious").expect("write");
    let e = refused(&used);
    assert!(e.contains("already holds state.bin"), "{e}");
    assert_eq!(std::fs::read(used.join("state.bin")).expect("read"), b"precious");
    // A planted link where the memory file goes.
    let planted = vm.path("planted");
    std::fs::create_dir(&planted).expect("mkdir");
    std::os::unix::fs::symlink(vm.path("victim"), planted.join("memory.bin")).expect("link");
    refused(&planted);
    assert!(!vm.path("victim").exists());
    // A fresh directory works, and the VM runs on.
    src.snapshot(&vm.path("fresh"));
    assert!(src.request(&Request::Resume).ok);
    assert!(src.shutdown().success());
}
