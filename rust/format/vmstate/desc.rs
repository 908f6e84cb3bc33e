//! The vmdesc's description of one VMState, checked and compiled once.
//!
//! QEMU describes what it wrote while it writes it (`vmsd_desc_field_start`
//! and `vmsd_desc_field_end` in its `migration/vmstate.c`): per VMState its
//! name, version, fields and the subsections it sent. Each field entry holds
//! its name (made unique with `[n]` when a VMState repeats a name), its type
//! (`uint32`, `struct`, a handler's own name such as `timer`), the bytes it
//! took, and for arrays either `array_len` (a *compressed* run: one entry
//! stands for that many elements of the same layout) or `index` (one entry
//! per element). A `struct` holds its VMState under `"struct"`; a `vstruct`
//! or `tmp` field writes its VMState's `vmsd_name`, `version` and `fields`
//! into the field entry itself. A NULL pointer in an array of pointers is one
//! byte, `0x30`: QEMU 9.2 and later describe it as type `nullptr`, older ones
//! as a `struct` with an empty description.
//!
//! Everything read from the JSON is checked here, so that decoding can trust
//! the description's shape (never its sizes, which the bytes must confirm).

use serde_json::Value;

/// How deep VMStates may nest (structs in structs, subsections in them).
pub const MAX_DEPTH: usize = 64;
/// The longest name savedir accepts from a vmdesc.
const MAX_NAME: usize = 4096;

/// One VMState: its fields, then the subsections that were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vmsd {
    /// `vmsd_name` (empty when the entry gives none).
    pub name: String,
    pub version: Option<u32>,
    pub fields: Vec<Field>,
    pub subsections: Vec<Vmsd>,
}

/// One field entry of a VMState's `fields`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The vmdesc's `type`, as it spells it.
    pub type_name: String,
    /// Bytes one element took (for a compressed run: the first element).
    pub size: u64,
    pub count: Count,
    pub kind: Kind,
}

/// How many elements an entry stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// A field that is not an array.
    One,
    /// `array_len`: this many elements, described once.
    Run(u64),
    /// `index`: one element of an array whose elements are described one by one.
    Element(u64),
}

/// What the bytes of one element are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A nested VMState (`struct`, `vstruct`, `tmp`).
    Nested(Box<Vmsd>),
    /// A `struct` whose description is empty: QEMU before 9.2 writes this
    /// for a NULL pointer, which is the byte 0x30.
    EmptyStruct,
    Scalar(Scalar),
}

/// The scalar types savedir reads as values; everything else is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    Bool,
    /// A big-endian integer of `width` bytes.
    Int {
        width: u8,
        signed: bool,
    },
    /// A NULL pointer: the byte 0x30.
    Null,
    /// A migration capability: a u8 length and its name.
    Capability,
    /// Bytes whose meaning only the device knows (buffers, timers, floats,
    /// PCI config space, a virtio device's own stream...).
    Bytes,
}

impl Scalar {
    /// The scalar type of a vmdesc `type` (QEMU's `VMStateInfo` names).
    pub fn of(type_name: &str) -> Scalar {
        let int = |width, signed| Scalar::Int { width, signed };
        match type_name {
            "bool" => Scalar::Bool,
            "int8" => int(1, true),
            "int16" => int(2, true),
            "int32" | "int32 equal" | "int32 le" => int(4, true),
            "int64" => int(8, true),
            "uint8" | "uint8 equal" => int(1, false),
            "uint16" | "uint16 equal" => int(2, false),
            "uint32" | "uint32 equal" => int(4, false),
            // QEMU's `vmstate_info_uint64_equal` is named "int64 equal".
            "uint64" | "int64 equal" => int(8, false),
            "nullptr" => Scalar::Null,
            "capability" => Scalar::Capability,
            _ => Scalar::Bytes,
        }
    }
}

/// Types whose handlers write a VMState inline (`vmstate_save_state` with
/// the field's own JSON object): the entry carries `fields` to follow.
fn inline_vmsd(type_name: &str) -> bool {
    matches!(type_name, "vstruct" | "tmp")
}

/// Compiles the VMState that the JSON object `v` describes. `path` prefixes
/// messages: empty, or where the description sits, ending in ": ".
pub fn compile(v: &Value, path: &str) -> Result<Vmsd, String> {
    compile_at(v, path, 0)
}

