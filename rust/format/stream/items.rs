//! The item loop: one top-level item at a time (header, sections, commands,
//! the RAM section's records, EOF and the vmdesc after it).

use super::*;

impl StreamParser {
    pub(super) fn header(&mut self, w: &Win) -> Step<()> {
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

    pub(super) fn item(&mut self, w: &Win) -> Step<()> {
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

    pub(super) fn after_eof(&mut self, w: &Win, eof: u64) -> Step<()> {
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

    pub(super) fn command(&mut self, w: &Win, at: u64) -> Step<()> {
        let mut r = w.reader(at)?;
        let mut body_at = 0;
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
            body_at = r.offset();
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
        if cmd == CMD_POSTCOPY_RAM_DISCARD {
            if let Some(ram) = self.ram.as_mut() {
                let body = w.reader(body_at)?.bytes(len as usize, "a command's data").map_err(|e| w.fail(e))?;
                ram.discard(body, body_at).map_err(|e| w.fail(e.context("a POSTCOPY_RAM_DISCARD command")))?;
            }
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
    pub(super) fn skip_step(&mut self, w: &Win, mut item: Item, left: u64) -> Step<()> {
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

    pub(super) fn section_open(&mut self, w: &Win, at: u64, t: u8) -> Step<()> {
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

    pub(super) fn section_continue(&mut self, w: &Win, at: u64, t: u8) -> Step<()> {
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
    pub(super) fn ram_step(&mut self, w: &Win, item: Item, mut eos: bool) -> Step<()> {
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
                    Ok(Record::Jump(next)) => {
                        // Past a mapped-ram page region: the bytes there need
                        // not be in the window (a source read in windows
                        // skips them).
                        if next > w.end() && w.last {
                            self.pos = rec_at;
                            return Err(Stop::Err(ctx(FormatError::truncated(
                                rec_at,
                                format!(
                                    "a mapped-ram page region runs to offset {next}, past the end of the file ({})",
                                    w.end()
                                ),
                            ))));
                        }
                        self.pos = next;
                        return Ok(());
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
    pub(super) fn push_section(&mut self, mut item: Item, payload_end: u64, end: u64) {
        item.footer_len = end - payload_end;
        item.end = end;
        self.items.push(item);
        self.pos = end;
        self.phase = Phase::Items;
    }

    /// Where the section whose payload ends at `payload_end` ends: after its
    /// footer, when the stream has footers.
    pub(super) fn footer_end(&mut self, w: &Win, item: &Item, payload_end: u64) -> Step<u64> {
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
}
