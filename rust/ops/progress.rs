//! Progress lines on stderr for long work, when asked for.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A progress meter for one file: `label: 1.2 GiB of 4.0 GiB (30%)`.
///
/// It prints at most five times a second, to stderr, and only when enabled;
/// a disabled meter costs one branch per update.
pub struct Progress {
    enabled: bool,
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    last: Mutex<Option<Instant>>,
    printed: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn new(enabled: bool, label: impl Into<String>, total: u64) -> Self {
        Progress {
            enabled,
            label: label.into(),
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            last: Mutex::new(None),
            printed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A meter that never prints.
    pub fn off() -> Self {
        Progress::new(false, "", 0)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Starts a new phase of the work with its own total.
    pub fn phase(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    /// Sets the amount done.
    pub fn set(&self, done: u64) {
        if self.enabled {
            self.done.store(done, Ordering::Relaxed);
            self.maybe_print();
        }
    }

    /// Adds to the amount done.
    pub fn add(&self, n: u64) {
        if self.enabled {
            self.done.fetch_add(n, Ordering::Relaxed);
            self.maybe_print();
        }
    }

    fn maybe_print(&self) {
        let now = Instant::now();
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        match *last {
            None => {
                // Stay quiet for short jobs.
                *last = Some(now);
                return;
            }
            Some(t) if now.duration_since(t) < Duration::from_millis(200) => return,
            _ => {}
        }
        *last = Some(now);
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let mut err = std::io::stderr().lock();
        if total == 0 {
            let _ = write!(err, "\r{}: {}\x1b[K", self.label, human(done));
        } else {
            let pct = (done as f64 / total as f64 * 100.0).min(100.0);
            let _ = write!(err, "\r{}: {} of {} ({pct:.0}%)\x1b[K", self.label, human(done), human(total));
        }
        let _ = err.flush();
        self.printed.store(true, Ordering::Relaxed);
    }

    /// Clears the progress line, if one was printed.
    pub fn finish(&self) {
        if self.enabled && self.printed.load(Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `1536` -> `1.5 KiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
