//! qcow2: QEMU's copy-on-write format, versions 2 and 3.
//!
//! Reading covers every cluster size QEMU accepts (512 B to 2 MiB), zero clusters,
//! deflate and zstd compressed clusters, extended L2 entries (subclusters), any refcount
//! width, lazy refcounts and the dirty bit, backing files of any supported format, an
//! external data file, and listing internal snapshots. Encryption and unknown
//! incompatible features are refused when the image is opened.
//!
//! `header.rs` holds the on-disk structures, `snapshot.rs` the snapshot table,
//! `reader.rs` the address translation behind [`BlockDevice`](crate::BlockDevice).

// The modules below hold on-disk structures and the logic that walks them: public for
// the tests, fuzz targets and benches, hidden from the documented (stable) API, which is
// this module's items and its `DRIVER`.
#[doc(hidden)]
pub mod amend;
#[doc(hidden)]
pub mod bitmap;
#[doc(hidden)]
pub mod check;
#[doc(hidden)]
pub mod commit;
#[doc(hidden)]
pub mod edit;
#[doc(hidden)]
pub mod header;
#[doc(hidden)]
pub mod measure;
#[doc(hidden)]
pub mod reader;
#[doc(hidden)]
pub mod rebase;
#[doc(hidden)]
pub mod refcount;
#[doc(hidden)]
pub mod resize;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod snapshot_edit;
#[doc(hidden)]
pub mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use crate::details::{FormatDetails, Qcow2Bitmap, Qcow2Details};
use crate::detect::Format;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::image::{FileReference, ImageInfo, OpenContext, Opened};
use crate::io::table::{Entry as TableEntry, PagedTable};
use crate::io::{read_struct, OutputSet, Storage};
use crate::limits::{
    MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFTABLE_BYTES, MAX_QCOW2_SNAPSHOTS, MAX_VIRTUAL_SIZE,
};
use crate::writer::{ImageWriter, WriteOptions};

use header::{
    parse_bitmap_directory, parse_extensions, AutoclearFeatures, BitmapDirectoryEntry,
    CompatibleFeatures, FeatureKind, Header, HeaderExtension, IncompatibleFeatures,
    BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, CRYPT_AES, CRYPT_LUKS, CRYPT_NONE, MAX_BITMAPS,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V2_HEADER_LEN,
};
use reader::{Qcow2Device, Qcow2Parts};
use snapshot::read_snapshot_table;

const FMT: &str = "qcow2";

/// Field name of the backing file reference (errors, `info` references).
pub const FIELD_BACKING: &str = "backing file";
/// Field name of the external data file reference.
pub const FIELD_DATA_FILE: &str = "external data file";

/// Everything `open` learns from the metadata, before any reference is followed.
#[derive(Debug, Clone)]
pub struct Qcow2Metadata {
    /// The header.
    pub header: Header,
    /// Its extensions, in file order.
    pub extensions: Vec<HeaderExtension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format from the header extension, if any.
    pub backing_format: Option<String>,
    /// The external data file name, if any.
    pub data_file: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<snapshot::SnapshotEntry>,
    /// Persistent bitmaps (only when the bitmaps extension is marked consistent).
    pub bitmaps: Vec<BitmapDirectoryEntry>,
}

fn corrupt(offset: u64, why: impl Into<String>) -> Error {
    Error::corrupt(FMT, "header", offset, why)
}

/// `true` when `[offset, offset + len)` lies inside a file of `file_len` bytes.
fn inside(offset: u64, len: u64, file_len: u64) -> bool {
    matches!(offset.checked_add(len), Some(e) if e <= file_len)
}

