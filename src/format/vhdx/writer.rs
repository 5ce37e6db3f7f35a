//! Writing VHDX images, dynamic and fixed, with qemu-img's options.
//!
//! Layout (as QEMU and Hyper-V lay it out, every object 1 MiB-aligned): the header
//! section (file type identifier, two headers, two region tables), an empty log of
//! `log_size` at 1 MiB, the BAT, the 1 MiB metadata region, then the payload blocks.
//! A dynamic image gets a block appended the first time data lands in it (blocks that
//! stay all-zero are never allocated: `ZERO` with `block_state_zero=on`, QEMU's default,
//! `NOT_PRESENT` with `off`); a fixed image has every block `FULLY_PRESENT` in place and
//! the file its full size (blocks never written are holes, which read as zeros). The
//! log is empty (log GUID zero), so the image needs no replay. Everything but the data
//! is written by `finish`, headers last.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{
    payload, serialize_bat, BatEntry, FileIdentifier, Guid, Header, RegionEntry, RegionTable,
    BAT_REGION, FORMAT, HEADER_OFFSETS, HEADER_SECTION_END, METADATA_REGION, MIB,
    REGION_TABLE_OFFSETS,
};
use super::metadata::{
    FileParameters, MetadataEntry, MetadataTable, FILE_PARAMETERS, LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE, TABLE_SIZE, VIRTUAL_DISK_ID, VIRTUAL_DISK_SIZE,
};
use super::reader::{Geometry, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::io::{write_all_at, AllocateAhead, OutputSet};
use crate::writer::{parse_bool, parse_size, DataRun, ImageWriter, WriteOptions};

/// Largest virtual disk the format allows (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// QEMU's default log size.
pub const DEFAULT_LOG_SIZE: u64 = MIB;

/// What to write, decided from the `-o` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhdxOptions {
    /// `subformat=fixed`.
    pub fixed: bool,
    /// `block_size`, 0 = chosen from the disk size as QEMU chooses it.
    pub block_size: u64,
    /// `log_size`.
    pub log_size: u64,
    /// `block_state_zero`: unwritten blocks of a dynamic image are `ZERO` (on, QEMU's
    /// default) or `NOT_PRESENT` (off).
    pub block_state_zero: bool,
    /// `logical_sector_size` (512, QEMU's only choice, or 4096); the physical sector
    /// size is the same.
    pub logical_sector_size: u64,
}

impl Default for VhdxOptions {
    fn default() -> Self {
        VhdxOptions {
            fixed: false,
            block_size: 0,
            log_size: DEFAULT_LOG_SIZE,
            block_state_zero: true,
            logical_sector_size: 512,
        }
    }
}

impl VhdxOptions {
    /// Takes the options a VHDX writer knows out of `opts` and refuses the rest. Sizes
    /// are rounded as qemu-img rounds them: block and log sizes up to 1 MiB, a block
    /// size above 256 MiB down to 256 MiB.
    pub fn from_write_options(opts: &WriteOptions) -> Result<VhdxOptions> {
        let mut opts = opts.clone();
        let mut o = VhdxOptions::default();
        if let Some(v) = opts.take("subformat") {
            o.fixed = match v.as_str() {
                "dynamic" => false,
                "fixed" => true,
                other => {
                    return Err(Error::invalid(format!(
                        "vhdx: subformat '{other}' is not dynamic or fixed"
                    )))
                }
            };
        }
        if let Some(v) = opts.take("block_size") {
            let n = parse_size(&v)?;
            let n = n.div_ceil(MIB) * MIB;
            let n = n.min(MAX_BLOCK_SIZE as u64);
            if n != 0 && !n.is_power_of_two() {
                return Err(Error::invalid(format!(
                    "vhdx: block_size {n} must be a power of two"
                )));
            }
            o.block_size = n;
        }
        if let Some(v) = opts.take("log_size") {
            let n = parse_size(&v)?.div_ceil(MIB) * MIB;
            if n < MIB || n > u32::MAX as u64 {
                return Err(Error::invalid(format!(
                    "vhdx: log_size {n} must be at least 1 MiB and smaller than 4 GiB"
                )));
            }
            o.log_size = n;
        }
        if let Some(v) = opts.take("block_state_zero") {
            o.block_state_zero = parse_bool("block_state_zero", &v)?;
        }
        if let Some(v) = opts.take("logical_sector_size") {
            o.logical_sector_size = match parse_size(&v)? {
                n @ (512 | 4096) => n,
                n => {
                    return Err(Error::invalid(format!(
                        "vhdx: logical_sector_size {n} is neither 512 nor 4096"
                    )))
                }
            };
        }
        opts.reject_unknown(Format::Vhdx)?;
        if opts.compressed {
            return Err(Error::unsupported(FORMAT, "compression (-c)"));
        }
        if opts.backing_file.is_some() {
            return Err(Error::unsupported(
                FORMAT,
                "writing differencing images (backing file)",
            ));
        }
        Ok(o)
    }
}

