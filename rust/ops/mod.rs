//! I/O policy over the grammar: mapping files, locking, appending and
//! truncating, flushing to disk, checksums and progress.

pub mod batch;
pub mod checksum;
pub mod dump;
pub mod error;
pub mod index;
pub mod locate;
pub mod open;
pub mod pagecache;
pub mod pool;
pub mod progress;
pub mod ram;
pub mod record;
pub mod scan;
pub mod sigbus;
pub mod source;
pub mod state;
pub mod strip;
pub mod testhook;
pub mod verify;

pub use error::{Error, Result};
pub use index::{index, IndexOptions, IndexReport};
pub use open::{open, Entry, OpenOptions, SaveFile};
pub use progress::Progress;
pub use record::{record_from, record_stdin, RecordOptions, RecordReport, Recorder};
pub use source::Map;
pub use strip::{strip, StripOptions, StripReport};
pub use verify::{verify, VerifyReport};
