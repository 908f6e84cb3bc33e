//! `savedir strip`: truncate a file back to the stream's end, or remove its sidecar.

use std::path::{Path, PathBuf};

use crate::format::directory::{self, View};
use crate::format::stream::{self, ParseOptions};
use crate::format::tag;

use super::error::{Error, Result};
use super::index::{describe_trailing, open_for_writing};
use super::locate::{check_directory, locate, sidecar_path, DirSource};
use super::source::map_file;

#[derive(Clone, Debug, Default)]
pub struct StripOptions {
    /// Also remove bytes after the stream that are not a directory.
    pub force: bool,
    /// Where the stream starts, when it cannot be found by itself.
    pub offset: Option<u64>,
    /// Wait for readers of the file to close it, instead of failing.
    pub wait: bool,
    /// A vmdesc to delimit device sections with when the stream has none.
    pub vmdesc: Option<std::sync::Arc<crate::format::vmdesc::Vmdesc>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StripReport {
    pub path: PathBuf,
    /// Bytes removed from the file (0: it already ended with the stream).
    pub removed: u64,
    /// The file's size now: the stream's end.
    pub stream_end: u64,
    /// The sidecar that was deleted, if any.
    pub sidecar: Option<PathBuf>,
}

pub fn strip(path: &Path, opts: &StripOptions) -> Result<StripReport> {
    let file = open_for_writing(path, opts.wait)?;
    let map = map_file(path, &file)?;
    let data = map.bytes();
    let len = data.len() as u64;
    let view = View::appended(&*map);
    let stream_start = locate(path, &view, opts.offset)?.stream_start;

    let appended = DirSource { sidecar: None };
    let end = if directory::check_trailer(&view).is_ok() {
        check_directory(&appended, &view, stream_start).ok().map(|d| d.stream_end())
    } else {
        None
    };
    let end = match end {
        Some(d) => d,
        None => {
            // Find the stream's real end by parsing it; never trust the tail.
            let s = map.check(
                path,
                stream::parse(data, {
                    let mut popts = ParseOptions::new(stream_start, super::locate::end_hint(&*map));
                    popts.vmdesc = opts.vmdesc.as_deref();
                    popts
                })
                .map_err(|e| Error::format(path, e)),
            )?;
            // A torn directory (or RAM page map and directory) of savedir's own.
            let ours = data[s.end as usize..].starts_with(&[tag::DIRECTORY])
                || data[s.end as usize..].starts_with(crate::format::pagemap::MAGIC);
            if s.end < len && !ours && !opts.force {
                return Err(Error::TrailingData {
                    path: path.to_path_buf(),
                    offset: s.end,
                    message: format!("{}; `savedir strip --force` removes them", describe_trailing(data, s.end)),
                });
            }
            s.end
        }
    };
    drop(view);
    drop(map);
    if end < len {
        file.set_len(end).map_err(|e| Error::io(path, "truncate", e))?;
        file.sync_data().map_err(|e| Error::io(path, "flush to disk", e))?;
    }
    let sc = sidecar_path(path);
    let sidecar = match std::fs::remove_file(&sc) {
        Ok(()) => Some(sc),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&sc, "remove", e)),
    };
    Ok(StripReport { path: path.to_path_buf(), removed: len - end, stream_end: end, sidecar })
}
