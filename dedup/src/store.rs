//! The chunk store: opening and checking a store directory, put-if-absent,
//! reads, commits, roots and meta.
//!
//! One mutex guards the in-memory state (pending entries, the active pack,
//! the pack table, the totals). Reads of chunk data happen outside it, on a
//! shared file handle taken under it, so gets run in parallel; compaction can
//! unlink a pack while a reader still holds its handle.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions,
};

use crate::format::{
    self, CHUNK_ENTRY_LEN, ChunkEntry, Codec, FORMAT_VERSION, K_CHUNK, K_PACK, K_ROOT, K_TOTALS, K_VERSION,
    PACK_HEADER_LEN, PackState, ROOT_SEGMENT, RootHeader, Totals,
};
use crate::pack::{self, corrupt, pack_path};
use crate::{ChunkId, MAX_CHUNK, Put, StoreError};

/// Tunables of a store; [`ChunkStore::open`] uses the defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// A new pack is started when the active one would grow past this many
    /// bytes (default 128 MiB).
    pub pack_target: u64,
    /// Puts commit on their own once this many bytes are pending (default
    /// 64 MiB).
    pub auto_commit_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { pack_target: 128 << 20, auto_commit_bytes: 64 << 20 }
    }
}

/// A root as [`ChunkStore::roots`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// Its name, e.g. `"vmname/disk0"`.
    pub name: String,
    /// How many chunk ids it lists (repeats included).
    pub chunks: u64,
    /// Unix seconds when it was set (or last extended).
    pub set_unix_secs: u64,
    /// Unix seconds after which [`ChunkStore::gc`] drops it, if it expires.
    pub expires_unix_secs: Option<u64>,
}

/// What is in the store, and what this process did with it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Chunks in the store (committed or pending).
    pub chunks: u64,
    /// Their content bytes.
    pub raw_bytes: u64,
    /// Their bytes as stored (after compression, without record headers).
    pub stored_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Puts by this process that stored a new chunk.
    pub puts_stored: u64,
    /// Puts by this process of a chunk already present.
    pub puts_present: u64,
    /// Gets by this process.
    pub gets: u64,
}

/// The outcome of [`ChunkStore::verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Chunks checked.
    pub chunks: u64,
    /// Chunks whose index entry, record or content is wrong.
    pub bad: Vec<ChunkId>,
}

/// A key and its value, as an index scan yields them.
pub(crate) type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Most pack files kept open for reading at once.
const MAX_READERS: usize = 64;

/// A content-addressed chunk store in one directory; see the crate docs.
///
/// All methods take `&self`: the store can sit in an `Arc` shared by tasks.
/// Dropping it commits pending puts (errors are ignored; call
/// [`ChunkStore::commit`] to see them).
pub struct ChunkStore {
    pub(crate) s: Shared,
    pub(crate) inner: Mutex<Inner>,
}

/// What needs no lock: the index, paths, options and process counters.
pub(crate) struct Shared {
    pub db: DB,
    pub dir: PathBuf,
    pub index_dir: PathBuf,
    pub packs_dir: PathBuf,
    pub opts: StoreOptions,
    pub puts_stored: AtomicU64,
    pub puts_present: AtomicU64,
    pub gets: AtomicU64,
}

/// The pack new records go to.
pub(crate) struct ActivePack {
    pub no: u32,
    pub file: File,
    /// Bytes written so far (header included).
    pub len: u64,
}

/// What the mutex guards.
pub(crate) struct Inner {
    /// Committed length of every live pack, the active one included.
    pub packs: BTreeMap<u32, u64>,
    pub active: ActivePack,
    /// Final lengths of packs filled since the last commit (already synced).
    pub filled: BTreeMap<u32, u64>,
    /// Entries written to packs but not yet to the index: new chunks and
    /// chunks moved by compaction.
    pub pending: HashMap<ChunkId, ChunkEntry>,
    /// Pack bytes behind `pending`.
    pub pending_bytes: u64,
    /// Totals as committed.
    pub totals: Totals,
    /// New chunks in `pending`.
    pub pending_totals: Totals,
    pub readers: HashMap<u32, Arc<File>>,
    /// Set when an fdatasync failed: the kernel may have dropped the dirty
    /// pages, so nothing written since can be trusted to be on disk.
    pub broken: Option<String>,
    /// Tests simulate a crash by dropping without the final commit.
    pub skip_drop_commit: bool,
}

