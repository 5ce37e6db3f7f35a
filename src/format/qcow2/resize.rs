//! `resize` for qcow2: grows the virtual disk (moving the L1 table when it must grow
//! past its clusters) or shrinks it when nothing allocated lies beyond the new end.
//!
//! When the L1 table moves, the refcount structures are rewritten as a whole at the end
//! of the file from the stored refcounts, with the old L1 table and refcount structures
//! freed; the header is written last, so an interrupted resize leaves the old image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{
    parse_u64_table, refcount_block_entries, refcount_set, serialize_u64_table, AutoclearFeatures,
    Header, IncompatibleFeatures, CRYPT_NONE, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO,
};
use super::refcount::{read_refcounts, OFFSET_MASK_REFTABLE};
use crate::error::{Error, Result};
use crate::io::{read_struct, FileStorage, Storage};
use crate::limits::{MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};

const FMT: &str = "qcow2";

fn write_at(file: &File, buf: &[u8], off: u64, path: &Path) -> Result<()> {
    file.write_all_at(buf, off).map_err(|e| Error::io(path, e))
}

/// Resizes the qcow2 image at `path` to `new_size` bytes. Shrinking needs `shrink` and
/// is refused when any cluster at or beyond the new end is allocated.
pub fn resize(path: &Path, new_size: u64, shrink: bool) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let storage = FileStorage::from_file(
        file.try_clone().map_err(|e| Error::io(path, e))?,
        path.to_path_buf(),
    )?;
    let mut prefix = vec![0u8; 104.min(storage.len() as usize)];
    read_struct(&storage, &mut prefix, 0, FMT, "header")?;
    let need = Header::needed_len(&prefix).min(4096);
    let mut hb = vec![0u8; need];
    read_struct(&storage, &mut hb, 0, FMT, "header")?;
    let mut h = Header::parse(&hb)?;
    if h.unknown_incompatible() != 0 {
        return Err(Error::unsupported(
            FMT,
            format!("incompatible feature bits {:#x}", h.unknown_incompatible()),
        ));
    }
    if h.incompatible_features
        .intersects(IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT)
    {
        return Err(Error::invalid(format!(
            "{}: image is marked dirty or corrupt; repair it (qemu-img check -r all) before resizing",
            path.display()
        )));
    }
    if h.nb_snapshots > 0 {
        return Err(Error::unsupported(
            FMT,
            "resizing an image which has snapshots",
        ));
    }
    if h.crypt_method != CRYPT_NONE {
        return Err(Error::unsupported(FMT, "resizing encrypted images"));
    }
    if h.autoclear_features.contains(AutoclearFeatures::BITMAPS) {
        return Err(Error::unsupported(
            FMT,
            "resizing an image which has persistent bitmaps",
        ));
    }
    if new_size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "qcow2: size {new_size} is too large"
        )));
    }
    let cs = h.cluster_size();
    if new_size % 512 != 0 {
        return Err(Error::invalid(
            "qcow2: the new size must be a multiple of 512 bytes",
        ));
    }
    if h.l1_size as u64 * 8 > MAX_QCOW2_L1_BYTES {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "L1 table",
            size: h.l1_size as u64 * 8,
            limit: MAX_QCOW2_L1_BYTES,
        });
    }
    let mut l1b = vec![0u8; h.l1_size as usize * 8];
    read_struct(&storage, &mut l1b, h.l1_table_offset, FMT, "L1 table")?;
    let l1 = parse_u64_table(&l1b);
    let old = h.size;
    if new_size < old {
        if !shrink {
            return Err(Error::invalid(
                "use the --shrink option to perform a shrink operation",
            ));
        }
        check_nothing_beyond(&storage, &h, &l1, new_size)?;
    }
    if new_size > old && h.backing_file_offset != 0 {
        refuse_growing_over_backing(&storage, &h, path)?;
    }
    let new_l1 = new_size.div_ceil(h.bytes_per_l1_entry());
    if new_l1 * 8 > MAX_QCOW2_L1_BYTES {
        return Err(Error::invalid(format!(
            "qcow2: {new_size} bytes need an L1 table larger than {MAX_QCOW2_L1_BYTES} bytes with {cs}-byte clusters"
        )));
    }
    if new_l1 > h.l1_size as u64 {
        let capacity = (h.l1_size as u64 * 8).div_ceil(cs) * cs / 8;
        if new_l1 <= capacity && h.l1_table_offset != 0 {
            // The L1 clusters have room: clear the new entries.
            let zeros = vec![0u8; ((new_l1 - h.l1_size as u64) * 8) as usize];
            write_at(
                &file,
                &zeros,
                h.l1_table_offset + h.l1_size as u64 * 8,
                path,
            )?;
        } else {
            relocate_l1(&file, path, &storage, &mut h, &l1, new_l1)?;
        }
        h.l1_size = new_l1 as u32;
    }
    file.sync_data().map_err(|e| Error::io(path, e))?;
    h.size = new_size;
    write_at(&file, &h.serialize(), 0, path)?;
    file.sync_data().map_err(|e| Error::io(path, e))
}

