#![no_main]
//! The stream parser on arbitrary bytes: any outcome but a panic is fine.
use libfuzzer_sys::fuzz_target;
use savedir::format::stream::{parse, ParseOptions};

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, ParseOptions::new(0, data.len() as u64));
});
