//! qcow2 refcount structures: sizing, building refcount blocks, reading them all back.
//!
//! The on-disk entry encoding (`refcount_get` / `refcount_set`) lives in `header.rs`;
//! this module holds the logic that walks or produces whole tables.

use std::collections::BTreeMap;

use super::header::{
    max_refcount, parse_u64_table, refcount_block_entries, refcount_get, refcount_set, Header,
};
use crate::error::{Error, Result};
use crate::io::{read_struct, Storage};

/// Refcount blocks and refcount-table clusters needed so that `clusters` clusters,
/// plus the refcount structures themselves, are all covered (QEMU's fixed-point
/// computation in `qcow2_refcount_metadata_size`). Returns `(blocks, table_clusters)`.
pub fn metadata_clusters(clusters: u64, cluster_bits: u32, refcount_order: u32) -> (u64, u64) {
    let per_block = refcount_block_entries(cluster_bits, refcount_order);
    let per_table_cluster = (1u64 << cluster_bits) / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    let mut last = u64::MAX;
    loop {
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        let n = clusters + blocks + table;
        if n == last {
            return (blocks, table);
        }
        last = n;
    }
}

/// Refcounts of a file being written: every cluster counts 1 unless set otherwise.
///
/// Two bytes per cluster up to the last one set (only byte-packed compressed data sets
/// many), with the rare counts of 65535 and more kept aside.
#[derive(Debug, Clone, Default)]
pub struct RefMap {
    dense: Vec<u16>,
    big: BTreeMap<u64, u64>,
}

impl RefMap {
    /// An empty map (every cluster counts 1).
    pub fn new() -> Self {
        RefMap::default()
    }

    /// The refcount of `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        match self.dense.get(cluster as usize) {
            None => 1,
            Some(&u16::MAX) => self.big.get(&cluster).copied().unwrap_or(u16::MAX as u64),
            Some(&v) => v as u64,
        }
    }

    /// Sets the refcount of `cluster`.
    pub fn set(&mut self, cluster: u64, value: u64) {
        let c = cluster as usize;
        if c >= self.dense.len() {
            if value == 1 {
                return;
            }
            self.dense.resize(c + 1, 1);
        }
        if value >= u16::MAX as u64 {
            self.dense[c] = u16::MAX;
            self.big.insert(cluster, value);
        } else {
            self.dense[c] = value as u16;
            self.big.remove(&cluster);
        }
    }

    /// Calls `f(cluster, refcount)` for every cluster in `[first, end)` whose refcount
    /// is not 1.
    fn for_each_exception(&self, first: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        let end = end.min(self.dense.len() as u64);
        for c in first..end {
            if self.dense[c as usize] != 1 {
                f(c, self.get(c));
            }
        }
    }
}

/// Builds refcount blocks for a file whose clusters `0..total` are all in use with
/// refcount 1, except those set otherwise in a [`RefMap`].
pub struct BlockBuilder<'a> {
    cluster_bits: u32,
    order: u32,
    total: u64,
    exceptions: &'a RefMap,
    template: Vec<u8>,
}

impl<'a> BlockBuilder<'a> {
    /// A builder for the given geometry.
    pub fn new(cluster_bits: u32, order: u32, total: u64, exceptions: &'a RefMap) -> Self {
        let cs = 1usize << cluster_bits;
        let mut template = vec![0u8; cs];
        let per_block = refcount_block_entries(cluster_bits, order);
        // A block where every entry is 1: the common case, built once.
        for i in 0..per_block.min(64) {
            let _ = refcount_set(&mut template, i, order, 1);
        }
        let unit = ((64u64 << order) / 8) as usize; // bytes holding 64 entries
        let unit = unit.min(cs);
        let (head, rest) = template.split_at_mut(unit);
        for c in rest.chunks_mut(unit) {
            c.copy_from_slice(&head[..c.len()]);
        }
        BlockBuilder {
            cluster_bits,
            order,
            total,
            exceptions,
            template,
        }
    }

    /// The bytes of refcount block `index`.
    pub fn block(&self, index: u64) -> Result<Vec<u8>> {
        let per_block = refcount_block_entries(self.cluster_bits, self.order);
        let first = index * per_block;
        let mut b = if first + per_block <= self.total {
            self.template.clone()
        } else {
            let mut b = vec![0u8; self.template.len()];
            for i in 0..self.total.saturating_sub(first) {
                refcount_set(&mut b, i, self.order, 1)?;
            }
            b
        };
        let mut err = None;
        self.exceptions
            .for_each_exception(first, first + per_block, |c, r| {
                if err.is_some() {
                    return;
                }
                if r > max_refcount(self.order) {
                    err = Some(Error::invalid(format!(
                        "qcow2: cluster {c} needs refcount {r}, more than {} bits hold",
                        1u32 << self.order
                    )));
                } else if let Err(e) = refcount_set(&mut b, c - first, self.order, r) {
                    err = Some(e);
                }
            });
        if let Some(e) = err {
            return Err(e);
        }
        Ok(b)
    }
}

