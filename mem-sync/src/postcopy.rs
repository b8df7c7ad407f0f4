//! Post-copy policy, pure: which pages the source sends next once the guest
//! runs at the destination, and when a hybrid migration should stop
//! pre-copying and switch to post-copy. No I/O, no clocks, no KVM.
//!
//! # Pre-paging with adaptive bubbling ([`Prepager`])
//!
//! After the switch the source holds every page the destination lacks and
//! sends each exactly once. Two kinds of sends share the link:
//!
//! - **requested** pages: the destination faulted on them and a vCPU waits.
//!   [`Prepager::on_fault`] queues them (each once); the driver drains
//!   [`Prepager::next_requested`] before anything else, on its own stream,
//!   and each requested page goes out with up to
//!   [`PrepagerConfig::request_neighbours`] pages after it. The destination
//!   batches the faults it sees, so many requests are in flight at once;
//! - **pushed** pages ([`Prepager::next_push_batch`]): Hines and Gopalan's
//!   pre-paging with adaptive *bubbling* (VEE'09): every fault is a *pivot*,
//!   and the push grows a bubble around it, one chunk upward, one chunk
//!   downward, so the pages next to where the guest is working arrive before
//!   it touches them. Pivots are kept newest first (at most
//!   [`PrepagerConfig::max_pivots`]; a new fault retires the oldest); each
//!   batch serves them in that order. A bubble edge passes over pages
//!   already sent and stops after [`PrepagerConfig::max_skip`] of them in a
//!   row (it ran into an earlier bubble or a region sent on request) or at
//!   the end of memory; a pivot whose two edges stopped is dropped. With no
//!   pivot the push scans linearly from the lowest page not yet sent.
//!
//! The driver confirms what it wrote with [`Prepager::on_sent`]; the policy
//! [`Prepager::is_done`] exactly when every page was confirmed. After a
//! link outage, [`Prepager::requeue`] puts back what the destination says
//! it never received. Memory: four bits a page (to send, queued, sent,
//! in the request queue) plus the queue of requests and the pivots.
//!
//! Measured on a simulated run (the test
//! `bubbling_avoids_faults_a_linear_push_takes`, `cargo test -p
//! wanmig-mem-sync bubbling -- --nocapture`): 256 MiB, a 32 MiB working
//! set, 32 pages a tick, 5 ticks each way; each vCPU random-walks (±4
//! pages a step, a jump anywhere in the working set now and then) and
//! waits a round trip on each network fault. Bubbling avoids 84% (1 quiet
//! vCPU), 72% (4 busy vCPUs) and 69% (4 vCPUs jumping one step in 4) of
//! the network faults a linear push takes, and beats a push that jumps
//! forward to the last fault (QEMU's) in each case. The faults are 0.2–1.3%
//! of the working set with bubbling, 1.0–4.3% with the linear push: far
//! below Hines' ~21% because here a waiting vCPU stops touching pages
//! (so faults are bounded by round trips), and the link pushes 320 pages a
//! round trip; the comparison between orders is the point, not the level.
//!
//! # When to switch ([`HybridPolicy`])
//!
//! Pre-copy first; switch to post-copy when rounds stop shrinking, the
//! predicted downtime is over budget, and converging would need the guest
//! throttled past [`HybridPolicy::max_throttle`] (default 50%). See there
//! for why 50.

use std::collections::VecDeque;
use std::time::Duration;

use crate::policy::{ConvergencePolicy, Decision, DowntimeBudget, RoundReport};
use wanmig_types::PageRange;

/// Tunables of [`Prepager`], with defaults and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepagerConfig {
    /// Pages sent after each requested page when they are still to send
    /// (default 7: an answer of 32 KiB, which a 1 Gbit/s link carries in
    /// a quarter of a millisecond, so a request behind it waits little; the
    /// push does the rest).
    pub request_neighbours: u64,
    /// Most pivots kept (default 8: one a vCPU for small guests; a few
    /// recent ones cover the places a guest alternates between).
    pub max_pivots: usize,
    /// A bubble edge stops after this many pages in a row that were already
    /// sent (default 512, 2 MiB: it jumps a requested run or a hole, but
    /// not a whole earlier bubble).
    pub max_skip: u64,
    /// Pages an edge takes before the other edge's turn (default 16).
    pub chunk: u64,
    /// Bubbles grow both ways (default). `false` grows them upward only,
    /// like QEMU's push that jumps to the last requested page (kept to
    /// compare against).
    pub bidirectional: bool,
}

