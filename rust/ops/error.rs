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

    /// Another process (or another open file) holds the file's lock.
    #[error("{}: the file is busy: {message}", path.display())]
    Locked { path: PathBuf, message: String },

    /// A byte source could not deliver the bytes asked for.
    #[error("{}: cannot read {len} bytes at offset {offset}: {source}", path.display())]
    Read { path: PathBuf, offset: u64, len: u64, source: io::Error },

    /// Guest memory that the save does not have: an unknown RAM block, an
    /// address no RAM backs, a page past a block's end.
    #[error("{}: {message}", path.display())]
    Ram { path: PathBuf, message: String },

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

    /// An error of a parse over a byte source.
    pub fn source(path: impl Into<PathBuf>, e: crate::format::source::SourceError) -> Self {
        use crate::format::source::SourceError;
        match e {
            SourceError::Format(source) => Error::Format { path: path.into(), source },
            SourceError::Io { offset, len, error } => Error::Read { path: path.into(), offset, len, source: error },
        }
    }

    /// The file offset the error is about, if any.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Error::Format { source, .. } => Some(source.offset),
            Error::Directory { source, .. } => source.offset,
            Error::TrailingData { offset, .. } | Error::Read { offset, .. } => Some(*offset),
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
            | Error::Ram { path, .. }
            | Error::Locked { path, .. }
            | Error::Read { path, .. }
            | Error::Changed { path, .. } => path,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