/// Reads and validates the header, extensions, backing file name and snapshot table.
///
/// Every size and offset is checked against the file size, the virtual size and the
/// limits in [`crate::limits`] before anything is allocated from it.
pub fn read_metadata(storage: &dyn Storage) -> Result<Qcow2Metadata> {
    let file_len = storage.len();
    let mut prefix = vec![0u8; file_len.min(V2_HEADER_LEN as u64) as usize];
    read_struct(storage, &mut prefix, 0, FMT, "header")?;
    if prefix.len() < V2_HEADER_LEN as usize {
        // Header::parse names the problem (the length, or the magic).
        return Err(Header::parse(&prefix)
            .err()
            .unwrap_or_else(|| corrupt(0, "the file is shorter than a header")));
    }
    let cluster_bits = u32::from_be_bytes(prefix[20..24].try_into().expect("4 bytes"));
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        Header::parse(&prefix)?;
        return Err(corrupt(20, format!("cluster_bits {cluster_bits}")));
    }
    let cluster_size = 1u64 << cluster_bits;
    let mut first = vec![0u8; file_len.min(cluster_size) as usize];
    read_struct(storage, &mut first, 0, FMT, "header")?;
    let h = Header::parse(&first)?;

    let ext_start = h.extensions_offset();
    let ext_end = h.extensions_end(first.len() as u64);
    let extensions = if ext_start < ext_end {
        parse_extensions(&first[..ext_end as usize], ext_start)?
    } else {
        Vec::new()
    };

    let unknown = h.unknown_incompatible();
    if unknown != 0 {
        let names: Vec<String> = (0..64)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| {
                feature_name(&extensions, FeatureKind::Incompatible, b)
                    .unwrap_or_else(|| format!("unknown incompatible feature bit {b}"))
            })
            .collect();
        return Err(Error::unsupported(FMT, names.join(", ")));
    }
    match h.crypt_method {
        CRYPT_NONE => {}
        CRYPT_AES => return Err(Error::unsupported(FMT, "encryption (AES-CBC)")),
        CRYPT_LUKS => return Err(Error::unsupported(FMT, "encryption (LUKS)")),
        m => return Err(Error::unsupported(FMT, format!("encryption method {m}"))),
    }
    if h.compression().is_none() {
        return Err(Error::unsupported(
            FMT,
            format!("compression type {}", h.compression_type),
        ));
    }
    #[cfg(not(feature = "zstd"))]
    if h.compression() == Some(header::CompressionType::Zstd) {
        return Err(Error::unsupported(
            FMT,
            "zstd compressed clusters (imgconv was built without its `zstd` feature)",
        ));
    }
    // Active L1 table (and the virtual size it must cover).
    check_l1(&h, file_len)?;

    // Refcount table: not needed for reading, but a header pointing it elsewhere is bad.
    let rt_bytes = h.refcount_table_clusters as u64 * cluster_size;
    if rt_bytes > MAX_QCOW2_REFTABLE_BYTES {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "refcount table",
            size: rt_bytes,
            limit: MAX_QCOW2_REFTABLE_BYTES,
        });
    }
    if rt_bytes == 0 {
        return Err(corrupt(56, "the image has no refcount table"));
    }
    check_table(
        h.refcount_table_offset,
        rt_bytes,
        cluster_size,
        file_len,
        "refcount table",
    )?;

    // Snapshot table.
    if h.nb_snapshots > MAX_QCOW2_SNAPSHOTS {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "snapshot table",
            size: h.nb_snapshots as u64,
            limit: MAX_QCOW2_SNAPSHOTS as u64,
        });
    }
    let snapshots = if h.nb_snapshots > 0 {
        // As QEMU: the table must be cluster aligned, but entries past the end of the
        // file read as zeros (`check` reports them) rather than failing the open.
        if h.snapshots_offset % cluster_size != 0 {
            return Err(Error::corrupt(
                FMT,
                "snapshot table",
                h.snapshots_offset,
                "table offset is not cluster aligned",
            ));
        }
        read_snapshot_table(storage, h.snapshots_offset, h.nb_snapshots)?.entries
    } else {
        Vec::new()
    };

    // Backing file name.
    let backing_file = if h.backing_file_offset != 0 {
        let (off, len) = (h.backing_file_offset, h.backing_file_size as u64);
        if !inside(off, len, cluster_size) {
            return Err(corrupt(
                8,
                format!("backing file name at {off:#x} ({len} bytes) is not in the first cluster"),
            ));
        }
        let mut name = vec![0u8; len as usize];
        read_struct(storage, &mut name, off, FMT, "backing file name")?;
        Some(String::from_utf8_lossy(&name).into_owned())
    } else {
        None
    };
    let backing_format = extensions.iter().find_map(|e| match e {
        HeaderExtension::BackingFormat(f) => Some(f.clone()),
        _ => None,
    });
    let data_file = extensions.iter().find_map(|e| match e {
        HeaderExtension::DataFile(f) => Some(f.clone()),
        _ => None,
    });
    if h.has_external_data_file() && data_file.is_none() {
        return Err(Error::corrupt(
            FMT,
            "header extension",
            ext_start,
            "the external data file bit is set but the image names no data file",
        ));
    }
    let bitmaps = read_bitmaps(storage, &h, &extensions)?;
    Ok(Qcow2Metadata {
        bitmaps,
        header: h,
        extensions,
        backing_file,
        backing_format,
        data_file,
        snapshots,
    })
}

