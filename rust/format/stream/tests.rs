use super::*;
use crate::format::ram::{FLAG_EOS, FLAG_MEM_SIZE, FLAG_PAGE};

/// A source that is not a slice: read in windows, as a file by `pread`.
pub struct Pread(pub Vec<u8>);

impl crate::format::source::ReadAt for Pread {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        crate::format::source::ReadAt::read_at(&self.0, at, buf)
    }
}

/// A small synthetic stream: configuration, ram START/PART/END, two FULL
/// devices, EOF and a vmdesc that describes the devices.
pub fn sample_stream(footers: bool) -> Vec<u8> {
    sample_stream_with(footers, &[0x7e, 0, 0, 0, 6, 9])
}

/// As [`sample_stream`], with the payload of the "cpu" device given.
pub fn sample_stream_with(footers: bool, cpu: &[u8]) -> Vec<u8> {
    let mut d = b"QEVM\0\0\0\x03".to_vec();
    d.push(tag::CONFIGURATION);
    d.extend_from_slice(&8u32.to_be_bytes());
    d.extend_from_slice(b"pc-10.0x");
    let footer = |d: &mut Vec<u8>, id: u32| {
        if footers {
            d.push(tag::FOOTER);
            d.extend_from_slice(&id.to_be_bytes());
        }
    };
    // ram START
    d.push(tag::START);
    d.extend_from_slice(&2u32.to_be_bytes());
    d.push(3);
    d.extend_from_slice(b"ram");
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&4u32.to_be_bytes());
    d.extend_from_slice(&(0x2000u64 | FLAG_MEM_SIZE).to_be_bytes());
    d.push(6);
    d.extend_from_slice(b"pc.ram");
    d.extend_from_slice(&0x2000u64.to_be_bytes());
    d.extend_from_slice(&FLAG_EOS.to_be_bytes());
    footer(&mut d, 2);
    // ram PART with a page
    d.push(tag::PART);
    d.extend_from_slice(&2u32.to_be_bytes());
    d.extend_from_slice(&(0x1000u64 | FLAG_PAGE).to_be_bytes());
    d.push(6);
    d.extend_from_slice(b"pc.ram");
    d.extend_from_slice(&[0x7e; 4096]);
    d.extend_from_slice(&FLAG_EOS.to_be_bytes());
    footer(&mut d, 2);
    // SWITCHOVER_START
    d.extend_from_slice(&[tag::COMMAND, 0, 11, 0, 0]);
    // ram END
    d.push(tag::END);
    d.extend_from_slice(&2u32.to_be_bytes());
    d.extend_from_slice(&FLAG_EOS.to_be_bytes());
    footer(&mut d, 2);
    // two devices
    for (id, name, payload) in [(5u32, &b"timer"[..], &[1u8, 2, 3, 4][..]), (6, b"cpu", cpu)] {
        d.push(tag::FULL);
        d.extend_from_slice(&id.to_be_bytes());
        d.push(name.len() as u8);
        d.extend_from_slice(name);
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(payload);
        footer(&mut d, id);
    }
    d.push(tag::EOF);
    let json = format!(
        r#"{{"page_size":4096,"devices":[{{"name":"timer","instance_id":0,"vmsd_name":"timer","version":1,"fields":[{{"name":"a","type":"uint32","size":4}}]}},{{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":1,"fields":[{{"name":"b","type":"buffer","size":{}}}]}}]}}"#,
        cpu.len()
    );
    let json = json.as_bytes();
    d.push(tag::VMDESC);
    d.extend_from_slice(&(json.len() as u32).to_be_bytes());
    d.extend_from_slice(json);
    d
}

#[test]
fn parses_sample_stream_with_and_without_footers() {
    for footers in [true, false] {
        let d = sample_stream(footers);
        let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        let kinds: Vec<_> = s.items.iter().map(|i| i.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Configuration,
                Kind::Start,
                Kind::Part,
                Kind::Command,
                Kind::End,
                Kind::Full,
                Kind::Full,
                Kind::Vmdesc
            ]
        );
        assert_eq!(s.footers, Some(footers));
        assert_eq!(s.end, d.len() as u64);
        assert_eq!(d[s.eof as usize], 0);
        // Extents tile the stream.
        for w in s.items.windows(2) {
            if w[1].kind != Kind::Vmdesc {
                assert_eq!(w[0].end, w[1].offset, "{:?}", w);
            }
        }
        assert_eq!(s.configuration.unwrap().machine_type, "pc-10.0x");
        assert_eq!(s.items[6].name.as_deref(), Some("cpu"));
        assert_eq!(s.items[6].payload_end() - s.items[6].payload_start(), 6);
    }
}

