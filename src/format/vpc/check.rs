//! `check` for VHD. qemu has none for `vpc` (exit 63); this one reports, as corruptions
//! (exit 2): footer and dynamic-header checksums that do not match, a dynamic image's
//! two footer copies that differ, a BAT that does not cover the disk or leaves the file,
//! blocks past the end of the file, blocks overlapping the metadata or each other,
//! parent locator data outside the file, and a fixed image shorter than its disk.
//!
//! The structures are read directly (not through the reader, which refuses the first
//! problem at open), so that every problem is listed.

use super::header::{
    DiskType, DynamicHeader, Footer, LocatorKind, BAT_UNUSED, DYNAMIC_HEADER_SIZE, FOOTER_SIZE,
    MAX_SECTORS, OLD_FOOTER_SIZE, SECTOR,
};
use super::reader::{metadata_regions, read_bat};
use crate::driver::CheckReport;
use crate::error::{Error, Result};
use crate::io::Storage;

fn read(storage: &dyn Storage, buf: &mut [u8], at: u64) -> Result<()> {
    storage
        .read_exact_at(buf, at)
        .map_err(|e| match storage.path() {
            Some(p) => Error::io(p, e),
            None => Error::Stream(e),
        })
}

/// Locates the footer that describes the image (as the reader does) without checking
/// its checksum: its bytes and offset, or `None` when there is no footer at all.
fn locate_footer(storage: &dyn Storage) -> Result<Option<(Vec<u8>, u64)>> {
    let len = storage.len();
    if len < OLD_FOOTER_SIZE as u64 {
        return Ok(None);
    }
    let n = (len as usize).min(FOOTER_SIZE);
    let mut head = vec![0u8; n];
    read(storage, &mut head, 0)?;
    if Footer::has_cookie(&head) && Footer::parse(&head).kind() != Some(DiskType::Fixed) {
        return Ok(Some((head, 0)));
    }
    let mut tail = vec![0u8; n];
    read(storage, &mut tail, len - n as u64)?;
    if Footer::has_cookie(&tail) {
        return Ok(Some((tail, len - n as u64)));
    }
    if n == FOOTER_SIZE && Footer::has_cookie(&tail[1..]) {
        return Ok(Some((tail[1..].to_vec(), len - OLD_FOOTER_SIZE as u64)));
    }
    Ok(None)
}

