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

/// Most directory entries looked at while searching a folder for the parent of a
/// differencing VDI.
pub const MAX_VDI_PARENT_SCAN: usize = 65536;

/// Most `*.vdi` files whose headers are read while searching for a VDI parent.
pub const MAX_VDI_PARENT_CANDIDATES: usize = 1024;