impl fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkStore").field("dir", &self.s.dir).finish_non_exhaustive()
    }
}

/// Unix seconds now (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A closure making a [`StoreError::Io`] with this context.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// fsync of a directory, so that files created or removed in it stay so.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(format!("syncing directory {}", dir.display())))
}

fn sync_write() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl Shared {
    /// A [`StoreError::Index`] naming the index directory.
    pub fn index_err(&self, what: &str, e: rocksdb::Error) -> StoreError {
        StoreError::Index(format!("chunk index {}: {what}: {e}", self.index_dir.display()))
    }

    /// Writes `batch` with sync=true.
    pub fn write_sync(&self, batch: WriteBatch, what: &str) -> Result<(), StoreError> {
        self.db.write_opt(batch, &sync_write()).map_err(|e| self.index_err(what, e))
    }

    /// Every key/value whose key starts with `prefix`, in key order, from a
    /// consistent view taken now.
    pub fn scan<'a>(&'a self, prefix: &'a [u8]) -> impl Iterator<Item = Result<KeyValue, StoreError>> + 'a {
        self.db
            .iterator(IteratorMode::From(prefix, Direction::Forward))
            .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .map(|item| item.map_err(|e| self.index_err("scanning", e)))
    }

    /// The committed index entry of `id`.
    pub fn entry(&self, id: &ChunkId) -> Result<Option<ChunkEntry>, StoreError> {
        match self.db.get_pinned(format::chunk_key(id)).map_err(|e| self.index_err("reading a chunk entry", e))? {
            None => Ok(None),
            Some(v) => ChunkEntry::decode(&v).map(Some).map_err(|why| self.bad_entry(id, why)),
        }
    }

    /// A [`StoreError::Corrupt`] for an index entry that does not decode.
    pub fn bad_entry(&self, id: &ChunkId, why: String) -> StoreError {
        corrupt(format!("index {}: entry of chunk {id}: {why}", self.index_dir.display()))
    }

    /// The ids of root `name`, checked against its header's count.
    pub fn root_ids(&self, name: &[u8], count: u64) -> Result<Vec<ChunkId>, StoreError> {
        let bad = |why: String| {
            corrupt(format!("index {}: root {:?}: {why}", self.index_dir.display(), String::from_utf8_lossy(name)))
        };
        let prefix = format::root_seg_prefix(name);
        // Capacity from disk is capped; the Vec grows past it if the
        // segments really hold more.
        let mut ids = Vec::with_capacity(count.min(1 << 20) as usize);
        for (i, item) in self.scan(&prefix).enumerate() {
            let (key, value) = item?;
            let seg = key.get(prefix.len()..).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_be_bytes);
            if seg != Some(i as u32) {
                return Err(bad(format!("segment {i} is missing or misnamed")));
            }
            ids.extend(format::decode_root_segment(&value).map_err(&bad)?);
        }
        if ids.len() as u64 != count {
            return Err(bad(format!("its segments hold {} ids, its header says {count}", ids.len())));
        }
        Ok(ids)
    }

    /// Records pack `no` in the index (synced), then creates its file with
    /// its header: every pack file the store makes is known to the index
    /// before it exists.
    fn create_pack(&self, no: u32) -> Result<ActivePack, StoreError> {
        self.db
            .put_opt(format::pack_key(no), PackState::Live { len: 0 }.encode(), &sync_write())
            .map_err(|e| self.index_err("recording a new pack", e))?;
        let path = pack_path(&self.packs_dir, no);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(format!("creating pack {}", path.display())))?;
        file.write_all_at(&format::encode_pack_header(no), 0)
            .map_err(io_err(format!("writing the header of pack {}", path.display())))?;
        sync_dir(&self.packs_dir)?;
        Ok(ActivePack { no, file, len: PACK_HEADER_LEN })
    }
}

