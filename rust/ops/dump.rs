//! Writing guest memory out: an ELF64 core of guest-physical memory (as
//! QEMU's `dump-guest-memory` writes with paging off), and raw block files.
//! Zero pages are not written where 2 MiB or more of them follow one
//! another: the files are sparse there. A whole file is written with
//! positioned writes of many slices at once, taken from the save's mapping
//! where they lie.

use std::fs::File;
use std::path::Path;

use crate::format::source::ReadAt;

use super::error::{Error, Result};
use super::progress::Progress;
use super::ram::{GuestRam, PageWord, PhysRange};

/// Bytes gathered before one write.
const WRITE_BUF: usize = 4 << 20;

const EHDR_LEN: u64 = 64;
const PHDR_LEN: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_CORE: u16 = 4;
/// `e_machine` of a core whose first vCPU is in long mode (else `EM_386`).
pub const EM_X86_64: u16 = 62;
pub const EM_386: u16 = 3;

/// The notes of an ELF core of `f`'s vCPUs and the core's machine, as QEMU's
/// `dump-guest-memory` writes them: each vCPU's `NT_PRSTATUS`, then each
/// one's "QEMU" note; `EM_X86_64` when the first vCPU is in long mode, else
/// `EM_386`. No notes (and `EM_X86_64`) for a save whose vCPUs cannot be
/// read (no vmdesc, no `cpu` section).
pub fn core_notes(f: &super::SaveFile) -> (Vec<u8>, u16) {
    let cpus = super::state::load_desc(f).and_then(|d| super::state::cpus(f, &d));
    match cpus {
        Ok(c) if !c.is_empty() => {
            let machine = if c[0].long_mode() { EM_X86_64 } else { EM_386 };
            (crate::format::vmstate::x86::elf_notes(&c), machine)
        }
        _ => (Vec::new(), EM_X86_64),
    }
}

/// Writes `size` bytes of block `b` from `offset` into `out` at `at`,
/// leaving holes where pages are zero.
struct Sink<'a, 'd> {
    out: &'a File,
    path: &'a Path,
    /// What the next write takes, in order: slices of the source's mapping
    /// (written from where they lie: no copy in between) and bytes of `own`.
    pieces: Vec<Piece<'d>>,
    /// Bytes that were decoded, or built (an ELF header).
    own: Vec<u8>,
    /// Bytes in `pieces`.
    pending: usize,
    /// File offset of the first byte of `pieces`.
    buf_at: u64,
}

#[derive(Clone, Copy)]
enum Piece<'d> {
    Map(&'d [u8]),
    /// `own[start..end]`.
    Own(usize, usize),
}

