//! Guest memory in Python: `savedir._core.RamMap` (the blocks of a save,
//! page by page) and `PhysMap` (guest-physical addresses over them).

use std::sync::Arc;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyMemoryView};

use crate::format::pagemap::Loc;
use crate::ops::ram::{GuestRam, PhysRange, ZERO_PAGE};

use super::errors::to_pyerr;
use super::{Owner, SaveFile};

/// The RAM blocks of a save and where each page's content lies.
#[pyclass(frozen, module = "savedir._core")]
pub struct RamMap {
    ram: Arc<GuestRam>,
    owner: Owner,
}

static ZERO_VIEW: PyOnceLock<Py<PyMemoryView>> = PyOnceLock::new();

/// The shared read-only zero page: the same object for every zero page of
/// the usual 4 KiB size (a new one for other page sizes).
fn zero_view<'py>(py: Python<'py>, len: usize) -> PyResult<Bound<'py, PyMemoryView>> {
    const SHARED: usize = 4096;
    if len != SHARED {
        return PyMemoryView::from(PyBytes::new(py, &ZERO_PAGE[..len]).as_any());
    }
    let v = ZERO_VIEW.get_or_try_init(py, || -> PyResult<Py<PyMemoryView>> {
        Ok(PyMemoryView::from(PyBytes::new(py, &ZERO_PAGE[..SHARED]).as_any())?.unbind())
    })?;
    Ok(v.bind(py).clone())
}

impl RamMap {
    /// Runs `f`, a front-to-back read of the RAM, with read-ahead on.
    fn sequentially<T>(&self, f: impl FnOnce() -> T) -> T {
        sequentially(&self.ram, &self.owner, f)
    }

    fn check_block(&self, b: usize) -> PyResult<()> {
        if b >= self.ram.map.blocks.len() {
            return Err(PyValueError::new_err(format!("no RAM block number {b}")));
        }
        Ok(())
    }
}

