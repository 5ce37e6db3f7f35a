//! Reading VDI images: header and block-map validation, the block device, and finding
//! the parent of a differencing image.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{
    Header, ImageType, PreHeader, BLOCK_ZERO, FORMAT, MAX_HEADER_BYTES, PRE_HEADER_SIZE, SIGNATURE,
};
use crate::details::{FormatDetails, VdiDetails};
use crate::detect::Format;
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::image::{FileReference, Image, ImageInfo, OpenContext, Opened};
use crate::io::table::{Entry as TableEntry, PagedTable};
use crate::io::{read_struct, Storage};
use crate::limits::{MAX_VDI_PARENT_CANDIDATES, MAX_VDI_PARENT_SCAN};

/// The header field name used for a differencing image's reference to its parent.
pub const PARENT_FIELD: &str = "parent UUID";

/// What one virtual block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Stored in the file at this offset (start of the guest data, after the extra bytes).
    Data(u64),
    /// Discarded: reads as zeros, the parent is not consulted.
    Zero,
    /// Never allocated: read from the parent, or zeros for a base image.
    Free,
}

/// A VDI image as a block device (with its parent underneath, for child images).
pub struct VdiDevice {
    storage: Arc<dyn Storage>,
    header: Header,
    /// The block map, validated at open and read a page at a time.
    map: PagedTable,
    /// For child images: the parent, or `None` when it was not opened (metadata only).
    parent: Option<Arc<dyn BlockDevice>>,
    has_parent: bool,
}

impl VdiDevice {
    /// The header as read.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn block(&self, idx: u64) -> Result<Block> {
        Ok(self.kind(self.map.get(idx)? as u32))
    }

    fn kind(&self, e: u32) -> Block {
        match e {
            BLOCK_ZERO => Block::Zero,
            e if e > BLOCK_ZERO => Block::Free,
            e => Block::Data(
                self.header.data_offset as u64
                    + e as u64 * self.header.block_stride()
                    + self.header.block_extra as u64,
            ),
        }
    }

    fn parent(&self) -> Result<&Arc<dyn BlockDevice>> {
        self.parent.as_ref().ok_or_else(|| Error::NotOpened {
            format: FORMAT,
            reference: format!("the parent image (UUID {})", self.header.uuid_linkage),
        })
    }

    /// Reads `buf` at guest `offset` from the parent; beyond the parent's end, zeros.
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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

    fn io_err(&self, e: std::io::Error, host: u64) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            // The block map was checked against the file size at open; the file shrank.
            return Error::corrupt(
                FORMAT,
                "data block",
                host,
                "the file ends inside a data block",
            );
        }
        match self.storage.path() {
            Some(p) => Error::io(p, e),
            None => Error::Stream(e),
        }
    }
}

impl BlockDevice for VdiDevice {
    fn size(&self) -> u64 {
        self.header.disk_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        let bs = self.header.block_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / bs;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.block(idx)? {
                Block::Data(host) => self
                    .storage
                    .read_exact_at(part, host + within)
                    .map_err(|e| self.io_err(e, host))?,
                Block::Zero => part.fill(0),
                Block::Free if self.has_parent => self.read_parent(part, pos)?,
                Block::Free => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size())?;
        let bs = self.header.block_size as u64;
        let end = offset + len;
        let idx = offset / bs;
        let e0 = self.map.get(idx)? as u32;
        let first = self.kind(e0);
        // Extend over following blocks of the same kind (data only while contiguous in
        // the file, so that the host offset stays meaningful), a page of the map at a
        // time.
        let blocks = (end - 1) / bs + 1 - idx;
        let contiguous = self.header.block_extra == 0;
        let k = std::cell::Cell::new(0u64);
        let same = self.map.run_while(idx, blocks, |e| {
            let e = e as u32;
            let n = k.get();
            k.set(n + 1);
            match first {
                Block::Data(_) => n == 0 || (contiguous && u64::from(e) == u64::from(e0) + n),
                _ => self.kind(e) == first,
            }
        })?;
        let run_end = ((idx + same.max(1)) * bs).min(end);
        let run = run_end - offset;
        Ok(match first {
            Block::Data(host) => {
                let mut e = Extent::new(offset, run, ExtentKind::Data);
                e.host_offset = Some(host + offset % bs);
                e
            }
            Block::Zero => Extent::new(offset, run, ExtentKind::Zero),
            Block::Free if self.has_parent => {
                let parent = self.parent()?;
                let psize = parent.size();
                if offset >= psize {
                    let mut e = Extent::new(offset, run, ExtentKind::Unallocated);
                    e.depth = 1;
                    e
                } else {
                    let mut e = parent.map(offset, run.min(psize - offset))?;
                    e.depth += 1;
                    e
                }
            }
            Block::Free => Extent::new(offset, run, ExtentKind::Unallocated),
        })
    }
}