fn compile_at(v: &Value, path: &str, depth: usize) -> Result<Vmsd, String> {
    if depth > MAX_DEPTH {
        return Err(format!("{path}VMStates nest more than {MAX_DEPTH} deep"));
    }
    let obj = v.as_object().ok_or_else(|| format!("{path}expected a JSON object"))?;
    let name = match obj.get("vmsd_name") {
        None => String::new(),
        Some(n) => checked_name(n, path, "vmsd_name")?,
    };
    let version = match obj.get("version") {
        None => None,
        Some(n) => Some(
            n.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("{path}expected \"version\" to be a 32-bit unsigned integer, found {n}"))?,
        ),
    };
    let mut fields = Vec::new();
    if let Some(fs) = obj.get("fields") {
        let fs = fs.as_array().ok_or_else(|| format!("{path}expected \"fields\" to be a list"))?;
        fields.reserve(fs.len());
        for (i, f) in fs.iter().enumerate() {
            fields.push(compile_field(f, path, i, depth)?);
        }
    } else if obj.contains_key("size") {
        return Err(format!("{path}the vmdesc gives only a size, no fields"));
    }
    let mut subsections = Vec::new();
    if let Some(ss) = obj.get("subsections") {
        let ss = ss.as_array().ok_or_else(|| format!("{path}expected \"subsections\" to be a list"))?;
        for (i, s) in ss.iter().enumerate() {
            let sub = compile_at(s, &format!("{path}subsection #{i}: "), depth + 1)?;
            if sub.name.is_empty() || sub.name.len() > 255 {
                return Err(format!(
                    "{path}subsection #{i}: expected a \"vmsd_name\" of 1 to 255 bytes, found {} bytes",
                    sub.name.len()
                ));
            }
            subsections.push(sub);
        }
    }
    Ok(Vmsd { name, version, fields, subsections })
}

fn checked_name(n: &Value, path: &str, key: &str) -> Result<String, String> {
    let s = n.as_str().ok_or_else(|| format!("{path}expected \"{key}\" to be a string, found {n}"))?;
    if s.len() > MAX_NAME {
        return Err(format!("{path}\"{key}\" is {} bytes long (at most {MAX_NAME})", s.len()));
    }
    Ok(s.to_owned())
}

fn compile_field(f: &Value, path: &str, i: usize, depth: usize) -> Result<Field, String> {
    let here = format!("{path}field #{i}: ");
    let obj = f.as_object().ok_or_else(|| format!("{here}expected a JSON object"))?;
    let name = checked_name(obj.get("name").ok_or_else(|| format!("{here}has no \"name\""))?, &here, "name")?;
    let here = format!("{path}field {name:?}: ");
    let type_name = checked_name(obj.get("type").ok_or_else(|| format!("{here}has no \"type\""))?, &here, "type")?;
    let size = obj
        .get("size")
        .ok_or_else(|| format!("{here}has no \"size\""))?
        .as_u64()
        .ok_or_else(|| format!("{here}expected \"size\" to be an unsigned integer, found {}", obj["size"]))?;
    let count = match (obj.get("array_len"), obj.get("index")) {
        (Some(_), Some(_)) => return Err(format!("{here}has both \"array_len\" and \"index\"")),
        (Some(n), None) => Count::Run(
            n.as_u64().ok_or_else(|| format!("{here}expected \"array_len\" to be an unsigned integer, found {n}"))?,
        ),
        (None, Some(n)) => Count::Element(
            n.as_u64().ok_or_else(|| format!("{here}expected \"index\" to be an unsigned integer, found {n}"))?,
        ),
        (None, None) => Count::One,
    };
    let kind = if type_name == "struct" {
        let s = obj.get("struct").ok_or_else(|| format!("{here}a struct without a \"struct\" description"))?;
        let so = s.as_object().ok_or_else(|| format!("{here}expected \"struct\" to be a JSON object"))?;
        if so.is_empty() {
            Kind::EmptyStruct
        } else {
            Kind::Nested(Box::new(compile_at(s, &here, depth + 1)?))
        }
    } else if inline_vmsd(&type_name) {
        if !obj.contains_key("fields") {
            return Err(format!("{here}a {type_name} field without \"fields\""));
        }
        Kind::Nested(Box::new(compile_at(f, &here, depth + 1)?))
    } else {
        Kind::Scalar(Scalar::of(&type_name))
    };
    Ok(Field { name, type_name, size, count, kind })
}
