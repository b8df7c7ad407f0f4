//! One migration in progress at the source: the VM, the link, what it has
//! sent so far, and who watches and steers it.

use wanmig_mem_sync::policy::next_round_rate;

use super::disk::DiskCopy;
use super::link::Link;
use super::options::SendOptions;
use super::progress::Reporter;
use super::vm::SourceVm;
use crate::report::Summary;
use crate::steer::Steering;

/// A migration's state at the source, from the accepted hello on.
pub struct Run<'a> {
    /// The VM.
    pub vm: &'a mut dyn SourceVm,
    /// What was asked.
    pub opts: &'a SendOptions,
    /// The streams and the session machine.
    pub link: Link,
    /// What it did so far.
    pub summary: &'a mut Summary,
    /// Progress, for `wanmig send` and `wanmig status`.
    pub report: Reporter<'a>,
    /// The operator's cancel and tunables.
    pub steer: &'a Steering,
    /// The disks, when they are copied.
    pub disks: Option<DiskCopy>,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("link", &self.link).finish_non_exhaustive()
    }
}

impl Run<'_> {
    /// What the link can carry, bytes/s: the cap in force, or else the
    /// expected bandwidth.
    pub fn capacity(&self) -> f64 {
        self.steer.tunables().max_bandwidth.unwrap_or(self.opts.tuning.bandwidth_bps as f64 / 8.0)
    }

    /// Sets the pace for the next round from the tunables in force: the
    /// cap, or with `--min-bandwidth` Clark et al.'s dynamic rate from the
    /// last round's dirty rate (bytes/s).
    pub fn pace(&mut self, dirty_rate: Option<f64>) {
        let cap = self.steer.tunables().max_bandwidth;
        let rate = match (cap, self.opts.min_bandwidth, dirty_rate) {
            (Some(max), Some(min), Some(dirty)) => Some(next_round_rate(dirty, min, min, max)),
            (Some(max), Some(min), None) => Some(min.min(max)),
            (cap, _, _) => cap,
        };
        self.link.bulk.set_rate(rate);
    }

    /// Lifts the disk write caps (the migration ends, or pauses the guest).
    pub fn unthrottle_disks(&self) {
        DiskCopy::unthrottle(&*self.vm);
    }
}
