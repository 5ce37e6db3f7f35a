//! The qcow2 writer: a streaming converter behind [`ImageWriter`].
//!
//! Layout (QEMU's, so that outputs are no larger than qemu-img's): cluster 0 holds the
//! header, its extensions and the backing file name; then the refcount table (sized for
//! the largest file this image can become), the first refcount block and the L1 table
//! are reserved. Data clusters and L2 tables are appended as the ascending runs arrive;
//! an L2 table is reserved when its range first needs one and written when the runs
//! move past it. `finish` appends any further refcount blocks, writes the refcount
//! blocks, the refcount table, the L1 table and — last — the header.
//!
//! For a source whose length is only known at its end ([`create_writer_unsized`]), the
//! L1 table cannot be sized in advance: it grows in memory and goes at the end of the
//! file, after the data (qcow2 allows any cluster-aligned place).
//!
//! Every cluster below the end of the file is in use; its refcount is 1 except for host
//! clusters shared by byte-packed compressed clusters, which are tracked one by one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::header::{
    default_feature_table, max_refcount, refcount_block_entries, serialize_extensions,
    serialize_u64_table, CompatibleFeatures, CompressedDescriptor, CompressionType, Header,
    HeaderExtension, IncompatibleFeatures, MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, OFLAG_COPIED, OFLAG_ZERO,
};
use super::refcount::{BlockBuilder, RefMap};
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::io::{fallocate, write_all_at, AllocateAhead, OutputSet};
use crate::limits::{MAX_QCOW2_L1_BYTES, MAX_QCOW2_REFTABLE_BYTES, MAX_VIRTUAL_SIZE};
use crate::writer::{parse_bool, parse_size, DataRun, GrainEncoder, ImageWriter, WriteOptions};

/// `preallocation=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Only what holds data is allocated.
    #[default]
    Off,
    /// Every guest cluster gets a host cluster (the file stays sparse).
    Metadata,
    /// As `Metadata`, and the file's blocks are reserved with `fallocate`.
    Falloc,
    /// As `Metadata`, and the clusters are written with zeros.
    Full,
}

impl Prealloc {
    /// qemu-img's name.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Everything a qcow2 image is created with, parsed from qemu-img's `-o` options.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6).
    pub refcount_order: u32,
    /// `lazy_refcounts=on`.
    pub lazy_refcounts: bool,
    /// `extended_l2=on`.
    pub extended_l2: bool,
    /// `preallocation=`.
    pub prealloc: Prealloc,
    /// `compression_type=`.
    pub compression: CompressionType,
    /// `-c`: compress data clusters.
    pub compressed: bool,
    /// Backing file name to record.
    pub backing_file: Option<String>,
    /// Its format.
    pub backing_format: Option<Format>,
}

