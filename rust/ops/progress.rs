//! Progress bars on stderr for long work, when asked for (drawn by indicatif).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// How long a job runs before its bar first appears: short jobs stay quiet.
const DELAY: Duration = Duration::from_millis(200);
/// The shortest time between two redraws (at most five a second).
const INTERVAL: Duration = Duration::from_millis(200);

/// A progress bar for one file:
/// `vm.sav: indexing [=====>    ] 1.2 GiB/4.0 GiB 850 MiB/s ETA 3s`.
///
/// It draws to stderr, only when enabled, no sooner than 0.2 s after it was
/// made, at most five times a second, and is cleared by [`Progress::finish`]
/// (or when dropped). A disabled meter costs one branch per update. Updates
/// may come from several threads at once.
pub struct Progress {
    inner: Option<Inner>,
    /// Where [`Progress::set`] goes instead, inside a batch (see [`reporting_to`]).
    sink: Option<Sink>,
}

/// Receives the offset reached in the file at hand.
pub type Sink = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

thread_local! {
    static SINK: std::cell::RefCell<Option<Sink>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the progress of the work it does on this thread sent to
/// `sink` (the offset reached in the file at hand) instead of drawn by a bar
/// of its own: a batch draws one bar for all its files.
pub fn reporting_to<T>(sink: Sink, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Sink>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let old = self.0.take();
            SINK.with(|s| *s.borrow_mut() = old);
        }
    }
    let old = SINK.with(|s| s.borrow_mut().replace(sink));
    let _reset = Reset(old);
    f()
}

struct Inner {
    bar: ProgressBar,
    /// Where the bar draws once it is shown (stderr, or a test's terminal).
    target: Box<dyn Fn() -> ProgressDrawTarget + Send + Sync>,
    total: AtomicU64,
    done: AtomicU64,
    start: Instant,
    interval: Duration,
    /// Nanoseconds after `start` before which nothing is drawn.
    next: AtomicU64,
    shown: AtomicBool,
    finished: AtomicBool,
}

impl Progress {
    pub fn new(enabled: bool, label: impl Into<String>, total: u64) -> Self {
        if let Some(sink) = SINK.with(|s| s.borrow().clone()) {
            return Progress { inner: None, sink: Some(sink) };
        }
        if !enabled {
            return Progress::off();
        }
        Progress::with_target(label, total, DELAY, INTERVAL, || ProgressDrawTarget::stderr_with_hz(5))
    }

    /// An enabled meter that draws to what `target` makes, first after
    /// `delay`, then at most once per `interval`.
    pub fn with_target(
        label: impl Into<String>,
        total: u64,
        delay: Duration,
        interval: Duration,
        target: impl Fn() -> ProgressDrawTarget + Send + Sync + 'static,
    ) -> Self {
        // Hidden until the delay has passed: setting the style and message
        // would otherwise draw at once.
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
            .with_finish(ProgressFinish::AndClear)
            .with_message(label.into());
        bar.set_style(style(total));
        Progress {
            sink: None,
            inner: Some(Inner {
                bar,
                target: Box::new(target),
                total: AtomicU64::new(total),
                done: AtomicU64::new(0),
                start: Instant::now(),
                interval,
                next: AtomicU64::new(nanos(delay)),
                shown: AtomicBool::new(false),
                finished: AtomicBool::new(false),
            }),
        }
    }