/// QEMU's block size for a disk of `size` bytes when none is given.
pub fn auto_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 << 30 {
        32 * MIB
    } else if size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// Where everything of a new image goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Block and BAT geometry.
    pub geometry: Geometry,
    /// Log offset (1 MiB) and length.
    pub log_offset: u64,
    /// Log length.
    pub log_length: u64,
    /// BAT region.
    pub bat_offset: u64,
    /// BAT region length (whole MiB).
    pub bat_length: u64,
    /// Metadata region (1 MiB long).
    pub metadata_offset: u64,
    /// First payload block.
    pub data_offset: u64,
}

impl Layout {
    /// The layout of a new image of `size` bytes (rounded up to whole sectors).
    pub fn new(size: u64, o: &VhdxOptions) -> Result<Layout> {
        let lss = o.logical_sector_size;
        let size = size.div_ceil(lss) * lss;
        if size > MAX_DISK_SIZE {
            return Err(Error::invalid(format!(
                "vhdx: disk size {size} is larger than the format's 64 TiB"
            )));
        }
        let bs = if o.block_size == 0 {
            auto_block_size(size)
        } else {
            o.block_size
        };
        debug_assert!((MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bs));
        let geometry = Geometry::new(size, bs, lss, false);
        let log_offset = HEADER_SECTION_END;
        let bat_offset = log_offset + o.log_size;
        let bat_length = (geometry.bat_entries * 8).div_ceil(MIB).max(1) * MIB;
        let metadata_offset = bat_offset + bat_length;
        let data_offset = metadata_offset + MIB;
        Ok(Layout {
            geometry,
            log_offset,
            log_length: o.log_size,
            bat_offset,
            bat_length,
            metadata_offset,
            data_offset,
        })
    }

    /// The header section: file type identifier, two headers (the second current) and
    /// two copies of the region table, `HEADER_SECTION_END` bytes.
    pub fn header_section(&self, creator: &str, data_write_guid: Guid) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SECTION_END as usize];
        let id = FileIdentifier {
            creator: creator.into(),
        }
        .serialize();
        b[..id.len()].copy_from_slice(&id);
        let file_write_guid = Guid::random();
        for (i, &at) in HEADER_OFFSETS.iter().enumerate() {
            let h = Header {
                signature: Header::SIGNATURE,
                checksum: 0,
                sequence_number: 1 + i as u64,
                file_write_guid,
                data_write_guid,
                log_guid: Guid::NIL,
                log_version: 0,
                version: 1,
                log_length: self.log_length as u32,
                log_offset: self.log_offset,
            }
            .serialize();
            b[at as usize..at as usize + h.len()].copy_from_slice(&h);
        }
        let rt = RegionTable {
            entries: vec![
                RegionEntry {
                    guid: BAT_REGION,
                    file_offset: self.bat_offset,
                    length: self.bat_length as u32,
                    required: 1,
                },
                RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: self.metadata_offset,
                    length: MIB as u32,
                    required: 1,
                },
            ],
        }
        .serialize();
        for at in REGION_TABLE_OFFSETS {
            b[at as usize..at as usize + rt.len()].copy_from_slice(&rt);
        }
        b
    }

    /// The metadata table and its five items (QEMU's order, items from 64 KiB on).
    pub fn metadata(&self, fixed: bool, disk_id: Guid) -> Vec<u8> {
        let g = &self.geometry;
        let params = FileParameters {
            block_size: g.block_size as u32,
            leave_blocks_allocated: fixed,
            has_parent: false,
            reserved: 0,
        }
        .serialize();
        let lss = (g.logical_sector_size as u32).to_le_bytes();
        let items: [(_, &[u8], u32); 5] = [
            (FILE_PARAMETERS, &params, MetadataEntry::IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, &g.disk_size.to_le_bytes(), 6),
            (VIRTUAL_DISK_ID, &disk_id.0, 6),
            (LOGICAL_SECTOR_SIZE, &lss, 6),
            (PHYSICAL_SECTOR_SIZE, &lss, 6),
        ];
        let mut b = vec![0u8; TABLE_SIZE + 64];
        let mut entries = Vec::new();
        let mut at = TABLE_SIZE;
        for (id, data, flags) in items {
            b[at..at + data.len()].copy_from_slice(data);
            entries.push(MetadataEntry {
                item_id: id,
                offset: at as u32,
                length: data.len() as u32,
                flags,
            });
            at += data.len();
        }
        let t = MetadataTable { entries }.serialize();
        b[..t.len()].copy_from_slice(&t);
        b
    }
}

