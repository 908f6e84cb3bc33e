//! `savedir index`: append a directory after the stream, or write a sidecar.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::directory::{self, View};
use crate::format::stream::ParseOptions;
use crate::format::tag;

use super::error::{Error, Result};
use super::locate::{check_directory, find_directory, locate, sidecar_path};
use super::pagecache::PageCache;
use super::progress::Progress;
use super::scan::Scan;
use super::source::{check_regular, lock_exclusive, map_file};

#[derive(Clone, Debug)]
pub struct IndexOptions {
    /// Replace whatever follows the stream: a valid directory (rewrite),
    /// a damaged one, or unknown bytes. With `sidecar`, rewrite the sidecar.
    pub force: bool,
    /// Write a CRC-32C entry after every entry.
    pub checksums: bool,
    /// Show progress on stderr.
    pub progress: bool,
    /// Keep the directory in `FILE.savedir` and leave the file as it is.
    pub sidecar: bool,
    /// Where the stream starts, when it cannot be found by itself.
    pub offset: Option<u64>,
    /// Wait for readers of the file to close it, instead of failing.
    pub wait: bool,
    /// A vmdesc to delimit device sections with when the stream has none.
    pub vmdesc: Option<std::sync::Arc<crate::format::vmdesc::Vmdesc>>,
    /// Store a RAM page map before the directory (not for mapped-ram streams,
    /// whose pages lie at fixed offsets already).
    pub ram_map: bool,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            force: false,
            checksums: true,
            progress: false,
            sidecar: false,
            offset: None,
            wait: false,
            vmdesc: None,
            ram_map: true,
        }
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
    /// The sidecar written or found, if any.
    pub sidecar: Option<PathBuf>,
    /// Bytes of the RAM page map stored before the directory (0: none).
    pub ram_map_len: u64,
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

/// Opens a file for writing, refusing read-only files even for root, and
/// takes the writer's exclusive lock (see [`lock_exclusive`]).
pub fn open_for_writing(path: &Path, wait: bool) -> Result<File> {
    let md = check_regular(path)?;
    check_folder_writable(path)?;
    if md.permissions().readonly() {
        return Err(Error::io(
            path,
            "write",
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the file is read-only (no write permission bits)",
            ),
        ));
    }
    let file =
        FsOpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, "open for writing", e))?;
    lock_exclusive(path, &file, wait)?;
    Ok(file)
}

/// Refuses to create files in a folder without write permission bits, even
/// for root (who could, but should not change what the owner protected).
pub fn check_folder_writable(path: &Path) -> Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let md = std::fs::metadata(folder).map_err(|e| Error::io(folder, "stat", e))?;
    if md.permissions().readonly() {
        return Err(Error::io(
            folder,
            "create files in",
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the folder is read-only (no write permission bits)",
            ),
        ));
    }
    Ok(())
}