impl Qcow2Options {
    /// Parses and validates the options (unknown ones are refused).
    pub fn parse(opts: &WriteOptions) -> Result<Self> {
        let mut o = opts.clone();
        let bad = |m: String| Error::invalid(format!("qcow2: {m}"));
        let version = match o.take("compat").as_deref() {
            None | Some("1.1") | Some("v3") => 3,
            Some("0.10") | Some("v2") => 2,
            Some(v) => return Err(bad(format!("compat '{v}' is not 0.10 or 1.1"))),
        };
        let cluster_size = match o.take("cluster_size") {
            None => 65536,
            Some(v) => parse_size(&v)?,
        };
        if !cluster_size.is_power_of_two()
            || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cluster_size)
        {
            return Err(bad(format!(
                "cluster size {cluster_size} must be a power of two between 512 and 2M"
            )));
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let refcount_bits = match o.take("refcount_bits") {
            None => 16,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| bad(format!("refcount_bits '{v}' is not a number")))?,
        };
        if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
            return Err(bad(format!(
                "refcount width {refcount_bits} must be a power of two and may not exceed 64 bits"
            )));
        }
        let refcount_order = refcount_bits.trailing_zeros();
        let lazy_refcounts = match o.take("lazy_refcounts") {
            Some(v) => parse_bool("lazy_refcounts", &v)?,
            None => false,
        };
        let extended_l2 = match o.take("extended_l2") {
            Some(v) => parse_bool("extended_l2", &v)?,
            None => false,
        };
        let prealloc = match o.take("preallocation").as_deref() {
            None | Some("off") => Prealloc::Off,
            Some("metadata") => Prealloc::Metadata,
            Some("falloc") => Prealloc::Falloc,
            Some("full") => Prealloc::Full,
            Some(v) => {
                return Err(bad(format!(
                    "preallocation '{v}' is not one of off, metadata, falloc, full"
                )))
            }
        };
        let compression = match o.take("compression_type").as_deref() {
            None | Some("zlib") => CompressionType::Zlib,
            #[cfg(feature = "zstd")]
            Some("zstd") => CompressionType::Zstd,
            #[cfg(not(feature = "zstd"))]
            Some("zstd") => {
                return Err(Error::unsupported(
                    "qcow2",
                    "compression_type=zstd (imgconv was built without its `zstd` feature)",
                ))
            }
            Some(v) => return Err(bad(format!("compression_type '{v}' is not zlib or zstd"))),
        };
        for key in ["encrypt.format", "encryption", "data_file", "data_file_raw"] {
            if o.take(key).is_some() {
                return Err(Error::unsupported(
                    "qcow2",
                    format!("creating images with {key}"),
                ));
            }
        }
        o.reject_unknown(Format::Qcow2)?;
        if version == 2 {
            if refcount_order != 4 {
                return Err(bad(
                    "different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
                ));
            }
            if lazy_refcounts {
                return Err(bad(
                    "lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into(),
                ));
            }
            if extended_l2 {
                return Err(bad("extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
            }
            if compression != CompressionType::Zlib {
                return Err(bad(
                    "compression_type requires compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
                ));
            }
        }
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                    .into(),
            ));
        }
        if opts.backing_file.is_some() && opts.backing_format.is_none() {
            return Err(bad(
                "use of backing file requires explicit backing format (backing_fmt / -F)".into(),
            ));
        }
        if let Some(b) = &opts.backing_file {
            if b.is_empty() || b.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(bad(format!(
                    "backing file name must be 1 to {MAX_BACKING_FILE_NAME} bytes long"
                )));
            }
        }
        if opts.backing_file.is_some() && prealloc != Prealloc::Off && !extended_l2 {
            return Err(bad(
                "backing file and preallocation can only be used at the same time if extended_l2 is on".into(),
            ));
        }
        if opts.compressed && prealloc != Prealloc::Off {
            return Err(bad(
                "compression and preallocation not supported at the same time".into(),
            ));
        }
        Ok(Qcow2Options {
            version,
            cluster_bits,
            refcount_order,
            lazy_refcounts,
            extended_l2,
            prealloc,
            compression,
            compressed: opts.compressed,
            backing_file: opts.backing_file.clone(),
            backing_format: opts.backing_format,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_size(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size() * self.l2_entries())
    }

    /// The header (tables at 0) and the bytes of cluster 0 after it: extensions and
    /// the backing file name. Fails when they do not fit in one cluster.
    pub fn header_template(&self, size: u64) -> Result<(Header, Vec<u8>)> {
        let mut h = Header::new_v3(self.cluster_bits, size);
        if self.version == 2 {
            h.version = 2;
            h.header_length = 72;
            h.trailing.clear();
        }
        h.refcount_order = self.refcount_order;
        if self.lazy_refcounts {
            h.compatible_features |= CompatibleFeatures::LAZY_REFCOUNTS;
        }
        if self.extended_l2 {
            h.incompatible_features |= IncompatibleFeatures::EXTENDED_L2;
        }
        if self.compression != CompressionType::Zlib {
            h.incompatible_features |= IncompatibleFeatures::COMPRESSION_TYPE;
            h.compression_type = self.compression.to_byte();
        }
        let header_len = h.serialize().len();
        let mut exts = Vec::new();
        if let Some(f) = self.backing_format {
            exts.push(HeaderExtension::BackingFormat(f.to_string()));
        }
        let name_len = self.backing_file.as_ref().map_or(0, |b| b.len());
        let cs = self.cluster_size() as usize;
        if self.version >= 3 {
            // QEMU adds the feature name table only when it fits.
            let mut with = exts.clone();
            with.push(HeaderExtension::FeatureTable(default_feature_table()));
            if header_len + serialize_extensions(&with).len() + name_len <= cs {
                exts = with;
            }
        }
        let mut tail = serialize_extensions(&exts);
        if let Some(b) = &self.backing_file {
            h.backing_file_offset = (header_len + tail.len()) as u64;
            h.backing_file_size = b.len() as u32;
            tail.extend_from_slice(b.as_bytes());
        }
        if header_len + tail.len() > cs {
            return Err(Error::invalid(format!(
                "qcow2: header, extensions and backing file name ({} bytes) do not fit in one {cs}-byte cluster",
                header_len + tail.len()
            )));
        }
        Ok((h, tail))
    }
}

/// Compresses clusters on the engine's worker threads.
pub struct ClusterEncoder {
    cluster_size: usize,
    kind: CompressionType,
}

