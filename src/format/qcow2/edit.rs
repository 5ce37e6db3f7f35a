//! Changing a qcow2 image in place, crash-safely: [`Qcow2Edit`] is one transaction.
//!
//! Nothing the image uses is overwritten before the header is. Every change goes to
//! clusters that are free in the image as it was — new data clusters, copies of the L2
//! tables they change (copy-on-write), a new L1 table, snapshot table, bitmap directory,
//! and new refcount blocks and refcount table for whatever refcounts changed — then the
//! file is flushed, and only then is the header rewritten (one write within the file's
//! first page) to point at the new structures, and flushed again. A crash (SIGKILL,
//! power loss after the flushes) before the header write leaves the old image, intact
//! and consistent (the new clusters are free space past its refcounts); after it, the
//! new one. Clusters the new state no longer uses are free in its refcounts from the
//! start, and the file is cut after its last used cluster at the end.
//!
//! Refcounts are kept in memory for every cluster, starting from the references a full
//! check counts (so a dirty image with lazy refcounts is repaired on the way, and a leak
//! is not carried over), changed as clusters are allocated, copied and freed, and
//! written back as whole refcount blocks: the blocks whose counts differ from the
//! stored ones move to new clusters, with a new refcount table.
//!
//! A cluster's count is the number of paths that reach it, as QEMU and `check` count:
//! a data cluster reached from the active L1 table and from a snapshot's (through one
//! shared L2 table or two) counts 2. The active L1 and L2 tables' COPIED flags are
//! recomputed from the final counts before the commit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use super::check::analyze;
use super::header::{
    default_feature_table, max_refcount, parse_u64_table, refcount_block_entries, refcount_set,
    serialize_extensions, serialize_u64_table, AutoclearFeatures, BitmapDirectoryEntry,
    BitmapsExtension, CompressedDescriptor, Header, HeaderExtension, IncompatibleFeatures,
    OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::refcount::{DenseRefcounts, OFFSET_MASK_REFTABLE};
use super::snapshot::SnapshotEntry;
use super::{read_metadata, FMT};
use crate::error::{Error, Result};
use crate::io::inplace::InPlaceFile;
use crate::io::Storage;
use crate::limits::{MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};

/// Modified L2 tables held in memory before they are written to their (new) clusters.
const L2_CACHE_TABLES: usize = 64;

/// The subcluster bitmap of an extended L2 entry whose 32 subclusters are all allocated.
pub const ALL_ALLOCATED: u64 = 0x0000_0000_ffff_ffff;
/// The subcluster bitmap of an extended L2 entry whose 32 subclusters all read as zero.
pub const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// One guest cluster's L2 entry: the entry word and, with extended L2, the subcluster
/// bitmap (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    /// The L2 entry (first word).
    pub word: u64,
    /// The subcluster bitmap (extended L2 only).
    pub bitmap: u64,
}

/// What a guest cluster is in this image's own layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Nothing here: reads fall through to the backing file (or zeros).
    Unallocated,
    /// Wholly defined here (data, compressed, or zeros).
    Allocated,
    /// Some subclusters defined here, others falling through (extended L2).
    Partial,
}

/// An open transaction on one qcow2 image. See the module documentation.
pub struct Qcow2Edit {
    file: InPlaceFile,
    orig_len: u64,
    cs: u64,
    /// The header of the state being built.
    pub header: Header,
    /// The backing file name the new state records.
    pub backing_file: Option<String>,
    /// The backing file format the new state records.
    pub backing_format: Option<String>,
    data_file: Option<String>,
    /// Extensions kept as they are (unknown ones, the encryption header pointer).
    kept_extensions: Vec<HeaderExtension>,
    /// Bytes of the first cluster the old header, its extensions and names use.
    old_header_end: u64,
    old_header: Header,
    stored: DenseRefcounts,
    /// Clusters the old state uses: never written before the header switch.
    old_used: Vec<bool>,
    /// Refcounts of the state being built.
    counts: Vec<u64>,
    next_free: u64,
    /// The active L1 table of the new state.
    l1: Vec<u64>,
    l1_changed: bool,
    /// Modified L2 tables not yet written, by their (new, private) host offset.
    l2_cache: HashMap<u64, Vec<u64>>,
    /// Unmodified L2 tables recently read (lookups go table by table).
    l2_read_cache: RefCell<HashMap<u64, Rc<[u64]>>>,
    /// The internal snapshots of the new state.
    pub snapshots: Vec<SnapshotEntry>,
    snapshots_changed: bool,
    /// The persistent bitmaps of the new state.
    pub bitmaps: Vec<BitmapDirectoryEntry>,
    bitmaps_changed: bool,
    /// Next free byte of the cluster that compressed data is being packed into.
    compressed_tail: Option<u64>,
    /// Guest clusters written, for the enabled persistent bitmaps.
    written: Vec<(u64, u64)>,
    /// `(offset, size)` of the bitmap directory in the new state, and in the old one.
    bitmap_directory: (u64, u64),
    old_bitmap_directory: (u64, u64),
    /// Move every refcount block, changed or not (see [`Self::relocate_metadata`]).
    rewrite_refcounts: bool,
    committed: bool,
}

fn cluster_bytes(word_count: u64) -> u64 {
    word_count * 8
}

