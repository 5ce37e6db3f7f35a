//! Reading VHDX images: the headers, the log replay, the region table, the metadata and
//! the BAT, validated as QEMU and the spec validate them, and the [`VhdxDevice`] that
//! serves the virtual disk (fixed, dynamic and differencing, with the parent found
//! through the parent locator).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::details::{FormatDetails, VhdxDetails};

use super::header::{
    bitmap, parse_bat, payload, BatEntry, FileIdentifier, Guid, Header, RegionEntry, RegionTable,
    BAT_REGION, CREATOR_BYTES, FORMAT, HEADER_OFFSETS, HEADER_SECTION_END, HEADER_SIZE,
    METADATA_REGION, MIB, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
};
use super::metadata::{
    parse_u32_item, parse_u64_item, FileParameters, MetadataEntry, MetadataTable, ParentLocator,
    FILE_PARAMETERS, LOGICAL_SECTOR_SIZE, PARENT_LOCATOR, PHYSICAL_SECTOR_SIZE, TABLE_SIZE,
    VHDX_PARENT_LOCATOR_TYPE, VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE,
};
use super::replay::{replay, ReplaySummary};
use crate::detect::Format;
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::image::{FileReference, Image, ImageInfo, OpenContext, Opened};
use crate::io::{read_struct, Storage};
use crate::limits::{MAX_VHDX_BAT_ENTRIES, MAX_VIRTUAL_SIZE};

/// Smallest payload block.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest payload block.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Sectors one sector bitmap block describes (2^23 bits in 1 MiB).
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// The parent locator keys that name the parent's file, in the order the spec says to
/// try them.
pub const PARENT_PATH_KEYS: [(&str, &str); 3] = [
    ("relative_path", "parent locator relative_path"),
    ("volume_path", "parent locator volume_path"),
    ("absolute_win32_path", "parent locator absolute_win32_path"),
];

/// How block indices map to BAT entries, from the disk size, block size and sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size in bytes.
    pub disk_size: u64,
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u64,
    /// Payload blocks per chunk (one sector bitmap block each).
    pub chunk_ratio: u64,
    /// Payload blocks of the disk.
    pub payload_blocks: u64,
    /// Sector bitmap blocks of the disk.
    pub bitmap_blocks: u64,
    /// BAT entries the image must have.
    pub bat_entries: u64,
}

impl Geometry {
    /// The geometry of a disk; `differencing` images have a whole last chunk of entries.
    pub fn new(
        disk_size: u64,
        block_size: u64,
        logical_sector_size: u64,
        differencing: bool,
    ) -> Geometry {
        let chunk_ratio = SECTORS_PER_BITMAP_BLOCK * logical_sector_size / block_size;
        let payload_blocks = disk_size.div_ceil(block_size);
        let bitmap_blocks = payload_blocks.div_ceil(chunk_ratio);
        let bat_entries = if differencing {
            bitmap_blocks * (chunk_ratio + 1)
        } else if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            disk_size,
            block_size,
            logical_sector_size,
            chunk_ratio,
            payload_blocks,
            bitmap_blocks,
            bat_entries,
        }
    }

    /// The BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Guest bytes of payload block `block` (the last one may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        self.block_size
            .min(self.disk_size.saturating_sub(block * self.block_size))
    }
}

/// Everything read from an image's header section and metadata, before the BAT.
pub struct Parsed {
    /// The file, as replayed when its log had to be replayed.
    pub storage: Arc<dyn Storage>,
    /// The file type identifier.
    pub identifier: FileIdentifier,
    /// The current header.
    pub header: Header,
    /// Which header is current (0 or 1).
    pub current_header: usize,
    /// Which headers are valid.
    pub headers_valid: [bool; 2],
    /// What the replay of the log did, when it had to be replayed.
    pub replay: Option<ReplaySummary>,
    /// The region table (first copy).
    pub regions: RegionTable,
    /// The BAT's region.
    pub bat_region: RegionEntry,
    /// The metadata region.
    pub metadata_region: RegionEntry,
    /// The metadata table.
    pub metadata: MetadataTable,
    /// The File Parameters item.
    pub params: FileParameters,
    /// Physical sector size as stored.
    pub physical_sector_size: u32,
    /// The Virtual Disk ID.
    pub disk_id: Guid,
    /// The parent locator of a differencing image.
    pub parent_locator: Option<ParentLocator>,
    /// Block and BAT geometry.
    pub geometry: Geometry,
}

