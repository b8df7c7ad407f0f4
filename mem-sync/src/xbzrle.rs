//! XBZRLE-style delta encoding of a re-sent page against the version sent
//! before it (the scheme of QEMU's `docs/devel/migration/xbzrle.rst`).
//!
//! A delta is a sequence of `(unchanged run, changed run, changed bytes)`
//! with both run lengths as ULEB128, starting with an unchanged run. The
//! encoder gives up as soon as the delta would reach `limit` bytes; the
//! decoder checks every run against the page before touching it, so no
//! delta — however hostile — writes outside the page.

use crate::PAGE_SIZE;

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A run length is not a valid ULEB128 or runs past the delta.
    #[error("malformed delta: truncated run length")]
    Truncated,
    /// A run goes past the end of the page.
    #[error("malformed delta: run past the end of the page")]
    Overrun,
}

fn put_uleb(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_uleb(d: &[u8], at: &mut usize) -> Result<usize, DeltaError> {
    let mut v = 0usize;
    // A page offset needs at most two bytes; allow three.
    for shift in [0, 7, 14] {
        let b = *d.get(*at).ok_or(DeltaError::Truncated)?;
        *at += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DeltaError::Truncated)
}

/// Length of the run of equal (or, with `equal = false`, differing) bytes
/// starting at `i`, compared a word at a time.
fn run(old: &[u8], new: &[u8], mut i: usize, equal: bool) -> usize {
    let start = i;
    while i + 8 <= PAGE_SIZE {
        let a = u64::from_ne_bytes(old[i..i + 8].try_into().expect("8 bytes"));
        let b = u64::from_ne_bytes(new[i..i + 8].try_into().expect("8 bytes"));
        if (a == b) != equal {
            break;
        }
        // For a differing run, a word that differs only in part still ends it
        // at the first equal byte: fall through to the byte loop.
        if !equal && (a ^ b).to_ne_bytes().contains(&0) {
            break;
        }
        i += 8;
    }
    while i < PAGE_SIZE && (old[i] == new[i]) == equal {
        i += 1;
    }
    i - start
}

/// Encodes `new` as a delta against `old` into `out` (cleared first).
/// Returns `false`, with `out` unspecified, if the delta would be `limit`
/// bytes or more: the page is then better sent whole.
pub fn encode(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE], limit: usize, out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut i = 0;
    while i < PAGE_SIZE {
        let same = run(old, new, i, true);
        i += same;
        if i == PAGE_SIZE {
            break; // a trailing unchanged run is implicit
        }
        let diff = run(old, new, i, false);
        put_uleb(out, same);
        put_uleb(out, diff);
        if out.len() + diff >= limit {
            return false;
        }
        out.extend_from_slice(&new[i..i + diff]);
        i += diff;
    }
    true
}

/// Applies `delta` to `page` in place. On error the page may be partly
/// updated; the caller discards the migration in that case.
pub fn decode(delta: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), DeltaError> {
    let (mut at, mut pos) = (0usize, 0usize);
    while at < delta.len() {
        let same = get_uleb(delta, &mut at)?;
        let diff = get_uleb(delta, &mut at)?;
        pos = pos.checked_add(same).filter(|&p| p <= PAGE_SIZE).ok_or(DeltaError::Overrun)?;
        let end = pos.checked_add(diff).filter(|&e| e <= PAGE_SIZE).ok_or(DeltaError::Overrun)?;
        let bytes = delta.get(at..at + diff).ok_or(DeltaError::Truncated)?;
        page[pos..end].copy_from_slice(bytes);
        at += diff;
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_with(edits: &[(usize, u8)], base: &[u8; PAGE_SIZE]) -> [u8; PAGE_SIZE] {
        let mut p = *base;
        for &(i, b) in edits {
            p[i % PAGE_SIZE] = b;
        }
        p
    }

    #[test]
    fn small_changes_give_small_deltas() {
        let old = [0u8; PAGE_SIZE];
        let mut new = old;
        new[8..16].copy_from_slice(&42u64.to_le_bytes());
        let mut out = Vec::new();
        assert!(encode(&old, &new, PAGE_SIZE, &mut out));
        assert_eq!(out.len(), 1 + 1 + 1); // run 8, run 1, one byte
        let mut back = old;
        decode(&out, &mut back).expect("valid");
        assert_eq!(back, new);
        // Identical pages: an empty delta.
        assert!(encode(&old, &old, PAGE_SIZE, &mut out) && out.is_empty());
        // A page rewritten entirely does not fit under the limit.
        assert!(!encode(&old, &[1u8; PAGE_SIZE], PAGE_SIZE, &mut out));
    }

    #[test]
    fn hostile_deltas_never_write_outside_the_page() {
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(decode(&[0x80, 0x80, 0x80, 0x01], &mut page), Err(DeltaError::Truncated));
        assert_eq!(decode(&[0xff, 0x7f, 0x01, 9], &mut page), Err(DeltaError::Overrun)); // skip 16383
        assert_eq!(decode(&[0x80, 0x20, 0x01, 9], &mut page), Err(DeltaError::Overrun)); // skip 4096, write 1
        assert_eq!(decode(&[0, 5, 1, 2], &mut page), Err(DeltaError::Truncated)); // 5 bytes announced, 2 present
        assert_eq!(decode(&[0], &mut page), Err(DeltaError::Truncated));
    }

    proptest! {
        #[test]
        fn apply_of_diff_is_identity(
            base in prop::collection::vec(any::<u8>(), PAGE_SIZE),
            edits in prop::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 0..300),
        ) {
            let old: [u8; PAGE_SIZE] = base.try_into().expect("page");
            let new = page_with(&edits, &old);
            let mut out = Vec::new();
            if encode(&old, &new, PAGE_SIZE, &mut out) {
                prop_assert!(out.len() < PAGE_SIZE);
                let mut back = old;
                decode(&out, &mut back).expect("own deltas decode");
                prop_assert_eq!(back.as_slice(), new.as_slice());
            }
        }

        #[test]
        fn decode_never_panics(delta in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut page = [0u8; PAGE_SIZE];
            let _ = decode(&delta, &mut page);
        }
    }
}
