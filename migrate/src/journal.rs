//! The migration journal: each end records a migration's id and phase on
//! disk, synced, before it acts on that phase, so that after a crash or a
//! restart of either process the outcome can still be settled.
//!
//! - The source keeps one record per VM ([`SourceJournal`], beside the VM's
//!   state: `STATE_DIR/NAME.migration.json`): written before the hello
//!   (`started`), before `Commit` leaves (`commit_sent`: from then on the
//!   VM must not run here until settled) and after the acknowledgement
//!   (`migrated`). A migration that fails before the commit removes it.
//! - The destination keeps one record per migration or sync ([`DestJournal`],
//!   `DIR/journal/ID.json`): `receiving`, `ready`, then `committed` (written
//!   before the VM runs) or `aborted`. A settle query is answered from it.
//!   The record also names the process that received ([`Owner`]) and the
//!   files the attempt created ([`ImageRecord`]), so that a later `receive`
//!   can tell an attempt whose process died and remove what it left.
//!
//! Records are JSON, written to a temporary file, synced, renamed over the
//! old one and the directory synced: a crash leaves the old record or the
//! new one, never a torn one. A record that cannot be read is an error,
//! never taken as "no migration".

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use wanmig_types::MigrationId;
use wanmig_wire::Settlement;

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("migration journal {path}")]
    Io {
        /// The record.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The source was told this migration did not commit here; it never may.
    #[error("migration {0} was settled as not committed; it cannot commit now")]
    SettledNotCommitted(MigrationId),
    /// A record is not what this build writes.
    #[error("migration journal {path} is unreadable: {reason}")]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.into(), source }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes `value` to `path` atomically and durably.
fn write_atomic(path: &Path, value: &impl Serialize) -> Result<(), JournalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| JournalError::Corrupt { path: path.into(), reason: e.to_string() })?;
    let tmp = path.with_extension("json.tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&text).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, JournalError> {
    match std::fs::read(path) {
        Ok(b) => parse(path, &b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// A record's bytes, read from `path`.
fn parse<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|e| JournalError::Corrupt { path: path.into(), reason: e.to_string() })
}

fn remove(path: &Path) -> Result<(), JournalError> {
    match std::fs::remove_file(path) {
        Ok(()) => File::open(path.parent().unwrap_or(Path::new("."))).and_then(|d| d.sync_all()).map_err(io(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Where the source is in a migration, as journalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourcePhase {
    /// Hello sent or about to be: the VM runs here; nothing is decided.
    Started,
    /// `Commit` sent (or about to be): the VM must not run here until the
    /// destination's outcome is known (in doubt).
    CommitSent,
    /// The destination acknowledged: the VM runs there, not here.
    Migrated,
}

/// The source's record of a VM's migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: String,
    /// Where it went: `host:port`.
    pub dest: String,
    /// The destination's pinned fingerprint.
    pub peer: String,
    /// This host's identity directory (to ask the destination again).
    pub identity: PathBuf,
    /// Where it is.
    pub phase: SourcePhase,
    /// When the phase was recorded, Unix seconds.
    pub updated_unix: u64,
}

/// The source's journal of one VM.
#[derive(Debug, Clone)]
pub struct SourceJournal {
    path: PathBuf,
}

impl SourceJournal {
    /// The journal of VM `name` in `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Self {
        SourceJournal { path: state_dir.join(format!("{name}.migration.json")) }
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record, if a migration left one.
    pub fn read(&self) -> Result<Option<SourceRecord>, JournalError> {
        read(&self.path)
    }

    /// Records `rec` with `phase`, durably, before the caller acts on it.
    pub fn record(&self, rec: &mut SourceRecord, phase: SourcePhase) -> Result<(), JournalError> {
        rec.phase = phase;
        rec.updated_unix = now_unix();
        write_atomic(&self.path, rec)
    }

    /// Forgets the migration (it failed before the commit, or was settled
    /// as not committed): the VM is this host's again.
    pub fn clear(&self) -> Result<(), JournalError> {
        remove(&self.path)
    }
}

/// Where the destination is in a migration, as journalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestPhase {
    /// Receiving; nothing is decided.
    Receiving,
    /// `Ready` sent; waiting for `Commit`.
    Ready,
    /// `Commit` received: the VM is this host's.
    Committed,
    /// Ended before `Commit`: what arrived was discarded, and this
    /// migration can never commit here.
    Aborted,
}

/// The process that journalled a destination record: it is gone when no
/// process with this pid started at this time since this boot runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// When it started, in clock ticks after boot (`/proc/PID/stat` field
    /// 22): a pid reused by another process has another start time.
    pub start_ticks: u64,
    /// The boot it ran in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// `/proc/PID/stat`'s start time of process `pid`.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses):
    // field 3 (state) onwards; the start time is field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Owner {
    /// This process.
    pub fn this_process() -> Owner {
        let pid = std::process::id();
        Owner { pid, start_ticks: start_ticks(pid).unwrap_or(0), boot_id: boot_id() }
    }

    /// Whether that process still runs.
    pub fn alive(&self) -> bool {
        self.boot_id == boot_id() && start_ticks(self.pid).is_some_and(|t| t == self.start_ticks)
    }
}

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &File) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(FileId { dev: m.dev(), ino: m.ino() })
    }

    /// The identity of what `path` names (not following a final link).
    pub fn at(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).ok().map(|m| FileId { dev: m.dev(), ino: m.ino() })
    }
}

