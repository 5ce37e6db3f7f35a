//! vdi: not implemented yet.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Opens a vdi image.
pub fn open(_storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Opened> {
    Err(Error::unsupported("vdi", "reading vdi images"))
}

/// Creates a vdi writer.
pub fn create_writer(
    _target: &Path,
    _size: u64,
    _opts: &WriteOptions,
    _out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported("vdi", "writing vdi images"))
}
