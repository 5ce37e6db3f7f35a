//! Writing VMDKs through the conversion engine: monolithicSparse, monolithicFlat,
//! twoGbMaxExtentSparse, twoGbMaxExtentFlat and streamOptimized (VMware's canonical
//! layout, writable to a pipe).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::write::ZlibEncoder;
use flate2::Compression;

use crate::details::FormatDetails;
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::image::{OpenContext, OpenOptions};
use crate::io::{write_all_at, AllocateAhead, FileStorage, OutputSet};
use crate::writer::{parse_bool, DataRun, GrainEncoder, ImageWriter, WriteOptions};

use super::descriptor::{Access, Descriptor, ExtentLine, ExtentType, NO_PARENT_CID};
use super::header::{
    serialize_u32_table, Marker, SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS,
    FLAG_NL_TEST, FLAG_RGD, FLAG_ZEROED_GRAIN, FMT, GD_AT_END, MARKER_FOOTER, MARKER_GD, MARKER_GT,
    NEWLINE_BYTES, SECTOR,
};

/// Grain size written, in sectors (64 KiB, as VMware and qemu-img).
pub const GRAIN_SECTORS: u64 = 128;
/// Grain-table entries per table.
pub const GTES_PER_GT: u64 = 512;
/// Sectors reserved for an embedded descriptor in sparse files (as qemu-img).
const DESC_SECTORS: u64 = 20;
/// Size of one extent file of the twoGbMaxExtent subformats.
const TWO_GB_SECTORS: u64 = (2 << 30) / SECTOR;
/// Largest sparse extent: grain offsets are 32-bit sector numbers.
const MAX_SPARSE_FILE_SECTORS: u64 = u32::MAX as u64;

/// The VMDK subformats imgconv writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor (the default).
    MonolithicSparse,
    /// A descriptor plus one flat file.
    MonolithicFlat,
    /// A descriptor plus 2 GiB sparse extents.
    TwoGbMaxExtentSparse,
    /// A descriptor plus 2 GiB flat extents.
    TwoGbMaxExtentFlat,
    /// One compressed, append-only sparse file (OVA, ESXi import).
    StreamOptimized,
}

impl Subformat {
    /// Parses a `subformat=` value.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => {
                return Err(Error::invalid(format!(
                    "vmdk: unknown subformat '{s}' (monolithicSparse, monolithicFlat, \
                     twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized)"
                )))
            }
        })
    }

    /// The `createType` name.
    pub fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn is_flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }
}

/// The `-o` options of the VMDK writer, parsed.
#[derive(Debug, Clone)]
pub struct VmdkOptions {
    /// Which subformat.
    pub subformat: Subformat,
    /// `ddb.adapterType`.
    pub adapter: String,
    /// `ddb.virtualHWVersion`.
    pub hwversion: String,
    /// `ddb.toolsVersion`.
    pub toolsversion: String,
    /// Zeroed-grain grain-table entries (version 2 header).
    pub zeroed_grain: bool,
    /// Parent file name hint and the parent's CID (delta disks).
    pub parent: Option<(String, u32)>,
}

fn numeric(key: &str, v: &str) -> Result<String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 10 {
        return Err(Error::invalid(format!("vmdk: {key} '{v}' is not a number")));
    }
    Ok(v.to_string())
}

