//! qcow2 on-disk structures: the header, header extensions, L1/L2 entries, compressed
//! cluster descriptors, extended-L2 subcluster bitmaps and refcount-block entries.
//!
//! Plain data with `parse` / `serialize` (or `decode` / `encode`); no file access and no
//! policy beyond what one structure can check about itself. The reader and the writer
//! build on these. All integers are big-endian.

use bitflags::bitflags;

use crate::error::{Error, Result};

const FMT: &str = "qcow2";

/// The four magic bytes every qcow2 file starts with (`QFI\xfb`).
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a version 2 header (also the part common to v2 and v3).
pub const V2_HEADER_LEN: u32 = 72;

/// Smallest valid version 3 `header_length` (no compression type byte).
pub const V3_MIN_HEADER_LEN: u32 = 104;

/// The `header_length` QEMU writes for version 3: compression type byte plus padding.
pub const V3_HEADER_LEN: u32 = 112;

/// Smallest cluster size, as `cluster_bits` (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;

/// Largest cluster size, as `cluster_bits` (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Smallest cluster size with extended L2 entries, as `cluster_bits` (16 KiB).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

/// Largest `refcount_order` (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;

/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;

/// `crypt_method` value: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method` value: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` value: LUKS.
pub const CRYPT_LUKS: u32 = 2;

bitflags! {
    /// `incompatible_features`: an unknown bit means the image must not be opened.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IncompatibleFeatures: u64 {
        /// Refcounts may be stale (lazy refcounts were in use when the image was not
        /// closed cleanly).
        const DIRTY = 1 << 0;
        /// Metadata may be corrupt; must not be written to.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// `compression_type` is not zlib.
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries are 128 bits wide with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags! {
    /// `compatible_features`: unknown bits may be ignored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CompatibleFeatures: u64 {
        /// Refcount updates may be postponed (the dirty bit then guards them).
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// `autoclear_features`: unknown bits must be cleared by a writer.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AutoclearFeatures: u64 {
        /// The bitmaps extension is consistent with the image.
        const BITMAPS = 1 << 0;
        /// The external data file is a valid raw image by itself.
        const DATA_FILE_RAW = 1 << 1;
    }
}

/// How compressed clusters are compressed (the whole image uses one type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951) without zlib header or trailer; qemu calls it `zlib`.
    #[default]
    Zlib,
    /// One or more zstd frames.
    Zstd,
}

impl CompressionType {
    /// The header byte for this type.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The type for a header byte, if known.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// qemu-img's name (`zlib` or `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The qcow2 header (versions 2 and 3).
///
/// Feature fields keep every bit, known or not, so that `serialize` writes back what
/// `parse` read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// File offset of the backing file name; 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES-CBC, 2 LUKS.
    pub crypt_method: u32,
    /// Number of active L1 entries.
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible_features: IncompatibleFeatures,
    /// Compatible feature bits (v3; 0 for v2).
    pub compatible_features: CompatibleFeatures,
    /// Autoclear feature bits (v3; 0 for v2).
    pub autoclear_features: AutoclearFeatures,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Raw compression type byte (0 when the field is absent).
    pub compression_type: u8,
    /// Header bytes after byte 105 up to `header_length` (padding and fields unknown to
    /// this version), kept so that a rewrite preserves them.
    pub trailing: Vec<u8>,
}

