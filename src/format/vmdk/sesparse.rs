//! ESXi seSparse extents (read-only): the constant header, the volatile header, and
//! the 64-bit grain directory and grain tables. The format is undocumented; the checks
//! follow what QEMU accepts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::io::{read_struct, Storage};

use super::header::{FMT, SECTOR, SESPARSE_MAGIC};
use super::sparse::{CacheShare, Grain, GrainSource};
use crate::io::table::{Entry as TableEntry, PagedTable};

/// Version of the constant header QEMU and ESXi write.
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
/// Magic of the volatile header.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xCAFE_CAFE;

/// The constant header at sector 0 (all fields u64; offsets and sizes in sectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeSparseHeader {
    /// [`SESPARSE_VERSION`].
    pub version: u64,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors (8).
    pub grain_size: u64,
    /// Grain-table size in sectors (64).
    pub grain_table_size: u64,
    /// Must be 0.
    pub flags: u64,
    /// Volatile header (offset, size).
    pub volatile_header: (u64, u64),
    /// Grain directory (offset, size).
    pub grain_dir: (u64, u64),
    /// Grain tables area (offset, size).
    pub grain_tables: (u64, u64),
    /// Grains area (offset, size).
    pub grains: (u64, u64),
    /// The four reserved fields (must be 0).
    pub reserved: [u64; 4],
}

impl SeSparseHeader {
    /// Parses the first 512 bytes of a seSparse extent.
    pub fn parse(b: &[u8; 512]) -> Result<Self> {
        let q = |i: usize| LE::read_u64(&b[i * 8..i * 8 + 8]);
        if q(0) != SESPARSE_MAGIC {
            return Err(Error::corrupt(FMT, "seSparse header", 0, "bad magic"));
        }
        Ok(SeSparseHeader {
            version: q(1),
            capacity: q(2),
            grain_size: q(3),
            grain_table_size: q(4),
            flags: q(5),
            reserved: [q(6), q(7), q(8), q(9)],
            volatile_header: (q(10), q(11)),
            grain_dir: (q(16), q(17)),
            grain_tables: (q(18), q(19)),
            grains: (q(24), q(25)),
        })
    }

    /// Entries per grain table.
    pub fn gt_entries(&self) -> u64 {
        self.grain_table_size * SECTOR / 8
    }

    /// Grain-directory entries the capacity needs.
    pub fn needed_gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain_size.max(1))
            .div_ceil(self.gt_entries().max(1))
    }
}

/// An open seSparse extent.
pub struct SeSparseExtent {
    storage: Arc<dyn Storage>,
    header: SeSparseHeader,
    /// The grain directory, checked at open, read a page at a time.
    gd: PagedTable,
    gt_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    /// Grain tables the cache may hold.
    cache_tables: usize,
}

fn bad(structure: &'static str, offset: u64, reason: impl Into<String>) -> Error {
    Error::corrupt(FMT, structure, offset, reason)
}

impl SeSparseExtent {
    /// Opens the seSparse extent in `storage`; its caches may take `cache_bytes`.
    pub fn open(storage: Arc<dyn Storage>, cache_bytes: u64) -> Result<Self> {
        let mut b = [0u8; 512];
        read_struct(storage.as_ref(), &mut b, 0, FMT, "seSparse header")?;
        let h = SeSparseHeader::parse(&b)?;
        if h.version != SESPARSE_VERSION {
            return Err(Error::unsupported(
                FMT,
                format!("seSparse version {:#x}", h.version),
            ));
        }
        if h.grain_size != 8 || h.grain_table_size != 64 || h.flags != 0 || h.reserved != [0; 4] {
            return Err(bad(
                "seSparse header",
                0,
                format!(
                    "grain size {}, grain table size {}, flags {:#x}: only 8, 64, 0 are known",
                    h.grain_size, h.grain_table_size, h.flags
                ),
            ));
        }
        if h.capacity > crate::limits::MAX_VIRTUAL_SIZE / SECTOR {
            return Err(bad("seSparse header", 16, "capacity is too large"));
        }
        let file_len = storage.len();
        let within = |(off, size): (u64, u64)| {
            off.checked_add(size)
                .and_then(|e| e.checked_mul(SECTOR))
                .is_some_and(|e| e <= file_len)
        };
        for (name, area, at) in [
            ("seSparse volatile header", h.volatile_header, 80),
            ("seSparse grain directory", h.grain_dir, 128),
            ("seSparse grain tables", h.grain_tables, 144),
        ] {
            if !within(area) {
                return Err(bad(name, at, "area runs past the end of the file"));
            }
        }
        let mut vh = [0u8; 32];
        read_struct(
            storage.as_ref(),
            &mut vh,
            h.volatile_header.0 * SECTOR,
            FMT,
            "seSparse volatile header",
        )?;
        if LE::read_u64(&vh[0..8]) != SESPARSE_VOLATILE_MAGIC {
            return Err(bad(
                "seSparse volatile header",
                h.volatile_header.0 * SECTOR,
                "bad magic",
            ));
        }
        if LE::read_u64(&vh[24..32]) != 0 {
            return Err(Error::unsupported(
                FMT,
                "seSparse extent whose journal must be replayed",
            ));
        }
        let entries = h.needed_gd_entries();
        if entries > crate::limits::MAX_VMDK_GD_ENTRIES || entries * 8 > h.grain_dir.1 * SECTOR {
            return Err(bad(
                "seSparse grain directory",
                h.grain_dir.0 * SECTOR,
                format!("{entries} entries needed, the directory is smaller"),
            ));
        }
        // Walked a page at a time, never held whole.
        let gd = PagedTable::new(
            storage.clone(),
            h.grain_dir.0 * SECTOR,
            entries,
            TableEntry::U64Le,
            FMT,
            "seSparse grain directory",
        );
        let gt_count = h.grain_tables.1 / h.grain_table_size;
        gd.for_each(|i, e| {
            let ok = e == 0 || (e >> 32 == 0x1000_0000 && (e & 0xffff_ffff) < gt_count);
            if !ok {
                return Err(bad(
                    "seSparse grain directory",
                    h.grain_dir.0 * SECTOR + i * 8,
                    format!("entry {e:#x} is not a grain table inside the table area"),
                ));
            }
            Ok(())
        })?;
        let cache = CacheShare::of(cache_bytes, h.grain_table_size * SECTOR, 0);
        Ok(SeSparseExtent {
            storage,
            header: h,
            gd,
            gt_cache: Mutex::new(HashMap::new()),
            cache_tables: cache.tables,
        })
    }

