//! `savedir verify`: checks 1–3 of the format, and 4 (deep) on request.

use std::path::{Path, PathBuf};

use crate::format::directory::{Check, CheckError, Directory, View};
use crate::format::error::FormatError;
use crate::format::pagemap::PageMap;
use crate::format::source::{Cached, Limit, ReadAt, SourceError};
use crate::format::stream::{describe, ParseOptions};
use crate::format::vmdesc::Vmdesc;

use super::error::{Error, Result};
use super::locate::{check_or_read_error, check_structure, cross_check, find_directory, locate, DirSource};
use super::open::{Backing, SaveFile};
use super::pagecache::PageCache;
use super::progress::Progress;
use super::scan::Scan;
use super::source::{map_file, open_locked, FileSource, Map};

/// The outcome of verifying one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub path: PathBuf,
    pub ok: bool,
    /// The first check that failed.
    pub check: Option<Check>,
    pub offset: Option<u64>,
    pub message: String,
    /// Entries in the directory (0 when it could not be read).
    pub entries: usize,
    pub deep: bool,
}

/// Verifies `path`. I/O errors are `Err`; a file that fails a check is an
/// `Ok` report with `ok == false`. The shared lock of a reader is held
/// while it runs.
pub fn verify(
    path: &Path,
    deep: bool,
    progress: bool,
    offset: Option<u64>,
    wait: bool,
    hint: Option<&Vmdesc>,
) -> Result<VerifyReport> {
    let lock = open_locked(path, wait)?;
    // What the page cache holds, before anything reads the file.
    let mut cache =
        if deep { lock.file().metadata().ok().and_then(|md| PageCache::new(lock.file(), md.len())) } else { None };
    let map = map_file(path, lock.file())?;
    // The head, the tail and a header per entry: no read-ahead around them
    // (it would read megabytes for each header of a file not cached).
    map.advise_random();
    let located = locate(path, &View::appended(&*map), offset);
    let src = find_directory(path, &*map)?;
    let stream_start = match (located, &src) {
        (Ok(l), _) => l.stream_start,
        // Neither a stream nor a directory (a text file, random bytes, an
        // empty file): that is what to say, not that the directory is missing.
        (Err(Error::Format { source, .. }), None) => return map.check(path, Ok(not_a_stream(path, deep, source))),
        // A directory without a stream: checks 1-3 will say what is wrong.
        (Err(_), _) => offset.unwrap_or(0),
    };
    let src = src.unwrap_or_default();
    if deep {
        map.advise_scan();
    }
    let meter = Progress::new(progress && deep, format!("{}: verifying", path.display()), map.len());
    let reads = FileSource::for_checks(path, lock.file()).map(Cached::new);
    let scan = Pages { map: Some(&map), cache: cache.as_mut(), checks: reads.as_ref().map(|r| r as &dyn ReadAt) };
    let r = super::pool::run(if deep { map.len() } else { 0 }, || {
        verify_source(path, &src, &*map, stream_start, deep, hint, &meter, scan)
    });
    // The checks after the scan read a header per entry again.
    if let Some(c) = &mut cache {
        c.finish(Some(&map));
    }
    map.check(path, r)
}

/// The pages a deep check reads: the mapping it reads them through, and
/// what the page cache held before (see `pagecache.rs`); and where the other
/// checks read (by positioned reads: a mapped file maps a whole folio of the
/// page cache, up to 2 MiB, for each header read, in the resident set).
#[derive(Default)]
pub struct Pages<'a> {
    pub map: Option<&'a Map>,
    pub cache: Option<&'a mut PageCache>,
    pub checks: Option<&'a dyn ReadAt>,
}

