use std::borrow::Cow;

use super::decode::NULLPTR_MARKER;
use super::desc::compile;
use super::diff::diff;
use super::x86::{elf_note, elf_notes, X86Cpu};
use super::*;

fn vmsd(json: &str) -> Vmsd {
    compile(&serde_json::from_str(json).unwrap(), "test").unwrap()
}

fn decode_ok<'a>(v: &'a Vmsd, data: &'a [u8]) -> Fields<'a> {
    decode(v, data, 1000, "device \"t\" instance 0").unwrap()
}

fn decode_err(json: &str, data: &[u8]) -> FormatError {
    let v = vmsd(json);
    decode(&v, data, 1000, "device \"t\" instance 0").unwrap_err()
}

fn name(s: &str) -> Cow<'_, str> {
    Cow::Borrowed(s)
}

#[test]
fn integers_have_their_types_signedness() {
    let v = vmsd(
        r#"{"vmsd_name":"t","version":1,"fields":[
            {"name":"a","type":"int8","size":1},
            {"name":"b","type":"uint8","size":1},
            {"name":"c","type":"int32 le","size":4},
            {"name":"d","type":"int64 equal","size":8},
            {"name":"e","type":"int16","size":2},
            {"name":"f","type":"bool","size":1}]}"#,
    );
    let mut data = vec![0xff, 0xff];
    data.extend_from_slice(&(-2i32).to_be_bytes());
    data.extend_from_slice(&u64::MAX.to_be_bytes());
    data.extend_from_slice(&(-300i16).to_be_bytes());
    data.push(1);
    let f = decode_ok(&v, &data);
    assert_eq!(f.get("a"), Some(&Value::Int(-1)));
    assert_eq!(f.get("b"), Some(&Value::Uint(255)));
    assert_eq!(f.get("c"), Some(&Value::Int(-2)));
    assert_eq!(f.get("d"), Some(&Value::Uint(u64::MAX)));
    assert_eq!(f.get("e"), Some(&Value::Int(-300)));
    assert_eq!(f.get("f"), Some(&Value::Bool(true)));
}

#[test]
fn compressed_runs_index_elements_and_structs() {
    let v = vmsd(
        r#"{"vmsd_name":"t","version":1,"fields":[
            {"name":"regs","array_len":3,"type":"uint16","size":2},
            {"name":"seg","array_len":2,"type":"struct","struct":{"vmsd_name":"seg","version":1,
                "fields":[{"name":"sel","type":"uint32","size":4},{"name":"base","type":"uint8","size":1}]},"size":5},
            {"name":"q","index":0,"type":"struct","struct":{"vmsd_name":"q","version":1,
                "fields":[{"name":"x","type":"uint8","size":1}]},"size":1},
            {"name":"q","index":1,"type":"struct","struct":{"vmsd_name":"q","version":1,
                "fields":[{"name":"x","type":"uint8","size":1}]},"size":1}]}"#,
    );
    let data = [0, 1, 0, 2, 0, 3, 0, 0, 0, 9, 7, 0, 0, 0, 8, 6, 0x11, 0x22];
    let f = decode_ok(&v, &data);
    assert_eq!(f.get("regs"), Some(&Value::List(vec![Value::Uint(1), Value::Uint(2), Value::Uint(3)])));
    let Some(Value::List(segs)) = f.get("seg") else { panic!("seg is a list") };
    assert_eq!(segs.len(), 2);
    let Value::Map(s1) = &segs[1] else { panic!("a struct") };
    assert_eq!(s1.get("sel"), Some(&Value::Uint(8)));
    assert_eq!(s1.get("base"), Some(&Value::Uint(6)));
    let Some(Value::List(q)) = f.get("q") else { panic!("q is a list") };
    assert_eq!(q.len(), 2);
}

