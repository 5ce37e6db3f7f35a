//! `check` for VDI: the block map's consistency, as `qemu-img check` verifies it.
//!
//! Every allocated entry must name a physical block inside the image, no two entries
//! may share one, and the header's count of allocated blocks must match the map. The
//! map is read from the header's validated position (not through the reader, which
//! refuses an inconsistent map at open), so that every problem is listed. Beyond QEMU,
//! a block whose data lies past the end of the file is reported too (reading it fails).

use super::header::{parse_block_map, BLOCK_ZERO, FORMAT};
use super::reader::read_header;
use crate::driver::CheckReport;
use crate::error::Result;
use crate::io::{read_struct, Storage};

/// Bytes of block map read at a time.
const MAP_CHUNK: usize = 1 << 20;

/// Checks the VDI image in `storage`. Fails only when the header itself is unusable
/// (the image cannot be opened) or on an I/O error.
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    let (_, h) = read_header(storage)?;
    let file_len = storage.len();
    let blocks = h.blocks as usize;
    let mut r = CheckReport::default();
    // `read_header` has checked that the map lies inside the file, which bounds it.
    // One bit per physical block: already claimed by an earlier map entry.
    let mut used = vec![0u64; blocks.div_ceil(64)];
    let mut raw = vec![0u8; (blocks * 4).min(MAP_CHUNK)];
    let mut allocated = 0u64;
    let mut past_eof = Vec::new();
    let mut i = 0usize;
    while i < blocks {
        let n = ((blocks - i) * 4).min(raw.len());
        read_struct(
            storage,
            &mut raw[..n],
            h.blocks_offset as u64 + i as u64 * 4,
            FORMAT,
            "block map",
        )?;
        for e in parse_block_map(&raw[..n]) {
            if e < BLOCK_ZERO {
                if (e as usize) < blocks {
                    allocated += 1;
                    let (w, bit) = (e as usize / 64, 1u64 << (e % 64));
                    if used[w] & bit == 0 {
                        used[w] |= bit;
                        let bs = h.block_size as u64;
                        let visible = bs.min(h.disk_size.saturating_sub(i as u64 * bs));
                        let start = h.data_offset as u64
                            + e as u64 * h.block_stride()
                            + h.block_extra as u64;
                        if start + visible > file_len {
                            past_eof.push((i, start));
                        }
                    } else {
                        r.messages
                            .push(format!("ERROR: block index {e} also used by {e}"));
                        r.corruptions += 1;
                    }
                } else {
                    r.messages
                        .push(format!("ERROR: block index {i} too large, is {e}"));
                    r.corruptions += 1;
                }
            }
            i += 1;
        }
    }
    if allocated != h.blocks_allocated as u64 {
        r.messages.push(format!(
            "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
            h.blocks_allocated
        ));
        r.corruptions += 1;
    }
    for (i, start) in past_eof {
        r.messages.push(format!(
            "ERROR: block {i} is stored at {start:#x}, past the end of the file ({file_len:#x})"
        ));
        r.corruptions += 1;
    }
    Ok(r)
}
