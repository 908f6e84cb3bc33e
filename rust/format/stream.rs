//! The top-level grammar of a QEMU migration stream.
//!
//! [`parse`] walks a stream from its magic to its EOF byte and the vmdesc
//! after it, and returns every top-level item with its extent in the file.
//! Device (FULL) sections carry no length: they are delimited by the sizes in
//! the vmdesc when one is at hand, each confirmed by the section footer, and
//! otherwise by finding the footer and checking that a valid item follows.
//!
//! The same parser runs over a whole file or, through [`StreamParser`], over
//! a window of a stream that is still arriving (`savedir record`): each item
//! (and each RAM record) is read whole or not at all, so a window that ends
//! inside one simply asks for more bytes.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{FormatError, FormatErrorKind, Result};
use super::ram::{RamOptions, RamState, Record, RAM_SECTION_VERSION};
use super::reader::{self, Reader};
use super::vmdesc::{self, Vmdesc, VmdescLocation};
use super::{command_name, show_bytes, tag, Kind, STREAM_MAGIC, STREAM_VERSION, STREAM_VERSION_COMPAT};

/// Bytes of a section footer: 0x7e and the be32 section id.
pub const FOOTER_LEN: u64 = 5;
/// Bytes of the stream header: magic and version.
pub const HEADER_LEN: u64 = 8;
/// How far from a stream's end the vmdesc is looked for.
pub const VMDESC_WINDOW: u64 = 64 << 20;
/// The largest device section a stream that is still arriving may hold
/// before its end is found (its bytes must be kept until then).
pub const MAX_PENDING_SECTION: u64 = 256 << 20;
/// How many times a parse may go back to try another footer before it gives up.
pub const MAX_BACKTRACKS: u32 = 1_000;
/// How many footer choices are kept open for going back to.
const MAX_CHOICES: usize = 4096;
/// `MIG_CMD_PACKAGED`
const CMD_PACKAGED: u16 = 7;
/// `MIG_CMD_POSTCOPY_ADVISE`
const CMD_POSTCOPY_ADVISE: u16 = 3;
/// The largest command number QEMU 10 defines.
const CMD_MAX: u16 = 11;

/// One top-level item of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub kind: Kind,
    /// Absolute offset of the item's type byte.
    pub offset: u64,
    /// Absolute offset one past the item's last byte (footer included).
    pub end: u64,
    /// Bytes of the item's header (type byte included).
    pub header_len: u64,
    /// Bytes of the section footer that closes the item (0 or 5).
    pub footer_len: u64,
    /// Section id (sections only; 0 otherwise).
    pub section_id: u32,
    /// Section name; PART and END carry the name of the START they continue.
    pub name: Option<Arc<str>>,
    pub instance_id: u32,
    pub version_id: u32,
    /// Command number and length (commands only).
    pub command: u16,
    pub command_len: u16,
}

impl Item {
    pub fn size(&self) -> u64 {
        self.end - self.offset
    }

    /// Absolute offset of the first payload byte.
    pub fn payload_start(&self) -> u64 {
        self.offset + self.header_len
    }

    /// Absolute offset one past the last payload byte (before the footer).
    pub fn payload_end(&self) -> u64 {
        self.end - self.footer_len
    }

    fn new(kind: Kind, offset: u64) -> Self {
        Item {
            kind,
            offset,
            end: offset,
            header_len: 1,
            footer_len: 0,
            section_id: 0,
            name: None,
            instance_id: 0,
            version_id: 0,
            command: 0,
            command_len: 0,
        }
    }
}

/// The configuration section's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    pub machine_type: String,
    pub target_page_bits: Option<u32>,
    pub capabilities: Vec<String>,
    pub uuid: Option<[u8; 16]>,
}

/// Everything a parse learned about a stream.
#[derive(Clone, Debug)]
pub struct Stream {
    /// Absolute offset of the magic.
    pub start: u64,
    /// Top-level items in file order; the vmdesc, if any, is last.
    pub items: Vec<Item>,
    /// Absolute offset of the EOF byte.
    pub eof: u64,
    /// Absolute offset one past the stream's last byte (vmdesc included).
    pub end: u64,
    pub vmdesc: Option<VmdescLocation>,
    pub configuration: Option<Configuration>,
    /// Whether sections end in footers (None: the stream has no sections).
    pub footers: Option<bool>,
    /// The RAM handler's state after the last RAM section.
    pub ram: Option<RamState>,
    pub page_size: u64,
    /// Device sections whose end was found by their footer rather than by
    /// the vmdesc's sizes.
    pub resynced: usize,
}

/// How to parse a whole file.
pub struct ParseOptions<'p> {
    /// Absolute offset of the stream's magic (non-zero behind a wrapper).
    pub start: u64,
    /// Where the stream is thought to end (the directory's first byte, or the
    /// file's size): the vmdesc is looked for just before it.
    pub end_hint: u64,
    /// Called now and then with the offset reached.
    pub progress: Option<&'p mut dyn FnMut(u64)>,
}

impl<'p> ParseOptions<'p> {
    pub fn new(start: u64, end_hint: u64) -> Self {
        ParseOptions { start, end_hint, progress: None }
    }
}

/// Checks the magic and version at `start`.
pub fn check_header(data: &[u8], start: u64) -> Result<()> {
    let Some(magic) = reader::be32_at(data, start) else {
        let rest = data.get(start.min(data.len() as u64) as usize..).unwrap_or(&[]);
        let have = rest.len();
        // A few bytes that begin like the magic: a stream cut short.
        let prefix = have > 0 && STREAM_MAGIC.to_be_bytes().starts_with(rest);
        return Err(FormatError::new(
            if prefix { FormatErrorKind::Truncated } else { FormatErrorKind::NotAStream },
            start,
            format!(
                "not a QEMU migration stream: expected the magic \"QEVM\", found {have} byte{} of data",
                if have == 1 { "" } else { "s" }
            ),
        ));
    };
    if magic != STREAM_MAGIC {
        let found = reader::slice(data, start, start + 4).unwrap_or(&[]);
        return Err(FormatError::new(
            FormatErrorKind::NotAStream,
            start,
            format!("not a QEMU migration stream: expected the magic \"QEVM\", found \"{}\"", show_bytes(found)),
        ));
    }
    match reader::be32_at(data, start + 4) {
        Some(STREAM_VERSION) => Ok(()),
        Some(STREAM_VERSION_COMPAT) => Err(FormatError::unsupported(
            start + 4,
            "stream version 2 is an obsolete format that QEMU itself no longer loads",
        )),
        Some(v) => Err(FormatError::invalid(start + 4, format!("expected stream version 3, found {v}"))),
        None => Err(FormatError::truncated(start + 4, "expected the stream version, found the end of the file")),
    }
}

