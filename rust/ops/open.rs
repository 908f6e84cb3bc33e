//! Opening a save file: through its directory in O(entries), or by a scan.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::directory::{Directory, Trailer};
use crate::format::reader::{be32_at, Reader};
use crate::format::stream::{self, Item, ParseOptions, FOOTER_LEN};
use crate::format::vmdesc::{self, VmdescLocation};
use crate::format::{tag, Kind};

use super::error::{Error, Result};
use super::locate::{check_directory, find_directory, locate, DirSource, Located};
use super::progress::Progress;
use super::source::{open_map, Map};

/// One top-level item of a stream, as `ls` shows it: the item, and the
/// checksum the directory stores for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub item: Item,
    /// The checksum stored in the directory, if any.
    pub crc32c: Option<u32>,
}

impl std::ops::Deref for Entry {
    type Target = Item;
    fn deref(&self) -> &Item {
        &self.item
    }
}

/// How to open a file.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Ignore any directory and parse the stream from its start.
    pub scan: bool,
    /// Show progress on stderr while scanning.
    pub progress: bool,
    /// Where the stream starts, when it cannot be found by itself.
    pub offset: Option<u64>,
}

/// An open save file: its mapping and the list of its items.
#[derive(Debug)]
pub struct SaveFile {
    pub path: PathBuf,
    pub map: Arc<Map>,
    /// Absolute offset of the stream's magic.
    pub stream_start: u64,
    /// Absolute offset one past the stream's last byte (vmdesc included).
    pub stream_end: u64,
    /// Absolute offset of the EOF byte.
    pub eof: u64,
    /// True when the items come from a valid directory.
    pub indexed: bool,
    pub trailer: Option<Trailer>,
    pub entries: Vec<Entry>,
    pub vmdesc: Option<VmdescLocation>,
    pub footers: bool,
    pub machine_type: Option<String>,
    /// The wrapper, if any, and how the stream was found.
    pub located: Located,
    /// The sidecar the directory was read from, if any (kept mapped).
    pub sidecar: Option<(PathBuf, Arc<Map>)>,
}

/// Opens `path`: through its directory (appended, or a sidecar) when it has
/// a valid one (checks 1–3), else by parsing the stream. A directory whose
/// trailer is intact but which fails a check is an error, unless `opts.scan`
/// asks to ignore it.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<SaveFile> {
    let (_file, map) = open_map(path)?;
    let located = locate(path, map.bytes(), opts.offset)?;
    if !opts.scan {
        if let Some(src) = find_directory(path, map.bytes())? {
            let d = check_directory(&src, map.bytes(), located.stream_start)
                .map_err(|source| Error::Directory { path: path.to_path_buf(), source });
            let d = map.check(path, d)?;
            return Ok(from_directory(path, &map, src, d, located));
        }
    }
    let m = map.clone();
    m.check(path, scan(path, map, located, opts.progress))
}

fn from_directory(path: &Path, map: &Arc<Map>, src: DirSource, dir: Directory, located: Located) -> SaveFile {
    let data = map.bytes();
    let trailer = dir.trailer;
    let extents = dir.extents();
    let mut entries: Vec<Entry> = dir
        .entries
        .iter()
        .zip(&extents)
        .map(|(e, &(start, end))| Entry {
            item: Item {
                kind: e.kind,
                offset: start,
                end,
                header_len: match e.kind {
                    Kind::Configuration => 1,
                    Kind::Vmdesc => vmdesc::VMDESC_HEADER,
                    _ => e.header_len,
                },
                footer_len: 0,
                section_id: e.section_id,
                name: e.name.clone(),
                instance_id: e.instance_id,
                version_id: e.version_id,
                command: e.command,
                command_len: e.command_len,
            },
            crc32c: e.crc32c,
        })
        .collect();
    // PART and END entries carry only an id: name them after their START.
    let mut names = std::collections::HashMap::new();
    for s in entries.iter_mut().map(|e| &mut e.item) {
        match s.kind {
            Kind::Start | Kind::Full => {
                names.insert(s.section_id, (s.name.clone(), s.instance_id, s.version_id));
            }
            Kind::Part | Kind::End => {
                if let Some((n, i, v)) = names.get(&s.section_id) {
                    s.name = n.clone();
                    s.instance_id = *i;
                    s.version_id = *v;
                }
            }
            _ => {}
        }
    }
    // The stream has footers when every section ends in its own.
    let footers = entries.iter().any(|s| s.kind.is_section())
        && entries.iter().filter(|s| s.kind.is_section()).all(|s| {
            s.size() >= s.header_len + FOOTER_LEN
                && crate::format::reader::byte_at(data, s.end - FOOTER_LEN) == Some(tag::FOOTER)
                && be32_at(data, s.end - 4) == Some(s.section_id)
        });
    if footers {
        for s in entries.iter_mut().filter(|s| s.kind.is_section()) {
            s.item.footer_len = FOOTER_LEN;
        }
    }
    let vmdesc = entries
        .iter()
        .find(|s| s.kind == Kind::Vmdesc)
        .map(|s| VmdescLocation { offset: s.offset, json_len: (s.size() - vmdesc::VMDESC_HEADER) as u32 });
    let machine_type =
        entries.iter().find(|s| s.kind == Kind::Configuration).and_then(|s| machine_type_at(data, s.offset));
    SaveFile {
        path: path.to_path_buf(),
        map: map.clone(),
        stream_start: located.stream_start,
        stream_end: trailer.dir,
        eof: trailer.eof,
        indexed: true,
        trailer: Some(trailer),
        entries,
        vmdesc,
        footers,
        machine_type,
        located,
        sidecar: src.sidecar,
    }
}