    /// A meter that never prints.
    pub fn off() -> Self {
        Progress { inner: None, sink: None }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Starts a new phase of the work with its own total.
    pub fn phase(&self, total: u64) {
        if let Some(i) = &self.inner {
            let old = i.total.swap(total, Ordering::Relaxed);
            i.done.store(0, Ordering::Relaxed);
            if (old == 0) != (total == 0) {
                i.bar.set_style(style(total));
            }
            // Throughput and ETA are measured from here: the position goes
            // back to 0 now rather than at the next draw, which would show a
            // rate of 0 B/s. (One draw per phase, hidden until the bar shows.)
            if !i.finished.load(Ordering::Acquire) {
                i.bar.update(|s| {
                    s.set_len(total);
                    s.set_pos(0);
                });
            }
        }
    }

    /// Sets the amount done.
    pub fn set(&self, done: u64) {
        if let Some(s) = &self.sink {
            s(done);
        }
        if let Some(i) = &self.inner {
            i.done.store(done, Ordering::Relaxed);
            i.maybe_draw();
        }
    }

    /// Adds to the amount done.
    pub fn add(&self, n: u64) {
        if let Some(i) = &self.inner {
            i.done.fetch_add(n, Ordering::Relaxed);
            i.maybe_draw();
        }
    }

    /// Sets the total without starting a new phase (a total still growing).
    pub fn set_total(&self, total: u64) {
        if let Some(i) = &self.inner {
            let old = i.total.swap(total, Ordering::Relaxed);
            if (old == 0) != (total == 0) {
                i.bar.set_style(style(total));
            }
        }
    }

    /// Replaces the text before the bar.
    pub fn set_message(&self, message: String) {
        if let Some(i) = &self.inner {
            i.bar.set_message(message);
        }
    }

    /// Runs `f` with the bar out of the way: whatever `f` writes to the
    /// terminal appears above it.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.inner {
            Some(i) if i.shown.load(Ordering::Acquire) && !i.finished.load(Ordering::Acquire) => i.bar.suspend(f),
            _ => f(),
        }
    }

    /// Clears the bar, if one was drawn; later updates draw nothing.
    pub fn finish(&self) {
        if let Some(i) = &self.inner {
            if !i.finished.swap(true, Ordering::AcqRel) {
                i.bar.finish_and_clear();
            }
        }
    }

    /// The amount done so far (0 for a disabled meter).
    pub fn done(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.done.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn maybe_draw(&self) {
        let now = nanos(self.start.elapsed());
        let next = self.next.load(Ordering::Relaxed);
        if now < next {
            return;
        }
        // One thread draws; the others go on with their work.
        if self.next.compare_exchange(next, now + nanos(self.interval), Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return;
        }
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        if !self.shown.swap(true, Ordering::AcqRel) {
            self.bar.set_draw_target((self.target)());
        }
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        self.bar.update(|s| {
            s.set_len(total);
            s.set_pos(if total > 0 { done.min(total) } else { done });
        });
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A bar with bytes done and total, throughput and ETA; without a total
/// (a stream read from a pipe), bytes and throughput only.
fn style(total: u64) -> ProgressStyle {
    let template = if total == 0 {
        "{msg} {binary_bytes} ({binary_bytes_per_sec})"
    } else {
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, ETA {eta})"
    };
    ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::TermLike;
    use rayon::prelude::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// A terminal that records what is written to it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<Vec<String>>>);

    impl Screen {
        fn log(&self, s: impl Into<String>) -> io::Result<()> {
            self.0.lock().unwrap().push(s.into());
            Ok(())
        }
        fn text(&self) -> String {
            self.0.lock().unwrap().concat()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, n: usize) -> io::Result<()> {
            self.log(format!("<up {n}>"))
        }
        fn move_cursor_down(&self, n: usize) -> io::Result<()> {
            self.log(format!("<down {n}>"))
        }
        fn move_cursor_right(&self, n: usize) -> io::Result<()> {
            self.log(format!("<right {n}>"))
        }
        fn move_cursor_left(&self, n: usize) -> io::Result<()> {
            self.log(format!("<left {n}>"))
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            self.log(format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            self.log(s)
        }
        fn clear_line(&self) -> io::Result<()> {
            self.log("<clear>")
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn meter(screen: &Screen, delay: Duration, interval: Duration) -> Progress {
        let s = screen.clone();
        Progress::with_target("vm.sav: indexing", 4 << 30, delay, interval, move || {
            ProgressDrawTarget::term_like(Box::new(s.clone()))
        })
    }

    #[test]
    fn a_disabled_meter_prints_nothing_and_counts_nothing() {
        let p = Progress::new(false, "vm.sav: indexing", 100);
        assert!(!p.enabled());
        p.set(10);
        p.add(5);
        p.phase(7);
        p.add(1);
        p.finish();
        assert_eq!(p.done(), 0);
        assert!(p.inner.is_none());
        assert!(!Progress::off().enabled());
    }

    #[test]
    fn a_short_job_draws_nothing() {
        let screen = Screen::default();
        let p = meter(&screen, Duration::from_secs(60), Duration::ZERO);
        for i in 0..1000 {
            p.set(i << 20);
        }
        p.finish();
        drop(p);
        assert_eq!(screen.writes(), 0, "{:?}", screen.text());
    }

    #[test]
    fn a_long_job_shows_bytes_throughput_and_eta_then_clears() {
        let screen = Screen::default();
        let p = meter(&screen, Duration::ZERO, Duration::ZERO);
        p.set(1 << 30);
        std::thread::sleep(Duration::from_millis(20));
        p.set(2 << 30);
        let text = screen.text();
        assert!(text.contains("vm.sav: indexing ["), "{text:?}");
        assert!(text.contains("2.00 GiB/4.00 GiB"), "{text:?}");
        assert!(text.contains("/s, ETA "), "{text:?}");
        let before = screen.writes();
        p.finish();
        assert!(screen.writes() > before, "finish clears the line");
        // Nothing is drawn after finish.
        let after = screen.writes();
        p.add(1);
        drop(p);
        assert_eq!(screen.writes(), after);
    }

    #[test]
    fn redraws_are_rate_limited() {
        let screen = Screen::default();
        let p = meter(&screen, Duration::ZERO, Duration::from_secs(60));
        for i in 0..10_000 {
            p.add(i);
        }
        // One draw (the first); the next is a minute away.
        assert!(screen.text().matches("vm.sav: indexing").count() == 1, "{:?}", screen.text());
    }

    #[test]
    fn concurrent_adds_to_a_hidden_target_are_counted_and_do_not_panic() {
        let p = Progress::with_target("x", 0, Duration::ZERO, Duration::ZERO, ProgressDrawTarget::hidden);
        p.phase(64 * 10_000);
        (0..64u64).into_par_iter().for_each(|_| {
            for _ in 0..10_000 {
                p.add(1);
            }
        });
        assert_eq!(p.done(), 64 * 10_000);
        p.phase(0);
        (0..8u64).into_par_iter().for_each(|i| p.set(i));
        p.finish();
    }
}
