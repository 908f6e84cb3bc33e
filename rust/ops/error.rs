//! Errors of the I/O layer: every one names the file.

use std::io;
use std::path::PathBuf;

use crate::format::directory::CheckError;
use crate::format::error::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused or failed an operation.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: io::Error },

    /// The file is not a regular file (a directory, a FIFO, a device).
    #[error("{}: {what}: savedir reads regular files only", path.display())]
    NotRegular { path: PathBuf, what: &'static str },

    /// The stream's bytes break QEMU's grammar.
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },

    /// The file ends in a directory trailer but the directory is damaged.
    #[error("{}: the section directory is damaged: {source} (run `savedir index --force` to rebuild it)", path.display())]
    Directory { path: PathBuf, source: CheckError },

    /// Bytes that are not a valid directory follow the stream.
    #[error("{}: at offset {offset}: {message}", path.display())]
    TrailingData { path: PathBuf, offset: u64, message: String },

    /// No section has that name (and instance).
    #[error("{}: {message}", path.display())]
    NotFound { path: PathBuf, message: String },

    /// The file changed while savedir had it open.
    #[error("{}: the file changed while it was read: {message}", path.display())]
    Changed { path: PathBuf, message: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io { path: path.into(), op, source }
    }

    pub fn format(path: impl Into<PathBuf>, source: FormatError) -> Self {
        Error::Format { path: path.into(), source }
    }

    /// The file offset the error is about, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Format { source, .. } => Some(source.offset),
            Error::Directory { source, .. } => source.offset,
            Error::TrailingData { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        match self {
            Error::Io { path, .. }
            | Error::NotRegular { path, .. }
            | Error::Format { path, .. }
            | Error::Directory { path, .. }
            | Error::TrailingData { path, .. }
            | Error::NotFound { path, .. }
            | Error::Changed { path, .. } => path,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