#[test]
fn index_entries_must_follow_each_other() {
    let e = decode_err(r#"{"fields":[{"name":"q","index":1,"type":"uint8","size":1}]}"#, &[1]);
    assert!(e.message.contains("expected array element 0"), "{}", e.message);
}

#[test]
fn nullptr_pieces_join_the_array_they_split() {
    // QEMU 9.2 and later: an array of pointers split into runs by type.
    let v = vmsd(
        r#"{"fields":[
            {"name":"css","array_len":2,"type":"nullptr","size":1},
            {"name":"css","type":"struct","struct":{"vmsd_name":"img","version":1,
                "fields":[{"name":"x","type":"uint8","size":1}]},"size":1},
            {"name":"css","type":"nullptr","size":1}]}"#,
    );
    let data = [NULLPTR_MARKER, NULLPTR_MARKER, 5, NULLPTR_MARKER];
    let f = decode_ok(&v, &data);
    let Some(Value::List(css)) = f.get("css") else { panic!("css is a list") };
    assert_eq!(css.len(), 4);
    assert_eq!(css[0], Value::Null);
    assert_eq!(css[3], Value::Null);
    assert!(matches!(&css[2], Value::Map(m) if m.get("x") == Some(&Value::Uint(5))));
    // QEMU before 9.2: a struct with an empty description.
    let v = vmsd(r#"{"fields":[{"name":"p","array_len":2,"type":"struct","struct":{},"size":1}]}"#);
    let f = decode_ok(&v, &[NULLPTR_MARKER, NULLPTR_MARKER]);
    assert_eq!(f.get("p"), Some(&Value::List(vec![Value::Null, Value::Null])));
    let e = decode_err(r#"{"fields":[{"name":"p","type":"nullptr","size":1}]}"#, &[0]);
    assert!(e.message.contains("0x30"), "{}", e.message);
}

#[test]
fn subsections_are_checked_and_nested_under_their_name() {
    let json = r#"{"vmsd_name":"cpu","version":12,"fields":[{"name":"a","type":"uint8","size":1}],
        "subsections":[{"vmsd_name":"cpu/x","version":2,"fields":[{"name":"b","type":"uint16","size":2}]}]}"#;
    let mut data = vec![7, 0x05, 5];
    data.extend_from_slice(b"cpu/x");
    data.extend_from_slice(&2u32.to_be_bytes());
    data.extend_from_slice(&[0x12, 0x34]);
    let v = vmsd(json);
    let f = decode_ok(&v, &data);
    let Some(Value::Map(x)) = f.get("cpu/x") else { panic!("the subsection") };
    assert_eq!(x.get("b"), Some(&Value::Uint(0x1234)));
    // A missing marker, another name, another version: errors naming the field.
    let mut bad = data.clone();
    bad[1] = 0x04;
    let e = decode(&v, &bad, 1000, "device \"cpu\" instance 0").unwrap_err();
    assert_eq!(e.offset, 1001);
    assert!(
        e.message.contains("device \"cpu\" instance 0, field cpu/x") && e.message.contains("0x05"),
        "{}",
        e.message
    );
    let mut bad = data.clone();
    bad[7] = b'y';
    assert!(decode(&v, &bad, 0, "d").unwrap_err().message.contains("found one named \"cpu/y\""));
    let mut bad = data.clone();
    bad[11] = 3;
    assert!(decode(&v, &bad, 0, "d").unwrap_err().message.contains("version 2"));
}

#[test]
fn tmp_and_vstruct_fields_carry_their_vmsd_inline() {
    let v = vmsd(
        r#"{"fields":[{"name":"fp","array_len":2,"type":"struct","struct":{"vmsd_name":"fpreg","version":1,
            "fields":[{"name":"tmp","type":"tmp","vmsd_name":"fpreg_tmp","version":0,
                "fields":[{"name":"m","type":"uint64","size":8},{"name":"e","type":"uint16","size":2}],"size":10}]},
            "size":10}]}"#,
    );
    let data = [0u8; 20];
    let f = decode_ok(&v, &data);
    let Some(Value::List(fp)) = f.get("fp") else { panic!("fp") };
    let Value::Map(m) = &fp[1] else { panic!("struct") };
    assert!(matches!(m.get("tmp"), Some(Value::Map(t)) if t.get("e") == Some(&Value::Uint(0))));
}

