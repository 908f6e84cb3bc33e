//! Guest memory of an open save: its RAM blocks page by page, through the
//! stored RAM page map, a mapped-ram stream's bitmaps, or a walk of the RAM
//! records; and the guest-physical view that places blocks at addresses.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::format::layout;
use crate::format::pagemap::{self, Base, BlockMap, Loc, PageMap, RunKind};
use crate::format::ram::RamState;
use crate::format::source::{Limit, ReadAt};
use crate::format::stream::{self, ParseOptions};

use super::error::{Error, Result};
use super::open::SaveFile;

/// Where a [`GuestRam`]'s page map came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSource {
    /// The map stored in the file's directory.
    Stored,
    /// A mapped-ram stream's bitmaps.
    MappedRam,
    /// A walk of the stream's RAM records.
    Scanned,
}

impl MapSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MapSource::Stored => "stored",
            MapSource::MappedRam => "mapped-ram",
            MapSource::Scanned => "scanned",
        }
    }
}

/// A guest-physical range backed by RAM: `size` bytes at `gpa` are bytes
/// `offset..offset+size` of block `block` (an index into the map's blocks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub gpa: u64,
    pub size: u64,
    pub block: usize,
    pub offset: u64,
}

/// The guest memory of a save.
#[derive(Debug)]
pub struct GuestRam {
    pub map: PageMap,
    pub from: MapSource,
    /// For mapped-ram: each block's page region (absolute offset), if it has one.
    pub regions: Vec<Option<u64>>,
    /// The file, for messages.
    pub path: std::path::PathBuf,
    /// Per block, built on first use by [`GuestRam::gather`]: one word per
    /// page, for lookups in O(1) (see [`dense_index`]).
    dense: Vec<std::sync::OnceLock<Option<Vec<u64>>>>,
    /// Where the `ram` section's items lie in the file.
    pub extent: Option<(u64, u64)>,
}

/// What a page is, from the per-page index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageWord {
    /// Zero, or never sent.
    Zero,
    /// Stored whole at this file offset.
    Stored(u64),
    /// To be decoded (XBZRLE, compressed).
    Decode,
}

/// One word per page of `b`: 0 zero or never sent, `offset << 2 | 2`
/// stored at a file offset, `chain << 2 | 3` to be decoded.
/// None for blocks of more than [`DENSE_MAX`] pages (they are looked up in
/// their runs instead).
fn dense_index(b: &BlockMap, page_size: u64) -> Option<Vec<u64>> {
    let pages = b.used_length.div_ceil(page_size);
    if pages > DENSE_MAX {
        return None;
    }
    let mut v = vec![0u64; pages as usize];
    for r in &b.runs {
        for i in 0..r.count {
            let w = match r.kind {
                RunKind::Zero => 0,
                RunKind::Data => ((r.offset + i * r.stride) << 2) | 2,
                RunKind::Chain => ((r.offset + i) << 2) | 3,
            };
            v[(r.first + i) as usize] = w;
        }
    }
    Some(v)
}

/// Most pages of a block that get a per-page index (64 MiB of it: 32 GiB of RAM).
const DENSE_MAX: u64 = 1 << 23;

fn word_of(loc: Loc<'_>) -> PageWord {
    match loc {
        Loc::Absent | Loc::Zero => PageWord::Zero,
        Loc::Data(off) => PageWord::Stored(off),
        Loc::Chain(_) => PageWord::Decode,
    }
}

/// Bytes of a zero page, shared by every read of one.
pub static ZERO_PAGE: [u8; 65536] = [0; 65536];

impl SaveFile {
    /// The guest memory of this save: through the stored page map when the
    /// directory has one, else by walking the stream's RAM records (which
    /// reads them all). Long: call it with the GIL released.
    pub fn guest_ram(&self) -> Result<GuestRam> {
        let mut ram = self.guest_ram_inner()?;
        let items: Vec<_> =
            self.entries.iter().filter(|e| e.kind.is_section() && e.name.as_deref() == Some("ram")).collect();
        ram.extent = items.first().zip(items.last()).map(|(a, b)| (a.offset, b.end));
        // Guest pages are read one at a time, anywhere: no read-ahead over
        // the RAM section (a cold read then costs a page, not megabytes).
        if let Some(m) = self.map() {
            ram.advise(m, super::source::Advice::Random);
        }
        Ok(ram)
    }

