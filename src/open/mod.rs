//! The front door for reading: from a path, a URL or a byte stream to an [`Image`],
//! unwrapping compression and tar archives on the way, then handing the bytes to the
//! format's driver from the table ([`crate::format::DRIVERS`]).
//!
//! [`local`] reads paths, streams and storage; remote locations (`http(s)://`,
//! `docker://`, `oci:`) go to [`crate::remote`], which builds on [`local`] in turn.

pub mod local;

use std::path::Path;

use crate::error::Result;
use crate::image::{Image, OpenOptions};

pub use local::{
    context_for_path, open_path, open_reader, open_storage, open_stream, open_stream_input,
};

/// Opens the image at `path`: finds its format (unless `options` names it) and returns the
/// virtual disk with its backing chain.
///
/// Compressed files (gzip, bzip2, xz, zstd) and tar archives are unwrapped first, found
/// by magic bytes; `options.format` then names the inner format. The path `-` reads
/// standard input (see [`open_reader`]).
pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image> {
    let path = path.as_ref();
    if let Some(loc) = path.to_str().and_then(crate::io::remote::classify) {
        // http(s)://, docker://, oci: — the front door for remote images.
        return crate::remote::open(loc, options);
    }
    if path.as_os_str() == "-" {
        return local::open_stream_input(Box::new(std::io::stdin()), "-", options);
    }
    local::open_path(path, options)
}
