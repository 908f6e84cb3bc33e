//! Device state of an open save (`savedir state`, `savedir regs`) and the
//! difference between two saves (`savedir diff`).
//!
//! Only the sections asked for are read, through the directory when the
//! file has one: a device section's payload and the vmdesc, never the RAM.

use std::borrow::Cow;

use crate::format::error::FormatError;
use crate::format::ram::{RamBlock, RamOptions, RamState, Record};
use crate::format::reader::Reader;
use crate::format::vmstate::diff::{diff as diff_fields, FieldDiff};
use crate::format::vmstate::x86::X86Cpu;
use crate::format::vmstate::{decode, Fields, StateDesc, Vmsd};
use crate::format::Kind;

use super::error::{Error, Result};
use super::open::{Entry, SaveFile};

/// Bytes compared at a time when two sections' payloads are compared.
const COMPARE_CHUNK: u64 = 8 << 20;

/// Reads and compiles the vmdesc of `f`.
pub fn load_desc(f: &SaveFile) -> Result<StateDesc> {
    let Some(loc) = f.vmdesc else {
        return Err(Error::format(
            &f.path,
            FormatError::unsupported(
                f.eof,
                "the stream has no vmdesc (QEMU's description of its device sections), so its device state cannot be decoded",
            ),
        ));
    };
    let json = f.vmdesc_json()?.unwrap_or(Cow::Borrowed(&[]));
    StateDesc::parse(&json, loc.offset + crate::format::vmdesc::VMDESC_HEADER).map_err(|e| Error::format(&f.path, e))
}

/// One section of a stream: a device (FULL) section or the configuration
/// (one item), or a live section (START, PARTs, END).
#[derive(Clone, Debug)]
pub struct Section<'f> {
    pub items: Vec<&'f Entry>,
}

impl<'f> Section<'f> {
    pub fn opener(&self) -> &'f Entry {
        self.items[0]
    }

    pub fn name(&self) -> &'f str {
        match self.opener().kind {
            Kind::Configuration => "configuration",
            _ => self.opener().name.as_deref().unwrap_or(""),
        }
    }

    pub fn live(&self) -> bool {
        self.opener().kind == Kind::Start
    }

    /// Payload bytes of all its items.
    pub fn payload_size(&self) -> u64 {
        self.items.iter().map(|e| e.payload_end() - e.payload_start()).sum()
    }

    /// `device "cpu" instance 1` (for messages).
    pub fn label(&self) -> String {
        match self.opener().kind {
            Kind::Configuration => "the configuration section".into(),
            _ => format!("device \"{}\" instance {}", self.name(), self.opener().instance_id),
        }
    }
}

/// Every section of `f` in stream order: the configuration, device sections
/// and live sections (each with its PARTs and END).
pub fn sections(f: &SaveFile) -> Vec<Section<'_>> {
    let mut out: Vec<Section<'_>> = Vec::new();
    let mut live = std::collections::HashMap::new();
    for e in &f.entries {
        match e.kind {
            Kind::Configuration | Kind::Full => out.push(Section { items: vec![e] }),
            Kind::Start => {
                live.insert(e.section_id, out.len());
                out.push(Section { items: vec![e] });
            }
            Kind::Part | Kind::End => {
                if let Some(&i) = live.get(&e.section_id) {
                    out[i].items.push(e);
                }
            }
            Kind::Command | Kind::Vmdesc => {}
        }
    }
    out
}