#[test]
fn capabilities_carry_their_own_lengths() {
    let v = vmsd(
        r#"{"fields":[{"name":"caps_count","type":"uint32","size":4},
            {"name":"capabilities","array_len":2,"type":"capability","size":11}]}"#,
    );
    let mut data = 2u32.to_be_bytes().to_vec();
    data.push(10);
    data.extend_from_slice(b"mapped-ram");
    data.push(15);
    data.extend_from_slice(b"x-ignore-shared");
    let f = decode_ok(&v, &data);
    assert_eq!(
        f.get("capabilities"),
        Some(&Value::List(vec![Value::Str(name("mapped-ram")), Value::Str(name("x-ignore-shared"))]))
    );
}

#[test]
fn other_types_are_bytes_of_their_size() {
    let v = vmsd(
        r#"{"fields":[{"name":"t","type":"timer","size":8},{"name":"virtio","type":"virtio","size":3},
            {"name":"u","type":"unused_buffer","size":2},{"name":"q","type":"qtailq","size":1}]}"#,
    );
    let data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0, 0];
    let f = decode_ok(&v, &data);
    assert_eq!(f.get("t"), Some(&Value::Bytes(Cow::Borrowed(&data[..8]))));
    assert_eq!(f.get("virtio"), Some(&Value::Bytes(Cow::Borrowed(&data[8..11]))));
    assert_eq!(f.get("q"), Some(&Value::Bytes(Cow::Borrowed(&[0u8][..]))));
}

#[test]
fn values_that_do_not_fit_are_errors_with_path_and_offset() {
    let e = decode_err(r#"{"fields":[{"name":"a","type":"uint32","size":3}]}"#, &[0, 0, 0]);
    assert!(
        e.message.contains("field a") && e.message.contains("gives 3 bytes for a value of type uint32"),
        "{}",
        e.message
    );
    let e = decode_err(r#"{"fields":[{"name":"b","type":"bool","size":1}]}"#, &[2]);
    assert!(e.message.contains("expected a bool"), "{}", e.message);
    let e = decode_err(r#"{"fields":[{"name":"c","type":"buffer","size":9}]}"#, &[0; 4]);
    assert!(
        e.message.contains("expected 9 bytes of buffer") && e.message.contains("has 4 bytes left"),
        "{}",
        e.message
    );
    assert_eq!(e.offset, 1000);
    let e = decode_err(r#"{"fields":[{"name":"d","type":"uint8","size":1}]}"#, &[0, 0]);
    assert!(e.message.contains("describes 1 of the section's 2 payload bytes, 1 left over"), "{}", e.message);
    let e = decode_err(
        r#"{"fields":[{"name":"s","type":"struct","struct":{"vmsd_name":"s","fields":[
            {"name":"x","type":"uint8","size":1}]},"size":2}]}"#,
        &[0, 0],
    );
    assert!(e.message.contains("its fields take 1"), "{}", e.message);
    let e = decode_err(
        r#"{"fields":[{"name":"s","array_len":2,"type":"struct","struct":{"vmsd_name":"s","fields":[
            {"name":"x","type":"uint32","size":3}]},"size":4}]}"#,
        &[0; 8],
    );
    assert!(e.message.contains("field s[0].x"), "{}", e.message);
}

