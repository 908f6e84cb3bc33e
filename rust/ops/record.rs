//! `savedir record`: write a stream to a file as it arrives and append its
//! directory when it ends, in one pass, reading nothing back from disk.
//!
//! Bytes go to the file first, then to a [`StreamParser`] that keeps only the
//! bytes of the item it is in (a RAM record, a device section), and to a
//! running CRC-32C per item. Memory stays bounded by the largest device
//! section, whatever the size of the RAM.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::format::directory;
use crate::format::error::{FormatError, FormatErrorKind};
use crate::format::stream::{self, Item, StreamParser};
use crate::format::Kind;

use super::checksum::ItemCrcs;
use super::error::{Error, Result};
use super::progress::Progress as Meter;
use super::source::map_file;

/// Bytes read from the input at a time.
const READ_CHUNK: usize = 1 << 20;
/// New bytes appended to an unfinished item before parsing in place again.
const PREFIX: usize = 16 << 10;

#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// Write a CRC-32C entry after every entry.
    pub checksums: bool,
    /// Show progress on stderr.
    pub progress: bool,
    /// Keep the directory in `OUT.savedir` and leave OUT as the stream.
    pub sidecar: bool,
    /// Wait for readers of an existing OUT to close it, instead of failing.
    pub wait: bool,
    /// Store a RAM page map before the directory (see `IndexOptions::ram_map`).
    pub ram_map: bool,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions { checksums: true, progress: false, sidecar: false, wait: false, ram_map: true }
    }
}

/// What a finished recording wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordReport {
    pub path: PathBuf,
    /// Bytes of the stream written.
    pub stream_size: u64,
    pub entries: usize,
    pub directory_offset: u64,
    pub directory_len: u64,
    /// True when the device sections had to be re-read from the file because
    /// a footer inside device data fooled the one-pass parse.
    pub reread: bool,
    /// The sidecar written, if any.
    pub sidecar: Option<PathBuf>,
}

/// Writes a stream to a file while parsing it.
pub struct Recorder {
    path: PathBuf,
    file: File,
    opts: RecordOptions,
    parser: StreamParser,
    /// Bytes from absolute offset `buf_base` on that the parser still needs.
    buf: Vec<u8>,
    buf_base: u64,
    /// Bytes received (and written).
    received: u64,
    crcs: ItemCrcs,
    /// The first parse error; bytes are still written after it.
    error: Option<FormatError>,
    meter: Meter,
    /// Bytes up to which writeback to disk has been started.
    flushed: u64,
}

