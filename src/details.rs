//! What `info` shows under "Format specific information", typed: one struct per format,
//! serialised in qemu-img's shape (`{"type": "qcow2", "data": {...}}`, qemu's key names
//! and order) for the command line's JSON.

use serde::Serialize;

/// Format-specific details of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
#[non_exhaustive]
pub enum FormatDetails {
    /// A qcow2 image.
    Qcow2(Qcow2Details),
    /// A VMDK image.
    Vmdk(VmdkDetails),
    /// A VDI image (qemu-img shows none; imgconv shows the header).
    Vdi(VdiDetails),
    /// A VHDX image (qemu-img shows none; imgconv shows the header and metadata).
    Vhdx(VhdxDetails),
}

/// qcow2 details, as qemu-img shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct Qcow2Details {
    /// `0.10` (version 2) or `1.1` (version 3).
    pub compat: String,
    /// `zlib` or `zstd`: how compressed clusters are compressed.
    pub compression_type: String,
    /// Lazy refcounts (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<Qcow2Bitmap>,
    /// Width of a refcount entry.
    pub refcount_bits: u32,
    /// The external data file's name, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// With a data file: whether it holds the raw disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// The corrupt bit (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries, subclusters (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// A persistent dirty bitmap of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Qcow2Bitmap {
    /// `in-use`, `auto`.
    pub flags: Vec<String>,
    /// Its name.
    pub name: String,
    /// Bytes of disk per bit.
    pub granularity: u64,
}

/// VMDK details, as qemu-img shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct VmdkDetails {
    /// The content ID of the descriptor.
    pub cid: u32,
    /// The parent's content ID (`0xffffffff`: no parent).
    pub parent_cid: u32,
    /// The descriptor's `createType`.
    pub create_type: String,
    /// One entry per extent.
    pub extents: Vec<VmdkExtent>,
}

/// One extent of a VMDK image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct VmdkExtent {
    /// True for compressed grains (streamOptimized).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// Bytes of disk the extent holds.
    pub virtual_size: u64,
    /// Its file name, as shown.
    pub filename: String,
    /// Grain size of a sparse extent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The extent type as the descriptor names it (`FLAT`, `SPARSE`…; empty for the
    /// sparse extent of a monolithic image).
    pub format: String,
}

/// VDI header details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct VdiDetails {
    /// `dynamic`, `static` or `diff`.
    pub image_type: String,
    /// `1.1`.
    pub header_version: String,
    /// Bytes of the header.
    pub header_size: u32,
    /// The pre-header's text.
    pub file_info: String,
    /// Bytes per block.
    pub block_size: u32,
    /// Extra bytes before each block's data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_extra: Option<u32>,
    /// Blocks of the disk.
    pub blocks: u32,
    /// Blocks allocated in the file.
    pub allocated_blocks: u32,
    /// The image UUID.
    pub uuid: String,
    /// The modification UUID.
    pub modification_uuid: String,
    /// The parent's image UUID (differencing images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_uuid: Option<String>,
    /// The parent's modification UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_modification_uuid: Option<String>,
    /// The comment, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// VHDX details (imgconv's own: qemu-img shows none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct VhdxDetails {
    /// `dynamic`, `fixed` or `differencing`.
    pub subformat: String,
    /// Bytes per payload block.
    pub block_size: u32,
    /// Bytes per logical sector (512 or 4096).
    pub logical_sector_size: u32,
    /// Bytes per physical sector.
    pub physical_sector_size: u32,
    /// The virtual disk's identifier.
    pub virtual_disk_id: String,
    /// The header's data-write GUID.
    pub data_write_guid: String,
    /// Bytes of the log region.
    pub log_size: u32,
    /// The creator recorded in the file-type identifier, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    /// Log entries replayed in memory when the image was opened (a dirty log).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_entries_replayed: Option<u64>,
    /// A differencing image's parent linkage GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_linkage: Option<String>,
}