impl VmdkOptions {
    /// Takes the VMDK options out of `opts`; unknown ones are errors.
    pub fn parse(opts: &WriteOptions, target: &Path) -> Result<Self> {
        let mut o = opts.clone();
        let subformat = match o.take("subformat") {
            Some(s) => Subformat::parse(&s)?,
            None => Subformat::MonolithicSparse,
        };
        let adapter = match o.take("adapter_type").as_deref() {
            None => "ide".to_string(),
            Some(a @ ("ide" | "buslogic" | "lsilogic" | "legacyESX")) => a.to_string(),
            Some(a) => {
                return Err(Error::invalid(format!(
                    "vmdk: unknown adapter type '{a}' (ide, buslogic, lsilogic, legacyESX)"
                )))
            }
        };
        let compat6 = match o.take("compat6") {
            Some(v) => parse_bool("compat6", &v)?,
            None => false,
        };
        let hwversion = match o.take("hwversion") {
            Some(_) if compat6 => {
                return Err(Error::invalid(
                    "vmdk: compat6 cannot be used with hwversion",
                ))
            }
            Some(v) => numeric("hwversion", &v)?,
            None if compat6 => "6".to_string(),
            None => "4".to_string(),
        };
        let toolsversion = match o.take("toolsversion") {
            Some(v) => numeric("toolsversion", &v)?,
            None => "2147483647".to_string(),
        };
        let zeroed_grain = match o.take("zeroed_grain") {
            Some(v) => parse_bool("zeroed_grain", &v)?,
            None => false,
        };
        if let Some(p) = o.take("preallocation") {
            if p != "off" {
                return Err(Error::unsupported(FMT, format!("preallocation={p}")));
            }
        }
        o.reject_unknown(Format::Vmdk)?;
        if zeroed_grain && subformat.is_flat() {
            return Err(Error::invalid(
                "vmdk: zeroed_grain is only for sparse subformats",
            ));
        }
        if opts.compressed && subformat != Subformat::StreamOptimized {
            return Err(Error::unsupported(
                FMT,
                "compression (-c) outside subformat=streamOptimized",
            ));
        }
        let parent = match &opts.backing_file {
            None => None,
            Some(b) => {
                if subformat.is_flat() || subformat == Subformat::StreamOptimized {
                    return Err(Error::unsupported(
                        FMT,
                        format!("a backing file with subformat={}", subformat.name()),
                    ));
                }
                if let Some(f) = opts.backing_format {
                    if f != Format::Vmdk {
                        return Err(Error::invalid(format!(
                            "vmdk: the backing file must be a VMDK, not {f}"
                        )));
                    }
                }
                Some((b.clone(), parent_cid(b, target)?))
            }
        };
        Ok(VmdkOptions {
            subformat,
            adapter,
            hwversion,
            toolsversion,
            zeroed_grain,
            parent,
        })
    }
}

