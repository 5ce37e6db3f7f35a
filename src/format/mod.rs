//! The format table: one folder per format, dispatched from here and nowhere else.
//!
//! Each format module provides
//! - `open(storage, ctx) -> Result<Opened>`: parse and validate, expose a `BlockDevice`;
//! - `create_writer(target, size, opts, out) -> Result<Box<dyn ImageWriter>>`.

pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vmdk;

use std::path::Path;
use std::sync::Arc;

use crate::detect::{probe, Format};
use crate::error::Result;
use crate::image::{Image, OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Opens `storage` as an image: probes (or takes) its format and runs that reader.
pub fn open_storage(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Image> {
    let format = match ctx.options.format {
        Some(f) => f,
        None => probe(storage.as_ref())?,
    };
    let opened: Opened = match format {
        Format::Raw => raw::open(storage, ctx)?,
        Format::Qcow2 => qcow2::open(storage, ctx)?,
        Format::Vmdk => vmdk::open(storage, ctx)?,
        Format::Vdi => vdi::open(storage, ctx)?,
    };
    Ok(Image::from_opened(opened))
}

/// Creates the writer for `format` that will write an image of `size` bytes to `target`.
pub fn create_writer(
    format: Format,
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    match format {
        Format::Raw => raw::create_writer(target, size, opts, out),
        Format::Qcow2 => qcow2::create_writer(target, size, opts, out),
        Format::Vmdk => vmdk::create_writer(target, size, opts, out),
        Format::Vdi => vdi::create_writer(target, size, opts, out),
    }
}
