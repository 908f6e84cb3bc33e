//! `savedir._core`: the Python classes over [`crate::ops`]. This layer only
//! converts; all work runs with the GIL released.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView};

use crate::format::source::{read_vec, Cached, ReadAt};
use crate::format::{command_name, Kind};
use crate::ops::{self, Map};

mod batch;
mod errors;
mod layout;
mod ram;
use errors::to_pyerr;
mod state;

/// What keeps a mapped file alive while views of it exist: the base object
/// of the read-only NumPy arrays behind savedir's zero-copy views.
///
/// The stable ABI of CPython 3.9 and 3.10 (which the one abi3 wheel
/// targets) has no buffer protocol for extension types, so a view is a
/// NumPy array made read-only from birth over the mapped bytes, whose base
/// is this object; `memoryview(array)` is what Python code receives. Both
/// keep the array, hence this object and the mapping, alive.
#[pyclass(frozen, module = "savedir._core")]
pub struct Buffer {
    /// Held, never read: the mapping lives as long as this does.
    _map: Arc<Map>,
    start: usize,
    len: usize,
}

#[pymethods]
impl Buffer {
    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<savedir buffer of {} bytes at offset {}>", self.len, self.start)
    }
}

/// Bytes `start..end` of a mapping as a read-only NumPy array (no copy).
fn array<'py>(py: Python<'py>, map: &Arc<Map>, start: u64, end: u64) -> PyResult<Bound<'py, PyAny>> {
    use numpy::npyffi::{self, NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS, PY_ARRAY_API};
    use numpy::{Element, PyArrayDescrMethods};
    let size = map.len();
    if start > end || end > size {
        return Err(PyValueError::new_err(format!("range {start}..{end} is outside the file ({size} bytes)")));
    }
    let (start, len) = (start as usize, (end - start) as usize);
    let owner = Bound::new(py, Buffer { _map: map.clone(), start, len })?;
    let bytes = &map.bytes()[start..start + len];
    let ptr = if bytes.is_empty() { std::ptr::NonNull::<u8>::dangling().as_ptr() } else { bytes.as_ptr() as *mut u8 };
    let mut dims = [len as npyffi::npy_intp];
    // SAFETY: a one-dimensional array of `len` bytes over memory that stays
    // mapped while `owner` lives; without NPY_ARRAY_WRITEABLE it is read-only
    // from birth (numpy refuses writes and writable buffer requests), and
    // PyArray_SetBaseObject makes the array own `owner` (it steals the
    // reference, even on failure).
    unsafe {
        let arr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            u8::get_dtype(py).into_dtype_ptr(),
            1,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            ptr.cast(),
            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED,
            std::ptr::null_mut(),
        );
        if arr.is_null() {
            return Err(PyErr::fetch(py));
        }
        let arr = Bound::from_owned_ptr(py, arr);
        if PY_ARRAY_API.PyArray_SetBaseObject(py, arr.as_ptr().cast(), owner.into_any().into_ptr()) != 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(arr)
    }
}

/// Bytes `start..end` of a mapping as a read-only memoryview (no copy).
fn memoryview<'py>(py: Python<'py>, map: &Arc<Map>, start: u64, end: u64) -> PyResult<Bound<'py, PyMemoryView>> {
    PyMemoryView::from(&array(py, map, start, end)?)
}

/// Where the bytes of an open file come from, as the Python objects that
/// outlive the `SaveFile` (entries, views) need them: the mapping for
/// zero-copy views, else the source to read from.
#[derive(Clone)]
struct Owner {
    path: PathBuf,
    map: Option<Arc<Map>>,
    source: Arc<dyn ReadAt>,
}

impl Owner {
    fn of(f: &ops::SaveFile) -> Self {
        Owner { path: f.path.clone(), map: f.map().cloned(), source: f.source.clone() }
    }

