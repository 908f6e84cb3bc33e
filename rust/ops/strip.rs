//! `savedir strip`: truncate a file back to the stream's end.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Path, PathBuf};

use crate::format::directory::{self, View};
use crate::format::stream::{self, ParseOptions};
use crate::format::tag;

use super::error::{Error, Result};
use super::index::describe_trailing;
use super::source::{check_regular, map_file};

#[derive(Clone, Debug, Default)]
pub struct StripOptions {
    /// Also remove bytes after the stream that are not a directory.
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripReport {
    pub path: PathBuf,
    /// Bytes removed (0: the file already ended with the stream).
    pub removed: u64,
    /// The file's size now: the stream's end.
    pub stream_end: u64,
}

pub fn strip(path: &Path, opts: &StripOptions) -> Result<StripReport> {
    check_regular(path)?;
    let file = FsOpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, "open for writing", e))?;
    file.lock().map_err(|e| Error::io(path, "lock", e))?;
    let map = map_file(path, &file)?;
    let data = map.bytes();
    let len = data.len() as u64;
    let stream_start = 0;
    let view = View::appended(data);

    let valid_end = directory::check_trailer(&view).ok().and_then(|t| {
        let d = directory::decode(&view, t, stream_start).ok()?;
        directory::cross_check(&view, &d, stream_start).ok()?;
        Some(t.dir)
    });
    let end = match valid_end {
        Some(d) => d,
        None => {
            // Find the stream's real end by parsing it; never trust the tail.
            let s = stream::parse(data, ParseOptions::new(stream_start, len)).map_err(|e| Error::format(path, e))?;
            if s.end < len && data[s.end as usize] != tag::DIRECTORY && !opts.force {
                return Err(Error::TrailingData {
                    path: path.to_path_buf(),
                    offset: s.end,
                    message: format!("{}; `savedir strip --force` removes them", describe_trailing(data, s.end)),
                });
            }
            s.end
        }
    };
    drop(map);
    if end < len {
        file.set_len(end).map_err(|e| Error::io(path, "truncate", e))?;
        file.sync_data().map_err(|e| Error::io(path, "flush to disk", e))?;
    }
    Ok(StripReport { path: path.to_path_buf(), removed: len - end, stream_end: end })
}
