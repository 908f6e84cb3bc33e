#![no_main]
//! The libvirt save image header parser.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = savedir::format::libvirt::parse(data) {
        assert!(h.stream_start >= savedir::format::libvirt::HEADER_LEN);
    }
});
