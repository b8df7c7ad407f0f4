//! Bounded little-endian reading and writing.
//!
//! [`Reader`] checks what remains before every read, so a length or count
//! from the peer is never trusted: a short buffer is an error, not a panic,
//! and nothing is allocated before the bytes it would hold are known to be
//! present.

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame ends before a field it announces.
    #[error("frame truncated: {field} needs {need} more bytes, {have} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// A length or count is above its protocol limit.
    #[error("{field} of {value} exceeds the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// An enum tag this version does not know (0 is always invalid).
    #[error("unknown {what} {tag}")]
    UnknownTag {
        /// The enum.
        what: &'static str,
        /// Its tag.
        tag: u64,
    },
    /// A field holds a value that cannot be.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// Bytes after the end of a message.
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
}

/// Reads fields from a borrowed buffer, checking every length first.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated { field, need: n, have: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        Ok(self.bytes(field, N)?.try_into().expect("bytes returned exactly N"))
    }

    /// A byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// A little-endian u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A ULEB128 u64 of at most 10 bytes, refusing overlong and overflowing encodings.
    pub fn uleb(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(field)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(DecodeError::Invalid { field, reason: "varint overflows 64 bits" });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(DecodeError::Invalid { field, reason: "overlong varint" });
                }
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid { field, reason: "varint longer than 10 bytes" })
    }

    /// 16 raw bytes.
    pub fn id16(&mut self, field: &'static str) -> Result<[u8; 16], DecodeError> {
        self.array(field)
    }

    /// A u32 count checked against `limit`.
    pub fn count(&mut self, field: &'static str, limit: u32) -> Result<usize, DecodeError> {
        let n = self.u32(field)?;
        if n > limit {
            return Err(DecodeError::TooLarge { field, value: n.into(), limit: limit.into() });
        }
        Ok(n as usize)
    }

    /// A u32-length-prefixed byte string of at most `limit` bytes.
    pub fn blob(&mut self, field: &'static str, limit: u32) -> Result<&'a [u8], DecodeError> {
        let n = self.count(field, limit)?;
        self.bytes(field, n)
    }

    /// A u32-length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn string(&mut self, field: &'static str, limit: u32) -> Result<String, DecodeError> {
        let b = self.blob(field, limit)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| DecodeError::Invalid { field, reason: "not UTF-8" })
    }

    /// Fails if anything is left.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    /// What has been written.
    pub buf: Vec<u8>,
}

impl Writer {
    /// A byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A ULEB128 u64.
    pub fn uleb(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// A u32-length-prefixed byte string.
    pub fn blob(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).expect("encoders never produce 4 GiB fields"));
        self.bytes(b);
    }
}
