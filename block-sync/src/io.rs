//! Reading images.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
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

/// Like [`read_exact_at`], but the file's holes (`SEEK_DATA`/`SEEK_HOLE`)
/// are not read: their bytes are set to zero here. Reading a hole makes
/// the kernel zero page-cache pages and copy them out, which costs a copy
/// of a mostly sparse image as much CPU as its data.
pub fn read_exact_at_sparse(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let end = offset + buf.len() as u64;
    // Past its end a file is all hole to `SEEK_DATA`: a short image is
    // still an error, as it is to a plain read.
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() < end {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("image ends before offset {end}")));
    }
    let mut at = offset;
    while at < end {
        let (data, hole) = next_data(file, at, end)?;
        buf[(at - offset) as usize..(data - offset) as usize].fill(0);
        if data >= end {
            break;
        }
        let upto = hole.min(end);
        read_exact_at(file, &mut buf[(data - offset) as usize..(upto - offset) as usize], data)?;
        at = upto;
    }
    Ok(())
}

/// The file's next data extent `[data, hole)` at or after `from`, or
/// `(size, size)` when only holes follow. A filesystem without
/// `SEEK_DATA` reports everything as data.
pub fn next_data(file: &File, from: u64, size: u64) -> io::Result<(u64, u64)> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let data = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok((size, size)),
            Some(libc::EINVAL) => Ok((from, size)),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(((data as u64).min(size), (hole as u64).min(size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_read_gives_the_bytes_a_plain_read_gives() {
        let f = tempfile::tempfile().expect("tmp");
        // Data, a hole of 3 MiB, data across a 4 KiB boundary, a hole to the end.
        let size = 8u64 << 20;
        f.set_len(size).expect("size");
        f.write_all_at(&[7u8; 100_000], 0).expect("write");
        f.write_all_at(&[9u8; 5000], (4 << 20) - 1000).expect("write");
        for (at, len) in [(0, size), (50_000, 1 << 20), ((4 << 20) - 2000, 10_000), (6 << 20, 2 << 20), (size, 0)] {
            let mut plain = vec![1u8; len as usize];
            read_exact_at(&f, &mut plain, at).expect("plain");
            let mut sparse = vec![1u8; len as usize];
            read_exact_at_sparse(&f, &mut sparse, at).expect("sparse");
            assert!(plain == sparse, "{at}+{len}");
        }
        let mut past = vec![0u8; 4096];
        assert_eq!(
            read_exact_at_sparse(&f, &mut past, size - 100).map_err(|e| e.kind()),
            Err(io::ErrorKind::UnexpectedEof)
        );
    }
}
