//! Device state, vCPU registers and the difference between two saves, as
//! Python objects: converts what [`crate::ops::state`] finds. Reading and
//! decoding run without the GIL; only the conversion holds it.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList};

use super::errors::to_pyerr;
use super::SaveFile;
use crate::format::vmstate::x86::{Segment, X86Cpu, GPR_NAMES, SEGMENT_NAMES};
use crate::format::vmstate::{show_path, Fields, StateDesc, Step, Value};
use crate::format::Kind;
use crate::ops::state::{self as st, Section};
use crate::ops::{self};

fn value<'py>(py: Python<'py>, v: &Value<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Uint(u) => u.into_pyobject(py)?.into_any(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any(),
        Value::Str(s) => s.as_ref().into_pyobject(py)?.into_any(),
        Value::Null => py.None().into_bound(py),
        Value::List(l) => PyList::new(py, l.iter().map(|x| value(py, x)).collect::<PyResult<Vec<_>>>()?)?.into_any(),
        Value::Map(m) => fields(py, m)?.into_any(),
    })
}

fn fields<'py>(py: Python<'py>, m: &Fields<'_>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in &m.entries {
        d.set_item(k.as_ref(), value(py, v)?)?;
    }
    Ok(d)
}

fn live<'py>(py: Python<'py>, info: &st::LiveInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("items", info.items)?;
    d.set_item("payload_size", info.payload_size)?;
    match &info.ram_blocks {
        Some(blocks) => {
            let l = PyList::empty(py);
            for b in blocks {
                let bd = PyDict::new(py);
                bd.set_item("id", &b.id)?;
                bd.set_item("used_length", b.used_length)?;
                l.append(bd)?;
            }
            d.set_item("ram_blocks", l)?;
        }
        None => d.set_item("ram_blocks", py.None())?,
    }
    Ok(d)
}

/// The header facts of a section, as `savedir state --json` prints them.
fn header<'py>(py: Python<'py>, s: &Section<'_>, vmsd_version: Option<u32>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let e = s.opener();
    d.set_item("name", s.name())?;
    if e.kind == Kind::Configuration {
        d.set_item("instance_id", py.None())?;
        d.set_item("section_id", py.None())?;
        d.set_item("version_id", vmsd_version)?;
    } else {
        d.set_item("instance_id", e.instance_id)?;
        d.set_item("section_id", e.section_id)?;
        d.set_item("version_id", e.version_id)?;
    }
    Ok(d)
}

/// What one section decodes to, before conversion.
enum Decoded<'a> {
    Fields(Fields<'a>, Option<u32>),
    Live(st::LiveInfo),
}

/// The compiled vmdesc of one open save: decodes its sections on demand.
/// (The file itself is passed to each call, so that closing it releases it.)
#[pyclass(frozen, module = "savedir._core")]
pub struct StateReader {
    desc: Arc<StateDesc>,
}

#[pymethods]
impl StateReader {
    #[new]
    fn new(py: Python<'_>, file: PyRef<'_, SaveFile>) -> PyResult<Self> {
        let f = file.get()?;
        let desc = py.detach(|| st::load_desc(&f)).map_err(|e| to_pyerr(py, e))?;
        Ok(StateReader { desc: Arc::new(desc) })
    }

