//! Reading VHD images: finding and checking the footer, the dynamic header and the BAT,
//! the block device (fixed, dynamic, differencing), and the parent of a differencing
//! image found through its locators.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::header::{
    bitmap_run, parse_bat, DiskType, DynamicHeader, Footer, LocatorKind, BAT_UNUSED,
    DYNAMIC_HEADER_SIZE, FOOTER_SIZE, FORMAT, MAX_SECTORS, OLD_FOOTER_SIZE, SECTOR,
};
use crate::detect::Format;
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::image::{FileReference, Image, ImageInfo, OpenContext, Opened};
use crate::io::{read_struct, FileStorage, Storage};
use crate::limits::{MAX_VPC_BITMAP_CACHE_BYTES, MAX_VPC_LOCATOR_BYTES};

/// The footer that describes an image, and where it was found.
#[derive(Debug, Clone)]
pub struct FoundFooter {
    /// The footer.
    pub footer: Footer,
    /// Its disk type.
    pub kind: DiskType,
    /// Its offset: 0 for a dynamic or differencing image (the copy qemu reads), the end
    /// of the file minus 512 (or 511) for a fixed one.
    pub offset: u64,
}

/// Finds and checks the footer as qemu does: the copy at offset 0 of a dynamic or
/// differencing image, else the footer of a fixed image in the last 512 bytes (or the
/// last 511, for images of Virtual PC before 2004). Cookie and checksum are verified.
pub fn read_footer(storage: &dyn Storage) -> Result<FoundFooter> {
    let len = storage.len();
    if len < OLD_FOOTER_SIZE as u64 {
        return Err(Error::corrupt(
            FORMAT,
            "footer",
            0,
            format!("the file ({len} bytes) is too small to hold a VHD footer"),
        ));
    }
    let mut head = [0u8; FOOTER_SIZE];
    let head_len = (len as usize).min(FOOTER_SIZE);
    read_struct(storage, &mut head[..head_len], 0, FORMAT, "footer")?;
    if Footer::has_cookie(&head) {
        let head_type = Footer::parse(&head).kind();
        if head_type != Some(DiskType::Fixed) {
            let footer = Footer::validate(&head[..head_len], 0)?;
            let kind = kind_of(&footer, 0)?;
            return Ok(FoundFooter {
                footer,
                kind,
                offset: 0,
            });
        }
        // A fixed disk whose first sector happens to be a footer: its own footer is at
        // the end.
    }
    let mut tail = [0u8; FOOTER_SIZE];
    let tail_len = head_len;
    let tail_at = len - tail_len as u64;
    read_struct(storage, &mut tail[..tail_len], tail_at, FORMAT, "footer")?;
    let (raw, offset) = if Footer::has_cookie(&tail[..tail_len]) {
        (&tail[..tail_len], tail_at)
    } else if tail_len == FOOTER_SIZE && Footer::has_cookie(&tail[1..]) {
        (&tail[1..tail_len], tail_at + 1)
    } else {
        return Err(Error::corrupt(
            FORMAT,
            "footer",
            tail_at,
            "no \"conectix\" footer at offset 0 nor in the last 512 bytes of the file",
        ));
    };
    let footer = Footer::validate(raw, offset)?;
    let kind = kind_of(&footer, offset)?;
    if kind != DiskType::Fixed {
        // qemu too refuses a dynamic image whose copy of the footer at offset 0 is gone.
        return Err(Error::corrupt(
            FORMAT,
            "footer",
            0,
            format!(
                "the {} image's copy of the footer at offset 0 is missing",
                kind.name()
            ),
        ));
    }
    Ok(FoundFooter {
        footer,
        kind,
        offset,
    })
}

fn kind_of(footer: &Footer, offset: u64) -> Result<DiskType> {
    footer.kind().ok_or_else(|| {
        Error::corrupt(
            FORMAT,
            "footer",
            offset + 60,
            format!(
                "disk type {} is none of fixed (2), dynamic (3), differencing (4)",
                footer.disk_type
            ),
        )
    })
}

/// The virtual size of the image `footer` describes (qemu's rule), bounded by 2040 GiB.
pub fn virtual_size(found: &FoundFooter) -> Result<u64> {
    let size = found.footer.virtual_size();
    if size > MAX_SECTORS * SECTOR {
        return Err(Error::TooLarge {
            format: FORMAT,
            structure: "virtual disk (footer size and geometry)",
            size,
            limit: MAX_SECTORS * SECTOR,
        });
    }
    Ok(size)
}

