//! VHD (Virtual PC / Hyper-V "Virtual Hard Disk", qemu's `vpc`): fixed, dynamic and
//! differencing images.
//!
//! - [`header`]: footer, dynamic header, parent locators, BAT and bitmaps (plain structs),
//!   checksums, the CHS geometry and the virtual-size rule;
//! - [`reader`]: finding and checking the metadata, the [`reader::VpcDevice`], parents;
//! - [`writer`]: fixed and dynamic images laid out as qemu-img lays them out;
//! - [`check`]: `check`, which qemu does not have for VHD.
//!
//! # Fact sheet (checked against qemu-img 10.0.2, libvhdi, dissect.hypervisor and the
//! corpus)
//!
//! - **Footer** (512 bytes, big-endian): cookie `conectix`, features (bit 1 always set),
//!   version 1.0, data offset (the dynamic header; all ones for fixed), timestamp
//!   (seconds since 2000-01-01 UTC), creator application, version and host OS, original
//!   and current size, CHS geometry (u16 cylinders, u8 heads, u8 sectors), disk type
//!   (2 fixed, 3 dynamic, 4 differencing), checksum (one's complement of the byte sum
//!   without the checksum field), UUID, saved-state flag, 427 reserved bytes. A fixed
//!   image is the disk's bytes then the footer; Virtual PC before 2004 wrote a 511-byte
//!   footer, read here as by qemu (whose file layer rounds the file length up to a
//!   sector, which puts such a footer back in the last 512 bytes). A dynamic or
//!   differencing image has a copy of the footer at offset 0, which is the one read (as
//!   qemu does; dissect reads the one at the end, so the writer writes both).
//! - **Virtual size** (qemu 8.2 and later, which `info` matches): cylinders × heads ×
//!   sectors × 512 when the creator is Virtual PC (`vpc `) or qemu without `force_size`
//!   (`qemu`) — compared on all four bytes — and the geometry is not the largest
//!   (65535 × 16 × 255); for every other creator (Hyper-V `win `, `qem2`, Disk2VHD
//!   `d2v\0`, XenServer `tap\0`, XenConverter `CTXS`, Azure `wa\0\0`, FreeBSD mkimg
//!   `*img`…) the footer's current size, in whole sectors. At most 2040 GiB. (Older qemu
//!   listed the exact-size creators instead, and so sized mkimg's images by geometry.)
//! - **Dynamic header** (1024 bytes at the footer's data offset): cookie `cxsparse`,
//!   BAT offset, version, BAT entries, block size (a power of two ≥ 512; 2 MiB usual),
//!   checksum, parent UUID, parent timestamp, parent name (UTF-16BE), eight parent
//!   locators (platform code, data space, data length, data offset). The checksum is
//!   verified here; qemu does not verify it.
//! - **BAT**: one big-endian u32 per block, the sector offset of the block's sector
//!   bitmap (one bit per sector, most significant bit first, padded to whole sectors),
//!   followed by the block's data; `0xFFFFFFFF` = not allocated. Checked at open: BAT
//!   inside the file, entries × block size covering the disk, every block (bitmap and
//!   data) inside the file (as qemu), clear of the metadata and of every other block.
//! - **Sector bitmaps** are honoured: in a dynamic image a clear bit reads as zeros, in
//!   a differencing image it reads from the parent; `map` reports those sectors as
//!   unallocated. libvhdi and Windows read them so too; qemu and dissect.hypervisor read
//!   the block's bytes whatever the bitmap says, which differs only where a writer left
//!   non-zero bytes under a clear bit (no image of qemu, Hyper-V, Disk2VHD, Virtual PC
//!   or mkimg in the corpus does).
//! - **Differencing** images: qemu reads them as dynamic images and ignores the parent.
//!   Here the parent is found through the locators, in this order: `W2ru` (relative,
//!   UTF-16LE, `\` separators), `W2ku` (absolute UTF-16LE; a drive-letter or UNC path
//!   cannot be followed on this system), `MacX` (a `file://` URL, UTF-8), then the
//!   header's parent name; the first that exists is opened, and its footer UUID must be
//!   the child's parent UUID (the parent timestamp is not compared: copying a file
//!   changes it). `Wi2r`/`Wi2k` (deprecated) and `Mac ` (an alias record) are not read.
//!   `--untrusted` refuses the first locator, naming its field; `info --untrusted`
//!   lists them all.
//! - **Writing** follows `qemu-img create/convert -f vpc`: `subformat=dynamic` (default:
//!   2 MiB blocks, layout footer / header at 512 / BAT at 1536 / blocks / footer) or
//!   `fixed`; `force_size=off` rounds the size up to a CHS geometry as qemu does, creator
//!   `qemu`; `force_size=on` keeps the size exact (rounded up to a sector), geometry
//!   65535 × 16 × 255, creator `qem2` — both are the creators that make qemu-img read the
//!   size this writer meant, and libvhdi, dissect and Azure read the current size, which
//!   is the same. Creator version 5.3 and host `Wi2k`, as qemu writes.
//! - **Azure** takes only fixed VHDs whose virtual size is a whole number of MiB:
//!   `azure=on` makes a fixed, exact-size image (`subformat=fixed,force_size=on`) and
//!   refuses a size that is not a whole MiB; `azure=round` rounds it up to the next MiB
//!   instead. Asking for `subformat=dynamic` or `force_size=off` with it is refused.
//! - **Detection**: `conectix` at offset 0, or a footer cookie in the last 512 (or 511)
//!   bytes. qemu probes a fixed VHD as raw; imgconv names it `vpc`. A fixed VHD inside a
//!   compressed stream is not seen (its tail is not known in advance): use `-f vpc`.
//! - `info` prints what qemu-img prints for `vpc`: the virtual size, `cluster-size` (the
//!   block size) for dynamic images, `dirty-flag` false, no format-specific data.

pub mod check;
pub mod header;
pub mod reader;
pub mod writer;

use std::path::Path;
use std::sync::Arc;

use crate::detect::Format;
use crate::driver::{CheckReport, Driver};
use crate::error::Result;
use crate::image::{OpenContext, Opened};
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

pub use reader::VpcDevice;

/// The VHD driver.
pub const DRIVER: Driver = Driver {
    format: Format::Vpc,
    probe,
    open: Some(open),
    open_stream: None,
    create: Some(create_writer),
    create_unsized: None,
    check: Some(|req| check(req.storage.as_ref())),
    repair: None,
    resize: None,
    internal_snapshots: false,
    explicit_parent: false,
};

/// True when `head` (the first bytes of a file) or `tail` (its last 512 bytes, empty when
/// unknown) holds a VHD footer: `conectix` at 0 (the footer copy of dynamic and
/// differencing images), or in the last 512 bytes (fixed images; or the last 511, as
/// early Virtual PC wrote it).
pub fn probe(head: &[u8], tail: &[u8]) -> bool {
    header::Footer::has_cookie(head)
        || header::Footer::has_cookie(tail)
        || (tail.len() == header::FOOTER_SIZE && header::Footer::has_cookie(&tail[1..]))
}

/// Opens a VHD image (a differencing image's parent through its locators).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    reader::open(storage, ctx)
}

/// Creates a VHD writer (`-o subformat=dynamic|fixed`, `force_size=on|off`,
/// `azure=off|on|round`).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(target, size, opts, out)
}

/// Checks the VHD image in `storage` (see [`check`]).
pub fn check(storage: &dyn Storage) -> Result<CheckReport> {
    check::check(storage)
}