impl Default for PrepagerConfig {
    fn default() -> Self {
        PrepagerConfig { request_neighbours: 7, max_pivots: 8, max_skip: 512, chunk: 16, bidirectional: true }
    }
}

/// One bubble: pages at or above `up` and below `down` are its next ones.
#[derive(Debug, Clone, Copy)]
struct Pivot {
    up: u64,
    down: u64,
    up_done: bool,
    down_done: bool,
    /// Which edge grows next.
    up_next: bool,
}

/// A bitmap over `pages` pages with a count of set bits.
#[derive(Debug, Clone)]
struct Bits {
    words: Vec<u64>,
    set: u64,
}

impl Bits {
    fn new(pages: u64, full: bool) -> Bits {
        let n = pages.div_ceil(64) as usize;
        let mut words = vec![if full { u64::MAX } else { 0 }; n];
        if full && pages % 64 != 0 {
            words[n - 1] = (1u64 << (pages % 64)) - 1;
        }
        Bits { words, set: if full { pages } else { 0 } }
    }

    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; whether it changed.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        let changed = self.words[w] & b == 0;
        self.words[w] |= b;
        self.set += u64::from(changed);
        changed
    }

    /// Clears bit `i`; whether it changed.
    fn clear(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        let changed = self.words[w] & b != 0;
        self.words[w] &= !b;
        self.set -= u64::from(changed);
        changed
    }

    /// First set bit at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        if w >= self.words.len() {
            return None;
        }
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return Some(w as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }
}

/// Appends page `p` to `out`, extending the last range when adjacent.
fn push_page(out: &mut Vec<PageRange>, p: u64) {
    match out.last_mut() {
        Some(last) if last.end() == p => last.count += 1,
        Some(last) if p + 1 == last.first => {
            last.first = p;
            last.count += 1;
        }
        _ => out.push(PageRange { first: p, count: 1 }),
    }
}

/// The source's post-copy send order (see the module doc). Page numbers
/// are indices over all guest RAM, `0..pages`.
#[derive(Debug, Clone)]
pub struct Prepager {
    cfg: PrepagerConfig,
    pages: u64,
    /// Not handed out yet.
    todo: Bits,
    /// In the request queue.
    queued: Bits,
    /// Confirmed sent.
    sent: Bits,
    requests: VecDeque<u64>,
    pivots: VecDeque<Pivot>,
    /// The pivot whose turn it is.
    turn: usize,
    requested_total: u64,
    pushed_total: u64,
}

