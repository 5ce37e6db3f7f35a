//! qcow2: not implemented yet.

pub mod header;
pub mod refcount;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Opens a qcow2 image.
pub fn open(_storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Opened> {
    Err(Error::unsupported("qcow2", "reading qcow2 images"))
}

/// Creates a qcow2 writer.
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(target, size, opts, out)
}
