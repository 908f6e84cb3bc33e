//! The one conversion from [`crate::ops::Error`] to Python exceptions.
//!
//! The exception classes live in `savedir.errors` (Python), so that they can
//! inherit from both `SavedirError` and a built-in such as `ValueError`.

use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyModule;

use crate::format::error::FormatErrorKind;
use crate::ops::Error;

fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "OSError",
        Error::NotRegular { .. } => "NotAStreamError",
        Error::Format { source, .. } => match source.kind {
            FormatErrorKind::NotAStream => "NotAStreamError",
            FormatErrorKind::Truncated => "TruncatedError",
            FormatErrorKind::Invalid => "FormatError",
            FormatErrorKind::Unsupported => "UnsupportedStreamError",
        },
        Error::Directory { .. } => "DirectoryError",
        Error::TrailingData { .. } => "TrailingDataError",
        Error::NotFound { .. } => "SectionNotFoundError",
        Error::Ram { .. } => "RamError",
        Error::Changed { .. } => "FileChangedError",
        Error::Locked { .. } => "FileLockedError",
        Error::Read { .. } => unreachable!("an OSError, made in to_pyerr"),
    }
}

/// What went wrong, once: `cannot open: No such file or directory`, without
/// the path (Python shows `filename` itself) or Rust's `(os error 2)`.
fn strerror(op: &str, source: &std::io::Error) -> String {
    let reason = source.to_string();
    let reason = match source.raw_os_error() {
        Some(code) => reason.strip_suffix(&format!(" (os error {code})")).unwrap_or(&reason).to_owned(),
        None => reason,
    };
    format!("cannot {op}: {reason}")
}

pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    if let Error::Io { path, op, source } = &e {
        // OSError(errno, strerror, filename) picks the right subclass
        // (FileNotFoundError, PermissionError, ...) and prints as
        // `[Errno 2] cannot open: No such file or directory: 'vm.sav'`.
        let filename = path.to_string_lossy().into_owned();
        // Errors savedir makes itself carry a kind, not an errno.
        let errno = source.raw_os_error().or(match source.kind() {
            std::io::ErrorKind::PermissionDenied => Some(13), // EACCES
            std::io::ErrorKind::NotFound => Some(2),          // ENOENT
            std::io::ErrorKind::AlreadyExists => Some(17),    // EEXIST
            _ => None,
        });
        return match errno {
            Some(errno) => PyOSError::new_err((errno, strerror(op, source), filename)),
            None => {
                // No errno: the whole message, with the path, and .filename set.
                let err = PyOSError::new_err(e.to_string());
                let _ = err.value(py).setattr("filename", filename);
                err
            }
        };
    }
    if let Error::Read { path, source, offset, .. } = &e {
        // A byte source failed (a file object's read raised, an I/O error):
        // an OSError with the whole message, the path and the offset.
        let errno = source.raw_os_error().unwrap_or(libc::EIO);
        let what = format!("cannot read {} bytes at offset {offset}: {source}", e_len(&e));
        let err = PyOSError::new_err((errno, what, path.to_string_lossy().into_owned()));
        let _ = err.value(py).setattr("offset", *offset);
        return err;
    }
    let build = || -> PyResult<PyErr> {
        let module = PyModule::import(py, "savedir.errors")?;
        let cls = module.getattr(class_name(&e))?;
        let exc = cls.call1((e.to_string(),))?;
        exc.setattr("path", e.path().to_string_lossy().into_owned())?;
        exc.setattr("offset", e.offset())?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|err| PyRuntimeError::new_err(format!("{e} (and savedir.errors failed: {err})")))
}

fn e_len(e: &Error) -> u64 {
    match e {
        Error::Read { len, .. } => *len,
        _ => 0,
    }
}
