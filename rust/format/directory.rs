//! The savedir section directory (format v1): encoder, decoder and checks.
//!
//! A directory is appended after a stream's last byte:
//!
//! ```text
//! D: 7d                       marker
//!    entry*                   the stream's own item headers, payload -> be64 pointer,
//!                             each optionally followed by 7c u8 algorithm be32 checksum
//!    7b be64(map)             optional: the RAM page map, stored between the
//!                             stream's end and D (see `pagemap`)
//!    00 be64(eof_ptr)         EOF entry
//!    7d be64(D)               DIRECTORY entry: the file's last 9 bytes
//! ```
//!
//! Checks 1 (trailer), 2 (directory) and 3 (cross-check) live here; they read
//! the tail, the directory and one header per entry, never the RAM.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::error::FormatError;
use super::reader::Reader;
use super::source::{Bytes, ReadAt, SourceError};
use super::stream::{Item, FOOTER_LEN, HEADER_LEN};
use super::vmdesc::VMDESC_HEADER;
use super::{show_bytes, tag, Header, Kind, STREAM_MAGIC, STREAM_VERSION};

/// Bytes of the fixed tail: the EOF entry and the DIRECTORY entry.
pub const TRAILER_LEN: u64 = 18;
/// Bytes of a checksum entry.
pub const CHECKSUM_LEN: u64 = 6;
/// Checksum algorithm 0x01: CRC-32C (Castagnoli).
pub const ALG_CRC32C: u8 = 0x01;

/// The validation steps of the format, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Trailer,
    Directory,
    CrossCheck,
    Deep,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Trailer => "trailer",
            Check::Directory => "directory",
            Check::CrossCheck => "cross-check",
            Check::Deep => "deep",
        }
    }
}

/// A failed check: which one, where, and what was expected and found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckError {
    pub check: Check,
    pub offset: Option<u64>,
    pub message: String,
}

impl CheckError {
    pub fn new(check: Check, offset: Option<u64>, message: impl Into<String>) -> Self {
        CheckError { check, offset, message: message.into() }
    }
}

impl std::error::Error for CheckError {}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} check failed at offset {}: {}", self.check.as_str(), o, self.message),
            None => write!(f, "{} check failed: {}", self.check.as_str(), self.message),
        }
    }
}

/// The fixed tail of an indexed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Offset of the directory marker (the stream's end).
    pub dir: u64,
    /// Offset of the stream's EOF byte.
    pub eof: u64,
    /// Length of the whole (virtual) file.
    pub len: u64,
}

/// One directory entry: the item it points to (its header, and its extent
/// as the pointers give it), and the checksum the directory stores for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub item: Item,
    pub crc32c: Option<u32>,
}

impl std::ops::Deref for Entry {
    type Target = Item;
    fn deref(&self) -> &Item {
        &self.item
    }
}

/// A decoded directory.
#[derive(Clone, Debug)]
pub struct Directory {
    pub trailer: Trailer,
    pub entries: Vec<Entry>,
    /// Where each entry's copy of its item header lies (absolute offsets).
    pub copies: Vec<u64>,
    /// Where the RAM page map lies, if the directory points at one: from
    /// this offset to the directory.
    pub ram_map: Option<u64>,
}

impl Directory {
    /// One past the stream's last byte: the RAM page map's start, or the directory's.
    pub fn stream_end(&self) -> u64 {
        self.ram_map.unwrap_or(self.trailer.dir)
    }
}

/// Builds the directory for `items` (a parse of a stream) that will start
/// at offset `dir`. `crcs`, when given, holds one checksum per item;
/// `ram_map`, where a RAM page map stands before the directory.
pub fn encode(items: &[Item], eof: u64, dir: u64, crcs: Option<&[u32]>, ram_map: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.len() * 32 + 32);
    out.push(tag::DIRECTORY);
    for (i, item) in items.iter().enumerate() {
        out.extend_from_slice(&item.header.encode());
        out.extend_from_slice(&item.offset.to_be_bytes());
        if let Some(c) = crcs {
            out.push(tag::CHECKSUM);
            out.push(ALG_CRC32C);
            out.extend_from_slice(&c[i].to_be_bytes());
        }
    }
    if let Some(m) = ram_map {
        out.push(tag::RAMMAP);
        out.extend_from_slice(&m.to_be_bytes());
    }
    out.push(tag::EOF);
    out.extend_from_slice(&eof.to_be_bytes());
    out.push(tag::DIRECTORY);
    out.extend_from_slice(&dir.to_be_bytes());
    out
}

