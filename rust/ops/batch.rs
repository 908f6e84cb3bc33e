//! Many files at once: `index`, `verify` or open each file of a list of
//! files and folders, on a pool of threads made for the batch, one result per
//! file as it finishes.
//!
//! Memory stays bounded whatever the number of files: folders are walked as
//! the work goes (one open folder per level), at most a few results per
//! worker wait for the consumer, and in order (`ordered`) a worker does not
//! start a file more than [`ORDER_WINDOW`] files ahead of the oldest one not
//! yet handed out. One bad file never stops the batch: its error is its
//! result. The pool's threads exist only while the batch runs (see
//! `pool.rs`), and one progress bar on stderr covers the whole batch.

use std::collections::BTreeMap;
use std::fs::ReadDir;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::index::{index, IndexOptions, IndexReport};
use super::open::{open, OpenOptions, SaveFile};
use super::progress::{reporting_to, Progress};
use super::verify::{verify, VerifyReport};

/// In order, how far ahead of the oldest file not yet handed out a worker
/// may start one.
pub const ORDER_WINDOW: u64 = 256;
/// The same for files opened (`Job::Open`), each of which holds two file
/// descriptors until it is closed.
pub const OPEN_ORDER_WINDOW: u64 = 64;

thread_local! {
    /// The batch the thread works for, whose stop a scan looks at.
    static STOP: std::cell::RefCell<Option<Arc<Shared>>> = const { std::cell::RefCell::new(None) };
}

/// True when the batch this thread works for was stopped: a scan in
/// progress gives up (see [`Batch::close`]).
pub fn stopping() -> bool {
    STOP.with(|s| s.borrow().as_ref().is_some_and(|b| b.cancelled.load(Ordering::Relaxed)))
}

/// What to do with each file.
#[derive(Clone, Debug)]
pub enum Job {
    Index(IndexOptions),
    Verify { deep: bool, offset: Option<u64>, wait: bool, vmdesc: Option<Arc<crate::format::vmdesc::Vmdesc>> },
    Open(OpenOptions),
}

/// What was done to one file.
#[derive(Debug)]
pub enum Done {
    Index(IndexReport),
    Verify(VerifyReport),
    Open(Box<SaveFile>),
}

impl Done {
    /// True when the file is fine: indexed, valid, or open.
    pub fn ok(&self) -> bool {
        match self {
            Done::Verify(r) => r.ok,
            _ => true,
        }
    }

    /// Entries of the file's directory (or items found by a scan).
    pub fn entries(&self) -> usize {
        match self {
            Done::Index(r) => r.entries,
            Done::Verify(r) => r.entries,
            Done::Open(f) => f.entries.len(),
        }
    }
}

/// One file's result.
#[derive(Debug)]
pub struct FileResult {
    /// Where the file comes in the walk of the paths given, from 0.
    pub seq: u64,
    pub path: PathBuf,
    pub result: Result<Done>,
    /// The file's size.
    pub bytes: u64,
    pub seconds: f64,
}

impl FileResult {
    pub fn ok(&self) -> bool {
        self.result.as_ref().is_ok_and(Done::ok)
    }
}

#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Threads: files done at once (at least 1).
    pub jobs: usize,
    /// Walk into the subfolders of folders.
    pub recursive: bool,
    /// Draw one progress bar on stderr for the batch.
    pub progress: bool,
    /// Hand out the results in the order of the walk (else as they finish).
    pub ordered: bool,
    /// The bar's label, e.g. "savedir index".
    pub label: String,
}

/// What is found walking the paths given.
enum Walked {
    File(PathBuf),
    /// A folder that cannot be read.
    Failed(PathBuf, std::io::Error),
}

/// Walks files and folders as the work goes: a folder's regular files (and
/// symbolic links to files), in the order the folder lists them; with
/// `recursive` its subfolders too (not through symbolic links). Sidecar
/// directories (`FILE.savedir`, and temporary ones) belong to their file and
/// are not visited; nor are FIFOs, sockets and devices found in a folder.
/// A path given that is not a folder is visited as it is.
struct Walker {
    roots: std::vec::IntoIter<PathBuf>,
    /// The folders being read, with their device and inode numbers.
    stack: Vec<(PathBuf, ReadDir, (u64, u64))>,
    recursive: bool,
}

fn is_sidecar(p: &Path) -> bool {
    let name = p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    name.ends_with(".savedir") || name.contains(".savedir.tmp")
}

impl Walker {
    fn new(roots: Vec<PathBuf>, recursive: bool) -> Self {
        Walker { roots: roots.into_iter(), stack: Vec::new(), recursive }
    }