impl Qcow2Edit {
    /// Opens the qcow2 image at `path` for changing: takes the writer's locks, reads and
    /// checks its metadata, and counts every reference.
    ///
    /// Refused: images marked corrupt, encrypted ones, unknown incompatible features,
    /// and images whose check finds corruption (unless only the dirty bit of lazy
    /// refcounts explains it: those refcounts are rebuilt).
    pub fn open(path: &Path) -> Result<Self> {
        let file = InPlaceFile::open(path)?;
        let storage = file.storage()?;
        let m = read_metadata(&storage)?;
        let h = m.header.clone();
        if h.incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
        {
            return Err(Error::unsupported(
                FMT,
                "Image is corrupt; cannot be opened read/write",
            ));
        }
        let dirty = h
            .incompatible_features
            .contains(IncompatibleFeatures::DIRTY);
        let a = analyze(&storage)?;
        if !dirty && (a.report.corruptions > 0 || a.report.check_errors > 0) {
            return Err(Error::corrupt(
                FMT,
                "refcounts",
                h.refcount_table_offset,
                format!(
                    "the image has {} errors (see `check`); refusing to change it in place",
                    a.report.corruptions + a.report.check_errors
                ),
            ));
        }
        let cs = h.cluster_size();
        let orig_len = storage.len();
        let counts = a.refs;
        let old_used = counts.iter().map(|&c| c > 0).collect();
        let mut l1 = Vec::new();
        if h.l1_size > 0 {
            let mut b = vec![0u8; h.l1_size as usize * 8];
            file.read_at(&mut b, h.l1_table_offset)?;
            l1 = parse_u64_table(&b);
        }
        let mut kept_extensions = Vec::new();
        let mut old_header_end = h.extensions_offset();
        for e in &m.extensions {
            old_header_end += 8 + (serialize_extensions(std::slice::from_ref(e)).len() as u64 - 16);
            match e {
                HeaderExtension::Unknown { .. } | HeaderExtension::CryptoHeader { .. } => {
                    kept_extensions.push(e.clone())
                }
                _ => {}
            }
        }
        old_header_end += 8;
        if h.backing_file_offset != 0 {
            old_header_end = old_header_end.max(h.backing_file_offset + h.backing_file_size as u64);
        }
        let bitmap_directory = m
            .extensions
            .iter()
            .find_map(|e| match e {
                HeaderExtension::Bitmaps(b) if !m.bitmaps.is_empty() => {
                    Some((b.directory_offset, b.directory_size))
                }
                _ => None,
            })
            .unwrap_or((0, 0));
        Ok(Qcow2Edit {
            bitmap_directory,
            old_bitmap_directory: bitmap_directory,
            orig_len,
            cs,
            backing_file: m.backing_file.clone(),
            backing_format: m.backing_format.clone(),
            data_file: m.data_file.clone(),
            kept_extensions,
            old_header_end: old_header_end.min(cs),
            old_header: h.clone(),
            stored: a.stored,
            old_used,
            counts,
            next_free: 1,
            l1,
            l1_changed: false,
            l2_cache: HashMap::new(),
            l2_read_cache: RefCell::new(HashMap::new()),
            snapshots: m.snapshots,
            snapshots_changed: false,
            bitmaps: m.bitmaps,
            bitmaps_changed: false,
            compressed_tail: None,
            written: Vec::new(),
            rewrite_refcounts: false,
            committed: false,
            header: h,
            file,
        })
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// The virtual size of the new state.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// True when guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.header.has_external_data_file()
    }

    /// The image file (for reads of metadata this transaction wrote).
    pub(crate) fn file(&self) -> &InPlaceFile {
        &self.file
    }

    /// Renames the external data file the image records (`amend -o data_file=`).
    pub fn set_data_file(&mut self, name: String) {
        self.data_file = Some(name);
    }

    /// Marks the snapshot table as changed (it is rewritten at commit).
    pub fn snapshots_changed(&mut self) {
        self.snapshots_changed = true;
    }

    /// Marks the bitmap directory as changed (it is rewritten at commit).
    pub fn bitmaps_changed(&mut self) {
        self.bitmaps_changed = true;
    }

    /// Guest ranges written by this transaction, `(offset, len)`, in write order.
    pub(crate) fn written_ranges(&self) -> &[(u64, u64)] {
        &self.written
    }

    // ---- refcounts and allocation ----

    fn cluster(&self, offset: u64) -> u64 {
        offset / self.cs
    }

    fn count(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }

    fn old_used(&self, cluster: u64) -> bool {
        self.old_used
            .get(cluster as usize)
            .copied()
            .unwrap_or(false)
    }

    /// True when the cluster at `offset` was allocated by this transaction (the old
    /// state does not use it, so it may be written in place).
    pub(crate) fn is_private(&self, offset: u64) -> bool {
        !self.old_used(self.cluster(offset))
    }

    fn set_count(&mut self, cluster: u64, v: u64) {
        let c = cluster as usize;
        if c >= self.counts.len() {
            self.counts.resize(c + 1, 0);
        }
        self.counts[c] = v;
    }

    /// One more reference to the cluster at `offset`.
    pub(crate) fn incref(&mut self, offset: u64) {
        let c = self.cluster(offset);
        let v = self.count(c);
        self.set_count(c, v + 1);
    }

    /// One reference less to the cluster at `offset`.
    pub(crate) fn decref(&mut self, offset: u64) -> Result<()> {
        let c = self.cluster(offset);
        let v = self.count(c);
        if v == 0 {
            return Err(Error::corrupt(
                FMT,
                "refcounts",
                offset,
                "a cluster is freed more often than it is referenced",
            ));
        }
        self.set_count(c, v - 1);
        if v == 1 {
            // A freed L2 table of this transaction must not be written over whatever
            // takes its cluster next.
            self.l2_cache.remove(&(c * self.cs));
            if !self.old_used(c) && c < self.next_free {
                self.next_free = c;
            }
            // Compressed data is never packed into a cluster that was freed (and may
            // be given to something else).
            if matches!(self.compressed_tail, Some(t) if t > 0 && (t - 1) / self.cs == c) {
                self.compressed_tail = None;
            }
        }
        Ok(())
    }

    /// One reference less to every cluster `[offset, offset + len)` touches (as
    /// `check` counts a table of that size).
    pub(crate) fn decref_range(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in offset / self.cs..=(offset + len - 1) / self.cs {
            self.decref(c * self.cs)?;
        }
        Ok(())
    }

    fn is_free(&self, cluster: u64) -> bool {
        cluster > 0 && !self.old_used(cluster) && self.count(cluster) == 0
    }

