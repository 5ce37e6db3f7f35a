//! Persistent dirty bitmaps (`qemu-img bitmap`): added, removed, cleared, enabled,
//! disabled and merged in the qcow2 bitmaps extension, as QEMU stores them.
//!
//! A bitmap has one bit per `granularity` bytes of the disk, stored least significant
//! bit first in data clusters; its bitmap table holds one entry per data cluster (0 for
//! a cluster of zero bits, which has no data cluster). The directory entries are in
//! `header.rs`. Every change goes through a [`Qcow2Edit`] transaction: new bitmap
//! tables and data clusters, a new directory, then the header. Writes that other
//! operations make through the transaction set the bits of the enabled bitmaps, as
//! QEMU's writes do.

use super::edit::Qcow2Edit;
use super::header::{
    parse_u64_table, serialize_u64_table, BitmapDirectoryEntry, BITMAP_FLAG_AUTO,
    BITMAP_FLAG_IN_USE, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES, OFFSET_MASK,
};
use super::FMT;
use crate::error::{Error, Result};

/// Longest bitmap name (QEMU's `BME_MAX_NAME_SIZE`).
pub const MAX_NAME: usize = 1023;
/// Largest bitmap, in bytes of bits (QEMU's `BME_MAX_PHYS_SIZE`).
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
/// Smallest and largest granularity, as log2 of bytes (512 B to 2 GiB).
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// Bitmap type: dirty tracking (the only one).
const TYPE_DIRTY_TRACKING: u8 = 1;

/// A bitmap's bits in memory: one bit per `1 << granularity_bits` bytes of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bits {
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u32,
    /// Bits, least significant first in each byte.
    pub bytes: Vec<u8>,
    /// Number of bits (the disk size over the granularity, rounded up).
    pub len: u64,
    /// The disk size the bits cover.
    pub disk_size: u64,
}

