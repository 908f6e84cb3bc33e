//! The `ram` section: QEMU's live RAM handler and its records.
//!
//! Each START, PART and END payload of the `ram` section is a run of records,
//! each opened by a be64 word `offset_in_block | flags`, and closed by an EOS
//! record. The START payload opens with the RAMBlock list (MEM_SIZE). State
//! carries across sections: a CONTINUE record reuses the block named by the
//! last record that carried a block id, even in an earlier section.

use std::sync::Arc;

use super::error::{FormatError, Result};
use super::pagemap::{Builder, PageMap};
use super::reader::Reader;
use super::show_bytes;

pub const FLAG_FULL: u64 = 0x001;
pub const FLAG_ZERO: u64 = 0x002;
pub const FLAG_MEM_SIZE: u64 = 0x004;
pub const FLAG_PAGE: u64 = 0x008;
pub const FLAG_EOS: u64 = 0x010;
pub const FLAG_CONTINUE: u64 = 0x020;
pub const FLAG_XBZRLE: u64 = 0x040;
pub const FLAG_HOOK: u64 = 0x080;
pub const FLAG_COMPRESS_PAGE: u64 = 0x100;
pub const FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// Every bit a flag can use.
pub const FLAG_MASK: u64 = 0x3ff;

/// `ENCODING_FLAG_XBZRLE`
const XBZRLE_ENCODING: u8 = 0x01;
/// Bytes of a mapped-ram block header (`MappedRamHeader`, packed).
pub const MAPPED_RAM_HEADER: u64 = 28;
/// The mapped-ram header version QEMU writes and accepts.
const MAPPED_RAM_VERSION: u32 = 1;
/// The RAM section version QEMU writes and accepts.
pub const RAM_SECTION_VERSION: u32 = 4;

/// What the stream's configuration and commands say about the RAM grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamOptions {
    /// The target page size (4096 on x86).
    pub page_size: u64,
    /// Capability `mapped-ram`: per-block headers, pages at fixed file offsets.
    pub mapped_ram: bool,
    /// Capability `x-ignore-shared`: each block carries its region's address.
    pub ignore_shared: bool,
    /// Capability `postcopy-ram` (seen as a POSTCOPY_ADVISE with a page-size
    /// summary): hugepage blocks carry their page size.
    pub postcopy: bool,
    /// Whether to follow every page record into a page map (not for mapped-ram).
    pub page_map: bool,
}

impl Default for RamOptions {
    fn default() -> Self {
        RamOptions { page_size: 4096, mapped_ram: false, ignore_shared: false, postcopy: false, page_map: false }
    }
}

/// The mapped-ram header of one RAMBlock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedRam {
    pub page_size: u64,
    /// Absolute file offset of the block's page bitmap (0 when the block has no data).
    pub bitmap_offset: u64,
    /// Absolute file offset of the block's first page (0 when the block has no data).
    pub pages_offset: u64,
    /// Where the stream goes on after the block's page region (None when
    /// the block has no data in the file).
    pub next: Option<u64>,
}

/// One RAMBlock of the START section's block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub id: String,
    pub used_length: u64,
    /// The block's page size, sent only for hugepage blocks under postcopy.
    pub page_size: Option<u64>,
    /// The memory region's address, sent under `x-ignore-shared`.
    pub addr: Option<u64>,
    pub mapped: Option<MappedRam>,
}

/// What [`RamState::parse_record`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// The end-of-section record.
    Eos,
    /// Any other record.
    Other,
    /// A mapped-ram block header: the stream goes on at this absolute
    /// offset, after the block's page region (which the parser need not read).
    Jump(u64),
}

/// A block list (MEM_SIZE record) read block by block: a mapped-ram block's
/// header is followed by its page region, which the stream jumps over.
#[derive(Clone, Debug, Default)]
struct PendingList {
    total: u64,
    sum: u64,
    blocks: Vec<RamBlock>,
}

/// Counts of the records seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub xbzrle_pages: u64,
    pub compressed_pages: u64,
    pub flushes: u64,
}

/// The RAM handler's parse state, carried from section to section.
#[derive(Clone, Debug, Default)]
pub struct RamState {
    pub options: RamOptions,
    pub total: u64,
    pub blocks: Vec<RamBlock>,
    last_block: Option<usize>,
    pub stats: RamStats,
    pending: Option<PendingList>,
    /// The page map so far (with `options.page_map`, once the block list is read).
    map: Option<Arc<Builder>>,
}

