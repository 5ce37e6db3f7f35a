//! Opening a VMDK (a sparse extent with an embedded descriptor, or a text descriptor
//! naming extent files) and serving it as one [`BlockDevice`] with its parent chain.

use std::path::Path;
use std::sync::Arc;

use crate::details::{FormatDetails, VmdkDetails, VmdkExtent};
use crate::detect::Format;
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::image::{FileReference, ImageInfo, OpenContext, Opened};
use crate::io::{read_struct, Storage};
use crate::limits::{MAX_DESCRIPTOR_BYTES, MAX_VIRTUAL_SIZE};

use super::descriptor::NO_PARENT_CID;
use super::descriptor::{
    decode_text, looks_like_descriptor, Access, Descriptor, ExtentLine, ExtentType,
};
use super::header::{SparseHeader, COWD_MAGIC, FMT, SECTOR, SESPARSE_MAGIC, SPARSE_MAGIC};
use super::sesparse::SeSparseExtent;
use super::sparse::{Grain, GrainSource, SparseExtent, CACHE_BYTES};

/// Where the bytes of one extent come from.
enum Source {
    /// Raw bytes of a file from a byte offset.
    Flat {
        storage: Arc<dyn Storage>,
        offset: u64,
    },
    /// Reads as zeros (ZERO extents, NOACCESS extents).
    Zero,
    /// A hosted sparse extent.
    Sparse(Arc<dyn GrainSource>),
    /// Not opened (metadata-only mode): reading it is an error.
    Unopened(String),
}

/// One extent placed in the virtual disk.
struct Part {
    start: u64,
    len: u64,
    source: Source,
}

/// A VMDK's virtual disk: its extents in order, over an optional parent.
pub struct VmdkDevice {
    size: u64,
    parts: Vec<Part>,
    parent: Option<Arc<dyn BlockDevice>>,
}

