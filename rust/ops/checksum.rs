//! CRC-32C of item extents, computed in parallel over fixed-size chunks.

use rayon::prelude::*;

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
    let crcs: Vec<u32> = chunks
        .par_iter()
        .with_min_len(16)
        .map(|&(_, a, b)| {
            let c = crc32c::crc32c(&data[a as usize..b as usize]);
            progress.add(b - a);
            c
        })
        .collect();
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
