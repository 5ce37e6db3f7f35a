//! VDI, VirtualBox's disk image: dynamic, fixed (static) and differencing images.
//!
//! - [`header`]: the pre-header, the v1.1 header, UUIDs and the block map (plain structs);
//! - [`reader`]: validation as VirtualBox validates, the [`reader::VdiDevice`], and the
//!   search for a differencing image's parent by UUID;
//! - [`check`]: `check`, the block map's consistency as qemu-img verifies it;
//! - [`writer`]: images laid out as VirtualBox lays them out (`-o static=on|off`,
//!   `-o uuid=…`).

pub mod check;
pub mod header;
pub mod reader;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;
use crate::image::{Image, OpenContext, OpenOptions, Opened};
use crate::io::{FileStorage, OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

pub use reader::{ParentSource, VdiDevice};

/// Opens a VDI image. A differencing image's parent is looked for by its UUID among the
/// `*.vdi` files of the image's folder (and of the folder above a VirtualBox `Snapshots`
/// folder); in untrusted mode the parent reference is refused.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    reader::open_with(storage, ctx, ParentSource::Search)
}

/// Opens the differencing VDI at `path` on top of the parent image `parent` (relative
/// names resolve against `path`'s folder). The parent may be of any format (VirtualBox
/// puts VDI snapshots on VMDK base disks too); a VDI parent's image UUID must be the
/// child's parent UUID. Untrusted options refuse the parent, as for any reference.
pub fn open_with_parent(
    path: impl AsRef<Path>,
    parent: &str,
    options: &OpenOptions,
) -> Result<Image> {
    let path = path.as_ref();
    let mut ctx = OpenContext::for_path(path, options);
    ctx.options.format = Some(crate::detect::Format::Vdi);
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open_image(path, options.force_share)?);
    let opened = reader::open_with(storage, &ctx, ParentSource::Explicit(parent.to_string()))?;
    Ok(Image::from_opened(opened))
}

/// Creates a VDI writer (`-o static=on|off`, `uuid=…`, `cluster_size=…`).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(target, size, opts, out)
}
