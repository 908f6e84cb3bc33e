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
//!
//! This file holds the types and the driving loop; the rest lives beside it:
//! `window.rs` (the byte windows the parser reads), `configuration.rs` (the
//! configuration section), `items.rs` (one top-level item at a time, the RAM
//! records, EOF and the vmdesc), `devices.rs` (delimiting device sections:
//! vmdesc sizes, footer choice points, going back, refusing two readings).

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{FormatError, FormatErrorKind, Result};
use super::ram::{RamOptions, RamState, Record, RAM_SECTION_VERSION};
use super::reader::{self, Reader};
use super::source::SourceError;
use super::vmdesc::{self, Vmdesc, VmdescLocation};
use super::{show_bytes, tag, Header, Kind, STREAM_MAGIC, STREAM_VERSION, STREAM_VERSION_COMPAT};

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
/// `MIG_CMD_POSTCOPY_RAM_DISCARD`
const CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
/// The largest command number QEMU 10 defines.
const CMD_MAX: u16 = 11;

/// One top-level item of a stream: its header, and where it lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub header: Header,
    /// Absolute offset of the item's type byte.
    pub offset: u64,
    /// Absolute offset one past the item's last byte (footer included).
    pub end: u64,
    /// Bytes of the item's header in the stream (type byte included).
    pub header_len: u64,
    /// Bytes of the section footer that closes the item (0 or 5).
    pub footer_len: u64,
}

impl std::ops::Deref for Item {
    type Target = Header;
    fn deref(&self) -> &Header {
        &self.header
    }
}

impl std::ops::DerefMut for Item {
    fn deref_mut(&mut self) -> &mut Header {
        &mut self.header
    }
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

    /// An item of `kind` at `offset` with an empty extent, to be filled in.
    pub fn new(kind: Kind, offset: u64) -> Self {
        let header_len = if kind == Kind::Vmdesc { vmdesc::VMDESC_HEADER } else { 1 };
        Item { header: Header::new(kind), offset, end: offset, header_len, footer_len: 0 }
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
    /// The RAM handler's state after the last RAM section (with the page
    /// map, when [`ParseOptions::page_map`] asked for it).
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
    /// A vmdesc to delimit device sections with, instead of the stream's own
    /// (from another save of the same VM, for a stream that has none).
    pub vmdesc: Option<&'p Vmdesc>,
    /// Follow every RAM record into a page map ([`Stream::page_map`]).
    pub page_map: bool,
}

impl<'p> ParseOptions<'p> {
    pub fn new(start: u64, end_hint: u64) -> Self {
        ParseOptions { start, end_hint, progress: None, vmdesc: None, page_map: false }
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
    let end_hint = opts.end_hint.min(data.len() as u64);
    let hint = tail_hint(data, end_hint, opts.vmdesc);
    let had_hint = hint.is_some();
    let mut p = StreamParser::new(opts.start, hint);
    p.end_hint = end_hint;
    p.set_page_map(opts.page_map);
    match p.advance(data, 0, true, opts.progress)? {
        Progress::Done => {}
        Progress::NeedMore => unreachable!("a final window never asks for more"),
    }
    let run = |q: &mut StreamParser| q.advance(data, 0, true, None).map(|_| ()).map_err(SourceError::Format);
    drive::settle(p, had_hint, run).map_err(|e| match e {
        SourceError::Format(e) => e,
        // A slice is never read: its parse fails only on its bytes.
        SourceError::Io { offset, error, .. } => FormatError::invalid(offset, error.to_string()),
    })
}

/// The vmdesc that delimits device sections: the one given, else the one at
/// the end of the stream in `data` (a whole file), if any.
fn tail_hint(data: &[u8], end_hint: u64, given: Option<&Vmdesc>) -> Option<Vmdesc> {
    match given {
        Some(v) => Some(v.clone()),
        None => {
            vmdesc::find_from_tail(data, end_hint, VMDESC_WINDOW).and_then(|(_, loc)| vmdesc::parse(data, loc).ok())
        }
    }
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
    /// The windows come from a source that can be read anywhere (a file, not
    /// a pipe): a mapped-ram stream is then fine, its page regions skipped.
    seekable: bool,
    /// Where the stream is thought to end (u64::MAX: the end of the data):
    /// without footers, an EOF byte counts only there.
    end_hint: u64,
    /// For the check for a second reading of a stream without footers: the
    /// section (by offset) whose other ends are tried, and the offsets where
    /// the first reading starts items, which those ends may not be (ending
    /// there would only merge sections of the first reading).
    exclude: Option<(u64, Arc<std::collections::HashSet<u64>>)>,
}

/// How many device sections without a size [`parse`] checks for a second
/// reading.
const MAX_AMBIGUITY_CHECKS: usize = 512;

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
    /// Whether the RAM records are followed into a page map.
    pub fn set_page_map(&mut self, on: bool) {
        self.ram_options.page_map = on;
    }

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
            seekable: false,
            end_hint: u64::MAX,
            exclude: None,
        }
    }

    /// Absolute offset from which the caller must keep the stream's bytes:
    /// the parser may still go back to any offset after it.
    pub fn keep_from(&self) -> u64 {
        self.choices.front().map_or(self.pos, |c| c.pos.min(self.pos))
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
}

/// Moves an error found in a copy that starts at 0 to absolute offsets.
fn shift(mut e: FormatError, by: u64) -> FormatError {
    e.offset += by;
    e
}

/// Describes an item for messages: `full section "cpu" (id 3)`.
pub fn describe(item: &Item) -> String {
    item.header.describe()
}

mod configuration;
pub use configuration::{read_machine_type, MACHINE_TYPE_MAX};
mod devices;
mod drive;
pub use drive::{parse_source, parse_watched, Flow, Watch, WINDOW};
mod items;
mod window;
use window::Win;

#[cfg(test)]
pub(crate) mod tests;