impl VmdkDevice {
    fn part_index(&self, offset: u64) -> usize {
        // Parts are sorted and contiguous from 0.
        self.parts
            .partition_point(|p| p.start + p.len <= offset)
            .min(self.parts.len().saturating_sub(1))
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.size();
                let n = (psize.saturating_sub(offset)).min(buf.len() as u64) as usize;
                if n > 0 {
                    p.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn map_parent(&self, offset: u64, len: u64) -> Result<Extent> {
        if let Some(p) = &self.parent {
            let psize = p.size();
            if offset < psize {
                let mut e = p.map(offset, len.min(psize - offset))?;
                e.depth += 1;
                return Ok(e);
            }
        }
        Ok(Extent::new(offset, len, ExtentKind::Unallocated))
    }
}

impl BlockDevice for VmdkDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let part = &self.parts[self.part_index(pos)];
            let within = pos - part.start;
            let n = ((part.len - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match &part.source {
                Source::Zero => out.fill(0),
                Source::Unopened(name) => {
                    return Err(Error::NotOpened {
                        format: FMT,
                        reference: format!("extent file {name:?}"),
                    })
                }
                Source::Flat { storage, offset } => {
                    let at = offset.saturating_add(within);
                    // Like qemu, a flat file shorter than its extent reads as zeros past
                    // its end.
                    let avail = storage.len().saturating_sub(at).min(n as u64) as usize;
                    if avail > 0 {
                        storage
                            .read_exact_at(&mut out[..avail], at)
                            .map_err(|e| match storage.path() {
                                Some(p) => Error::io(p, e),
                                None => Error::Stream(e),
                            })?;
                    }
                    out[avail..].fill(0);
                }
                Source::Sparse(ext) => {
                    let gb = ext.grain_bytes();
                    let mut o = 0usize;
                    while o < n {
                        let w = within + o as u64;
                        let g = w / gb;
                        let gw = w % gb;
                        let m = ((gb - gw) as usize).min(n - o);
                        let piece = &mut out[o..o + m];
                        match ext.lookup(g)? {
                            Grain::Unallocated => self.read_parent(piece, part.start + w)?,
                            Grain::Zero => piece.fill(0),
                            Grain::At(s) => ext.read_grain(g, s, gw, piece)?,
                        }
                        o += m;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size)?;
        let part = &self.parts[self.part_index(offset)];
        let within = offset - part.start;
        let len = len.min(part.len - within);
        match &part.source {
            Source::Zero => Ok(Extent::new(offset, len, ExtentKind::Zero)),
            Source::Unopened(_) => Ok(Extent::new(offset, len, ExtentKind::Data)),
            Source::Flat {
                storage,
                offset: base,
            } => {
                let at = base.saturating_add(within);
                let (kind, end) = match storage.segment(at) {
                    Some((true, end)) => (ExtentKind::Data, end),
                    Some((false, end)) => (ExtentKind::Zero, end),
                    None if at >= storage.len() => (ExtentKind::Zero, at.saturating_add(len)),
                    None => (ExtentKind::Data, at.saturating_add(len)),
                };
                let mut e = Extent::new(offset, (end - at).clamp(1, len), kind);
                if kind == ExtentKind::Data {
                    e.host_offset = Some(at);
                }
                Ok(e)
            }
            Source::Sparse(ext) => {
                let gb = ext.grain_bytes();
                let first = within / gb;
                let max = (within + len).div_ceil(gb) - first;
                let (kind0, count) = ext.run(first, max)?;
                let compressed = ext.compressed();
                let end_within = (first + count) * gb;
                let n = end_within.min(within + len) - within;
                match kind0 {
                    Grain::Unallocated => self.map_parent(offset, n),
                    Grain::Zero => Ok(Extent::new(offset, n, ExtentKind::Zero)),
                    Grain::At(s) => {
                        let mut e = Extent::new(offset, n, ExtentKind::Data);
                        e.compressed = compressed;
                        if !compressed {
                            e.host_offset = Some(s * SECTOR + within % gb);
                        }
                        Ok(e)
                    }
                }
            }
        }
    }
}

/// What the first sector of a file says it is.
fn sniff(storage: &dyn Storage) -> Result<[u8; 512]> {
    let mut b = [0u8; 512];
    let n = storage.len().min(512) as usize;
    read_struct(storage, &mut b[..n], 0, FMT, "header")?;
    Ok(b)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Cache memory for each of the `extents` grain-mapped extents of an image: the top
/// image shares [`CACHE_BYTES`] among its extents, each image of a parent chain an
/// eighth of that.
fn cache_share(ctx: &OpenContext, extents: usize) -> u64 {
    let image = if ctx.depth == 0 {
        CACHE_BYTES
    } else {
        CACHE_BYTES / 8
    };
    image / extents.max(1) as u64
}

/// Opens a grain-mapped extent file of any kind (KDMV, COWD, seSparse) by its magic;
/// its caches may take `cache_bytes`.
fn open_grain_extent(storage: Arc<dyn Storage>, cache_bytes: u64) -> Result<Arc<dyn GrainSource>> {
    let head = sniff(storage.as_ref())?;
    if is_sesparse(&head) {
        return Ok(Arc::new(SeSparseExtent::open(storage, cache_bytes)?));
    }
    if le32(&head) == COWD_MAGIC {
        return Ok(Arc::new(SparseExtent::open_cowd(storage, cache_bytes)?));
    }
    let h = SparseHeader::parse(&head, 0)?;
    Ok(Arc::new(SparseExtent::open(storage, h, cache_bytes)?))
}

fn is_sesparse(b: &[u8; 512]) -> bool {
    u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")) == SESPARSE_MAGIC
}

/// Reads and parses an embedded descriptor.
fn embedded_descriptor(storage: &dyn Storage, h: &SparseHeader) -> Result<Option<Descriptor>> {
    let Some((pos, bytes)) = h.embedded_descriptor()? else {
        return Ok(None);
    };
    let mut b = vec![0u8; bytes as usize];
    read_struct(storage, &mut b, pos, FMT, "embedded descriptor")?;
    Descriptor::parse(&decode_text(&b), pos).map(Some)
}

/// Display name of an extent file, as qemu-img shows it.
fn shown_name(ctx: &OpenContext, name: &str) -> String {
    match &ctx.dir {
        Some(d) if d != Path::new(".") && !Path::new(name).is_absolute() => {
            d.join(name).display().to_string()
        }
        _ => name.to_string(),
    }
}

/// Opens a VMDK from `storage` (sparse extent or text descriptor).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    let head = sniff(storage.as_ref())?;
    if is_sesparse(&head) {
        return open_extent_alone(storage, ctx, "seSparse", "SESPARSE");
    }
    if le32(&head) == COWD_MAGIC {
        return open_extent_alone(storage, ctx, "vmfsSparse", "VMFSSPARSE");
    }
    if le32(&head) == SPARSE_MAGIC {
        if storage.len() < SECTOR {
            return Err(Error::corrupt(
                FMT,
                "sparse extent header",
                0,
                format!("file ends at {} bytes, inside the header", storage.len()),
            ));
        }
        let h = SparseHeader::parse(&head, 0)?;
        h.validate(0)?;
        let desc = embedded_descriptor(storage.as_ref(), &h)?;
        if h.capacity == 0 {
            if let Some(d) = desc
                .as_ref()
                .filter(|d| d.total_sectors().is_some_and(|n| n > 0))
            {
                // A descriptor dressed as a sparse header: its extents are the disk.
                return open_descriptor(d.clone(), storage, ctx);
            }
        }
        return open_monolithic(storage, h, desc, ctx);
    }
    if !looks_like_descriptor(&head[..storage.len().min(512) as usize]) {
        return Err(Error::Format(format!(
            "{}: not a VMDK (no KDMV header and no descriptor)",
            ctx.filename
        )));
    }
    if storage.len() > MAX_DESCRIPTOR_BYTES {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "descriptor file",
            size: storage.len(),
            limit: MAX_DESCRIPTOR_BYTES,
        });
    }
    let mut b = vec![0u8; storage.len() as usize];
    read_struct(storage.as_ref(), &mut b, 0, FMT, "descriptor")?;
    let d = Descriptor::parse(&decode_text(&b), 0)?;
    open_descriptor(d, storage, ctx)
}

/// Untrusted images must say they are one file: a descriptor whose `createType` is
/// anything but monolithicSparse or streamOptimized (the single-file subformats) is
/// refused when the image is read (listing its metadata, `info`, is still allowed),
/// also when it names no other file (ZERO extents) or is embedded in a sparse extent
/// that imgconv would read alone. OpenStack's format inspector refuses the same.
fn refuse_multi_file_type(d: &Descriptor, ctx: &OpenContext) -> Result<()> {
    let single = ["monolithicSparse", "streamOptimized"]
        .iter()
        .any(|t| d.create_type.eq_ignore_ascii_case(t));
    if ctx.options.untrusted && !ctx.options.metadata_only && !single {
        return Err(Error::unsupported(
            FMT,
            format!(
                "createType {:?} in untrusted mode (only the single-file monolithicSparse and streamOptimized are read)",
                d.create_type
            ),
        ));
    }
    Ok(())
}

/// The extent lines of a descriptor embedded in a sparse file are not read (the file
/// is its own single extent, as in QEMU), but an untrusted file whose embedded
/// descriptor names anything else — a second extent, another kind, a path — is
/// refused when read: no tool writes one, and OpenStack's inspector refuses it too.
fn refuse_other_embedded_extents(d: &Descriptor, ctx: &OpenContext) -> Result<()> {
    if !ctx.options.untrusted || ctx.options.metadata_only {
        return Ok(());
    }
    let own = |e: &ExtentLine| {
        e.kind == ExtentType::Sparse
            && e.filename
                .as_deref()
                .is_some_and(|n| !n.contains(['/', '\\']))
    };
    match d.extents.as_slice() {
        [] => Ok(()),
        [e] if own(e) => Ok(()),
        _ => Err(Error::unsupported(
            FMT,
            format!(
                "an embedded descriptor naming other extents ({} lines) in untrusted mode",
                d.extents.len()
            ),
        )),
    }
}

fn create_type_of(h: &SparseHeader) -> &'static str {
    if h.has_markers() {
        "streamOptimized"
    } else {
        "monolithicSparse"
    }
}

fn open_monolithic(
    storage: Arc<dyn Storage>,
    h: SparseHeader,
    desc: Option<Descriptor>,
    ctx: &OpenContext,
) -> Result<Opened> {
    if let Some(d) = &desc {
        refuse_multi_file_type(d, ctx)?;
        refuse_other_embedded_extents(d, ctx)?;
    }
    let ext = Arc::new(SparseExtent::open(storage.clone(), h, cache_share(ctx, 1))?);
    let size = ext.capacity_bytes();
    let desc = desc.unwrap_or_else(|| Descriptor {
        version: 1,
        cid: 0,
        parent_cid: NO_PARENT_CID,
        create_type: create_type_of(&ext.header).to_string(),
        ..Default::default()
    });
    let extent_info = vec![VmdkExtent {
        compressed: ext.header.compressed().then_some(true),
        virtual_size: size,
        filename: ctx.filename.clone(),
        cluster_size: Some(ext.grain_bytes()),
        format: String::new(),
    }];
    finish_single(desc, ext, extent_info, storage.as_ref(), ctx)
}

/// A seSparse or COWD extent opened by itself (ESX keeps their descriptor apart).
fn open_extent_alone(
    storage: Arc<dyn Storage>,
    ctx: &OpenContext,
    create_type: &str,
    kind: &str,
) -> Result<Opened> {
    let ext = open_grain_extent(storage.clone(), cache_share(ctx, 1))?;
    let size = ext.capacity_bytes();
    let desc = Descriptor {
        version: 1,
        cid: 0,
        parent_cid: NO_PARENT_CID,
        create_type: create_type.to_string(),
        ..Default::default()
    };
    let extent_info = vec![VmdkExtent {
        compressed: None,
        virtual_size: size,
        filename: ctx.filename.clone(),
        cluster_size: Some(ext.grain_bytes()),
        format: kind.to_string(),
    }];
    finish_single(desc, ext, extent_info, storage.as_ref(), ctx)
}

/// Finishes opening an image made of one grain extent covering the whole disk.
fn finish_single(
    desc: Descriptor,
    ext: Arc<dyn GrainSource>,
    extent_info: Vec<VmdkExtent>,
    storage: &dyn Storage,
    ctx: &OpenContext,
) -> Result<Opened> {
    let size = ext.capacity_bytes();
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vmdk, size);
    info.actual_size = Some(storage.allocated_bytes());
    info.cluster_size = Some(ext.grain_bytes());
    info.dirty_flag = Some(false);
    let parts = vec![Part {
        start: 0,
        len: size,
        source: Source::Sparse(ext),
    }];
    finish(desc, parts, size, extent_info, info, ctx)
}

