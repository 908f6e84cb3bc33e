//! `savedir._core.Batch`: many files at once ([`crate::ops::batch`]), one
//! result per file as Python iterates.
//!
//! Locking: the running batch (`inner`) is held across GIL releases (waiting
//! for the next result runs without the GIL), so it is only ever taken
//! inside `py.detach`; the progress bar (`meter`) is reached without it.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::ops::batch::{self, BatchOptions, Done, FileResult, Job, Next};

/// How often a wait for the next result looks at Python's signals.
const SIGNAL_CHECK: std::time::Duration = std::time::Duration::from_millis(100);
use crate::ops::{self, IndexOptions, OpenOptions};

use super::errors::to_pyerr;
use super::{load_hint, lossy, IndexResult, VerifyResult};

/// A file that a batch opened, waiting to become a `SaveFile`
/// (`SaveFile(opened)` takes it).
#[pyclass(frozen, module = "savedir._core")]
pub struct Opened {
    f: Mutex<Option<ops::SaveFile>>,
}

impl Opened {
    /// The file, once (the lock is never held across a GIL release).
    pub fn take(&self) -> Option<ops::SaveFile> {
        self.f.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// One file's result in a batch.
#[pyclass(frozen, module = "savedir._core")]
pub struct BatchResult {
    #[pyo3(get)]
    path: String,
    /// True when the file is fine: indexed (or already), valid, or open.
    #[pyo3(get)]
    ok: bool,
    /// The exception the file raised, or None.
    #[pyo3(get)]
    error: Option<Py<PyAny>>,
    /// Entries of its directory (0 when it has none that was read).
    #[pyo3(get)]
    entries: usize,
    /// The file's size.
    #[pyo3(get)]
    bytes: u64,
    /// Seconds the file took.
    #[pyo3(get)]
    seconds: f64,
    /// What the operation returned: an `IndexResult` or `VerifyResult`.
    #[pyo3(get)]
    result: Option<Py<PyAny>>,
    /// The open `SaveFile` (`open_many`), or None.
    #[pyo3(get)]
    file: Option<Py<PyAny>>,
}

#[pymethods]
impl BatchResult {
    /// `path`, `ok`, `error` (its message, or None), `entries`, `bytes`, `seconds`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("path", &self.path)?;
        d.set_item("ok", self.ok)?;
        let error = match &self.error {
            Some(e) => Some(e.bind(py).str()?.to_string()),
            None => None,
        };
        d.set_item("error", error)?;
        d.set_item("entries", self.entries)?;
        d.set_item("bytes", self.bytes)?;
        d.set_item("seconds", self.seconds)?;
        Ok(d)
    }
    fn __bool__(&self) -> bool {
        self.ok
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let error = match &self.error {
            Some(e) => e.bind(py).repr()?.to_string(),
            None => "None".into(),
        };
        Ok(format!(
            "BatchResult(path={:?}, ok={}, error={error}, entries={}, bytes={}, seconds={:.3})",
            self.path,
            if self.ok { "True" } else { "False" },
            self.entries,
            self.bytes,
            self.seconds
        ))
    }
}

/// A batch at work: an iterator of `BatchResult`, one per file.
#[pyclass(frozen, module = "savedir._core")]
pub struct Batch {
    inner: Mutex<Option<batch::Batch>>,
    meter: batch::Meter,
    /// The class of the files an `open_many` hands out.
    file_class: Option<Py<PyAny>>,
    /// The process that started the batch: its threads exist only there.
    pid: u32,
}

impl Batch {
    fn start(paths: Vec<PathBuf>, job: Job, opts: BatchOptions, file_class: Option<Py<PyAny>>) -> Self {
        let b = batch::Batch::start(paths, job, opts);
        let meter = b.meter();
        Batch { inner: Mutex::new(Some(b)), meter, file_class, pid: std::process::id() }
    }

    fn convert(&self, py: Python<'_>, r: FileResult) -> PyResult<BatchResult> {
        let ok = r.ok();
        let path = lossy(&r.path);
        let (entries, error, result, file) = match r.result {
            Err(e) => (0, Some(to_pyerr(py, e).into_value(py).into_any()), None, None),
            Ok(done) => {
                let entries = done.entries();
                match done {
                    Done::Index(r) => (entries, None, Some(Py::new(py, IndexResult::from(r))?.into_any()), None),
                    Done::Verify(r) => (entries, None, Some(Py::new(py, VerifyResult::from(r))?.into_any()), None),
                    Done::Open(f) => {
                        let opened = Py::new(py, Opened { f: Mutex::new(Some(*f)) })?;
                        let file = match &self.file_class {
                            Some(cls) => cls.call1(py, (opened,))?,
                            None => opened.into_any(),
                        };
                        (entries, None, None, Some(file))
                    }
                }
            }
        };
        Ok(BatchResult { path, ok, error, entries, bytes: r.bytes, seconds: r.seconds, result, file })
    }