/// Slices one `pwritev` takes at most (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;
/// Zero bytes shorter than this, between data, are written; longer ones
/// are left as holes (the largest folio of the page cache).
const HOLE_MIN: u64 = 2 << 20;
/// The largest folio of the page cache: writes end at its multiples.
const FOLIO: u64 = 2 << 20;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl<'a, 'd> Sink<'a, 'd> {
    fn new(out: &'a File, path: &'a Path, head: Vec<u8>) -> Self {
        let n = head.len();
        let pieces = if n > 0 { vec![Piece::Own(0, n)] } else { Vec::new() };
        Sink { out, path, pieces, own: head, pending: n, buf_at: 0 }
    }

    fn push_map(&mut self, bytes: &'d [u8]) {
        // A slice that continues the last one (mapped-ram pages, which lie
        // one after another) joins it.
        if let Some(Piece::Map(last)) = self.pieces.last_mut() {
            if last.as_ptr_range().end == bytes.as_ptr() {
                // SAFETY: both slices lie in the same mapping, the second
                // right after the first: together they are one slice of it.
                *last = unsafe { std::slice::from_raw_parts(last.as_ptr(), last.len() + bytes.len()) };
                self.pending += bytes.len();
                return;
            }
        }
        self.pieces.push(Piece::Map(bytes));
        self.pending += bytes.len();
    }

    fn push_own(&mut self, bytes: &[u8]) {
        let start = self.own.len();
        self.own.extend_from_slice(bytes);
        self.pieces.push(Piece::Own(start, self.own.len()));
        self.pending += bytes.len();
    }

    fn full(&self) -> bool {
        self.pending >= WRITE_BUF || self.pieces.len() >= 4 * IOV_MAX
    }

    fn flush(&mut self) -> Result<()> {
        self.write_front(self.pending)
    }

    /// Writes what is pending up to the last multiple of [`FOLIO`] in the
    /// file (all of it when that is nothing): a write that ends inside one
    /// of the page cache's large folios has the kernel zero the folio's
    /// rest, which the next write then fills again.
    fn flush_aligned(&mut self) -> Result<()> {
        let end = self.buf_at + self.pending as u64;
        let cut = end / FOLIO * FOLIO;
        if cut > self.buf_at {
            self.write_front((cut - self.buf_at) as usize)
        } else {
            self.flush()
        }
    }

    /// Writes the first `n` bytes of what is pending; the rest stays.
    fn write_front(&mut self, n: usize) -> Result<()> {
        let mut slices: Vec<&[u8]> = Vec::with_capacity(self.pieces.len());
        let mut rest: Vec<Piece<'d>> = Vec::new();
        let mut rest_own: Vec<u8> = Vec::new();
        let mut need = n;
        for p in &self.pieces {
            let bytes: &[u8] = match *p {
                Piece::Map(m) => m,
                Piece::Own(s, e) => &self.own[s..e],
            };
            if need >= bytes.len() {
                slices.push(bytes);
                need -= bytes.len();
                continue;
            }
            let (front, back) = bytes.split_at(need);
            if !front.is_empty() {
                slices.push(front);
            }
            need = 0;
            rest.push(match *p {
                Piece::Map(m) => Piece::Map(&m[front.len()..]),
                Piece::Own(..) => {
                    let start = rest_own.len();
                    rest_own.extend_from_slice(back);
                    Piece::Own(start, rest_own.len())
                }
            });
        }
        prefault(&slices);
        let mut at = self.buf_at;
        let mut first = 0;
        while first < slices.len() {
            let batch = &slices[first..slices.len().min(first + IOV_MAX)];
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() })
                .collect();
            // SAFETY: every iovec points into a live slice (the mapping, or
            // `own`), which pwritev only reads.
            let rc = unsafe {
                libc::pwritev(
                    std::os::fd::AsRawFd::as_raw_fd(self.out),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    at as libc::off_t,
                )
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(self.path, "write", e));
            }
            if rc == 0 {
                return Err(Error::io(self.path, "write", std::io::ErrorKind::WriteZero.into()));
            }
            // Skip what was written; a slice written in part goes on.
            let mut left = rc as usize;
            at += left as u64;
            while left > 0 {
                let n = slices[first].len();
                if left >= n {
                    left -= n;
                    first += 1;
                } else {
                    slices[first] = &slices[first][left..];
                    left = 0;
                }
            }
            while first < slices.len() && slices[first].is_empty() {
                first += 1;
            }
        }
        self.buf_at = at;
        self.pending -= n;
        self.pieces = rest;
        self.own = rest_own;
        Ok(())
    }

    /// Moves to file offset `at`, forward: a hole between when the gap is
    /// long, else zeros written. (A short hole saves nothing: it lies inside
    /// one of the page cache's large folios, whose rest the kernel zeroes
    /// itself, and splits the file into more extents; writing the zeros
    /// made `--extract` of a 3 GiB q35 guest 20-30 % faster.)
    fn seek(&mut self, at: u64) -> Result<()> {
        let end = self.buf_at + self.pending as u64;
        if at > end && at - end < HOLE_MIN && self.pending > 0 {
            let mut gap = (at - end) as usize;
            while gap > 0 {
                let n = gap.min(ZEROS.len());
                self.pieces.push(Piece::Map(&ZEROS[..n]));
                self.pending += n;
                gap -= n;
            }
        } else if at != end {
            self.flush()?;
            self.buf_at = at;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        ram: &GuestRam,
        src: &'d dyn ReadAt,
        b: usize,
        offset: u64,
        size: u64,
        at: u64,
        meter: &Progress,
    ) -> Result<()> {
        let ps = ram.page_size();
        let data = src.as_slice();
        let mut done = 0u64;
        let mut unreported = 0u64;
        while done < size {
            let off = offset + done;
            let page = off / ps;
            let within = off % ps;
            let n = (ps - within).min(size - done);
            match ram.page_word(b, page) {
                PageWord::Zero => {} // a hole, or zeros when data follows soon (see seek)
                PageWord::Stored(p) if data.is_some_and(|d| d.len() as u64 >= p + ps) => {
                    self.seek(at + done)?;
                    let all = data.expect("checked");
                    self.push_map(&all[(p + within) as usize..(p + within + n) as usize]);
                }
                _ => {
                    self.seek(at + done)?;
                    let mut whole = vec![0u8; ps as usize];
                    ram.page_into(src, b, page, &mut whole)?;
                    self.push_own(&whole[within as usize..(within + n) as usize]);
                }
            }
            if self.full() {
                self.flush_aligned()?;
            }
            done += n;
            unreported += n;
            if unreported >= 64 << 20 {
                meter.add(unreported);
                unreported = 0;
            }
        }
        meter.add(unreported);
        Ok(())
    }
}

