//! Convergence: when to stop pre-copying, when to slow the guest down, and
//! when to give up — a policy the pre-copy loop consults after every round
//! (the loop itself never hard-codes a stopping rule).

use std::time::Duration;

/// What one pre-copy round measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundReport {
    /// Round number (0 = the full copy).
    pub round: u32,
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Bytes the round put on the wire.
    pub bytes_sent: u64,
    /// How long the round took.
    pub elapsed: Duration,
    /// Pages dirtied while it ran (what the next round must send).
    pub dirty_pages: u64,
    /// Wire bytes per page sent, on average, in this round.
    pub bytes_per_page: f64,
    /// Pages per second the migration has shown it can move (the best
    /// round so far: small rounds are latency-bound, not bandwidth-bound).
    pub page_rate: f64,
    /// Wire bytes per second it has shown it can move (best round so far).
    pub link_rate: f64,
    /// Device state size, bytes (sent inside the downtime).
    pub state_bytes: u64,
    /// Round-trip time of the link.
    pub rtt: Duration,
    /// What the switch-over costs whatever is left to send: the commit's
    /// round trips, flushing the last disk writes at both ends, building
    /// the VM at the destination.
    pub switch: Duration,
}

impl RoundReport {
    /// Rate at which the guest dirtied pages, pages/s.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_pages as f64 / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// Predicted downtime if the guest were paused now: the dirty pages at
    /// the page rate, the device state (and the last disk writes) at the
    /// link rate, and the switch-over's own cost.
    pub fn predicted_downtime(&self) -> Duration {
        let pages = self.dirty_pages as f64 / self.page_rate.max(1.0);
        let state = self.state_bytes as f64 / self.link_rate.max(1.0);
        Duration::from_secs_f64(pages + state) + self.switch
    }
}

/// What to do after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Pause the guest and send the rest.
    StopAndCopy,
    /// Run another round with the vCPUs throttled to this percentage of
    /// their time spent paused.
    Throttle(u8),
    /// Stop trying; the reason has the numbers.
    GiveUp(String),
}

/// Decides after each round. Passed into the pre-copy loop.
pub trait ConvergencePolicy {
    /// The decision for `r`.
    fn decide(&mut self, r: &RoundReport) -> Decision;
}

/// The default policy: a downtime budget, then auto-converge.
///
/// Stops when the predicted downtime is within the budget. When the guest
/// dirties more than half of what a round sends for two rounds running (QEMU's
/// auto-converge trigger), throttles the vCPUs, starting at
/// `throttle_initial` percent and adding `throttle_step` each round up to
/// `throttle_max`. Gives up after `max_rounds`, or when even the maximum
/// throttle leaves the prediction over budget for three rounds.
#[derive(Debug, Clone)]
pub struct DowntimeBudget {
    /// Largest acceptable downtime (default 300 ms, QEMU's default).
    pub budget: Duration,
    /// Most rounds before giving up (default 30).
    pub max_rounds: u32,
    /// First throttle step, percent (default 20).
    pub throttle_initial: u8,
    /// Throttle increment, percent (default 10).
    pub throttle_step: u8,
    /// Highest throttle, percent (default 99).
    pub throttle_max: u8,
    throttle: u8,
    hot_rounds: u32,
    rounds_at_max: u32,
}

impl DowntimeBudget {
    /// The default policy with `budget`.
    pub fn new(budget: Duration) -> Self {
        DowntimeBudget {
            budget,
            max_rounds: 30,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            throttle: 0,
            hot_rounds: 0,
            rounds_at_max: 0,
        }
    }

    /// Current throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }
}

impl ConvergencePolicy for DowntimeBudget {
    fn decide(&mut self, r: &RoundReport) -> Decision {
        let predicted = r.predicted_downtime();
        if predicted <= self.budget {
            return Decision::StopAndCopy;
        }
        let give_up = |why: &str| {
            Decision::GiveUp(format!(
                "{why}: the guest dirties {:.1} MiB/s of pages, the migration moves {:.1} MiB/s of pages, \
                 predicted downtime {:.0} ms > budget {:.0} ms after {} rounds (throttle {}%)",
                r.dirty_rate() * 4096.0 / 1048576.0,
                r.page_rate * 4096.0 / 1048576.0,
                predicted.as_secs_f64() * 1e3,
                self.budget.as_secs_f64() * 1e3,
                r.round + 1,
                self.throttle
            ))
        };
        if r.round + 1 >= self.max_rounds {
            return give_up("no convergence within the round limit");
        }
        if self.throttle >= self.throttle_max {
            self.rounds_at_max += 1;
            if self.rounds_at_max >= 3 {
                return give_up("no convergence at the maximum throttle");
            }
            return Decision::Continue;
        }
        // Dirtying more than half of what we send: not converging by itself.
        if r.round > 0 && r.dirty_pages as f64 > 0.5 * r.pages_sent as f64 {
            self.hot_rounds += 1;
        } else {
            self.hot_rounds = 0;
        }
        if self.hot_rounds >= 2 || (self.throttle > 0 && self.hot_rounds >= 1) {
            self.throttle = if self.throttle == 0 {
                self.throttle_initial
            } else {
                (self.throttle + self.throttle_step).min(self.throttle_max)
            };
            return Decision::Throttle(self.throttle);
        }
        Decision::Continue
    }
}

