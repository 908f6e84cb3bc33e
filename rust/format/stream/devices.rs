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
        for (item, c) in self.device_choices.iter().take(MAX_AMBIGUITY_CHECKS) {
            let mut alt = self.clone();
            alt.device_choices.clear();
            alt.choices.clear();
            alt.first_error = None;
            alt.backtracks = 0;
            alt.vmdesc = None;
            alt.restore(c.clone());
            if run(&mut alt)? {
                let end = |p: &StreamParser| p.items.iter().find(|i| i.offset == item.offset).map_or(0, |i| i.end);
                return Err(E::from(FormatError::unsupported(
                    item.payload_start(),
                    format!(
                        "{} at offset {} can end at offset {} or at offset {}: its data holds bytes that look like its \
                         footer followed by a valid section, and without a vmdesc savedir cannot tell which is right",
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
    pub(super) fn plausible_item_at(&self, w: &Win, at: u64) -> Step<bool> {
        Ok(match w.byte(at)? {
            Some(tag::EOF) => match w.byte(at + 1)? {
                None | Some(tag::DIRECTORY) => true,
                Some(tag::VMDESC) => w.bytes(at + 2, 4)?.is_some(),
                Some(_) => false,
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
