//! Where an x86 guest's RAMBlocks lie in its physical address space.
//!
//! QEMU builds the guest-physical view of `pc`, `q35`, `isapc` and
//! `microvm` machines from a few rules (hw/i386/pc_piix.c, pc_q35.c, pc.c,
//! microvm.c, x86-common.c, hw/pci-host/i440fx.c, q35.c, pam.c); a save
//! carries everything those rules need: the machine type (configuration
//! section), the RAMBlocks and their sizes (the RAM section's block list),
//! and the chipset's and PCI devices' configuration spaces (device sections,
//! located through the vmdesc). [`x86_layout`] applies the rules.
//!
//! The view is painted like QEMU's flat view: the PCI address space at the
//! bottom (BARs, the BIOS below 4 GiB), RAM over it, then the chipset's
//! overlays (the PAM segments of 0xc0000..0x100000, the SMRAM window over
//! 0xa0000..0xc0000, TSEG). The resulting ranges are merged where QEMU's
//! `dump-guest-memory` merges them (system/memory_mapping.c: contiguous in
//! guest-physical address, same RAMBlock, contiguous offset), so with paging
//! off every range is one of its `PT_LOAD`s.

use std::fmt;

use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;

/// Start of the HyperTransport hole of AMD hosts (pc.c `AMD_HT_START`).
const AMD_HT_START: u64 = 0xfd_0000_0000;
/// Largest default 64-bit PCI hole (q35's 32 GiB), for the AMD check.
const MAX_DEFAULT_HOLE64: u64 = 32 * GIB;

/// The legacy VGA window.
const VGA_WINDOW: (u64, u64) = (0xa_0000, 0xc_0000);
/// `pc.rom`'s address (`PC_ROM_MIN_VGA`).
const PC_ROM_BASE: u64 = 0xc_0000;
/// Where the ISA VGA's linear frame buffer sits (`VBE_DISPI_LFB_PHYSICAL_ADDRESS`).
const ISA_VGA_LFB: u64 = 0xe000_0000;
/// q35: where the SMRAM window opens high (`smram-open-high`).
const Q35_HIGH_SMRAM: u64 = 0xfeda_0000;
/// q35: the SMBASE blackhole (`MCH_HOST_BRIDGE_SMBASE_ADDR`, `_SIZE`).
const Q35_SMBASE: (u64, u64) = (0x3_0000, 0x1_0000);

// PCI configuration space offsets.
const PCI_COMMAND: usize = 0x04;
const PCI_COMMAND_MEMORY: u8 = 0x02;
const PCI_CLASS_DEVICE: usize = 0x0a;
const PCI_HEADER_TYPE: usize = 0x0e;
const PCI_BAR0: usize = 0x10;
const PCI_ROM_ADDRESS: usize = 0x30;
const PCI_ROM_ADDRESS1: usize = 0x38;
const PCI_CLASS_DISPLAY_VGA: u16 = 0x0300;

// Host bridge registers.
const I440FX_PAM: usize = 0x59;
const I440FX_SMRAM: usize = 0x72;
const MCH_PAM0: usize = 0x90;
const MCH_F_SMBASE: usize = 0x9c;
const MCH_SMRAM: usize = 0x9d;
const MCH_ESMRAMC: usize = 0x9e;
const MCH_EXT_TSEG_MBYTES: usize = 0x50;
const SMRAM_D_OPEN: u8 = 0x40;
const SMRAM_G_SMRAME: u8 = 0x08;
const ESMRAMC_H_SMRAME: u8 = 0x80;
const ESMRAMC_T_EN: u8 = 0x01;
const F_SMBASE_LCK: u8 = 0x02;

/// One piece of the guest-physical view backed by a RAMBlock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    pub size: u64,
    /// The RAMBlock's idstr.
    pub block: String,
    /// Offset of the first byte within the block.
    pub offset: u64,
}

impl PhysRange {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// A block that has no place in the view, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmapped {
    pub block: String,
    pub reason: String,
}

/// The view: ranges sorted by address, never overlapping, and the blocks
/// (or parts of blocks) that are not in it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    pub ranges: Vec<PhysRange>,
    pub unmapped: Vec<Unmapped>,
}

/// Overrides for what a save cannot tell.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutOptions {
    /// Bytes of the main RAM below 4 GiB, as if the guest had been started
    /// with `-machine max-ram-below-4g=N` (pc, q35, isapc, microvm apply
    /// their own rules to it, as QEMU does).
    pub below_4g: Option<u64>,
    /// Where the RAM above 4 GiB starts (QEMU moves it to 1 TiB for AMD
    /// vCPUs when it would reach the HyperTransport hole).
    pub above_4g_start: Option<u64>,
    /// The main RAM's block, when it is not the machine's default
    /// (`-machine memory-backend=ID` names it after the backend).
    pub ram_block: Option<String>,
}

