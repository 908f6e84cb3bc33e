//! The RAM page map: for every page of every RAMBlock, where its final
//! content lies in the file.
//!
//! A live save sends a page again each time the guest dirtied it, so a
//! page's content is the last record that carried it ("last write wins"):
//! a page record (the bytes at a file offset), a zero record, an XBZRLE
//! delta against what the destination held before, or a zlib-compressed
//! page. Postcopy's RAM_DISCARD command throws a page's content away (the
//! destination then holds zeros until the page is sent again).
//!
//! [`Builder`] follows the records as the parser reads them; [`PageMap`] is
//! its compact form: per block, sorted runs of pages that share a kind and
//! whose data lies at a constant stride. It is what the directory stores
//! (see [`PageMap::encode`] and `docs/format.md`) and what readers look
//! pages up in. A mapped-ram stream needs no stored map: [`PageMap`] is made
//! from its bitmaps ([`PageMap::from_mapped`]).

use super::error::{FormatError, Result};
use super::reader::Reader;

/// The map's magic, at the start of the stored blob.
pub const MAGIC: &[u8; 8] = b"SAVEDIRM";
/// The version of the stored layout that this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes before the blocks: magic, version, flags, blob length, page size, block count.
const HEAD_LEN: usize = 8 + 4 + 4 + 8 + 4 + 4;
/// Most RAM blocks a map may describe.
const MAX_BLOCKS: u64 = 1 << 16;
/// Most deltas one XBZRLE page may carry (a live save sends a page at most
/// once per iteration; this bounds what a hostile map can make a read do).
const MAX_DELTAS: u64 = 1 << 20;

/// Where a page's content came from before any XBZRLE deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// Never sent (or discarded): the destination holds zeros.
    Absent,
    /// A zero record.
    Zero,
    /// A page record: the page's bytes at this file offset.
    Data(u64),
    /// A compressed page: a zlib stream of `len` bytes at `offset`.
    Zlib { offset: u64, len: u32 },
}

/// A page whose content is a base plus XBZRLE deltas, applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub base: Base,
    /// Each delta's (file offset, length).
    pub deltas: Vec<(u64, u32)>,
}

/// Where one page's final content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc<'a> {
    /// Never sent: zeros.
    Absent,
    /// A zero page.
    Zero,
    /// The page's bytes at this file offset.
    Data(u64),
    /// To be decoded (compressed, or XBZRLE deltas).
    Chain(&'a Chain),
}

// A builder's per-page word: the low two bits say what the rest is.
const W_ABSENT: u64 = 0;
const W_ZERO: u64 = 1;
const W_DATA: u64 = 2; // file offset << 2
const W_CHAIN: u64 = 3; // chain index << 2

/// Pages of a block a chunk of the builder covers.
const CHUNK: u64 = 512;
/// Chunks any builder may hold before it counts its records: 16 MiB.
const FREE_CHUNKS: usize = 4096;

/// One block's pages while the stream is read, in chunks allocated as
/// records reach them: a block's claimed size costs nothing until pages of
/// it are sent.
#[derive(Clone, Debug)]
struct BlockBuild {
    pages: u64,
    chunks: std::collections::BTreeMap<u64, Box<[u64]>>,
    /// The chunk of the last record.
    last_chunk: Option<u64>,
}

/// The page map being built as RAM records pass by.
///
/// Memory is bounded by the records read: a chunk of 512 page words (4 KiB)
/// is allocated only for a record in it, and beyond the first 16 MiB a
/// builder holds at most one chunk per 64 records. Records scattered more
/// thinly than that (no stream QEMU writes; a hostile one) make it give up:
/// [`Builder::finish`] then says so instead of allocating what the file
/// does not hold.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    blocks: Vec<BlockBuild>,
    chains: Vec<Chain>,
    records: u64,
    chunks: usize,
    gave_up: bool,
}

impl Builder {
    /// A builder for blocks of these lengths, in `page_size` pages.
    pub fn new(lengths: &[u64], page_size: u64) -> Self {
        let blocks = lengths
            .iter()
            .map(|&l| BlockBuild { pages: l.div_ceil(page_size), chunks: Default::default(), last_chunk: None })
            .collect();
        Builder { blocks, ..Default::default() }
    }

