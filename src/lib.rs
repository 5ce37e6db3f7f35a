//! imgconv reads, writes, inspects and converts virtual-disk images — raw, qcow2, VMDK,
//! VDI, VHD and VHDX — with no qemu-img at run time.
//!
//! # Example
//!
//! Open an image (its format found by magic bytes), read its guest-visible bytes with
//! `Read + Seek`, and convert it to a VMDK for VMware:
//!
//! ```
//! use std::io::{Read, Seek, SeekFrom};
//! use imgconv::{ConvertOptions, Format, OpenOptions};
//!
//! # fn main() -> imgconv::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.raw");
//! # std::fs::write(&path, [7u8; 1 << 20])?;
//! let img = imgconv::open(&path, &OpenOptions::default())?;
//! println!("{} image, {} bytes", img.format(), img.size());
//!
//! let mut reader = img.reader();
//! reader.seek(SeekFrom::Start(4096))?;
//! let mut sector = [0u8; 512];
//! reader.read_exact(&mut sector)?;
//! assert_eq!(sector, [7u8; 512]);
//!
//! let vmdk = dir.path().join("disk.vmdk");
//! imgconv::convert(&img, &vmdk, &ConvertOptions::new(Format::Vmdk).subformat("streamOptimized"))?;
//! assert_eq!(imgconv::open(&vmdk, &OpenOptions::default())?.format(), Format::Vmdk);
//! # Ok(())
//! # }
//! ```
//!
//! Images from strangers are opened with [`OpenOptions::untrusted`], which refuses every
//! reference to another file (backing files, extents) before reading through it.
//!
//! # Progress and cancellation
//!
//! A conversion reports progress through a callback and stops when its [`CancelToken`]
//! is cancelled (from any thread); the token belongs to that conversion only, so the
//! next one runs normally.
//!
//! ```
//! use imgconv::{CancelToken, ConvertOptions, Error, Format, OpenOptions};
//!
//! # fn main() -> imgconv::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.raw");
//! # std::fs::write(&path, vec![1u8; 4 << 20])?;
//! let img = imgconv::open(&path, &OpenOptions::default())?;
//! let cancel = CancelToken::new();
//! let stop = cancel.clone();
//! let opts = ConvertOptions::new(Format::Qcow2)
//!     .cancel_token(&cancel)
//!     .progress(move |done, total| {
//!         eprintln!("{done}/{total}");
//!         stop.cancel(); // e.g. the user pressed "Cancel"
//!     });
//! let out = dir.path().join("disk.qcow2");
//! assert!(matches!(imgconv::convert(&img, &out, &opts), Err(Error::Interrupted)));
//! assert!(!out.exists()); // nothing half-written is left behind
//!
//! // A fresh conversion is unaffected.
//! imgconv::convert(&img, &out, &ConvertOptions::new(Format::Qcow2))?;
//! # Ok(())
//! # }
//! ```
//!
//! # Your own disk, written as a compressed qcow2
//!
//! Anything that implements [`BlockDevice`] — a disk in memory, on an object store, in a
//! database — converts to every format. [`BlockDevice::map`] tells the engine what is
//! data and what reads as zeros, so holes stay holes.
//!
//! ```
//! use imgconv::{BlockDevice, ConvertOptions, Extent, ExtentKind, Format, OpenOptions};
//!
//! /// 64 MiB whose first MiB holds a pattern; the rest is a hole.
//! struct Pattern;
//!
//! impl BlockDevice for Pattern {
//!     fn size(&self) -> u64 {
//!         64 << 20
//!     }
//!     fn read_at(&self, buf: &mut [u8], offset: u64) -> imgconv::Result<()> {
//!         imgconv::device::check_bounds(offset, buf.len() as u64, self.size())?;
//!         for (i, b) in buf.iter_mut().enumerate() {
//!             let at = offset + i as u64;
//!             *b = if at < 1 << 20 { (at % 251) as u8 } else { 0 };
//!         }
//!         Ok(())
//!     }
//!     fn map(&self, offset: u64, len: u64) -> imgconv::Result<Extent> {
//!         let len = imgconv::device::clamp_map_request(offset, len, self.size())?;
//!         Ok(if offset < 1 << 20 {
//!             Extent::new(offset, len.min((1 << 20) - offset), ExtentKind::Data)
//!         } else {
//!             Extent::new(offset, len, ExtentKind::Unallocated)
//!         })
//!     }
//! }
//!
//! # fn main() -> imgconv::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! let out = dir.path().join("pattern.qcow2");
//! imgconv::convert_device(&Pattern, &out, &ConvertOptions::new(Format::Qcow2).compressed(true))?;
//! let back = imgconv::open(&out, &OpenOptions::default())?;
//! assert_eq!(back.size(), 64 << 20);
//! # Ok(())
//! # }
//! ```
//!
//! # Streaming into any `Write`
//!
//! Formats written in one pass (raw, streamOptimized VMDK) go into any [`std::io::Write`]
//! — a socket, an HTTP request body, an encoder — which is handed back at the end:
//!
//! ```
//! use imgconv::{ConvertOptions, Format, Image};
//!
//! # fn main() -> imgconv::Result<()> {
//! let img = Image::from_device(imgconv::device::MemDevice::new(vec![9u8; 1 << 20]));
//! let opts = ConvertOptions::new(Format::Vmdk).subformat("streamOptimized");
//! let vmdk: Vec<u8> = imgconv::convert_to_writer(&img, Vec::new(), &opts)?;
//! assert_eq!(&vmdk[..4], b"KDMV");
//! # Ok(())
//! # }
//! ```
//!
//! # Walking the extents
//!
//! [`Image::extents`] walks the disk as runs of data, zeros and unallocated space (what
//! `imgconv map` prints):
//!
//! ```
//! use imgconv::{ConvertOptions, ExtentKind, Format, OpenOptions};
//!
//! # fn main() -> imgconv::Result<()> {
//! # let dir = tempfile::tempdir()?;
//! # let raw = dir.path().join("disk.raw");
//! # let f = std::fs::File::create(&raw)?;
//! # f.set_len(16 << 20)?;
//! # std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], 8 << 20)?;
//! # let path = dir.path().join("disk.qcow2");
//! # imgconv::convert(&imgconv::open(&raw, &OpenOptions::default())?, &path, &ConvertOptions::new(Format::Qcow2))?;
//! let img = imgconv::open(&path, &OpenOptions::default())?;
//! let mut data = 0;
//! for extent in img.extents() {
//!     let extent = extent?;
//!     if extent.kind == ExtentKind::Data {
//!         data += extent.len;
//!     }
//! }
//! assert_eq!(data, 65536);
//! # Ok(())
//! # }
//! ```
//!
//! Compressed downloads and pipes are read as they come: [`open_reader`] takes any
//! [`std::io::Read`] (gzip, bzip2, xz, zstd and tar found by magic bytes); a raw disk in a
//! stream whose length is recorded nowhere goes straight into raw or qcow2 in one pass
//! with [`OpenOptions::stream_unknown_length`]. Such an image reads forward only; open it
//! with [`OpenOptions::random_access`] to seek freely (it is decoded once into a sparse,
//! unlinked temporary file).
//!
//! # Features
//!
//! `cli` (the `imgconv` binary), `gzip`, `bzip2`, `xz`, `zstd` (inputs wrapped in those;
//! qcow2's zstd clusters) and `http` (URLs and container registries) are on by default.
//! Without a codec, an input using it is a typed [`Error::Unsupported`] naming the feature.
//!
//! # Layout
//!
//! Layers, bottom up; imports only point down:
//! - [`error`], [`limits`], [`zero`], [`random`]: errors, bounds on untrusted input, small helpers;
//! - [`device`] ([`BlockDevice`]) and [`writer`] ([`ImageWriter`]): the two traits;
//! - [`io`]: storage (positional reads), compression, tar, spooling, HTTP, atomic outputs;
//! - [`image`] and [`driver`]: the opened image and what a format driver provides;
//! - [`format`](mod@format): one folder per format and the table of drivers;
//! - [`engine`]: the one conversion pipeline, seeing only the two traits;
//! - [`open`](mod@open), [`convert`](mod@convert) and [`remote`]: the front doors.

#![warn(missing_docs)]

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
pub mod remote;
pub mod writer;
pub mod zero;

pub use convert::{
    convert, convert_device, convert_device_to_writer, convert_to_writer, ConvertOptions,
    EngineOptions,
};
pub use detect::Compression;
pub use detect::Format;
pub use device::{BlockDevice, DeviceReader, Extent, ExtentKind};
pub use engine::CancelToken;
pub use error::{Error, Result};
pub use image::{Image, ImageInfo, OpenOptions};
pub use open::{open, open_reader};
pub use writer::{ImageWriter, WriteOptions};
