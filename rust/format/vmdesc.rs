//! The vmdesc: QEMU's JSON description of the device (FULL) sections.
//!
//! QEMU writes it after the EOF byte as `0x06 be32 length JSON`. It lists one
//! device per FULL section, in stream order, with the number of bytes every
//! field took; summing those sizes (plus the subsection headers) gives each
//! FULL section's payload length, which the stream itself does not carry.

use super::error::{FormatError, Result};
use super::reader::{be32_at, byte_at, slice};
use super::tag;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Bytes of the vmdesc header: type byte and be32 length.
pub const VMDESC_HEADER: u64 = 5;

/// One device entry of the vmdesc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    pub name: String,
    pub instance_id: u32,
    pub version: Option<u32>,
    /// Payload bytes of the FULL section, when the description allows summing.
    pub payload_size: Option<u64>,
}

/// The parts of the vmdesc that the parser needs.
#[derive(Clone, Debug, Default)]
pub struct Vmdesc {
    pub page_size: Option<u64>,
    pub devices: Vec<DeviceDesc>,
    /// Payload sizes of the configuration's subsections, by name (QEMU >= 8.2).
    pub config_subsections: Vec<(String, Option<u64>)>,
}

/// Where a vmdesc sits: its type byte's offset and its JSON's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmdescLocation {
    pub offset: u64,
    pub json_len: u32,
}

impl VmdescLocation {
    /// One past the vmdesc's last byte.
    pub fn end(&self) -> u64 {
        self.offset + VMDESC_HEADER + self.json_len as u64
    }

    /// The JSON bytes, if they lie inside `data`.
    pub fn json<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        slice(data, self.offset + VMDESC_HEADER, self.end())
    }
}

/// Reads the vmdesc header at `at` (the byte after EOF) and checks its bounds.
pub fn locate_at(data: &[u8], at: u64) -> Result<VmdescLocation> {
    match byte_at(data, at) {
        Some(tag::VMDESC) => {}
        Some(b) => {
            return Err(FormatError::invalid(at, format!("expected the vmdesc type byte 0x06, found 0x{b:02x}")))
        }
        None => {
            return Err(FormatError::truncated(at, "expected the vmdesc type byte 0x06, found the end of the file"))
        }
    }
    let json_len = be32_at(data, at + 1).ok_or_else(|| {
        FormatError::truncated(at + 1, "expected the vmdesc's be32 length, found the end of the file")
    })?;
    let loc = VmdescLocation { offset: at, json_len };
    if loc.end() > data.len() as u64 {
        return Err(FormatError::truncated(
            at + 1,
            format!(
                "the vmdesc claims {json_len} bytes of JSON, but the file ends {} bytes after its header",
                (data.len() as u64).saturating_sub(at + VMDESC_HEADER)
            ),
        ));
    }
    Ok(loc)
}

/// Looks for a vmdesc from the tail of a stream whose last byte is at `end - 1`:
/// the candidate is an EOF byte followed by `06 be32 L {…}` ending exactly at
/// `end`. JSON never holds a NUL, so the EOF byte is the last NUL before the
/// JSON; that is where the search starts. Returns the EOF byte's offset too.
pub fn find_from_tail(data: &[u8], end: u64, window: u64) -> Option<(u64, VmdescLocation)> {
    let end_us = usize::try_from(end).ok()?.min(data.len());
    let lo = end_us.saturating_sub(usize::try_from(window).unwrap_or(usize::MAX));
    find_in_tail(&data[lo..end_us], lo as u64, end)
}

/// As [`find_from_tail`], over `tail`: the file's bytes from offset `tail_at`
/// up to `end` (a window read from a source that is not a slice).
pub fn find_in_tail(tail: &[u8], tail_at: u64, end: u64) -> Option<(u64, VmdescLocation)> {
    if tail_at.checked_add(tail.len() as u64)? != end || tail.len() < 7 || tail[tail.len() - 1] != b'}' {
        return None;
    }
    // JSON holds no NUL, so the last NUL before `end` is the EOF byte or one
    // of the zero bytes of the be32 length that follows `06`.
    let nul = tail.iter().rposition(|&b| b == 0)?;
    for back in [0usize, 2, 3, 4, 5] {
        let Some(eof) = nul.checked_sub(back) else {
            continue;
        };
        if let Some(cand) = check_candidate(tail, eof as u64, tail.len() as u64) {
            let loc = VmdescLocation { offset: cand.offset + tail_at, json_len: cand.json_len };
            return Some((eof as u64 + tail_at, loc));
        }
    }
    None
}

