//! Disaster recovery beside the VM: the write-tracking map a sync to each
//! destination keeps, and the record of the last good sync that `wanmig dr
//! status` reads (`wanmig_dr::status`).
//!
//! A sync takes its destination's map before it reads anything and
//! finishes it with its outcome (`wanmig_vmm::tracking`): after a success
//! the map holds exactly what was written since the replica was read;
//! after a failure nothing handed over is lost.

use wanmig_migrate::report::{Outcome, Summary};
use wanmig_migrate::source::DiskBase;
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::vm::Vm;

use crate::protocol::{DiskTracking, MigrateRequest, Response, sync_map_name};

/// A sync's destination and the map it took on each disk.
#[derive(Debug, Clone)]
pub struct SyncTarget {
    dest: String,
    peer: String,
    map: String,
}

/// The map a sync to `req`'s destination keeps: one per destination key,
/// however its fingerprint was spelt.
fn map_for(req: &MigrateRequest) -> String {
    let peer = req.peer.parse::<wanmig_transport::Fingerprint>().map_or_else(|_| req.peer.clone(), |f| f.to_string());
    sync_map_name(&peer)
}

/// Per disk, what its map for `req`'s destination knows: the blocks
/// written since the last sync there, and that sync. Taken by a sync in
/// progress (`taken`), else as the map stands (a `send`, which leaves the
/// map alone: if it commits the VM is gone from here; if not, nothing
/// changed). `None` for a disk whose map cannot vouch for every write.
pub fn disk_bases(vm: &Vm, req: &MigrateRequest, taken: bool) -> Vec<Option<DiskBase>> {
    let map = map_for(req);
    (0..vm.config().disks.len())
        .map(|disk| {
            let maps = vm.disk_tracking(disk)?;
            let (written, since) = if taken { maps.taken_since(&map) } else { maps.tracked_since(&map) }?;
            Some(DiskBase { since: since.parse().ok()?, written })
        })
        .collect()
}

impl SyncTarget {
    /// Takes the destination's map on every disk (adding it, invalid, the
    /// first time): the blocks handed over ([`disk_bases`]) are what the
    /// sync sends if the destination still holds the last sync's replica.
    pub fn begin(vm: &Vm, req: &MigrateRequest) -> SyncTarget {
        let map = map_for(req);
        for disk in 0..vm.config().disks.len() {
            if let Some(maps) = vm.disk_tracking(disk)
                && let Err(e) = maps.take(&map)
            {
                eprintln!("wanmig: disk {disk}: write tracking for the sync: {}", wanmig_types::error_chain(&e));
            }
        }
        SyncTarget { dest: req.dest.clone(), peer: req.peer.clone(), map }
    }

    /// After the sync: the maps learn its outcome; a success is recorded
    /// for `wanmig dr status`.
    pub fn finish(&self, vm: &Vm, cfg: &VmConfig, outcome: Outcome, summary: &Summary) {
        let synced = outcome == Outcome::Synced;
        for disk in 0..vm.config().disks.len() {
            if let Some(maps) = vm.disk_tracking(disk) {
                // The map now counts from this sync, which the destination keeps.
                maps.finish(&self.map, synced.then_some(summary.migration_id.as_str()));
            }
        }
        if !synced {
            return;
        }
        let rec = wanmig_dr::status::LastSync {
            vm: cfg.name.clone(),
            migration_id: summary.migration_id.clone(),
            synced_unix: wanmig_dr::unix_now(),
            dest: self.dest.clone(),
            peer: self.peer.clone(),
            wire_bytes: summary.bytes.total,
            disk_bytes: summary.bytes.disk,
            total_ms: summary.total_ms as u64,
        };
        let path = wanmig_dr::status::path(&cfg.state_dir, &cfg.name);
        if let Err(e) = wanmig_dr::status::write(&path, &rec) {
            eprintln!("wanmig: the sync succeeded but is not recorded: {}", wanmig_types::error_chain(&e));
        }
    }
}

/// Every disk's maps.
pub fn tracking_status(vm: &Vm) -> Vec<DiskTracking> {
    (0..vm.config().disks.len())
        .filter_map(|disk| {
            let maps = vm.disk_tracking(disk)?;
            Some(DiskTracking { disk, maps: maps.status(), note: maps.note() })
        })
        .collect()
}

/// A `tracking` request.
pub fn tracking_request(vm: &Vm, add: Option<String>, reset: Option<String>, remove: Option<String>) -> Response {
    for disk in 0..vm.config().disks.len() {
        let Some(maps) = vm.disk_tracking(disk) else { continue };
        if let Some(name) = &add
            && let Err(e) = maps.add(name)
        {
            return Response::err(e);
        }
        if let Some(name) = &reset
            && !maps.reset(name)
        {
            return Response::err(format!("disk {disk} has no map {name:?}"));
        }
        if let Some(name) = &remove {
            maps.remove(name);
        }
    }
    Response { tracking: Some(tracking_status(vm)), ..Response::ok() }
}