/// The metadata of a dynamic or differencing image, checked: the header, the BAT, and
/// every allocated block inside the file and clear of the metadata and of each other.
#[derive(Debug, Clone)]
pub struct SparseLayout {
    /// The dynamic disk header.
    pub header: DynamicHeader,
    /// Its offset in the file.
    pub header_offset: u64,
    /// The BAT.
    pub bat: Vec<u32>,
}

/// Reads the dynamic header at the footer's `data_offset`.
pub fn read_dynamic_header(storage: &dyn Storage, footer: &Footer) -> Result<DynamicHeader> {
    let at = footer.data_offset;
    let fits = at
        .checked_add(DYNAMIC_HEADER_SIZE as u64)
        .is_some_and(|e| e <= storage.len());
    if !fits {
        return Err(Error::corrupt(
            FORMAT,
            "footer",
            16,
            format!(
                "the dynamic disk header offset {at:#x} is not inside the {}-byte file",
                storage.len()
            ),
        ));
    }
    let mut raw = [0u8; DYNAMIC_HEADER_SIZE];
    read_struct(storage, &mut raw, at, FORMAT, "dynamic disk header")?;
    DynamicHeader::validate(&raw, at)
}

/// Checks the header against the virtual size as qemu does, and the BAT's place in the
/// file (before it is allocated).
pub fn check_table_bounds(h: &DynamicHeader, at: u64, size: u64, file_len: u64) -> Result<()> {
    let bs = h.block_size as u64;
    if size / bs > u32::MAX as u64 {
        return Err(Error::corrupt(
            FORMAT,
            "dynamic disk header",
            at + 32,
            format!("a {size}-byte disk needs more than 2^32 blocks of {bs} bytes"),
        ));
    }
    let entries = h.max_table_entries as u64;
    if entries * bs < size {
        return Err(Error::corrupt(
            FORMAT,
            "dynamic disk header",
            at + 28,
            format!(
                "{entries} BAT entries of {bs}-byte blocks cover less than the {size}-byte disk"
            ),
        ));
    }
    let bat_end = h.table_offset.checked_add(entries * 4);
    if bat_end.map_or(true, |e| e > file_len) {
        return Err(Error::corrupt(
            FORMAT,
            "BAT",
            h.table_offset,
            format!(
                "the BAT of {entries} entries at {:#x} runs past the end of the {file_len}-byte file",
                h.table_offset
            ),
        ));
    }
    Ok(())
}

/// Reads the BAT (bounded by the file size through [`check_table_bounds`]).
pub fn read_bat(storage: &dyn Storage, h: &DynamicHeader) -> Result<Vec<u32>> {
    const CHUNK: usize = 1 << 20;
    let total = h.max_table_entries as usize * 4;
    let mut bat = Vec::with_capacity(h.max_table_entries as usize);
    let mut raw = vec![0u8; total.min(CHUNK)];
    let mut done = 0;
    while done < total {
        let n = (total - done).min(raw.len());
        read_struct(
            storage,
            &mut raw[..n],
            h.table_offset + done as u64,
            FORMAT,
            "BAT",
        )?;
        bat.extend(parse_bat(&raw[..n]));
        done += n;
    }
    Ok(bat)
}

/// A stretch of the file holding metadata, which no block may overlap.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// What it is.
    pub name: &'static str,
}

/// The metadata stretches of a dynamic or differencing image: the footer copy, the
/// header, the BAT, the locators' data (differencing images) and the footer at the end
/// when there is one.
pub fn metadata_regions(
    storage: &dyn Storage,
    h: &DynamicHeader,
    header_offset: u64,
    kind: DiskType,
) -> Vec<Region> {
    let len = storage.len();
    let mut r = vec![
        Region {
            start: 0,
            end: FOOTER_SIZE as u64,
            name: "the footer copy at offset 0",
        },
        Region {
            start: header_offset,
            end: header_offset + DYNAMIC_HEADER_SIZE as u64,
            name: "the dynamic disk header",
        },
        Region {
            start: h.table_offset,
            end: h.table_offset + h.max_table_entries as u64 * 4,
            name: "the BAT",
        },
    ];
    if kind == DiskType::Differencing {
        for l in h.locators.iter().filter(|l| l.kind() != LocatorKind::None) {
            r.push(Region {
                start: l.data_offset,
                end: l.data_offset.saturating_add(l.data_length as u64),
                name: "parent locator data",
            });
        }
    }
    let mut tail = [0u8; 8];
    if len >= FOOTER_SIZE as u64
        && storage
            .read_exact_at(&mut tail, len - FOOTER_SIZE as u64)
            .is_ok()
        && Footer::has_cookie(&tail)
    {
        r.push(Region {
            start: len - FOOTER_SIZE as u64,
            end: len,
            name: "the footer at the end of the file",
        });
    }
    r
}