/// Writes one VHDX file.
pub struct VhdxWriter {
    file: File,
    path: PathBuf,
    layout: Layout,
    fixed: bool,
    bat: Vec<BatEntry>,
    /// Where the next block of a dynamic image goes.
    next_block: u64,
    /// Blocks are allocated just before they are written (the file is new and sparse).
    allocate_ahead: AllocateAhead,
}

/// The name written into the file type identifier.
pub fn creator() -> String {
    format!("imgconv v{}", env!("CARGO_PKG_VERSION"))
}

/// Creates a VHDX writer for `target`.
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let o = VhdxOptions::from_write_options(opts)?;
    out.require_new_files(FORMAT)?;
    let layout = Layout::new(size, &o)?;
    let g = layout.geometry;
    let file = out.create(target)?;
    let path = target.to_path_buf();
    let unwritten = if o.block_state_zero {
        payload::ZERO
    } else {
        payload::NOT_PRESENT
    };
    let mut bat = vec![BatEntry::default(); g.bat_entries as usize];
    for block in 0..g.payload_blocks {
        bat[g.payload_index(block) as usize] = if o.fixed {
            BatEntry::new(
                payload::FULLY_PRESENT,
                layout.data_offset + block * g.block_size,
            )
        } else {
            BatEntry::new(unwritten, 0)
        };
    }
    let len = if o.fixed {
        layout.data_offset + g.payload_blocks * g.block_size
    } else {
        layout.data_offset
    };
    file.set_len(len).map_err(|e| Error::io(&path, e))?;
    Ok(Box::new(VhdxWriter {
        file,
        path,
        layout,
        fixed: o.fixed,
        bat,
        next_block: layout.data_offset,
        allocate_ahead: AllocateAhead::new(true),
    }))
}

impl VhdxWriter {
    /// The file offset of payload block `block`, allocating it in a dynamic image.
    fn block_offset(&mut self, block: u64) -> u64 {
        let g = self.layout.geometry;
        let i = g.payload_index(block) as usize;
        let e = self.bat[i];
        if e.state() == payload::FULLY_PRESENT {
            return e.offset();
        }
        let at = self.next_block;
        self.next_block += g.block_size;
        self.bat[i] = BatEntry::new(payload::FULLY_PRESENT, at);
        at
    }

    fn put(&mut self, at: u64, data: &[u8]) -> Result<()> {
        self.allocate_ahead
            .before_write(&self.file, at, data.len() as u64);
        write_all_at(&self.file, data, at, &self.path)
    }
}

