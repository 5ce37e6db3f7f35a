//! Metadata tables read a page at a time: a qcow2 L1 table, a VMDK grain directory, a
//! VDI block map. A header may declare such a table at up to 1 GiB (a VDI of 2^28
//! blocks) while the file holds it as a hole, or a few KiB of gzip expand to it: the
//! table is walked, never loaded. Pages of [`PAGE_BYTES`] are read on demand and the
//! last few are kept ([`CACHED_PAGES`], at most 2 MiB decoded), which is all a reader
//! walking the disk in ascending order needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::io::{read_struct, Storage};

/// Bytes of the table read at a time.
pub const PAGE_BYTES: u64 = 64 << 10;

/// Pages kept decoded (each at most 128 KiB as `u64`s).
pub const CACHED_PAGES: usize = 16;

/// How entries are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit little-endian (VMDK grain directories, VDI block maps).
    U32Le,
    /// 64-bit little-endian (seSparse grain directories).
    U64Le,
    /// 64-bit big-endian (qcow2 tables).
    U64Be,
}

impl Entry {
    fn bytes(self) -> u64 {
        match self {
            Entry::U32Le => 4,
            Entry::U64Le | Entry::U64Be => 8,
        }
    }

    fn decode(self, raw: &[u8]) -> Vec<u64> {
        match self {
            Entry::U32Le => raw
                .chunks_exact(4)
                .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            Entry::U64Le => raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Entry::U64Be => raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        }
    }
}

struct Cache {
    pages: HashMap<u64, (Arc<[u64]>, u64)>,
    tick: u64,
}

/// A table of `entries` fixed-width integers at `offset` of a storage, read a page at a
/// time. The caller has checked that the table lies inside the storage.
pub struct PagedTable {
    storage: Arc<dyn Storage>,
    offset: u64,
    entries: u64,
    entry: Entry,
    format: &'static str,
    structure: &'static str,
    cache: Mutex<Cache>,
}

impl PagedTable {
    /// The table of `entries` entries of kind `entry` at `offset` of `storage`;
    /// `format` and `structure` name it in errors.
    pub fn new(
        storage: Arc<dyn Storage>,
        offset: u64,
        entries: u64,
        entry: Entry,
        format: &'static str,
        structure: &'static str,
    ) -> Self {
        PagedTable {
            storage,
            offset,
            entries,
            entry,
            format,
            structure,
            cache: Mutex::new(Cache {
                pages: HashMap::new(),
                tick: 0,
            }),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// True when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// File offset of entry `index` (for errors).
    pub fn entry_offset(&self, index: u64) -> u64 {
        self.offset + index * self.entry.bytes()
    }

    fn per_page(&self) -> u64 {
        PAGE_BYTES / self.entry.bytes()
    }

    /// Page `page`, from the cache or the storage.
    fn page(&self, page: u64) -> Result<Arc<[u64]>> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            c.tick += 1;
            let tick = c.tick;
            if let Some((p, used)) = c.pages.get_mut(&page) {
                *used = tick;
                return Ok(p.clone());
            }
        }
        let per = self.per_page();
        let first = page * per;
        let n = per.min(self.entries - first);
        let mut raw = vec![0u8; (n * self.entry.bytes()) as usize];
        read_struct(
            self.storage.as_ref(),
            &mut raw,
            self.entry_offset(first),
            self.format,
            self.structure,
        )?;
        let decoded: Arc<[u64]> = self.entry.decode(&raw).into();
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.pages.len() >= CACHED_PAGES {
            if let Some(oldest) = c.pages.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                c.pages.remove(&oldest);
            }
        }
        let tick = c.tick;
        c.pages.insert(page, (decoded.clone(), tick));
        Ok(decoded)
    }

    /// Entry `index`; 0 past the end of the table.
    pub fn get(&self, index: u64) -> Result<u64> {
        if index >= self.entries {
            return Ok(0);
        }
        let per = self.per_page();
        Ok(self.page(index / per)?[(index % per) as usize])
    }

    /// How many entries from `index` on (at most `max`, and not past the end) satisfy
    /// `keep`: runs of free entries are skipped a page at a time, not one lock each.
    pub fn run_while(&self, index: u64, max: u64, keep: impl Fn(u64) -> bool) -> Result<u64> {
        let end = index.saturating_add(max).min(self.entries);
        let per = self.per_page();
        let mut i = index;
        while i < end {
            let page = self.page(i / per)?;
            let from = (i % per) as usize;
            let to = ((end - (i - i % per)).min(per)) as usize;
            match page[from..to].iter().position(|&e| !keep(e)) {
                Some(k) => return Ok(i + k as u64 - index),
                None => i += (to - from) as u64,
            }
        }
        Ok(i - index)
    }

    /// Calls `f(index, entry)` for every entry in order, reading a page at a time
    /// without caching (a validation pass at open).
    pub fn for_each(&self, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
        let per = self.per_page();
        let mut raw = vec![0u8; (per.min(self.entries) * self.entry.bytes()) as usize];
        let mut first = 0u64;
        while first < self.entries {
            let n = per.min(self.entries - first);
            let bytes = &mut raw[..(n * self.entry.bytes()) as usize];
            read_struct(
                self.storage.as_ref(),
                bytes,
                self.entry_offset(first),
                self.format,
                self.structure,
            )?;
            for (k, e) in self.entry.decode(bytes).into_iter().enumerate() {
                f(first + k as u64, e)?;
            }
            first += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    #[test]
    fn reads_pages_on_demand_and_walks_runs() {
        // 100_000 u32 entries: 7 pages of 16384.
        let n = 100_000u64;
        let mut raw = vec![0u8; 16];
        for i in 0..n {
            let v: u32 = if (50_000..50_010).contains(&i) { 7 } else { 0 };
            raw.extend_from_slice(&v.to_le_bytes());
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(raw));
        let t = PagedTable::new(s, 16, n, Entry::U32Le, "t", "table");
        assert_eq!(t.get(49_999).unwrap(), 0);
        assert_eq!(t.get(50_000).unwrap(), 7);
        assert_eq!(t.get(n).unwrap(), 0);
        assert_eq!(t.run_while(0, u64::MAX, |e| e == 0).unwrap(), 50_000);
        assert_eq!(t.run_while(50_000, 100, |e| e == 7).unwrap(), 10);
        assert_eq!(
            t.run_while(50_010, u64::MAX, |e| e == 0).unwrap(),
            n - 50_010
        );
        assert_eq!(t.run_while(3, 5, |e| e == 0).unwrap(), 5);
        let mut sum = 0;
        t.for_each(|_, e| {
            sum += e;
            Ok(())
        })
        .unwrap();
        assert_eq!(sum, 70);
        assert!(t.cache.lock().unwrap().pages.len() <= CACHED_PAGES);
        // A table running past the end of the storage is a typed error when read.
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new(vec![0u8; 100]));
        let t = PagedTable::new(s, 0, 1000, Entry::U64Be, "t", "table");
        assert!(matches!(
            t.get(999),
            Err(crate::Error::Corrupt {
                structure: "table",
                ..
            })
        ));
    }
}