impl Parsed {
    /// `fixed`, `dynamic` or `differencing`.
    pub fn subformat(&self) -> &'static str {
        if self.params.has_parent {
            "differencing"
        } else if self.params.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    /// The structures blocks must not overlap: the header section, the log and every
    /// region, as `(start, end, name)`.
    pub fn reserved_ranges(&self) -> Vec<(u64, u64, String)> {
        let mut v = vec![(0, HEADER_SECTION_END, "header section".to_string())];
        let h = &self.header;
        if h.log_length > 0 {
            v.push((
                h.log_offset,
                h.log_offset + h.log_length as u64,
                "log".to_string(),
            ));
        }
        for r in &self.regions.entries {
            let name = if r.guid == BAT_REGION {
                "BAT region".to_string()
            } else if r.guid == METADATA_REGION {
                "metadata region".to_string()
            } else {
                format!("region {}", r.guid)
            };
            v.push((r.file_offset, r.file_offset + r.length as u64, name));
        }
        v
    }
}

/// Reads the file type identifier and both headers; returns them with the index of the
/// current header (the valid one, or of two valid ones the one with the larger sequence
/// number).
pub fn read_headers(storage: &dyn Storage) -> Result<(FileIdentifier, [Option<Header>; 2], usize)> {
    let mut id = vec![0u8; 8 + CREATOR_BYTES];
    read_struct(storage, &mut id, 0, FORMAT, "file type identifier")?;
    let identifier = FileIdentifier::parse(&id)?;
    let mut headers: [Option<Header>; 2] = [None, None];
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    for (i, &at) in HEADER_OFFSETS.iter().enumerate() {
        read_struct(storage, &mut raw[i], at, FORMAT, "header")?;
        if Header::is_valid(&raw[i]) {
            let h = Header::parse(&raw[i]);
            // As QEMU: a header of another version is not a valid one.
            if h.version == 1 {
                headers[i] = Some(h);
            }
        }
    }
    let current = match (&headers[0], &headers[1]) {
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        (None, None) => {
            return Err(Error::corrupt(
                FORMAT,
                "header",
                HEADER_OFFSETS[0],
                "neither header is valid (signature \"head\", version 1, CRC-32C checksum)",
            ))
        }
        (Some(a), Some(b)) => {
            if a.sequence_number > b.sequence_number {
                0
            } else if b.sequence_number > a.sequence_number {
                1
            } else if raw[0][..80] == raw[1][..80] {
                // Disk2VHD writes two identical headers.
                0
            } else {
                return Err(Error::corrupt(
                    FORMAT,
                    "header",
                    HEADER_OFFSETS[1],
                    format!(
                        "both headers are valid with sequence number {} but differ",
                        a.sequence_number
                    ),
                ));
            }
        }
    };
    Ok((identifier, headers, current))
}

/// Reads `len` bytes of item `id` of the metadata region at `md`.
fn read_item(
    storage: &dyn Storage,
    md: &RegionEntry,
    e: &MetadataEntry,
    min_len: u32,
    name: &'static str,
) -> Result<Vec<u8>> {
    let at = md.file_offset + e.offset as u64;
    if e.length < min_len {
        return Err(Error::corrupt(
            FORMAT,
            "metadata item",
            at,
            format!(
                "the {name} item is {} bytes long, shorter than {min_len}",
                e.length
            ),
        ));
    }
    let mut b = vec![0u8; e.length as usize];
    read_struct(storage, &mut b, at, FORMAT, "metadata item")?;
    Ok(b)
}

