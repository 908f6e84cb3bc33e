//! `savedir._core`: the Python classes over [`crate::ops`]. This layer only
//! converts; all work runs with the GIL released.

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyMemoryView};

use crate::format::command_name;
use crate::ops::{self, Map};

mod errors;
use errors::to_pyerr;

/// A read-only, zero-copy view of bytes of a mapped file.
///
/// `memoryview(buf)` and `numpy.frombuffer(buf, dtype=numpy.uint8)` share the
/// mapping without copying; the mapping stays alive while any view exists.
#[pyclass(frozen, module = "savedir._core")]
pub struct Buffer {
    map: Arc<Map>,
    start: usize,
    len: usize,
}

#[pymethods]
impl Buffer {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        let bytes = &this.map.bytes()[this.start..this.start + this.len];
        // PyBuffer_FillInfo refuses writable requests for read-only data and
        // keeps a reference to `slf`, which keeps the mapping alive.
        let ptr =
            if bytes.is_empty() { std::ptr::NonNull::<u8>::dangling().as_ptr() } else { bytes.as_ptr() as *mut u8 };
        let rc =
            unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), bytes.len() as ffi::Py_ssize_t, 1, flags) };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<savedir buffer of {} bytes at offset {}>", self.len, self.start)
    }
}

fn buffer(py: Python<'_>, map: &Arc<Map>, start: u64, end: u64) -> PyResult<Py<Buffer>> {
    let len = map.len();
    if start > end || end > len {
        return Err(PyValueError::new_err(format!("range {start}..{end} is outside the file ({len} bytes)")));
    }
    Py::new(py, Buffer { map: map.clone(), start: start as usize, len: (end - start) as usize })
}

fn memoryview<'py>(py: Python<'py>, map: &Arc<Map>, start: u64, end: u64) -> PyResult<Bound<'py, PyMemoryView>> {
    let b = buffer(py, map, start, end)?;
    PyMemoryView::from(b.bind(py).as_any())
}

/// One top-level item of a stream (a directory entry).
#[pyclass(frozen, module = "savedir._core")]
pub struct Entry {
    e: ops::Entry,
    map: Arc<Map>,
}

#[pymethods]
impl Entry {
    #[getter]
    fn kind(&self) -> &'static str {
        self.e.kind.as_str()
    }
    #[getter]
    fn offset(&self) -> u64 {
        self.e.offset
    }
    #[getter]
    fn end(&self) -> u64 {
        self.e.end
    }
    #[getter]
    fn size(&self) -> u64 {
        self.e.size()
    }
    #[getter]
    fn payload_offset(&self) -> u64 {
        self.e.payload_start()
    }
    #[getter]
    fn payload_size(&self) -> u64 {
        self.e.payload_end() - self.e.payload_start()
    }
    #[getter]
    fn section_id(&self) -> Option<u32> {
        self.e.kind.is_section().then_some(self.e.section_id)
    }
    #[getter]
    fn name(&self) -> Option<&str> {
        self.e.name.as_deref()
    }
    #[getter]
    fn instance_id(&self) -> Option<u32> {
        self.e.kind.is_section().then_some(self.e.instance_id)
    }
    #[getter]
    fn version_id(&self) -> Option<u32> {
        self.e.kind.is_section().then_some(self.e.version_id)
    }
    #[getter]
    fn command(&self) -> Option<u16> {
        (self.e.kind == crate::format::Kind::Command).then_some(self.e.command)
    }
    #[getter]
    fn command_name(&self) -> Option<&'static str> {
        (self.e.kind == crate::format::Kind::Command).then(|| command_name(self.e.command))
    }
    #[getter]
    fn crc32c(&self) -> Option<u32> {
        self.e.crc32c
    }
    /// The whole extent (header, payload and footer) as a read-only memoryview.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        memoryview(py, &self.map, self.e.offset, self.e.end)
    }
    /// The payload only, between header and footer, as a read-only memoryview.
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        memoryview(py, &self.map, self.e.payload_start(), self.e.payload_end())
    }
}

/// An open save file.
#[pyclass(frozen, module = "savedir._core")]
pub struct SaveFile {
    f: Arc<ops::SaveFile>,
}

