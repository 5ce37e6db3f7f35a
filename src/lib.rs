//! imgconv reads, writes, inspects and converts virtual-disk images — raw, qcow2, VMDK
//! and VDI — with no qemu-img at run time.
//!
//! # Example
//!
//! Convert a qcow2 image (its format found by magic bytes) to a VMDK for VMware:
//!
//! ```no_run
//! use imgconv::{ConvertOptions, Format, OpenOptions};
//!
//! # fn main() -> imgconv::Result<()> {
//! let img = imgconv::open("disk.qcow2", &OpenOptions::default())?;
//! println!("{} image, {} bytes", img.format(), img.size());
//!
//! let opts = ConvertOptions::new(Format::Vmdk)
//!     .subformat("streamOptimized")
//!     .progress(|done, total| eprintln!("{done}/{total}"));
//! imgconv::convert(&img, "disk.vmdk", &opts)?;
//!
//! // The guest-visible bytes, as a stream:
//! use std::io::Read;
//! let mut first_sector = [0u8; 512];
//! img.reader().read_exact(&mut first_sector)?;
//! # Ok(())
//! # }
//! ```
//!
//! Images from strangers are opened with [`OpenOptions::untrusted`], which refuses every
//! reference to another file (backing files, extents) before reading through it.
//!
//! Compressed downloads and pipes are read as they come. A raw disk in a gzip stream (whose
//! length is recorded nowhere) goes straight into a qcow2 image in one pass, its size
//! found where the stream ends, with no temporary file:
//!
//! ```no_run
//! use imgconv::{ConvertOptions, Format, OpenOptions};
//!
//! # fn main() -> imgconv::Result<()> {
//! let body = std::fs::File::open("disk.raw.gz")?; // or an HTTP response body
//! let opts = OpenOptions::untrusted().stream_unknown_length();
//! let img = imgconv::open_reader(body, &opts)?;
//! imgconv::convert(&img, "disk.qcow2", &ConvertOptions::new(Format::Qcow2))?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`device`]: the [`BlockDevice`] trait every format reader implements;
//! - [`format`](mod@format): one module per format, each with a reader and a writer;
//! - [`convert`](mod@convert): the one conversion engine for every pair of formats;
//! - [`io`]: positional file reads, atomic and sparse outputs.

pub mod convert;
pub mod details;
pub mod detect;
pub mod device;
pub mod driver;
pub mod engine;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod io;
pub mod limits;
pub mod open;
pub mod ops;
pub mod random;
pub mod writer;
pub mod zero;

pub use convert::{convert, convert_to_writer, ConvertOptions, EngineOptions};
pub use detect::Compression;
pub use detect::Format;
pub use device::{BlockDevice, DeviceReader, Extent, ExtentKind};
pub use error::{Error, Result};
pub use image::{Image, ImageInfo, OpenOptions};
pub use open::{open, open_reader};
pub use writer::{ImageWriter, WriteOptions};
