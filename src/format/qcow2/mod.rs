//! qcow2: not implemented yet.

pub mod header;

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
    _target: &Path,
    _size: u64,
    _opts: &WriteOptions,
    _out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported("qcow2", "writing qcow2 images"))
}