impl Inner {
    /// Refuses writes after a failed fdatasync.
    pub fn check_broken(&self) -> Result<(), StoreError> {
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(StoreError::Io {
                context: format!("{why}; the store refuses writes until it is reopened"),
                source: io::Error::other("earlier fdatasync failed"),
            }),
        }
    }

    /// fdatasync of the active pack; a failure breaks the store.
    fn sync_active(&mut self, s: &Shared) -> Result<(), StoreError> {
        self.active.file.sync_data().map_err(|e| {
            let path = pack_path(&s.packs_dir, self.active.no);
            let context = format!("fdatasync of pack {}", path.display());
            self.broken = Some(format!("{context} failed ({e})"));
            StoreError::Io { context, source: e }
        })
    }

    /// The durability point: sync the pack data written since the last
    /// commit, then write their index entries (and `extra`) in one synced
    /// batch.
    pub fn commit(&mut self, s: &Shared, extra: Option<WriteBatch>) -> Result<(), StoreError> {
        let active_dirty = self.packs.get(&self.active.no) != Some(&self.active.len);
        if self.pending.is_empty() && !active_dirty && self.filled.is_empty() && extra.is_none() {
            return Ok(());
        }
        self.check_broken()?;
        if active_dirty {
            self.sync_active(s)?;
        }
        let mut batch = extra.unwrap_or_default();
        for (id, e) in &self.pending {
            batch.put(format::chunk_key(id), e.encode());
        }
        for (&no, &len) in &self.filled {
            batch.put(format::pack_key(no), PackState::Live { len }.encode());
        }
        if active_dirty {
            batch.put(format::pack_key(self.active.no), PackState::Live { len: self.active.len }.encode());
        }
        let totals = self.totals.plus(&self.pending_totals);
        if totals != self.totals {
            batch.put(K_TOTALS, totals.encode());
        }
        s.write_sync(batch, "committing")?;
        self.pending.clear();
        self.pending_bytes = 0;
        self.totals = totals;
        self.pending_totals = Totals::default();
        let filled = std::mem::take(&mut self.filled);
        self.packs.extend(filled);
        self.packs.insert(self.active.no, self.active.len);
        Ok(())
    }

    /// Starts a new active pack after syncing the current one.
    pub fn roll_over(&mut self, s: &Shared) -> Result<(), StoreError> {
        self.sync_active(s)?;
        let no = self.active.no.checked_add(1).ok_or_else(|| corrupt("pack numbers are exhausted".into()))?;
        let new = s.create_pack(no)?;
        let old = std::mem::replace(&mut self.active, new);
        self.filled.insert(old.no, old.len);
        self.packs.insert(no, 0);
        Ok(())
    }

    /// Appends a record to the active pack (starting a new pack first if
    /// this one is full) and makes its entry pending.
    pub fn append(
        &mut self,
        s: &Shared,
        id: &ChunkId,
        codec: Codec,
        raw_len: u32,
        stored: &[u8],
        added: u64,
    ) -> Result<ChunkEntry, StoreError> {
        let record_len = (format::RECORD_HEADER_LEN + stored.len()) as u64;
        if self.active.len > PACK_HEADER_LEN && self.active.len + record_len > s.opts.pack_target {
            self.roll_over(s)?;
        }
        let offset = self.active.len;
        pack::write_record(&self.active.file, offset, id, codec, raw_len, stored).map_err(io_err(format!(
            "writing chunk {id} to pack {}",
            pack_path(&s.packs_dir, self.active.no).display()
        )))?;
        self.active.len += record_len;
        // Lengths were checked against MAX_CHUNK by the caller.
        let e = ChunkEntry { pack: self.active.no, offset, stored_len: stored.len() as u32, raw_len, codec, added };
        self.pending.insert(*id, e);
        self.pending_bytes += record_len;
        Ok(e)
    }

    /// A read handle on the pack `e` points into, after checking the
    /// record lies within what the pack holds.
    pub fn reader(&mut self, s: &Shared, id: &ChunkId, e: &ChunkEntry) -> Result<Arc<File>, StoreError> {
        let limit = if e.pack == self.active.no { Some(self.active.len) } else { self.packs.get(&e.pack).copied() };
        match limit {
            None => return Err(corrupt(format!("chunk {id} is said to be in pack {}, which does not exist", e.pack))),
            Some(limit) if e.end() > limit => {
                return Err(corrupt(format!(
                    "chunk {id} is said to end at offset {} of pack {}, which holds {limit} bytes",
                    e.end(),
                    pack_path(&s.packs_dir, e.pack).display()
                )));
            }
            Some(_) => {}
        }
        if let Some(f) = self.readers.get(&e.pack) {
            return Ok(Arc::clone(f));
        }
        if self.readers.len() >= MAX_READERS {
            // Handles in use elsewhere stay open until their readers finish.
            self.readers.clear();
        }
        let path = pack_path(&s.packs_dir, e.pack);
        let f = Arc::new(File::open(&path).map_err(io_err(format!("opening pack {}", path.display())))?);
        self.readers.insert(e.pack, Arc::clone(&f));
        Ok(f)
    }
}