/// Parses the stream that starts at `opts.start` in `data` (a whole file).
pub fn parse(data: &[u8], opts: ParseOptions<'_>) -> Result<Stream> {
    check_header(data, opts.start)?;
    let hint = vmdesc::find_from_tail(data, opts.end_hint.min(data.len() as u64), VMDESC_WINDOW)
        .and_then(|(_, loc)| vmdesc::parse(data, loc).ok());
    let had_hint = hint.is_some();
    let mut p = StreamParser::new(opts.start, hint);
    match p.advance(data, 0, true, opts.progress)? {
        Progress::Done => {}
        Progress::NeedMore => unreachable!("a final window never asks for more"),
    }
    if !p.device_choices.is_empty() {
        match p.vmdesc_hint.clone() {
            // The vmdesc turned up at the end (something follows the stream):
            // parse again with the sizes it gives.
            Some(desc) if !had_hint => {
                let mut q = StreamParser::new(opts.start, Some(desc));
                q.advance(data, 0, true, None)?;
                p = q;
            }
            _ => {}
        }
        p.check_unambiguous(data, 0)?;
    }
    Ok(p.finish())
}

/// What [`StreamParser::advance`] reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The window ends inside an item: call again with more bytes.
    NeedMore,
    /// The stream is complete (EOF byte, and the vmdesc if there is one).
    Done,
}

/// What a section id stands for.
#[derive(Clone, Debug)]
struct SectionRef {
    name: Arc<str>,
    instance_id: u32,
    version_id: u32,
    live: bool,
    ram: bool,
    ended: bool,
}

#[derive(Clone, Debug)]
enum Phase {
    Header,
    Items,
    /// Inside a RAM section's payload; `eos` once its EOS record was read.
    Ram {
        item: Item,
        eos: bool,
    },
    /// Inside a PACKAGED command's nested stream, `left` bytes to go.
    Skip {
        item: Item,
        left: u64,
    },
    /// After the EOF byte at `eof`: a vmdesc may follow.
    AfterEof {
        eof: u64,
    },
    Done {
        eof: u64,
        end: u64,
    },
}

/// Internal: stop parsing for want of bytes, or for an error.
enum Stop {
    NeedMore,
    Err(FormatError),
}

type Step<T> = std::result::Result<T, Stop>;

/// A window of the stream: file bytes `base..base + data.len()`.
#[derive(Clone, Copy)]
struct Win<'a> {
    data: &'a [u8],
    base: u64,
    /// No bytes will follow the window.
    last: bool,
}

impl<'a> Win<'a> {
    fn end(&self) -> u64 {
        self.base + self.data.len() as u64
    }

    fn reader(&self, at: u64) -> Step<Reader<'a>> {
        let mut r = Reader::with_base(self.data, self.base);
        if at > self.end() {
            return Err(if self.last {
                Stop::Err(FormatError::truncated(
                    self.end(),
                    format!("the stream jumps to offset {at}, past the end of the file"),
                ))
            } else {
                Stop::NeedMore
            });
        }
        r.seek(at).map_err(Stop::Err)?;
        Ok(r)
    }

    /// Turns a read error into "need more" when the window is not the last.
    fn fail(&self, e: FormatError) -> Stop {
        if e.kind == FormatErrorKind::Truncated && !self.last {
            Stop::NeedMore
        } else {
            Stop::Err(e)
        }
    }

    /// `Some(byte)`, `None` past the last byte, or NeedMore.
    fn byte(&self, at: u64) -> Step<Option<u8>> {
        self.bytes(at, 1).map(|b| b.map(|b| b[0]))
    }

    fn be32(&self, at: u64) -> Step<Option<u32>> {
        self.bytes(at, 4).map(|b| b.map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
    }

    /// `n` bytes at `at`; `None` when the stream (last window) has fewer.
    fn bytes(&self, at: u64, n: u64) -> Step<Option<&'a [u8]>> {
        if at < self.base {
            return Ok(None);
        }
        match reader::slice(self.data, at - self.base, at - self.base + n) {
            Some(b) => Ok(Some(b)),
            None if self.last => Ok(None),
            None => Err(Stop::NeedMore),
        }
    }
}

/// A resumable parser of one stream.
#[derive(Clone)]
pub struct StreamParser {
    start: u64,
    pos: u64,
    phase: Phase,
    items: Vec<Item>,
    sections: HashMap<u32, SectionRef>,
    footers: Option<bool>,
    configuration: Option<Configuration>,
    vmdesc_hint: Option<Vmdesc>,
    next_device: usize,
    ram: Option<RamState>,
    ram_options: RamOptions,
    vmdesc: Option<VmdescLocation>,
    resynced: usize,
    last_tick: u64,
    /// Footers chosen by [`resync`](Self::resync) that later items have not
    /// yet confirmed: where to go back to if the parse fails further on.
    choices: std::collections::VecDeque<Choice>,
    /// Set when going back: search the section at `.0` from offset `.1`.
    resume: Option<(u64, u64)>,
    backtracks: u32,
    first_error: Option<FormatError>,
    /// Device sections delimited by a footer choice rather than the vmdesc,
    /// kept past confirmation so that [`parse`] can check that no other
    /// choice also parses: such a stream cannot be delimited for sure.
    device_choices: Vec<(Item, Choice)>,
}

/// How many device sections without a size [`parse`] checks for a second
/// reading.
const MAX_AMBIGUITY_CHECKS: usize = 64;

/// The parser's state before a section whose end was found by its footer.
#[derive(Clone)]
struct Choice {
    pos: u64,
    items: usize,
    sections: HashMap<u32, SectionRef>,
    footers: Option<bool>,
    next_device: usize,
    resynced: usize,
    ram: Option<RamState>,
    /// Where the next candidate footer is searched from.
    resume_from: u64,
}