impl Header {
    /// A version 3 header with QEMU's defaults for the given geometry; tables at 0.
    pub fn new_v3(cluster_bits: u32, size: u64) -> Self {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: CRYPT_NONE,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            trailing: vec![0; (V3_HEADER_LEN - 105) as usize],
        }
    }

    /// How many bytes `parse` needs, judged from the first 104 bytes (or fewer for v2).
    ///
    /// Returns 72 for v2 (or when `prefix` is too short to tell), `header_length` for v3.
    pub fn needed_len(prefix: &[u8]) -> usize {
        if prefix.len() >= 104 && be32(prefix, 4) >= 3 {
            (be32(prefix, 100) as usize).max(V3_MIN_HEADER_LEN as usize)
        } else {
            V2_HEADER_LEN as usize
        }
    }

    /// Parses and checks a header from the start of the file.
    ///
    /// Checks what the header alone can tell: magic, version, cluster size, header length,
    /// refcount order, known compression type, feature-bit consistency. Checks against the
    /// file size (table offsets) are the reader's job.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let bad = |off: u64, why: String| Error::corrupt(FMT, "header", off, why);
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(bad(
                0,
                format!("file holds {} bytes, the header needs 72", buf.len()),
            ));
        }
        if buf[0..4] != MAGIC {
            return Err(bad(0, "bad magic, not a qcow2 image".into()));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(FMT, format!("version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(
                20,
                format!(
                    "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
                ),
            ));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            trailing: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(bad(
                    72,
                    format!(
                        "file holds {} bytes, a version 3 header needs 104",
                        buf.len()
                    ),
                ));
            }
            h.incompatible_features = IncompatibleFeatures::from_bits_retain(be64(buf, 72));
            h.compatible_features = CompatibleFeatures::from_bits_retain(be64(buf, 80));
            h.autoclear_features = AutoclearFeatures::from_bits_retain(be64(buf, 88));
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length % 8 != 0 {
                return Err(bad(
                    100,
                    format!(
                        "header_length {} is below 104 or not a multiple of 8",
                        h.header_length
                    ),
                ));
            }
            if h.header_length > 1 << cluster_bits {
                return Err(bad(
                    100,
                    format!(
                        "header_length {} exceeds the cluster size {}",
                        h.header_length,
                        1u64 << cluster_bits
                    ),
                ));
            }
            let hl = h.header_length as usize;
            if buf.len() < hl {
                return Err(bad(
                    104,
                    format!("file holds {} bytes, header_length is {hl}", buf.len()),
                ));
            }
            if hl > 104 {
                h.compression_type = buf[104];
                h.trailing = buf[105..hl].to_vec();
            }
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(bad(
                96,
                format!(
                    "refcount_order {} above {MAX_REFCOUNT_ORDER}",
                    h.refcount_order
                ),
            ));
        }
        if h.backing_file_size > MAX_BACKING_FILE_NAME {
            return Err(bad(
                16,
                format!(
                    "backing file name length {} above {MAX_BACKING_FILE_NAME}",
                    h.backing_file_size
                ),
            ));
        }
        let has_ct_bit = h
            .incompatible_features
            .contains(IncompatibleFeatures::COMPRESSION_TYPE);
        if has_ct_bit != (h.compression_type != 0) {
            return Err(bad(
                104,
                format!(
                    "compression type {} does not match incompatible feature bit 3 ({})",
                    h.compression_type,
                    if has_ct_bit { "set" } else { "clear" }
                ),
            ));
        }
        if h.extended_l2() && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(
                20,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, not {}",
                    1u64 << cluster_bits
                ),
            ));
        }
        Ok(h)
    }

    /// The header bytes: 72 for v2, `header_length` for v3.
    pub fn serialize(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            (self.header_length as usize).max(V3_MIN_HEADER_LEN as usize)
        } else {
            V2_HEADER_LEN as usize
        };
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.bits().to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.bits().to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.bits().to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&(len as u32).to_be_bytes());
            if len > 104 {
                b[104] = self.compression_type;
                let n = self.trailing.len().min(len - 105);
                b[105..105 + n].copy_from_slice(&self.trailing[..n]);
            }
        }
        b
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Width of a refcount entry in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// True when L2 entries are 128 bits wide (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// True when guest data lives in an external data file.
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// Size of one L2 entry in bytes (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes covered by one L2 table (one L1 entry).
    pub fn bytes_per_l1_entry(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// Smallest `l1_size` that covers `size` bytes with this geometry.
    pub fn min_l1_size(&self) -> u64 {
        self.size.div_ceil(self.bytes_per_l1_entry())
    }

    /// Incompatible bits this implementation does not know.
    pub fn unknown_incompatible(&self) -> u64 {
        self.incompatible_features.bits() & !IncompatibleFeatures::all().bits()
    }

    /// The compression type, if the byte is a known one.
    pub fn compression(&self) -> Option<CompressionType> {
        CompressionType::from_byte(self.compression_type)
    }

    /// Where header extensions start (right after the header).
    pub fn extensions_offset(&self) -> u64 {
        if self.version >= 3 {
            self.header_length as u64
        } else {
            V2_HEADER_LEN as u64
        }
    }

    /// Where the extension area ends, as QEMU reads it: at the backing file name when
    /// there is one (so a name right after the header leaves no room for extensions,
    /// and needs no end marker), else at the end of the first cluster; never past
    /// `first_len`, the bytes of the first cluster the file holds.
    pub fn extensions_end(&self, first_len: u64) -> u64 {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        };
        end.min(first_len)
    }
}

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Header extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full-disk-encryption header pointer.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_BE77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Which feature field a feature-table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// A type byte this version does not know.
    Other(u8),
}

impl FeatureKind {
    fn from_byte(b: u8) -> Self {
        match b {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            o => FeatureKind::Other(o),
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(o) => o,
        }
    }
}

/// One entry of the feature name table (48 bytes on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The feature field.
    pub kind: FeatureKind,
    /// Bit number in that field.
    pub bit: u8,
    /// Human-readable name (at most 46 bytes, NUL-padded on disk).
    pub name: String,
}