/// The description of a device section or the configuration.
pub fn vmsd_of<'d>(f: &SaveFile, desc: &'d StateDesc, s: &Section<'_>) -> Result<&'d Vmsd> {
    let e = s.opener();
    let fail = |m: String| Error::format(&f.path, FormatError::invalid(e.offset, format!("{}: {m}", s.label())));
    let vmsd = match e.kind {
        Kind::Configuration => desc.configuration.as_ref().ok_or_else(|| {
            Error::format(
                &f.path,
                FormatError::unsupported(
                    e.offset,
                    "the vmdesc does not describe the configuration section (QEMU before 8.2 leaves it out)",
                ),
            )
        })?,
        Kind::Full => {
            let d = desc
                .device(s.name(), e.instance_id)
                .ok_or_else(|| fail(format!("the vmdesc at offset {} has no entry for this section", desc.at)))?;
            &d.vmsd
        }
        _ => {
            return Err(Error::format(
                &f.path,
                FormatError::unsupported(
                    e.offset,
                    format!(
                        "section \"{}\" is a live section: its payload is the handler's own records, which the vmdesc \
                         does not describe",
                        s.name()
                    ),
                ),
            ))
        }
    };
    let vmsd = vmsd.as_ref().map_err(|m| fail(format!("its vmdesc entry cannot be used: {m}")))?;
    if e.kind == Kind::Full {
        if let Some(v) = vmsd.version {
            if v != e.version_id {
                return Err(fail(format!(
                    "the section's header says version {}, its vmdesc entry version {v}",
                    e.version_id
                )));
            }
        }
    }
    Ok(vmsd)
}

/// The payload of a one-item section: borrowed from the mapping, else read.
pub fn payload<'f>(f: &'f SaveFile, s: &Section<'_>) -> Result<Cow<'f, [u8]>> {
    let e = s.opener();
    f.read(e.payload_start(), e.payload_end())
}

/// Decodes a device section or the configuration whose payload is `bytes`.
pub fn decode_section<'a>(f: &SaveFile, vmsd: &'a Vmsd, s: &Section<'_>, bytes: &'a [u8]) -> Result<Fields<'a>> {
    decode(vmsd, bytes, s.opener().payload_start(), &s.label()).map_err(|e| Error::format(&f.path, e))
}

/// What savedir can say of a live section without decoding it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveInfo {
    pub items: usize,
    pub payload_size: u64,
    /// The RAM section's blocks (from the block list its START opens with).
    pub ram_blocks: Option<Vec<RamBlock>>,
}

/// Describes a live section: its items and bytes, and for `ram` its block
/// list (read from the START payload alone: the pages are not touched).
pub fn live_info(f: &SaveFile, desc: Option<&StateDesc>, s: &Section<'_>) -> Result<LiveInfo> {
    let mut info = LiveInfo { items: s.items.len(), payload_size: s.payload_size(), ram_blocks: None };
    if s.name() == "ram" {
        info.ram_blocks = Some(ram_blocks(f, desc, s)?);
    }
    Ok(info)
}

/// The RAM block list at the start of the `ram` section's START payload.
fn ram_blocks(f: &SaveFile, desc: Option<&StateDesc>, s: &Section<'_>) -> Result<Vec<RamBlock>> {
    let e = s.opener();
    let mut options = RamOptions::default();
    for cap in capabilities(f, desc) {
        match cap.as_str() {
            "mapped-ram" => options.mapped_ram = true,
            "x-ignore-shared" => options.ignore_shared = true,
            _ => {}
        }
    }
    options.postcopy = f.entries.iter().any(|c| c.kind == Kind::Command && c.command == 3);
    // The block list is a MEM_SIZE record: the list's length word, then per
    // block its id and used length (and for mapped-ram a header, after which
    // the stream jumps over the block's page region). Read it a window at a
    // time, from the START payload and from where each jump lands.
    let end = e.payload_end();
    let mut at = e.payload_start();
    let mut window = 1 << 20;
    let mut st = RamState::new(options);
    for _ in 0..=(1 << 16) {
        let bytes = f.read(at, end.min(at + window))?;
        let mut r = Reader::with_base(&bytes, at);
        match st.parse_record(&mut r) {
            Ok(Record::Jump(next)) if st.blocks.is_empty() && (at..end).contains(&next) => {
                at = next;
                window = 64 << 10;
            }
            Ok(_) => return Ok(st.blocks),
            Err(err) => return Err(Error::format(&f.path, err.context("the RAM section's block list"))),
        }
    }
    Err(Error::format(&f.path, FormatError::invalid(at, "the RAM section's block list does not end")))
}