/// The PCI configuration space of one function of the save, from its
/// device section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// The device's path as QEMU prefixes its sections and blocks with,
    /// e.g. `0000:00:02.0`.
    pub path: String,
    /// The section's name, e.g. `0000:00:02.0/vga`.
    pub section: String,
    pub config: Vec<u8>,
}

/// What the save's device sections say about the layout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub pci: Vec<PciFunction>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The machine type is not one whose layout savedir knows.
    UnknownMachine { machine: String, message: String },
    /// The layout cannot be derived from what the save carries.
    Underivable { machine: String, message: String },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::UnknownMachine { machine, message } => {
                write!(f, "machine type \"{machine}\": {message}")
            }
            LayoutError::Underivable { machine, message } => write!(f, "machine type \"{machine}\": {message}"),
        }
    }
}

impl std::error::Error for LayoutError {}

/// The machine families whose layout is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `pc-i440fx-*` and `pc`; `gigabyte_align` is false for 1.7 and older.
    I440fx {
        gigabyte_align: bool,
    },
    Q35,
    Isapc,
    Microvm,
}

impl Family {
    fn pci(self) -> bool {
        matches!(self, Family::I440fx { .. } | Family::Q35)
    }
}

/// Parses `major.minor` (ignoring a third part such as q35's `4.0.1`).
fn version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The family of a machine type as the configuration section names it.
pub fn family(machine: &str) -> Result<Family, LayoutError> {
    let unknown = |message: String| LayoutError::UnknownMachine { machine: machine.to_owned(), message };
    let i440fx_version = machine.strip_prefix("pc-i440fx-").or_else(|| {
        // QEMU up to 1.3 named its i440fx types pc-1.0 ... pc-1.3
        machine.strip_prefix("pc-").filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
    });
    if machine == "pc" {
        return Ok(Family::I440fx { gigabyte_align: true });
    }
    if let Some(v) = i440fx_version {
        let v = version(v).ok_or_else(|| unknown(format!("cannot read the version \"{v}\"")))?;
        return Ok(Family::I440fx { gigabyte_align: v > (1, 7) });
    }
    if machine == "q35" || machine.starts_with("pc-q35-") {
        return Ok(Family::Q35);
    }
    match machine {
        "isapc" => Ok(Family::Isapc),
        "microvm" => Ok(Family::Microvm),
        m if m.starts_with("xenfv") || m.starts_with("xenpv") => {
            Err(unknown("Xen machines lay out RAM in Xen's own way, which savedir does not know".into()))
        }
        _ => Err(unknown("not an x86 machine type savedir knows the layout of (pc, q35, isapc, microvm)".into())),
    }
}

/// Bytes of the main RAM below and above 4 GiB.
pub fn ram_split(family: Family, ram_size: u64, max_below_4g: Option<u64>) -> (u64, u64) {
    let lowmem = match family {
        // pc_piix.c pc_init1 (isapc too): 3.5 GiB by default; a guest that
        // does not fit is split at 3 GiB at most (gigabyte alignment: pc
        // types newer than 1.7, never isapc).
        Family::I440fx { .. } | Family::Isapc => {
            let max = max_below_4g.unwrap_or(0xe000_0000);
            if ram_size >= max && family == (Family::I440fx { gigabyte_align: true }) {
                max.min(0xc000_0000)
            } else {
                max
            }
        }
        // pc_q35.c: 2.75 GiB if it all fits, else 2 GiB; then at most
        // max-ram-below-4g.
        Family::Q35 => {
            let low = if ram_size >= 0xb000_0000 { 0x8000_0000 } else { 0xb000_0000 };
            low.min(max_below_4g.unwrap_or(FOUR_GIB))
        }
        // microvm.c: 3 GiB, split only when the RAM is larger (microvm has
        // no max-ram-below-4g; an override replaces the 3 GiB).
        Family::Microvm => {
            let low = max_below_4g.unwrap_or(0xc000_0000);
            return if ram_size > low { (low, ram_size - low) } else { (ram_size, 0) };
        }
    };
    if ram_size >= lowmem {
        (lowmem, ram_size - lowmem)
    } else {
        (ram_size, 0)
    }
}

/// What occupies a piece of the view while it is painted.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fill {
    Block {
        block: usize,
        offset: u64,
    },
    /// MMIO or a blackhole: not RAM.
    Hole,
}

/// A painter's flat view: disjoint pieces sorted by address.
#[derive(Default)]
struct View {
    pieces: Vec<(u64, u64, Fill)>,
}

