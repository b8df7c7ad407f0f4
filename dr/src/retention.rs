//! Which points in time to keep: Proxmox Backup's prune rules.
//!
//! `keep-last N` keeps the N newest points; `keep-hourly N` the newest
//! point of each of the N newest hours that have one; then daily, weekly
//! (ISO weeks, Monday to Sunday), monthly, yearly. The rules apply in that
//! order, and each counts only periods older than every point the rules
//! before it kept: a period that already holds a kept point is skipped, and
//! periods without points do not count (Proxmox Backup's documentation:
//! "Each option only covers backups within its time period. The next option
//! does not take care of already covered backups. It will only consider
//! older backups."). With every rule at 0, everything is kept. Periods are
//! in UTC here (Proxmox uses the host's local time).
//!
//! [`select`] is pure: times in, one keep flag per point out.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time;

/// The keep rules. All zero: keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRules {
    /// The newest points.
    pub last: u32,
    /// The newest point of each of this many hours.
    pub hourly: u32,
    /// The newest point of each of this many days.
    pub daily: u32,
    /// The newest point of each of this many ISO weeks.
    pub weekly: u32,
    /// The newest point of each of this many months.
    pub monthly: u32,
    /// The newest point of each of this many years.
    pub yearly: u32,
}

impl KeepRules {
    /// What a destination applies when none were set: the latest point
    /// only, as a single replica was before points in time existed (and as
    /// vSphere Replication and Proxmox's storage replication keep by
    /// default).
    pub const DEFAULT: KeepRules = KeepRules { last: 1, hourly: 0, daily: 0, weekly: 0, monthly: 0, yearly: 0 };

    /// Whether every rule is 0 (keep everything).
    pub fn keeps_all(&self) -> bool {
        *self == KeepRules::default()
    }

    fn rules(&self) -> [(&'static str, u32); 6] {
        [
            ("last", self.last),
            ("hourly", self.hourly),
            ("daily", self.daily),
            ("weekly", self.weekly),
            ("monthly", self.monthly),
            ("yearly", self.yearly),
        ]
    }

    /// Parses `last=4,hourly=24,daily=7` (what [`fmt::Display`] writes;
    /// `all` for keep-everything; rules left out are 0).
    pub fn parse(s: &str) -> Result<KeepRules, String> {
        let mut k = KeepRules::default();
        if s.trim() == "all" {
            return Ok(k);
        }
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = part.split_once('=').ok_or_else(|| format!("`{part}` is not RULE=N"))?;
            let n: u32 = n.trim().parse().map_err(|_| format!("`{part}`: not a count"))?;
            let slot = match name.trim() {
                "last" => &mut k.last,
                "hourly" => &mut k.hourly,
                "daily" => &mut k.daily,
                "weekly" => &mut k.weekly,
                "monthly" => &mut k.monthly,
                "yearly" => &mut k.yearly,
                other => return Err(format!("unknown rule `{other}` (last, hourly, daily, weekly, monthly, yearly)")),
            };
            *slot = n;
        }
        Ok(k)
    }
}

impl fmt::Display for KeepRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.keeps_all() {
            return f.write_str("all");
        }
        let parts: Vec<String> =
            self.rules().iter().filter(|(_, n)| *n > 0).map(|(name, n)| format!("{name}={n}")).collect();
        f.write_str(&parts.join(","))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Keep,
    Remove,
}

/// The period of time `t` for rule `rule` (0 = last: every point its own).
fn period(rule: usize, index: usize, t: i64) -> i64 {
    let days = time::days(t);
    match rule {
        0 => index as i64,
        1 => t.div_euclid(3600),
        2 => days,
        3 => time::week(days),
        4 => {
            let (y, m, _) = time::civil(days);
            y * 12 + i64::from(m)
        }
        _ => time::civil(days).0,
    }
}

