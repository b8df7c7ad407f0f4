//! The link's behaviour, without I/O: what happens to each frame, and when.
//!
//! One [`DirectionModel`] per direction decides, for each frame that enters
//! the link at `now`, whether it is delivered and at what instant
//! ([`Verdict`]). The emulator's threads only read frames, ask the model,
//! and write each frame out at its instant; the tests of this module drive
//! the model with made-up instants.
//!
//! The order of events for one frame:
//!
//! 1. **Outage** (decided by the caller, see [`OutageSchedule`]): a frame
//!    that meets a link that is down is dropped; it takes no link time.
//! 2. **Drop-tail queue**: the link serialises frames at `rate_bps`; a frame
//!    that finds more than `queue_bytes` (itself included) waiting to be
//!    serialised is dropped. A frame that finds the link idle always goes.
//! 3. **Loss**: an admitted frame is lost on the wire with probability
//!    `loss` (it took its slot on the link: loss happens after the queue).
//! 4. **Delay and jitter**: the last bit leaves the queue at `departure`;
//!    the frame arrives at `departure + delay + j`, `j` drawn uniformly in
//!    `[-jitter, +jitter]` (never below zero delay), and never before the
//!    frame ahead of it: **the link keeps packet order** (a frame that drew a
//!    shorter delay than its predecessor waits for it), as a single physical
//!    path does. So every frame's propagation time stays within
//!    `[delay - jitter, delay + jitter]`, and jitter shows as bunching, not
//!    reordering.
//!
//! Loss and jitter draw from two generators seeded from the link's seed, one
//! draw each per admitted frame, so the same seed and the same sequence of
//! frames give the same losses whatever the jitter, and a run repeats.

use std::time::{Duration, Instant};

/// Invalid link parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamsError {
    /// The loss probability is not within 0.0..=1.0.
    #[error("loss {0} is not a probability within 0.0..=1.0")]
    Loss(f64),
    /// A rate-limited link needs a queue.
    #[error("a rate-limited link needs a queue of at least one byte")]
    NoQueue,
}

/// One direction of the emulated link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Rate in bits/s, counting each Ethernet frame as the TAP device hands
    /// it over (header and payload; no preamble, FCS or inter-frame gap);
    /// 0 for no limit (and then no queue either).
    pub rate_bps: u64,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bound of the uniform jitter added to `delay` (see the module doc:
    /// order is kept).
    pub jitter: Duration,
    /// Probability that an admitted frame is lost, 0.0 to 1.0.
    pub loss: f64,
    /// Bytes the drop-tail queue before the rate limit holds (the frame
    /// being serialised included).
    pub queue_bytes: usize,
}

impl Default for LinkParams {
    /// No rate limit, no delay, no jitter, no loss; a 1 MiB queue (used
    /// once a rate is set).
    fn default() -> Self {
        LinkParams { rate_bps: 0, delay: Duration::ZERO, jitter: Duration::ZERO, loss: 0.0, queue_bytes: 1 << 20 }
    }
}

impl LinkParams {
    /// A WAN path of `rate_bps` and round-trip time `rtt` (each direction
    /// gets half of it) whose queue holds one bandwidth-delay product, the
    /// classic router buffer that lets one loss-based TCP flow fill the
    /// link, and at least 1 MiB: a sender in a namespace hands the link
    /// 64 KiB GSO bursts at memory speed, which a real path's NIC would
    /// have paced (with 64 KiB, one TCP flow at 1 Gbit/s and no delay lost
    /// a fifth of its goodput to tail drops here).
    pub fn wan(rate_bps: u64, rtt: Duration) -> Self {
        let bdp = (u128::from(rate_bps) * rtt.as_nanos() / 8 / 1_000_000_000) as usize;
        LinkParams { rate_bps, delay: rtt / 2, queue_bytes: bdp.max(1 << 20), ..LinkParams::default() }
    }

    /// The same with a loss probability.
    pub fn with_loss(self, loss: f64) -> Self {
        LinkParams { loss, ..self }
    }

    /// The same with a jitter bound.
    pub fn with_jitter(self, jitter: Duration) -> Self {
        LinkParams { jitter, ..self }
    }

    /// The same with a queue of `queue_bytes`.
    pub fn with_queue_bytes(self, queue_bytes: usize) -> Self {
        LinkParams { queue_bytes, ..self }
    }

    /// Checks that the parameters make a link.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(ParamsError::Loss(self.loss));
        }
        if self.rate_bps > 0 && self.queue_bytes == 0 {
            return Err(ParamsError::NoQueue);
        }
        Ok(())
    }
}

/// One outage: the link is down from `start` (since the emulator started)
/// for `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When it goes down, from the emulator's start.
    pub start: Duration,
    /// How long it stays down.
    pub duration: Duration,
}