/// Reads and checks the pre-header and header of `storage`.
pub fn read_header(storage: &dyn Storage) -> Result<(PreHeader, Header)> {
    let file_len = storage.len();
    let mut pre = [0u8; PRE_HEADER_SIZE];
    read_struct(storage, &mut pre, 0, FORMAT, "pre-header")?;
    let p = PreHeader::parse(&pre);
    if p.signature != SIGNATURE {
        return Err(Error::corrupt(
            FORMAT,
            "pre-header",
            0x40,
            format!("signature {:#010x} is not {SIGNATURE:#010x}", p.signature),
        ));
    }
    match p.major() {
        1 => {}
        0 => {
            return Err(Error::unsupported(
                FORMAT,
                "header version 0 (VirtualBox before 1.1)",
            ))
        }
        m => {
            return Err(Error::unsupported(
                FORMAT,
                format!("header version {m}.{}", p.minor()),
            ))
        }
    }
    let n = (MAX_HEADER_BYTES as u64).min(file_len) as usize;
    let mut b = vec![0u8; n.max(PRE_HEADER_SIZE + 4)];
    read_struct(storage, &mut b, 0, FORMAT, "header")?;
    let h = Header::parse(&b)?;
    h.validate(file_len)?;
    Ok((p, h))
}

/// Checks every entry of the block map, walking it a page at a time: inside the image's
/// blocks, its data inside the file, and unique. The map is never held whole: a header
/// alone can declare 2^28 entries (1 GiB) that the file holds as a hole.
fn check_block_map(storage: &Arc<dyn Storage>, h: &Header) -> Result<PagedTable> {
    let file_len = storage.len();
    // `validate` has checked that the map lies inside the file.
    let map = PagedTable::new(
        storage.clone(),
        h.blocks_offset as u64,
        h.blocks as u64,
        TableEntry::U32Le,
        FORMAT,
        "block map",
    );
    // One bit per physical block that can lie inside the file: an entry beyond fails
    // the end-of-file check first, so the bitset is bounded by the file too.
    let stride = h.block_stride().max(1);
    let physical = (h.blocks as u64).min(file_len / stride + 1);
    let mut seen = vec![0u64; physical.div_ceil(64) as usize];
    let bs = h.block_size as u64;
    map.for_each(|i, e| {
        let e = e as u32;
        if e >= BLOCK_ZERO {
            return Ok(());
        }
        let at = map.entry_offset(i);
        if e >= h.blocks {
            return Err(Error::corrupt(
                FORMAT,
                "block map entry",
                at,
                format!(
                    "block {i} points to physical block {e}, but the image has {} blocks",
                    h.blocks
                ),
            ));
        }
        // The guest-visible part of the block must be in the file.
        let visible = bs.min(h.disk_size.saturating_sub(i * bs));
        let start = h.data_offset as u64 + e as u64 * stride + h.block_extra as u64;
        if start + visible > file_len || e as u64 >= physical {
            return Err(Error::corrupt(
                FORMAT,
                "block map entry",
                at,
                format!(
                    "block {i} is stored at {start:#x}..{:#x}, past the end of the file ({file_len:#x})",
                    start + visible
                ),
            ));
        }
        let (w, bit) = (e as usize / 64, 1u64 << (e % 64));
        if seen[w] & bit != 0 {
            return Err(Error::corrupt(
                FORMAT,
                "block map entry",
                at,
                format!("block {i} points to physical block {e}, which another block uses too"),
            ));
        }
        seen[w] |= bit;
        Ok(())
    })?;
    Ok(map)
}

