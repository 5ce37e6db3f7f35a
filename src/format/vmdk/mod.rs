//! vmdk: not implemented yet.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Opens a vmdk image.
pub fn open(_storage: Arc<dyn Storage>, _ctx: &OpenContext) -> Result<Opened> {
    Err(Error::unsupported("vmdk", "reading vmdk images"))
}

/// Creates a vmdk writer.
pub fn create_writer(
    _target: &Path,
    _size: u64,
    _opts: &WriteOptions,
    _out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported("vmdk", "writing vmdk images"))
}

/// True when `head` starts like a VMDK: a sparse extent (`KDMV`), a COWD extent or a
/// text descriptor.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"KDMV")
        || head.starts_with(b"COWD")
        || head.starts_with(b"# Disk DescriptorFile")
}
