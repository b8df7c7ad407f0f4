//! Mutations of valid inputs for the bounded fuzz tests every decoder of
//! peer input has (property tests with a fixed case count, run by
//! `cargo nextest run` on stable; the cargo-fuzz targets are for long runs).
//!
//! Random bytes rarely get past a decoder's first check; a valid frame,
//! file or record with a few bytes changed, inserted, dropped, or a length
//! field set to an edge value, reaches every branch behind it.

/// Values a length or count field is set to: the edges decoders must refuse.
const EDGES: [u64; 8] = [0, 1, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// One edit: `(kind, position, value)`, as a proptest strategy generates
/// them (`(any::<u8>(), any::<u32>(), any::<u8>())`).
pub type Edit = (u8, u32, u8);

/// `seed` with `edits` applied in order: by `kind % 8`, flip a bit, set a
/// byte, insert a byte, remove a byte, truncate, repeat a slice, set 4 or 8
/// bytes (little-endian) to an edge value. Positions wrap around the
/// current length.
pub fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(kind, pos, v) in edits {
        let at = |len: usize| if len == 0 { 0 } else { pos as usize % len };
        match kind % 8 {
            0 if !b.is_empty() => {
                let i = at(b.len());
                b[i] ^= 1 << (v % 8);
            }
            1 if !b.is_empty() => {
                let i = at(b.len());
                b[i] = v;
            }
            2 => {
                let i = at(b.len() + 1);
                b.insert(i, v);
            }
            3 if !b.is_empty() => {
                let i = at(b.len());
                b.remove(i);
            }
            4 => b.truncate(at(b.len() + 1)),
            5 if !b.is_empty() => {
                let i = at(b.len());
                let end = (i + 1 + v as usize).min(b.len());
                let piece = b[i..end].to_vec();
                b.splice(i..i, piece);
            }
            6 | 7 => {
                let width = if kind % 8 == 6 { 4 } else { 8 };
                if b.len() >= width {
                    let i = at(b.len() - width + 1);
                    let edge = EDGES[v as usize % EDGES.len()].to_le_bytes();
                    b[i..i + width].copy_from_slice(&edge[..width]);
                }
            }
            _ => {}
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_edit_does_what_it_says() {
        let s = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(mutate(&s, &[(0, 0, 1)])[0], 3);
        assert_eq!(mutate(&s, &[(1, 9, 0xee)])[1], 0xee);
        assert_eq!(mutate(&s, &[(2, 0, 9)]), [9, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(mutate(&s, &[(3, 7, 0)]), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(mutate(&s, &[(4, 3, 0)]), [1, 2, 3]);
        assert_eq!(mutate(&s, &[(5, 6, 1)]), [1, 2, 3, 4, 5, 6, 7, 8, 7, 8]);
        assert_eq!(mutate(&s, &[(6, 0, 6)]), [0xff, 0xff, 0xff, 0xff, 5, 6, 7, 8]);
        assert_eq!(mutate(&[], &[(0, 5, 1), (3, 1, 1), (7, 0, 0)]), Vec::<u8>::new());
    }
}
