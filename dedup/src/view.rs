//! Reading a store another process has open: [`StoreView`], and
//! [`ChunkSource`], what reading images back out of a store needs (the
//! store and a view both provide it).
//!
//! A view opens the index read-only (RocksDB's read-only mode takes no
//! lock, so a `wanmig receive` may hold the store meanwhile) and sees what
//! was committed when it opened: chunks, roots and meta. It writes nothing,
//! neither the index nor the packs. Every chunk it returns is checked
//! against its id, as the store's own reads are. A gc in the other process
//! that rewrites packs while a view reads can make a read fail (a pack the
//! view's snapshot names is gone): that is an error, never wrong data;
//! open a new view and retry.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use rocksdb::{DB, Options};

use crate::format::{self, K_PACK, K_ROOT, PackState, RootHeader};
use crate::pack::{self, corrupt, pack_path};
use crate::store::{Shared, StoreOptions};
use crate::{ChunkId, ChunkStore, StoreError};

/// What reading images back out of a store needs.
pub trait ChunkSource {
    /// The chunk's content, checked against its id.
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError>;
    /// The ids of root `name`.
    fn root(&self, name: &str) -> Result<Option<Vec<ChunkId>>, StoreError>;
    /// Meta `key`.
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Every meta key starting with `prefix`, with its value, by key.
    fn metas(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError>;
}

impl ChunkSource for ChunkStore {
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        ChunkStore::get(self, id)
    }
    fn root(&self, name: &str) -> Result<Option<Vec<ChunkId>>, StoreError> {
        ChunkStore::root(self, name)
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        ChunkStore::meta(self, key)
    }
    fn metas(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        ChunkStore::metas(self, prefix)
    }
}

/// A read-only view of a store directory (see the module docs).
pub struct StoreView {
    s: Shared,
    /// Committed length of each live pack when the view opened.
    packs: BTreeMap<u32, u64>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
}

impl std::fmt::Debug for StoreView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreView").field("dir", &self.s.dir).finish_non_exhaustive()
    }
}

impl StoreView {
    /// Opens the store in `dir` read-only; it must exist.
    pub fn open(dir: &Path) -> Result<StoreView, StoreError> {
        let index_dir = dir.join("index");
        if !index_dir.join("CURRENT").exists() {
            return Err(StoreError::Index(format!("{} holds no chunk store", dir.display())));
        }
        let mut o = Options::default();
        o.set_paranoid_checks(true);
        let db =
            DB::open_cf_for_read_only(&o, &index_dir, [rocksdb::DEFAULT_COLUMN_FAMILY_NAME], false).map_err(|e| {
                StoreError::Index(format!("cannot open chunk index {} read-only: {e}", index_dir.display()))
            })?;
        let s = Shared {
            db,
            dir: dir.to_path_buf(),
            index_dir,
            packs_dir: dir.join("packs"),
            opts: StoreOptions::default(),
            puts_stored: AtomicU64::new(0),
            puts_present: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        };
        let mut packs = BTreeMap::new();
        for item in s.scan(&[K_PACK]) {
            let (key, value) = item?;
            let bad = |why: String| corrupt(format!("index {}: pack entry: {why}", s.index_dir.display()));
            let no = format::pack_key_no(&key).ok_or_else(|| bad(format!("key of {} bytes", key.len())))?;
            if let PackState::Live { len } = PackState::decode(&value).map_err(bad)? {
                packs.insert(no, len);
            }
        }
        Ok(StoreView { s, packs, readers: Mutex::new(HashMap::new()) })
    }

    fn reader(&self, id: &ChunkId, e: &format::ChunkEntry) -> Result<Arc<File>, StoreError> {
        let path = pack_path(&self.s.packs_dir, e.pack);
        match self.packs.get(&e.pack) {
            None => return Err(corrupt(format!("chunk {id} is said to be in pack {}, which does not exist", e.pack))),
            Some(&limit) if e.end() > limit => {
                return Err(corrupt(format!(
                    "chunk {id} is said to end at offset {} of pack {}, which holds {limit} bytes",
                    e.end(),
                    path.display()
                )));
            }
            Some(_) => {}
        }
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = readers.get(&e.pack) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(&path).map_err(|source| StoreError::Io {
            context: format!(
                "opening pack {} (a gc elsewhere may have rewritten it: open the view again)",
                path.display()
            ),
            source,
        })?);
        readers.insert(e.pack, f.clone());
        Ok(f)
    }

    /// The roots: name and chunk count, by name.
    pub fn roots(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self.s.scan(&[K_ROOT]) {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key[1..]).into_owned();
            let h = RootHeader::decode(&value)
                .map_err(|why| corrupt(format!("index {}: root {name:?}: {why}", self.s.index_dir.display())))?;
            out.push((name, h.count));
        }
        Ok(out)
    }
}

impl ChunkSource for StoreView {
    fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(e) = self.s.entry(id)? else { return Ok(None) };
        let file = self.reader(id, &e)?;
        let path = pack_path(&self.s.packs_dir, e.pack);
        let stored = pack::read_stored(&file, &path, id, &e)?;
        pack::decode(&path, id, &e, stored).map(Some)
    }

    fn root(&self, name: &str) -> Result<Option<Vec<ChunkId>>, StoreError> {
        let Some(v) = self.s.db.get(format::root_key(name)).map_err(|e| self.s.index_err("reading a root", e))? else {
            return Ok(None);
        };
        let h = RootHeader::decode(&v)
            .map_err(|why| corrupt(format!("index {}: root {name:?}: {why}", self.s.index_dir.display())))?;
        self.s.root_ids(name.as_bytes(), h.count).map(Some)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.s.db.get(format::meta_key(key)).map_err(|e| self.s.index_err("reading meta", e))? {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|_| corrupt(format!("index {}: meta {key:?} is not UTF-8", self.s.index_dir.display()))),
        }
    }

    fn metas(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        crate::manage::scan_metas(&self.s, prefix)
    }
}