impl Prepager {
    /// A policy for `pages` pages, all still to send.
    pub fn new(pages: u64, cfg: PrepagerConfig) -> Self {
        Prepager {
            cfg,
            pages,
            todo: Bits::new(pages, true),
            queued: Bits::new(pages, false),
            sent: Bits::new(pages, false),
            requests: VecDeque::new(),
            pivots: VecDeque::new(),
            turn: 0,
            requested_total: 0,
            pushed_total: 0,
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages the destination already holds (sent by pre-copy and not
    /// dirtied since): they count as sent. Parts outside `0..pages` are
    /// ignored.
    pub fn already_there(&mut self, range: PageRange) {
        for p in range.first..range.end().min(self.pages) {
            self.todo.clear(p);
            self.sent.set(p);
        }
    }

    /// A fault the destination reported on `page`: if the page is still to
    /// send, it is queued as a request (once, however often it is
    /// reported), and the push moves next to it. Returns whether it was
    /// queued. A page past the end is ignored (it came from the peer).
    pub fn on_fault(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let queued = self.todo.clear(page);
        if queued {
            self.queued.set(page);
            self.requests.push_back(page);
        }
        if self.cfg.max_pivots > 0 {
            if self.pivots.len() == self.cfg.max_pivots {
                self.pivots.pop_back();
            }
            let down_done = !self.cfg.bidirectional;
            self.pivots.push_front(Pivot { up: page + 1, down: page, up_done: false, down_done, up_next: true });
            self.turn = 0;
        }
        queued
    }

    /// Requested pages to send now, in the order they were requested, each
    /// with up to `request_neighbours` pages after it; at most `max` pages.
    /// The driver drains this before [`Prepager::next_push_batch`].
    pub fn next_requested(&mut self, max: u64) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        let mut n = 0;
        while n < max {
            let Some(p) = self.requests.pop_front() else { break };
            self.queued.clear(p);
            // Upward merges only: requests keep their order.
            match out.last_mut() {
                Some(last) if last.end() == p => last.count += 1,
                _ => out.push(PageRange { first: p, count: 1 }),
            }
            n += 1;
            let mut q = p + 1;
            while n < max && q < self.pages && q <= p + self.cfg.request_neighbours && self.todo.clear(q) {
                out.last_mut().expect("the requested page is in").count += 1;
                n += 1;
                q += 1;
            }
        }
        self.requested_total += n;
        out
    }

    /// Requests waiting in the queue.
    pub fn queued_requests(&self) -> usize {
        self.requests.len()
    }

    /// Takes page `p` if it is still to send.
    fn take(&mut self, p: u64, out: &mut Vec<PageRange>) -> bool {
        let taken = self.todo.clear(p);
        if taken {
            push_page(out, p);
        }
        taken
    }

    /// Up to `want` pages from one edge of pivot `i`; how many it took.
    fn grow(&mut self, i: usize, upward: bool, want: u64, out: &mut Vec<PageRange>) -> u64 {
        let (mut took, mut skipped) = (0, 0);
        let mut pv = self.pivots[i];
        while took < want {
            let next = if upward { (pv.up < self.pages).then_some(pv.up) } else { pv.down.checked_sub(1) };
            let Some(p) = next else {
                if upward {
                    pv.up_done = true
                } else {
                    pv.down_done = true
                }
                break;
            };
            if upward {
                pv.up = p + 1
            } else {
                pv.down = p
            }
            if self.take(p, out) {
                took += 1;
                skipped = 0;
            } else {
                skipped += 1;
                if skipped > self.cfg.max_skip {
                    if upward {
                        pv.up_done = true
                    } else {
                        pv.down_done = true
                    }
                    break;
                }
            }
        }
        self.pivots[i] = pv;
        took
    }

    /// Pages to push now, at most `max`: bubbles around the pivots, newest
    /// first, then a linear scan. Pages in the request queue are never
    /// pushed: they go out through [`Prepager::next_requested`].
    pub fn next_push_batch(&mut self, max: u64) -> Vec<PageRange> {
        let mut out = Vec::new();
        let mut n = 0;
        // One chunk of one edge at a time: the pivot at `turn` grows its
        // upward edge, then its downward one, then the next pivot's turn
        // comes (a new fault puts its pivot first and the turn on it).
        while n < max && !self.pivots.is_empty() && self.todo.set > 0 {
            let i = self.turn % self.pivots.len();
            let pv = self.pivots[i];
            if pv.up_done && pv.down_done {
                self.pivots.remove(i);
                continue;
            }
            let upward = if pv.up_done { false } else { pv.up_next || pv.down_done };
            n += self.grow(i, upward, self.cfg.chunk.min(max - n), &mut out);
            let pv = &mut self.pivots[i];
            pv.up_next = !upward;
            if !upward || pv.down_done {
                self.turn = i + 1;
            }
        }
        let mut from = 0;
        while n < max {
            let Some(p) = self.todo.next_set(from) else { break };
            self.take(p, &mut out);
            n += 1;
            from = p + 1;
        }
        self.pushed_total += n;
        out
    }

    /// The driver wrote these pages to the link. Pages never handed out
    /// are taken too (the driver sent them on its own).
    pub fn on_sent(&mut self, ranges: &[PageRange]) {
        for r in ranges {
            for p in r.first..r.end().min(self.pages) {
                self.todo.clear(p);
                self.sent.set(p);
            }
        }
    }

    /// Pages the destination never received (after a link outage): to send
    /// again. Pages already queued as requests stay queued.
    pub fn requeue(&mut self, range: PageRange) {
        for p in range.first..range.end().min(self.pages) {
            self.sent.clear(p);
            if !self.queued.get(p) {
                self.todo.set(p);
            }
        }
    }

    /// Every page was confirmed sent.
    pub fn is_done(&self) -> bool {
        self.sent.set == self.pages
    }

    /// Pages not yet confirmed sent.
    pub fn remaining(&self) -> u64 {
        self.pages - self.sent.set
    }

    /// Pages handed out by [`Prepager::next_requested`] and
    /// [`Prepager::next_push_batch`] so far: (requested with their
    /// neighbours, pushed).
    pub fn handed_out(&self) -> (u64, u64) {
        (self.requested_total, self.pushed_total)
    }
}

/// What a hybrid migration does after a pre-copy round.
#[derive(Debug, Clone, PartialEq)]
pub enum HybridDecision {
    /// Pre-copy goes on as the pre-copy policy says.
    PreCopy(Decision),
    /// Stop pre-copying: pause, send the device state (and the pages the
    /// destination lacks as a bitmap), resume at the destination.
    SwitchToPostcopy {
        /// Why, with the numbers.
        reason: String,
    },
}

/// Pre-copy with [`DowntimeBudget`], switching to post-copy instead of
/// throttling hard or giving up.
///
/// After each round it switches when all of these hold:
/// - the predicted downtime is over budget (else: stop-and-copy);
/// - the rounds stopped shrinking: this round left at least
///   [`HybridPolicy::shrink`] (90%) of the previous round's dirty pages, for
///   [`HybridPolicy::stalled_rounds`] (1) round(s);
/// - converging would take a throttle above [`HybridPolicy::max_throttle`]:
///   either the estimate `1 - page_rate / dirty_rate` (a throttle of t
///   leaves at most `(1 - t)` of the dirty rate, and rounds shrink only
///   while it is below the rate pages move) says so, or the pre-copy
///   policy asks for more than that, or gives up.
///
/// Why 50%: a guest that needs more than half its CPU taken away dirties
/// over twice what the link moves; throttled to converge, it runs at half
/// speed or less for every remaining round, each of which re-sends its
/// working set, and the last rounds (QEMU's schedule: +10% a round, which
/// ours follows) cost several more. Post-copy sends every page once and
/// costs the guest a round trip per network fault, which pre-paging keeps
/// to a fraction of its working set (Hines and Gopalan: ~21%; our
/// simulation in [`Prepager`]'s tests). Below 50%, throttling is the
/// cheaper and safer choice: the source keeps the whole VM until the
/// commit, where post-copy splits it between two hosts until the last
/// page arrives.
#[derive(Debug, Clone)]
pub struct HybridPolicy {
    /// The pre-copy policy consulted first.
    pub precopy: DowntimeBudget,
    /// Highest throttle worth taking instead of switching, percent (default 50).
    pub max_throttle: u8,
    /// A round "shrank" if it left less than this share of the previous
    /// round's dirty pages (default 0.9).
    pub shrink: f64,
    /// Rounds in a row that did not shrink before switching (default 1).
    pub stalled_rounds: u32,
    prev_dirty: Option<u64>,
    stalled: u32,
}

impl HybridPolicy {
    /// The defaults with downtime `budget`.
    pub fn new(budget: Duration) -> Self {
        HybridPolicy {
            precopy: DowntimeBudget::new(budget),
            max_throttle: 50,
            shrink: 0.9,
            stalled_rounds: 1,
            prev_dirty: None,
            stalled: 0,
        }
    }

    /// The throttle (percent, 0..=100) the guest would need for rounds to
    /// shrink: `1 - page_rate / dirty_rate` of the round, or 0 when the
    /// link outpaces the guest.
    pub fn needed_throttle(r: &RoundReport) -> u8 {
        let dirty = r.dirty_rate();
        if dirty <= r.page_rate || dirty <= 0.0 {
            return 0;
        }
        ((1.0 - r.page_rate / dirty) * 100.0).ceil().clamp(0.0, 100.0) as u8
    }

    /// The decision after round `r`.
    pub fn decide(&mut self, r: &RoundReport) -> HybridDecision {
        let predicted = r.predicted_downtime();
        let grew = match self.prev_dirty {
            Some(prev) => r.dirty_pages as f64 >= self.shrink * prev as f64,
            None => false,
        };
        self.prev_dirty = Some(r.dirty_pages);
        self.stalled = if grew { self.stalled + 1 } else { 0 };
        let within_budget = predicted <= self.precopy.budget;
        let needed = Self::needed_throttle(r);
        let budget = self.precopy.budget;
        let switch = |why: String| HybridDecision::SwitchToPostcopy {
            reason: format!(
                "{why}: the guest dirties {:.1} MiB/s, pages move at {:.1} MiB/s, {} dirty pages left \
                 ({} of the round before), predicted downtime {:.0} ms > budget {:.0} ms",
                r.dirty_rate() * 4096.0 / 1048576.0,
                r.page_rate * 4096.0 / 1048576.0,
                r.dirty_pages,
                if grew { "not shrinking" } else { "shrinking" },
                predicted.as_secs_f64() * 1e3,
                budget.as_secs_f64() * 1e3,
            ),
        };
        if !within_budget && self.stalled >= self.stalled_rounds && needed > self.max_throttle {
            return switch(format!("converging needs the guest throttled {needed}% (> {}%)", self.max_throttle));
        }
        match self.precopy.decide(r) {
            Decision::Throttle(p) if p > self.max_throttle => {
                switch(format!("pre-copy asks for a {p}% throttle (> {}%)", self.max_throttle))
            }
            Decision::GiveUp(why) => switch(format!("pre-copy gives up ({why})")),
            d => HybridDecision::PreCopy(d),
        }
    }
}

impl ConvergencePolicy for HybridPolicy {
    /// For a driver that has no post-copy: the switch becomes giving up.
    fn decide(&mut self, r: &RoundReport) -> Decision {
        match HybridPolicy::decide(self, r) {
            HybridDecision::PreCopy(d) => d,
            HybridDecision::SwitchToPostcopy { reason } => Decision::GiveUp(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pages_of(ranges: &[PageRange]) -> Vec<u64> {
        ranges.iter().flat_map(|r| r.first..r.end()).collect()
    }

    #[test]
    fn a_fault_is_answered_first_with_its_neighbours_then_the_bubble_grows_both_ways() {
        let mut p = Prepager::new(1000, PrepagerConfig::default());
        assert!(p.on_fault(500));
        assert!(!p.on_fault(500), "queued once");
        assert_eq!(p.next_requested(100), vec![PageRange { first: 500, count: 8 }]);
        let push = p.next_push_batch(40);
        // 16 up from 508, 16 down from 499, then 8 more up.
        assert_eq!(
            pages_of(&push),
            [(508..524).collect::<Vec<_>>(), (484..500).collect(), (524..532).collect()].concat()
        );
        assert_eq!(push[0], PageRange { first: 508, count: 16 });
        assert_eq!(push[1], PageRange { first: 484, count: 16 });
        // A newer fault takes the lead.
        p.on_fault(100);
        assert_eq!(p.next_requested(100), vec![PageRange { first: 100, count: 8 }]);
        assert_eq!(p.next_push_batch(16), vec![PageRange { first: 108, count: 16 }]);
        assert_eq!(p.next_push_batch(16), vec![PageRange { first: 84, count: 16 }]);
        assert_eq!(p.handed_out(), (16, 72));
    }

    #[test]
    fn without_pivots_the_push_is_linear_and_the_end_is_exact() {
        let mut p = Prepager::new(130, PrepagerConfig::default());
        p.already_there(PageRange { first: 10, count: 20 });
        let a = p.next_push_batch(100);
        assert_eq!(a, vec![PageRange { first: 0, count: 10 }, PageRange { first: 30, count: 90 }]);
        p.on_sent(&a);
        assert!(!p.is_done());
        let b = p.next_push_batch(100);
        assert_eq!(b, vec![PageRange { first: 120, count: 10 }]);
        assert_eq!(p.next_push_batch(100), vec![]);
        assert!(!p.is_done(), "not until confirmed");
        p.on_sent(&b);
        assert!(p.is_done());
        // After an outage the destination lacks some: they go again.
        p.requeue(PageRange { first: 5, count: 3 });
        assert_eq!((p.is_done(), p.remaining()), (false, 3));
        assert_eq!(p.next_push_batch(100), vec![PageRange { first: 5, count: 3 }]);
    }

    #[test]
    fn peer_pages_out_of_range_are_ignored() {
        let mut p = Prepager::new(10, PrepagerConfig::default());
        assert!(!p.on_fault(10));
        assert!(!p.on_fault(u64::MAX));
        p.requeue(PageRange { first: u64::MAX - 1, count: 1 });
        p.on_sent(&[PageRange { first: 8, count: 100 }]);
        assert_eq!(p.remaining(), 8);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Fault(u64),
        Requested(u64),
        Push(u64),
        /// Confirm the oldest `n` handed-out ranges.
        Confirm(usize),
        /// The link failed: the oldest `n` unconfirmed ranges were lost.
        Lose(usize),
    }

    fn ops(pages: u64) -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0..pages + 2).prop_map(Op::Fault),
                2 => (0u64..40).prop_map(Op::Requested),
                2 => (0u64..40).prop_map(Op::Push),
                2 => (0usize..4).prop_map(Op::Confirm),
                1 => (0usize..2).prop_map(Op::Lose),
            ],
            0..120,
        )
    }

    proptest! {
        /// Against a naive model: every page is handed out once (again only
        /// after it was lost), requested pages never go out in a push, and
        /// the policy is done exactly when every page was confirmed.
        #[test]
        fn every_page_goes_once_and_it_ends_exactly_when_all_were_sent(
            pages in 1u64..300,
            ops in ops(300),
            neighbours in 0u64..9,
            pivots in 0usize..4,
            skip in 0u64..20,
        ) {
            let cfg = PrepagerConfig { request_neighbours: neighbours, max_pivots: pivots, max_skip: skip, chunk: 4, bidirectional: true };
            let mut p = Prepager::new(pages, cfg);
            let mut handed = vec![0u32; pages as usize]; // times handed out, minus times lost
            let mut confirmed = vec![false; pages as usize];
            let mut unconfirmed: VecDeque<Vec<PageRange>> = VecDeque::new();
            let mut queued: Vec<u64> = Vec::new(); // model of the request queue
            let check = |ranges: &[PageRange], handed: &mut [u32]| {
                for q in pages_of(ranges) {
                    handed[q as usize] += 1;
                    assert_eq!(handed[q as usize], 1, "page {q} handed out twice");
                }
            };
            for op in ops {
                match op {
                    Op::Fault(f) => {
                        let before = f < pages && handed[f as usize] == 0 && !queued.contains(&f);
                        prop_assert_eq!(p.on_fault(f), before);
                        if before { queued.push(f); }
                    }
                    Op::Requested(n) => {
                        let r = p.next_requested(n);
                        let got = pages_of(&r);
                        prop_assert!(got.len() as u64 <= n);
                        // The requested pages come out in request order.
                        let req: Vec<u64> = got.iter().copied().filter(|q| queued.contains(q)).collect();
                        prop_assert_eq!(&req[..], &queued[..req.len()]);
                        queued.drain(..req.len());
                        check(&r, &mut handed);
                        unconfirmed.push_back(r);
                    }
                    Op::Push(n) => {
                        let r = p.next_push_batch(n);
                        let got = pages_of(&r);
                        prop_assert!(got.len() as u64 <= n);
                        for q in &got { prop_assert!(!queued.contains(q), "queued page {} pushed", q); }
                        check(&r, &mut handed);
                        // A push hands out as much as it may while pages remain to push.
                        let left = (0..pages).filter(|&q| handed[q as usize] == 0 && !queued.contains(&q)).count() as u64;
                        prop_assert!(got.len() as u64 == n || left == 0);
                        unconfirmed.push_back(r);
                    }
                    Op::Confirm(n) => {
                        for r in unconfirmed.drain(..n.min(unconfirmed.len())) {
                            p.on_sent(&r);
                            for q in pages_of(&r) { confirmed[q as usize] = true; }
                        }
                    }
                    Op::Lose(n) => {
                        for r in unconfirmed.drain(..n.min(unconfirmed.len())) {
                            for range in &r {
                                p.requeue(*range);
                                for q in range.first..range.end() { handed[q as usize] -= 1; confirmed[q as usize] = false; }
                            }
                        }
                    }
                }
                prop_assert_eq!(p.is_done(), confirmed.iter().all(|&c| c));
            }
            // Drain: requests first, then pushes, confirming everything.
            for r in unconfirmed.drain(..) { p.on_sent(&r); }
            loop {
                let r = p.next_requested(64);
                let r = if r.is_empty() { p.next_push_batch(64) } else { r };
                if r.is_empty() { break; }
                check(&r, &mut handed);
                prop_assert!(!p.is_done() || pages_of(&r).is_empty());
                p.on_sent(&r);
            }
            prop_assert!(p.is_done());
            prop_assert!(handed.iter().all(|&h| h == 1), "a page never went");
        }

        /// Bubbling sends the pages near a fault before far ones: right after
        /// a lone fault, every page pushed is within the bubble's reach.
        #[test]
        fn the_push_grows_outward_from_the_fault(pages in 64u64..5000, at in 0u64..5000, n in 1u64..200) {
            let at = at % pages;
            let mut p = Prepager::new(pages, PrepagerConfig::default());
            p.on_fault(at);
            p.next_requested(u64::MAX);
            let got = pages_of(&p.next_push_batch(n));
            // Distances from the fault never exceed the chunk's round:
            // after k rounds of 16 up and 16 down, at most 16k + 8 away.
            let rounds = n.div_ceil(32) + 1;
            for q in got {
                prop_assert!(q.abs_diff(at) <= 16 * rounds + 8 || at + 16 * rounds >= pages || at < 16 * rounds,
                    "page {} pushed {} pages from the fault", q, q.abs_diff(at));
            }
        }
    }

    /// A simulated guest: vCPUs, accesses a vCPU makes a tick, and one
    /// access in `jump` goes to a random page of the working set.
    #[derive(Debug, Clone, Copy)]
    struct Guest {
        vcpus: u64,
        steps: u64,
        jump: u64,
    }

    const PAGES: u64 = 65536; // 256 MiB
    const WS_BASE: u64 = 20_000;
    const WS: u64 = 8192; // 32 MiB working set

    /// A guest random-walking over its working set while post-copy runs:
    /// the link carries `link` pages a tick, requested pages first; a
    /// request and a page each take `delay` ticks one way. Each tick the
    /// vCPU makes `steps` accesses unless it waits for a page. A network
    /// fault is an access to a page the source has not sent yet (it must be
    /// requested). Each vCPU's walk moves -4..=4 pages a step, and jumps to
    /// a random page of the working set one step in `jump`. Returns (network
    /// faults, distinct working-set pages the guest touched, ticks until
    /// every page was sent).
    fn simulate(cfg: PrepagerConfig, seed: u64, g: Guest) -> (u64, u64, u64) {
        let (link, delay) = (32u64, 5u64);
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut p = Prepager::new(PAGES, cfg);
        let mut arrives = vec![u64::MAX; PAGES as usize];
        let mut touched = vec![false; PAGES as usize];
        let mut requests: VecDeque<(u64, u64)> = VecDeque::new(); // (tick the source sees it, page)
        // Each vCPU walks on its own, from its own place, and waits on its own.
        let mut pos: Vec<u64> = (0..g.vcpus).map(|v| WS * (2 * v + 1) / (2 * g.vcpus)).collect();
        let mut waiting: Vec<Option<u64>> = vec![None; g.vcpus as usize];
        let (mut faults, mut t) = (0u64, 0u64);
        while !p.is_done() {
            for v in 0..g.vcpus as usize {
                if waiting[v].is_some_and(|w| arrives[w as usize] <= t) {
                    waiting[v] = None;
                }
                let mut s = 0;
                while waiting[v].is_none() && s < g.steps {
                    // Mostly small steps, now and then a jump within the working set.
                    let r = next();
                    pos[v] = if r % g.jump == 0 { next() % WS } else { (pos[v] + WS + (r >> 8) % 9 - 4) % WS };
                    let page = WS_BASE + pos[v];
                    touched[page as usize] = true;
                    if arrives[page as usize] > t {
                        if arrives[page as usize] == u64::MAX && !requests.iter().any(|&(_, q)| q == page) {
                            faults += 1;
                            requests.push_back((t + delay, page));
                        }
                        waiting[v] = Some(page);
                    }
                    s += 1;
                }
            }
            // Source.
            while requests.front().is_some_and(|&(seen, _)| seen <= t) {
                let (_, page) = requests.pop_front().expect("front");
                p.on_fault(page);
            }
            let mut sent = p.next_requested(link);
            let n: u64 = sent.iter().map(|r| r.count).sum();
            sent.extend(p.next_push_batch(link - n));
            for q in pages_of(&sent) {
                arrives[q as usize] = t + delay;
            }
            p.on_sent(&sent);
            t += 1;
        }
        (faults, touched.iter().filter(|&&b| b).count() as u64, t)
    }

    /// Prints, for a quiet and a busy guest, the network faults of each
    /// push order as a share of the working-set pages the guest touched and
    /// of the whole working set, and the share bubbling avoids against the
    /// linear push. Requests are answered first, with their neighbours, in
    /// every case; only the push differs.
    #[test]
    fn bubbling_avoids_faults_a_linear_push_takes() {
        let linear = PrepagerConfig { max_pivots: 0, ..Default::default() };
        let forward = PrepagerConfig { max_pivots: 1, bidirectional: false, max_skip: u64::MAX, ..Default::default() };
        let bubbling = PrepagerConfig::default();
        println!("256 MiB, a 32 MiB working set, 32 pages a tick, 5 ticks one way; 5 seeds each");
        let guests = [
            ("quiet: 1 vCPU, 8 steps/tick, jump 1 in 64", Guest { vcpus: 1, steps: 8, jump: 64 }),
            ("busy: 4 vCPUs, 256 steps/tick, jump 1 in 64", Guest { vcpus: 4, steps: 256, jump: 64 }),
            ("scattered: 4 vCPUs, 256 steps/tick, jump 1 in 4", Guest { vcpus: 4, steps: 256, jump: 4 }),
        ];
        for (guest, g) in guests {
            let mut faults = Vec::new();
            for (name, cfg) in
                [("linear push", linear), ("push jumps forward to the fault", forward), ("bubbling", bubbling)]
            {
                let (mut f, mut touched) = (0, 0);
                for seed in 1..=5 {
                    let (n, w, _) = simulate(cfg, seed * 0x9e37_79b9, g);
                    f += n;
                    touched += w;
                }
                println!(
                    "{guest}: {name:>32}: {f:>5} network faults, {:5.1}% of the working-set pages touched, {:5.1}% of the working set",
                    100.0 * f as f64 / touched as f64,
                    100.0 * f as f64 / (5 * WS) as f64
                );
                faults.push(f);
            }
            println!(
                "{guest}: bubbling avoids {:.0}% of the linear push's network faults",
                100.0 * (1.0 - faults[2] as f64 / faults[0] as f64)
            );
            // Bubbling takes fewer faults than either other push.
            assert!(faults[2] < faults[0] && faults[2] < faults[1], "{faults:?}");
        }
    }

    fn round(round: u32, dirty_pages: u64, pages_sent: u64, secs: f64) -> RoundReport {
        RoundReport {
            round,
            pages_sent,
            bytes_sent: pages_sent * 4096,
            elapsed: Duration::from_secs_f64(secs),
            dirty_pages,
            bytes_per_page: 4096.0,
            page_rate: 10_000.0, // ~39 MiB/s
            link_rate: 10_000.0 * 4096.0,
            state_bytes: 100_000,
            rtt: Duration::from_millis(50),
            switch: Duration::from_millis(50),
        }
    }

    #[test]
    fn a_guest_dirtying_four_times_the_link_switches_without_being_throttled() {
        let mut h = HybridPolicy::new(Duration::from_millis(300));
        // Round 0 sends 256 MiB in 6.5 s; the guest dirties 40 000 pages/s
        // over a 30 000-page working set: every round leaves it all dirty.
        assert_eq!(h.decide(&round(0, 30_000, 65_536, 6.5)), HybridDecision::PreCopy(Decision::Continue));
        assert_eq!(HybridPolicy::needed_throttle(&round(1, 30_000, 30_000, 0.75)), 75);
        let d = h.decide(&round(1, 30_000, 30_000, 0.75));
        let HybridDecision::SwitchToPostcopy { reason } = d else { panic!("did not switch: {d:?}") };
        assert!(reason.contains("throttled 75%") && reason.contains("not shrinking"), "{reason}");
        assert_eq!(h.precopy.throttle(), 0);
    }

    #[test]
    fn a_guest_that_converges_with_a_light_throttle_is_not_switched() {
        let mut h = HybridPolicy::new(Duration::from_millis(300));
        // Dirtying 15 000 pages/s against 10 000 moved: a 34% throttle does it.
        assert_eq!(h.decide(&round(0, 20_000, 65_536, 6.5)), HybridDecision::PreCopy(Decision::Continue));
        let mut decisions = Vec::new();
        for r in 1..5 {
            decisions.push(h.decide(&round(r, 20_000, 20_000, 2.0 / 1.5 * 1.0)));
        }
        assert!(decisions.iter().all(|d| matches!(d, HybridDecision::PreCopy(_))), "{decisions:?}");
        assert!(decisions.contains(&HybridDecision::PreCopy(Decision::Throttle(20))), "{decisions:?}");
        // Shrinking rounds and a prediction within budget: stop-and-copy.
        assert_eq!(h.decide(&round(5, 1_000, 20_000, 2.0)), HybridDecision::PreCopy(Decision::StopAndCopy));
    }

    #[test]
    fn throttling_past_the_limit_switches_instead() {
        let mut h = HybridPolicy::new(Duration::from_millis(300));
        h.max_throttle = 30;
        // The guest dirties less than the link moves (7 500 pages/s), so no
        // throttle looks needed, but its working set never shrinks below
        // 30 000 pages (3 s of downtime): the pre-copy policy throttles 20,
        // 30, then asks for 40.
        let mut last = None;
        for r in 0..10 {
            let d = h.decide(&round(r, 30_000, 40_000, 4.0));
            if matches!(d, HybridDecision::SwitchToPostcopy { .. }) {
                last = Some((r, d));
                break;
            }
        }
        let Some((r, HybridDecision::SwitchToPostcopy { reason })) = last else { panic!("never switched") };
        assert!(reason.contains("40% throttle"), "round {r}: {reason}");
    }
}