/// Opens the backing VMDK named `b` (relative to the target's folder) for its CID.
fn parent_cid(b: &str, target: &Path) -> Result<u32> {
    let p = Path::new(b);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        target.parent().unwrap_or(Path::new(".")).join(p)
    };
    // The parent's own header is all that is needed: its parent is not followed.
    let options = OpenOptions::trusted().format(Format::Vmdk).metadata_only();
    let ctx = OpenContext::for_path(&path, &options);
    let storage = Arc::new(FileStorage::open_image(&path, false)?);
    let parent = super::open(storage, &ctx)?;
    match parent.info.format_specific {
        Some(FormatDetails::Vmdk(p)) => Ok(p.cid),
        _ => Err(Error::invalid(format!("{b}: backing file has no CID"))),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uuid_string(b: &[u8; 16]) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[0..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

fn random_uuid() -> [u8; 16] {
    let mut b: [u8; 16] = crate::random::bytes();
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    b
}

/// Builds the descriptor for a new disk of `capacity` sectors.
fn build_descriptor(o: &VmdkOptions, capacity: u64, extents: Vec<ExtentLine>) -> Descriptor {
    let cid: u32 = loop {
        let c = crate::random::u32();
        if c != NO_PARENT_CID {
            break c;
        }
    };
    let (heads, sectors) = if o.adapter == "ide" {
        (16u64, 63u64)
    } else {
        (255, 63)
    };
    let mut cylinders = capacity / (heads * sectors);
    if o.adapter == "ide" {
        cylinders = cylinders.min(16383);
    }
    let image_uuid = random_uuid();
    let mut long_id: [u8; 16] = crate::random::bytes();
    long_id[12..16].copy_from_slice(&cid.to_be_bytes());
    let vmware_uuid = image_uuid
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "{}{b:02x}",
                if i == 0 {
                    ""
                } else if i == 8 {
                    "-"
                } else {
                    " "
                }
            )
        })
        .collect::<String>();
    let zero_uuid = uuid_string(&[0; 16]);
    let (parent_hint, parent_cid) = match &o.parent {
        Some((h, c)) => (Some(h.clone()), *c),
        None => (None, NO_PARENT_CID),
    };
    let ddb = vec![
        ("ddb.virtualHWVersion", o.hwversion.clone()),
        ("ddb.geometry.cylinders", cylinders.to_string()),
        ("ddb.geometry.heads", heads.to_string()),
        ("ddb.geometry.sectors", sectors.to_string()),
        ("ddb.adapterType", o.adapter.clone()),
        ("ddb.toolsVersion", o.toolsversion.clone()),
        ("ddb.longContentID", hex(&long_id)),
        ("ddb.uuid", vmware_uuid),
        ("ddb.uuid.image", uuid_string(&image_uuid)),
        ("ddb.uuid.parent", zero_uuid.clone()),
        ("ddb.uuid.modification", zero_uuid.clone()),
        ("ddb.uuid.parentmodification", zero_uuid),
    ];
    Descriptor {
        version: 1,
        cid,
        parent_cid,
        create_type: o.subformat.name().to_string(),
        parent_hint,
        extents,
        ddb: ddb.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

/// Splits `dir/name.ext` into `(dir, name, ".ext")` for naming extent files.
fn split_target(target: &Path) -> (PathBuf, String, String) {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file = target
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    match file.rfind('.') {
        Some(i) if i > 0 => (dir, file[..i].to_string(), file[i..].to_string()),
        _ => (dir, file, String::new()),
    }
}

/// Creates the VMDK writer for `target` (or the output stream of `out`).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let o = VmdkOptions::parse(opts, target)?;
    // The descriptor names extent files in quotes, one per line: such a name could not
    // be read back.
    if let Some(f) = target.file_name().map(|f| f.to_string_lossy()) {
        if f.contains(['"', '\n', '\r']) {
            return Err(Error::invalid(format!(
                "vmdk: a file name with a quote or line break cannot be named in a descriptor: {f:?}"
            )));
        }
    }
    if out.is_in_place() {
        return Err(Error::unsupported(
            FMT,
            "writing into an existing image (-n)",
        ));
    }
    let capacity = size.div_ceil(SECTOR);
    if capacity * SECTOR > crate::limits::MAX_VIRTUAL_SIZE {
        return Err(Error::invalid("vmdk: disk too large"));
    }
    if out.is_stream() && o.subformat != Subformat::StreamOptimized {
        return Err(Error::NeedsSeekableOutput {
            format: "vmdk",
            what: format!(
                "subformat {} (only streamOptimized can)",
                o.subformat.name()
            ),
        });
    }
    let (dir, stem, ext) = split_target(target);
    let own_name = if out.is_stream() {
        // A pipe has no file name; the extent needs one (readers ignore it).
        "disk.vmdk".to_string()
    } else {
        format!("{stem}{ext}")
    };
    match o.subformat {
        Subformat::StreamOptimized => {
            let desc = build_descriptor(
                &o,
                capacity,
                vec![extent_line(capacity, ExtentType::Sparse, &own_name)],
            );
            let (sink, file): (Box<dyn Write + Send>, _) = match out.take_stream() {
                Some(w) => (w, None),
                None => {
                    let f = out.create(target)?;
                    let keep = f.try_clone().map_err(|e| Error::io(target, e))?;
                    (
                        Box::new(BufWriter::with_capacity(1 << 20, f)),
                        Some((keep, target.to_path_buf())),
                    )
                }
            };
            let mut w = StreamWriter::new(sink, capacity, &desc.render())?;
            w.file = file;
            Ok(Box::new(w))
        }
        Subformat::MonolithicSparse => {
            let desc = build_descriptor(
                &o,
                capacity,
                vec![extent_line(capacity, ExtentType::Sparse, &own_name)],
            );
            let file = out.create(target)?;
            let ext = SparseWriter::create(
                file,
                target.to_path_buf(),
                capacity,
                Some(desc.render()),
                o.zeroed_grain,
            )?;
            Ok(Box::new(SplitWriter {
                extents: vec![(capacity * SECTOR, ExtentWriter::Sparse(ext))],
                has_backing: o.parent.is_some(),
            }))
        }
        Subformat::TwoGbMaxExtentSparse
        | Subformat::TwoGbMaxExtentFlat
        | Subformat::MonolithicFlat => {
            let flat = o.subformat.is_flat();
            let chunk = if o.subformat == Subformat::MonolithicFlat {
                capacity.max(1)
            } else {
                TWO_GB_SECTORS
            };
            // No more extent files than a reader takes (4096 × 2 GiB = 8 TiB): a huge
            // declared size must not become millions of files.
            let files = capacity.div_ceil(chunk).max(1);
            if files > crate::limits::MAX_VMDK_EXTENTS as u64 {
                return Err(Error::TooLarge {
                    format: FMT,
                    structure: "disk for 4096 extent files of 2 GiB",
                    size: capacity * SECTOR,
                    limit: crate::limits::MAX_VMDK_EXTENTS as u64 * chunk * SECTOR,
                });
            }
            let mut lines = Vec::new();
            let mut extents = Vec::new();
            let mut left = capacity;
            let mut n = 0;
            while left > 0 || n == 0 {
                n += 1;
                let sectors = left.min(chunk);
                let name = match o.subformat {
                    Subformat::MonolithicFlat => format!("{stem}-flat{ext}"),
                    Subformat::TwoGbMaxExtentFlat => format!("{stem}-f{n:03}{ext}"),
                    _ => format!("{stem}-s{n:03}{ext}"),
                };
                let path = dir.join(&name);
                let file = out.create(&path)?;
                let w = if flat {
                    file.set_len(sectors * SECTOR)
                        .map_err(|e| Error::io(&path, e))?;
                    ExtentWriter::Flat { file, path }
                } else {
                    ExtentWriter::Sparse(SparseWriter::create(
                        file,
                        path,
                        sectors,
                        None,
                        o.zeroed_grain,
                    )?)
                };
                lines.push(extent_line(
                    sectors,
                    if flat {
                        ExtentType::Flat
                    } else {
                        ExtentType::Sparse
                    },
                    &name,
                ));
                extents.push((sectors * SECTOR, w));
                left -= sectors;
                if left == 0 {
                    break;
                }
            }
            let desc = build_descriptor(&o, capacity, lines);
            let mut f = out.create(target)?;
            f.write_all(desc.render().as_bytes())
                .map_err(|e| Error::io(target, e))?;
            Ok(Box::new(SplitWriter {
                extents,
                has_backing: o.parent.is_some(),
            }))
        }
    }
}

