//! Reading one hosted sparse extent (`KDMV`): grain directory, grain tables, plain and
//! compressed grains. Used for monolithicSparse, twoGbMaxExtentSparse, streamOptimized
//! (every layout: VMware's footer, qemu-img's and open-vmdk's preallocated tables).

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::io::table::{Entry as TableEntry, PagedTable};
use crate::io::{read_struct, Storage};

use super::header::{
    parse_u32_table, CowdHeader, Marker, SparseHeader, COWD_GTES_PER_GT, FMT, GD_AT_END,
    MARKER_EOS, MARKER_FOOTER, SECTOR,
};

/// Memory for the caches of one image's grain-mapped extents (grain tables and the
/// last decompressed grain), shared out among its extents: an image of 4096 extents
/// gets no more than one of one extent.
pub const CACHE_BYTES: u64 = 8 << 20;

/// What one extent may cache, from its share of [`CACHE_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct CacheShare {
    /// Grain tables kept (none when the share is smaller than one).
    pub tables: usize,
    /// Whether the last decompressed grain is kept.
    pub grain: bool,
}

impl CacheShare {
    /// The share of `bytes` for tables of `table_bytes` and grains of `grain_bytes`:
    /// half for tables, half for the grain.
    pub fn of(bytes: u64, table_bytes: u64, grain_bytes: u64) -> Self {
        CacheShare {
            tables: ((bytes / 2) / table_bytes.max(1)).min(4096) as usize,
            grain: grain_bytes <= bytes / 2,
        }
    }
}

/// What one grain is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not stored: read the parent, or zeros.
    Unallocated,
    /// Stored as zeroed (GT entry 1 with the zeroed-grain flag).
    Zero,
    /// Stored at this sector of the extent file.
    At(u64),
}

/// A grain-mapped extent (hosted sparse or seSparse), as the device walks it.
pub trait GrainSource: Send + Sync {
    /// Grain size in bytes.
    fn grain_bytes(&self) -> u64;
    /// Capacity in bytes.
    fn capacity_bytes(&self) -> u64;
    /// True when grains are stored compressed.
    fn compressed(&self) -> bool;
    /// Where grain number `g` is.
    fn lookup(&self, g: u64) -> Result<Grain>;
    /// The kind of grain `g` and how many grains from `g` on (at most `max`) continue
    /// it: the same kind and, for plain allocated grains, contiguous in the file.
    fn run(&self, g: u64, max: u64) -> Result<(Grain, u64)>;
    /// Reads `buf.len()` bytes from grain `g` (allocated at `sector`), starting
    /// `within` bytes into the grain.
    fn read_grain(&self, g: u64, sector: u64, within: u64, buf: &mut [u8]) -> Result<()>;
}

/// An open hosted sparse extent.
pub struct SparseExtent {
    storage: Arc<dyn Storage>,
    /// The header in force (the footer's copy for GD_AT_END streams).
    pub header: SparseHeader,
    /// The grain directory, checked at open, read a page at a time.
    gd: PagedTable,
    gt_cache: Mutex<HashMap<usize, Arc<Vec<u32>>>>,
    cache: CacheShare,
    grain_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

fn io_err(storage: &dyn Storage, e: std::io::Error) -> Error {
    match storage.path() {
        Some(p) => Error::io(p, e),
        None => Error::Stream(e),
    }
}

impl SparseExtent {
    /// Opens the sparse extent in `storage` whose header has been parsed as `header`;
    /// its caches may take `cache_bytes`.
    pub fn open(storage: Arc<dyn Storage>, header: SparseHeader, cache_bytes: u64) -> Result<Self> {
        header.validate(0)?;
        Self::open_checked(storage, header, cache_bytes)
    }

