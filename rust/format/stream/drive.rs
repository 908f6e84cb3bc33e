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

/// Told how a parse goes, window by window ([`parse_watched`]): what a
/// one-pass checksum, and a scan that gives the pages it read back to the
/// system, need to know.
pub trait Watch {
    /// True when every byte of the stream must pass through
    /// [`window`](Watch::window), the page regions of a mapped-ram stream
    /// included (a parse alone jumps over them).
    fn wants_all(&self) -> bool {
        false
    }

    /// The bytes `start..end` are about to be read.
    fn ahead(&mut self, start: u64, end: u64) {
        let _ = (start, end);
    }

    /// Work on the windows told so far that may run on another thread of
    /// the pool while the parser reads the next window of the slice `data`
    /// (the whole slice, as [`window`](Watch::window) is given it), if any.
    /// Only a parse of a slice asks.
    fn work<'s>(&'s mut self, data: &'s [u8]) -> Option<Box<dyn FnOnce() + Send + 's>> {
        let _ = data;
        None
    }

    /// The bytes read from a source that is not a slice, in file order as
    /// they are read (never for a slice, which the caller reads itself).
    fn bytes(&mut self, at: u64, data: &[u8]) {
        let _ = (at, data);
    }

    /// After a window: `data` holds the file's bytes from offset `base`, up
    /// to `done` at least. The parse reads no byte before `done` again, and
    /// every item that ends before it is final. `Break` stops the parse,
    /// which then fails with an I/O error of kind `Interrupted`.
    fn window(&mut self, p: &StreamParser, data: &[u8], base: u64, done: u64) -> Flow;
}

/// What a [`Watch`] says after a window: go on, or stop the parse.
pub type Flow = std::ops::ControlFlow<()>;

/// The parse stopped because its watch asked, at offset `at`.
fn stopped(at: u64) -> SourceError {
    SourceError::Io {
        offset: at,
        len: 0,
        error: std::io::Error::new(std::io::ErrorKind::Interrupted, "the work was stopped"),
    }
}

/// Passes the watch's answer on: Err when it says stop.
fn go(flow: Flow, at: u64) -> std::result::Result<(), SourceError> {
    match flow {
        Flow::Continue(()) => Ok(()),
        Flow::Break(()) => Err(stopped(at)),
    }
}

/// Parses the stream that starts at `opts.start` in `src`. `on_bytes`, when
/// given, is called with every byte from the stream's start to its end, in
/// order, as the windows are read (to checksum a source in one pass); it is
/// not called when the source is a slice, which the caller reads itself.
pub fn parse_source(
    src: &dyn ReadAt,
    opts: ParseOptions<'_>,
    on_bytes: Option<OnBytes<'_>>,
) -> std::result::Result<Stream, SourceError> {
    if let Some(data) = src.as_slice() {
        return Ok(parse(data, opts)?);
    }
    match on_bytes {
        Some(f) => parse_windows(src, opts, &mut Bytes(f)),
        None => parse_windows(src, opts, &mut Quiet),
    }
}

/// Parses the stream that starts at `opts.start` in `src` window by window,
/// telling `watch` about each; a slice (a memory map) is read in place, a
/// window at a time, any other source in windows read front to back. The
/// items are those [`parse`] finds. A second reading of the stream (a
/// vmdesc found only at its end, or the check for a stream that parses two
/// ways) is not watched.
pub fn parse_watched(
    src: &dyn ReadAt,
    opts: ParseOptions<'_>,
    watch: &mut dyn Watch,
) -> std::result::Result<Stream, SourceError> {
    match src.as_slice() {
        Some(data) => parse_slice(data, opts, watch),
        None => parse_windows(src, opts, watch),
    }
}

/// Forwards every byte read to a callback ([`parse_source`]'s `on_bytes`).
struct Bytes<'a>(OnBytes<'a>);

impl Watch for Bytes<'_> {
    fn wants_all(&self) -> bool {
        true
    }
    fn bytes(&mut self, at: u64, data: &[u8]) {
        (self.0)(at, data)
    }
    fn window(&mut self, _: &StreamParser, _: &[u8], _: u64, _: u64) -> Flow {
        Flow::Continue(())
    }
}

