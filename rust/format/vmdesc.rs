//! The vmdesc: QEMU's JSON description of the device (FULL) sections.
//!
//! QEMU writes it after the EOF byte as `0x06 be32 length JSON`. It lists one
//! device per FULL section, in stream order, with the number of bytes every
//! field took; summing those sizes (plus the subsection headers) gives each
//! FULL section's payload length, which the stream itself does not carry.

use super::error::{FormatError, Result};
use super::reader::{be32_at, byte_at, slice};
use super::tag;
use serde_json::Value;

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
    let end_us = usize::try_from(end).ok()?;
    if end_us > data.len() || end_us < 7 || data[end_us - 1] != b'}' {
        return None;
    }
    let lo = end_us.saturating_sub(usize::try_from(window).unwrap_or(usize::MAX));
    // JSON holds no NUL, so the last NUL before `end` is the EOF byte or one
    // of the zero bytes of the be32 length that follows `06`.
    let nul = lo + data[lo..end_us].iter().rposition(|&b| b == 0)?;
    for back in [0usize, 2, 3, 4, 5] {
        let Some(eof) = nul.checked_sub(back) else { continue };
        if let Some(cand) = check_candidate(data, eof as u64, end) {
            return Some((eof as u64, cand));
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
pub fn parse_json(json: &[u8], at: u64) -> Result<Vmdesc> {
    let value: Value = serde_json::from_slice(json)
        .map_err(|e| FormatError::invalid(at, format!("expected the vmdesc's JSON, found invalid JSON ({e})")))?;
    from_value(&value).map_err(|m| FormatError::invalid(at, m))
}

fn from_value(v: &Value) -> std::result::Result<Vmdesc, String> {
    let obj = v.as_object().ok_or("expected the vmdesc to be a JSON object")?;
    let page_size = obj.get("page_size").and_then(Value::as_u64);
    let mut devices = Vec::new();
    if let Some(devs) = obj.get("devices") {
        let devs = devs.as_array().ok_or("expected the vmdesc's \"devices\" to be a list")?;
        devices.reserve(devs.len());
        for (i, d) in devs.iter().enumerate() {
            let name =
                d.get("name").and_then(Value::as_str).ok_or_else(|| format!("vmdesc device #{i} has no \"name\""))?;
            let instance_id = d
                .get("instance_id")
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("vmdesc device #{i} ({name}) has no valid \"instance_id\""))?;
            let version = d.get("version").and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok());
            devices.push(DeviceDesc { name: name.to_owned(), instance_id, version, payload_size: vmsd_size(d, 0) });
        }
    }
    let mut config_subsections = Vec::new();
    if let Some(subs) = obj.get("configuration").and_then(|c| c.get("subsections")).and_then(Value::as_array) {
        for s in subs {
            if let Some(name) = s.get("vmsd_name").and_then(Value::as_str) {
                config_subsections.push((name.to_owned(), vmsd_size(s, 0)));
            }
        }
    }
    Ok(Vmdesc { page_size, devices, config_subsections })
}

/// Bytes a described VMState (fields, then subsections) took in the stream.
fn vmsd_size(v: &Value, depth: u32) -> Option<u64> {
    if depth > 64 {
        return None;
    }
    let mut total: u64 = 0;
    if let Some(fields) = v.get("fields") {
        for f in fields.as_array()? {
            let size = f.get("size")?.as_u64()?;
            let n = match f.get("array_len") {
                Some(n) => n.as_u64()?,
                None => 1,
            };
            total = total.checked_add(size.checked_mul(n)?)?;
        }
    } else if let Some(size) = v.get("size") {
        // Old-style handlers may describe only their total size.
        total = size.as_u64()?;
    }
    if let Some(subs) = v.get("subsections") {
        for s in subs.as_array()? {
            let name = s.get("vmsd_name")?.as_str()?;
            if name.len() > 255 {
                return None;
            }
            // 0x05, u8 name length, name, be32 version, payload.
            let header = 1 + 1 + name.len() as u64 + 4;
            total = total.checked_add(header)?.checked_add(vmsd_size(s, depth + 1)?)?;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_fields_arrays_and_subsections() {
        let v: Value = serde_json::from_str(
            r#"{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":12,
                "fields":[{"name":"a","type":"uint32","size":4},
                          {"name":"regs","array_len":16,"type":"uint64","size":8}],
                "subsections":[{"vmsd_name":"cpu/x","version":1,
                                "fields":[{"name":"b","type":"bool","size":1}]}]}"#,
        )
        .unwrap();
        assert_eq!(vmsd_size(&v, 0), Some(4 + 128 + (1 + 1 + 5 + 4 + 1)));
    }

    #[test]
    fn refuses_overflowing_sizes() {
        let v: Value =
            serde_json::from_str(r#"{"fields":[{"name":"a","array_len":18446744073709551615,"size":2}]}"#).unwrap();
        assert_eq!(vmsd_size(&v, 0), None);
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
