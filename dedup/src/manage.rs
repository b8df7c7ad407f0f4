//! Naming things in the store: removing roots, listing and removing meta.
//! (Setting a root is [`ChunkStore::set_root`].)

use rocksdb::WriteBatch;

use crate::format::{self, K_META};
use crate::{ChunkStore, StoreError};

/// Every meta key starting with `prefix` and its value, in key order, from
/// a scan of `s`.
pub(crate) fn scan_metas(s: &crate::store::Shared, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
    let mut out = Vec::new();
    for item in s.scan(&format::meta_key(prefix)) {
        let (key, value) = item?;
        let bad =
            |what: &str| crate::pack::corrupt(format!("index {}: a meta {what} is not UTF-8", s.index_dir.display()));
        let key = String::from_utf8(key[1..].to_vec()).map_err(|_| bad("key"))?;
        let value = String::from_utf8(value.to_vec()).map_err(|_| bad("value"))?;
        out.push((key, value));
    }
    Ok(out)
}

impl ChunkStore {
    /// Removes the roots named in `names` (those that exist), in one synced
    /// batch with the pending puts. Their chunks stay until a
    /// [`ChunkStore::gc`] finds no other root keeps them.
    pub fn remove_roots(&self, names: &[&str]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for name in names {
            let prefix = format::root_seg_prefix(name.as_bytes());
            let mut end = prefix.clone();
            end.extend_from_slice(&[0xff; 5]);
            batch.delete_range(&prefix, &end);
            batch.delete(format::root_key(name));
        }
        self.lock().commit(&self.s, Some(batch))
    }

    /// Every meta key that starts with `prefix`, with its value, by key.
    pub fn metas(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        scan_metas(&self.s, prefix)
    }

    /// Removes meta `key` (synced); nothing if it is not there.
    pub fn remove_meta(&self, key: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete(format::meta_key(key));
        self.s.write_sync(batch, "removing meta")
    }
}

// Meta keys are `m` + key: a prefix scan of `m` + prefix finds exactly the
// keys that start with it.
const _: () = assert!(K_META == b'm');
