//! Byte sources: where the parser and the directory reader get their bytes.
//!
//! Everything in [`crate::format`] reads a file through [`ReadAt`]: a memory
//! map (which also lends the parser the whole file as one slice, the fast
//! path), positioned reads on a file descriptor, or any object that can read
//! at an offset (a Python file object, a remote object). The grammar itself
//! never performs I/O of its own; a source does, and its errors come back as
//! [`SourceError::Io`] with the offset and length that could not be read.
//!
//! [`Bytes`] is the reading side of a source for code that asks for many
//! small pieces (the directory, one header per entry): on a source that is
//! not a slice, it reads ranges that lie close together in one request
//! ([`Bytes::prefetch`]) and serves later reads from those blocks, so a
//! source where every read is a network request is asked a few times, not
//! once per entry.

use std::borrow::Cow;
use std::io;
use std::sync::Mutex;

use super::error::FormatError;

/// Something that can read bytes at any offset.
pub trait ReadAt: Send + Sync {
    /// Bytes in the source.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes from offset `at`; a source that has fewer
    /// bytes than asked for returns an error (`UnexpectedEof`).
    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Every byte at once, when the source is a memory map.
    fn as_slice(&self) -> Option<&[u8]> {
        None
    }

    /// How many bytes between two wanted ranges are worth reading to save a
    /// request: small for a local file, large for a network source.
    fn request_gap(&self) -> u64 {
        64 << 10
    }

    /// Says that the ranges `(start, end)` will be read soon: a source that
    /// keeps what it read ([`Cached`]) reads them now in few requests.
    fn prefetch(&self, ranges: &mut [(u64, u64)]) {
        let _ = ranges;
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = usize::try_from(at).ok().and_then(|s| Some((s, s.checked_add(buf.len())?)));
        match s.and_then(|(s, e)| self.get(s..e)) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the data")),
        }
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(at, buf)
    }
    fn as_slice(&self) -> Option<&[u8]> {
        (**self).as_slice()
    }
    fn request_gap(&self) -> u64 {
        (**self).request_gap()
    }
    fn prefetch(&self, ranges: &mut [(u64, u64)]) {
        (**self).prefetch(ranges)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(at, buf)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

/// The first `len` bytes of another source (a stream without what follows it).
pub struct Limit<'a> {
    pub src: &'a dyn ReadAt,
    pub len: u64,
}

impl ReadAt for Limit<'_> {
    fn size(&self) -> u64 {
        self.len.min(self.src.size())
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        if at.saturating_add(buf.len() as u64) > self.size() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the data"));
        }
        self.src.read_at(at, buf)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        self.src.as_slice().map(|s| &s[..self.size() as usize])
    }

    fn request_gap(&self) -> u64 {
        self.src.request_gap()
    }
}

/// A parse over a source failed: the bytes break the grammar, or the source
/// could not deliver them.
#[derive(Debug)]
pub enum SourceError {
    Format(FormatError),
    Io { offset: u64, len: u64, error: io::Error },
}

impl From<FormatError> for SourceError {
    fn from(e: FormatError) -> Self {
        SourceError::Format(e)
    }
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceError::Format(e) => e.fmt(f),
            SourceError::Io { offset, len, error } => {
                write!(f, "cannot read {len} bytes at offset {offset}: {error}")
            }
        }
    }
}

/// Reads `len` bytes at `at` into a new vector.
pub fn read_vec(src: &dyn ReadAt, at: u64, len: u64) -> Result<Vec<u8>, SourceError> {
    let n = usize::try_from(len).map_err(|_| SourceError::Io {
        offset: at,
        len,
        error: io::Error::new(io::ErrorKind::InvalidInput, "too many bytes to read at once"),
    })?;
    let mut v = vec![0u8; n];
    src.read_at(at, &mut v).map_err(|error| SourceError::Io { offset: at, len, error })?;
    Ok(v)
}

/// The largest block [`Cached::prefetch`] reads in one request.
const MAX_BLOCK: u64 = 16 << 20;
/// Reads up to this size that were not prefetched are kept too.
const KEEP_SMALL: usize = 64 << 10;
/// Small reads are kept while the cache holds less than this.
const KEEP_TOTAL: usize = 64 << 20;

/// A source that keeps the blocks it read, for sources where every read is
/// a request (a Python file object, a remote object, positioned reads on a
/// network file system): the tail, the directory and the headers are read
/// once, in few requests ([`ReadAt::prefetch`] coalesces ranges that lie
/// within [`ReadAt::request_gap`] of each other), however many times the
/// checks look at them. Only prefetched ranges and small reads are kept, so
/// a scan that streams the file does not fill memory.
pub struct Cached<S: ?Sized> {
    blocks: Mutex<Vec<(u64, std::sync::Arc<[u8]>)>>,
    kept: std::sync::atomic::AtomicUsize,
    src: S,
}

impl<S: ReadAt> Cached<S> {
    pub fn new(src: S) -> Self {
        Cached { blocks: Mutex::new(Vec::new()), kept: std::sync::atomic::AtomicUsize::new(0), src }
    }
}

impl<S: ReadAt + ?Sized> Cached<S> {
    fn lookup(&self, at: u64, len: u64) -> Option<std::sync::Arc<[u8]>> {
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let end = at.checked_add(len)?;
        blocks.iter().find(|(b, d)| at >= *b && end <= b + d.len() as u64).map(|(b, d)| {
            let s = (at - b) as usize;
            std::sync::Arc::from(&d[s..s + len as usize])
        })
    }

