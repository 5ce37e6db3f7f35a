//! `check` for qcow2: rebuilds every cluster's reference count from the metadata and
//! compares it with the stored refcounts, as `qemu-img check` does.
//!
//! References counted: the header cluster, the active L1 table and its L2 tables and
//! data clusters, every snapshot's L1/L2/data clusters, the snapshot table, the refcount
//! table and blocks, the encryption header and the bitmaps (directory, tables, data).
//! The verdict and the counts (corruptions, leaks, allocated / fragmented / compressed
//! clusters, image end offset) follow QEMU's rules so that both tools agree.

use super::header::{
    parse_extensions, parse_u64_table, AutoclearFeatures, CompressedDescriptor, Header,
    HeaderExtension, IncompatibleFeatures, L2_RESERVED_MASK, OFFSET_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, V2_HEADER_LEN,
};
use super::refcount::{
    read_padded, read_refcount_table, read_refcounts, write_refcount, DenseRefcounts,
    StoredRefcounts, MAX_DENSE_REFCOUNTS, OFFSET_MASK_REFTABLE,
};
use super::snapshot::read_snapshot_table;
use crate::error::{Error, Result};
use crate::io::{read_struct, Storage};
use std::collections::HashMap;

use crate::limits::{MAX_QCOW2_CHECK_BYTES, MAX_QCOW2_L1_BYTES, MAX_QCOW2_SNAPSHOTS};

pub use crate::driver::CheckReport;

/// Clusters per page of [`RefCounts`].
const REF_PAGE: u64 = 4096;

/// References found per cluster, for the clusters that have any: pages of 4096 two-byte
/// counters made on a cluster's first reference (counts of 65535 and more kept aside),
/// at most [`MAX_QCOW2_CHECK_BYTES`] of them — a crafted image whose tables point all
/// over a huge sparse file is refused, not allowed to fill the memory.
struct RefCounts {
    pages: HashMap<u64, Box<[u16]>>,
    big: HashMap<u64, u64>,
    /// Clusters covered: the file's, and one past its end when referenced.
    len: u64,
}

impl RefCounts {
    fn new(clusters: u64) -> Self {
        RefCounts {
            pages: HashMap::new(),
            big: HashMap::new(),
            len: clusters,
        }
    }

    fn get(&self, c: u64) -> u64 {
        match self
            .pages
            .get(&(c / REF_PAGE))
            .map(|p| p[(c % REF_PAGE) as usize])
        {
            None => 0,
            Some(u16::MAX) => self.big.get(&c).copied().unwrap_or(u16::MAX as u64),
            Some(v) => v as u64,
        }
    }

    /// Adds one reference to cluster `c`.
    fn inc(&mut self, c: u64) -> Result<()> {
        let page = c / REF_PAGE;
        if !self.pages.contains_key(&page) {
            let held = (self.pages.len() as u64 + 1) * REF_PAGE * 2;
            if held > MAX_QCOW2_CHECK_BYTES {
                return Err(Error::TooLarge {
                    format: FMT,
                    structure: "reference counts of the clusters the tables point at",
                    size: held,
                    limit: MAX_QCOW2_CHECK_BYTES,
                });
            }
            self.pages
                .insert(page, vec![0u16; REF_PAGE as usize].into_boxed_slice());
        }
        let slot = &mut self.pages.get_mut(&page).expect("inserted above")[(c % REF_PAGE) as usize];
        if *slot == u16::MAX - 1 {
            *slot = u16::MAX;
            self.big.insert(c, u16::MAX as u64);
        } else if *slot == u16::MAX {
            *self.big.entry(c).or_insert(u16::MAX as u64) += 1;
        } else {
            *slot += 1;
        }
        self.len = self.len.max(c + 1);
        Ok(())
    }

    /// True when some cluster of `[first, end)` has a reference.
    fn any_in(&self, first: u64, end: u64) -> bool {
        (first / REF_PAGE..end.div_ceil(REF_PAGE)).any(|p| {
            self.pages.get(&p).is_some_and(|page| {
                let from = first.max(p * REF_PAGE) - p * REF_PAGE;
                let to = end.min((p + 1) * REF_PAGE) - p * REF_PAGE;
                page[from as usize..to as usize].iter().any(|&v| v != 0)
            })
        })
    }
}