#[pymethods]
impl SaveFile {
    #[getter]
    fn path(&self) -> PathBuf {
        self.f.path.clone()
    }
    #[getter]
    fn indexed(&self) -> bool {
        self.f.indexed
    }
    #[getter]
    fn stream_start(&self) -> u64 {
        self.f.stream_start
    }
    #[getter]
    fn stream_end(&self) -> u64 {
        self.f.stream_end
    }
    #[getter]
    fn eof(&self) -> u64 {
        self.f.eof
    }
    #[getter]
    fn file_size(&self) -> u64 {
        self.f.map.len()
    }
    #[getter]
    fn footers(&self) -> bool {
        self.f.footers
    }
    #[getter]
    fn machine_type(&self) -> Option<&str> {
        self.f.machine_type.as_deref()
    }
    #[getter]
    fn directory_offset(&self) -> Option<u64> {
        self.f.trailer.map(|t| t.dir)
    }
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .f
            .entries
            .iter()
            .map(|e| Py::new(py, Entry { e: e.clone(), map: self.f.map.clone() }))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }
    /// Entries of one section: a FULL, or a START with its PARTs and END.
    #[pyo3(signature = (name, instance=None))]
    fn find<'py>(&self, py: Python<'py>, name: &str, instance: Option<u32>) -> PyResult<Bound<'py, PyList>> {
        let found = self.f.find(name, instance).map_err(|e| to_pyerr(py, e))?;
        let items = found
            .into_iter()
            .map(|e| Py::new(py, Entry { e: e.clone(), map: self.f.map.clone() }))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }
    /// The vmdesc JSON as a read-only memoryview, or None.
    fn vmdesc_json<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyMemoryView>>> {
        match self.f.vmdesc {
            Some(v) => Ok(Some(memoryview(py, &self.f.map, v.offset + 5, v.end())?)),
            None => Ok(None),
        }
    }
    /// Offset of the vmdesc's type byte, or None.
    fn vmdesc_offset(&self) -> Option<u64> {
        self.f.vmdesc.map(|v| v.offset)
    }
    /// Bytes `start..end` of the file as a read-only, zero-copy memoryview.
    fn view<'py>(&self, py: Python<'py>, start: u64, end: u64) -> PyResult<Bound<'py, PyMemoryView>> {
        memoryview(py, &self.f.map, start, end)
    }
    /// Runs checks 1–3 (and 4 with `deep`) on the mapping this object holds.
    #[pyo3(signature = (deep=false, progress=false))]
    fn verify<'py>(&self, py: Python<'py>, deep: bool, progress: bool) -> PyResult<Bound<'py, PyDict>> {
        let f = self.f.clone();
        let r = py.detach(move || {
            let meter = ops::Progress::new(progress && deep, format!("{}: verifying", f.path.display()), f.map.len());
            let r = ops::verify::verify_source(&f.path, &f.dir_source(), f.map.bytes(), f.stream_start, deep, &meter);
            f.map.check(&f.path, Ok(r))
        });
        verify_dict(py, &r.map_err(|e| to_pyerr(py, e))?)
    }
    /// The sidecar the directory was read from, or None.
    #[getter]
    fn sidecar(&self) -> Option<PathBuf> {
        self.f.sidecar.as_ref().map(|(p, _)| p.clone())
    }
    /// What wraps the stream: None, or a dict describing a libvirt header.
    fn container<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(h) = &self.f.located.libvirt else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("kind", "libvirt")?;
        d.set_item("version", h.version)?;
        d.set_item("format", h.format)?;
        d.set_item("was_running", h.was_running)?;
        d.set_item("domain_name", h.domain_name.as_deref())?;
        d.set_item("domain_uuid", h.domain_uuid.as_deref())?;
        Ok(Some(d))
    }
    /// True when the stream was found by scanning for its magic.
    #[getter]
    fn stream_found_by_scan(&self) -> bool {
        self.f.located.scanned
    }
}

fn verify_dict<'py>(py: Python<'py>, r: &ops::VerifyReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy())?;
    d.set_item("ok", r.ok)?;
    d.set_item("check", r.check.map(|c| c.as_str()))?;
    d.set_item("offset", r.offset)?;
    d.set_item("message", &r.message)?;
    d.set_item("entries", r.entries)?;
    d.set_item("deep", r.deep)?;
    Ok(d)
}

/// Opens a save file (through its directory, or by parsing the stream).
#[pyfunction]
#[pyo3(signature = (path, scan=false, progress=false, offset=None))]
fn open(py: Python<'_>, path: PathBuf, scan: bool, progress: bool, offset: Option<u64>) -> PyResult<SaveFile> {
    let opts = ops::OpenOptions { scan, progress, offset };
    let f = py.detach(|| ops::open(&path, &opts)).map_err(|e| to_pyerr(py, e))?;
    Ok(SaveFile { f: Arc::new(f) })
}

/// Appends a section directory.
#[pyfunction]
#[pyo3(signature = (path, force=false, checksums=true, progress=false, sidecar=false, offset=None))]
fn index<'py>(
    py: Python<'py>,
    path: PathBuf,
    force: bool,
    checksums: bool,
    progress: bool,
    sidecar: bool,
    offset: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = ops::IndexOptions { force, checksums, progress, sidecar, offset };
    let r = py.detach(|| ops::index(&path, &opts)).map_err(|e| to_pyerr(py, e))?;
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy())?;
    d.set_item("written", r.written)?;
    d.set_item("entries", r.entries)?;
    d.set_item("directory_offset", r.directory_offset)?;
    d.set_item("directory_size", r.directory_len)?;
    d.set_item("replaced", r.replaced)?;
    d.set_item("sidecar", r.sidecar.as_ref().map(|p| p.to_string_lossy().into_owned()))?;
    Ok(d)
}