    fn keep(&self, at: u64, data: Vec<u8>) {
        self.kept.fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
        self.blocks.lock().unwrap_or_else(|e| e.into_inner()).push((at, data.into()));
    }
}

impl<S: ReadAt + ?Sized> ReadAt for Cached<S> {
    fn size(&self) -> u64 {
        self.src.size()
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(b) = self.lookup(at, buf.len() as u64) {
            buf.copy_from_slice(&b);
            return Ok(());
        }
        // No lock is held while the source reads.
        self.src.read_at(at, buf)?;
        if buf.len() <= KEEP_SMALL && self.kept.load(std::sync::atomic::Ordering::Relaxed) < KEEP_TOTAL {
            self.keep(at, buf.to_vec());
        }
        Ok(())
    }

    fn as_slice(&self) -> Option<&[u8]> {
        self.src.as_slice()
    }

    fn request_gap(&self) -> u64 {
        self.src.request_gap()
    }

    fn prefetch(&self, ranges: &mut [(u64, u64)]) {
        let len = self.size();
        ranges.sort_unstable();
        let gap = self.request_gap();
        let mut groups: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in ranges.iter() {
            let (s, e) = (s.min(len), e.min(len));
            if s >= e || self.lookup(s, e - s).is_some() {
                continue;
            }
            match groups.last_mut() {
                Some(g) if s <= g.1.saturating_add(gap) && e.max(g.1) - g.0 <= MAX_BLOCK => g.1 = g.1.max(e),
                _ => groups.push((s, e)),
            }
        }
        for (s, e) in groups {
            // A failed read is left to the read that needs the bytes to report.
            let mut v = vec![0u8; (e - s) as usize];
            if self.src.read_at(s, &mut v).is_ok() {
                self.keep(s, v);
            }
        }
    }
}

/// Small reads from a source, for code that asks for many small pieces.
///
/// A read that fails is remembered (see [`Bytes::take_error`]) and answered
/// with `None`, as a read past the end is: the checks that run over a
/// `Bytes` then fail, and the caller reports the I/O error instead of the
/// check's failure.
pub struct Bytes<'a> {
    src: &'a dyn ReadAt,
    error: Mutex<Option<SourceError>>,
}

impl<'a> Bytes<'a> {
    pub fn new(src: &'a dyn ReadAt) -> Self {
        Bytes { src, error: Mutex::new(None) }
    }

    pub fn len(&self) -> u64 {
        self.src.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn source(&self) -> &'a dyn ReadAt {
        self.src
    }

    /// The first read that failed, if any.
    pub fn take_error(&self) -> Option<SourceError> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Bytes `at..at + n`: `None` when they are not all in the source (or
    /// could not be read).
    pub fn get(&self, at: u64, n: u64) -> Option<Cow<'a, [u8]>> {
        let end = at.checked_add(n)?;
        if end > self.len() {
            return None;
        }
        if let Some(all) = self.src.as_slice() {
            return Some(Cow::Borrowed(all.get(usize::try_from(at).ok()?..usize::try_from(end).ok()?)?));
        }
        match read_vec(self.src, at, n) {
            Ok(v) => Some(Cow::Owned(v)),
            Err(e) => {
                let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
                None
            }
        }
    }

    pub fn byte(&self, at: u64) -> Option<u8> {
        self.get(at, 1).map(|b| b[0])
    }

    pub fn be32(&self, at: u64) -> Option<u32> {
        self.get(at, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn be64(&self, at: u64) -> Option<u64> {
        self.get(at, 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            u64::from_be_bytes(a)
        })
    }

    /// See [`ReadAt::prefetch`]; a no-op on a slice.
    pub fn prefetch(&self, ranges: &mut [(u64, u64)]) {
        if self.src.as_slice().is_none() && !ranges.is_empty() {
            self.src.prefetch(ranges);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A source that is not a slice, and counts its reads.
    pub struct Counted {
        pub data: Vec<u8>,
        pub reads: AtomicUsize,
    }

    impl ReadAt for Counted {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.data.read_at(at, buf)
        }
    }

    #[test]
    fn prefetch_coalesces_and_serves_later_reads() {
        let c = Cached::new(Counted { data: (0..=255u8).cycle().take(1 << 20).collect(), reads: AtomicUsize::new(0) });
        let b = Bytes::new(&c);
        let mut ranges: Vec<(u64, u64)> = (0..1000).map(|i| (i * 500, i * 500 + 10)).collect();
        b.prefetch(&mut ranges);
        assert_eq!(c.src.reads.load(Ordering::SeqCst), 1);
        for i in 0..1000u64 {
            assert_eq!(b.byte(i * 500), Some((i * 500 % 256) as u8));
        }
        assert_eq!(c.src.reads.load(Ordering::SeqCst), 1);
        assert_eq!(b.get((1 << 20) - 1, 2), None);
        assert!(b.take_error().is_none());
    }

    #[test]
    fn slices_read_in_place() {
        let d = vec![1u8, 2, 3, 4, 5];
        let b = Bytes::new(&d);
        assert!(matches!(b.get(1, 3), Some(Cow::Borrowed(&[2, 3, 4]))));
        assert_eq!(b.be32(1), Some(0x02030405));
        assert_eq!(b.get(3, u64::MAX), None);
    }
}