    /// Bytes `start..end` as a read-only memoryview: zero-copy into the
    /// mapping, else read (without the GIL) into a new bytes object.
    fn view<'py>(&self, py: Python<'py>, start: u64, end: u64) -> PyResult<Bound<'py, PyMemoryView>> {
        if let Some(map) = &self.map {
            if let Some(message) = map.changed() {
                return Err(to_pyerr(py, ops::Error::Changed { path: self.path.clone(), message }));
            }
            return memoryview(py, map, start, end);
        }
        let size = self.source.size();
        if start > end || end > size {
            return Err(PyValueError::new_err(format!("range {start}..{end} is outside the file ({size} bytes)")));
        }
        let src = self.source.clone();
        let data = py
            .detach(move || read_vec(&*src, start, end - start))
            .map_err(|e| to_pyerr(py, ops::Error::source(&self.path, e)))?;
        PyMemoryView::from(PyBytes::new(py, &data).as_any())
    }
}

/// One top-level item of a stream (a directory entry).
#[pyclass(frozen, module = "savedir._core")]
pub struct Entry {
    e: ops::Entry,
    bytes: Owner,
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
        (self.e.kind == Kind::Command).then_some(self.e.command)
    }
    #[getter]
    fn command_name(&self) -> Option<&'static str> {
        (self.e.kind == Kind::Command).then(|| command_name(self.e.command))
    }
    #[getter]
    fn crc32c(&self) -> Option<u32> {
        self.e.crc32c
    }
    /// The whole extent (header, payload and footer) as a read-only memoryview.
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        self.bytes.view(py, self.e.offset, self.e.end)
    }
    /// The payload only, between header and footer, as a read-only memoryview.
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyMemoryView>> {
        self.bytes.view(py, self.e.payload_start(), self.e.payload_end())
    }
    /// The entry as `savedir ls --json` prints it.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("kind", self.kind())?;
        d.set_item("offset", self.e.offset)?;
        d.set_item("size", self.e.size())?;
        if self.e.kind.is_section() {
            d.set_item("section_id", self.e.section_id)?;
            d.set_item("name", self.name())?;
            d.set_item("instance_id", self.e.instance_id)?;
            d.set_item("version_id", self.e.version_id)?;
        }
        if self.e.kind == Kind::Command {
            d.set_item("command", self.e.command)?;
            d.set_item("command_name", command_name(self.e.command))?;
        }
        if let Some(c) = self.e.crc32c {
            d.set_item("crc32c", c)?;
        }
        Ok(d)
    }
    fn __repr__(&self) -> String {
        format!("<savedir.Entry {} at offset {} ({} bytes)>", self.e.header.describe(), self.e.offset, self.e.size())
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.e == other.e
    }
}

/// A byte source over a Python binary file object (`seek` and `read`):
/// `io.BytesIO`, an open file, an fsspec file. Each read takes the GIL in
/// the thread that reads; the object's position is guarded by a lock that
/// is only ever taken while the GIL is not held (every read runs detached),
/// so no thread that holds the GIL waits on it.
struct PySource {
    obj: Py<PyAny>,
    size: u64,
    pos: std::sync::Mutex<()>,
}

impl PySource {
    fn new(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let size: u64 = obj.call_method1("seek", (0, 2))?.extract()?;
        Ok(PySource { obj: obj.clone().unbind(), size, pos: std::sync::Mutex::new(()) })
    }
}

impl ReadAt for PySource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let _g = self.pos.lock().unwrap_or_else(|e| e.into_inner());
        Python::attach(|py| -> PyResult<std::io::Result<()>> {
            let obj = self.obj.bind(py);
            obj.call_method1("seek", (at,))?;
            let mut got = 0;
            while got < buf.len() {
                let chunk = obj.call_method1("read", (buf.len() - got,))?;
                let chunk = chunk.cast_into::<PyBytes>().map_err(PyErr::from)?;
                let b = chunk.as_bytes();
                if b.is_empty() {
                    return Ok(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file object ended early",
                    )));
                }
                let n = b.len().min(buf.len() - got);
                buf[got..got + n].copy_from_slice(&b[..n]);
                got += n;
            }
            Ok(Ok(()))
        })
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("the file object's read failed: {e}"))))
    }

    fn request_gap(&self) -> u64 {
        1 << 20
    }
}

