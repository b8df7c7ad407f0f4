//! Reading images.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `pread` until `buf` is full; a short file is an error.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), format!("image ends before offset {}", offset + buf.len() as u64))
        } else {
            e
        }
    })
}