impl Bits {
    /// All-clear bits for a disk of `disk_size` bytes.
    pub fn new(disk_size: u64, granularity_bits: u32) -> Result<Self> {
        let len = disk_size.div_ceil(1u64 << granularity_bits);
        let nbytes = len.div_ceil(8);
        if nbytes > MAX_BITMAP_BYTES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "bitmap",
                size: nbytes,
                limit: MAX_BITMAP_BYTES,
            });
        }
        Ok(Bits {
            granularity_bits,
            bytes: vec![0; nbytes as usize],
            len,
            disk_size,
        })
    }

    /// Bit `i`.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Sets the bits covering guest bytes `[offset, offset + len)`.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity_bits;
        let first = offset >> g;
        let last = ((offset + len - 1) >> g).min(self.len.saturating_sub(1));
        for i in first..=last.max(first) {
            if i < self.len {
                self.bytes[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
    }

    /// ORs `other` in, bit by bit where the granularities agree, else by the guest
    /// ranges its set bits cover.
    pub fn merge(&mut self, other: &Bits) {
        if other.granularity_bits == self.granularity_bits {
            for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
                *a |= b;
            }
            return;
        }
        let g = other.granularity_bits;
        for i in 0..other.len {
            if other.get(i) {
                self.set_range(i << g, 1 << g);
            }
        }
    }

    /// The bits for a disk of `disk_size` bytes: cut, or extended with clear bits.
    pub fn resize(&mut self, disk_size: u64) -> Result<()> {
        let mut n = Bits::new(disk_size, self.granularity_bits)?;
        let keep = n.len.min(self.len);
        let whole = (keep / 8) as usize;
        n.bytes[..whole].copy_from_slice(&self.bytes[..whole]);
        for i in whole as u64 * 8..keep {
            if self.get(i) {
                n.bytes[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        *self = n;
        Ok(())
    }
}

/// Bitmap table entries needed for `bits` with `cluster_size`-byte data clusters.
fn table_entries(bits: &Bits, cluster_size: u64) -> u64 {
    (bits.bytes.len() as u64).div_ceil(cluster_size)
}

/// The bitmap `e` of the image being edited, read from its table and data clusters.
pub fn load(edit: &Qcow2Edit, e: &BitmapDirectoryEntry) -> Result<Bits> {
    load_for(edit, e, edit.size())
}

/// Bitmap `e`, whose table was sized for a disk of `disk_size` bytes.
fn load_for(edit: &Qcow2Edit, e: &BitmapDirectoryEntry, disk_size: u64) -> Result<Bits> {
    let cs = edit.cluster_size();
    let mut bits = Bits::new(disk_size, e.granularity_bits as u32)?;
    let want = table_entries(&bits, cs);
    if e.table_size as u64 != want {
        return Err(Error::corrupt(
            FMT,
            "bitmap directory entry",
            e.table_offset,
            format!(
                "bitmap '{}' has {} table entries, its disk size needs {want}",
                e.name, e.table_size
            ),
        ));
    }
    let mut tb = vec![0u8; e.table_size as usize * 8];
    edit.file().read_at(&mut tb, e.table_offset)?;
    let mut data = vec![0u8; cs as usize];
    for (k, entry) in parse_u64_table(&tb).into_iter().enumerate() {
        let start = k * cs as usize;
        let end = (start + cs as usize).min(bits.bytes.len());
        let off = entry & OFFSET_MASK;
        if off == 0 {
            if entry & 1 != 0 {
                bits.bytes[start..end].fill(0xff);
            }
            continue;
        }
        edit.file().read_at(&mut data, off)?;
        bits.bytes[start..end].copy_from_slice(&data[..end - start]);
    }
    // Bits past the end of the disk are not part of the bitmap.
    if bits.len % 8 != 0 {
        if let Some(last) = bits.bytes.last_mut() {
            *last &= (1u8 << (bits.len % 8)) - 1;
        }
    }
    Ok(bits)
}

/// Frees bitmap `e`'s table and data clusters (in the new state).
fn free(edit: &mut Qcow2Edit, e: &BitmapDirectoryEntry) -> Result<()> {
    if e.table_offset == 0 {
        return Ok(());
    }
    let mut tb = vec![0u8; e.table_size as usize * 8];
    edit.file().read_at(&mut tb, e.table_offset)?;
    for entry in parse_u64_table(&tb) {
        let off = entry & OFFSET_MASK;
        if off != 0 {
            edit.decref(off)?;
        }
    }
    edit.decref_range(e.table_offset, e.table_size as u64 * 8)
}

/// Writes `bits` as bitmap `e`'s new table and data clusters, freeing the old ones.
fn store(edit: &mut Qcow2Edit, e: &mut BitmapDirectoryEntry, bits: &Bits) -> Result<()> {
    free(edit, e)?;
    let cs = edit.cluster_size() as usize;
    let mut table = Vec::new();
    for chunk in bits.bytes.chunks(cs) {
        if chunk.iter().all(|&b| b == 0) {
            table.push(0);
            continue;
        }
        let mut data = chunk.to_vec();
        data.resize(cs, 0);
        table.push(edit.write_new(&data)?);
    }
    // QEMU allocates the table even when every entry is 0.
    let bytes = serialize_u64_table(&table);
    e.table_offset = if table.is_empty() {
        0
    } else {
        edit.write_new(&bytes)?
    };
    e.table_size = table.len() as u32;
    edit.bitmaps_changed();
    Ok(())
}

/// The index of bitmap `name`, or QEMU's error.
fn find(edit: &Qcow2Edit, name: &str) -> Result<usize> {
    edit.bitmaps
        .iter()
        .position(|b| b.name == name)
        .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{name}' not found")))
}

/// Refuses a bitmap that a crashed writer left marked in use.
fn usable(e: &BitmapDirectoryEntry) -> Result<()> {
    if e.flags & BITMAP_FLAG_IN_USE != 0 {
        return Err(Error::invalid(format!(
            "Bitmap '{}' is inconsistent and cannot be used",
            e.name
        )));
    }
    Ok(())
}

/// QEMU's default granularity for a new bitmap: the cluster size, kept within
/// 4 KiB..64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// Adds the empty, enabled bitmap `name` (`--add [-g GRANULARITY]`).
pub fn add(edit: &mut Qcow2Edit, name: &str, granularity: Option<u64>) -> Result<()> {
    let g = granularity.unwrap_or_else(|| default_granularity(edit.cluster_size()));
    if !g.is_power_of_two()
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&g.trailing_zeros())
    {
        return Err(Error::invalid(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    if edit.header.version < 3 {
        return Err(Error::invalid(format!(
            "Can't make bitmap '{name}' persistent in '{}': Cannot store dirty bitmaps in qcow2 v2 files",
            edit.path().display()
        )));
    }
    if edit.bitmaps.iter().any(|b| b.name == name) {
        return Err(Error::invalid(format!("Bitmap already exists: {name}")));
    }
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Error::invalid(format!(
            "bitmap name must be 1 to {MAX_NAME} bytes long"
        )));
    }
    if edit.bitmaps.len() >= MAX_BITMAPS as usize {
        return Err(Error::invalid(format!(
            "qcow2: the image already has {MAX_BITMAPS} bitmaps"
        )));
    }
    let bits = Bits::new(edit.size(), g.trailing_zeros())?;
    let mut e = BitmapDirectoryEntry {
        table_offset: 0,
        table_size: 0,
        flags: BITMAP_FLAG_AUTO,
        kind: TYPE_DIRTY_TRACKING,
        granularity_bits: g.trailing_zeros() as u8,
        extra: Vec::new(),
        name: name.to_string(),
    };
    store(edit, &mut e, &bits)?;
    let dir: usize = edit
        .bitmaps
        .iter()
        .map(|b| b.serialize().len())
        .sum::<usize>()
        + e.serialize().len();
    if dir as u64 > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(Error::invalid(
            "qcow2: the bitmap directory would be too large",
        ));
    }
    edit.bitmaps.push(e);
    Ok(())
}

/// Removes bitmap `name` and frees its clusters (`--remove`).
pub fn remove(edit: &mut Qcow2Edit, name: &str) -> Result<()> {
    let i = find(edit, name)?;
    let e = edit.bitmaps.remove(i);
    free(edit, &e)?;
    edit.bitmaps_changed();
    Ok(())
}

/// Clears every bit of bitmap `name` (`--clear`).
pub fn clear(edit: &mut Qcow2Edit, name: &str) -> Result<()> {
    let i = find(edit, name)?;
    usable(&edit.bitmaps[i])?;
    let mut e = edit.bitmaps[i].clone();
    let bits = Bits::new(edit.size(), e.granularity_bits as u32)?;
    store(edit, &mut e, &bits)?;
    edit.bitmaps[i] = e;
    Ok(())
}

/// Starts (`true`) or stops recording writes in bitmap `name` (`--enable`,
/// `--disable`).
pub fn set_enabled(edit: &mut Qcow2Edit, name: &str, enabled: bool) -> Result<()> {
    let i = find(edit, name)?;
    usable(&edit.bitmaps[i])?;
    let e = &mut edit.bitmaps[i];
    if enabled {
        e.flags |= BITMAP_FLAG_AUTO;
    } else {
        e.flags &= !BITMAP_FLAG_AUTO;
    }
    edit.bitmaps_changed();
    Ok(())
}

/// ORs `source` (another bitmap's bits) into bitmap `name` (`--merge`).
pub fn merge(edit: &mut Qcow2Edit, name: &str, source: &Bits) -> Result<()> {
    let i = find(edit, name)?;
    usable(&edit.bitmaps[i])?;
    let mut e = edit.bitmaps[i].clone();
    let mut bits = load(edit, &e)?;
    if source.disk_size != bits.disk_size {
        return Err(Error::invalid(
            "Bitmaps are incompatible and can't be merged",
        ));
    }
    bits.merge(source);
    store(edit, &mut e, &bits)?;
    edit.bitmaps[i] = e;
    Ok(())
}

/// The bits of bitmap `name` of the image being edited (a merge source in the same
/// image).
pub fn bits_of(edit: &Qcow2Edit, name: &str) -> Result<Bits> {
    let i = find(edit, name)?;
    usable(&edit.bitmaps[i])?;
    load(edit, &edit.bitmaps[i])
}

/// Commits `edit` ([`Qcow2Edit::commit`]) after setting, in every enabled bitmap, the
/// bits of the guest clusters it wrote — as QEMU's enabled bitmaps record every write.
/// Every in-place change of a qcow2 image ends here.
pub fn commit(mut edit: Qcow2Edit) -> Result<()> {
    if !edit.written_ranges().is_empty() {
        let r = edit
            .lay_out_header()
            .and_then(|()| record_writes(&mut edit));
        if let Err(e) = r {
            // Dropping the transaction abandons it: the old image stays as it was.
            drop(edit);
            return Err(e);
        }
    }
    edit.commit()
}

/// Sets, in every enabled bitmap, the bits of the guest clusters this transaction
/// wrote (called by [`commit`]).
pub(crate) fn record_writes(edit: &mut Qcow2Edit) -> Result<()> {
    let cs = edit.cluster_size();
    let size = edit.size();
    let ranges = edit.written_ranges().to_vec();
    for i in 0..edit.bitmaps.len() {
        let e = edit.bitmaps[i].clone();
        if e.flags & BITMAP_FLAG_AUTO == 0 || e.flags & BITMAP_FLAG_IN_USE != 0 {
            continue;
        }
        let mut bits = load(edit, &e)?;
        for &(gc, n) in &ranges {
            let start = gc * cs;
            if start >= size {
                continue;
            }
            bits.set_range(start, (n * cs).min(size - start));
        }
        let mut e = e;
        store(edit, &mut e, &bits)?;
        edit.bitmaps[i] = e;
    }
    Ok(())
}

/// Follows a change of the disk size from `old_size` to `new_size` in every bitmap
/// (bits cut, or new clear bits).
pub(crate) fn resize_all(edit: &mut Qcow2Edit, old_size: u64, new_size: u64) -> Result<()> {
    if old_size == new_size {
        return Ok(());
    }
    for i in 0..edit.bitmaps.len() {
        let mut e = edit.bitmaps[i].clone();
        if e.flags & BITMAP_FLAG_IN_USE != 0 {
            continue;
        }
        let mut bits = load_for(edit, &e, old_size)?;
        bits.resize(new_size)?;
        store(edit, &mut e, &bits)?;
        edit.bitmaps[i] = e;
    }
    Ok(())
}

/// The bits of bitmap `name` of the qcow2 image in `storage` (opened for reading: a
/// merge source in another image).
pub fn read_from(storage: &dyn crate::io::Storage, name: &str) -> Result<Bits> {
    let m = super::read_metadata(storage)?;
    let e = m
        .bitmaps
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| Error::invalid(format!("Dirty bitmap '{name}' not found")))?;
    usable(e)?;
    let cs = m.header.cluster_size();
    let mut bits = Bits::new(m.header.size, e.granularity_bits as u32)?;
    if e.table_size as u64 != table_entries(&bits, cs) {
        return Err(Error::corrupt(
            FMT,
            "bitmap directory entry",
            e.table_offset,
            format!("bitmap '{name}' has a table of the wrong size"),
        ));
    }
    let mut tb = vec![0u8; e.table_size as usize * 8];
    crate::io::read_struct(storage, &mut tb, e.table_offset, FMT, "bitmap table")?;
    let mut data = vec![0u8; cs as usize];
    for (k, entry) in parse_u64_table(&tb).into_iter().enumerate() {
        let start = k * cs as usize;
        let end = (start + cs as usize).min(bits.bytes.len());
        match entry & OFFSET_MASK {
            0 if entry & 1 != 0 => bits.bytes[start..end].fill(0xff),
            0 => {}
            off => {
                crate::io::read_struct(storage, &mut data, off, FMT, "bitmap data")?;
                bits.bytes[start..end].copy_from_slice(&data[..end - start]);
            }
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_merge_and_resize() {
        let mut a = Bits::new(10 << 20, 16).unwrap(); // 160 bits of 64 KiB
        assert_eq!((a.len, a.bytes.len()), (160, 20));
        a.set_range(65536 * 3 + 5, 65536);
        assert!(!a.get(2) && a.get(3) && a.get(4) && !a.get(5));
        // A coarser source sets every finer bit its range covers.
        let mut b = Bits::new(10 << 20, 20).unwrap(); // 10 bits of 1 MiB
        b.set_range(2 << 20, 1);
        a.merge(&b);
        assert!((32..48).all(|i| a.get(i)) && !a.get(48) && !a.get(31));
        // A finer source sets the coarser bit that covers it.
        let mut c = Bits::new(10 << 20, 20).unwrap();
        c.merge(&a);
        assert!(c.get(0) && c.get(2) && !c.get(1) && !c.get(3));
        // Shrinking cuts, growing adds clear bits.
        c.resize(1 << 20).unwrap();
        assert_eq!(c.len, 1);
        assert!(c.get(0));
        c.resize(5 << 20).unwrap();
        assert!(c.get(0) && !c.get(2) && c.len == 5);
        // Past the end, nothing is set.
        c.set_range(100 << 20, 10);
        assert_eq!(c.bytes, vec![1]);
    }

    #[test]
    fn granularity_defaults_as_qemu() {
        assert_eq!(default_granularity(512), 4096);
        assert_eq!(default_granularity(65536), 65536);
        assert_eq!(default_granularity(2 << 20), 65536);
    }
}
