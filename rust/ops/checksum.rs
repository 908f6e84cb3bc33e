//! CRC-32C of item extents: in parallel over fixed-size chunks of a whole
//! file, or item by item as a one-pass read goes ([`ItemCrcs`]).
//!
//! Work is spread over threads only inside a thread pool savedir made for the
//! call (see `pool.rs`), never on rayon's global pool, whose threads a child
//! process made by `fork` would wait for forever.

use rayon::prelude::*;

use crate::format::stream::Item;

use super::progress::Progress;

/// Chunks this large keep both cores busy on one huge RAM section.
const CHUNK: u64 = 8 << 20;

/// The CRC-32C of `data[start..end]` for each extent.
pub fn crc32c_extents(data: &[u8], extents: &[(u64, u64)], progress: &Progress) -> Vec<u32> {
    // Cut every extent into chunks; remember which extent each belongs to.
    let mut chunks: Vec<(usize, u64, u64)> = Vec::with_capacity(extents.len());
    for (i, &(s, e)) in extents.iter().enumerate() {
        let mut a = s;
        loop {
            let b = e.min(a.saturating_add(CHUNK));
            chunks.push((i, a, b));
            if b >= e {
                break;
            }
            a = b;
        }
    }
    let total: u64 = extents.iter().map(|(s, e)| e - s).sum();
    progress.phase(total);
    let one = |&(_, a, b): &(usize, u64, u64)| {
        let c = crc32c::crc32c(&data[a as usize..b as usize]);
        progress.add(b - a);
        c
    };
    let crcs: Vec<u32> = if super::pool::in_pool() {
        chunks.par_iter().with_min_len(16).map(one).collect()
    } else {
        chunks.iter().map(one).collect()
    };
    let mut out = vec![0u32; extents.len()];
    let mut started = vec![false; extents.len()];
    for (&(i, a, b), &c) in chunks.iter().zip(&crcs) {
        if started[i] {
            out[i] = crc32c::crc32c_combine(out[i], c, (b - a) as usize);
        } else {
            out[i] = c;
            started[i] = true;
        }
    }
    out
}

/// The least bytes worth a thread of their own.
const PIECE: usize = 1 << 20;

/// The CRC-32C of `data` appended to `crc`: split over the threads of the
/// pool the caller runs in, when it is long enough (combining checksums is
/// not free: one piece per thread).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let parts = if super::pool::in_pool() { rayon::current_num_threads().min(data.len() / PIECE) } else { 1 };
    if parts < 2 {
        return crc32c::crc32c_append(crc, data);
    }
    let size = data.len().div_ceil(parts);
    let crcs: Vec<(u32, usize)> = data.par_chunks(size).map(|c| (crc32c::crc32c(c), c.len())).collect();
    crcs.into_iter().fold(crc, |acc, (c, n)| crc32c::crc32c_combine(acc, c, n))
}

/// The CRC-32C of each top-level item, fed with the bytes as a one-pass read
/// passes them (a recording, a scan): only the running checksum of the item
/// in progress is kept, never its bytes.
#[derive(Debug, Default)]
pub struct ItemCrcs {
    /// CRC of the item in progress, over its bytes up to `pos`.
    crc: u32,
    pos: u64,
    crcs: Vec<u32>,
    /// The extent each checksum covers.
    extents: Vec<(u64, u64)>,
}

impl ItemCrcs {
    /// Feeds the bytes up to `done`: `data` holds file bytes from `base`,
    /// from the previous `done` at least (or the first item's start) up to
    /// `done`. `items` are the items found so far, final up to `done`;
    /// `in_progress` the offset of the item the parse is inside, if any.
    pub fn update(&mut self, items: &[Item], in_progress: Option<u64>, data: &[u8], base: u64, done: u64) {
        let from = self.crcs.len().min(items.len());
        self.update_tail(&items[from..], in_progress, data, base, done)
    }

    /// [`update`](Self::update), given only the items not yet checksummed
    /// (`tail[0]` is the item after the last one done).
    pub fn update_tail(&mut self, tail: &[Item], in_progress: Option<u64>, data: &[u8], base: u64, done: u64) {
        let at = |a: u64, b: u64| &data[(a - base) as usize..(b - base) as usize];
        let first = self.crcs.len();
        let items = |i: usize| tail.get(i - first);
        while let Some(it) = items(self.crcs.len()).filter(|it| it.end <= done) {
            if self.pos < it.offset {
                self.pos = it.offset;
                self.crc = 0;
            }
            self.crcs.push(crc32c_append(self.crc, at(self.pos, it.end)));
            self.extents.push((it.offset, it.end));
            self.crc = 0;
            self.pos = it.end;
        }
        // The item that `done` falls in: a completed one, or the one in progress.
        let current = items(self.crcs.len()).map(|i| i.offset).or(in_progress);
        if let Some(start) = current {
            if self.pos < start {
                self.pos = start;
                self.crc = 0;
            }
            if done > self.pos {
                self.crc = crc32c_append(self.crc, at(self.pos, done));
                self.pos = done;
            }
        }
    }

    /// The checksums of `items` (every item of the stream), or None when
    /// they are not the items that were checksummed (a second reading of the
    /// stream found other ends).
    pub fn finish(self, items: &[Item]) -> Option<Vec<u32>> {
        let same =
            self.extents.len() == items.len() && self.extents.iter().zip(items).all(|(&e, i)| e == (i.offset, i.end));
        same.then_some(self.crcs)
    }

    /// The checksums of the items completed so far.
    pub fn crcs(&self) -> &[u32] {
        &self.crcs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_equals_direct() {
        let data: Vec<u8> = (0..(3 * CHUNK as usize + 12345)).map(|i| (i * 7 + i / 13) as u8).collect();
        let ext = [(0u64, 10u64), (10, 10), (10, data.len() as u64 - 5), (data.len() as u64 - 5, data.len() as u64)];
        let got = crc32c_extents(&data, &ext, &Progress::off());
        for (&(s, e), g) in ext.iter().zip(got) {
            assert_eq!(g, crc32c::crc32c(&data[s as usize..e as usize]));
        }
    }
}