impl StreamParser {
    /// A parser of the stream whose magic is at absolute offset `start`.
    /// `vmdesc_hint`, when known in advance, gives device section sizes.
    pub fn new(start: u64, vmdesc_hint: Option<Vmdesc>) -> Self {
        let mut ram_options = RamOptions::default();
        if let Some(ps) = vmdesc_hint.as_ref().and_then(|v| v.page_size) {
            if ps.is_power_of_two() && (512..=1 << 20).contains(&ps) {
                ram_options.page_size = ps;
            }
        }
        StreamParser {
            start,
            pos: start,
            phase: Phase::Header,
            items: Vec::new(),
            sections: HashMap::new(),
            footers: None,
            configuration: None,
            vmdesc_hint,
            next_device: 0,
            ram: None,
            ram_options,
            vmdesc: None,
            resynced: 0,
            last_tick: 0,
            choices: std::collections::VecDeque::new(),
            resume: None,
            backtracks: 0,
            first_error: None,
            device_choices: Vec::new(),
        }
    }

    /// Absolute offset from which the caller must keep the stream's bytes:
    /// the parser may still go back to any offset after it.
    pub fn keep_from(&self) -> u64 {
        self.choices.front().map_or(self.pos, |c| c.pos.min(self.pos))
    }

    /// Goes back to the latest footer choice, if there is one left.
    fn backtrack(&mut self, e: FormatError) -> std::result::Result<(), FormatError> {
        let Some(c) = self.choices.pop_back() else {
            return Err(self.first_error.take().unwrap_or(e));
        };
        self.backtracks += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
        if self.backtracks > MAX_BACKTRACKS {
            let first = self.first_error.take().expect("set above");
            return Err(FormatError::unsupported(
                first.offset,
                format!("{} (and {MAX_BACKTRACKS} other ways to split the device sections failed too)", first.message),
            ));
        }
        self.restore(c);
        Ok(())
    }

    /// Goes back to the state before a footer choice, to try the next footer.
    fn restore(&mut self, c: Choice) {
        self.pos = c.pos;
        self.items.truncate(c.items);
        self.device_choices.retain(|(i, _)| i.offset < c.pos);
        self.sections = c.sections;
        self.footers = c.footers;
        self.next_device = c.next_device;
        self.resynced = c.resynced;
        self.ram = c.ram;
        self.phase = Phase::Items;
        self.resume = Some((c.pos, c.resume_from));
    }