thread_local! {
    static DEFLATE: std::cell::RefCell<Option<flate2::Compress>> = const { std::cell::RefCell::new(None) };
    #[cfg(feature = "zstd")]
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
}

impl ClusterEncoder {
    /// An encoder for clusters of `cluster_size` bytes.
    pub fn new(cluster_size: usize, kind: CompressionType) -> Self {
        ClusterEncoder { cluster_size, kind }
    }

    /// Compresses one whole cluster; `None` when the result would not fit in
    /// `cluster_size - 1` bytes (QEMU's rule: the cluster is then stored plainly).
    pub fn compress(&self, cluster: &[u8]) -> Result<Option<Vec<u8>>> {
        let max = self.cluster_size - 1;
        match self.kind {
            CompressionType::Zlib => DEFLATE.with(|c| {
                let mut c = c.borrow_mut();
                // Raw deflate with a 4 KiB window: QEMU inflates with windowBits -12.
                // Level 9 of zlib-rs is still faster than zlib's default level and
                // packs at least as tightly (its level 6 is ~4% larger than zlib's).
                let z = c.get_or_insert_with(|| {
                    flate2::Compress::new_with_window_bits(flate2::Compression::best(), false, 12)
                });
                z.reset();
                // Room beyond the limit: zlib-rs can fail on an output buffer that is
                // smaller than the stored-block worst case.
                let mut out = Vec::with_capacity(cluster.len() + cluster.len() / 8 + 64);
                let st = z
                    .compress_vec(cluster, &mut out, flate2::FlushCompress::Finish)
                    .map_err(|e| Error::invalid(format!("qcow2: deflate failed: {e}")))?;
                Ok((st == flate2::Status::StreamEnd && out.len() <= max).then_some(out))
            }),
            #[cfg(not(feature = "zstd"))]
            CompressionType::Zstd => Err(Error::unsupported(
                "qcow2",
                "zstd compression (imgconv was built without its `zstd` feature)",
            )),
            #[cfg(feature = "zstd")]
            CompressionType::Zstd => ZSTD.with(|c| {
                let mut c = c.borrow_mut();
                if c.is_none() {
                    *c = Some(zstd::bulk::Compressor::new(0).map_err(Error::Stream)?);
                }
                let z = c.as_mut().expect("initialised above");
                let mut out = vec![0u8; max];
                match z.compress_to_buffer(cluster, &mut out) {
                    Ok(n) => {
                        out.truncate(n);
                        Ok(Some(out))
                    }
                    Err(_) => Ok(None), // does not fit: store plainly
                }
            }),
        }
    }
}

impl GrainEncoder for ClusterEncoder {
    fn encode(&self, _offset: u64, grain: &[u8]) -> Result<Option<Vec<u8>>> {
        if grain.len() == self.cluster_size {
            self.compress(grain)
        } else {
            // The short last cluster of the disk is compressed as a whole cluster.
            let mut full = grain.to_vec();
            full.resize(self.cluster_size, 0);
            self.compress(&full)
        }
    }
}

/// Where the pieces of the file go, decided before any data arrives.
#[derive(Debug, Clone, Copy)]
struct Layout {
    l1_size: u64,
    l1_offset: u64,
    l1_clusters: u64,
    rt_offset: u64,
    rt_clusters: u64,
    rb0_offset: u64,
    first_free: u64,
    /// The L1 table is placed by `finish` at the end of the file (size unknown ahead).
    l1_at_end: bool,
}

impl Layout {
    fn new(o: &Qcow2Options, size: u64) -> Result<Layout> {
        let cs = o.cluster_size();
        let l1_size = o.l1_size(size);
        if l1_size * 8 > MAX_QCOW2_L1_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: a {size}-byte disk needs an L1 table of {} bytes with {cs}-byte clusters (limit {MAX_QCOW2_L1_BYTES}); use larger clusters",
                l1_size * 8
            )));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        // One cluster of refcount table, as QEMU starts with; `finish` moves the table
        // to the end of the file when the image needs a bigger one.
        let rt_clusters = 1;
        let rt_offset = cs;
        let rb0_offset = rt_offset + rt_clusters * cs;
        let l1_offset = rb0_offset + cs;
        Ok(Layout {
            l1_size,
            l1_offset,
            l1_clusters,
            rt_offset,
            rt_clusters,
            rb0_offset,
            first_free: (l1_offset / cs) + l1_clusters,
            l1_at_end: false,
        })
    }

    /// The layout for an unknown size: no L1 reserved; data starts after the first
    /// refcount block.
    fn size_unknown(o: &Qcow2Options) -> Result<Layout> {
        let mut l = Layout::new(o, 0)?;
        (l.l1_size, l.l1_clusters, l.l1_offset, l.l1_at_end) = (0, 0, 0, true);
        l.first_free = l.rb0_offset / o.cluster_size() + 1;
        Ok(l)
    }
}