/// Checks every allocated BAT entry: its bitmap and block inside the file (as qemu
/// does), clear of the metadata and of every other block.
fn check_blocks(bat: &[u32], h: &DynamicHeader, regions: &[Region], file_len: u64) -> Result<()> {
    let stride = h.bitmap_size() + h.block_size as u64;
    let entry_at = |i: usize| h.table_offset + 4 * i as u64;
    let mut used: Vec<(u64, usize)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let start = e as u64 * SECTOR;
        let end = start + stride;
        if end > file_len {
            return Err(Error::corrupt(
                FORMAT,
                "BAT entry",
                entry_at(i),
                format!("block {i} at {start:#x}..{end:#x} runs past the end of the file ({file_len:#x})"),
            ));
        }
        if let Some(r) = regions.iter().find(|r| start < r.end && r.start < end) {
            return Err(Error::corrupt(
                FORMAT,
                "BAT entry",
                entry_at(i),
                format!("block {i} at {start:#x}..{end:#x} overlaps {}", r.name),
            ));
        }
        used.push((start, i));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        let ((a, ia), (b, ib)) = (w[0], w[1]);
        if b < a + stride {
            return Err(Error::corrupt(
                FORMAT,
                "BAT entry",
                entry_at(ib),
                format!("block {ib} at {b:#x} overlaps block {ia} at {a:#x}"),
            ));
        }
    }
    Ok(())
}

/// Reads and checks the header, BAT and block placement of a dynamic or differencing
/// image of `size` bytes.
pub fn read_sparse_layout(
    storage: &dyn Storage,
    found: &FoundFooter,
    size: u64,
) -> Result<SparseLayout> {
    let header_offset = found.footer.data_offset;
    let header = read_dynamic_header(storage, &found.footer)?;
    check_table_bounds(&header, header_offset, size, storage.len())?;
    if found.kind == DiskType::Differencing {
        for (i, l) in header.locators.iter().enumerate() {
            if l.kind() == LocatorKind::None {
                continue;
            }
            let at = header_offset + 576 + 24 * i as u64;
            if l.data_length as u64 > MAX_VPC_LOCATOR_BYTES {
                return Err(Error::TooLarge {
                    format: FORMAT,
                    structure: "parent locator data",
                    size: l.data_length as u64,
                    limit: MAX_VPC_LOCATOR_BYTES,
                });
            }
            let end = l.data_offset.checked_add(l.data_length as u64);
            if end.map_or(true, |e| e > storage.len()) {
                return Err(Error::corrupt(
                    FORMAT,
                    "parent locator",
                    at,
                    format!(
                        "its {} bytes of data at {:#x} are not inside the file",
                        l.data_length, l.data_offset
                    ),
                ));
            }
        }
    }
    let bat = read_bat(storage, &header)?;
    let regions = metadata_regions(storage, &header, header_offset, found.kind);
    check_blocks(&bat, &header, &regions, storage.len())?;
    Ok(SparseLayout {
        header,
        header_offset,
        bat,
    })
}

/// What a block's sector bitmap says, in short.
#[derive(Clone)]
enum Bitmap {
    /// Every sector is present in this image.
    Full,
    /// No sector is.
    Empty,
    /// Some are: the bitmap.
    Partial(Arc<Vec<u8>>),
}

const STATE_UNKNOWN: u8 = 0;
const STATE_FULL: u8 = 1;
const STATE_EMPTY: u8 = 2;
const STATE_PARTIAL: u8 = 3;

/// The sector bitmaps of a sparse image, read on first use: each block remembers
/// whether its bitmap is full, empty or partial; partial bitmaps are kept in a cache of
/// bounded size.
struct BitmapCache {
    state: Vec<AtomicU8>,
    partial: Mutex<PartialBitmaps>,
}

/// Partial bitmaps by block index, and their total size in bytes.
#[derive(Default)]
struct PartialBitmaps {
    by_block: HashMap<usize, Arc<Vec<u8>>>,
    bytes: u64,
}