/// The migration capabilities the configuration section names (through the
/// vmdesc, which describes it from QEMU 8.2 on).
fn capabilities(f: &SaveFile, desc: Option<&StateDesc>) -> Vec<String> {
    let Some(desc) = desc else { return Vec::new() };
    let all = sections(f);
    let Some(conf) = all.iter().find(|s| s.opener().kind == Kind::Configuration) else { return Vec::new() };
    let Ok(vmsd) = vmsd_of(f, desc, conf) else { return Vec::new() };
    let Ok(bytes) = payload(f, conf) else { return Vec::new() };
    let Ok(fields) = decode_section(f, vmsd, conf, &bytes) else { return Vec::new() };
    let Some(crate::format::vmstate::Value::Map(caps)) = fields.get("configuration/capabilities") else {
        return Vec::new();
    };
    let names = match caps.get("capabilities") {
        Some(crate::format::vmstate::Value::List(l)) => l.iter().collect::<Vec<_>>(),
        Some(v) => vec![v],
        None => Vec::new(),
    };
    names
        .into_iter()
        .filter_map(|v| match v {
            crate::format::vmstate::Value::Str(s) => Some(s.to_string()),
            _ => None,
        })
        .collect()
}

/// The registers of every vCPU (every `cpu` section, by index).
pub fn cpus(f: &SaveFile, desc: &StateDesc) -> Result<Vec<X86Cpu>> {
    let mut out = Vec::new();
    for s in sections(f) {
        if s.opener().kind != Kind::Full || s.name() != "cpu" {
            continue;
        }
        let vmsd = vmsd_of(f, desc, &s)?;
        let bytes = payload(f, &s)?;
        let fields = decode_section(f, vmsd, &s, &bytes)?;
        let cpu = X86Cpu::from_fields(s.opener().instance_id, &fields).map_err(|m| {
            Error::format(&f.path, FormatError::unsupported(s.opener().offset, format!("{}: {m}", s.label())))
        })?;
        out.push(cpu);
    }
    if out.is_empty() {
        return Err(Error::NotFound { path: f.path.clone(), message: "the save has no x86 \"cpu\" section".into() });
    }
    out.sort_by_key(|c| c.index);
    Ok(out)
}

/// Where two sections' bytes first differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstDifference {
    /// Offset into the section's payload (its items' payloads joined;
    /// for `ram`, less the EOS record that ends each item).
    pub at: u64,
    /// The absolute file offsets of that byte in each file (None past the
    /// end of the shorter payload).
    pub offset_a: Option<u64>,
    pub offset_b: Option<u64>,
}

/// How the RAM of two saves differs, page by page: the seam for the page
/// maps of a RAM index. Until one is at hand [`SectionDiff::pages`] is None
/// and only the bytes are compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageDiff {
    pub pages: u64,
    /// Guest-physical ranges `[start, end)` of the pages that differ.
    pub ranges: Vec<(u64, u64)>,
}

/// A section that both saves have and whose bytes differ.
#[derive(Clone, Debug, PartialEq)]
pub struct SectionDiff {
    pub name: String,
    pub instance_id: u32,
    pub live: bool,
    pub section_id: (u32, u32),
    pub version_id: (u32, u32),
    pub payload_size: (u64, u64),
    pub first_difference: Option<FirstDifference>,
    /// For device sections and the configuration: the fields that differ
    /// (None when a side cannot be decoded: see `error`).
    pub fields: Option<Vec<FieldDiff>>,
    pub error: Option<String>,
    pub pages: Option<PageDiff>,
}

/// A section only one save has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionKey {
    pub name: String,
    pub instance_id: u32,
    pub live: bool,
}

/// The difference between two saves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiffReport {
    pub only_in_a: Vec<SectionKey>,
    pub only_in_b: Vec<SectionKey>,
    pub sections: Vec<SectionDiff>,
}

