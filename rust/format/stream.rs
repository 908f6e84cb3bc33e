//! The top-level grammar of a QEMU migration stream.
//!
//! [`parse`] walks a stream from its magic to its EOF byte and the vmdesc
//! after it, and returns every top-level item with its extent in the file.
//! Device (FULL) sections carry no length: they are delimited by the sizes in
//! the vmdesc when one is at hand, each confirmed by the section footer, and
//! otherwise by finding the footer and checking that a valid item follows.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{FormatError, FormatErrorKind, Result};
use super::ram::{RamOptions, RamState, RAM_SECTION_VERSION};
use super::reader::{be32_at, byte_at, Reader};
use super::vmdesc::{self, Vmdesc, VmdescLocation};
use super::{command_name, show_bytes, tag, Kind, STREAM_MAGIC, STREAM_VERSION, STREAM_VERSION_COMPAT};

/// Bytes of a section footer: 0x7e and the be32 section id.
pub const FOOTER_LEN: u64 = 5;
/// Bytes of the stream header: magic and version.
pub const HEADER_LEN: u64 = 8;
/// How far from a stream's end the vmdesc is looked for.
pub const VMDESC_WINDOW: u64 = 64 << 20;
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
}

/// How to parse.
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

struct Parser<'a, 'p> {
    data: &'a [u8],
    r: Reader<'a>,
    items: Vec<Item>,
    sections: HashMap<u32, SectionRef>,
    footers: Option<bool>,
    configuration: Option<Configuration>,
    vmdesc_hint: Option<Vmdesc>,
    next_device: usize,
    ram: Option<RamState>,
    ram_options: RamOptions,
    progress: Option<&'p mut dyn FnMut(u64)>,
    last_progress: u64,
}

