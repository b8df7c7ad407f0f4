//! zstd for page batches, with the output size capped on decompression.

/// zstd level for page batches. Level 1 compresses at ~400-500 MB/s per
/// core on text-like data (FIELD-NOTES A1) and far faster on guest pages,
/// which are mostly zeros and repeats: above what a WAN link carries, so
/// compression is not the bottleneck there.
pub const DEFAULT_LEVEL: i32 = 1;

/// Why a compressed batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The data is not zstd, or decompresses to more than announced.
    #[error("compressed batch does not decompress to its announced {0} bytes")]
    Corrupt(usize),
}

/// Compresses `data`; `None` if that would not make it smaller.
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    let out = zstd::bulk::compress(data, level).ok()?;
    (out.len() < data.len()).then_some(out)
}

/// Decompresses `data`, which must yield exactly `raw_len` bytes; never
/// allocates more than `raw_len` (already checked against the frame limit).
pub fn decompress(data: &[u8], raw_len: usize) -> Result<Vec<u8>, CompressError> {
    let out = zstd::bulk::decompress(data, raw_len).map_err(|_| CompressError::Corrupt(raw_len))?;
    if out.len() != raw_len {
        return Err(CompressError::Corrupt(raw_len));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_caps() {
        let data = vec![7u8; 100_000];
        let c = compress(&data, DEFAULT_LEVEL).expect("compressible");
        assert!(c.len() < 1000);
        assert_eq!(decompress(&c, data.len()).expect("ok"), data);
        // Announcing less than it holds is refused, not over-allocated.
        assert!(decompress(&c, 1000).is_err());
        assert!(decompress(&c, 200_000).is_err());
        assert!(decompress(b"not zstd at all", 100).is_err());
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        assert!(compress(&noise, DEFAULT_LEVEL).is_none_or(|c| c.len() < noise.len()));
    }
}
