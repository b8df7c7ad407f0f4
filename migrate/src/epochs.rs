//! After a sync, at the destination: the replica it has just installed
//! becomes an epoch (`wanmig_dr::epoch`), the store's retention rules for
//! the VM are applied, and a gc frees what no epoch (or other root) holds
//! any longer. Runs after the source has its acknowledgement, off the
//! connection's task; a failure is logged, never undoes the sync.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use wanmig_dedup::{ChunkStore, Retention};
use wanmig_dr::epoch::{self, NewEpoch, NicFact, VmFacts};
use wanmig_types::{MigrationId, error_chain};
use wanmig_vmm::config::VmConfig;

/// What the VM looked like, for the epoch's record.
pub fn facts(config: &VmConfig) -> VmFacts {
    VmFacts {
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        nics: config.nets.iter().map(|n| NicFact { mac: n.mac.to_string(), ip: n.ip.map(|c| c.to_string()) }).collect(),
    }
}

/// Records the epoch of a sync whose replica images are `images`, prunes
/// and collects; tells `log` what it did.
pub async fn after_sync(
    store: Arc<ChunkStore>,
    config: &VmConfig,
    images: Vec<PathBuf>,
    migration_id: MigrationId,
    source: String,
    log: &dyn Fn(String),
) {
    let (vm, facts) = (config.name.clone(), facts(config));
    let work = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let new = NewEpoch {
            vm: &vm,
            migration_id: migration_id.to_string(),
            source,
            facts,
            images: &images,
            now: wanmig_dr::unix_now(),
        };
        let rec = epoch::record(&store, &new).map_err(|e| format!("no epoch recorded: {}", error_chain(&e)))?;
        let data: u64 = rec.disks.iter().map(|d| d.data_bytes).sum();
        let mut line = format!(
            "epoch {} of VM {vm} recorded ({}, {} disk(s), {:.1} MiB of data) in {:.0} ms",
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
