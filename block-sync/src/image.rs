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

/// Bytes written after which write-back of the image is started (without
/// waiting for it), so that dirty data never piles up in the page cache for
/// the final flush, which the guest's downtime waits for.
pub const WRITEBACK_BYTES: u64 = 8 << 20;

/// An image being assembled.
#[derive(Debug)]
pub struct ImageWriter {
    path: PathBuf,
    file: File,
    size: u64,
    digest: BlockDigest,
    /// Bytes written since write-back was last started.
    unflushed: u64,
    /// Written since the last flush to stable storage; `None`: never
    /// flushed (its size is not durable yet either).
    unsynced: Option<bool>,
}

impl ImageWriter {
    /// Creates `path` (which must not exist) as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        // Just created: all holes, so every block is known to be zero.
        Ok(ImageWriter {
            path: path.to_owned(),
            file,
            size,
            digest: BlockDigest::zeroed(size),
            unflushed: 0,
            unsynced: None,
        })
    }

    /// Opens `path`, an image of `size` bytes made and flushed by someone
    /// else (a base to write on): nothing about its content is known, so
    /// every block is hashed at the next refresh (holes without reading).
    pub fn open_existing(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if len != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} holds {len} bytes, not {size}", path.display()),
            ));
        }
        Ok(ImageWriter {
            path: path.to_owned(),
            file,
            size,
            digest: BlockDigest::new(size),
            unflushed: 0,
            unsynced: Some(false),
        })
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
        if self.unsynced == Some(false) {
            self.unsynced = Some(true);
        }
        self.unflushed += data.len() as u64;
        if self.unflushed >= WRITEBACK_BYTES {
            self.unflushed = 0;
            start_writeback(&self.file)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` zeros (a hole where the file system
    /// can punch one): a zero chunk on an image that started from a base.
    pub fn write_zeros(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{len} zeros at {offset} past the end")));
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a valid descriptor; fallocate only changes the file.
        let punched = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) } == 0;
        if !punched {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
        }
        self.digest.mark(offset, len);
        if self.unsynced == Some(false) {
            self.unsynced = Some(true);
        }
        Ok(())
    }

    /// Between rounds: re-hashes the blocks written since the last call and
    /// flushes them to stable storage, so that little is left for the final
    /// check and flush (both inside the guest's downtime).
    pub fn refresh_digest(&mut self) -> io::Result<usize> {
        let n = self.digest.refresh(&self.file)?;
        self.sync()?;
        Ok(n)
    }

    /// Flushes the image to stable storage and returns its digest.
    pub fn finish(&mut self) -> io::Result<[u8; 32]> {
        self.digest.refresh(&self.file)?;
        self.sync()?;
        Ok(self.digest.digest())
    }

    /// Flushes what was written since the last flush (the first flush
    /// also makes the file's size durable).
    fn sync(&mut self) -> io::Result<()> {
        match self.unsynced {
            None => self.file.sync_all()?,
            Some(true) => self.file.sync_data()?,
            Some(false) => return Ok(()),
        }
        (self.unsynced, self.unflushed) = (Some(false), 0);
        Ok(())
    }
}

/// Starts writing the file's dirty pages back, without waiting for them.
fn start_writeback(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; offset 0 with length 0 means the whole
    // file; the call only schedules I/O and touches no memory of ours.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
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

    #[test]
    fn an_image_opened_on_a_base_hashes_all_of_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("base.img");
        let mut want = vec![0u8; 1 << 20];
        want[70_000..80_000].fill(3);
        std::fs::write(&path, &want).expect("base");
        assert!(ImageWriter::open_existing(&path, 2 << 20).is_err(), "the size is checked");
        let mut img = ImageWriter::open_existing(&path, 1 << 20).expect("open");
        img.write(0, &[5; 4096]).expect("write");
        want[..4096].fill(5);
        img.write_zeros(69_632, 8192).expect("zeros");
        want[69_632..77_824].fill(0);
        assert!(img.write_zeros((1 << 20) - 4096, 8192).is_err(), "inside the image only");
        assert_eq!(img.finish().expect("finish"), BlockDigest::of_bytes(&want));
    }
}
