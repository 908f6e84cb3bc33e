//! The configuration section: the machine type, the target page size, the
//! migration capabilities and the VM's UUID, read before any other section.

use super::*;

/// The bytes a configuration section's machine type can take, from its
/// type byte on.
pub const MACHINE_TYPE_MAX: u64 = 1 + 4 + 256;

/// Reads the configuration's type byte and machine type name.
pub fn read_machine_type(r: &mut Reader) -> Result<String> {
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
    Ok(String::from_utf8_lossy(name).into_owned())
}

impl StreamParser {
    pub(super) fn configuration(&mut self, w: &Win, at: u64) -> Step<()> {
        let mut r = w.reader(at)?;
        let conf = self.read_configuration(&mut r).map_err(|e| w.fail(e))?;
        if let Some(bits) = conf.target_page_bits {
            self.ram_options.page_size = 1 << bits;
        }
        self.ram_options.mapped_ram = conf.capabilities.iter().any(|c| c == "mapped-ram");
        self.ram_options.ignore_shared = conf.capabilities.iter().any(|c| c == "x-ignore-shared");
        if self.ram_options.mapped_ram && !w.last && !self.seekable {
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

    pub(super) fn read_configuration(&self, r: &mut Reader) -> Result<Configuration> {
        let mut conf = Configuration { machine_type: read_machine_type(r)?, ..Default::default() };
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
}
