//! Retention: dropping old roots, deleting unreferenced chunks, compacting
//! packs that are mostly dead.
//!
//! Compaction is crash-safe in three steps: the live chunks of a pack are
//! copied into the active pack and their new entries committed together with
//! the old pack's state set to retired; then the file is deleted; then the
//! retired state is forgotten. A crash after the first step leaves a retired
//! pack, which the next open deletes.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::time::Duration;

use rocksdb::WriteBatch;

use crate::format::{self, ChunkEntry, K_CHUNK, K_ROOT, K_TOTALS, PACK_HEADER_LEN, PackState, RootHeader};
use crate::pack::{self, corrupt, pack_path};
use crate::store::{io_err, sync_dir, unix_now};
use crate::{ChunkId, ChunkStore, StoreError};

/// The retention rule [`ChunkStore::gc`] applies.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Roots set longer ago than this are dropped (default 30 days).
    pub max_root_age: Duration,
    /// Chunks under no root are deleted only once stored at least this long
    /// ago, so that the chunks of a migration in flight, not yet under a
    /// root, survive (default 1 hour).
    pub grace: Duration,
    /// A pack is compacted when its live bytes fall under this fraction of
    /// its size (default 0.5). Packs with nothing live are always removed.
    pub compact_below: f64,
    /// Roots whose names start with one of these are never dropped for
    /// their age: whoever set them removes them ([`ChunkStore::remove_roots`]),
    /// e.g. points in time kept by retention rules of their own (default:
    /// none).
    pub keep_prefixes: Vec<String>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_root_age: Duration::from_secs(30 * 24 * 3600),
            grace: Duration::from_secs(3600),
            compact_below: 0.5,
            keep_prefixes: Vec::new(),
        }
    }
}

/// What [`ChunkStore::gc`] did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Roots older than the rule's age, dropped.
    pub roots_dropped: u64,
    /// Chunks deleted from the index.
    pub chunks_deleted: u64,
    /// Disk space given back: the size of the pack files removed, less the
    /// live bytes copied out of them. Deleted chunks in packs not compacted
    /// free nothing yet.
    pub bytes_freed: u64,
    /// Pack files compacted (live chunks copied out) and removed.
    pub packs_compacted: u64,
}

/// Age of something stamped `then`, at `now` (both unix seconds).
fn age(now: u64, then: u64) -> Duration {
    Duration::from_secs(now.saturating_sub(then))
}

