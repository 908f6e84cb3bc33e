//! Pause points for tests: make a kill or a truncation land at a known
//! point of an operation instead of guessing it with a sleep.
//!
//! Test-only. `SAVEDIR_TEST_PAUSE=POINT=FIFO[,POINT=FIFO...]` names the
//! points to stop at (read once per process; a FIFO path cannot contain `,`).
//! A point that concerns a file stops for every file, or, named
//! `POINT@NAME`, only for the file whose name (last path component) is NAME:
//! in a batch, one file among many.
//! At a named point the process opens FIFO for reading, which blocks until
//! the test opens it for writing: when the test's open returns, it knows the
//! process is at the point. The process then reads one byte, which blocks
//! until the test writes one (or closes the FIFO, or kills the process), and
//! goes on. Every call at a named point waits again. Without the variable a
//! call costs one branch. Errors (no such FIFO, ...) are ignored: the hook
//! never changes what the operation does, only when.

use std::sync::OnceLock;

static POINTS: OnceLock<Vec<(String, String)>> = OnceLock::new();

fn points() -> &'static [(String, String)] {
    POINTS.get_or_init(|| match std::env::var("SAVEDIR_TEST_PAUSE") {
        Ok(v) => v
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(p, f)| (p.trim().to_string(), f.to_string()))
            .collect(),
        Err(_) => Vec::new(),
    })
}

/// Waits at `point` if the test asked for it (see the module).
pub fn pause(point: &str) {
    let points = points();
    if points.is_empty() {
        return;
    }
    for (p, fifo) in points {
        if p == point {
            wait(fifo);
        }
    }
}

/// Waits at `point` for the file `path` if the test asked for it: for
/// `POINT` (every file) or `POINT@NAME` (this file's name).
pub fn pause_file(point: &str, path: &std::path::Path) {
    let points = points();
    if points.is_empty() {
        return;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for (p, fifo) in points {
        if p == point || p.strip_prefix(point).and_then(|rest| rest.strip_prefix('@')) == Some(name.as_str()) {
            wait(fifo);
        }
    }
}

fn wait(fifo: &str) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open(fifo) {
        let mut b = [0u8; 1];
        loop {
            match f.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
    }
}
