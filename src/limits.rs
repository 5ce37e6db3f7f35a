//! Resource limits on untrusted metadata, in one place.
//!
//! Every size read from an image header is checked against the file size and the virtual
//! size before anything is allocated; these constants bound what remains.
//!
//! # Every limit, and what enforces it
//!
//! Exceeding a limit is an error at open time ([`Error::TooLarge`](crate::Error::TooLarge)
//! or [`Error::Corrupt`](crate::Error::Corrupt) naming the structure), never a
//! truncated result. Limits of one format's structures that QEMU fixes by the format
//! itself live next to the parser (noted below); caches are memory bounds, not limits on
//! what can be read.
//!
//! | Limit | Value | Enforced by |
//! |---|---|---|
//! | [`MAX_VIRTUAL_SIZE`] | 2^62 bytes (4 EiB) | every reader's header check (qcow2, VMDK sparse/seSparse/descriptor, VDI) and every writer's create |
//! | [`MAX_CHAIN_DEPTH`] | 16 images | `OpenContext::open_backing` / `open_reference` (backing chains, VMDK parents, VDI parents); loops are refused at any depth |
//! | [`MAX_QCOW2_L1_BYTES`] | 32 MiB | qcow2 open, check, writer and resize |
//! | [`MAX_QCOW2_REFTABLE_BYTES`] | 8 MiB | qcow2 open, refcount rebuilding, writer and resize |
//! | [`MAX_QCOW2_CHECK_BYTES`] | 64 MiB | qcow2 `check`: reference counters, two bytes per referenced cluster, made a page at a time (stored refcount blocks are read as needed, 8 kept) |
//! | [`MAX_QCOW2_SNAPSHOTS`] | 65536 | qcow2 open and check (the snapshot table is read in 256 KiB windows) |
//! | qcow2 cluster size (`header::MIN_CLUSTER_BITS`..`MAX_CLUSTER_BITS`) | 512 B to 2 MiB | `qcow2::header::Header::parse` |
//! | qcow2 refcount width (`header::MAX_REFCOUNT_ORDER`) | 64 bits | `Header::parse` |
//! | qcow2 backing file name (`header::MAX_BACKING_FILE_NAME`) | 1023 bytes | qcow2 open |
//! | qcow2 bitmaps (`header::MAX_BITMAPS`, `MAX_BITMAP_DIRECTORY_BYTES`) | 65535, 64 MiB | qcow2 open (bitmap directory) |
//! | qcow2 snapshot extra data (`snapshot::MAX_SNAPSHOT_EXTRA_DATA`) | 1 KiB per entry | `SnapshotEntry::parse` |
//! | qcow2 L2 cache (`reader.rs`) | 8 MiB per image, at least 16 tables | memory bound of the reader |
//! | [`MAX_VMDK_GD_ENTRIES`] | 2^24 entries (64 MiB directory) | VMDK `SparseHeader::validate`, seSparse open |
//! | [`MAX_VMDK_EXTENTS`] | 4096 | VMDK `Descriptor::parse` |
//! | [`MAX_DESCRIPTOR_BYTES`] | 64 KiB | VMDK open (descriptor file, embedded descriptor, stream reader) |
//! | VMDK grain size | power of two, at most 1 MiB; at most 512 entries per grain table | `SparseHeader::validate` |
//! | VMDK grain-table caches (`sparse.rs`, `sesparse.rs`) | 4096 / 1024 tables per extent | memory bound of the reader |
//! | VMDK stream buffer (`stream.rs`) | 256 MiB decoded grains held between `map` and `read_at` | streamOptimized reader from a pipe |
//! | [`MAX_VDI_BLOCKS`] | 2^28 entries (1 GiB block map) | VDI header check and writer |
//! | [`MAX_VDI_PARENT_SCAN`], [`MAX_VDI_PARENT_CANDIDATES`] | 65536 entries, 1024 headers | the search for a differencing VDI's parent |
//! | VHD virtual size (`vpc::header::MAX_SECTORS`) | 2040 GiB (qemu's) | VHD open (`reader::virtual_size`) and writer (`header::new_size`) |
//! | VHD BAT | inside the file (4 bytes per entry), entries × block size covering the disk | `vpc::reader::check_table_bounds`, before the BAT is allocated |
//! | VHD block size | a power of two, 512 B to 2 GiB (u32) | `DynamicHeader::validate` |
//! | [`MAX_VPC_LOCATOR_BYTES`] | 64 KiB | VHD parent locator data (a path) |
//! | [`MAX_VPC_BITMAP_CACHE_BYTES`] | 16 MiB | partial sector bitmaps kept by the VHD reader (memory bound) |
//! | [`MAX_VHDX_BAT_ENTRIES`] | 2^27 entries (1 GiB BAT; a 64 TiB disk of 1 MiB blocks needs 2^26 + 2^14) | VHDX open and check, after the BAT's size is checked against its region and the file |
//! | [`MAX_VHDX_LOG_BYTES`] | 32 MiB | a VHDX log that must be replayed (read whole into memory; Hyper-V and QEMU write 1 MiB logs) |
//! | VHDX region table, metadata table, parent locator | 2047 entries, 2047 entries, items ≤ 1 MiB inside the region | `vhdx::header::RegionTable::parse`, `vhdx::metadata::MetadataTable::parse`, `ParentLocator::parse` |
//! | VHDX replayed view (`vhdx/replay.rs`) | one 4 KiB copy per data descriptor, one range per zero descriptor | bounded by the log's size |
//! | [`MAX_XZ_INDEX_BYTES`] | 64 MiB | xz index read to learn a compressed file's size |
//! | [`XZ_THREADING_MEMORY`], [`MAX_XZ_DECODER_MEMORY`] | 40 MiB, 1 GiB | the xz decoder (one thread above the first, refused above the second) |
//! | [`MAX_TAR_META_BYTES`] | 1 MiB | tar GNU long names and pax headers |
//! | [`MAX_TAR_SPARSE_ENTRIES`] | 2^20 | tar sparse member maps |
//! | [`MAX_CHECK_MESSAGES`] | 100000 (a few MiB) | messages a `check` report lists (more problems are counted) |
//! | [`MAX_TAR_NAMES_LISTED`], [`MAX_TAR_NAME_SHOWN`] | 16 names, 256 bytes each | tar member names kept for messages; members passed over are skipped as they are read, one header at a time |
//! | [`STREAM_RETAIN_BYTES`] | 32 MiB | a raw disk read from a stream keeps this much behind the reader |
//! | format probing (`detect::PROBE_LEN`) | first 4 KiB | format and compression detection |
//! | HTTP block cache (`io::http::storage`) | 32 blocks of 256 KiB; at most 8 requests at once per remote file | memory and connection bound of a remote reader |
//! | HTTP tries (`RemoteOptions::retries`, `max_redirects`, `timeout`) | 5 tries after the first (pauses 0.25 s doubling, at most 8 s), 10 redirects, 30 s per connect and per read | every request; a body is resumed at most 5 times in a row without 1 MiB of progress and 100 times in all (`io::http::body`) |
//! | registry manifests and indexes (`remote::registry`) | 4 MiB, 1024 layers | registry and OCI layout reads; token answers 1 MiB, error bodies 4 KiB |
//! | default conversion workers ([`DEFAULT_MAX_THREADS`](crate::convert::DEFAULT_MAX_THREADS)) | the cores, at most 16 (`-m` up to 16, qemu-img's range; the library takes up to 64) | the conversion engine; the binary caps glibc's malloc arenas at 4 so that many workers fit `prlimit --as=1GiB` |
//! | qcow2 persistent bitmap (`qcow2::bitmap::MAX_BITMAP_BYTES`) | 512 MiB of bits (QEMU's) | `bitmap` add, load and merge |
//! | qcow2 bitmap name (`qcow2::bitmap::MAX_NAME`) | 1023 bytes (QEMU's) | `bitmap --add` |
//! | qcow2 snapshot name (`qcow2::snapshot_edit::MAX_SNAPSHOT_NAME`) | 255 bytes, longer names cut (QEMU's) | `snapshot -c` |
//! | qcow2 in-place transaction (`qcow2::edit`) | one refcount per cluster of the file, as `check` counts them; 64 modified L2 tables held, the rest written to their new clusters | every in-place change of a qcow2 image |
//!
//! The fuzz targets in `fuzz/` check these bounds hold on arbitrary input: they run
//! with a 512 MiB memory limit and a 10 s per-input timeout (see `fuzz/run-all.sh`).