struct Checker<'a> {
    storage: &'a dyn Storage,
    h: Header,
    cs: u64,
    file_len: u64,
    /// References found, per cluster.
    refs: RefCounts,
    refcount_max: u64,
    data_file: bool,
    extended: bool,
    /// QEMU's "the refcount structures need rebuilding" condition.
    rebuild: bool,
    /// Bytes of L2 tables that may still be scanned, and the total allowed.
    l2_budget: u64,
    l2_budget_total: u64,
    r: CheckReport,
}

const FMT: &str = "qcow2";

impl Checker<'_> {
    fn msg(&mut self, m: String) {
        self.r.message(m);
    }

    /// [`Checker::msg`] for messages formatted only while they are listed.
    fn msg_with(&mut self, m: impl FnOnce() -> String) {
        if self.r.listing() {
            self.r.message(m());
        }
    }

    /// Counts one reference to every cluster `[offset, offset + size)` touches.
    fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        // The last cluster of the file may be partly allocated, but no more.
        if (offset as i128) + (size as i128) - (self.file_len as i128) >= self.cs as i128 {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.r.corruptions += 1;
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset + size - 1) / self.cs;
        for k in first..=last {
            if self.refs.get(k) >= self.refcount_max {
                let cs = self.cs;
                self.msg_with(|| format!("ERROR: overflow cluster offset={:#x}", k * cs));
                self.r.corruptions += 1;
                continue;
            }
            self.refs.inc(k)?;
        }
        Ok(())
    }

    fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; (entries * 8) as usize];
        read_padded(self.storage, &mut buf, offset)?;
        Ok(parse_u64_table(&buf))
    }

    /// Calls `f(self, entry)` for every entry of the table of `entries` u64 at
    /// `offset`, read 64 KiB at a time (an L1 table may be 32 MiB of a hole).
    fn walk_table(
        &mut self,
        offset: u64,
        entries: u64,
        mut f: impl FnMut(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        const PIECE: u64 = 8192;
        let mut i = 0u64;
        while i < entries {
            let n = PIECE.min(entries - i);
            let t = self.read_table(offset + i * 8, n)?;
            for (k, e) in t.into_iter().enumerate() {
                f(self, i + k as u64, e)?;
            }
            i += n;
        }
        Ok(())
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u64, active: bool) -> Result<()> {
        self.inc(l1_offset, l1_size * 8)?;
        if l1_size == 0 {
            return Ok(());
        }
        self.walk_table(l1_offset, l1_size, |c, _, e| c.check_l1_entry(e, active))
    }

    fn check_l1_entry(&mut self, e: u64, active: bool) -> Result<()> {
        {
            if e == 0 {
                return Ok(());
            }
            if e & super::header::L1_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.r.corruptions += 1;
            }
            let l2_offset = e & OFFSET_MASK;
            self.inc(l2_offset, self.cs)?;
            if l2_offset % self.cs != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.r.corruptions += 1;
            }
            self.check_l2(l2_offset, active)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let per = if self.extended { 2 } else { 1 };
        let n = self.cs / (8 * per);
        // A crafted image can make every L1 entry of every snapshot point at the same
        // L2 table; bound the work by the file size (far above what real images need).
        self.l2_budget = self.l2_budget.checked_sub(self.cs).ok_or(Error::TooLarge {
            format: FMT,
            structure: "L2 tables referenced by the L1 tables",
            size: self.l2_budget_total,
            limit: self.l2_budget_total,
        })?;
        let t = self.read_table(l2_offset, n * per)?;
        let cb = self.h.cluster_bits;
        let mut next_contiguous = 0u64;
        for i in 0..n as usize {
            let mut e = t[i * per as usize];
            let bitmap = if self.extended { t[i * 2 + 1] } else { 0 };
            let compressed = e & OFLAG_COMPRESSED != 0;
            if !compressed && e & L2_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                self.r.corruptions += 1;
            }
            if compressed {
                let d0 = CompressedDescriptor::decode(e & !(OFLAG_COMPRESSED | OFLAG_COPIED), cb);
                if e & OFLAG_COPIED != 0 {
                    self.msg(format!(
                        "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                        d0.host_offset
                    ));
                    e &= !OFLAG_COPIED;
                    self.r.corruptions += 1;
                }
                if self.data_file {
                    self.msg(format!(
                        "ERROR compressed cluster {i} with data file, entry=0x{e:x}"
                    ));
                    self.r.corruptions += 1;
                    continue;
                }
                if bitmap != 0 {
                    self.msg(format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e:x}"
                    ));
                    self.r.corruptions += 1;
                    continue;
                }
                let d = CompressedDescriptor::decode(e & !OFLAG_COMPRESSED, cb);
                self.inc(d.host_offset, d.max_len())?;
                if active {
                    self.r.allocated_clusters += 1;
                    self.r.compressed_clusters += 1;
                    self.r.fragmented_clusters += 1;
                }
                continue;
            }
            let offset = e & OFFSET_MASK;
            let zero_flag = !self.extended && e & OFLAG_ZERO != 0;
            let allocated = offset != 0 || (self.data_file && e & OFLAG_COPIED != 0);
            if !allocated {
                if !zero_flag && bitmap & 0xffff_ffff != 0 {
                    self.msg(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map".into(),
                    );
                    self.r.corruptions += 1;
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.msg(format!(
                    "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
                self.r.corruptions += 1;
            }
            if offset % self.cs != 0 {
                self.r.corruptions += 1;
                let has_data = if self.extended {
                    bitmap & 0xffff_ffff != 0
                } else {
                    !zero_flag
                };
                if has_data {
                    self.msg(format!(
                        "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                    ));
                } else {
                    self.msg(format!(
                        "ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                    ));
                }
            }
            if active {
                self.r.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    self.r.fragmented_clusters += 1;
                }
                next_contiguous = offset + self.cs;
            }
            if !self.data_file {
                self.inc(offset, self.cs)?;
            }
        }
        Ok(())
    }

    /// Bitmaps extension: directory, bitmap tables and their data clusters.
    fn check_bitmaps(&mut self, dir_offset: u64, dir_size: u64, count: u32) -> Result<()> {
        self.inc(dir_offset, dir_size)?;
        if dir_size > 64 << 20 || dir_offset.saturating_add(dir_size) > self.file_len {
            self.msg(format!(
                "ERROR bitmap directory at {dir_offset:#x} ({dir_size} bytes) is outside the image"
            ));
            self.r.corruptions += 1;
            return Ok(());
        }
        let mut dir = vec![0u8; dir_size as usize];
        read_struct(self.storage, &mut dir, dir_offset, FMT, "bitmap directory")?;
        let mut pos = 0usize;
        for _ in 0..count {
            if pos + 24 > dir.len() {
                self.msg("ERROR bitmap directory is truncated".into());
                self.r.corruptions += 1;
                break;
            }
            let be64 = |o: usize| u64::from_be_bytes(dir[o..o + 8].try_into().expect("8"));
            let be32 = |o: usize| u32::from_be_bytes(dir[o..o + 4].try_into().expect("4"));
            let table_offset = be64(pos);
            let table_size = be32(pos + 8) as u64;
            let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra = be32(pos + 20) as usize;
            self.inc(table_offset, table_size * 8)?;
            if table_size * 8 <= MAX_QCOW2_L1_BYTES {
                self.walk_table(table_offset, table_size, |c, _, e| {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        c.inc(off, c.cs)?;
                    }
                    Ok(())
                })?;
            }
            pos = (pos + 24 + extra + name_size).next_multiple_of(8);
        }
        Ok(())
    }

    /// Refcount blocks: each is referenced once, and must lie in the file.
    fn check_refblocks(&mut self, table: &[u64]) -> Result<()> {
        for (i, &e) in table.iter().enumerate() {
            let offset = e & OFFSET_MASK_REFTABLE;
            let cluster = offset / self.cs;
            if e & 0x1ff != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.r.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if offset % self.cs != 0 {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.r.corruptions += 1;
                self.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len {
                self.msg(format!("ERROR refcount block {i} is outside image"));
                self.r.corruptions += 1;
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs)?;
                let c = self.refs.get(cluster);
                if c != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={c}"));
                    self.r.corruptions += 1;
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// The ranges of clusters `[first, end)` to compare, one refcount block each,
    /// leaving out those with neither a stored block nor a reference (a huge sparse
    /// file costs nothing there).
    fn compare_ranges(&self, stored: &StoredRefcounts) -> Vec<(u64, u64)> {
        let per = stored.per_block();
        let n = self.refs.len;
        let mut v = Vec::new();
        let mut b = 0u64;
        while b * per < n {
            let (first, end) = (b * per, ((b + 1) * per).min(n));
            if stored.has_block(b) || self.refs.any_in(first, end) {
                v.push((first, end));
            }
            b += 1;
        }
        v
    }

    /// Stored against computed refcounts; returns the highest cluster in use.
    fn compare(&mut self, stored: &StoredRefcounts) -> Result<u64> {
        let mut highest = 0;
        for (first, end) in self.compare_ranges(stored) {
            for i in first..end {
                if stored.is_unreadable(i) {
                    self.msg_with(|| {
                        format!("Can't get refcount for cluster {i}: Input/output error")
                    });
                    self.r.check_errors += 1;
                    continue;
                }
                let have = stored.get(i)?;
                let want = self.refs.get(i);
                if have > 0 || want > 0 {
                    highest = i;
                }
                if have != want {
                    if have == 0 {
                        self.rebuild = true;
                    }
                    if have < want {
                        self.msg_with(|| {
                            format!("ERROR cluster {i} refcount={have} reference={want}")
                        });
                        self.r.corruptions += 1;
                    } else {
                        self.msg_with(|| {
                            format!("Leaked cluster {i} refcount={have} reference={want}")
                        });
                        self.r.leaks += 1;
                    }
                }
            }
        }
        Ok(highest)
    }

    /// The compare pass with leak repair; returns the highest cluster in use.
    fn repair(
        &mut self,
        stored: &StoredRefcounts,
        file: &crate::io::inplace::InPlaceFile,
        storage: &dyn Storage,
        h: &Header,
    ) -> Result<u64> {
        let mut highest = 0;
        for (first, end) in self.compare_ranges(stored) {
            for i in first..end {
                if stored.is_unreadable(i) {
                    continue;
                }
                let have = stored.get(i)?;
                let want = self.refs.get(i);
                if have != want {
                    if have < want {
                        self.msg_with(|| {
                            format!("ERROR cluster {i} refcount={have} reference={want}")
                        });
                        self.r.corruptions += 1;
                    } else {
                        write_refcount(file, storage, h, &stored.table, i, want)?;
                        self.msg_with(|| {
                            format!("Repairing cluster {i} refcount={have} reference={want}")
                        });
                        self.r.leaks_fixed += 1;
                    }
                }
                if want > 0 || have.min(want) > 0 {
                    highest = i;
                }
            }
        }
        file.sync()?;
        Ok(highest)
    }

    /// COPIED flags of the active tables must say "refcount is exactly 1".
    fn check_copied(&mut self, stored: &StoredRefcounts) -> Result<()> {
        let (offset, size) = (self.h.l1_table_offset, self.h.l1_size as u64);
        self.walk_table(offset, size, |c, i, e| c.check_copied_entry(i, e, stored))
    }

    fn check_copied_entry(&mut self, i: u64, e: u64, stored: &StoredRefcounts) -> Result<()> {
        let per = if self.extended { 2 } else { 1 };
        {
            let l2_offset = e & OFFSET_MASK;
            if l2_offset == 0 {
                return Ok(());
            }
            let c = l2_offset / self.cs;
            if stored.is_unreadable(c) {
                return Ok(());
            }
            let rc = stored.get(c)?;
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                self.msg(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                self.r.corruptions += 1;
            }
            let n = self.cs / (8 * per);
            let t = self.read_table(l2_offset, n * per)?;
            for j in 0..n as usize {
                let e = t[j * per as usize];
                if e & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let off = e & OFFSET_MASK;
                if off == 0 && !(self.data_file && e & OFLAG_COPIED != 0) {
                    continue;
                }
                let rc = if self.data_file {
                    1
                } else {
                    let c = off / self.cs;
                    if stored.is_unreadable(c) {
                        continue;
                    }
                    stored.get(c)?
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.msg_with(|| {
                        format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    });
                    self.r.corruptions += 1;
                }
            }
        }
        Ok(())
    }
}

/// Checks a qcow2 image held in `storage`.
///
/// Fails (rather than reporting) only when the image cannot be checked at all: no qcow2
/// header, tables too large to hold, or an I/O error.
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    check_and_repair(storage, None)
}

/// Checks like [`check`]; with `fix_leaks` (the image opened for writing), lowers the
/// refcount of every leaked cluster to its number of references (`-r leaks`).
pub fn check_and_repair(
    storage: &dyn Storage,
    fix_leaks: Option<&crate::io::inplace::InPlaceFile>,
) -> Result<CheckReport> {
    let (mut c, stored, h) = walk(storage)?;
    let before = (c.r.corruptions, c.r.leaks);
    let mut highest = c.compare(&stored)?;
    let mut stored = stored;
    if fix_leaks.is_some() && c.rebuild {
        // QEMU refuses to repair anything then (only `-r all` rebuilds).
        c.msg("ERROR need to rebuild refcount structures".into());
        c.r.check_errors += 1;
        c.r.repair_failed = true;
        return Ok(c.r);
    }
    if let Some(file) = fix_leaks {
        if c.r.leaks > 0 || c.r.corruptions > 0 {
            // Second pass, as QEMU: repair leaks, report corruptions again.
            (c.r.corruptions, c.r.leaks) = before;
            highest = c.repair(&stored, file, storage, &h)?;
            stored = read_refcount_table(storage, &h)?;
        }
    }
    finish(c, &stored, highest)
}

/// The COPIED-flag pass and the end offset, after the refcounts were compared.
fn finish(mut c: Checker<'_>, stored: &StoredRefcounts, highest: u64) -> Result<CheckReport> {
    c.check_copied(stored)?;
    c.r.image_end_offset = (highest + 1) * c.cs;
    Ok(c.r)
}

/// What a check learns about an image, for the code that changes it in place.
pub(crate) struct Analysis {
    /// The check's verdict and counters.
    pub report: CheckReport,
    /// References found to each cluster (one per path from an L1 table, as QEMU counts).
    pub refs: Vec<u64>,
    /// The refcounts the image stores, for every cluster of `refs`.
    pub stored: DenseRefcounts,
}

/// Checks the image and keeps the references it counted, in memory for every cluster
/// (at most [`MAX_DENSE_REFCOUNTS`] of them: an in-place change holds them all).
pub(crate) fn analyze(storage: &dyn Storage) -> Result<Analysis> {
    let (mut c, stored, h) = walk(storage)?;
    let n = c.refs.len;
    if n > MAX_DENSE_REFCOUNTS {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "refcounts held to change the image in place",
            size: n * 8,
            limit: MAX_DENSE_REFCOUNTS * 8,
        });
    }
    let highest = c.compare(&stored)?;
    let refs: Vec<u64> = (0..n).map(|i| c.refs.get(i)).collect();
    let mut report = finish(c, &stored, highest)?;
    drop(stored);
    report.messages.shrink_to_fit();
    let (counts, table) = read_refcounts(storage, &h, n)?;
    Ok(Analysis {
        report,
        refs,
        stored: DenseRefcounts { counts, table },
    })
}

/// Reads the header and counts every reference; returns the checker, the stored
/// refcounts (covering every cluster referenced) and the header.
fn walk(storage: &dyn Storage) -> Result<(Checker<'_>, StoredRefcounts<'_>, Header)> {
    let file_len = storage.len();
    let mut prefix = vec![0u8; 104.min(file_len as usize)];
    read_struct(storage, &mut prefix, 0, FMT, "header")?;
    let need = Header::needed_len(&prefix);
    if need > 4096 {
        return Err(Error::corrupt(
            FMT,
            "header",
            100,
            format!("header length {need} is too large"),
        ));
    }
    let mut hb = vec![0u8; need];
    read_struct(storage, &mut hb, 0, FMT, "header")?;
    let h = Header::parse(&hb)?;
    let cs = h.cluster_size();
    if !(9..=21).contains(&h.cluster_bits) {
        return Err(Error::corrupt(
            FMT,
            "header",
            20,
            format!("cluster_bits {} out of range", h.cluster_bits),
        ));
    }
    if h.refcount_order > 6 {
        return Err(Error::corrupt(
            FMT,
            "header",
            96,
            format!("refcount_order {} out of range", h.refcount_order),
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
    if h.nb_snapshots > MAX_QCOW2_SNAPSHOTS {
        return Err(Error::corrupt(
            FMT,
            "header",
            60,
            format!("{} snapshots is too many", h.nb_snapshots),
        ));
    }
    let mut first = vec![0u8; cs.min(file_len) as usize];
    read_struct(storage, &mut first, 0, FMT, "header")?;
    let ext_start = if h.version >= 3 {
        h.header_length as u64
    } else {
        V2_HEADER_LEN as u64
    };
    let ext_end = h.extensions_end(first.len() as u64);
    let exts = if ext_start < ext_end {
        parse_extensions(&first[..ext_end as usize], ext_start).unwrap_or_default()
    } else {
        Vec::new()
    };
    let nb_clusters = file_len.div_ceil(cs);
    if nb_clusters > 1 << 30 {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "refcount check table",
            size: nb_clusters * 8,
            limit: 8 << 30,
        });
    }
    let mut c = Checker {
        storage,
        cs,
        file_len,
        refs: RefCounts::new(nb_clusters),
        refcount_max: super::header::max_refcount(h.refcount_order),
        data_file: h
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
        extended: h.extended_l2(),
        rebuild: false,
        l2_budget: file_len.saturating_mul(256).saturating_add(1 << 30),
        l2_budget_total: file_len.saturating_mul(256).saturating_add(1 << 30),
        r: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        },
        h: h.clone(),
    };
    let table = read_snapshot_table(storage, h.snapshots_offset, h.nb_snapshots)?;
    let (snapshots, snapshots_size) = (table.entries, table.size);
    if h.version >= 3 {
        // v3 entries must carry the 64-bit VM state size and the disk size.
        for (i, sn) in snapshots.iter().enumerate() {
            if sn.extra.len() < 16 {
                c.msg(format!("ERROR snapshot table entry {i} is incomplete"));
                c.r.corruptions += 1;
            }
        }
    }
    c.inc(0, cs)?;
    c.check_l1(h.l1_table_offset, h.l1_size as u64, true)?;
    // Each snapshot has its own L1 table in the file: together they cannot be larger.
    let snap_l1_bytes: u64 = snapshots
        .iter()
        .filter(|sn| sn.l1_table_offset % cs == 0 && sn.l1_size as u64 * 8 <= MAX_QCOW2_L1_BYTES)
        .map(|sn| sn.l1_size as u64 * 8)
        .sum();
    if snap_l1_bytes > file_len {
        return Err(Error::corrupt(
            FMT,
            "snapshot table",
            h.snapshots_offset,
            format!("snapshot L1 tables total {snap_l1_bytes} bytes, more than the {file_len}-byte file"),
        ));
    }
    for sn in &snapshots {
        if sn.l1_table_offset % cs != 0 {
            c.msg(format!(
                "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                sn.id, sn.name, sn.l1_table_offset
            ));
            c.r.corruptions += 1;
            continue;
        }
        if sn.l1_size as u64 * 8 > MAX_QCOW2_L1_BYTES {
            c.msg(format!(
                "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                sn.id, sn.name, sn.l1_size
            ));
            c.r.corruptions += 1;
            continue;
        }
        c.check_l1(sn.l1_table_offset, sn.l1_size as u64, false)?;
    }
    c.inc(h.snapshots_offset, snapshots_size)?;
    c.inc(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    )?;
    for e in &exts {
        match e {
            HeaderExtension::CryptoHeader { offset, length } => c.inc(*offset, *length)?,
            HeaderExtension::Bitmaps(b)
                if h.autoclear_features.contains(AutoclearFeatures::BITMAPS) =>
            {
                c.check_bitmaps(b.directory_offset, b.directory_size, b.nb_bitmaps)?
            }
            _ => {}
        }
    }
    // Stored refcounts, read a block at a time, for every cluster the references reach
    // (at most one past the end of the file, see `inc`).
    let stored = read_refcount_table(storage, &h)?;
    c.check_refblocks(&stored.table)?;
    Ok((c, stored, h))
}
