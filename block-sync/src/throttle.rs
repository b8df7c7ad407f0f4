//! When and how hard to throttle a guest's disk writes (Bradford et al.,
//! VEE'07): a copy of written blocks converges only while the guest writes
//! slower than the link carries them.

/// The lowest write rate the throttle imposes, bytes/s.
pub const MIN_WRITE_LIMIT: u64 = 256 << 10;

/// What a round of written blocks showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskRound {
    /// Bytes the guest wrote while the round ran (next round's work).
    pub pending: u64,
    /// Those bytes after the previous round, if there was one.
    pub last_pending: Option<u64>,
    /// How long the round took, s.
    pub secs: f64,
    /// What the link carries, bytes/s.
    pub capacity: f64,
}

/// The write cap after `round`, given the cap in force (`None`: none).
/// The cap tightens one step when the work no longer shrinks by a tenth a
/// round while the guest writes at half the capacity or more: first to
/// half the capacity, then by half each round, never below
/// [`MIN_WRITE_LIMIT`]. Otherwise it stays as it is.
pub fn next_write_limit(current: Option<u64>, round: &DiskRound) -> Option<u64> {
    let write_rate = round.pending as f64 / round.secs.max(1e-3);
    let shrinking = round.last_pending.is_none_or(|last| (round.pending as f64) < 0.9 * last as f64);
    if round.pending == 0 || shrinking || write_rate < round.capacity / 2.0 {
        return current;
    }
    let next = match current {
        None => (round.capacity / 2.0) as u64,
        Some(c) => c / 2,
    };
    Some(next.max(MIN_WRITE_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(pending: u64, last: Option<u64>) -> DiskRound {
        DiskRound { pending, last_pending: last, secs: 1.0, capacity: 10e6 }
    }

    #[test]
    fn throttles_step_by_step_only_while_writes_outpace_the_link() {
        // Shrinking work, or a guest writing slowly: no cap.
        assert_eq!(next_write_limit(None, &round(8_000_000, None)), None);
        assert_eq!(next_write_limit(None, &round(8_000_000, Some(9_000_000))), None);
        assert_eq!(next_write_limit(None, &round(3_000_000, Some(3_000_000))), None, "30% of the link");
        assert_eq!(next_write_limit(Some(1 << 20), &round(0, Some(5))), Some(1 << 20), "a cap in force stays");
        // Not shrinking at 80% of the link: half the capacity, then halving, down to the floor.
        let r = round(8_000_000, Some(8_000_000));
        let mut cap = next_write_limit(None, &r);
        assert_eq!(cap, Some(5_000_000));
        let mut steps = 1;
        while cap != Some(MIN_WRITE_LIMIT) {
            let next = next_write_limit(cap, &r);
            assert!(next < cap, "each step tightens");
            cap = next;
            steps += 1;
        }
        assert!(steps < 10, "reaches the floor in a few rounds");
        assert_eq!(next_write_limit(cap, &r), Some(MIN_WRITE_LIMIT), "never below the floor");
    }
}