fn check_candidate(data: &[u8], eof: u64, end: u64) -> Option<VmdescLocation> {
    if byte_at(data, eof)? != tag::EOF || byte_at(data, eof + 1)? != tag::VMDESC {
        return None;
    }
    let len = be32_at(data, eof + 2)?;
    let loc = VmdescLocation { offset: eof + 1, json_len: len };
    if loc.end() != end || byte_at(data, loc.offset + VMDESC_HEADER)? != b'{' {
        return None;
    }
    Some(loc)
}

/// Parses the vmdesc JSON at `loc`.
pub fn parse(data: &[u8], loc: VmdescLocation) -> Result<Vmdesc> {
    let json =
        loc.json(data).ok_or_else(|| FormatError::truncated(loc.offset, "the vmdesc runs past the end of the file"))?;
    parse_json(json, loc.offset + VMDESC_HEADER)
}

/// Parses vmdesc JSON bytes that lie at absolute offset `at`.
///
/// The JSON is read once, keeping only what savedir uses of it (names,
/// instance and version ids, and the sizes of fields): a vmdesc runs to
/// hundreds of KiB, and one read into a generic JSON tree cost a small save
/// most of its `index`.
pub fn parse_json(json: &[u8], at: u64) -> Result<Vmdesc> {
    let top: Top = serde_json::from_slice(json)
        .map_err(|e| FormatError::invalid(at, format!("expected the vmdesc's JSON, found invalid JSON ({e})")))?;
    from_top(top).map_err(|m| FormatError::invalid(at, m))
}

fn from_top(top: Top) -> std::result::Result<Vmdesc, String> {
    let Top::Object { page_size, devices, config_subsections } = top else {
        return Err("expected the vmdesc to be a JSON object".into());
    };
    let mut out = Vec::new();
    match devices {
        None => {}
        Some(List::Other) => return Err("expected the vmdesc's \"devices\" to be a list".into()),
        Some(List::Items(devs)) => {
            out.reserve(devs.len());
            for (i, d) in devs.into_iter().enumerate() {
                let Some(d) = d.into_node() else {
                    return Err(format!("vmdesc device #{i} has no \"name\""));
                };
                let Some(name) = d.name.clone() else {
                    return Err(format!("vmdesc device #{i} has no \"name\""));
                };
                let instance_id = d
                    .instance_id
                    .flatten()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| format!("vmdesc device #{i} ({name}) has no valid \"instance_id\""))?;
                let version = d.version.flatten().and_then(|x| u32::try_from(x).ok());
                let payload_size = d.size_of(0);
                out.push(DeviceDesc { name, instance_id, version, payload_size });
            }
        }
    }
    let config_subsections = config_subsections
        .into_iter()
        .filter_map(Item::into_node)
        .filter_map(|s| Some((s.vmsd_name.clone()?, s.size_of(0))))
        .collect();
    Ok(Vmdesc { page_size: page_size.flatten(), devices: out, config_subsections })
}

/// What is kept of a JSON value that should be a non-negative integer:
/// `Some(None)` when present but something else.
type Num = Option<Option<u64>>;

/// A JSON value read as a number: None unless a non-negative integer.
struct Scalar(Option<u64>);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor { want: Want::Number }).map(|a| Scalar(a.number))
    }
}

/// A JSON value read as a string: None unless a string.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor { want: Want::Text }).map(|a| Text(a.text))
    }
}

/// A list, or something that should have been one.
enum List {
    Items(Vec<Item>),
    Other,
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor { want: Want::List }).map(|a| a.list.map_or(List::Other, List::Items))
    }
}

/// An element of a list: an object (a device, a field, a subsection), or
/// anything else.
struct Item(Option<Box<Node>>);

impl Item {
    fn into_node(self) -> Option<Box<Node>> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor { want: Want::Node }).map(|a| Item(a.node))
    }
}

/// The keys of a described VMState that savedir reads; `None` when absent.
#[derive(Default)]
struct Node {
    name: Option<String>,
    vmsd_name: Option<String>,
    instance_id: Num,
    version: Num,
    size: Num,
    array_len: Num,
    fields: Option<List>,
    subsections: Option<List>,
    /// The top level's keys.
    page_size: Num,
    devices: Option<List>,
    /// The "subsections" of the top level's "configuration".
    config_subsections: Option<List>,
}

