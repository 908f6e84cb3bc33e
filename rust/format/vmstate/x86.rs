//! An x86 vCPU's registers, read from its decoded `cpu` section, and the
//! ELF core notes that carry them.
//!
//! QEMU's x86 `cpu` VMState (`vmstate_x86_cpu`, one section per vCPU, the
//! instance id being the vCPU's index) holds the registers as fields of
//! `CPUX86State`: `env.regs` (16 general registers in the order rax, rcx,
//! rdx, rbx, rsp, rbp, rsi, rdi, r8–r15), `env.eip`, `env.eflags`,
//! `env.segs` (es, cs, ss, ds, fs, gs), `env.ldt`, `env.tr`, `env.gdt`,
//! `env.idt`, `env.cr[0]`, `env.cr[2]`–`env.cr[4]`, `env.efer`, `env.dr`.
//!
//! The notes are those of QEMU's `dump-guest-memory` (its
//! `target/i386/arch_dump.c`): per vCPU an `NT_PRSTATUS` note named "CORE"
//! (the i386 or the x86-64 `elf_prstatus`, by whether the first vCPU is in
//! long mode), then per vCPU a note named "QEMU" of type 0 holding
//! `QEMUCPUState`.

use super::decode::{Fields, Value};

/// The general registers in the order QEMU stores them (`env.regs`).
pub const GPR_NAMES: [&str; 16] =
    ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
/// The segment registers in the order QEMU stores them (`env.segs`).
pub const SEGMENT_NAMES: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];

const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RBX: usize = 3;
const RSP: usize = 4;
const RBP: usize = 5;
const RSI: usize = 6;
const RDI: usize = 7;
const ES: usize = 0;
const CS: usize = 1;
const SS: usize = 2;
const DS: usize = 3;
const FS: usize = 4;
const GS: usize = 5;

/// `HF_LMA_MASK`: the vCPU is in long mode.
const HF_LMA: u64 = 1 << 14;
/// `NT_PRSTATUS`
pub const NT_PRSTATUS: u32 = 1;
/// `QEMUCPUSTATE_VERSION`
const QEMU_CPUSTATE_VERSION: u32 = 1;

/// A segment register or descriptor table register, as QEMU caches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u32,
    pub base: u64,
    pub limit: u32,
    /// The descriptor's attribute bits, where the descriptor holds them
    /// (bits 8–23 of its high word: type, S, DPL, P, AVL, L, D/B, G).
    pub flags: u32,
}

/// One vCPU's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct X86Cpu {
    /// The vCPU's index (its `cpu` section's instance id).
    pub index: u32,
    /// In QEMU's order: see [`GPR_NAMES`] (r8–r15 are 0 on a 32-bit target).
    pub regs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// In QEMU's order: see [`SEGMENT_NAMES`].
    pub segs: [Segment; 6],
    pub ldt: Segment,
    pub tr: Segment,
    pub gdt: Segment,
    pub idt: Segment,
    /// cr0 to cr4 (cr1 is reserved, never saved: 0).
    pub cr: [u64; 5],
    pub efer: u64,
    pub dr: [u64; 8],
    pub kernel_gs_base: u64,
    /// QEMU's hidden flags (`env.hflags`).
    pub hflags: u64,
}

fn int(v: &Value<'_>) -> Option<u64> {
    match v {
        Value::Uint(x) => Some(*x),
        Value::Int(x) => Some(*x as u64),
        _ => None,
    }
}

fn get_int(f: &Fields<'_>, name: &str) -> Result<u64, String> {
    let v = f.get(name).ok_or_else(|| format!("the cpu section has no field {name}"))?;
    int(v).ok_or_else(|| format!("the cpu section's field {name} is not an integer"))
}

fn get_ints(f: &Fields<'_>, name: &str, out: &mut [u64]) -> Result<usize, String> {
    let Some(Value::List(items)) = f.get(name) else {
        return Err(format!("the cpu section has no array {name}"));
    };
    if items.len() > out.len() {
        return Err(format!("the cpu section's {name} has {} elements, expected at most {}", items.len(), out.len()));
    }
    for (o, v) in out.iter_mut().zip(items) {
        *o = int(v).ok_or_else(|| format!("an element of the cpu section's {name} is not an integer"))?;
    }
    Ok(items.len())
}

