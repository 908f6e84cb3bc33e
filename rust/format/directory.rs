//! The savedir section directory (format v1): encoder, decoder and checks.
//!
//! A directory is appended after a stream's last byte:
//!
//! ```text
//! D: 7d                       marker
//!    entry*                   the stream's own item headers, payload -> be64 pointer,
//!                             each optionally followed by 7c u8 algorithm be32 checksum
//!    00 be64(eof_ptr)         EOF entry
//!    7d be64(D)               DIRECTORY entry: the file's last 9 bytes
//! ```
//!
//! Checks 1 (trailer), 2 (directory) and 3 (cross-check) live here; they read
//! the tail, the directory and one header per entry, never the RAM.

use std::sync::Arc;

use super::reader::{be64_at, byte_at, slice, Reader};
use super::stream::{Item, HEADER_LEN};
use super::{show_bytes, tag, Kind, STREAM_MAGIC, STREAM_VERSION};

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

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Absolute offset of the item's type byte.
    pub ptr: u64,
    pub section_id: u32,
    pub name: Option<Arc<str>>,
    pub instance_id: u32,
    pub version_id: u32,
    pub command: u16,
    pub command_len: u16,
    pub crc32c: Option<u32>,
    /// Where this entry's copy of the item header lies (absolute offsets).
    pub header_at: u64,
    pub header_len: u64,
}

/// A decoded directory.
#[derive(Clone, Debug)]
pub struct Directory {
    pub trailer: Trailer,
    pub entries: Vec<Entry>,
}

/// Bytes of the item header that a directory entry copies.
pub fn entry_header_len(item: &Item) -> u64 {
    match item.kind {
        Kind::Configuration | Kind::Vmdesc => 1,
        _ => item.header_len,
    }
}

/// The item header that a directory entry copies, rebuilt from the item's
/// fields (section names are ASCII, so this is the stream's own bytes).
pub fn entry_header(item: &Item) -> Vec<u8> {
    let mut h = vec![item.kind.tag()];
    match item.kind {
        Kind::Configuration | Kind::Vmdesc => {}
        Kind::Start | Kind::Full => {
            let name = item.name.as_deref().unwrap_or("").as_bytes();
            h.extend_from_slice(&item.section_id.to_be_bytes());
            h.push(name.len() as u8);
            h.extend_from_slice(name);
            h.extend_from_slice(&item.instance_id.to_be_bytes());
            h.extend_from_slice(&item.version_id.to_be_bytes());
        }
        Kind::Part | Kind::End => h.extend_from_slice(&item.section_id.to_be_bytes()),
        Kind::Command => {
            h.extend_from_slice(&item.command.to_be_bytes());
            h.extend_from_slice(&item.command_len.to_be_bytes());
        }
    }
    h
}

/// Builds the directory for `items` (a parse of a stream) that will start
/// at offset `dir`. `crcs`, when given, holds one checksum per item.
pub fn encode(items: &[Item], eof: u64, dir: u64, crcs: Option<&[u32]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.len() * 32 + 32);
    out.push(tag::DIRECTORY);
    for (i, item) in items.iter().enumerate() {
        out.extend_from_slice(&entry_header(item));
        out.extend_from_slice(&item.offset.to_be_bytes());
        if let Some(c) = crcs {
            out.push(tag::CHECKSUM);
            out.push(ALG_CRC32C);
            out.extend_from_slice(&c[i].to_be_bytes());
        }
    }
    out.push(tag::EOF);
    out.extend_from_slice(&eof.to_be_bytes());
    out.push(tag::DIRECTORY);
    out.extend_from_slice(&dir.to_be_bytes());
    out
}

/// A file seen as a stream and a directory: `head` holds offsets `0..head.len()`
/// and `tail` holds `tail_at..tail_at + tail.len()`. For an appended
/// directory both are the same mapping; for a sidecar, `tail` is its bytes.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub head: &'a [u8],
    pub tail: &'a [u8],
    pub tail_at: u64,
}

impl<'a> View<'a> {
    /// A file with its directory appended.
    pub fn appended(data: &'a [u8]) -> Self {
        View { head: data, tail: data, tail_at: 0 }
    }

