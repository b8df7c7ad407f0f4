//! Store tests: round trips, refusals, persistence, crashes, gc, and damage
//! to packs and to the index.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use crate::format::{self, PackState, RECORD_HEADER_LEN};
use crate::pack::pack_path;
use crate::{ChunkId, ChunkStore, MAX_CHUNK, Put, Retention, StoreError, StoreOptions};

/// Text-like data: compresses well.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = ["page", "disk", "chunk", "store", "kernel", "guest", "migrate", "zero"];
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    while out.len() < len {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 61) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
    out
}

/// Random-looking data: does not compress.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

fn put_new(store: &ChunkStore, data: &[u8]) -> ChunkId {
    let id = ChunkId::of(data);
    assert_eq!(store.put(&id, data).unwrap(), Put::Stored);
    id
}

/// Drops the store without its final commit, as a crash would.
fn crash(store: ChunkStore) {
    store.lock().skip_drop_commit = true;
    drop(store);
}

fn pack_file(dir: &Path, no: u32) -> PathBuf {
    pack_path(&dir.join("packs"), no)
}

fn open_err(dir: &Path) -> StoreError {
    match ChunkStore::open(dir) {
        Ok(_) => panic!("open of {} succeeded", dir.display()),
        Err(e) => e,
    }
}

fn no_grace() -> Retention {
    Retention { grace: Duration::ZERO, ..Retention::default() }
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ChunkStore>();
}

#[test]
fn chunk_id_formats() {
    let id = ChunkId::of(b"");
    // blake3 of the empty string.
    assert_eq!(id.to_string(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
    assert_eq!(format!("{id:?}"), "ChunkId(af1349b9f5f9a1a6)");
}

#[test]
fn round_trip_compressible_and_incompressible() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let t = text(1, 65536);
    let n = noise(2, 65536);
    let e: Vec<u8> = Vec::new();
    let ti = put_new(&store, &t);
    let ni = put_new(&store, &n);
    let ei = put_new(&store, &e);
    // Visible before commit, and after.
    for _ in 0..2 {
        assert_eq!(store.get(&ti).unwrap().as_deref(), Some(&t[..]));
        assert_eq!(store.get(&ni).unwrap().as_deref(), Some(&n[..]));
        assert_eq!(store.get(&ei).unwrap().as_deref(), Some(&e[..]));
        store.commit().unwrap();
    }
    let te = store.s.entry(&ti).unwrap().unwrap();
    let ne = store.s.entry(&ni).unwrap().unwrap();
    assert_eq!(te.codec, format::Codec::Zstd);
    assert!(te.stored_len < 65536 / 2, "text stored in {} bytes", te.stored_len);
    assert_eq!((ne.codec, ne.stored_len), (format::Codec::Raw, 65536));
    let st = store.stats();
    assert_eq!(st.chunks, 3);
    assert_eq!(st.raw_bytes, 2 * 65536);
    assert_eq!(st.stored_bytes, u64::from(te.stored_len) + 65536);
    assert_eq!((st.puts_stored, st.gets), (3, 6));
    assert_eq!(store.get(&ChunkId::of(b"absent")).unwrap(), None);
}

#[test]
fn wrong_content_is_refused_and_nothing_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let claimed = ChunkId::of(b"what the source said");
    let err = store.put(&claimed, b"what arrived").unwrap_err();
    match &err {
        StoreError::HashMismatch { expected, actual } => {
            assert_eq!(*expected, claimed);
            assert_eq!(*actual, ChunkId::of(b"what arrived"));
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(err.to_string().starts_with("chunk content does not match its id: expected "));
    assert!(!store.contains(&claimed).unwrap());
    assert!(!store.contains(&ChunkId::of(b"what arrived")).unwrap());
    assert_eq!(store.lock().active.len, format::PACK_HEADER_LEN, "bytes were written to the pack");
    store.commit().unwrap();
    assert_eq!(store.stats().chunks, 0);
    assert_eq!(store.get(&claimed).unwrap(), None);
}

#[test]
fn too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let big = vec![7u8; MAX_CHUNK + 1];
    assert!(matches!(store.put(&ChunkId::of(&big), &big), Err(StoreError::TooLarge(n)) if n == MAX_CHUNK + 1));
    let max = vec![7u8; MAX_CHUNK];
    put_new(&store, &max);
    assert_eq!(store.get(&ChunkId::of(&max)).unwrap().unwrap(), max);
}

#[test]
fn put_twice_is_present() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let d = text(3, 5000);
    let id = put_new(&store, &d);
    // Present while pending, and once committed.
    assert_eq!(store.put(&id, &d).unwrap(), Put::Present);
    store.commit().unwrap();
    assert_eq!(store.put(&id, &d).unwrap(), Put::Present);
    let st = store.stats();
    assert_eq!((st.chunks, st.puts_stored, st.puts_present), (1, 1, 2));
}

