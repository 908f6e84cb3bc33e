#![no_main]
//! Directory checks 1-3 on arbitrary files: errors are fine, panics are not.
use libfuzzer_sys::fuzz_target;
use savedir::format::directory::{check_trailer, cross_check, decode, View};

fuzz_target!(|data: &[u8]| {
    let v = View::appended(data);
    if let Ok(t) = check_trailer(&v) {
        if let Ok(d) = decode(&v, t, 0) {
            let _ = cross_check(&v, &d, 0);
            let _ = d.extents();
        }
    }
});