    fn guest_ram_inner(&self) -> Result<GuestRam> {
        if let (Some(at), Some(t)) = (self.ram_map_at, self.trailer) {
            let dsrc = self.dir_source();
            let view = dsrc.view(&*self.source);
            let blob = view.get(at, t.dir - at).ok_or_else(|| Error::Ram {
                path: self.path.clone(),
                message: format!("the RAM page map at offset {at} could not be read"),
            })?;
            if let Some(e) = view.take_error() {
                return Err(Error::source(&self.path, e));
            }
            let (map, _) = PageMap::decode(&blob, at, self.stream_end).map_err(|e| Error::Directory {
                path: self.path.clone(),
                source: crate::format::directory::CheckError::new(
                    crate::format::directory::Check::Directory,
                    Some(e.offset),
                    e.message,
                ),
            })?;
            return Ok(GuestRam::new(map, MapSource::Stored, None, &self.path));
        }
        self.scan_ram()
    }

    /// Walks the stream's RAM records into a page map.
    fn scan_ram(&self) -> Result<GuestRam> {
        let stream = Limit { src: &*self.source, len: self.stream_end.min(self.source.size()) };
        let mut popts = ParseOptions::new(self.stream_start, self.stream_end);
        popts.vmdesc = self.hint.as_deref();
        popts.page_map = true;
        let s = stream::parse_source(&stream, popts, None).map_err(|e| Error::source(&self.path, e))?;
        self.check_changed()?;
        let Some(ram) = s.ram else {
            return Err(Error::Ram { path: self.path.clone(), message: "the save has no \"ram\" section".into() });
        };
        if ram.options.mapped_ram {
            return self.mapped_ram(&ram);
        }
        let map = ram.page_map().expect("a page map was asked for").map_err(|e| Error::format(&self.path, e))?;
        Ok(GuestRam::new(map, MapSource::Scanned, None, &self.path))
    }

    fn mapped_ram(&self, ram: &RamState) -> Result<GuestRam> {
        let ps = ram.options.page_size;
        let mut blocks = Vec::new();
        let mut regions = Vec::new();
        for b in &ram.blocks {
            let m = b.mapped.expect("mapped-ram blocks carry their header");
            let data = if m.next.is_some() {
                let n = b.used_length.div_ceil(ps).div_ceil(64) * 8;
                let bitmap = self.read(m.bitmap_offset, m.bitmap_offset + n)?.into_owned();
                regions.push(Some(m.pages_offset));
                Some((m.pages_offset, bitmap))
            } else {
                regions.push(None);
                None
            };
            blocks.push((b.id.clone(), b.used_length, b.page_size, data));
        }
        let map = PageMap::from_mapped(&blocks, ps);
        Ok(GuestRam::new(map, MapSource::MappedRam, Some(regions), &self.path))
    }
}

impl SaveFile {
    /// What the save's device sections say about the guest-physical layout
    /// (the PCI configuration spaces, found through the vmdesc).
    pub fn device_facts(&self) -> Result<layout::DeviceFacts> {
        // A few small sections and the vmdesc, near the stream's end: no
        // read-ahead of megabytes around them on a cold file.
        let from = self.entries.iter().rev().find(|e| e.name.as_deref() == Some("ram")).map_or(0, |e| e.end);
        if let Some(m) = self.map() {
            m.advise_range(super::source::Advice::Random, from, self.stream_end);
        }
        let facts = self.device_facts_inner();
        if let Some(m) = self.map() {
            m.advise_range(super::source::Advice::Normal, from, self.stream_end);
        }
        facts
    }

    fn device_facts_inner(&self) -> Result<layout::DeviceFacts> {
        let Some(json) = self.vmdesc_json()? else {
            return Ok(layout::DeviceFacts::default());
        };
        let desc: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
        let pci = layout::pci_functions(&desc, |name, instance| {
            let entries = self.find(name, Some(instance)).ok()?;
            let e = entries.into_iter().find(|e| e.kind == crate::format::Kind::Full)?;
            self.read(e.payload_start(), e.payload_end()).ok().map(|b| b.into_owned())
        });
        Ok(layout::DeviceFacts { pci })
    }