fn open_descriptor(d: Descriptor, own: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    if d.extents.is_empty() {
        return Err(Error::corrupt(FMT, "descriptor", 0, "no extent lines"));
    }
    let total = d
        .total_sectors()
        .and_then(|s| s.checked_mul(SECTOR))
        .filter(|&b| b <= MAX_VIRTUAL_SIZE)
        .ok_or_else(|| Error::corrupt(FMT, "descriptor", 0, "extent sizes add up to too much"))?;
    let mut parts = Vec::with_capacity(d.extents.len());
    let mut extent_info = Vec::new();
    let mut refs = Vec::new();
    let mut actual = own.allocated_bytes();
    let mut cluster = None;
    let mut start = 0u64;
    for e in &d.extents {
        let len = e.sectors * SECTOR;
        let name = e.filename.clone().unwrap_or_default();
        if e.filename.is_some() {
            refs.push(FileReference {
                field: "extent file".into(),
                name: name.clone(),
            });
        }
        let mut ei = VmdkExtent {
            compressed: None,
            virtual_size: len,
            filename: shown_name(ctx, &name),
            cluster_size: None,
            format: e.kind.as_str().to_string(),
        };
        let source = match e.kind {
            ExtentType::Zero => Source::Zero,
            _ if e.access == Access::NoAccess => Source::Zero,
            ExtentType::VmfsRdm | ExtentType::VmfsRaw => {
                return Err(Error::unsupported(FMT, "raw device mapping extents"))
            }
            _ if ctx.options.metadata_only && ctx.options.untrusted => Source::Unopened(name),
            kind => {
                let path = ctx.resolve_reference(FMT, "extent file", &name)?;
                let storage = if ctx.is_self(&path) {
                    own.clone()
                } else {
                    ctx.open_reference(FMT, "extent file", &name)?
                };
                if !ctx.is_self(&path) {
                    actual += storage.allocated_bytes();
                }
                match kind {
                    ExtentType::Flat | ExtentType::Vmfs => Source::Flat {
                        offset: e.offset.checked_mul(SECTOR).ok_or_else(|| {
                            Error::corrupt(FMT, "descriptor", 0, "extent offset too large")
                        })?,
                        storage,
                    },
                    _ => {
                        let ext = open_grain_extent(storage, cache_share(ctx, d.extents.len()))?;
                        ei.cluster_size = Some(ext.grain_bytes());
                        ei.compressed = ext.compressed().then_some(true);
                        cluster.get_or_insert(ext.grain_bytes());
                        Source::Sparse(ext)
                    }
                }
            }
        };
        extent_info.push(ei);
        if len > 0 {
            parts.push(Part { start, len, source });
        }
        start += len;
    }
    if parts.is_empty() {
        parts.push(Part {
            start: 0,
            len: 0,
            source: Source::Zero,
        });
    }
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Vmdk, total);
    info.actual_size = Some(actual);
    info.cluster_size = cluster;
    info.dirty_flag = Some(false);
    info.references = refs;
    // After the extents: a reference to another file is refused naming it.
    refuse_multi_file_type(&d, ctx)?;
    finish(d, parts, total, extent_info, info, ctx)
}

