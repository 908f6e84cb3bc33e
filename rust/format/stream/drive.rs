//! Parsing a stream over any byte source. A memory map lends the parser the
//! whole file as one slice ([`parse`]); any other source is read in windows,
//! front to back, keeping only the bytes the parser may still need (the item
//! it is in, and what it may go back to), as `savedir record` does with a
//! pipe. Both give the same items. Mapped-ram page regions, which the stream
//! jumps over, are not read unless every byte is wanted (`on_bytes`).

use super::*;
use crate::format::source::{read_vec, ReadAt, SourceError};

/// Bytes read from a source at a time (more when one item needs more).
pub const WINDOW: usize = 8 << 20;
/// How much of a source's tail is read to find the vmdesc before parsing.
const TAIL_WINDOW: u64 = 4 << 20;

/// Called with each range of bytes read, in order: `(offset, bytes)`.
pub type OnBytes<'a> = &'a mut dyn FnMut(u64, &[u8]);

/// Parses the stream that starts at `opts.start` in `src`. `on_bytes`, when
/// given, is called with every byte from the stream's start to its end, in
/// order, as the windows are read (to checksum a source in one pass); it is
/// not called when the source is a slice, which the caller reads itself.
pub fn parse_source(
    src: &dyn ReadAt,
    opts: ParseOptions<'_>,
    mut on_bytes: Option<OnBytes<'_>>,
) -> std::result::Result<Stream, SourceError> {
    if let Some(data) = src.as_slice() {
        return Ok(parse(data, opts)?);
    }
    let size = src.size();
    let start = opts.start;
    let head = read_vec(src, start.min(size), HEADER_LEN.min(size.saturating_sub(start)))?;
    check_header(&head, 0).map_err(|e| shift(e, start))?;
    let end_hint = opts.end_hint.min(size);
    let tail_at = end_hint.saturating_sub(TAIL_WINDOW).max(start);
    let hint = match opts.vmdesc {
        Some(v) => Some(v.clone()),
        None => {
            let tail = read_vec(src, tail_at, end_hint - tail_at)?;
            vmdesc::find_in_tail(&tail, tail_at, end_hint).and_then(|(_, loc)| {
                let json = tail.get((loc.offset + vmdesc::VMDESC_HEADER - tail_at) as usize..)?;
                vmdesc::parse_json(json, loc.offset + vmdesc::VMDESC_HEADER).ok()
            })
        }
    };
    let had_hint = hint.is_some();
    let page_map = opts.page_map;
    let mut p = StreamParser::new(start, hint);
    p.set_page_map(page_map);
    p.seekable = true;
    p.end_hint = end_hint;
    let mut progress = opts.progress;
    let mut tick = |at: u64| {
        if let Some(t) = progress.as_deref_mut() {
            t(at)
        }
    };
    let want_all = on_bytes.is_some();
    let mut feed = |at: u64, b: &[u8]| {
        if let Some(f) = on_bytes.as_deref_mut() {
            f(at, b)
        }
    };
    drive(&mut p, src, &mut tick, &mut feed, want_all)?;
    if !p.device_choices.is_empty() {
        if let Some(desc) = p.vmdesc_hint.clone().filter(|_| !had_hint) {
            let mut q = StreamParser::new(start, Some(desc));
            q.set_page_map(page_map);
            q.seekable = true;
            q.end_hint = end_hint;
            drive(&mut q, src, &mut |_| {}, &mut |_, _| {}, false)?;
            p = q;
        }
        p.check_unambiguous(|alt| match drive(alt, src, &mut |_| {}, &mut |_, _| {}, false) {
            Ok(()) => Ok(true),
            Err(SourceError::Format(_)) => Ok(false),
            Err(e) => Err(e),
        })?;
    }
    Ok(p.finish())
}

/// Runs `p` to the stream's end over windows of `src`, from its position.
fn drive(
    p: &mut StreamParser,
    src: &dyn ReadAt,
    tick: &mut dyn FnMut(u64),
    on_bytes: &mut dyn FnMut(u64, &[u8]),
    want_all: bool,
) -> std::result::Result<(), SourceError> {
    let size = src.size();
    let mut base = p.pos().min(size);
    let mut buf: Vec<u8> = Vec::new();
    let mut want = WINDOW as u64;
    loop {
        let have = base + buf.len() as u64;
        let to = size.min(have.saturating_add(want));
        if to > have {
            let old = buf.len();
            buf.resize(old + (to - have) as usize, 0);
            src.read_at(have, &mut buf[old..]).map_err(|error| SourceError::Io {
                offset: have,
                len: to - have,
                error,
            })?;
            on_bytes(have, &buf[old..]);
        }
        let last = to == size;
        if p.advance(&buf, base, last, Some(&mut *tick))? == Progress::Done {
            return Ok(());
        }
        let keep = p.keep_from();
        let end = base + buf.len() as u64;
        if keep >= end {
            // The stream jumped past the window (a mapped-ram page region).
            if want_all {
                let mut at = end;
                let mut chunk = vec![0u8; WINDOW];
                while at < keep.min(size) {
                    let n = (keep.min(size) - at).min(WINDOW as u64) as usize;
                    src.read_at(at, &mut chunk[..n]).map_err(|error| SourceError::Io {
                        offset: at,
                        len: n as u64,
                        error,
                    })?;
                    on_bytes(at, &chunk[..n]);
                    at += n as u64;
                }
            }
            buf.clear();
            base = keep.min(size);
            want = WINDOW as u64;
        } else {
            let used = (keep - base) as usize;
            // No whole item in a window this large: read more at once.
            want = if used == 0 { want.saturating_mul(2) } else { WINDOW as u64 };
            buf.drain(..used);
            base = keep;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sample_stream, sample_stream_with};
    use super::*;

    /// A source that is not a slice.
    struct Pread(Vec<u8>);
    impl ReadAt for Pread {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.0.read_at(at, buf)
        }
    }

    #[test]
    fn windows_give_the_same_items_as_a_slice() {
        let cpu = [0x7e, 0, 0, 0, 6, 4, 0, 0, 0, 9, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 9];
        for d in [sample_stream(true), sample_stream(false), sample_stream_with(true, &cpu)] {
            let whole = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
            let mut seen = Vec::new();
            let mut on = |at: u64, b: &[u8]| {
                assert_eq!(at as usize, seen.len());
                seen.extend_from_slice(b);
            };
            let s = parse_source(&Pread(d.clone()), ParseOptions::new(0, d.len() as u64), Some(&mut on)).unwrap();
            assert_eq!(s.items, whole.items);
            assert_eq!((s.eof, s.end), (whole.eof, whole.end));
            assert_eq!(seen, d);
        }
    }

    #[test]
    fn cut_streams_fail_alike() {
        let d = sample_stream(true);
        let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof as usize;
        for cut in (0..=eof).step_by(5) {
            let whole = parse(&d[..cut], ParseOptions::new(0, cut as u64)).unwrap_err();
            match parse_source(&Pread(d[..cut].to_vec()), ParseOptions::new(0, cut as u64), None) {
                Err(SourceError::Format(e)) => {
                    assert_eq!(e.kind, whole.kind, "cut {cut}: {e} vs {whole}")
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }
}