/// Growing leaves the new area unallocated; where the backing file is longer than the
/// old size, that area would show the backing file's data instead of zeros (QEMU writes
/// zero clusters there). That case is refused.
fn refuse_growing_over_backing(storage: &dyn Storage, h: &Header, path: &Path) -> Result<()> {
    let len = h
        .backing_file_size
        .min(super::header::MAX_BACKING_FILE_NAME) as usize;
    let mut name = vec![0u8; len];
    read_struct(
        storage,
        &mut name,
        h.backing_file_offset,
        FMT,
        "backing file name",
    )?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let p = Path::new(&name);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        path.parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    };
    let backing_size = crate::image::open(&full, &crate::image::OpenOptions::trusted())
        .map(|b| b.size())
        .map_err(|e| {
            Error::invalid(format!(
                "qcow2: cannot open backing file {name:?} to check its size: {e}"
            ))
        })?;
    if backing_size > h.size {
        return Err(Error::unsupported(
            FMT,
            format!(
                "growing an image whose backing file {name:?} is longer than it ({backing_size} > {} bytes): the new area would show the backing file's data",
                h.size
            ),
        ));
    }
    Ok(())
}

/// Fails when a guest cluster at or beyond `new_size` (or the cluster the new end cuts
/// through) has an L2 entry.
fn check_nothing_beyond(
    storage: &dyn Storage,
    h: &Header,
    l1: &[u64],
    new_size: u64,
) -> Result<()> {
    let cs = h.cluster_size();
    let per_l2 = h.l2_entries();
    let first = new_size / cs; // first cluster not wholly kept
    let per = h.l2_entry_size() / 8;
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        let base = i as u64 * per_l2;
        if l2_off == 0 || base + per_l2 <= first {
            continue;
        }
        let mut b = vec![0u8; cs as usize];
        read_struct(storage, &mut b, l2_off, FMT, "L2 table")?;
        let t = parse_u64_table(&b);
        let start = first.saturating_sub(base);
        for j in start..per_l2 {
            let k = (j * per) as usize;
            // Entries that read as zero (even over a preallocated cluster, which
            // stays referenced) hold nothing to lose.
            let holds_data = if per == 2 {
                t[k + 1] & 0xffff_ffff != 0 || (t[k] & OFLAG_COMPRESSED != 0)
            } else {
                t[k] & OFLAG_COMPRESSED != 0 || (t[k] != 0 && t[k] & OFLAG_ZERO == 0)
            };
            if holds_data {
                return Err(Error::invalid(format!(
                    "qcow2: cannot shrink to {new_size} bytes: guest offset {:#x} is allocated (shrinking would cut off data)",
                    (base + j) * cs
                )));
            }
        }
    }
    Ok(())
}

/// Moves the L1 table to the end of the file with room for `new_l1` entries and
/// rewrites the refcount structures after it.
fn relocate_l1(
    file: &File,
    path: &Path,
    storage: &dyn Storage,
    h: &mut Header,
    l1: &[u64],
    new_l1: u64,
) -> Result<()> {
    let cs = h.cluster_size();
    let order = h.refcount_order;
    let file_clusters = storage.len().div_ceil(cs);
    let (mut counts, table) = read_refcounts(storage, h, file_clusters)?;
    let free = |counts: &mut Vec<u64>, off: u64, len: u64| {
        for c in off / cs..(off + len).div_ceil(cs) {
            if let Some(x) = counts.get_mut(c as usize) {
                *x = x.saturating_sub(1);
            }
        }
    };
    if h.l1_size > 0 {
        free(&mut counts, h.l1_table_offset, h.l1_size as u64 * 8);
    }
    free(
        &mut counts,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    );
    for &e in &table {
        let off = e & OFFSET_MASK_REFTABLE;
        if off != 0 {
            free(&mut counts, off, cs);
        }
    }
    // New L1, then refcount blocks, then the refcount table, all at the end.
    let l1_start = file_clusters;
    let l1_clusters = (new_l1 * 8).div_ceil(cs);
    let per_block = refcount_block_entries(h.cluster_bits, order);
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = l1_start + l1_clusters + blocks + table;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, table) {
            break;
        }
        (blocks, table) = (b, t);
    }
    if table * cs > MAX_QCOW2_REFTABLE_BYTES {
        return Err(Error::invalid(
            "qcow2: the refcount table would grow too large",
        ));
    }
    let rb_start = l1_start + l1_clusters;
    let rt_start = rb_start + blocks;
    let total = rt_start + table;
    counts.resize(total as usize, 0);
    for c in l1_start..total {
        counts[c as usize] = 1;
    }
    let mut rt = vec![0u64; (table * cs / 8) as usize];
    for b in 0..blocks {
        let mut blk = vec![0u8; cs as usize];
        let first = b * per_block;
        for j in 0..per_block.min(total - first) {
            refcount_set(&mut blk, j, order, counts[(first + j) as usize])?;
        }
        let off = (rb_start + b) * cs;
        write_at(file, &blk, off, path)?;
        rt[b as usize] = off;
    }
    write_at(file, &serialize_u64_table(&rt), rt_start * cs, path)?;
    let mut nl1 = l1.to_vec();
    nl1.resize((l1_clusters * cs / 8) as usize, 0);
    // The COPIED bits stay valid: refcounts of L2 tables are unchanged.
    write_at(file, &serialize_u64_table(&nl1), l1_start * cs, path)?;
    h.l1_table_offset = l1_start * cs;
    h.refcount_table_offset = rt_start * cs;
    h.refcount_table_clusters = table as u32;
    Ok(())
}