impl View {
    /// Paints `[start, end)` with `fill` over whatever was there.
    fn paint(&mut self, start: u64, end: u64, fill: Fill) {
        if start >= end {
            return;
        }
        let mut out = Vec::with_capacity(self.pieces.len() + 2);
        for (s, e, f) in self.pieces.drain(..) {
            if e <= start || s >= end {
                out.push((s, e, f));
                continue;
            }
            if s < start {
                out.push((s, start, f.clone()));
            }
            if e > end {
                let shift = end - s;
                let rest = match &f {
                    Fill::Block { block, offset } => Fill::Block { block: *block, offset: offset + shift },
                    Fill::Hole => Fill::Hole,
                };
                out.push((end, e, rest));
            }
        }
        out.push((start, end, fill));
        out.sort_by_key(|p| p.0);
        self.pieces = out;
    }

    /// Paints block `block` from `offset` at `[start, start + size)`.
    fn block(&mut self, start: u64, size: u64, block: usize, offset: u64) {
        self.paint(start, start.saturating_add(size), Fill::Block { block, offset });
    }
}

/// A PCI memory BAR's address, if QEMU maps it (hw/pci/pci.c `pci_bar_address`).
fn bar_address(config: &[u8], reg: usize, size: u64) -> Option<u64> {
    if config.get(PCI_COMMAND)? & PCI_COMMAND_MEMORY == 0 || !size.is_power_of_two() {
        return None;
    }
    let lo = u32::from_le_bytes(config.get(reg..reg + 4)?.try_into().ok()?) as u64;
    let addr = if reg == PCI_ROM_ADDRESS || reg == PCI_ROM_ADDRESS1 {
        if lo & 1 == 0 {
            return None;
        }
        lo
    } else {
        if lo & 1 != 0 {
            return None; // an I/O BAR
        }
        if (lo >> 1) & 3 == 2 {
            let hi = u32::from_le_bytes(config.get(reg + 4..reg + 8)?.try_into().ok()?) as u64;
            (hi << 32) | lo
        } else {
            lo
        }
    };
    let is64 = reg != PCI_ROM_ADDRESS && reg != PCI_ROM_ADDRESS1 && (lo >> 1) & 3 == 2;
    let addr = addr & !(size - 1);
    let last = addr.checked_add(size - 1)?;
    if addr == 0 || last <= addr || (!is64 && last >= u32::MAX as u64) {
        return None;
    }
    Some(addr)
}

fn config_u16(config: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(config.get(at..at + 2)?.try_into().ok()?))
}

/// Whether `path` names a function on the root bus (`0000:00:02.0`).
fn root_bus(path: &str) -> bool {
    let b = path.as_bytes();
    b.len() == 12 && path.starts_with("0000:00:") && b[10] == b'.'
}