#[test]
fn persists_across_reopen_with_stats() {
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    let before = {
        let store = ChunkStore::open(dir.path()).unwrap();
        for i in 0..20 {
            let d = if i % 2 == 0 { text(i, 10_000 + i as usize) } else { noise(i, 3000) };
            ids.push((put_new(&store, &d), d));
        }
        store.set_meta("chunking", "fastcdc 16k/64k/256k").unwrap();
        store.commit().unwrap();
        store.stats()
    };
    let store = ChunkStore::open(dir.path()).unwrap();
    let after = store.stats();
    assert_eq!(
        (after.chunks, after.raw_bytes, after.stored_bytes, after.packs),
        (before.chunks, before.raw_bytes, before.stored_bytes, before.packs)
    );
    assert_eq!(after.chunks, 20);
    assert_eq!((after.puts_stored, after.gets), (0, 0), "process counters start at zero");
    for (id, d) in &ids {
        assert_eq!(store.get(id).unwrap().as_ref(), Some(d));
    }
    assert_eq!(store.meta("chunking").unwrap().as_deref(), Some("fastcdc 16k/64k/256k"));
    assert_eq!(store.meta("other").unwrap(), None);
    assert_eq!(store.verify().unwrap().bad, vec![]);
}

#[test]
fn clean_drop_commits() {
    let dir = tempfile::tempdir().unwrap();
    let d = text(4, 9000);
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        put_new(&store, &d);
    }
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.get(&ChunkId::of(&d)).unwrap(), Some(d));
    assert_eq!(store.stats().chunks, 1);
}

#[test]
fn crash_loses_only_uncommitted_puts_and_cuts_the_pack_tail() {
    let dir = tempfile::tempdir().unwrap();
    let a = text(5, 20_000);
    let b = noise(6, 20_000);
    let committed_len = {
        let store = ChunkStore::open(dir.path()).unwrap();
        put_new(&store, &a);
        store.commit().unwrap();
        let len = store.lock().active.len;
        put_new(&store, &b);
        crash(store);
        len
    };
    assert!(fs::metadata(pack_file(dir.path(), 1)).unwrap().len() > committed_len);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(fs::metadata(pack_file(dir.path(), 1)).unwrap().len(), committed_len);
    assert_eq!(store.get(&ChunkId::of(&a)).unwrap(), Some(a));
    assert!(!store.contains(&ChunkId::of(&b)).unwrap());
    assert_eq!(store.stats().chunks, 1);
    // The store carries on where the committed data end.
    put_new(&store, &b);
    store.commit().unwrap();
    assert_eq!(store.get(&ChunkId::of(&b)).unwrap(), Some(b));
    assert!(store.verify().unwrap().bad.is_empty());
}

#[test]
fn auto_commit_makes_puts_durable_without_commit() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { auto_commit_bytes: 50_000, ..StoreOptions::default() };
    let ids: Vec<ChunkId> = {
        let store = ChunkStore::open_with(dir.path(), &opts).unwrap();
        let ids = (0..5).map(|i| put_new(&store, &noise(i, 20_000))).collect();
        crash(store);
        ids
    };
    let store = ChunkStore::open(dir.path()).unwrap();
    // 3 x 20 kB passes 50 kB: the first three were committed, the rest lost.
    assert_eq!(store.contains_many(&ids).unwrap(), vec![true, true, true, false, false]);
    assert_eq!(store.stats().chunks, 3);
}