#[test]
fn hostile_descriptions_end_in_bounded_errors() {
    // A huge run: refused before any element is read.
    let e =
        decode_err(r#"{"fields":[{"name":"a","array_len":18446744073709551615,"type":"uint8","size":1}]}"#, &[0; 16]);
    assert!(e.message.contains("elements of 1 bytes"), "{}", e.message);
    // Elements of no bytes: the value budget stops them.
    let e = decode_err(r#"{"fields":[{"name":"a","array_len":1000000000000,"type":"buffer","size":0}]}"#, &[0; 16]);
    assert!(e.message.contains("far more values"), "{}", e.message);
    let e = decode_err(
        r#"{"fields":[{"name":"a","array_len":100000000,"type":"struct","struct":{"vmsd_name":"e","fields":[]},
            "size":0}]}"#,
        &[],
    );
    assert!(e.message.contains("far more values"), "{}", e.message);
    // Deep nesting: JSON deeper than serde_json's limit is refused when
    // parsed; a description built deeper than that is refused when compiled.
    let mut v = serde_json::json!({"name": "x", "type": "uint8", "size": 1});
    for _ in 0..100 {
        v = serde_json::json!({"name": "s", "type": "struct", "struct": {"vmsd_name": "s", "fields": [v]}, "size": 1});
    }
    let v = serde_json::json!({"fields": [v]});
    assert!(compile(&v, "t").unwrap_err().contains("nest more than"));
    let text = serde_json::to_string(&serde_json::json!({"devices": [{"name": "d", "instance_id": 0, "fields": [v]}]}));
    let e = StateDesc::parse(text.unwrap().as_bytes(), 9).unwrap_err();
    assert!(e.message.contains("invalid JSON"), "{}", e.message);
    // Malformed entries.
    for bad in [
        r#"{"fields":[{"name":"a","type":7,"size":1}]}"#,
        r#"{"fields":[{"name":"a","type":"uint8"}]}"#,
        r#"{"fields":[{"name":"a","type":"uint8","size":-1}]}"#,
        r#"{"fields":[{"name":"a","type":"struct","size":1}]}"#,
        r#"{"fields":[{"name":"a","type":"tmp","size":1}]}"#,
        r#"{"fields":[{"type":"uint8","size":1}]}"#,
        r#"{"fields":{"a":1}}"#,
        r#"{"fields":[],"subsections":[{"fields":[]}]}"#,
        r#"{"size":4}"#,
        r#"[1]"#,
    ] {
        assert!(compile(&serde_json::from_str(bad).unwrap(), "t").is_err(), "{bad}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let v = vmsd(
        r#"{"vmsd_name":"t","version":1,"fields":[
            {"name":"n","array_len":3,"type":"capability","size":2},
            {"name":"s","array_len":2,"type":"struct","struct":{"vmsd_name":"s","version":1,"fields":[
                {"name":"p","type":"nullptr","size":1},{"name":"b","type":"bool","size":1}]},"size":2}],
            "subsections":[{"vmsd_name":"t/x","version":1,"fields":[{"name":"z","type":"int16","size":2}]}]}"#,
    );
    let mut seed: u64 = 0x2545f4914f6cdd1d;
    for len in 0..64usize {
        for _ in 0..200 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    [0u8, 1, 0x30, 0x05, 3, b't', b'/', b'x', (seed >> 24) as u8][(seed % 9) as usize]
                })
                .collect();
            let _ = decode(&v, &data, 0, "d");
        }
    }
}

#[test]
fn state_desc_finds_devices_and_keeps_bad_entries_apart() {
    let json = br#"{"page_size":4096,"configuration":{"vmsd_name":"configuration","version":1,
        "fields":[{"name":"len","type":"uint32","size":4}]},
        "devices":[{"name":"a","instance_id":0,"vmsd_name":"a","version":1,"fields":[]},
                   {"name":"b","instance_id":3,"fields":[{"name":"x","type":"uint8"}]}]}"#;
    let d = StateDesc::parse(json, 50).unwrap();
    assert!(d.device("a", 0).unwrap().vmsd.is_ok());
    assert!(d.device("b", 3).unwrap().vmsd.as_ref().unwrap_err().contains("has no \"size\""));
    assert!(d.device("b", 0).is_none());
    assert!(d.configuration.as_ref().unwrap().is_ok());
    assert_eq!(StateDesc::parse(b"{", 7).unwrap_err().offset, 7);
}