    pub fn len(&self) -> u64 {
        self.tail_at + self.tail.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn byte(&self, at: u64) -> Option<u8> {
        if at >= self.tail_at {
            byte_at(self.tail, at - self.tail_at)
        } else {
            byte_at(self.head, at)
        }
    }

    fn be64(&self, at: u64) -> Option<u64> {
        if at >= self.tail_at {
            be64_at(self.tail, at - self.tail_at)
        } else {
            be64_at(self.head, at)
        }
    }

    /// Bytes `start..end`, which must lie wholly in the head or in the tail.
    pub fn slice(&self, start: u64, end: u64) -> Option<&'a [u8]> {
        if start >= self.tail_at {
            slice(self.tail, start - self.tail_at, end - self.tail_at)
        } else {
            slice(self.head, start, end)
        }
    }
}

/// Check 1: the trailer. `Err` means the file has no directory.
pub fn check_trailer(v: &View) -> Result<Trailer, CheckError> {
    let len = v.len();
    let fail = |off: Option<u64>, m: String| Err(CheckError::new(Check::Trailer, off, m));
    if len < TRAILER_LEN + 1 {
        return fail(None, format!("expected at least {} bytes, found {len}", TRAILER_LEN + 1));
    }
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
    let body = v.slice(trailer.dir, end).ok_or_else(|| {
        CheckError::new(Check::Directory, Some(trailer.dir), "the directory does not lie in one piece")
    })?;
    let mut r = Reader::with_base(body, trailer.dir);
    let err = |at: u64, m: String| CheckError::new(Check::Directory, Some(at), m);
    r.u8("the directory marker").map_err(|e| err(e.offset, e.message))?;
    let mut entries: Vec<Entry> = Vec::new();
    while !r.is_empty() {
        let at = r.offset();
        let e = decode_entry(&mut r).map_err(|e| err(e.offset, e.message))?;
        let e = match e {
            Decoded::Entry(e) => e,
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
                continue;
            }
        };
        entries.push(e);
    }
    // Order and ranges.
    let sections_from = stream_start + HEADER_LEN;
    let mut prev: Option<u64> = None;
    let n = entries.len();
    for (i, e) in entries.iter().enumerate() {
        if let Some(p) = prev {
            if e.ptr <= p {
                return Err(err(e.header_at, format!("expected pointers to increase, found {} after {p}", e.ptr)));
            }
        }
        prev = Some(e.ptr);
        if e.kind == Kind::Vmdesc {
            if i + 1 != n {
                return Err(err(e.header_at, "expected the vmdesc entry right before the EOF entry".into()));
            }
            if e.ptr <= trailer.eof || e.ptr >= trailer.dir {
                return Err(err(
                    e.header_at,
                    format!(
                        "expected the vmdesc pointer between the EOF byte ({}) and the directory ({}), found {}",
                        trailer.eof, trailer.dir, e.ptr
                    ),
                ));
            }
        } else if e.ptr < sections_from || e.ptr >= trailer.eof {
            return Err(err(
                e.header_at,
                format!(
                    "expected a pointer from {sections_from} to below the EOF byte ({}), found {}",
                    trailer.eof, e.ptr
                ),
            ));
        }
    }
    Ok(Directory { trailer, entries })
}

enum Decoded {
    Entry(Entry),
    Checksum { alg: u8, value: u32 },
}

fn decode_entry(r: &mut Reader) -> super::error::Result<Decoded> {
    let header_at = r.offset();
    let t = r.u8("an entry type")?;
    let mut e = Entry {
        kind: Kind::Configuration,
        ptr: 0,
        section_id: 0,
        name: None,
        instance_id: 0,
        version_id: 0,
        command: 0,
        command_len: 0,
        crc32c: None,
        header_at,
        header_len: 1,
    };
    match t {
        tag::CHECKSUM => {
            let alg = r.u8("a checksum algorithm")?;
            let value = r.be32("a checksum")?;
            return Ok(Decoded::Checksum { alg, value });
        }
        tag::CONFIGURATION | tag::VMDESC => {}
        tag::START | tag::FULL => {
            e.section_id = r.be32("a section id")?;
            let name = r.cstr8("a section name")?;
            e.name = Some(Arc::from(String::from_utf8_lossy(name).as_ref()));
            e.instance_id = r.be32("an instance id")?;
            e.version_id = r.be32("a version id")?;
        }
        tag::PART | tag::END => e.section_id = r.be32("a section id")?,
        tag::COMMAND => {
            e.command = r.be16("a command number")?;
            e.command_len = r.be16("a command length")?;
        }
        tag::EOF | tag::DIRECTORY => {
            return Err(super::error::FormatError::invalid(
                header_at,
                format!(
                    "expected an entry, found a second {} entry before the trailer",
                    if t == tag::EOF { "EOF" } else { "DIRECTORY" }
                ),
            ))
        }
        _ => {
            return Err(super::error::FormatError::invalid(
                header_at,
                format!("expected an entry type, found the unknown type 0x{t:02x}"),
            ))
        }
    }
    e.kind = Kind::from_tag(t).expect("a known type");
    e.header_len = r.offset() - header_at;
    e.ptr = r.be64("an entry's pointer")?;
    Ok(Decoded::Entry(e))
}