impl Node {
    /// Bytes this VMState (fields, then subsections) took in the stream.
    fn size_of(&self, depth: u32) -> Option<u64> {
        if depth > 64 {
            return None;
        }
        let mut total: u64 = 0;
        if let Some(fields) = &self.fields {
            let List::Items(fields) = fields else { return None };
            for f in fields {
                let f = f.0.as_ref()?;
                let size = f.size??;
                let n = match f.array_len {
                    Some(n) => n?,
                    None => 1,
                };
                total = total.checked_add(size.checked_mul(n)?)?;
            }
        } else if let Some(size) = self.size {
            // Old-style handlers may describe only their total size.
            total = size?;
        }
        if let Some(subs) = &self.subsections {
            let List::Items(subs) = subs else { return None };
            for s in subs {
                let s = s.0.as_ref()?;
                let name = s.vmsd_name.as_ref()?;
                if name.len() > 255 {
                    return None;
                }
                // 0x05, u8 name length, name, be32 version, payload.
                let header = 1 + 1 + name.len() as u64 + 4;
                total = total.checked_add(header)?.checked_add(s.size_of(depth + 1)?)?;
            }
        }
        Some(total)
    }
}

/// The whole vmdesc: an object, or something else.
enum Top {
    Object { page_size: Num, devices: Option<List>, config_subsections: Vec<Item> },
    Other,
}

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let a = d.deserialize_any(AnyVisitor { want: Want::Top })?;
        Ok(match a.node {
            Some(n) => {
                let n = *n;
                let subs = match n.config_subsections {
                    Some(List::Items(v)) => v,
                    _ => Vec::new(),
                };
                Top::Object { page_size: n.page_size, devices: n.devices, config_subsections: subs }
            }
            None => Top::Other,
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Number,
    Text,
    List,
    Node,
    Top,
    /// The object under "configuration": only its "subsections".
    Config,
}

/// What one JSON value turned out to be, as far as the reader wants it.
#[derive(Default)]
struct Any {
    number: Option<u64>,
    text: Option<String>,
    list: Option<Vec<Item>>,
    node: Option<Box<Node>>,
}

/// Reads any JSON value, keeping what `want` asks for and skipping the
/// rest without building it.
struct AnyVisitor {
    want: Want,
}

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Any;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Any, E> {
        Ok(Any::default())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Any, E> {
        Ok(Any::default())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Any, E> {
        Ok(Any { number: (self.want == Want::Number).then_some(v), ..Any::default() })
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Any, E> {
        Ok(Any::default())
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Any, E> {
        Ok(Any { text: (self.want == Want::Text).then(|| v.to_owned()), ..Any::default() })
    }
    fn visit_unit<E>(self) -> std::result::Result<Any, E> {
        Ok(Any::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Any, A::Error> {
        if self.want != Want::List {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Any::default());
        }
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Item>()? {
            items.push(item);
        }
        Ok(Any { list: Some(items), ..Any::default() })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Any, A::Error> {
        if !matches!(self.want, Want::Node | Want::Top | Want::Config) {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Any::default());
        }
        let mut n = Node::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match (self.want, key.as_ref()) {
                (Want::Node, "name") => n.name = map.next_value::<Text>()?.0,
                (Want::Node, "vmsd_name") => n.vmsd_name = map.next_value::<Text>()?.0,
                (Want::Node, "instance_id") => n.instance_id = Some(map.next_value::<Scalar>()?.0),
                (Want::Node, "version") => n.version = Some(map.next_value::<Scalar>()?.0),
                (Want::Node, "size") => n.size = Some(map.next_value::<Scalar>()?.0),
                (Want::Node, "array_len") => n.array_len = Some(map.next_value::<Scalar>()?.0),
                (Want::Node, "fields") => n.fields = Some(map.next_value::<List>()?),
                (Want::Node, "subsections") => n.subsections = Some(map.next_value::<List>()?),
                (Want::Top, "page_size") => n.page_size = Some(map.next_value::<Scalar>()?.0),
                (Want::Top, "devices") => n.devices = Some(map.next_value::<List>()?),
                (Want::Top, "configuration") => {
                    let c = map.next_value_seed(Seed(Want::Config))?;
                    n.config_subsections = c.node.and_then(|c| c.subsections);
                }
                (Want::Config, "subsections") => n.subsections = Some(map.next_value::<List>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Any { node: Some(Box::new(n)), ..Any::default() })
    }
}

/// Reads one value as [`AnyVisitor`] with `want` does.
struct Seed(Want);

impl<'de> serde::de::DeserializeSeed<'de> for Seed {
    type Value = Any;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Any, D::Error> {
        d.deserialize_any(AnyVisitor { want: self.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload size of the one device of a vmdesc made of `device`.
    fn size_of(device: &str) -> Option<u64> {
        let json = format!(r#"{{"page_size":4096,"devices":[{device}]}}"#);
        parse_json(json.as_bytes(), 0).unwrap().devices[0].payload_size
    }

    #[test]
    fn sums_fields_arrays_and_subsections() {
        let cpu = r#"{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":12,
                "fields":[{"name":"a","type":"uint32","size":4},
                          {"name":"regs","array_len":16,"type":"uint64","size":8,"extra":{"deep":[1,{"x":null}]}}],
                "subsections":[{"vmsd_name":"cpu/x","version":1,
                                "fields":[{"name":"b","type":"bool","size":1}]}]}"#;
        assert_eq!(size_of(cpu), Some(4 + 128 + (1 + 1 + 5 + 4 + 1)));
        let d = parse_json(format!(r#"{{"devices":[{cpu}],"page_size":8192}}"#).as_bytes(), 0).unwrap();
        assert_eq!((d.page_size, d.devices[0].name.as_str(), d.devices[0].version), (Some(8192), "cpu", Some(12)));
        // An old-style handler: its total size only.
        assert_eq!(size_of(r#"{"name":"a","instance_id":0,"size":17}"#), Some(17));
        assert_eq!(size_of(r#"{"name":"a","instance_id":0}"#), Some(0));
    }

    #[test]
    fn refuses_overflowing_or_odd_sizes() {
        for bad in [
            r#"{"name":"a","instance_id":0,"fields":[{"name":"a","array_len":18446744073709551615,"size":2}]}"#,
            r#"{"name":"a","instance_id":0,"fields":[{"name":"a","size":-1}]}"#,
            r#"{"name":"a","instance_id":0,"fields":[{"name":"a","size":2.0}]}"#,
            r#"{"name":"a","instance_id":0,"fields":[{"name":"a"}]}"#,
            r#"{"name":"a","instance_id":0,"fields":{"name":"a","size":2}}"#,
            r#"{"name":"a","instance_id":0,"fields":[7]}"#,
            r#"{"name":"a","instance_id":0,"subsections":[{"size":2}]}"#,
            r#"{"name":"a","instance_id":0,"size":"12"}"#,
        ] {
            assert_eq!(size_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_vmdesc_that_is_not_one_says_so() {
        for (json, says) in [
            (&br#"[1,2]"#[..], "a JSON object"),
            (br#"{"devices":3}"#, "to be a list"),
            (br#"{"devices":[{"instance_id":0}]}"#, "has no \"name\""),
            (br#"{"devices":[5]}"#, "has no \"name\""),
            (br#"{"devices":[{"name":"x","instance_id":-1}]}"#, "no valid \"instance_id\""),
            (br#"{"devices":[{"name":"x","instance_id":4294967296}]}"#, "no valid \"instance_id\""),
            (br#"{"devices":[{"name":"x""#, "invalid JSON"),
        ] {
            let e = parse_json(json, 7).unwrap_err();
            assert!(e.message.contains(says) && e.offset == 7, "{}: {}", String::from_utf8_lossy(json), e.message);
        }
        let d = parse_json(br#"{"configuration":{"subsections":[{"vmsd_name":"c/x","fields":[{"size":3}]},4]}}"#, 0)
            .unwrap();
        assert_eq!(d.config_subsections, vec![("c/x".to_string(), Some(3))]);
        assert!(d.devices.is_empty() && d.page_size.is_none());
    }

    #[test]
    fn finds_vmdesc_from_tail() {
        let json = br#"{"page_size":4096,"devices":[]}"#;
        let mut d = b"QEVM\0\0\0\x03".to_vec();
        d.push(0); // EOF
        d.push(6);
        d.extend_from_slice(&(json.len() as u32).to_be_bytes());
        d.extend_from_slice(json);
        let (eof, loc) = find_from_tail(&d, d.len() as u64, 1 << 20).unwrap();
        assert_eq!(eof, 8);
        assert_eq!(loc.offset, 9);
        let desc = parse(&d, loc).unwrap();
        assert_eq!(desc.page_size, Some(4096));
        // Not at the claimed end: no candidate.
        assert!(find_from_tail(&d, d.len() as u64 - 1, 1 << 20).is_none());
    }

    #[test]
    fn locate_checks_bounds() {
        let d = [6u8, 0xff, 0xff, 0xff, 0xff, b'{'];
        let e = locate_at(&d, 0).unwrap_err();
        assert!(e.message.contains("claims"), "{}", e.message);
    }
}