/// Reads the whole block map, checked as [`check_block_map`] checks it, into memory
/// (for writing into the image in place: 4 bytes per block of a map inside the file).
pub(crate) fn read_block_map(storage: &Arc<dyn Storage>, h: &Header) -> Result<Vec<u32>> {
    let map = check_block_map(storage, h)?;
    let mut v = Vec::with_capacity(h.blocks as usize);
    map.for_each(|_, e| {
        v.push(e as u32);
        Ok(())
    })?;
    Ok(v)
}

/// Where the parent of a differencing image comes from.
#[derive(Debug, Clone)]
pub enum ParentSource {
    /// Search the image's folder (and, for a VirtualBox `Snapshots` folder, the folder
    /// above it) for the VDI whose image UUID is the child's parent UUID.
    Search,
    /// This file, given by the caller (relative names resolve against the image's folder).
    Explicit(String),
}

/// Opens a VDI image; differencing images get their parent through `parent`.
pub fn open_with(
    storage: Arc<dyn Storage>,
    ctx: &OpenContext,
    parent: ParentSource,
) -> Result<Opened> {
    let (pre, h) = read_header(storage.as_ref())?;
    let map = check_block_map(&storage, &h)?;
    let kind = h.kind().unwrap_or(ImageType::Dynamic);

    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vdi, h.disk_size);
    info.actual_size = Some(storage.allocated_bytes());
    info.cluster_size = Some(h.block_size as u64);
    info.format_specific = Some(format_specific(&pre, &h, kind));

    let mut parent_dev = None;
    if kind.has_parent() {
        let uuid = h.uuid_linkage.to_string();
        info.references.push(FileReference {
            field: PARENT_FIELD.into(),
            name: uuid.clone(),
        });
        if let Some(img) = open_parent(ctx, &h, parent)? {
            info.backing_filename = Some(img.info().filename.clone());
            info.full_backing_filename = Some(img.info().filename.clone());
            info.backing_filename_format = Some(img.info().format.name().into());
            info.backing = Some(Box::new(img.info().clone()));
            parent_dev = Some(img.device().clone());
        }
    }
    let dev = VdiDevice {
        storage,
        header: h,
        map,
        parent: parent_dev,
        has_parent: kind.has_parent(),
    };
    Ok(Opened {
        device: Arc::new(dev),
        info,
    })
}

fn format_specific(pre: &PreHeader, h: &Header, kind: ImageType) -> FormatDetails {
    let comment = h.comment_str();
    FormatDetails::Vdi(VdiDetails {
        image_type: kind.name().to_string(),
        header_version: format!("{}.{}", pre.major(), pre.minor()),
        header_size: h.header_size,
        file_info: pre.text_str().to_string(),
        block_size: h.block_size,
        block_extra: (h.block_extra != 0).then_some(h.block_extra),
        blocks: h.blocks,
        allocated_blocks: h.blocks_allocated,
        uuid: h.uuid_create.to_string(),
        modification_uuid: h.uuid_modify.to_string(),
        parent_uuid: (!h.uuid_linkage.is_null()).then(|| h.uuid_linkage.to_string()),
        parent_modification_uuid: (!h.uuid_parent_modify.is_null())
            .then(|| h.uuid_parent_modify.to_string()),
        comment: (!comment.is_empty()).then(|| comment.to_string()),
    })
}