impl ChunkStore {
    /// Applies `rule`: drops roots at least `max_root_age` old and roots
    /// past their expiry ([`ChunkStore::extend_root`]); deletes the
    /// index entries of chunks referenced by no remaining root and stored at
    /// least `grace` ago; then compacts packs whose live bytes fall under
    /// `compact_below` of their size, by copying their live chunks into the
    /// active pack, committing, and deleting the old files.
    ///
    /// Pending puts are committed first. Other calls wait while it runs. A
    /// corrupt chunk met while compacting stops it with
    /// [`StoreError::Corrupt`], before any pack is removed.
    pub fn gc(&self, rule: &Retention) -> Result<GcReport, StoreError> {
        let s = &self.s;
        let mut g = self.lock();
        g.check_broken()?;
        g.commit(s, None)?;
        let now = unix_now();
        let mut report = GcReport::default();
        let mut batch = WriteBatch::default();

        // Roots: drop the old ones, gather what the others keep alive.
        let mut live: HashSet<ChunkId> = HashSet::new();
        for item in s.scan(&[K_ROOT]) {
            let (key, value) = item?;
            let name = &key[1..];
            let h = RootHeader::decode(&value).map_err(|why| {
                corrupt(format!("index {}: root {:?}: {why}", s.index_dir.display(), String::from_utf8_lossy(name)))
            })?;
            let expired = h.expires_secs != 0 && now >= h.expires_secs;
            let kept = rule.keep_prefixes.iter().any(|p| name.starts_with(p.as_bytes()));
            if !kept && (expired || age(now, h.set_secs) >= rule.max_root_age) {
                let prefix = format::root_seg_prefix(name);
                let mut end = prefix.clone();
                end.extend_from_slice(&[0xff; 5]);
                batch.delete(&key);
                batch.delete_range(&prefix, &end);
                report.roots_dropped += 1;
            } else {
                live.extend(s.root_ids(name, h.count)?);
            }
        }

        // Chunks: delete the unreferenced old ones, count live bytes per pack.
        let mut live_bytes: HashMap<u32, u64> = HashMap::new();
        let mut totals = g.totals;
        for item in s.scan(&[K_CHUNK]) {
            let (key, value) = item?;
            let id = format::chunk_key_id(&key)
                .ok_or_else(|| corrupt(format!("index {}: chunk key of {} bytes", s.index_dir.display(), key.len())))?;
            let e = ChunkEntry::decode(&value).map_err(|why| s.bad_entry(&id, why))?;
            if !live.contains(&id) && age(now, e.added) >= rule.grace {
                batch.delete(&key);
                totals.remove(&e);
                report.chunks_deleted += 1;
            } else {
                *live_bytes.entry(e.pack).or_default() += e.record_len();
            }
        }
        batch.put(K_TOTALS, totals.encode());
        s.write_sync(batch, "gc: dropping roots and chunks")?;
        g.totals = totals;
        drop(live);

        // Packs: which to compact.
        let active = g.active.no;
        let doomed: HashSet<u32> = g
            .packs
            .iter()
            .filter(|&(&no, &len)| {
                let size = len.saturating_sub(PACK_HEADER_LEN);
                let alive = live_bytes.get(&no).copied().unwrap_or(0);
                if size == 0 {
                    // Never written to: remove unless it is where puts go.
                    no != active
                } else {
                    alive == 0 || (alive as f64) < rule.compact_below * size as f64
                }
            })
            .map(|(&no, _)| no)
            .collect();
        if doomed.is_empty() {
            return Ok(report);
        }
        if doomed.contains(&active) {
            g.roll_over(s)?;
        }

        // Copy the live chunks out, checking each on the way.
        let mut copied = 0u64;
        for item in s.scan(&[K_CHUNK]) {
            let (key, value) = item?;
            let id = format::chunk_key_id(&key)
                .ok_or_else(|| corrupt(format!("index {}: chunk key of {} bytes", s.index_dir.display(), key.len())))?;
            let e = ChunkEntry::decode(&value).map_err(|why| s.bad_entry(&id, why))?;
            if !doomed.contains(&e.pack) {
                continue;
            }
            let file = g.reader(s, &id, &e)?;
            let path = pack_path(&s.packs_dir, e.pack);
            let stored = pack::read_stored(&file, &path, &id, &e)?;
            pack::decode(&path, &id, &e, stored.clone())?;
            g.append(s, &id, e.codec, e.raw_len, &stored, e.added)?;
            copied += e.record_len();
            if g.pending_bytes >= s.opts.auto_commit_bytes {
                g.commit(s, None)?;
            }
        }

        // Commit the copies with the old packs retired, then remove them.
        let mut retire = WriteBatch::default();
        for &no in &doomed {
            retire.put(format::pack_key(no), PackState::Retired.encode());
        }
        g.commit(s, Some(retire))?;
        let mut removed = 0u64;
        let mut forget = WriteBatch::default();
        for &no in &doomed {
            g.packs.remove(&no);
            g.readers.remove(&no);
            let path = pack_path(&s.packs_dir, no);
            match fs::metadata(&path) {
                Ok(m) => removed += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("reading the size of {}", path.display()))(e)),
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing compacted pack {}", path.display()))(e)),
            }
            forget.delete(format::pack_key(no));
        }
        sync_dir(&s.packs_dir)?;
        s.write_sync(forget, "gc: forgetting removed packs")?;
        report.packs_compacted = doomed.len() as u64;
        report.bytes_freed = removed.saturating_sub(copied);
        Ok(report)
    }
}
