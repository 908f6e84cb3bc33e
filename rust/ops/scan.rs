//! The sequential scans: `index`, `verify --deep`, and opening a file that
//! has no directory. One pass over the stream, front to back: the items are
//! found, each item's CRC-32C is computed as its bytes pass (while they are
//! still in the CPU's caches), and the pages the scan brought into the page
//! cache are handed back behind it (`pagecache.rs`). A memory map is read in
//! place, a window at a time; any other source in windows read in turn. The
//! memory a scan holds does not grow with the file: the checksum of the item
//! in progress, the parser's state, and one window of a source that is not
//! a map.

use crate::format::source::{ReadAt, SourceError};
use crate::format::stream::{self, Flow, Item, ParseOptions, Stream, StreamParser, Watch};

use super::checksum::{crc32c_extents, ItemCrcs};
use super::pagecache::PageCache;
use super::progress::Progress;
use super::source::Map;

/// What a scan found.
pub struct Scanned {
    pub stream: Stream,
    /// The CRC-32C of every item, when asked for.
    pub crcs: Option<Vec<u32>>,
}

/// Where a scan reads: the bytes, and what to hand back to the system.
pub struct Scan<'a> {
    pub src: &'a dyn ReadAt,
    /// The mapping `src` reads, whose pages are unmapped behind the scan.
    pub map: Option<&'a Map>,
    pub cache: Option<&'a mut PageCache>,
}

struct Watcher<'a, 'b> {
    crcs: Option<ItemCrcs>,
    map: Option<&'a Map>,
    cache: Option<&'b mut PageCache>,
    /// Checksums on another thread while the next window is parsed: a
    /// window's checksums are computed during the next window's parse, and
    /// its pages handed back after (see [`Watch::work`]).
    pipelined: bool,
    /// The window told but not yet checksummed (pipelined).
    pending: Option<Pending>,
    /// Where the bytes are checksummed up to, and may be handed back.
    summed: u64,
}

/// A window to checksum: the items not yet checksummed then, the item in
/// progress, and how far the bytes are final.
struct Pending {
    tail: Vec<Item>,
    in_progress: Option<u64>,
    done: u64,
}

impl Watcher<'_, '_> {
    fn sum(&mut self, job: Pending, data: &[u8]) {
        if let Some(c) = &mut self.crcs {
            c.update_tail(&job.tail, job.in_progress, data, 0, job.done);
        }
        self.summed = self.summed.max(job.done);
    }
}

impl Watch for Watcher<'_, '_> {
    fn wants_all(&self) -> bool {
        self.crcs.is_some()
    }

    fn ahead(&mut self, start: u64, end: u64) {
        if let Some(c) = self.cache.as_deref_mut() {
            c.ahead(start, end);
        }
    }

    fn work<'s>(&'s mut self, data: &'s [u8]) -> Option<Box<dyn FnOnce() + Send + 's>> {
        let job = self.pending.take()?;
        Some(Box::new(move || self.sum(job, data)))
    }

    fn window(&mut self, p: &StreamParser, data: &[u8], base: u64, done: u64) -> Flow {
        if self.pipelined && base == 0 {
            // The window before, if no parse ran since to checksum it.
            if let Some(job) = self.pending.take() {
                self.sum(job, data);
            }
        }
        match &mut self.crcs {
            Some(c) if self.pipelined && base == 0 => {
                let from = c.crcs().len().min(p.items().len());
                self.pending =
                    Some(Pending { tail: p.items()[from..].to_vec(), in_progress: p.item_in_progress(), done });
            }
            Some(c) => {
                c.update(p.items(), p.item_in_progress(), data, base, done);
                self.summed = done;
            }
            None => self.summed = done,
        }
        let summed = self.summed;
        if let Some(c) = self.cache.as_deref_mut() {
            c.release(summed, self.map);
        }
        if super::batch::stopping() {
            return Flow::Break(());
        }
        Flow::Continue(())
    }
}