    /// Opens a legacy ESX `COWD` (vmfsSparse) extent: 4096-entry grain tables, no
    /// zeroed grains, no descriptor.
    pub fn open_cowd(storage: Arc<dyn Storage>, cache_bytes: u64) -> Result<Self> {
        let mut b = [0u8; 44];
        read_struct(storage.as_ref(), &mut b, 0, FMT, "COWD header")?;
        let c = CowdHeader::parse(&b)?;
        let bad = |off: u64, r: String| Err(Error::corrupt(FMT, "COWD header", off, r));
        if c.version != 1 {
            return Err(Error::unsupported(
                FMT,
                format!("COWD version {}", c.version),
            ));
        }
        if c.granularity == 0 || c.granularity > 2048 {
            return bad(16, format!("granularity {} sectors", c.granularity));
        }
        let header = SparseHeader {
            version: 1,
            flags: 0,
            capacity: c.disk_sectors as u64,
            grain_size: c.granularity as u64,
            descriptor_offset: 0,
            descriptor_size: 0,
            num_gtes_per_gt: COWD_GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: c.l1dir_offset as u64,
            overhead: 0,
            unclean_shutdown: false,
            newline_bytes: [0; 4],
            compress_algorithm: 0,
        };
        if (c.l1dir_size as u64) < header.gd_entries() {
            return bad(
                24,
                format!(
                    "grain directory of {} entries, {} needed",
                    c.l1dir_size,
                    header.gd_entries()
                ),
            );
        }
        Self::open_checked(storage, header, cache_bytes)
    }

    fn open_checked(
        storage: Arc<dyn Storage>,
        mut header: SparseHeader,
        cache_bytes: u64,
    ) -> Result<Self> {
        let file_len = storage.len();
        if header.gd_offset == GD_AT_END {
            header = read_footer(storage.as_ref(), &header)?;
        }
        if header.overhead.saturating_mul(SECTOR) > file_len {
            return Err(Error::corrupt(
                FMT,
                "sparse extent header",
                64,
                format!(
                    "overhead of {} sectors is past the end of the {file_len}-byte file",
                    header.overhead
                ),
            ));
        }
        let entries = header.gd_entries();
        let gd_bytes = entries * 4;
        let gd_pos = header
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|p| p.checked_add(gd_bytes).is_some_and(|e| e <= file_len));
        let Some(gd_pos) = gd_pos else {
            return Err(Error::corrupt(
                FMT,
                "grain directory",
                56,
                format!(
                    "{gd_bytes} bytes at sector {} run past the end of the {file_len}-byte file",
                    header.gd_offset
                ),
            ));
        };
        if header.gd_offset == 0 && entries > 0 {
            return Err(Error::corrupt(FMT, "grain directory", 56, "offset is 0"));
        }
        // Walked a page at a time, never held whole (a header can declare 64 MiB of
        // directory that the file holds as a hole).
        let gd = PagedTable::new(
            storage.clone(),
            gd_pos,
            entries,
            TableEntry::U32Le,
            FMT,
            "grain directory",
        );
        let gt_bytes = header.num_gtes_per_gt as u64 * 4;
        gd.for_each(|i, e| {
            if e != 0 && (e * SECTOR + gt_bytes) > file_len {
                return Err(Error::corrupt(
                    FMT,
                    "grain directory",
                    gd_pos + i * 4,
                    format!("grain table at sector {e} is past the end of the file"),
                ));
            }
            Ok(())
        })?;
        let cache = CacheShare::of(cache_bytes, gt_bytes, header.grain_bytes());
        Ok(SparseExtent {
            storage,
            header,
            gd,
            gt_cache: Mutex::new(HashMap::new()),
            cache,
            grain_cache: Mutex::new(None),
        })
    }