/// Longest backing chain (the image itself counts as one).
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// Largest VMDK text descriptor, embedded or separate.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 * 1024;

/// Largest qcow2 L1 table (QEMU's own limit).
pub const MAX_QCOW2_L1_BYTES: u64 = 32 << 20;

/// Largest qcow2 refcount table (QEMU's own limit).
pub const MAX_QCOW2_REFTABLE_BYTES: u64 = 8 << 20;

/// Memory `check` may use to count the references to a qcow2's clusters (two bytes per
/// cluster that has any: 2 TiB of data in 64 KiB clusters).
pub const MAX_QCOW2_CHECK_BYTES: u64 = 64 << 20;

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

/// Most BAT entries of a VHDX image (the BAT is read whole, as QEMU reads it).
pub const MAX_VHDX_BAT_ENTRIES: u64 = 1 << 27;

/// Largest VHDX log replayed: it is read whole into memory, and the replayed view holds
/// at most a copy of its data sectors.
pub const MAX_VHDX_LOG_BYTES: u64 = 32 << 20;

/// Largest xz index read to find a compressed file's uncompressed size (a record is a
/// few bytes per block; 64 MiB covers millions of blocks).
pub const MAX_XZ_INDEX_BYTES: u64 = 64 << 20;

/// Memory the multithreaded xz decoder may use before it decodes with fewer threads
/// (down to one, still beside the reader). Each thread holds a whole block's output and
/// its dictionary: two threads fit for `xz -T0 -3` (12 MiB blocks), so that a raw.xz
/// download converts in parallel within a 64 MiB peak; `-6` streams (24 MiB blocks)
/// decode on one thread.
pub const XZ_THREADING_MEMORY: u64 = 40 << 20;

