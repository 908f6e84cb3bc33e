//! Delimiting device (FULL) sections, which carry no length: by the vmdesc's
//! sizes, or by their footers with choice points, going back when a choice
//! fails further on, and refusing a stream that parses two ways.

use super::*;

impl StreamParser {
    /// Goes back to the latest footer choice, if there is one left.
    pub(super) fn backtrack(&mut self, e: FormatError) -> std::result::Result<(), FormatError> {
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
    pub(super) fn restore(&mut self, c: Choice) {
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
    /// `run` parses a copy of the parser to the end: `Ok(true)` when it
    /// reached the stream's end, `Ok(false)` when that reading failed.
    pub(super) fn check_unambiguous<E: From<FormatError>>(
        &self,
        mut run: impl FnMut(&mut StreamParser) -> std::result::Result<bool, E>,
    ) -> std::result::Result<(), E> {
        // Without footers, a later section's other end changes fewer
        // boundaries (an earlier one's would swallow the sections between):
        // look from the last, to name the smallest difference.
        let order: Vec<&(Item, Choice)> = if self.footers == Some(false) {
            self.device_choices.iter().rev().collect()
        } else {
            self.device_choices.iter().collect()
        };
        for (item, c) in order {
            let mut alt = self.clone();
            alt.device_choices.clear();
            alt.choices.clear();
            alt.first_error = None;
            alt.backtracks = 0;
            alt.vmdesc = None;
            if self.footers == Some(false) {
                // Without footers, ending this section at a later item of
                // this reading would only merge sections: that is no second
                // reading. Its other ends are bytes this reading read as data.
                let mut starts: std::collections::HashSet<u64> = self.items.iter().map(|i| i.offset).collect();
                if let Phase::Done { eof, .. } = self.phase {
                    starts.insert(eof);
                }
                alt.exclude = Some((item.offset, Arc::new(starts)));
            }
            alt.restore(c.clone());
            if run(&mut alt)? {
                let end = |p: &StreamParser| p.items.iter().find(|i| i.offset == item.offset).map_or(0, |i| i.end);
                let why = if self.footers == Some(false) {
                    "its data holds bytes that look like a section header, and without section footers or a vmdesc \
                     savedir cannot tell which is right (a vmdesc from a save of the same VM settles it: --vmdesc FILE)"
                } else {
                    "its data holds bytes that look like its footer followed by a valid section, and without a vmdesc \
                     savedir cannot tell which is right"
                };
                return Err(E::from(FormatError::unsupported(
                    item.payload_start(),
                    format!(
                        "{} at offset {} can end at offset {} or at offset {}: {why}",
                        describe(item),
                        item.offset,
                        end(self),
                        end(&alt)
                    ),
                )));
            }
        }
        Ok(())
    }

    /// The vmdesc entry for this device section, if any.
    pub(super) fn device_index(&self, item: &Item) -> Option<usize> {
        let devices = &self.vmdesc_hint.as_ref()?.devices;
        let name = item.name.as_deref()?;
        let matches = |d: &vmdesc::DeviceDesc| d.name == name && d.instance_id == item.instance_id;
        match devices.get(self.next_device) {
            Some(d) if matches(d) => Some(self.next_device),
            _ => devices.iter().position(matches),
        }
    }

    /// Delimits a FULL section's payload by the vmdesc, else by its footer.
    pub(super) fn device_payload_end(&mut self, w: &Win, item: &Item, payload: u64) -> Step<(u64, bool)> {
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
    pub(super) fn section_ends_at(&self, w: &Win, end: u64, section_id: u32) -> Step<bool> {
        Ok(match self.footers {
            Some(true) => self.footer_at(w, end, section_id)?,
            Some(false) => self.plausible_item_at(w, end)?,
            None => self.footer_at(w, end, section_id)? || self.plausible_item_at(w, end)?,
        })
    }

    pub(super) fn footer_at(&self, w: &Win, at: u64, section_id: u32) -> Step<bool> {
        Ok(w.byte(at)? == Some(tag::FOOTER) && w.be32(at + 1)? == Some(section_id))
    }

    /// Finds the end of a payload whose length nothing gives: the first footer
    /// of this section that is followed by a plausible item.
    pub(super) fn resync(&mut self, w: &Win, item: &Item, payload: u64) -> Step<u64> {
        let from = match self.resume {
            Some((at, resume_from)) if at == item.offset => resume_from,
            _ => payload,
        };
        if self.footers == Some(false) {
            return self.next_header(w, item, from);
        }
        let mut pat = [tag::FOOTER, 0, 0, 0, 0];
        pat[1..].copy_from_slice(&item.section_id.to_be_bytes());
        let hay = w.bytes(from, 0)?.map(|_| &w.data[(from - w.base) as usize..]).unwrap_or(&[]);
        let mut pos = 0usize;
        while let Some(i) = find(&hay[pos..], &pat) {
            let at = from + (pos + i) as u64;
            if self.plausible_item_at(w, at + FOOTER_LEN)? {
                self.choose(item, at);
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
        // The whole file was searched. A stream not yet known to have
        // footers may have none: end the section at the next header instead.
        if self.footers.is_none() {
            return self.next_header(w, item, from);
        }
        // With a vmdesc at its end the file is whole and this section is one
        // savedir cannot delimit; without one, the likeliest cause is a
        // stream cut short.
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

    /// Records that `item` was taken to end at `at` (a footer or a next
    /// header that nothing confirms yet): where to go back to if the parse
    /// fails further on, and, for a device section, a reading to check.
    fn choose(&mut self, item: &Item, at: u64) {
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
    }

    /// Without footers and without a size from a vmdesc: the payload ends
    /// where the next well-formed item begins, searched from `from` (see
    /// [`plausible_next`](Self::plausible_next)). The first such place is
    /// taken; going back tries the next.
    fn next_header(&mut self, w: &Win, item: &Item, from: u64) -> Step<u64> {
        let excluded = match &self.exclude {
            Some((of, set)) if *of == item.offset => Some(set.clone()),
            _ => None,
        };
        // Nothing after the stream's end counts (an old directory there
        // copies section headers).
        let limit = w.end().min(self.end_hint);
        let mut at = from.max(w.base);
        while at < limit {
            let rest = &w.data[(at - w.base) as usize..(limit - w.base) as usize];
            let Some(i) = rest.iter().position(|&b| matches!(b, tag::EOF..=tag::FULL | tag::COMMAND)) else {
                break;
            };
            at += i as u64;
            if excluded.as_ref().is_none_or(|set| !set.contains(&at)) && self.plausible_next(w, item, at)? {
                self.choose(item, at);
                return Ok(at);
            }
            at += 1;
        }
        if !w.last && limit == w.end() {
            if w.end() - from > MAX_PENDING_SECTION {
                return Err(Stop::Err(FormatError::unsupported(
                    from,
                    format!(
                        "{} at offset {} is followed by no section header in its first {} MiB: too large to hold while the stream arrives",
                        describe(item),
                        item.offset,
                        MAX_PENDING_SECTION >> 20
                    ),
                )));
            }
            return Err(Stop::NeedMore);
        }
        Err(Stop::Err(FormatError::unsupported(
            from,
            format!(
                "cannot find where {} at offset {} ends: the stream has no section footers and no vmdesc, and no \
                 well-formed section header (nor the EOF byte at the stream's end) follows it in a way that parses \
                 to the end (a vmdesc from a save of the same VM delimits it: --vmdesc FILE)",
                describe(item),
                item.offset
            ),
        )))
    }

    /// Whether the item after `item`, in a stream without footers, can
    /// begin at `at`: a well-formed header of a kind that may come next. A
    /// section it opens has an id no earlier section has and, after a device
    /// section, a larger id than it (QEMU numbers sections as it registers
    /// them, and writes the device sections in that order); a printable
    /// name; an instance id below 2^24 and a version id of at most 1000.
    /// The EOF byte counts only where the stream ends: at the end of the
    /// data (or of what is thought to be the stream), or before a vmdesc
    /// that ends there.
    fn plausible_next(&self, w: &Win, item: &Item, at: u64) -> Step<bool> {
        let end = self.end_hint.min(if w.last { w.end() } else { u64::MAX });
        Ok(match w.byte(at)? {
            Some(tag::EOF) => {
                if at + 1 == end {
                    true
                } else if w.byte(at + 1)? == Some(tag::VMDESC) {
                    match w.be32(at + 2)? {
                        Some(len) => at + 1 + vmdesc::VMDESC_HEADER + len as u64 == end,
                        None => false,
                    }
                } else {
                    false
                }
            }
            Some(t @ (tag::START | tag::FULL)) => {
                let Some(id) = w.be32(at + 1)? else { return Ok(false) };
                if self.sections.contains_key(&id)
                    || (item.kind == Kind::Full && t == tag::FULL && id <= item.section_id)
                {
                    return Ok(false);
                }
                let Some(n) = w.byte(at + 5)? else { return Ok(false) };
                let Some(rest) = w.bytes(at + 6, n as u64 + 8)? else { return Ok(false) };
                let name = &rest[..n as usize];
                let instance = u32::from_be_bytes([
                    rest[n as usize],
                    rest[n as usize + 1],
                    rest[n as usize + 2],
                    rest[n as usize + 3],
                ]);
                let version = u32::from_be_bytes([
                    rest[n as usize + 4],
                    rest[n as usize + 5],
                    rest[n as usize + 6],
                    rest[n as usize + 7],
                ]);
                n > 0 && name.iter().all(|&c| (0x21..0x7f).contains(&c)) && instance < 1 << 24 && version <= 1000
            }
            Some(tag::PART | tag::END) => {
                let Some(id) = w.be32(at + 1)? else { return Ok(false) };
                matches!(self.sections.get(&id), Some(s) if s.live && !s.ended)
            }
            Some(tag::COMMAND) => {
                let Some(b) = w.bytes(at + 1, 4)? else { return Ok(false) };
                let cmd = u16::from_be_bytes([b[0], b[1]]);
                let len = u16::from_be_bytes([b[2], b[3]]);
                (1..=CMD_MAX).contains(&cmd) && len <= 256
            }
            _ => false,
        })
    }

    /// A cheap test that a top-level item could start at `at`.
    pub(super) fn plausible_item_at(&self, w: &Win, at: u64) -> Step<bool> {
        Ok(match w.byte(at)? {
            Some(tag::EOF) => match w.byte(at + 1)? {
                None | Some(tag::DIRECTORY) => true,
                Some(tag::VMDESC) => w.bytes(at + 2, 4)?.is_some(),
                // savedir's RAM page map, before its directory
                Some(_) if at + 1 == self.end_hint => true,
                Some(_) => w.bytes(at + 1, 8)?.is_some_and(|b| b == crate::format::pagemap::MAGIC),
            },
            Some(t @ (tag::START | tag::FULL)) => {
                let Some(id) = w.be32(at + 1)? else {
                    return Ok(false);
                };
                let Some(n) = w.byte(at + 5)? else {
                    return Ok(false);
                };
                let Some(name) = w.bytes(at + 6, n as u64 + 8)? else {
                    return Ok(false);
                };
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
                let Some(id) = w.be32(at + 1)? else {
                    return Ok(false);
                };
                matches!(self.sections.get(&id), Some(s) if s.live && !s.ended)
            }
            Some(tag::COMMAND) => {
                let Some(b) = w.bytes(at + 1, 4)? else {
                    return Ok(false);
                };
                let cmd = u16::from_be_bytes([b[0], b[1]]);
                (1..=CMD_MAX).contains(&cmd)
            }
            _ => false,
        })
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
