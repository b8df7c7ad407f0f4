//! zstd for page batches: one stream per migration, flushed per batch, with
//! the output of every piece and the decoder's window capped.

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

/// One zstd stream across all the page batches of a migration: each batch
/// is flushed so the peer can decode it at once, yet later batches may
/// refer back to earlier ones and the whole stream has one frame header.
pub struct StreamCompressor {
    enc: zstd::stream::raw::Encoder<'static>,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCompressor").finish_non_exhaustive()
    }
}

/// Bytes of a batch each of zstd's worker threads takes at a time (its
/// smallest job): a 4 MiB batch keeps four of them busy.
const JOB_BYTES: u32 = 1 << 20;

/// zstd worker threads for this host: one per core, at most 4 (the link
/// rarely takes more); none on a single core. The caller's thread only
/// hands batches over and waits for each flush, so one worker alone gains
/// nothing: `cargo bench -p wanmig-mem-sync --bench compress` on 2 cores
/// gave 356 MB/s inline, 375 with one worker, 665 with two.
pub fn default_workers() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    match cores {
        1 => 0,
        n => u32::try_from(n.min(4)).unwrap_or(4),
    }
}

impl StreamCompressor {
    /// A stream at `level`, compressed on the caller's thread.
    pub fn new(level: i32) -> std::io::Result<Self> {
        Self::with_workers(level, 0)
    }

    /// A stream at `level` compressed by `workers` threads of zstd's own
    /// (0: on the caller's thread). The stream is the same one either way:
    /// one frame, each batch flushed; only the work is spread.
    pub fn with_workers(level: i32, workers: u32) -> std::io::Result<Self> {
        use zstd::stream::raw::CParameter;
        let mut enc = zstd::stream::raw::Encoder::new(level)?;
        if workers > 0 {
            enc.set_parameter(CParameter::NbWorkers(workers))?;
            enc.set_parameter(CParameter::JobSize(JOB_BYTES))?;
        }
        Ok(StreamCompressor { enc, chunk: vec![0; 1 << 17] })
    }

    /// Compresses `data` and flushes: the returned bytes, after all the
    /// earlier ones, decode to exactly `data`.
    pub fn compress(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Vec::with_capacity(data.len() / 64 + 64);
        let mut input = InBuffer::around(data);
        while input.pos() < data.len() {
            let mut o = OutBuffer::around(&mut self.chunk[..]);
            self.enc.run(&mut input, &mut o)?;
            out.extend_from_slice(o.as_slice());
        }
        loop {
            let mut o = OutBuffer::around(&mut self.chunk[..]);
            let left = self.enc.flush(&mut o)?;
            out.extend_from_slice(o.as_slice());
            if left == 0 {
                return Ok(out);
            }
        }
    }
}

/// The receiving end of a [`StreamCompressor`], with its window capped so
/// a hostile stream cannot make it allocate more than 8 MiB of history.
pub struct StreamDecompressor {
    dec: zstd::stream::raw::Decoder<'static>,
    /// Reused for every piece: fresh multi-MiB buffers cost page faults.
    out: Vec<u8>,
}

impl std::fmt::Debug for StreamDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecompressor").finish_non_exhaustive()
    }
}

/// Largest zstd window a decompressor accepts (2^23 = 8 MiB).
pub const MAX_WINDOW_LOG: u32 = 23;

impl StreamDecompressor {
    /// A fresh stream.
    pub fn new() -> std::io::Result<Self> {
        let mut dec = zstd::stream::raw::Decoder::new()?;
        dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
        Ok(StreamDecompressor { dec, out: Vec::new() })
    }

    /// Decodes the next flushed piece, which must yield exactly `raw_len`
    /// bytes; never writes past `raw_len`.
    pub fn decompress(&mut self, data: &[u8], raw_len: usize) -> Result<&[u8], CompressError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        self.out.resize(raw_len, 0);
        let mut input = InBuffer::around(data);
        let mut o = OutBuffer::around(&mut self.out[..]);
        loop {
            let before = (input.pos(), o.pos());
            self.dec.run(&mut input, &mut o).map_err(|_| CompressError::Corrupt(raw_len))?;
            let done = input.pos() == data.len();
            if done && o.pos() == raw_len {
                break;
            }
            if (input.pos(), o.pos()) == before {
                // Stuck: input left with no room for its output, or the
                // input ended short of the announced length.
                return Err(CompressError::Corrupt(raw_len));
            }
        }
        // The decoder may hold output the piece announced none of.
        let mut probe = [0u8; 1];
        let mut p = OutBuffer::around(&mut probe[..]);
        self.dec.run(&mut InBuffer::around(&[]), &mut p).map_err(|_| CompressError::Corrupt(raw_len))?;
        if p.pos() != 0 {
            return Err(CompressError::Corrupt(raw_len));
        }
        Ok(&self.out)
    }
}

/// Compresses a one-off blob (the device state) on its own.
pub fn compress_blob(data: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(data, DEFAULT_LEVEL)
}

/// Decompresses a blob of at most `max` bytes; more is an error, and no
/// more than `max` is ever allocated.
pub fn decompress_blob(data: &[u8], max: usize) -> Result<Vec<u8>, CompressError> {
    zstd::bulk::decompress(data, max).map_err(|_| CompressError::Corrupt(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_within_their_cap() {
        let state = vec![3u8; 20_000];
        let c = compress_blob(&state).expect("compress");
        assert_eq!(decompress_blob(&c, 1 << 20).expect("decompress"), state);
        assert!(decompress_blob(&c, 1000).is_err(), "larger than the cap");
        assert!(decompress_blob(b"not zstd", 1000).is_err());
    }

    #[test]
    fn threaded_streams_decode_like_the_others_within_the_window_cap() {
        let mut d = StreamDecompressor::new().expect("decoder");
        let mut c = StreamCompressor::with_workers(DEFAULT_LEVEL, 2).expect("threaded encoder");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for batch in 0..6u32 {
            // 4 MiB of pages, a third of each random: jobs for each worker.
            let data: Vec<u8> = (0..4u32 << 20)
                .map(|i| {
                    if i % 4096 < 1365 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    } else {
                        (i / 4096 + batch) as u8
                    }
                })
                .collect();
            let piece = c.compress(&data).expect("compress");
            assert!(piece.len() < data.len(), "batch {batch} did not compress");
            assert_eq!(d.decompress(&piece, data.len()).expect("decode"), &data[..], "batch {batch}");
        }
    }

    #[test]
    fn streams_carry_history_across_batches_and_refuse_lies() {
        let mut c = StreamCompressor::new(DEFAULT_LEVEL).expect("encoder");
        let mut d = StreamDecompressor::new().expect("decoder");
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let first = c.compress(&page).expect("compress");
        let second = c.compress(&page).expect("compress");
        assert!(second.len() < first.len() / 4, "{} vs {}", second.len(), first.len());
        assert_eq!(d.decompress(&first, 4096).expect("first"), &page[..]);
        assert_eq!(d.decompress(&second, 4096).expect("second"), &page[..]);
        // Announcing more or less than a piece holds is refused.
        let third = c.compress(&page).expect("compress");
        assert!(StreamDecompressor::new().expect("decoder").decompress(&third, 4096).is_err(), "needs history");
        let mut d2 = StreamDecompressor::new().expect("decoder");
        assert!(d2.decompress(&first, 100).is_err());
        let mut d3 = StreamDecompressor::new().expect("decoder");
        assert!(d3.decompress(&first, 5000).is_err());
        assert!(StreamDecompressor::new().expect("decoder").decompress(b"garbage!", 10).is_err());
    }
}