/// Refcount blocks [`StoredRefcounts`] keeps read (each at most one cluster, 2 MiB).
const STORED_BLOCKS_CACHED: usize = 8;

/// A refcount block read by [`StoredRefcounts`], and when it was last used.
type CachedBlock = (std::rc::Rc<Vec<u8>>, u64);

/// The refcounts an image's refcount structures record, read a block at a time as they
/// are asked for: the refcount table is held (at most
/// [`MAX_QCOW2_REFTABLE_BYTES`](crate::limits::MAX_QCOW2_REFTABLE_BYTES)), the blocks
/// are not (a refcount table may point 8 MiB worth of entries at blocks the file holds
/// as holes).
pub struct StoredRefcounts<'a> {
    storage: &'a dyn Storage,
    cluster_bits: u32,
    order: u32,
    per_block: u64,
    /// The refcount table entries.
    pub table: Vec<u64>,
    cache: std::cell::RefCell<(BTreeMap<u64, CachedBlock>, u64)>,
}

impl StoredRefcounts<'_> {
    /// Clusters one refcount block covers.
    pub fn per_block(&self) -> u64 {
        self.per_block
    }

    /// The block offset for block `index` when it is present and readable.
    fn block_offset(&self, index: u64) -> Option<u64> {
        let off = self.table.get(index as usize)? & OFFSET_MASK_REFTABLE;
        (off != 0 && off % (1u64 << self.cluster_bits) == 0).then_some(off)
    }

    /// True when refcount block `index` exists (readable or not).
    pub fn has_block(&self, index: u64) -> bool {
        self.table
            .get(index as usize)
            .is_some_and(|e| e & OFFSET_MASK_REFTABLE != 0)
    }

    /// The stored refcount of `cluster` (0 where no block covers it, or where the
    /// block cannot be read: see [`StoredRefcounts::is_unreadable`]). Blocks past the
    /// end of the file read as zeros.
    pub fn get(&self, cluster: u64) -> Result<u64> {
        let index = cluster / self.per_block;
        let Some(off) = self.block_offset(index) else {
            return Ok(0);
        };
        let mut c = self.cache.borrow_mut();
        c.1 += 1;
        let tick = c.1;
        if let Some((b, used)) = c.0.get_mut(&index) {
            *used = tick;
            return Ok(refcount_get(b, cluster % self.per_block, self.order));
        }
        let mut block = vec![0u8; 1usize << self.cluster_bits];
        read_padded(self.storage, &mut block, off)?;
        let v = refcount_get(&block, cluster % self.per_block, self.order);
        if c.0.len() >= STORED_BLOCKS_CACHED {
            if let Some(oldest) = c.0.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                c.0.remove(&oldest);
            }
        }
        c.0.insert(index, (std::rc::Rc::new(block), tick));
        Ok(v)
    }

    /// True when the refcount of `cluster` cannot be read (its block's offset is not
    /// aligned).
    pub fn is_unreadable(&self, cluster: u64) -> bool {
        let index = cluster / self.per_block;
        self.has_block(index) && self.block_offset(index).is_none()
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros
/// (as QEMU's file driver does).
pub fn read_padded(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    buf.fill(0);
    let len = storage.len();
    if offset >= len {
        return Ok(());
    }
    let n = ((len - offset) as usize).min(buf.len());
    read_struct(storage, &mut buf[..n], offset, "qcow2", "metadata")
}

/// Reads the refcount table; the blocks are read as [`StoredRefcounts::get`] asks.
pub fn read_refcount_table<'a>(
    storage: &'a dyn Storage,
    h: &Header,
) -> Result<StoredRefcounts<'a>> {
    let cs = h.cluster_size();
    let table_bytes = h.refcount_table_clusters as u64 * cs;
    if table_bytes > crate::limits::MAX_QCOW2_REFTABLE_BYTES {
        return Err(Error::TooLarge {
            format: "qcow2",
            structure: "refcount table",
            size: table_bytes,
            limit: crate::limits::MAX_QCOW2_REFTABLE_BYTES,
        });
    }
    let mut buf = vec![0u8; table_bytes as usize];
    read_padded(storage, &mut buf, h.refcount_table_offset)?;
    Ok(StoredRefcounts {
        storage,
        cluster_bits: h.cluster_bits,
        order: h.refcount_order,
        per_block: refcount_block_entries(h.cluster_bits, h.refcount_order),
        table: parse_u64_table(&buf),
        cache: Default::default(),
    })
}

/// Every cluster's stored refcount held in memory (from [`read_refcounts`]), for code
/// that rewrites the refcount structures anyway (in-place changes).
#[derive(Debug, Clone, Default)]
pub struct DenseRefcounts {
    /// The refcount of each cluster, from cluster 0.
    pub counts: Vec<u64>,
    /// The refcount table entries.
    pub table: Vec<u64>,
}