#[pymethods]
impl RamMap {
    /// `(name, size, page_size, host_page_size, data_pages, zero_pages)` per block.
    fn blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let ps = self.ram.map.page_size;
        let rows: Vec<_> = self
            .ram
            .map
            .blocks
            .iter()
            .map(|b| (b.id.clone(), b.used_length, ps, b.host_page_size, b.data_pages, b.zero_pages))
            .collect();
        PyList::new(py, rows)
    }

    /// Where the map came from: "stored", "mapped-ram" or "scanned".
    #[getter]
    fn source(&self) -> &'static str {
        self.ram.from.as_str()
    }

    #[getter]
    fn page_size(&self) -> u64 {
        self.ram.map.page_size
    }

    /// Page `page` of block `block` as a read-only memoryview: into the
    /// mapping when the page is stored whole; the shared zero page for zero
    /// and never-sent pages; else decoded into new bytes.
    fn page<'py>(&self, py: Python<'py>, block: usize, page: u64) -> PyResult<Bound<'py, PyMemoryView>> {
        self.check_block(block)?;
        let ps = self.ram.map.page_size;
        let blk = &self.ram.map.blocks[block];
        let pages = blk.used_length.div_ceil(ps);
        if page >= pages {
            let e = crate::ops::Error::Ram {
                path: self.ram.path.clone(),
                message: format!("block \"{}\" has {pages} pages; there is no page {page}", blk.id),
            };
            return Err(to_pyerr(py, e));
        }
        match (blk.lookup(page), &self.owner.map) {
            (Loc::Zero | Loc::Absent, _) if ps as usize <= ZERO_PAGE.len() => zero_view(py, ps as usize),
            (Loc::Data(off), Some(_)) => self.owner.view(py, off, off + ps),
            _ => {
                let ram = self.ram.clone();
                let src = self.owner.source.clone();
                let v = py
                    .detach(move || {
                        let mut v = vec![0u8; ps as usize];
                        ram.page_into(&*src, block, page, &mut v).map(|_| v)
                    })
                    .map_err(|e| to_pyerr(py, e))?;
                PyMemoryView::from(PyBytes::new(py, &v).as_any())
            }
        }
    }

    /// Bytes `offset..offset+n` of block `block`.
    fn read<'py>(&self, py: Python<'py>, block: usize, offset: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        self.check_block(block)?;
        let ram = self.ram.clone();
        let src = self.owner.source.clone();
        let v = py
            .detach(move || {
                let mut v = vec![0u8; n];
                ram.read_block(&*src, block, offset, &mut v).map(|_| v)
            })
            .map_err(|e| to_pyerr(py, e))?;
        Ok(PyBytes::new(py, &v))
    }

    /// The page numbers of block `block` whose content the file holds as data.
    fn present<'py>(&self, py: Python<'py>, block: usize) -> PyResult<Bound<'py, PyArray1<u64>>> {
        self.check_block(block)?;
        let ram = self.ram.clone();
        let v = py.detach(move || ram.present(block));
        Ok(PyArray1::from_vec(py, v))
    }

    /// Pages `pages` (uint64) of block `block` as one `(len(pages),
    /// page_size)` array: a new one, or `out` (C-contiguous, writable, of
    /// that shape), which is filled and returned.
    #[pyo3(signature = (block, pages, out=None))]
    fn gather<'py>(
        &self,
        py: Python<'py>,
        block: usize,
        pages: numpy::PyReadonlyArray1<'py, u64>,
        out: Option<Bound<'py, PyArray2<u8>>>,
    ) -> PyResult<Bound<'py, PyArray2<u8>>> {
        self.check_block(block)?;
        let ps = self.ram.map.page_size as usize;
        let owned;
        let pages: &[u64] = match pages.as_slice() {
            Ok(s) => s,
            Err(_) => {
                owned = pages.as_array().to_vec();
                &owned
            }
        };
        let out = match out {
            Some(o) => {
                if o.shape() != [pages.len(), ps] {
                    return Err(PyValueError::new_err(format!(
                        "out has shape {:?}; gathering {} pages needs ({}, {ps})",
                        o.shape(),
                        pages.len(),
                        pages.len()
                    )));
                }
                if !o.is_c_contiguous() {
                    return Err(PyValueError::new_err("out must be a C-contiguous, writable uint8 array"));
                }
                o
            }
            // SAFETY: uninitialised, but gather writes every byte (or fails,
            // and the array is dropped unseen).
            None => unsafe { PyArray2::<u8>::new(py, [pages.len(), ps], false) },
        };
        {
            let mut rw = out.try_readwrite().map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
            let buf = rw.as_slice_mut().map_err(|e| PyValueError::new_err(e.to_string()))?;
            let ram = self.ram.clone();
            let src = self.owner.source.clone();
            py.detach(|| ram.gather(&*src, block, pages, buf)).map_err(|e| to_pyerr(py, e))?;
        }
        Ok(out)
    }

    /// Writes block `block` whole to `path`, sparse where 2 MiB or more of it are zero;
    /// returns the bytes written (the block's size).
    #[pyo3(signature = (block, path, *, progress=false))]
    fn write_block(&self, py: Python<'_>, block: usize, path: std::path::PathBuf, progress: bool) -> PyResult<u64> {
        self.check_block(block)?;
        let name = &self.ram.map.blocks[block].id;
        let meter =
            crate::ops::Progress::new(progress, format!("{name}: writing"), self.ram.map.blocks[block].used_length);
        let r = py.detach(|| {
            self.sequentially(|| crate::ops::dump::write_block(&self.ram, &*self.owner.source, block, &path, &meter))
        });
        meter.finish();
        r.map_err(|e| to_pyerr(py, e))
    }

    /// A mapped-ram block's whole page region as a read-only array (no
    /// copy): page n at `[n * page_size, (n + 1) * page_size)`. Pages its
    /// bitmap leaves clear read as zeros there (QEMU leaves them unwritten).
    fn array<'py>(&self, py: Python<'py>, block: usize) -> PyResult<Bound<'py, PyAny>> {
        self.check_block(block)?;
        let blk = &self.ram.map.blocks[block];
        let Some(Some(region)) = self.ram.regions.get(block) else {
            return Err(to_pyerr(
                py,
                crate::ops::Error::Ram {
                    path: self.ram.path.clone(),
                    message: format!(
                        "block \"{}\" is not stored as one region (only mapped-ram saves store blocks whole)",
                        blk.id
                    ),
                },
            ));
        };
        let Some(map) = &self.owner.map else {
            return Err(PyValueError::new_err("array() needs a file opened with mmap=True"));
        };
        super::array(py, map, *region, region + blk.used_length)
    }
}

/// Guest-physical ranges over a [`RamMap`].
#[pyclass(frozen, module = "savedir._core")]
pub struct PhysMap {
    ram: Arc<GuestRam>,
    owner: Owner,
    ranges: Vec<PhysRange>,
}

impl PhysMap {
    fn find(&self, gpa: u64) -> Option<&PhysRange> {
        let i = self.ranges.partition_point(|r| r.gpa <= gpa);
        let r = &self.ranges[i.checked_sub(1)?];
        (gpa < r.gpa + r.size).then_some(r)
    }