impl DiffReport {
    pub fn same(&self) -> bool {
        self.only_in_a.is_empty() && self.only_in_b.is_empty() && self.sections.is_empty()
    }
}

fn key(s: &Section<'_>) -> (bool, String, u32) {
    (s.live(), s.name().to_owned(), s.opener().instance_id)
}

fn section_key(s: &Section<'_>) -> SectionKey {
    SectionKey { name: s.name().to_owned(), instance_id: s.opener().instance_id, live: s.live() }
}

/// Compares two saves section by section: which sections only one has,
/// which differ in their bytes, and for device sections which fields.
pub fn diff(a: &SaveFile, b: &SaveFile) -> Result<DiffReport> {
    let sa = sections(a);
    let sb = sections(b);
    let mut report = DiffReport::default();
    let mut desc_a = None;
    let mut desc_b = None;
    for x in &sa {
        let Some(y) = sb.iter().find(|y| key(y) == key(x)) else {
            report.only_in_a.push(section_key(x));
            continue;
        };
        let (ra, rb) = (compared_ranges(a, x)?, compared_ranges(b, y)?);
        let first = first_difference_in(&ra, &rb, |s, e| a.read(s, e), |s, e| b.read(s, e))?;
        if first.is_none() && x.opener().version_id == y.opener().version_id {
            continue;
        }
        let mut d = SectionDiff {
            name: x.name().to_owned(),
            instance_id: x.opener().instance_id,
            live: x.live(),
            section_id: (x.opener().section_id, y.opener().section_id),
            version_id: (x.opener().version_id, y.opener().version_id),
            payload_size: (x.payload_size(), y.payload_size()),
            first_difference: first,
            fields: None,
            error: None,
            pages: None,
        };
        if let (true, "ram", Some(fd)) = (x.live(), x.name(), first) {
            // The bytes before the first difference are equal: a page that
            // lies there, at the same place in both, is equal unread.
            let equal = EqualPrefix { a: Joined::new(&ra), b: Joined::new(&rb), len: fd.at };
            d.pages = Some(ram_page_diff(a, b, &equal)?);
        }
        if !x.live() {
            let da = desc_a.get_or_insert_with(|| load_desc(a).map_err(|e| e.to_string()));
            let db = desc_b.get_or_insert_with(|| load_desc(b).map_err(|e| e.to_string()));
            match field_diffs(a, da, x, b, db, y) {
                Ok(f) => d.fields = Some(f),
                Err(e) => d.error = Some(e),
            }
        }
        report.sections.push(d);
    }
    for y in &sb {
        if !sa.iter().any(|x| key(x) == key(y)) {
            report.only_in_b.push(section_key(y));
        }
    }
    Ok(report)
}

/// Positions in a list of byte ranges joined end to end.
struct Joined {
    /// `(file offset, joined position)` of each non-empty range's start.
    starts: Vec<(u64, u64, u64)>,
}

impl Joined {
    fn new(ranges: &[(u64, u64)]) -> Self {
        let mut at = 0;
        let mut starts = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges.iter().filter(|r| r.1 > r.0) {
            starts.push((s, e, at));
            at += e - s;
        }
        Joined { starts }
    }

    /// The joined position of the bytes `off..off + len` of the file, when
    /// they lie wholly in one range.
    fn position(&self, off: u64, len: u64) -> Option<u64> {
        let i = self.starts.partition_point(|r| r.0 <= off).checked_sub(1)?;
        let (s, e, at) = self.starts[i];
        (off + len <= e).then_some(at + (off - s))
    }
}

/// Two sections' joined bytes are equal up to `len`.
struct EqualPrefix {
    a: Joined,
    b: Joined,
    len: u64,
}

impl EqualPrefix {
    /// Whether `n` bytes at file offset `x` of `a` and `y` of `b` are known
    /// equal: at the same joined position, before the first difference.
    fn proves(&self, x: u64, y: u64, n: u64) -> bool {
        match (self.a.position(x, n), self.b.position(y, n)) {
            (Some(p), Some(q)) => p == q && p + n <= self.len,
            _ => false,
        }
    }
}

