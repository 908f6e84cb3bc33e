//! Byte sources: read-only memory maps of regular files.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::{Advice, Mmap};

use super::error::{Error, Result};

/// A read-only view of a whole file, shared by everything that reads it.
///
/// A mapped file that another process truncates raises SIGBUS on access;
/// savedir's own writers only append after the stream or truncate what lies
/// after it, under an exclusive lock, and readers check sizes before use.
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

    /// Hints that the whole file will be read front to back.
    pub fn advise_sequential(&self) {
        if let Some(m) = &self.map {
            let _ = m.advise(Advice::Sequential);
        }
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
pub struct SharedLock(File);

impl Drop for SharedLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Opens and maps a regular file read-only, with a shared lock held until
/// the returned guard is dropped: savedir's own writers, which take an
/// exclusive lock, wait until the reader is done.
pub fn open_map(path: &Path) -> Result<(SharedLock, Arc<Map>)> {
    check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    file.lock_shared().map_err(|e| Error::io(path, "lock", e))?;
    let map = map_file(path, &file)?;
    Ok((SharedLock(file), map))
}