/// Reads the bitmap directory, when the image has a consistent bitmaps extension
/// (without the autoclear bit, QEMU treats every bitmap as stale and ignores them).
fn read_bitmaps(
    storage: &dyn Storage,
    h: &Header,
    exts: &[HeaderExtension],
) -> Result<Vec<BitmapDirectoryEntry>> {
    let Some(ext) = exts.iter().find_map(|e| match e {
        HeaderExtension::Bitmaps(b) => Some(*b),
        _ => None,
    }) else {
        return Ok(Vec::new());
    };
    if !h.autoclear_features.contains(AutoclearFeatures::BITMAPS) || ext.nb_bitmaps == 0 {
        return Ok(Vec::new());
    }
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "bitmap directory",
            size: ext.nb_bitmaps as u64,
            limit: MAX_BITMAPS as u64,
        });
    }
    if ext.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "bitmap directory",
            size: ext.directory_size,
            limit: MAX_BITMAP_DIRECTORY_BYTES,
        });
    }
    check_table(
        ext.directory_offset,
        ext.directory_size,
        h.cluster_size(),
        storage.len(),
        "bitmap directory",
    )?;
    let mut dir = vec![0u8; ext.directory_size as usize];
    read_struct(
        storage,
        &mut dir,
        ext.directory_offset,
        FMT,
        "bitmap directory",
    )?;
    parse_bitmap_directory(&dir, ext.nb_bitmaps, ext.directory_offset)
}

/// Checks an L1 table's size against the limit and the virtual size, and its place in
/// the file (for the active table, or a snapshot's with the header fields swapped in).
fn check_l1(h: &Header, file_len: u64) -> Result<()> {
    if h.size > MAX_VIRTUAL_SIZE {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "virtual size",
            size: h.size,
            limit: MAX_VIRTUAL_SIZE,
        });
    }
    let cluster_size = h.cluster_size();
    let l1_bytes = h.l1_size as u64 * 8;
    if l1_bytes > MAX_QCOW2_L1_BYTES {
        return Err(Error::TooLarge {
            format: FMT,
            structure: "L1 table",
            size: l1_bytes,
            limit: MAX_QCOW2_L1_BYTES,
        });
    }
    if (h.l1_size as u64) < h.min_l1_size() {
        return Err(corrupt(
            36,
            format!(
                "L1 table has {} entries, the virtual size needs {}",
                h.l1_size,
                h.min_l1_size()
            ),
        ));
    }
    if h.l1_size > 0 {
        check_table(
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
            "L1 table",
        )?;
    }
    Ok(())
}