/// Opens RocksDB with paranoid checks, creating it only when `create`.
fn open_db(index_dir: &Path, create: bool) -> Result<DB, StoreError> {
    let mut o = Options::default();
    o.create_if_missing(create);
    o.set_error_if_exists(create);
    o.set_paranoid_checks(true);
    // Chunk data are compressed by the store; keys and entries barely compress.
    o.set_compression_type(DBCompressionType::None);
    o.set_max_open_files(512);
    o.set_keep_log_file_num(4);
    let mut table = BlockBasedOptions::default();
    // Most lookups of a migration's manifest are for absent chunks.
    table.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&table);
    let cf = ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, o.clone());
    DB::open_cf_descriptors(&o, index_dir, [cf]).map_err(|e| {
        let msg = e.to_string();
        let lower = msg.to_ascii_lowercase();
        if lower.contains("lock") && (lower.contains("unavailable") || lower.contains("hold") || lower.contains("busy"))
        {
            StoreError::Index(format!(
                "chunk store index {} is in use by another process or another open store in this one ({msg})",
                index_dir.display()
            ))
        } else {
            StoreError::Index(format!(
                "cannot open chunk index {}: {msg}; the index is unreadable or damaged and the store is not trusted",
                index_dir.display()
            ))
        }
    })
}

/// Whether `dir` exists and holds anything.
fn nonempty_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("listing {}", dir.display()))(e)),
    }
}

/// The pack files in `packs_dir` by number; a `.pack` file with a name the
/// store never makes is refused.
fn list_packs(packs_dir: &Path) -> Result<BTreeMap<u32, PathBuf>, StoreError> {
    let mut out = BTreeMap::new();
    let entries = fs::read_dir(packs_dir).map_err(io_err(format!("listing {}", packs_dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("listing {}", packs_dir.display())))?;
        match pack::parse_pack_name(&entry.file_name()) {
            None => {}
            Some(Some(no)) => {
                out.insert(no, entry.path());
            }
            Some(None) => {
                return Err(corrupt(format!("{} is not a pack name this store makes", entry.path().display())));
            }
        }
    }
    Ok(out)
}

impl ChunkStore {
    /// Opens (creating if missing) the store in `dir`: `dir/index` (RocksDB)
    /// and `dir/packs/NNNNNNNN.pack`, with default [`StoreOptions`].
    ///
    /// Checks the format version, that every pack file is at least as long
    /// as its committed length and starts with its header, and that no pack
    /// file is unknown to the index. Uncommitted bytes at the end of the
    /// last pack (from a crash) are cut off. A store opened elsewhere, a
    /// damaged index or pack files without an index are errors, never an
    /// empty store.
    pub fn open(dir: &Path) -> Result<ChunkStore, StoreError> {
        ChunkStore::open_with(dir, &StoreOptions::default())
    }

    /// [`ChunkStore::open`] with tunables.
    pub fn open_with(dir: &Path, opts: &StoreOptions) -> Result<ChunkStore, StoreError> {
        let index_dir = dir.join("index");
        let packs_dir = dir.join("packs");
        fs::create_dir_all(&packs_dir).map_err(io_err(format!("creating {}", packs_dir.display())))?;
        let create = !nonempty_dir(&index_dir)?;
        let db = open_db(&index_dir, create)?;
        let s = Shared {
            db,
            dir: dir.to_path_buf(),
            index_dir,
            packs_dir,
            opts: opts.clone(),
            puts_stored: AtomicU64::new(0),
            puts_present: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        };
        let files = list_packs(&s.packs_dir)?;
        s.check_version(&files)?;
        let totals = match s.db.get(K_TOTALS).map_err(|e| s.index_err("reading the totals", e))? {
            None => Totals::default(),
            Some(v) => {
                Totals::decode(&v).map_err(|why| corrupt(format!("index {}: totals: {why}", s.index_dir.display())))?
            }
        };
        let mut packs = s.check_packs(&files)?;
        let active = match packs.last_key_value() {
            Some((&no, &len)) if len < s.opts.pack_target => s.reopen_active(no, len)?,
            last => {
                let no = match last {
                    None => 1,
                    Some((&no, _)) => no.checked_add(1).ok_or_else(|| corrupt("pack numbers are exhausted".into()))?,
                };
                packs.insert(no, 0);
                s.create_pack(no)?
            }
        };
        let inner = Inner {
            packs,
            active,
            filled: BTreeMap::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            totals,
            pending_totals: Totals::default(),
            readers: HashMap::new(),
            broken: None,
            skip_drop_commit: false,
        };
        Ok(ChunkStore { s, inner: Mutex::new(inner) })
    }