/// The L2 table being filled.
struct OpenL2 {
    index: u64,
    host: u64,
    /// One u64 per cluster, or two (entry, bitmap) with extended L2.
    entries: Vec<u64>,
}

/// Writes a qcow2 image from ascending runs.
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    o: Qcow2Options,
    size: u64,
    layout: Layout,
    l1: Vec<u64>,
    l2: Option<OpenL2>,
    /// Next free cluster index at the end of the file.
    next_cluster: u64,
    /// Free bytes `[start, end)` left in the last partly used cluster of compressed data.
    tail: Option<(u64, u64)>,
    /// End of the used bytes of the file.
    end_bytes: u64,
    /// Clusters whose refcount is not 1.
    refs: RefMap,
    /// Guest offset up to which runs have been seen (for preallocating gaps).
    seen_to: u64,
    encoder: Option<Arc<ClusterEncoder>>,
    /// The last guest cluster preallocated so far, and its host offset.
    last_prealloc: Option<(u64, u64)>,
    /// Made for a source of unknown length: `size` is a bound until `set_size`.
    size_pending: bool,
    /// New data clusters are allocated just before they are written.
    allocate_ahead: AllocateAhead,
}

/// Creates a qcow2 writer for `target`.
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(new_writer(target, Some(size), opts, out)?))
}

/// Creates a qcow2 writer whose virtual size is set at the end
/// ([`ImageWriter::set_size`]); the L1 table then goes at the end of the file.
pub fn create_writer_unsized(
    target: &Path,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(new_writer(target, None, opts, out)?))
}

fn new_writer(
    target: &Path,
    size: Option<u64>,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Qcow2Writer> {
    let o = Qcow2Options::parse(opts)?;
    let size_pending = size.is_none();
    let size = size.unwrap_or(MAX_VIRTUAL_SIZE);
    if out.is_stream() {
        return Err(Error::NeedsSeekableOutput {
            format: "qcow2",
            what: "a qcow2 image".into(),
        });
    }
    // `-n`: the target exists. qemu-img creates nothing then, and afterwards the target
    // reads as the source: it is written anew, in the same file, with the creation
    // options its header records (qemu-img ignores -o with -n too).
    let (o, size, existing) = if out.is_in_place() {
        if size_pending {
            return Err(Error::unsupported(
                "qcow2",
                "writing into an existing image (-n) from a source of unknown length",
            ));
        }
        let file = out.create(target)?;
        let (mut eo, esize) = existing_options(&file, target)?;
        eo.compressed = o.compressed;
        if esize < size {
            return Err(Error::invalid(format!(
                "{}: output image is smaller than the input ({esize} < {size} bytes)",
                target.display()
            )));
        }
        if file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            file.set_len(0).map_err(|e| Error::io(target, e))?;
        }
        (eo, esize, Some(file))
    } else {
        (o, size, None)
    };
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "qcow2: virtual size {size} is too large"
        )));
    }
    // qcow2 sizes are whole sectors (QEMU refuses anything else); the padding reads
    // as zeros.
    let size = size.next_multiple_of(512);
    o.header_template(size)?;
    let layout = if size_pending {
        Layout::size_unknown(&o)?
    } else {
        Layout::new(&o, size)?
    };
    let file = match existing {
        Some(f) => f,
        None => out.create(target)?,
    };
    let encoder = o.compressed.then(|| {
        Arc::new(ClusterEncoder::new(
            o.cluster_size() as usize,
            o.compression,
        ))
    });
    Ok(Qcow2Writer {
        file,
        path: target.to_path_buf(),
        size,
        l1: vec![0; layout.l1_size as usize],
        l2: None,
        next_cluster: layout.first_free,
        tail: None,
        // An image with no data ends right after its L1 entries, as QEMU's does.
        end_bytes: if layout.l1_size > 0 {
            layout.l1_offset + layout.l1_size * 8
        } else {
            layout.first_free * o.cluster_size()
        },
        refs: RefMap::new(),
        seen_to: 0,
        encoder,
        last_prealloc: None,
        size_pending,
        // Clusters preallocated with falloc/full already have their blocks.
        allocate_ahead: AllocateAhead::new(matches!(
            o.prealloc,
            Prealloc::Off | Prealloc::Metadata
        )),
        layout,
        o,
    })
}