/// The name of a file object for messages: its `name`, else its type.
fn object_name(obj: &Bound<'_, PyAny>) -> PathBuf {
    if let Ok(n) = obj.getattr("name").and_then(|n| n.str().map(|s| s.to_string())) {
        return PathBuf::from(n);
    }
    let t = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "file object".into());
    PathBuf::from(format!("<{t}>"))
}

/// An open save file.
#[pyclass(frozen, subclass, module = "savedir._core")]
pub struct SaveFile {
    f: std::sync::Mutex<Option<Arc<ops::SaveFile>>>,
}

impl SaveFile {
    /// The open file; the lock is held only for the clone, never across a
    /// GIL release.
    fn get(&self) -> PyResult<Arc<ops::SaveFile>> {
        let g = self.f.lock().unwrap_or_else(|e| e.into_inner());
        g.clone().ok_or_else(|| PyValueError::new_err("I/O operation on a closed save file"))
    }
}

#[pymethods]
impl SaveFile {
    #[new]
    #[pyo3(signature = (source, *, scan=false, progress=false, offset=None, mmap=true, wait=false, vmdesc=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        source: &Bound<'_, PyAny>,
        scan: bool,
        progress: bool,
        offset: Option<u64>,
        mmap: bool,
        wait: bool,
        vmdesc: Option<PathBuf>,
    ) -> PyResult<Self> {
        if let Ok(opened) = source.cast::<batch::Opened>() {
            let f = opened.get().take().ok_or_else(|| PyValueError::new_err("this file was taken already"))?;
            return Ok(SaveFile { f: std::sync::Mutex::new(Some(Arc::new(f))) });
        }
        let vmdesc = load_hint(py, vmdesc)?;
        let opts = ops::OpenOptions { scan, progress, offset, mmap, wait, vmdesc };
        let f = if source.hasattr("read")? && source.hasattr("seek")? {
            let name = object_name(source);
            let src: Arc<dyn ReadAt> = Arc::new(Cached::new(PySource::new(source)?));
            py.detach(|| ops::open::open_source(&name, src, ops::open::Backing::Other, None, &opts))
        } else {
            let path: PathBuf = source.extract()?;
            py.detach(|| ops::open(&path, &opts))
        }
        .map_err(|e| to_pyerr(py, e))?;
        Ok(SaveFile { f: std::sync::Mutex::new(Some(Arc::new(f))) })
    }

    /// Releases the file: its reader's lock and this object's hold on the
    /// bytes. Entries and views handed out stay readable.
    fn close(&self) {
        let f = self.f.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(f);
    }
    #[getter]
    fn closed(&self) -> bool {
        self.f.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }
    #[getter]
    fn path(&self) -> PyResult<String> {
        Ok(self.get()?.path.to_string_lossy().into_owned())
    }
    #[getter]
    fn indexed(&self) -> PyResult<bool> {
        Ok(self.get()?.indexed)
    }
    #[getter]
    fn stream_start(&self) -> PyResult<u64> {
        Ok(self.get()?.stream_start)
    }
    #[getter]
    fn stream_end(&self) -> PyResult<u64> {
        Ok(self.get()?.stream_end)
    }
    #[getter]
    fn eof(&self) -> PyResult<u64> {
        Ok(self.get()?.eof)
    }
    #[getter]
    fn file_size(&self) -> PyResult<u64> {
        Ok(self.get()?.source.size())
    }
    #[getter]
    fn footers(&self) -> PyResult<bool> {
        Ok(self.get()?.footers)
    }
    #[getter]
    fn machine_type(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.machine_type.clone())
    }
    #[getter]
    fn directory_offset(&self) -> PyResult<Option<u64>> {
        Ok(self.get()?.trailer.map(|t| t.dir))
    }
    /// True when the file is read through a memory map (zero-copy views).
    #[getter]
    fn mapped(&self) -> PyResult<bool> {
        Ok(self.get()?.map().is_some())
    }
    /// None while the file is as it was opened; else what changed (views
    /// handed out before a truncation read zeros past the new end).
    #[getter]
    fn changed(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.changed())
    }
    #[getter]
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let f = self.get()?;
        let bytes = Owner::of(&f);
        let items = f
            .entries
            .iter()
            .map(|e| Py::new(py, Entry { e: e.clone(), bytes: bytes.clone() }))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }
    /// Entries of one section: a FULL, or a START with its PARTs and END.
    #[pyo3(signature = (name, instance=None))]
    fn find<'py>(&self, py: Python<'py>, name: &str, instance: Option<u32>) -> PyResult<Bound<'py, PyList>> {
        let f = self.get()?;
        let bytes = Owner::of(&f);
        let found = f.find(name, instance).map_err(|e| to_pyerr(py, e))?;
        let items = found
            .into_iter()
            .map(|e| Py::new(py, Entry { e: e.clone(), bytes: bytes.clone() }))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }
    /// The vmdesc JSON bytes as QEMU wrote them (read-only), or None.
    #[getter]
    fn vmdesc_json<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyMemoryView>>> {
        let f = self.get()?;
        match f.vmdesc {
            Some(v) => Ok(Some(Owner::of(&f).view(py, v.offset + 5, v.end())?)),
            None => Ok(None),
        }
    }
    /// Offset of the vmdesc's type byte, or None.
    #[getter]
    fn vmdesc_offset(&self) -> PyResult<Option<u64>> {
        Ok(self.get()?.vmdesc.map(|v| v.offset))
    }
    /// Bytes `start..end` of the file as a read-only memoryview (zero-copy
    /// when the file is mapped).
    fn view<'py>(&self, py: Python<'py>, start: u64, end: u64) -> PyResult<Bound<'py, PyMemoryView>> {
        Owner::of(&*self.get()?).view(py, start, end)
    }
    /// Verifies the directory of this open file (see `savedir.verify`).
    #[pyo3(signature = (*, deep=false, progress=false))]
    fn verify(&self, py: Python<'_>, deep: bool, progress: bool) -> PyResult<VerifyResult> {
        let f = self.get()?;
        let r = py.detach(move || ops::verify::verify_open(&f, deep, progress)).map_err(|e| to_pyerr(py, e))?;
        Ok(VerifyResult::from(r))
    }
    /// The sidecar the directory was read from, or None.
    #[getter]
    fn sidecar(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.sidecar.as_ref().map(|(p, _)| p.to_string_lossy().into_owned()))
    }
    /// What wraps the stream: None, or a dict describing a libvirt header.
    #[getter]
    fn container<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let f = self.get()?;
        let Some(h) = &f.located.libvirt else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("kind", "libvirt")?;
        d.set_item("version", h.version)?;
        d.set_item("format", h.format)?;
        d.set_item("was_running", h.was_running)?;
        d.set_item("domain_name", h.domain_name.as_deref())?;
        d.set_item("domain_uuid", h.domain_uuid.as_deref())?;
        Ok(Some(d))
    }
    /// The save's guest memory (walks the RAM records when the directory
    /// stores no page map).
    fn ram_map(&self, py: Python<'_>) -> PyResult<ram::RamMap> {
        ram::ram_map(py, self)
    }

    /// `(notes, e_machine)` of an ELF core of this save's vCPUs, as QEMU's
    /// `dump-guest-memory` writes them (no notes when the vCPUs cannot be read).
    fn core_notes<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, u16)> {
        let f = self.get()?;
        let (notes, machine) = py.detach(|| ops::dump::core_notes(&f));
        Ok((PyBytes::new(py, &notes), machine))
    }

    /// Where `ram`'s blocks lie in guest-physical memory: `(ranges,
    /// unmapped)`, see `savedir.ram.Ram.ranges`.
    #[pyo3(signature = (ram, *, below_4g=None, above_4g_start=None, ram_block=None))]
    #[allow(clippy::type_complexity)]
    fn ram_layout(
        &self,
        py: Python<'_>,
        ram: &ram::RamMap,
        below_4g: Option<u64>,
        above_4g_start: Option<u64>,
        ram_block: Option<String>,
    ) -> PyResult<(Vec<(u64, u64, usize, u64)>, Vec<(String, String)>)> {
        ram::ram_layout(py, self, ram, below_4g, above_4g_start, ram_block)
    }

    /// True when the stream was found by scanning for its magic.
    #[getter]
    fn stream_found_by_scan(&self) -> PyResult<bool> {
        Ok(self.get()?.located.scanned)
    }
}