impl ImageWriter for VhdxWriter {
    fn grain_size(&self) -> u64 {
        // Zero detection at the sector level; blocks (up to 256 MiB) are allocated by the
        // writer, so that the engine's units stay small.
        self.layout.geometry.logical_sector_size
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let g = self.layout.geometry;
        let end = run.offset.checked_add(run.data.len() as u64);
        if run.offset % g.logical_sector_size != 0 || end.is_none_or(|e| e > g.disk_size) {
            return Err(Error::invalid(format!(
                "vhdx: internal error: data run at {:#x}+{} is not sector-aligned inside the disk",
                run.offset,
                run.data.len()
            )));
        }
        // One write per stretch that is contiguous in the file.
        let mut pending: Option<(u64, usize, usize)> = None; // (file offset, start, end)
        let mut pos = run.offset;
        let mut done = 0usize;
        while done < run.data.len() {
            let block = pos / g.block_size;
            let within = pos % g.block_size;
            let n = ((g.block_size - within) as usize).min(run.data.len() - done);
            let at = self.block_offset(block) + within;
            match &mut pending {
                Some((p, a, b)) if *p + (*b - *a) as u64 == at => *b = done + n,
                _ => {
                    if let Some((p, a, b)) = pending.take() {
                        self.put(p, &run.data[a..b])?;
                    }
                    pending = Some((at, done, done + n));
                }
            }
            pos += n as u64;
            done += n;
        }
        if let Some((p, a, b)) = pending {
            self.put(p, &run.data[a..b])?;
        }
        Ok(())
    }

    fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
        // A fresh image reads as zeros already: unallocated blocks (dynamic), holes in
        // allocated blocks and in a fixed image's file.
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let l = self.layout;
        if !self.fixed {
            // Whole blocks, as the spec wants the file to grow.
            self.file
                .set_len(self.next_block)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let bat = serialize_bat(&self.bat);
        write_all_at(&self.file, &bat, l.bat_offset, &self.path)?;
        let md = l.metadata(self.fixed, Guid::random());
        write_all_at(&self.file, &md, l.metadata_offset, &self.path)?;
        // The header section last: until then the file is no valid image.
        let head = l.header_section(&creator(), Guid::random());
        write_all_at(&self.file, &head, 0, &self.path)
        // No fdatasync, like `qemu-img convert`: the rename on commit guards against
        // interruption.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_rounded_as_qemu_rounds_them() {
        let mut w = WriteOptions::default();
        w.parse_o("block_size=3M,log_size=1").unwrap();
        assert!(VhdxOptions::from_write_options(&w).is_err());
        let mut w = WriteOptions::default();
        w.parse_o("block_size=1G,log_size=100k,subformat=fixed,block_state_zero=off")
            .unwrap();
        let o = VhdxOptions::from_write_options(&w).unwrap();
        assert_eq!(o.block_size, 256 * MIB);
        assert_eq!(o.log_size, MIB);
        assert!(o.fixed && !o.block_state_zero);
        let mut w = WriteOptions::default();
        w.parse_o("block_size=0,bogus=1").unwrap();
        assert!(VhdxOptions::from_write_options(&w).is_err());
        let mut w = WriteOptions::default();
        w.parse_o("subformat=streamOptimized").unwrap();
        assert!(VhdxOptions::from_write_options(&w).is_err());
    }

    #[test]
    fn layout_follows_qemu() {
        let o = VhdxOptions::default();
        let l = Layout::new(20 << 20, &o).unwrap();
        assert_eq!(l.geometry.block_size, 8 * MIB);
        assert_eq!(
            (l.log_offset, l.bat_offset, l.metadata_offset),
            (MIB, 2 * MIB, 3 * MIB)
        );
        assert_eq!(l.data_offset, 4 * MIB);
        assert_eq!(auto_block_size(2 << 30), 16 * MIB);
        assert_eq!(auto_block_size(200 << 30), 32 * MIB);
        assert_eq!(auto_block_size(40 << 40), 64 * MIB);
        assert!(Layout::new(65 << 40, &o).is_err());
        // 4 KiB sectors: sizes round up to whole sectors.
        let o4 = VhdxOptions {
            logical_sector_size: 4096,
            ..o
        };
        assert_eq!(Layout::new(5000, &o4).unwrap().geometry.disk_size, 8192);
    }
}
