//! Leaving the page cache as a scan found it.
//!
//! A sequential scan (`index`, `verify --deep`, a parse of a file without a
//! directory) reads every page of a file once. Left alone, the kernel keeps
//! those pages cached, and a scan of files larger than memory pushes
//! everything else out of the cache; read through a memory map, they also
//! count in the process's resident set. So the scan notes which pages the
//! page cache held *before* it read them, and hands back behind it the ones
//! it brought in itself:
//!
//! * Before a range is read, `mincore` on a mapping of the file that is
//!   never read through says which of its pages are cached. This is done
//!   [`LOOKAHEAD`] bytes ahead of the reads, so that the kernel's read-ahead,
//!   started by the scan's own reads, has not brought them in yet; the head
//!   and the tail of the file, which savedir reads before the scan (to find
//!   the stream and a directory), are noted when the file is opened.
//! * Behind the scan, the pages of savedir's own mapping are unmapped
//!   (`madvise(MADV_DONTNEED)`: the resident set shrinks, and the page cache
//!   does not drop a page that a process maps), then the pages that were
//!   not cached before are dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`).
//!   Pages cached before stay cached, dirty pages are never dropped (the
//!   kernel writes them first), and pages that another process maps stay.
//! * When the scan ends, the same is done once more over every range noted,
//!   for the pages that a second reading of the stream touched again.
//!
//! Everything here is advice: a call that fails changes nothing but the
//! cache. Where the kernel does not say what is cached (`mincore` on a file
//! the process may not write reports every page cached), nothing is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;

use memmap2::Mmap;

use super::source::Map;

/// Bytes of the file noted at a time.
const CHUNK: u64 = 8 << 20;
/// How far ahead of the reads the cache is noted: more than the kernel's
/// read-ahead reads at once.
pub const LOOKAHEAD: u64 = 64 << 20;
/// Pages are handed back this many bytes at a time: each `madvise` of a
/// mapping interrupts the process's other threads (their CPUs' TLBs are
/// flushed), so not after every window.
const RELEASE_STEP: u64 = 32 << 20;
/// The file's head and tail, which savedir reads before a scan, noted when
/// the file is opened.
const HEAD: u64 = 2 << 20;
const TAIL: u64 = 8 << 20;

/// Which pages of one chunk the page cache held before the scan.
enum Chunk {
    Cached,
    Absent,
    /// One bit per page, set when the page was cached.
    Mixed(Box<[u8]>),
}

impl Chunk {
    fn cached(&self, page: usize) -> bool {
        match self {
            Chunk::Cached => true,
            Chunk::Absent => false,
            Chunk::Mixed(bits) => bits[page / 8] & (1 << (page % 8)) != 0,
        }
    }
}

/// What the page cache held of one file before a scan read it.
pub struct PageCache {
    file: File,
    /// A mapping that is never read through, for `mincore`; None when the
    /// cache cannot be told (then nothing is dropped).
    probe: Option<Mmap>,
    len: u64,
    page: u64,
    chunks: BTreeMap<u64, Chunk>,
    /// Pages before this offset were handed back.
    released: u64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

impl PageCache {
    /// Notes the head and the tail of `file` (`len` bytes). Call before
    /// anything reads the file.
    pub fn new(file: &File, len: u64) -> Option<Self> {
        let file = file.try_clone().ok()?;
        // SAFETY: a read-only mapping that nothing reads through; mincore
        // only asks the kernel about it.
        let probe = if len > 0 { unsafe { Mmap::map(&file) }.ok() } else { None };
        let mut c = PageCache { file, probe, len, page: page_size(), chunks: BTreeMap::new(), released: 0 };
        c.note_range(0, HEAD.min(len));
        c.note_range(len.saturating_sub(TAIL), len);
        Some(c)
    }

    /// Notes what is cached of `start..end` and of the [`LOOKAHEAD`] bytes
    /// after it, where not noted already. Call before reading `start..end`.
    pub fn ahead(&mut self, start: u64, end: u64) {
        self.note_range(start, end.saturating_add(LOOKAHEAD));
    }

    fn note_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        if start >= end {
            return;
        }
        for i in start / CHUNK..=(end - 1) / CHUNK {
            if !self.chunks.contains_key(&i) {
                let c = self.probe_chunk(i);
                self.chunks.insert(i, c);
            }
        }
    }