/// The creation options and virtual size an existing qcow2 image's header records, for
/// writing it anew (`-n`). Images that depend on other files or keys are refused.
fn existing_options(file: &File, path: &Path) -> Result<(Qcow2Options, u64)> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let n = file.read_at(&mut buf, 0).map_err(|e| Error::io(path, e))?;
    buf.truncate(n);
    let h = Header::parse(&buf)?;
    let refuse = |what: &str| {
        Err(Error::unsupported(
            "qcow2",
            format!("writing into an existing image (-n) that {what}"),
        ))
    };
    if h.backing_file_offset != 0 {
        return refuse("has a backing file");
    }
    if h.crypt_method != super::header::CRYPT_NONE {
        return refuse("is encrypted");
    }
    if h.has_external_data_file() {
        return refuse("has an external data file");
    }
    if h.nb_snapshots > 0 {
        return refuse("has internal snapshots");
    }
    let o = Qcow2Options {
        version: h.version,
        cluster_bits: h.cluster_bits,
        refcount_order: h.refcount_order,
        lazy_refcounts: h
            .compatible_features
            .contains(super::header::CompatibleFeatures::LAZY_REFCOUNTS),
        extended_l2: h.extended_l2(),
        prealloc: Prealloc::Off,
        compression: h.compression().unwrap_or(CompressionType::Zlib),
        compressed: false,
        backing_file: None,
        backing_format: None,
    };
    Ok((o, h.size))
}

const ALL_ALLOC: u64 = 0xffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff << 32;

impl Qcow2Writer {
    fn cs(&self) -> u64 {
        self.o.cluster_size()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        write_all_at(&self.file, buf, offset, &self.path)
    }

    /// Takes `n` whole clusters at the end of the file.
    fn alloc_clusters(&mut self, n: u64) -> u64 {
        let off = self.next_cluster << self.o.cluster_bits;
        self.next_cluster += n;
        self.end_bytes = self.end_bytes.max(self.next_cluster << self.o.cluster_bits);
        off
    }

    /// Makes the L2 table covering guest cluster `gc` the open one.
    fn open_l2(&mut self, gc: u64) -> Result<()> {
        let index = gc / self.o.l2_entries();
        if self.l2.as_ref().is_some_and(|l| l.index == index) {
            return Ok(());
        }
        self.flush_l2()?;
        if index as usize >= self.l1.len() {
            // Only with the L1 table at the end (size unknown): it grows as data arrives.
            if !self.layout.l1_at_end || (index + 1) * 8 > MAX_QCOW2_L1_BYTES {
                return Err(Error::invalid(format!(
                    "qcow2: guest cluster {gc} needs L1 entry {index}, beyond the L1 table (at most {MAX_QCOW2_L1_BYTES} bytes); use larger clusters"
                )));
            }
            self.l1.resize(index as usize + 1, 0);
        }
        let host = self.alloc_clusters(1);
        self.l1[index as usize] = host | OFLAG_COPIED;
        let per = if self.o.extended_l2 { 2 } else { 1 };
        self.l2 = Some(OpenL2 {
            index,
            host,
            entries: vec![0; (self.o.l2_entries() * per) as usize],
        });
        Ok(())
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some(l2) = self.l2.take() {
            self.write_at(&serialize_u64_table(&l2.entries), l2.host)?;
        }
        Ok(())
    }

    /// Sets the L2 entry (and subcluster bitmap) of guest cluster `gc`.
    fn set_entry(&mut self, gc: u64, entry: u64, bitmap: u64) -> Result<()> {
        self.open_l2(gc)?;
        let ext = self.o.extended_l2;
        let i = (gc % self.o.l2_entries()) as usize;
        let l2 = self.l2.as_mut().expect("opened above");
        if ext {
            l2.entries[2 * i] = entry;
            l2.entries[2 * i + 1] = bitmap;
        } else {
            l2.entries[i] = entry;
        }
        Ok(())
    }

    /// Places a compressed cluster, packing it byte by byte after the previous one.
    fn place_compressed(&mut self, len: u64) -> u64 {
        let cs = self.cs();
        let max = max_refcount(self.o.refcount_order);
        let file_end = self.next_cluster * cs;
        if let Some((start, end)) = self.tail {
            let c = start / cs;
            let rc = self.refs.get(c);
            if rc < max && (start + len <= end || end == file_end) {
                self.refs.set(c, rc + 1);
                if start + len > end {
                    // Runs on into fresh clusters at the end of the file.
                    self.next_cluster += (start + len - end).div_ceil(cs);
                }
                self.end_bytes = self.end_bytes.max(start + len);
                let new_end = start + len;
                self.tail = (new_end % cs != 0).then(|| (new_end, new_end.next_multiple_of(cs)));
                return start;
            }
        }
        let start = file_end;
        let n = len.div_ceil(cs);
        self.next_cluster += n;
        self.end_bytes = self.end_bytes.max(start + len);
        let new_end = start + len;
        self.tail = (new_end % cs != 0).then(|| (new_end, new_end.next_multiple_of(cs)));
        start
    }