/// An image an attempt assembles, as journalled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Where it is assembled (`NAME.<attempt>.incoming`).
    pub incoming: PathBuf,
    /// Its final name.
    pub path: PathBuf,
    /// What holds the final name meanwhile: the empty file the attempt
    /// created there, or the replica it will replace.
    pub reservation: Option<FileId>,
    /// Whether the reservation is an existing replica (never removed).
    #[serde(default)]
    pub replica: bool,
}

/// The destination's record of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestRecord {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: String,
    /// Where the source connected from.
    pub source: String,
    /// Where it is.
    pub phase: DestPhase,
    /// When the phase was recorded, Unix seconds.
    pub updated_unix: u64,
    /// A disk-only sync rather than a migration.
    #[serde(default)]
    pub sync: bool,
    /// The process receiving it.
    #[serde(default)]
    pub owner: Option<Owner>,
    /// The images it creates (emptied once they are installed or removed).
    #[serde(default)]
    pub images: Vec<ImageRecord>,
}

/// The destination's journal: a record per migration under `DIR/journal`.
/// Clones share one lock, so that a commit and a settle query answered at
/// the same time (the listener hears queries while an attempt runs) never
/// both see a record in `ready` and write opposite outcomes.
#[derive(Debug, Clone)]
pub struct DestJournal {
    dir: PathBuf,
    decide: std::sync::Arc<std::sync::Mutex<()>>,
}

impl DestJournal {
    /// The journal under `dir/journal`.
    pub fn new(dir: &Path) -> Self {
        DestJournal { dir: dir.join("journal"), decide: Default::default() }
    }

    /// Held while a record's outcome is decided.
    fn deciding(&self) -> std::sync::MutexGuard<'_, ()> {
        self.decide.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, id: MigrationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Records the commit, durably, unless the migration was already
    /// settled as not committed (a query answered meanwhile): then it must
    /// not commit, and this fails.
    pub fn commit(&self, rec: &mut DestRecord) -> Result<(), JournalError> {
        let _decide = self.deciding();
        if self.read(rec.migration_id)?.is_some_and(|r| r.phase == DestPhase::Aborted) {
            return Err(JournalError::SettledNotCommitted(rec.migration_id));
        }
        self.record(rec, DestPhase::Committed)
    }

    /// Records `rec` with `phase`, durably.
    pub fn record(&self, rec: &mut DestRecord, phase: DestPhase) -> Result<(), JournalError> {
        rec.phase = phase;
        rec.updated_unix = now_unix();
        write_atomic(&self.path(rec.migration_id), rec)
    }

    /// The record of migration `id`.
    pub fn read(&self, id: MigrationId) -> Result<Option<DestRecord>, JournalError> {
        read(&self.path(id))
    }