impl Scan<'_> {
    /// Parses the stream (see [`stream::parse_watched`]) and, with
    /// `checksums`, computes the CRC-32C of every item in the same pass.
    pub fn run(self, opts: ParseOptions<'_>, checksums: bool) -> Result<Scanned, SourceError> {
        let Scan { src, map, mut cache } = self;
        // Checksums beside the parse, on a pool of two threads or more, when
        // the source is a slice (a mapping) that both may read at once.
        let pipelined =
            checksums && src.as_slice().is_some() && super::pool::in_pool() && rayon::current_num_threads() >= 2;
        let mut w = Watcher {
            crcs: checksums.then(ItemCrcs::default),
            map,
            cache: cache.as_deref_mut(),
            pipelined,
            pending: None,
            summed: 0,
        };
        let parsed = stream::parse_watched(src, opts, &mut w);
        // The last window's checksums.
        if let (Some(job), Some(data)) = (w.pending.take(), src.as_slice()) {
            w.sum(job, data);
        }
        let res = parsed.and_then(|stream| {
            let crcs = match w.crcs.take().map(|c| c.finish(&stream.items)) {
                None => None,
                Some(Some(crcs)) => Some(crcs),
                // A second reading of the stream found other ends: read the
                // items again (rare: a stream without footers).
                Some(None) => Some(reread_crcs(src, &stream.items, w.cache.as_deref_mut())?),
            };
            Ok(Scanned { stream, crcs })
        });
        if let Some(c) = cache {
            c.finish(map);
        }
        res
    }
}

/// The CRC-32C of each item, read again from `src`.
fn reread_crcs(src: &dyn ReadAt, items: &[Item], mut cache: Option<&mut PageCache>) -> Result<Vec<u32>, SourceError> {
    let extents: Vec<(u64, u64)> = items.iter().map(|i| (i.offset, i.end)).collect();
    if let Some(data) = src.as_slice() {
        return Ok(crc32c_extents(data, &extents, &Progress::off()));
    }
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; PIECE as usize];
    let mut out = Vec::with_capacity(extents.len());
    for &(s, e) in &extents {
        let mut crc = 0u32;
        let mut at = s;
        while at < e {
            let n = (e - at).min(PIECE) as usize;
            if let Some(c) = cache.as_deref_mut() {
                c.ahead(at, at + n as u64);
            }
            src.read_at(at, &mut buf[..n]).map_err(|error| SourceError::Io { offset: at, len: n as u64, error })?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
        out.push(crc);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ram::{FLAG_CONTINUE, FLAG_PAGE};
    use crate::format::stream::tests::{sample_stream, sample_stream_with, Pread};

    /// A sample stream whose RAM PART holds `pages` more pages: several
    /// windows long.
    fn long_stream(footers: bool, cpu: Option<&[u8]>, pages: usize) -> Vec<u8> {
        let d = match cpu {
            Some(cpu) => sample_stream_with(footers, cpu),
            None => sample_stream(footers),
        };
        let page = [0x7e; 4096];
        let at = d.windows(4096).position(|w| w == page).unwrap() + 4096;
        let mut out = d[..at].to_vec();
        for i in 0..pages {
            out.extend_from_slice(&(0x1000u64 | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
            out.extend(std::iter::repeat_n((i % 251) as u8, 4096));
        }
        out.extend_from_slice(&d[at..]);
        out
    }

    #[test]
    fn one_pass_checksums_equal_checksums_of_the_extents() {
        let cpu = [0x7e, 0, 0, 0, 6, 4, 0, 0, 0, 9, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 9];
        for (footers, cpu, pages) in
            [(true, None, 0), (true, None, 5000), (false, None, 4000), (true, Some(&cpu[..]), 3000)]
        {
            let d = long_stream(footers, cpu, pages);
            let whole = stream::parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
            let ext: Vec<(u64, u64)> = whole.items.iter().map(|i| (i.offset, i.end)).collect();
            let want = crc32c_extents(&d, &ext, &Progress::off());
            let slice =
                Scan { src: &d, map: None, cache: None }.run(ParseOptions::new(0, d.len() as u64), true).unwrap();
            let pread = Pread(d.clone());
            let read =
                Scan { src: &pread, map: None, cache: None }.run(ParseOptions::new(0, d.len() as u64), true).unwrap();
            for s in [&slice, &read] {
                assert_eq!(s.stream.items, whole.items, "{pages} pages");
                assert_eq!((s.stream.eof, s.stream.end), (whole.eof, whole.end));
                assert_eq!(s.crcs.as_deref(), Some(&want[..]), "{pages} pages");
            }
            // On a pool's threads, long items are checksummed in pieces.
            let pooled = super::super::pool::with_threads(2, || {
                Scan { src: &d, map: None, cache: None }.run(ParseOptions::new(0, d.len() as u64), true).unwrap()
            });
            assert_eq!(pooled.crcs.as_deref(), Some(&want[..]));
        }
    }
}
