//! After a sync, at the destination: the replica it has just installed
//! becomes an epoch (`wanmig_dr::epoch`), the store's retention rules for
//! the VM are applied, and a gc frees what no epoch (or other root) holds
//! any longer. Runs after the source has its acknowledgement, off the
//! connection's task; a failure is logged, never undoes the sync.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use wanmig_dedup::{ChunkStore, Retention};
use wanmig_dr::epoch::{self, EpochRecord, NewEpoch, NicFact, VmFacts};
use wanmig_types::{MigrationId, error_chain};
use wanmig_vmm::config::VmConfig;

use crate::destination::disks::SinceBase;

/// What the VM looked like, for the epoch's record.
pub fn facts(config: &VmConfig) -> VmFacts {
    VmFacts {
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        nics: config.nets.iter().map(|n| NicFact { mac: n.mac.to_string(), ip: n.ip.map(|c| c.to_string()) }).collect(),
    }
}

/// A sync just installed.
#[derive(Debug)]
pub struct Synced {
    /// Its replica images, in disk order.
    pub images: Vec<PathBuf>,
    /// The sync.
    pub migration_id: MigrationId,
    /// Where it came from.
    pub source: String,
    /// When its images all started from an epoch: what changed since.
    pub since_base: Option<SinceBase>,
}

/// Records the epoch of a sync (only what changed is read and hashed
/// when its images started from an epoch), prunes and collects; tells
/// `log` what it did.
pub async fn after_sync(store: Arc<ChunkStore>, config: &VmConfig, sync: Synced, log: &dyn Fn(String)) {
    let (vm, facts) = (config.name.clone(), facts(config));
    let work = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let new = NewEpoch {
            vm: &vm,
            migration_id: sync.migration_id.to_string(),
            source: sync.source,
            facts,
            images: &sync.images,
            now: wanmig_dr::unix_now(),
        };
        let (rec, how) = record(&store, &new, sync.since_base).map_err(|e| format!("no epoch recorded: {e}"))?;
        let data: u64 = rec.disks.iter().map(|d| d.data_bytes).sum();
        let mut line = format!(
            "epoch {} of VM {vm} recorded ({}, {} disk(s), {:.1} MiB of data; {how}) in {:.0} ms",
            rec.id,
            rec.time(),
            rec.disks.len(),
            data as f64 / 1048576.0,
            t.elapsed().as_secs_f64() * 1e3
        );
        let rules = epoch::rules_for(&*store, &vm).map_err(|e| format!("{line}; retention: {}", error_chain(&e)))?;
        let pruned = epoch::prune(&store, &vm, &rules).map_err(|e| format!("{line}; prune: {}", error_chain(&e)))?;
        line += &format!("; retention {rules}: {} kept, removed {:?}", pruned.kept.len(), pruned.removed);
        if !pruned.removed.is_empty() || pruned.orphan_roots > 0 {
            let rule = Retention { keep_prefixes: vec![epoch::PREFIX.into()], ..Retention::default() };
            match store.gc(&rule) {
                Ok(r) => {
                    line += &format!(
                        "; gc deleted {} chunk(s), freed {:.1} MiB",
                        r.chunks_deleted,
                        r.bytes_freed as f64 / 1048576.0
                    )
                }
                Err(e) => line += &format!("; gc failed: {}", error_chain(&e)),
            }
        }
        Ok::<_, String>(line)
    });
    match work.await {
        Ok(Ok(line)) | Ok(Err(line)) => log(line),
        Err(e) => log(format!("no epoch recorded: {e}")),
    }
}

/// The new epoch: on top of the one the images started from when they
/// all did (reading only the pieces written blocks touch), else of the
/// whole images; with how it was made.
fn record(store: &ChunkStore, new: &NewEpoch<'_>, since: Option<SinceBase>) -> Result<(EpochRecord, String), String> {
    let why_whole = match since {
        None => "whole images".to_string(),
        Some(s) => {
            let on_top = epoch::find(store, new.vm, epoch::Which::Id(s.epoch))
                .and_then(|prev| epoch::record_incremental(store, new, &prev, &s.written, &s.digests));
            match on_top {
                Ok(rec) => return Ok((rec, format!("the blocks written since epoch {}", s.epoch))),
                // The epoch they started from may have been pruned meanwhile:
                // the whole images are still right here.
                Err(e) => format!("whole images, not on top of epoch {}: {}", s.epoch, error_chain(&e)),
            }
        }
    };
    epoch::record(store, new).map(|rec| (rec, why_whole)).map_err(|e| error_chain(&e))
}
