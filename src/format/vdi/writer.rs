//! Writing VDI images as VirtualBox lays them out: pre-header text, header 1.1 with
//! LCHS geometry (`cbHeader` 0x190), block map and data aligned to 1 MiB, fresh UUIDs.
//!
//! Dynamic images get a block appended for each block with data (all-zero blocks stay
//! unallocated); static images map every block to itself and have the file's full size
//! (blocks never written are holes, which read as zeros). The header and the block map
//! are written once, by `finish`.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::header::{
    serialize_block_map, Geometry, Header, ImageType, PreHeader, Uuid, BLOCK_FREE, COMMENT_SIZE,
    FORMAT, HEADER_SIZE_V1_PLUS, MAX_HEADER_BYTES, VIRTUALBOX_TEXT,
};
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::io::{write_all_at, AllocateAhead, OutputSet};
use crate::limits::{MAX_VDI_BLOCKS, MAX_VIRTUAL_SIZE};
use crate::writer::{parse_bool, parse_size, DataRun, ImageWriter, WriteOptions};

/// Default block size (VirtualBox's and the only one QEMU reads).
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Smallest block size `-o cluster_size` accepts.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size `-o cluster_size` accepts (one block is one unit of work).
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Alignment of the block map and of the data area (VirtualBox's `VDI_DATA_ALIGN`).
pub const DATA_ALIGN: u64 = 1 << 20;

/// What to write, decided from the `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiOptions {
    /// `static=on`: a fixed image with every block allocated.
    pub fixed: bool,
    /// `uuid=…`: the image UUID; random when unset.
    pub uuid: Option<Uuid>,
    /// `cluster_size=…`: the block size.
    pub block_size: u32,
}

impl VdiOptions {
    /// Takes the options a VDI writer knows out of `opts` and refuses the rest.
    pub fn from_write_options(opts: &WriteOptions) -> Result<VdiOptions> {
        let mut opts = opts.clone();
        let fixed = match opts.take("static") {
            Some(v) => parse_bool("static", &v)?,
            None => false,
        };
        let uuid = match opts.take("uuid") {
            Some(v) => {
                let u: Uuid = v.parse()?;
                if u.is_null() {
                    return Err(Error::invalid(
                        "vdi: the image UUID must not be null (VirtualBox refuses such images)",
                    ));
                }
                Some(u)
            }
            None => None,
        };
        let block_size = match opts.take("cluster_size") {
            Some(v) => {
                let n = parse_size(&v)?;
                if !n.is_power_of_two() || n < MIN_BLOCK_SIZE as u64 || n > MAX_BLOCK_SIZE as u64 {
                    return Err(Error::invalid(format!(
                        "vdi: cluster_size {n} must be a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
                    )));
                }
                n as u32
            }
            None => DEFAULT_BLOCK_SIZE,
        };
        opts.reject_unknown(Format::Vdi)?;
        if opts.compressed {
            return Err(Error::unsupported(FORMAT, "compression (-c)"));
        }
        if opts.backing_file.is_some() {
            return Err(Error::unsupported(
                FORMAT,
                "writing differencing images (backing file)",
            ));
        }
        Ok(VdiOptions {
            fixed,
            uuid,
            block_size,
        })
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// The header VirtualBox would write for a new image of `disk_size` bytes.
pub fn new_header(disk_size: u64, o: &VdiOptions) -> Result<Header> {
    if disk_size == 0 {
        return Err(Error::invalid(
            "vdi: the disk size must not be 0 (VirtualBox refuses empty VDI images)",
        ));
    }
    // VirtualBox rounds a size that is not a multiple of 512 down on open, which would
    // cut off data: round up instead, as qemu-img does.
    let disk_size = align_up(disk_size, 512);
    if disk_size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "vdi: disk size {disk_size} is too large"
        )));
    }
    let bs = o.block_size as u64;
    let blocks = disk_size.div_ceil(bs);
    if blocks > MAX_VDI_BLOCKS || blocks > u32::MAX as u64 {
        return Err(Error::invalid(format!(
            "vdi: a {disk_size}-byte disk needs {blocks} blocks of {bs} bytes, more than {MAX_VDI_BLOCKS}"
        )));
    }
    let blocks_offset = align_up(MAX_HEADER_BYTES as u64, DATA_ALIGN);
    let data_offset = align_up(blocks_offset + 4 * blocks, DATA_ALIGN);
    let data_offset = u32::try_from(data_offset).map_err(|_| {
        Error::invalid(format!(
            "vdi: the block map of {blocks} entries does not fit below 4 GiB"
        ))
    })?;
    let kind = if o.fixed {
        ImageType::Static
    } else {
        ImageType::Dynamic
    };
    Ok(Header {
        header_size: HEADER_SIZE_V1_PLUS,
        image_type: kind.to_u32(),
        flags: 0,
        comment: [0; COMMENT_SIZE],
        blocks_offset: blocks_offset as u32,
        data_offset,
        legacy_geometry: Geometry::UNSET,
        dummy: 0,
        disk_size,
        block_size: o.block_size,
        block_extra: 0,
        blocks: blocks as u32,
        blocks_allocated: if o.fixed { blocks as u32 } else { 0 },
        uuid_create: o.uuid.unwrap_or_else(Uuid::random),
        uuid_modify: Uuid::random(),
        uuid_linkage: Uuid::NULL,
        uuid_parent_modify: Uuid::NULL,
        lchs: Some(Geometry::UNSET),
    })
}