    /// Where `ram`'s blocks lie in guest-physical memory, for this save's
    /// machine type (see `format::layout`), and the blocks that lie nowhere.
    pub fn phys_layout(
        &self,
        ram: &GuestRam,
        opts: &layout::LayoutOptions,
    ) -> Result<(Vec<PhysRange>, Vec<layout::Unmapped>)> {
        let machine = self.machine_type.clone().unwrap_or_default();
        let blocks: Vec<(&str, u64)> = ram.map.blocks.iter().map(|b| (b.id.as_str(), b.used_length)).collect();
        let facts = self.device_facts()?;
        let l = layout::x86_layout(&machine, &blocks, &facts, opts)
            .map_err(|e| Error::Ram { path: self.path.clone(), message: format!("no guest-physical layout: {e}") })?;
        let mut out = Vec::with_capacity(l.ranges.len());
        for r in l.ranges {
            let block = ram.block_index(&r.block)?;
            out.push(PhysRange { gpa: r.gpa, size: r.size, block, offset: r.offset });
        }
        Ok((out, l.unmapped))
    }
}

impl GuestRam {
    pub fn new(map: PageMap, from: MapSource, regions: Option<Vec<Option<u64>>>, path: &std::path::Path) -> Self {
        let n = map.blocks.len();
        GuestRam {
            map,
            from,
            regions: regions.unwrap_or_else(|| vec![None; n]),
            path: path.to_path_buf(),
            dense: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
            extent: None,
        }
    }

    /// Page `page` of block `b` through the per-page index (built on first use).
    pub fn page_word(&self, b: usize, page: u64) -> PageWord {
        let dense = self.dense[b].get_or_init(|| dense_index(self.block(b), self.map.page_size));
        let Some(dense) = dense else { return word_of(self.block(b).lookup(page)) };
        match dense.get(page as usize).map_or(0, |w| *w) {
            w if w & 3 == 2 => PageWord::Stored(w >> 2),
            w if w & 3 == 3 => PageWord::Decode,
            _ => PageWord::Zero,
        }
    }

    /// Gives the kernel `advice` for the `ram` section's bytes in mapping `m`.
    pub fn advise(&self, m: &super::source::Map, advice: super::source::Advice) {
        if let Some((a, b)) = self.extent {
            m.advise_range(advice, a, b);
        }
    }

    pub fn page_size(&self) -> u64 {
        self.map.page_size
    }

    /// The index of block `name`.
    pub fn block_index(&self, name: &str) -> Result<usize> {
        self.map.blocks.iter().position(|b| b.id == name).ok_or_else(|| {
            let have: Vec<&str> = self.map.blocks.iter().map(|b| b.id.as_str()).collect();
            self.err(format!("the save has no RAM block \"{name}\" (it has: {})", have.join(", ")))
        })
    }

    fn err(&self, message: String) -> Error {
        Error::Ram { path: self.path.clone(), message }
    }

    fn block(&self, i: usize) -> &BlockMap {
        &self.map.blocks[i]
    }