/// The pages whose final content differs between the RAM of `a` and `b`
/// (through their page maps, or walks of their RAM records), and where they
/// lie in `a`'s guest-physical memory (no ranges when its layout is not
/// known, or for pages of blocks that lie nowhere). A block only one save
/// has differs wholly. Pages that `equal` proves equal are not read.
fn ram_page_diff(a: &SaveFile, b: &SaveFile, equal: &EqualPrefix) -> Result<PageDiff> {
    use rayon::prelude::*;
    let (ra, rb) = (a.guest_ram()?, b.guest_ram()?);
    let ps = ra.page_size() as usize;
    let mut differing: Vec<(usize, u64)> = Vec::new();
    for (i, blk) in ra.map.blocks.iter().enumerate() {
        let pages = blk.used_length.div_ceil(ps as u64);
        let other = rb.block_index(&blk.id).ok().filter(|&j| rb.map.blocks[j].used_length == blk.used_length);
        let Some(j) = other.filter(|_| rb.page_size() as usize == ps) else {
            differing.extend((0..pages).map(|p| (i, p)));
            continue;
        };
        let same = |p: u64| -> Result<bool> {
            use super::ram::PageWord;
            match (ra.page_word(i, p), rb.page_word(j, p)) {
                (PageWord::Zero, PageWord::Zero) => return Ok(true),
                (PageWord::Stored(x), PageWord::Stored(y)) => {
                    if equal.proves(x, y, ps as u64) {
                        return Ok(true);
                    }
                    if let (Some(da), Some(db)) = (a.source.as_slice(), b.source.as_slice()) {
                        let (x, y) = (x as usize, y as usize);
                        if let (Some(pa), Some(pb)) = (da.get(x..x + ps), db.get(y..y + ps)) {
                            return Ok(pa == pb);
                        }
                    }
                }
                _ => {}
            }
            let (mut pa, mut pb) = (vec![0u8; ps], vec![0u8; ps]);
            ra.page_into(&*a.source, i, p, &mut pa)?;
            rb.page_into(&*b.source, j, p, &mut pb)?;
            Ok(pa == pb)
        };
        let differs = |p: u64| match same(p) {
            Ok(true) => None,
            Ok(false) => Some(Ok(p)),
            Err(e) => Some(Err(e)),
        };
        let found: Result<Vec<u64>> = super::pool::run(blk.used_length, || {
            if super::pool::in_pool() {
                (0..pages).into_par_iter().filter_map(differs).collect()
            } else {
                (0..pages).filter_map(differs).collect()
            }
        });
        differing.extend(found?.into_iter().map(|p| (i, p)));
    }
    let pages = differing.len() as u64;
    // Where they lie: guest-physical addresses, joined into ranges.
    let layout = a.phys_layout(&ra, &Default::default()).map(|(r, _)| r).unwrap_or_default();
    let mut addrs: Vec<u64> = Vec::with_capacity(differing.len());
    for &(b, p) in &differing {
        let off = p * ps as u64;
        if let Some(r) = layout.iter().find(|r| r.block == b && off >= r.offset && off < r.offset + r.size) {
            addrs.push(r.gpa + (off - r.offset));
        }
    }
    addrs.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for g in addrs {
        match ranges.last_mut() {
            Some(last) if last.1 == g => last.1 = g + ps as u64,
            _ => ranges.push((g, g + ps as u64)),
        }
    }
    Ok(PageDiff { pages, ranges })
}

