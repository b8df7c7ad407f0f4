//! The source's progress as it goes: kept in the [`Steering`] (for `wanmig
//! status`) and passed to whoever watches the migration (`wanmig send`).

use std::time::Instant;

use crate::report::{DiskProgress, Phase, Progress};
use crate::steer::Steering;

/// Keeps the live [`Progress`] and hands every change on.
pub struct Reporter<'a> {
    steer: &'a Steering,
    sink: &'a mut dyn FnMut(&Progress),
    now: Progress,
    started: Instant,
}

impl std::fmt::Debug for Reporter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").field("now", &self.now).finish_non_exhaustive()
    }
}

impl<'a> Reporter<'a> {
    /// Reports on `steer` and to `sink`, for a migration to `dest`.
    pub fn new(steer: &'a Steering, sink: &'a mut dyn FnMut(&Progress), dest: String) -> Self {
        let now = Progress { dest, ..Progress::default() };
        steer.set_progress(&now);
        Reporter { steer, sink, now, started: Instant::now() }
    }

    /// Enters `phase`.
    pub fn phase(&mut self, phase: Phase) {
        self.update(|p| p.phase = phase);
    }

    /// Changes the progress with `f` and reports it.
    pub fn update(&mut self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.now);
        self.now.elapsed_s = self.started.elapsed().as_secs_f64();
        self.now.eta_s = if self.now.link_rate > 0.0 { self.now.bytes_left as f64 / self.now.link_rate } else { 0.0 };
        self.steer.set_progress(&self.now);
        let with_tunables = self.steer.progress();
        (self.sink)(&with_tunables);
    }

    /// Reports the disk copy's progress.
    pub fn disk(&mut self, d: DiskProgress, bytes_sent: u64, link_rate: f64) {
        self.update(|p| {
            p.disk = Some(d);
            p.bytes_sent = bytes_sent;
            p.bytes_left = d.bytes_total.saturating_sub(d.bytes_done);
            p.link_rate = link_rate;
        });
    }
}