/// Size of one feature-table entry.
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// The feature name table QEMU writes (8 entries), for writers that want to match it.
pub fn default_feature_table() -> Vec<FeatureName> {
    let e = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        e(FeatureKind::Incompatible, 0, "dirty bit"),
        e(FeatureKind::Incompatible, 1, "corrupt bit"),
        e(FeatureKind::Incompatible, 2, "external data file"),
        e(FeatureKind::Incompatible, 3, "compression type"),
        e(FeatureKind::Incompatible, 4, "extended L2 entries"),
        e(FeatureKind::Compatible, 0, "lazy refcounts"),
        e(FeatureKind::Autoclear, 0, "bitmaps"),
        e(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

/// The bitmaps extension (the directory itself is not parsed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// File offset of the bitmap directory.
    pub directory_offset: u64,
}

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Backing file format name (`qcow2`, `raw`…).
    BackingFormat(String),
    /// Feature name table.
    FeatureTable(Vec<FeatureName>),
    /// Bitmaps.
    Bitmaps(BitmapsExtension),
    /// Where the LUKS header lives: `(offset, length)`.
    CryptoHeader {
        /// File offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// External data file name.
    DataFile(String),
    /// An extension this version does not know; kept verbatim.
    Unknown {
        /// Extension type.
        kind: u32,
        /// Its data (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension's type number.
    pub fn kind(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureTable(_) => EXT_FEATURE_TABLE,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::CryptoHeader { .. } => EXT_CRYPTO_HEADER,
            HeaderExtension::DataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { kind, .. } => *kind,
        }
    }

    fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::DataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureTable(t) => {
                let mut v = Vec::with_capacity(t.len() * FEATURE_NAME_ENTRY_LEN);
                for f in t {
                    let mut e = [0u8; FEATURE_NAME_ENTRY_LEN];
                    e[0] = f.kind.to_byte();
                    e[1] = f.bit;
                    let n = f.name.len().min(46);
                    e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                    v.extend_from_slice(&e);
                }
                v
            }
            HeaderExtension::Bitmaps(b) => {
                let mut v = Vec::with_capacity(24);
                v.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                v.extend_from_slice(&b.reserved.to_be_bytes());
                v.extend_from_slice(&b.directory_size.to_be_bytes());
                v.extend_from_slice(&b.directory_offset.to_be_bytes());
                v
            }
            HeaderExtension::CryptoHeader { offset, length } => {
                let mut v = Vec::with_capacity(16);
                v.extend_from_slice(&offset.to_be_bytes());
                v.extend_from_slice(&length.to_be_bytes());
                v
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }

    fn parse_one(kind: u32, data: &[u8], offset: u64) -> Result<Self> {
        let bad = |why: String| Error::corrupt(FMT, "header extension", offset, why);
        Ok(match kind {
            EXT_BACKING_FORMAT => {
                HeaderExtension::BackingFormat(String::from_utf8_lossy(data).into_owned())
            }
            EXT_DATA_FILE => HeaderExtension::DataFile(String::from_utf8_lossy(data).into_owned()),
            EXT_FEATURE_TABLE => {
                if data.len() % FEATURE_NAME_ENTRY_LEN != 0 {
                    return Err(bad(format!(
                        "feature table length {} is not a multiple of 48",
                        data.len()
                    )));
                }
                let t = data
                    .chunks_exact(FEATURE_NAME_ENTRY_LEN)
                    .map(|e| {
                        let name = &e[2..];
                        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        FeatureName {
                            kind: FeatureKind::from_byte(e[0]),
                            bit: e[1],
                            name: String::from_utf8_lossy(&name[..end]).into_owned(),
                        }
                    })
                    .collect();
                HeaderExtension::FeatureTable(t)
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(bad(format!(
                        "bitmaps extension is {} bytes, not 24",
                        data.len()
                    )));
                }
                HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: be32(data, 0),
                    reserved: be32(data, 4),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                })
            }
            EXT_CRYPTO_HEADER => {
                if data.len() != 16 {
                    return Err(bad(format!(
                        "encryption header pointer is {} bytes, not 16",
                        data.len()
                    )));
                }
                HeaderExtension::CryptoHeader {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                }
            }
            kind => HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            },
        })
    }
}

