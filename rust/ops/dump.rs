//! Writing guest memory out: an ELF64 core of guest-physical memory (as
//! QEMU's `dump-guest-memory` writes with paging off), and raw block files.
//! Zero pages are not written: the files are sparse where the guest's
//! memory is zero, and a whole file is written with positioned writes of
//! large buffers.

use std::fs::File;
use std::os::unix::fs::FileExt;
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
struct Sink<'a> {
    out: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_at: u64,
}

impl Sink<'_> {
    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all_at(&self.buf, self.buf_at).map_err(|e| Error::io(self.path, "write", e))?;
            self.buf_at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Moves to file offset `at` (a hole between, if any).
    fn seek(&mut self, at: u64) -> Result<()> {
        if self.buf_at + self.buf.len() as u64 != at {
            self.flush()?;
            self.buf_at = at;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        ram: &GuestRam,
        src: &dyn ReadAt,
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
                PageWord::Zero => self.seek(at + done + n)?, // a hole: nothing to write
                PageWord::Stored(p) if data.is_some_and(|d| d.len() as u64 >= p + ps) => {
                    self.seek(at + done)?;
                    let all = data.expect("checked");
                    self.buf.extend_from_slice(&all[(p + within) as usize..(p + within + n) as usize]);
                }
                _ => {
                    self.seek(at + done)?;
                    let mut whole = vec![0u8; ps as usize];
                    ram.page_into(src, b, page, &mut whole)?;
                    self.buf.extend_from_slice(&whole[within as usize..(within + n) as usize]);
                }
            }
            if self.buf.len() >= WRITE_BUF {
                self.flush()?;
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
    let mut sink = Sink { out: &out, path, buf: head, buf_at: 0 };
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
    let mut sink = Sink { out: &out, path, buf: Vec::with_capacity(WRITE_BUF), buf_at: 0 };
    sink.block(ram, src, b, 0, size, 0, meter)?;
    sink.flush()?;
    out.set_len(size).map_err(|e| Error::io(path, "set the length of", e))?;
    Ok(size)
}
