//! Resource limits on untrusted metadata, in one place.
//!
//! Every size read from an image header is checked against the file size and the virtual
//! size before anything is allocated; these constants bound what remains.

/// Longest backing chain (the image itself counts as one).
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// Largest VMDK text descriptor, embedded or separate.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 * 1024;

/// Largest qcow2 L1 table (QEMU's own limit).
pub const MAX_QCOW2_L1_BYTES: u64 = 32 << 20;

/// Largest qcow2 refcount table (QEMU's own limit).
pub const MAX_QCOW2_REFTABLE_BYTES: u64 = 8 << 20;

/// Most internal snapshots a qcow2 may list (QEMU's own limit).
pub const MAX_QCOW2_SNAPSHOTS: u32 = 65536;

/// Largest virtual disk accepted from any header (2^63 - 1 bytes would overflow
/// offset arithmetic; QEMU's limit is similar).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

/// Largest block map of a VDI, in entries.
pub const MAX_VDI_BLOCKS: u64 = 1 << 28;

/// Largest VMDK grain directory, in entries.
pub const MAX_VMDK_GD_ENTRIES: u64 = 1 << 24;

/// Most extents a VMDK descriptor may list.
pub const MAX_VMDK_EXTENTS: usize = 4096;

/// Largest xz index read to find a compressed file's uncompressed size (a record is a
/// few bytes per block; 64 MiB covers millions of blocks).
pub const MAX_XZ_INDEX_BYTES: u64 = 64 << 20;

/// Memory the multithreaded xz decoder may use before it falls back to one thread.
pub const XZ_THREADING_MEMORY: u64 = 128 << 20;

/// Memory above which the xz decoder refuses a stream (its dictionary and buffers).
pub const MAX_XZ_DECODER_MEMORY: u64 = 1 << 30;

/// Largest GNU long name or pax header accepted in a tar archive.
pub const MAX_TAR_META_BYTES: u64 = 1 << 20;

/// Decoded bytes a sequential (stream) device keeps behind the latest position asked
/// for, so that the engine can read what it has just mapped.
pub const STREAM_RETAIN_BYTES: u64 = 32 << 20;

/// Most stretches a sparse tar member's map may list.
pub const MAX_TAR_SPARSE_ENTRIES: usize = 1 << 20;

/// Most directory entries looked at while searching a folder for the parent of a
/// differencing VDI.
pub const MAX_VDI_PARENT_SCAN: usize = 65536;

/// Most `*.vdi` files whose headers are read while searching for a VDI parent.
pub const MAX_VDI_PARENT_CANDIDATES: usize = 1024;
