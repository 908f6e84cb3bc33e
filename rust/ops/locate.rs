//! Where the stream starts in a file, and where its directory is.
//!
//! A stream may sit behind a wrapper: libvirt's save image header, or any
//! header that QEMU's `file:PATH,offset=N` left room for. The directory is
//! appended to the file, or kept beside it in `FILE.savedir` (a sidecar).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::directory::{self, CheckError, Directory, View};
use crate::format::error::FormatError;
use crate::format::libvirt::{self, LibvirtHeader};
use crate::format::source::{ReadAt, SourceError};
use crate::format::stream::{check_header, HEADER_LEN};
use crate::format::STREAM_MAGIC;

use super::error::{Error, Result};
use super::source::map_file;

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

/// The first `n` bytes of `v`'s data file (fewer when it is shorter).
fn head<'a>(path: &Path, v: &View<'a>, n: u64) -> Result<Cow<'a, [u8]>> {
    let n = n.min(v.head.len());
    v.head.get(0, n).ok_or_else(|| read_error(path, v))
}

fn read_error(path: &Path, v: &View) -> Error {
    match v.take_error() {
        Some(e) => Error::source(path, e),
        None => Error::source(
            path,
            SourceError::Io {
                offset: 0,
                len: 0,
                error: std::io::Error::other("the source delivered fewer bytes than its size"),
            },
        ),
    }
}

/// Checks the stream header at `at` in `v`'s data file.
fn header_at(path: &Path, v: &View, at: u64) -> Result<()> {
    let n = HEADER_LEN.min(v.head.len().saturating_sub(at));
    let h = v.head.get(at.min(v.head.len()), n).ok_or_else(|| read_error(path, v))?;
    check_header(&h, 0).map_err(|mut e: FormatError| {
        e.offset += at;
        Error::format(path, e)
    })
}

/// Finds the stream in the data file of `v`: at `offset` when given; at 0;
/// behind a libvirt header; where an indexed file's directory says; or at a
/// page-aligned offset in the first MiB.
pub fn locate(path: &Path, v: &View, offset: Option<u64>) -> Result<Located> {
    if let Some(o) = offset {
        header_at(path, v, o)?;
        return Ok(Located { stream_start: o, ..Default::default() });
    }
    let small = head(path, v, SCAN_STEP)?;
    if small.starts_with(&STREAM_MAGIC.to_be_bytes()) {
        header_at(path, v, 0)?;
        return Ok(Located::default());
    }
    if libvirt::is_libvirt(&small) {
        let data = head(path, v, SCAN_LIMIT)?;
        let h = libvirt::parse(&data).map_err(|e| Error::format(path, e))?;
        header_at(path, v, h.stream_start).map_err(|e| match e {
            Error::Format { path, source } => Error::Format {
                path,
                source: source
                    .context(format!("the libvirt header says the stream starts at offset {}", h.stream_start)),
            },
            e => e,
        })?;
        return Ok(Located { stream_start: h.stream_start, libvirt: Some(h), scanned: false });
    }
    // An indexed file says where its stream is: its first entry lies right
    // after the stream's 8-byte header.
    if let Ok(t) = directory::check_trailer(v) {
        if let Ok(d) = directory::decode(v, t, 0) {
            if let Some(first) = d.entries.first().filter(|e| e.offset >= HEADER_LEN) {
                let at = first.offset - HEADER_LEN;
                if header_at(path, v, at).is_ok() {
                    return Ok(Located { stream_start: at, libvirt: None, scanned: true });
                }
            }
        }
    }
    let data = head(path, v, SCAN_LIMIT)?;
    let magic = STREAM_MAGIC.to_be_bytes();
    let mut at = SCAN_STEP;
    while at < data.len() as u64 {
        if data[at as usize..].starts_with(&magic) && check_header(&data, at).is_ok() {
            return Ok(Located { stream_start: at, libvirt: None, scanned: true });
        }
        at += SCAN_STEP;
    }
    // Nothing found: report what is at the start.
    header_at(path, v, 0)?;
    Ok(Located::default())
}

/// Where a parse should look for the stream's end (and the vmdesc just
/// before it): when the file has a trailer, the RAM page map its last
/// entry points at (if the map's magic is there) or the directory's first
/// byte; else the file's end. Only a hint: the parse finds the real end.
pub fn end_hint(src: &dyn ReadAt) -> u64 {
    claimed_stream_end(&View::appended(src)).unwrap_or(src.size())
}