/// Memory above which the xz decoder refuses a stream (its dictionary and buffers).
pub const MAX_XZ_DECODER_MEMORY: u64 = 1 << 30;

/// Largest GNU long name or pax header accepted in a tar archive.
pub const MAX_TAR_META_BYTES: u64 = 1 << 20;

/// Decoded bytes a sequential (stream) device keeps behind the latest position asked
/// for, so that the engine can read what it has just mapped.
pub const STREAM_RETAIN_BYTES: u64 = 32 << 20;

/// Member names a tar error message lists (the others are counted): a tar reader keeps
/// no more, whatever the number of members.
pub const MAX_TAR_NAMES_LISTED: usize = 16;

/// Bytes of one member name shown in a message.
pub const MAX_TAR_NAME_SHOWN: usize = 256;

/// Problems a `check` lists one by one; beyond, they are counted only.
pub const MAX_CHECK_MESSAGES: usize = 100_000;

/// Most stretches a sparse tar member's map may list.
pub const MAX_TAR_SPARSE_ENTRIES: usize = 1 << 20;

/// Most directory entries looked at while searching a folder for the parent of a
/// differencing VDI.
pub const MAX_VDI_PARENT_SCAN: usize = 65536;

/// Most `*.vdi` files whose headers are read while searching for a VDI parent.
pub const MAX_VDI_PARENT_CANDIDATES: usize = 1024;

/// Largest VHD parent locator data (a path: 32767 UTF-16 units fit).
pub const MAX_VPC_LOCATOR_BYTES: u64 = 64 * 1024;

/// Bytes of partial sector bitmaps the VHD reader keeps in memory (a cache: full and
/// empty bitmaps take one byte of state per block).
pub const MAX_VPC_BITMAP_CACHE_BYTES: u64 = 16 << 20;