#[test]
fn contains_many_mixes_pending_committed_and_absent() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let committed: Vec<ChunkId> = (0..50).map(|i| put_new(&store, &text(i, 1000))).collect();
    store.commit().unwrap();
    let pending: Vec<ChunkId> = (100..150).map(|i| put_new(&store, &text(i, 1000))).collect();
    let absent: Vec<ChunkId> = (200..250).map(|i| ChunkId::of(&text(i, 1000))).collect();
    let mut ids = Vec::new();
    let mut want = Vec::new();
    for i in 0..50 {
        ids.extend([absent[i], committed[i], pending[i]]);
        want.extend([false, true, true]);
    }
    assert_eq!(store.contains_many(&ids).unwrap(), want);
    assert_eq!(store.contains_many(&[]).unwrap(), Vec::<bool>::new());
    // More ids than one multi-get batch.
    let many: Vec<ChunkId> = (0..10_000u64).map(|i| ChunkId::of(&i.to_le_bytes())).chain(committed.clone()).collect();
    let found = store.contains_many(&many).unwrap();
    assert_eq!(found.iter().filter(|&&f| f).count(), 50);
    assert!(found[10_000..].iter().all(|&f| f));
}

#[test]
fn roots_are_set_replaced_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let ids: Vec<ChunkId> = (0..70_000u64).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    store.set_root("vm/disk0", &ids).unwrap();
    store.set_root("vm/disk1", &ids[..3]).unwrap();
    assert_eq!(store.root("vm/disk0").unwrap().unwrap(), ids);
    // Replacing with fewer ids leaves no segment of the old root behind.
    store.set_root("vm/disk0", &ids[..10]).unwrap();
    assert_eq!(store.root("vm/disk0").unwrap().unwrap(), &ids[..10]);
    let roots = store.roots().unwrap();
    let names: Vec<_> = roots.iter().map(|r| (r.name.as_str(), r.chunks)).collect();
    assert_eq!(names, [("vm/disk0", 10), ("vm/disk1", 3)]);
    assert!(roots[0].set_unix_secs > 1_600_000_000);
    assert_eq!(store.root("vm/disk").unwrap(), None);
}

#[test]
fn gc_keeps_rooted_chunks_deletes_old_unreferenced_and_compacts() {
    let dir = tempfile::tempdir().unwrap();
    let kept: Vec<Vec<u8>> = (0..4).map(|i| text(i, 8000)).collect();
    let dead: Vec<Vec<u8>> = (10..20).map(|i| noise(i, 30_000)).collect();
    let kept_ids: Vec<ChunkId>;
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        kept_ids = kept.iter().map(|d| put_new(&store, d)).collect();
        for d in &dead {
            put_new(&store, d);
        }
        store.set_root("vm/disk0", &kept_ids).unwrap();
        // With the default grace, nothing fresh is deleted.
        let r = store.gc(&Retention::default()).unwrap();
        assert_eq!((r.roots_dropped, r.chunks_deleted, r.packs_compacted), (0, 0, 0));
        assert_eq!(store.stats().chunks, 14);

        let old_pack = pack_file(dir.path(), 1);
        let old_size = fs::metadata(&old_pack).unwrap().len();
        let r = store.gc(&no_grace()).unwrap();
        assert_eq!(r.roots_dropped, 0);
        assert_eq!(r.chunks_deleted, 10);
        assert_eq!(r.packs_compacted, 1);
        assert!(r.bytes_freed >= 300_000 && r.bytes_freed < old_size, "freed {}", r.bytes_freed);
        assert!(!old_pack.exists(), "the compacted pack is still there");
        for (id, d) in kept_ids.iter().zip(&kept) {
            assert_eq!(store.get(id).unwrap().as_ref(), Some(d));
            assert_eq!(store.s.entry(id).unwrap().unwrap().pack, 2);
        }
        for d in &dead {
            assert!(!store.contains(&ChunkId::of(d)).unwrap());
        }
        let st = store.stats();
        assert_eq!((st.chunks, st.raw_bytes, st.packs), (4, 32_000, 1));
    }
    let store = ChunkStore::open(dir.path()).unwrap();
    for (id, d) in kept_ids.iter().zip(&kept) {
        assert_eq!(store.get(id).unwrap().as_ref(), Some(d));
    }
    let st = store.stats();
    assert_eq!((st.chunks, st.raw_bytes, st.packs), (4, 32_000, 1));
    assert!(store.verify().unwrap().bad.is_empty());

    // Roots age out; then their chunks go too.
    let r = store.gc(&Retention { max_root_age: Duration::ZERO, ..no_grace() }).unwrap();
    assert_eq!((r.roots_dropped, r.chunks_deleted, r.packs_compacted), (1, 4, 1));
    assert!(store.roots().unwrap().is_empty());
    assert_eq!(store.stats().chunks, 0);
}