/// Verifies a file's directory.
#[pyfunction]
#[pyo3(signature = (path, deep=false, progress=false, offset=None))]
fn verify<'py>(
    py: Python<'py>,
    path: PathBuf,
    deep: bool,
    progress: bool,
    offset: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let r = py.detach(|| ops::verify(&path, deep, progress, offset)).map_err(|e| to_pyerr(py, e))?;
    verify_dict(py, &r)
}

/// Truncates a file back to its stream's end.
#[pyfunction]
#[pyo3(signature = (path, force=false, offset=None))]
fn strip<'py>(py: Python<'py>, path: PathBuf, force: bool, offset: Option<u64>) -> PyResult<Bound<'py, PyDict>> {
    let opts = ops::StripOptions { force, offset };
    let r = py.detach(|| ops::strip(&path, &opts)).map_err(|e| to_pyerr(py, e))?;
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy())?;
    d.set_item("removed", r.removed)?;
    d.set_item("stream_end", r.stream_end)?;
    d.set_item("sidecar", r.sidecar.as_ref().map(|p| p.to_string_lossy().into_owned()))?;
    Ok(d)
}

fn record_dict<'py>(py: Python<'py>, r: &ops::RecordReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy())?;
    d.set_item("stream_size", r.stream_size)?;
    d.set_item("entries", r.entries)?;
    d.set_item("directory_offset", r.directory_offset)?;
    d.set_item("directory_size", r.directory_len)?;
    d.set_item("reread", r.reread)?;
    d.set_item("sidecar", r.sidecar.as_ref().map(|p| p.to_string_lossy().into_owned()))?;
    Ok(d)
}

/// Writes a stream to a file as it arrives and appends its directory at the end.
#[pyclass(frozen, module = "savedir._core")]
pub struct Recorder {
    inner: std::sync::Mutex<Option<ops::Recorder>>,
    path: PathBuf,
}

impl Recorder {
    fn closed(&self) -> PyErr {
        PyValueError::new_err(format!("{}: the recorder is closed", self.path.display()))
    }
}

#[pymethods]
impl Recorder {
    #[new]
    #[pyo3(signature = (path, checksums=true, sidecar=false))]
    fn new(py: Python<'_>, path: PathBuf, checksums: bool, sidecar: bool) -> PyResult<Self> {
        let opts = ops::RecordOptions { checksums, progress: false, sidecar };
        let rec = py.detach(|| ops::Recorder::create(&path, opts)).map_err(|e| to_pyerr(py, e))?;
        Ok(Recorder { inner: std::sync::Mutex::new(Some(rec)), path })
    }

    /// Writes bytes (any object with the buffer protocol); returns their number.
    fn write(&self, py: Python<'_>, data: pyo3::buffer::PyBuffer<u8>) -> PyResult<usize> {
        let bytes = data.to_vec(py)?;
        let mut guard = self.inner.lock().map_err(|_| PyValueError::new_err("recorder lock poisoned"))?;
        let rec = guard.as_mut().ok_or_else(|| self.closed())?;
        py.detach(|| rec.write(&bytes)).map_err(|e| to_pyerr(py, e))?;
        Ok(bytes.len())
    }

    /// Bytes received so far.
    #[getter]
    fn received(&self) -> PyResult<u64> {
        let guard = self.inner.lock().map_err(|_| PyValueError::new_err("recorder lock poisoned"))?;
        Ok(guard.as_ref().map_or(0, |r| r.received()))
    }

    /// Ends the stream: appends the directory, or raises if the stream is
    /// incomplete or malformed (the file keeps every byte received).
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let rec = {
            let mut guard = self.inner.lock().map_err(|_| PyValueError::new_err("recorder lock poisoned"))?;
            guard.take().ok_or_else(|| self.closed())?
        };
        let r = py.detach(move || rec.finish()).map_err(|e| to_pyerr(py, e))?;
        record_dict(py, &r)
    }

    /// Stops without a directory: the file keeps the bytes received.
    fn abort(&self) -> PyResult<()> {
        let mut guard = self.inner.lock().map_err(|_| PyValueError::new_err("recorder lock poisoned"))?;
        guard.take();
        Ok(())
    }
}

/// Records the stream on standard input into `path` (the CLI's `record`).
#[pyfunction]
#[pyo3(signature = (path, checksums=true, progress=false, sidecar=false))]
fn record_stdin<'py>(
    py: Python<'py>,
    path: PathBuf,
    checksums: bool,
    progress: bool,
    sidecar: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = ops::RecordOptions { checksums, progress, sidecar };
    let r = py.detach(|| ops::record_stdin(&path, opts)).map_err(|e| to_pyerr(py, e))?;
    record_dict(py, &r)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Buffer>()?;
    m.add_class::<Entry>()?;
    m.add_class::<SaveFile>()?;
    m.add_class::<Recorder>()?;
    m.add_function(wrap_pyfunction!(record_stdin, m)?)?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(index, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(strip, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