    fn check_process(&self) -> PyResult<()> {
        if std::process::id() != self.pid {
            return Err(PyRuntimeError::new_err(
                "this batch was started by the parent process; its threads do not exist after fork (start a new one)",
            ));
        }
        Ok(())
    }
}

#[pymethods]
impl Batch {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<BatchResult>> {
        self.check_process()?;
        loop {
            let next = py.detach(|| {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let Some(b) = g.as_mut() else { return Next::End };
                let n = b.next_within(Some(SIGNAL_CHECK));
                if matches!(n, Next::End) {
                    if let Some(mut b) = g.take() {
                        b.close();
                    }
                }
                n
            });
            match next {
                Next::Result(r) => return self.convert(py, r).map(Some),
                Next::End => return Ok(None),
                // Ctrl-C (or any signal handler that raises) stops the wait.
                Next::Pending => py.check_signals()?,
            }
        }
    }

    /// Stops the batch: no new file is started; returns once the files in
    /// progress are done and the batch's threads are gone.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if std::process::id() != self.pid {
            return Ok(());
        }
        py.detach(|| {
            let b = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(mut b) = b {
                b.close();
            }
        });
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    /// Calls `f()` with the progress bar out of the way, so that what it
    /// prints to the terminal appears above the bar; returns what `f` does.
    fn suspend(&self, py: Python<'_>, f: Py<PyAny>) -> PyResult<Py<PyAny>> {
        self.meter.suspend(|| f.call0(py))
    }
}

fn job_options(
    jobs: Option<usize>,
    recursive: bool,
    ordered: bool,
    progress: bool,
    label: &str,
) -> PyResult<BatchOptions> {
    let jobs = match jobs {
        Some(0) => return Err(PyValueError::new_err("jobs must be at least 1")),
        Some(n) => n,
        None => ops::pool::available(),
    };
    Ok(BatchOptions { jobs, recursive, progress, ordered, label: label.into() })
}

/// Indexes many files and folders at once (see `savedir.index_many`).
#[pyfunction]
#[pyo3(signature = (paths, *, jobs=None, recursive=false, ordered=false, progress=false, force=false, checksums=true, sidecar=false, offset=None, wait=false, vmdesc=None, ram_map=true))]
#[allow(clippy::too_many_arguments)]
pub fn index_many(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    jobs: Option<usize>,
    recursive: bool,
    ordered: bool,
    progress: bool,
    force: bool,
    checksums: bool,
    sidecar: bool,
    offset: Option<u64>,
    wait: bool,
    vmdesc: Option<PathBuf>,
    ram_map: bool,
) -> PyResult<Batch> {
    let vmdesc = load_hint(py, vmdesc)?;
    let opts = job_options(jobs, recursive, ordered, progress, "indexing")?;
    let job = Job::Index(IndexOptions { force, checksums, progress: false, sidecar, offset, wait, vmdesc, ram_map });
    Ok(Batch::start(paths, job, opts, None))
}

/// Verifies many files and folders at once (see `savedir.verify_many`).
#[pyfunction]
#[pyo3(signature = (paths, *, jobs=None, recursive=false, ordered=false, progress=false, deep=false, offset=None, wait=false, vmdesc=None))]
#[allow(clippy::too_many_arguments)]
pub fn verify_many(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    jobs: Option<usize>,
    recursive: bool,
    ordered: bool,
    progress: bool,
    deep: bool,
    offset: Option<u64>,
    wait: bool,
    vmdesc: Option<PathBuf>,
) -> PyResult<Batch> {
    let vmdesc = load_hint(py, vmdesc)?;
    let opts = job_options(jobs, recursive, ordered, progress, "verifying")?;
    Ok(Batch::start(paths, Job::Verify { deep, offset, wait, vmdesc }, opts, None))
}

/// Opens many files and folders at once (see `savedir.open_many`).
#[pyfunction]
#[pyo3(signature = (paths, file_class=None, *, jobs=None, recursive=false, ordered=false, progress=false, scan=false, offset=None, mmap=true, wait=false, vmdesc=None))]
#[allow(clippy::too_many_arguments)]
pub fn open_many(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    file_class: Option<Py<PyAny>>,
    jobs: Option<usize>,
    recursive: bool,
    ordered: bool,
    progress: bool,
    scan: bool,
    offset: Option<u64>,
    mmap: bool,
    wait: bool,
    vmdesc: Option<PathBuf>,
) -> PyResult<Batch> {
    let vmdesc = load_hint(py, vmdesc)?;
    let opts = job_options(jobs, recursive, ordered, progress, "reading")?;
    let job = Job::Open(OpenOptions { scan, progress: false, offset, mmap, wait, vmdesc });
    Ok(Batch::start(paths, job, opts, file_class))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Batch>()?;
    m.add_class::<BatchResult>()?;
    m.add_class::<Opened>()?;
    m.add_function(wrap_pyfunction!(index_many, m)?)?;
    m.add_function(wrap_pyfunction!(verify_many, m)?)?;
    m.add_function(wrap_pyfunction!(open_many, m)?)?;
    Ok(())
}