/// Finds and opens the parent of a child image, or refuses to in untrusted mode.
fn open_parent(ctx: &OpenContext, h: &Header, source: ParentSource) -> Result<Option<Image>> {
    if ctx.options.metadata_only {
        return Ok(None);
    }
    let uuid = h.uuid_linkage.to_string();
    // A searched parent is a VDI by construction; an explicit one may be any format
    // (VirtualBox puts VDI snapshots on top of VMDK base disks too).
    let (name, fmt) = match source {
        ParentSource::Explicit(name) => (name, None),
        ParentSource::Search => {
            if ctx.options.untrusted {
                // Refused before any other file is even looked at.
                return Err(Error::UntrustedReference {
                    format: FORMAT,
                    field: PARENT_FIELD,
                    reference: uuid,
                });
            }
            (find_parent(ctx, h)?, Some(Format::Vdi))
        }
    };
    let img = ctx.open_backing(FORMAT, PARENT_FIELD, &name, fmt)?;
    if let Some(img) = &img {
        // Where the parent states an image UUID (every VDI does), it must be the one
        // the child names; a parent without one was vouched for by the caller.
        let got = match &img.info().format_specific {
            Some(FormatDetails::Vdi(d)) => Some(d.uuid.clone()),
            _ => None,
        };
        let is_vdi = img.info().format == Format::Vdi;
        if let Some(got) = got.filter(|_| is_vdi) {
            if got != uuid {
                return Err(Error::BackingChain {
                    path: ctx.path.clone().unwrap_or_default(),
                    reason: format!(
                        "parent {} has image UUID {got}, but the child's parent UUID is {uuid}",
                        img.info().filename
                    ),
                });
            }
        }
    }
    Ok(img)
}

/// Looks for the parent among the `*.vdi` files of the image's folder (and of the folder
/// above, when the image sits in a VirtualBox `Snapshots` folder). Returns its name
/// relative to the image's folder.
fn find_parent(ctx: &OpenContext, h: &Header) -> Result<String> {
    let here = ctx.path.clone().unwrap_or_default();
    let dir = ctx.dir.clone().ok_or_else(|| Error::BackingChain {
        path: here.clone(),
        reason: format!(
            "the parent image (UUID {}) cannot be searched for: the image has no folder",
            h.uuid_linkage
        ),
    })?;
    let mut folders: Vec<(PathBuf, &str)> = vec![(dir.clone(), "")];
    if dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.eq_ignore_ascii_case("snapshots")))
        .unwrap_or(false)
    {
        folders.push((dir.join(".."), "../"));
    }
    let mut exact: Option<String> = None;
    let mut loose: Option<String> = None;
    let mut examined = 0usize;
    let mut candidates = 0usize;
    for (folder, prefix) in folders {
        let Ok(rd) = std::fs::read_dir(&folder) else {
            continue;
        };
        let mut names: Vec<String> = Vec::new();
        for entry in rd {
            examined += 1;
            if examined > MAX_VDI_PARENT_SCAN {
                break;
            }
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_vdi = Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vdi"));
            if is_vdi {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let path = folder.join(&name);
            if ctx.is_self(&path) {
                continue;
            }
            candidates += 1;
            if candidates > MAX_VDI_PARENT_CANDIDATES {
                break;
            }
            let Some(ph) = peek_header(&path) else {
                continue;
            };
            if ph.uuid_create != h.uuid_linkage {
                continue;
            }
            let rel = format!("{prefix}{name}");
            if ph.uuid_modify == h.uuid_parent_modify {
                exact.get_or_insert(rel);
            } else {
                loose.get_or_insert(rel);
            }
        }
    }
    exact.or(loose).ok_or_else(|| Error::BackingChain {
        path: here,
        reason: format!(
            "no VDI file with UUID {} (the parent of this differencing image) in {}",
            h.uuid_linkage,
            dir.display()
        ),
    })
}

/// Reads the header of a would-be parent; `None` when it is not a valid VDI.
fn peek_header(path: &Path) -> Option<Header> {
    let s = crate::io::FileStorage::open(path).ok()?;
    read_header(&s).ok().map(|(_, h)| h)
}
