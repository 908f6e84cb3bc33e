//! The pure grammar of QEMU migration streams and of the savedir directory.
//!
//! Everything here works on byte slices that hold a whole file (typically a
//! memory map) and reports absolute file offsets. Nothing here performs I/O.

use std::sync::Arc;

pub mod directory;
pub mod error;
pub mod layout;
pub mod libvirt;
pub mod pagemap;
pub mod ram;
pub mod reader;
pub mod source;
pub mod stream;
pub mod vmdesc;
pub mod vmstate;

/// Byte values of QEMU's top-level stream and of the savedir directory.
pub mod tag {
    /// `QEMU_VM_EOF`
    pub const EOF: u8 = 0x00;
    /// `QEMU_VM_SECTION_START`
    pub const START: u8 = 0x01;
    /// `QEMU_VM_SECTION_PART`
    pub const PART: u8 = 0x02;
    /// `QEMU_VM_SECTION_END`
    pub const END: u8 = 0x03;
    /// `QEMU_VM_SECTION_FULL`
    pub const FULL: u8 = 0x04;
    /// `QEMU_VM_SUBSECTION` (inside VMState payloads only)
    pub const SUBSECTION: u8 = 0x05;
    /// `QEMU_VM_VMDESCRIPTION`
    pub const VMDESC: u8 = 0x06;
    /// `QEMU_VM_CONFIGURATION`
    pub const CONFIGURATION: u8 = 0x07;
    /// `QEMU_VM_COMMAND`
    pub const COMMAND: u8 = 0x08;
    /// savedir pointer to the RAM page map
    pub const RAMMAP: u8 = 0x7b;
    /// savedir checksum entry
    pub const CHECKSUM: u8 = 0x7c;
    /// savedir directory marker and trailer entry
    pub const DIRECTORY: u8 = 0x7d;
    /// `QEMU_VM_SECTION_FOOTER`
    pub const FOOTER: u8 = 0x7e;
}

/// `QEMU_VM_FILE_MAGIC`, "QEVM".
pub const STREAM_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
pub const STREAM_VERSION: u32 = 3;
/// `QEMU_VM_FILE_VERSION_COMPAT`: an obsolete format QEMU refuses to load.
pub const STREAM_VERSION_COMPAT: u32 = 2;

/// The kind of a top-level item of a stream (and of its directory entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Configuration,
    Start,
    Part,
    End,
    Full,
    Command,
    Vmdesc,
}

impl Kind {
    /// The stream's type byte for this kind.
    pub fn tag(self) -> u8 {
        match self {
            Kind::Configuration => tag::CONFIGURATION,
            Kind::Start => tag::START,
            Kind::Part => tag::PART,
            Kind::End => tag::END,
            Kind::Full => tag::FULL,
            Kind::Command => tag::COMMAND,
            Kind::Vmdesc => tag::VMDESC,
        }
    }

    /// The kind whose type byte is `b`, if any.
    pub fn from_tag(b: u8) -> Option<Kind> {
        Some(match b {
            tag::CONFIGURATION => Kind::Configuration,
            tag::START => Kind::Start,
            tag::PART => Kind::Part,
            tag::END => Kind::End,
            tag::FULL => Kind::Full,
            tag::COMMAND => Kind::Command,
            tag::VMDESC => Kind::Vmdesc,
            _ => return None,
        })
    }

    /// The name used in JSON output and in the Python API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Configuration => "configuration",
            Kind::Start => "start",
            Kind::Part => "part",
            Kind::End => "end",
            Kind::Full => "full",
            Kind::Command => "command",
            Kind::Vmdesc => "vmdesc",
        }
    }

    /// True for the kinds that open a section (and carry its name).
    pub fn opens_section(self) -> bool {
        matches!(self, Kind::Start | Kind::Full)
    }

    /// True for the four section kinds.
    pub fn is_section(self) -> bool {
        matches!(self, Kind::Start | Kind::Part | Kind::End | Kind::Full)
    }
}

/// The header of a top-level item, as the stream writes it and a directory
/// entry copies it. One type serves the stream's items, the directory's
/// entries and the Python `Entry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
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

impl Header {
    pub fn new(kind: Kind) -> Self {
        Header { kind, section_id: 0, name: None, instance_id: 0, version_id: 0, command: 0, command_len: 0 }
    }

    /// The bytes a directory entry copies: the type byte and, for sections
    /// and commands, the fields that follow it in the stream (section names
    /// are printable ASCII, so these are the stream's own bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut h = vec![self.kind.tag()];
        match self.kind {
            Kind::Configuration | Kind::Vmdesc => {}
            Kind::Start | Kind::Full => {
                let name = self.name.as_deref().unwrap_or("").as_bytes();
                h.extend_from_slice(&self.section_id.to_be_bytes());
                h.push(name.len() as u8);
                h.extend_from_slice(name);
                h.extend_from_slice(&self.instance_id.to_be_bytes());
                h.extend_from_slice(&self.version_id.to_be_bytes());
            }
            Kind::Part | Kind::End => h.extend_from_slice(&self.section_id.to_be_bytes()),
            Kind::Command => {
                h.extend_from_slice(&self.command.to_be_bytes());
                h.extend_from_slice(&self.command_len.to_be_bytes());
            }
        }
        h
    }

    /// Bytes of [`encode`](Self::encode).
    pub fn copy_len(&self) -> u64 {
        match self.kind {
            Kind::Configuration | Kind::Vmdesc => 1,
            Kind::Start | Kind::Full => 14 + self.name.as_deref().map_or(0, |n| n.len() as u64),
            Kind::Part | Kind::End | Kind::Command => 5,
        }
    }

    /// For messages: `full section "cpu" (id 3)`, `command 11 (SWITCHOVER_START)`.
    pub fn describe(&self) -> String {
        match self.kind {
            Kind::Command => format!("command {} ({})", self.command, command_name(self.command)),
            Kind::Configuration | Kind::Vmdesc => format!("the {}", self.kind.as_str()),
            k => format!("{} section \"{}\" (id {})", k.as_str(), self.name.as_deref().unwrap_or(""), self.section_id),
        }
    }
}

/// Names of QEMU's migration commands (`enum qemu_vm_cmd`).
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        1 => "OPEN_RETURN_PATH",
        2 => "PING",
        3 => "POSTCOPY_ADVISE",
        4 => "POSTCOPY_LISTEN",
        5 => "POSTCOPY_RUN",
        6 => "POSTCOPY_RAM_DISCARD",
        7 => "PACKAGED",
        8 => "ENABLE_COLO",
        9 => "POSTCOPY_RESUME",
        10 => "RECV_BITMAP",
        11 => "SWITCHOVER_START",
        _ => "UNKNOWN",
    }
}

/// Renders bytes for an error message: printable ASCII as is, the rest escaped.
pub fn show_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() + 2);
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'\\' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}
