//! `resize` for qcow2: grows the virtual disk (moving the L1 table when it must grow
//! past its clusters) or shrinks it, discarding what lies beyond the new end as
//! qemu-img does (the user asked for it with `--shrink`).
//!
//! Shrinking first removes the references (L2 entries, then L1 entries of tables wholly
//! past the end), then lowers the refcounts of what they pointed to, then writes the
//! new size: interrupted, it leaves at worst leaked clusters (`check -r leaks`).
//!
//! When the L1 table moves, the refcount structures are rewritten as a whole at the end
//! of the file from the stored refcounts, with the old L1 table and refcount structures
//! freed; the header is written last, so an interrupted resize leaves the old image.

use std::path::Path;

use super::header::{
    parse_u64_table, refcount_block_entries, refcount_set, serialize_u64_table, AutoclearFeatures,
    CompressedDescriptor, Header, IncompatibleFeatures, CRYPT_NONE, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_ZERO,
};
use super::refcount::{read_refcount_table, read_refcounts, write_refcount, OFFSET_MASK_REFTABLE};
use crate::error::{Error, Result};
use crate::image::OpenContext;
use crate::io::inplace::InPlaceFile;
use crate::io::{read_struct, Storage};
use crate::limits::{MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};

const FMT: &str = "qcow2";

fn write_at(file: &InPlaceFile, buf: &[u8], off: u64, _path: &Path) -> Result<()> {
    file.write_at(buf, off)
}

/// Resizes the qcow2 image at `path` to `new_size` bytes. Shrinking needs `shrink` and
/// discards every cluster past the new end. `ctx` (the image's context) opens the
/// backing file when growing must compare with its size.
pub fn resize(path: &Path, new_size: u64, shrink: bool, ctx: &OpenContext) -> Result<()> {
    let file = InPlaceFile::open(path)?;
    let storage = file.storage()?;
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
        discard_beyond(&file, path, &storage, &h, &l1, new_size)?;
    }
    if new_size > old && h.backing_file_offset != 0 {
        refuse_growing_over_backing(&storage, &h, ctx)?;
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
    file.sync()?;
    h.size = new_size;
    write_at(&file, &h.serialize(), 0, path)?;
    file.sync()
}

