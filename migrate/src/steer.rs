//! Steering a running migration from outside its driver: what the control
//! server reads (live [`Progress`]) and changes (the downtime budget and the
//! bandwidth cap, QEMU's `migrate-set-parameters`), and cancellation, which
//! races the commit under one lock so that exactly one of them wins.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::report::Progress;

/// Tunables an operator may change while a migration runs; the driver
/// takes them at the start of each round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tunables {
    /// The downtime budget.
    pub downtime: Duration,
    /// Bandwidth cap, bytes/s (`None`: none).
    pub max_bandwidth: Option<f64>,
}

#[derive(Debug)]
struct State {
    progress: Progress,
    tunables: Tunables,
    /// Changed since the driver last took them.
    tunables_changed: bool,
    cancel: Option<String>,
    committed: bool,
}

/// Shared between a migration's driver and whoever steers it. Cheap to
/// clone; every clone steers the same migration.
#[derive(Debug, Clone)]
pub struct Steering {
    state: Arc<Mutex<State>>,
    cancelled: Arc<Notify>,
}

/// Why a cancel was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too late to cancel: the commit was sent; waiting for the destination's outcome")]
pub struct TooLate;

/// The migration was cancelled before it could commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Cancelled(pub String);

impl Steering {
    /// Steering for a migration starting with `tunables`.
    pub fn new(tunables: Tunables) -> Self {
        let state =
            State { progress: Progress::default(), tunables, tunables_changed: false, cancel: None, committed: false };
        Steering { state: Arc::new(Mutex::new(state)), cancelled: Arc::new(Notify::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest progress.
    pub fn progress(&self) -> Progress {
        let s = self.lock();
        let mut p = s.progress.clone();
        p.downtime_budget_ms = s.tunables.downtime.as_secs_f64() * 1e3;
        p.max_bandwidth_bps = s.tunables.max_bandwidth.map(|b| (b * 8.0) as u64);
        p
    }

    /// Records the latest progress (the driver, as it goes).
    pub fn set_progress(&self, p: &Progress) {
        self.lock().progress = p.clone();
    }

    /// Changes the downtime budget and/or the bandwidth cap (`Some(None)`
    /// lifts the cap); they take effect in the next round.
    pub fn set(&self, downtime: Option<Duration>, max_bandwidth: Option<Option<f64>>) {
        let mut s = self.lock();
        if let Some(d) = downtime {
            s.tunables.downtime = d;
        }
        if let Some(b) = max_bandwidth {
            s.tunables.max_bandwidth = b;
        }
        s.tunables_changed = true;
    }

    /// The tunables in force.
    pub fn tunables(&self) -> Tunables {
        self.lock().tunables
    }

    /// The tunables, if an operator changed them since the last call.
    pub fn take_changed_tunables(&self) -> Option<Tunables> {
        let mut s = self.lock();
        std::mem::take(&mut s.tunables_changed).then_some(s.tunables)
    }

    /// Asks the migration to stop before the commit, for `why`. Refused
    /// once the commit was sent: then it can only be waited for.
    pub fn cancel(&self, why: &str) -> Result<(), TooLate> {
        let mut s = self.lock();
        if s.committed {
            return Err(TooLate);
        }
        s.cancel.get_or_insert_with(|| why.to_string());
        drop(s);
        self.cancelled.notify_waiters();
        Ok(())
    }

    /// Whether a cancel was asked for.
    pub fn cancel_requested(&self) -> Option<String> {
        self.lock().cancel.clone()
    }

    /// Resolves once a cancel is asked for.
    pub async fn cancelled(&self) -> Cancelled {
        loop {
            let notified = self.cancelled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(why) = self.cancel_requested() {
                return Cancelled(why);
            }
            notified.await;
        }
    }

    /// The driver is about to send `Commit`: from now on cancels are
    /// refused. Fails if a cancel came first.
    pub fn try_commit(&self) -> Result<(), Cancelled> {
        let mut s = self.lock();
        if let Some(why) = &s.cancel {
            return Err(Cancelled(why.clone()));
        }
        s.committed = true;
        Ok(())
    }

    /// Whether `Commit` was sent.
    pub fn committed(&self) -> bool {
        self.lock().committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_of_cancel_and_commit_wins() {
        let t = Tunables { downtime: Duration::from_millis(300), max_bandwidth: None };
        let s = Steering::new(t);
        s.cancel("operator").expect("before the commit");
        assert_eq!(s.try_commit(), Err(Cancelled("operator".into())));
        let s = Steering::new(t);
        s.try_commit().expect("no cancel yet");
        assert_eq!(s.cancel("operator"), Err(TooLate));
        assert!(s.committed() && s.cancel_requested().is_none());
    }

    #[test]
    fn tunables_change_once_and_show_in_progress() {
        let s = Steering::new(Tunables { downtime: Duration::from_millis(300), max_bandwidth: None });
        assert_eq!(s.take_changed_tunables(), None);
        s.set(None, Some(Some(1e6)));
        let t = s.take_changed_tunables().expect("changed");
        assert_eq!((t.downtime, t.max_bandwidth), (Duration::from_millis(300), Some(1e6)));
        assert_eq!(s.take_changed_tunables(), None);
        assert_eq!(s.progress().max_bandwidth_bps, Some(8_000_000));
    }

    #[tokio::test]
    async fn a_waiting_driver_hears_the_cancel() {
        let s = Steering::new(Tunables { downtime: Duration::from_millis(300), max_bandwidth: None });
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.cancelled().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.cancel("ctrl-c").expect("cancel");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("joined");
        assert_eq!(got, Cancelled("ctrl-c".into()));
    }
}
