//! Byte sources of local files, and the locks that readers and writers take.
//!
//! A file is read through a memory map (the fast path, zero-copy views) or
//! by positioned reads (`pread`), both [`ReadAt`] sources.
//!
//! Locks (advisory, `flock` on the file): a reader (an open `SaveFile`, a
//! running `verify`) holds a shared lock for as long as it is open; a writer
//! (`index`, `strip`, `record`) needs the exclusive lock. Writers queue
//! behind each other on a second lock (an OFD byte-range lock far past any
//! file's end, independent of `flock` on Linux), so that a writer that then
//! cannot have the exclusive lock knows a reader holds the file: it fails at
//! once, naming the reason, unless asked to wait. A reader that finds a
//! writer at work fails at once too, unless asked to wait.

use std::fs::{File, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub use memmap2::Advice;
use memmap2::Mmap;

use crate::format::source::ReadAt;

use super::error::{Error, Result};

/// A read-only view of a whole file, shared by everything that reads it.
///
/// A mapped file that another process truncates raises SIGBUS on access;
/// savedir's own writers only append after the stream or truncate what lies
/// after it, under an exclusive lock that no reader holds, and a mapping of
/// a file that shrank anyway reads zeros (see `sigbus.rs`) and says so.
#[derive(Debug)]
pub struct Map {
    // Declared first: unregistered before the mapping goes away.
    guard: super::sigbus::Guard,
    map: Option<Mmap>,
    file: Option<File>,
}

impl Map {
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Says how the file changed under the mapping, if it did: pages found
    /// missing (a SIGBUS turned into zeros), or a smaller size now.
    pub fn changed(&self) -> Option<String> {
        if self.guard.hit() {
            return Some("it was truncated while savedir read it (the bytes past its new end read as zeros)".into());
        }
        let now = self.file.as_ref()?.metadata().ok()?.len();
        (now < self.len()).then(|| format!("it shrank from {} to {now} bytes while savedir read it", self.len()))
    }

    /// Replaces `res` by [`Error::Changed`] when the file changed meanwhile:
    /// whatever was read then cannot be trusted.
    pub fn check<T>(&self, path: &Path, res: Result<T>) -> Result<T> {
        match self.changed() {
            Some(message) => Err(Error::Changed { path: path.to_path_buf(), message }),
            None => res,
        }
    }

    /// The mapped file (None for an empty file that could not be reopened).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Before a scan, front to back: the kernel's usual read-ahead, which
    /// streams a mapping read in order. (Not `MADV_SEQUENTIAL`: on Linux 6.x,
    /// after pages were read under [`advise_random`](Self::advise_random),
    /// it makes the kernel read the rest of the file in small pieces, four
    /// times slower from a disk.)
    pub fn advise_scan(&self) {
        self.advise_normal();
    }

    /// Takes back any hint: the kernel's usual read-ahead.
    pub fn advise_normal(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(Advice::Normal);
        }
    }

    /// Hints that the file will be read here and there (its head, its tail,
    /// a header per entry): no read-ahead, which would read megabytes
    /// around each of those pages of a file not cached.
    pub fn advise_random(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(Advice::Random);
        }
    }

    /// Takes the pages of bytes `start..end` (`start` page-aligned) out of
    /// this process's view of the file: they stop counting in its resident
    /// set, and the page cache may drop them. The bytes stay readable: the
    /// next read maps them again from the file.
    pub fn unmap_pages(&self, start: u64, end: u64) {
        let Some(m) = &self.map else { return };
        let end = end.min(m.len() as u64);
        if start >= end {
            return;
        }
        // SAFETY: a range inside our read-only shared mapping of a file.
        // MADV_DONTNEED drops its page table entries; a later access faults
        // the same file bytes in again (or zeros past a new end, see
        // sigbus.rs), so every slice handed out stays valid and unchanged.
        unsafe {
            libc::madvise(
                m.as_ptr().add(start as usize) as *mut libc::c_void,
                (end - start) as usize,
                libc::MADV_DONTNEED,
            );
        }
    }

    /// How bytes `start..end` will be read: `Random` (no read-ahead: single
    /// guest pages), `Sequential`, or `Normal`.
    pub fn advise_range(&self, advice: Advice, start: u64, end: u64) {
        if let Some(m) = &self.map {
            let page = 4096u64;
            let from = start / page * page;
            let to = end.min(m.len() as u64);
            if to > from {
                let _ = m.advise_range(advice, from as usize, (to - from) as usize);
            }
        }
    }
}

impl ReadAt for Map {
    fn size(&self) -> u64 {
        self.len()
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.bytes().read_at(at, buf)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self.bytes())
    }
}

