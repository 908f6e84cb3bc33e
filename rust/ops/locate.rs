//! Where the stream starts in a file, and where its directory is.
//!
//! A stream may sit behind a wrapper: libvirt's save image header, or any
//! header that QEMU's `file:PATH,offset=N` left room for. The directory is
//! appended to the file, or kept beside it in `FILE.savedir` (a sidecar).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::directory::{self, CheckError, Directory, Trailer, View};
use crate::format::libvirt::{self, LibvirtHeader};
use crate::format::stream::check_header;
use crate::format::STREAM_MAGIC;

use super::error::{Error, Result};
use super::source::{map_file, Map};

/// How far into a file the stream magic is looked for, at page-aligned offsets.
pub const SCAN_LIMIT: u64 = 1 << 20;
const SCAN_STEP: u64 = 4096;

/// Where a file's stream starts, and what wraps it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Located {
    pub stream_start: u64,
    pub libvirt: Option<LibvirtHeader>,
    /// True when the stream was found by scanning for its magic.
    pub scanned: bool,
}

/// Finds the stream in `data`: at `offset` when given; at 0; behind a
/// libvirt header; or at a page-aligned offset in the first MiB.
pub fn locate(path: &Path, data: &[u8], offset: Option<u64>) -> Result<Located> {
    let fail = |e| Error::format(path, e);
    if let Some(o) = offset {
        check_header(data, o).map_err(fail)?;
        return Ok(Located { stream_start: o, ..Default::default() });
    }
    if data.starts_with(&STREAM_MAGIC.to_be_bytes()) {
        check_header(data, 0).map_err(fail)?;
        return Ok(Located::default());
    }
    if libvirt::is_libvirt(data) {
        let h = libvirt::parse(data).map_err(fail)?;
        check_header(data, h.stream_start).map_err(|e| {
            fail(e.context(format!("the libvirt header says the stream starts at offset {}", h.stream_start)))
        })?;
        return Ok(Located { stream_start: h.stream_start, libvirt: Some(h), scanned: false });
    }
    // An indexed file says where its stream is: its first entry lies right
    // after the stream's 8-byte header.
    if let Ok(Some(src)) = find_directory(path, data) {
        let view = src.view(data);
        if let Ok(t) = directory::check_trailer(&view) {
            if let Ok(d) = directory::decode(&view, t, 0) {
                if let Some(first) = d.entries.first().filter(|e| e.ptr >= 8) {
                    let at = first.ptr - 8;
                    if check_header(data, at).is_ok() {
                        return Ok(Located { stream_start: at, libvirt: None, scanned: true });
                    }
                }
            }
        }
    }
    let magic = STREAM_MAGIC.to_be_bytes();
    let mut at = SCAN_STEP;
    while at < SCAN_LIMIT.min(data.len() as u64) {
        if data[at as usize..].starts_with(&magic) && check_header(data, at).is_ok() {
            return Ok(Located { stream_start: at, libvirt: None, scanned: true });
        }
        at += SCAN_STEP;
    }
    // Nothing found: report what is at the start.
    check_header(data, 0).map_err(fail)?;
    Ok(Located::default())
}

/// Where a parse should look for the stream's end (and the vmdesc just
/// before it): the appended directory's first byte when the file has a
/// trailer, else the file's end.
pub fn end_hint(data: &[u8]) -> u64 {
    directory::check_trailer(&View::appended(data)).map_or(data.len() as u64, |t| t.dir)
}

/// The sidecar directory's path for `path`: `FILE.savedir`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".savedir");
    PathBuf::from(s)
}

/// A file's directory bytes: appended to it, or in a sidecar.
pub struct DirSource {
    pub sidecar: Option<(PathBuf, Arc<Map>)>,
}

impl DirSource {
    /// The view the format's checks run on.
    pub fn view<'a>(&'a self, data: &'a [u8]) -> View<'a> {
        match &self.sidecar {
            Some((_, m)) => View { head: data, tail: m.bytes(), tail_at: data.len() as u64 },
            None => View::appended(data),
        }
    }
}

/// Finds the directory of a file: appended when its trailer is there, else
/// a sidecar when one exists. `Ok(None)`: neither.
pub fn find_directory(path: &Path, data: &[u8]) -> Result<Option<DirSource>> {
    if directory::check_trailer(&View::appended(data)).is_ok() {
        return Ok(Some(DirSource { sidecar: None }));
    }
    let sc = sidecar_path(path);
    match std::fs::metadata(&sc) {
        Ok(md) if md.is_file() => {
            let f = std::fs::File::open(&sc).map_err(|e| Error::io(&sc, "open", e))?;
            let m = map_file(&sc, &f)?;
            Ok(Some(DirSource { sidecar: Some((sc, m)) }))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&sc, "open", e)),
    }
}

/// Checks 1–3 on a directory source; for a sidecar, also that it was
/// written for this file (its directory pointer equals the file's size).
pub fn check_directory(src: &DirSource, data: &[u8], stream_start: u64) -> std::result::Result<Directory, CheckError> {
    let d = check_structure(src, data, stream_start)?;
    cross_check(src, data, &d, stream_start)?;
    Ok(d)
}

/// Check 3 alone, after [`check_structure`].
pub fn cross_check(
    src: &DirSource,
    data: &[u8],
    d: &Directory,
    stream_start: u64,
) -> std::result::Result<(), CheckError> {
    directory::cross_check(&src.view(data), d, stream_start).map_err(|mut e| {
        if let Some((p, _)) = &src.sidecar {
            e.message = format!("sidecar {}: {}", p.display(), e.message);
        }
        e
    })
}

/// Checks 1 and 2 (and that a sidecar belongs to this file).
pub fn check_structure(src: &DirSource, data: &[u8], stream_start: u64) -> std::result::Result<Directory, CheckError> {
    let view = src.view(data);
    let prefix = |mut e: CheckError| {
        if let Some((p, _)) = &src.sidecar {
            e.message = format!("sidecar {}: {}", p.display(), e.message);
        }
        e
    };
    // A sidecar names, in its last 8 bytes, the size of the file it was
    // written for: check that first.
    if let Some((_, m)) = &src.sidecar {
        let sc = m.bytes();
        let written_for = sc.len().checked_sub(8).and_then(|at| crate::format::reader::be64_at(sc, at as u64));
        if written_for != Some(data.len() as u64) {
            return Err(prefix(CheckError::new(
                directory::Check::Trailer,
                Some(data.len() as u64),
                match written_for {
                    Some(d) => format!(
                        "it no longer matches the data file: it was written for a stream of {d} bytes, the file has {}",
                        data.len()
                    ),
                    None => format!("it is {} bytes long, too short for a directory", sc.len()),
                },
            )));
        }
    }
    let trailer: Trailer = directory::check_trailer(&view).map_err(prefix)?;
    directory::decode(&view, trailer, stream_start).map_err(prefix)
}