#[test]
fn gc_over_many_packs_compacts_only_mostly_dead_ones() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { pack_target: 100_000, ..StoreOptions::default() };
    let store = ChunkStore::open_with(dir.path(), &opts).unwrap();
    // 30 kB chunks, three to a pack.
    let data: Vec<Vec<u8>> = (0..12).map(|i| noise(i, 30_000)).collect();
    let ids: Vec<ChunkId> = data.iter().map(|d| put_new(&store, d)).collect();
    store.commit().unwrap();
    assert_eq!(store.stats().packs, 4);
    let by_pack = |id: &ChunkId| store.s.entry(id).unwrap().unwrap().pack;
    assert_eq!(ids.iter().map(by_pack).collect::<Vec<_>>(), [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
    // Pack 1: all live. Pack 2: 2 of 3 live. Pack 3: 1 of 3 live. Pack 4: none.
    let keep = [0, 1, 2, 3, 4, 6];
    let root: Vec<ChunkId> = keep.iter().map(|&i| ids[i]).collect();
    store.set_root("r", &root).unwrap();
    let r = store.gc(&no_grace()).unwrap();
    assert_eq!((r.chunks_deleted, r.packs_compacted), (6, 2));
    assert!(pack_file(dir.path(), 1).exists() && pack_file(dir.path(), 2).exists());
    assert!(!pack_file(dir.path(), 3).exists() && !pack_file(dir.path(), 4).exists());
    assert_eq!(by_pack(&ids[6]), 5);
    for &i in &keep {
        assert_eq!(store.get(&ids[i]).unwrap().as_ref(), Some(&data[i]));
    }
    assert_eq!(store.stats().packs, 3);
    drop(store);
    let store = ChunkStore::open_with(dir.path(), &opts).unwrap();
    assert!(store.verify().unwrap().bad.is_empty());
    assert_eq!(store.verify().unwrap().chunks, 6);
}

#[test]
fn open_finishes_removing_retired_packs() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { pack_target: 50_000, ..StoreOptions::default() };
    let (a, b) = (noise(1, 30_000), noise(2, 30_000));
    {
        let store = ChunkStore::open_with(dir.path(), &opts).unwrap();
        put_new(&store, &a);
        put_new(&store, &b);
        store.commit().unwrap();
        // As if a gc stopped after retiring pack 1 (holding no live chunk).
        store.s.db.delete(format::chunk_key(&ChunkId::of(&a))).unwrap();
        store.s.db.put(format::pack_key(1), PackState::Retired.encode()).unwrap();
    }
    assert!(pack_file(dir.path(), 1).exists());
    let store = ChunkStore::open_with(dir.path(), &opts).unwrap();
    assert!(!pack_file(dir.path(), 1).exists());
    assert_eq!(store.s.db.get(format::pack_key(1)).unwrap(), None);
    assert_eq!(store.get(&ChunkId::of(&b)).unwrap(), Some(b));
}

/// Flips one byte of a chunk's stored data in its pack.
fn flip_byte_of(store: &ChunkStore, dir: &Path, id: &ChunkId, at: u64) {
    let e = store.s.entry(id).unwrap().unwrap();
    let f = OpenOptions::new().read(true).write(true).open(pack_file(dir, e.pack)).unwrap();
    let pos = e.offset + RECORD_HEADER_LEN as u64 + at;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], pos).unwrap();
}