impl RamState {
    pub fn new(options: RamOptions) -> Self {
        RamState { options, ..Default::default() }
    }

    /// Reads one section payload up to and including its EOS record, from
    /// a reader that holds the whole file (jumps are seeks).
    pub fn parse_payload(&mut self, r: &mut Reader) -> Result<()> {
        loop {
            match self.parse_record(r)? {
                Record::Eos => return Ok(()),
                Record::Other => {}
                Record::Jump(next) => {
                    r.seek(next).map_err(|e| e.context("a mapped-ram page region"))?;
                }
            }
        }
    }

    /// Reads one record. A record that fails (for example because the data
    /// ends inside it) leaves no trace: reading it again from its first byte
    /// with more data gives the same result as if it had been whole.
    pub fn parse_record(&mut self, r: &mut Reader) -> Result<Record> {
        if let Some(list) = self.pending.take() {
            let at = r.offset();
            return self.parse_blocks(r, list, at);
        }
        let page_size = self.options.page_size;
        let offset_mask = page_size - 1;
        let at = r.offset();
        let word = r.be64("a RAM record word")?;
        let flags = word & FLAG_MASK;
        if word & offset_mask & !FLAG_MASK != 0 {
            return Err(FormatError::invalid(
                at,
                format!("RAM record word 0x{word:016x} has bits set below the page size that are no flag"),
            ));
        }
        let addr = word & !offset_mask;
        match flags & !FLAG_CONTINUE {
            FLAG_EOS => return Ok(Record::Eos),
            FLAG_MEM_SIZE => {
                if !self.blocks.is_empty() {
                    return Err(FormatError::invalid(at, "found a second RAM block list (MEM_SIZE record)"));
                }
                return self.parse_blocks(r, PendingList { total: addr, ..Default::default() }, at);
            }
            FLAG_ZERO => {
                let block = self.block_for(r, flags, addr, at)?;
                let fill = r.u8("a zero page's fill byte")?;
                if fill != 0 {
                    return Err(FormatError::invalid(
                        r.offset() - 1,
                        format!("expected a zero page's fill byte 0x00, found 0x{fill:02x}"),
                    ));
                }
                self.last_block = Some(block);
                self.stats.zero_pages += 1;
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).zero(block, addr / page_size);
                }
            }
            FLAG_PAGE => {
                let block = self.block_for(r, flags, addr, at)?;
                let data_at = r.offset();
                r.skip(page_size, "a RAM page")?;
                self.last_block = Some(block);
                self.stats.pages += 1;
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).data(block, addr / page_size, data_at);
                }
            }
            FLAG_XBZRLE => {
                let block = self.block_for(r, flags, addr, at)?;
                let enc_at = r.offset();
                let enc = r.u8("an XBZRLE encoding byte")?;
                if enc != XBZRLE_ENCODING {
                    return Err(FormatError::invalid(
                        enc_at,
                        format!("expected the XBZRLE encoding byte 0x01, found 0x{enc:02x}"),
                    ));
                }
                let len_at = r.offset();
                let len = r.be16("an XBZRLE length")? as u64;
                if len > page_size {
                    return Err(FormatError::invalid(
                        len_at,
                        format!("an XBZRLE delta of {len} bytes is longer than a {page_size}-byte page"),
                    ));
                }
                let delta_at = r.offset();
                r.skip(len, "an XBZRLE delta")?;
                self.last_block = Some(block);
                self.stats.xbzrle_pages += 1;
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).xbzrle(block, addr / page_size, delta_at, len as u32);
                }
            }
            FLAG_COMPRESS_PAGE => {
                let block = self.block_for(r, flags, addr, at)?;
                let len_at = r.offset();
                let len = r.be32("a compressed page's length")? as u64;
                // zlib's compressBound for one page, with room to spare.
                if len > page_size + page_size / 8 + 64 {
                    return Err(FormatError::invalid(
                        len_at,
                        format!("a compressed page of {len} bytes is longer than zlib makes a {page_size}-byte page"),
                    ));
                }
                let data_at = r.offset();
                r.skip(len, "a compressed page")?;
                self.last_block = Some(block);
                self.stats.compressed_pages += 1;
                if let Some(m) = self.map.as_mut() {
                    Arc::make_mut(m).compressed(block, addr / page_size, data_at, len as u32);
                }
            }
            FLAG_MULTIFD_FLUSH => self.stats.flushes += 1,
            FLAG_HOOK => {
                return Err(FormatError::unsupported(
                    at,
                    "found an RDMA hook record (0x80), which only RDMA migration writes and no file holds",
                ))
            }
            _ => {
                return Err(FormatError::invalid(
                    at,
                    format!("expected a RAM record, found the unknown flag combination 0x{flags:03x}"),
                ))
            }
        }
        Ok(Record::Other)
    }

    fn start_map(&mut self) {
        if self.options.page_map && !self.options.mapped_ram {
            let lengths: Vec<u64> = self.blocks.iter().map(|b| b.used_length).collect();
            self.map = Some(Arc::new(Builder::new(&lengths, self.options.page_size)));
        }
    }

    /// Postcopy's RAM_DISCARD command (`body`, at absolute offset `at`):
    /// the pages it names lose their content.
    pub fn discard(&mut self, body: &[u8], at: u64) -> Result<()> {
        let mut r = Reader::with_base(body, at);
        let version = r.u8("a RAM_DISCARD version")?;
        if version != 0 {
            return Err(FormatError::invalid(at, format!("expected RAM_DISCARD version 0, found {version}")));
        }
        let id_at = r.offset();
        let id = r.cstr8("a RAM block id")?;
        let nil = r.u8("a RAM_DISCARD's nil byte")?;
        if nil != 0 {
            return Err(FormatError::invalid(r.offset() - 1, format!("expected a nil byte, found 0x{nil:02x}")));
        }
        let Some(block) = self.blocks.iter().position(|b| b.id.as_bytes() == id) else {
            return Err(FormatError::invalid(
                id_at,
                format!("RAM_DISCARD names the block \"{}\", which the block list does not have", show_bytes(id)),
            ));
        };
        if !r.remaining().is_multiple_of(16) {
            return Err(FormatError::invalid(r.offset(), "expected RAM_DISCARD ranges of 16 bytes each"));
        }
        let ps = self.options.page_size;
        while !r.is_empty() {
            let start = r.be64("a discarded range's start")?;
            let len = r.be64("a discarded range's length")?;
            if let Some(m) = self.map.as_mut() {
                // Whole pages only: QEMU discards host-page-aligned ranges.
                Arc::make_mut(m).discard(block, start / ps, len / ps);
            }
        }
        Ok(())
    }

    /// The page map of the records read so far (None unless asked for, or
    /// for mapped-ram); an error when the records were too scattered to map.
    pub fn page_map(&self) -> Option<Result<PageMap>> {
        let b = self.map.as_ref()?;
        let blocks: Vec<(String, u64, Option<u64>)> =
            self.blocks.iter().map(|b| (b.id.clone(), b.used_length, b.page_size)).collect();
        Some(b.finish(&blocks, self.options.page_size))
    }

    /// Resolves the block a page record refers to and checks the page offset.
    fn block_for(&self, r: &mut Reader, flags: u64, addr: u64, at: u64) -> Result<usize> {
        let idx = if flags & FLAG_CONTINUE != 0 {
            self.last_block.ok_or_else(|| {
                FormatError::invalid(at, "a RAM record says CONTINUE, but no earlier record named a block")
            })?
        } else {
            let id_at = r.offset();
            let id = r.cstr8("a RAM block id")?;
            self.blocks.iter().position(|b| b.id.as_bytes() == id).ok_or_else(|| {
                FormatError::invalid(
                    id_at,
                    format!("a RAM record names the block \"{}\", which the block list does not have", show_bytes(id)),
                )
            })?
        };
        let block = &self.blocks[idx];
        if addr >= block.used_length {
            return Err(FormatError::invalid(
                at,
                format!(
                    "a RAM record's offset 0x{addr:x} lies outside block \"{}\" ({} bytes)",
                    block.id, block.used_length
                ),
            ));
        }
        Ok(idx)
    }

    /// Reads blocks of a block list until it is complete, or until a
    /// mapped-ram block sends the stream past its page region. What is read
    /// is kept only when it is whole: on an error the state is as before.
    fn parse_blocks(&mut self, r: &mut Reader, mut list: PendingList, at: u64) -> Result<Record> {
        let total = list.total;
        while list.sum < total {
            let id_at = r.offset();
            let id = r.cstr8("a RAM block id")?;
            if id.is_empty() {
                return Err(FormatError::invalid(id_at, "expected a RAM block id, found an empty one"));
            }
            let id = String::from_utf8_lossy(id).into_owned();
            let len_at = r.offset();
            let used_length = r.be64("a RAM block's used length")?;
            list.sum = list.sum.checked_add(used_length).filter(|&s| s <= total).ok_or_else(|| {
                FormatError::invalid(
                    len_at,
                    format!("RAM block \"{id}\" ({used_length} bytes) makes the blocks longer than the {total} bytes the list announced"),
                )
            })?;
            let page_size = if self.options.postcopy { self.peek_block_page_size(r)? } else { None };
            let addr = if self.options.ignore_shared { Some(r.be64("a RAM block's address")?) } else { None };
            let mapped = if self.options.mapped_ram { Some(self.parse_mapped_ram(r, &id, used_length)?) } else { None };
            if list.blocks.len() >= 1 << 16 {
                return Err(FormatError::invalid(id_at, "more than 65536 RAM blocks"));
            }
            list.blocks.push(RamBlock { id, used_length, page_size, addr, mapped });
            if let Some(next) = mapped.and_then(|m| m.next) {
                // The stream goes on after the block's page region.
                if list.sum < total {
                    self.pending = Some(list);
                } else {
                    self.total = total;
                    self.blocks = list.blocks;
                    self.start_map();
                }
                return Ok(Record::Jump(next));
            }
        }
        let _ = at;
        self.total = total;
        self.blocks = list.blocks;
        self.start_map();
        Ok(Record::Other)
    }

    /// Under postcopy, a hugepage block's page size follows its length. The
    /// field is optional in the stream, so it is recognised by its value: a
    /// power of two from 8 KiB to 16 GiB, which no block id byte (a non-zero
    /// length) and no record word that can follow the list (EOS, flush) is.
    fn peek_block_page_size(&self, r: &mut Reader) -> Result<Option<u64>> {
        let Some(b) = r.peek_bytes(8) else {
            return Ok(None);
        };
        let v = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        if v.is_power_of_two() && (8192..=1 << 34).contains(&v) && v > self.options.page_size {
            r.skip(8, "a RAM block's page size")?;
            Ok(Some(v))
        } else {
            Ok(None)
        }
    }

    fn parse_mapped_ram(&self, r: &mut Reader, id: &str, used_length: u64) -> Result<MappedRam> {
        let at = r.offset();
        let version = r.be32("a mapped-ram header version")?;
        if version != MAPPED_RAM_VERSION {
            return Err(FormatError::invalid(
                at,
                format!("block \"{id}\": expected mapped-ram header version 1, found {version}"),
            ));
        }
        let page_size = r.be64("a mapped-ram page size")?;
        let bitmap_offset = r.be64("a mapped-ram bitmap offset")?;
        let pages_offset = r.be64("a mapped-ram pages offset")?;
        let header_end = r.offset();
        if bitmap_offset == 0 && pages_offset == 0 {
            // x-ignore-shared blocks have no data in the file.
            return Ok(MappedRam { page_size, bitmap_offset, pages_offset, next: None });
        }
        if page_size != self.options.page_size {
            return Err(FormatError::invalid(
                at + 4,
                format!("block \"{id}\": expected mapped-ram page size {}, found {page_size}", self.options.page_size),
            ));
        }
        let pages = used_length / page_size;
        let bitmap_size = pages.div_ceil(64) * 8;
        if bitmap_offset < header_end {
            return Err(FormatError::invalid(
                at + 12,
                format!("block \"{id}\": mapped-ram bitmap offset {bitmap_offset} lies before its own header's end ({header_end})"),
            ));
        }
        let bitmap_end = bitmap_offset.checked_add(bitmap_size);
        if pages_offset % page_size != 0 || bitmap_end.is_none_or(|e| pages_offset < e) {
            return Err(FormatError::invalid(
                at + 20,
                format!("block \"{id}\": mapped-ram pages offset {pages_offset} is not page-aligned after the bitmap"),
            ));
        }
        let next = pages_offset.checked_add(used_length).ok_or_else(|| {
            FormatError::invalid(at + 20, format!("block \"{id}\": mapped-ram page region overflows"))
        })?;
        Ok(MappedRam { page_size, bitmap_offset, pages_offset, next: Some(next) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(addr: u64, flags: u64) -> [u8; 8] {
        (addr | flags).to_be_bytes()
    }

    fn start_payload() -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&word(0x3000, FLAG_MEM_SIZE));
        d.push(6);
        d.extend_from_slice(b"pc.ram");
        d.extend_from_slice(&0x2000u64.to_be_bytes());
        d.push(3);
        d.extend_from_slice(b"rom");
        d.extend_from_slice(&0x1000u64.to_be_bytes());
        d.extend_from_slice(&word(0, FLAG_EOS));
        d
    }

    #[test]
    fn parses_block_list_and_pages() {
        let mut d = start_payload();
        let part_at = d.len();
        d.extend_from_slice(&word(0x1000, FLAG_PAGE));
        d.push(6);
        d.extend_from_slice(b"pc.ram");
        d.extend_from_slice(&[0xab; 4096]);
        d.extend_from_slice(&word(0, FLAG_ZERO | FLAG_CONTINUE));
        d.push(0);
        d.extend_from_slice(&word(0, FLAG_MULTIFD_FLUSH));
        d.extend_from_slice(&word(0, FLAG_EOS));
        let mut st = RamState::new(RamOptions::default());
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        assert_eq!(r.offset() as usize, part_at);
        assert_eq!(st.blocks.len(), 2);
        st.parse_payload(&mut r).unwrap();
        assert!(r.is_empty());
        assert_eq!(st.stats, RamStats { pages: 1, zero_pages: 1, xbzrle_pages: 0, compressed_pages: 0, flushes: 1 });
    }

    #[test]
    fn continue_without_block_and_bad_offsets_fail() {
        let mut d = start_payload();
        d.extend_from_slice(&word(0, FLAG_ZERO | FLAG_CONTINUE));
        d.push(0);
        let mut st = RamState::new(RamOptions::default());
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        let e = st.parse_payload(&mut r).unwrap_err();
        assert!(e.message.contains("CONTINUE"), "{}", e.message);

        let mut d = start_payload();
        d.extend_from_slice(&word(0x1000, FLAG_ZERO));
        d.push(3);
        d.extend_from_slice(b"rom");
        d.push(0);
        let mut st = RamState::new(RamOptions::default());
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        let e = st.parse_payload(&mut r).unwrap_err();
        assert!(e.message.contains("outside block"), "{}", e.message);
    }

    #[test]
    fn unknown_flags_and_oversized_lengths_fail() {
        let mut d = start_payload();
        d.extend_from_slice(&word(0, FLAG_PAGE | FLAG_ZERO));
        let mut st = RamState::new(RamOptions::default());
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        assert!(st.parse_payload(&mut r).unwrap_err().message.contains("unknown flag"));

        let mut d = word(!FLAG_MASK, FLAG_MEM_SIZE).to_vec();
        d.push(1);
        d.push(b'a');
        d.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut st = RamState::new(RamOptions::default());
        assert!(st.parse_payload(&mut Reader::new(&d)).is_err());
    }

    #[test]
    fn postcopy_hugepage_blocks_carry_their_page_size() {
        // Under postcopy-ram a hugepage block sends its page size after its
        // length; a block of ordinary pages (and the list's end) does not.
        let opts = RamOptions { postcopy: true, ..RamOptions::default() };
        let mut d = word(0x401000, FLAG_MEM_SIZE).to_vec();
        d.push(4);
        d.extend_from_slice(b"huge");
        d.extend_from_slice(&0x400000u64.to_be_bytes());
        d.extend_from_slice(&0x200000u64.to_be_bytes()); // 2 MiB pages
        d.push(3);
        d.extend_from_slice(b"rom");
        d.extend_from_slice(&0x1000u64.to_be_bytes());
        d.extend_from_slice(&word(0, FLAG_EOS));
        let mut st = RamState::new(opts);
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        assert!(r.is_empty());
        assert_eq!(st.blocks[0].page_size, Some(0x200000));
        assert_eq!(st.blocks[1].page_size, None);
    }

    #[test]
    fn mapped_ram_seeks_past_page_region() {
        let opts = RamOptions { mapped_ram: true, ..RamOptions::default() };
        let mut d = word(0x2000, FLAG_MEM_SIZE).to_vec();
        d.push(1);
        d.push(b'm');
        d.extend_from_slice(&0x2000u64.to_be_bytes());
        let hdr_at = d.len() as u64;
        let bitmap = hdr_at + MAPPED_RAM_HEADER;
        let pages = 0x10000u64;
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&4096u64.to_be_bytes());
        d.extend_from_slice(&bitmap.to_be_bytes());
        d.extend_from_slice(&pages.to_be_bytes());
        d.resize((pages + 0x2000) as usize, 0);
        d.extend_from_slice(&word(0, FLAG_EOS));
        let mut st = RamState::new(opts);
        let mut r = Reader::new(&d);
        st.parse_payload(&mut r).unwrap();
        assert!(r.is_empty());
        assert_eq!(st.blocks[0].mapped.unwrap().pages_offset, pages);
    }
}