fn lossy(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Declares a frozen result class: its fields (read-only attributes),
/// equality, `to_dict()` with every field, and a `repr` like a dataclass's.
macro_rules! result_class {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident: $ty:ty),* $(,)? } $($extra:item)*) => {
        $(#[$doc])*
        #[pyclass(frozen, eq, module = "savedir._core")]
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fdoc])* #[pyo3(get)] $field: $ty,)*
        }

        #[pymethods]
        impl $name {
            /// Every field, by name.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = PyDict::new(py);
                $(d.set_item(stringify!($field), self.$field.clone())?;)*
                Ok(d)
            }
            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                let mut parts: Vec<String> = Vec::new();
                $(parts.push(format!("{}={}", stringify!($field), self.$field.clone().into_pyobject(py)?.repr()?));)*
                Ok(format!("{}({})", stringify!($name), parts.join(", ")))
            }
            $($extra)*
        }
    };
}

result_class! {
    /// What `index` did to one file.
    IndexResult {
        path: String,
        /// False when the file already had a valid directory and was left as it was.
        written: bool,
        entries: usize,
        /// Where the directory starts: the stream's end.
        directory_offset: u64,
        directory_size: u64,
        /// Bytes after the stream that `force=True` replaced.
        replaced: u64,
        /// The sidecar directory (`FILE.savedir`) written or found, if any.
        sidecar: Option<String>,
        /// Bytes of the RAM page map stored before the directory (0: none).
        ram_map_size: u64,
    }
}