/// Verifies a file that is open already.
pub fn verify_open(f: &SaveFile, deep: bool, progress: bool) -> Result<VerifyReport> {
    let meter = Progress::new(progress && deep, format!("{}: verifying", f.path.display()), f.source.size());
    let size = f.source.size();
    let file = match &f.backing {
        Backing::Map(m) => m.file(),
        Backing::File(s) => Some(s.file()),
        Backing::Other => None,
    };
    let mut cache = file.filter(|_| deep).and_then(|file| PageCache::new(file, size));
    let scan = Pages { map: f.map().map(|m| &**m), cache: cache.as_mut(), checks: None };
    let r = super::pool::run(if deep { size } else { 0 }, || {
        verify_source(&f.path, &f.dir_source(), &*f.source, f.stream_start, deep, f.hint.as_deref(), &meter, scan)
    });
    if let Some(c) = &mut cache {
        c.finish(f.map().map(|m| &**m));
    }
    // The views of the open file are read as they were before.
    if let Some(m) = f.map() {
        m.advise_normal();
    }
    f.check_changed()?;
    r
}

/// The trailer check's failure for a file that holds no stream to find.
fn not_a_stream(path: &Path, deep: bool, e: FormatError) -> VerifyReport {
    VerifyReport {
        path: path.to_path_buf(),
        ok: false,
        check: Some(Check::Trailer),
        offset: Some(e.offset),
        message: e.message,
        entries: 0,
        deep,
    }
}

/// Runs the checks on a file's bytes and its directory source.
#[allow(clippy::too_many_arguments)]
pub fn verify_source(
    path: &Path,
    src: &DirSource,
    data: &dyn ReadAt,
    stream_start: u64,
    deep: bool,
    hint: Option<&Vmdesc>,
    meter: &Progress,
    pages: Pages<'_>,
) -> Result<VerifyReport> {
    let mut entries = 0;
    let view = src.view(pages.checks.unwrap_or(data));
    let structure = check_structure(src, &view, stream_start).map_err(|mut e| {
        if e.check == Check::Trailer && src.sidecar.is_none() {
            e.message = format!("no section directory: {}", e.message);
        }
        e
    });
    // Check 2 also reads the RAM page map whole.
    let structure = structure.and_then(|dir| {
        let map =
            crate::format::directory::read_page_map(&view, &dir).map_err(|e| super::locate::in_sidecar(src, e))?;
        Ok((dir, map))
    });
    let res = match structure {
        Err(e) => Err(e),
        Ok((dir, _)) if !deep => {
            entries = dir.entries.len();
            cross_check(src, &view, &dir, stream_start)
        }
        Ok((dir, map)) => {
            entries = dir.entries.len();
            // The long sequential read first: reading one header per entry
            // across a cold file before it would defeat the kernel's
            // read-ahead. Failures are still reported in the checks' order.
            let deep_res = deep_check(path, data, &dir, map.as_ref(), stream_start, hint, meter, pages)?;
            cross_check(src, &view, &dir, stream_start).and(deep_res)
        }
    };
    meter.finish();
    let res = check_or_read_error(path, &view, res)?;
    Ok(match res {
        Ok(()) => VerifyReport {
            path: path.to_path_buf(),
            ok: true,
            check: None,
            offset: None,
            message: format!(
                "{entries} entries{}{}",
                if src.sidecar.is_some() { " in the sidecar" } else { "" },
                if deep { ", stream and checksums match" } else { "" }
            ),
            entries,
            deep,
        },
        Err(e) => VerifyReport {
            path: path.to_path_buf(),
            ok: false,
            check: Some(e.check),
            offset: e.offset,
            message: e.message,
            entries,
            deep,
        },
    })
}