/// Maps the source pages of `slices` into the process before they are
/// written: the kernel copies from them without taking page faults, and a
/// fault during that copy costs more than the fault (the write is cut short,
/// and the page cache's folio zeroed and filled again). One `madvise` over
/// the span they lie in, when it is not far larger than they are.
fn prefault(slices: &[&[u8]]) {
    let zeros = ZEROS.as_ptr_range();
    let mut lo = usize::MAX;
    let mut hi = 0usize;
    let mut total = 0usize;
    for s in slices.iter().filter(|s| !zeros.contains(&s.as_ptr())) {
        let r = s.as_ptr_range();
        lo = lo.min(r.start as usize);
        hi = hi.max(r.end as usize);
        total += s.len();
    }
    if hi <= lo || hi - lo > (4 * total).max(16 << 20) {
        return;
    }
    const PAGE: usize = 4096;
    let start = lo / PAGE * PAGE;
    // MADV_POPULATE_READ (Linux 5.14); an older kernel refuses it, and the
    // pages are faulted in as the copy reaches them.
    const MADV_POPULATE_READ: libc::c_int = 22;
    // SAFETY: the range lies within the mapping the slices were taken from
    // (rounded down to its page); the advice only maps its pages.
    unsafe {
        libc::madvise(start as *mut libc::c_void, hi - start, MADV_POPULATE_READ);
    }
}

fn create(path: &Path) -> Result<File> {
    File::create(path).map_err(|e| Error::io(path, "create", e))
}

/// Writes an ELF64 core of guest-physical memory to `path`: one `PT_LOAD`
/// per range (`p_paddr` the guest-physical address, `p_vaddr` 0, as QEMU's
/// `dump-guest-memory` with paging off), after one `PT_NOTE` holding `notes`
/// when there are any.
pub fn write_elf(
    ram: &GuestRam,
    src: &dyn ReadAt,
    ranges: &[PhysRange],
    notes: &[u8],
    machine: u16,
    path: &Path,
    progress: bool,
) -> Result<u64> {
    let out = create(path)?;
    let nphdr = ranges.len() as u64 + u64::from(!notes.is_empty());
    let mut head = Vec::with_capacity((EHDR_LEN + nphdr * PHDR_LEN) as usize);
    head.extend_from_slice(b"\x7fELF");
    head.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    head.extend_from_slice(&[0; 8]);
    head.extend_from_slice(&ET_CORE.to_le_bytes());
    head.extend_from_slice(&machine.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes()); // e_version
    head.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    head.extend_from_slice(&EHDR_LEN.to_le_bytes()); // e_phoff
    head.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    head.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    head.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    head.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    let phnum = u16::try_from(nphdr).map_err(|_| Error::Ram {
        path: path.to_path_buf(),
        message: format!("{nphdr} program headers are more than an ELF header can count"),
    })?;
    head.extend_from_slice(&phnum.to_le_bytes());
    head.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    let mut at = EHDR_LEN + nphdr * PHDR_LEN;
    let phdr = |head: &mut Vec<u8>, kind: u32, flags: u32, off: u64, paddr: u64, size: u64| {
        head.extend_from_slice(&kind.to_le_bytes());
        head.extend_from_slice(&flags.to_le_bytes());
        head.extend_from_slice(&off.to_le_bytes());
        head.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr
        head.extend_from_slice(&paddr.to_le_bytes());
        head.extend_from_slice(&size.to_le_bytes()); // p_filesz
        head.extend_from_slice(&size.to_le_bytes()); // p_memsz
        head.extend_from_slice(&0u64.to_le_bytes()); // p_align
    };
    if !notes.is_empty() {
        phdr(&mut head, PT_NOTE, 0, at, 0, notes.len() as u64);
        at += notes.len() as u64;
    }
    let mut placed = Vec::with_capacity(ranges.len());
    for r in ranges {
        phdr(&mut head, PT_LOAD, 0, at, r.gpa, r.size);
        placed.push(at);
        at += r.size;
    }
    head.extend_from_slice(notes);
    let total: u64 = ranges.iter().map(|r| r.size).sum();
    let meter = Progress::new(progress, format!("{}: writing", path.display()), total);
    let mut sink = Sink::new(&out, path, head);
    for (r, &off) in ranges.iter().zip(&placed) {
        sink.block(ram, src, r.block, r.offset, r.size, off, &meter)?;
    }
    sink.flush()?;
    out.set_len(at).map_err(|e| Error::io(path, "set the length of", e))?;
    meter.finish();
    Ok(at)
}

/// Writes block `b` whole to `path` (sparse where its pages are zero).
pub fn write_block(ram: &GuestRam, src: &dyn ReadAt, b: usize, path: &Path, meter: &Progress) -> Result<u64> {
    let out = create(path)?;
    let size = ram.map.blocks[b].used_length;
    let mut sink = Sink::new(&out, path, Vec::new());
    sink.block(ram, src, b, 0, size, 0, meter)?;
    sink.flush()?;
    out.set_len(size).map_err(|e| Error::io(path, "set the length of", e))?;
    Ok(size)
}
