//! Opening a save file: through its directory in O(entries), or by a scan,
//! over any byte source (a mapping, positioned reads, a Python object).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::directory::{self, Directory, Trailer, View};
use crate::format::reader::Reader;
use crate::format::source::{read_vec, Cached, ReadAt};
use crate::format::stream::{read_machine_type, ParseOptions, MACHINE_TYPE_MAX};
use crate::format::vmdesc::{self, Vmdesc, VmdescLocation};
use crate::format::Kind;

pub use crate::format::directory::Entry;

use super::error::{Error, Result};
use super::locate::{check_directory, check_or_read_error, find_directory, locate, DirSource, Located, Sidecar};
use super::pagecache::PageCache;
use super::progress::Progress;
use super::scan::Scan;
use super::source::{map_file, open_locked, FileSource, Map, SharedLock};

/// How to open a file.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Ignore any directory and parse the stream from its start.
    pub scan: bool,
    /// Show progress on stderr while scanning.
    pub progress: bool,
    /// Where the stream starts, when it cannot be found by itself.
    pub offset: Option<u64>,
    /// Read a local file through a memory map (else by positioned reads).
    pub mmap: bool,
    /// Wait for a savedir writer at work on the file, instead of failing.
    pub wait: bool,
    /// A vmdesc to delimit device sections with when the stream has none.
    pub vmdesc: Option<Arc<Vmdesc>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { scan: false, progress: false, offset: None, mmap: true, wait: false, vmdesc: None }
    }
}

/// Reads a vmdesc to delimit another stream's device sections with: a JSON
/// file (what `savedir desc` prints), or a save that carries one.
pub fn load_vmdesc(path: &Path) -> Result<Vmdesc> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, "open", e))?;
    if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return vmdesc::parse_json(&data, 0).map_err(|e| Error::format(path, e));
    }
    let f = open(path, &OpenOptions::default())?;
    let json = f.vmdesc_json()?.ok_or_else(|| {
        Error::format(
            path,
            crate::format::error::FormatError::unsupported(
                0,
                "expected a vmdesc (JSON, or a save that has one), found a save without one",
            ),
        )
    })?;
    let at = f.vmdesc.map_or(0, |v| v.offset + vmdesc::VMDESC_HEADER);
    vmdesc::parse_json(&json, at).map_err(|e| Error::format(path, e))
}

/// What the bytes of an open file come from, for telling whether it changed.
#[derive(Debug, Clone)]
pub enum Backing {
    Map(Arc<Map>),
    File(Arc<FileSource>),
    /// A source savedir cannot watch (a Python object, a remote object).
    Other,
}

/// An open save file: its byte source and the list of its items. A local
/// file keeps the shared lock of a reader until this is dropped.
pub struct SaveFile {
    /// The file's path, or the name of the object it was read from.
    pub path: PathBuf,
    pub source: Arc<dyn ReadAt>,
    pub backing: Backing,
    /// Absolute offset of the stream's magic.
    pub stream_start: u64,
    /// Absolute offset one past the stream's last byte (vmdesc included).
    pub stream_end: u64,
    /// Absolute offset of the EOF byte.
    pub eof: u64,
    /// True when the items come from a valid directory.
    pub indexed: bool,
    pub trailer: Option<Trailer>,
    pub entries: Vec<Entry>,
    pub vmdesc: Option<VmdescLocation>,
    pub footers: bool,
    pub machine_type: Option<String>,
    /// The wrapper, if any, and how the stream was found.
    pub located: Located,
    /// The sidecar the directory was read from, if any.
    pub sidecar: Option<Sidecar>,
    /// The vmdesc given to delimit device sections with, if any.
    pub hint: Option<Arc<Vmdesc>>,
    /// Where the stored RAM page map starts, when the directory has one.
    pub ram_map_at: Option<u64>,
    lock: Option<SharedLock>,
}

impl std::fmt::Debug for SaveFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveFile").field("path", &self.path).field("indexed", &self.indexed).finish_non_exhaustive()
    }
}

