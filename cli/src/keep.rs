//! Retention rules of DR epochs on a command line (`receive`, `store
//! retention|prune`), and setting them in a store.

use std::path::Path;

use anyhow::{Context, Result};
use wanmig_dr::epoch;
use wanmig_dr::retention::KeepRules;

/// Retention rules on a command line (all left out: none given).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Keep the N newest epochs.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest epoch of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// ... of each of the N newest days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// ... of each of the N newest ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// ... of each of the N newest months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// ... of each of the N newest years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
}

impl KeepArgs {
    /// The rules, if any was given (those not given are 0).
    pub fn rules(&self) -> Option<KeepRules> {
        let all =
            [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly];
        all.iter().any(Option::is_some).then(|| KeepRules {
            last: self.keep_last.unwrap_or(0),
            hourly: self.keep_hourly.unwrap_or(0),
            daily: self.keep_daily.unwrap_or(0),
            weekly: self.keep_weekly.unwrap_or(0),
            monthly: self.keep_monthly.unwrap_or(0),
            yearly: self.keep_yearly.unwrap_or(0),
        })
    }
}

/// Sets retention rules in the store at `dir` (created if missing).
pub fn set_store_rules(dir: &Path, vm: Option<&str>, rules: &KeepRules) -> Result<()> {
    let store = wanmig_dedup::ChunkStore::open(dir).with_context(|| format!("chunk store {}", dir.display()))?;
    epoch::set_rules(&store, vm, rules).map_err(crate::chain)?;
    eprintln!("wanmig: epochs in {} kept by: {rules}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_args_give_rules_only_when_one_is_given() {
        assert_eq!(KeepArgs::default().rules(), None);
        let k = KeepArgs { keep_last: Some(2), keep_daily: Some(7), ..KeepArgs::default() };
        assert_eq!(k.rules().map(|r| r.to_string()).as_deref(), Some("last=2,daily=7"));
    }
}