    /// Page `page` of block `b`: borrowed from `src` when it is a slice and
    /// the page is stored whole, else decoded into an owned buffer. Zero and
    /// never-sent pages borrow [`ZERO_PAGE`].
    pub fn page<'a>(&self, src: &'a dyn ReadAt, b: usize, page: u64) -> Result<Cow<'a, [u8]>> {
        let blk = self.block(b);
        let ps = self.map.page_size;
        let pages = blk.used_length.div_ceil(ps);
        if page >= pages {
            return Err(self.err(format!("block \"{}\" has {pages} pages; there is no page {page}", blk.id)));
        }
        match blk.lookup(page) {
            Loc::Absent | Loc::Zero if ps as usize <= ZERO_PAGE.len() => Ok(Cow::Borrowed(&ZERO_PAGE[..ps as usize])),
            Loc::Data(off) => match src.as_slice() {
                Some(all) => all
                    .get(off as usize..(off + ps) as usize)
                    .map(Cow::Borrowed)
                    .ok_or_else(|| self.err(format!("block \"{}\" page {page} lies past the file's end", blk.id))),
                None => {
                    let mut v = vec![0u8; ps as usize];
                    self.read_at(src, off, &mut v)?;
                    Ok(Cow::Owned(v))
                }
            },
            _ => {
                let mut v = vec![0u8; ps as usize];
                self.page_into(src, b, page, &mut v)?;
                Ok(Cow::Owned(v))
            }
        }
    }

    fn read_at(&self, src: &dyn ReadAt, off: u64, out: &mut [u8]) -> Result<()> {
        if let Some(all) = src.as_slice() {
            let s = all
                .get(off as usize..off as usize + out.len())
                .ok_or_else(|| self.err(format!("the page map points past the file's end (offset {off})")))?;
            out.copy_from_slice(s);
            return Ok(());
        }
        src.read_at(off, out).map_err(|source| Error::Read {
            path: self.path.clone(),
            offset: off,
            len: out.len() as u64,
            source,
        })
    }

    /// Copies page `page` of block `b` into `out` (one page long).
    pub fn page_into(&self, src: &dyn ReadAt, b: usize, page: u64, out: &mut [u8]) -> Result<()> {
        let blk = self.block(b);
        match blk.lookup(page) {
            Loc::Absent | Loc::Zero => out.fill(0),
            Loc::Data(off) => self.read_at(src, off, out)?,
            Loc::Chain(c) => {
                match c.base {
                    Base::Absent | Base::Zero => out.fill(0),
                    Base::Data(off) => self.read_at(src, off, out)?,
                    Base::Zlib { offset, len } => {
                        let mut z = vec![0u8; len as usize];
                        self.read_at(src, offset, &mut z)?;
                        inflate_page(&z, out).map_err(|m| {
                            self.err(format!(
                                "block \"{}\" page {page}: the compressed page at offset {offset} {m}",
                                blk.id
                            ))
                        })?;
                    }
                }
                let mut delta = Vec::new();
                for &(off, len) in &c.deltas {
                    delta.resize(len as usize, 0);
                    self.read_at(src, off, &mut delta)?;
                    pagemap::xbzrle_apply(out, &delta, off).map_err(|e| {
                        self.err(format!("block \"{}\" page {page}: at offset {}: {}", blk.id, e.offset, e.message))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Bytes `offset..offset+out.len()` of block `b`.
    pub fn read_block(&self, src: &dyn ReadAt, b: usize, offset: u64, out: &mut [u8]) -> Result<()> {
        let blk = self.block(b);
        let end = offset.checked_add(out.len() as u64);
        if end.is_none_or(|e| e > blk.used_length) {
            return Err(self.err(format!(
                "block \"{}\" has {} bytes; {} bytes at offset 0x{offset:x} run past its end",
                blk.id,
                blk.used_length,
                out.len()
            )));
        }
        let ps = self.map.page_size;
        let mut done = 0usize;
        let mut scratch = Vec::new();
        while done < out.len() {
            let at = offset + done as u64;
            let page = at / ps;
            let within = (at % ps) as usize;
            let n = (ps as usize - within).min(out.len() - done);
            if within == 0 && n == ps as usize {
                self.page_into(src, b, page, &mut out[done..done + n])?;
            } else {
                scratch.resize(ps as usize, 0);
                self.page_into(src, b, page, &mut scratch)?;
                out[done..done + n].copy_from_slice(&scratch[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    /// Pages `pages` of block `b`, one after another into `out`.
    pub fn gather(&self, src: &dyn ReadAt, b: usize, pages: &[u64], out: &mut [u8]) -> Result<()> {
        let ps = self.map.page_size as usize;
        let n = self.block(b).used_length.div_ceil(ps as u64);
        if let Some(&bad) = pages.iter().find(|&&p| p >= n) {
            return Err(self.err(format!("block \"{}\" has {n} pages; there is no page {bad}", self.block(b).id)));
        }
        let data = src.as_slice();
        // Stored pages are copied straight from a mapping; the rest decoded.
        let one = |(p, dst): (&u64, &mut [u8])| -> Result<()> {
            match (self.page_word(b, *p), data) {
                (PageWord::Zero, _) => dst.fill(0),
                (PageWord::Stored(off), Some(all)) => {
                    let off = off as usize;
                    let s = all
                        .get(off..off + ps)
                        .ok_or_else(|| self.err(format!("the page map points past the file's end (offset {off})")))?;
                    dst.copy_from_slice(s);
                }
                _ => self.page_into(src, b, *p, dst)?,
            }
            Ok(())
        };
        // Large gathers on a pool made for the call (never rayon's global
        // pool: see pool.rs).
        super::pool::run((pages.len() * ps) as u64, || {
            if super::pool::in_pool() {
                pages.par_iter().zip(out.par_chunks_mut(ps)).with_min_len(1024).try_for_each(one)
            } else {
                pages.iter().zip(out.chunks_mut(ps)).try_for_each(one)
            }
        })
    }

    /// The page numbers of block `b` whose content the file holds as data.
    pub fn present(&self, b: usize) -> Vec<u64> {
        self.block(b).data_page_numbers()
    }
}

/// Inflates one zlib-compressed page into `out`, which it must fill exactly.
fn inflate_page(z: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    let mut d = flate2::Decompress::new(true);
    match d.decompress(z, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) if d.total_out() as usize == out.len() => Ok(()),
        Ok(_) => Err(format!("does not inflate to exactly {} bytes", out.len())),
        Err(e) => Err(format!("does not inflate: {e}")),
    }
}