impl Recorder {
    /// Creates (or truncates) `path` and locks it for the recording.
    pub fn create(path: &Path, opts: RecordOptions) -> Result<Self> {
        if !path.exists() {
            super::index::check_folder_writable(path)?;
        } else if std::fs::metadata(path).map_err(|e| Error::io(path, "stat", e))?.permissions().readonly() {
            return Err(Error::io(
                path,
                "write",
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the file is read-only (no write permission bits)",
                ),
            ));
        }
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        super::source::lock_exclusive(path, &file, opts.wait)?;
        file.set_len(0).map_err(|e| Error::io(path, "truncate", e))?;
        // A sidecar left from an earlier file of this name describes nothing now.
        let sc = super::locate::sidecar_path(path);
        match std::fs::remove_file(&sc) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&sc, "remove", e)),
        }
        let meter = Meter::new(opts.progress, format!("{}: recording", path.display()), 0);
        let mut parser = StreamParser::new(0, None);
        parser.set_page_map(opts.ram_map);
        Ok(Recorder {
            path: path.to_path_buf(),
            file,
            opts,
            parser,
            buf: Vec::with_capacity(2 * READ_CHUNK),
            buf_base: 0,
            received: 0,
            crcs: ItemCrcs::default(),
            error: None,
            meter,
            flushed: 0,
        })
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Writes `data` to the file and parses it.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        super::testhook::pause("record:write");
        self.file.write_all(data).map_err(|e| Error::io(&self.path, "write", e))?;
        self.received += data.len() as u64;
        self.meter.set(self.received);
        self.write_behind();
        if self.error.is_some() || self.parser.is_done() {
            // Keep every byte; parse no further.
            if self.parser.is_done() && self.error.is_none() {
                self.error = Some(FormatError::invalid(
                    self.parser.pos(),
                    "bytes follow the stream's end (its EOF byte and vmdesc)",
                ));
            }
            return Ok(());
        }
        let base = self.received - data.len() as u64;
        if self.buf.is_empty() {
            // Parse in place; keep only what the parser is not done with.
            if let Some(keep) = self.run(data, base, false) {
                self.stash(data, base, keep);
            }
            return Ok(());
        }
        // Bytes of an unfinished item wait in the buffer. A RAM record is
        // short: a few KiB of the new data finish it, and the rest is parsed
        // in place. A larger item (a device section) takes the slow path.
        let p = data.len().min(PREFIX);
        self.buf.extend_from_slice(&data[..p]);
        let Some(keep) = self.run_buffer(false) else {
            return Ok(());
        };
        if keep >= base {
            self.buf.clear();
            let from = (keep - base) as usize;
            if let Some(keep2) = self.run(&data[from..], keep, false) {
                self.stash(data, base, keep2);
            }
        } else {
            self.buf.extend_from_slice(&data[p..]);
            self.run_buffer(false);
        }
        Ok(())
    }

    /// Starts writing each 32 MiB to disk as soon as it is complete, and
    /// waits for the one before: the stream reaches the disk at the disk's
    /// pace instead of piling up in memory until the final flush.
    fn write_behind(&mut self) {
        const STEP: u64 = 32 << 20;
        use std::os::fd::AsRawFd;
        while self.received - self.flushed >= STEP {
            let fd = self.file.as_raw_fd();
            // SAFETY: sync_file_range on our own open file; errors only
            // lose the early start, the final fdatasync still flushes.
            unsafe {
                libc::sync_file_range(fd, self.flushed as i64, STEP as i64, libc::SYNC_FILE_RANGE_WRITE);
                if self.flushed >= STEP {
                    libc::sync_file_range(
                        fd,
                        (self.flushed - STEP) as i64,
                        STEP as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
            }
            self.flushed += STEP;
        }
    }

    /// Keeps `data[keep - base..]` (bytes the parser still needs) in the buffer.
    fn stash(&mut self, data: &[u8], base: u64, keep: u64) {
        self.buf.clear();
        self.buf.extend_from_slice(&data[(keep - base) as usize..]);
        self.buf_base = keep;
    }

    /// Runs the parser over the buffer and drops what it is done with.
    fn run_buffer(&mut self, last: bool) -> Option<u64> {
        let buf = std::mem::take(&mut self.buf);
        let keep = self.run(&buf, self.buf_base, last);
        self.buf = buf;
        if let Some(keep) = keep {
            let drop = (keep - self.buf_base) as usize;
            if drop > 0 {
                self.buf.drain(..drop);
                self.buf_base = keep;
            }
        }
        keep
    }

    /// Runs the parser over `window` (file bytes from `base`) and feeds the
    /// checksums. Returns the offset from which bytes must be kept, or None
    /// after an error (kept in `self.error`).
    fn run(&mut self, window: &[u8], base: u64, last: bool) -> Option<u64> {
        if let Err(e) = self.parser.advance(window, base, last, None) {
            self.error = Some(e);
            return None;
        }
        // The parser may still go back to any byte from `keep` on.
        let keep = self.parser.keep_from();
        if self.opts.checksums {
            self.update_crcs(window, base, keep);
        }
        Some(keep)
    }

    /// Feeds the bytes up to `keep` (which lie in `window`, from `base`)
    /// into the per-item checksums.
    fn update_crcs(&mut self, window: &[u8], base: u64, keep: u64) {
        let in_progress = self.parser.item_in_progress();
        self.crcs.update(self.parser.items(), in_progress, window, base, keep);
    }

    /// Ends the input: parses what is left and appends the directory. On a
    /// cut or malformed stream, the file keeps every byte and gets no
    /// directory, and the error says where the stream stopped.
    pub fn finish(mut self) -> Result<RecordReport> {
        if self.error.is_none() && !self.parser.is_done() {
            self.run_buffer(true);
        }
        self.meter.finish();
        if let Some(e) = self.error.take() {
            self.file.sync_data().map_err(|e| Error::io(&self.path, "flush to disk", e))?;
            let e = if e.kind == FormatErrorKind::Truncated {
                FormatError::new(
                    e.kind,
                    e.offset,
                    format!(
                        "the stream stopped after {} bytes: {}; no directory was written",
                        self.received, e.message
                    ),
                )
            } else {
                FormatError::new(e.kind, e.offset, format!("{}; no directory was written", e.message))
            };
            return Err(Error::format(&self.path, e));
        }
        let parser = std::mem::replace(&mut self.parser, StreamParser::new(0, None));
        let desc = parser.vmdesc().cloned();
        let mut s = parser.finish();
        let mut crcs = std::mem::take(&mut self.crcs).crcs().to_vec();
        // Device sections were found by their footers; the vmdesc, which
        // arrived last, must agree with every size. If a footer's bytes inside
        // device data fooled the parse, read the stream back once to fix it.
        // Without footers or a vmdesc, device sections were ended at the
        // next header as the bytes passed: read the stream back once so that
        // a stream with a second reading is refused, as `index` refuses it.
        let reread = match &desc {
            Some(d) => !devices_agree(&s.items, d),
            None => s.footers == Some(false) && s.items.iter().any(|i| i.kind == Kind::Full),
        };
        if reread {
            let map = map_file(&self.path, &self.file)?;
            let data = map.bytes();
            let mut popts = stream::ParseOptions::new(0, s.end);
            popts.page_map = self.opts.ram_map;
            s = stream::parse(data, popts).map_err(|e| Error::format(&self.path, e))?;
            let ext: Vec<(u64, u64)> = s.items.iter().map(|i| (i.offset, i.end)).collect();
            crcs = super::pool::run(data.len() as u64, || super::checksum::crc32c_extents(data, &ext, &Meter::off()));
        }
        let crcs = self.opts.checksums.then_some(&crcs[..]);
        let mut tail =
            s.ram.as_ref().and_then(|r| r.page_map()).and_then(|m| m.ok()).map(|m| m.encode()).unwrap_or_default();
        let map_len = tail.len() as u64;
        let dir_at = s.end + map_len;
        let dir = directory::encode(&s.items, s.eof, dir_at, crcs, (map_len > 0).then_some(s.end));
        let dir_len = dir.len() as u64;
        tail.extend_from_slice(&dir);
        let dir = tail;
        let sidecar = if self.opts.sidecar {
            self.file.sync_data().map_err(|e| Error::io(&self.path, "flush to disk", e))?;
            Some(super::index::write_sidecar(&self.path, &dir)?)
        } else {
            self.file.write_all(&dir).map_err(|e| Error::io(&self.path, "write the directory", e))?;
            self.file.sync_data().map_err(|e| Error::io(&self.path, "flush to disk", e))?;
            None
        };
        Ok(RecordReport {
            path: self.path.clone(),
            stream_size: s.end,
            entries: s.items.len(),
            directory_offset: dir_at,
            directory_len: dir_len,
            reread,
            sidecar,
        })
    }
}

/// True when every FULL section's payload has the size the vmdesc gives.
fn devices_agree(items: &[Item], desc: &crate::format::vmdesc::Vmdesc) -> bool {
    let fulls: Vec<&Item> = items.iter().filter(|i| i.kind == Kind::Full).collect();
    if fulls.len() != desc.devices.len() {
        return false;
    }
    fulls.iter().zip(&desc.devices).all(|(i, d)| {
        i.name.as_deref() == Some(d.name.as_str())
            && i.instance_id == d.instance_id
            && d.payload_size.is_none_or(|s| s == i.payload_end() - i.payload_start())
    })
}

/// Records everything `input` yields into `path`.
pub fn record_from(input: &mut dyn Read, path: &Path, opts: RecordOptions) -> Result<RecordReport> {
    let mut rec = Recorder::create(path, opts)?;
    // A page-aligned buffer: the kernel copies out of it faster.
    let mut storage = vec![0u8; READ_CHUNK + 4096];
    let skew = storage.as_ptr().align_offset(4096).min(4096);
    let buf = &mut storage[skew..skew + READ_CHUNK];
    loop {
        let n = match input.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, "read the input stream", e)),
        };
        rec.write(&buf[..n])?;
    }
    rec.finish()
}

