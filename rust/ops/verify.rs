//! `savedir verify`: checks 1–3 of the format, and 4 (deep) on request.

use std::path::{Path, PathBuf};

use crate::format::directory::{Check, CheckError, Directory, View};
use crate::format::error::FormatError;
use crate::format::stream::{self, describe, ParseOptions};

use super::checksum::crc32c_extents;
use super::error::{Error, Result};
use super::locate::{check_structure, cross_check, find_directory, locate, DirSource};
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
/// `Ok` report with `ok == false`.
pub fn verify(path: &Path, deep: bool, progress: bool, offset: Option<u64>) -> Result<VerifyReport> {
    let (_file, map) = open_map(path)?;
    let data = map.bytes();
    let located = locate(path, data, offset);
    let src = find_directory(path, data)?;
    let stream_start = match (located, &src) {
        (Ok(l), _) => l.stream_start,
        // Neither a stream nor a directory (a text file, random bytes, an
        // empty file): that is what to say, not that the directory is missing.
        (Err(Error::Format { source, .. }), None) => return map.check(path, Ok(not_a_stream(path, deep, source))),
        // A directory without a stream: checks 1-3 will say what is wrong.
        (Err(_), _) => offset.unwrap_or(0),
    };
    let src = src.unwrap_or(DirSource { sidecar: None });
    if deep {
        map.advise_sequential();
    }
    let meter = Progress::new(progress && deep, format!("{}: verifying", path.display()), map.len());
    let r = verify_source(path, &src, data, stream_start, deep, &meter);
    map.check(path, Ok(r))
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
    data: &[u8],
    stream_start: u64,
    deep: bool,
    meter: &Progress,
) -> VerifyReport {
    let mut entries = 0;
    let res = (|| -> std::result::Result<(), CheckError> {
        let dir = check_structure(src, data, stream_start).map_err(|mut e| {
            if e.check == Check::Trailer && src.sidecar.is_none() {
                e.message = format!("no section directory: {}", e.message);
            }
            e
        })?;
        entries = dir.entries.len();
        if !deep {
            return cross_check(src, data, &dir, stream_start);
        }
        // The long sequential read first: reading one header per entry
        // across a cold file before it would defeat the kernel's read-ahead.
        // Failures are still reported in the checks' order.
        let deep_res = deep_check(&src.view(data), &dir, stream_start, meter);
        cross_check(src, data, &dir, stream_start)?;
        deep_res
    })();
    meter.finish();
    match res {
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
    }
}

/// Check 4: parse the stream and compare it with the directory; checksums.
fn deep_check(
    view: &View,
    dir: &Directory,
    stream_start: u64,
    meter: &Progress,
) -> std::result::Result<(), CheckError> {
    let fail = |at: u64, m: String| Err(CheckError::new(Check::Deep, Some(at), m));
    let t = dir.trailer;
    // The stream lies wholly in the head of the view.
    let data = &view.head[..(t.dir.min(view.head.len() as u64)) as usize];
    let mut tick = |at: u64| meter.set(at);
    let mut popts = ParseOptions::new(stream_start, t.dir);
    popts.progress = Some(&mut tick);
    let s = match stream::parse(data, popts) {
        Ok(s) => s,
        Err(e) => return fail(e.offset, format!("the stream does not parse: {}", e.message)),
    };
    if s.eof != t.eof {
        return fail(s.eof, format!("the stream's EOF byte is at {}, the directory says {}", s.eof, t.eof));
    }
    if s.end != t.dir {
        return fail(s.end, format!("the stream ends at {}, the directory starts at {}", s.end, t.dir));
    }
    let extents = dir.extents();
    for (i, item) in s.items.iter().enumerate() {
        let Some(e) = dir.entries.get(i) else {
            return fail(item.offset, format!("the stream has {} here, which the directory lacks", describe(item)));
        };
        if e.kind != item.kind || e.ptr != item.offset {
            return fail(
                item.offset.min(e.ptr),
                format!(
                    "the stream has {} at {}, the directory has a {} entry at {}",
                    describe(item),
                    item.offset,
                    e.kind.as_str(),
                    e.ptr
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
            e.ptr,
            format!("the directory has a {} entry at {} that the stream lacks", e.kind.as_str(), e.ptr),
        );
    }
    let with_crc: Vec<usize> = (0..dir.entries.len()).filter(|&i| dir.entries[i].crc32c.is_some()).collect();
    let ext: Vec<(u64, u64)> = with_crc.iter().map(|&i| extents[i]).collect();
    let got = crc32c_extents(data, &ext, meter);
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
    Ok(())
}
