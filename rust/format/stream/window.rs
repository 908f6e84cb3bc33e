//! Windows of a stream: file bytes `base..base + len` that the parser reads,
//! and whether more bytes may follow them (a stream still arriving).

use super::{FormatError, FormatErrorKind, Reader, Step, Stop};
use crate::format::reader;

/// A window of the stream: file bytes `base..base + data.len()`.
#[derive(Clone, Copy)]
pub(super) struct Win<'a> {
    pub(super) data: &'a [u8],
    pub(super) base: u64,
    /// No bytes will follow the window.
    pub(super) last: bool,
}

impl<'a> Win<'a> {
    pub(super) fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    pub(super) fn reader(&self, at: u64) -> Step<Reader<'a>> {
        let mut r = Reader::with_base(self.data, self.base);
        if at > self.end() {
            return Err(if self.last {
                Stop::Err(FormatError::truncated(
                    self.end(),
                    format!("the stream jumps to offset {at}, past the end of the file"),
                ))
            } else {
                Stop::NeedMore
            });
        }
        r.seek(at).map_err(Stop::Err)?;
        Ok(r)
    }

    /// Turns a read error into "need more" when the window is not the last.
    pub(super) fn fail(&self, e: FormatError) -> Stop {
        if e.kind == FormatErrorKind::Truncated && !self.last {
            Stop::NeedMore
        } else {
            Stop::Err(e)
        }
    }

    /// `Some(byte)`, `None` past the last byte, or NeedMore.
    pub(super) fn byte(&self, at: u64) -> Step<Option<u8>> {
        self.bytes(at, 1).map(|b| b.map(|b| b[0]))
    }

    pub(super) fn be32(&self, at: u64) -> Step<Option<u32>> {
        self.bytes(at, 4).map(|b| b.map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    }

    /// `n` bytes at `at`; `None` when the stream (last window) has fewer.
    pub(super) fn bytes(&self, at: u64, n: u64) -> Step<Option<&'a [u8]>> {
        if at < self.base {
            return Ok(None);
        }
        match reader::slice(self.data, at - self.base, at - self.base + n) {
            Some(b) => Ok(Some(b)),
            None if self.last => Ok(None),
            None => Err(Stop::NeedMore),
        }
    }
}