    /// The fields of the device section or configuration whose first item
    /// is at `offset`, as a dict keyed as the vmdesc spells them.
    fn fields<'py>(&self, py: Python<'py>, file: PyRef<'_, SaveFile>, offset: u64) -> PyResult<Bound<'py, PyDict>> {
        let f = file.get()?;
        let all = st::sections(&f);
        let Some(s) = all.iter().find(|s| s.opener().offset == offset) else {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("no section starts at offset {offset}")));
        };
        let desc = &*self.desc;
        let vmsd = st::vmsd_of(&f, desc, s).map_err(|e| to_pyerr(py, e))?;
        let bytes = py.detach(|| st::payload(&f, s)).map_err(|e| to_pyerr(py, e))?;
        let decoded = py.detach(|| st::decode_section(&f, vmsd, s, &bytes)).map_err(|e| to_pyerr(py, e))?;
        fields(py, &decoded)
    }

    /// The state of the sections `sections` (name and instance, or None for
    /// every instance), or of every section: a list of dicts with the keys
    /// name, instance_id, section_id, version_id, fields (None for a live
    /// section) and live (None for others).
    #[pyo3(signature = (file, sections=None))]
    fn state<'py>(
        &self,
        py: Python<'py>,
        file: PyRef<'_, SaveFile>,
        sections: Option<Vec<(String, Option<u32>)>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let f = file.get()?;
        let desc = &*self.desc;
        let all = st::sections(&f);
        let chosen: Vec<&Section<'_>> = match &sections {
            None => {
                all.iter().filter(|s| s.opener().kind != Kind::Configuration || desc.configuration.is_some()).collect()
            }
            Some(want) => {
                let mut out: Vec<&Section<'_>> = Vec::new();
                for (name, instance) in want {
                    let matching: Vec<&Section<'_>> = all
                        .iter()
                        .filter(|s| {
                            s.name() == name
                                && (s.opener().kind == Kind::Configuration
                                    || instance.is_none_or(|i| s.opener().instance_id == i))
                        })
                        .collect();
                    if matching.is_empty() {
                        // The lookup's own error names the instances there are.
                        f.find(name, *instance).map_err(|e| to_pyerr(py, e))?;
                    }
                    for s in matching {
                        if !out.iter().any(|o| std::ptr::eq(*o, s)) {
                            out.push(s);
                        }
                    }
                }
                out
            }
        };
        let payloads = py
            .detach(|| {
                chosen
                    .iter()
                    .map(|s| if s.live() { Ok(None) } else { st::payload(&f, s).map(Some) })
                    .collect::<ops::Result<Vec<_>>>()
            })
            .map_err(|e| to_pyerr(py, e))?;
        let decoded = py
            .detach(|| {
                chosen
                    .iter()
                    .zip(&payloads)
                    .map(|(s, p)| match p {
                        None => st::live_info(&f, Some(desc), s).map(Decoded::Live),
                        Some(bytes) => {
                            let vmsd = st::vmsd_of(&f, desc, s)?;
                            st::decode_section(&f, vmsd, s, bytes).map(|m| Decoded::Fields(m, vmsd.version))
                        }
                    })
                    .collect::<ops::Result<Vec<_>>>()
            })
            .map_err(|e| to_pyerr(py, e))?;
        let out = PyList::empty(py);
        for (s, d) in chosen.iter().zip(&decoded) {
            let (version, fields_obj, live_obj) = match d {
                Decoded::Fields(m, v) => (*v, fields(py, m)?.into_any(), py.None().into_bound(py)),
                Decoded::Live(info) => (None, py.None().into_bound(py), live(py, info)?.into_any()),
            };
            let h = header(py, s, version)?;
            h.set_item("fields", fields_obj)?;
            h.set_item("live", live_obj)?;
            out.append(h)?;
        }
        Ok(out)
    }

    /// Every vCPU's registers (x86), as dicts, by index.
    fn cpus<'py>(&self, py: Python<'py>, file: PyRef<'_, SaveFile>) -> PyResult<Bound<'py, PyList>> {
        let f = file.get()?;
        let desc = self.desc.clone();
        let cpus = py.detach(|| st::cpus(&f, &desc)).map_err(|e| to_pyerr(py, e))?;
        PyList::new(py, cpus.iter().map(|c| cpu(py, c)).collect::<PyResult<Vec<_>>>()?)
    }

    /// The notes of an ELF core of this save's vCPUs, as QEMU's
    /// `dump-guest-memory` writes them: each vCPU's NT_PRSTATUS, then each
    /// one's "QEMU" note (QEMUCPUState).
    fn elf_notes<'py>(&self, py: Python<'py>, file: PyRef<'_, SaveFile>) -> PyResult<Bound<'py, PyBytes>> {
        let f = file.get()?;
        let desc = self.desc.clone();
        let cpus = py.detach(|| st::cpus(&f, &desc)).map_err(|e| to_pyerr(py, e))?;
        Ok(PyBytes::new(py, &crate::format::vmstate::x86::elf_notes(&cpus)))
    }
}

fn segment<'py>(py: Python<'py>, s: &Segment) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("selector", s.selector)?;
    d.set_item("base", s.base)?;
    d.set_item("limit", s.limit)?;
    d.set_item("flags", s.flags)?;
    Ok(d)
}