/// Check 4: parse the stream and compare it with the directory; checksums.
/// The outer `Err` is a source that could not be read; the inner one a
/// stream that does not match its directory.
#[allow(clippy::too_many_arguments)]
fn deep_check(
    path: &Path,
    data: &dyn ReadAt,
    dir: &Directory,
    stored_map: Option<&PageMap>,
    stream_start: u64,
    hint: Option<&Vmdesc>,
    meter: &Progress,
    pages: Pages<'_>,
) -> Result<std::result::Result<(), CheckError>> {
    let fail = |at: u64, m: String| Ok(Err(CheckError::new(Check::Deep, Some(at), m)));
    let t = dir.trailer;
    // The stream lies wholly in the data file, before the directory.
    let stream = Limit { src: data, len: dir.stream_end() };
    let extents = dir.extents();
    let with_crc = dir.entries.iter().any(|e| e.crc32c.is_some());
    let mut tick = |at: u64| meter.set(at);
    let mut popts = ParseOptions::new(stream_start, dir.stream_end());
    popts.vmdesc = hint;
    popts.page_map = dir.ram_map.is_some();
    popts.progress = Some(&mut tick);
    super::testhook::pause_file("scan:start", path);
    // One pass: the checksums are computed as the stream is parsed.
    let scan = Scan { src: &stream, map: pages.map, cache: pages.cache };
    let (s, crcs) = match scan.run(popts, with_crc) {
        Ok(s) => (s.stream, s.crcs.unwrap_or_default()),
        Err(SourceError::Format(e)) => return fail(e.offset, format!("the stream does not parse: {}", e.message)),
        Err(e) => return Err(Error::source(path, e)),
    };
    if s.eof != t.eof {
        return fail(s.eof, format!("the stream's EOF byte is at {}, the directory says {}", s.eof, t.eof));
    }
    if s.end != dir.stream_end() {
        let what = if dir.ram_map.is_some() { "RAM page map" } else { "directory" };
        return fail(s.end, format!("the stream ends at {}, the {what} starts at {}", s.end, dir.stream_end()));
    }
    for (i, item) in s.items.iter().enumerate() {
        let Some(e) = dir.entries.get(i) else {
            return fail(item.offset, format!("the stream has {} here, which the directory lacks", describe(item)));
        };
        if e.kind != item.kind || e.offset != item.offset {
            return fail(
                item.offset.min(e.offset),
                format!(
                    "the stream has {} at {}, the directory has a {} entry at {}",
                    describe(item),
                    item.offset,
                    e.kind.as_str(),
                    e.offset
                ),
            );
        }
        if extents[i] != (item.offset, item.end) {
            return fail(
                item.end.min(extents[i].1),
                format!(
                    "{} ends at {}, but the directory's next pointer says {}",
                    describe(item),
                    item.end,
                    extents[i].1
                ),
            );
        }
    }
    if let Some(e) = dir.entries.get(s.items.len()) {
        return fail(
            e.offset,
            format!("the directory has a {} entry at {} that the stream lacks", e.kind.as_str(), e.offset),
        );
    }
    if let Some(stored) = stored_map {
        let derived = s.ram.as_ref().and_then(|r| r.page_map());
        if derived.as_ref().and_then(|d| d.as_ref().ok()) != Some(stored) {
            let at = dir.ram_map.unwrap_or(dir.trailer.dir);
            let why = match &derived {
                None => "the stream has no RAM records to map".to_string(),
                Some(Err(e)) => e.message.clone(),
                Some(Ok(d)) => describe_map_difference(stored, d),
            };
            return fail(at, format!("the RAM page map does not match the stream's RAM records: {why}"));
        }
    }
    for (i, (e, &c)) in dir.entries.iter().zip(&crcs).enumerate() {
        let Some(want) = e.crc32c else { continue };
        if c != want {
            let item = &s.items[i];
            return fail(
                item.offset,
                format!(
                    "the CRC-32C of {} ({} bytes from offset {}) is {c:08x}, the directory says {want:08x}: its bytes changed",
                    describe(item),
                    item.end - item.offset,
                    item.offset
                ),
            );
        }
    }
    Ok(Ok(()))
}

/// Where two page maps first differ, in words.
fn describe_map_difference(stored: &PageMap, derived: &PageMap) -> String {
    if stored.blocks.len() != derived.blocks.len() {
        return format!("it has {} blocks, the stream {}", stored.blocks.len(), derived.blocks.len());
    }
    for (a, b) in stored.blocks.iter().zip(&derived.blocks) {
        if a.id != b.id || a.used_length != b.used_length {
            return format!(
                "it has block \"{}\" ({} bytes), the stream \"{}\" ({} bytes)",
                a.id, a.used_length, b.id, b.used_length
            );
        }
        if a != b {
            let pages = a.used_length.div_ceil(stored.page_size);
            let first = (0..pages).find(|&p| a.lookup(p) != b.lookup(p));
            return match first {
                Some(p) => {
                    format!("block \"{}\" page {p}: the map says {:?}, the stream {:?}", a.id, a.lookup(p), b.lookup(p))
                }
                None => format!("block \"{}\" is described differently", a.id),
            };
        }
    }
    "its page size differs".into()
}