/// The guest-physical layout of an x86 save.
///
/// `machine_type` as the configuration section names it (`pc-i440fx-10.0`,
/// `pc-q35-7.2`, `isapc`, `microvm`, or the aliases `pc` and `q35`);
/// `blocks`: the RAM section's (idstr, used length) list in stream order;
/// `devices`: the PCI configuration spaces the save carries (the host
/// bridge's PAM and SMRAM registers, the BARs of devices that own blocks).
pub fn x86_layout(
    machine_type: &str,
    blocks: &[(&str, u64)],
    devices: &DeviceFacts,
    opts: &LayoutOptions,
) -> Result<Layout, LayoutError> {
    let fam = family(machine_type)?;
    let fail = |message: String| LayoutError::Underivable { machine: machine_type.to_owned(), message };
    if let Some(b) = opts.below_4g {
        if b > FOUR_GIB {
            return Err(fail(format!("the RAM below 4 GiB cannot be {b} bytes (more than 4 GiB)")));
        }
    }
    let find = |name: &str| blocks.iter().position(|(n, _)| *n == name);
    let default_ram = if fam == Family::Microvm { "microvm.ram" } else { "pc.ram" };
    let main = match &opts.ram_block {
        Some(name) => find(name).ok_or_else(|| fail(format!("the save has no RAM block \"{name}\"")))?,
        None => find(default_ram).ok_or_else(|| {
            let names: Vec<&str> = blocks.iter().map(|b| b.0).collect();
            fail(format!(
                "the save has no \"{default_ram}\" block (blocks: {}); name the guest's RAM block (as started with -machine memory-backend=ID)",
                names.join(", ")
            ))
        })?,
    };
    let ram_size = blocks[main].1;
    let (below, above) = ram_split(fam, ram_size, opts.below_4g);
    let high_start = match opts.above_4g_start {
        Some(s) => s,
        None => {
            let end = (FOUR_GIB + above).div_ceil(GIB) * GIB;
            if above > 0 && fam.pci() && end + MAX_DEFAULT_HOLE64 > AMD_HT_START {
                return Err(fail(format!(
                    "{above} bytes of RAM above 4 GiB reach the AMD HyperTransport hole, where QEMU moves them to 1 TiB \
                     for AMD vCPUs only; the save does not say which the vCPUs were: give the address the RAM above \
                     4 GiB starts at"
                )));
            }
            FOUR_GIB
        }
    };

    let pci_of = |path: &str| devices.pci.iter().find(|f| f.path == path);
    let host_bridge = devices
        .pci
        .iter()
        .find(|f| f.path == "0000:00:00.0" && (f.section.ends_with("/I440FX") || f.section.ends_with("/mch")));
    let mut view = View::default();
    let mut unmapped = Vec::new();
    let mut placed = vec![false; blocks.len()];
    placed[main] = true;
    let bios = find("pc.bios");
    let mut pci_low: Vec<(u64, u64, usize, u64)> = Vec::new(); // ROM regions of the PCI space below 1 MiB

    // 1. The PCI address space (under RAM on pc and q35; isapc and microvm
    //    put the same regions straight into system memory).
    if let Some(b) = bios {
        let size = blocks[b].1;
        let isa = size.min(128 * 1024);
        view.block(FOUR_GIB - size, size, b, 0);
        pci_low.push((MIB - isa, isa, b, size - isa));
        placed[b] = true;
    }
    if let Some(b) = find("isa-bios") {
        // QEMU < 9.1 copies the flash's last 128 KiB into its own block.
        let size = blocks[b].1;
        pci_low.push((MIB.saturating_sub(size), size, b, 0));
        placed[b] = true;
    }
    if fam != Family::Microvm {
        if let Some(b) = find("pc.rom") {
            pci_low.insert(0, (PC_ROM_BASE, blocks[b].1, b, 0));
            placed[b] = true;
        }
    }
    let mut legacy_vga = false;
    for (i, (name, size)) in blocks.iter().enumerate() {
        if placed[i] {
            continue;
        }
        let (path, leaf) = match name.rsplit_once('/') {
            Some(pl) => pl,
            None if *name == "vga.vram" && fam == Family::Isapc => {
                // isa-vga: the legacy window and the VBE frame buffer.
                view.block(ISA_VGA_LFB, *size, i, 0);
                legacy_vga = true;
                placed[i] = true;
                continue;
            }
            None if *name == "vga.vram" => {
                // Old machine types register a PCI VGA's memory without its
                // device path (global-vmstate): the one PCI VGA owns it.
                let mut vgas = devices.pci.iter().filter(|f| root_bus(&f.path) && f.section.ends_with("/vga"));
                match (vgas.next(), vgas.next()) {
                    (Some(f), None) => (f.path.as_str(), "vga.vram"),
                    _ => continue,
                }
            }
            None => continue,
        };
        if path.is_empty() || path.starts_with("/rom@") {
            continue;
        }
        let Some(f) = pci_of(path).filter(|_| root_bus(path) && fam.pci()) else {
            continue;
        };
        let reg = if leaf == "vga.vram" {
            PCI_BAR0
        } else if leaf.ends_with(".rom") {
            if f.config.get(PCI_HEADER_TYPE).is_some_and(|h| h & 0x7f == 1) {
                PCI_ROM_ADDRESS1
            } else {
                PCI_ROM_ADDRESS
            }
        } else {
            continue;
        };
        placed[i] = true;
        match bar_address(&f.config, reg, *size) {
            Some(addr) => view.block(addr, *size, i, 0),
            None => unmapped.push(Unmapped {
                block: name.to_string(),
                reason: format!("{} does not map its BAR at config offset {reg:#x}", f.section),
            }),
        }
    }
    for f in &devices.pci {
        if root_bus(&f.path) && config_u16(&f.config, PCI_CLASS_DEVICE) == Some(PCI_CLASS_DISPLAY_VGA) {
            legacy_vga = true;
        }
    }

    // 2. RAM.
    view.block(0, below, main, 0);
    if above > 0 {
        view.block(high_start, above, main, below);
    }

    // 3. The chipset's overlays.
    let pci_content = |view: &mut View, start: u64, end: u64| {
        // What the PCI space holds in [start, end): its ROMs; the rest is
        // transparent (RAM shows through an empty alias).
        for &(s, size, b, off) in &pci_low {
            let (lo, hi) = (s.max(start), (s + size).min(end));
            if lo < hi {
                view.block(lo, hi - lo, b, off + (lo - s));
            }
        }
    };
    match fam {
        Family::I440fx { .. } | Family::Q35 => {
            let hb = host_bridge.ok_or_else(|| {
                fail(
                    "the save has no host bridge section (0000:00:00.0/I440FX or /mch) with its PCI configuration, \
                     which holds the PAM registers"
                        .into(),
                )
            })?;
            let c = &hb.config;
            let reg = |at: usize| {
                c.get(at)
                    .copied()
                    .ok_or_else(|| fail(format!("{}: the PCI configuration has no byte at {at:#x}", hb.section)))
            };
            let q35 = fam == Family::Q35;
            let pam0 = if q35 { MCH_PAM0 } else { I440FX_PAM };
            // SMRAM window over 0xa0000..0xc0000 (i440fx.c, q35.c mch_update_smram).
            let smram = reg(if q35 { MCH_SMRAM } else { I440FX_SMRAM })?;
            let esmramc = if q35 { reg(MCH_ESMRAMC)? } else { 0 };
            let d_open = smram & SMRAM_D_OPEN != 0;
            let h_smrame = esmramc & ESMRAMC_H_SMRAME != 0;
            let window = if q35 { !d_open || h_smrame } else { !d_open };
            if window && legacy_vga {
                view.paint(VGA_WINDOW.0, VGA_WINDOW.1, Fill::Hole);
            }
            // PAM: 13 segments (pam.c); attribute 0 routes to PCI, any other to RAM.
            for i in 0..13usize {
                let val = reg(pam0 + i.div_ceil(2))?;
                let attr = if i % 2 == 0 { val >> 4 } else { val } & 3;
                let (start, size) =
                    if i == 0 { (0xf_0000, 0x1_0000) } else { (0xc_0000 + (i as u64 - 1) * 0x4000, 0x4000) };
                if attr == 0 {
                    // the PCI space's ROMs; where it is empty, RAM shows through
                    pci_content(&mut view, start, start + size);
                }
            }
            if q35 {
                if d_open && h_smrame {
                    view.block(Q35_HIGH_SMRAM, VGA_WINDOW.1 - VGA_WINDOW.0, main, VGA_WINDOW.0);
                }
                if esmramc & ESMRAMC_T_EN != 0 && smram & SMRAM_G_SMRAME != 0 {
                    let tseg = match esmramc & 0x06 {
                        0 => MIB,
                        2 => 2 * MIB,
                        4 => 8 * MIB,
                        _ => match config_u16(c, MCH_EXT_TSEG_MBYTES) {
                            Some(m) if m != 0 && m != 0xffff => m as u64 * MIB,
                            _ => {
                                return Err(fail(format!(
                                    "{}: TSEG is enabled with the extended size, which the save does not give",
                                    hb.section
                                )))
                            }
                        },
                    };
                    view.paint(below.saturating_sub(tseg), below, Fill::Hole);
                }
                if c.get(MCH_F_SMBASE).is_some_and(|v| v & F_SMBASE_LCK != 0) {
                    view.paint(Q35_SMBASE.0, Q35_SMBASE.0 + Q35_SMBASE.1, Fill::Hole);
                }
            }
        }
        Family::Isapc | Family::Microvm => {
            if legacy_vga {
                view.paint(VGA_WINDOW.0, VGA_WINDOW.1, Fill::Hole);
            }
            pci_content(&mut view, 0, MIB);
        }
    }

    // Merge like dump-guest-memory: contiguous address, block and offset.
    let mut ranges: Vec<PhysRange> = Vec::new();
    for (s, e, f) in view.pieces {
        let Fill::Block { block, offset } = f else {
            continue;
        };
        if let Some(last) = ranges.last_mut() {
            if last.end() == s && last.block == blocks[block].0 && last.offset + last.size == offset {
                last.size += e - s;
                continue;
            }
        }
        ranges.push(PhysRange { gpa: s, size: e - s, block: blocks[block].0.to_owned(), offset });
    }
    for (i, (name, _)) in blocks.iter().enumerate() {
        if unmapped.iter().any(|u| u.block == *name) || ranges.iter().any(|r| r.block == *name) {
            continue;
        }
        let reason = if placed[i] {
            "hidden: RAM or the chipset's settings cover where it would be mapped".to_string()
        } else if name.starts_with("/rom@") {
            "a firmware configuration (fw_cfg) file: not in the guest's address space".to_string()
        } else {
            "the save does not say where it is mapped".to_string()
        };
        unmapped.push(Unmapped { block: name.to_string(), reason });
    }
    Ok(Layout { ranges, unmapped })
}