    /// Gives guest clusters `[from, to)` host clusters without data (preallocation).
    fn preallocate(&mut self, from: u64, to: u64, bitmap: u64) -> Result<()> {
        let cs = self.cs();
        let per_l2 = self.o.l2_entries();
        let mut gc = from;
        while gc < to {
            let n = (to - gc).min(per_l2 - gc % per_l2);
            self.open_l2(gc)?;
            let host = self.alloc_clusters(n);
            for i in 0..n {
                self.set_entry(gc + i, (host + i * cs) | OFLAG_COPIED, bitmap)?;
            }
            self.reserve_space(host, n * cs)?;
            self.last_prealloc = Some((gc + n - 1, host + (n - 1) * cs));
            gc += n;
        }
        Ok(())
    }

    fn reserve_space(&self, host: u64, len: u64) -> Result<()> {
        match self.o.prealloc {
            Prealloc::Falloc => {
                fallocate(&self.file, 0, host, len).map_err(|e| Error::io(&self.path, e))
            }
            Prealloc::Full => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], host + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// With preallocation, guest clusters no run mentioned still get host clusters.
    fn fill_gap(&mut self, to: u64) -> Result<()> {
        if self.o.prealloc != Prealloc::Off && self.seen_to < to {
            let cs = self.cs();
            let (from, to) = (self.seen_to.div_ceil(cs), to.div_ceil(cs));
            // Unallocated subclusters: reads fall through to the backing file.
            self.preallocate(from, to, 0)?;
        }
        self.seen_to = self.seen_to.max(to);
        Ok(())
    }

    /// Makes guest clusters `[from, to)` read as zeros: nothing to do on a fresh image
    /// without backing file (unless preallocating); over a backing file, zero clusters.
    fn write_zeros_clusters(&mut self, from: u64, to: u64) -> Result<()> {
        if self.o.backing_file.is_some() {
            // The backing file has data here that must read as zeros.
            if self.o.extended_l2 {
                if self.o.prealloc != Prealloc::Off {
                    self.preallocate(from, to, ALL_ZERO)?;
                } else {
                    for gc in from..to {
                        self.set_entry(gc, 0, ALL_ZERO)?;
                    }
                }
            } else if self.o.version >= 3 {
                for gc in from..to {
                    self.set_entry(gc, OFLAG_ZERO, 0)?;
                }
            } else {
                // v2 has no zero flag: a real cluster of zeros (a hole in the file).
                self.preallocate(from, to, 0)?;
            }
        } else if self.o.prealloc != Prealloc::Off {
            self.preallocate(from, to, 0)?;
        }
        Ok(())
    }

    fn write_plain(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs();
        let per_l2 = self.o.l2_entries();
        let mut pos = 0usize;
        while pos < data.len() {
            let gc = (offset + pos as u64) / cs;
            let left = (data.len() - pos) as u64;
            let n = left.div_ceil(cs).min(per_l2 - gc % per_l2);
            let bytes = (n * cs).min(left) as usize;
            self.open_l2(gc)?;
            let host = self.alloc_clusters(n);
            self.allocate_ahead
                .before_write(&self.file, host, bytes as u64);
            self.write_at(&data[pos..pos + bytes], host)?;
            for i in 0..n {
                self.set_entry(gc + i, (host + i * cs) | OFLAG_COPIED, ALL_ALLOC)?;
            }
            pos += bytes;
        }
        Ok(())
    }
}

impl ImageWriter for Qcow2Writer {
    fn grain_size(&self) -> u64 {
        self.cs()
    }