/// How a guest stretch inside one block is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Stored in this image at this file offset.
    Data(u64),
    /// Not in this image: from the parent, or zeros.
    Absent,
}

/// The blocks of a dynamic or differencing image.
struct Sparse {
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<u32>,
    bitmaps: BitmapCache,
    /// Differencing images: the parent, once opened (`None` in metadata-only mode).
    parent: Option<Arc<dyn BlockDevice>>,
    differencing: bool,
    parent_uuid: String,
}

/// How the guest bytes of a VHD are laid out in its file.
enum Layout {
    /// At the start of the file, `size` bytes.
    Fixed,
    /// In blocks found through the BAT.
    Sparse(Box<Sparse>),
}

/// A VHD image as a block device (with its parent underneath, for differencing images).
pub struct VpcDevice {
    storage: Arc<dyn Storage>,
    size: u64,
    layout: Layout,
}

impl VpcDevice {
    fn io_err(&self, e: std::io::Error, at: u64) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            // Block placement was checked at open: the file shrank since.
            return Error::corrupt(FORMAT, "data block", at, "the file ends inside a block");
        }
        match self.storage.path() {
            Some(p) => Error::io(p, e),
            None => Error::Stream(e),
        }
    }

    /// The bitmap of allocated block `idx` whose bitmap is at file offset `host`.
    fn bitmap(&self, s: &Sparse, idx: usize, host: u64) -> Result<Bitmap> {
        match s.bitmaps.state[idx].load(Ordering::Relaxed) {
            STATE_FULL => return Ok(Bitmap::Full),
            STATE_EMPTY => return Ok(Bitmap::Empty),
            STATE_PARTIAL => {
                if let Some(b) = s
                    .bitmaps
                    .partial
                    .lock()
                    .ok()
                    .and_then(|m| m.by_block.get(&idx).cloned())
                {
                    return Ok(Bitmap::Partial(b));
                }
            }
            _ => {}
        }
        let mut raw = vec![0u8; s.bitmap_size as usize];
        self.storage
            .read_exact_at(&mut raw, host)
            .map_err(|e| self.io_err(e, host))?;
        let sectors = s.block_size / SECTOR;
        let (bit, run) = bitmap_run(&raw, 0, sectors);
        let (state, b) = if run == sectors && bit {
            (STATE_FULL, Bitmap::Full)
        } else if run == sectors {
            (STATE_EMPTY, Bitmap::Empty)
        } else {
            let b = Arc::new(raw);
            if let Ok(mut m) = s.bitmaps.partial.lock() {
                if m.bytes + s.bitmap_size > MAX_VPC_BITMAP_CACHE_BYTES {
                    m.by_block.clear();
                    m.bytes = 0;
                }
                m.bytes += s.bitmap_size;
                m.by_block.insert(idx, b.clone());
            }
            (STATE_PARTIAL, Bitmap::Partial(b))
        };
        s.bitmaps.state[idx].store(state, Ordering::Relaxed);
        Ok(b)
    }

    /// What the guest stretch at `pos` is, and how many bytes from `pos` (within its
    /// block) are the same.
    fn piece(&self, s: &Sparse, pos: u64) -> Result<(Piece, u64)> {
        let idx = (pos / s.block_size) as usize;
        let within = pos % s.block_size;
        let to_block_end = s.block_size - within;
        let e = s.bat[idx];
        if e == BAT_UNUSED {
            return Ok((Piece::Absent, to_block_end));
        }
        let host = e as u64 * SECTOR;
        let data = host + s.bitmap_size + within;
        Ok(match self.bitmap(s, idx, host)? {
            Bitmap::Full => (Piece::Data(data), to_block_end),
            Bitmap::Empty => (Piece::Absent, to_block_end),
            Bitmap::Partial(bm) => {
                let sector = within / SECTOR;
                let (bit, run) = bitmap_run(&bm, sector, s.block_size / SECTOR - sector);
                let len = run * SECTOR - within % SECTOR;
                if bit {
                    (Piece::Data(data), len)
                } else {
                    (Piece::Absent, len)
                }
            }
        })
    }

    fn parent<'a>(&self, s: &'a Sparse) -> Result<&'a Arc<dyn BlockDevice>> {
        s.parent.as_ref().ok_or_else(|| Error::NotOpened {
            format: FORMAT,
            reference: format!("the parent image (UUID {})", s.parent_uuid),
        })
    }

    /// Fills `buf` with what is not in this image at `offset`: the parent's bytes
    /// (zeros past its end), or zeros.
    fn read_absent(&self, s: &Sparse, buf: &mut [u8], offset: u64) -> Result<()> {
        if !s.differencing {
            buf.fill(0);
            return Ok(());
        }
        let parent = self.parent(s)?;
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
}

