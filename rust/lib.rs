//! savedir: section directories for QEMU migration streams.
//!
//! The crate is layered, and the arrows point one way:
//!
//! * [`format`] is the pure grammar: QEMU's stream (header, configuration,
//!   sections, commands, RAM records, vmdesc) and savedir's directory codec.
//!   Bytes in, facts out; no I/O, no Python.
//! * [`ops`] is the I/O policy: opening and mapping files, locking, appending
//!   and truncating, fsync, progress.
//! * `python` (feature `python`) converts between [`ops`] and Python objects.

pub mod format;
pub mod ops;
#[cfg(feature = "python")]
mod python;

pub use format::error::{FormatError, FormatErrorKind};
pub use ops::error::Error;
