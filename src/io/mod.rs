//! Bytes in and out: positional file reads, memory, atomic sparse outputs, and the
//! way in through decompressors, tar archives, pipes and spooled temporary files.

pub mod compressed;
pub mod file;
pub mod output;
pub mod source;
pub mod spool;
pub mod stream;
pub mod tar;

pub use file::{FileStorage, MemStorage, Storage};
pub use output::OutputSet;

use crate::error::{Error, Result};

/// Reads exactly `buf.len()` bytes of the structure `structure` at `offset`; a read past
/// the end of the file becomes a [`Error::Corrupt`] naming the structure.
pub fn read_struct(
    storage: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    format: &'static str,
    structure: &'static str,
) -> Result<()> {
    storage.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                format,
                structure,
                offset,
                format!(
                    "{} bytes needed but the file ends at {:#x}",
                    buf.len(),
                    storage.len()
                ),
            )
        } else {
            match storage.path() {
                Some(p) => Error::io(p, e),
                None => Error::Stream(e),
            }
        }
    })
}

/// Writes all of `buf` at `offset` of `file`, naming `path` on failure.
pub fn write_all_at(
    file: &std::fs::File,
    buf: &[u8],
    offset: u64,
    path: &std::path::Path,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
        .map_err(|e| Error::io(path, e))
}