/// How many bytes at a file's tail a reader takes in its first request: the
/// trailer and, for most saves, the whole directory.
pub const TAIL_READ: u64 = 64 << 10;

/// A file seen as a stream and a directory: the data file's bytes, and for
/// a sidecar its bytes, which stand for offsets `tail_at..` (the data
/// file's size on). For an appended directory there is no tail.
pub struct View<'a> {
    pub head: Bytes<'a>,
    pub tail: Option<Bytes<'a>>,
    pub tail_at: u64,
}

impl<'a> View<'a> {
    /// A file with its directory appended.
    pub fn appended(data: &'a dyn ReadAt) -> Self {
        View { head: Bytes::new(data), tail: None, tail_at: data.size() }
    }

    /// A data file and its sidecar directory.
    pub fn with_sidecar(data: &'a dyn ReadAt, sidecar: &'a dyn ReadAt) -> Self {
        View { head: Bytes::new(data), tail: Some(Bytes::new(sidecar)), tail_at: data.size() }
    }

    pub fn len(&self) -> u64 {
        match &self.tail {
            Some(t) => self.tail_at + t.len(),
            None => self.head.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn part(&self, at: u64) -> (&Bytes<'a>, u64) {
        match &self.tail {
            Some(t) if at >= self.tail_at => (t, at - self.tail_at),
            _ => (&self.head, at),
        }
    }

    /// Bytes `at..at + n`, which must lie wholly in the data file or wholly
    /// in the sidecar; `None` when they do not (or cannot be read).
    pub fn get(&self, at: u64, n: u64) -> Option<Cow<'a, [u8]>> {
        let (b, rel) = self.part(at);
        if self.tail.is_some() && at < self.tail_at && at.checked_add(n)? > self.tail_at {
            return None;
        }
        b.get(rel, n)
    }

    pub fn byte(&self, at: u64) -> Option<u8> {
        self.get(at, 1).map(|b| b[0])
    }

    pub fn be32(&self, at: u64) -> Option<u32> {
        self.get(at, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn be64(&self, at: u64) -> Option<u64> {
        let (b, rel) = self.part(at);
        b.be64(rel)
    }

    /// Reads ahead the ranges given, in few requests (see [`Bytes::prefetch`]).
    pub fn prefetch(&self, ranges: &[(u64, u64)]) {
        let mut head: Vec<(u64, u64)> = Vec::new();
        let mut tail: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in ranges {
            match &self.tail {
                Some(_) if s >= self.tail_at => tail.push((s - self.tail_at, e - self.tail_at)),
                Some(_) if e > self.tail_at => {
                    head.push((s, self.tail_at));
                    tail.push((0, e - self.tail_at));
                }
                _ => head.push((s, e)),
            }
        }
        self.head.prefetch(&mut head);
        if let Some(t) = &self.tail {
            t.prefetch(&mut tail);
        }
    }

    /// The first read that failed, if any: checks that failed after it
    /// failed for want of bytes, not because the file is wrong.
    pub fn take_error(&self) -> Option<SourceError> {
        self.head.take_error().or_else(|| self.tail.as_ref().and_then(|t| t.take_error()))
    }
}

/// Check 1: the trailer. `Err` means the file has no directory.
pub fn check_trailer(v: &View) -> Result<Trailer, CheckError> {
    let len = v.len();
    let fail = |off: Option<u64>, m: String| Err(CheckError::new(Check::Trailer, off, m));
    if len < TRAILER_LEN + 1 {
        return fail(None, format!("expected at least {} bytes, found {len}", TRAILER_LEN + 1));
    }
    v.prefetch(&[(len.saturating_sub(TAIL_READ), len)]);
    let eof_entry = len - TRAILER_LEN;
    let dir_entry = len - 9;
    match v.byte(eof_entry) {
        Some(tag::EOF) => {}
        b => return fail(Some(eof_entry), format!("expected the EOF entry (0x00), found {}", show_opt(b))),
    }
    match v.byte(dir_entry) {
        Some(tag::DIRECTORY) => {}
        b => return fail(Some(dir_entry), format!("expected the DIRECTORY entry (0x7d), found {}", show_opt(b))),
    }
    let dir = v.be64(dir_entry + 1).unwrap_or(u64::MAX);
    let eof = v.be64(eof_entry + 1).unwrap_or(u64::MAX);
    if dir >= eof_entry {
        return fail(Some(dir_entry + 1), format!("expected a directory pointer below {eof_entry}, found {dir}"));
    }
    if eof < dir {
        // One more request brings the vmdesc, the directory and the EOF byte.
        v.prefetch(&[(eof, len.saturating_sub(TAIL_READ))]);
    }
    match v.byte(dir) {
        Some(tag::DIRECTORY) => {}
        b => {
            return fail(
                Some(dir),
                format!("expected the directory marker (0x7d) where the pointer leads, found {}", show_opt(b)),
            )
        }
    }
    if eof >= dir {
        return fail(Some(eof_entry + 1), format!("expected an EOF pointer below the directory ({dir}), found {eof}"));
    }
    match v.byte(eof) {
        Some(tag::EOF) => {}
        b => {
            return fail(
                Some(eof),
                format!("expected the stream's EOF byte (0x00) where the EOF pointer leads, found {}", show_opt(b)),
            )
        }
    }
    Ok(Trailer { dir, eof, len })
}

fn show_opt(b: Option<u8>) -> String {
    b.map_or("nothing".to_owned(), |b| format!("0x{b:02x}"))
}

/// Check 2: decodes the directory that the trailer points to.
pub fn decode(v: &View, trailer: Trailer, stream_start: u64) -> Result<Directory, CheckError> {
    let end = trailer.len - TRAILER_LEN;
    let body = v.get(trailer.dir, end - trailer.dir).ok_or_else(|| {
        CheckError::new(Check::Directory, Some(trailer.dir), "the directory does not lie in one piece")
    })?;
    let mut r = Reader::with_base(&body, trailer.dir);
    let err = |at: u64, m: String| CheckError::new(Check::Directory, Some(at), m);
    r.u8("the directory marker").map_err(|e| err(e.offset, e.message))?;
    let mut entries: Vec<Entry> = Vec::new();
    let mut copies: Vec<u64> = Vec::new();
    let mut ram_map: Option<(u64, u64)> = None;
    while !r.is_empty() {
        let at = r.offset();
        if r.peek() == Some(tag::RAMMAP) {
            r.u8("a RAM page map entry").map_err(|e| err(e.offset, e.message))?;
            let ptr = r.be64("the RAM page map's pointer").map_err(|e| err(e.offset, e.message))?;
            if !r.is_empty() {
                return Err(err(at, "expected the RAM page map entry to be the last before the EOF entry".into()));
            }
            ram_map = Some((at, ptr));
            break;
        }
        match decode_entry(&mut r).map_err(|e| err(e.offset, e.message))? {
            Decoded::Entry(header, ptr) => {
                entries.push(Entry {
                    item: Item { header, offset: ptr, end: ptr, header_len: 1, footer_len: 0 },
                    crc32c: None,
                });
                copies.push(at);
            }
            Decoded::Checksum { alg, value } => {
                let Some(last) = entries.last_mut() else {
                    return Err(err(at, "expected an entry, found a checksum before any entry".into()));
                };
                if alg != ALG_CRC32C {
                    return Err(err(at + 1, format!("expected checksum algorithm 0x01 (CRC-32C), found 0x{alg:02x}")));
                }
                if last.crc32c.is_some() {
                    return Err(err(at, "found two CRC-32C checksums for one entry".into()));
                }
                last.crc32c = Some(value);
            }
        }
    }
    // Order and ranges. The map lies after the stream's last item.
    let stream_end = match ram_map {
        Some((at, ptr)) => {
            let after = entries.last().map_or(trailer.eof + 1, |e| e.offset.max(trailer.eof + 1));
            if ptr < after || ptr >= trailer.dir {
                return Err(err(
                    at,
                    format!(
                        "expected the RAM page map pointer from the stream's end to below the directory ({}), found {ptr}",
                        trailer.dir
                    ),
                ));
            }
            let blob = v
                .get(ptr, trailer.dir - ptr)
                .ok_or_else(|| err(ptr, "the RAM page map does not lie in one piece".into()))?;
            let len = super::pagemap::check_blob(&blob, ptr).map_err(|e| err(e.offset, e.message))?;
            if len != trailer.dir - ptr {
                return Err(err(
                    ptr + 16,
                    format!(
                        "expected the RAM page map to end where the directory begins ({}), found it ends at {}",
                        trailer.dir,
                        ptr + len
                    ),
                ));
            }
            ptr
        }
        None => trailer.dir,
    };
    let sections_from = stream_start + HEADER_LEN;
    let mut prev: Option<u64> = None;
    let n = entries.len();
    for (i, (e, &copy)) in entries.iter().zip(&copies).enumerate() {
        let ptr = e.offset;
        if let Some(p) = prev {
            if ptr <= p {
                return Err(err(copy, format!("expected pointers to increase, found {ptr} after {p}")));
            }
        }
        prev = Some(ptr);
        if e.kind == Kind::Vmdesc {
            if i + 1 != n {
                return Err(err(copy, "expected the vmdesc entry right before the EOF entry".into()));
            }
            if ptr <= trailer.eof || ptr >= stream_end {
                return Err(err(
                    copy,
                    format!(
                        "expected the vmdesc pointer between the EOF byte ({}) and the stream's end ({stream_end}), found {ptr}",
                        trailer.eof
                    ),
                ));
            }
        } else if ptr < sections_from || ptr >= trailer.eof {
            return Err(err(
                copy,
                format!("expected a pointer from {sections_from} to below the EOF byte ({}), found {ptr}", trailer.eof),
            ));
        }
    }
    // Extents: to the next pointer in file order, the last section to the
    // EOF byte, the vmdesc to the directory. PART and END entries carry only
    // an id: they take the name of their START.
    let mut opened: HashMap<u32, Header> = HashMap::new();
    for i in 0..n {
        let end = if entries[i].kind == Kind::Vmdesc {
            stream_end
        } else {
            match entries.get(i + 1) {
                Some(next) if next.kind != Kind::Vmdesc => next.offset,
                _ => trailer.eof,
            }
        };
        let item = &mut entries[i].item;
        item.end = end;
        item.header_len = match item.kind {
            Kind::Configuration => 1,
            Kind::Vmdesc => VMDESC_HEADER,
            _ => item.header.copy_len(),
        };
        match item.kind {
            Kind::Start | Kind::Full => {
                opened.insert(item.section_id, item.header.clone());
            }
            Kind::Part | Kind::End => {
                if let Some(h) = opened.get(&item.section_id) {
                    item.header.name = h.name.clone();
                    item.header.instance_id = h.instance_id;
                    item.header.version_id = h.version_id;
                }
            }
            _ => {}
        }
    }
    Ok(Directory { trailer, entries, copies, ram_map: ram_map.map(|(_, p)| p) })
}

enum Decoded {
    Entry(Header, u64),
    Checksum { alg: u8, value: u32 },
}

fn decode_entry(r: &mut Reader) -> super::error::Result<Decoded> {
    let at = r.offset();
    let t = r.u8("an entry type")?;
    let kind = match t {
        tag::CHECKSUM => {
            let alg = r.u8("a checksum algorithm")?;
            let value = r.be32("a checksum")?;
            return Ok(Decoded::Checksum { alg, value });
        }
        tag::EOF | tag::DIRECTORY => {
            return Err(FormatError::invalid(
                at,
                format!(
                    "expected an entry, found a second {} entry before the trailer",
                    if t == tag::EOF { "EOF" } else { "DIRECTORY" }
                ),
            ))
        }
        t => Kind::from_tag(t).ok_or_else(|| {
            FormatError::invalid(at, format!("expected an entry type, found the unknown type 0x{t:02x}"))
        })?,
    };
    let mut h = Header::new(kind);
    match kind {
        Kind::Configuration | Kind::Vmdesc => {}
        Kind::Start | Kind::Full => {
            h.section_id = r.be32("a section id")?;
            let name = r.cstr8("a section name")?;
            h.name = Some(Arc::from(String::from_utf8_lossy(name).as_ref()));
            h.instance_id = r.be32("an instance id")?;
            h.version_id = r.be32("a version id")?;
        }
        Kind::Part | Kind::End => h.section_id = r.be32("a section id")?,
        Kind::Command => {
            h.command = r.be16("a command number")?;
            h.command_len = r.be16("a command length")?;
        }
    }
    let ptr = r.be64("an entry's pointer")?;
    Ok(Decoded::Entry(h, ptr))
}

/// The ranges check 3 reads: the stream's header, and for every entry the
/// footer that ends the item before it and the header at its pointer.
fn cross_check_ranges(d: &Directory, stream_start: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = Vec::with_capacity(d.entries.len() + 2);
    r.push((stream_start, stream_start + HEADER_LEN));
    for e in &d.entries {
        let len = if e.kind == Kind::Vmdesc { VMDESC_HEADER } else { e.header.copy_len() };
        r.push((e.offset.saturating_sub(FOOTER_LEN), e.offset + len));
    }
    r.push((d.trailer.eof.saturating_sub(FOOTER_LEN), d.trailer.eof + 1));
    r
}

/// Check 3: each entry's header equals the bytes at its pointer, PART/END
/// continue an earlier START, and the stream begins with QEMU's magic.
/// Nearby headers are read together: a source where each read is a request
/// is asked a few times, not once per entry.
pub fn cross_check(v: &View, d: &Directory, stream_start: u64) -> Result<(), CheckError> {
    let err = |at: u64, m: String| Err(CheckError::new(Check::CrossCheck, Some(at), m));
    v.prefetch(&cross_check_ranges(d, stream_start));
    let magic = v.get(stream_start, HEADER_LEN);
    let mut want = STREAM_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&STREAM_VERSION.to_be_bytes());
    if magic.as_deref() != Some(&want[..]) {
        return err(
            stream_start,
            format!(
                "expected the stream to begin with \"QEVM\" and version 3, found \"{}\"",
                show_bytes(magic.as_deref().unwrap_or(&[]))
            ),
        );
    }
    let mut live: HashMap<u32, ()> = HashMap::new();
    for (e, &copy_at) in d.entries.iter().zip(&d.copies) {
        let len = e.header.copy_len();
        let copy = v.get(copy_at, len).expect("decoded entries lie in the directory");
        let found = v.get(e.offset, len);
        if found.as_deref() != Some(&copy[..]) {
            return err(
                e.offset,
                format!(
                    "expected the header of the {} entry at offset {copy_at} (\"{}\"), found \"{}\"",
                    e.kind.as_str(),
                    show_bytes(&copy),
                    show_bytes(found.as_deref().unwrap_or(&[]))
                ),
            );
        }
        match e.kind {
            Kind::Start => {
                live.insert(e.section_id, ());
            }
            Kind::Part | Kind::End if !live.contains_key(&e.section_id) => {
                return err(
                    e.offset,
                    format!(
                        "a {} section names section id {}, which no earlier START opened",
                        e.kind.as_str(),
                        e.section_id
                    ),
                );
            }
            _ => {}
        }
    }
    if let Some(vm) = d.entries.last().filter(|e| e.kind == Kind::Vmdesc) {
        // The vmdesc must end exactly where the directory begins.
        let len = match v.be32(vm.offset + 1) {
            Some(n) => n as u64,
            None => return err(vm.offset, "expected the vmdesc's length, found the end of the file".into()),
        };
        if vm.offset + VMDESC_HEADER + len != d.stream_end() {
            return err(
                vm.offset + 1,
                format!(
                    "expected the vmdesc to end where the {} begins ({}), found it ends at {}",
                    if d.ram_map.is_some() { "RAM page map" } else { "directory" },
                    d.stream_end(),
                    vm.offset + VMDESC_HEADER + len
                ),
            );
        }
    } else if d.trailer.eof + 1 != d.stream_end() {
        return err(
            d.trailer.eof + 1,
            format!(
                "expected the {} right after the EOF byte, found {} bytes between",
                if d.ram_map.is_some() { "RAM page map" } else { "directory" },
                d.stream_end() - d.trailer.eof - 1
            ),
        );
    }
    Ok(())
}

/// The RAM page map the directory points at, decoded and checked whole
/// (None when there is none).
pub fn read_page_map(v: &View, d: &Directory) -> Result<Option<super::pagemap::PageMap>, CheckError> {
    let Some(at) = d.ram_map else { return Ok(None) };
    let err = |e: FormatError| CheckError::new(Check::Directory, Some(e.offset), e.message);
    let blob = v
        .get(at, d.trailer.dir - at)
        .ok_or_else(|| CheckError::new(Check::Directory, Some(at), "the RAM page map does not lie in one piece"))?;
    let (map, _) = super::pagemap::PageMap::decode(&blob, at, at).map_err(err)?;
    Ok(Some(map))
}

impl Directory {
    /// The extent of each entry's item, `(start, end)`.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        self.entries.iter().map(|e| (e.offset, e.end)).collect()
    }

    /// Sets each section's footer length when every section ends in its own
    /// footer (the bytes were read by [`cross_check`]); returns whether so.
    pub fn detect_footers(&mut self, v: &View) -> bool {
        let footer_of = |e: &Entry| {
            e.size() >= e.header_len + FOOTER_LEN
                && v.byte(e.end - FOOTER_LEN) == Some(tag::FOOTER)
                && v.be32(e.end - 4) == Some(e.section_id)
        };
        let mut sections = self.entries.iter().filter(|e| e.kind.is_section()).peekable();
        let footers = sections.peek().is_some() && sections.all(footer_of);
        if footers {
            for e in self.entries.iter_mut().filter(|e| e.kind.is_section()) {
                e.item.footer_len = FOOTER_LEN;
            }
        }
        footers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::stream::{parse, tests::sample_stream, ParseOptions};

    fn indexed(crc: bool) -> Vec<u8> {
        let mut d = sample_stream(true);
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        let crcs: Vec<u32> = s.items.iter().map(|i| crc32c::crc32c(&d[i.offset as usize..i.end as usize])).collect();
        let dir = encode(&s.items, s.eof, d.len() as u64, if crc { Some(&crcs) } else { None }, None);
        // The rebuilt headers are the stream's own bytes.
        for i in &s.items {
            let h = i.header.encode();
            assert_eq!(&d[i.offset as usize..i.offset as usize + h.len()], &h[..]);
        }
        d.extend_from_slice(&dir);
        d
    }

    #[test]
    fn round_trip() {
        for crc in [false, true] {
            let d = indexed(crc);
            let v = View::appended(&d);
            let t = check_trailer(&v).unwrap();
            let dir = decode(&v, t, 0).unwrap();
            cross_check(&v, &dir, 0).unwrap();
            let s = parse(&d, ParseOptions::new(0, t.dir)).unwrap();
            assert_eq!(dir.entries.len(), s.items.len());
            for ((e, i), (a, b)) in dir.entries.iter().zip(&s.items).zip(dir.extents()) {
                assert_eq!(e.kind, i.kind);
                assert_eq!(e.offset, i.offset);
                assert_eq!((a, b), (i.offset, i.end));
                assert_eq!(e.crc32c.is_some(), crc);
            }
            assert_eq!(&d[d.len() - 18..d.len() - 17], &[0]);
        }
    }

    #[test]
    fn no_directory_is_a_trailer_failure() {
        let d = sample_stream(true);
        let e = check_trailer(&View::appended(&d)).unwrap_err();
        assert_eq!(e.check, Check::Trailer);
        assert!(check_trailer(&View::appended(&Vec::new())).is_err());
    }

    #[test]
    fn any_flip_in_the_directory_is_caught_or_harmless() {
        let d = indexed(true);
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        let start = s.end as usize;
        for i in start..d.len() {
            for bit in 0..8 {
                let mut m = d.clone();
                m[i] ^= 1 << bit;
                let v = View::appended(&m);
                let res = check_trailer(&v).and_then(|t| decode(&v, t, 0)).and_then(|dir| {
                    cross_check(&v, &dir, 0)?;
                    Ok(dir)
                });
                if let Ok(dir) = res {
                    // Only a checksum value may change undetected by checks 1-3.
                    let orig = decode(&View::appended(&d), check_trailer(&View::appended(&d)).unwrap(), 0).unwrap();
                    let strip = |d: &Directory| d.entries.iter().map(|e| (e.kind, e.offset)).collect::<Vec<_>>();
                    assert_eq!(strip(&dir), strip(&orig), "flip at {i} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn pointers_must_increase_and_stay_in_range() {
        let d = sample_stream(true);
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        let mut items = s.items.clone();
        items.swap(1, 2);
        let mut m = d.clone();
        m.extend_from_slice(&encode(&items, s.eof, d.len() as u64, None, None));
        let v = View::appended(&m);
        let e = decode(&v, check_trailer(&v).unwrap(), 0).unwrap_err();
        assert_eq!(e.check, Check::Directory);
        assert!(e.message.contains("increase"), "{}", e.message);
    }
}
