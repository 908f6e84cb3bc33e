//! Walking a section's payload through its compiled description.
//!
//! Values borrow the payload's bytes (and the description's names): nothing
//! is copied. Every size the vmdesc gives is checked against the bytes left,
//! every integer against its type's width, every subsection header against
//! its name and version; a value that does not fit is an error that names
//! the device, the field's path and the absolute offset.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::desc::{Count, Field, Kind, Scalar, Vmsd, MAX_DEPTH};
use crate::format::error::{FormatError, Result};
use crate::format::tag;

/// The byte QEMU writes for a NULL pointer in an array of pointers.
pub const NULLPTR_MARKER: u8 = 0x30;

/// A decoded value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Bool(bool),
    /// A signed integer type's value.
    Int(i64),
    /// An unsigned integer type's value.
    Uint(u64),
    /// Bytes whose meaning only the device knows (buffers, timers, floats...).
    Bytes(Cow<'a, [u8]>),
    /// A migration capability's name.
    Str(Cow<'a, str>),
    /// A NULL pointer.
    Null,
    /// An array's elements.
    List(Vec<Value<'a>>),
    /// A VMState's fields and subsections, in stream order.
    Map(Fields<'a>),
}

/// A VMState's fields (and subsections, keyed by their `vmsd_name`), in the
/// order the stream holds them, keyed as the vmdesc spells them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields<'a> {
    pub entries: Vec<(Cow<'a, str>, Value<'a>)>,
}

impl<'a> Fields<'a> {
    /// The value of the field `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Value<'a>> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A copy that borrows nothing.
    pub fn into_owned(self) -> Fields<'static> {
        Fields {
            entries: self.entries.into_iter().map(|(n, v)| (Cow::Owned(n.into_owned()), v.into_owned())).collect(),
        }
    }
}

impl Value<'_> {
    /// A copy that borrows nothing.
    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Bool(b) => Value::Bool(b),
            Value::Int(i) => Value::Int(i),
            Value::Uint(u) => Value::Uint(u),
            Value::Bytes(b) => Value::Bytes(Cow::Owned(b.into_owned())),
            Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
            Value::Null => Value::Null,
            Value::List(l) => Value::List(l.into_iter().map(Value::into_owned).collect()),
            Value::Map(m) => Value::Map(m.into_owned()),
        }
    }
}

/// One step of a field's path: a name, or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<'a> {
    Name(Cow<'a, str>),
    Index(u64),
}

impl Step<'_> {
    /// A copy that borrows nothing.
    pub fn into_owned(self) -> Step<'static> {
        match self {
            Step::Name(n) => Step::Name(Cow::Owned(n.into_owned())),
            Step::Index(i) => Step::Index(i),
        }
    }
}