fn field_diffs(
    a: &SaveFile,
    da: &std::result::Result<StateDesc, String>,
    x: &Section<'_>,
    b: &SaveFile,
    db: &std::result::Result<StateDesc, String>,
    y: &Section<'_>,
) -> std::result::Result<Vec<FieldDiff>, String> {
    let (da, db) = (da.as_ref().map_err(Clone::clone)?, db.as_ref().map_err(Clone::clone)?);
    let s = |e: Error| e.to_string();
    let (va, vb) = (vmsd_of(a, da, x).map_err(s)?, vmsd_of(b, db, y).map_err(s)?);
    let (pa, pb) = (payload(a, x).map_err(s)?, payload(b, y).map_err(s)?);
    let fa = decode_section(a, va, x, &pa).map_err(s)?;
    let fb = decode_section(b, vb, y, &pb).map_err(s)?;
    Ok(diff_fields(&fa, &fb))
}

/// The byte ranges of a section that are compared: its items' payloads,
/// and for `ram` without the EOS record each item ends with. QEMU ends a
/// RAM section's START and PARTs where time (not the data) says, and the
/// records go on in the next item (a CONTINUE record even reuses the block
/// of the item before): two saves of the same RAM split into other items
/// then compare equal.
fn compared_ranges(f: &SaveFile, s: &Section<'_>) -> Result<Vec<(u64, u64)>> {
    let eos = crate::format::ram::FLAG_EOS.to_be_bytes();
    s.items
        .iter()
        .map(|e| {
            let (start, end) = (e.payload_start(), e.payload_end());
            if s.name() == "ram" && end - start >= 8 && *f.read(end - 8, end)? == eos {
                return Ok((start, end - 8));
            }
            Ok((start, end))
        })
        .collect()
}

/// Where the bytes of the ranges `ra` (read by `read_a`) and `rb` (read by
/// `read_b`), each list joined, first differ. The pieces are compared on
/// the threads of a pool when they are large, the first difference kept.
fn first_difference_in<'a, 'b>(
    ra: &[(u64, u64)],
    rb: &[(u64, u64)],
    read_a: impl Fn(u64, u64) -> Result<Cow<'a, [u8]>> + Sync,
    read_b: impl Fn(u64, u64) -> Result<Cow<'b, [u8]>> + Sync,
) -> Result<Option<FirstDifference>> {
    use rayon::prelude::*;
    // The pieces to compare, `(offset in a, offset in b, length, position)`,
    // then where one side ends before the other (if it does).
    let (mut ia, mut ib) = (Cursor::new(ra), Cursor::new(rb));
    let mut pieces: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut at = 0u64;
    let tail = loop {
        let (Some(ca), Some(cb)) = (ia.run(), ib.run()) else {
            break (ia.run().is_some() || ib.run().is_some()).then(|| FirstDifference {
                at,
                offset_a: ia.run().map(|r| r.0),
                offset_b: ib.run().map(|r| r.0),
            });
        };
        let n = (ca.1 - ca.0).min(cb.1 - cb.0).min(COMPARE_CHUNK);
        pieces.push((ca.0, cb.0, n, at));
        at += n;
        ia.advance(n);
        ib.advance(n);
    };
    let differ = |&(x, y, n, at): &(u64, u64, u64, u64)| -> Option<Result<FirstDifference>> {
        let (ba, bb) = match (read_a(x, x + n), read_b(y, y + n)) {
            (Ok(ba), Ok(bb)) => (ba, bb),
            (Err(e), _) | (_, Err(e)) => return Some(Err(e)),
        };
        (ba != bb).then(|| {
            let i = ba.iter().zip(bb.iter()).position(|(p, q)| p != q).unwrap_or(0) as u64;
            Ok(FirstDifference { at: at + i, offset_a: Some(x + i), offset_b: Some(y + i) })
        })
    };
    let first = super::pool::run(at, || {
        if super::pool::in_pool() {
            pieces.par_iter().find_map_first(differ)
        } else {
            pieces.iter().find_map(differ)
        }
    });
    match first {
        Some(r) => r.map(Some),
        None => Ok(tail),
    }
}

/// A position in a list of byte ranges.
struct Cursor<'r> {
    ranges: &'r [(u64, u64)],
    i: usize,
    pos: u64,
}