    fn slot(&mut self, block: usize, page: u64) -> Option<&mut u64> {
        if self.gave_up {
            return None;
        }
        self.records += 1;
        let pages = self.blocks.get(block)?.pages;
        if page >= pages {
            return None;
        }
        let key = page / CHUNK;
        let within = (page % CHUNK) as usize;
        // Records mostly follow one another in a chunk: one look-up then.
        let b = &self.blocks[block];
        if b.last_chunk != Some(key) && !b.chunks.contains_key(&key) {
            if self.chunks >= FREE_CHUNKS && self.chunks as u64 > self.records / 64 {
                self.gave_up = true;
                self.blocks.iter_mut().for_each(|b| {
                    b.chunks.clear();
                    b.last_chunk = None;
                });
                self.chains = Vec::new();
                return None;
            }
            self.chunks += 1;
        }
        let b = &mut self.blocks[block];
        b.last_chunk = Some(key);
        let chunk = b.chunks.entry(key).or_insert_with(|| vec![W_ABSENT; CHUNK as usize].into_boxed_slice());
        Some(&mut chunk[within])
    }
    /// A page record: the page's bytes lie at `offset`.
    pub fn data(&mut self, block: usize, page: u64, offset: u64) {
        if let Some(s) = self.slot(block, page) {
            *s = (offset << 2) | W_DATA;
        }
    }

    /// A zero record.
    pub fn zero(&mut self, block: usize, page: u64) {
        if let Some(s) = self.slot(block, page) {
            *s = W_ZERO;
        }
    }

    /// A compressed page record: a zlib stream of `len` bytes at `offset`.
    pub fn compressed(&mut self, block: usize, page: u64, offset: u64, len: u32) {
        let idx = self.chains.len() as u64;
        if let Some(s) = self.slot(block, page) {
            *s = (idx << 2) | W_CHAIN;
            self.chains.push(Chain { base: Base::Zlib { offset, len }, deltas: Vec::new() });
        }
    }

    /// An XBZRLE record: a delta of `len` bytes at `offset`, against the
    /// page's content so far.
    pub fn xbzrle(&mut self, block: usize, page: u64, offset: u64, len: u32) {
        let next = self.chains.len() as u64;
        let Some(s) = self.slot(block, page) else { return };
        let word = *s;
        match word & 3 {
            W_CHAIN => self.chains[(word >> 2) as usize].deltas.push((offset, len)),
            kind => {
                let base = match kind {
                    W_ZERO => Base::Zero,
                    W_DATA => Base::Data(word >> 2),
                    _ => Base::Absent,
                };
                *s = (next << 2) | W_CHAIN;
                self.chains.push(Chain { base, deltas: vec![(offset, len)] });
            }
        }
    }

    /// Postcopy's discard of `count` pages from `first`: their content is
    /// gone (only pages sent before can have any).
    pub fn discard(&mut self, block: usize, first: u64, count: u64) {
        let Some(b) = self.blocks.get_mut(block) else { return };
        let end = first.saturating_add(count).min(b.pages);
        if first >= end {
            return;
        }
        for (&key, chunk) in b.chunks.range_mut(first / CHUNK..=(end - 1) / CHUNK) {
            let base = key * CHUNK;
            let from = first.max(base) - base;
            let to = end.min(base + CHUNK) - base;
            chunk[from as usize..to as usize].fill(W_ABSENT);
        }
    }

    /// The compact map, for blocks `(id, used_length, host page size)`; an
    /// error when the records were too scattered to follow.
    pub fn finish(&self, blocks: &[(String, u64, Option<u64>)], page_size: u64) -> Result<PageMap> {
        if self.gave_up {
            return Err(FormatError::unsupported(
                0,
                format!("the RAM records are scattered too thinly over the blocks to map ({} records)", self.records),
            ));
        }
        let mut out = Vec::with_capacity(self.blocks.len());
        for (b, (id, len, host)) in self.blocks.iter().zip(blocks) {
            let mut m = BlockMap::new(id.clone(), *len, *host);
            let mut runs = RunBuilder::default();
            let words =
                b.chunks.iter().flat_map(|(&k, c)| c.iter().enumerate().map(move |(i, &w)| (k * CHUNK + i as u64, w)));
            for (page, w) in words {
                match w & 3 {
                    W_ZERO => runs.push(page, RunKind::Zero, 0),
                    W_DATA => runs.push(page, RunKind::Data, w >> 2),
                    W_CHAIN => {
                        let idx = m.chains.len() as u64;
                        m.chains.push(self.chains[(w >> 2) as usize].clone());
                        runs.push(page, RunKind::Chain, idx)
                    }
                    _ => {}
                }
            }
            m.runs = runs.finish();
            m.count();
            out.push(m);
        }
        Ok(PageMap { page_size, blocks: out })
    }
}