/// Writes one VDI file.
pub struct VdiWriter {
    file: File,
    path: PathBuf,
    header: Header,
    /// Dynamic images: the virtual blocks stored, in the order of their physical
    /// blocks (the engine writes in ascending order). The map itself — up to 2^28
    /// entries, mostly free — is only ever made a piece at a time, when written.
    stored: Vec<u32>,
    fixed: bool,
    /// Physical blocks used so far (dynamic images).
    allocated: u32,
    /// Guest size as the engine sees it (the header's size is rounded up to 512).
    size: u64,
    /// Blocks are allocated just before they are written (the file is new and sparse).
    allocate_ahead: AllocateAhead,
}

/// Creates a VDI writer for `target`.
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let o = VdiOptions::from_write_options(opts)?;
    if out.is_stream() {
        return Err(Error::NeedsSeekableOutput {
            format: FORMAT,
            what: "a VDI image".into(),
        });
    }
    if out.is_in_place() {
        return Err(Error::unsupported(
            FORMAT,
            "writing into an existing image (-n)",
        ));
    }
    let header = new_header(size, &o)?;
    let file = out.create(target)?;
    let path = target.to_path_buf();
    if o.fixed {
        let full = header.data_offset as u64 + header.blocks as u64 * header.block_stride();
        file.set_len(full).map_err(|e| Error::io(&path, e))?;
    }
    Ok(Box::new(VdiWriter {
        file,
        path,
        header,
        stored: Vec::new(),
        fixed: o.fixed,
        allocated: 0,
        size,
        allocate_ahead: AllocateAhead::new(true),
    }))
}

impl VdiWriter {
    /// Writes `data` (whole blocks, except at the end of the disk) to the physical
    /// blocks starting at `phys`.
    fn put(&mut self, phys: u64, data: &[u8]) -> Result<()> {
        let at = self.header.data_offset as u64 + phys * self.header.block_stride();
        self.allocate_ahead
            .before_write(&self.file, at, data.len() as u64);
        write_all_at(&self.file, data, at, &self.path)
    }
}

/// Block-map entries made and written at a time.
const MAP_PIECE: u32 = 1 << 18;

impl VdiWriter {
    /// Writes the block map a piece at a time: static images map block i to physical
    /// block i; dynamic ones their stored blocks in order, the rest free.
    fn write_block_map(&self) -> Result<()> {
        let blocks = self.header.blocks;
        let mut next = self.stored.iter().enumerate().peekable();
        let mut first = 0u32;
        while first < blocks {
            let n = MAP_PIECE.min(blocks - first);
            let piece: Vec<u32> = if self.fixed {
                (first..first + n).collect()
            } else {
                let mut p = vec![BLOCK_FREE; n as usize];
                while let Some(&(phys, &idx)) = next.peek() {
                    if idx >= first + n {
                        break;
                    }
                    p[(idx - first) as usize] = phys as u32;
                    next.next();
                }
                p
            };
            let at = self.header.blocks_offset as u64 + first as u64 * 4;
            write_all_at(&self.file, &serialize_block_map(&piece), at, &self.path)?;
            first += n;
        }
        Ok(())
    }
}

impl ImageWriter for VdiWriter {
    fn grain_size(&self) -> u64 {
        self.header.block_size as u64
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let bs = self.header.block_size as usize;
        let end = run.offset.checked_add(run.data.len() as u64);
        if run.offset % bs as u64 != 0 || end.is_none_or(|e| e > self.size) {
            return Err(Error::invalid(format!(
                "vdi: internal error: data run at {:#x}+{} is not block-aligned inside the disk",
                run.offset,
                run.data.len()
            )));
        }
        let first = run.offset / bs as u64;
        // Coalesce consecutive blocks into one write. Zero blocks come here only when
        // the engine is asked to write everything (`-S 0`): they are stored too, as
        // qemu-img stores them then.
        let mut pending: Option<(u64, usize, usize)> = None; // (phys, start, end) in data
        for (k, chunk) in run.data.chunks(bs).enumerate() {
            let idx = first + k as u64;
            let s = k * bs;
            let phys = if self.fixed {
                idx
            } else {
                // The map is rebuilt from `stored` assuming ascending blocks (the
                // ImageWriter contract); anything else would be a wrong image.
                if self.stored.last().is_some_and(|&last| last as u64 >= idx) {
                    return Err(Error::invalid(format!(
                        "vdi: internal error: block {idx} written after block {}",
                        self.stored.last().copied().unwrap_or(0)
                    )));
                }
                let p = self.allocated;
                self.stored.push(idx as u32);
                self.allocated += 1;
                p as u64
            };
            match &mut pending {
                Some((p, a, b)) if *p + ((*b - *a) / bs) as u64 == phys && (*b - *a) % bs == 0 => {
                    *b = s + chunk.len();
                }
                _ => {
                    if let Some((p, a, b)) = pending.take() {
                        self.put(p, &run.data[a..b])?;
                    }
                    pending = Some((phys, s, s + chunk.len()));
                }
            }
        }
        if let Some((p, a, b)) = pending {
            self.put(p, &run.data[a..b])?;
        }
        Ok(())
    }

    fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
        // A fresh image reads as zeros already: free blocks (dynamic) or holes (static).
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.fixed {
            self.header.blocks_allocated = self.allocated;
            // Whole blocks, as VirtualBox allocates them (the tail of a short last
            // block reads as zeros).
            let len =
                self.header.data_offset as u64 + self.allocated as u64 * self.header.block_stride();
            self.file
                .set_len(len)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let mut head = vec![0u8; MAX_HEADER_BYTES];
        PreHeader::new(VIRTUALBOX_TEXT).serialize(&mut head);
        self.header.serialize(&mut head);
        write_all_at(&self.file, &head, 0, &self.path)?;
        self.write_block_map()
        // No fdatasync, like `qemu-img convert`: the rename on commit guards against
        // interruption.
    }
}