/// Parses the extension area of `first_cluster` (the file's first cluster, or as much
/// of it as the file holds), starting at `start`, up to the end marker.
///
/// Every length is bounded by `first_cluster`; a missing end marker, an extension that
/// runs past the buffer, or a type seen twice is an error.
pub fn parse_extensions(first_cluster: &[u8], start: u64) -> Result<Vec<HeaderExtension>> {
    let end = first_cluster.len() as u64;
    let mut pos = start;
    let mut out: Vec<HeaderExtension> = Vec::new();
    loop {
        // QEMU accepts an area that fills its space exactly without an end marker.
        if pos == end {
            return Ok(out);
        }
        if pos + 8 > end {
            return Err(Error::corrupt(
                FMT,
                "header extension",
                pos,
                format!("extension area runs past its end ({end:#x}: the backing file name or the end of the first cluster) without an end marker"),
            ));
        }
        let p = pos as usize;
        let kind = be32(first_cluster, p);
        let len = be32(first_cluster, p + 4) as u64;
        if kind == EXT_END {
            return Ok(out);
        }
        let data_end = pos + 8 + len;
        if data_end > end {
            return Err(Error::corrupt(
                FMT,
                "header extension",
                pos,
                format!("extension {kind:#x} of {len} bytes runs past the end of the extension area ({end:#x})"),
            ));
        }
        if out.iter().any(|e| e.kind() == kind) {
            return Err(Error::corrupt(
                FMT,
                "header extension",
                pos,
                format!("extension {kind:#x} appears twice"),
            ));
        }
        let data = &first_cluster[p + 8..data_end as usize];
        out.push(HeaderExtension::parse_one(kind, data, pos)?);
        pos = (data_end + 7) & !7;
    }
}

/// Serializes extensions (each padded to 8 bytes) followed by the end marker.
pub fn serialize_extensions(exts: &[HeaderExtension]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in exts {
        let data = e.data();
        v.extend_from_slice(&e.kind().to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(&data);
        v.resize(v.len().next_multiple_of(8), 0);
    }
    v.extend_from_slice(&[0u8; 8]);
    v
}

/// Most bitmaps an image may hold (QEMU's limit).
pub const MAX_BITMAPS: u32 = 65535;

/// Largest bitmap directory in bytes (QEMU's limit).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;

/// Fixed part of a bitmap directory entry, before extra data and name.
pub const BITMAP_ENTRY_FIXED_LEN: usize = 24;

/// Bitmap flag: the bitmap was in use and may be inconsistent.
pub const BITMAP_FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: the bitmap tracks writes automatically.
pub const BITMAP_FLAG_AUTO: u32 = 1 << 1;
/// Bitmap flag: extra data may be ignored by readers that do not know it.
pub const BITMAP_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;

/// One entry of the persistent-bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// File offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flag bits (`BITMAP_FLAG_*`).
    pub flags: u32,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Extra data.
    pub extra: Vec<u8>,
    /// Bitmap name.
    pub name: String,
}

impl BitmapDirectoryEntry {
    /// On-disk length (padded to 8) of the entry whose fixed part is `fixed`.
    pub fn total_len(fixed: &[u8]) -> u64 {
        let name = u16::from_be_bytes([fixed[18], fixed[19]]) as u64;
        let extra = be32(fixed, 20) as u64;
        (BITMAP_ENTRY_FIXED_LEN as u64 + extra + name).next_multiple_of(8)
    }

    /// Parses the entry at the start of `buf`; `offset` is its file offset (for errors).
    pub fn parse(buf: &[u8], offset: u64) -> Result<Self> {
        if buf.len() < BITMAP_ENTRY_FIXED_LEN || (buf.len() as u64) < Self::total_len(buf) {
            return Err(Error::corrupt(
                FMT,
                "bitmap directory entry",
                offset,
                "entry runs past the end of the bitmap directory",
            ));
        }
        let name_len = u16::from_be_bytes([buf[18], buf[19]]) as usize;
        let extra_end = BITMAP_ENTRY_FIXED_LEN + be32(buf, 20) as usize;
        Ok(BitmapDirectoryEntry {
            table_offset: be64(buf, 0),
            table_size: be32(buf, 8),
            flags: be32(buf, 12),
            kind: buf[16],
            granularity_bits: buf[17],
            extra: buf[BITMAP_ENTRY_FIXED_LEN..extra_end].to_vec(),
            name: String::from_utf8_lossy(&buf[extra_end..extra_end + name_len]).into_owned(),
        })
    }

    /// The entry's bytes, padded to a multiple of 8.
    pub fn serialize(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(BITMAP_ENTRY_FIXED_LEN + self.extra.len() + self.name.len() + 8);
        v.extend_from_slice(&self.table_offset.to_be_bytes());
        v.extend_from_slice(&self.table_size.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.push(self.kind);
        v.push(self.granularity_bits);
        v.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.extra);
        v.extend_from_slice(self.name.as_bytes());
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }
}