/// What a run of pages holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Zero = 0,
    /// Page bytes at `offset + i * stride`.
    Data = 1,
    /// Chains `offset + i` of the block.
    Chain = 2,
}

/// Consecutive pages `first..first+count` of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub count: u64,
    pub kind: RunKind,
    pub offset: u64,
    pub stride: u64,
}

impl Run {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Joins pages into runs as they come in page order.
#[derive(Default)]
struct RunBuilder {
    runs: Vec<Run>,
}

impl RunBuilder {
    /// Adds a page (a data run's stride is taken from its second page).
    fn push(&mut self, page: u64, kind: RunKind, offset: u64) {
        if let Some(r) = self.runs.last_mut() {
            if r.kind == kind && r.end() == page {
                let joins = match kind {
                    RunKind::Zero => true,
                    RunKind::Chain => offset == r.offset + r.count,
                    RunKind::Data if r.count == 1 => offset > r.offset,
                    RunKind::Data => offset == r.offset + r.count * r.stride,
                };
                if joins {
                    if kind == RunKind::Data && r.count == 1 {
                        r.stride = offset - r.offset;
                    }
                    r.count += 1;
                    return;
                }
            }
        }
        let stride = if kind == RunKind::Chain { 1 } else { 0 };
        self.runs.push(Run { first: page, count: 1, kind, offset, stride });
    }

    fn finish(self) -> Vec<Run> {
        self.runs
    }
}

/// One block's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMap {
    pub id: String,
    pub used_length: u64,
    /// The host page size the stream gives for a hugepage-backed block.
    pub host_page_size: Option<u64>,
    /// Sorted by page, not overlapping; pages in no run were never sent.
    pub runs: Vec<Run>,
    pub chains: Vec<Chain>,
    /// Pages whose content the file holds as data (page records, XBZRLE, compressed).
    pub data_pages: u64,
    /// Pages recorded as zero.
    pub zero_pages: u64,
}

impl BlockMap {
    fn new(id: String, used_length: u64, host_page_size: Option<u64>) -> Self {
        BlockMap { id, used_length, host_page_size, runs: Vec::new(), chains: Vec::new(), data_pages: 0, zero_pages: 0 }
    }

    fn count(&mut self) {
        self.data_pages = self.runs.iter().filter(|r| r.kind != RunKind::Zero).map(|r| r.count).sum();
        self.zero_pages = self.runs.iter().filter(|r| r.kind == RunKind::Zero).map(|r| r.count).sum();
    }

    /// Where page `page` is.
    pub fn lookup(&self, page: u64) -> Loc<'_> {
        let i = self.runs.partition_point(|r| r.first <= page);
        let Some(r) = i.checked_sub(1).map(|i| &self.runs[i]) else { return Loc::Absent };
        if page >= r.end() {
            return Loc::Absent;
        }
        let k = page - r.first;
        match r.kind {
            RunKind::Zero => Loc::Zero,
            RunKind::Data => Loc::Data(r.offset + k * r.stride),
            RunKind::Chain => Loc::Chain(&self.chains[(r.offset + k) as usize]),
        }
    }

    /// Pages whose content the file holds as data, in order.
    pub fn data_page_numbers(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(self.data_pages as usize);
        for r in self.runs.iter().filter(|r| r.kind != RunKind::Zero) {
            v.extend(r.first..r.end());
        }
        v
    }
}

/// Every block's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    /// The page size of the records (the target page size).
    pub page_size: u64,
    pub blocks: Vec<BlockMap>,
}

/// One block of a mapped-ram stream: its id, used length, host page size
/// when it has one, and its pages' offset with its bitmap (None when the
/// file holds no data of it).
pub type MappedBlock = (String, u64, Option<u64>, Option<(u64, Vec<u8>)>);