impl DenseRefcounts {
    /// The stored refcount of `cluster` (0 past the clusters read).
    pub fn get(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }
}

/// Most clusters whose refcounts [`read_refcounts`] holds at once (8 bytes each).
pub const MAX_DENSE_REFCOUNTS: u64 = 16 << 20;

/// Every cluster's refcount, `0..limit`, in memory (for rewriting the refcount
/// structures when resizing moves the L1 table), refused past [`MAX_DENSE_REFCOUNTS`]
/// clusters; and the refcount table.
pub fn read_refcounts(
    storage: &dyn Storage,
    h: &Header,
    limit: u64,
) -> Result<(Vec<u64>, Vec<u64>)> {
    if limit > MAX_DENSE_REFCOUNTS {
        return Err(Error::TooLarge {
            format: "qcow2",
            structure: "refcounts held to rewrite the refcount structures",
            size: limit * 8,
            limit: MAX_DENSE_REFCOUNTS * 8,
        });
    }
    let stored = read_refcount_table(storage, h)?;
    let unaligned = (0..stored.table.len() as u64)
        .any(|i| stored.has_block(i) && stored.block_offset(i).is_none());
    if unaligned {
        return Err(Error::corrupt(
            "qcow2",
            "refcount table",
            h.refcount_table_offset,
            "a refcount block offset is not aligned",
        ));
    }
    let mut counts = vec![0u64; limit as usize];
    for (c, v) in counts.iter_mut().enumerate() {
        *v = stored.get(c as u64)?;
    }
    Ok((counts, stored.table))
}

/// Sets the stored refcount of `cluster` in its refcount block (which must exist),
/// through `file` opened for writing.
pub fn write_refcount(
    file: &crate::io::inplace::InPlaceFile,
    storage: &dyn Storage,
    h: &Header,
    table: &[u64],
    cluster: u64,
    value: u64,
) -> Result<()> {
    let per_block = refcount_block_entries(h.cluster_bits, h.refcount_order);
    let off = table
        .get((cluster / per_block) as usize)
        .map(|e| e & OFFSET_MASK_REFTABLE)
        .filter(|&o| o != 0 && o % h.cluster_size() == 0)
        .ok_or_else(|| {
            Error::corrupt(
                "qcow2",
                "refcount table",
                h.refcount_table_offset,
                format!("no refcount block for cluster {cluster}"),
            )
        })?;
    let mut block = vec![0u8; h.cluster_size() as usize];
    read_struct(storage, &mut block, off, "qcow2", "refcount block")?;
    refcount_set(&mut block, cluster % per_block, h.refcount_order, value)?;
    file.write_at(&block, off)
}

/// Offset bits of a refcount table entry.
pub const OFFSET_MASK_REFTABLE: u64 = !0x1ff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_matches_qemu() {
        // 64 MiB image, 64 KiB clusters: 1027 clusters → 1 block + 1 table cluster.
        assert_eq!(metadata_clusters(1027, 16, 4), (1, 1));
        // A block of 16-bit refcounts covers 32768 clusters; it counts itself.
        assert_eq!(metadata_clusters(32766, 16, 4), (1, 1));
        assert_eq!(metadata_clusters(32767, 16, 4), (2, 1));
        // 512-byte clusters with 64-bit refcounts: 64 entries per block.
        let (b, t) = metadata_clusters(1000, 9, 6);
        assert!(b * 64 >= 1000 + b + t && t * 64 >= b);
    }

    #[test]
    fn blocks_hold_ones_and_exceptions() {
        for order in 0..=6 {
            let mut ex = RefMap::new();
            ex.set(3, 1);
            if order > 0 {
                ex.set(5, 3.min(max_refcount(order)));
            }
            let b = BlockBuilder::new(9, order, 10, &ex);
            let blk = b.block(0).unwrap();
            for i in 0..refcount_block_entries(9, order) {
                let want = match i {
                    5 if order > 0 => 3.min(max_refcount(order)),
                    0..=9 => 1,
                    _ => 0,
                };
                assert_eq!(
                    refcount_get(&blk, i, order),
                    want,
                    "order {order} entry {i}"
                );
            }
        }
        let mut ex = RefMap::new();
        ex.set(0, 2);
        assert!(BlockBuilder::new(9, 0, 1, &ex).block(0).is_err());
        let mut m = RefMap::new();
        m.set(10, 0);
        m.set(11, 70_000);
        m.set(12, 65_535);
        assert_eq!(
            (m.get(9), m.get(10), m.get(11), m.get(12), m.get(99)),
            (1, 0, 70_000, 65_535, 1)
        );
        m.set(11, 2);
        assert_eq!(m.get(11), 2);
    }
}