/// Parses `count` bitmap directory entries from `dir` (the whole directory, read from
/// file offset `offset`).
pub fn parse_bitmap_directory(
    dir: &[u8],
    count: u32,
    offset: u64,
) -> Result<Vec<BitmapDirectoryEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let at = offset + pos as u64;
        let rest = &dir[pos.min(dir.len())..];
        if rest.len() < BITMAP_ENTRY_FIXED_LEN {
            return Err(Error::corrupt(
                FMT,
                "bitmap directory entry",
                at,
                "entry runs past the end of the bitmap directory",
            ));
        }
        let e = BitmapDirectoryEntry::parse(rest, at)?;
        pos += BitmapDirectoryEntry::total_len(rest) as usize;
        out.push(e);
    }
    Ok(out)
}

/// Bit 63 of L1 and L2 entries: the refcount is exactly 1 (writes need no COW).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3): the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 entries, standard L2 entries and refcount-table
/// entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0..=8 and 56..=62).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount-table entry (0..=8).
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;

/// An L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at the L2 table at `l2_offset`, with the COPIED flag as given.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        L1Entry((l2_offset & OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 })
    }

    /// File offset of the L2 table, or `None` when the range is unallocated.
    pub fn l2_offset(self) -> Option<u64> {
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(o),
        }
    }

    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// Reserved bits that are set (should be 0).
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// A compressed cluster's location: where its bytes start and how many may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    /// File offset of the first compressed byte (not aligned).
    pub host_offset: u64,
    /// Number of 512-byte sectors the data touches (1..=cluster_size/256).
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bit position of the sector-count field (QEMU's `csize_shift`).
    pub fn csize_shift(cluster_bits: u32) -> u32 {
        62 - (cluster_bits - 8)
    }

    /// Decodes the low 62 bits of a compressed L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = Self::csize_shift(cluster_bits);
        let host_offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        CompressedDescriptor {
            host_offset,
            sectors,
        }
    }

    /// The descriptor for `len` compressed bytes at `host_offset`, or `None` when the
    /// offset or the length does not fit the fields for this cluster size.
    pub fn for_data(host_offset: u64, len: u64, cluster_bits: u32) -> Option<Self> {
        if len == 0 {
            return None;
        }
        let x = Self::csize_shift(cluster_bits);
        if host_offset >= 1u64 << x {
            return None;
        }
        let sectors = ((host_offset + len - 1) >> 9) - (host_offset >> 9) + 1;
        if sectors > 1u64 << (cluster_bits - 8) {
            return None;
        }
        Some(CompressedDescriptor {
            host_offset,
            sectors,
        })
    }

    /// The L2 entry (compressed flag set, COPIED clear).
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let x = Self::csize_shift(cluster_bits);
        OFLAG_COMPRESSED | ((self.sectors - 1) << x) | self.host_offset
    }

    /// Bytes to read from `host_offset`: an upper bound on the compressed length.
    pub fn max_len(self) -> u64 {
        self.sectors * 512 - (self.host_offset & 511)
    }
}

/// What a (first word of an) L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterKind {
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros (zero flag); `host_offset` is a preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster that a later write may use.
        host_offset: Option<u64>,
    },
    /// Stored plainly at `host_offset` (in the data file when there is one).
    Normal {
        /// Host offset of the cluster.
        host_offset: u64,
    },
    /// Stored compressed.
    Compressed(CompressedDescriptor),
}

/// The first (or only) 64-bit word of an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// An unallocated entry.
    pub const UNALLOCATED: L2Entry = L2Entry(0);

    /// A normal cluster at `host_offset`.
    pub fn normal(host_offset: u64, copied: bool) -> Self {
        L2Entry((host_offset & OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 })
    }

    /// A zero cluster (v3, standard L2 only), optionally with a preallocated cluster.
    pub fn zero(preallocated: Option<u64>) -> Self {
        match preallocated {
            Some(o) => L2Entry((o & OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO),
            None => L2Entry(OFLAG_ZERO),
        }
    }

    /// A compressed cluster.
    pub fn compressed(d: CompressedDescriptor, cluster_bits: u32) -> Self {
        L2Entry(d.encode(cluster_bits))
    }

    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }

    /// True when bit 62 is set.
    pub fn is_compressed(self) -> bool {
        self.0 & OFLAG_COMPRESSED != 0
    }

    /// Reserved bits set in a standard (not compressed) entry.
    pub fn reserved_bits(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.0 & L2_RESERVED_MASK
        }
    }

    /// Decodes the entry.
    ///
    /// `extended_l2`: bit 0 is not a zero flag then. `external_data`: offset 0 with the
    /// COPIED flag is a normal cluster (guest cluster 0 of the data file).
    pub fn decode(self, cluster_bits: u32, extended_l2: bool, external_data: bool) -> ClusterKind {
        if self.is_compressed() {
            return ClusterKind::Compressed(CompressedDescriptor::decode(
                self.0 & !(OFLAG_COMPRESSED | OFLAG_COPIED),
                cluster_bits,
            ));
        }
        let off = self.0 & OFFSET_MASK;
        if !extended_l2 && self.0 & OFLAG_ZERO != 0 {
            return ClusterKind::Zero {
                host_offset: (off != 0).then_some(off),
            };
        }
        if off == 0 {
            if external_data && self.copied() {
                ClusterKind::Normal { host_offset: 0 }
            } else {
                ClusterKind::Unallocated
            }
        } else {
            ClusterKind::Normal { host_offset: off }
        }
    }
}