impl Outage {
    /// When it comes back up, from the emulator's start.
    pub fn end(&self) -> Duration {
        self.start.saturating_add(self.duration)
    }
}

/// Scripted outages, both directions at once (a cut fibre): sorted,
/// overlapping ones merged, empty ones left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutageSchedule {
    outages: Vec<Outage>,
}

impl OutageSchedule {
    /// No outages.
    pub fn none() -> Self {
        OutageSchedule::default()
    }

    /// The schedule of `(down at, for)` pairs, in any order.
    pub fn new(outages: impl IntoIterator<Item = (Duration, Duration)>) -> Self {
        let mut v: Vec<Outage> = outages
            .into_iter()
            .filter(|&(_, d)| !d.is_zero())
            .map(|(start, duration)| Outage { start, duration })
            .collect();
        v.sort_by_key(|o| o.start);
        let mut merged: Vec<Outage> = Vec::with_capacity(v.len());
        for o in v {
            match merged.last_mut() {
                Some(last) if o.start <= last.end() => {
                    let end = last.end().max(o.end());
                    last.duration = end - last.start;
                }
                _ => merged.push(o),
            }
        }
        OutageSchedule { outages: merged }
    }

    /// The outages, sorted and disjoint.
    pub fn outages(&self) -> &[Outage] {
        &self.outages
    }

    /// Whether the link is down at `t` since the start: within
    /// `[start, start + duration)` of an outage.
    pub fn is_down(&self, t: Duration) -> bool {
        // The last outage that starts at or before t.
        let i = self.outages.partition_point(|o| o.start <= t);
        i > 0 && t < self.outages[i - 1].end()
    }
}

/// xorshift64*: small, fast, and the same sequence for the same seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds start far apart (and
        // never at xorshift's fixed point 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)).max(1))
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What becomes of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered at this instant.
    Deliver(Instant),
    /// Lost on the wire (after taking its slot on the link).
    Lost,
    /// Dropped by the full queue.
    Overflow,
}

/// One direction of the link: queue, rate, loss, delay and jitter.
#[derive(Debug, Clone)]
pub struct DirectionModel {
    params: LinkParams,
    /// When the link finishes serialising what it has accepted.
    free_at: Option<Instant>,
    /// Delivery instant of the last admitted frame (order is kept).
    last_due: Option<Instant>,
    loss_rng: Rng,
    jitter_rng: Rng,
}

impl DirectionModel {
    /// A direction with `params`, its loss and jitter drawn from `seed`.
    pub fn new(params: LinkParams, seed: u64) -> Result<Self, ParamsError> {
        params.validate()?;
        Ok(DirectionModel {
            params,
            free_at: None,
            last_due: None,
            loss_rng: Rng::new(seed),
            jitter_rng: Rng::new(seed ^ 0x6a09_e667_f3bc_c909),
        })
    }

    /// The parameters in force.
    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// Changes the parameters from now on; frames already admitted keep
    /// their instants, and the generators go on where they were.
    pub fn set_params(&mut self, params: LinkParams) -> Result<(), ParamsError> {
        params.validate()?;
        self.params = params;
        Ok(())
    }

