#![no_main]
//! A device section decoded through a vmdesc entry, both from the input:
//! a little-endian u16 length, that many bytes of JSON (one vmdesc device
//! entry), then the section's payload.
use libfuzzer_sys::fuzz_target;
use savedir::format::vmstate::{decode, desc, diff, x86};

fuzz_target!(|input: &[u8]| {
    let Some((len, rest)) = input.split_first_chunk::<2>() else { return };
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (json, payload) = rest.split_at(n);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else { return };
    let Ok(vmsd) = desc::compile(&v, "") else { return };
    if let Ok(fields) = decode::decode(&vmsd, payload, 0, "fuzz") {
        assert!(diff::diff(&fields, &fields).is_empty());
        let _ = x86::X86Cpu::from_fields(0, &fields).map(|c| x86::elf_notes(&[c]));
    }
});