    /// Allocates `n` contiguous free clusters (refcount 1 each, for the reference the
    /// caller is about to make) and returns the offset of the first.
    pub(crate) fn alloc(&mut self, n: u64) -> Result<u64> {
        let n = n.max(1);
        let mut start = self.next_free.max(1);
        loop {
            match (start..start + n).find(|&c| !self.is_free(c)) {
                None => break,
                Some(busy) => start = busy + 1,
            }
        }
        let end_offset = (start + n) * self.cs;
        if end_offset > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid("qcow2: the image file would grow too large"));
        }
        for c in start..start + n {
            self.set_count(c, 1);
            // A cluster freed and given out again is not the table it once held.
            self.l2_read_cache.get_mut().remove(&(c * self.cs));
        }
        if n == 1 || start == self.next_free {
            self.next_free = start + n;
        }
        Ok(start * self.cs)
    }

    // ---- L1 and L2 tables ----

    fn words_per_entry(&self) -> u64 {
        self.header.l2_entry_size() / 8
    }

    fn l2_words(&self) -> u64 {
        self.cs / 8
    }

    /// Guest clusters per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.header.l2_entries()
    }

    /// The active L1 table of the new state.
    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Reads the L2 table at `offset` (from this transaction's cache or the file).
    pub(crate) fn read_l2(&self, offset: u64) -> Result<Vec<u64>> {
        self.with_l2(offset, |t| t.to_vec())
    }

    /// Calls `f` with the L2 table at `offset`: the modified copy of this transaction,
    /// or the table on disk (through a small cache of unmodified tables).
    fn with_l2<R>(&self, offset: u64, f: impl FnOnce(&[u64]) -> R) -> Result<R> {
        if let Some(t) = self.l2_cache.get(&offset) {
            return Ok(f(t));
        }
        if offset % self.cs != 0 {
            return Err(Error::corrupt(
                FMT,
                "L2 table",
                offset,
                "table offset is not cluster aligned",
            ));
        }
        let cached = self.l2_read_cache.borrow().get(&offset).cloned();
        let table = match cached {
            Some(t) => t,
            None => {
                let mut b = vec![0u8; self.cs as usize];
                self.file.read_at(&mut b, offset)?;
                let t: Rc<[u64]> = parse_u64_table(&b).into();
                let mut c = self.l2_read_cache.borrow_mut();
                if c.len() >= L2_CACHE_TABLES {
                    c.clear();
                }
                c.insert(offset, t.clone());
                t
            }
        };
        Ok(f(&table))
    }

    fn cache_l2(&mut self, offset: u64, table: Vec<u64>) -> Result<()> {
        if self.l2_cache.len() >= L2_CACHE_TABLES && !self.l2_cache.contains_key(&offset) {
            let victim = *self.l2_cache.keys().next().expect("cache is not empty");
            let t = self.l2_cache.remove(&victim).expect("present");
            self.file.write_at(&serialize_u64_table(&t), victim)?;
        }
        // The modified copy supersedes whatever was read before.
        self.l2_read_cache.get_mut().remove(&offset);
        self.l2_cache.insert(offset, table);
        Ok(())
    }

    fn ensure_l1(&mut self, index: u64) -> Result<()> {
        if index < self.l1.len() as u64 {
            return Ok(());
        }
        if (index + 1) * 8 > MAX_QCOW2_L1_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: the L1 table would exceed {MAX_QCOW2_L1_BYTES} bytes"
            )));
        }
        self.l1.resize(index as usize + 1, 0);
        self.l1_changed = true;
        Ok(())
    }

    /// The L2 table for L1 entry `index`, made private and referenced once (copied when
    /// the old state or a snapshot uses it, created when there is none); returns its
    /// offset, its table being in the cache.
    fn l2_for_update(&mut self, index: u64) -> Result<u64> {
        self.ensure_l1(index)?;
        let old = self.l1[index as usize] & OFFSET_MASK;
        if old != 0 && self.is_private(old) && self.count(self.cluster(old)) == 1 {
            if !self.l2_cache.contains_key(&old) {
                let t = self.read_l2(old)?;
                self.cache_l2(old, t)?;
            }
            return Ok(old);
        }
        let table = if old == 0 {
            vec![0u64; self.l2_words() as usize]
        } else {
            self.read_l2(old)?
        };
        let new = self.alloc(1)?;
        if old != 0 {
            // The copy takes over this L1 entry's path to the table's clusters.
            self.decref(old)?;
        }
        self.cache_l2(new, table)?;
        self.l1[index as usize] = new;
        self.l1_changed = true;
        Ok(new)
    }

    /// Drops every L2 table of the active L1 table and everything they reference: the
    /// active layer becomes empty.
    pub fn drop_active_tables(&mut self) -> Result<()> {
        let w = self.words_per_entry() as usize;
        for i in 0..self.l1.len() {
            let t = self.l1[i] & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let table = self.read_l2(t)?;
            for j in (0..table.len()).step_by(w) {
                self.release_entry(table[j])?;
            }
            if self.count(self.cluster(t)) == 1 {
                self.l2_cache.remove(&t);
            }
            self.decref(t)?;
            self.l1[i] = 0;
            self.l1_changed = true;
            let per = self.l2_entries();
            self.note_written_range(i as u64 * per, per);
        }
        Ok(())
    }

    /// Moves the L1 table and all refcount structures to the first free clusters at
    /// commit (after [`Self::drop_active_tables`], this packs the image at the front).
    pub fn relocate_metadata(&mut self) {
        self.l1_changed = true;
        self.rewrite_refcounts = true;
    }

    /// Replaces the active L1 table (snapshot apply); the caller fixes the counts.
    pub(crate) fn set_l1(&mut self, l1: Vec<u64>) {
        self.l1 = l1;
        self.l1_changed = true;
    }

    /// The L2 entry of guest cluster `gc` in the new state.
    pub fn entry(&self, gc: u64) -> Result<Entry> {
        let per = self.l2_entries();
        let Some(&l1e) = self.l1.get((gc / per) as usize) else {
            return Ok(Entry::default());
        };
        let t = l1e & OFFSET_MASK;
        if t == 0 {
            return Ok(Entry::default());
        }
        self.with_l2(t, |table| self.entry_in(table, gc % per))
    }

    fn entry_in(&self, table: &[u64], j: u64) -> Entry {
        let w = self.words_per_entry();
        Entry {
            word: table[(j * w) as usize],
            bitmap: if w == 2 {
                table[(j * w + 1) as usize]
            } else {
                0
            },
        }
    }

    /// What guest cluster `gc` is in this image's own layer.
    pub fn allocation(&self, gc: u64) -> Result<Allocation> {
        let e = self.entry(gc)?;
        Ok(self.allocation_of(e))
    }

    /// What an entry says about its guest cluster in this image's own layer.
    pub fn allocation_of(&self, e: Entry) -> Allocation {
        if e.word & OFLAG_COMPRESSED != 0 {
            return Allocation::Allocated;
        }
        if self.header.extended_l2() {
            let defined = (e.bitmap as u32) | ((e.bitmap >> 32) as u32);
            return match defined {
                0 => Allocation::Unallocated,
                u32::MAX => Allocation::Allocated,
                _ => Allocation::Partial,
            };
        }
        let zero = e.word & OFLAG_ZERO != 0 && self.header.version >= 3;
        let allocated = e.word & OFFSET_MASK != 0
            || (self.has_data_file() && e.word & OFLAG_COPIED != 0)
            || zero;
        if allocated {
            Allocation::Allocated
        } else {
            Allocation::Unallocated
        }
    }

    /// The host clusters an entry references, as `check` counts them.
    fn entry_clusters(&self, word: u64) -> Vec<u64> {
        if word & OFLAG_COMPRESSED != 0 {
            let d =
                CompressedDescriptor::decode(word & !OFLAG_COMPRESSED, self.header.cluster_bits);
            let end = d.host_offset + d.max_len();
            return (d.host_offset / self.cs..end.div_ceil(self.cs))
                .map(|c| c * self.cs)
                .collect();
        }
        if self.has_data_file() {
            return Vec::new();
        }
        match word & OFFSET_MASK {
            0 => Vec::new(),
            o => vec![o],
        }
    }

    /// One reference less to everything the entry `word` references.
    pub(crate) fn release_entry(&mut self, word: u64) -> Result<()> {
        for o in self.entry_clusters(word) {
            self.decref(o)?;
        }
        Ok(())
    }

    /// One more reference to everything the entry `word` references.
    pub(crate) fn retain_entry(&mut self, word: u64) {
        for o in self.entry_clusters(word) {
            self.incref(o);
        }
    }

    /// Sets the entry of guest cluster `gc`, releasing what the old entry referenced.
    /// The clusters `new` references must already count this reference.
    fn replace_entry(&mut self, gc: u64, new: Entry) -> Result<()> {
        let per = self.l2_entries();
        let t = self.l2_for_update(gc / per)?;
        let w = self.words_per_entry();
        let j = ((gc % per) * w) as usize;
        let table = self.l2_cache.get_mut(&t).expect("cached by l2_for_update");
        let old = table[j];
        table[j] = new.word;
        if w == 2 {
            table[j + 1] = new.bitmap;
        }
        self.release_entry(old)?;
        self.note_written(gc);
        Ok(())
    }

    fn note_written(&mut self, gc: u64) {
        self.note_written_range(gc, 1);
    }

    fn note_written_range(&mut self, gc: u64, n: u64) {
        match self.written.last_mut() {
            Some((start, len)) if *start + *len == gc => *len += n,
            _ => self.written.push((gc, n)),
        }
    }

    // ---- guest data ----

    /// Writes one whole guest cluster `gc` (`data` is one cluster long; past the end
    /// of the disk it is padded with zeros by the caller).
    pub fn write_cluster(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        self.refuse_data_file()?;
        debug_assert_eq!(data.len() as u64, self.cs);
        let e = self.entry(gc)?;
        let host = e.word & OFFSET_MASK;
        let plain = e.word & OFLAG_COMPRESSED == 0 && host != 0;
        let zero_flag = !self.header.extended_l2() && e.word & OFLAG_ZERO != 0;
        let bitmap = if self.header.extended_l2() {
            ALL_ALLOCATED
        } else {
            0
        };
        if plain && !zero_flag && self.is_private(host) && self.count(self.cluster(host)) == 1 {
            // A cluster this transaction wrote: write over it.
            self.file.write_at(data, host)?;
            if e.bitmap != bitmap {
                self.replace_entry_keep(
                    gc,
                    Entry {
                        word: e.word,
                        bitmap,
                    },
                )?;
            }
            self.note_written(gc);
            return Ok(());
        }
        let h = self.alloc(1)?;
        self.file.write_at(data, h)?;
        self.replace_entry(
            gc,
            Entry {
                word: h | OFLAG_COPIED,
                bitmap,
            },
        )
    }

    /// Sets an entry that references the same clusters as before (no count changes).
    fn replace_entry_keep(&mut self, gc: u64, new: Entry) -> Result<()> {
        self.retain_entry(new.word);
        self.replace_entry(gc, new)
    }

    /// Makes guest cluster `gc` read as zeros, whatever the backing file holds: a zero
    /// cluster (v3), or a cluster of zeros (v2 with a backing file), or nothing (v2
    /// without one).
    pub fn write_zero_cluster(&mut self, gc: u64) -> Result<()> {
        if self.header.extended_l2() {
            return self.replace_entry(
                gc,
                Entry {
                    word: 0,
                    bitmap: ALL_ZERO,
                },
            );
        }
        if self.header.version >= 3 {
            return self.replace_entry(
                gc,
                Entry {
                    word: OFLAG_ZERO,
                    bitmap: 0,
                },
            );
        }
        if self.backing_file.is_some() {
            let zeros = vec![0u8; self.cs as usize];
            return self.write_cluster(gc, &zeros);
        }
        self.discard_cluster(gc)
    }

    /// Drops guest cluster `gc` from this layer (it then reads from the backing file).
    pub fn discard_cluster(&mut self, gc: u64) -> Result<()> {
        let e = self.entry(gc)?;
        if e == Entry::default() {
            return Ok(());
        }
        self.replace_entry(gc, Entry::default())
    }

    /// Stores guest cluster `gc` compressed (`compressed` is the encoded cluster, at
    /// most one cluster minus one byte), packed byte by byte after the previous one as
    /// QEMU packs them.
    pub fn write_compressed_cluster(&mut self, gc: u64, compressed: &[u8]) -> Result<()> {
        self.refuse_data_file()?;
        let len = compressed.len() as u64;
        let max = max_refcount(self.header.refcount_order);
        let fits = |s: &Self, t: u64| -> bool {
            let first = t / s.cs;
            let last = (t + len - 1) / s.cs;
            t % s.cs != 0 && s.count(first) < max && (first + 1..=last).all(|c| s.is_free(c))
        };
        let start = match self.compressed_tail {
            Some(t) if fits(self, t) => t,
            _ => {
                let o = self.alloc(len.div_ceil(self.cs))?;
                // The count comes from the compressed clusters that touch it.
                for c in 0..len.div_ceil(self.cs) {
                    self.set_count(o / self.cs + c, 0);
                }
                o
            }
        };
        let Some(d) = CompressedDescriptor::for_data(start, len, self.header.cluster_bits) else {
            // The offset does not fit the descriptor: store it plainly instead.
            return Err(Error::invalid(
                "qcow2: compressed cluster offset out of range",
            ));
        };
        self.file.write_at(compressed, start)?;
        let end = d.host_offset + d.max_len();
        for c in start / self.cs..end.div_ceil(self.cs) {
            self.incref(c * self.cs);
        }
        self.compressed_tail = Some(start + len);
        self.replace_entry(
            gc,
            Entry {
                word: d.encode(self.header.cluster_bits),
                bitmap: 0,
            },
        )
    }

    fn refuse_data_file(&self) -> Result<()> {
        if self.has_data_file() {
            return Err(Error::unsupported(
                FMT,
                "writing guest data into an image with an external data file",
            ));
        }
        Ok(())
    }

    /// Sets the virtual size of the new state. Growing adds unallocated space (the
    /// caller makes sure a longer backing file does not show through); shrinking drops
    /// every cluster past the new end.
    pub fn set_size(&mut self, new_size: u64) -> Result<()> {
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!(
                "qcow2: size {new_size} is too large"
            )));
        }
        let old = self.header.size;
        if new_size < old {
            let first = new_size.div_ceil(self.cs);
            let per = self.l2_entries();
            for i in 0..self.l1.len() as u64 {
                if self.l1[i as usize] & OFFSET_MASK == 0 || (i + 1) * per <= first {
                    continue;
                }
                if i * per >= first {
                    // The whole table lies past the end: this path to it and to all
                    // it references goes.
                    let t = self.l1[i as usize] & OFFSET_MASK;
                    let table = self.read_l2(t)?;
                    for j in (0..table.len()).step_by(self.words_per_entry() as usize) {
                        self.release_entry(table[j])?;
                    }
                    if self.count(self.cluster(t)) == 1 {
                        self.l2_cache.remove(&t);
                    }
                    self.decref(t)?;
                    self.l1[i as usize] = 0;
                    self.l1_changed = true;
                    continue;
                }
                for gc in first..(i + 1) * per {
                    self.discard_cluster(gc)?;
                }
            }
        }
        self.header.size = new_size;
        let need = self.header.min_l1_size();
        if need > self.l1.len() as u64 {
            self.ensure_l1(need - 1)?;
        }
        Ok(())
    }

    // ---- commit ----

    /// The header extensions of the new state, in QEMU's order (`qcow2_update_header`):
    /// backing format, data file, encryption header, feature table (v3 with clusters
    /// above 4 KiB), bitmaps, unknown ones.
    fn extensions(&self) -> Vec<HeaderExtension> {
        let h = &self.header;
        let mut exts = Vec::new();
        if let (Some(f), Some(_)) = (&self.backing_format, &self.backing_file) {
            exts.push(HeaderExtension::BackingFormat(f.clone()));
        }
        if let (Some(d), true) = (&self.data_file, h.has_external_data_file()) {
            exts.push(HeaderExtension::DataFile(d.clone()));
        }
        exts.extend(
            self.kept_extensions
                .iter()
                .filter(|e| matches!(e, HeaderExtension::CryptoHeader { .. }))
                .cloned(),
        );
        if h.version >= 3 && self.cs > 4096 {
            exts.push(HeaderExtension::FeatureTable(default_feature_table()));
        }
        if !self.bitmaps.is_empty() {
            let (offset, size) = self.bitmap_directory;
            exts.push(HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: self.bitmaps.len() as u32,
                reserved: 0,
                directory_size: size,
                directory_offset: offset,
            }));
        }
        exts.extend(
            self.kept_extensions
                .iter()
                .filter(|e| matches!(e, HeaderExtension::Unknown { .. }))
                .cloned(),
        );
        exts
    }

    /// Settles the header fields that follow from the version and the rest of the
    /// state, places the backing file name after the extensions, and checks that it
    /// all fits in the first cluster.
    pub(crate) fn lay_out_header(&mut self) -> Result<()> {
        let has_bitmaps = !self.bitmaps.is_empty();
        let h = &mut self.header;
        if h.version >= 3 {
            if h.header_length < V3_HEADER_LEN {
                h.header_length = V3_HEADER_LEN;
                h.trailing = vec![0; (V3_HEADER_LEN - 105) as usize];
            }
            // Unknown autoclear bits are cleared by any writer, as the spec says.
            h.autoclear_features &= AutoclearFeatures::all();
            h.autoclear_features
                .set(AutoclearFeatures::BITMAPS, has_bitmaps);
            // Refcounts are exact after this transaction.
            h.incompatible_features.remove(IncompatibleFeatures::DIRTY);
        } else {
            h.header_length = V2_HEADER_LEN;
            h.incompatible_features = IncompatibleFeatures::empty();
            h.compatible_features = Default::default();
            h.autoclear_features = AutoclearFeatures::empty();
            h.refcount_order = 4;
            h.compression_type = 0;
        }
        h.nb_snapshots = self.snapshots.len() as u32;
        let name_at =
            h.serialize().len() as u64 + serialize_extensions(&self.extensions()).len() as u64;
        let h = &mut self.header;
        match &self.backing_file {
            Some(b) => {
                h.backing_file_offset = name_at;
                h.backing_file_size = b.len() as u32;
            }
            None => {
                h.backing_file_offset = 0;
                h.backing_file_size = 0;
            }
        }
        let total = name_at + self.backing_file.as_ref().map_or(0, |b| b.len() as u64);
        if total > self.cs {
            return Err(Error::invalid(format!(
                "qcow2: the header, its extensions and the backing file name need {total} bytes, more than the first cluster ({} bytes) holds",
                self.cs
            )));
        }
        Ok(())
    }

    /// The bytes of the first cluster's used part: header, extensions, backing name.
    fn header_bytes(&self) -> Vec<u8> {
        let mut b = self.header.serialize();
        b.extend_from_slice(&serialize_extensions(&self.extensions()));
        if let Some(name) = &self.backing_file {
            b.extend_from_slice(name.as_bytes());
        }
        b
    }

    /// Makes the COPIED flags of the active L1 and L2 tables say "refcount 1" exactly
    /// where it is, copying the L2 tables that the old state still uses.
    fn fix_copied_flags(&mut self) -> Result<()> {
        if self.has_data_file() {
            // Data clusters are not refcounted: their COPIED flag means "allocated",
            // which no transaction here changes.
            return self.fix_l1_flags();
        }
        let w = self.words_per_entry() as usize;
        for i in 0..self.l1.len() {
            let t = self.l1[i] & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let table = self.read_l2(t)?;
            let mut fixed = table.clone();
            for j in (0..fixed.len()).step_by(w) {
                let e = fixed[j];
                let want = if e & OFLAG_COMPRESSED != 0 || e & OFFSET_MASK == 0 {
                    false
                } else {
                    self.count(self.cluster(e & OFFSET_MASK)) == 1
                };
                fixed[j] = if want {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
            }
            if fixed == table {
                continue;
            }
            let t = if self.is_private(t) {
                t
            } else {
                let new = self.alloc(1)?;
                self.decref(t)?;
                self.l1[i] = new;
                self.l1_changed = true;
                new
            };
            self.cache_l2(t, fixed)?;
        }
        self.fix_l1_flags()
    }

    fn fix_l1_flags(&mut self) -> Result<()> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let t = e & OFFSET_MASK;
            let want = if t == 0 {
                0
            } else if self.count(self.cluster(t)) == 1 {
                t | OFLAG_COPIED
            } else {
                t
            };
            if want != e {
                self.l1[i] = want;
                self.l1_changed = true;
            }
        }
        Ok(())
    }

    fn flush_l2_cache(&mut self) -> Result<()> {
        let mut tables: Vec<_> = self.l2_cache.drain().collect();
        tables.sort_by_key(|(o, _)| *o);
        for (o, t) in tables {
            self.file.write_at(&serialize_u64_table(&t), o)?;
        }
        Ok(())
    }

    /// Writes `bytes` to newly allocated contiguous clusters and returns their offset.
    pub(crate) fn write_new(&mut self, bytes: &[u8]) -> Result<u64> {
        let n = (bytes.len() as u64).div_ceil(self.cs);
        let o = self.alloc(n)?;
        if !bytes.is_empty() {
            self.file.write_at(bytes, o)?;
        }
        Ok(o)
    }

    fn place_l1(&mut self) -> Result<()> {
        if !self.l1_changed {
            return Ok(());
        }
        if self.l1.len() as u64 * 8 > MAX_QCOW2_L1_BYTES {
            return Err(Error::invalid("qcow2: the L1 table would be too large"));
        }
        let (old_offset, old_entries) = (
            self.old_header.l1_table_offset,
            self.old_header.l1_size as u64,
        );
        let o = if self.l1.is_empty() {
            0
        } else {
            let mut bytes = serialize_u64_table(&self.l1);
            // Whole clusters, the rest zeros, as QEMU keeps it.
            bytes.resize(bytes.len().next_multiple_of(self.cs as usize), 0);
            self.write_new(&bytes)?
        };
        self.decref_range(old_offset, cluster_bytes(old_entries))?;
        self.header.l1_table_offset = o;
        self.header.l1_size = self.l1.len() as u32;
        Ok(())
    }

    /// The snapshot table as QEMU writes it: entries padded to 8 bytes except the last,
    /// extra data normalised to the 64-bit VM state size, the disk size and the
    /// instruction count (then whatever unknown extra data followed).
    fn snapshot_table_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let n = self.snapshots.len();
        for (i, sn) in self.snapshots.iter().enumerate() {
            let mut sn = sn.clone();
            let mut extra = Vec::with_capacity(24);
            extra.extend_from_slice(&sn.vm_state_size().to_be_bytes());
            extra.extend_from_slice(&sn.disk_size().unwrap_or(self.header.size).to_be_bytes());
            extra.extend_from_slice(&sn.extra_icount().to_be_bytes());
            if sn.extra.len() > 24 {
                extra.extend_from_slice(&sn.extra[24..]);
            }
            sn.extra = extra;
            let b = sn.serialize();
            if i + 1 < n {
                out.extend_from_slice(&b);
            } else {
                out.extend_from_slice(&b[..sn.unpadded_len()]);
            }
        }
        out
    }

    fn place_snapshots(&mut self) -> Result<()> {
        if !self.snapshots_changed {
            return Ok(());
        }
        let old_size = if self.old_header.nb_snapshots > 0 {
            super::snapshot::read_snapshot_table(
                &self.file.storage()?,
                self.old_header.snapshots_offset,
                self.old_header.nb_snapshots,
            )?
            .size
        } else {
            0
        };
        let bytes = self.snapshot_table_bytes();
        let o = if bytes.is_empty() {
            0
        } else {
            self.write_new(&bytes)?
        };
        self.decref_range(self.old_header.snapshots_offset, old_size)?;
        self.header.snapshots_offset = o;
        self.header.nb_snapshots = self.snapshots.len() as u32;
        Ok(())
    }

    fn place_bitmap_directory(&mut self) -> Result<()> {
        if !self.bitmaps_changed {
            return Ok(());
        }
        let (old_off, old_size) = self.old_bitmap_directory;
        let bytes: Vec<u8> = self.bitmaps.iter().flat_map(|b| b.serialize()).collect();
        let o = if bytes.is_empty() {
            0
        } else {
            self.write_new(&bytes)?
        };
        self.decref_range(old_off, old_size)?;
        self.bitmap_directory = (o, bytes.len() as u64);
        Ok(())
    }

    /// Moves every refcount block whose counts changed (all of them when the refcount
    /// width changed) to a new cluster, with a new refcount table when any moved;
    /// writes them. Returns `false` when no refcount changed.
    fn place_refcounts(&mut self) -> Result<bool> {
        let order = self.header.refcount_order;
        // Every block moves when the width changed, or when asked to.
        let width_changed = order != self.old_header.refcount_order || self.rewrite_refcounts;
        let per = refcount_block_entries(self.header.cluster_bits, order);
        let old_table: Vec<u64> = self
            .stored
            .table
            .iter()
            .map(|e| e & OFFSET_MASK_REFTABLE)
            .collect();
        #[derive(Clone, Copy, PartialEq)]
        enum Block {
            Undecided,
            Dropped,
            At(u64),
        }
        let mut blocks: Vec<Block> = Vec::new();
        let mut table: Option<(u64, u64)> = None; // (offset, clusters)
        let old_table_region = (
            self.old_header.refcount_table_offset,
            self.old_header.refcount_table_clusters as u64 * self.cs,
        );
        loop {
            let mut progress = false;
            let used = self
                .counts
                .iter()
                .rposition(|&c| c > 0)
                .map_or(0, |i| i as u64 + 1);
            let mut nblocks = used.div_ceil(per) as usize;
            if !width_changed {
                nblocks = nblocks.max(old_table.len());
            }
            if blocks.len() < nblocks {
                blocks.resize(nblocks, Block::Undecided);
            }
            for b in 0..blocks.len() as u64 {
                // Past both count vectors every cluster counts 0, so only the part of
                // the block below them is looked at (an old table may name thousands of
                // blocks of 2^17 to 2^19 one-bit entries each, nearly all past the file).
                // Taken per block: placing a block allocates, which grows the counts.
                let known = self.counts.len().max(self.stored.counts.len()) as u64;
                let range = (b * per).min(known)..((b + 1) * per).min(known);
                let needed = range.clone().any(|c| self.count(c) > 0);
                let old = if width_changed {
                    None
                } else {
                    old_table.get(b as usize).copied().filter(|&o| o != 0)
                };
                match blocks[b as usize] {
                    Block::At(_) => continue,
                    Block::Dropped if !needed => continue,
                    Block::Dropped => {}
                    Block::Undecided => {
                        let same = !width_changed
                            && old.is_some()
                            && range.clone().all(|c| self.count(c) == self.stored.get(c));
                        if same || (old.is_none() && !needed) {
                            continue;
                        }
                        if let Some(o) = old {
                            self.decref(o)?;
                        }
                        if !needed {
                            blocks[b as usize] = Block::Dropped;
                            progress = true;
                            continue;
                        }
                    }
                }
                let n = self.alloc(1)?;
                blocks[b as usize] = Block::At(n);
                progress = true;
            }
            if width_changed && table.is_none() {
                // Every old block goes, whatever its counts.
                for &o in old_table.iter().filter(|&&o| o != 0) {
                    self.decref(o)?;
                }
            }
            let any_moved = width_changed || blocks.iter().any(|b| *b != Block::Undecided);
            if any_moved {
                let entries = blocks.len() as u64;
                let need = (entries * 8).div_ceil(self.cs).max(1);
                match table {
                    Some((_, have)) if have >= need => {}
                    prev => {
                        if let Some((o, have)) = prev {
                            for c in 0..have {
                                self.decref(o + c * self.cs)?;
                            }
                        } else {
                            self.decref_range(old_table_region.0, old_table_region.1)?;
                        }
                        let clusters = need;
                        if clusters * self.cs > MAX_QCOW2_REFTABLE_BYTES {
                            return Err(Error::invalid(
                                "qcow2: the refcount table would grow too large",
                            ));
                        }
                        let o = self.alloc(clusters)?;
                        table = Some((o, clusters));
                        progress = true;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        let Some((table_offset, table_clusters)) = table else {
            return Ok(false);
        };
        // Counts must fit the refcount width.
        let max = max_refcount(order);
        if let Some(c) = self.counts.iter().position(|&c| c > max) {
            return Err(Error::invalid(format!(
                "qcow2: cluster at offset {:#x} would have a refcount of {}, more than {} bits hold",
                c as u64 * self.cs,
                self.counts[c],
                1u32 << order
            )));
        }
        let mut entries = vec![0u64; (table_clusters * self.cs / 8) as usize];
        for (b, blk) in blocks.iter().enumerate() {
            let at = match *blk {
                Block::At(o) => o,
                Block::Dropped => 0,
                Block::Undecided => old_table.get(b).copied().unwrap_or(0),
            };
            entries[b] = at;
            if let Block::At(o) = *blk {
                let mut data = vec![0u8; self.cs as usize];
                for i in 0..per {
                    let c = b as u64 * per + i;
                    let v = self.count(c);
                    if v != 0 {
                        refcount_set(&mut data, i, order, v)?;
                    }
                }
                self.file.write_at(&data, o)?;
            }
        }
        self.file
            .write_at(&serialize_u64_table(&entries), table_offset)?;
        self.header.refcount_table_offset = table_offset;
        self.header.refcount_table_clusters = table_clusters as u32;
        Ok(true)
    }

    /// Writes the new state: new tables first, a flush, the header, a flush; then cuts
    /// the file after its last used cluster. On error nothing of the old image has
    /// changed (the file is cut back to its old length). Enabled persistent bitmaps are
    /// not told of the writes: [`super::bitmap::commit`] does that, then this.
    pub fn commit(mut self) -> Result<()> {
        let r = self.commit_inner();
        if r.is_err() {
            self.abandon();
        }
        r
    }

    fn commit_inner(&mut self) -> Result<()> {
        self.lay_out_header()?;
        self.fix_copied_flags()?;
        self.flush_l2_cache()?;
        self.place_l1()?;
        self.place_snapshots()?;
        self.place_bitmap_directory()?;
        // The header's length cannot change any more; check it before the switch.
        self.lay_out_header()?;
        self.place_refcounts()?;
        self.file.sync()?;
        let mut bytes = self.header_bytes();
        // Clear what is left of a longer old header (within the first cluster).
        let len = (bytes.len() as u64).max(self.old_header_end).min(self.cs);
        bytes.resize(len as usize, 0);
        self.file.write_at(&bytes, 0)?;
        self.file.sync()?;
        self.committed = true;
        let used = self
            .counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(1, |i| i as u64 + 1);
        let file_len = self.file.file_len()?;
        if file_len > used * self.cs {
            self.file.set_len(used * self.cs)?;
        }
        Ok(())
    }

    /// Gives up the transaction: the old image stays; the file is cut back to its old
    /// length (everything past it belongs to this transaction alone).
    fn abandon(&mut self) {
        if !self.committed {
            if let Ok(len) = self.file.file_len() {
                if len > self.orig_len {
                    let _ = self.file.set_len(self.orig_len);
                }
            }
            self.committed = true;
        }
    }
}

impl Drop for Qcow2Edit {
    fn drop(&mut self) {
        self.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::super::{bitmap, snapshot_edit};
    use super::*;
    use crate::convert::{convert, ConvertOptions};
    use crate::detect::Format;
    use crate::device::BlockDevice;
    use crate::image::OpenOptions;

    const SIZE: u64 = 2 << 20;

    /// A fresh qcow2 image of `SIZE` bytes with `cluster_size`-byte clusters.
    fn new_image(dir: &Path, cluster_size: u64, compat: &str) -> std::path::PathBuf {
        new_image_with(dir, cluster_size, compat, false)
    }

    fn new_image_with(
        dir: &Path,
        cluster_size: u64,
        compat: &str,
        extended_l2: bool,
    ) -> std::path::PathBuf {
        let raw = dir.join("zero.raw");
        std::fs::File::create(&raw).unwrap().set_len(SIZE).unwrap();
        let img = crate::open::open(&raw, &OpenOptions::trusted()).unwrap();
        let out = dir.join("t.qcow2");
        let o = ConvertOptions::new(Format::Qcow2)
            .option("cluster_size", &cluster_size.to_string())
            .option("compat", compat)
            .option("extended_l2", if extended_l2 { "on" } else { "off" });
        convert(&img, &out, &o).unwrap();
        out
    }

    fn read_all(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
        let mut o = OpenOptions::trusted();
        o.snapshot = snapshot.map(str::to_string);
        let img = crate::open::open(path, &o).unwrap();
        let mut b = vec![0u8; img.size() as usize];
        img.device().read_at(&mut b, 0).unwrap();
        b
    }

    fn assert_clean(path: &Path) {
        let s = crate::io::FileStorage::open_image(path, true).unwrap();
        let r = super::super::check::check(&s).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{:?}",
            r.messages
        );
    }

    /// Random transactions of writes, zeroes, discards, compressed clusters, snapshots
    /// and bitmaps, each checked clean and read back against a model of the disk.
    #[test]
    fn random_transactions_keep_the_image_consistent() {
        for (cs, compat, ext) in [
            (4096u64, "1.1", false),
            (512, "0.10", false),
            (65536, "1.1", false),
            (16384, "1.1", true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = new_image_with(dir.path(), cs, compat, ext);
            let mut model = vec![0u8; SIZE as usize];
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            let mut seed = 0x2545_f491_4f6c_dd1du64 ^ cs;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let clusters = SIZE / cs;
            for round in 0..12 {
                let mut e = Qcow2Edit::open(&path).unwrap();
                let v3 = e.header.version >= 3;
                for _ in 0..8 {
                    let gc = next() % clusters;
                    let at = (gc * cs) as usize..((gc + 1) * cs) as usize;
                    match next() % 8 {
                        0..=2 => {
                            let byte = (next() % 250) as u8 + 1;
                            let data = vec![byte; cs as usize];
                            e.write_cluster(gc, &data).unwrap();
                            model[at].fill(byte);
                        }
                        3 if v3 => {
                            e.write_zero_cluster(gc).unwrap();
                            model[at].fill(0);
                        }
                        4 => {
                            e.discard_cluster(gc).unwrap();
                            model[at].fill(0);
                        }
                        5 => {
                            let byte = (next() % 250) as u8 + 1;
                            let data = vec![byte; cs as usize];
                            let enc = super::super::writer::ClusterEncoder::new(
                                cs as usize,
                                Default::default(),
                            );
                            let z = enc.compress(&data).unwrap().unwrap();
                            e.write_compressed_cluster(gc, &z).unwrap();
                            model[at].fill(byte);
                        }
                        _ => {}
                    }
                }
                match round % 4 {
                    0 => {
                        let name = format!("s{round}");
                        snapshot_edit::create(&mut e, &name, (round, 0)).unwrap();
                        snaps.push((name, model.clone()));
                    }
                    1 if !snaps.is_empty() => {
                        let (name, m) = snaps[next() as usize % snaps.len()].clone();
                        snapshot_edit::apply(&mut e, &name).unwrap();
                        model = m;
                    }
                    2 if snaps.len() > 1 => {
                        let (name, _) = snaps.remove(0);
                        snapshot_edit::delete(&mut e, &name).unwrap();
                    }
                    3 if v3 => {
                        let name = format!("b{round}");
                        bitmap::add(&mut e, &name, None).unwrap();
                    }
                    _ => {}
                }
                bitmap::commit(e).unwrap();
                assert_clean(&path);
                assert!(read_all(&path, None) == model, "cs {cs} round {round}");
                for (name, m) in &snaps {
                    assert!(
                        read_all(&path, Some(name)) == *m,
                        "cs {cs} round {round}: snapshot {name}"
                    );
                }
            }
        }
    }

    /// An abandoned transaction leaves the image byte for byte as it was.
    #[test]
    fn dropped_transactions_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), 4096, "1.1");
        let before = std::fs::read(&path).unwrap();
        let mut e = Qcow2Edit::open(&path).unwrap();
        e.write_cluster(3, &[7u8; 4096]).unwrap();
        snapshot_edit::create(&mut e, "x", (0, 0)).unwrap();
        drop(e);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// Refcount widths from 1 to 64 bits, there and back, and counts that do not fit.
    #[test]
    fn refcount_width_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), 4096, "1.1");
        let mut e = Qcow2Edit::open(&path).unwrap();
        for gc in 0..100 {
            e.write_cluster(gc, &[gc as u8 + 1; 4096]).unwrap();
        }
        bitmap::commit(e).unwrap();
        let want = read_all(&path, None);
        for order in [0u32, 6, 1, 5, 2, 3, 4] {
            let mut e = Qcow2Edit::open(&path).unwrap();
            e.header.refcount_order = order;
            bitmap::commit(e).unwrap();
            assert_clean(&path);
            assert!(read_all(&path, None) == want, "order {order}");
        }
        // A snapshot needs refcounts of 2: one bit cannot hold them.
        let mut e = Qcow2Edit::open(&path).unwrap();
        e.header.refcount_order = 0;
        snapshot_edit::create(&mut e, "x", (0, 0)).unwrap();
        assert!(e.commit().is_err());
        assert_clean(&path);
    }
}