/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What one subcluster is, per the extended-L2 bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubclusterState {
    /// Allocated: data at the cluster's host offset plus the subcluster's offset.
    Allocated,
    /// Reads as zeros.
    Zero,
    /// Falls through to the backing file (or zeros).
    Unallocated,
}

/// The second 64-bit word of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Builds a bitmap from "allocated" and "reads as zero" masks (bit n = subcluster n).
    pub fn new(allocated: u32, zero: u32) -> Self {
        SubclusterBitmap(allocated as u64 | ((zero as u64) << 32))
    }

    /// Mask of allocated subclusters.
    pub fn allocated(self) -> u32 {
        self.0 as u32
    }

    /// Mask of zero subclusters.
    pub fn zero(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Subclusters marked both allocated and zero (invalid when non-zero).
    pub fn conflicts(self) -> u32 {
        self.allocated() & self.zero()
    }

    /// State of subcluster `i` (0..32).
    pub fn state(self, i: u32) -> SubclusterState {
        let bit = 1u32 << (i % SUBCLUSTERS);
        if self.allocated() & bit != 0 {
            SubclusterState::Allocated
        } else if self.zero() & bit != 0 {
            SubclusterState::Zero
        } else {
            SubclusterState::Unallocated
        }
    }

    /// How many subclusters from `i` on share the state of subcluster `i`.
    pub fn run_len(self, i: u32) -> u32 {
        let s = self.state(i);
        let mut n = 1;
        while i + n < SUBCLUSTERS && self.state(i + n) == s {
            n += 1;
        }
        n
    }
}

/// Decodes a table of big-endian u64 entries (L1, L2 without extension, refcount table).
pub fn parse_u64_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Encodes a table of u64 entries big-endian.
pub fn serialize_u64_table(entries: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        v.extend_from_slice(&e.to_be_bytes());
    }
    v
}

/// Refcount entries per refcount block for the given geometry.
pub fn refcount_block_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// Largest refcount value with `refcount_order`.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << refcount_order)) - 1
    }
}

/// Reads refcount entry `index` of a refcount block with entries `1 << order` bits wide.
///
/// Sub-byte entries are packed from the least significant bit; wider ones are
/// big-endian. `index` must be inside the block.
pub fn refcount_get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        ((byte >> (bit % 8)) as u64) & ((1u64 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let start = index as usize * n;
        block[start..start + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64)
    }
}