impl PageMap {
    /// The map of a mapped-ram stream: `bitmaps[i]` is block i's bitmap
    /// (bit n set: page n's bytes lie at `pages_offset + n * page_size`;
    /// clear: the page is zero), or None for a block without data in the file.
    pub fn from_mapped(blocks: &[MappedBlock], page_size: u64) -> Self {
        let mut out = Vec::with_capacity(blocks.len());
        for (id, len, host, data) in blocks {
            let mut m = BlockMap::new(id.clone(), *len, *host);
            if let Some((pages_offset, bitmap)) = data {
                let mut runs = RunBuilder::default();
                for page in 0..len.div_ceil(page_size) {
                    let set = bitmap.get((page / 8) as usize).is_some_and(|b| b >> (page % 8) & 1 == 1);
                    if set {
                        runs.push(page, RunKind::Data, pages_offset + page * page_size);
                    } else {
                        runs.push(page, RunKind::Zero, 0);
                    }
                }
                m.runs = runs.finish();
                m.count();
            }
            out.push(m);
        }
        PageMap { page_size, blocks: out }
    }

    pub fn block(&self, id: &str) -> Option<&BlockMap> {
        self.blocks.iter().find(|b| b.id == id)
    }

    /// The stored form (see `docs/format.md`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // length, filled in below
        out.extend_from_slice(&(self.page_size as u32).to_be_bytes());
        out.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        for b in &self.blocks {
            out.push(b.id.len() as u8);
            out.extend_from_slice(b.id.as_bytes());
            out.extend_from_slice(&b.used_length.to_be_bytes());
            out.extend_from_slice(&b.host_page_size.unwrap_or(0).to_be_bytes());
            put(&mut out, b.runs.len() as u64);
            put(&mut out, b.chains.len() as u64);
            let mut prev_end = 0u64;
            let mut predicted = 0u64;
            for r in &b.runs {
                put(&mut out, r.first - prev_end);
                put(&mut out, r.count);
                out.push(r.kind as u8);
                match r.kind {
                    RunKind::Zero => {}
                    RunKind::Chain => put(&mut out, r.offset),
                    RunKind::Data => {
                        put(&mut out, zigzag(r.offset.wrapping_sub(predicted) as i64));
                        if r.count > 1 {
                            put(&mut out, r.stride);
                        }
                        predicted = r.offset + r.count.saturating_sub(1) * r.stride + self.page_size;
                    }
                }
                prev_end = r.end();
            }
            for c in &b.chains {
                match c.base {
                    Base::Absent => out.push(0),
                    Base::Zero => out.push(1),
                    Base::Data(o) => {
                        out.push(2);
                        put(&mut out, o);
                    }
                    Base::Zlib { offset, len } => {
                        out.push(3);
                        put(&mut out, offset);
                        put(&mut out, len as u64);
                    }
                }
                put(&mut out, c.deltas.len() as u64);
                for &(o, l) in &c.deltas {
                    put(&mut out, o);
                    put(&mut out, l as u64);
                }
            }
        }
        let len = out.len() as u64 + 4;
        out[16..24].copy_from_slice(&len.to_be_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Reads a stored map that starts at absolute offset `at` in `data`
    /// (which may run on past the map's end). Every field is checked: a
    /// damaged map is refused, never half-used. Offsets of page data must
    /// lie below `data_end` (the stream's end).
    pub fn decode(data: &[u8], at: u64, data_end: u64) -> Result<(PageMap, u64)> {
        let bad = |off: u64, m: String| FormatError::invalid(off, format!("the RAM page map: {m}"));
        let len = check_blob(data, at)?;
        let body = &data[..len as usize - 4];
        let mut r = Reader::with_base(body, at);
        r.skip(HEAD_LEN as u64 - 8, "the RAM page map's head")?;
        let page_size = r.be32("the RAM page map's page size")? as u64;
        if !page_size.is_power_of_two() || page_size < 512 {
            return Err(bad(r.offset() - 4, format!("expected a power-of-two page size, found {page_size}")));
        }
        let nblocks = r.be32("the RAM page map's block count")? as u64;
        if nblocks > MAX_BLOCKS {
            return Err(bad(r.offset() - 4, format!("{nblocks} blocks is more than {MAX_BLOCKS}")));
        }
        let mut blocks = Vec::new();
        for _ in 0..nblocks {
            let id = String::from_utf8_lossy(r.cstr8("a RAM block id")?).into_owned();
            let used_length = r.be64("a RAM block's length")?;
            let host = r.be64("a RAM block's host page size")?;
            let pages = used_length.div_ceil(page_size);
            let mut b = BlockMap::new(id, used_length, (host != 0).then_some(host));
            let at = r.offset();
            let nruns = get(&mut r)?;
            let nchains = get(&mut r)?;
            // Each run and chain takes at least two bytes.
            if nruns.saturating_add(nchains) > r.remaining() as u64 {
                return Err(bad(at, format!("block \"{}\": {nruns} runs and {nchains} chains do not fit", b.id)));
            }
            let mut prev_end = 0u64;
            let mut predicted = 0u64;
            for _ in 0..nruns {
                let at = r.offset();
                let first = prev_end.checked_add(get(&mut r)?);
                let count = get(&mut r)?;
                let kind = r.u8("a run's kind")?;
                let end = first.and_then(|f| f.checked_add(count)).filter(|&e| e <= pages && count > 0);
                let (Some(first), Some(end)) = (first, end) else {
                    return Err(bad(at, format!("block \"{}\": a run lies outside its {pages} pages", b.id)));
                };
                let (kind, offset, stride) = match kind {
                    0 => (RunKind::Zero, 0, 0),
                    1 => {
                        let offset = predicted.wrapping_add(unzigzag(get(&mut r)?) as u64);
                        let stride = if count > 1 { get(&mut r)? } else { 0 };
                        let last = stride
                            .checked_mul(count - 1)
                            .and_then(|s| s.checked_add(offset))
                            .and_then(|l| l.checked_add(page_size));
                        if last.is_none_or(|l| l > data_end) || (count > 1 && stride < page_size) {
                            return Err(bad(at, format!("block \"{}\": a run of pages lies outside the stream", b.id)));
                        }
                        predicted = last.unwrap_or(0);
                        (RunKind::Data, offset, stride)
                    }
                    2 => {
                        let offset = get(&mut r)?;
                        if offset.checked_add(count).is_none_or(|e| e > nchains) {
                            return Err(bad(at, format!("block \"{}\": a run names chains it does not have", b.id)));
                        }
                        (RunKind::Chain, offset, 1)
                    }
                    k => return Err(bad(at, format!("block \"{}\": unknown run kind {k}", b.id))),
                };
                b.runs.push(Run { first, count, kind, offset, stride });
                prev_end = end;
            }
            for _ in 0..nchains {
                let at = r.offset();
                let within = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= data_end);
                let base = match r.u8("a chain's base")? {
                    0 => Base::Absent,
                    1 => Base::Zero,
                    2 => {
                        let o = get(&mut r)?;
                        if !within(o, page_size) {
                            return Err(bad(at, format!("block \"{}\": a page lies outside the stream", b.id)));
                        }
                        Base::Data(o)
                    }
                    3 => {
                        let offset = get(&mut r)?;
                        let len = get(&mut r)?;
                        if len > u32::MAX as u64 || !within(offset, len) {
                            return Err(bad(
                                at,
                                format!("block \"{}\": a compressed page lies outside the stream", b.id),
                            ));
                        }
                        Base::Zlib { offset, len: len as u32 }
                    }
                    k => return Err(bad(at, format!("block \"{}\": unknown chain base {k}", b.id))),
                };
                let n = get(&mut r)?;
                if n > MAX_DELTAS || n.saturating_mul(2) > r.remaining() as u64 {
                    return Err(bad(at, format!("block \"{}\": {n} deltas do not fit", b.id)));
                }
                let mut deltas = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let o = get(&mut r)?;
                    let l = get(&mut r)?;
                    if l > page_size || !within(o, l) {
                        return Err(bad(at, format!("block \"{}\": an XBZRLE delta lies outside the stream", b.id)));
                    }
                    deltas.push((o, l as u32));
                }
                b.chains.push(Chain { base, deltas });
            }
            b.count();
            blocks.push(b);
        }
        if !r.is_empty() {
            return Err(bad(r.offset(), format!("{} bytes are left over after the last block", r.remaining())));
        }
        Ok((PageMap { page_size, blocks }, len))
    }
}