    /// The state lock. A panic while it was held cannot leave the state
    /// half-updated in a way later calls trust: pending entries are only
    /// added after their bytes are written.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store has the chunk `id` (committed or pending).
    pub fn contains(&self, id: &ChunkId) -> Result<bool, StoreError> {
        // Commit writes the index before it forgets pending entries, so a
        // chunk is always in one or the other.
        if self.lock().pending.contains_key(id) {
            return Ok(true);
        }
        self.s
            .db
            .get_pinned(format::chunk_key(id))
            .map(|v| v.is_some())
            .map_err(|e| self.s.index_err("looking up a chunk", e))
    }

    /// One answer per id, in order: whether the store has it, committed or
    /// pending (RocksDB's batched multi-get for the committed ones).
    pub fn contains_many(&self, ids: &[ChunkId]) -> Result<Vec<bool>, StoreError> {
        let mut out = vec![false; ids.len()];
        let mut ask = Vec::new();
        {
            let g = self.lock();
            for (i, id) in ids.iter().enumerate() {
                if g.pending.contains_key(id) {
                    out[i] = true;
                } else {
                    ask.push(i);
                }
            }
        }
        let cf = self.s.db.cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME).ok_or_else(|| {
            StoreError::Index(format!("chunk index {}: no default column family", self.s.dir.display()))
        })?;
        for part in ask.chunks(4096) {
            let keys: Vec<[u8; 33]> = part.iter().map(|&i| format::chunk_key(&ids[i])).collect();
            let found = self.s.db.batched_multi_get_cf(cf, &keys, false);
            for (&i, r) in part.iter().zip(found) {
                out[i] = r.map_err(|e| self.s.index_err("looking up chunks", e))?.is_some();
            }
        }
        Ok(out)
    }

    /// Stores `data` under `id` unless present. Refuses
    /// ([`StoreError::HashMismatch`], storing nothing) when blake3(data) is
    /// not `id`, and [`StoreError::TooLarge`] over [`MAX_CHUNK`]. Data are
    /// zstd-compressed (level 1) when that saves space, stored raw otherwise.
    ///
    /// The chunk is visible to this process at once and durable after the
    /// next commit (which this call makes itself once
    /// [`StoreOptions::auto_commit_bytes`] are pending; an error of that
    /// commit is returned although the chunk is stored).
    pub fn put(&self, id: &ChunkId, data: &[u8]) -> Result<Put, StoreError> {
        if data.len() > MAX_CHUNK {
            return Err(StoreError::TooLarge(data.len()));
        }
        let actual = ChunkId::of(data);
        if actual != *id {
            return Err(StoreError::HashMismatch { expected: *id, actual });
        }
        if self.contains(id)? {
            self.s.puts_present.fetch_add(1, Ordering::Relaxed);
            return Ok(Put::Present);
        }
        // Compress outside the lock; another put of the same chunk may win
        // the race, which the check below sees.
        let (codec, stored) = pack::encode(data);
        let mut g = self.lock();
        g.check_broken()?;
        if g.pending.contains_key(id) || self.s.entry(id)?.is_some() {
            self.s.puts_present.fetch_add(1, Ordering::Relaxed);
            return Ok(Put::Present);
        }
        let e = g.append(&self.s, id, codec, data.len() as u32, &stored, unix_now())?;
        g.pending_totals.add(&e);
        self.s.puts_stored.fetch_add(1, Ordering::Relaxed);
        if g.pending_bytes >= self.s.opts.auto_commit_bytes {
            g.commit(&self.s, None)?;
        }
        Ok(Put::Stored)
    }

    /// The chunk's content, decompressed and verified against its id; a
    /// mismatch (corrupt pack) is [`StoreError::Corrupt`], never data.
    pub fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        self.s.gets.fetch_add(1, Ordering::Relaxed);
        let (e, file) = {
            let mut g = self.lock();
            let e = match g.pending.get(id) {
                Some(e) => *e,
                None => match self.s.entry(id)? {
                    Some(e) => e,
                    None => return Ok(None),
                },
            };
            let file = g.reader(&self.s, id, &e)?;
            (e, file)
        };
        let path = pack_path(&self.s.packs_dir, e.pack);
        let stored = pack::read_stored(&file, &path, id, &e)?;
        pack::decode(&path, id, &e, stored).map(Some)
    }

    /// Durability point: fdatasyncs the pack data written since the last
    /// commit, then writes the index entries of those puts (and the
    /// totals) in one RocksDB batch with sync=true, so an index entry that
    /// survives a crash always points at durable data.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.lock().commit(&self.s, None)
    }

    /// Records root `name`: the chunk ids an image is made of, with the
    /// current time, replacing any earlier root of that name. Roots keep
    /// their chunks alive through [`ChunkStore::gc`]; the ids need not be in
    /// the store. Commits pending puts in the same batch.
    pub fn set_root(&self, name: &str, ids: &[ChunkId]) -> Result<(), StoreError> {
        self.replace_roots(&[(name, ids)], &[])
    }

    /// Sets each root of `set` (as [`ChunkStore::set_root`] does) and drops
    /// each root named in `drop`, all in one batch with the pending puts:
    /// e.g. an image's root replacing the expiring root of the attempt that
    /// received it, with no moment at which neither keeps its chunks.
    pub fn replace_roots(&self, set: &[(&str, &[ChunkId])], drop: &[&str]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for name in drop {
            delete_root(&mut batch, name);
        }
        for (name, ids) in set {
            delete_root(&mut batch, name);
            let header = RootHeader { set_secs: unix_now(), count: 0, expires_secs: 0, segments: 0 };
            append_segments(&mut batch, name, header, ids)?;
        }
        self.lock().commit(&self.s, Some(batch))
    }

    /// Adds `ids` to root `name` (creating it), which then expires `ttl`
    /// from now unless replaced: what keeps the chunks of an image still
    /// being received (and of an attempt that failed, for a retry to reuse)
    /// alive through gc, for a while only. Cheap: it appends a segment and
    /// does not wait for stable storage (the next commit makes it durable).
    pub fn extend_root(&self, name: &str, ids: &[ChunkId], ttl: std::time::Duration) -> Result<(), StoreError> {
        let _g = self.lock();
        let old = match self.s.db.get(format::root_key(name)).map_err(|e| self.s.index_err("reading a root", e))? {
            Some(v) => Some(
                RootHeader::decode(&v)
                    .map_err(|why| corrupt(format!("index {}: root {name:?}: {why}", self.s.index_dir.display())))?,
            ),
            None => None,
        };
        let (count, segments) = old.map_or((0, 0), |h| (h.count, h.segments));
        let expires_secs = unix_now().saturating_add(ttl.as_secs()).max(1);
        let header = RootHeader { set_secs: unix_now(), count, expires_secs, segments };
        let mut batch = WriteBatch::default();
        append_segments(&mut batch, name, header, ids)?;
        self.s.db.write(batch).map_err(|e| self.s.index_err("extending a root", e))
    }

    /// The chunk ids of root `name`, if there is one.
    pub fn root(&self, name: &str) -> Result<Option<Vec<ChunkId>>, StoreError> {
        let key = format::root_key(name);
        let Some(v) = self.s.db.get_pinned(&key).map_err(|e| self.s.index_err("reading a root", e))? else {
            return Ok(None);
        };
        let h = RootHeader::decode(&v)
            .map_err(|why| corrupt(format!("index {}: root {name:?}: {why}", self.s.index_dir.display())))?;
        self.s.root_ids(name.as_bytes(), h.count).map(Some)
    }

    /// All roots: name, chunk count, unix time set; by name.
    pub fn roots(&self) -> Result<Vec<RootInfo>, StoreError> {
        let mut out = Vec::new();
        for item in self.s.scan(&[K_ROOT]) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let h = RootHeader::decode(&value)
                .map_err(|why| corrupt(format!("index {}: root {name:?}: {why}", self.s.index_dir.display())))?;
            let expires_unix_secs = (h.expires_secs != 0).then_some(h.expires_secs);
            out.push(RootInfo { name, chunks: h.count, set_unix_secs: h.set_secs, expires_unix_secs });
        }
        Ok(out)
    }

    /// What is in the store (committed and pending) and this process's
    /// counters.
    pub fn stats(&self) -> Stats {
        let g = self.lock();
        let t = g.totals.plus(&g.pending_totals);
        Stats {
            chunks: t.chunks,
            raw_bytes: t.raw_bytes,
            stored_bytes: t.stored_bytes,
            packs: g.packs.len() as u64,
            puts_stored: self.s.puts_stored.load(Ordering::Relaxed),
            puts_present: self.s.puts_present.load(Ordering::Relaxed),
            gets: self.s.gets.load(Ordering::Relaxed),
        }
    }

    /// Reads every chunk (after committing) and checks its record and
    /// hash; returns how many it checked and which failed. Other calls wait
    /// while it runs.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut g = self.lock();
        g.commit(&self.s, None)?;
        let mut report = VerifyReport::default();
        for item in self.s.scan(&[K_CHUNK]) {
            let (key, value) = item?;
            let Some(id) = format::chunk_key_id(&key) else {
                return Err(corrupt(format!("index {}: chunk key of {} bytes", self.s.index_dir.display(), key.len())));
            };
            report.chunks += 1;
            let checked = ChunkEntry::decode(&value).map_err(|why| self.s.bad_entry(&id, why)).and_then(|e| {
                let file = g.reader(&self.s, &id, &e)?;
                let path = pack_path(&self.s.packs_dir, e.pack);
                pack::decode(&path, &id, &e, pack::read_stored(&file, &path, &id, &e)?)
            });
            match checked {
                Ok(_) => {}
                Err(StoreError::Corrupt(_)) => report.bad.push(id),
                Err(other) => return Err(other),
            }
        }
        Ok(report)
    }

    /// Small string metadata stored in the index (e.g. the chunking
    /// parameters the store was filled with).
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.s.db.get(format::meta_key(key)).map_err(|e| self.s.index_err("reading meta", e))? {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|_| corrupt(format!("index {}: meta {key:?} is not UTF-8", self.s.index_dir.display()))),
        }
    }

    /// Sets meta `key` to `value` (synced).
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.s.db.put_opt(format::meta_key(key), value, &sync_write()).map_err(|e| self.s.index_err("writing meta", e))
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.s.dir
    }
}