#[test]
fn corrupt_byte_in_pack_is_detected_by_get_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let good = put_new(&store, &text(1, 30_000));
    let raw = put_new(&store, &noise(2, 30_000));
    let zst = put_new(&store, &text(3, 30_000));
    store.commit().unwrap();
    flip_byte_of(&store, dir.path(), &raw, 12_345);
    flip_byte_of(&store, dir.path(), &zst, 100);
    for id in [raw, zst] {
        match store.get(&id) {
            Err(StoreError::Corrupt(msg)) => {
                assert!(msg.contains("00000001.pack") && msg.contains(&id.to_string()), "{msg}");
                assert!(msg.contains("not trusted"), "{msg}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    assert!(store.get(&good).unwrap().is_some());
    let mut report = store.verify().unwrap();
    report.bad.sort();
    let mut want = vec![raw, zst];
    want.sort();
    assert_eq!((report.chunks, report.bad), (3, want));
    // gc refuses to copy a corrupt chunk into a new pack, and removes nothing.
    store.set_root("r", &[raw, zst]).unwrap();
    let rule = Retention { compact_below: 1.0, ..no_grace() };
    assert!(matches!(store.gc(&rule), Err(StoreError::Corrupt(_))));
    assert!(pack_file(dir.path(), 1).exists());
    assert!(matches!(store.get(&raw), Err(StoreError::Corrupt(_))));
    assert_eq!(store.get(&good).unwrap(), None, "the unreferenced chunk was deleted before compaction");
}

#[test]
fn record_header_must_match_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let a = put_new(&store, &text(1, 1000));
    let b = put_new(&store, &text(2, 1000));
    store.commit().unwrap();
    // Point a's entry at b's record.
    let mut e = store.s.entry(&a).unwrap().unwrap();
    let eb = store.s.entry(&b).unwrap().unwrap();
    (e.offset, e.stored_len, e.raw_len) = (eb.offset, eb.stored_len, eb.raw_len);
    store.s.db.put(format::chunk_key(&a), e.encode()).unwrap();
    match store.get(&a) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains(&format!("the record there is chunk {b}")), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // An entry past the pack's committed end.
    e.offset = 1 << 40;
    store.s.db.put(format::chunk_key(&a), e.encode()).unwrap();
    assert!(matches!(store.get(&a), Err(StoreError::Corrupt(_))));
    // An entry of the wrong length is Corrupt, not a panic.
    store.s.db.put(format::chunk_key(&a), [1u8; 7]).unwrap();
    match store.get(&a) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("7 bytes"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(store.verify().unwrap().bad, vec![a]);
}

#[test]
fn truncated_pack_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        put_new(&store, &noise(1, 10_000));
    }
    let path = pack_file(dir.path(), 1);
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1).unwrap();
    match open_err(dir.path()) {
        StoreError::Corrupt(msg) => {
            assert!(msg.contains(&path.display().to_string()) && msg.contains("truncated"), "{msg}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    fs::remove_file(&path).unwrap();
    assert!(matches!(open_err(dir.path()), StoreError::Corrupt(msg) if msg.contains("missing")));
}

#[test]
fn stray_pack_files_and_a_lost_index_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        put_new(&store, &noise(1, 10_000));
    }
    fs::write(pack_file(dir.path(), 9), b"stray").unwrap();
    assert!(matches!(open_err(dir.path()), StoreError::Corrupt(msg) if msg.contains("00000009.pack")));
    fs::remove_file(pack_file(dir.path(), 9)).unwrap();
    ChunkStore::open(dir.path()).unwrap();
    // Without its index the store is not an empty store.
    fs::remove_dir_all(dir.path().join("index")).unwrap();
    assert!(matches!(open_err(dir.path()), StoreError::Corrupt(msg) if msg.contains("pack files exist")));
    assert!(matches!(open_err(dir.path()), StoreError::Corrupt(_)), "refused only once");
}

/// A store with enough history that its index has SST files.
fn store_with_history(dir: &Path) -> Vec<ChunkId> {
    let mut ids = Vec::new();
    for round in 0..3 {
        let store = ChunkStore::open(dir).unwrap();
        for i in 0..200 {
            ids.push(put_new(&store, &text(round * 1000 + i, 100)));
        }
    }
    ids
}

fn index_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name().unwrap().to_str().unwrap().starts_with(prefix) || p.extension().is_some_and(|e| e == prefix)
        })
        .collect();
    out.sort();
    out
}

fn assert_index_refused(dir: &Path) {
    match open_err(dir) {
        StoreError::Index(msg) | StoreError::Corrupt(msg) => {
            assert!(msg.contains(&dir.join("index").display().to_string()), "{msg}");
        }
        other => panic!("expected an index error, got {other:?}"),
    }
}

