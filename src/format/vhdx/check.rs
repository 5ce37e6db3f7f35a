//! `check` for VHDX: what `qemu-img check` verifies (BAT entries inside the file and
//! clear of the log and the regions, a log that needs replaying) and beyond it: headers
//! and the second region table with bad checksums, blocks overlapping each other or the
//! header section, BAT states that are reserved or not allowed for the image's type.
//!
//! The BAT is read through [`reader::parse`] (which replays the log in memory) but not
//! through the reader's own validation, which refuses a bad BAT at open: here every
//! problem is listed. A header section the image cannot be opened without (no valid
//! header, a bad first region table, bad metadata) fails the check instead.

use super::header::{
    bitmap, payload, Header, RegionTable, FORMAT, HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE,
    MIB, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
};
use super::reader::{self, Parsed};
use crate::driver::CheckReport;
use crate::error::Result;
use crate::io::{read_struct, Storage};

/// Checks the VHDX image in `storage`. Fails only when the image cannot be opened at
/// all, or on an I/O error.
pub fn check(storage: std::sync::Arc<dyn Storage>) -> Result<CheckReport> {
    let p = reader::parse(storage.clone())?;
    let mut r = CheckReport::default();
    check_header_section(storage.as_ref(), &p, &mut r)?;
    if let Some(s) = &p.replay {
        r.messages.push(format!(
            "VHDX log holds {} entries (sequence {} at its head) that must be replayed; \
             they are applied in memory whenever the image is read",
            s.entries, s.head_sequence
        ));
        r.corruptions += 1;
    }
    check_bat(&p, &mut r)?;
    Ok(r)
}

/// The header that is not current, and the second region table.
fn check_header_section(storage: &dyn Storage, p: &Parsed, r: &mut CheckReport) -> Result<()> {
    for (i, &at) in HEADER_OFFSETS.iter().enumerate() {
        if !p.headers_valid[i] {
            let mut b = vec![0u8; HEADER_SIZE];
            read_struct(storage, &mut b, at, FORMAT, "header")?;
            let why = if b[..4] != Header::SIGNATURE {
                "signature"
            } else if Header::is_valid(&b) {
                "version"
            } else {
                "CRC-32C checksum"
            };
            r.messages.push(format!(
                "VHDX header {} at {at:#x} is invalid ({why}); header {} is current",
                i + 1,
                p.current_header + 1
            ));
            r.corruptions += 1;
        }
    }
    // The second copy is read through the replayed file too: the log updates both.
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    let at = REGION_TABLE_OFFSETS[1];
    read_struct(p.storage.as_ref(), &mut b, at, FORMAT, "region table")?;
    match RegionTable::parse(&b, at) {
        Ok(t) if t == p.regions => {}
        Ok(_) => {
            r.messages.push(format!(
                "VHDX region table 2 at {at:#x} differs from region table 1"
            ));
            r.corruptions += 1;
        }
        Err(e) => {
            r.messages.push(format!("VHDX region table 2: {e}"));
            r.corruptions += 1;
        }
    }
    Ok(())
}

/// Every BAT entry the geometry needs.
fn check_bat(p: &Parsed, r: &mut CheckReport) -> Result<()> {
    let g = p.geometry;
    let bat = reader::read_bat(p)?;
    let file_len = p.storage.len();
    let reserved = p.reserved_ranges();
    // (start, end, BAT index) of every block in the file, for the overlap scan.
    let mut placed: Vec<(u64, u64, u64)> = Vec::new();
    let mut place = |r: &mut CheckReport, i: u64, off: u64, len: u64| {
        if off < HEADER_SECTION_END {
            r.messages.push(format!(
                "VHDX BAT entry {i} offset {off} points into the header section"
            ));
            r.corruptions += 1;
            return;
        }
        if off >= file_len {
            r.messages.push(format!(
                "VHDX BAT entry {i} start offset {off} points after end of file ({file_len}). Image has probably been truncated."
            ));
            r.corruptions += 1;
            return;
        }
        if off + len > file_len {
            r.messages.push(format!(
                "VHDX BAT entry {i} end offset {} points after end of file ({file_len}). Image has probably been truncated.",
                off + len - 1
            ));
            r.corruptions += 1;
        }
        for (s, e, name) in &reserved {
            if off < *e && *s < off + len {
                r.messages.push(format!(
                    "VHDX BAT entry {i} block at {off:#x} overlaps the {name}"
                ));
                r.corruptions += 1;
            }
        }
        placed.push((off, off + len, i));
    };
    for block in 0..g.payload_blocks {
        let i = g.payload_index(block);
        let e = bat[i as usize];
        match e.state() {
            payload::FULLY_PRESENT => place(r, i, e.offset(), g.block_len(block)),
            payload::PARTIALLY_PRESENT if p.params.has_parent => {
                place(r, i, e.offset(), g.block_len(block));
                let sb = bat[g.bitmap_index(block / g.chunk_ratio) as usize];
                if sb.state() != bitmap::PRESENT {
                    r.messages.push(format!(
                        "VHDX BAT entry {i} is partially present but its sector bitmap block is not"
                    ));
                    r.corruptions += 1;
                }
            }
            s @ (payload::PARTIALLY_PRESENT | 4) => {
                r.messages.push(format!(
                    "VHDX BAT entry {i} has state {s}, which a {} image must not have",
                    p.subformat()
                ));
                r.corruptions += 1;
            }
            _ => {}
        }
    }
    for chunk in 0..g.bitmap_blocks {
        let i = g.bitmap_index(chunk);
        let Some(&e) = bat.get(i as usize) else {
            continue; // a dynamic image's last chunk has no bitmap entry
        };
        match e.state() {
            bitmap::NOT_PRESENT => {}
            bitmap::PRESENT if p.params.has_parent => place(r, i, e.offset(), MIB),
            s => {
                r.messages.push(format!(
                    "VHDX BAT entry {i} (a sector bitmap) has state {s}, which a {} image must not have",
                    p.subformat()
                ));
                r.corruptions += 1;
            }
        }
    }
    // Sweep in file order, remembering the block that reaches furthest.
    placed.sort_unstable();
    let mut reach: Option<(u64, u64)> = None; // (end, BAT index)
    for (start, end, i) in placed {
        if let Some((far, j)) = reach {
            if start < far {
                r.messages.push(format!(
                    "VHDX BAT entries {j} and {i} point to overlapping blocks (at {start:#x})"
                ));
                r.corruptions += 1;
            }
        }
        if reach.map_or(true, |(far, _)| end > far) {
            reach = Some((end, i));
        }
    }
    Ok(())
}