/// Watches nothing.
struct Quiet;

impl Watch for Quiet {
    fn window(&mut self, _: &StreamParser, _: &[u8], _: u64, _: u64) -> Flow {
        Flow::Continue(())
    }
}

/// Calls the progress callback, if any.
fn ticker<'a>(mut progress: Option<&'a mut dyn FnMut(u64)>) -> impl FnMut(u64) + 'a {
    move |at| {
        if let Some(t) = progress.as_deref_mut() {
            t(at)
        }
    }
}

/// A windowed parse of a slice: the windows are subslices, nothing is copied.
fn parse_slice(data: &[u8], opts: ParseOptions<'_>, watch: &mut dyn Watch) -> std::result::Result<Stream, SourceError> {
    let end_hint = opts.end_hint.min(data.len() as u64);
    watch.ahead(opts.start, (opts.start + HEADER_LEN).min(data.len() as u64));
    check_header(data, opts.start)?;
    let hint = tail_hint(data, end_hint, opts.vmdesc);
    let had_hint = hint.is_some();
    let mut p = StreamParser::new(opts.start, hint);
    p.set_page_map(opts.page_map);
    p.seekable = true;
    p.end_hint = end_hint;
    let mut tick = ticker(opts.progress);
    drive_slice(&mut p, data, &mut tick, watch)?;
    settle(p, had_hint, |q| match q.advance(data, 0, true, None) {
        Ok(_) => Ok(()),
        Err(e) => Err(SourceError::Format(e)),
    })
}