    fn table(&self, gde: u64) -> Result<Option<Arc<Vec<u64>>>> {
        let e = match self.gd.get(gde)? {
            0 => return Ok(None),
            e => e,
        };
        if let Ok(c) = self.gt_cache.lock() {
            if let Some(t) = c.get(&gde) {
                return Ok(Some(t.clone()));
            }
        }
        let h = &self.header;
        let pos = (h.grain_tables.0 + (e & 0xffff_ffff) * h.grain_table_size) * SECTOR;
        let mut raw = vec![0u8; (h.grain_table_size * SECTOR) as usize];
        read_struct(
            self.storage.as_ref(),
            &mut raw,
            pos,
            FMT,
            "seSparse grain table",
        )?;
        let t = Arc::new(raw.chunks_exact(8).map(LE::read_u64).collect::<Vec<_>>());
        if let Ok(mut c) = self.gt_cache.lock() {
            if c.len() >= self.cache_tables {
                c.clear();
            }
            if self.cache_tables > 0 {
                c.insert(gde, t.clone());
            }
        }
        Ok(Some(t))
    }

    fn classify(&self, g: u64, e: u64) -> Result<Grain> {
        let h = &self.header;
        let gde = self.gd.get(g / h.gt_entries())?;
        let err = |reason: String| {
            bad(
                "seSparse grain table",
                (h.grain_tables.0 + (gde & 0xffff_ffff) * h.grain_table_size) * SECTOR
                    + (g % h.gt_entries()) * 8,
                reason,
            )
        };
        match e >> 60 {
            0 if e == 0 => Ok(Grain::Unallocated),
            1 | 2 => Ok(Grain::Zero),
            3 => {
                let idx = ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12);
                let sector = idx
                    .checked_mul(h.grain_size)
                    .filter(|&s| s < h.grains.1)
                    .map(|s| s + h.grains.0)
                    .ok_or_else(|| {
                        err(format!("grain {g}: index {idx} is outside the grain area"))
                    })?;
                if (sector + h.grain_size) * SECTOR > self.storage.len() {
                    return Err(err(format!("grain {g} is past the end of the file")));
                }
                Ok(Grain::At(sector))
            }
            _ => Err(err(format!("grain {g}: bad entry {e:#x}"))),
        }
    }
}

impl GrainSource for SeSparseExtent {
    fn grain_bytes(&self) -> u64 {
        self.header.grain_size * SECTOR
    }

    fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    fn compressed(&self) -> bool {
        false
    }

    fn lookup(&self, g: u64) -> Result<Grain> {
        let per = self.header.gt_entries();
        if g >= self.header.capacity.div_ceil(self.header.grain_size) {
            return Ok(Grain::Unallocated);
        }
        match self.table(g / per)? {
            None => Ok(Grain::Unallocated),
            Some(t) => self.classify(g, t[(g % per) as usize]),
        }
    }

    fn run(&self, g: u64, max: u64) -> Result<(Grain, u64)> {
        let first = self.lookup(g)?;
        let per = self.header.gt_entries();
        let mut n = 1;
        while n < max {
            let cur = g + n;
            if first == Grain::Unallocated && cur % per == 0 && self.table(cur / per)?.is_none() {
                n += per.min(max - n);
                continue;
            }
            let next = self.lookup(cur)?;
            let same = match (first, next) {
                (Grain::At(a), Grain::At(b)) => b == a + n * self.header.grain_size,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            n += 1;
        }
        Ok((first, n.min(max)))
    }

    fn read_grain(&self, _g: u64, sector: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let pos = sector * SECTOR + within;
        read_struct(self.storage.as_ref(), buf, pos, FMT, "seSparse grain")
    }
}
