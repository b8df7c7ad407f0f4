//! The source's record of its last good sync, `STATE_DIR/NAME.dr.json`
//! beside the migration journal: written (atomically, synced) by the
//! process that runs the VM each time a sync succeeds, read by `wanmig dr
//! status` to report the recovery point and its age against a target RPO.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DrError;

/// The last good sync of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSync {
    /// The VM.
    pub vm: String,
    /// The sync's migration id (the destination's epoch records it).
    pub migration_id: String,
    /// When it completed, unix seconds (the source's clock).
    pub synced_unix: u64,
    /// The destination, `host:port`.
    pub dest: String,
    /// The destination's fingerprint.
    pub peer: String,
    /// Bytes it put on the wire.
    pub wire_bytes: u64,
    /// Of which disk data.
    pub disk_bytes: u64,
    /// Its duration, ms.
    pub total_ms: u64,
}

/// Where the record of VM `name` lives in `state_dir`.
pub fn path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("{name}.dr.json"))
}

/// Writes `rec` to `path` atomically: a temporary file, synced, renamed
/// over the old one, the directory synced.
pub fn write(path: &Path, rec: &LastSync) -> Result<(), DrError> {
    use std::io::Write;
    let io = |what: &str| {
        let context = format!("{what} {}", path.display());
        move |source| DrError::Io { context, source }
    };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("cannot create"))?;
    f.write_all(serde_json::to_string_pretty(rec).expect("a record serializes").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("cannot write"))?;
    std::fs::rename(&tmp, path).map_err(io("cannot install"))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot sync the directory of"))
}

/// The record at `path`, if any.
pub fn read(path: &Path) -> Result<Option<LastSync>, DrError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| DrError::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DrError::Io { context: format!("cannot read {}", path.display()), source }),
    }
}

/// The recovery point against a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RpoReport {
    /// The VM.
    pub vm: String,
    /// The last good sync, if any.
    pub last_sync: Option<LastSync>,
    /// Its time as ISO 8601.
    pub last_sync_time: Option<String>,
    /// Its age now, seconds (what a failover now would lose, at most).
    pub age_s: Option<u64>,
    /// The target, seconds.
    pub rpo_s: Option<u64>,
    /// Whether the age is within the target (no target: whether there was
    /// a sync at all).
    pub rpo_met: bool,
}

/// The report for `last` at `now` against `rpo_s`.
pub fn report(vm: &str, last: Option<LastSync>, now: u64, rpo_s: Option<u64>) -> RpoReport {
    let age_s = last.as_ref().map(|l| now.saturating_sub(l.synced_unix));
    let rpo_met = match (age_s, rpo_s) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(age), Some(rpo)) => age <= rpo,
    };
    RpoReport {
        vm: vm.into(),
        last_sync_time: last.as_ref().map(|l| crate::time::iso8601(l.synced_unix as i64)),
        last_sync: last,
        age_s,
        rpo_s,
        rpo_met,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_its_age_is_held_to_the_rpo() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = path(dir.path(), "vm");
        assert_eq!(read(&p).expect("none"), None);
        let rec = LastSync {
            vm: "vm".into(),
            migration_id: "ab".into(),
            synced_unix: 1000,
            dest: "dr:4750".into(),
            peer: "fp".into(),
            wire_bytes: 5,
            disk_bytes: 4,
            total_ms: 3,
        };
        write(&p, &rec).expect("write");
        assert_eq!(read(&p).expect("read"), Some(rec.clone()));
        let r = report("vm", Some(rec.clone()), 1000 + 900, Some(900));
        assert!(r.rpo_met && r.age_s == Some(900));
        assert!(!report("vm", Some(rec.clone()), 1000 + 901, Some(900)).rpo_met);
        assert!(report("vm", Some(rec), 5000, None).rpo_met);
        assert!(!report("vm", None, 5000, None).rpo_met, "never synced: no recovery point");
        std::fs::write(&p, b"{").expect("garble");
        assert!(read(&p).is_err());
    }
}