    fn enter(&mut self, dir: PathBuf) -> Option<Walked> {
        use std::os::unix::fs::MetadataExt;
        let id = match std::fs::metadata(&dir) {
            Ok(md) => (md.dev(), md.ino()),
            Err(e) => return Some(Walked::Failed(dir, e)),
        };
        // A folder inside itself (a bind mount of one of its parents).
        if self.stack.iter().any(|(_, _, d)| *d == id) {
            let e = std::io::Error::other("the folder is inside itself (a bind mount of a folder above it)");
            return Some(Walked::Failed(dir, e));
        }
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                self.stack.push((dir, rd, id));
                None
            }
            Err(e) => Some(Walked::Failed(dir, e)),
        }
    }
}

impl Iterator for Walker {
    type Item = Walked;

    fn next(&mut self) -> Option<Walked> {
        loop {
            if let Some((dir, rd, _)) = self.stack.last_mut() {
                let entry = match rd.next() {
                    None => {
                        self.stack.pop();
                        continue;
                    }
                    Some(Err(e)) => {
                        let dir = dir.clone();
                        self.stack.pop();
                        return Some(Walked::Failed(dir, e));
                    }
                    Some(Ok(e)) => e,
                };
                let p = entry.path();
                let Ok(ft) = entry.file_type() else {
                    return Some(Walked::File(p));
                };
                if ft.is_dir() {
                    if self.recursive {
                        if let Some(failed) = self.enter(p) {
                            return Some(failed);
                        }
                    }
                    continue;
                }
                if ft.is_symlink() {
                    match std::fs::metadata(&p) {
                        Ok(md) if !md.is_file() => continue,
                        // A link to a file, or one that leads nowhere (its
                        // result says so).
                        _ => return Some(Walked::File(p)),
                    }
                }
                if ft.is_file() && !is_sidecar(&p) {
                    return Some(Walked::File(p));
                }
                continue;
            }
            let root = self.roots.next()?;
            if std::fs::metadata(&root).is_ok_and(|md| md.is_dir()) {
                if let Some(failed) = self.enter(root) {
                    return Some(failed);
                }
                continue;
            }
            return Some(Walked::File(root));
        }
    }
}

/// The walk, shared by the workers.
struct Queue {
    walker: Walker,
    next_seq: u64,
}

/// Makes [`stopping`] look at one batch while a file of it is done.
struct StopGuard(Option<Arc<Shared>>);

impl StopGuard {
    fn set(batch: Arc<Shared>) -> Self {
        StopGuard(STOP.with(|s| s.borrow_mut().replace(batch)))
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let old = self.0.take();
        STOP.with(|s| *s.borrow_mut() = old);
    }
}

/// One bar for the batch: bytes of the files done and in progress against
/// the bytes of every file (counted by a walk of its own), files done and
/// failed.
struct Tally {
    bar: Progress,
    label: String,
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    counted: AtomicBool,
    done: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
}

impl Tally {
    fn message(&self) {
        if !self.bar.enabled() {
            return;
        }
        let (done, failed) = (self.done.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        let total = self.total_files.load(Ordering::Relaxed);
        let more = if self.counted.load(Ordering::Relaxed) { "" } else { "+" };
        let failed = if failed > 0 { format!(", {failed} failed") } else { String::new() };
        self.bar.set_message(format!("{}: {done}/{total}{more} files{failed}", self.label));
    }

    fn add(&self, n: u64) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.bar.set(now);
    }
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when `emitted` grows (or the batch is cancelled).
    moved: Condvar,
    /// Results handed out, in order.
    emitted: AtomicU64,
    cancelled: AtomicBool,
    job: Job,
    ordered: bool,
    /// How far ahead of the oldest file not handed out a file may start.
    window: u64,
    meter: Tally,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next file to do, and its place in the walk.
    fn take(&self) -> Option<(u64, Walked)> {
        let mut q = self.queue();
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return None;
            }
            if self.ordered && q.next_seq - self.emitted.load(Ordering::Acquire) >= self.window {
                q = self.moved.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let item = q.walker.next()?;
            let seq = q.next_seq;
            q.next_seq += 1;
            return Some((seq, item));
        }
    }

    fn run(self: &Arc<Self>, seq: u64, item: Walked) -> FileResult {
        let t0 = Instant::now();
        let (path, result, bytes) = match item {
            Walked::Failed(path, e) => {
                let err = Error::io(&path, "read the folder", e);
                (path, Err(err), 0)
            }
            Walked::File(path) => {
                let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                let reached = Arc::new(AtomicU64::new(0));
                let r = {
                    let (reached, shared) = (reached.clone(), self.clone());
                    let sink: super::progress::Sink = Arc::new(move |at: u64| {
                        let before = reached.fetch_max(at, Ordering::Relaxed);
                        if at > before {
                            shared.meter.add(at - before);
                        }
                    });
                    let _stop = StopGuard::set(self.clone());
                    reporting_to(sink, || self.one(&path))
                };
                let seen = reached.load(Ordering::Relaxed);
                self.meter.add(bytes.saturating_sub(seen));
                (path, r, bytes)
            }
        };
        let res = FileResult { seq, path, result, bytes, seconds: t0.elapsed().as_secs_f64() };
        self.meter.done.fetch_add(1, Ordering::Relaxed);
        if !res.ok() {
            self.meter.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.meter.message();
        res
    }

    fn one(&self, path: &Path) -> Result<Done> {
        match &self.job {
            Job::Index(o) => index(path, o).map(Done::Index),
            Job::Verify { deep, offset, wait, vmdesc } => {
                verify(path, *deep, false, *offset, *wait, vmdesc.as_deref()).map(Done::Verify)
            }
            Job::Open(o) => open(path, o).map(|f| Done::Open(Box::new(f))),
        }
    }
}