/// Checks the VHD image in `storage`. Fails only when no footer is found at all (not a
/// VHD) or on an I/O error.
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let Some((raw, at)) = locate_footer(storage)? else {
        return Err(Error::corrupt(
            "vpc",
            "footer",
            0,
            "no \"conectix\" footer at offset 0 nor in the last 512 bytes of the file",
        ));
    };
    let bad = |r: &mut CheckReport, m: String| {
        r.messages.push(format!("ERROR: {m}"));
        r.corruptions += 1;
    };
    let footer = Footer::parse(&raw);
    let want = Footer::computed_checksum(&raw);
    if footer.checksum != want {
        bad(
            &mut r,
            format!(
                "footer at {at:#x}: checksum {:#010x}, the bytes give {want:#010x}",
                footer.checksum
            ),
        );
    }
    let Some(kind) = footer.kind() else {
        bad(
            &mut r,
            format!("footer at {at:#x}: unknown disk type {}", footer.disk_type),
        );
        return Ok(r);
    };
    let size = footer.virtual_size();
    if size > MAX_SECTORS * SECTOR {
        bad(
            &mut r,
            format!("footer: the disk size {size} is larger than 2040 GiB"),
        );
        return Ok(r);
    }
    let len = storage.len();
    if kind == DiskType::Fixed {
        if size > at {
            bad(
                &mut r,
                format!(
                    "the fixed disk is {size} bytes, but the file holds {at} before its footer"
                ),
            );
        }
        return Ok(r);
    }
    if at != 0 {
        bad(
            &mut r,
            format!("the {} image has no footer copy at offset 0", kind.name()),
        );
        return Ok(r);
    }
    // The footer at the end must be the same as the copy at 0 (readers such as
    // dissect.hypervisor only read the one at the end).
    let mut tail = vec![0u8; FOOTER_SIZE];
    if len < 2 * FOOTER_SIZE as u64 {
        bad(
            &mut r,
            "the footer at the end of the file is missing".into(),
        );
    } else {
        read(storage, &mut tail, len - FOOTER_SIZE as u64)?;
        if tail != raw {
            bad(
                &mut r,
                format!(
                    "the footer at the end of the file ({:#x}) differs from the copy at offset 0",
                    len - FOOTER_SIZE as u64
                ),
            );
        }
    }

    let hat = footer.data_offset;
    if hat
        .checked_add(DYNAMIC_HEADER_SIZE as u64)
        .map_or(true, |e| e > len)
    {
        bad(
            &mut r,
            format!("the dynamic disk header offset {hat:#x} is past the end of the file"),
        );
        return Ok(r);
    }
    let mut hraw = [0u8; DYNAMIC_HEADER_SIZE];
    read(storage, &mut hraw, hat)?;
    let h = DynamicHeader::parse(&hraw);
    if &h.cookie != super::header::DYNAMIC_COOKIE {
        bad(
            &mut r,
            format!("dynamic disk header at {hat:#x}: the cookie is not \"cxsparse\""),
        );
        return Ok(r);
    }
    let want = DynamicHeader::computed_checksum(&hraw);
    if h.checksum != want {
        bad(
            &mut r,
            format!(
                "dynamic disk header at {hat:#x}: checksum {:#010x}, the bytes give {want:#010x}",
                h.checksum
            ),
        );
    }
    let bs = h.block_size as u64;
    if !h.block_size.is_power_of_two() || bs < SECTOR {
        bad(
            &mut r,
            format!("dynamic disk header: block size {bs} is not a power of two of at least 512"),
        );
        return Ok(r);
    }
    let entries = h.max_table_entries as u64;
    if entries * bs < size {
        bad(
            &mut r,
            format!("the BAT has {entries} entries, too few for a {size}-byte disk"),
        );
    }
    if h.table_offset
        .checked_add(entries * 4)
        .map_or(true, |e| e > len)
    {
        bad(
            &mut r,
            format!(
                "the BAT at {:#x} ({entries} entries) runs past the end of the file",
                h.table_offset
            ),
        );
        return Ok(r);
    }
    if kind == DiskType::Differencing {
        for (i, l) in h.locators.iter().enumerate() {
            let end = l.data_offset.checked_add(l.data_length as u64);
            if l.kind() != LocatorKind::None && end.map_or(true, |e| e > len) {
                bad(
                    &mut r,
                    format!(
                        "parent locator {i}: its data at {:#x} ({} bytes) is not inside the file",
                        l.data_offset, l.data_length
                    ),
                );
            }
        }
    }
    let bat = read_bat(storage, &h)?;
    let regions = metadata_regions(storage, &h, hat, kind);
    let stride = h.bitmap_size() + bs;
    let mut used: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let start = e as u64 * SECTOR;
        let end = start + stride;
        if end > len {
            bad(
                &mut r,
                format!("block {i} at {start:#x}..{end:#x} is past the end of the file ({len:#x})"),
            );
            continue;
        }
        for reg in regions.iter().filter(|g| start < g.end && g.start < end) {
            bad(
                &mut r,
                format!("block {i} at {start:#x}..{end:#x} overlaps {}", reg.name),
            );
        }
        used.push((start, i));
    }
    r.total_clusters = size.div_ceil(bs);
    r.allocated_clusters = used.len() as u64;
    // Fragmented: a block not stored right after the block before it in the guest.
    let mut prev: Option<u64> = None;
    for &(start, _) in &used {
        if prev.is_some_and(|p| p + stride != start) {
            r.fragmented_clusters += 1;
        }
        prev = Some(start);
    }
    used.sort_unstable();
    let mut reach: Option<(u64, usize)> = None; // furthest block end so far, and its block
    for &(start, i) in &used {
        if let Some((end, j)) = reach {
            if start < end {
                bad(
                    &mut r,
                    format!("block {i} at {start:#x} overlaps block {j}"),
                );
            }
        }
        if reach.map_or(true, |(end, _)| start + stride > end) {
            reach = Some((start + stride, i));
        }
    }
    Ok(r)
}