/// Reads and validates everything up to the BAT: headers, log (replayed in memory when
/// needed), region table, metadata.
pub fn parse(storage: Arc<dyn Storage>) -> Result<Parsed> {
    let (identifier, headers, current) = read_headers(storage.as_ref())?;
    let header = headers[current].clone().expect("current header is valid");
    let at = HEADER_OFFSETS[current];
    if header.log_offset < MIB || header.log_offset % MIB != 0 {
        return Err(Error::corrupt(
            FORMAT,
            "header",
            at,
            format!(
                "log offset {:#x} is not a multiple of 1 MiB after the header section",
                header.log_offset
            ),
        ));
    }
    let (storage, replayed): (Arc<dyn Storage>, _) = match replay(&storage, &header)? {
        Some((s, summary)) => (Arc::new(s), Some(summary)),
        None => (storage, None),
    };
    let file_len = storage.len();

    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    read_struct(
        storage.as_ref(),
        &mut rt,
        REGION_TABLE_OFFSETS[0],
        FORMAT,
        "region table",
    )?;
    let regions = RegionTable::parse(&rt, REGION_TABLE_OFFSETS[0])?;
    let rt_corrupt = |r: String| Error::corrupt(FORMAT, "region table", REGION_TABLE_OFFSETS[0], r);
    let mut taken: Vec<(u64, u64)> = Vec::new();
    if header.log_length > 0 {
        taken.push((
            header.log_offset,
            header.log_offset + header.log_length as u64,
        ));
    }
    let (mut bat, mut md) = (None, None);
    for e in &regions.entries {
        let end = e.file_offset.checked_add(e.length as u64);
        let Some(end) = end.filter(|_| e.file_offset >= HEADER_SECTION_END) else {
            return Err(rt_corrupt(format!(
                "region {} at {:#x} is inside the header section",
                e.guid, e.file_offset
            )));
        };
        if taken.iter().any(|&(s, t)| e.file_offset < t && s < end) {
            return Err(rt_corrupt(format!(
                "region {} at {:#x}+{} overlaps the log or another region",
                e.guid, e.file_offset, e.length
            )));
        }
        taken.push((e.file_offset, end));
        let slot = if e.guid == BAT_REGION {
            &mut bat
        } else if e.guid == METADATA_REGION {
            &mut md
        } else if e.is_required() {
            return Err(Error::unsupported(
                FORMAT,
                format!("required region {}", e.guid),
            ));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(rt_corrupt(format!("region {} is listed twice", e.guid)));
        }
        *slot = Some(*e);
    }
    let (Some(bat_region), Some(metadata_region)) = (bat, md) else {
        return Err(rt_corrupt(
            "the BAT or the metadata region is missing".into(),
        ));
    };

    // The metadata table: only its used part needs to be inside the file.
    let md_at = metadata_region.file_offset;
    let md_len = metadata_region.length as u64;
    let mut head = [0u8; 32];
    read_struct(storage.as_ref(), &mut head, md_at, FORMAT, "metadata table")?;
    let count = u16::from_le_bytes([head[10], head[11]]) as usize;
    let table_len = (32 + count * MetadataEntry::SIZE).min(TABLE_SIZE);
    let mut table = vec![0u8; table_len];
    read_struct(
        storage.as_ref(),
        &mut table,
        md_at,
        FORMAT,
        "metadata table",
    )?;
    let metadata = MetadataTable::parse(&table, md_at, md_len)?;
    let mut found: [Option<MetadataEntry>; 6] = [None; 6];
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        VIRTUAL_DISK_ID,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    for e in &metadata.entries {
        match known.iter().position(|&k| k == e.item_id && !e.is_user()) {
            Some(i) => found[i] = Some(*e),
            None if e.is_required() => {
                return Err(Error::unsupported(
                    FORMAT,
                    format!("required metadata item {}", e.item_id),
                ))
            }
            None => {}
        }
    }
    let names = [
        "File Parameters",
        "Virtual Disk Size",
        "Virtual Disk ID",
        "Logical Sector Size",
        "Physical Sector Size",
    ];
    for (i, name) in names.iter().enumerate() {
        if found[i].is_none() {
            return Err(Error::corrupt(
                FORMAT,
                "metadata table",
                md_at,
                format!("the required {name} item is missing"),
            ));
        }
    }
    let s = storage.as_ref();
    let item = |i: usize, min: u32| {
        read_item(
            s,
            &metadata_region,
            &found[i].expect("present"),
            min,
            names[i],
        )
    };
    let params = FileParameters::parse(&item(0, 8)?);
    let disk_size = parse_u64_item(&item(1, 8)?);
    let disk_id = Guid::parse(&item(2, 16)?);
    let lss = parse_u32_item(&item(3, 4)?);
    let physical_sector_size = parse_u32_item(&item(4, 4)?);
    let item_at = |i: usize| md_at + found[i].map_or(0, |e| e.offset as u64);

    let bs = params.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::corrupt(
            FORMAT,
            "File Parameters item",
            item_at(0),
            format!("block size {bs} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    if lss != 512 && lss != 4096 {
        return Err(Error::corrupt(
            FORMAT,
            "Logical Sector Size item",
            item_at(3),
            format!("logical sector size {lss} is neither 512 nor 4096"),
        ));
    }
    if disk_size % lss as u64 != 0 || disk_size > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(
            FORMAT,
            "Virtual Disk Size item",
            item_at(1),
            format!("virtual disk size {disk_size} is not a multiple of the {lss}-byte sector or is too large"),
        ));
    }
    let parent_locator = if params.has_parent {
        let Some(e) = found[5] else {
            return Err(Error::corrupt(
                FORMAT,
                "metadata table",
                md_at,
                "the image has a parent but no parent locator",
            ));
        };
        let b = read_item(s, &metadata_region, &e, 0, "Parent Locator")?;
        Some(ParentLocator::parse(&b, item_at(5))?)
    } else {
        None
    };
    let geometry = Geometry::new(disk_size, bs as u64, lss as u64, params.has_parent);
    if geometry.bat_entries > MAX_VHDX_BAT_ENTRIES {
        return Err(Error::TooLarge {
            format: FORMAT,
            structure: "BAT",
            size: geometry.bat_entries * 8,
            limit: MAX_VHDX_BAT_ENTRIES * 8,
        });
    }
    let bat_bytes = geometry.bat_entries * 8;
    if bat_bytes > bat_region.length as u64 {
        return Err(Error::corrupt(
            FORMAT,
            "region table",
            REGION_TABLE_OFFSETS[0],
            format!(
                "the BAT region holds {} bytes, but a {disk_size}-byte disk with {bs}-byte blocks needs {bat_bytes}",
                bat_region.length
            ),
        ));
    }
    if bat_region.file_offset + bat_bytes > file_len {
        return Err(Error::corrupt(
            FORMAT,
            "BAT",
            bat_region.file_offset,
            format!("the {bat_bytes}-byte BAT runs past the end of the file ({file_len:#x})"),
        ));
    }
    Ok(Parsed {
        storage,
        identifier,
        header,
        current_header: current,
        headers_valid: [headers[0].is_some(), headers[1].is_some()],
        replay: replayed,
        regions,
        bat_region,
        metadata_region,
        metadata,
        params,
        physical_sector_size,
        disk_id,
        parent_locator,
        geometry,
    })
}