/// Checks that a table is cluster aligned and inside the file.
fn check_table(
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
    structure: &'static str,
) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(Error::corrupt(
            FMT,
            structure,
            offset,
            "table offset is not cluster aligned",
        ));
    }
    if !inside(offset, len, file_len) {
        return Err(Error::corrupt(
            FMT,
            structure,
            offset,
            format!("{len}-byte table runs past the end of the file ({file_len:#x})"),
        ));
    }
    Ok(())
}

fn feature_name(exts: &[HeaderExtension], kind: FeatureKind, bit: u32) -> Option<String> {
    exts.iter().find_map(|e| match e {
        HeaderExtension::FeatureTable(t) => t
            .iter()
            .find(|f| f.kind == kind && f.bit as u32 == bit)
            .map(|f| f.name.clone()),
        _ => None,
    })
}

/// The backing file's path as qemu-img reports it: relative names joined to the folder
/// of the image's name as given, without touching the file system.
fn full_backing_name(image_name: &str, backing: &str) -> String {
    if backing.starts_with('/') {
        return backing.to_string();
    }
    match image_name.rfind('/') {
        Some(i) => format!("{}{backing}", &image_name[..=i]),
        None => backing.to_string(),
    }
}

/// Refuses references that QEMU would open through a network or pseudo protocol
/// (`json:{...}`, `nbd://…`, `http://…`): imgconv only opens files. Untrusted mode
/// refuses every reference anyway, with its own error.
fn refuse_protocol(ctx: &OpenContext, field: &'static str, name: &str) -> Result<()> {
    if ctx.options.untrusted {
        return Ok(());
    }
    let scheme = name.split_once("://").map(|(s, _)| s).filter(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if name.starts_with("json:") || scheme.is_some() {
        return Err(Error::unsupported(
            FMT,
            format!("{field} {name:?} names a protocol, not a file"),
        ));
    }
    Ok(())
}

/// qemu-img's format-specific data for a qcow2 image.
fn format_specific(m: &Qcow2Metadata) -> FormatDetails {
    let h = &m.header;
    let v3 = h.version >= 3;
    let bitmaps = m
        .bitmaps
        .iter()
        .map(|b| {
            let mut flags = Vec::new();
            if b.flags & BITMAP_FLAG_IN_USE != 0 {
                flags.push("in-use".to_string());
            }
            if b.flags & BITMAP_FLAG_AUTO != 0 {
                flags.push("auto".to_string());
            }
            Qcow2Bitmap {
                flags,
                name: b.name.clone(),
                granularity: 1u64 << b.granularity_bits.min(63),
            }
        })
        .collect();
    FormatDetails::Qcow2(Qcow2Details {
        compat: if v3 { "1.1" } else { "0.10" }.to_string(),
        compression_type: h.compression().unwrap_or_default().name().to_string(),
        lazy_refcounts: v3.then(|| {
            h.compatible_features
                .contains(CompatibleFeatures::LAZY_REFCOUNTS)
        }),
        bitmaps,
        refcount_bits: h.refcount_bits(),
        data_file: m.data_file.clone(),
        data_file_raw: h.has_external_data_file().then(|| {
            h.autoclear_features
                .contains(AutoclearFeatures::DATA_FILE_RAW)
        }),
        corrupt: v3.then(|| {
            h.incompatible_features
                .contains(IncompatibleFeatures::CORRUPT)
        }),
        extended_l2: v3.then(|| h.extended_l2()),
    })
}

/// The qcow2 driver.
pub const DRIVER: Driver = Driver {
    format: Format::Qcow2,
    // Version 1 has the same magic and its own (recognition-only) driver.
    probe: |head, _| head.starts_with(b"QFI\xfb") && head.get(4..8) != Some(&[0, 0, 0, 1]),
    open: Some(open),
    open_stream: None,
    create: Some(create_writer),
    create_unsized: Some(writer::create_writer_unsized),
    check: Some(|req| check::check(req.storage.as_ref())),
    repair: Some(|req, file| check::check_and_repair(req.storage.as_ref(), Some(file))),
    resize: Some(resize::resize),
    internal_snapshots: true,
    explicit_parent: false,
};

/// Opens a qcow2 image: validates its metadata, follows its backing file and external
/// data file (unless the options forbid it), and exposes the virtual disk.
///
/// When the options name a snapshot and this is the top image, opens that snapshot (see
/// [`open_snapshot`]).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    let snapshot = ctx.options.snapshot.as_deref().filter(|_| ctx.depth == 0);
    open_inner(storage, ctx, snapshot)
}