    /// Reads `out.len()` bytes at `gpa`, across ranges that touch.
    fn read_into(&self, gpa: u64, out: &mut [u8]) -> crate::ops::Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let at = gpa + done as u64;
            let Some(r) = self.find(at) else {
                return Err(crate::ops::Error::Ram {
                    path: self.ram.path.clone(),
                    message: format!(
                        "guest-physical address 0x{at:x} is not backed by RAM (reading {} bytes at 0x{gpa:x})",
                        out.len()
                    ),
                });
            };
            let n = ((r.gpa + r.size - at) as usize).min(out.len() - done);
            self.ram.read_block(&*self.owner.source, r.block, r.offset + (at - r.gpa), &mut out[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

#[pymethods]
impl PhysMap {
    #[new]
    fn new(ram: &RamMap, ranges: Vec<(u64, u64, usize, u64)>) -> PyResult<Self> {
        let mut rs: Vec<PhysRange> = Vec::with_capacity(ranges.len());
        for (gpa, size, block, offset) in ranges {
            let blk =
                ram.ram.map.blocks.get(block).ok_or_else(|| PyValueError::new_err(format!("no block {block}")))?;
            if offset.checked_add(size).is_none_or(|e| e > blk.used_length) || gpa.checked_add(size).is_none() {
                return Err(PyValueError::new_err(format!(
                    "range 0x{gpa:x}+0x{size:x} runs past block \"{}\" ({} bytes)",
                    blk.id, blk.used_length
                )));
            }
            rs.push(PhysRange { gpa, size, block, offset });
        }
        rs.sort_by_key(|r| r.gpa);
        if let Some(w) = rs.windows(2).find(|w| w[0].gpa + w[0].size > w[1].gpa) {
            return Err(PyValueError::new_err(format!("ranges at 0x{:x} and 0x{:x} overlap", w[0].gpa, w[1].gpa)));
        }
        Ok(PhysMap { ram: ram.ram.clone(), owner: ram.owner.clone(), ranges: rs })
    }

    /// Writes an ELF64 core of these ranges to `path` (one PT_LOAD each,
    /// after a PT_NOTE of `notes` when given); returns its size.
    #[pyo3(signature = (path, *, notes=None, machine=62, progress=false))]
    fn write_elf(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        notes: Option<Vec<u8>>,
        machine: u16,
        progress: bool,
    ) -> PyResult<u64> {
        let notes = notes.unwrap_or_default();
        py.detach(|| {
            sequentially(&self.ram, &self.owner, || {
                let src = &*self.owner.source;
                crate::ops::dump::write_elf(&self.ram, src, &self.ranges, &notes, machine, &path, progress)
            })
        })
        .map_err(|e| to_pyerr(py, e))
    }

    fn read<'py>(&self, py: Python<'py>, gpa: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut v = vec![0u8; n];
        py.detach(|| self.read_into(gpa, &mut v)).map_err(|e| to_pyerr(py, e))?;
        Ok(PyBytes::new(py, &v))
    }

    /// `n` bytes at each address, as one `(len(gpas), n)` array.
    fn read_many<'py>(&self, py: Python<'py>, gpas: Vec<u64>, n: usize) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let out = PyArray2::<u8>::zeros(py, [gpas.len(), n], false);
        {
            // SAFETY: a new array that no other code has seen yet.
            let buf = unsafe { out.as_slice_mut() }.map_err(|e| PyValueError::new_err(e.to_string()))?;
            py.detach(|| -> crate::ops::Result<()> {
                for (i, &g) in gpas.iter().enumerate() {
                    self.read_into(g, &mut buf[i * n..(i + 1) * n])?;
                }
                Ok(())
            })
            .map_err(|e| to_pyerr(py, e))?;
        }
        let _ = out.len();
        Ok(out)
    }
}

fn sequentially<T>(ram: &GuestRam, owner: &Owner, f: impl FnOnce() -> T) -> T {
    use crate::ops::source::Advice;
    if let Some(m) = &owner.map {
        ram.advise(m, Advice::Sequential);
    }
    let r = f();
    if let Some(m) = &owner.map {
        ram.advise(m, Advice::Random);
    }
    r
}

/// `(ranges, unmapped)`: where `ram`'s blocks lie in guest-physical memory
/// for the file's machine type, `(gpa, size, block index, offset)` sorted by
/// address, and `(block, reason)` for the blocks that lie nowhere.
#[allow(clippy::type_complexity)]
pub fn ram_layout(
    py: Python<'_>,
    f: &SaveFile,
    ram: &RamMap,
    below_4g: Option<u64>,
    above_4g_start: Option<u64>,
    ram_block: Option<String>,
) -> PyResult<(Vec<(u64, u64, usize, u64)>, Vec<(String, String)>)> {
    let file = f.get()?;
    let opts = crate::format::layout::LayoutOptions { below_4g, above_4g_start, ram_block };
    let (ranges, unmapped) = py.detach(|| file.phys_layout(&ram.ram, &opts)).map_err(|e| to_pyerr(py, e))?;
    Ok((
        ranges.into_iter().map(|r| (r.gpa, r.size, r.block, r.offset)).collect(),
        unmapped.into_iter().map(|u| (u.block, u.reason)).collect(),
    ))
}

/// Builds the guest memory of an open file (with the GIL released).
pub fn ram_map(py: Python<'_>, f: &SaveFile) -> PyResult<RamMap> {
    let file = f.get()?;
    let owner = Owner::of(&file);
    let ram = py.detach(|| file.guest_ram()).map_err(|e| to_pyerr(py, e))?;
    Ok(RamMap { ram: Arc::new(ram), owner })
}