    /// The storage the extent lives in.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn grain_table(&self, gde: usize) -> Result<Option<Arc<Vec<u32>>>> {
        let sector = self.gd.get(gde as u64)?;
        if sector == 0 {
            return Ok(None);
        }
        if let Ok(c) = self.gt_cache.lock() {
            if let Some(t) = c.get(&gde) {
                return Ok(Some(t.clone()));
            }
        }
        let mut raw = vec![0u8; self.header.num_gtes_per_gt as usize * 4];
        read_struct(
            self.storage.as_ref(),
            &mut raw,
            sector * SECTOR,
            FMT,
            "grain table",
        )?;
        let t = Arc::new(parse_u32_table(&raw));
        if let Ok(mut c) = self.gt_cache.lock() {
            if c.len() >= self.cache.tables {
                c.clear();
            }
            if self.cache.tables > 0 {
                c.insert(gde, t.clone());
            }
        }
        Ok(Some(t))
    }

    fn lookup_grain(&self, g: u64) -> Result<Grain> {
        if g >= self.header.grains() {
            return Ok(Grain::Unallocated);
        }
        let per = self.header.num_gtes_per_gt as u64;
        let Some(gt) = self.grain_table((g / per) as usize)? else {
            return Ok(Grain::Unallocated);
        };
        self.classify(g, gt[(g % per) as usize])
    }

    /// What grain-table entry `e` of grain `g` means.
    fn classify(&self, g: u64, e: u32) -> Result<Grain> {
        let per = self.header.num_gtes_per_gt as u64;
        match e {
            0 => Ok(Grain::Unallocated),
            1 if self.header.zeroed_grain() => Ok(Grain::Zero),
            s => {
                let pos = s as u64 * SECTOR;
                if pos >= self.storage.len() {
                    let gt_sector = self.gd.get(g / per)?;
                    return Err(Error::corrupt(
                        FMT,
                        "grain table",
                        gt_sector * SECTOR + (g % per) * 4,
                        format!(
                            "grain {g} at sector {s} is past the end of the {}-byte file",
                            self.storage.len()
                        ),
                    ));
                }
                Ok(Grain::At(s as u64))
            }
        }
    }

    /// Walks grain tables a slice at a time, skipping absent tables whole.
    fn grain_run(&self, g: u64, max: u64) -> Result<(Grain, u64)> {
        let first = self.lookup_grain(g)?;
        let per = self.header.num_gtes_per_gt as u64;
        let grains = self.header.grains();
        let compressed = self.header.compressed();
        let mut n = 1u64;
        while n < max {
            let cur = g + n;
            let in_gt = (per - cur % per).min(max - n);
            if cur >= grains || self.grain_table((cur / per) as usize)?.is_none() {
                if first != Grain::Unallocated {
                    break;
                }
                n += in_gt;
                continue;
            }
            let start = (cur % per) as usize;
            let gt = self
                .grain_table((cur / per) as usize)?
                .expect("checked above");
            let mut k = 0u64;
            while k < in_gt && cur + k < grains {
                let next = self.classify(cur + k, gt[start + k as usize])?;
                let same = match (first, next) {
                    (Grain::At(a), Grain::At(b)) => {
                        compressed || b == a + (n + k) * self.header.grain_size
                    }
                    (a, b) => a == b,
                };
                if !same {
                    return Ok((first, n + k));
                }
                k += 1;
            }
            n += k;
            if k < in_gt {
                // Past the last grain: unallocated.
                if first != Grain::Unallocated {
                    break;
                }
                n += in_gt - k;
            }
        }
        Ok((first, n.min(max)))
    }

    fn read_grain_bytes(&self, g: u64, sector: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        let gb = self.grain_bytes();
        if !self.header.compressed() {
            let pos = sector * SECTOR + within;
            // The last grain of the disk may be stored short.
            let avail = self.storage.len().saturating_sub(pos).min(buf.len() as u64) as usize;
            if avail < buf.len() {
                return Err(Error::corrupt(
                    FMT,
                    "grain",
                    sector * SECTOR,
                    format!("grain {g} runs past the end of the file"),
                ));
            }
            return self
                .storage
                .read_exact_at(buf, pos)
                .map_err(|e| io_err(self.storage.as_ref(), e));
        }
        let data = self.decompressed(g, sector)?;
        let s = within as usize;
        if s + buf.len() > data.len() || within + buf.len() as u64 > gb {
            return Err(Error::corrupt(
                FMT,
                "compressed grain",
                sector * SECTOR,
                format!("grain {g} decompresses to only {} bytes", data.len()),
            ));
        }
        buf.copy_from_slice(&data[s..s + buf.len()]);
        Ok(())
    }

    /// Bytes of grain `g` that lie inside the capacity.
    fn grain_need(&self, g: u64) -> u64 {
        let gb = self.grain_bytes();
        (self.capacity_bytes() - g * gb).min(gb)
    }

    fn decompressed(&self, g: u64, sector: u64) -> Result<Arc<Vec<u8>>> {
        if let Ok(c) = self.grain_cache.lock() {
            if let Some((cg, d)) = c.as_ref() {
                if *cg == g {
                    return Ok(d.clone());
                }
            }
        }
        let gb = self.grain_bytes();
        let pos = sector * SECTOR;
        let file_len = self.storage.len();
        let (data_pos, csize) = if self.header.has_markers() {
            let mut m = [0u8; 16];
            let n = (file_len - pos).min(16) as usize;
            read_struct(self.storage.as_ref(), &mut m[..n], pos, FMT, "grain marker")?;
            if n < 12 {
                return Err(Error::corrupt(FMT, "grain marker", pos, "truncated"));
            }
            match Marker::parse(&m) {
                Marker::Grain { lba, size } => {
                    if lba != g * self.header.grain_size {
                        return Err(Error::corrupt(
                            FMT,
                            "grain marker",
                            pos,
                            format!(
                                "marker is for sector {lba}, grain table says grain {g} (sector {})",
                                g * self.header.grain_size
                            ),
                        ));
                    }
                    (pos + 12, size as u64)
                }
                Marker::Meta { .. } => {
                    return Err(Error::corrupt(
                        FMT,
                        "grain marker",
                        pos,
                        "grain table points at a metadata marker",
                    ))
                }
            }
        } else {
            // No marker: the zlib stream ends by itself; read what it may occupy.
            (pos, (gb + gb / 2 + 4096).min(file_len - pos))
        };
        let limit = gb * 2 + 4096;
        if csize > limit || data_pos + csize > file_len {
            return Err(Error::corrupt(
                FMT,
                "grain marker",
                pos,
                format!("compressed size {csize} is too large or runs past the end of the file"),
            ));
        }
        let mut comp = vec![0u8; csize as usize];
        read_struct(
            self.storage.as_ref(),
            &mut comp,
            data_pos,
            FMT,
            "compressed grain",
        )?;
        let data = inflate(&comp, gb as usize)
            .map_err(|r| Error::corrupt(FMT, "compressed grain", pos, format!("grain {g}: {r}")))?;
        if (data.len() as u64) < self.grain_need(g) {
            return Err(Error::corrupt(
                FMT,
                "compressed grain",
                pos,
                format!("grain {g} decompresses to {} bytes, too few", data.len()),
            ));
        }
        let data = Arc::new(data);
        if self.cache.grain {
            if let Ok(mut c) = self.grain_cache.lock() {
                *c = Some((g, data.clone()));
            }
        }
        Ok(data)
    }
}

