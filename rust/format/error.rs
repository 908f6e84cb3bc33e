//! Errors of the grammar layer: where in the file, what was expected, what was found.

use std::fmt;

/// What went wrong, in broad classes that callers can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatErrorKind {
    /// The data is not a QEMU migration stream at all (bad magic).
    NotAStream,
    /// The stream ends (or the file ends) before an item is complete.
    Truncated,
    /// A byte or field has a value the grammar does not allow.
    Invalid,
    /// A valid stream that uses something savedir cannot delimit.
    Unsupported,
}

/// A grammar error at an absolute file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError {
    pub kind: FormatErrorKind,
    /// Absolute file offset where the problem was found.
    pub offset: u64,
    /// A sentence that says what was expected and what was found.
    pub message: String,
}

impl FormatError {
    pub fn new(kind: FormatErrorKind, offset: u64, message: impl Into<String>) -> Self {
        FormatError { kind, offset, message: message.into() }
    }

    pub fn invalid(offset: u64, message: impl Into<String>) -> Self {
        Self::new(FormatErrorKind::Invalid, offset, message)
    }

    pub fn truncated(offset: u64, message: impl Into<String>) -> Self {
        Self::new(FormatErrorKind::Truncated, offset, message)
    }

    pub fn unsupported(offset: u64, message: impl Into<String>) -> Self {
        Self::new(FormatErrorKind::Unsupported, offset, message)
    }

    /// Prefixes the message with context (e.g. the section being parsed).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for FormatError {}

pub type Result<T> = std::result::Result<T, FormatError>;