/// Bytes of BAT read at a time.
const BAT_READ_CHUNK: usize = 1 << 20;

/// Reads the BAT entries the image's geometry needs (the region's size was checked
/// against the file by [`parse`], which bounds the allocation).
pub fn read_bat(p: &Parsed) -> Result<Vec<BatEntry>> {
    let n = p.geometry.bat_entries as usize;
    let mut bat = Vec::with_capacity(n);
    let mut raw = vec![0u8; (n * 8).min(BAT_READ_CHUNK)];
    while bat.len() < n {
        let k = ((n - bat.len()) * 8).min(raw.len());
        let at = p.bat_region.file_offset + bat.len() as u64 * 8;
        read_struct(p.storage.as_ref(), &mut raw[..k], at, FORMAT, "BAT")?;
        bat.extend(parse_bat(&raw[..k]));
    }
    Ok(bat)
}

/// Checks every BAT entry the reader will follow, as QEMU does at open (blocks inside
/// the file, clear of the log and the regions) and beyond (states that are reserved or
/// not allowed for the image's type, sector bitmaps of partially present blocks).
fn validate_bat(p: &Parsed, bat: &[BatEntry]) -> Result<()> {
    let g = &p.geometry;
    let file_len = p.storage.len();
    let reserved = p.reserved_ranges();
    let at = |i: u64| p.bat_region.file_offset + i * 8;
    let corrupt = |i: u64, r: String| Error::corrupt(FORMAT, "BAT entry", at(i), r);
    let check_place = |i: u64, off: u64, len: u64, what: &str| -> Result<()> {
        if off.checked_add(len).map_or(true, |e| e > file_len) {
            return Err(corrupt(
                i,
                format!(
                    "{what} at {off:#x}+{len} runs past the end of the file ({file_len:#x}): it has probably been truncated"
                ),
            ));
        }
        if let Some((_, _, name)) = reserved.iter().find(|&&(s, e, _)| off < e && s < off + len) {
            return Err(corrupt(
                i,
                format!("{what} at {off:#x} overlaps the {name}"),
            ));
        }
        Ok(())
    };
    for block in 0..g.payload_blocks {
        let i = g.payload_index(block);
        let e = bat[i as usize];
        match e.state() {
            payload::FULLY_PRESENT => {
                check_place(i, e.offset(), g.block_len(block), "payload block")?;
            }
            payload::PARTIALLY_PRESENT if p.params.has_parent => {
                check_place(i, e.offset(), g.block_len(block), "payload block")?;
                let chunk = block / g.chunk_ratio;
                let sb = bat[g.bitmap_index(chunk) as usize];
                if sb.state() != bitmap::PRESENT {
                    return Err(corrupt(
                        i,
                        format!(
                            "block {block} is partially present but the sector bitmap of chunk {chunk} is not"
                        ),
                    ));
                }
            }
            payload::PARTIALLY_PRESENT => {
                return Err(corrupt(
                    i,
                    format!(
                        "block {block} is partially present, which only differencing images allow"
                    ),
                ))
            }
            s @ 4 => {
                return Err(corrupt(
                    i,
                    format!("block {block} has the reserved state {s}"),
                ))
            }
            _ => {}
        }
    }
    if p.params.has_parent {
        for chunk in 0..g.bitmap_blocks {
            let i = g.bitmap_index(chunk);
            let e = bat[i as usize];
            match e.state() {
                bitmap::PRESENT => check_place(i, e.offset(), MIB, "sector bitmap block")?,
                bitmap::NOT_PRESENT => {}
                s => {
                    return Err(corrupt(
                        i,
                        format!("the sector bitmap of chunk {chunk} has the reserved state {s}"),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// What one payload block is, for reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Wholly in the file at this offset.
    Data(u64),
    /// Reads as zeros (zero, undefined and unmapped blocks; not-present blocks of an
    /// image without parent).
    Zero,
    /// Not present: the parent's data (differencing), zeros otherwise.
    Absent,
    /// In the file at `host` for the sectors the bitmap at file offset `bitmap` marks.
    Partial { host: u64, bitmap: u64 },
}

/// A VHDX image as a block device (with its parent underneath, for differencing images).
pub struct VhdxDevice {
    storage: Arc<dyn Storage>,
    geometry: Geometry,
    bat: Vec<BatEntry>,
    differencing: bool,
    /// The parent, or `None` when it was not opened (metadata only).
    parent: Option<Arc<dyn BlockDevice>>,
    /// The parent's name, for errors.
    parent_name: String,
}

impl VhdxDevice {
    fn block(&self, idx: u64) -> Block {
        let g = &self.geometry;
        let e = self.bat[g.payload_index(idx) as usize];
        match e.state() {
            payload::FULLY_PRESENT => Block::Data(e.offset()),
            payload::PARTIALLY_PRESENT => {
                let chunk = idx / g.chunk_ratio;
                let sb = self.bat[g.bitmap_index(chunk) as usize].offset();
                // This block's bits start at its first sector's bit.
                let first_bit = (idx % g.chunk_ratio) * (g.block_size / g.logical_sector_size);
                Block::Partial {
                    host: e.offset(),
                    bitmap: sb + first_bit / 8,
                }
            }
            payload::NOT_PRESENT => Block::Absent,
            _ => Block::Zero,
        }
    }

    fn parent(&self) -> Result<&Arc<dyn BlockDevice>> {
        self.parent.as_ref().ok_or_else(|| Error::BackingChain {
            path: self
                .storage
                .path()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            reason: format!("the parent image {:?} was not opened", self.parent_name),
        })
    }

    /// Reads `buf` at guest `offset` from the parent; beyond its end, zeros.
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if !self.differencing {
            buf.fill(0);
            return Ok(());
        }
        let parent = self.parent()?;
        let psize = parent.size();
        let n = if offset >= psize {
            0
        } else {
            (psize - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            parent.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// The parent's map at `offset` (at most `len` bytes), one layer deeper.
    fn map_parent(&self, offset: u64, len: u64) -> Result<Extent> {
        if !self.differencing {
            return Ok(Extent::new(offset, len, ExtentKind::Unallocated));
        }
        let parent = self.parent()?;
        let psize = parent.size();
        let mut e = if offset >= psize {
            Extent::new(offset, len, ExtentKind::Unallocated)
        } else {
            parent.map(offset, len.min(psize - offset))?
        };
        e.depth += 1;
        Ok(e)
    }

    fn read_file(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.storage.read_exact_at(buf, at).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // The BAT was checked against the file's size at open; it shrank since.
                Error::corrupt(FORMAT, "payload block", at, "the file ends inside a block")
            } else {
                match self.storage.path() {
                    Some(p) => Error::io(p, e),
                    None => Error::Stream(e),
                }
            }
        })
    }

    /// For a partially present block: the sector bits covering block bytes
    /// `[within, within + len)`, as runs `(start in block, length, present)`.
    fn sector_runs(&self, bitmap: u64, within: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let lss = self.geometry.logical_sector_size;
        let first = within / lss;
        let last = (within + len - 1) / lss;
        let (b0, b1) = (first / 8, last / 8);
        let mut bits = vec![0u8; (b1 - b0 + 1) as usize];
        self.storage
            .read_exact_at(&mut bits, bitmap + b0)
            .map_err(|e| match self.storage.path() {
                Some(p) => Error::io(p, e),
                None => Error::Stream(e),
            })?;
        let bit = |s: u64| bits[(s / 8 - b0) as usize] >> (s % 8) & 1 == 1;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut s = first;
        while s <= last {
            let present = bit(s);
            let mut t = s + 1;
            while t <= last && bit(t) == present {
                t += 1;
            }
            let start = (s * lss).max(within);
            let end = (t * lss).min(within + len);
            runs.push((start, end - start, present));
            s = t;
        }
        Ok(runs)
    }
}

impl BlockDevice for VhdxDevice {
    fn size(&self) -> u64 {
        self.geometry.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        let bs = self.geometry.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / bs;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.block(idx) {
                Block::Data(host) => self.read_file(part, host + within)?,
                Block::Zero => part.fill(0),
                Block::Absent => self.read_parent(part, pos)?,
                Block::Partial { host, bitmap } => {
                    for (start, len, present) in self.sector_runs(bitmap, within, n as u64)? {
                        let a = (start - within) as usize;
                        let piece = &mut part[a..a + len as usize];
                        if present {
                            self.read_file(piece, host + start)?;
                        } else {
                            self.read_parent(piece, idx * bs + start)?;
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size())?;
        let bs = self.geometry.block_size;
        let end = offset + len;
        let idx = offset / bs;
        let within = offset % bs;
        let first = self.block(idx);
        if let Block::Partial { host, bitmap } = first {
            let n = (bs - within).min(len);
            let (start, run, present) = self.sector_runs(bitmap, within, n)?[0];
            debug_assert_eq!(start, within);
            if present {
                let mut e = Extent::new(offset, run, ExtentKind::Data);
                e.host_offset = Some(host + within);
                return Ok(e);
            }
            return self.map_parent(offset, run);
        }
        // Extend over following blocks of the same kind (data only while contiguous in
        // the file, so that the host offset stays meaningful).
        let mut next = (idx + 1) * bs;
        while next < end {
            let b = self.block(next / bs);
            let same = match (first, b) {
                (Block::Data(h0), Block::Data(h)) => h == h0 + (next - idx * bs),
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            next += bs;
        }
        let run = next.min(end) - offset;
        Ok(match first {
            Block::Data(host) => {
                // A hole in the file (a fixed image's never-written blocks) reads as
                // zeros: the conversion need not read it.
                let at = host + within;
                let (kind, run) = match self.storage.segment(at) {
                    Some((is_data, end)) if end > at => {
                        let kind = if is_data {
                            ExtentKind::Data
                        } else {
                            ExtentKind::Zero
                        };
                        (kind, run.min(end - at))
                    }
                    _ => (ExtentKind::Data, run),
                };
                let mut e = Extent::new(offset, run, kind);
                if kind == ExtentKind::Data {
                    e.host_offset = Some(at);
                }
                e
            }
            Block::Zero => Extent::new(offset, run, ExtentKind::Zero),
            Block::Absent => self.map_parent(offset, run)?,
            Block::Partial { .. } => unreachable!("handled above"),
        })
    }
}

/// Where the parent of a differencing image comes from.
#[derive(Debug, Clone)]
pub enum ParentSource {
    /// The parent locator's paths: `relative_path` against the image's folder, then the
    /// file names of `volume_path` and `absolute_win32_path` (Windows paths) in it.
    Locator,
    /// This file, given by the caller (relative names resolve against the image's folder).
    Explicit(String),
}

/// Opens a VHDX image; a differencing image's parent comes from `source`.
pub fn open_with(
    storage: Arc<dyn Storage>,
    ctx: &OpenContext,
    source: ParentSource,
) -> Result<Opened> {
    let actual = storage.allocated_bytes();
    let p = parse(storage)?;
    let bat = read_bat(&p)?;
    validate_bat(&p, &bat)?;
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vhdx, p.geometry.disk_size);
    info.actual_size = Some(actual);
    info.cluster_size = Some(p.geometry.block_size);
    info.dirty_flag = Some(p.replay.is_some());
    info.format_specific = Some(format_specific(&p));

    let mut parent = None;
    let mut parent_name = String::new();
    if let Some(loc) = &p.parent_locator {
        let linkage = parent_linkage(&p, loc)?;
        let paths: Vec<(&str, &'static str, &str)> = PARENT_PATH_KEYS
            .iter()
            .filter_map(|&(key, field)| loc.get(key).map(|v| (key, field, v)))
            .collect();
        if paths.is_empty() {
            return Err(Error::corrupt(
                FORMAT,
                "parent locator",
                p.metadata_region.file_offset,
                "no relative_path, volume_path or absolute_win32_path names the parent",
            ));
        }
        for &(_, field, v) in &paths {
            info.references.push(FileReference {
                field: field.into(),
                name: v.into(),
            });
        }
        parent_name = paths[0].2.to_string();
        info.backing_filename = Some(parent_name.clone());
        if let Some(img) = open_parent(ctx, &p, &paths, &linkage, source)? {
            info.full_backing_filename = Some(img.info().filename.clone());
            info.backing_filename_format = Some(img.info().format.name().into());
            info.backing = Some(Box::new(img.info().clone()));
            parent = Some(img.device().clone());
        }
    }
    let dev = VhdxDevice {
        storage: p.storage.clone(),
        geometry: p.geometry,
        bat,
        differencing: p.params.has_parent,
        parent,
        parent_name,
    };
    Ok(Opened {
        device: Arc::new(dev),
        info,
    })
}

/// The GUIDs a parent's data write GUID may have: `parent_linkage` and, if present and
/// not nil, `parent_linkage2`.
fn parent_linkage(p: &Parsed, loc: &ParentLocator) -> Result<Vec<Guid>> {
    let at = p.metadata_region.file_offset;
    if loc.locator_type != VHDX_PARENT_LOCATOR_TYPE {
        return Err(Error::unsupported(
            FORMAT,
            format!(
                "parent locator type {} (not a VHDX parent)",
                loc.locator_type
            ),
        ));
    }
    let mut v = Vec::new();
    for key in ["parent_linkage", "parent_linkage2"] {
        let Some(text) = loc.get(key) else {
            if key == "parent_linkage" {
                return Err(Error::corrupt(
                    FORMAT,
                    "parent locator",
                    at,
                    "the parent_linkage entry is missing",
                ));
            }
            continue;
        };
        let g: Guid = text.parse().map_err(|_| {
            Error::corrupt(
                FORMAT,
                "parent locator",
                at,
                format!("{key} {text:?} is not a GUID"),
            )
        })?;
        if !g.is_nil() {
            v.push(g);
        }
    }
    Ok(v)
}

/// A Windows path of the parent locator as a relative Unix path (`\` → `/`, `.\` gone).
pub fn unix_relative(p: &str) -> String {
    let s = p.replace('\\', "/");
    s.strip_prefix("./").map(str::to_string).unwrap_or(s)
}

/// The file name at the end of a Windows path.
fn windows_file_name(p: &str) -> &str {
    p.rsplit(['\\', '/']).next().unwrap_or(p)
}

/// Finds and opens the parent, checks that its data write GUID is the child's parent
/// linkage; refuses in untrusted mode.
fn open_parent(
    ctx: &OpenContext,
    p: &Parsed,
    paths: &[(&str, &'static str, &str)],
    linkage: &[Guid],
    source: ParentSource,
) -> Result<Option<Image>> {
    if ctx.options.metadata_only {
        return Ok(None);
    }
    let (field, name) = match source {
        ParentSource::Explicit(name) => ("parent (given by the caller)", name),
        ParentSource::Locator => {
            // Refused in untrusted mode before any file is even looked at.
            let (_, field, first) = paths[0];
            if ctx.options.untrusted {
                return Err(Error::UntrustedReference {
                    format: FORMAT,
                    field,
                    reference: first.to_string(),
                });
            }
            let mut tried: Vec<PathBuf> = Vec::new();
            let mut chosen = None;
            for &(key, field, value) in paths {
                let name = if key == "relative_path" {
                    unix_relative(value)
                } else {
                    windows_file_name(value).to_string()
                };
                let path = ctx.resolve_reference(FORMAT, field, &name)?;
                if path.exists() {
                    chosen = Some((field, name));
                    break;
                }
                if !tried.contains(&path) {
                    tried.push(path);
                }
            }
            let Some(c) = chosen else {
                let list: Vec<String> = tried.iter().map(|t| t.display().to_string()).collect();
                return Err(Error::BackingChain {
                    path: ctx.path.clone().unwrap_or_default(),
                    reason: format!(
                        "the parent {:?} of this differencing image was not found (looked for {})",
                        paths[0].2,
                        list.join(", ")
                    ),
                });
            };
            c
        }
    };
    let img = ctx.open_backing(FORMAT, field, &name, Some(Format::Vhdx))?;
    if let Some(img) = &img {
        let got = img.info().format_specific.as_ref().and_then(|d| match d {
            FormatDetails::Vhdx(v) => v.data_write_guid.parse::<Guid>().ok(),
            _ => None,
        });
        let wanted: Vec<String> = linkage.iter().map(Guid::to_string).collect();
        if got.map_or(true, |g| !linkage.contains(&g)) {
            return Err(Error::BackingChain {
                path: ctx.path.clone().unwrap_or_default(),
                reason: format!(
                    "parent {} has data write GUID {}, but the child's parent linkage is {}",
                    img.info().filename,
                    got.map(|g| g.to_string()).unwrap_or_default(),
                    wanted.join(" or ")
                ),
            });
        }
        let lss = img.info().format_specific.as_ref().and_then(|d| match d {
            FormatDetails::Vhdx(v) => Some(v.logical_sector_size as u64),
            _ => None,
        });
        if lss != Some(p.geometry.logical_sector_size) {
            return Err(Error::BackingChain {
                path: ctx.path.clone().unwrap_or_default(),
                reason: format!(
                    "parent {} has {}-byte logical sectors, the child {}-byte ones",
                    img.info().filename,
                    lss.unwrap_or(0),
                    p.geometry.logical_sector_size
                ),
            });
        }
    }
    Ok(img)
}

/// `info`'s format-specific data.
fn format_specific(p: &Parsed) -> FormatDetails {
    FormatDetails::Vhdx(VhdxDetails {
        subformat: p.subformat().to_string(),
        block_size: p.geometry.block_size as u32,
        logical_sector_size: p.geometry.logical_sector_size as u32,
        physical_sector_size: p.physical_sector_size,
        virtual_disk_id: p.disk_id.to_string(),
        data_write_guid: p.header.data_write_guid.to_string(),
        log_size: p.header.log_length,
        creator: (!p.identifier.creator.is_empty()).then(|| p.identifier.creator.clone()),
        log_entries_replayed: p.replay.as_ref().map(|r| r.entries as u64),
        parent_linkage: p
            .parent_locator
            .as_ref()
            .and_then(|loc| loc.get("parent_linkage"))
            .map(|l| l.to_string()),
    })
}
