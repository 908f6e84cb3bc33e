#![no_main]
//! RAM records under every option combination.
use libfuzzer_sys::fuzz_target;
use savedir::format::ram::{RamOptions, RamState};
use savedir::format::reader::Reader;

fuzz_target!(|input: &[u8]| {
    let Some((&flags, data)) = input.split_first() else { return };
    let options = RamOptions {
        page_size: if flags & 1 != 0 { 1024 } else { 4096 },
        mapped_ram: flags & 2 != 0,
        ignore_shared: flags & 4 != 0,
        postcopy: flags & 8 != 0,
    };
    let mut st = RamState::new(options);
    let mut r = Reader::new(data);
    for _ in 0..64 {
        if st.parse_payload(&mut r).is_err() || r.is_empty() {
            break;
        }
    }
});