result_class! {
    /// The outcome of `verify` for one file. `check` names the first check
    /// that failed ("trailer", "directory", "cross-check" or "deep"),
    /// `offset` where; a result is true when the file is valid.
    VerifyResult {
        path: String,
        ok: bool,
        check: Option<&'static str>,
        offset: Option<u64>,
        message: String,
        entries: usize,
        deep: bool,
    }
    fn __bool__(&self) -> bool {
        self.ok
    }
}

result_class! {
    /// What `strip` did to one file.
    StripResult {
        path: String,
        /// Bytes removed; 0 when the file already ended with the stream.
        removed: u64,
        stream_end: u64,
        /// The sidecar directory that was deleted, if any.
        sidecar: Option<String>,
    }
}

result_class! {
    /// What a finished recording wrote.
    RecordResult {
        path: String,
        stream_size: u64,
        entries: usize,
        directory_offset: u64,
        directory_size: u64,
        /// True when device sections had to be re-read from the file: a
        /// footer's bytes inside device data fooled the one-pass parse (rare).
        reread: bool,
        /// The sidecar directory written, if any.
        sidecar: Option<String>,
    }
}

impl From<ops::VerifyReport> for VerifyResult {
    fn from(r: ops::VerifyReport) -> Self {
        VerifyResult {
            path: lossy(&r.path),
            ok: r.ok,
            check: r.check.map(|c| c.as_str()),
            offset: r.offset,
            message: r.message,
            entries: r.entries,
            deep: r.deep,
        }
    }
}

impl From<ops::RecordReport> for RecordResult {
    fn from(r: ops::RecordReport) -> Self {
        RecordResult {
            path: lossy(&r.path),
            stream_size: r.stream_size,
            entries: r.entries,
            directory_offset: r.directory_offset,
            directory_size: r.directory_len,
            reread: r.reread,
            sidecar: r.sidecar.as_deref().map(lossy),
        }
    }
}