#[test]
fn diff_reports_leaves_that_differ() {
    let v = vmsd(
        r#"{"fields":[{"name":"a","array_len":3,"type":"uint8","size":1},{"name":"b","type":"uint16","size":2}]}"#,
    );
    let (x, y) = ([1, 2, 3, 0, 9], [1, 5, 3, 0, 9]);
    let (fx, fy) = (decode_ok(&v, &x), decode_ok(&v, &y));
    let d = diff(&fx, &fy);
    assert_eq!(d.len(), 1);
    assert_eq!(show_path(&d[0].path), "a[1]");
    assert_eq!((d[0].a.clone(), d[0].b.clone()), (Some(Value::Uint(2)), Some(Value::Uint(5))));
    assert!(diff(&fx, &fx).is_empty());
    let w = vmsd(r#"{"fields":[{"name":"a","array_len":3,"type":"uint8","size":1}]}"#);
    let fz = decode_ok(&w, &x[..3]);
    let d = diff(&fx, &fz);
    assert_eq!(d.len(), 1);
    assert_eq!((show_path(&d[0].path), d[0].b.is_none()), ("b".to_owned(), true));
}

fn cpu() -> X86Cpu {
    let mut c = X86Cpu { index: 1, rip: 0x1122, rflags: 0x246, ..Default::default() };
    for (i, r) in c.regs.iter_mut().enumerate() {
        *r = 0x1000 + i as u64;
    }
    for (i, s) in c.segs.iter_mut().enumerate() {
        s.selector = 0x10 + i as u32;
        s.base = 0xa000 * (i as u64 + 1);
    }
    c
}

#[test]
fn prstatus_layouts_are_the_kernels() {
    let c = cpu();
    let d = c.prstatus(false);
    assert_eq!(d.len(), 144);
    assert_eq!(&d[24..28], &2u32.to_le_bytes()); // pr_pid: index + 1
    let reg = |off: usize| u32::from_le_bytes(d[72 + off..76 + off].try_into().unwrap());
    assert_eq!(reg(0), 0x1003); // ebx
    assert_eq!(reg(24), 0x1000); // eax
    assert_eq!(reg(28) & 0xffff, 0x13); // ds
    assert_eq!(reg(48), 0x1122); // eip
    assert_eq!(reg(52) & 0xffff, 0x11); // cs
    assert_eq!(reg(56), 0x246); // eflags
    assert_eq!(reg(60), 0x1004); // esp
    assert_eq!(reg(64) & 0xffff, 0x12); // ss
    let d = c.prstatus(true);
    assert_eq!(d.len(), 336);
    let reg = |i: usize| u64::from_le_bytes(d[112 + 8 * i..120 + 8 * i].try_into().unwrap());
    assert_eq!(reg(0), 0x100f); // r15
    assert_eq!(reg(10), 0x1000); // rax
    assert_eq!(reg(16), 0x1122); // rip
    assert_eq!(reg(21), 0xa000 * 5); // fs_base
    assert_eq!(reg(26), 0x15); // gs
    assert_eq!(c.qemu_cpu_state().len(), 440);
}

#[test]
fn notes_are_padded_and_ordered_as_qemu_writes_them() {
    let n = elf_note("CORE", 1, &[1, 2, 3, 4, 5]);
    assert_eq!(n.len(), 12 + 8 + 8);
    assert_eq!(&n[..12], &[5, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(&n[12..20], b"CORE\0\0\0\0");
    let mut a = cpu();
    a.index = 0;
    let b = cpu();
    let all = elf_notes(&[a.clone(), b]);
    assert_eq!(all.len(), 2 * (20 + 144) + 2 * (20 + 440));
    assert_eq!(&all[12..17], b"CORE\0");
    assert_eq!(&all[2 * 164 + 12..2 * 164 + 17], b"QEMU\0");
    a.hflags = 1 << 14;
    assert_eq!(elf_notes(&[a]).len(), 20 + 336 + 20 + 440);
}