    fn probe_chunk(&self, i: u64) -> Chunk {
        let Some(probe) = &self.probe else {
            return Chunk::Cached;
        };
        let start = i * CHUNK;
        let len = CHUNK.min(self.len - start) as usize;
        let pages = len.div_ceil(self.page as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside the probe mapping (page-aligned at
        // its start, since CHUNK is a multiple of the page size), and `vec`
        // has one byte per page of it.
        let rc =
            unsafe { libc::mincore(probe.as_ptr().add(start as usize) as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Chunk::Cached;
        }
        let cached = vec.iter().filter(|&&b| b & 1 != 0).count();
        if cached == pages {
            return Chunk::Cached;
        }
        if cached == 0 {
            return Chunk::Absent;
        }
        let mut bits = vec![0u8; pages.div_ceil(8)].into_boxed_slice();
        for (p, &b) in vec.iter().enumerate() {
            if b & 1 != 0 {
                bits[p / 8] |= 1 << (p % 8);
            }
        }
        Chunk::Mixed(bits)
    }

    /// Hands back the pages before `upto` that the scan is done with (see
    /// the module): unmaps them from `map`, then drops those that were not
    /// cached before.
    pub fn release(&mut self, upto: u64, map: Option<&Map>) {
        let upto = (upto.min(self.len) / self.page) * self.page;
        if upto < self.released + RELEASE_STEP {
            return;
        }
        let from = self.released;
        self.drop_range(from, upto, map);
        self.released = upto;
    }

    /// Hands back every noted page the scan brought in (the end of a scan).
    pub fn finish(&mut self, map: Option<&Map>) {
        self.drop_range(0, self.len, map);
        self.released = self.len;
    }

    fn drop_range(&self, start: u64, end: u64, map: Option<&Map>) {
        if start >= end {
            return;
        }
        if let Some(m) = map {
            m.unmap_pages(start, end);
        }
        let page = self.page;
        let fd = self.file.as_raw_fd();
        let flush = |a: u64, b: u64| {
            // SAFETY: advice on our own open file; errors change nothing.
            unsafe {
                libc::posix_fadvise(fd, a as libc::off_t, (b - a) as libc::off_t, libc::POSIX_FADV_DONTNEED);
            }
        };
        // Pages of chunks never noted are unknown, and stay.
        for (&i, chunk) in self.chunks.range(start / CHUNK..=(end - 1) / CHUNK) {
            let c0 = i * CHUNK;
            let (a, b) = (start.max(c0), end.min(c0 + CHUNK));
            match chunk {
                Chunk::Cached => {}
                Chunk::Absent => flush(a, b),
                Chunk::Mixed(_) => {
                    // Runs of pages that were not cached before.
                    let mut run: Option<u64> = None;
                    let mut at = a;
                    while at < b {
                        let cached = chunk.cached(((at - c0) / page) as usize);
                        match (cached, run) {
                            (false, None) => run = Some(at),
                            (true, Some(r)) => {
                                flush(r, at);
                                run = None;
                            }
                            _ => {}
                        }
                        at = (at / page + 1) * page;
                    }
                    if let Some(r) = run {
                        flush(r, b);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cached_pages(f: &File, len: u64) -> Vec<bool> {
        let m = unsafe { Mmap::map(f) }.unwrap();
        let pages = (len as usize).div_ceil(page_size() as usize);
        let mut v = vec![0u8; pages];
        assert_eq!(unsafe { libc::mincore(m.as_ptr() as *mut libc::c_void, len as usize, v.as_mut_ptr()) }, 0);
        v.iter().map(|b| b & 1 != 0).collect()
    }

    #[test]
    fn pages_cached_before_stay_and_pages_read_go() {
        // A file on a disk (a tmpfs keeps every page it holds).
        let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("savedir-pagecache-{}", std::process::id()));
        let len: u64 = 3 * CHUNK + 12345;
        {
            let mut f = File::create(&p).unwrap();
            let block = vec![0x5au8; 1 << 20];
            let mut left = len;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                f.write_all(&block[..n]).unwrap();
                left -= n as u64;
            }
            f.sync_all().unwrap();
        }
        let f = File::open(&p).unwrap();
        // Nothing cached, then every other MiB of the second chunk read in.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut buf = vec![0u8; 1 << 20];
        for k in (0..8).step_by(2) {
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, CHUNK + k * (1 << 20)).unwrap();
        }
        let before = cached_pages(&f, len);
        assert!(before.iter().any(|&c| c) && !before.iter().all(|&c| c), "half of a chunk is cached");
        let mut cache = PageCache::new(&f, len).unwrap();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(1 << 20);
            cache.ahead(at, at + n);
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n as usize], at).unwrap();
            at += n;
            cache.release(at, None);
        }
        cache.finish(None);
        let after = cached_pages(&f, len);
        assert_eq!(after, before, "the cache is as it was before the reads");
        std::fs::remove_file(&p).unwrap();
    }
}