fn segment(v: &Value<'_>, what: &str) -> Result<Segment, String> {
    let Value::Map(m) = v else {
        return Err(format!("the cpu section's {what} is not a struct"));
    };
    let field = |n: &str| get_int(m, n).map_err(|e| format!("{what}: {e}"));
    let narrow = |n: &str| field(n).map(|x| x as u32);
    Ok(Segment {
        selector: narrow("selector")?,
        base: field("base")?,
        limit: narrow("limit")?,
        flags: narrow("flags")?,
    })
}

impl X86Cpu {
    /// The registers of the vCPU whose decoded `cpu` section is `f`.
    pub fn from_fields(index: u32, f: &Fields<'_>) -> Result<X86Cpu, String> {
        let mut cpu = X86Cpu { index, ..Default::default() };
        let n = get_ints(f, "env.regs", &mut cpu.regs)?;
        if n != 8 && n != 16 {
            return Err(format!("the cpu section's env.regs has {n} registers, expected 8 or 16"));
        }
        cpu.rip = get_int(f, "env.eip")?;
        cpu.rflags = get_int(f, "env.eflags")?;
        cpu.hflags = get_int(f, "env.hflags")?;
        let Some(Value::List(segs)) = f.get("env.segs") else {
            return Err("the cpu section has no array env.segs".into());
        };
        if segs.len() != 6 {
            return Err(format!("the cpu section's env.segs has {} segments, expected 6", segs.len()));
        }
        for (i, s) in segs.iter().enumerate() {
            cpu.segs[i] = segment(s, &format!("env.segs[{i}]"))?;
        }
        let table =
            |name: &str| segment(f.get(name).ok_or_else(|| format!("the cpu section has no field {name}"))?, name);
        cpu.ldt = table("env.ldt")?;
        cpu.tr = table("env.tr")?;
        cpu.gdt = table("env.gdt")?;
        cpu.idt = table("env.idt")?;
        for i in [0, 2, 3, 4] {
            cpu.cr[i] = get_int(f, &format!("env.cr[{i}]"))?;
        }
        get_ints(f, "env.dr", &mut cpu.dr)?;
        // Only a 64-bit target saves these.
        cpu.efer = if f.get("env.efer").is_some() { get_int(f, "env.efer")? } else { 0 };
        cpu.kernel_gs_base = if f.get("env.kernelgsbase").is_some() { get_int(f, "env.kernelgsbase")? } else { 0 };
        Ok(cpu)
    }

    /// True when the vCPU is in long mode (QEMU's `HF_LMA_MASK`).
    pub fn long_mode(&self) -> bool {
        self.hflags & HF_LMA != 0
    }

    /// The descriptor of this vCPU's `NT_PRSTATUS` note, as QEMU's
    /// `dump-guest-memory` writes it: the x86-64 `elf_prstatus` (336 bytes)
    /// when `x86_64`, else the i386 one (144 bytes). `pr_pid` is the
    /// vCPU's index plus one, as QEMU numbers them.
    pub fn prstatus(&self, x86_64: bool) -> Vec<u8> {
        let pid = self.index.wrapping_add(1);
        let r = &self.regs;
        let sel = |i: usize| self.segs[i].selector as u64;
        if x86_64 {
            let mut d = vec![0u8; 32];
            d.extend_from_slice(&pid.to_le_bytes());
            d.resize(32 + 4 + 76, 0);
            let regs = [
                r[15],
                r[14],
                r[13],
                r[12],
                r[RBP],
                r[RBX],
                r[11],
                r[10],
                r[9],
                r[8],
                r[RAX],
                r[RCX],
                r[RDX],
                r[RSI],
                r[RDI],
                0, // orig_rax
                self.rip,
                sel(CS),
                self.rflags,
                r[RSP],
                sel(SS),
                self.segs[FS].base,
                self.segs[GS].base,
                sel(DS),
                sel(ES),
                sel(FS),
                sel(GS),
            ];
            for x in regs {
                d.extend_from_slice(&x.to_le_bytes());
            }
            d.resize(d.len() + 8, 0);
            return d;
        }
        let mut d = vec![0u8; 24];
        d.extend_from_slice(&pid.to_le_bytes());
        d.resize(24 + 4 + 44, 0);
        let w32 = |d: &mut Vec<u8>, x: u64| d.extend_from_slice(&(x as u32).to_le_bytes());
        let w16 = |d: &mut Vec<u8>, x: u64| d.extend_from_slice(&[x as u8, (x >> 8) as u8, 0, 0]);
        for i in [RBX, RCX, RDX, RSI, RDI, RBP, RAX] {
            w32(&mut d, r[i]);
        }
        for i in [DS, ES, FS, GS] {
            w16(&mut d, sel(i));
        }
        w32(&mut d, 0); // orig_eax
        w32(&mut d, self.rip);
        w16(&mut d, sel(CS));
        w32(&mut d, self.rflags);
        w32(&mut d, r[RSP]);
        w16(&mut d, sel(SS));
        d.resize(d.len() + 4, 0);
        d
    }