pub fn index(path: &Path, opts: &IndexOptions) -> Result<IndexReport> {
    let file = open_for_writing(path, opts.wait)?;
    // What the page cache holds, before anything reads the file.
    let mut cache = file.metadata().ok().and_then(|md| PageCache::new(&file, md.len()));
    // Mapped after the lock: another writer may have changed the file meanwhile.
    let map = map_file(path, &file)?;
    // No read-ahead around the head and the tail, read first.
    map.advise_random();
    let data = map.bytes();
    let located = locate(path, &View::appended(&*map), opts.offset)?;
    let stream_start = located.stream_start;
    let report = |written, entries, dir_offset, dir_len, replaced, sidecar, ram_map_len| IndexReport {
        path: path.to_path_buf(),
        written,
        entries,
        directory_offset: dir_offset,
        directory_len: dir_len,
        replaced,
        sidecar,
        ram_map_len,
    };

    let appended = directory::check_trailer(&View::appended(&*map)).ok();
    if opts.sidecar && appended.is_some() {
        return Err(Error::TrailingData {
            path: path.to_path_buf(),
            offset: appended.map_or(0, |t| t.dir),
            message: "the file has an appended directory already; `savedir strip` it before writing a sidecar".into(),
        });
    }
    // A valid directory already: nothing to do, unless a rewrite is asked for.
    if !opts.force {
        if let Some(src) = find_directory(path, &*map)? {
            if src.sidecar.is_some() == opts.sidecar {
                if let Ok(d) = check_directory(&src, &src.view(&*map), stream_start) {
                    let t = d.trailer;
                    let map_len = t.dir - d.stream_end();
                    let sidecar = src.sidecar.map(|s| s.0);
                    return Ok(report(false, d.entries.len(), t.dir, t.len - t.dir, 0, sidecar, map_len));
                }
            }
        }
    }

    map.advise_scan();
    let meter = Progress::new(opts.progress, format!("{}: indexing", path.display()), map.len());
    super::testhook::pause_file("scan:start", path);
    let scanned = super::pool::run(map.len(), || {
        let mut tick = |at: u64| meter.set(at);
        let mut popts = ParseOptions::new(stream_start, super::locate::end_hint(&*map));
        popts.vmdesc = opts.vmdesc.as_deref();
        popts.progress = Some(&mut tick);
        popts.page_map = opts.ram_map;
        Scan { src: &*map, map: Some(&map), cache: cache.as_mut() }.run(popts, opts.checksums)
    });
    let scanned = map.check(path, scanned.map_err(|e| Error::source(path, e)))?;
    let (s, crcs) = (scanned.stream, scanned.crcs);

    let len = data.len() as u64;
    if s.end < len && opts.sidecar {
        return Err(Error::TrailingData {
            path: path.to_path_buf(),
            offset: s.end,
            message: format!(
                "{}; a sidecar describes a file that ends with its stream",
                describe_trailing(data, s.end)
            ),
        });
    }
    // The RAM page map, then the directory: both after the stream. (Records
    // too scattered to map, which no QEMU stream is, get no map: readers
    // then walk them and say why.)
    let mut tail =
        s.ram.as_ref().and_then(|r| r.page_map()).and_then(|m| m.ok()).map(|m| m.encode()).unwrap_or_default();
    let map_len = tail.len() as u64;
    let dir_at = s.end + map_len;
    let map_at = (map_len > 0).then_some(s.end);
    let dir = directory::encode(&s.items, s.eof, dir_at, crcs.as_deref(), map_at);
    let dir_len = dir.len() as u64;
    tail.extend_from_slice(&dir);
    meter.finish();
    // Checksums of bytes that vanished meanwhile would be wrong: write nothing.
    map.check(path, Ok(()))?;
    // Bytes after the stream are replaced only on request, except the start
    // of this very directory: an earlier write of it that was cut short.
    let trailing = &data[s.end as usize..];
    if !trailing.is_empty() && !opts.force && !tail.starts_with(trailing) {
        return Err(Error::TrailingData {
            path: path.to_path_buf(),
            offset: s.end,
            message: format!("{}; `savedir index --force` replaces them", describe_trailing(data, s.end)),
        });
    }
    drop(map);
    super::testhook::pause_file("index:before-write", path);

    if opts.sidecar {
        let sc = write_sidecar(path, &tail)?;
        return Ok(report(true, s.items.len(), dir_at, dir_len, 0, Some(sc), map_len));
    }
    if s.end < len {
        file.set_len(s.end).map_err(|e| Error::io(path, "truncate", e))?;
    }
    // In two writes, so that a test can stop the process between them
    // (a torn directory, which the next `index` completes).
    let (first, rest) = tail.split_at(tail.len() / 2);
    file.write_all_at(first, s.end).map_err(|e| Error::io(path, "write the directory", e))?;
    super::testhook::pause_file("index:mid-write", path);
    file.write_all_at(rest, s.end + first.len() as u64).map_err(|e| Error::io(path, "write the directory", e))?;
    write_out(&file, s.end, tail.len() as u64).map_err(|e| Error::io(path, "flush to disk", e))?;
    Ok(report(true, s.items.len(), dir_at, dir_len, len - s.end, None, map_len))
}

/// Writes the bytes `start..start + len` of `file` to the disk and waits for
/// them, without waiting for any other unwritten data of the file: right
/// after QEMU wrote a large save, most of it is still in the page cache, and
/// `fdatasync` would wait for all of it (see "Durability" in
/// docs/internals.md for what this promises).
pub fn write_out(file: &File, start: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: sync_file_range on our own open file descriptor.
        let rc =
            unsafe { libc::sync_file_range(file.as_raw_fd(), start as libc::off64_t, len as libc::off64_t, flags) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes `FILE.savedir` whole or not at all: a temporary file, flushed,
/// then renamed over the old sidecar.
pub fn write_sidecar(path: &Path, dir: &[u8]) -> Result<PathBuf> {
    check_folder_writable(path)?;
    let sc = sidecar_path(path);
    let mut tmp = sc.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        f.write_all(dir).map_err(|e| Error::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "flush to disk", e))?;
        std::fs::rename(&tmp, &sc).map_err(|e| Error::io(&sc, "rename into place", e))?;
        if let Some(parent) = sc.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(sc.clone())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::stream::tests::sample_stream;

    fn tmp(name: &str, data: &[u8]) -> PathBuf {
        let d = std::env::temp_dir().join(format!("savedir-index-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("vm.sav");
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn a_torn_write_of_the_same_directory_is_completed() {
        let d = sample_stream(true);
        let full = tmp("full", &d);
        index(&full, &IndexOptions::default()).unwrap();
        let full = std::fs::read(&full).unwrap();
        for cut in [d.len() + 1, d.len() + 7, full.len() - 1] {
            let p = tmp(&format!("torn{cut}"), &full[..cut]);
            let r = index(&p, &IndexOptions::default()).unwrap();
            assert!(r.written);
            assert_eq!(r.replaced, (cut - d.len()) as u64);
            assert_eq!(std::fs::read(&p).unwrap(), full);
        }
        // Other bytes are refused and kept.
        let mut other = d.clone();
        other.extend_from_slice(b"\x7dnot ours");
        let p = tmp("other", &other);
        let e = index(&p, &IndexOptions::default()).unwrap_err();
        assert!(matches!(e, Error::TrailingData { offset, .. } if offset == d.len() as u64), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), other);
    }
}
