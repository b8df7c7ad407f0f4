//! Disaster recovery beside the VM: the write-tracking map a sync to each
//! destination keeps, and the record of the last good sync that `wanmig dr
//! status` reads (`wanmig_dr::status`).
//!
//! A sync takes its destination's map before it reads anything and
//! finishes it with its outcome (`wanmig_vmm::tracking`): after a success
//! the map holds exactly what was written since the replica was read;
//! after a failure nothing handed over is lost.

use wanmig_migrate::report::{Outcome, Summary};
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

impl SyncTarget {
    /// Takes the destination's map on every disk (adding it, invalid, the
    /// first time). The blocks handed over are what a block-level sync
    /// would send; today's sync compares digests and does not need them.
    pub fn begin(vm: &Vm, req: &MigrateRequest) -> SyncTarget {
        // One map per destination key, however its fingerprint was spelt.
        let peer =
            req.peer.parse::<wanmig_transport::Fingerprint>().map_or_else(|_| req.peer.clone(), |f| f.to_string());
        let map = sync_map_name(&peer);
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
                maps.finish(&self.map, synced);
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
