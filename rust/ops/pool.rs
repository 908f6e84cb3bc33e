//! Thread pools made for one call, never rayon's global pool.
//!
//! A pool's threads live only while the call that made it runs. So a process
//! that `fork`s afterwards (Python's `multiprocessing` with its default start
//! method on Linux, `concurrent.futures.ProcessPoolExecutor`) is single
//! threaded again by then, and its child never waits on workers that do not
//! exist there, as it would on a global pool made before the fork.

/// Work on fewer bytes than this runs on the calling thread alone.
pub const PARALLEL_MIN: u64 = 64 << 20;

/// True on a thread of one of savedir's pools, where work may be split.
pub fn in_pool() -> bool {
    rayon::current_thread_index().is_some()
}

/// Threads the machine offers this process (its CPU affinity, cgroup quota).
pub fn available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `f` on a pool of `threads` threads made for it (the calling thread
/// waits), and joins them before returning. Where threads cannot be made,
/// `f` runs on the calling thread.
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    let mut slot = Some(f);
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("savedir-{i}"))
        .build_scoped(|t| t.run(), |pool| pool.install(|| slot.take().map(|f| f())));
    match built {
        Ok(Some(v)) => v,
        // The pool could not be made: `f` was not run.
        _ => match slot.take() {
            Some(f) => f(),
            None => unreachable!("the pool ran the work but returned nothing"),
        },
    }
}

thread_local! {
    static WIDTH: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the pools that [`run`] makes in it at most `threads` wide
/// (1: none, all work on the calling thread).
pub fn limit<T>(threads: usize, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<usize>);
    impl Drop for Reset {
        fn drop(&mut self) {
            WIDTH.with(|w| w.set(self.0));
        }
    }
    let _reset = Reset(WIDTH.with(|w| w.replace(Some(threads))));
    f()
}

/// Runs `f`, work on `size` bytes: on a pool as wide as the machine (or as
/// [`limit`] allows) when the work is large enough to be split, else on the
/// calling thread.
pub fn run<T: Send>(size: u64, f: impl FnOnce() -> T + Send) -> T {
    let n = WIDTH.with(|w| w.get()).unwrap_or_else(available).min(available());
    if size < PARALLEL_MIN || n < 2 || in_pool() {
        return f();
    }
    with_threads(n, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_inside_a_pool_that_is_gone_afterwards() {
        assert!(!in_pool());
        let (inside, width) = with_threads(3, || (in_pool(), rayon::current_num_threads()));
        assert!(inside);
        assert_eq!(width, 3);
        assert!(!in_pool());
        assert!(!run(10, in_pool), "small work stays on the calling thread");
        assert!(!limit(1, || run(PARALLEL_MIN, in_pool)), "a limit of 1 makes no pool");
    }
}