/// Deletes root `name` (header and segments) in `batch`.
fn delete_root(batch: &mut WriteBatch, name: &str) {
    let prefix = format::root_seg_prefix(name.as_bytes());
    let mut end = prefix.clone();
    end.extend_from_slice(&[0xff; 5]);
    batch.delete_range(&prefix, &end);
    batch.delete(format::root_key(name));
}

/// Appends `ids` to root `name` after the segments `header` counts, and
/// writes its header with the new counts, in `batch`.
fn append_segments(
    batch: &mut WriteBatch,
    name: &str,
    mut header: RootHeader,
    ids: &[ChunkId],
) -> Result<(), StoreError> {
    let too_large = || StoreError::Index(format!("root {name:?} is too large"));
    for seg in ids.chunks(ROOT_SEGMENT) {
        batch.put(
            format::root_seg_key(name.as_bytes(), header.segments),
            seg.iter().flat_map(|id| id.0).collect::<Vec<_>>(),
        );
        header.segments = header.segments.checked_add(1).ok_or_else(too_large)?;
    }
    header.count += ids.len() as u64;
    batch.put(format::root_key(name), header.encode());
    Ok(())
}

impl Shared {
    /// Checks the format version; writes it into a new, empty store.
    fn check_version(&self, files: &BTreeMap<u32, PathBuf>) -> Result<(), StoreError> {
        match self.db.get(K_VERSION).map_err(|e| self.index_err("reading the format version", e))? {
            Some(v) => {
                let version = <[u8; 4]>::try_from(v.as_slice()).map(u32::from_le_bytes);
                match version {
                    Ok(FORMAT_VERSION) => Ok(()),
                    Ok(other) => Err(StoreError::Index(format!(
                        "chunk store {} has format version {other}; this build reads version {FORMAT_VERSION} only",
                        self.dir.display()
                    ))),
                    Err(_) => Err(corrupt(format!(
                        "index {}: format version is {} bytes, not 4",
                        self.index_dir.display(),
                        v.len()
                    ))),
                }
            }
            None => {
                let empty = self.db.iterator(IteratorMode::Start).next().is_none();
                if !empty || !files.is_empty() {
                    return Err(corrupt(format!(
                        "index {} has no format version but {}: it is not a chunk store index, or it was lost",
                        self.index_dir.display(),
                        if empty { "pack files exist" } else { "it holds keys" }
                    )));
                }
                self.db
                    .put_opt(K_VERSION, FORMAT_VERSION.to_le_bytes(), &sync_write())
                    .map_err(|e| self.index_err("writing the format version", e))
            }
        }
    }

