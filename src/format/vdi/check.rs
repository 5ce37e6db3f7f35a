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
use crate::limits::MAX_CHECK_MESSAGES;

/// Bytes of block map read at a time.
const MAP_CHUNK: usize = 1 << 20;

/// Counts a block stored past the end of the file, keeping as many as are listed.
fn note_past_eof(list: &mut Vec<(usize, u64)>, count: &mut u64, i: usize, start: u64) {
    *count += 1;
    if list.len() <= MAX_CHECK_MESSAGES {
        list.push((i, start));
    }
}

/// Checks the VDI image in `storage`. Fails only when the header itself is unusable
/// (the image cannot be opened) or on an I/O error.
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    let (_, h) = read_header(storage)?;
    let file_len = storage.len();
    let blocks = h.blocks as usize;
    let mut r = CheckReport::default();
    // `read_header` has checked that the map lies inside the file; it is read a piece
    // at a time. One bit per physical block that can lie in the file (an entry beyond
    // is reported as past the end of the file): already claimed by an earlier entry.
    let physical = (blocks as u64).min(file_len / h.block_stride().max(1) + 1) as usize;
    let mut used = vec![0u64; physical.div_ceil(64)];
    let mut raw = vec![0u8; (blocks * 4).min(MAP_CHUNK)];
    let mut allocated = 0u64;
    let mut past_eof = Vec::new();
    let mut past_eof_count = 0u64;
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
                    let bs = h.block_size as u64;
                    let visible = bs.min(h.disk_size.saturating_sub(i as u64 * bs));
                    let start =
                        h.data_offset as u64 + e as u64 * h.block_stride() + h.block_extra as u64;
                    if (e as usize) >= physical {
                        // Cannot lie in the file (nor be told apart from a duplicate).
                        note_past_eof(&mut past_eof, &mut past_eof_count, i, start);
                    } else if used[w] & bit == 0 {
                        used[w] |= bit;
                        if start + visible > file_len {
                            note_past_eof(&mut past_eof, &mut past_eof_count, i, start);
                        }
                    } else {
                        if r.listing() {
                            r.message(format!("ERROR: block index {e} also used by {e}"));
                        }
                        r.corruptions += 1;
                    }
                } else {
                    if r.listing() {
                        r.message(format!("ERROR: block index {i} too large, is {e}"));
                    }
                    r.corruptions += 1;
                }
            }
            i += 1;
        }
    }
    if allocated != h.blocks_allocated as u64 {
        r.message(format!(
            "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
            h.blocks_allocated
        ));
        r.corruptions += 1;
    }
    // Listed after the map's own problems, as far as messages are listed at all.
    for (i, start) in past_eof {
        r.message(format!(
            "ERROR: block {i} is stored at {start:#x}, past the end of the file ({file_len:#x})"
        ));
    }
    r.corruptions += past_eof_count;
    Ok(r)
}