/// A windowed parse of a source that is read, not mapped.
fn parse_windows(
    src: &dyn ReadAt,
    opts: ParseOptions<'_>,
    watch: &mut dyn Watch,
) -> std::result::Result<Stream, SourceError> {
    let size = src.size();
    let start = opts.start;
    let head_len = HEADER_LEN.min(size.saturating_sub(start));
    watch.ahead(start.min(size), start.min(size) + head_len);
    let head = read_vec(src, start.min(size), head_len)?;
    check_header(&head, 0).map_err(|e| shift(e, start))?;
    let end_hint = opts.end_hint.min(size);
    let tail_at = end_hint.saturating_sub(TAIL_WINDOW).max(start);
    let hint = match opts.vmdesc {
        Some(v) => Some(v.clone()),
        None => {
            watch.ahead(tail_at, end_hint);
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
    let mut tick = ticker(opts.progress);
    drive(&mut p, src, &mut tick, watch)?;
    settle(p, had_hint, |q| {
        q.seekable = true;
        drive(q, src, &mut |_| {}, &mut Quiet)
    })
}

/// After a first reading that chose where device sections end by their
/// footers: reads the stream again with a vmdesc that turned up only at its
/// end (`run` parses a fresh parser to the end), then refuses a stream that
/// also parses another way.
pub(super) fn settle(
    mut p: StreamParser,
    had_hint: bool,
    mut run: impl FnMut(&mut StreamParser) -> std::result::Result<(), SourceError>,
) -> std::result::Result<Stream, SourceError> {
    if !p.device_choices.is_empty() {
        if let Some(desc) = p.vmdesc_hint.clone().filter(|_| !had_hint) {
            let mut q = StreamParser::new(p.start, Some(desc));
            q.end_hint = p.end_hint;
            q.set_page_map(p.ram_options.page_map);
            run(&mut q)?;
            p = q;
        }
        p.check_unambiguous(|alt| match run(alt) {
            Ok(()) => Ok(true),
            Err(SourceError::Format(_)) => Ok(false),
            Err(e) => Err(e),
        })?;
    }
    Ok(p.finish())
}

/// Runs `p` to the stream's end over windows of `data`, from its position.
fn drive_slice(
    p: &mut StreamParser,
    data: &[u8],
    tick: &mut dyn FnMut(u64),
    watch: &mut dyn Watch,
) -> std::result::Result<(), SourceError> {
    let size = data.len() as u64;
    let mut want = WINDOW as u64;
    // Bytes before `seen` were announced to the watch.
    let mut seen = p.pos().min(size);
    loop {
        let from = p.pos().min(size);
        let to = size.min(from.saturating_add(want));
        if to > seen {
            watch.ahead(seen, to);
            seen = to;
        }
        let mut parse = || p.advance(&data[..to as usize], 0, to == size, Some(&mut *tick));
        // The watch's work on the last window (checksums), meanwhile.
        let parsed = match watch.work(data) {
            Some(job) => rayon::in_place_scope(|scope| {
                scope.spawn(move |_| job());
                parse()
            }),
            None => parse(),
        };
        let done = parsed? == Progress::Done;
        let keep = p.keep_from();
        if done {
            return go(watch.window(p, data, 0, keep.min(size)), keep.min(size));
        }
        if keep > to {
            go(watch.window(p, data, 0, to), to)?;
            // The stream jumped past the window (a mapped-ram page region).
            if watch.wants_all() {
                let mut at = to;
                while at < keep.min(size) {
                    let n = (keep.min(size) - at).min(WINDOW as u64);
                    watch.ahead(at, at + n);
                    go(watch.window(p, data, 0, at + n), at + n)?;
                    at += n;
                }
            }
            seen = seen.max(keep.min(size));
        } else {
            go(watch.window(p, data, 0, keep), keep)?;
        }
        // No whole item in a window this large: look further at once.
        want = if p.pos() == from { want.saturating_mul(2) } else { WINDOW as u64 };
    }
}

/// Runs `p` to the stream's end over windows read from `src`, from its
/// position.
fn drive(
    p: &mut StreamParser,
    src: &dyn ReadAt,
    tick: &mut dyn FnMut(u64),
    watch: &mut dyn Watch,
) -> std::result::Result<(), SourceError> {
    let size = src.size();
    let want_all = watch.wants_all();
    let mut base = p.pos().min(size);
    let mut buf: Vec<u8> = Vec::new();
    let mut want = WINDOW as u64;
    loop {
        let have = base + buf.len() as u64;
        let to = size.min(have.saturating_add(want));
        if to > have {
            let old = buf.len();
            buf.resize(old + (to - have) as usize, 0);
            watch.ahead(have, to);
            read_into(src, have, &mut buf[old..])?;
            watch.bytes(have, &buf[old..]);
        }
        let last = to == size;
        let end = base + buf.len() as u64;
        if p.advance(&buf, base, last, Some(&mut *tick))? == Progress::Done {
            return go(watch.window(p, &buf, base, p.keep_from().min(end)), end);
        }
        let keep = p.keep_from();
        if keep >= end {
            go(watch.window(p, &buf, base, end), end)?;
            // The stream jumped past the window (a mapped-ram page region).
            if want_all {
                let mut at = end;
                let mut chunk = vec![0u8; WINDOW];
                while at < keep.min(size) {
                    let n = (keep.min(size) - at).min(WINDOW as u64) as usize;
                    watch.ahead(at, at + n as u64);
                    read_into(src, at, &mut chunk[..n])?;
                    watch.bytes(at, &chunk[..n]);
                    go(watch.window(p, &chunk[..n], at, at + n as u64), at)?;
                    at += n as u64;
                }
            }
            buf.clear();
            base = keep.min(size);
            want = WINDOW as u64;
        } else {
            go(watch.window(p, &buf, base, keep), keep)?;
            let used = (keep - base) as usize;
            // No whole item in a window this large: read more at once.
            want = if used == 0 { want.saturating_mul(2) } else { WINDOW as u64 };
            buf.drain(..used);
            base = keep;
        }
    }
}

fn read_into(src: &dyn ReadAt, at: u64, buf: &mut [u8]) -> std::result::Result<(), SourceError> {
    src.read_at(at, buf).map_err(|error| SourceError::Io { offset: at, len: buf.len() as u64, error })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sample_stream, sample_stream_with, Pread};
    use super::*;

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
