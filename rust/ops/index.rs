//! `savedir index`: append a directory after the stream.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::directory::{self, View};
use crate::format::stream::{self, ParseOptions};
use crate::format::tag;

use super::checksum::crc32c_extents;
use super::error::{Error, Result};
use super::progress::Progress;
use super::source::{check_regular, map_file};

#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// Replace whatever follows the stream: a valid directory (rewrite),
    /// a damaged one, or unknown bytes.
    pub force: bool,
    /// Write a CRC-32C entry after every entry.
    pub checksums: bool,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions { force: false, checksums: true, progress: false }
    }
}

/// What `index` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexReport {
    pub path: PathBuf,
    /// False when the file already had a valid directory and nothing changed.
    pub written: bool,
    pub entries: usize,
    /// Offset of the directory (the stream's end).
    pub directory_offset: u64,
    pub directory_len: u64,
    /// Bytes after the stream that were replaced (`force`).
    pub replaced: u64,
}

/// Describes what follows a stream's end, for an error message.
pub fn describe_trailing(data: &[u8], end: u64) -> String {
    let n = data.len() as u64 - end;
    if data.get(end as usize) == Some(&tag::DIRECTORY) {
        format!("{n} bytes after the stream's end start like a section directory but are not a valid one (a torn or stale write?)")
    } else {
        format!("{n} bytes of unknown data follow the stream's end")
    }
}

pub fn index(path: &Path, opts: &IndexOptions) -> Result<IndexReport> {
    check_regular(path)?;
    let file = FsOpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, "open for writing", e))?;
    file.lock().map_err(|e| Error::io(path, "lock", e))?;
    let map = map_file(path, &file)?;
    let data = map.bytes();
    let stream_start = 0;

    // A valid directory already: nothing to do, unless a rewrite is asked for.
    let view = View::appended(data);
    let trailer = directory::check_trailer(&view).ok();
    if let Some(t) = trailer {
        let valid = directory::decode(&view, t, stream_start).and_then(|d| directory::cross_check(&view, &d, stream_start).map(|_| d));
        if let (Ok(d), false) = (&valid, opts.force) {
            return Ok(IndexReport {
                path: path.to_path_buf(),
                written: false,
                entries: d.entries.len(),
                directory_offset: t.dir,
                directory_len: t.len - t.dir,
                replaced: 0,
            });
        }
    }

    map.advise_sequential();
    let meter = Progress::new(opts.progress, format!("{}: indexing", path.display()), map.len());
    let mut tick = |at: u64| meter.set(at);
    let mut popts = ParseOptions::new(stream_start, trailer.map_or(data.len() as u64, |t| t.dir));
    popts.progress = Some(&mut tick);
    let s = stream::parse(data, popts).map_err(|e| Error::format(path, e))?;

    let len = data.len() as u64;
    if s.end < len && !opts.force {
        return Err(Error::TrailingData {
            path: path.to_path_buf(),
            offset: s.end,
            message: format!("{}; `savedir index --force` replaces them", describe_trailing(data, s.end)),
        });
    }
    let crcs = opts.checksums.then(|| {
        let extents: Vec<(u64, u64)> = s.items.iter().map(|i| (i.offset, i.end)).collect();
        crc32c_extents(data, &extents, &meter)
    });
    let dir = directory::encode(&s.items, s.eof, s.end, crcs.as_deref());
    meter.finish();
    drop(map);

    if s.end < len {
        file.set_len(s.end).map_err(|e| Error::io(path, "truncate", e))?;
    }
    file.write_all_at(&dir, s.end).map_err(|e| Error::io(path, "write the directory", e))?;
    file.sync_data().map_err(|e| Error::io(path, "flush to disk", e))?;
    Ok(IndexReport {
        path: path.to_path_buf(),
        written: true,
        entries: s.items.len(),
        directory_offset: s.end,
        directory_len: dir.len() as u64,
        replaced: len - s.end,
    })
}