/// A token-bucket rate limit on bytes sent.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    burst: f64,
}

impl RateLimit {
    /// `rate` bytes/s, with bursts up to 50 ms worth (at least 256 KiB).
    pub fn new(rate: f64) -> Self {
        let burst = (rate * 0.05).max(256.0 * 1024.0);
        RateLimit { rate, tokens: burst, burst }
    }

    /// Current rate, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate.
    pub fn set_rate(&mut self, rate: f64) {
        self.rate = rate;
        self.burst = (rate * 0.05).max(256.0 * 1024.0);
    }

    /// Accounts `bytes` sent after `elapsed` since the previous call;
    /// returns how long to wait before sending more.
    pub fn spend(&mut self, bytes: u64, elapsed: Duration) -> Duration {
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst) - bytes as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }
}

/// Clark et al.'s dynamic rate: each round runs at the previous round's
/// dirty rate plus an increment, within `[min, max]` bytes/s.
pub fn next_round_rate(prev_dirty_bytes_per_sec: f64, increment: f64, min: f64, max: f64) -> f64 {
    (prev_dirty_bytes_per_sec + increment).clamp(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(round: u32, dirty_pages: u64, bytes_sent: u64) -> RoundReport {
        RoundReport {
            round,
            pages_sent: bytes_sent / 4096,
            bytes_sent,
            elapsed: Duration::from_secs(1),
            dirty_pages,
            bytes_per_page: 4096.0,
            page_rate: 100e6 / 4096.0,
            link_rate: 100e6,
            state_bytes: 100_000,
            rtt: Duration::from_millis(1),
            switch: Duration::from_millis(1),
        }
    }

    #[test]
    fn stops_within_budget() {
        let mut p = DowntimeBudget::new(Duration::from_millis(300));
        // 1000 pages = 4 MB at 100 MB/s = 41 ms + state + rtt.
        assert_eq!(p.decide(&report(1, 1000, 400_000_000)), Decision::StopAndCopy);
        assert_eq!(p.decide(&report(1, 100_000, 400_000_000)), Decision::Continue);
    }

    #[test]
    fn a_hot_guest_is_throttled_step_by_step_then_given_up_on() {
        let mut p = DowntimeBudget::new(Duration::from_millis(300));
        // Dirtying 80 MB per 100 MB sent, every round.
        let hot = |round| report(round, 20_000, 100_000_000);
        assert_eq!(p.decide(&hot(1)), Decision::Continue);
        assert_eq!(p.decide(&hot(2)), Decision::Throttle(20));
        assert_eq!(p.decide(&hot(3)), Decision::Throttle(30));
        let mut last = Decision::Continue;
        for round in 4..30 {
            last = p.decide(&hot(round));
            if matches!(last, Decision::GiveUp(_)) {
                break;
            }
        }
        let Decision::GiveUp(why) = last else { panic!("never gave up: {last:?}") };
        assert!(why.contains("maximum throttle") && why.contains("MiB/s"), "{why}");
        assert_eq!(p.throttle(), 99);
    }

    #[test]
    fn round_limit_gives_up_with_numbers() {
        let mut p = DowntimeBudget::new(Duration::from_millis(1));
        p.max_rounds = 3;
        assert!(matches!(p.decide(&report(2, 5000, 1 << 30)), Decision::GiveUp(w) if w.contains("round limit")));
    }

    #[test]
    fn rate_limit_paces() {
        let mut r = RateLimit::new(1e6);
        assert_eq!(r.spend(100_000, Duration::ZERO), Duration::ZERO); // within the burst
        let wait = r.spend(1_000_000, Duration::ZERO);
        assert!(wait > Duration::from_millis(800) && wait < Duration::from_millis(900), "{wait:?}");
        assert_eq!(next_round_rate(10e6, 6.25e6, 1e6, 12.5e6), 12.5e6);
        assert_eq!(next_round_rate(0.0, 6.25e6, 1e6, 100e6), 6.25e6);
    }
}