impl BlockDevice for VpcDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
        let s = match &self.layout {
            Layout::Fixed => {
                return self
                    .storage
                    .read_exact_at(buf, offset)
                    .map_err(|e| self.io_err(e, offset))
            }
            Layout::Sparse(s) => s,
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (piece, len) = self.piece(s, pos)?;
            let n = (len as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match piece {
                Piece::Data(host) => self
                    .storage
                    .read_exact_at(part, host)
                    .map_err(|e| self.io_err(e, host))?,
                Piece::Absent => self.read_absent(s, part, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        let s = match &self.layout {
            Layout::Fixed => {
                // Holes of the file read as zeros, as a raw file's do.
                let (kind, end) = match self.storage.segment(offset) {
                    Some((true, end)) => (ExtentKind::Data, end),
                    Some((false, end)) => (ExtentKind::Zero, end),
                    None => (ExtentKind::Data, offset + len),
                };
                let mut e = Extent::new(offset, (end.saturating_sub(offset)).clamp(1, len), kind);
                if kind == ExtentKind::Data {
                    e.host_offset = Some(offset);
                }
                return Ok(e);
            }
            Layout::Sparse(s) => s,
        };
        let end = offset + len;
        let (first, first_len) = self.piece(s, offset)?;
        let mut run_end = (offset + first_len).min(end);
        if let Piece::Data(host) = first {
            let mut e = Extent::new(offset, run_end - offset, ExtentKind::Data);
            e.host_offset = Some(host);
            return Ok(e);
        }
        // Extend over the following stretches that are absent too.
        while run_end < end {
            let (p, l) = self.piece(s, run_end)?;
            if p != Piece::Absent {
                break;
            }
            run_end = (run_end + l).min(end);
        }
        let run = run_end - offset;
        if !s.differencing {
            return Ok(Extent::new(offset, run, ExtentKind::Unallocated));
        }
        let parent = self.parent(s)?;
        let psize = parent.size();
        if offset >= psize {
            let mut e = Extent::new(offset, run, ExtentKind::Unallocated);
            e.depth = 1;
            return Ok(e);
        }
        let mut e = parent.map(offset, run.min(psize - offset))?;
        e.depth += 1;
        Ok(e)
    }
}

/// Opens a VHD image: fixed, dynamic, or differencing over its parent.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    let found = read_footer(storage.as_ref())?;
    let size = virtual_size(&found)?;
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vpc, size);
    info.actual_size = Some(storage.allocated_bytes());
    info.dirty_flag = Some(false);
    let layout = match found.kind {
        DiskType::Fixed => {
            if size > found.offset {
                return Err(Error::corrupt(
                    FORMAT,
                    "footer",
                    found.offset,
                    format!(
                        "the fixed disk is {size} bytes, but the file holds only {} before its footer",
                        found.offset
                    ),
                ));
            }
            Layout::Fixed
        }
        DiskType::Dynamic | DiskType::Differencing => {
            let l = read_sparse_layout(storage.as_ref(), &found, size)?;
            info.cluster_size = Some(l.header.block_size as u64);
            let differencing = found.kind == DiskType::Differencing;
            let parent = if differencing {
                open_parent(storage.as_ref(), &l.header, ctx, &mut info)?
            } else {
                None
            };
            let entries = l.bat.len();
            Layout::Sparse(Box::new(Sparse {
                block_size: l.header.block_size as u64,
                bitmap_size: l.header.bitmap_size(),
                bitmaps: BitmapCache {
                    state: (0..entries).map(|_| AtomicU8::new(STATE_UNKNOWN)).collect(),
                    partial: Mutex::new(PartialBitmaps::default()),
                },
                bat: l.bat,
                parent,
                differencing,
                parent_uuid: l.header.parent_uuid.to_string(),
            }))
        }
    };
    Ok(Opened {
        device: Arc::new(VpcDevice {
            storage,
            size,
            layout,
        }),
        info,
    })
}

