#![no_main]
//! The resumable parser fed in small windows must agree with one whole
//! window: same items, or an error in both.
use libfuzzer_sys::fuzz_target;
use savedir::format::stream::{Progress, Stream, StreamParser};

fn run(data: &[u8], chunk: usize) -> Result<Stream, savedir::FormatError> {
    let mut p = StreamParser::new(0, None);
    let mut have = 0;
    loop {
        have = (have + chunk).min(data.len());
        let last = have == data.len();
        let base = p.keep_from() as usize;
        match p.advance(&data[base..have], base as u64, last, None)? {
            Progress::Done => return Ok(p.finish()),
            Progress::NeedMore => assert!(!last, "a last window asked for more"),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, data)) = input.split_first() else { return };
    let chunk = (chunk as usize % 64) + 1;
    let whole = run(data, data.len().max(1));
    let streamed = run(data, chunk);
    match (whole, streamed) {
        (Ok(w), Ok(s)) => assert_eq!(w.items, s.items),
        (Err(_), Err(_)) => {}
        (w, s) => panic!("whole {:?} but streamed {:?}", w.map(|s| s.items.len()), s.map(|s| s.items.len())),
    }
});