#[test]
fn garbled_current_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path());
    fs::write(dir.path().join("index/CURRENT"), b"MANIFEST-999999\n").unwrap();
    assert_index_refused(dir.path());
    fs::write(dir.path().join("index/CURRENT"), b"").unwrap();
    assert_index_refused(dir.path());
    fs::remove_file(dir.path().join("index/CURRENT")).unwrap();
    assert_index_refused(dir.path());
}

#[test]
fn truncated_or_garbled_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path());
    let manifests = index_files(dir.path(), "MANIFEST");
    let manifest = manifests.last().unwrap();
    let bytes = fs::read(manifest).unwrap();
    let mut garbled = bytes.clone();
    for b in &mut garbled[20..60] {
        *b ^= 0x5a;
    }
    fs::write(manifest, &garbled).unwrap();
    assert_index_refused(dir.path());
    fs::write(manifest, &bytes[..bytes.len() / 2]).unwrap();
    assert_index_refused(dir.path());
}

#[test]
fn truncated_sst_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    store_with_history(dir.path());
    let ssts = index_files(dir.path(), "sst");
    assert!(!ssts.is_empty(), "the index has no SST file to damage");
    for sst in &ssts {
        let len = fs::metadata(sst).unwrap().len();
        OpenOptions::new().write(true).open(sst).unwrap().set_len(len / 2).unwrap();
    }
    assert_index_refused(dir.path());
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChunkStore::open(dir.path()).unwrap();
        put_new(&store, &text(1, 100));
        store.s.db.put(format::K_VERSION, 2u32.to_le_bytes()).unwrap();
    }
    match open_err(dir.path()) {
        StoreError::Index(msg) => assert!(msg.contains("format version 2") && msg.contains("reads version 1"), "{msg}"),
        other => panic!("expected Index, got {other:?}"),
    }
}

#[test]
fn second_open_is_refused_as_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    match open_err(dir.path()) {
        StoreError::Index(msg) => assert!(msg.contains("in use"), "{msg}"),
        other => panic!("expected Index, got {other:?}"),
    }
    drop(store);
    ChunkStore::open(dir.path()).unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Put(usize),
    PutWrong(usize, usize),
    Get(usize),
    ContainsMany(Vec<usize>),
    Commit,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..POOL).prop_map(Op::Put),
        1 => (0..POOL, 0..POOL).prop_map(|(a, b)| Op::PutWrong(a, b)),
        3 => (0..POOL).prop_map(Op::Get),
        2 => proptest::collection::vec(0..POOL, 0..6).prop_map(Op::ContainsMany),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

const POOL: usize = 8;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random sequences of operations agree with a HashMap model that
    /// forgets uncommitted puts on a crash.
    #[test]
    fn store_matches_a_hashmap_model(
        pool in proptest::collection::vec((any::<u64>(), 0..3000usize, any::<bool>()), POOL),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let pool: Vec<Vec<u8>> =
            pool.iter().map(|&(seed, len, compressible)| if compressible { text(seed, len) } else { noise(seed, len) }).collect();
        let ids: Vec<ChunkId> = pool.iter().map(|d| ChunkId::of(d)).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut store = ChunkStore::open(dir.path()).unwrap();
        let mut committed: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        let mut pending: HashMap<ChunkId, Vec<u8>> = HashMap::new();
        for op in ops {
            match op {
                Op::Put(i) => {
                    let present = committed.contains_key(&ids[i]) || pending.contains_key(&ids[i]);
                    let got = store.put(&ids[i], &pool[i]).unwrap();
                    prop_assert_eq!(got, if present { Put::Present } else { Put::Stored });
                    if !present {
                        pending.insert(ids[i], pool[i].clone());
                    }
                }
                Op::PutWrong(i, j) => {
                    let r = store.put(&ids[i], &pool[j]);
                    if pool[i] == pool[j] {
                        prop_assert!(r.is_ok());
                        if !committed.contains_key(&ids[i]) {
                            pending.insert(ids[i], pool[i].clone());
                        }
                    } else {
                        let is_mismatch = matches!(r, Err(StoreError::HashMismatch { .. }));
                        prop_assert!(is_mismatch);
                    }
                }
                Op::Get(i) => {
                    let want = committed.get(&ids[i]).or(pending.get(&ids[i]));
                    let got = store.get(&ids[i]).unwrap();
                    prop_assert_eq!(got.as_ref(), want);
                }
                Op::ContainsMany(is) => {
                    let asked: Vec<ChunkId> = is.iter().map(|&i| ids[i]).collect();
                    let want: Vec<bool> =
                        asked.iter().map(|id| committed.contains_key(id) || pending.contains_key(id)).collect();
                    prop_assert_eq!(store.contains_many(&asked).unwrap(), want);
                }
                Op::Commit | Op::Reopen => {
                    if matches!(op, Op::Commit) {
                        store.commit().unwrap();
                    } else {
                        drop(store);
                        store = ChunkStore::open(dir.path()).unwrap();
                    }
                    committed.extend(pending.drain());
                }
                Op::Crash => {
                    crash(store);
                    store = ChunkStore::open(dir.path()).unwrap();
                    pending.clear();
                }
            }
            let st = store.stats();
            prop_assert_eq!(st.chunks as usize, committed.len() + pending.len());
            let raw: usize = committed.values().chain(pending.values()).map(Vec::len).sum();
            prop_assert_eq!(st.raw_bytes as usize, raw);
        }
        prop_assert!(store.verify().unwrap().bad.is_empty());
    }
}