/// The progress bar of a batch, at hand while the batch itself is busy.
#[derive(Clone)]
pub struct Meter(Arc<Shared>);

impl Meter {
    /// Runs `f` (that writes to the terminal) with the bar out of its way.
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        self.0.meter.bar.suspend(f)
    }
}

/// What [`Batch::next_within`] found.
pub enum Next {
    Result(FileResult),
    /// Every result was handed out.
    End,
    /// None yet.
    Pending,
}

/// A running batch: its results, one per file.
pub struct Batch {
    shared: Arc<Shared>,
    rx: Option<Receiver<FileResult>>,
    coordinator: Option<std::thread::JoinHandle<()>>,
    /// Results that came before their turn (in order).
    early: BTreeMap<u64, FileResult>,
    /// One file, or one job: done on the thread that asks for the results,
    /// one at a time, with pools at most this wide inside a file.
    inline: Option<usize>,
}

impl Batch {
    /// Starts doing `job` to every file of `paths` (files and folders).
    pub fn start(paths: Vec<PathBuf>, job: Job, opts: BatchOptions) -> Batch {
        let jobs = opts.jobs.max(1);
        let recursive = opts.recursive;
        let single = paths.len() == 1 && !std::fs::metadata(&paths[0]).is_ok_and(|m| m.is_dir());
        let inline = jobs == 1 || single;
        let bar = Progress::new(opts.progress, opts.label.clone(), 0);
        let window = if matches!(job, Job::Open(_)) { OPEN_ORDER_WINDOW } else { ORDER_WINDOW };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { walker: Walker::new(paths.clone(), opts.recursive), next_seq: 0 }),
            moved: Condvar::new(),
            emitted: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            job,
            // Done one at a time, the files come in order anyway.
            ordered: opts.ordered && !inline,
            window,
            meter: Tally {
                bar,
                label: opts.label,
                total_files: AtomicU64::new(0),
                total_bytes: AtomicU64::new(0),
                counted: AtomicBool::new(false),
                done: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            },
        });
        if inline {
            // No thread to start (but one to count the files for the bar).
            let counter = shared.meter.bar.enabled().then(|| {
                let s = shared.clone();
                std::thread::spawn(move || count(&s, paths, recursive))
            });
            return Batch { shared, rx: None, coordinator: counter, early: BTreeMap::new(), inline: Some(jobs) };
        }
        let (tx, rx) = sync_channel::<FileResult>(2 * jobs);
        let s = shared.clone();
        let coordinator = std::thread::Builder::new().name("savedir-batch".into()).spawn(move || {
            let counter = s.meter.bar.enabled().then(|| {
                let s = s.clone();
                std::thread::spawn(move || count(&s, paths, recursive))
            });
            super::pool::with_threads(jobs, || {
                rayon::scope(|scope| {
                    for _ in 0..jobs {
                        let (s, tx) = (s.clone(), tx.clone());
                        scope.spawn(move |_| worker(&s, tx));
                    }
                })
            });
            drop(tx);
            s.cancelled.store(true, Ordering::Release);
            if let Some(c) = counter {
                let _ = c.join();
            }
        });
        match coordinator {
            Ok(h) => Batch { shared, rx: Some(rx), coordinator: Some(h), early: BTreeMap::new(), inline: None },
            // No thread for the batch: its files are done one at a time here.
            Err(_) => Batch { shared, rx: None, coordinator: None, early: BTreeMap::new(), inline: Some(1) },
        }
    }

    /// The next result (in order, or as they finish); None at the end.
    /// Blocks until one is there.
    pub fn next_result(&mut self) -> Option<FileResult> {
        match self.next_within(None) {
            Next::Result(r) => Some(r),
            _ => None,
        }
    }

    /// The next result, waiting at most `wait` (None: as long as it takes).
    pub fn next_within(&mut self, wait: Option<Duration>) -> Next {
        let n = self.receive(wait);
        if matches!(n, Next::End) {
            self.shared.meter.bar.finish();
        }
        n
    }

    fn receive(&mut self, wait: Option<Duration>) -> Next {
        if let Some(width) = self.inline {
            return match self.shared.take() {
                Some((seq, item)) => Next::Result(super::pool::limit(width, || self.shared.run(seq, item))),
                None => Next::End,
            };
        }
        let Some(rx) = self.rx.as_ref() else { return Next::End };
        let recv = |rx: &Receiver<FileResult>| match wait {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d),
        };
        if !self.shared.ordered {
            return match recv(rx) {
                Ok(r) => Next::Result(r),
                Err(RecvTimeoutError::Timeout) => Next::Pending,
                Err(RecvTimeoutError::Disconnected) => Next::End,
            };
        }
        let want = self.shared.emitted.load(Ordering::Acquire);
        loop {
            if let Some(r) = self.early.remove(&want) {
                self.handed_out(want + 1);
                return Next::Result(r);
            }
            let Some(rx) = self.rx.as_ref() else { return Next::End };
            match recv(rx) {
                Ok(r) => {
                    self.early.insert(r.seq, r);
                }
                Err(RecvTimeoutError::Timeout) => return Next::Pending,
                // Every worker is done: what is left comes in order.
                Err(RecvTimeoutError::Disconnected) => {
                    let Some((&seq, _)) = self.early.iter().next() else { return Next::End };
                    let Some(r) = self.early.remove(&seq) else { return Next::End };
                    self.handed_out(seq + 1);
                    return Next::Result(r);
                }
            }
        }
    }

    fn handed_out(&self, n: u64) {
        let _q = self.shared.queue();
        self.shared.emitted.store(n, Ordering::Release);
        self.shared.moved.notify_all();
    }

    /// The batch's progress bar.
    pub fn meter(&self) -> Meter {
        Meter(self.shared.clone())
    }

    /// Stops the batch: no new file is started, and a scan in progress stops
    /// (an `index` then writes nothing); the batch's threads are gone when
    /// this returns.
    pub fn close(&mut self) {
        self.cancel();
        if let Some(h) = self.coordinator.take() {
            let _ = h.join();
        }
    }

    fn cancel(&mut self) {
        {
            let _q = self.shared.queue();
            self.shared.cancelled.store(true, Ordering::Release);
            self.shared.moved.notify_all();
        }
        // Workers waiting to hand over a result see it refused.
        self.rx = None;
        self.early.clear();
        self.shared.meter.bar.finish();
    }
}