    fn encoder(&self) -> Option<Arc<dyn GrainEncoder>> {
        self.encoder.clone().map(|e| e as Arc<dyn GrainEncoder>)
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        let cs = self.cs();
        let end = run.offset + run.data.len() as u64;
        if run.offset % cs != 0 || end > self.size || run.offset < self.seen_to {
            return Err(Error::invalid(format!(
                "qcow2 writer: run at {:#x}+{} is not ascending and cluster aligned",
                run.offset,
                run.data.len()
            )));
        }
        self.fill_gap(run.offset)?;
        match run.encoded {
            None => self.write_plain(run.offset, run.data)?,
            Some(enc) => {
                for (i, grain) in run.data.chunks(cs as usize).enumerate() {
                    let gc = run.offset / cs + i as u64;
                    if crate::zero::is_zero(grain) {
                        // QEMU skips all-zero clusters when compressing, whatever -S
                        // says; over a backing file they must still read as zeros.
                        self.write_zeros_clusters(gc, gc + 1)?;
                        continue;
                    }
                    match enc.get(i).and_then(|e| e.as_ref()) {
                        Some(c) => {
                            // The L2 table is reserved before the data, as QEMU does.
                            self.open_l2(gc)?;
                            let host = self.place_compressed(c.len() as u64);
                            self.write_at(c, host)?;
                            let d = CompressedDescriptor::for_data(host, c.len() as u64, self.o.cluster_bits)
                                .ok_or_else(|| {
                                    Error::invalid(format!(
                                        "qcow2 writer: compressed cluster at {host:#x} ({} bytes) cannot be described",
                                        c.len()
                                    ))
                                })?;
                            self.set_entry(gc, d.encode(self.o.cluster_bits), 0)?;
                        }
                        None => self.write_plain(gc * cs, grain)?,
                    }
                }
            }
        }
        self.seen_to = end;
        Ok(())
    }

    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        self.fill_gap(offset)?;
        let (from, to) = (offset / cs, (offset + len).div_ceil(cs));
        self.write_zeros_clusters(from, to)?;
        self.seen_to = self.seen_to.max(offset + len);
        Ok(())
    }
    fn set_size(&mut self, size: u64) -> Result<()> {
        if !self.size_pending {
            return Err(Error::Format(
                "internal error: qcow2 writer given its size twice".into(),
            ));
        }
        let size = size.next_multiple_of(512);
        if size > MAX_VIRTUAL_SIZE || size < self.seen_to {
            return Err(Error::invalid(format!(
                "qcow2: virtual size {size} is too large or below the data written"
            )));
        }
        let l1_size = self.o.l1_size(size);
        if l1_size * 8 > MAX_QCOW2_L1_BYTES || (self.l1.len() as u64) > l1_size {
            return Err(Error::invalid(format!(
                "qcow2: a {size}-byte disk needs an L1 table of {} bytes (limit {MAX_QCOW2_L1_BYTES}); use larger clusters",
                l1_size * 8
            )));
        }
        self.l1.resize(l1_size as usize, 0);
        self.layout.l1_size = l1_size;
        self.layout.l1_clusters = (l1_size * 8).div_ceil(self.cs());
        self.size = size;
        self.size_pending = false;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.size_pending {
            return Err(Error::Format(
                "internal error: qcow2 writer finished without its size".into(),
            ));
        }
        let cs = self.cs();
        let cb = self.o.cluster_bits;
        let order = self.o.refcount_order;
        self.fill_gap(self.size)?;
        self.flush_l2()?;
        if self.layout.l1_at_end && self.layout.l1_clusters > 0 {
            self.layout.l1_offset = self.alloc_clusters(self.layout.l1_clusters);
        }
        let l = self.layout;
        // The reserved refcount table cluster holds the table when it is big enough;
        // otherwise the table goes at the end of the file and the reserved cluster
        // holds a refcount block. Further blocks go at the end of the file, and a
        // reserved cluster left over is free (refcount 0).
        let per_block = refcount_block_entries(cb, order);
        let per_rt_cluster = cs / 8;
        let reserved = l.rt_clusters;
        let (mut blocks, mut rt_used, mut appended, mut rt_at_end) = (1u64, 1u64, 0u64, false);
        for _ in 0..64 {
            let extra = appended + if rt_at_end { rt_used } else { 0 };
            let need = (self.next_cluster + extra).div_ceil(per_block).max(1);
            let rt_need = need.div_ceil(per_rt_cluster);
            let at_end = rt_need > reserved;
            let spare = if at_end { reserved } else { reserved - rt_need };
            let app = (need - 1).saturating_sub(spare);
            if (need, rt_need, app, at_end) == (blocks, rt_used, appended, rt_at_end) {
                break;
            }
            (blocks, rt_used, appended, rt_at_end) = (need, rt_need, app, at_end);
        }
        if rt_used * cs > MAX_QCOW2_REFTABLE_BYTES {
            return Err(Error::invalid(format!(
                "qcow2: the image needs a refcount table of {} bytes, more than {MAX_QCOW2_REFTABLE_BYTES}; use larger clusters or narrower refcounts",
                rt_used * cs
            )));
        }
        let appended_start = if appended > 0 {
            self.alloc_clusters(appended)
        } else {
            0
        };
        let rt_offset = if rt_at_end {
            self.alloc_clusters(rt_used)
        } else {
            l.rt_offset
        };
        let spare_start = if rt_at_end {
            l.rt_offset
        } else {
            l.rt_offset + rt_used * cs
        };
        let spare_count = if rt_at_end {
            reserved
        } else {
            reserved - rt_used
        };
        let in_spare = blocks - 1 - appended;
        for i in in_spare..spare_count {
            self.refs.set(spare_start / cs + i, 0);
        }
        let total = self.next_cluster;
        let builder = BlockBuilder::new(cb, order, total, &self.refs);
        let mut table = vec![0u64; (rt_used * per_rt_cluster) as usize];
        for b in 0..blocks {
            let off = if b == 0 {
                l.rb0_offset
            } else if b - 1 < in_spare {
                spare_start + (b - 1) * cs
            } else {
                appended_start + (b - 1 - in_spare) * cs
            };
            table[b as usize] = off;
            self.write_at(&builder.block(b)?, off)?;
        }
        self.write_at(&serialize_u64_table(&table), rt_offset)?;
        if l.l1_clusters > 0 {
            // The rest of the L1 clusters stays a hole (zeros).
            self.write_at(&serialize_u64_table(&self.l1), l.l1_offset)?;
        }
        let mut file_len = if self.next_cluster == l.first_free {
            self.end_bytes
        } else {
            self.end_bytes.next_multiple_of(512)
        };
        // With subclusters, QEMU ends the file after the last subcluster of a
        // preallocated, partly used final cluster.
        let tail = self.size % cs;
        if let Some((gc, h)) = self.last_prealloc {
            let last = gc == self.size.saturating_sub(1) / cs;
            if self.o.extended_l2 && tail != 0 && last && h + cs == file_len {
                file_len = h + tail.next_multiple_of(cs / 32);
            }
        }
        self.file
            .set_len(file_len)
            .map_err(|e| Error::io(&self.path, e))?;
        let (mut h, tail) = self.o.header_template(self.size)?;
        h.l1_size = l.l1_size as u32;
        h.l1_table_offset = if l.l1_size > 0 { l.l1_offset } else { 0 };
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = rt_used as u32;
        let mut first = h.serialize();
        first.extend_from_slice(&tail);
        // Header last. No fdatasync, like `qemu-img convert`: the image appears under its
        // name (by rename) only once complete, which is what guards against interruption.
        self.write_at(&first, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let parse = |s: &str| {
            let mut w = WriteOptions::default();
            w.parse_o(s).unwrap();
            Qcow2Options::parse(&w)
        };
        assert!(parse("").is_ok());
        assert!(parse("cluster_size=1000").is_err());
        assert!(parse("cluster_size=4M").is_err());
        assert!(parse("compat=0.10,refcount_bits=1").is_err());
        assert!(parse("compat=0.10,lazy_refcounts=on").is_err());
        assert!(parse("extended_l2=on,cluster_size=4k").is_err());
        assert!(parse("refcount_bits=3").is_err());
        assert!(parse("preallocation=bogus").is_err());
        assert!(parse("bogus=1").is_err());
        assert!(parse("backing_file=x").is_err());
        let o =
            parse("compat=1.1,cluster_size=512,refcount_bits=64,compression_type=zlib").unwrap();
        assert_eq!((o.cluster_bits, o.refcount_order), (9, 6));
        assert_eq!(
            parse("compression_type=zstd").is_ok(),
            cfg!(feature = "zstd")
        );
    }

    #[test]
    fn header_fits_cluster_zero() {
        let mut w = WriteOptions::default();
        w.parse_o("cluster_size=512,backing_file=b.qcow2,backing_fmt=qcow2")
            .unwrap();
        let o = Qcow2Options::parse(&w).unwrap();
        let (h, tail) = o.header_template(1 << 20).unwrap();
        assert_eq!(h.backing_file_offset as usize + 7, 112 + tail.len());
        w.backing_file = Some("x".repeat(1000));
        assert!(Qcow2Options::parse(&w)
            .unwrap()
            .header_template(1 << 20)
            .is_err());
    }

    #[test]
    fn zlib_output_is_raw_deflate_with_small_window() {
        let e = ClusterEncoder::new(65536, CompressionType::Zlib);
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 300) as u8).collect();
        let c = e.compress(&data).unwrap().unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = Vec::with_capacity(65536);
        d.decompress_vec(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, data);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(e.compress(&noise).unwrap().is_none());
        #[cfg(feature = "zstd")]
        {
            let z = ClusterEncoder::new(65536, CompressionType::Zstd);
            let c = z.compress(&data).unwrap().unwrap();
            assert_eq!(zstd::bulk::decompress(&c, 65536).unwrap(), data);
        }
    }
}