/// Checks a stored map's magic, version, length and CRC-32C (the blob
/// starts at absolute offset `at` in `data`, which may run on past it);
/// returns the blob's length.
pub fn check_blob(data: &[u8], at: u64) -> Result<u64> {
    let bad = |off: u64, m: String| FormatError::invalid(off, format!("the RAM page map: {m}"));
    let mut r = Reader::with_base(data, at);
    let magic = r.bytes(8, "the RAM page map's magic")?;
    if magic != MAGIC {
        return Err(bad(at, format!("expected the magic \"SAVEDIRM\", found \"{}\"", super::show_bytes(magic))));
    }
    let version = r.be32("the RAM page map's version")?;
    if version != VERSION {
        return Err(FormatError::unsupported(
            at + 8,
            format!("the RAM page map has version {version}; this savedir reads version {VERSION}"),
        ));
    }
    let _flags = r.be32("the RAM page map's flags")?;
    let len = r.be64("the RAM page map's length")?;
    if len < HEAD_LEN as u64 + 4 || len > data.len() as u64 {
        return Err(bad(at + 16, format!("its length {len} does not fit the {} bytes there", data.len())));
    }
    let body = &data[..len as usize - 4];
    let stored = u32::from_be_bytes(data[len as usize - 4..len as usize].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c(body);
    if crc != stored {
        return Err(bad(
            at + len - 4,
            format!("its CRC-32C is 0x{crc:08x}, the map says 0x{stored:08x} (the map is damaged)"),
        ));
    }
    Ok(len)
}

fn put(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get(r: &mut Reader) -> Result<u64> {
    let at = r.offset();
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = r.u8("a number of the RAM page map")?;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            if shift == 63 && b > 1 {
                break;
            }
            return Ok(v);
        }
    }
    Err(FormatError::invalid(at, "the RAM page map: a number runs past 64 bits"))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Applies one XBZRLE delta to `page` in place: runs of (unchanged count,
/// changed count, changed bytes), counts as LEB128.
pub fn xbzrle_apply(page: &mut [u8], delta: &[u8], at: u64) -> Result<()> {
    let bad = |m: &str| FormatError::invalid(at, format!("an XBZRLE delta: {m}"));
    let mut r = Reader::with_base(delta, at);
    let mut d = 0usize;
    let mut first = true;
    while !r.is_empty() {
        let same = leb(&mut r)?;
        if same == 0 && !first {
            return Err(bad("an empty unchanged run after the first"));
        }
        first = false;
        d = d.checked_add(same as usize).filter(|&d| d <= page.len()).ok_or_else(|| bad("runs past the page"))?;
        let n = leb(&mut r)? as usize;
        if n == 0 {
            return Err(bad("an empty changed run"));
        }
        let bytes = r.bytes(n, "an XBZRLE run's bytes")?;
        let to = d.checked_add(n).filter(|&e| e <= page.len()).ok_or_else(|| bad("runs past the page"))?;
        page[d..to].copy_from_slice(bytes);
        d = to;
    }
    Ok(())
}

fn leb(r: &mut Reader) -> Result<u64> {
    let mut v = 0u64;
    for shift in [0, 7, 14] {
        let b = r.u8("an XBZRLE run length")?;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(FormatError::invalid(r.offset(), "an XBZRLE run length is longer than 3 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PageMap {
        let mut b = Builder::new(&[16 * 4096, 4 * 4096], 4096);
        for p in 0..8 {
            b.data(0, p, 1000 + p * 4104);
        }
        b.zero(0, 8);
        b.zero(0, 9);
        b.data(0, 12, 90_000);
        b.xbzrle(0, 12, 95_000, 10);
        b.xbzrle(0, 12, 96_000, 12);
        b.compressed(1, 0, 50_000, 77);
        b.xbzrle(1, 1, 60_000, 5);
        b.data(1, 3, 70_000);
        b.discard(1, 3, 1);
        b.finish(&[("pc.ram".into(), 16 * 4096, None), ("x".into(), 4 * 4096, Some(8192))], 4096).unwrap()
    }

    #[test]
    fn runs_and_lookups() {
        let m = sample();
        let b = &m.blocks[0];
        assert_eq!(b.runs.len(), 3, "{:?}", b.runs);
        assert_eq!(b.lookup(3), Loc::Data(1000 + 3 * 4104));
        assert_eq!(b.lookup(9), Loc::Zero);
        assert_eq!(b.lookup(10), Loc::Absent);
        assert_eq!(b.lookup(15), Loc::Absent);
        match b.lookup(12) {
            Loc::Chain(c) => {
                assert_eq!(c.base, Base::Data(90_000));
                assert_eq!(c.deltas, vec![(95_000, 10), (96_000, 12)]);
            }
            l => panic!("{l:?}"),
        }
        assert_eq!((b.data_pages, b.zero_pages), (9, 2));
        let x = &m.blocks[1];
        assert_eq!(x.lookup(3), Loc::Absent);
        assert!(matches!(x.lookup(1), Loc::Chain(c) if c.base == Base::Absent));
        assert_eq!(b.data_page_numbers(), vec![0, 1, 2, 3, 4, 5, 6, 7, 12]);
    }

    #[test]
    fn round_trip_and_damage() {
        let m = sample();
        let blob = m.encode();
        let (back, len) = PageMap::decode(&blob, 500, 1 << 20).unwrap();
        assert_eq!(back, m);
        assert_eq!(len as usize, blob.len());
        for i in 0..blob.len() {
            for bit in [0x01, 0x80] {
                let mut d = blob.clone();
                d[i] ^= bit;
                assert!(PageMap::decode(&d, 500, 1 << 20).is_err(), "flip at {i}");
            }
        }
        for cut in 0..blob.len() {
            assert!(PageMap::decode(&blob[..cut], 500, 1 << 20).is_err());
        }
        // Offsets past the stream's end are refused.
        assert!(PageMap::decode(&blob, 500, 90_000).is_err());
    }

    #[test]
    fn a_paused_save_maps_in_few_bytes() {
        // 4 GiB of pages sent in order with CONTINUE records: one run.
        let pages = 1u64 << 20;
        let mut b = Builder::new(&[pages * 4096], 4096);
        for p in 0..pages {
            b.data(0, p, 100 + p * 4104);
        }
        let m = b.finish(&[("pc.ram".into(), pages * 4096, None)], 4096).unwrap();
        assert_eq!(m.blocks[0].runs.len(), 1);
        assert!(m.encode().len() < 100);
    }

    #[test]
    fn claimed_sizes_cost_nothing_and_scattered_records_give_up() {
        // A block of 2^50 bytes, one page sent: one chunk.
        let mut b = Builder::new(&[1 << 50], 4096);
        b.zero(0, 1 << 37);
        b.discard(0, 0, u64::MAX);
        let m = b.finish(&[("big".into(), 1 << 50, None)], 4096).unwrap();
        assert_eq!(m.blocks[0].runs.len(), 0);
        // One record per chunk, far apart: refused once past the free chunks.
        let mut b = Builder::new(&[1 << 50], 4096);
        for i in 0..(FREE_CHUNKS as u64 * 2) {
            b.zero(0, i * CHUNK * 7);
        }
        assert!(b.finish(&[("big".into(), 1 << 50, None)], 4096).is_err());
        assert!(b.blocks[0].chunks.len() <= FREE_CHUNKS);
    }

    #[test]
    fn xbzrle_deltas_apply() {
        let mut page = vec![0u8; 16];
        // 2 unchanged, 3 changed (abc), 4 unchanged, 1 changed (z)
        xbzrle_apply(&mut page, &[2, 3, b'a', b'b', b'c', 4, 1, b'z'], 0).unwrap();
        assert_eq!(&page[..10], b"\0\0abc\0\0\0\0z");
        assert!(xbzrle_apply(&mut page, &[15, 3, 1, 2, 3], 0).is_err());
        assert!(xbzrle_apply(&mut page, &[0, 0], 0).is_err());
        assert!(xbzrle_apply(&mut page, &[0, 5, 1], 0).is_err());
        assert!(xbzrle_apply(&mut page, &[1, 1, 1, 0, 1, 1], 0).is_err());
    }
}