    /// Bytes waiting to be serialised at `now` (the frame on the wire
    /// included).
    pub fn backlog(&self, now: Instant) -> u64 {
        match self.free_at {
            Some(free) if self.params.rate_bps > 0 => {
                let ns = free.saturating_duration_since(now).as_nanos();
                u64::try_from(ns * u128::from(self.params.rate_bps) / 8 / 1_000_000_000).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// Decides the fate of a frame of `len` bytes entering the link at
    /// `now` (the link being up; instants passed in must not go backwards).
    pub fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        let p = self.params;
        let departure = if p.rate_bps == 0 {
            now
        } else {
            let backlog = self.backlog(now);
            if backlog > 0 && backlog + len as u64 > p.queue_bytes as u64 {
                return Verdict::Overflow;
            }
            let start = self.free_at.map_or(now, |f| f.max(now));
            let ns = (len as u128 * 8 * 1_000_000_000).div_ceil(u128::from(p.rate_bps));
            let done = start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
            self.free_at = Some(done);
            done
        };
        // One draw of each per admitted frame, whatever the parameters, so
        // the loss sequence does not depend on the jitter (or its absence).
        let lost = self.loss_rng.next_f64() < p.loss;
        let u = self.jitter_rng.next_f64();
        if lost {
            return Verdict::Lost;
        }
        let delay = if p.jitter.is_zero() {
            p.delay
        } else {
            // delay + j, j uniform in [-jitter, +jitter], at least zero;
            // in whole nanoseconds so that the bounds hold exactly.
            let span = p.jitter.as_nanos().saturating_mul(2);
            let offset = ((u * span as f64) as u128).min(span);
            let ns = (p.delay.as_nanos() + offset).saturating_sub(p.jitter.as_nanos());
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        };
        let due = match self.last_due {
            Some(last) => (departure + delay).max(last),
            None => departure + delay,
        };
        self.last_due = Some(due);
        Verdict::Deliver(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn loss_is_seeded_reproducible_and_near_its_rate() {
        let params = LinkParams { loss: 0.1, ..LinkParams::default() };
        // Which of 10 000 frames are lost, by index.
        let lost = |seed: u64, jitter: Duration| -> Vec<usize> {
            let mut m = DirectionModel::new(params.with_jitter(jitter), seed).expect("valid");
            let t0 = Instant::now();
            (0..10_000).filter(|&i| m.admit(t0 + us(i as u64), 100) == Verdict::Lost).collect()
        };
        assert_eq!(lost(7, Duration::ZERO), lost(7, Duration::ZERO), "same seed, same losses");
        assert_eq!(lost(7, Duration::ZERO), lost(7, ms(5)), "jitter does not move the losses");
        assert_ne!(lost(7, Duration::ZERO), lost(8, Duration::ZERO), "another seed, other losses");
        let n = lost(7, Duration::ZERO).len();
        // Binomial(10 000, 0.1): sd 30; 900..1100 is more than 3 sd.
        assert!((900..1100).contains(&n), "{n} of 10 000 lost at 10%");
        // None lost at 0, all at 1.
        let mut m = DirectionModel::new(LinkParams::default(), 1).expect("valid");
        assert!((0..1000).all(|_| matches!(m.admit(Instant::now(), 100), Verdict::Deliver(_))));
        let mut m = DirectionModel::new(params.with_loss(1.0), 1).expect("valid");
        assert!((0..1000).all(|_| m.admit(Instant::now(), 100) == Verdict::Lost));
    }

    #[test]
    fn the_shaper_paces_and_drops_its_tail() {
        let t0 = Instant::now();
        let params = LinkParams {
            delay: ms(20),
            rate_bps: 8_000_000, /* 1 byte/µs */
            queue_bytes: 3000,
            ..LinkParams::default()
        };
        let mut s = DirectionModel::new(params, 1).expect("valid");
        // Back to back: each 1000-byte frame leaves 1 ms after the last.
        let due: Vec<_> = (0..3)
            .map(|_| match s.admit(t0, 1000) {
                Verdict::Deliver(d) => d.duration_since(t0).as_micros(),
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(due, vec![21_000, 22_000, 23_000]);
        assert_eq!(s.backlog(t0), 3000);
        // The queue holds 3000 bytes: a fourth does not fit until 1000
        // bytes have left.
        assert_eq!(s.admit(t0, 1000), Verdict::Overflow);
        assert_eq!(s.admit(t0 + us(999), 1000), Verdict::Overflow);
        assert_eq!(s.admit(t0 + ms(1), 1000), Verdict::Deliver(t0 + ms(24)));
        // Once drained, the link is idle: a frame leaves after its own
        // serialisation only; one larger than the queue still goes on an
        // idle link.
        assert_eq!(s.admit(t0 + ms(100), 500), Verdict::Deliver(t0 + ms(100) + us(500) + ms(20)));
        assert_eq!(s.admit(t0 + ms(200), 9000), Verdict::Deliver(t0 + ms(200) + us(9000) + ms(20)));
        // No rate: only the delay, and no queue.
        let mut free = DirectionModel::new(LinkParams { rate_bps: 0, ..params }, 1).expect("valid");
        for _ in 0..10_000 {
            assert_eq!(free.admit(t0, 9000), Verdict::Deliver(t0 + ms(20)));
        }
    }

    #[test]
    fn pacing_holds_the_rate_over_many_frames() {
        // 1 Gbit/s, 1514-byte frames offered at twice the rate for a
        // simulated second: the deliveries are exactly rate-spaced and the
        // queue takes the excess.
        let t0 = Instant::now();
        let params = LinkParams::wan(1_000_000_000, Duration::ZERO).with_queue_bytes(256 << 10);
        let mut s = DirectionModel::new(params, 3).expect("valid");
        let (mut delivered, mut overflowed, mut last) = (0u64, 0u64, t0);
        for i in 0..165_000u64 {
            match s.admit(t0 + Duration::from_nanos(i * 6056), 1514) {
                Verdict::Deliver(d) => {
                    delivered += 1514;
                    last = d;
                }
                Verdict::Overflow => overflowed += 1,
                Verdict::Lost => panic!("no loss configured"),
            }
        }
        let rate = delivered as f64 * 8.0 / last.duration_since(t0).as_secs_f64();
        assert!((rate / 1e9 - 1.0).abs() < 1e-4, "paced at {rate} bit/s");
        assert!(overflowed > 80_000, "half the offered frames overflow: {overflowed}");
        // Runtime change of the rate: the next frames are paced at the new rate.
        s.set_params(LinkParams { rate_bps: 100_000_000, ..params }).expect("valid");
        let t1 = last + ms(10);
        let a = s.admit(t1, 1250);
        let b = s.admit(t1, 1250);
        assert_eq!((a, b), (Verdict::Deliver(t1 + us(100)), Verdict::Deliver(t1 + us(200))));
    }

    #[test]
    fn jitter_is_bounded_and_keeps_order() {
        let t0 = Instant::now();
        let params = LinkParams { delay: ms(25), jitter: ms(5), ..LinkParams::default() };
        let mut m = DirectionModel::new(params, 11).expect("valid");
        // Frames 50 µs apart: within bounds, in order, and some held back
        // behind a predecessor that drew a longer delay.
        let (mut prev, mut held_back) = (t0, 0);
        for i in 0..20_000u64 {
            let at = t0 + us(i * 50);
            let Verdict::Deliver(due) = m.admit(at, 100) else { panic!("delivered") };
            let d = due.duration_since(at);
            assert!(d >= ms(20) && d <= ms(30), "frame {i}: {d:?} outside 25 ms ± 5 ms");
            assert!(due >= prev, "frame {i} overtook its predecessor");
            if due == prev {
                held_back += 1;
            }
            prev = due;
        }
        assert!(held_back > 1000, "frames 50 µs apart with 10 ms of jitter must bunch: {held_back}");
        // Frames 20 ms apart never catch up with each other: the delays are
        // the draws, spread uniformly over 20..30 ms.
        let mut m = DirectionModel::new(params, 12).expect("valid");
        let delays: Vec<f64> = (0..10_000u64)
            .map(|i| {
                let at = t0 + ms(i * 20);
                let Verdict::Deliver(due) = m.admit(at, 100) else { panic!("delivered") };
                due.duration_since(at).as_secs_f64() * 1e3
            })
            .collect();
        let (min, max) = delays.iter().fold((f64::MAX, 0f64), |(a, b), &d| (a.min(d), b.max(d)));
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((20.0..20.1).contains(&min) && max <= 30.0 && max > 29.9, "{min}..{max} ms");
        // Uniform on 20..30: sd 2.9 ms, of the mean of 10 000: 0.03 ms.
        assert!((mean - 25.0).abs() < 0.15, "mean {mean} ms");
        // Jitter larger than the delay: never a negative delay.
        let mut m = DirectionModel::new(LinkParams { delay: ms(1), jitter: ms(5), ..params }, 2).expect("valid");
        for i in 0..1000 {
            let at = t0 + ms(i * 20);
            let Verdict::Deliver(due) = m.admit(at, 100) else { panic!("delivered") };
            assert!(due >= at && due <= at + ms(6));
        }
        // Same seed, same instants.
        let run = |seed| {
            let mut m = DirectionModel::new(params, seed).expect("valid");
            (0..100).map(|i| m.admit(t0 + ms(i), 100)).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn the_outage_schedule_is_half_open_sorted_and_merged() {
        let s = OutageSchedule::new([(ms(500), ms(100)), (ms(100), ms(50)), (ms(120), ms(80)), (ms(900), ms(0))]);
        assert_eq!(
            s.outages(),
            &[Outage { start: ms(100), duration: ms(100) }, Outage { start: ms(500), duration: ms(100) }]
        );
        let down: Vec<u64> = (0..1000).filter(|&t| s.is_down(ms(t))).collect();
        let expected: Vec<u64> = (100..200).chain(500..600).collect();
        assert_eq!(down, expected);
        assert!(!OutageSchedule::none().is_down(Duration::ZERO));
        // Back-to-back outages merge into one.
        let s = OutageSchedule::new([(ms(0), ms(10)), (ms(10), ms(10))]);
        assert_eq!(s.outages(), &[Outage { start: ms(0), duration: ms(20) }]);
        assert!(s.is_down(Duration::ZERO) && s.is_down(ms(19)) && !s.is_down(ms(20)));
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(LinkParams::default().with_loss(1.5).validate(), Err(ParamsError::Loss(1.5)));
        assert!(LinkParams::default().with_loss(f64::NAN).validate().is_err());
        let p = LinkParams::wan(1_000_000, ms(10)).with_queue_bytes(0);
        assert_eq!(DirectionModel::new(p, 1).err(), Some(ParamsError::NoQueue));
        // wan(): half the RTT each way, one BDP of queue (at least 1 MiB).
        let p = LinkParams::wan(1_000_000_000, ms(50));
        assert_eq!((p.delay, p.queue_bytes), (ms(25), 6_250_000));
        assert_eq!(LinkParams::wan(1_000_000_000, ms(1)).queue_bytes, 1 << 20);
    }
}