#[test]
fn an_attempts_root_grows_expires_and_gives_way_to_the_images_root() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let data: Vec<Vec<u8>> = (0..4).map(|i| text(100 + i, 5000)).collect();
    let ids: Vec<ChunkId> = data.iter().map(|d| put_new(&store, d)).collect();
    let day = Duration::from_secs(24 * 3600);
    // Grown a manifest part at a time; more ids than a segment holds.
    let many: Vec<ChunkId> = (0..70_000u64).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
    store.extend_root("attempt/aa", &ids[..2], day).unwrap();
    store.extend_root("attempt/aa", &many, day).unwrap();
    store.extend_root("attempt/aa", &ids[2..3], day).unwrap();
    let mut want = ids[..2].to_vec();
    want.extend(&many);
    want.push(ids[2]);
    assert_eq!(store.root("attempt/aa").unwrap().unwrap(), want);
    let info = &store.roots().unwrap()[0];
    let expires = info.expires_unix_secs.expect("it expires");
    assert!(expires >= info.set_unix_secs + day.as_secs() - 1, "{info:?}");
    // Alive until it expires: gc keeps its chunks, not the unrooted one.
    let r = store.gc(&no_grace()).unwrap();
    assert_eq!((r.roots_dropped, r.chunks_deleted), (0, 1));
    assert!(store.contains(&ids[2]).unwrap() && !store.contains(&ids[3]).unwrap());
    // An attempt whose root has expired: the next gc drops it and its chunks.
    store.extend_root("attempt/bb", &ids[2..3], Duration::ZERO).unwrap();
    store.replace_roots(&[("vm/disk0", &ids[..2])], &["attempt/aa"]).unwrap();
    let names: Vec<_> = store.roots().unwrap().into_iter().map(|r| (r.name, r.expires_unix_secs.is_some())).collect();
    assert_eq!(names, [("attempt/bb".to_string(), true), ("vm/disk0".to_string(), false)]);
    std::thread::sleep(Duration::from_millis(1100));
    let r = store.gc(&no_grace()).unwrap();
    assert_eq!((r.roots_dropped, r.chunks_deleted), (1, 1));
    assert!(store.contains(&ids[0]).unwrap() && store.contains(&ids[1]).unwrap() && !store.contains(&ids[2]).unwrap());
    // Durable across a reopen.
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.root("vm/disk0").unwrap().unwrap(), &ids[..2]);
}

