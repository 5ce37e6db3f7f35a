//! VDI, VirtualBox's disk image: dynamic, fixed (static) and differencing images.
//!
//! - [`header`]: the pre-header, the v1.1 header, UUIDs and the block map (plain structs);
//! - [`reader`]: validation as VirtualBox validates, the [`reader::VdiDevice`], and the
//!   search for a differencing image's parent by UUID;
//! - [`check`]: `check`, the block map's consistency as qemu-img verifies it;
//! - [`writer`]: images laid out as VirtualBox lays them out (`-o static=on|off`,
//!   `-o uuid=…`);
//! - [`inplace`]: an existing image written in place (the base of `commit`).

pub mod check;
pub mod header;
pub mod inplace;
pub mod reader;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::detect::Format;
use crate::driver::Driver;
use crate::error::Result;
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

pub use reader::{ParentSource, VdiDevice};

/// The VDI driver.
pub const DRIVER: Driver = Driver {
    format: Format::Vdi,
    probe: |head, _| head.get(0x40..0x44) == Some(&header::SIGNATURE.to_le_bytes()),
    open: Some(open),
    open_stream: None,
    create: Some(create_writer),
    create_unsized: None,
    check: Some(|req| check::check(req.storage.as_ref())),
    repair: None,
    resize: None,
    internal_snapshots: false,
    explicit_parent: true,
};

/// Opens a VDI image. A differencing image's parent is the one the options name
/// ([`OpenOptions::parent`](crate::image::OpenOptions::parent), top image only; any
/// format: VirtualBox puts VDI snapshots on VMDK base disks too), else it is looked for
/// by its UUID among the `*.vdi` files of the image's folder (and of the folder above a
/// VirtualBox `Snapshots` folder). A VDI parent's image UUID must be the child's parent
/// UUID. In untrusted mode the parent reference is refused.
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    let source = match (&ctx.options.parent, ctx.depth) {
        (Some(parent), 0) => ParentSource::Explicit(parent.clone()),
        _ => ParentSource::Search,
    };
    reader::open_with(storage, ctx, source)
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