/// Opens the parent (delta disks), fills in the info, builds the device.
fn finish(
    d: Descriptor,
    parts: Vec<Part>,
    size: u64,
    extent_info: Vec<VmdkExtent>,
    mut info: ImageInfo,
    ctx: &OpenContext,
) -> Result<Opened> {
    let mut parent = None;
    if let Some(hint) = d.parent_hint.as_deref().filter(|h| !h.is_empty()) {
        info.references.push(FileReference {
            field: "parentFileNameHint".into(),
            name: hint.to_string(),
        });
        info.backing_filename = Some(hint.to_string());
        info.backing_filename_format = Some("vmdk".into());
        if !(ctx.options.metadata_only && ctx.options.untrusted)
            && ctx
                .resolve_reference(FMT, "parentFileNameHint", hint)
                .is_ok()
        {
            info.full_backing_filename = Some(shown_name(ctx, hint));
        }
        if let Some(img) = ctx.open_backing(FMT, "parentFileNameHint", hint, Some(Format::Vmdk))? {
            let pcid = match &img.info().format_specific {
                Some(FormatDetails::Vmdk(p)) => Some(p.cid),
                _ => None,
            };
            if pcid != Some(d.parent_cid) {
                return Err(Error::BackingChain {
                    path: ctx.path.clone().unwrap_or_default(),
                    reason: format!(
                        "parent CID mismatch: {hint} has CID {}, this image expects {:08x}",
                        pcid.map_or("none".to_string(), |c| format!("{c:08x}")),
                        d.parent_cid
                    ),
                });
            }
            info.backing = Some(Box::new(img.info().clone()));
            parent = Some(img.device().clone());
        }
    }
    info.format_specific = Some(FormatDetails::Vmdk(VmdkDetails {
        cid: d.cid,
        parent_cid: d.parent_cid,
        create_type: d.create_type.clone(),
        extents: extent_info,
    }));
    Ok(Opened {
        device: Arc::new(VmdkDevice {
            size,
            parts,
            parent,
        }),
        info,
    })
}