/// Reads the vmdesc given by path (a JSON file, or a save that has one).
fn load_hint(py: Python<'_>, path: Option<PathBuf>) -> PyResult<Option<Arc<crate::format::vmdesc::Vmdesc>>> {
    match path {
        None => Ok(None),
        Some(p) => py.detach(|| ops::open::load_vmdesc(&p)).map(|v| Some(Arc::new(v))).map_err(|e| to_pyerr(py, e)),
    }
}

/// Appends a section directory.
#[pyfunction]
#[pyo3(signature = (path, *, force=false, checksums=true, progress=false, sidecar=false, offset=None, wait=false, vmdesc=None, ram_map=true))]
#[allow(clippy::too_many_arguments)]
fn index(
    py: Python<'_>,
    path: PathBuf,
    force: bool,
    checksums: bool,
    progress: bool,
    sidecar: bool,
    offset: Option<u64>,
    wait: bool,
    vmdesc: Option<PathBuf>,
    ram_map: bool,
) -> PyResult<IndexResult> {
    let vmdesc = load_hint(py, vmdesc)?;
    let opts = ops::IndexOptions { force, checksums, progress, sidecar, offset, wait, vmdesc, ram_map };
    let r = py.detach(|| ops::index(&path, &opts)).map_err(|e| to_pyerr(py, e))?;
    Ok(IndexResult::from(r))
}

impl From<ops::IndexReport> for IndexResult {
    fn from(r: ops::IndexReport) -> Self {
        IndexResult {
            path: lossy(&r.path),
            written: r.written,
            entries: r.entries,
            directory_offset: r.directory_offset,
            directory_size: r.directory_len,
            replaced: r.replaced,
            sidecar: r.sidecar.as_deref().map(lossy),
            ram_map_size: r.ram_map_len,
        }
    }
}

/// Verifies a file's directory.
#[pyfunction]
#[pyo3(signature = (path, *, deep=false, progress=false, offset=None, wait=false, vmdesc=None))]
fn verify(
    py: Python<'_>,
    path: PathBuf,
    deep: bool,
    progress: bool,
    offset: Option<u64>,
    wait: bool,
    vmdesc: Option<PathBuf>,
) -> PyResult<VerifyResult> {
    let hint = load_hint(py, vmdesc)?;
    let r =
        py.detach(|| ops::verify(&path, deep, progress, offset, wait, hint.as_deref())).map_err(|e| to_pyerr(py, e))?;
    Ok(VerifyResult::from(r))
}

/// Truncates a file back to its stream's end.
#[pyfunction]
#[pyo3(signature = (path, *, force=false, offset=None, wait=false, vmdesc=None))]
fn strip(
    py: Python<'_>,
    path: PathBuf,
    force: bool,
    offset: Option<u64>,
    wait: bool,
    vmdesc: Option<PathBuf>,
) -> PyResult<StripResult> {
    let vmdesc = load_hint(py, vmdesc)?;
    let opts = ops::StripOptions { force, offset, wait, vmdesc };
    let r = py.detach(|| ops::strip(&path, &opts)).map_err(|e| to_pyerr(py, e))?;
    Ok(StripResult {
        path: lossy(&r.path),
        removed: r.removed,
        stream_end: r.stream_end,
        sidecar: r.sidecar.as_deref().map(lossy),
    })
}

/// Writes a stream to a file as it arrives and appends its directory at the end.
///
/// Locking: `inner` is held across GIL releases (a write runs without the
/// GIL), so a thread holding the GIL must never wait for it, or the writer,
/// needing the GIL back while it still holds `inner`, and that thread wait
/// for each other. `inner` is therefore taken only inside `py.detach`, and
/// `received` is an atomic read without it.
#[pyclass(frozen, module = "savedir._core")]
pub struct Recorder {
    inner: std::sync::Mutex<Option<ops::Recorder>>,
    /// Bytes received so far; 0 once finished or aborted (as before).
    received: std::sync::atomic::AtomicU64,
    path: PathBuf,
}

impl Recorder {
    fn closed(&self) -> PyErr {
        PyValueError::new_err(format!("{}: the recorder is closed", self.path.display()))
    }