/// Opens `path`: through its directory (appended, or a sidecar) when it has
/// a valid one (checks 1–3), else by parsing the stream. A directory whose
/// trailer is intact but which fails a check is an error, unless `opts.scan`
/// asks to ignore it. The shared lock of a reader is held until the
/// returned file is dropped.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<SaveFile> {
    let lock = open_locked(path, opts.wait)?;
    // What the page cache holds, before anything reads the file (a scan
    // hands back what it brought in).
    let cache = lock.file().metadata().ok().and_then(|md| PageCache::new(lock.file(), md.len()));
    let (source, backing): (Arc<dyn ReadAt>, Backing) = if opts.mmap {
        let m = map_file(path, lock.file())?;
        (m.clone(), Backing::Map(m))
    } else {
        let file = lock.file().try_clone().map_err(|e| Error::io(path, "open", e))?;
        let f = Arc::new(FileSource::new(path, file)?);
        (Arc::new(Cached::new(f.clone())), Backing::File(f))
    };
    // The head, the tail, the directory and a header per entry: no
    // read-ahead around them (megabytes for each header of a file not
    // cached). A scan reads ahead; the file's views read as usual after.
    if let Backing::Map(m) = &backing {
        m.advise_random();
    }
    let dir = if opts.scan { None } else { find_directory(path, &*source)? };
    let mut f = open_with(path, source, backing, dir, opts, cache)?;
    if let Some(m) = f.map() {
        m.advise_normal();
    }
    f.lock = Some(lock);
    f.check_changed()?;
    Ok(f)
}

/// Opens the save whose bytes `source` holds (named `name` in messages),
/// through the directory source `dir` when given.
pub fn open_source(
    name: &Path,
    source: Arc<dyn ReadAt>,
    backing: Backing,
    dir: Option<DirSource>,
    opts: &OpenOptions,
) -> Result<SaveFile> {
    open_with(name, source, backing, dir, opts, None)
}

/// [`open_source`], handing back behind a scan the pages it brought into the
/// page cache (`cache`: what the cache held when the file was opened).
fn open_with(
    name: &Path,
    source: Arc<dyn ReadAt>,
    backing: Backing,
    dir: Option<DirSource>,
    opts: &OpenOptions,
    cache: Option<PageCache>,
) -> Result<SaveFile> {
    let dsrc = dir.clone().unwrap_or_default();
    let view = dsrc.view(&*source);
    // Without a directory source given, an appended directory is looked for.
    let dir = match dir {
        None if !opts.scan && directory::check_trailer(&view).is_ok() => Some(dsrc.clone()),
        d => d,
    };
    let located = locate(name, &view, opts.offset)?;
    let mut f = SaveFile {
        path: name.to_path_buf(),
        source: source.clone(),
        backing,
        stream_start: located.stream_start,
        stream_end: 0,
        eof: 0,
        indexed: false,
        trailer: None,
        entries: Vec::new(),
        vmdesc: None,
        footers: false,
        machine_type: None,
        located,
        sidecar: None,
        hint: opts.vmdesc.clone(),
        ram_map_at: None,
        lock: None,
    };
    if let (Some(dsrc), false) = (dir, opts.scan) {
        let d = check_directory(&dsrc, &view, f.stream_start);
        let d = check_or_read_error(name, &view, d)?
            .map_err(|source| Error::Directory { path: name.to_path_buf(), source });
        let d = f.changed_error().map_or(d, Err)?;
        f.fill_from_directory(&view, d);
        f.sidecar = dsrc.sidecar;
        return Ok(f);
    }
    drop(view);
    f.scan(opts.progress, cache)?;
    Ok(f)
}

impl SaveFile {
    fn fill_from_directory(&mut self, view: &View, mut dir: Directory) {
        self.footers = dir.detect_footers(view);
        self.trailer = Some(dir.trailer);
        self.stream_end = dir.stream_end();
        self.ram_map_at = dir.ram_map;
        self.eof = dir.trailer.eof;
        self.indexed = true;
        self.vmdesc = dir
            .entries
            .iter()
            .find(|s| s.kind == Kind::Vmdesc)
            .map(|s| VmdescLocation { offset: s.offset, json_len: (s.size() - vmdesc::VMDESC_HEADER) as u32 });
        self.machine_type = dir.entries.iter().find(|s| s.kind == Kind::Configuration).and_then(|s| {
            let n = MACHINE_TYPE_MAX.min(s.size());
            let b = view.get(s.offset, n)?;
            read_machine_type(&mut Reader::with_base(&b, s.offset)).ok()
        });
        self.entries = dir.entries;
    }