/// Opens the internal snapshot `which` (matched by ID first, then by name) as a
/// read-only virtual disk, like `qemu-img convert -l`.
///
/// The snapshot's L1 table is validated like the active one against the disk size
/// recorded with the snapshot; the device has the image's current size, as qemu-img
/// reads it (the part past the snapshot's disk reads as zeros).
pub fn open_snapshot(storage: Arc<dyn Storage>, ctx: &OpenContext, which: &str) -> Result<Opened> {
    open_inner(storage, ctx, Some(which))
}

/// Finds the snapshot `which` names: `snapshot.id=ID`, `snapshot.name=NAME` or both
/// (comma-separated, both must match), as qemu-img's `-l`; anything else is an ID or,
/// failing that, a name.
fn find_snapshot<'a>(
    snapshots: &'a [snapshot::SnapshotEntry],
    which: &str,
) -> Result<Option<&'a snapshot::SnapshotEntry>> {
    if !which.starts_with("snapshot.") {
        return Ok(snapshots
            .iter()
            .find(|s| s.id == which)
            .or_else(|| snapshots.iter().find(|s| s.name == which)));
    }
    let (mut id, mut name) = (None, None);
    for part in which.split(',') {
        match part.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v),
            Some(("snapshot.name", v)) => name = Some(v),
            _ => {
                return Err(Error::invalid(format!(
                    "invalid snapshot selector {part:?} (expected snapshot.id=ID or snapshot.name=NAME)"
                )))
            }
        }
    }
    Ok(snapshots
        .iter()
        .find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n)))
}