/// Check 3: each entry's header equals the bytes at its pointer, PART/END
/// continue an earlier START, and the stream begins with QEMU's magic.
pub fn cross_check(v: &View, d: &Directory, stream_start: u64) -> Result<(), CheckError> {
    let err = |at: u64, m: String| Err(CheckError::new(Check::CrossCheck, Some(at), m));
    let magic = v.slice(stream_start, stream_start + HEADER_LEN);
    let mut want = STREAM_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&STREAM_VERSION.to_be_bytes());
    if magic != Some(&want[..]) {
        return err(
            stream_start,
            format!(
                "expected the stream to begin with \"QEVM\" and version 3, found \"{}\"",
                show_bytes(magic.unwrap_or(&[]))
            ),
        );
    }
    let mut live: std::collections::HashMap<u32, Arc<str>> = std::collections::HashMap::new();
    for e in &d.entries {
        let copy = v.slice(e.header_at, e.header_at + e.header_len).expect("decoded entries lie in the directory");
        let found = v.slice(e.ptr, e.ptr + e.header_len);
        if found != Some(copy) {
            return err(
                e.ptr,
                format!(
                    "expected the header of the {} entry at offset {} (\"{}\"), found \"{}\"",
                    e.kind.as_str(),
                    e.header_at,
                    show_bytes(copy),
                    show_bytes(found.unwrap_or(&[]))
                ),
            );
        }
        match e.kind {
            Kind::Start => {
                live.insert(e.section_id, e.name.clone().unwrap_or_else(|| Arc::from("")));
            }
            Kind::Part | Kind::End if !live.contains_key(&e.section_id) => {
                return err(
                    e.ptr,
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
        let len = match v.slice(vm.ptr + 1, vm.ptr + 5) {
            Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64,
            None => return err(vm.ptr, "expected the vmdesc's length, found the end of the file".into()),
        };
        if vm.ptr + 5 + len != d.trailer.dir {
            return err(
                vm.ptr + 1,
                format!(
                    "expected the vmdesc to end where the directory begins ({}), found it ends at {}",
                    d.trailer.dir,
                    vm.ptr + 5 + len
                ),
            );
        }
    } else if d.trailer.eof + 1 != d.trailer.dir {
        return err(
            d.trailer.eof + 1,
            format!(
                "expected the directory right after the EOF byte, found {} bytes between",
                d.trailer.dir - d.trailer.eof - 1
            ),
        );
    }
    Ok(())
}

impl Directory {
    /// The extent of each entry's item: to the next pointer in file order, the
    /// last section to the EOF byte, the vmdesc by its length field.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let n = self.entries.len();
        let mut out = Vec::with_capacity(n);
        for (i, e) in self.entries.iter().enumerate() {
            let end = if e.kind == Kind::Vmdesc {
                self.trailer.dir
            } else {
                match self.entries.get(i + 1) {
                    Some(next) if next.kind != Kind::Vmdesc => next.ptr,
                    _ => self.trailer.eof,
                }
            };
            out.push((e.ptr, end));
        }
        out
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
        let dir = encode(&s.items, s.eof, d.len() as u64, if crc { Some(&crcs) } else { None });
        // The rebuilt headers are the stream's own bytes.
        for i in &s.items {
            let h = entry_header(i);
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
                assert_eq!(e.ptr, i.offset);
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
        assert!(check_trailer(&View::appended(&[])).is_err());
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
                    let strip = |d: &Directory| d.entries.iter().map(|e| (e.kind, e.ptr)).collect::<Vec<_>>();
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
        m.extend_from_slice(&encode(&items, s.eof, d.len() as u64, None));
        let v = View::appended(&m);
        let e = decode(&v, check_trailer(&v).unwrap(), 0).unwrap_err();
        assert_eq!(e.check, Check::Directory);
        assert!(e.message.contains("increase"), "{}", e.message);
    }
}