#[test]
fn roots_under_a_kept_prefix_never_age_out_and_removed_roots_free_their_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    let ids: Vec<ChunkId> = (0..3).map(|i| put_new(&store, &text(300 + i, 9000))).collect();
    store.set_root("epoch/vm/100/disk0", &ids[..1]).unwrap();
    store.set_root("epoch/vm/200/disk0", &ids[1..2]).unwrap();
    store.set_root("vm/disk0", &ids[2..]).unwrap();
    // Every root is older than zero: only the kept prefix survives its age.
    let rule = Retention { max_root_age: Duration::ZERO, keep_prefixes: vec!["epoch/".into()], ..no_grace() };
    let r = store.gc(&rule).unwrap();
    assert_eq!((r.roots_dropped, r.chunks_deleted), (1, 1));
    assert!(store.contains(&ids[0]).unwrap() && store.contains(&ids[1]).unwrap());
    // Removed by their owner: gone, and their chunks with the next gc.
    store.remove_roots(&["epoch/vm/100/disk0", "no/such/root"]).unwrap();
    assert_eq!(store.roots().unwrap().iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["epoch/vm/200/disk0"]);
    let r = store.gc(&rule).unwrap();
    assert_eq!(r.chunks_deleted, 1);
    assert!(!store.contains(&ids[0]).unwrap() && store.contains(&ids[1]).unwrap());
}

#[test]
fn meta_lists_by_prefix_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path()).unwrap();
    store.set_meta("epoch/a/2", "two").unwrap();
    store.set_meta("epoch/a/1", "one").unwrap();
    store.set_meta("epoch/b/1", "other").unwrap();
    store.set_meta("epochs", "not under epoch/").unwrap();
    let a = store.metas("epoch/a/").unwrap();
    assert_eq!(a, [("epoch/a/1".to_string(), "one".to_string()), ("epoch/a/2".into(), "two".into())]);
    assert_eq!(store.metas("epoch/").unwrap().len(), 3);
    store.remove_meta("epoch/a/1").unwrap();
    store.remove_meta("epoch/none").unwrap();
    assert_eq!(store.metas("epoch/a/").unwrap().len(), 1);
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(store.meta("epoch/a/1").unwrap(), None);
    assert_eq!(store.meta("epoch/a/2").unwrap().as_deref(), Some("two"));
}

#[test]
fn a_view_reads_what_was_committed_while_the_store_stays_open_and_writes_nothing() {
    use crate::{ChunkSource, StoreView};
    let dir = tempfile::tempdir().unwrap();
    assert!(StoreView::open(dir.path()).is_err(), "no store there");
    let store = ChunkStore::open(dir.path()).unwrap();
    let data: Vec<Vec<u8>> = (0..3).map(|i| text(400 + i, 20_000)).collect();
    let ids: Vec<ChunkId> = data.iter().map(|d| put_new(&store, d)).collect();
    store.set_root("r", &ids).unwrap();
    store.set_meta("k/1", "v").unwrap();
    let pending = put_new(&store, &noise(9, 5000));
    // The store stays open (its RocksDB lock held) while the view reads.
    let view = StoreView::open(dir.path()).unwrap();
    assert_eq!(view.root("r").unwrap().unwrap(), ids);
    for (id, d) in ids.iter().zip(&data) {
        assert_eq!(view.get(id).unwrap().as_deref(), Some(d.as_slice()));
    }
    assert_eq!(view.get(&pending).unwrap(), None, "not committed when the view opened");
    assert_eq!(view.metas("k/").unwrap(), [("k/1".to_string(), "v".to_string())]);
    assert_eq!(view.meta("k/2").unwrap(), None);
    assert_eq!(view.roots().unwrap(), [("r".to_string(), 3)]);
    // A damaged record is an error, never data.
    let mut entry = None;
    for item in store.s.scan(&[format::K_CHUNK]) {
        let (k, v) = item.unwrap();
        if format::chunk_key_id(&k) == Some(ids[1]) {
            entry = Some(format::ChunkEntry::decode(&v).unwrap());
        }
    }
    let e = entry.unwrap();
    let f = OpenOptions::new().write(true).open(pack_file(dir.path(), e.pack)).unwrap();
    f.write_all_at(&[0xAA; 8], e.offset + RECORD_HEADER_LEN as u64 + 10).unwrap();
    let view = StoreView::open(dir.path()).unwrap();
    assert!(matches!(view.get(&ids[1]), Err(StoreError::Corrupt(_))));
    drop(view);
    // The store saw no write from the views: it reopens and its pending
    // chunk commits.
    drop(store);
    let store = ChunkStore::open(dir.path()).unwrap();
    assert!(store.contains(&pending).unwrap());
}