    /// Every record (a record that cannot be read is an error in its place).
    pub fn records(&self) -> Vec<Result<DestRecord, JournalError>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut paths: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect();
        paths.sort();
        paths.iter().filter_map(|p| read(p).transpose()).collect()
    }

    /// What this host says of migration `id`. Only pinned peers reach it,
    /// and only one that knows the id (128 random bits, shared by the two
    /// ends alone) can ask about it. A migration that is not committed is
    /// recorded as aborted first, so the answer can never change.
    pub fn settle(&self, id: MigrationId) -> Result<Settlement, JournalError> {
        let _decide = self.deciding();
        let Some(mut rec) = self.read(id)? else { return Ok(Settlement::Unknown) };
        match rec.phase {
            DestPhase::Committed => Ok(Settlement::Committed),
            DestPhase::Aborted => Ok(Settlement::NotCommitted),
            DestPhase::Receiving | DestPhase::Ready => {
                self.record(&mut rec, DestPhase::Aborted)?;
                Ok(Settlement::NotCommitted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_record_survives_and_clears() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = SourceJournal::new(dir.path(), "vm");
        assert_eq!(j.read().expect("read"), None);
        let mut rec = SourceRecord {
            migration_id: MigrationId::new(),
            vm: "vm".into(),
            dest: "b:4750".into(),
            peer: "fp".into(),
            identity: "/id".into(),
            phase: SourcePhase::Started,
            updated_unix: 0,
        };
        j.record(&mut rec, SourcePhase::CommitSent).expect("write");
        let back = j.read().expect("read").expect("a record");
        assert_eq!((back.phase, back.migration_id), (SourcePhase::CommitSent, rec.migration_id));
        j.clear().expect("clear");
        assert_eq!(j.read().expect("read"), None);
        std::fs::write(j.path(), b"{\"migration_id\": 3").expect("garbage");
        assert!(matches!(j.read(), Err(JournalError::Corrupt { .. })), "a torn record is an error, not 'none'");
    }

    #[test]
    fn the_destination_never_changes_its_answer() {
        let dir = tempfile::tempdir().expect("tmp");
        let j = DestJournal::new(dir.path());
        let id = MigrationId::new();
        assert_eq!(j.settle(id).expect("settle"), Settlement::Unknown);
        let mut rec = DestRecord {
            migration_id: id,
            vm: "vm".into(),
            source: "src".into(),
            phase: DestPhase::Receiving,
            updated_unix: 0,
            sync: false,
            owner: None,
            images: Vec::new(),
        };
        j.record(&mut rec, DestPhase::Ready).expect("write");
        assert_eq!(j.settle(id).expect("settle"), Settlement::NotCommitted);
        assert_eq!(j.read(id).expect("read").expect("record").phase, DestPhase::Aborted, "fixed once told");
        let other = MigrationId::new();
        let mut rec = DestRecord { migration_id: other, ..rec };
        j.record(&mut rec, DestPhase::Committed).expect("write");
        assert_eq!(j.settle(other).expect("settle"), Settlement::Committed);
    }

    #[test]
    fn a_records_owner_is_alive_only_while_its_process_runs() {
        let me = Owner::this_process();
        assert!(me.start_ticks > 0 && !me.boot_id.is_empty(), "{me:?}");
        assert!(me.alive());
        assert!(!Owner { start_ticks: me.start_ticks + 1, ..me.clone() }.alive(), "a reused pid");
        assert!(!Owner { boot_id: "another boot".into(), ..me.clone() }.alive());
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let theirs = Owner { pid, start_ticks: start_ticks(pid).unwrap_or(0), boot_id: me.boot_id.clone() };
        child.wait().expect("wait");
        assert!(!theirs.alive(), "a process that exited");
        // Records of an older build (no owner, no images) still read.
        let dir = tempfile::tempdir().expect("tmp");
        let j = DestJournal::new(dir.path());
        std::fs::create_dir_all(dir.path().join("journal")).expect("mkdir");
        let old = r#"{"migration_id":"000102030405060708090a0b0c0d0e0f","vm":"v","source":"s","phase":"ready","updated_unix":1}"#;
        std::fs::write(dir.path().join("journal/000102030405060708090a0b0c0d0e0f.json"), old).expect("write");
        let recs = j.records();
        assert_eq!(recs.len(), 1);
        let rec = recs[0].as_ref().expect("readable");
        assert_eq!((rec.phase, rec.owner.as_ref(), rec.images.len()), (DestPhase::Ready, None, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Bounded fuzzing of the journal's reader (a record is a file
        /// anyone with access to the directory could have written): records
        /// with a few edits read back, or are refused as corrupt (never taken
        /// as "no migration": `read` maps only a missing file to that);
        /// never a panic.
        #[test]
        fn edited_records_read_or_are_refused(
            edits in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>()), 1..6),
        ) {
            let rec = DestRecord {
                migration_id: MigrationId([7; 16]),
                vm: "vm".into(),
                source: "10.0.0.1:4750".into(),
                phase: DestPhase::Ready,
                updated_unix: 1_700_000_000,
                sync: false,
                owner: Some(Owner { pid: 1, start_ticks: 2, boot_id: "b".into() }),
                images: vec![ImageRecord {
                    incoming: "/d/disk.img.0707.incoming".into(),
                    path: "/d/disk.img".into(),
                    reservation: Some(FileId { dev: 2049, ino: 1234 }),
                    replica: true,
                }],
            };
            let good = serde_json::to_vec_pretty(&rec).expect("json");
            let path = Path::new("/journal/07070707070707070707070707070707.json");
            match parse::<DestRecord>(path, &wanmig_types::fuzz::mutate(&good, &edits)) {
                Ok(r) => { let _ = (r.owner.map(|o| o.start_ticks), r.images.len()); }
                Err(JournalError::Corrupt { .. }) => {}
                Err(e) => proptest::prop_assert!(false, "{e}"),
            }
            let source = br#"{"migration_id":"07070707070707070707070707070707","vm":"vm","dest":"b:4750","peer":"fp","identity":"/id","phase":"commit_sent","updated_unix":1}"#;
            let r = parse::<SourceRecord>(path, &wanmig_types::fuzz::mutate(source, &edits));
            let refused_or_read = matches!(r, Ok(_) | Err(JournalError::Corrupt { .. }));
            proptest::prop_assert!(refused_or_read, "{:?}", r.err());
        }
    }
}
