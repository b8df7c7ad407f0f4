//! Dirty bitmaps in the layout `KVM_GET_DIRTY_LOG` uses: one bit per page,
//! bit `i % 64` of word `i / 64` is page `i`.

pub use wanmig_types::PageRange;

/// ORs `src` into `dst` word by word. Words past the shorter slice are left
/// alone (a bitmap for a smaller region simply has no bits there).
pub fn merge_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

/// Converts the first `pages` bits of `bitmap` into maximal runs of set bits,
/// in ascending order. Bits at or past `pages` are ignored, and so is a
/// bitmap shorter than `pages` bits (the missing words count as clean).
///
/// Works a word at a time: all-zero words are skipped in one comparison and
/// runs are found with `trailing_zeros`/`trailing_ones`, so a mostly clean
/// bitmap costs one load per 64 pages.
pub fn to_ranges(bitmap: &[u64], pages: u64) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX).min(bitmap.len());
    for (w, &raw) in bitmap[..words].iter().enumerate() {
        let base = w as u64 * 64;
        let mut word = raw;
        if base + 64 > pages {
            // Mask the bits past the end of the region.
            word &= (1u64 << (pages - base)) - 1;
        }
        let mut bit = 0u32;
        while word != 0 {
            let skip = word.trailing_zeros();
            bit += skip;
            word >>= skip;
            let run = word.trailing_ones();
            let first = base + u64::from(bit);
            match out.last_mut() {
                Some(last) if last.end() == first => last.count += u64::from(run),
                _ => out.push(PageRange { first, count: u64::from(run) }),
            }
            bit += run;
            // `run` may be 64 (a full word): shifting by 64 is not defined.
            word = word.checked_shr(run).unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious, slow answer: test each bit on its own.
    fn naive_ranges(bitmap: &[u64], pages: u64) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        for p in 0..pages {
            let w = (p / 64) as usize;
            let set = w < bitmap.len() && bitmap[w] & (1 << (p % 64)) != 0;
            if !set {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end() == p => last.count += 1,
                _ => out.push(PageRange { first: p, count: 1 }),
            }
        }
        out
    }

    #[test]
    fn full_and_empty_words() {
        let bm = [u64::MAX, 0, u64::MAX, 1];
        assert_eq!(to_ranges(&bm, 256), vec![PageRange { first: 0, count: 64 }, PageRange { first: 128, count: 65 }]);
        assert_eq!(to_ranges(&bm, 0), vec![]);
        assert_eq!(to_ranges(&bm, 10), vec![PageRange { first: 0, count: 10 }]);
    }

    fn bitmap_strategy() -> impl Strategy<Value = Vec<u64>> {
        // Mix dense, sparse and full words so runs cross word boundaries.
        prop::collection::vec(
            prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), (0u32..64).prop_map(|b| 1u64 << b)],
            0..12,
        )
    }

    proptest! {
        #[test]
        fn ranges_match_naive(bm in bitmap_strategy(), pages in 0u64..800) {
            prop_assert_eq!(to_ranges(&bm, pages), naive_ranges(&bm, pages));
        }

        #[test]
        fn merge_then_ranges_is_union(a in bitmap_strategy(), b in bitmap_strategy(), pages in 0u64..800) {
            let mut merged = a.clone();
            merged.resize(a.len().max(b.len()), 0);
            merge_into(&mut merged, &b);
            let want: Vec<u64> = (0..pages)
                .filter(|&p| {
                    let w = (p / 64) as usize;
                    let bit = 1u64 << (p % 64);
                    a.get(w).is_some_and(|x| x & bit != 0) || b.get(w).is_some_and(|x| x & bit != 0)
                })
                .collect();
            let got: Vec<u64> = to_ranges(&merged, pages).iter().flat_map(|r| r.first..r.end()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