/// One flag per point of `times` (unix seconds, any order): whether the
/// rules keep it.
pub fn select(times: &[i64], rules: &KeepRules) -> Vec<bool> {
    if rules.keeps_all() {
        return vec![true; times.len()];
    }
    // Newest first; equal times by position, later first.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[b].cmp(&times[a]).then(b.cmp(&a)));
    let mut mark: Vec<Option<Mark>> = vec![None; times.len()];
    for (rule, (_, keep)) in rules.rules().into_iter().enumerate() {
        let keep = keep as usize;
        if keep == 0 {
            continue;
        }
        let key = |i: usize| period(rule, i, times[i]);
        let covered: HashSet<i64> = (0..times.len()).filter(|&i| mark[i] == Some(Mark::Keep)).map(key).collect();
        let mut chosen: HashSet<i64> = HashSet::new();
        for &i in &order {
            if mark[i].is_some() {
                continue;
            }
            let k = key(i);
            if covered.contains(&k) {
                continue;
            }
            if chosen.contains(&k) {
                mark[i] = Some(Mark::Remove);
            } else {
                if chosen.len() >= keep {
                    break;
                }
                chosen.insert(k);
                mark[i] = Some(Mark::Keep);
            }
        }
    }
    mark.into_iter().map(|m| m == Some(Mark::Keep)).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86_400;
    /// Monday 2024-01-01 00:00 UTC.
    const MON: i64 = 1_704_067_200;

    fn kept(times: &[i64], rules: &str) -> Vec<i64> {
        let flags = select(times, &KeepRules::parse(rules).expect("rules"));
        let mut out: Vec<i64> = times.iter().zip(flags).filter(|(_, k)| *k).map(|(t, _)| *t).collect();
        out.sort_unstable();
        out
    }

    /// Syncs every `step` seconds from `start`, `n` of them.
    fn every(start: i64, step: i64, n: i64) -> Vec<i64> {
        (0..n).map(|i| start + i * step).collect()
    }

    #[test]
    fn which_epochs_remain() {
        let m = |min: i64| MON + min * 60;
        let quarter = every(MON, 15 * 60, 12); // 00:00 .. 02:45, every 15 min
        let cases: Vec<(&str, Vec<i64>, &str, Vec<i64>)> = vec![
            ("nothing configured keeps all", quarter.clone(), "all", quarter.clone()),
            ("the newest three", quarter.clone(), "last=3", vec![m(135), m(150), m(165)]),
            ("more kept than exist", quarter[..2].to_vec(), "last=5", quarter[..2].to_vec()),
            ("the newest of the two newest hours", quarter.clone(), "hourly=2", vec![m(105), m(165)]),
            // keep-last takes 02:45 and 02:30; hour 2 is then covered, so
            // hourly counts hours 1 and 0 (Proxmox: older points only).
            (
                "hourly counts past what last kept",
                quarter.clone(),
                "last=2,hourly=2",
                vec![m(45), m(105), m(150), m(165)],
            ),
            ("hourly every hour", quarter.clone(), "hourly=24", vec![m(45), m(105), m(165)]),
            // Hours without syncs do not count: 00:xx, then nothing until 05:xx.
            ("hours without syncs do not count", vec![m(10), m(50), m(300), m(310)], "hourly=2", vec![m(50), m(310)]),
            // Daily over 10 days at 23:00 and 11:00: the 23:00 of each day.
            (
                "the newest of each day",
                (0..10).flat_map(|d| [MON + d * D + 11 * H, MON + d * D + 23 * H]).collect(),
                "daily=3",
                vec![MON + 7 * D + 23 * H, MON + 8 * D + 23 * H, MON + 9 * D + 23 * H],
            ),
            // Weekly: Sunday 23:00 ends a week, Monday 00:30 starts the next.
            (
                "ISO weeks start on Monday",
                vec![MON - D + 23 * H, MON + 30 * 60, MON + 6 * D + 23 * H, MON + 7 * D + H],
                "weekly=2",
                vec![MON + 6 * D + 23 * H, MON + 7 * D + H],
            ),
            // A week without syncs does not count: weeks 0, 2, 3 hold syncs.
            (
                "weeks without syncs do not count",
                vec![MON + D, MON + 15 * D, MON + 22 * D],
                "weekly=3",
                vec![MON + D, MON + 15 * D, MON + 22 * D],
            ),
            // The usual DR policy: 15-minute syncs for 3 days; last 4,
            // hourly 6, daily 3.
            ("last, hourly and daily together", every(MON, 15 * 60, 4 * 24 * 3), "last=4,hourly=6,daily=3", {
                let end = MON + 3 * D - 15 * 60; // the newest, day 2 23:45
                let mut v: Vec<i64> = (0..4).map(|i| end - i * 15 * 60).collect(); // last 4: hour 23
                v.extend((18..23).map(|h| MON + 2 * D + h * H + 45 * 60)); // hours 22..18 (23 covered): 5
                v.push(MON + 2 * D + 17 * H + 45 * 60); // the 6th hour
                // daily: day 2 covered by the kept ones; days 1 and 0.
                v.extend([MON + D + 23 * H + 45 * 60, MON + 23 * H + 45 * 60]);
                v.sort_unstable();
                v
            }),
            ("monthly and yearly", vec![MON - 40 * D, MON - 10 * D, MON, MON + 40 * D], "monthly=2,yearly=5", {
                // months: Feb 2024 (MON+40d), Jan 2024 (MON); yearly: 2024
                // covered, 2023's newest is MON-10d.
                vec![MON - 10 * D, MON, MON + 40 * D]
            }),
        ];
        for (what, times, rules, want) in cases {
            assert_eq!(kept(&times, rules), want, "{what}: {rules}");
        }
    }

    #[test]
    fn rules_parse_and_print() {
        let k = KeepRules::parse("last=4, hourly=24,weekly=2").expect("parse");
        assert_eq!(k, KeepRules { last: 4, hourly: 24, weekly: 2, ..KeepRules::default() });
        assert_eq!(k.to_string(), "last=4,hourly=24,weekly=2");
        assert_eq!(KeepRules::parse(&k.to_string()), Ok(k));
        assert_eq!(KeepRules::parse("all"), Ok(KeepRules::default()));
        assert_eq!(KeepRules::default().to_string(), "all");
        assert!(KeepRules::parse("fortnightly=2").is_err() && KeepRules::parse("last=x").is_err());
        assert_eq!(KeepRules::DEFAULT.to_string(), "last=1");
    }

    proptest! {
        /// Whatever the times: the newest point is kept by any rule set;
        /// keep-last alone keeps exactly min(N, count) points; order of the
        /// input does not matter; the kept set never exceeds the rules' sum.
        #[test]
        fn invariants(mut times in proptest::collection::vec(0i64..(400 * D), 1..80), last in 0u32..6, hourly in 0u32..6, daily in 0u32..6, weekly in 0u32..4) {
            let rules = KeepRules { last, hourly, daily, weekly, ..KeepRules::default() };
            let flags = select(&times, &rules);
            let n = flags.iter().filter(|&&k| k).count();
            if rules.keeps_all() {
                prop_assert_eq!(n, times.len());
            } else {
                let newest = times.iter().copied().max().unwrap();
                prop_assert!(times.iter().zip(&flags).any(|(&t, &k)| k && t == newest));
                prop_assert!(n <= (last + hourly + daily + weekly) as usize);
            }
            let only_last = select(&times, &KeepRules { last: last.max(1), ..KeepRules::default() });
            prop_assert_eq!(only_last.iter().filter(|&&k| k).count(), (last.max(1) as usize).min(times.len()));
            let mut kept_times: Vec<i64> = times.iter().zip(&flags).filter(|(_, k)| **k).map(|(t, _)| *t).collect();
            kept_times.sort_unstable();
            times.reverse();
            let again = select(&times, &rules);
            let mut again_times: Vec<i64> = times.iter().zip(&again).filter(|(_, k)| **k).map(|(t, _)| *t).collect();
            again_times.sort_unstable();
            prop_assert_eq!(kept_times, again_times);
        }
    }
}