fn open_inner(
    storage: Arc<dyn Storage>,
    ctx: &OpenContext,
    snapshot: Option<&str>,
) -> Result<Opened> {
    let mut m = read_metadata(storage.as_ref())?;
    if let Some(which) = snapshot {
        let sn = find_snapshot(&m.snapshots, which)?
            .ok_or_else(|| Error::invalid(format!("qcow2: the image has no snapshot {which:?}")))?;
        let mut h = m.header.clone();
        h.size = sn.disk_size().unwrap_or(h.size);
        h.l1_size = sn.l1_size;
        h.l1_table_offset = sn.l1_table_offset;
        check_l1(&h, storage.len()).map_err(|e| match e {
            Error::Corrupt { offset, reason, .. } => Error::corrupt(
                FMT,
                "snapshot L1 table",
                offset,
                format!("snapshot {which:?}: {reason}"),
            ),
            other => other,
        })?;
        // As QEMU, the snapshot is read at the image's current size (which can only have
        // grown since): past the snapshot's own L1 table everything reads as zeros.
        h.size = h.size.max(m.header.size);
        m.header = h;
    }
    let h = &m.header;

    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Qcow2, h.size);
    info.actual_size = Some(storage.allocated_bytes());
    info.cluster_size = Some(h.cluster_size());
    info.dirty_flag = Some(
        h.incompatible_features
            .contains(IncompatibleFeatures::DIRTY),
    );
    info.snapshots = m.snapshots.iter().map(|s| s.info()).collect();
    info.format_specific = Some(format_specific(&m));
    if let Some(b) = &m.backing_file {
        info.backing_filename = Some(b.clone());
        info.full_backing_filename = Some(full_backing_name(&ctx.filename, b));
        info.backing_filename_format = m.backing_format.clone();
        info.references.push(FileReference {
            field: FIELD_BACKING.into(),
            name: b.clone(),
        });
    }
    if let Some(d) = &m.data_file {
        if h.has_external_data_file() {
            info.references.push(FileReference {
                field: FIELD_DATA_FILE.into(),
                name: d.clone(),
            });
        }
    }

    // Everything from the header is validated: now follow references (in metadata-only
    // mode they are recorded above and not opened).
    let follow = !ctx.options.metadata_only;
    let data: Option<Arc<dyn Storage>> = match (&m.data_file, h.has_external_data_file()) {
        (Some(name), true) if follow => {
            refuse_protocol(ctx, FIELD_DATA_FILE, name)?;
            Some(ctx.open_reference(FMT, FIELD_DATA_FILE, name)?)
        }
        (Some(_), true) => None,
        _ => Some(storage.clone()),
    };
    let backing = match &m.backing_file {
        Some(name) if follow => {
            refuse_protocol(ctx, FIELD_BACKING, name)?;
            let fmt =
                match &m.backing_format {
                    Some(f) => Some(Format::from_str(f).map_err(|_| {
                        Error::unsupported(FMT, format!("backing file format {f:?}"))
                    })?),
                    None => None,
                };
            match ctx.open_backing(FMT, FIELD_BACKING, name, fmt)? {
                Some(img) => {
                    info.backing = Some(Box::new(img.info().clone()));
                    Some(img.device().clone())
                }
                None => None,
            }
        }
        _ => None,
    };

    // Checked to lie inside the file; read a page at a time as the disk is walked.
    let l1 = PagedTable::new(
        storage.clone(),
        h.l1_table_offset,
        h.l1_size as u64,
        TableEntry::U64Be,
        FMT,
        "L1 table",
    );
    let device = Qcow2Device::new(Qcow2Parts {
        file: storage,
        data,
        header: m.header.clone(),
        l1,
        backing,
        backing_name: m.backing_file.clone(),
        cache_bytes: if ctx.depth == 0 {
            reader::L2_CACHE_BYTES
        } else {
            reader::L2_CACHE_BYTES / 8
        },
    });
    Ok(Opened {
        device: Arc::new(device),
        info,
    })
}

