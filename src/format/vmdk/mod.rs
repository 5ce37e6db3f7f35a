//! VMDK: VMware's virtual disk, every hosted subformat.
//!
//! Reading: a sparse extent with an embedded descriptor (monolithicSparse,
//! streamOptimized in VMware's, qemu-img's and open-vmdk's layouts) or a text descriptor
//! naming FLAT, VMFS, SPARSE and ZERO extents (monolithicFlat, twoGbMaxExtent*, vmfs),
//! with delta disks opened over their parent (`parentFileNameHint`, CID checked);
//! legacy ESX COWD (vmfsSparse) and ESXi seSparse extents, alone or named by a
//! descriptor. Raw device mappings (VMFSRDM / VMFSRAW) are refused at open.
//! Writing: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat and streamOptimized (also to a pipe).
//!
//! - [`header`]: the `KDMV` header and stream markers;
//! - [`descriptor`]: the text descriptor;
//! - [`sparse`]: reading one hosted sparse extent;
//! - [`sesparse`]: reading one ESXi seSparse extent;
//! - [`reader`]: opening an image and serving it as a block device;
//! - [`stream`]: reading a streamOptimized file sequentially from a pipe;
//! - [`writer`]: every subformat's writer;
//! - [`check`]: `check`, grains stored past the end of their extent file.

pub mod check;
pub mod descriptor;
pub mod header;
pub mod reader;
pub mod sesparse;
pub mod sparse;
pub mod stream;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::detect::Format;
use crate::driver::{Driver, StreamReader};
use crate::error::Result;
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// The VMDK driver.
pub const DRIVER: Driver = Driver {
    format: Format::Vmdk,
    probe: |head, _| probe(head),
    open: Some(open),
    open_stream: Some(StreamReader {
        accepts: |head, _, _| is_stream_optimized(head),
        open: |reader, _, ctx| open_stream(reader, ctx),
    }),
    create: Some(create_writer),
    create_unsized: None,
    check: Some(check::check_storage),
    repair: None,
    resize: None,
    internal_snapshots: false,
    explicit_parent: false,
};

/// True when `head` is a VMDK sparse header with compressed grains and markers (the
/// streamOptimized layout, made to be read in one pass).
pub fn is_stream_optimized(head: &[u8]) -> bool {
    const COMPRESSED: u32 = 1 << 16;
    const MARKERS: u32 = 1 << 17;
    head.len() >= 12 && head.starts_with(b"KDMV") && {
        let flags = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        flags & (COMPRESSED | MARKERS) == COMPRESSED | MARKERS
    }
}

/// Opens a vmdk image: a sparse extent (with its embedded descriptor) or a descriptor
/// file; extent files and the parent go through `ctx` (refused when untrusted).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    reader::open(storage, ctx)
}

/// Reads a streamOptimized VMDK sequentially from `reader` (a pipe): the device it
/// returns is `sequential_only` and must be read in ascending order.
pub fn open_stream(reader: Box<dyn std::io::Read + Send>, ctx: &OpenContext) -> Result<Opened> {
    stream::open_stream(reader, ctx)
}

/// Creates a vmdk writer for `target` (`-o subformat=…`; extent files are named after
/// it), or for the stream of `out` (streamOptimized only).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(target, size, opts, out)
}

/// True when `head` starts like a VMDK: a sparse extent (`KDMV`), a COWD extent, a
/// seSparse extent (refused at open, rather than misread as raw) or a text descriptor
/// (either spelling of its first comment).
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"KDMV")
        || head.starts_with(b"COWD")
        || head.starts_with(&header::SESPARSE_MAGIC.to_le_bytes())
        || head.starts_with(b"# Disk DescriptorFile")
        || head.starts_with(b"# Disk Descriptor File")
}