fn extent_line(sectors: u64, kind: ExtentType, name: &str) -> ExtentLine {
    ExtentLine {
        access: Access::Rw,
        sectors,
        kind,
        filename: Some(name.to_string()),
        offset: 0,
    }
}

/// The writer of one hosted sparse extent file (qemu-img's / VMware's hosted layout:
/// header, descriptor, redundant GD + GTs, GD + GTs, grains appended in order).
pub struct SparseWriter {
    file: File,
    path: PathBuf,
    header: SparseHeader,
    gt_sectors: u64,
    /// First sector of the redundant grain tables.
    rgt_base: u64,
    /// First sector of the grain tables.
    gt_base: u64,
    /// Next free sector for a grain.
    next: u64,
    /// The grain table being filled and its index.
    cur: Option<(u64, Vec<u32>)>,
    /// Grains are allocated just before they are written (the file is new).
    allocate_ahead: AllocateAhead,
}

impl SparseWriter {
    /// Lays out an empty extent of `capacity` sectors in `file` and writes its metadata.
    pub fn create(
        file: File,
        path: PathBuf,
        capacity: u64,
        descriptor: Option<String>,
        zeroed_grain: bool,
    ) -> Result<Self> {
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gd_entries = grains.div_ceil(GTES_PER_GT);
        let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
        let gt_sectors = GTES_PER_GT * 4 / SECTOR;
        let (desc_off, desc_size) = match &descriptor {
            Some(d) => {
                let need = (d.len() as u64).div_ceil(SECTOR).max(DESC_SECTORS);
                (1, need)
            }
            None => (0, 0),
        };
        let rgd = 1 + desc_size;
        let rgt_base = rgd + gd_sectors;
        let gd = rgt_base + gd_entries * gt_sectors;
        let gt_base = gd + gd_sectors;
        let overhead = (gt_base + gd_entries * gt_sectors).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        if overhead + grains * GRAIN_SECTORS > MAX_SPARSE_FILE_SECTORS {
            return Err(Error::invalid(
                "vmdk: a sparse extent cannot hold more than 2 TiB (use twoGbMaxExtentSparse)",
            ));
        }
        let header = SparseHeader {
            version: if zeroed_grain { 2 } else { 1 },
            flags: FLAG_NL_TEST | FLAG_RGD | if zeroed_grain { FLAG_ZEROED_GRAIN } else { 0 },
            capacity,
            grain_size: GRAIN_SECTORS,
            descriptor_offset: desc_off,
            descriptor_size: desc_size,
            num_gtes_per_gt: GTES_PER_GT as u32,
            rgd_offset: rgd,
            gd_offset: gd,
            overhead,
            unclean_shutdown: false,
            newline_bytes: NEWLINE_BYTES,
            compress_algorithm: 0,
        };
        file.set_len(overhead * SECTOR)
            .map_err(|e| Error::io(&path, e))?;
        write_all_at(&file, &header.serialize(), 0, &path)?;
        if let Some(d) = descriptor {
            write_all_at(&file, d.as_bytes(), SECTOR, &path)?;
        }
        // Every GT is preallocated (zeros = unallocated); the GDs point at them all.
        let gd_table: Vec<u32> = (0..gd_entries)
            .map(|i| (gt_base + i * gt_sectors) as u32)
            .collect();
        let rgd_table: Vec<u32> = (0..gd_entries)
            .map(|i| (rgt_base + i * gt_sectors) as u32)
            .collect();
        write_all_at(&file, &serialize_u32_table(&gd_table), gd * SECTOR, &path)?;
        write_all_at(&file, &serialize_u32_table(&rgd_table), rgd * SECTOR, &path)?;
        Ok(SparseWriter {
            file,
            path,
            header,
            gt_sectors,
            rgt_base,
            gt_base,
            next: overhead,
            cur: None,
            allocate_ahead: AllocateAhead::new(true),
        })
    }

