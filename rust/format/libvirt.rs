//! libvirt's save image header (`virsh save`, managed save, memory snapshots).
//!
//! ```text
//! 0   16  magic "LibvirtQemudSave" (complete) or "LibvirtQemudPart" (unfinished)
//! 16  u32 version (2; host byte order, byte-swapped when it reads > 2)
//! 20  u32 data_len: domain XML, optional cookie XML, zero padding
//! 24  u32 was_running
//! 28  u32 format: 0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse (mapped-ram)
//! 32  u32 cookie offset
//! 36  56 unused
//! 92  data_len bytes, then the QEMU stream
//! ```

use super::error::{FormatError, FormatErrorKind, Result};

pub const MAGIC_SAVE: &[u8; 16] = b"LibvirtQemudSave";
pub const MAGIC_PART: &[u8; 16] = b"LibvirtQemudPart";
pub const HEADER_LEN: u64 = 92;
/// Domain XML plus padding larger than this is not a libvirt header.
const MAX_DATA_LEN: u32 = 64 << 20;

/// What the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtHeader {
    pub version: u32,
    pub was_running: bool,
    pub format: u32,
    /// Absolute offset of the QEMU stream.
    pub stream_start: u64,
    pub domain_name: Option<String>,
    pub domain_uuid: Option<String>,
}

/// True when `data` starts like a libvirt save image (either magic).
pub fn is_libvirt(data: &[u8]) -> bool {
    data.starts_with(MAGIC_SAVE) || data.starts_with(MAGIC_PART)
}

/// The name of a compressed image format, if `format` is one.
pub fn compressor(format: u32) -> Option<&'static str> {
    Some(match format {
        1 => "gzip",
        2 => "bzip2",
        3 => "xz",
        4 => "lzop",
        5 => "zstd",
        _ => return None,
    })
}

/// Parses and checks the header of a libvirt save image.
pub fn parse(data: &[u8]) -> Result<LibvirtHeader> {
    if data.starts_with(MAGIC_PART) {
        return Err(FormatError::unsupported(
            0,
            "this is an unfinished libvirt save image (magic \"LibvirtQemudPart\"): the save failed or is still running",
        ));
    }
    if !data.starts_with(MAGIC_SAVE) {
        return Err(FormatError::new(
            FormatErrorKind::NotAStream,
            0,
            "expected the libvirt magic \"LibvirtQemudSave\"",
        ));
    }
    let word = |i: usize| -> Result<u32> {
        data.get(16 + 4 * i..20 + 4 * i)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| FormatError::truncated(16 + 4 * i as u64, "the libvirt header is cut short"))
    };
    let mut fields = [word(0)?, word(1)?, word(2)?, word(3)?, word(4)?];
    // Written by a host of the other byte order: libvirt swaps when the
    // version reads above 2.
    if fields[0] > 2 {
        for f in fields.iter_mut() {
            *f = f.swap_bytes();
        }
    }
    let [version, data_len, was_running, format, _cookie] = fields;
    if !(1..=2).contains(&version) {
        return Err(FormatError::invalid(16, format!("expected libvirt save image version 1 or 2, found {version}")));
    }
    if data_len > MAX_DATA_LEN {
        return Err(FormatError::invalid(20, format!("expected the domain XML's length, found {data_len} bytes")));
    }
    if let Some(c) = compressor(format) {
        return Err(FormatError::unsupported(
            28,
            format!(
                "this libvirt save image is compressed with {c} (format {format}); savedir reads raw images. \
                 Decompress the stream with `tail -c +{} FILE | {c} -d > vm.stream`, or save with \
                 save_image_format = \"raw\" in libvirt's qemu.conf",
                HEADER_LEN + data_len as u64 + 1
            ),
        ));
    }
    if format != 0 && format != 6 {
        return Err(FormatError::unsupported(28, format!("unknown libvirt save image format {format}")));
    }
    let stream_start = HEADER_LEN + data_len as u64;
    let xml_end = (stream_start as usize).min(data.len());
    let xml = data.get(HEADER_LEN as usize..xml_end).unwrap_or(&[]);
    let xml = &xml[..xml.iter().position(|&b| b == 0).unwrap_or(xml.len())];
    let xml = String::from_utf8_lossy(xml);
    Ok(LibvirtHeader {
        version,
        was_running: was_running != 0,
        format,
        stream_start,
        domain_name: element(&xml, "name"),
        domain_uuid: element(&xml, "uuid"),
    })
}

/// The text of the first `<tag>` element of the domain, unescaped.
fn element(xml: &str, tag: &str) -> Option<String> {
    let domain = xml.find("<domain")?;
    let open = format!("<{tag}>");
    let start = domain + xml[domain..].find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let text = xml[start..end].trim();
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Builds a header around a domain XML (for tests and tools).
pub fn build_header(xml: &str, format: u32, was_running: bool, pad: u32) -> Vec<u8> {
    let mut body = xml.as_bytes().to_vec();
    body.push(0);
    body.resize(body.len() + pad as usize, 0);
    let mut h = MAGIC_SAVE.to_vec();
    for v in [2u32, body.len() as u32, was_running as u32, format, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.resize(HEADER_LEN as usize, 0);
    h.extend_from_slice(&body);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>\n  <name>web&amp;db</name>\n  <uuid>6d5c1c4e-0000-4000-8000-000000000001</uuid>\n  <devices><disk><name>x</name></disk></devices>\n</domain>\n";

    #[test]
    fn parses_name_uuid_and_stream_offset() {
        let h = build_header(XML, 0, true, 4096);
        let p = parse(&h).unwrap();
        assert_eq!(p.stream_start, h.len() as u64);
        assert_eq!(p.domain_name.as_deref(), Some("web&db"));
        assert_eq!(p.domain_uuid.as_deref(), Some("6d5c1c4e-0000-4000-8000-000000000001"));
        assert!(p.was_running);
    }

    #[test]
    fn refuses_part_and_compressed_images() {
        let mut h = build_header(XML, 0, false, 0);
        h[..16].copy_from_slice(MAGIC_PART);
        assert!(parse(&h).unwrap_err().message.contains("unfinished"));
        for (f, name) in [(1, "gzip"), (2, "bzip2"), (3, "xz"), (4, "lzop"), (5, "zstd")] {
            let e = parse(&build_header(XML, f, false, 0)).unwrap_err();
            assert_eq!(e.kind, FormatErrorKind::Unsupported);
            assert!(e.message.contains(name), "{}", e.message);
        }
        assert_eq!(parse(&build_header(XML, 6, false, 0)).unwrap().format, 6);
    }

    #[test]
    fn big_endian_headers_are_swapped_and_nonsense_refused() {
        let mut h = build_header(XML, 0, false, 0);
        for i in 0..5 {
            let at = 16 + 4 * i;
            let v = u32::from_le_bytes(h[at..at + 4].try_into().unwrap());
            h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        assert_eq!(parse(&h).unwrap().stream_start, build_header(XML, 0, false, 0).len() as u64);
        let mut h = build_header(XML, 0, false, 0);
        h[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&h).is_err());
        assert!(parse(&h[..30]).is_err());
    }
}