fn cpu<'py>(py: Python<'py>, c: &X86Cpu) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", c.index)?;
    // In the order x86 documentation lists them.
    for name in ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] {
        let i = GPR_NAMES.iter().position(|n| *n == name).expect("a general register");
        d.set_item(name, c.regs[i])?;
    }
    for (i, name) in GPR_NAMES.iter().enumerate().skip(8) {
        d.set_item(*name, c.regs[i])?;
    }
    d.set_item("rip", c.rip)?;
    d.set_item("rflags", c.rflags)?;
    for name in ["cs", "ds", "es", "fs", "gs", "ss"] {
        let i = SEGMENT_NAMES.iter().position(|n| *n == name).expect("a segment register");
        d.set_item(name, segment(py, &c.segs[i])?)?;
    }
    d.set_item("ldt", segment(py, &c.ldt)?)?;
    d.set_item("tr", segment(py, &c.tr)?)?;
    d.set_item("gdt", segment(py, &c.gdt)?)?;
    d.set_item("idt", segment(py, &c.idt)?)?;
    for i in [0, 2, 3, 4] {
        d.set_item(format!("cr{i}"), c.cr[i])?;
    }
    d.set_item("efer", c.efer)?;
    for (i, x) in c.dr.iter().enumerate() {
        d.set_item(format!("dr{i}"), x)?;
    }
    d.set_item("kernel_gs_base", c.kernel_gs_base)?;
    d.set_item("long_mode", c.long_mode())?;
    Ok(d)
}

fn path_keys<'py>(py: Python<'py>, path: &[Step<'_>]) -> PyResult<Bound<'py, PyList>> {
    let l = PyList::empty(py);
    for s in path {
        match s {
            Step::Name(n) => l.append(n.as_ref())?,
            Step::Index(i) => l.append(*i)?,
        }
    }
    Ok(l)
}

/// Compares two open saves (see `savedir.diff`): a dict with the keys same,
/// only_in_a, only_in_b and sections.
#[pyfunction]
pub fn diff<'py>(py: Python<'py>, a: PyRef<'_, SaveFile>, b: PyRef<'_, SaveFile>) -> PyResult<Bound<'py, PyDict>> {
    let (fa, fb) = (a.get()?, b.get()?);
    let r = py.detach(|| st::diff(&fa, &fb)).map_err(|e| to_pyerr(py, e))?;
    let key = |k: &st::SectionKey| -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("name", &k.name)?;
        d.set_item("instance_id", k.instance_id)?;
        d.set_item("live", k.live)?;
        Ok(d)
    };
    let out = PyDict::new(py);
    out.set_item("same", r.same())?;
    out.set_item("only_in_a", PyList::new(py, r.only_in_a.iter().map(key).collect::<PyResult<Vec<_>>>()?)?)?;
    out.set_item("only_in_b", PyList::new(py, r.only_in_b.iter().map(key).collect::<PyResult<Vec<_>>>()?)?)?;
    let secs = PyList::empty(py);
    for s in &r.sections {
        let d = PyDict::new(py);
        d.set_item("name", &s.name)?;
        d.set_item("instance_id", s.instance_id)?;
        d.set_item("live", s.live)?;
        d.set_item("section_id", s.section_id)?;
        d.set_item("version_id", s.version_id)?;
        d.set_item("payload_size", s.payload_size)?;
        match &s.first_difference {
            Some(fd) => {
                let x = PyDict::new(py);
                x.set_item("at", fd.at)?;
                x.set_item("offset_a", fd.offset_a)?;
                x.set_item("offset_b", fd.offset_b)?;
                d.set_item("first_difference", x)?;
            }
            None => d.set_item("first_difference", py.None())?,
        }
        match &s.fields {
            Some(fs) => {
                let l = PyList::empty(py);
                for fd in fs {
                    let x = PyDict::new(py);
                    x.set_item("path", show_path(&fd.path))?;
                    x.set_item("keys", path_keys(py, &fd.path)?)?;
                    let side = |v: &Option<Value<'_>>| -> PyResult<Bound<'py, PyAny>> {
                        match v {
                            Some(v) => value(py, v),
                            None => Ok(py.None().into_bound(py)),
                        }
                    };
                    x.set_item("a", side(&fd.a)?)?;
                    x.set_item("b", side(&fd.b)?)?;
                    let only = match (&fd.a, &fd.b) {
                        (Some(_), None) => Some("a"),
                        (None, Some(_)) => Some("b"),
                        _ => None,
                    };
                    x.set_item("only_in", only)?;
                    l.append(x)?;
                }
                d.set_item("fields", l)?;
            }
            None => d.set_item("fields", py.None())?,
        }
        d.set_item("error", s.error.as_deref())?;
        match &s.pages {
            Some(p) => {
                let x = PyDict::new(py);
                x.set_item("pages", p.pages)?;
                x.set_item("ranges", p.ranges.clone())?;
                d.set_item("pages", x)?;
            }
            None => d.set_item("pages", py.None())?,
        }
        secs.append(d)?;
    }
    out.set_item("sections", secs)?;
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<StateReader>()?;
    m.add_function(wrap_pyfunction!(diff, m)?)?;
    Ok(())
}