    fn flush_gt(&mut self) -> Result<()> {
        if let Some((i, t)) = self.cur.take() {
            let b = serialize_u32_table(&t);
            let off = i * self.gt_sectors;
            write_all_at(&self.file, &b, (self.gt_base + off) * SECTOR, &self.path)?;
            write_all_at(&self.file, &b, (self.rgt_base + off) * SECTOR, &self.path)?;
        }
        Ok(())
    }

    fn set_entry(&mut self, g: u64, v: u32) -> Result<()> {
        let i = g / GTES_PER_GT;
        if self.cur.as_ref().is_some_and(|(c, _)| *c != i) {
            self.flush_gt()?;
        }
        let (_, t) = self
            .cur
            .get_or_insert_with(|| (i, vec![0u32; GTES_PER_GT as usize]));
        t[(g % GTES_PER_GT) as usize] = v;
        Ok(())
    }

    /// Stores `data` (grain-aligned at extent offset `offset`) as new grains.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let gb = GRAIN_SECTORS * SECTOR;
        let g0 = offset / gb;
        let n = (data.len() as u64).div_ceil(gb);
        self.allocate_ahead
            .before_write(&self.file, self.next * SECTOR, data.len() as u64);
        write_all_at(&self.file, data, self.next * SECTOR, &self.path)?;
        for k in 0..n {
            let s = self.next + k * GRAIN_SECTORS;
            self.set_entry(g0 + k, s as u32)?;
        }
        self.next += n * GRAIN_SECTORS;
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros over a parent.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let gb = GRAIN_SECTORS * SECTOR;
        let end = (offset + len).min(self.header.capacity * SECTOR);
        let mut g = offset / gb;
        while g * gb < end {
            if self.header.zeroed_grain() {
                self.set_entry(g, 1)?;
            } else {
                let zeros = vec![0u8; gb as usize];
                self.write(g * gb, &zeros)?;
            }
            g += 1;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.flush_gt()?;
        self.file
            .set_len(self.next * SECTOR)
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// One extent file of a (possibly multi-file) output.
enum ExtentWriter {
    Sparse(SparseWriter),
    Flat { file: File, path: PathBuf },
}

/// Writes runs into a sequence of extent files (one for monolithic subformats).
struct SplitWriter {
    /// (length in bytes, writer), in order.
    extents: Vec<(u64, ExtentWriter)>,
    has_backing: bool,
}

impl SplitWriter {
    /// Calls `f(extent, offset within it, range start, range end)` for each extent
    /// that `[offset, offset+len)` touches.
    fn each(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut ExtentWriter, u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut start = 0u64;
        let end = offset + len;
        for (elen, w) in self.extents.iter_mut() {
            let (s, e) = (start, start + *elen);
            let a = offset.max(s);
            let b = end.min(e);
            if a < b {
                f(w, a - s, a - offset, b - offset)?;
            }
            start = e;
            if start >= end {
                break;
            }
        }
        Ok(())
    }
}

impl ImageWriter for SplitWriter {
    fn grain_size(&self) -> u64 {
        GRAIN_SECTORS * SECTOR
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let data = run.data;
        self.each(run.offset, data.len() as u64, |w, at, a, b| {
            let piece = &data[a as usize..b as usize];
            match w {
                ExtentWriter::Sparse(s) => s.write(at, piece),
                ExtentWriter::Flat { file, path } => write_all_at(file, piece, at, path),
            }
        })
    }

    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()> {
        if !self.has_backing {
            return Ok(()); // a fresh extent reads as zeros already
        }
        self.each(offset, len, |w, at, a, b| match w {
            ExtentWriter::Sparse(s) => s.zero(at, b - a),
            ExtentWriter::Flat { .. } => Ok(()),
        })
    }

    fn finish(self: Box<Self>) -> Result<()> {
        for (_, w) in self.extents {
            match w {
                ExtentWriter::Sparse(s) => s.finish()?,
                // No fdatasync, like `qemu-img convert`: the rename on commit guards
                // against interruption.
                ExtentWriter::Flat { .. } => {}
            }
        }
        Ok(())
    }
}

/// Compresses grains for streamOptimized on the engine's workers: each grain becomes
/// its marker, the zlib stream and zero padding to a sector boundary.
pub struct StreamEncoder {
    grain_bytes: usize,
}

impl StreamEncoder {
    /// The sector-padded on-disk form of the grain at guest `offset`.
    pub fn encode_grain(&self, offset: u64, grain: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(grain.len() / 2 + 1024);
        out.resize(12, 0);
        let mut z = ZlibEncoder::new(out, Compression::default());
        z.write_all(grain)?;
        if grain.len() < self.grain_bytes {
            // The last grain of an odd-sized disk: whole grains decompress everywhere.
            z.write_all(&vec![0u8; self.grain_bytes - grain.len()])?;
        }
        let mut out = z.finish()?;
        let size = (out.len() - 12) as u32;
        Marker::Grain {
            lba: offset / SECTOR,
            size,
        }
        .serialize_into(&mut out[..12]);
        out.resize(
            (out.len() as u64).div_ceil(SECTOR) as usize * SECTOR as usize,
            0,
        );
        Ok(out)
    }
}

impl GrainEncoder for StreamEncoder {
    fn encode(&self, offset: u64, grain: &[u8]) -> Result<Option<Vec<u8>>> {
        self.encode_grain(offset, grain).map(Some)
    }
}

/// Writes streamOptimized VMDKs sequentially (files and pipes alike): header with
/// `GD_AT_END`, descriptor, grains with markers, a GT (with its marker) after each
/// 512 grains' data, the GD, the footer and the end-of-stream marker.
pub struct StreamWriter {
    sink: Box<dyn Write + Send>,
    pos: u64,
    header: SparseHeader,
    encoder: Arc<StreamEncoder>,
    /// Grain tables written, `(GD index, sector)`, ascending; the grain directory (up to
    /// [`MAX_VMDK_GD_ENTRIES`](crate::limits::MAX_VMDK_GD_ENTRIES) entries, mostly
    /// empty for a big sparse disk) is made a piece at a time when written.
    gts: Vec<(u64, u32)>,
    gd_entries: u64,
    cur: Option<(u64, Vec<u32>)>,
    /// The output file (not a pipe), synced at the end.
    file: Option<(File, PathBuf)>,
}

impl StreamWriter {
    /// Starts a stream for a disk of `capacity` sectors with descriptor `desc`.
    pub fn new(sink: Box<dyn Write + Send>, capacity: u64, desc: &str) -> Result<Self> {
        let desc_sectors = (desc.len() as u64).div_ceil(SECTOR).max(1);
        let overhead = (1 + desc_sectors).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity,
            grain_size: GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: desc_sectors,
            num_gtes_per_gt: GTES_PER_GT as u32,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead,
            unclean_shutdown: false,
            newline_bytes: NEWLINE_BYTES,
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        let gd_entries = header.gd_entries();
        if gd_entries > crate::limits::MAX_VMDK_GD_ENTRIES {
            return Err(Error::TooLarge {
                format: FMT,
                structure: "grain directory of the streamOptimized output",
                size: gd_entries * 4,
                limit: crate::limits::MAX_VMDK_GD_ENTRIES * 4,
            });
        }
        let mut w = StreamWriter {
            sink,
            pos: 0,
            encoder: Arc::new(StreamEncoder {
                grain_bytes: header.grain_bytes() as usize,
            }),
            header,
            gts: Vec::new(),
            gd_entries,
            cur: None,
            file: None,
        };
        let mut head = vec![0u8; (overhead * SECTOR) as usize];
        head[..512].copy_from_slice(&w.header.serialize());
        head[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.sink.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.pos / SECTOR)
            .map_err(|_| Error::invalid("vmdk: streamOptimized file would exceed 2 TiB"))
    }

    fn flush_gt(&mut self) -> Result<()> {
        if let Some((i, t)) = self.cur.take() {
            self.put(&Marker::meta_sector(GTES_PER_GT * 4 / SECTOR, MARKER_GT))?;
            let s = self.sector()?;
            self.gts.push((i, s));
            self.put(&serialize_u32_table(&t))?;
        }
        Ok(())
    }

    fn add_grain(&mut self, g: u64, bytes: &[u8]) -> Result<()> {
        let i = g / GTES_PER_GT;
        if self.cur.as_ref().is_some_and(|(c, _)| *c != i) {
            self.flush_gt()?;
        }
        let s = self.sector()?;
        self.cur
            .get_or_insert_with(|| (i, vec![0u32; GTES_PER_GT as usize]))
            .1[(g % GTES_PER_GT) as usize] = s;
        self.put(bytes)
    }
}

impl ImageWriter for StreamWriter {
    fn grain_size(&self) -> u64 {
        self.header.grain_bytes()
    }

    fn encoder(&self) -> Option<Arc<dyn GrainEncoder>> {
        Some(self.encoder.clone())
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let gb = self.header.grain_bytes();
        for (k, grain) in run.data.chunks(gb as usize).enumerate() {
            let off = run.offset + k as u64 * gb;
            let pre = run.encoded.and_then(|e| e.get(k)).and_then(|e| e.as_ref());
            match pre {
                Some(bytes) => self.add_grain(off / gb, bytes)?,
                None => {
                    let bytes = self.encoder.encode_grain(off, grain)?;
                    self.add_grain(off / gb, &bytes)?
                }
            }
        }
        Ok(())
    }

    fn write_zeros(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Ok(()) // unallocated grains read as zeros
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_gt()?;
        let gd_sectors = (self.gd_entries * 4).div_ceil(SECTOR);
        self.put(&Marker::meta_sector(gd_sectors, MARKER_GD))?;
        let gd_sector = self.sector()?;
        // The directory, 128 Ki entries at a time, padded to its last sector.
        const PIECE: u64 = 1 << 17;
        let gts = std::mem::take(&mut self.gts);
        let mut next = gts.iter().peekable();
        let mut first = 0u64;
        while first < gd_sectors * SECTOR / 4 {
            let n = PIECE.min(gd_sectors * SECTOR / 4 - first);
            let mut piece = vec![0u32; n as usize];
            while let Some(&&(i, s)) = next.peek() {
                if i >= first + n {
                    break;
                }
                piece[(i - first) as usize] = s;
                next.next();
            }
            self.put(&serialize_u32_table(&piece))?;
            first += n;
        }
        self.put(&Marker::meta_sector(1, MARKER_FOOTER))?;
        let mut footer = self.header.clone();
        footer.gd_offset = gd_sector as u64;
        self.put(&footer.serialize())?;
        self.put(&[0u8; 512])?; // end-of-stream marker
        self.sink.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_target_names() {
        assert_eq!(
            split_target(Path::new("a/b/disk.vmdk")),
            ("a/b".into(), "disk".into(), ".vmdk".into())
        );
        assert_eq!(
            split_target(Path::new("disk")),
            (".".into(), "disk".into(), String::new())
        );
    }

    #[test]
    fn options_are_checked() {
        let t = Path::new("x.vmdk");
        let mut w = WriteOptions::default();
        w.parse_o("adapter_type=lsilogic,hwversion=13,subformat=streamOptimized")
            .unwrap();
        let o = VmdkOptions::parse(&w, t).unwrap();
        assert_eq!(o.subformat, Subformat::StreamOptimized);
        assert_eq!(o.adapter, "lsilogic");
        for bad in [
            "bogus=1",
            "adapter_type=scsi",
            "hwversion=x",
            "subformat=foo",
            "subformat=monolithicFlat,zeroed_grain=on",
            "compat6,hwversion=7",
        ] {
            let mut w = WriteOptions::default();
            w.parse_o(bad).unwrap();
            assert!(VmdkOptions::parse(&w, t).is_err(), "{bad}");
        }
    }

    #[test]
    fn geometry_follows_the_adapter() {
        let mut o = VmdkOptions::parse(&WriteOptions::default(), Path::new("x")).unwrap();
        let d = build_descriptor(&o, 1 << 30, vec![]);
        assert_eq!(d.get("ddb.geometry.heads"), Some("16"));
        assert_eq!(d.get("ddb.geometry.cylinders"), Some("16383"));
        o.adapter = "lsilogic".into();
        let d = build_descriptor(&o, 1 << 30, vec![]);
        assert_eq!(d.get("ddb.geometry.heads"), Some("255"));
        assert_eq!(d.get("ddb.geometry.cylinders"), Some("66837"));
        assert_eq!(d.parent_cid, NO_PARENT_CID);
    }
}