/// Where the PCI configuration space of a vmdesc device lies within its
/// section's payload: (offset, length). The config is the `config` field of
/// the first `PCIDevice` struct among the device's top-level fields.
pub fn pci_config_span(device: &Value) -> Option<(u64, u64)> {
    let mut off = 0u64;
    for f in device.get("fields")?.as_array()? {
        let size = f.get("size")?.as_u64()?;
        let n = f.get("array_len").map_or(Some(1), Value::as_u64)?;
        let st = f.get("struct");
        if let Some(st) = st.filter(|s| s.get("vmsd_name").and_then(Value::as_str) == Some("PCIDevice")) {
            let mut inner = 0u64;
            for g in st.get("fields")?.as_array()? {
                let gsize = g.get("size")?.as_u64()?;
                if g.get("name").and_then(Value::as_str).is_some_and(|n| n == "config" || n.starts_with("config[")) {
                    return Some((off + inner, gsize));
                }
                inner = inner.checked_add(gsize)?;
            }
            return None;
        }
        off = off.checked_add(size.checked_mul(n)?)?;
    }
    None
}

/// The PCI configuration spaces of a save's devices on the root bus (and
/// every other device whose section holds a `PCIDevice`). `payload(name,
/// instance)` returns a FULL section's payload bytes; `vmdesc` is the
/// save's vmdesc JSON. Devices whose payload is missing or too short are
/// left out.
pub fn pci_functions(vmdesc: &Value, mut payload: impl FnMut(&str, u32) -> Option<Vec<u8>>) -> Vec<PciFunction> {
    let mut out = Vec::new();
    let Some(devices) = vmdesc.get("devices").and_then(Value::as_array) else {
        return out;
    };
    for d in devices {
        let (Some(name), Some(instance)) =
            (d.get("name").and_then(Value::as_str), d.get("instance_id").and_then(Value::as_u64))
        else {
            continue;
        };
        let Some((path, _)) = name.rsplit_once('/') else {
            continue;
        };
        let Some((off, len)) = pci_config_span(d) else {
            continue;
        };
        let Some(bytes) = payload(name, instance as u32) else {
            continue;
        };
        let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
            continue;
        };
        if let Some(config) = off.checked_add(len).and_then(|end| bytes.get(off..end)) {
            out.push(PciFunction { path: path.to_owned(), section: name.to_owned(), config: config.to_vec() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = MIB;

    fn host(q35: bool, pam: u8, smram: u8) -> PciFunction {
        let mut config = vec![0u8; 256];
        let (p, s) = if q35 { (MCH_PAM0, MCH_SMRAM) } else { (I440FX_PAM, I440FX_SMRAM) };
        config[p..p + 7].fill(pam);
        config[s] = smram;
        let section = if q35 { "0000:00:00.0/mch" } else { "0000:00:00.0/I440FX" };
        PciFunction { path: "0000:00:00.0".into(), section: section.into(), config }
    }

    fn facts(q35: bool, pam: u8) -> DeviceFacts {
        DeviceFacts { pci: vec![host(q35, pam, 0x02)] }
    }

    fn r(gpa: u64, size: u64, block: &str, offset: u64) -> PhysRange {
        PhysRange { gpa, size, block: block.into(), offset }
    }

    const PC_BLOCKS: [(&str, u64); 3] = [("pc.ram", 0), ("pc.bios", 256 * 1024), ("pc.rom", 128 * 1024)];

    fn blocks(ram: u64) -> Vec<(&'static str, u64)> {
        let mut b = PC_BLOCKS.to_vec();
        b[0].1 = ram;
        b.push(("/rom@etc/acpi/tables", 128 * 1024));
        b
    }

    #[test]
    fn splits() {
        let pc = Family::I440fx { gigabyte_align: true };
        let old = Family::I440fx { gigabyte_align: false };
        assert_eq!(ram_split(pc, 256 * M, None), (256 * M, 0));
        assert_eq!(ram_split(pc, 3584 * M, None), (3 * GIB, 512 * M));
        assert_eq!(ram_split(pc, 3583 * M, None), (3583 * M, 0));
        assert_eq!(ram_split(pc, 4 * GIB, None), (3 * GIB, GIB));
        assert_eq!(ram_split(old, 4 * GIB, None), (3584 * M, 512 * M));
        assert_eq!(ram_split(pc, 4 * GIB, Some(2 * GIB)), (2 * GIB, 2 * GIB));
        assert_eq!(ram_split(pc, 3968 * M, Some(4 * GIB)), (3968 * M, 0));
        assert_eq!(ram_split(Family::Q35, 2815 * M, None), (2815 * M, 0));
        assert_eq!(ram_split(Family::Q35, 2816 * M, None), (2 * GIB, 768 * M));
        assert_eq!(ram_split(Family::Q35, 3 * GIB, Some(GIB)), (GIB, 2 * GIB));
        assert_eq!(ram_split(Family::Microvm, 3 * GIB, None), (3 * GIB, 0));
        assert_eq!(ram_split(Family::Microvm, 3584 * M, None), (3 * GIB, 512 * M));
        assert_eq!(ram_split(Family::Microvm, 3 * GIB, Some(GIB)), (GIB, 2 * GIB));
        assert_eq!(ram_split(Family::Isapc, 3584 * M, None), (3584 * M, 0));
        assert_eq!(ram_split(Family::Isapc, 4 * GIB, None), (3584 * M, 512 * M));
    }

    #[test]
    fn families() {
        assert_eq!(family("pc-i440fx-10.0").unwrap(), Family::I440fx { gigabyte_align: true });
        assert_eq!(family("pc-i440fx-1.7").unwrap(), Family::I440fx { gigabyte_align: false });
        assert_eq!(family("pc-1.3").unwrap(), Family::I440fx { gigabyte_align: false });
        assert_eq!(family("pc-i440fx-2.0").unwrap(), Family::I440fx { gigabyte_align: true });
        assert_eq!(family("pc-q35-4.0.1").unwrap(), Family::Q35);
        assert_eq!(family("q35").unwrap(), Family::Q35);
        let e = family("virt-9.0").unwrap_err().to_string();
        assert!(e.contains("virt-9.0") && e.contains("pc, q35"), "{e}");
        assert!(family("xenfv-4.2").unwrap_err().to_string().contains("Xen"));
    }

    #[test]
    fn prelaunch_pc() {
        let l = x86_layout("pc-i440fx-10.0", &blocks(256 * M), &facts(false, 0), &LayoutOptions::default()).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                r(0, 0xc_0000, "pc.ram", 0),
                r(0xc_0000, 0x2_0000, "pc.rom", 0),
                r(0xe_0000, 0x2_0000, "pc.bios", 0x2_0000),
                r(0x10_0000, 255 * M, "pc.ram", 0x10_0000),
                r(0xfffc_0000, 0x4_0000, "pc.bios", 0),
            ]
        );
        assert_eq!(l.unmapped.len(), 1);
        assert!(l.unmapped[0].reason.contains("fw_cfg"));
    }

    #[test]
    fn firmware_ran_q35_high() {
        // PAM all RAM: one range from 0xc0000 to the end of low RAM.
        let mut b = blocks(3 * GIB);
        b.push(("0000:00:01.0/vga.vram", 16 * M));
        b.push(("0000:00:01.0/vga.rom", 64 * 1024));
        let mut f = facts(true, 0x33);
        let mut vga = vec![0u8; 256];
        vga[PCI_COMMAND] = 0x03;
        vga[PCI_CLASS_DEVICE..PCI_CLASS_DEVICE + 2].copy_from_slice(&0x0300u16.to_le_bytes());
        vga[PCI_BAR0..PCI_BAR0 + 4].copy_from_slice(&0xfd00_0008u32.to_le_bytes());
        f.pci.push(PciFunction { path: "0000:00:01.0".into(), section: "0000:00:01.0/vga".into(), config: vga });
        let l = x86_layout("pc-q35-10.0", &b, &f, &LayoutOptions::default()).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                r(0, 0xa_0000, "pc.ram", 0),
                r(0xc_0000, 2 * GIB - 0xc_0000, "pc.ram", 0xc_0000),
                r(0xfd00_0000, 16 * M, "0000:00:01.0/vga.vram", 0),
                r(0xfffc_0000, 0x4_0000, "pc.bios", 0),
                r(FOUR_GIB, GIB, "pc.ram", 2 * GIB),
            ]
        );
        assert!(l.unmapped.iter().any(|u| u.block == "0000:00:01.0/vga.rom" && u.reason.contains("0x30")));
        assert!(l.unmapped.iter().any(|u| u.block == "pc.rom"), "{:?}", l.unmapped);
    }

    #[test]
    fn pam_mixed_and_smram() {
        // PAM1 low nibble 0 (0xc0000..0xc4000 to PCI: pc.rom), the rest RAM;
        // SMRAM open: no VGA window even with a VGA.
        let mut f = facts(false, 0x33);
        f.pci[0].config[I440FX_PAM + 1] = 0x30;
        f.pci[0].config[I440FX_SMRAM] = SMRAM_D_OPEN;
        let mut vga = vec![0u8; 256];
        vga[PCI_CLASS_DEVICE..PCI_CLASS_DEVICE + 2].copy_from_slice(&0x0300u16.to_le_bytes());
        f.pci.push(PciFunction { path: "0000:00:02.0".into(), section: "0000:00:02.0/vga".into(), config: vga });
        let l = x86_layout("pc", &blocks(64 * M), &f, &LayoutOptions::default()).unwrap();
        assert_eq!(l.ranges[0], r(0, 0xc_0000, "pc.ram", 0));
        assert_eq!(l.ranges[1], r(0xc_0000, 0x4000, "pc.rom", 0));
        assert_eq!(l.ranges[2], r(0xc_4000, 64 * M - 0xc_4000, "pc.ram", 0xc_4000));
        // closed: the VGA hides the window
        f.pci[0].config[I440FX_SMRAM] = 0x02;
        let l = x86_layout("pc", &blocks(64 * M), &f, &LayoutOptions::default()).unwrap();
        assert_eq!(l.ranges[0], r(0, 0xa_0000, "pc.ram", 0));
    }

    #[test]
    fn tseg_and_overrides() {
        let mut f = facts(true, 0x33);
        f.pci[0].config[MCH_SMRAM] = SMRAM_G_SMRAME | 0x02;
        f.pci[0].config[MCH_ESMRAMC] = ESMRAMC_T_EN | 0x06;
        f.pci[0].config[MCH_EXT_TSEG_MBYTES..MCH_EXT_TSEG_MBYTES + 2].copy_from_slice(&16u16.to_le_bytes());
        let l = x86_layout("pc-q35-9.2", &blocks(GIB), &f, &LayoutOptions::default()).unwrap();
        assert_eq!(l.ranges[0], r(0, GIB - 16 * M, "pc.ram", 0));
        let opts = LayoutOptions { below_4g: Some(512 * M), ..Default::default() };
        let l = x86_layout("pc-q35-9.2", &blocks(GIB), &f, &opts).unwrap();
        assert_eq!(l.ranges.last().unwrap(), &r(FOUR_GIB, 512 * M, "pc.ram", 512 * M));
        let opts = LayoutOptions { below_4g: Some(5 * GIB), ..Default::default() };
        assert!(x86_layout("pc-q35-9.2", &blocks(GIB), &f, &opts).unwrap_err().to_string().contains("more than 4 GiB"));
    }

    #[test]
    fn errors() {
        let e = x86_layout("pc", &blocks(GIB), &DeviceFacts::default(), &LayoutOptions::default()).unwrap_err();
        assert!(e.to_string().contains("host bridge"), "{e}");
        let e = x86_layout("pc", &[("mem0", GIB)], &facts(false, 0), &LayoutOptions::default()).unwrap_err();
        assert!(e.to_string().contains("no \"pc.ram\" block (blocks: mem0)"), "{e}");
        let opts = LayoutOptions { ram_block: Some("mem0".into()), ..Default::default() };
        let l = x86_layout("pc", &[("mem0", GIB)], &facts(false, 0x33), &opts).unwrap();
        assert_eq!(l.ranges, vec![r(0, GIB, "mem0", 0)]);
        let huge = blocks(1000 * GIB);
        let e = x86_layout("pc-q35-10.0", &huge, &facts(true, 0x33), &LayoutOptions::default()).unwrap_err();
        assert!(e.to_string().contains("HyperTransport"), "{e}");
        let opts = LayoutOptions { above_4g_start: Some(1 << 40), ..Default::default() };
        let l = x86_layout("pc-q35-10.0", &huge, &facts(true, 0x33), &opts).unwrap();
        assert_eq!(l.ranges.last().unwrap().gpa, 1 << 40);
    }

    #[test]
    fn isapc_and_microvm() {
        let b = [("pc.ram", 64 * M), ("pc.bios", 128 * 1024), ("pc.rom", 128 * 1024), ("vga.vram", 8 * M)];
        let l = x86_layout("isapc", &b, &DeviceFacts::default(), &LayoutOptions::default()).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                r(0, 0xa_0000, "pc.ram", 0),
                r(0xc_0000, 0x2_0000, "pc.rom", 0),
                r(0xe_0000, 0x2_0000, "pc.bios", 0),
                r(0x10_0000, 63 * M, "pc.ram", 0x10_0000),
                r(ISA_VGA_LFB, 8 * M, "vga.vram", 0),
                r(0xfffe_0000, 0x2_0000, "pc.bios", 0),
            ]
        );
        let b = [("microvm.ram", 4 * GIB), ("pc.bios", 128 * 1024)];
        let l = x86_layout("microvm", &b, &DeviceFacts::default(), &LayoutOptions::default()).unwrap();
        assert_eq!(
            l.ranges,
            vec![
                r(0, 0xe_0000, "microvm.ram", 0),
                r(0xe_0000, 0x2_0000, "pc.bios", 0),
                r(0x10_0000, 3 * GIB - M, "microvm.ram", M),
                r(0xfffe_0000, 0x2_0000, "pc.bios", 0),
                r(FOUR_GIB, GIB, "microvm.ram", 3 * GIB),
            ]
        );
    }

    #[test]
    fn config_span_from_vmdesc() {
        let dev: Value = serde_json::from_str(
            r#"{"name":"0000:00:00.0/mch","instance_id":0,"fields":[{"name":"parent_obj","type":"struct","size":276,
            "struct":{"vmsd_name":"PCIDevice","fields":[{"name":"version_id","size":4},{"name":"config[0]","size":256},
            {"name":"irq_state","size":16}]}},{"name":"unused","size":1}]}"#,
        )
        .unwrap();
        assert_eq!(pci_config_span(&dev), Some((4, 256)));
        let desc = serde_json::json!({ "devices": [dev] });
        let mut payload = vec![0u8; 277];
        payload[4] = 0x86;
        let f = pci_functions(&desc, |n, i| (n == "0000:00:00.0/mch" && i == 0).then(|| payload.clone()));
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].path.as_str(), f[0].config[0], f[0].config.len()), ("0000:00:00.0", 0x86, 256));
        assert!(pci_functions(&desc, |_, _| Some(vec![0; 10])).is_empty());
    }
}