/// `env.segs[1].base`; subsections appear by their vmsd name.
pub fn show_path(path: &[Step<'_>]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Name(n) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(n);
            }
            Step::Index(i) => {
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

/// `1 byte`, `2 bytes`.
fn bytes(n: u64) -> String {
    if n == 1 {
        "1 byte".into()
    } else {
        format!("{n} bytes")
    }
}

/// Decodes the payload of a section (`payload`, whose first byte is at
/// absolute offset `base`) through `vmsd`, which must describe it to its
/// last byte. `label` names the section in messages (`device "cpu"
/// instance 1`).
pub fn decode<'a>(vmsd: &'a Vmsd, payload: &'a [u8], base: u64, label: &str) -> Result<Fields<'a>> {
    let mut d = Decoder {
        data: payload,
        base,
        pos: 0,
        label,
        path: Vec::new(),
        // A value takes at least one byte, except elements of size 0: the
        // budget bounds those (and so the time and memory) by the payload.
        budget: (payload.len() as u64).saturating_mul(2).saturating_add(1 << 16),
    };
    let fields = d.vmsd(vmsd, 0)?;
    if d.pos != payload.len() {
        return Err(FormatError::invalid(
            d.offset(),
            format!(
                "{label}: the vmdesc describes {} of the section's {} payload bytes, {} left over",
                d.pos,
                payload.len(),
                payload.len() - d.pos
            ),
        ));
    }
    Ok(fields)
}

struct Decoder<'a, 'l> {
    data: &'a [u8],
    base: u64,
    pos: usize,
    label: &'l str,
    path: Vec<Step<'a>>,
    budget: u64,
}

impl<'a> Decoder<'a, '_> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn left(&self) -> u64 {
        (self.data.len() - self.pos) as u64
    }

    fn fail(&self, at: u64, what: impl std::fmt::Display) -> FormatError {
        let path = show_path(&self.path);
        let field = if path.is_empty() { String::new() } else { format!(", field {path}") };
        FormatError::invalid(at, format!("{}{field}: {what}", self.label))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.fail(
                self.offset(),
                format!("expected {} of {what}, but the section has {} left", bytes(n), bytes(self.left())),
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn spend(&mut self, n: u64) -> Result<()> {
        if n > self.budget {
            return Err(
                self.fail(self.offset(), "the vmdesc describes far more values than the section's bytes can hold")
            );
        }
        self.budget -= n;
        Ok(())
    }

    fn vmsd(&mut self, vmsd: &'a Vmsd, depth: usize) -> Result<Fields<'a>> {
        if depth > MAX_DEPTH {
            return Err(self.fail(self.offset(), format!("VMStates nest more than {MAX_DEPTH} deep")));
        }
        let mut out = Fields { entries: Vec::with_capacity(vmsd.fields.len() + vmsd.subsections.len()) };
        for f in &vmsd.fields {
            self.path.push(Step::Name(Cow::Borrowed(&f.name)));
            let r = self.entry(f, &mut out, depth);
            self.path.pop();
            r?;
        }
        for sub in &vmsd.subsections {
            self.path.push(Step::Name(Cow::Borrowed(&sub.name)));
            let r = self.subsection(sub, depth).map(|v| out.entries.push((Cow::Borrowed(&sub.name), Value::Map(v))));
            self.path.pop();
            r?;
        }
        Ok(out)
    }

    fn subsection(&mut self, sub: &'a Vmsd, depth: usize) -> Result<Fields<'a>> {
        // 0x05, u8 name length, name, be32 version.
        let at = self.offset();
        if self.left() == 0 {
            return Err(
                self.fail(at, format!("expected the subsection \"{}\", found the end of the section", sub.name))
            );
        }
        let marker = self.take(1, "a subsection marker")?[0];
        if marker != tag::SUBSECTION {
            return Err(self.fail(at, format!("expected the subsection marker 0x05, found 0x{marker:02x}")));
        }
        let len = self.take(1, "a subsection name's length")?[0];
        let found = self.take(len as u64, "a subsection name")?;
        if found != sub.name.as_bytes() {
            return Err(self.fail(
                at,
                format!(
                    "expected the subsection \"{}\", found one named \"{}\"",
                    sub.name,
                    crate::format::show_bytes(found)
                ),
            ));
        }
        let v = self.take(4, "a subsection version")?;
        let version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        if let Some(want) = sub.version {
            if want != version {
                return Err(
                    self.fail(at, format!("the vmdesc says version {want}, the stream's header says {version}"))
                );
            }
        }
        self.vmsd(sub, depth + 1)
    }

    /// Decodes one field entry and files its value under its name; entries
    /// that repeat the name before them are pieces of one array.
    fn entry(&mut self, f: &'a Field, out: &mut Fields<'a>, depth: usize) -> Result<()> {
        let value = match f.count {
            Count::One | Count::Element(_) => self.element(f, true, depth)?,
            Count::Run(n) => Value::List(self.run(f, n, depth)?),
        };
        let joins = matches!(out.entries.last(), Some((last, _)) if *last == f.name.as_str());
        if let Count::Element(i) = f.count {
            let have = match out.entries.last() {
                Some((_, Value::List(l))) if joins => l.len() as u64,
                Some(_) if joins => 1,
                _ => 0,
            };
            if i != have {
                return Err(self.fail(self.offset(), format!("expected array element {have}, the vmdesc says {i}")));
            }
        }
        if !joins {
            let value = match f.count {
                Count::Element(_) => Value::List(vec![value]),
                _ => value,
            };
            out.entries.push((Cow::Borrowed(&f.name), value));
            return Ok(());
        }
        let (_, last) = out.entries.last_mut().expect("joins implies an entry");
        if !matches!(last, Value::List(_)) {
            *last = Value::List(vec![std::mem::replace(last, Value::Null)]);
        }
        let Value::List(items) = last else { unreachable!("made a list above") };
        match value {
            Value::List(more) if matches!(f.count, Count::Run(_)) => items.extend(more),
            v => items.push(v),
        }
        Ok(())
    }

    /// A compressed run of `n` elements, each laid out as the first.
    fn run(&mut self, f: &'a Field, n: u64, depth: usize) -> Result<Vec<Value<'a>>> {
        // Every element takes `size` bytes, except capabilities, whose
        // length each carries (at least one byte).
        let each = if matches!(f.kind, Kind::Scalar(Scalar::Capability)) { 1 } else { f.size };
        let need = n.checked_mul(each);
        if need.is_none_or(|b| b > self.left()) {
            return Err(self.fail(
                self.offset(),
                format!(
                    "the vmdesc describes {n} elements of {each} bytes, but the section has {} bytes left",
                    self.left()
                ),
            ));
        }
        self.spend(n)?;
        let mut items = Vec::with_capacity(n.min(self.left() + 1) as usize);
        for i in 0..n {
            self.path.push(Step::Index(i));
            let v = self.element(f, i == 0, depth);
            self.path.pop();
            items.push(v?);
        }
        Ok(items)
    }

    /// One element of a field. `first`: the one whose size the entry gives
    /// (every element of a run but capabilities has the same).
    fn element(&mut self, f: &'a Field, first: bool, depth: usize) -> Result<Value<'a>> {
        self.spend(1)?;
        let at = self.offset();
        let size = f.size;
        let exact = |d: &Self, n: u64| -> Result<()> {
            if n != size {
                return Err(d.fail(
                    at,
                    format!("the vmdesc gives {size} bytes for a value of type {}, which takes {n}", f.type_name),
                ));
            }
            Ok(())
        };
        Ok(match &f.kind {
            Kind::Nested(vmsd) => {
                if size > self.left() {
                    return Err(self.fail(
                        at,
                        format!(
                            "the vmdesc gives {size} bytes for this struct, but the section has {} bytes left",
                            self.left()
                        ),
                    ));
                }
                let v = self.vmsd(vmsd, depth + 1)?;
                let took = self.offset() - at;
                if took != size {
                    return Err(
                        self.fail(at, format!("the vmdesc gives {size} bytes for this struct, its fields take {took}"))
                    );
                }
                Value::Map(v)
            }
            Kind::EmptyStruct | Kind::Scalar(Scalar::Null) => {
                exact(self, 1)?;
                let b = self.take(1, "a NULL pointer marker")?[0];
                if b != NULLPTR_MARKER {
                    let what = if matches!(f.kind, Kind::EmptyStruct) {
                        "a struct the vmdesc leaves empty"
                    } else {
                        "a nullptr"
                    };
                    return Err(
                        self.fail(at, format!("expected the NULL pointer marker 0x30 of {what}, found 0x{b:02x}"))
                    );
                }
                Value::Null
            }
            Kind::Scalar(Scalar::Bool) => {
                exact(self, 1)?;
                match self.take(1, "a bool")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(self.fail(at, format!("expected a bool (0 or 1), found {b}"))),
                }
            }
            Kind::Scalar(Scalar::Int { width, signed }) => {
                exact(self, *width as u64)?;
                let b = self.take(*width as u64, &f.type_name)?;
                let mut raw: u64 = 0;
                for &x in b {
                    raw = raw << 8 | x as u64;
                }
                if *signed {
                    let shift = 64 - 8 * *width as u32;
                    Value::Int(((raw << shift) as i64) >> shift)
                } else {
                    Value::Uint(raw)
                }
            }
            Kind::Scalar(Scalar::Capability) => {
                let len = *self.take(1, "a capability's length")?.first().expect("one byte") as u64;
                if first {
                    exact(self, 1 + len)?;
                }
                let name = self.take(len, "a capability's name")?;
                let s = std::str::from_utf8(name).map_err(|_| {
                    self.fail(at, format!("expected a capability name, found \"{}\"", crate::format::show_bytes(name)))
                })?;
                Value::Str(Cow::Borrowed(s))
            }
            Kind::Scalar(Scalar::Bytes) => Value::Bytes(Cow::Borrowed(self.take(size, &f.type_name)?)),
        })
    }
}