/// Where the tail of `v` says the stream ends: the RAM page map its last
/// entry points at (when the map's magic is there), else the directory's
/// marker. None without a trailer.
pub fn claimed_stream_end(v: &View) -> Option<u64> {
    let t = directory::check_trailer(v).ok()?;
    let entry = t.len - directory::TRAILER_LEN - 9;
    if entry > t.dir && v.byte(entry) == Some(crate::format::tag::RAMMAP) {
        if let Some(ptr) = v.be64(entry + 1).filter(|&p| p < t.dir) {
            if v.get(ptr, 8).as_deref() == Some(&crate::format::pagemap::MAGIC[..]) {
                return Some(ptr);
            }
        }
    }
    Some(t.dir)
}

/// The sidecar directory's path for `path`: `FILE.savedir`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".savedir");
    PathBuf::from(s)
}

/// A sidecar directory: its path (for messages) and its bytes.
pub type Sidecar = (PathBuf, Arc<dyn ReadAt>);

/// A file's directory bytes: appended to it, or in a sidecar.
#[derive(Clone, Default)]
pub struct DirSource {
    pub sidecar: Option<Sidecar>,
}

impl DirSource {
    /// The view the format's checks run on.
    pub fn view<'a>(&'a self, data: &'a dyn ReadAt) -> View<'a> {
        match &self.sidecar {
            Some((_, m)) => View::with_sidecar(data, &**m),
            None => View::appended(data),
        }
    }
}

/// Finds the directory of a file: appended when its trailer is there, else
/// a sidecar when one exists. `Ok(None)`: neither.
pub fn find_directory(path: &Path, data: &dyn ReadAt) -> Result<Option<DirSource>> {
    if directory::check_trailer(&View::appended(data)).is_ok() {
        return Ok(Some(DirSource { sidecar: None }));
    }
    let sc = sidecar_path(path);
    match std::fs::metadata(&sc) {
        Ok(md) if md.is_file() => {
            let f = std::fs::File::open(&sc).map_err(|e| Error::io(&sc, "open", e))?;
            let m: Arc<dyn ReadAt> = map_file(&sc, &f)?;
            Ok(Some(DirSource { sidecar: Some((sc, m)) }))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&sc, "open", e)),
    }
}

/// Prefixes a check's message with the sidecar it is about, if any.
pub fn in_sidecar(src: &DirSource, mut e: CheckError) -> CheckError {
    if let Some((p, _)) = &src.sidecar {
        e.message = format!("sidecar {}: {}", p.display(), e.message);
    }
    e
}

/// Checks 1–3 on a directory source; for a sidecar, also that it was
/// written for this file (its directory pointer equals the file's size).
pub fn check_directory(src: &DirSource, v: &View, stream_start: u64) -> std::result::Result<Directory, CheckError> {
    let d = check_structure(src, v, stream_start)?;
    cross_check(src, v, &d, stream_start)?;
    Ok(d)
}

/// Check 3 alone, after [`check_structure`].
pub fn cross_check(src: &DirSource, v: &View, d: &Directory, stream_start: u64) -> std::result::Result<(), CheckError> {
    directory::cross_check(v, d, stream_start).map_err(|e| in_sidecar(src, e))
}

/// Checks 1 and 2 (and that a sidecar belongs to this file).
pub fn check_structure(src: &DirSource, v: &View, stream_start: u64) -> std::result::Result<Directory, CheckError> {
    // A sidecar's stream ends where its data file ends: the directory (or
    // the RAM page map before it) stands for the bytes right after. Its
    // tail names that offset: check it first.
    if let Some((_, m)) = &src.sidecar {
        let size = v.head.len();
        let last8 = m.size().checked_sub(8).and_then(|at| v.be64(v.tail_at + at));
        let written_for = last8.and(claimed_stream_end(v)).or(last8);
        if written_for != Some(size) {
            return Err(in_sidecar(
                src,
                CheckError::new(
                    directory::Check::Trailer,
                    Some(size),
                    match written_for {
                        Some(d) => format!(
                            "it no longer matches the data file: it was written for a stream of {d} bytes, the file has {size}"
                        ),
                        None => format!("it is {} bytes long, too short for a directory", m.size()),
                    },
                ),
            ));
        }
    }
    let trailer = directory::check_trailer(v).map_err(|e| in_sidecar(src, e))?;
    directory::decode(v, trailer, stream_start).map_err(|e| in_sidecar(src, e))
}

/// Turns a check's failure into the I/O error that caused it, if a read of
/// the source failed meanwhile.
pub fn check_or_read_error<T>(
    path: &Path,
    v: &View,
    r: std::result::Result<T, CheckError>,
) -> Result<std::result::Result<T, CheckError>> {
    match v.take_error() {
        Some(e) => Err(Error::source(path, e)),
        None => Ok(r),
    }
}