impl GrainSource for SparseExtent {
    fn grain_bytes(&self) -> u64 {
        self.header.grain_bytes()
    }

    fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    fn compressed(&self) -> bool {
        self.header.compressed()
    }

    fn lookup(&self, g: u64) -> Result<Grain> {
        self.lookup_grain(g)
    }

    fn run(&self, g: u64, max: u64) -> Result<(Grain, u64)> {
        self.grain_run(g, max)
    }

    fn read_grain(&self, g: u64, sector: u64, within: u64, buf: &mut [u8]) -> Result<()> {
        self.read_grain_bytes(g, sector, within, buf)
    }
}

/// Inflates one zlib stream of at most `max` bytes.
pub fn inflate(comp: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(max);
    let mut d = flate2::read::ZlibDecoder::new(comp).take(max as u64 + 1);
    d.read_to_end(&mut out)
        .map_err(|e| format!("bad zlib data: {e}"))?;
    if out.len() > max {
        return Err(format!("decompresses to more than {max} bytes"));
    }
    Ok(out)
}

/// For a `GD_AT_END` stream: finds the footer (marker, header copy, end-of-stream
/// marker in the last three sectors) and returns the header it holds.
fn read_footer(storage: &dyn Storage, header: &SparseHeader) -> Result<SparseHeader> {
    let len = storage.len();
    if len < 3 * SECTOR || len % SECTOR != 0 {
        return Err(Error::corrupt(
            FMT,
            "stream footer",
            len,
            "grain directory is at the end, but the file is too short or not sector-sized to hold a footer",
        ));
    }
    let mut b = [0u8; 1536];
    read_struct(storage, &mut b, len - 1536, FMT, "stream footer")?;
    let marker = Marker::parse(&b[..512]);
    let eos = Marker::parse(&b[1024..]);
    let ok_marker = header.has_markers()
        && matches!(
            marker,
            Marker::Meta {
                kind: MARKER_FOOTER,
                ..
            }
        )
        && matches!(
            eos,
            Marker::Meta {
                sectors: 0,
                kind: MARKER_EOS
            }
        );
    if !ok_marker {
        return Err(Error::corrupt(
            FMT,
            "stream footer",
            len - 1536,
            "grain directory is at the end, but no footer marker / end-of-stream marker was found",
        ));
    }
    let fb: &[u8; 512] = b[512..1024].try_into().expect("512 bytes");
    let footer = SparseHeader::parse(fb, len - 1024)?;
    footer.validate(len - 1024)?;
    if footer.gd_offset == GD_AT_END
        || footer.capacity != header.capacity
        || footer.grain_size != header.grain_size
        || footer.num_gtes_per_gt != header.num_gtes_per_gt
    {
        return Err(Error::corrupt(
            FMT,
            "stream footer",
            len - 1024,
            "footer header disagrees with the header or has no grain directory offset",
        ));
    }
    Ok(footer)
}