impl Iterator for Batch {
    type Item = FileResult;
    fn next(&mut self) -> Option<FileResult> {
        self.next_result()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Without waiting: the workers finish the files they are at and go.
        self.cancel();
    }
}

fn worker(shared: &Arc<Shared>, tx: SyncSender<FileResult>) {
    while let Some((seq, item)) = shared.take() {
        let r = shared.run(seq, item);
        if tx.send(r).is_err() {
            return;
        }
    }
}

/// Counts the files and bytes of the batch for its bar, walking the paths
/// again, without keeping what it finds.
fn count(shared: &Shared, paths: Vec<PathBuf>, recursive: bool) {
    let m = &shared.meter;
    for (n, item) in Walker::new(paths, recursive).enumerate() {
        if shared.cancelled.load(Ordering::Acquire) {
            return;
        }
        if let Walked::File(p) = item {
            let len = std::fs::metadata(&p).map_or(0, |md| md.len());
            m.total_files.fetch_add(1, Ordering::Relaxed);
            let total = m.total_bytes.fetch_add(len, Ordering::Relaxed) + len;
            if n % 64 == 0 {
                m.bar.set_total(total);
                m.message();
            }
        } else {
            m.total_files.fetch_add(1, Ordering::Relaxed);
        }
    }
    m.counted.store(true, Ordering::Relaxed);
    m.bar.set_total(m.total_bytes.load(Ordering::Relaxed));
    m.message();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::stream::tests::sample_stream;

    fn tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("savedir-batch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        let s = sample_stream(true);
        for (i, p) in ["a.sav", "b.sav", "sub/c.sav", "sub/deeper/d.sav"].iter().enumerate() {
            let mut data = s.clone();
            if i == 1 {
                data.truncate(data.len() / 2);
            }
            std::fs::write(d.join(p), data).unwrap();
        }
        std::fs::write(d.join("notes.txt"), b"not a save").unwrap();
        std::fs::write(d.join("gone.sav.savedir"), b"a sidecar is not visited").unwrap();
        d
    }

    fn opts(jobs: usize, recursive: bool, ordered: bool) -> BatchOptions {
        BatchOptions { jobs, recursive, progress: false, ordered, label: "test".into() }
    }

    #[test]
    fn one_result_per_file_in_order_or_as_they_finish() {
        let d = tree("walk");
        let names = |rs: &[FileResult]| {
            rs.iter().map(|r| r.path.strip_prefix(&d).unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        let flat: Vec<FileResult> =
            Batch::start(vec![d.clone()], Job::Index(IndexOptions::default()), opts(2, false, true)).collect();
        let mut got = names(&flat);
        got.sort();
        assert_eq!(got, ["a.sav", "b.sav", "notes.txt"]);
        assert_eq!(flat.iter().filter(|r| r.ok()).count(), 1, "a.sav only");
        let deep: Vec<FileResult> = Batch::start(
            vec![d.join("missing.sav"), d.clone()],
            Job::Verify { deep: true, offset: None, wait: false, vmdesc: None },
            opts(3, true, true),
        )
        .collect();
        assert_eq!(deep.iter().map(|r| r.seq).collect::<Vec<_>>(), (0..6).collect::<Vec<_>>());
        assert!(matches!(&deep[0].result, Err(Error::Io { .. })), "{:?}", deep[0].result);
        let mut got = names(&deep[1..]);
        got.sort();
        assert_eq!(got, ["a.sav", "b.sav", "notes.txt", "sub/c.sav", "sub/deeper/d.sav"]);
        for r in &deep[1..] {
            let name = r.path.file_name().unwrap().to_string_lossy();
            match name.as_ref() {
                // Indexed by the first batch.
                "a.sav" => assert!(r.ok(), "{:?}", r.result),
                // Cut short, not a save, never indexed: verify says so.
                _ => assert!(!r.ok() && r.result.is_ok(), "{name}: {:?}", r.result),
            }
        }
        let unordered: Vec<FileResult> =
            Batch::start(vec![d.clone()], Job::Open(OpenOptions::default()), opts(2, true, false)).collect();
        assert_eq!(unordered.len(), 5);
        let mut seqs: Vec<u64> = unordered.iter().map(|r| r.seq).collect();
        seqs.sort();
        assert_eq!(seqs, (0..5).collect::<Vec<_>>());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_job_runs_on_the_calling_thread_in_order() {
        let d = tree("inline");
        let paths: Vec<PathBuf> = (0..(ORDER_WINDOW + 50)).map(|_| d.join("a.sav")).collect();
        let got: Vec<u64> =
            Batch::start(paths, Job::Open(OpenOptions::default()), opts(1, false, true)).map(|r| r.seq).collect();
        assert_eq!(got, (0..ORDER_WINDOW + 50).collect::<Vec<_>>());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_folder_inside_itself_is_an_error_not_a_loop() {
        let d = tree("loop");
        // A bind mount needs root; a tree that meets itself again is what
        // the walker sees of one, and the check is on device and inode.
        let mut w = Walker::new(vec![d.clone()], true);
        let (dev_ino, first) = {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(&d).unwrap();
            ((md.dev(), md.ino()), w.next())
        };
        assert!(first.is_some());
        assert!(w.stack.iter().any(|(_, _, id)| *id == dev_ino));
        match w.enter(d.clone()) {
            Some(Walked::Failed(p, e)) => assert!(p == d && e.to_string().contains("inside itself"), "{e}"),
            _ => panic!("entered a folder already being read"),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_batch_dropped_early_stops() {
        let d = tree("drop");
        let paths: Vec<PathBuf> = (0..2000).map(|_| d.join("a.sav")).collect();
        let mut b = Batch::start(paths, Job::Open(OpenOptions::default()), opts(2, false, true));
        let first = b.next().unwrap();
        assert!(first.ok(), "{:?}", first.result);
        b.close();
        assert!(b.next().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