fn machine_type_at(data: &[u8], at: u64) -> Option<String> {
    let mut r = Reader::at(data, at + 1).ok()?;
    let len = r.be32("").ok()?;
    if len > 256 {
        return None;
    }
    Some(String::from_utf8_lossy(r.bytes(len as usize, "").ok()?).into_owned())
}

/// Parses the stream from its start.
pub fn scan(path: &Path, map: Arc<Map>, located: Located, progress: bool) -> Result<SaveFile> {
    let data = map.bytes();
    let stream_start = located.stream_start;
    let meter = Progress::new(progress, format!("{}: reading", path.display()), map.len());
    let mut tick = |at: u64| meter.set(at);
    let mut popts = ParseOptions::new(stream_start, super::locate::end_hint(data));
    popts.progress = Some(&mut tick);
    let s = stream::parse(data, popts).map_err(|e| Error::format(path, e))?;
    meter.finish();
    Ok(SaveFile {
        path: path.to_path_buf(),
        map: map.clone(),
        stream_start,
        stream_end: s.end,
        eof: s.eof,
        indexed: false,
        trailer: None,
        entries: s.items.into_iter().map(|item| Entry { item, crc32c: None }).collect(),
        vmdesc: s.vmdesc,
        footers: s.footers.unwrap_or(false),
        machine_type: s.configuration.map(|c| c.machine_type),
        located,
        sidecar: None,
    })
}

impl SaveFile {
    /// Every item of the section `name` (instance `instance`, or the lowest):
    /// one FULL, or a START with its PARTs and END, in file order.
    pub fn find(&self, name: &str, instance: Option<u32>) -> Result<Vec<&Entry>> {
        let opener = self
            .entries
            .iter()
            .filter(|s| s.kind.opens_section() && s.name.as_deref() == Some(name))
            .filter(|s| instance.is_none_or(|i| s.instance_id == i))
            .min_by_key(|s| (s.instance_id, s.offset));
        let Some(opener) = opener else {
            let mut have: Vec<String> = self
                .entries
                .iter()
                .filter(|s| s.kind.opens_section() && s.name.as_deref() == Some(name))
                .map(|s| s.instance_id.to_string())
                .collect();
            have.dedup();
            let message = match (instance, have.is_empty()) {
                (Some(i), false) => {
                    format!("section \"{name}\" has no instance {i} (instances: {})", have.join(", "))
                }
                _ => format!("no section is named \"{name}\""),
            };
            return Err(Error::NotFound { path: self.path.clone(), message });
        };
        if opener.kind == Kind::Full {
            return Ok(vec![opener]);
        }
        Ok(self
            .entries
            .iter()
            .filter(|s| {
                s.section_id == opener.section_id
                    && matches!(s.kind, Kind::Start | Kind::Part | Kind::End)
                    && s.offset >= opener.offset
            })
            .collect())
    }

    /// The vmdesc JSON bytes, if the stream has a vmdesc.
    pub fn vmdesc_json(&self) -> Option<&[u8]> {
        self.vmdesc.and_then(|v| v.json(self.map.bytes()))
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// The directory source this file was opened through.
    pub fn dir_source(&self) -> DirSource {
        DirSource { sidecar: self.sidecar.clone() }
    }
}
