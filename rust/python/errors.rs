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
        Error::Changed { .. } => "FileChangedError",
        Error::Locked { .. } => "FileLockedError",
        Error::Read { .. } => "OSError",
    }
}

pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    if let Error::Io { path, source, .. } = &e {
        // OSError(errno, strerror, filename) picks the right subclass
        // (FileNotFoundError, PermissionError, ...).
        let msg = e.to_string();
        // Errors savedir makes itself carry a kind, not an errno.
        let errno = source.raw_os_error().or(match source.kind() {
            std::io::ErrorKind::PermissionDenied => Some(13), // EACCES
            std::io::ErrorKind::NotFound => Some(2),          // ENOENT
            std::io::ErrorKind::AlreadyExists => Some(17),    // EEXIST
            _ => None,
        });
        return match errno {
            Some(errno) => PyOSError::new_err((errno, msg, path.to_string_lossy().into_owned())),
            None => PyOSError::new_err(msg),
        };
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
