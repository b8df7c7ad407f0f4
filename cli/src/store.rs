//! `wanmig store`: statistics, verification and garbage collection of a
//! host's chunk store.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use wanmig_dedup::{ChunkStore, Retention};

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
}

/// A duration that may also be given in hours or days ("12h", "30d").
fn parse_age(s: &str) -> Result<Duration, String> {
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
            let r = store.gc(&Retention { max_root_age, grace, ..Retention::default() })?;
            println!(
                "dropped {} root(s), deleted {} chunk(s), compacted {} pack(s), freed {}",
                r.roots_dropped,
                r.chunks_deleted,
                r.packs_compacted,
                mib(r.bytes_freed)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
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