#[test]
fn device_sections_found_by_footer_without_vmdesc() {
    let mut d = sample_stream(true);
    let eof = d.len() - 1 - 5 - d.iter().rev().position(|&b| b == tag::VMDESC).unwrap() + 5;
    d.truncate(eof); // drop the vmdesc
    let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
    assert!(s.vmdesc.is_none());
    let cpu = &s.items[s.items.len() - 1];
    assert_eq!(cpu.name.as_deref(), Some("cpu"));
    assert_eq!(cpu.payload_end() - cpu.payload_start(), 6);
}

#[test]
fn a_footer_inside_device_data_is_undone_without_vmdesc() {
    // The cpu payload holds its own footer followed by a fake FULL
    // header; only going back to the next footer parses to the end.
    let cpu = [0x7e, 0, 0, 0, 6, 4, 0, 0, 0, 9, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 1, 0x7e, 0, 0, 0, 9];
    let mut d = sample_stream_with(true, &cpu);
    let with = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
    d.truncate(with.eof as usize + 1); // drop the vmdesc
    let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
    assert_eq!(s.resynced, 2);
    let cpu_item = s.items.last().unwrap();
    assert_eq!(cpu_item.name.as_deref(), Some("cpu"));
    assert_eq!(cpu_item.payload_end() - cpu_item.payload_start(), cpu.len() as u64);
    assert_eq!(&s.items[..], &with.items[..with.items.len() - 1]);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let d = sample_stream(true);
    let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof;
    for cut in 0..=eof as usize {
        let e = parse(&d[..cut], ParseOptions::new(0, cut as u64));
        assert!(e.is_err(), "cut at {cut} parsed");
    }
}

/// Feeds `d` to a [`StreamParser`] `chunk` bytes at a time, keeping only
/// the bytes from the parser's position on, as `savedir record` does.
pub fn parse_streaming(d: &[u8], chunk: usize) -> Result<Stream> {
    let mut p = StreamParser::new(0, None);
    let mut have = 0;
    loop {
        have = (have + chunk).min(d.len());
        let last = have == d.len();
        let base = p.pos() as usize;
        if p.advance(&d[base..have], base as u64, last, None)? == Progress::Done {
            return Ok(p.finish());
        }
        assert!(!last);
    }
}

#[test]
fn streaming_parse_equals_whole_parse() {
    for footers in [true, false] {
        let d = sample_stream(footers);
        let whole = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
        for chunk in [1, 2, 3, 5, 7, 64, 4099, 1 << 20] {
            let s = match parse_streaming(&d, chunk) {
                Ok(s) => s,
                // Without footers, device sections need the vmdesc, which
                // a stream that is still arriving has not sent yet.
                Err(e) if !footers => {
                    assert_eq!(e.kind, FormatErrorKind::Unsupported, "{e}");
                    continue;
                }
                Err(e) => panic!("chunk {chunk}: {e}"),
            };
            assert_eq!(s.items, whole.items, "chunk {chunk}");
            assert_eq!((s.eof, s.end), (whole.eof, whole.end));
        }
    }
}

#[test]
fn streaming_parse_of_a_cut_stream_fails_like_the_whole_parse() {
    let d = sample_stream(true);
    let eof = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap().eof as usize;
    for cut in (0..=eof).step_by(3) {
        let whole = parse(&d[..cut], ParseOptions::new(0, cut as u64)).unwrap_err();
        let streamed = parse_streaming(&d[..cut], 7).unwrap_err();
        assert_eq!(streamed.kind, whole.kind, "cut {cut}: {streamed} vs {whole}");
    }
}

#[test]
fn not_a_stream() {
    let e = parse(b"hello world", ParseOptions::new(0, 11)).unwrap_err();
    assert_eq!(e.kind, FormatErrorKind::NotAStream);
    let e = parse(b"", ParseOptions::new(0, 0)).unwrap_err();
    assert_eq!(e.kind, FormatErrorKind::NotAStream);
}