/// Turns a Windows path from a locator into a path here: relative paths get `/`
/// separators; drive-letter and UNC paths cannot be followed (`None`).
fn local_path(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let drive = b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic();
    if drive || name.starts_with("\\\\") {
        return None;
    }
    let p = name.replace('\\', "/");
    Some(p.strip_prefix("./").map(str::to_string).unwrap_or(p))
}

/// Where a differencing image says its parent is, in the order they are tried: the
/// relative Windows locator, the absolute one, the Mac OS X URL, then the parent name
/// of the header. Each is `(field, name as written, path here if it can be followed)`.
pub fn parent_candidates(
    storage: &dyn Storage,
    h: &DynamicHeader,
) -> Result<Vec<(&'static str, String, Option<String>)>> {
    let mut out = Vec::new();
    for want in [
        LocatorKind::WindowsRelative,
        LocatorKind::WindowsAbsolute,
        LocatorKind::MacUrl,
    ] {
        for l in h.locators.iter().filter(|l| l.kind() == want) {
            // Bounded and inside the file: checked by read_sparse_layout.
            let mut data = vec![0u8; l.data_length as usize];
            read_struct(
                storage,
                &mut data,
                l.data_offset,
                FORMAT,
                "parent locator data",
            )?;
            let Some(name) = l.decode_path(&data) else {
                continue;
            };
            let here = match want {
                LocatorKind::MacUrl => Some(name.clone()),
                _ => local_path(&name),
            };
            out.push((l.field(), name, here));
        }
    }
    if let Some(name) = h.parent_name() {
        let here = local_path(&name);
        out.push(("parent name", name, here));
    }
    // The same name under several fields is tried (and listed) once.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(_, name, _)| seen.insert(name.clone()));
    Ok(out)
}

/// Finds, checks and opens the parent of a differencing image (recording every
/// reference in `info`). In untrusted mode the first reference is refused; in
/// metadata-only mode nothing is opened.
fn open_parent(
    storage: &dyn Storage,
    h: &DynamicHeader,
    ctx: &OpenContext,
    info: &mut ImageInfo,
) -> Result<Option<Arc<dyn BlockDevice>>> {
    let candidates = parent_candidates(storage, h)?;
    for (field, name, _) in &candidates {
        info.references.push(FileReference {
            field: (*field).to_string(),
            name: name.clone(),
        });
    }
    let here = ctx.path.clone().unwrap_or_default();
    if candidates.is_empty() {
        return Err(Error::BackingChain {
            path: here,
            reason: format!(
                "the differencing image names no parent (parent UUID {})",
                h.parent_uuid
            ),
        });
    }
    if ctx.options.metadata_only {
        return Ok(None);
    }
    if ctx.options.untrusted {
        let (field, name, _) = &candidates[0];
        ctx.resolve_reference(FORMAT, field, name)?;
    }
    let mut tried = Vec::new();
    for (field, name, local) in &candidates {
        let Some(local) = local else {
            tried.push(format!("{name} ({field}: a Windows drive or network path)"));
            continue;
        };
        let path = ctx.resolve_reference(FORMAT, field, local)?;
        if !path.exists() {
            tried.push(format!("{} ({field}: not found)", path.display()));
            continue;
        }
        check_parent_uuid(&path, h, &here)?;
        let Some(img) = ctx.open_backing(FORMAT, field, local, Some(Format::Vpc))? else {
            return Ok(None);
        };
        let resolved = path.display().to_string();
        info.backing_filename = Some(name.clone());
        info.full_backing_filename = Some(resolved);
        info.backing_filename_format = Some(FORMAT.into());
        info.backing = Some(Box::new(img.info().clone()));
        return Ok(Some(parent_device(img)));
    }
    Err(Error::BackingChain {
        path: here,
        reason: format!(
            "the parent (UUID {}) is not found; tried: {}",
            h.parent_uuid,
            tried.join(", ")
        ),
    })
}

fn parent_device(img: Image) -> Arc<dyn BlockDevice> {
    img.device().clone()
}

/// Checks that the VHD at `path` is the parent the child names (its footer UUID).
fn check_parent_uuid(path: &Path, h: &DynamicHeader, child: &Path) -> Result<()> {
    let s = FileStorage::open(path)?;
    let found = read_footer(&s)?;
    if found.footer.uuid != h.parent_uuid {
        return Err(Error::BackingChain {
            path: child.to_path_buf(),
            reason: format!(
                "{} has UUID {}, but the differencing image's parent is {}",
                path.display(),
                found.footer.uuid,
                h.parent_uuid
            ),
        });
    }
    Ok(())
}
