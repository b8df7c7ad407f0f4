//! One migration in progress at the source: the VM, the link, what it has
//! sent so far, and who watches and steers it.

use std::time::Instant;

use wanmig_mem_sync::policy::{DowntimeBudget, next_round_rate};
use wanmig_mem_sync::postcopy::HybridPolicy;
use wanmig_transport::Conn;
use wanmig_vmm::memory::DirtyPages;

use super::connector::Connector;
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
    /// The connection in use (replaced when a resume makes a new one).
    pub conn: &'a mut Conn,
    /// How to make a new one.
    pub connector: &'a mut Connector,
    /// The pages of the round in flight: its number and what it sends (a
    /// resume sends again what of it the destination lacks).
    pub round_pages: Option<(u32, DirtyPages)>,
    /// The convergence policy, kept across a resume.
    pub policy: Option<DowntimeBudget>,
    /// With `--postcopy auto`: the policy that decides the switch.
    pub hybrid: Option<HybridPolicy>,
    /// The first memory round.
    pub first_round: Option<u32>,
    /// Since when the guest is paused by this migration (stop-and-copy,
    /// or the switch to post-copy).
    pub paused: Option<Instant>,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("link", &self.link).finish_non_exhaustive()
    }
}

/// Where a migration is, so that a resume knows where to go on.
pub(crate) enum Stage {
    /// The disks' first copy.
    FirstCopy,
    /// Rounds of the blocks written during the first copy.
    DiskRounds,
    /// Memory pre-copy, from all pages or (after a resume) these.
    Precopy(Option<DirtyPages>),
    /// Pausing and sending the rest.
    StopAndCopy(DirtyPages),
    /// After an early commit the destination had not decided on, resumed:
    /// sending again, the guest still paused, these pages and what the
    /// disks and the device state need.
    Resend(DirtyPages),
    /// The switch to post-copy, with the pages pre-copy left to send and
    /// why it switched.
    Postcopy(DirtyPages, String),
    /// The commit, for a guest paused since then.
    Commit(Instant),
    /// Acknowledged.
    Done,
}

impl<'a> Run<'a> {
    /// A migration that has just agreed its session.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &'a mut dyn SourceVm,
        opts: &'a SendOptions,
        link: Link,
        summary: &'a mut Summary,
        report: Reporter<'a>,
        steer: &'a Steering,
        disks: Option<DiskCopy>,
        conn: &'a mut Conn,
        connector: &'a mut Connector,
    ) -> Self {
        Run {
            vm,
            opts,
            link,
            summary,
            report,
            steer,
            disks,
            conn,
            connector,
            round_pages: None,
            policy: None,
            hybrid: None,
            first_round: None,
            paused: None,
        }
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

    /// Remembers the pages of the round that starts now.
    pub fn start_round(&mut self, pages: &DirtyPages) {
        self.round_pages = Some((self.link.session.round(), pages.clone()));
    }
}