/// Checks the magic and version at `start`.
pub fn check_header(data: &[u8], start: u64) -> Result<()> {
    let magic = be32_at(data, start).ok_or_else(|| {
        FormatError::new(
            FormatErrorKind::NotAStream,
            start,
            format!(
                "not a QEMU migration stream: expected the magic \"QEVM\", found {} byte{} of data",
                (data.len() as u64).saturating_sub(start),
                if data.len() as u64 == start + 1 { "" } else { "s" }
            ),
        )
    })?;
    if magic != STREAM_MAGIC {
        let found = super::reader::slice(data, start, start + 4).unwrap_or(&[]);
        return Err(FormatError::new(
            FormatErrorKind::NotAStream,
            start,
            format!("not a QEMU migration stream: expected the magic \"QEVM\", found \"{}\"", show_bytes(found)),
        ));
    }
    match be32_at(data, start + 4) {
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
    let mut r = Reader::new(data);
    r.seek(opts.start + HEADER_LEN)?;
    let vmdesc_hint = vmdesc::find_from_tail(data, opts.end_hint.min(data.len() as u64), VMDESC_WINDOW)
        .and_then(|(_, loc)| vmdesc::parse(data, loc).ok());
    let mut ram_options = RamOptions::default();
    if let Some(ps) = vmdesc_hint.as_ref().and_then(|v| v.page_size) {
        if ps.is_power_of_two() && (512..=1 << 20).contains(&ps) {
            ram_options.page_size = ps;
        }
    }
    let p = Parser {
        data,
        r,
        items: Vec::new(),
        sections: HashMap::new(),
        footers: None,
        configuration: None,
        vmdesc_hint,
        next_device: 0,
        ram: None,
        ram_options,
        progress: opts.progress,
        last_progress: 0,
    };
    p.run(opts.start)
}

impl<'a, 'p> Parser<'a, 'p> {
    fn run(mut self, start: u64) -> Result<Stream> {
        let eof = loop {
            let at = self.r.offset();
            self.tick(at);
            let t = self.r.peek().ok_or_else(|| {
                FormatError::truncated(
                    at,
                    "expected another item or the EOF byte, found the end of the file (the stream is cut short)",
                )
            })?;
            match t {
                tag::EOF => break at,
                tag::CONFIGURATION if self.items.is_empty() => self.configuration(at)?,
                tag::START | tag::FULL => self.section_open(at, t)?,
                tag::PART | tag::END => self.section_continue(at, t)?,
                tag::COMMAND => self.command(at)?,
                _ => {
                    return Err(FormatError::invalid(
                        at,
                        format!("expected an item type (0x00-0x04, 0x08), found 0x{t:02x}"),
                    ))
                }
            }
        };
        // After EOF: a vmdesc, or nothing that belongs to the stream.
        let vmdesc = match byte_at(self.data, eof + 1) {
            Some(tag::VMDESC) => {
                let loc = vmdesc::locate_at(self.data, eof + 1)?;
                vmdesc::parse(self.data, loc)?;
                let mut item = Item::new(Kind::Vmdesc, loc.offset);
                item.header_len = vmdesc::VMDESC_HEADER;
                item.end = loc.end();
                self.items.push(item);
                Some(loc)
            }
            _ => None,
        };
        let end = vmdesc.map_or(eof + 1, |v| v.end());
        self.tick(end);
        let page_size = self.ram_options.page_size;
        Ok(Stream {
            start,
            items: self.items,
            eof,
            end,
            vmdesc,
            configuration: self.configuration,
            footers: self.footers,
            ram: self.ram,
            page_size,
        })
    }

    fn tick(&mut self, at: u64) {
        if let Some(p) = self.progress.as_mut() {
            if at >= self.last_progress + (64 << 20) || at < self.last_progress {
                self.last_progress = at;
                p(at);
            }
        }
    }

    fn configuration(&mut self, at: u64) -> Result<()> {
        let mut r = self.r;
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
                        return Err(FormatError::invalid(n_at, format!("expected at most 256 capabilities, found {n}")));
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
        self.r = r;
        if let Some(bits) = conf.target_page_bits {
            self.ram_options.page_size = 1 << bits;
        }
        self.ram_options.mapped_ram = conf.capabilities.iter().any(|c| c == "mapped-ram");
        self.ram_options.ignore_shared = conf.capabilities.iter().any(|c| c == "x-ignore-shared");
        let mut item = Item::new(Kind::Configuration, at);
        item.end = r.offset();
        item.header_len = 1;
        self.items.push(item);
        self.configuration = Some(conf);
        Ok(())
    }

    fn command(&mut self, at: u64) -> Result<()> {
        let r = &mut self.r;
        r.u8("the command type byte")?;
        let cmd_at = r.offset();
        let cmd = r.be16("a command number")?;
        let len = r.be16("a command length")?;
        if cmd == 0 || cmd > CMD_MAX {
            return Err(FormatError::invalid(cmd_at, format!("expected a command number from 1 to {CMD_MAX}, found {cmd}")));
        }
        let body_at = r.offset();
        let body = r.bytes(len as usize, "a command's data")?;
        if cmd == CMD_PACKAGED {
            if len != 4 {
                return Err(FormatError::invalid(body_at, format!("expected a PACKAGED command of 4 bytes, found {len}")));
            }
            let n = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            r.skip(n as u64, "a PACKAGED command's nested stream")?;
        }
        if cmd == CMD_POSTCOPY_ADVISE && len == 16 {
            self.ram_options.postcopy = true;
        }
        let mut item = Item::new(Kind::Command, at);
        item.header_len = 5;
        item.command = cmd;
        item.command_len = len;
        item.end = r.offset();
        self.items.push(item);
        Ok(())
    }

    fn section_open(&mut self, at: u64, t: u8) -> Result<()> {
        let kind = if t == tag::START { Kind::Start } else { Kind::Full };
        let r = &mut self.r;
        r.u8("a section type byte")?;
        let id_at = r.offset();
        let section_id = r.be32("a section id")?;
        let name_at = r.offset();
        let name = r.cstr8("a section name")?;
        if name.is_empty() {
            return Err(FormatError::invalid(name_at, "expected a section name, found an empty one"));
        }
        let instance_id = r.be32("a section instance id")?;
        let version_id = r.be32("a section version id")?;
        let header_len = r.offset() - at;
        let name: Arc<str> = Arc::from(String::from_utf8_lossy(name).as_ref());
        if let Some(old) = self.sections.get(&section_id) {
            if kind == Kind::Start || old.live {
                return Err(FormatError::invalid(
                    id_at,
                    format!("section id {section_id} ({name}) was already opened by \"{}\"", old.name),
                ));
            }
        }
        let ram = kind == Kind::Start && &*name == "ram";
        let mut item = Item::new(kind, at);
        item.header_len = header_len;
        item.section_id = section_id;
        item.name = Some(name.clone());
        item.instance_id = instance_id;
        item.version_id = version_id;
        self.sections.insert(
            section_id,
            SectionRef { name: name.clone(), instance_id, version_id, live: kind == Kind::Start, ram, ended: false },
        );
        let ctx = || format!("{} section \"{name}\" (id {section_id}) at offset {at}", kind.as_str());
        if ram {
            if version_id != RAM_SECTION_VERSION {
                return Err(FormatError::unsupported(
                    at,
                    format!("expected RAM section version {RAM_SECTION_VERSION}, found {version_id}"),
                ));
            }
            if self.ram.is_some() {
                return Err(FormatError::invalid(at, "found a second \"ram\" START section"));
            }
            self.ram = Some(RamState::new(self.ram_options));
            self.ram_payload().map_err(|e| e.context(ctx()))?;
        } else if kind == Kind::Full {
            self.device_payload(&mut item).map_err(|e| e.context(ctx()))?;
        } else {
            self.resync(&item).map_err(|e| e.context(ctx()))?;
        }
        self.close_section(item, section_id)
    }

    fn section_continue(&mut self, at: u64, t: u8) -> Result<()> {
        let kind = if t == tag::PART { Kind::Part } else { Kind::End };
        let r = &mut self.r;
        r.u8("a section type byte")?;
        let id_at = r.offset();
        let section_id = r.be32("a section id")?;
        let sec = match self.sections.get_mut(&section_id) {
            Some(s) if s.live && !s.ended => s,
            Some(s) if s.live => {
                return Err(FormatError::invalid(
                    id_at,
                    format!("a {} section continues section id {section_id} ({}), which has ended", kind.as_str(), s.name),
                ))
            }
            _ => {
                return Err(FormatError::invalid(
                    id_at,
                    format!("a {} section names section id {section_id}, which no START opened", kind.as_str()),
                ))
            }
        };
        if kind == Kind::End {
            sec.ended = true;
        }
        let sec = sec.clone();
        let mut item = Item::new(kind, at);
        item.header_len = 5;
        item.section_id = section_id;
        item.name = Some(sec.name.clone());
        item.instance_id = sec.instance_id;
        item.version_id = sec.version_id;
        let ctx = || format!("{} section \"{}\" (id {section_id}) at offset {at}", kind.as_str(), sec.name);
        if sec.ram {
            self.ram_payload().map_err(|e| e.context(ctx()))?;
        } else {
            self.resync(&item).map_err(|e| e.context(ctx()))?;
        }
        self.close_section(item, section_id)
    }

    fn ram_payload(&mut self) -> Result<()> {
        let ram = self.ram.as_mut().expect("ram state exists once a ram START was read");
        if let Some(p) = self.progress.as_mut() {
            let mut last = self.last_progress;
            let mut tick = |at: u64| {
                if at >= last + (64 << 20) {
                    last = at;
                    p(at);
                }
            };
            let res = ram.parse_payload_with(&mut self.r, &mut tick);
            self.last_progress = last;
            res
        } else {
            ram.parse_payload(&mut self.r)
        }
    }

    /// Delimits a FULL section's payload by the vmdesc, else by its footer.
    fn device_payload(&mut self, item: &mut Item) -> Result<()> {
        let payload = self.r.offset();
        let name = item.name.clone().unwrap_or_else(|| Arc::from(""));
        if let Some(size) = self.device_size(&name, item.instance_id) {
            if let Some(end) = payload.checked_add(size) {
                if self.section_ends_at(end, item.section_id) {
                    return self.r.seek(end);
                }
            }
        }
        self.resync(item)
    }

    /// The payload size the vmdesc gives for this device, if any.
    fn device_size(&mut self, name: &str, instance_id: u32) -> Option<u64> {
        let devices = &self.vmdesc_hint.as_ref()?.devices;
        let matches = |d: &&vmdesc::DeviceDesc| d.name == name && d.instance_id == instance_id;
        let idx = match devices.get(self.next_device) {
            Some(d) if matches(&d) => self.next_device,
            _ => devices.iter().position(|d| matches(&d))?,
        };
        self.next_device = idx + 1;
        devices[idx].payload_size
    }

    /// True when a section payload that ends at `end` is followed by what
    /// must come next: its footer (when the stream has footers) or an item.
    fn section_ends_at(&self, end: u64, section_id: u32) -> bool {
        match self.footers {
            Some(true) => self.footer_at(end, section_id),
            Some(false) => self.plausible_item_at(end),
            None => self.footer_at(end, section_id) || self.plausible_item_at(end),
        }
    }

    fn footer_at(&self, at: u64, section_id: u32) -> bool {
        byte_at(self.data, at) == Some(tag::FOOTER) && be32_at(self.data, at + 1) == Some(section_id)
    }

    /// Finds the end of a payload whose length nothing gives: the first footer
    /// of this section that is followed by a plausible item.
    fn resync(&mut self, item: &Item) -> Result<()> {
        let from = self.r.offset();
        if self.footers == Some(false) {
            return Err(FormatError::unsupported(
                from,
                "cannot find where this section ends: the stream has no section footers and no vmdesc describes it",
            ));
        }
        let mut pat = [tag::FOOTER, 0, 0, 0, 0];
        pat[1..].copy_from_slice(&item.section_id.to_be_bytes());
        let hay = &self.data[from as usize..];
        let mut pos = 0usize;
        while let Some(i) = find(&hay[pos..], &pat) {
            let at = from + (pos + i) as u64;
            if self.plausible_item_at(at + FOOTER_LEN) {
                return self.r.seek(at);
            }
            pos += i + 1;
        }
        Err(FormatError::unsupported(
            from,
            if self.vmdesc_hint.is_some() {
                "cannot find where this section ends: the vmdesc does not describe it and no footer followed by a valid item was found"
            } else {
                "cannot find where this section ends: the file has no vmdesc to give its size, and no footer followed by a valid item was found"
            },
        ))
    }

    /// A cheap test that a top-level item could start at `at`.
    fn plausible_item_at(&self, at: u64) -> bool {
        let d = self.data;
        match byte_at(d, at) {
            Some(tag::EOF) => match byte_at(d, at + 1) {
                None | Some(tag::DIRECTORY) => true,
                Some(tag::VMDESC) => vmdesc::locate_at(d, at + 1).is_ok() && byte_at(d, at + 6) == Some(b'{'),
                Some(_) => false,
            },
            Some(t @ (tag::START | tag::FULL)) => {
                let Some(id) = be32_at(d, at + 1) else { return false };
                let Some(n) = byte_at(d, at + 5) else { return false };
                let Some(name) = super::reader::slice(d, at + 6, at + 6 + n as u64) else { return false };
                if n == 0 || !name.iter().all(|&c| (0x20..0x7f).contains(&c)) {
                    return false;
                }
                if be32_at(d, at + 6 + n as u64 + 4).is_none() {
                    return false;
                }
                match self.sections.get(&id) {
                    None => true,
                    Some(s) => t == tag::FULL && !s.live && s.name.as_bytes() == name,
                }
            }
            Some(tag::PART | tag::END) => {
                let Some(id) = be32_at(d, at + 1) else { return false };
                matches!(self.sections.get(&id), Some(s) if s.live && !s.ended)
            }
            Some(tag::COMMAND) => {
                let Some(b) = super::reader::slice(d, at + 1, at + 5) else { return false };
                let cmd = u16::from_be_bytes([b[0], b[1]]);
                let len = u16::from_be_bytes([b[2], b[3]]) as u64;
                (1..=CMD_MAX).contains(&cmd) && at + 5 + len <= d.len() as u64
            }
            _ => false,
        }
    }

    /// Reads the footer (if the stream has them) and records the item.
    fn close_section(&mut self, mut item: Item, section_id: u32) -> Result<()> {
        let at = self.r.offset();
        if self.footers.is_none() {
            self.footers = Some(byte_at(self.data, at) == Some(tag::FOOTER));
        }
        if self.footers == Some(true) {
            if !self.footer_at(at, section_id) {
                let found = match (byte_at(self.data, at), be32_at(self.data, at + 1)) {
                    (Some(tag::FOOTER), Some(id)) => format!("the footer of section id {id}"),
                    (Some(b), _) => format!("byte 0x{b:02x}"),
                    (None, _) => "the end of the file".to_owned(),
                };
                return Err(FormatError::invalid(
                    at,
                    format!("expected the footer of {}, found {found}", describe(&item)),
                ));
            }
            self.r.skip(FOOTER_LEN, "a section footer")?;
            item.footer_len = FOOTER_LEN;
        }
        item.end = self.r.offset();
        self.items.push(item);
        Ok(())
    }
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
        Kind::Configuration | Kind::Vmdesc => item.kind.as_str().to_owned(),
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
        for (id, name, payload) in [(5u32, &b"timer"[..], &[1u8, 2, 3, 4][..]), (6, b"cpu", &[0x7e, 0, 0, 0, 6, 9])] {
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
        let json = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_name":"timer","version":1,"fields":[{"name":"a","type":"uint32","size":4}]},{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":1,"fields":[{"name":"b","type":"buffer","size":6}]}]}"#;
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
    fn every_truncation_is_an_error_not_a_panic() {
        let d = sample_stream(true);
        let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof;
        for cut in 0..=eof as usize {
            let e = parse(&d[..cut], ParseOptions::new(0, cut as u64));
            assert!(e.is_err(), "cut at {cut} parsed");
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