/// Writes refcount entry `index`; fails when `value` does not fit `1 << order` bits.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> Result<()> {
    if value > max_refcount(order) {
        return Err(Error::invalid(format!(
            "qcow2: refcount {value} does not fit in {} bits",
            1u32 << order
        )));
    }
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        let shift = bit % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        let b = &mut block[(bit / 8) as usize];
        *b = (*b & !mask) | (((value << shift) as u8) & mask);
    } else {
        let n = (bits / 8) as usize;
        let start = index as usize * n;
        let bytes = value.to_be_bytes();
        block[start..start + n].copy_from_slice(&bytes[8 - n..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_v3_roundtrip() {
        let mut h = Header::new_v3(16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.compatible_features = CompatibleFeatures::LAZY_REFCOUNTS;
        h.incompatible_features = IncompatibleFeatures::COMPRESSION_TYPE;
        h.compression_type = 1;
        let b = h.serialize();
        assert_eq!(b.len(), 112);
        assert_eq!(&b[0..4], b"QFI\xfb");
        assert_eq!(Header::needed_len(&b), 112);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.compression(), Some(CompressionType::Zstd));
        assert_eq!(p.cluster_size(), 65536);
        assert_eq!(p.l2_entries(), 8192);
        assert_eq!(p.min_l1_size(), 2);
    }

    #[test]
    fn header_v2_roundtrip() {
        let mut h = Header::new_v3(12, 12345);
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.trailing.clear();
        let b = h.serialize();
        assert_eq!(b.len(), 72);
        let p = Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.refcount_bits(), 16);
    }

    #[test]
    fn header_unknown_bits_are_kept() {
        let mut h = Header::new_v3(16, 1 << 20);
        h.incompatible_features = IncompatibleFeatures::from_bits_retain(1 << 40);
        h.autoclear_features = AutoclearFeatures::from_bits_retain(1 << 7);
        let p = Header::parse(&h.serialize()).unwrap();
        assert_eq!(p.unknown_incompatible(), 1 << 40);
        assert_eq!(p.autoclear_features.bits(), 1 << 7);
    }

    #[test]
    fn header_rejects_nonsense() {
        let h = Header::new_v3(16, 1 << 20);
        let good = h.serialize();
        assert!(Header::parse(&good[..50]).is_err());
        let mut b = good.clone();
        b[0] = b'X';
        assert!(Header::parse(&b).is_err());
        let mut b = good.clone();
        b[7] = 4;
        assert!(matches!(Header::parse(&b), Err(Error::Unsupported { .. })));
        let mut b = good.clone();
        b[23] = 30;
        assert!(Header::parse(&b).is_err());
        let mut b = good.clone();
        b[103] = 100; // header_length not a multiple of 8
        assert!(Header::parse(&b).is_err());
        let mut b = good.clone();
        b[99] = 7; // refcount_order
        assert!(Header::parse(&b).is_err());
        let mut b = good.clone();
        b[104] = 1; // zstd without the incompatible bit
        assert!(Header::parse(&b).is_err());
        let mut b = good;
        b[79] = IncompatibleFeatures::EXTENDED_L2.bits() as u8;
        b[23] = 12; // extended L2 with 4 KiB clusters
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn extensions_roundtrip() {
        let exts = vec![
            HeaderExtension::BackingFormat("qcow2".into()),
            HeaderExtension::FeatureTable(default_feature_table()),
            HeaderExtension::DataFile("disk.data".into()),
            HeaderExtension::CryptoHeader {
                offset: 0x10000,
                length: 0x200,
            },
            HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: 1,
                reserved: 0,
                directory_size: 64,
                directory_offset: 0x50000,
            }),
            HeaderExtension::Unknown {
                kind: 0x1234,
                data: vec![1, 2, 3],
            },
        ];
        let b = serialize_extensions(&exts);
        assert_eq!(b.len() % 8, 0);
        let mut cluster = vec![0u8; 4096];
        cluster[112..112 + b.len()].copy_from_slice(&b);
        assert_eq!(parse_extensions(&cluster, 112).unwrap(), exts);
    }

    #[test]
    fn qemu_layout_of_plain_image() {
        // Feature table of 8 entries after a 112-byte header: end marker at 0x1f8.
        let b = serialize_extensions(&[HeaderExtension::FeatureTable(default_feature_table())]);
        assert_eq!(112 + b.len() - 8, 0x1f8);
    }

    #[test]
    fn extensions_reject_overruns() {
        let mut c = vec![0u8; 512];
        c[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        c[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_extensions(&c, 104).is_err());
        // No end marker: every slot holds a tiny unknown extension. Filling the area
        // exactly is accepted (as QEMU does); a partial extension header at the end is not.
        let mut c = vec![0u8; 260];
        for (i, p) in (104..256).step_by(8).enumerate() {
            c[p..p + 4].copy_from_slice(&(0x100 + i as u32).to_be_bytes());
        }
        assert_eq!(parse_extensions(&c[..256], 104).unwrap().len(), 19);
        assert!(parse_extensions(&c, 104).is_err());
        // The same type twice.
        let twice = serialize_extensions(&[
            HeaderExtension::DataFile("a".into()),
            HeaderExtension::DataFile("b".into()),
        ]);
        let mut c = vec![0u8; 512];
        c[104..104 + twice.len()].copy_from_slice(&twice);
        assert!(parse_extensions(&c, 104).is_err());
    }

    #[test]
    fn l1_and_l2_entries() {
        let e = L1Entry(0x8000_0000_0004_0000);
        assert_eq!(e.l2_offset(), Some(0x40000));
        assert!(e.copied());
        assert_eq!(L1Entry::new(0x40000, true), e);
        assert_eq!(L1Entry(0).l2_offset(), None);

        let n = L2Entry(0x8000_0000_0005_0000);
        assert_eq!(
            n.decode(16, false, false),
            ClusterKind::Normal {
                host_offset: 0x50000
            }
        );
        assert_eq!(L2Entry::normal(0x50000, true), n);
        assert_eq!(
            L2Entry(1).decode(16, false, false),
            ClusterKind::Zero { host_offset: None }
        );
        assert_eq!(
            L2Entry::zero(Some(0x60000)).decode(16, false, false),
            ClusterKind::Zero {
                host_offset: Some(0x60000)
            }
        );
        // Bit 0 is not a zero flag with extended L2.
        assert_eq!(L2Entry(1).decode(16, true, false), ClusterKind::Unallocated);
        assert_eq!(
            L2Entry(OFLAG_COPIED).decode(16, false, true),
            ClusterKind::Normal { host_offset: 0 }
        );
        assert_eq!(
            L2Entry(OFLAG_COPIED).decode(16, false, false),
            ClusterKind::Unallocated
        );
    }

    #[test]
    fn compressed_descriptor_math() {
        // 64 KiB clusters: sector count in bits 54..=61.
        assert_eq!(CompressedDescriptor::csize_shift(16), 54);
        let d = CompressedDescriptor::for_data(0x450078, 0x78, 16).unwrap();
        assert_eq!(d.sectors, 1);
        assert_eq!(d.max_len(), 512 - 0x78);
        let e = L2Entry::compressed(d, 16);
        assert!(e.is_compressed() && !e.copied());
        assert_eq!(e.decode(16, false, false), ClusterKind::Compressed(d));
        // Crossing a sector boundary needs two sectors.
        let d = CompressedDescriptor::for_data(0x1f0, 0x20, 16).unwrap();
        assert_eq!(d.sectors, 2);
        assert_eq!(d.max_len(), 1024 - 0x1f0);
        // Every cluster size round-trips its largest sector count.
        for bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let len = 1u64 << bits;
            let d = CompressedDescriptor::for_data(0x1234_5600, len, bits).unwrap();
            let back = CompressedDescriptor::decode(d.encode(bits) & !OFLAG_COMPRESSED, bits);
            assert_eq!(back, d);
            assert!(d.max_len() >= len);
        }
        // Too long for the field.
        assert!(CompressedDescriptor::for_data(0, (1 << 16) * 2 + 512, 16).is_none());
    }

    #[test]
    fn subcluster_bitmap() {
        let b = SubclusterBitmap::new(0x0000_000f, 0x0000_00f0);
        assert_eq!(b.state(0), SubclusterState::Allocated);
        assert_eq!(b.state(4), SubclusterState::Zero);
        assert_eq!(b.state(8), SubclusterState::Unallocated);
        assert_eq!(b.run_len(0), 4);
        assert_eq!(b.run_len(4), 4);
        assert_eq!(b.run_len(8), 24);
        assert_eq!(b.conflicts(), 0);
        assert_eq!(SubclusterBitmap::new(1, 1).conflicts(), 1);
    }

    #[test]
    fn refcounts_every_width() {
        for order in 0..=MAX_REFCOUNT_ORDER {
            let n = refcount_block_entries(9, order);
            let mut block = vec![0u8; 512];
            let max = max_refcount(order);
            for i in 0..n {
                refcount_set(&mut block, i, order, (i * 7 + 1) & max).unwrap();
            }
            for i in 0..n {
                assert_eq!(
                    refcount_get(&block, i, order),
                    (i * 7 + 1) & max,
                    "order {order}"
                );
            }
            if order < 6 {
                assert!(refcount_set(&mut block, 0, order, max + 1).is_err());
            }
        }
        // Order 0: entry i is bit i%8 of byte i/8, least significant first.
        let mut b = [0u8; 2];
        refcount_set(&mut b, 9, 0, 1).unwrap();
        assert_eq!(b, [0, 2]);
        // Order 4: big-endian u16.
        let mut b = [0u8; 4];
        refcount_set(&mut b, 1, 4, 0x1234).unwrap();
        assert_eq!(b, [0, 0, 0x12, 0x34]);
    }

    #[test]
    fn bitmap_directory() {
        let a = BitmapDirectoryEntry {
            table_offset: 0x70000,
            table_size: 1,
            flags: BITMAP_FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            extra: vec![],
            name: "b0".into(),
        };
        let b = BitmapDirectoryEntry {
            name: "other".into(),
            flags: 0,
            extra: vec![1, 2, 3, 4],
            ..a.clone()
        };
        let mut dir = a.serialize();
        dir.extend_from_slice(&b.serialize());
        assert_eq!(
            parse_bitmap_directory(&dir, 2, 0x80000).unwrap(),
            vec![a, b]
        );
        assert!(parse_bitmap_directory(&dir, 3, 0x80000).is_err());
        assert!(parse_bitmap_directory(&dir[..30], 1, 0).is_err());
    }

    #[test]
    fn u64_tables() {
        let t = vec![1u64, 0x8000_0000_0004_0000];
        assert_eq!(parse_u64_table(&serialize_u64_table(&t)), t);
    }
}
