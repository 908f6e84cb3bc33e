//! `savedir verify`: checks 1–3 of the format, and 4 (deep) on request.

use std::path::{Path, PathBuf};

use crate::format::directory::{Check, CheckError, Directory, View};
use crate::format::error::FormatError;
use crate::format::pagemap::PageMap;
use crate::format::source::{Limit, ReadAt, SourceError};
use crate::format::stream::{self, describe, ParseOptions};
use crate::format::vmdesc::Vmdesc;

use super::checksum::crc32c_extents;
use super::error::{Error, Result};
use super::locate::{check_or_read_error, check_structure, cross_check, find_directory, locate, DirSource};
use super::open::SaveFile;
use super::progress::Progress;
use super::source::open_map;

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
    let (_lock, map) = open_map(path, wait)?;
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
        map.advise_sequential();
    }
    let meter = Progress::new(progress && deep, format!("{}: verifying", path.display()), map.len());
    let r = verify_source(path, &src, &*map, stream_start, deep, hint, &meter);
    map.check(path, r)
}

/// Verifies a file that is open already.
pub fn verify_open(f: &SaveFile, deep: bool, progress: bool) -> Result<VerifyReport> {
    let meter = Progress::new(progress && deep, format!("{}: verifying", f.path.display()), f.source.size());
    let r = verify_source(&f.path, &f.dir_source(), &*f.source, f.stream_start, deep, f.hint.as_deref(), &meter);
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
pub fn verify_source(
    path: &Path,
    src: &DirSource,
    data: &dyn ReadAt,
    stream_start: u64,
    deep: bool,
    hint: Option<&Vmdesc>,
    meter: &Progress,
) -> Result<VerifyReport> {
    let mut entries = 0;
    let view = src.view(data);
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
            let deep_res = deep_check(path, data, &dir, map.as_ref(), stream_start, hint, meter)?;
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

/// CRC-32C of extents in file order, fed with the bytes as they are read.
struct RunningCrcs {
    extents: Vec<(u64, u64)>,
    crcs: Vec<u32>,
    next: usize,
}

impl RunningCrcs {
    fn feed(&mut self, at: u64, bytes: &[u8]) {
        let end = at + bytes.len() as u64;
        while let Some(&(s, e)) = self.extents.get(self.next) {
            if s >= end {
                return;
            }
            let (a, b) = (s.max(at), e.min(end));
            if a < b {
                self.crcs[self.next] =
                    crc32c::crc32c_append(self.crcs[self.next], &bytes[(a - at) as usize..(b - at) as usize]);
            }
            if e > end {
                return;
            }
            self.next += 1;
        }
    }
}

/// Check 4: parse the stream and compare it with the directory; checksums.
/// The outer `Err` is a source that could not be read; the inner one a
/// stream that does not match its directory.
fn deep_check(
    path: &Path,
    data: &dyn ReadAt,
    dir: &Directory,
    stored_map: Option<&PageMap>,
    stream_start: u64,
    hint: Option<&Vmdesc>,
    meter: &Progress,
) -> Result<std::result::Result<(), CheckError>> {
    let fail = |at: u64, m: String| Ok(Err(CheckError::new(Check::Deep, Some(at), m)));
    let t = dir.trailer;
    // The stream lies wholly in the data file, before the directory.
    let stream = Limit { src: data, len: dir.stream_end() };
    let extents = dir.extents();
    let with_crc: Vec<usize> = (0..dir.entries.len()).filter(|&i| dir.entries[i].crc32c.is_some()).collect();
    let ext: Vec<(u64, u64)> = with_crc.iter().map(|&i| extents[i]).collect();
    let mut running = RunningCrcs { crcs: vec![0; ext.len()], extents: ext.clone(), next: 0 };
    let mut feed = |at: u64, b: &[u8]| running.feed(at, b);
    let mut tick = |at: u64| meter.set(at);
    let mut popts = ParseOptions::new(stream_start, dir.stream_end());
    popts.vmdesc = hint;
    popts.page_map = dir.ram_map.is_some();
    popts.progress = Some(&mut tick);
    super::testhook::pause("scan:start");
    // A slice is parsed whole and checksummed in parallel below; any other
    // source is read once, its checksums computed as the windows pass.
    let s = match stream::parse_source(&stream, popts, Some(&mut feed)) {
        Ok(s) => s,
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
    let got = match stream.as_slice() {
        Some(data) => crc32c_extents(data, &ext, meter),
        None => running.crcs,
    };
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
    for (&i, c) in with_crc.iter().zip(got) {
        let want = dir.entries[i].crc32c.expect("filtered above");
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
