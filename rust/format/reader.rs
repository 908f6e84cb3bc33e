//! A bounds-checked big-endian cursor over a byte slice.
//!
//! Every read checks the remaining length first and reports a
//! [`FormatErrorKind::Truncated`](super::error::FormatErrorKind) error naming
//! the absolute offset and what was being read; no read can panic.

use super::error::{FormatError, Result};

/// A cursor over `data`, where `data[0]` sits at absolute file offset `base`.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    base: u64,
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A cursor over a whole file: offsets are indices into `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, base: 0, pos: 0 }
    }

    /// A cursor over a window of a file that starts at absolute offset `base`.
    pub fn with_base(data: &'a [u8], base: u64) -> Self {
        Reader { data, base, pos: 0 }
    }

    /// A cursor over the whole file `data`, positioned at absolute offset `at`.
    pub fn at(data: &'a [u8], at: u64) -> Result<Self> {
        let mut r = Reader::new(data);
        r.seek(at)?;
        Ok(r)
    }

    /// Absolute file offset of the next byte.
    #[inline]
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Absolute offset one past the last byte this cursor can read.
    #[inline]
    pub fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    #[inline]
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Moves to absolute offset `at` (which may equal the end).
    pub fn seek(&mut self, at: u64) -> Result<()> {
        if at < self.base || at - self.base > self.data.len() as u64 {
            return Err(FormatError::truncated(
                self.offset(),
                format!("a jump to offset {at} leaves the file, which ends at offset {}", self.end()),
            ));
        }
        self.pos = (at - self.base) as usize;
        Ok(())
    }

    fn short(&self, n: usize, what: &str) -> FormatError {
        FormatError::truncated(
            self.offset(),
            format!(
                "expected {what} ({n} byte{}), found {} byte{} before the end of the file",
                if n == 1 { "" } else { "s" },
                self.remaining(),
                if self.remaining() == 1 { "" } else { "s" }
            ),
        )
    }

    /// The next `n` bytes, consumed.
    #[inline]
    pub fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.short(n, what));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Skips `n` bytes (a length read from the file, so it is checked).
    #[inline]
    pub fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() as u64 {
            return Err(self.short(n.min(usize::MAX as u64) as usize, what));
        }
        self.pos += n as usize;
        Ok(())
    }

    /// The next byte, not consumed.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    /// The next `n` bytes, not consumed (`None` when fewer remain).
    #[inline]
    pub fn peek_bytes(&self, n: usize) -> Option<&'a [u8]> {
        self.data.get(self.pos..self.pos.checked_add(n)?)
    }

    #[inline]
    pub fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.bytes(1, what)?[0])
    }

    #[inline]
    pub fn be16(&mut self, what: &str) -> Result<u16> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    #[inline]
    pub fn be32(&mut self, what: &str) -> Result<u32> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    pub fn be64(&mut self, what: &str) -> Result<u64> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// QEMU's counted string: a u8 length, then that many bytes (no NUL).
    #[inline]
    pub fn cstr8(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.u8(what)? as usize;
        self.bytes(n, what)
    }
}

/// Reads a big-endian u32 at `at` in `data`, if the bytes are there.
#[inline]
pub fn be32_at(data: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a big-endian u64 at `at` in `data`, if the bytes are there.
#[inline]
pub fn be64_at(data: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let b = data.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

/// The byte at `at` in `data`, if there is one.
#[inline]
pub fn byte_at(data: &[u8], at: u64) -> Option<u8> {
    data.get(usize::try_from(at).ok()?).copied()
}

/// `data[start..end]` with checked bounds.
#[inline]
pub fn slice(data: &[u8], start: u64, end: u64) -> Option<&[u8]> {
    let s = usize::try_from(start).ok()?;
    let e = usize::try_from(end).ok()?;
    if s > e {
        return None;
    }
    data.get(s..e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::error::FormatErrorKind;

    #[test]
    fn reads_big_endian_and_counts_offsets() {
        let d = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
        let mut r = Reader::with_base(&d, 100);
        assert_eq!(r.u8("a").unwrap(), 0);
        assert_eq!(r.be16("b").unwrap(), 0x0102);
        assert_eq!(r.be32("c").unwrap(), 0x03040506);
        assert_eq!(r.offset(), 107);
        assert_eq!(r.be64("d").unwrap(), 0x0708090a0b0c0d0e);
        assert!(r.is_empty());
    }

    #[test]
    fn short_reads_are_errors_with_offsets() {
        let d = [3u8, b'a', b'b'];
        let mut r = Reader::new(&d);
        let e = r.cstr8("name").unwrap_err();
        assert_eq!(e.kind, FormatErrorKind::Truncated);
        assert_eq!(e.offset, 1);
        assert!(e.message.contains("name"), "{}", e.message);
        let mut r = Reader::new(&d);
        assert!(r.skip(u64::MAX, "x").is_err());
        assert!(r.seek(4).is_err());
        assert!(r.seek(3).is_ok());
    }

    #[test]
    fn helpers_refuse_out_of_range() {
        let d = [1u8, 2, 3, 4];
        assert_eq!(be32_at(&d, 0), Some(0x01020304));
        assert_eq!(be32_at(&d, 1), None);
        assert_eq!(be64_at(&d, u64::MAX), None);
        assert_eq!(slice(&d, 3, 2), None);
        assert_eq!(slice(&d, 1, 4), Some(&d[1..4]));
    }
}