    /// After a whole parse: for each device section whose end was a footer
    /// choice, tries the next footer. If that also parses to the end, the
    /// stream has two readings and savedir cannot know the right one.
    fn check_unambiguous(&self, data: &[u8], base: u64) -> Result<()> {
        for (item, c) in self.device_choices.iter().take(MAX_AMBIGUITY_CHECKS) {
            let mut alt = self.clone();
            alt.device_choices.clear();
            alt.choices.clear();
            alt.first_error = None;
            alt.backtracks = 0;
            alt.vmdesc = None;
            alt.restore(c.clone());
            if let Ok(Progress::Done) = alt.advance_inner(data, base, true, None) {
                let end = |p: &StreamParser| p.items.iter().find(|i| i.offset == item.offset).map_or(0, |i| i.end);
                return Err(FormatError::unsupported(
                    item.payload_start(),
                    format!(
                        "{} at offset {} can end at offset {} or at offset {}: its data holds bytes that look like its \
                         footer followed by a valid section, and without a vmdesc savedir cannot tell which is right",
                        describe(item),
                        item.offset,
                        end(self),
                        end(&alt)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Absolute offset of the first byte not yet consumed: bytes before it
    /// are no longer needed.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Items completed so far.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Offset of the item being read when the parser stopped inside one
    /// (a RAM section or a PACKAGED command read piece by piece).
    pub fn item_in_progress(&self) -> Option<u64> {
        match &self.phase {
            Phase::Ram { item, .. } | Phase::Skip { item, .. } => Some(item.offset),
            _ => None,
        }
    }

    /// The vmdesc as parsed (from the hint given, or from the stream's end).
    pub fn vmdesc(&self) -> Option<&Vmdesc> {
        self.vmdesc_hint.as_ref()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// Parses as far as the window allows. `data` holds file bytes from
    /// absolute offset `base` (which must not be past [`pos`](Self::pos));
    /// `last` says that no bytes follow it.
    pub fn advance(
        &mut self,
        data: &[u8],
        base: u64,
        last: bool,
        tick: Option<&mut dyn FnMut(u64)>,
    ) -> Result<Progress> {
        self.advance_inner(data, base, last, tick)
    }

    fn advance_inner(
        &mut self,
        data: &[u8],
        base: u64,
        last: bool,
        mut tick: Option<&mut dyn FnMut(u64)>,
    ) -> Result<Progress> {
        let w = Win { data, base, last };
        loop {
            if let Some(t) = tick.as_deref_mut() {
                if self.pos >= self.last_tick + (64 << 20) {
                    self.last_tick = self.pos;
                    t(self.pos);
                }
            }
            let res = match self.phase.clone() {
                Phase::Done { .. } => return Ok(Progress::Done),
                Phase::Header => self.header(&w),
                Phase::Items => self.item(&w),
                Phase::Ram { item, eos } => self.ram_step(&w, item, eos),
                Phase::Skip { item, left } => self.skip_step(&w, item, left),
                Phase::AfterEof { eof } => self.after_eof(&w, eof),
            };
            match res {
                Ok(()) => {}
                Err(Stop::NeedMore) => {
                    debug_assert!(!last);
                    return Ok(Progress::NeedMore);
                }
                Err(Stop::Err(e)) => self.backtrack(e)?,
            }
            if matches!(self.phase, Phase::Done { .. }) {
                // The whole stream parsed: every footer choice is confirmed.
                self.choices.clear();
                self.first_error = None;
            } else if let Some(c) = self.choices.front() {
                // Choices far behind are taken as confirmed, which bounds the
                // bytes a stream that is still arriving must keep.
                if self.choices.len() > MAX_CHOICES || self.pos - c.pos > MAX_PENDING_SECTION {
                    self.choices.pop_front();
                }
            }
        }
    }

    /// The parse's result; call once [`advance`](Self::advance) said Done.
    pub fn finish(self) -> Stream {
        let (eof, end) = match self.phase {
            Phase::Done { eof, end } => (eof, end),
            _ => (self.pos, self.pos),
        };
        Stream {
            start: self.start,
            items: self.items,
            eof,
            end,
            vmdesc: self.vmdesc,
            configuration: self.configuration,
            footers: self.footers,
            ram: self.ram,
            page_size: self.ram_options.page_size,
            resynced: self.resynced,
        }
    }

    fn header(&mut self, w: &Win) -> Step<()> {
        let Some(h) = w.bytes(self.start, HEADER_LEN)? else {
            // The last window holds fewer than 8 bytes: say what is wrong.
            let rest = w.data.get(self.start.saturating_sub(w.base) as usize..).unwrap_or(&[]);
            let e = check_header(rest, 0)
                .err()
                .unwrap_or_else(|| FormatError::truncated(0, "the stream header is cut short"));
            return Err(Stop::Err(shift(e, self.start)));
        };
        check_header(h, 0).map_err(|e| Stop::Err(shift(e, self.start)))?;
        self.pos = self.start + HEADER_LEN;
        self.phase = Phase::Items;
        Ok(())
    }

    fn item(&mut self, w: &Win) -> Step<()> {
        let at = self.pos;
        let Some(t) = w.byte(at)? else {
            return Err(Stop::Err(FormatError::truncated(
                at,
                "expected another item or the EOF byte, found the end of the file (the stream is cut short)",
            )));
        };
        match t {
            tag::EOF => {
                self.pos = at + 1;
                self.phase = Phase::AfterEof { eof: at };
                Ok(())
            }
            tag::CONFIGURATION if self.items.is_empty() => self.configuration(w, at),
            tag::START | tag::FULL => self.section_open(w, at, t),
            tag::PART | tag::END => self.section_continue(w, at, t),
            tag::COMMAND => self.command(w, at),
            _ => Err(Stop::Err(FormatError::invalid(
                at,
                format!("expected an item type (0x00-0x04, 0x08), found 0x{t:02x}"),
            ))),
        }
    }

    fn after_eof(&mut self, w: &Win, eof: u64) -> Step<()> {
        let end = match w.byte(eof + 1)? {
            Some(tag::VMDESC) => {
                let hdr = w.bytes(eof + 1, vmdesc::VMDESC_HEADER)?.ok_or_else(|| {
                    Stop::Err(FormatError::truncated(
                        eof + 2,
                        "expected the vmdesc's be32 length, found the end of the file",
                    ))
                })?;
                let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as u64;
                let json_at = eof + 1 + vmdesc::VMDESC_HEADER;
                let json = w.bytes(json_at, len)?.ok_or_else(|| {
                    Stop::Err(FormatError::truncated(
                        eof + 2,
                        format!(
                            "the vmdesc claims {len} bytes of JSON, but the file ends {} bytes after its header",
                            w.end().saturating_sub(json_at)
                        ),
                    ))
                })?;
                let loc = VmdescLocation { offset: eof + 1, json_len: len as u32 };
                let desc = vmdesc::parse_json(json, json_at).map_err(Stop::Err)?;
                if self.vmdesc_hint.is_none() {
                    self.vmdesc_hint = Some(desc);
                }
                let mut item = Item::new(Kind::Vmdesc, loc.offset);
                item.header_len = vmdesc::VMDESC_HEADER;
                item.end = loc.end();
                self.items.push(item);
                self.vmdesc = Some(loc);
                loc.end()
            }
            // Nothing after EOF, or bytes that are not part of the stream.
            _ => eof + 1,
        };
        self.pos = end;
        self.phase = Phase::Done { eof, end };
        Ok(())
    }

    fn configuration(&mut self, w: &Win, at: u64) -> Step<()> {
        let mut r = w.reader(at)?;
        let conf = self.read_configuration(&mut r).map_err(|e| w.fail(e))?;
        if let Some(bits) = conf.target_page_bits {
            self.ram_options.page_size = 1 << bits;
        }
        self.ram_options.mapped_ram = conf.capabilities.iter().any(|c| c == "mapped-ram");
        self.ram_options.ignore_shared = conf.capabilities.iter().any(|c| c == "x-ignore-shared");
        if self.ram_options.mapped_ram && !w.last {
            return Err(Stop::Err(FormatError::unsupported(
                at,
                "the stream uses mapped-ram, which QEMU writes only to seekable files: it cannot arrive through a pipe",
            )));
        }
        let mut item = Item::new(Kind::Configuration, at);
        item.end = r.offset();
        self.items.push(item);
        self.configuration = Some(conf);
        self.pos = r.offset();
        Ok(())
    }

    fn read_configuration(&self, r: &mut Reader) -> Result<Configuration> {
        r.u8("the configuration type byte")?;
        let len_at = r.offset();
        let len = r.be32("the machine type's length")?;
        if len > 256 {
            return Err(FormatError::invalid(
                len_at,
                format!("expected a machine type name of at most 256 bytes, found a length of {len}"),
            ));
        }
        let name = r.bytes(len as usize, "the machine type name")?;
        let mut conf = Configuration { machine_type: String::from_utf8_lossy(name).into_owned(), ..Default::default() };
        while r.peek() == Some(tag::SUBSECTION) {
            let sub_at = r.offset();
            r.u8("a subsection type byte")?;
            let sname = r.cstr8("a subsection name")?;
            r.be32("a subsection version")?;
            match sname {
                b"configuration/target-page-bits" => {
                    let bits_at = r.offset();
                    let bits = r.be32("the target page bits")?;
                    if !(9..=20).contains(&bits) {
                        return Err(FormatError::invalid(
                            bits_at,
                            format!("expected target page bits from 9 to 20, found {bits}"),
                        ));
                    }
                    conf.target_page_bits = Some(bits);
                }
                b"configuration/capabilities" => {
                    let n_at = r.offset();
                    let n = r.be32("the capability count")?;
                    if n > 256 {
                        return Err(FormatError::invalid(
                            n_at,
                            format!("expected at most 256 capabilities, found {n}"),
                        ));
                    }
                    for _ in 0..n {
                        let c = r.cstr8("a capability name")?;
                        conf.capabilities.push(String::from_utf8_lossy(c).into_owned());
                    }
                }
                b"configuration/uuid" => {
                    let mut u = [0u8; 16];
                    u.copy_from_slice(r.bytes(16, "the VM's UUID")?);
                    conf.uuid = Some(u);
                }
                other => {
                    let name = String::from_utf8_lossy(other).into_owned();
                    let size = self
                        .vmdesc_hint
                        .as_ref()
                        .and_then(|v| v.config_subsections.iter().find(|(n, _)| *n == name))
                        .and_then(|(_, s)| *s)
                        .ok_or_else(|| {
                            FormatError::unsupported(
                                sub_at,
                                format!("the configuration has the subsection \"{name}\", which savedir does not know and no vmdesc describes"),
                            )
                        })?;
                    r.skip(size, "a configuration subsection")?;
                }
            }
        }
        Ok(conf)
    }

    fn command(&mut self, w: &Win, at: u64) -> Step<()> {
        let mut r = w.reader(at)?;
        let (cmd, len, nested) = (|| -> Result<(u16, u16, u64)> {
            r.u8("the command type byte")?;
            let cmd_at = r.offset();
            let cmd = r.be16("a command number")?;
            let len = r.be16("a command length")?;
            if cmd == 0 || cmd > CMD_MAX {
                return Err(FormatError::invalid(
                    cmd_at,
                    format!("expected a command number from 1 to {CMD_MAX}, found {cmd}"),
                ));
            }
            let body_at = r.offset();
            let body = r.bytes(len as usize, "a command's data")?;
            let mut nested = 0;
            if cmd == CMD_PACKAGED {
                if len != 4 {
                    return Err(FormatError::invalid(
                        body_at,
                        format!("expected a PACKAGED command of 4 bytes, found {len}"),
                    ));
                }
                nested = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as u64;
            }
            Ok((cmd, len, nested))
        })()
        .map_err(|e| w.fail(e))?;
        if cmd == CMD_POSTCOPY_ADVISE && len == 16 {
            self.ram_options.postcopy = true;
        }
        let mut item = Item::new(Kind::Command, at);
        item.header_len = 5;
        item.command = cmd;
        item.command_len = len;
        self.pos = r.offset();
        if nested > 0 {
            self.phase = Phase::Skip { item, left: nested };
        } else {
            item.end = self.pos;
            self.items.push(item);
        }
        Ok(())
    }

    /// Consumes a PACKAGED command's nested stream piece by piece.
    fn skip_step(&mut self, w: &Win, mut item: Item, left: u64) -> Step<()> {
        let have = w.end().saturating_sub(self.pos);
        if have >= left {
            self.pos += left;
            item.end = self.pos;
            self.items.push(item);
            self.phase = Phase::Items;
            return Ok(());
        }
        if w.last {
            return Err(Stop::Err(FormatError::truncated(
                self.pos,
                format!("a PACKAGED command's nested stream needs {left} more bytes, but the file ends after {have}"),
            )));
        }
        self.pos += have;
        self.phase = Phase::Skip { item, left: left - have };
        Err(Stop::NeedMore)
    }

    fn section_open(&mut self, w: &Win, at: u64, t: u8) -> Step<()> {
        let kind = if t == tag::START { Kind::Start } else { Kind::Full };
        let mut r = w.reader(at)?;
        let (section_id, name, instance_id, version_id) = (|| -> Result<(u32, Arc<str>, u32, u32)> {
            r.u8("a section type byte")?;
            let id_at = r.offset();
            let section_id = r.be32("a section id")?;
            let name_at = r.offset();
            let name = r.cstr8("a section name")?;
            if name.is_empty() || !name.iter().all(|&c| (0x20..0x7f).contains(&c)) {
                return Err(FormatError::invalid(
                    name_at,
                    format!("expected a section name in printable ASCII, found \"{}\"", show_bytes(name)),
                ));
            }
            let instance_id = r.be32("a section instance id")?;
            let version_id = r.be32("a section version id")?;
            let name: Arc<str> = Arc::from(String::from_utf8_lossy(name).as_ref());
            if let Some(old) = self.sections.get(&section_id) {
                if kind == Kind::Start || old.live {
                    return Err(FormatError::invalid(
                        id_at,
                        format!("section id {section_id} ({name}) was already opened by \"{}\"", old.name),
                    ));
                }
            }
            Ok((section_id, name, instance_id, version_id))
        })()
        .map_err(|e| w.fail(e))?;
        let mut item = Item::new(kind, at);
        item.header_len = r.offset() - at;
        item.section_id = section_id;
        item.name = Some(name.clone());
        item.instance_id = instance_id;
        item.version_id = version_id;
        let ram = kind == Kind::Start && &*name == "ram";
        let sref =
            SectionRef { name: name.clone(), instance_id, version_id, live: kind == Kind::Start, ram, ended: false };
        if ram {
            if version_id != RAM_SECTION_VERSION {
                return Err(Stop::Err(FormatError::unsupported(
                    at,
                    format!("expected RAM section version {RAM_SECTION_VERSION}, found {version_id}"),
                )));
            }
            if self.ram.is_some() {
                return Err(Stop::Err(FormatError::invalid(at, "found a second \"ram\" START section")));
            }
            self.ram = Some(RamState::new(self.ram_options));
            self.sections.insert(section_id, sref);
            self.pos = r.offset();
            self.phase = Phase::Ram { item, eos: false };
            return Ok(());
        }
        let (payload_end, resynced) = if kind == Kind::Full {
            self.device_payload_end(w, &item, r.offset())?
        } else {
            (self.resync(w, &item, r.offset())?, false)
        };
        let end = self.footer_end(w, &item, payload_end)?;
        if kind == Kind::Full {
            self.next_device = self.device_index(&item).map_or(self.next_device, |i| i + 1);
            self.resynced += resynced as usize;
        }
        self.sections.insert(section_id, sref);
        self.push_section(item, payload_end, end);
        Ok(())
    }

    fn section_continue(&mut self, w: &Win, at: u64, t: u8) -> Step<()> {
        let kind = if t == tag::PART { Kind::Part } else { Kind::End };
        let mut r = w.reader(at)?;
        r.u8("a section type byte").map_err(|e| w.fail(e))?;
        let id_at = r.offset();
        let section_id = r.be32("a section id").map_err(|e| w.fail(e))?;
        let sec = match self.sections.get(&section_id) {
            Some(s) if s.live && !s.ended => s.clone(),
            Some(s) if s.live => {
                return Err(Stop::Err(FormatError::invalid(
                    id_at,
                    format!(
                        "a {} section continues section id {section_id} ({}), which has ended",
                        kind.as_str(),
                        s.name
                    ),
                )))
            }
            _ => {
                return Err(Stop::Err(FormatError::invalid(
                    id_at,
                    format!("a {} section names section id {section_id}, which no START opened", kind.as_str()),
                )))
            }
        };
        let mut item = Item::new(kind, at);
        item.header_len = 5;
        item.section_id = section_id;
        item.name = Some(sec.name.clone());
        item.instance_id = sec.instance_id;
        item.version_id = sec.version_id;
        if sec.ram {
            self.pos = r.offset();
            self.phase = Phase::Ram { item, eos: false };
            return Ok(());
        }
        let payload_end = self.resync(w, &item, r.offset())?;
        let end = self.footer_end(w, &item, payload_end)?;
        if kind == Kind::End {
            if let Some(s) = self.sections.get_mut(&section_id) {
                s.ended = true;
            }
        }
        self.push_section(item, payload_end, end);
        Ok(())
    }

    /// Reads RAM records one at a time, then the footer.
    fn ram_step(&mut self, w: &Win, item: Item, mut eos: bool) -> Step<()> {
        let ctx = |e: FormatError| e.context(format!("{} at offset {}", describe(&item), item.offset));
        if !eos {
            let ram = self.ram.as_mut().expect("a RAM phase has RAM state");
            let mut r = w.reader(self.pos)?;
            let mut n: u32 = 0;
            loop {
                let rec_at = r.offset();
                match ram.parse_record(&mut r) {
                    Ok(Record::Eos) => break,
                    Ok(Record::Other) => {
                        n += 1;
                        if n == 4096 {
                            // Come back to the main loop now and then for progress.
                            self.pos = r.offset();
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        self.pos = rec_at;
                        return Err(w.fail(ctx(e)));
                    }
                }
                self.pos = r.offset();
            }
            self.pos = r.offset();
            eos = true;
            self.phase = Phase::Ram { item: item.clone(), eos };
        }
        let payload_end = self.pos;
        let end = self.footer_end(w, &item, payload_end).map_err(|s| match s {
            Stop::Err(e) => Stop::Err(ctx(e)),
            s => s,
        })?;
        if item.kind == Kind::End {
            if let Some(s) = self.sections.get_mut(&item.section_id) {
                s.ended = true;
            }
        }
        self.push_section(item, payload_end, end);
        Ok(())
    }

    /// Records a section that runs to `end`, its payload to `payload_end`.
    fn push_section(&mut self, mut item: Item, payload_end: u64, end: u64) {
        item.footer_len = end - payload_end;
        item.end = end;
        self.items.push(item);
        self.pos = end;
        self.phase = Phase::Items;
    }

    /// Where the section whose payload ends at `payload_end` ends: after its
    /// footer, when the stream has footers.
    fn footer_end(&mut self, w: &Win, item: &Item, payload_end: u64) -> Step<u64> {
        if self.footers.is_none() {
            match w.byte(payload_end)? {
                Some(tag::FOOTER) => self.footers = Some(true),
                _ => self.footers = Some(false),
            }
        }
        if self.footers == Some(false) {
            return Ok(payload_end);
        }
        let found = w.bytes(payload_end, FOOTER_LEN)?;
        let mut want = [tag::FOOTER, 0, 0, 0, 0];
        want[1..].copy_from_slice(&item.section_id.to_be_bytes());
        if found == Some(&want[..]) {
            return Ok(payload_end + FOOTER_LEN);
        }
        let found = match found {
            Some(f) if f[0] == tag::FOOTER => {
                format!("the footer of section id {}", u32::from_be_bytes([f[1], f[2], f[3], f[4]]))
            }
            Some(f) => format!("byte 0x{:02x}", f[0]),
            None => "the end of the file".to_owned(),
        };
        Err(Stop::Err(FormatError::invalid(
            payload_end,
            format!("expected the footer of {} at offset {}, found {found}", describe(item), item.offset),
        )))
    }

    /// The vmdesc entry for this device section, if any.
    fn device_index(&self, item: &Item) -> Option<usize> {
        let devices = &self.vmdesc_hint.as_ref()?.devices;
        let name = item.name.as_deref()?;
        let matches = |d: &vmdesc::DeviceDesc| d.name == name && d.instance_id == item.instance_id;
        match devices.get(self.next_device) {
            Some(d) if matches(d) => Some(self.next_device),
            _ => devices.iter().position(matches),
        }
    }

    /// Delimits a FULL section's payload by the vmdesc, else by its footer.
    fn device_payload_end(&mut self, w: &Win, item: &Item, payload: u64) -> Step<(u64, bool)> {
        let size = self
            .device_index(item)
            .and_then(|i| self.vmdesc_hint.as_ref().map(|v| &v.devices[i]))
            .and_then(|d| d.payload_size);
        if let Some(end) = size.and_then(|s| payload.checked_add(s)) {
            if self.section_ends_at(w, end, item.section_id)? {
                return Ok((end, false));
            }
        }
        Ok((self.resync(w, item, payload)?, true))
    }

    /// True when a payload that ends at `end` is followed by what must come
    /// next: its footer (when the stream has footers) or an item.
    fn section_ends_at(&self, w: &Win, end: u64, section_id: u32) -> Step<bool> {
        Ok(match self.footers {
            Some(true) => self.footer_at(w, end, section_id)?,
            Some(false) => self.plausible_item_at(w, end)?,
            None => self.footer_at(w, end, section_id)? || self.plausible_item_at(w, end)?,
        })
    }

    fn footer_at(&self, w: &Win, at: u64, section_id: u32) -> Step<bool> {
        Ok(w.byte(at)? == Some(tag::FOOTER) && w.be32(at + 1)? == Some(section_id))
    }

    /// Finds the end of a payload whose length nothing gives: the first footer
    /// of this section that is followed by a plausible item.
    fn resync(&mut self, w: &Win, item: &Item, payload: u64) -> Step<u64> {
        let from = match self.resume {
            Some((at, resume_from)) if at == item.offset => resume_from,
            _ => payload,
        };
        if self.footers == Some(false) {
            return Err(Stop::Err(FormatError::unsupported(
                from,
                format!(
                    "cannot find where {} at offset {} ends: the stream has no section footers and no vmdesc describes it",
                    describe(item),
                    item.offset
                ),
            )));
        }
        let mut pat = [tag::FOOTER, 0, 0, 0, 0];
        pat[1..].copy_from_slice(&item.section_id.to_be_bytes());
        let hay = w.bytes(from, 0)?.map(|_| &w.data[(from - w.base) as usize..]).unwrap_or(&[]);
        let mut pos = 0usize;
        while let Some(i) = find(&hay[pos..], &pat) {
            let at = from + (pos + i) as u64;
            if self.plausible_item_at(w, at + FOOTER_LEN)? {
                self.resume = None;
                if self.choices.back().is_some_and(|c| c.pos == item.offset) {
                    // The same section again, after a window that was short.
                    self.choices.pop_back();
                }
                let choice = Choice {
                    pos: item.offset,
                    items: self.items.len(),
                    sections: self.sections.clone(),
                    footers: self.footers,
                    next_device: self.next_device,
                    resynced: self.resynced,
                    ram: self.ram.clone(),
                    resume_from: at + 1,
                };
                if item.kind == Kind::Full && self.device_choices.len() < MAX_AMBIGUITY_CHECKS {
                    self.device_choices.retain(|(i, _)| i.offset != item.offset);
                    self.device_choices.push((item.clone(), choice.clone()));
                }
                self.choices.push_back(choice);
                return Ok(at);
            }
            pos += i + 1;
        }
        if !w.last {
            if w.end() - from > MAX_PENDING_SECTION {
                return Err(Stop::Err(FormatError::unsupported(
                    from,
                    format!(
                        "{} at offset {} has no footer in its first {} MiB: too large to hold while the stream arrives",
                        describe(item),
                        item.offset,
                        MAX_PENDING_SECTION >> 20
                    ),
                )));
            }
            return Err(Stop::NeedMore);
        }
        // The whole file was searched. With a vmdesc at its end the file is
        // whole and this section is one savedir cannot delimit; without one,
        // the likeliest cause is a stream cut short.
        let what = format!("cannot find where {} at offset {} ends", describe(item), item.offset);
        Err(Stop::Err(if self.vmdesc_hint.is_some() {
            FormatError::unsupported(
                from,
                format!("{what}: the vmdesc does not describe it and no footer of it is followed by a valid item"),
            )
        } else {
            FormatError::truncated(
                from,
                format!(
                    "{what}: no footer of it is followed by a valid item before the file ends \
                     (the stream is cut short, or has no vmdesc and a damaged footer)"
                ),
            )
        }))
    }

    /// A cheap test that a top-level item could start at `at`.
    fn plausible_item_at(&self, w: &Win, at: u64) -> Step<bool> {
        Ok(match w.byte(at)? {
            Some(tag::EOF) => match w.byte(at + 1)? {
                None | Some(tag::DIRECTORY) => true,
                Some(tag::VMDESC) => w.bytes(at + 2, 4)?.is_some(),
                Some(_) => false,
            },
            Some(t @ (tag::START | tag::FULL)) => {
                let Some(id) = w.be32(at + 1)? else { return Ok(false) };
                let Some(n) = w.byte(at + 5)? else { return Ok(false) };
                let Some(name) = w.bytes(at + 6, n as u64 + 8)? else { return Ok(false) };
                let name = &name[..n as usize];
                if n == 0 || !name.iter().all(|&c| (0x20..0x7f).contains(&c)) {
                    return Ok(false);
                }
                match self.sections.get(&id) {
                    None => true,
                    Some(s) => t == tag::FULL && !s.live && s.name.as_bytes() == name,
                }
            }
            Some(tag::PART | tag::END) => {
                let Some(id) = w.be32(at + 1)? else { return Ok(false) };
                matches!(self.sections.get(&id), Some(s) if s.live && !s.ended)
            }
            Some(tag::COMMAND) => {
                let Some(b) = w.bytes(at + 1, 4)? else { return Ok(false) };
                let cmd = u16::from_be_bytes([b[0], b[1]]);
                (1..=CMD_MAX).contains(&cmd)
            }
            _ => false,
        })
    }
}

/// Moves an error found in a copy that starts at 0 to absolute offsets.
fn shift(mut e: FormatError, by: u64) -> FormatError {
    e.offset += by;
    e
}

/// The first index of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut start = 0;
    while start + needle.len() <= hay.len() {
        let i = start + hay[start..hay.len() - needle.len() + 1].iter().position(|&b| b == first)?;
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        start = i + 1;
    }
    None
}

/// Describes an item for messages: `full section "cpu" (id 3)`.
pub fn describe(item: &Item) -> String {
    match item.kind {
        Kind::Command => format!("command {} ({})", item.command, command_name(item.command)),
        Kind::Configuration | Kind::Vmdesc => format!("the {}", item.kind.as_str()),
        k => format!("{} section \"{}\" (id {})", k.as_str(), item.name.as_deref().unwrap_or(""), item.section_id),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::ram::{FLAG_EOS, FLAG_MEM_SIZE, FLAG_PAGE};

    /// A small synthetic stream: configuration, ram START/PART/END, two FULL
    /// devices, EOF and a vmdesc that describes the devices.
    pub fn sample_stream(footers: bool) -> Vec<u8> {
        sample_stream_with(footers, &[0x7e, 0, 0, 0, 6, 9])
    }

    /// As [`sample_stream`], with the payload of the "cpu" device given.
    pub fn sample_stream_with(footers: bool, cpu: &[u8]) -> Vec<u8> {
        let mut d = b"QEVM\0\0\0\x03".to_vec();
        d.push(tag::CONFIGURATION);
        d.extend_from_slice(&8u32.to_be_bytes());
        d.extend_from_slice(b"pc-10.0x");
        let footer = |d: &mut Vec<u8>, id: u32| {
            if footers {
                d.push(tag::FOOTER);
                d.extend_from_slice(&id.to_be_bytes());
            }
        };
        // ram START
        d.push(tag::START);
        d.extend_from_slice(&2u32.to_be_bytes());
        d.push(3);
        d.extend_from_slice(b"ram");
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(&(0x2000u64 | FLAG_MEM_SIZE).to_be_bytes());
        d.push(6);
        d.extend_from_slice(b"pc.ram");
        d.extend_from_slice(&0x2000u64.to_be_bytes());
        d.extend_from_slice(&FLAG_EOS.to_be_bytes());
        footer(&mut d, 2);
        // ram PART with a page
        d.push(tag::PART);
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&(0x1000u64 | FLAG_PAGE).to_be_bytes());
        d.push(6);
        d.extend_from_slice(b"pc.ram");
        d.extend_from_slice(&[0x7e; 4096]);
        d.extend_from_slice(&FLAG_EOS.to_be_bytes());
        footer(&mut d, 2);
        // SWITCHOVER_START
        d.extend_from_slice(&[tag::COMMAND, 0, 11, 0, 0]);
        // ram END
        d.push(tag::END);
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&FLAG_EOS.to_be_bytes());
        footer(&mut d, 2);
        // two devices
        for (id, name, payload) in [(5u32, &b"timer"[..], &[1u8, 2, 3, 4][..]), (6, b"cpu", cpu)] {
            d.push(tag::FULL);
            d.extend_from_slice(&id.to_be_bytes());
            d.push(name.len() as u8);
            d.extend_from_slice(name);
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(payload);
            footer(&mut d, id);
        }
        d.push(tag::EOF);
        let json = format!(
            r#"{{"page_size":4096,"devices":[{{"name":"timer","instance_id":0,"vmsd_name":"timer","version":1,"fields":[{{"name":"a","type":"uint32","size":4}}]}},{{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":1,"fields":[{{"name":"b","type":"buffer","size":{}}}]}}]}}"#,
            cpu.len()
        );
        let json = json.as_bytes();
        d.push(tag::VMDESC);
        d.extend_from_slice(&(json.len() as u32).to_be_bytes());
        d.extend_from_slice(json);
        d
    }

    #[test]
    fn parses_sample_stream_with_and_without_footers() {
        for footers in [true, false] {
            let d = sample_stream(footers);
            let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
            let kinds: Vec<_> = s.items.iter().map(|i| i.kind).collect();
            assert_eq!(
                kinds,
                [
                    Kind::Configuration,
                    Kind::Start,
                    Kind::Part,
                    Kind::Command,
                    Kind::End,
                    Kind::Full,
                    Kind::Full,
                    Kind::Vmdesc
                ]
            );
            assert_eq!(s.footers, Some(footers));
            assert_eq!(s.end, d.len() as u64);
            assert_eq!(d[s.eof as usize], 0);
            // Extents tile the stream.
            for w in s.items.windows(2) {
                if w[1].kind != Kind::Vmdesc {
                    assert_eq!(w[0].end, w[1].offset, "{:?}", w);
                }
            }
            assert_eq!(s.configuration.unwrap().machine_type, "pc-10.0x");
            assert_eq!(s.items[6].name.as_deref(), Some("cpu"));
            assert_eq!(s.items[6].payload_end() - s.items[6].payload_start(), 6);
        }
    }

    #[test]
    fn device_sections_found_by_footer_without_vmdesc() {
        let mut d = sample_stream(true);
        let eof = d.len() - 1 - 5 - d.iter().rev().position(|&b| b == tag::VMDESC).unwrap() + 5;
        d.truncate(eof); // drop the vmdesc
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        assert!(s.vmdesc.is_none());
        let cpu = &s.items[s.items.len() - 1];
        assert_eq!(cpu.name.as_deref(), Some("cpu"));
        assert_eq!(cpu.payload_end() - cpu.payload_start(), 6);
    }

    #[test]
    fn a_footer_inside_device_data_is_undone_without_vmdesc() {
        // The cpu payload holds its own footer followed by a fake FULL
        // header; only going back to the next footer parses to the end.
        let cpu = [0x7e, 0, 0, 0, 6, 4, 0, 0, 0, 9, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 9];
        let mut d = sample_stream_with(true, &cpu);
        let with = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        d.truncate(with.eof as usize + 1); // drop the vmdesc
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        assert_eq!(s.resynced, 2);
        let cpu_item = s.items.last().unwrap();
        assert_eq!(cpu_item.name.as_deref(), Some("cpu"));
        assert_eq!(cpu_item.payload_end() - cpu_item.payload_start(), cpu.len() as u64);
        assert_eq!(&s.items[..], &with.items[..with.items.len() - 1]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let d = sample_stream(true);
        let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof;
        for cut in 0..=eof as usize {
            let e = parse(&d[..cut], ParseOptions::new(0, cut as u64));
            assert!(e.is_err(), "cut at {cut} parsed");
        }
    }

    /// Feeds `d` to a [`StreamParser`] `chunk` bytes at a time, keeping only
    /// the bytes from the parser's position on, as `savedir record` does.
    pub fn parse_streaming(d: &[u8], chunk: usize) -> Result<Stream> {
        let mut p = StreamParser::new(0, None);
        let mut have = 0;
        loop {
            have = (have + chunk).min(d.len());
            let last = have == d.len();
            let base = p.pos() as usize;
            if p.advance(&d[base..have], base as u64, last, None)? == Progress::Done {
                return Ok(p.finish());
            }
            assert!(!last);
        }
    }

    #[test]
    fn streaming_parse_equals_whole_parse() {
        for footers in [true, false] {
            let d = sample_stream(footers);
            let whole = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
            for chunk in [1, 2, 3, 5, 7, 64, 4099, 1 << 20] {
                let s = match parse_streaming(&d, chunk) {
                    Ok(s) => s,
                    // Without footers, device sections need the vmdesc, which
                    // a stream that is still arriving has not sent yet.
                    Err(e) if !footers => {
                        assert_eq!(e.kind, FormatErrorKind::Unsupported, "{e}");
                        continue;
                    }
                    Err(e) => panic!("chunk {chunk}: {e}"),
                };
                assert_eq!(s.items, whole.items, "chunk {chunk}");
                assert_eq!((s.eof, s.end), (whole.eof, whole.end));
            }
        }
    }

    #[test]
    fn streaming_parse_of_a_cut_stream_fails_like_the_whole_parse() {
        let d = sample_stream(true);
        let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof as usize;
        for cut in (0..=eof).step_by(3) {
            let whole = parse(&d[..cut], ParseOptions::new(0, cut as u64)).unwrap_err();
            let streamed = parse_streaming(&d[..cut], 7).unwrap_err();
            assert_eq!(streamed.kind, whole.kind, "cut {cut}: {streamed} vs {whole}");
        }
    }

    #[test]
    fn not_a_stream() {
        let e = parse(b"hello world", ParseOptions::new(0, 11)).unwrap_err();
        assert_eq!(e.kind, FormatErrorKind::NotAStream);
        let e = parse(b"", ParseOptions::new(0, 0)).unwrap_err();
        assert_eq!(e.kind, FormatErrorKind::NotAStream);
    }

    #[test]
    fn single_byte_flips_never_panic() {
        let d = sample_stream(true);
        for i in 0..d.len() {
            for bit in [0x01u8, 0x80] {
                let mut m = d.clone();
                m[i] ^= bit;
                let _ = parse(&m, ParseOptions::new(0, m.len() as u64));
            }
        }
    }
}
