//! `wanmig store`: statistics, verification and garbage collection of a
//! host's chunk store.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use wanmig_dedup::{ChunkStore, Retention};
use wanmig_dr::epoch;

use crate::migration::parse_duration;

/// What to do with the store.
#[derive(clap::Subcommand)]
pub enum StoreAction {
    /// Print what the store holds: chunks, bytes, packs, roots.
    Stats,
    /// Read every chunk and check it against its id; exit 1 if any is bad.
    Verify,
    /// Apply the retention rule: drop old roots, delete chunks under no
    /// root, rewrite packs that are mostly dead.
    Gc {
        /// Drop roots set longer ago than this.
        #[arg(long, default_value = "30d", value_parser = parse_age)]
        max_root_age: Duration,
        /// Keep chunks under no root until they are this old (a migration
        /// in flight has not set its root yet).
        #[arg(long, default_value = "1h", value_parser = parse_age)]
        grace: Duration,
    },
    /// List the epochs (verified points in time each sync left) of one VM
    /// or of all.
    Epochs {
        /// Only this VM's.
        vm: Option<String>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show, or set with --keep-*, the retention rules of a VM's epochs (or,
    /// without a VM, the store's default for VMs without rules of their own).
    Retention {
        /// The VM (default: every VM without rules of its own).
        #[arg(long)]
        vm: Option<String>,
        #[command(flatten)]
        keep: crate::keep::KeepArgs,
    },
    /// Apply a VM's retention rules now (its own, or those given), then
    /// collect what no epoch holds. (A destination does this after each sync.)
    Prune {
        /// The VM.
        vm: String,
        #[command(flatten)]
        keep: crate::keep::KeepArgs,
        /// Only say which epochs would go.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A duration that may also be given in hours or days ("12h", "30d").
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    for (unit, secs) in [("d", 86400.0), ("h", 3600.0)] {
        if let Some(n) = s.strip_suffix(unit) {
            let v: f64 = n.parse().map_err(|_| format!("`{s}` is not an age like 1h or 30d"))?;
            return (0.0..=1e5)
                .contains(&v)
                .then(|| Duration::from_secs_f64(v * secs))
                .ok_or(format!("`{s}` is out of range"));
        }
    }
    parse_duration(s)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// `wanmig store DIR ACTION`.
pub fn run(dir: &Path, action: StoreAction) -> Result<ExitCode> {
    if !dir.join("index").exists() {
        anyhow::bail!("{} holds no chunk store", dir.display());
    }
    if let StoreAction::Epochs { vm, json } = &action {
        // Read-only: works while a `receive` holds the store.
        let view = wanmig_dedup::StoreView::open(dir).with_context(|| format!("chunk store {}", dir.display()))?;
        return epochs(&view, vm.as_deref(), *json);
    }
    let store = ChunkStore::open(dir).with_context(|| format!("chunk store {}", dir.display()))?;
    match action {
        StoreAction::Stats => {
            let s = store.stats();
            println!(
                "{}: {} chunks, {} of content stored in {} ({:.2}x) across {} pack(s)",
                dir.display(),
                s.chunks,
                mib(s.raw_bytes),
                mib(s.stored_bytes),
                s.raw_bytes as f64 / s.stored_bytes.max(1) as f64,
                s.packs
            );
            for r in store.roots()? {
                let expiry = r.expires_unix_secs.map_or_else(String::new, |t| format!(", expires at unix time {t}"));
                println!("  root {}: {} chunks, set at unix time {}{expiry}", r.name, r.chunks, r.set_unix_secs);
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreAction::Verify => {
            let v = store.verify()?;
            println!("{} chunks checked, {} bad", v.chunks, v.bad.len());
            for id in v.bad.iter().take(20) {
                println!("  bad: {id}");
            }
            Ok(if v.bad.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        StoreAction::Gc { max_root_age, grace } => {
            // Epochs go by their own retention rules, not by age.
            let keep_prefixes = vec![epoch::PREFIX.to_string()];
            let r = store.gc(&Retention { max_root_age, grace, keep_prefixes, ..Retention::default() })?;
            println!(
                "dropped {} root(s), deleted {} chunk(s), compacted {} pack(s), freed {}",
                r.roots_dropped,
                r.chunks_deleted,
                r.packs_compacted,
                mib(r.bytes_freed)
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreAction::Epochs { vm, json } => epochs(&store, vm.as_deref(), json),
        StoreAction::Retention { vm, keep } => {
            if let Some(rules) = keep.rules() {
                epoch::set_rules(&store, vm.as_deref(), &rules).map_err(crate::chain)?;
            }
            let shown = match &vm {
                Some(vm) => epoch::rules_for(&store, vm).map_err(crate::chain)?,
                None => epoch::rules_for(&store, "").map_err(crate::chain)?,
            };
            println!("{}: {shown}", vm.as_deref().unwrap_or("default"));
            Ok(ExitCode::SUCCESS)
        }
        StoreAction::Prune { vm, keep, dry_run } => {
            let rules = match keep.rules() {
                Some(r) => r,
                None => epoch::rules_for(&store, &vm).map_err(crate::chain)?,
            };
            if dry_run {
                let all = epoch::list(&store, Some(&vm)).map_err(crate::chain)?;
                let times: Vec<i64> = all.iter().map(|e| e.id as i64).collect();
                for (e, k) in all.iter().zip(wanmig_dr::retention::select(&times, &rules)) {
                    println!("{} epoch {} ({}): {}", vm, e.id, e.time(), if k { "keep" } else { "remove" });
                }
                return Ok(ExitCode::SUCCESS);
            }
            let r = epoch::prune(&store, &vm, &rules).map_err(crate::chain)?;
            let keep_prefixes = vec![epoch::PREFIX.to_string()];
            let g = store.gc(&Retention { keep_prefixes, ..Retention::default() })?;
            println!(
                "{vm} ({rules}): kept {} epoch(s), removed {:?}; gc deleted {} chunk(s), freed {}",
                r.kept.len(),
                r.removed,
                g.chunks_deleted,
                mib(g.bytes_freed)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `store DIR epochs [VM]`.
fn epochs(src: &impl wanmig_dedup::ChunkSource, vm: Option<&str>, json: bool) -> Result<ExitCode> {
    let all = epoch::list(src, vm).map_err(crate::chain)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &all {
        let data: u64 = e.disks.iter().map(|d| d.data_bytes).sum();
        let size: u64 = e.disks.iter().map(|d| d.size).sum();
        println!(
            "{} epoch {} ({}): {} disk(s), {} of data in {}, from sync {} of {}",
            e.vm,
            e.id,
            e.time(),
            e.disks.len(),
            mib(data),
            mib(size),
            e.migration_id,
            e.source
        );
    }
    if all.is_empty() {
        println!("no epochs");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_age("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_age("soon").is_err() && parse_age("-1d").is_err());
    }
}