#[test]
fn single_byte_flips_never_panic() {
    let d = sample_stream(true);
    for i in 0..d.len() {
        for bit in [0x01u8, 0x80] {
            let mut m = d.clone();
            m[i] ^= bit;
            let _ = parse(&m, ParseOptions::new(0, m.len() as u64));
        }
    }
}

/// `sample_stream` without its vmdesc (and, with `footers` false, with
/// neither footers nor vmdesc: the streams of machine types up to 2.3).
fn without_vmdesc(footers: bool, cpu: &[u8]) -> Vec<u8> {
    let mut d = sample_stream_with(footers, cpu);
    let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
    d.truncate(s.eof as usize + 1);
    d
}

#[test]
fn no_footers_and_no_vmdesc_end_each_section_at_the_next_header() {
    let with = {
        let d = sample_stream(false);
        parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap()
    };
    let d = without_vmdesc(false, &[0x7e, 0, 0, 0, 6, 9]);
    let s = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap();
    assert_eq!(s.footers, Some(false));
    assert_eq!(&s.items[..], &with.items[..with.items.len() - 1]);
    for chunk in [1, 7, 4099] {
        assert_eq!(parse_streaming(&d, chunk).unwrap().items, s.items, "chunk {chunk}");
    }
}

#[test]
fn a_planted_header_that_also_parses_is_refused_with_both_ends() {
    // The timer's data is its 4 bytes, then bytes that look like the cpu
    // section's header (id 6) with a short payload of its own: one reading
    // ends the timer at the planted header, another at the real one.
    let mut d = b"QEVM\0\0\0\x03".to_vec();
    d.push(tag::FULL);
    d.extend_from_slice(&5u32.to_be_bytes());
    d.push(5);
    d.extend_from_slice(b"timer");
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&[1, 2, 3, 4]);
    let planted = d.len();
    let header = |d: &mut Vec<u8>| {
        d.push(tag::FULL);
        d.extend_from_slice(&6u32.to_be_bytes());
        d.push(3);
        d.extend_from_slice(b"cpu");
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
    };
    header(&mut d);
    d.extend_from_slice(&[9, 9]);
    let real = d.len();
    header(&mut d);
    d.extend_from_slice(&[7, 7, 7]);
    d.push(tag::EOF);
    let e = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap_err();
    assert_eq!(e.kind, FormatErrorKind::Unsupported, "{e}");
    assert!(e.message.contains(&format!("offset {planted}")) && e.message.contains(&format!("offset {real}")), "{e}");
    assert!(e.message.contains("\"timer\""), "{e}");
    // A vmdesc from elsewhere settles it.
    let timer_size = real - planted + 4;
    let json = format!(
        r#"{{"devices":[{{"name":"timer","instance_id":0,"fields":[{{"name":"t","size":{timer_size}}}]}},
                        {{"name":"cpu","instance_id":0,"fields":[{{"name":"c","size":3}}]}}]}}"#
    );
    let desc = crate::format::vmdesc::parse_json(json.as_bytes(), 0).unwrap();
    let mut opts = ParseOptions::new(0, d.len() as u64);
    opts.vmdesc = Some(&desc);
    let s = parse(&d, opts).unwrap();
    let timer = &s.items[0];
    assert_eq!(timer.end - timer.offset - timer.header_len, (real - planted + 4) as u64);
}

#[test]
fn thousands_of_false_headers_end_in_bounded_work() {
    // A device whose data holds 5000 headers of sections that never parse
    // (each claims an id that the next one repeats): every choice fails.
    let mut d = b"QEVM\0\0\0\x03".to_vec();
    d.push(tag::FULL);
    d.extend_from_slice(&5u32.to_be_bytes());
    d.push(3);
    d.extend_from_slice(b"cpu");
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    for i in 0..5000u32 {
        d.push(tag::FULL);
        d.extend_from_slice(&(6 + i).to_be_bytes());
        d.push(1);
        d.push(b'x');
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.push(0xff);
    }
    d.push(0xff);
    let e = parse(&d, ParseOptions::new(0, d.len() as u64)).unwrap_err();
    assert!(matches!(e.kind, FormatErrorKind::Unsupported | FormatErrorKind::Invalid), "{e}");
}
