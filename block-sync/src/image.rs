//! The destination's copy of a disk image.
//!
//! Created sparse at the source's size (so zero chunks cost nothing), filled
//! from chunks and written extents at checked offsets, and verified against
//! the source's digest before the destination says it is ready.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::digest::BlockDigest;

/// An image being assembled.
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    file: File,
    size: u64,
    digest: BlockDigest,
}

impl ImageWriter {
    /// Creates `path` (which must not exist) as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        // Just created: all holes, so every block is known to be zero.
        Ok(ImageWriter { path: path.to_owned(), file, size, digest: BlockDigest::zeroed(size) })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset`, which must lie inside the image.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= self.size);
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes at {offset} go past the end of the {}-byte image", data.len(), self.size),
            ));
        }
        self.file.write_all_at(data, offset)?;
        self.digest.mark(offset, data.len() as u64);
        Ok(())
    }

    /// Re-hashes the blocks written since the last call (done between
    /// rounds, so that little is left for the final check).
    pub fn refresh_digest(&mut self) -> io::Result<usize> {
        self.digest.refresh(&self.file)
    }

    /// Flushes the image to stable storage and returns its digest.
    pub fn finish(&mut self) -> io::Result<[u8; 32]> {
        self.digest.refresh(&self.file)?;
        self.file.sync_all()?;
        Ok(self.digest.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembled_image_digest_matches_and_writes_stay_inside() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("disk.img");
        let mut img = ImageWriter::create(&path, 1 << 20).expect("create");
        assert!(ImageWriter::create(&path, 1 << 20).is_err(), "never overwrites");
        let mut want = vec![0u8; 1 << 20];
        img.write(4096, &[7; 8192]).expect("write");
        want[4096..12288].fill(7);
        img.refresh_digest().expect("refresh");
        img.write((1 << 20) - 100, &[9; 100]).expect("tail");
        want[(1 << 20) - 100..].fill(9);
        assert!(img.write((1 << 20) - 99, &[1; 100]).is_err());
        assert!(img.write(u64::MAX - 2, &[1; 100]).is_err());
        assert_eq!(img.finish().expect("finish"), BlockDigest::of_bytes(&want));
        assert_eq!(std::fs::read(&path).expect("read"), want);
    }
}