impl<'r> Cursor<'r> {
    fn new(ranges: &'r [(u64, u64)]) -> Self {
        let mut c = Cursor { ranges, i: 0, pos: ranges.first().map_or(0, |r| r.0) };
        c.skip_empty();
        c
    }

    fn skip_empty(&mut self) {
        while self.i < self.ranges.len() && self.pos >= self.ranges[self.i].1 {
            self.i += 1;
            if let Some(r) = self.ranges.get(self.i) {
                self.pos = r.0;
            }
        }
    }

    /// The rest of the current range.
    fn run(&self) -> Option<(u64, u64)> {
        self.ranges.get(self.i).map(|r| (self.pos, r.1))
    }

    fn advance(&mut self, n: u64) {
        self.pos += n;
        self.skip_empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first(a: &[u8], ra: &[(u64, u64)], b: &[u8], rb: &[(u64, u64)]) -> Option<FirstDifference> {
        let read_a = |s: u64, e: u64| Ok(Cow::Borrowed(&a[s as usize..e as usize]));
        let read_b = |s: u64, e: u64| Ok(Cow::Borrowed(&b[s as usize..e as usize]));
        first_difference_in(ra, rb, read_a, read_b).unwrap()
    }

    #[test]
    fn ranges_split_differently_compare_joined() {
        // "abcdef" as [ab][cdef] in one file and [abc][][def] in the other.
        let a = b"..ab..cdef";
        let b = b"abc.def";
        assert_eq!(first(a, &[(2, 4), (6, 10)], b, &[(0, 3), (3, 3), (4, 7)]), None);
        let d = first(a, &[(2, 4), (6, 10)], b"abc.dxf", &[(0, 3), (4, 7)]).unwrap();
        assert_eq!(d, FirstDifference { at: 4, offset_a: Some(8), offset_b: Some(5) });
        // One side longer: the difference is where the shorter one ends.
        let d = first(a, &[(2, 4), (6, 10)], b, &[(0, 3), (4, 6)]).unwrap();
        assert_eq!(d, FirstDifference { at: 5, offset_a: Some(9), offset_b: None });
        assert_eq!(first(b"", &[], b"", &[(0, 0)]), None);
    }

    #[test]
    fn on_a_pool_the_first_of_several_differences_is_found() {
        // Pieces of COMPARE_CHUNK: differences in the third and fifth.
        let n = (COMPARE_CHUNK * 6) as usize;
        let a = vec![7u8; n];
        let mut b = a.clone();
        let first_at = 2 * COMPARE_CHUNK as usize + 12345;
        b[first_at] = 8;
        b[4 * COMPARE_CHUNK as usize + 1] = 9;
        let (ra, rb) = ([(0, n as u64)], [(0, 100), (100, n as u64)]);
        let d = super::super::pool::with_threads(2, || first(&a, &ra, &b, &rb)).unwrap();
        assert_eq!(
            d,
            FirstDifference { at: first_at as u64, offset_a: Some(first_at as u64), offset_b: Some(first_at as u64) }
        );
        assert_eq!(super::super::pool::with_threads(2, || first(&a, &ra, &a, &rb)), None);
    }

    #[test]
    fn an_equal_prefix_proves_only_pages_at_the_same_place_before_the_difference() {
        // a joins [100, 200) and [300, 400); b is [0, 200).
        let e = EqualPrefix {
            a: Joined::new(&[(100, 200), (250, 250), (300, 400)]),
            b: Joined::new(&[(0, 200)]),
            len: 150,
        };
        assert!(e.proves(100, 0, 50));
        assert!(e.proves(300, 100, 50), "the second range of a starts at position 100");
        assert!(!e.proves(300, 100, 51), "past the first difference");
        assert!(!e.proves(150, 100, 10), "other positions");
        assert!(!e.proves(190, 90, 20), "across two ranges of a");
        assert!(!e.proves(50, 0, 10), "outside the ranges");
    }
}
