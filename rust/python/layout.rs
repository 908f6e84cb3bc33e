//! `savedir._core._x86_layout`: the x86 guest-physical layout rule
//! ([`crate::format::layout`]) for the tests that check it against QEMU.

use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::errors::to_pyerr;
use crate::format::layout::{self, DeviceFacts, LayoutOptions};
use crate::ops;

/// The PCI configuration spaces of the save at `path` (from its vmdesc and
/// device sections).
fn device_facts(path: &Path) -> ops::Result<DeviceFacts> {
    ops::open(path, &ops::OpenOptions::default())?.device_facts()
}

/// `_x86_layout(machine_type, blocks, below_4g=None, *, above_4g_start=None,
/// ram_block=None, save=None) -> (ranges, unmapped)`: `ranges` a list of
/// `(gpa, size, block, offset)` sorted by address, `unmapped` a list of
/// `(block, reason)`. `save`: a save whose device sections tell the chipset's
/// and the PCI devices' settings (PAM, SMRAM, BARs).
#[pyfunction]
#[pyo3(signature = (machine_type, blocks, below_4g=None, *, above_4g_start=None, ram_block=None, save=None))]
#[allow(clippy::type_complexity)]
fn _x86_layout(
    py: Python<'_>,
    machine_type: &str,
    blocks: Vec<(String, u64)>,
    below_4g: Option<u64>,
    above_4g_start: Option<u64>,
    ram_block: Option<String>,
    save: Option<PathBuf>,
) -> PyResult<(Vec<(u64, u64, String, u64)>, Vec<(String, String)>)> {
    let facts = match save {
        Some(p) => py.detach(|| device_facts(&p)).map_err(|e| to_pyerr(py, e))?,
        None => DeviceFacts::default(),
    };
    let refs: Vec<(&str, u64)> = blocks.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let opts = LayoutOptions { below_4g, above_4g_start, ram_block };
    let l = layout::x86_layout(machine_type, &refs, &facts, &opts).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((
        l.ranges.into_iter().map(|r| (r.gpa, r.size, r.block, r.offset)).collect(),
        l.unmapped.into_iter().map(|u| (u.block, u.reason)).collect(),
    ))
}

/// Adds the layout functions to `savedir._core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_x86_layout, m)?)
}
