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
    map: Option<Mmap>,
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
    if len == 0 {
        return Ok(Arc::new(Map { map: None }));
    }
    // SAFETY: the mapping is read-only; savedir's writers never change bytes
    // inside the stream, and sizes are re-checked where a change matters.
    let map = unsafe { Mmap::map(file) }.map_err(|e| Error::io(path, "map", e))?;
    Ok(Arc::new(Map { map: Some(map) }))
}

/// Opens and maps a regular file read-only. The file is returned with a
/// shared lock held (until it is dropped), so savedir's own writers, which
/// take an exclusive lock, wait until the reader is done.
pub fn open_map(path: &Path) -> Result<(File, Arc<Map>)> {
    check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    file.lock_shared().map_err(|e| Error::io(path, "lock", e))?;
    let map = map_file(path, &file)?;
    Ok((file, map))
}