/// Growing leaves the new area unallocated; where the backing file is longer than the
/// old size, that area would show the backing file's data instead of zeros (QEMU writes
/// zero clusters there). That case is refused.
fn refuse_growing_over_backing(storage: &dyn Storage, h: &Header, ctx: &OpenContext) -> Result<()> {
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
    let backing = ctx
        .open_backing(FMT, super::FIELD_BACKING, &name, None)
        .map_err(|e| {
            Error::invalid(format!(
                "qcow2: cannot open backing file {name:?} to check its size: {e}"
            ))
        })?;
    let Some(backing_size) = backing.map(|b| b.size()) else {
        return Err(Error::invalid(format!(
            "qcow2: backing file {name:?} was not opened (metadata-only context): its size is unknown"
        )));
    };
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

/// Discards the guest clusters past `new_size`: their L2 entries (and the L2 tables
/// wholly past it) are cleared, then the refcounts of the clusters they held lowered.
/// The cluster the new end cuts through is kept, its tail zeroed.
fn discard_beyond(
    file: &InPlaceFile,
    path: &Path,
    storage: &dyn Storage,
    h: &Header,
    l1: &[u64],
    new_size: u64,
) -> Result<()> {
    let cs = h.cluster_size();
    let per_l2 = h.l2_entries();
    let per = (h.l2_entry_size() / 8) as usize;
    let first = new_size.div_ceil(cs); // first guest cluster dropped
    let external = h.has_external_data_file();
    // Host clusters whose refcount drops by one per reference removed.
    let mut freed: Vec<u64> = Vec::new();
    if new_size % cs != 0 && !external {
        zero_cut_cluster(file, path, storage, h, l1, new_size)?;
    }
    for (i, &e) in l1.iter().enumerate() {
        let l2_off = e & OFFSET_MASK;
        let base = i as u64 * per_l2;
        if l2_off == 0 || base + per_l2 <= first {
            continue;
        }
        let mut b = vec![0u8; cs as usize];
        read_struct(storage, &mut b, l2_off, FMT, "L2 table")?;
        let mut t = parse_u64_table(&b);
        let start = first.saturating_sub(base) as usize;
        for j in start..per_l2 as usize {
            let k = j * per;
            let entry = t[k];
            if entry & OFLAG_COMPRESSED != 0 {
                let d = CompressedDescriptor::decode(entry, h.cluster_bits);
                let end = (d.host_offset & !511) + d.sectors * 512;
                freed.extend(d.host_offset / cs..end.div_ceil(cs));
            } else if entry & OFFSET_MASK != 0 && !external {
                freed.push((entry & OFFSET_MASK) / cs);
            }
            for x in &mut t[k..k + per] {
                *x = 0;
            }
        }
        if base >= first {
            // The whole table lies past the end: unlink it from the L1 table.
            write_at(file, &[0u8; 8], h.l1_table_offset + i as u64 * 8, path)?;
            freed.push(l2_off / cs);
        } else {
            write_at(file, &serialize_u64_table(&t), l2_off, path)?;
        }
    }
    file.sync()?;
    if freed.is_empty() {
        return Ok(());
    }
    freed.sort_unstable();
    let file_clusters = storage.len().div_ceil(cs);
    let stored = read_refcount_table(storage, h)?;
    let mut k = 0;
    let mut unreadable = false;
    while k < freed.len() {
        let c = freed[k];
        let n = freed[k..].iter().take_while(|&&x| x == c).count() as u64;
        k += n as usize;
        if stored.is_unreadable(c) {
            unreadable = true;
            continue;
        }
        // Each cluster once: the blocks `stored` keeps never saw this one change.
        let now = stored.get(c)?.saturating_sub(n);
        write_refcount(file, storage, h, &stored.table, c, now)?;
    }
    file.sync()?;
    drop(stored);
    // The file ends after its last cluster in use, as qemu-img leaves it.
    let stored = read_refcount_table(storage, h)?;
    let per = stored.per_block();
    unreadable |= (0..stored.table.len() as u64).any(|b| stored.is_unreadable(b * per));
    if !unreadable {
        let mut last = 0;
        for c in (0..=file_clusters).rev() {
            if stored.get(c)? > 0 {
                last = c + 1;
                break;
            }
        }
        if last * cs < storage.len() {
            file.set_len(last * cs)?;
        }
    }
    Ok(())
}

/// Zeroes the part past `new_size` of the data cluster the new end cuts through, so
/// that growing the image again shows zeros there, not old data.
fn zero_cut_cluster(
    file: &InPlaceFile,
    path: &Path,
    storage: &dyn Storage,
    h: &Header,
    l1: &[u64],
    new_size: u64,
) -> Result<()> {
    let cs = h.cluster_size();
    let cluster = new_size / cs;
    let per_l2 = h.l2_entries();
    let Some(&l1e) = l1.get((cluster / per_l2) as usize) else {
        return Ok(());
    };
    let l2_off = l1e & OFFSET_MASK;
    if l2_off == 0 {
        return Ok(());
    }
    let per = h.l2_entry_size() / 8;
    let mut e = [0u8; 8];
    let at = l2_off + (cluster % per_l2) * per * 8;
    read_struct(storage, &mut e, at, FMT, "L2 table")?;
    let entry = u64::from_be_bytes(e);
    let host = entry & OFFSET_MASK;
    if entry & OFLAG_COMPRESSED != 0 || host == 0 || entry & OFLAG_ZERO != 0 {
        return Ok(());
    }
    let keep = new_size % cs;
    write_at(file, &vec![0u8; (cs - keep) as usize], host + keep, path)
}

/// Moves the L1 table to the end of the file with room for `new_l1` entries and
/// rewrites the refcount structures after it.
fn relocate_l1(
    file: &InPlaceFile,
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