    /// Parses the stream from its start.
    fn scan(&mut self, progress: bool, mut cache: Option<PageCache>) -> Result<()> {
        let size = self.source.size();
        let meter = Progress::new(progress, format!("{}: reading", self.path.display()), size);
        let mut tick = |at: u64| meter.set(at);
        let mut popts = ParseOptions::new(self.stream_start, super::locate::end_hint(&*self.source));
        popts.progress = Some(&mut tick);
        popts.vmdesc = self.hint.as_deref();
        super::testhook::pause_file("scan:start", &self.path);
        if let Some(m) = self.map() {
            m.advise_scan();
        }
        let scan = Scan { src: &*self.source, map: self.map().map(|m| &**m), cache: cache.as_mut() };
        let s = scan.run(popts, false).map(|s| s.stream).map_err(|e| Error::source(&self.path, e));
        let s = self.changed_error().map_or(s, Err)?;
        meter.finish();
        self.stream_end = s.end;
        self.eof = s.eof;
        self.entries = s.items.into_iter().map(|item| Entry { item, crc32c: None }).collect();
        self.vmdesc = s.vmdesc;
        self.footers = s.footers.unwrap_or(false);
        self.machine_type = s.configuration.map(|c| c.machine_type);
        Ok(())
    }

    /// Says how the file changed since it was opened, if savedir can tell.
    pub fn changed(&self) -> Option<String> {
        match &self.backing {
            Backing::Map(m) => m.changed(),
            Backing::File(f) => f.changed(),
            Backing::Other => None,
        }
    }

    fn changed_error(&self) -> Option<Error> {
        self.changed().map(|message| Error::Changed { path: self.path.clone(), message })
    }

    /// Fails with [`Error::Changed`] when the file changed under the reader.
    pub fn check_changed(&self) -> Result<()> {
        self.changed_error().map_or(Ok(()), Err)
    }

    /// The mapping, when the file is read through one (zero-copy views).
    pub fn map(&self) -> Option<&Arc<Map>> {
        match &self.backing {
            Backing::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Bytes `start..end` of the file: borrowed from a mapping, else read.
    pub fn read(&self, start: u64, end: u64) -> Result<Cow<'_, [u8]>> {
        let size = self.source.size();
        if start > end || end > size {
            return Err(Error::Read {
                path: self.path.clone(),
                offset: start,
                len: end.saturating_sub(start),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("the file has {size} bytes")),
            });
        }
        let r = match self.source.as_slice() {
            Some(all) => Ok(Cow::Borrowed(&all[start as usize..end as usize])),
            None => {
                read_vec(&*self.source, start, end - start).map(Cow::Owned).map_err(|e| Error::source(&self.path, e))
            }
        };
        self.changed_error().map_or(r, Err)
    }

    /// Every item of the section `name` (instance `instance`, or the lowest):
    /// one FULL, or a START with its PARTs and END, in file order.
    pub fn find(&self, name: &str, instance: Option<u32>) -> Result<Vec<&Entry>> {
        let opener = self
            .entries
            .iter()
            .filter(|s| s.kind.opens_section() && s.name.as_deref() == Some(name))
            .filter(|s| instance.is_none_or(|i| s.instance_id == i))
            .min_by_key(|s| (s.instance_id, s.offset));
        let Some(opener) = opener else {
            let mut have: Vec<String> = self
                .entries
                .iter()
                .filter(|s| s.kind.opens_section() && s.name.as_deref() == Some(name))
                .map(|s| s.instance_id.to_string())
                .collect();
            have.dedup();
            let message = match (instance, have.is_empty()) {
                (Some(i), false) => {
                    format!("section \"{name}\" has no instance {i} (instances: {})", have.join(", "))
                }
                _ => format!("no section is named \"{name}\""),
            };
            return Err(Error::NotFound { path: self.path.clone(), message });
        };
        if opener.kind == Kind::Full {
            return Ok(vec![opener]);
        }
        Ok(self
            .entries
            .iter()
            .filter(|s| {
                s.section_id == opener.section_id
                    && matches!(s.kind, Kind::Start | Kind::Part | Kind::End)
                    && s.offset >= opener.offset
            })
            .collect())
    }

    /// The vmdesc JSON bytes, if the stream has a vmdesc.
    pub fn vmdesc_json(&self) -> Result<Option<Cow<'_, [u8]>>> {
        match self.vmdesc {
            Some(v) => self.read(v.offset + vmdesc::VMDESC_HEADER, v.end()).map(Some),
            None => Ok(None),
        }
    }

    /// The directory source this file was opened through.
    pub fn dir_source(&self) -> DirSource {
        DirSource { sidecar: self.sidecar.clone() }
    }

    /// Releases the reader's lock (the bytes stay readable).
    pub fn unlock(&mut self) {
        self.lock = None;
    }
}