/// Positioned reads on an open file, for where a mapping is a bad fit (a
/// network file system, a file that others may truncate).
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn new(path: &Path, file: File) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
        Ok(FileSource { file, len })
    }

    /// Positioned reads of `file` for reading it here and there (its tail,
    /// a header per entry): on an open file of its own (the same file,
    /// through /proc/self/fd), told to read no more than asked, so that it
    /// neither reads megabytes around each header nor changes how `file`
    /// and its mappings read ahead. None where that cannot be had.
    pub fn for_checks(path: &Path, file: &File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let own = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        // SAFETY: advice on our own open file; errors change nothing.
        unsafe {
            libc::posix_fadvise(own.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
        FileSource::new(path, own).ok()
    }

    /// The open file read.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Says how the file changed since it was opened, if it shrank.
    pub fn changed(&self) -> Option<String> {
        let now = self.file.metadata().ok()?.len();
        (now < self.len).then(|| format!("it shrank from {} to {now} bytes while savedir read it", self.len))
    }
}

impl ReadAt for FileSource {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, at)
    }
}

/// Refuses anything but a regular file, before opening it (a FIFO would block).
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, "open", e))?;
    let ft = md.file_type();
    if ft.is_file() {
        return Ok(md);
    }
    use std::os::unix::fs::FileTypeExt;
    let what = if ft.is_dir() {
        "is a directory"
    } else if ft.is_fifo() {
        "is a FIFO"
    } else if ft.is_char_device() {
        "is a character device"
    } else if ft.is_block_device() {
        "is a block device"
    } else if ft.is_socket() {
        "is a socket"
    } else {
        "is not a regular file"
    };
    Err(Error::NotRegular { path: path.to_path_buf(), what })
}

/// Maps an open file read-only.
pub fn map_file(path: &Path, file: &File) -> Result<Arc<Map>> {
    let len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
    let own = file.try_clone().ok();
    if len == 0 {
        return Ok(Arc::new(Map { guard: super::sigbus::register(std::ptr::null(), 0), map: None, file: own }));
    }
    // SAFETY: the mapping is read-only; savedir's writers never change bytes
    // inside the stream, and a file that shrinks under it reads as zeros
    // (see sigbus.rs) and is reported by `changed`.
    let map = unsafe { Mmap::map(file) }.map_err(|e| Error::io(path, "map", e))?;
    let guard = super::sigbus::register(map.as_ptr(), map.len());
    Ok(Arc::new(Map { guard, map: Some(map), file: own }))
}

/// A shared lock on a file, released when dropped (the mapping keeps a
/// descriptor of the same open file, which must not keep the lock).
#[derive(Debug)]
pub struct SharedLock(File);

impl SharedLock {
    pub fn file(&self) -> &File {
        &self.0
    }
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Takes the shared lock of a reader on `file`: at once, or (with `wait`)
/// after the writer at work is done.
pub fn lock_shared(path: &Path, file: File, wait: bool) -> Result<SharedLock> {
    if wait {
        file.lock_shared().map_err(|e| Error::io(path, "lock", e))?;
        return Ok(SharedLock(file));
    }
    match file.try_lock_shared() {
        Ok(()) => Ok(SharedLock(file)),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
            message: "savedir is writing it in another process (index, strip or record); wait for it, or pass --wait"
                .into(),
        }),
        Err(TryLockError::Error(e)) => Err(Error::io(path, "lock", e)),
    }
}

/// Opens a regular file read-only with the shared lock of a reader held.
pub fn open_locked(path: &Path, wait: bool) -> Result<SharedLock> {
    check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    lock_shared(path, file, wait)
}

/// Opens and maps a regular file read-only, with a shared lock held until
/// the returned guard is dropped.
pub fn open_map(path: &Path, wait: bool) -> Result<(SharedLock, Arc<Map>)> {
    let lock = open_locked(path, wait)?;
    let map = map_file(path, lock.file())?;
    Ok((lock, map))
}

/// Where the writers' queue lock lies: one byte far past any file's end.
const WRITER_BYTE: i64 = i64::MAX - 1;

/// Takes the exclusive lock of a writer on `file` (opened for writing):
/// after any other savedir writer (they queue), and at once or (with `wait`)
/// after every reader is gone.
pub fn lock_exclusive(path: &Path, file: &File, wait: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with a properly initialised `flock` on our own fd.
    let rc = unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = WRITER_BYTE;
        fl.l_len = 1;
        libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl)
    };
    if rc != 0 {
        return Err(Error::io(path, "lock", std::io::Error::last_os_error()));
    }
    if wait {
        return file.lock().map_err(|e| Error::io(path, "lock", e));
    }
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
            message: "a reader holds it open (a savedir.open() in another process or thread, or a running verify); \
                      close it first, or pass --wait"
                .into(),
        }),
        Err(TryLockError::Error(e)) => Err(Error::io(path, "lock", e)),
    }
}