    /// Runs `f` on the recorder without the GIL, under `inner`.
    fn with_inner<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Option<ops::Recorder>) -> PyResult<ops::Result<T>> + Send,
    ) -> PyResult<T> {
        let r = py.detach(|| {
            let mut guard = self.inner.lock().map_err(|_| PyValueError::new_err("recorder lock poisoned"))?;
            f(&mut guard)
        })?;
        r.map_err(|e| to_pyerr(py, e))
    }
}

#[pymethods]
impl Recorder {
    #[new]
    #[pyo3(signature = (path, *, checksums=true, sidecar=false, wait=false, ram_map=true))]
    fn new(py: Python<'_>, path: PathBuf, checksums: bool, sidecar: bool, wait: bool, ram_map: bool) -> PyResult<Self> {
        let opts = ops::RecordOptions { checksums, progress: false, sidecar, wait, ram_map };
        let rec = py.detach(|| ops::Recorder::create(&path, opts)).map_err(|e| to_pyerr(py, e))?;
        Ok(Recorder { inner: std::sync::Mutex::new(Some(rec)), received: std::sync::atomic::AtomicU64::new(0), path })
    }

    /// Writes bytes (any object with the buffer protocol); returns their number.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        // Copied with the GIL held: the buffer's owner may change it without.
        // (`bytes(data)` for any bytes-like object: the stable ABI of 3.9
        // has no buffer protocol for Rust to read one directly.)
        let bytes: Vec<u8> = match data.cast::<PyBytes>() {
            Ok(b) => b.as_bytes().to_vec(),
            Err(_) => py.get_type::<PyBytes>().call1((data,))?.cast_into::<PyBytes>()?.as_bytes().to_vec(),
        };
        self.with_inner(py, |inner| {
            let rec = inner.as_mut().ok_or_else(|| self.closed())?;
            let r = rec.write(&bytes);
            self.received.store(rec.received(), std::sync::atomic::Ordering::SeqCst);
            Ok(r)
        })?;
        Ok(bytes.len())
    }

    /// Bytes received so far.
    #[getter]
    fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends the stream: appends the directory, or raises if the stream is
    /// incomplete or malformed (the file keeps every byte received).
    fn finish(&self, py: Python<'_>) -> PyResult<RecordResult> {
        let r = self.with_inner(py, |inner| {
            let rec = inner.take().ok_or_else(|| self.closed())?;
            self.received.store(0, std::sync::atomic::Ordering::SeqCst);
            Ok(rec.finish())
        })?;
        Ok(RecordResult::from(r))
    }

    /// Stops without a directory: the file keeps the bytes received.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        self.with_inner(py, |inner| {
            inner.take();
            self.received.store(0, std::sync::atomic::Ordering::SeqCst);
            Ok(Ok(()))
        })
    }
}

/// Records the stream on standard input into `path` (the CLI's `record`).
#[pyfunction]
#[pyo3(signature = (path, *, checksums=true, progress=false, sidecar=false, wait=false, ram_map=true))]
fn record_stdin(
    py: Python<'_>,
    path: PathBuf,
    checksums: bool,
    progress: bool,
    sidecar: bool,
    wait: bool,
    ram_map: bool,
) -> PyResult<RecordResult> {
    let opts = ops::RecordOptions { checksums, progress, sidecar, wait, ram_map };
    let r = py.detach(|| ops::record_stdin(&path, opts)).map_err(|e| to_pyerr(py, e))?;
    Ok(RecordResult::from(r))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Buffer>()?;
    m.add_class::<Entry>()?;
    m.add_class::<SaveFile>()?;
    m.add_class::<Recorder>()?;
    m.add_class::<IndexResult>()?;
    m.add_class::<VerifyResult>()?;
    m.add_class::<StripResult>()?;
    m.add_class::<RecordResult>()?;
    m.add_class::<ram::RamMap>()?;
    m.add_class::<ram::PhysMap>()?;
    m.add_function(wrap_pyfunction!(record_stdin, m)?)?;
    m.add_function(wrap_pyfunction!(index, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(strip, m)?)?;
    layout::register(m)?;
    state::register(m)?;
    batch::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