    /// Reads the pack table, finishes deleting retired packs, and checks
    /// each live pack's file: present, not shorter than its committed
    /// length, with its header. Returns the committed lengths.
    fn check_packs(&self, files: &BTreeMap<u32, PathBuf>) -> Result<BTreeMap<u32, u64>, StoreError> {
        let mut packs = BTreeMap::new();
        let mut retired = Vec::new();
        for item in self.scan(&[K_PACK]) {
            let (key, value) = item?;
            let bad = |why: String| corrupt(format!("index {}: pack entry: {why}", self.index_dir.display()));
            let no = format::pack_key_no(&key).ok_or_else(|| bad(format!("key of {} bytes", key.len())))?;
            match PackState::decode(&value).map_err(bad)? {
                PackState::Live { len } => {
                    packs.insert(no, len);
                }
                PackState::Retired => retired.push(no),
            }
        }
        if !retired.is_empty() {
            // A gc stopped between retiring these packs and deleting them.
            let mut batch = WriteBatch::default();
            for &no in &retired {
                let path = pack_path(&self.packs_dir, no);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(format!("removing retired pack {}", path.display()))(e)),
                }
                batch.delete(format::pack_key(no));
            }
            sync_dir(&self.packs_dir)?;
            self.write_sync(batch, "forgetting retired packs")?;
        }
        for (no, path) in files {
            if !packs.contains_key(no) && !retired.contains(no) {
                return Err(corrupt(format!("pack file {} is not in the index", path.display())));
            }
        }
        for (&no, &len) in &packs {
            let path = pack_path(&self.packs_dir, no);
            if len == 0 {
                // Created but never committed to: it holds nothing the index
                // points at, whatever its state.
                continue;
            }
            let file = File::open(&path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    corrupt(format!("pack file {} is missing; the index says it holds {len} bytes", path.display()))
                } else {
                    io_err(format!("opening pack {}", path.display()))(e)
                }
            })?;
            let actual = file.metadata().map_err(io_err(format!("reading the size of {}", path.display())))?.len();
            if actual < len {
                return Err(corrupt(format!(
                    "pack file {} is {actual} bytes, shorter than the {len} bytes committed to it: it was truncated",
                    path.display()
                )));
            }
            let mut header = [0u8; PACK_HEADER_LEN as usize];
            file.read_exact_at(&mut header, 0).map_err(io_err(format!("reading the header of {}", path.display())))?;
            format::check_pack_header(&header, no)
                .map_err(|why| corrupt(format!("pack file {}: {why}", path.display())))?;
        }
        Ok(packs)
    }

    /// Reopens the last pack to append to it, cutting off what was written
    /// after its last commit (no index entry points there).
    fn reopen_active(&self, no: u32, committed: u64) -> Result<ActivePack, StoreError> {
        if committed < PACK_HEADER_LEN {
            return self.create_pack(no);
        }
        let path = pack_path(&self.packs_dir, no);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening pack {}", path.display())))?;
        file.set_len(committed).map_err(io_err(format!("cutting uncommitted bytes off {}", path.display())))?;
        Ok(ActivePack { no, file, len: committed })
    }
}

impl Drop for ChunkStore {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !g.skip_drop_commit {
            // Errors cannot be returned from drop; a caller who cares
            // commits first.
            let _ = g.commit(&self.s, None);
        }
    }
}

// The index entry layout is fixed; a change must bump the format version.
const _: () = assert!(CHUNK_ENTRY_LEN == 30);
