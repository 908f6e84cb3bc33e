//! Device state field by field: a section's payload decoded through the
//! vmdesc, QEMU's description of what it wrote.
//!
//! [`StateDesc`] holds the vmdesc's per-device descriptions, compiled once
//! ([`desc`]); [`decode::decode`] walks one section's payload through one
//! of them, zero-copy; [`diff`] compares two decoded sections; [`x86`]
//! reads a vCPU's registers from its `cpu` section and writes them as the
//! ELF notes of a core file. Nothing here performs I/O.

use serde_json::Value as Json;

use super::error::{FormatError, Result};

pub mod decode;
pub mod desc;
pub mod diff;
pub mod x86;

pub use decode::{decode, show_path, Fields, Step, Value};
pub use desc::Vmsd;

/// One device entry of the vmdesc, compiled.
#[derive(Clone, Debug)]
pub struct DeviceDesc {
    pub name: String,
    pub instance_id: u32,
    /// The description, or why it cannot be used (a vmdesc whose entry for
    /// one device is malformed still describes the others).
    pub vmsd: std::result::Result<Vmsd, String>,
}

/// The descriptions of a stream's device sections and configuration.
#[derive(Clone, Debug, Default)]
pub struct StateDesc {
    /// In vmdesc (stream) order.
    pub devices: Vec<DeviceDesc>,
    /// The configuration section's description (QEMU 8.2 and later).
    pub configuration: Option<std::result::Result<Vmsd, String>>,
    /// Absolute offset of the vmdesc JSON (for messages).
    pub at: u64,
}

impl StateDesc {
    /// Parses and compiles vmdesc JSON that lies at absolute offset `at`.
    pub fn parse(json: &[u8], at: u64) -> Result<StateDesc> {
        let v: Json = serde_json::from_slice(json)
            .map_err(|e| FormatError::invalid(at, format!("expected the vmdesc's JSON, found invalid JSON ({e})")))?;
        let obj = v.as_object().ok_or_else(|| FormatError::invalid(at, "expected the vmdesc to be a JSON object"))?;
        let mut devices = Vec::new();
        if let Some(devs) = obj.get("devices") {
            let devs = devs
                .as_array()
                .ok_or_else(|| FormatError::invalid(at, "expected the vmdesc's \"devices\" to be a list"))?;
            for (i, d) in devs.iter().enumerate() {
                let name = d
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| FormatError::invalid(at, format!("vmdesc device #{i} has no \"name\"")))?;
                let instance_id = d
                    .get("instance_id")
                    .and_then(Json::as_u64)
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        FormatError::invalid(at, format!("vmdesc device #{i} ({name}) has no valid \"instance_id\""))
                    })?;
                let vmsd = desc::compile(d, "");
                devices.push(DeviceDesc { name: name.to_owned(), instance_id, vmsd });
            }
        }
        let configuration = obj.get("configuration").map(|c| desc::compile(c, ""));
        Ok(StateDesc { devices, configuration, at })
    }

    /// The description of the device section `name`, instance `instance_id`.
    pub fn device(&self, name: &str, instance_id: u32) -> Option<&DeviceDesc> {
        self.devices.iter().find(|d| d.name == name && d.instance_id == instance_id)
    }
}

#[cfg(test)]
mod tests;