    /// The descriptor of this vCPU's "QEMU" note: `QEMUCPUState` (version 1,
    /// 440 bytes), as QEMU's `dump-guest-memory` writes it.
    pub fn qemu_cpu_state(&self) -> Vec<u8> {
        const SIZE: u32 = 8 + 18 * 8 + 10 * 24 + 5 * 8 + 8;
        let mut d = Vec::with_capacity(SIZE as usize);
        d.extend_from_slice(&QEMU_CPUSTATE_VERSION.to_le_bytes());
        d.extend_from_slice(&SIZE.to_le_bytes());
        let r = &self.regs;
        for x in [r[RAX], r[RBX], r[RCX], r[RDX], r[RSI], r[RDI], r[RSP], r[RBP]] {
            d.extend_from_slice(&x.to_le_bytes());
        }
        for x in &r[8..16] {
            d.extend_from_slice(&x.to_le_bytes());
        }
        d.extend_from_slice(&self.rip.to_le_bytes());
        d.extend_from_slice(&self.rflags.to_le_bytes());
        let s = &self.segs;
        for seg in [&s[CS], &s[DS], &s[ES], &s[FS], &s[GS], &s[SS], &self.ldt, &self.tr, &self.gdt, &self.idt] {
            d.extend_from_slice(&seg.selector.to_le_bytes());
            d.extend_from_slice(&seg.limit.to_le_bytes());
            d.extend_from_slice(&seg.flags.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            d.extend_from_slice(&seg.base.to_le_bytes());
        }
        for x in self.cr {
            d.extend_from_slice(&x.to_le_bytes());
        }
        d.extend_from_slice(&self.kernel_gs_base.to_le_bytes());
        debug_assert_eq!(d.len(), SIZE as usize);
        d
    }
}

/// One ELF note: header (namesz, descsz, type; the same 12 bytes in ELF32
/// and ELF64 files), the name with its NUL, the descriptor, each padded to
/// four bytes.
pub fn elf_note(name: &str, n_type: u32, desc: &[u8]) -> Vec<u8> {
    let namesz = name.len() + 1;
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut n = Vec::with_capacity(12 + pad(namesz) + pad(desc.len()));
    n.extend_from_slice(&(namesz as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&n_type.to_le_bytes());
    n.extend_from_slice(name.as_bytes());
    n.resize(12 + pad(namesz), 0);
    n.extend_from_slice(desc);
    n.resize(12 + pad(namesz) + pad(desc.len()), 0);
    n
}

/// The notes segment of an ELF core of the vCPUs `cpus` (in index order),
/// as QEMU's `dump-guest-memory` writes it: every vCPU's `NT_PRSTATUS`, then
/// every vCPU's "QEMU" note. The x86-64 layout is used when the first vCPU
/// is in long mode (the core's machine is then `EM_X86_64`, else `EM_386`).
pub fn elf_notes(cpus: &[X86Cpu]) -> Vec<u8> {
    let x86_64 = cpus.first().is_some_and(X86Cpu::long_mode);
    let mut out = Vec::new();
    for c in cpus {
        out.extend(elf_note("CORE", NT_PRSTATUS, &c.prstatus(x86_64)));
    }
    for c in cpus {
        out.extend(elf_note("QEMU", 0, &c.qemu_cpu_state()));
    }
    out
}