/// Records this process's standard input into `path` (`savedir record`).
pub fn record_stdin(path: &Path, opts: RecordOptions) -> Result<RecordReport> {
    // A larger pipe means fewer, larger reads and fewer wake-ups of the writer.
    // SAFETY: fcntl on fd 0 with an integer argument; failure is harmless.
    unsafe {
        libc::fcntl(0, libc::F_SETPIPE_SZ, READ_CHUNK as libc::c_int);
    }
    let mut stdin = std::io::stdin().lock();
    record_from(&mut stdin, path, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::stream::tests::sample_stream;
    use crate::ops::{index, IndexOptions};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("savedir-record-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("out.sav")
    }

    #[test]
    fn recording_equals_indexing() {
        let d = sample_stream(true);
        let want = tmp("index");
        std::fs::write(&want, &d).unwrap();
        index(&want, &IndexOptions::default()).unwrap();
        let want = std::fs::read(&want).unwrap();
        for chunk in [1usize, 3, 100, 5000, 1 << 20] {
            let out = tmp(&format!("rec{chunk}"));
            let mut rec = Recorder::create(&out, RecordOptions::default()).unwrap();
            for c in d.chunks(chunk) {
                rec.write(c).unwrap();
            }
            let r = rec.finish().unwrap();
            assert!(!r.reread);
            assert_eq!(std::fs::read(&out).unwrap(), want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_cut_stream_keeps_its_bytes_and_gets_no_directory() {
        let d = sample_stream(true);
        for cut in [0usize, 5, 30, 200, 3000, d.len() - 10, d.len() - 1] {
            let out = tmp(&format!("cut{cut}"));
            let mut input = &d[..cut];
            let e = record_from(&mut input, &out, RecordOptions::default()).unwrap_err();
            assert!(matches!(e, Error::Format { .. }), "{e}");
            assert!(e.to_string().contains("no directory was written"), "{e}");
            assert_eq!(std::fs::read(&out).unwrap(), &d[..cut]);
        }
    }

    fn record_and_index(d: &[u8], name: &str) -> (RecordReport, Vec<u8>, Vec<u8>) {
        let out = tmp(name);
        let mut input = d;
        let r = record_from(&mut input, &out, RecordOptions::default()).unwrap();
        let want = tmp(&format!("{name}-index"));
        std::fs::write(&want, d).unwrap();
        index(&want, &IndexOptions::default()).unwrap();
        (r, std::fs::read(&out).unwrap(), std::fs::read(&want).unwrap())
    }

    #[test]
    fn a_footer_inside_device_data_is_undone_by_going_back() {
        // Device data holding its own section's footer, followed by bytes
        // that look like a FULL section header: the first choice fails
        // further on and the parser goes back to the next footer.
        let cpu = [0x7e, 0, 0, 0, 6, 4, 0, 0, 0, 9, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 9];
        let d = crate::format::stream::tests::sample_stream_with(true, &cpu);
        let (r, got, want) = record_and_index(&d, "back");
        assert!(!r.reread);
        assert_eq!(got, want);
    }

    #[test]
    fn a_vmdesc_that_disagrees_makes_the_recorder_read_back() {
        let mut d = sample_stream(true);
        // Claim 5 bytes for the 4-byte timer device.
        let at = d.windows(8).rposition(|w| w == br#""size":4"#).unwrap();
        d[at + 7] = b'5';
        let (r, got, want) = record_and_index(&d, "reread");
        assert!(r.reread);
        assert_eq!(got, want);
    }
}