/// Creates a qcow2 writer.
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(target, size, opts, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::image::OpenOptions;
    use crate::io::MemStorage;
    use header::{CompressedDescriptor, CompressionType, L1Entry, L2Entry};

    /// A 512-byte-cluster image in memory: header, L1 at 0x200, L2 at 0x400, refcount
    /// table at 0x600; `entries` are (L2 index, entry), `data` (host offset, bytes).
    fn image(
        ct: CompressionType,
        size: u64,
        entries: &[(usize, u64)],
        data: &[(u64, &[u8])],
    ) -> Opened {
        let mut h = Header::new_v3(9, size);
        h.l1_size = 1;
        h.l1_table_offset = 0x200;
        h.refcount_table_offset = 0x600;
        h.refcount_table_clusters = 1;
        if ct == CompressionType::Zstd {
            h.compression_type = 1;
            h.incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE;
        }
        let mut f = vec![0u8; 0x1000];
        let hb = h.serialize();
        f[..hb.len()].copy_from_slice(&hb);
        f[0x200..0x208].copy_from_slice(&L1Entry::new(0x400, true).0.to_be_bytes());
        for &(i, e) in entries {
            f[0x400 + i * 8..0x408 + i * 8].copy_from_slice(&e.to_be_bytes());
        }
        for &(off, bytes) in data {
            let end = off as usize + bytes.len();
            if f.len() < end {
                f.resize(end.next_multiple_of(512), 0);
            }
            f[off as usize..end].copy_from_slice(bytes);
        }
        let ctx = OpenContext::detached("mem", &OpenOptions::default());
        open(Arc::new(MemStorage::new(f)), &ctx).unwrap()
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    }

    fn compressed(off: u64, len: usize) -> u64 {
        L2Entry::compressed(
            CompressedDescriptor::for_data(off, len as u64, 9).unwrap(),
            9,
        )
        .0
    }

    #[test]
    fn short_last_compressed_cluster() {
        // 700 bytes: the second cluster holds only 188 guest bytes, compressed alone.
        let z = deflate(&[0x5a; 188]);
        let img = image(
            CompressionType::Zlib,
            700,
            &[(1, compressed(0x1000, z.len()))],
            &[(0x1000, &z)],
        );
        let mut b = vec![1u8; 700];
        img.device.read_at(&mut b, 0).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(b[512..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    #[cfg(feature = "zstd")]
    fn zstd_frames_concatenated_with_trailing_garbage() {
        let mut z = zstd::bulk::compress(&[1u8; 256], 3).unwrap();
        z.extend(zstd::bulk::compress(&[2u8; 256], 3).unwrap());
        let used = z.len();
        z.extend([0xffu8; 40]);
        let img = image(
            CompressionType::Zstd,
            1024,
            &[
                (0, compressed(0x1000, z.len())),
                (1, compressed(0x1000 + 600, used)),
            ],
            &[(0x1000, &z), (0x1000 + 600, &z[..used])],
        );
        let mut b = vec![0u8; 1024];
        img.device.read_at(&mut b, 0).unwrap();
        assert!(b[..256].iter().all(|&x| x == 1));
        assert!(b[256..512].iter().all(|&x| x == 2));
        assert_eq!(b[..512], b[512..]);
        let e = img.device.map(0, 1024).unwrap();
        assert!(e.compressed && e.len == 1024 && e.host_offset.is_none());
        // One frame only: the cluster is not full.
        let one = zstd::bulk::compress(&[1u8; 256], 3).unwrap();
        let img = image(
            CompressionType::Zstd,
            512,
            &[(0, compressed(0x1000, one.len()))],
            &[(0x1000, &one)],
        );
        assert!(matches!(
            img.device.read_at(&mut b[..512], 0),
            Err(Error::Corrupt {
                structure: "compressed cluster",
                ..
            })
        ));
    }

    #[test]
    fn deflate_stream_shorter_than_the_cluster_is_corrupt() {
        let z = deflate(&[7u8; 300]);
        let img = image(
            CompressionType::Zlib,
            512,
            &[(0, compressed(0x1000, z.len()))],
            &[(0x1000, &z)],
        );
        let mut b = vec![0u8; 512];
        assert!(matches!(
            img.device.read_at(&mut b, 0),
            Err(Error::Corrupt {
                structure: "compressed cluster",
                ..
            })
        ));
    }

    #[test]
    fn protocols_are_refused() {
        let ctx = OpenContext::detached("x", &OpenOptions::default());
        for bad in [
            "json:{\"file\":{}}",
            "nbd://host/x",
            "http://example.com/a.img",
        ] {
            assert!(matches!(
                refuse_protocol(&ctx, FIELD_BACKING, bad),
                Err(Error::Unsupported { .. })
            ));
        }
        for ok in ["base.qcow2", "/abs/a:b.qcow2", "dir/x.img"] {
            refuse_protocol(&ctx, FIELD_BACKING, ok).unwrap();
        }
    }

    #[test]
    fn full_backing_names() {
        assert_eq!(full_backing_name("o.qcow2", "b.qcow2"), "b.qcow2");
        assert_eq!(full_backing_name("d/o.qcow2", "b.qcow2"), "d/b.qcow2");
        assert_eq!(full_backing_name("/x/o.qcow2", "../b"), "/x/../b");
        assert_eq!(full_backing_name("d/o.qcow2", "/abs/b"), "/abs/b");
    }
}
