//! The format table: one driver per format, each in its own folder, listed once in
//! [`DRIVERS`]. Everything above this layer reaches a format only through the table;
//! detection asks the drivers' probes in the table's order.
//!
//! A driver ([`Driver`]) offers probe, open, open from a stream, create (sized and
//! unsized), check and resize; what it leaves out is refused with a typed
//! [`Error::Unsupported`] naming the format and the operation.

pub mod qcow2;
pub mod raw;
pub mod recognised;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

use std::path::Path;

use crate::detect::{Format, PROBE_LEN, PROBE_TAIL_LEN};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::image::OpenContext;
use crate::io::spool::SpoolCap;
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Every driver, in probing order: formats with a magic at the start first, then those
/// found by their last bytes, raw last (it matches anything).
pub const DRIVERS: &[Driver] = &[
    qcow2::DRIVER,
    recognised::QCOW,
    vmdk::DRIVER,
    vdi::DRIVER,
    vhdx::DRIVER,
    recognised::QED,
    recognised::PARALLELS,
    recognised::BOCHS,
    recognised::CLOOP,
    recognised::LUKS,
    vpc::DRIVER,
    recognised::DMG,
    raw::DRIVER,
];

/// The driver of `format`.
pub fn driver(format: Format) -> &'static Driver {
    DRIVERS
        .iter()
        .find(|d| d.format == format)
        .expect("every Format has a driver in the table")
}

/// Recognises a format from the first bytes of an image (`head`, up to
/// [`PROBE_LEN`]) and its last bytes (`tail`, up to [`PROBE_TAIL_LEN`]; empty when they
/// are not known, as on a stream). Raw is the fallback.
pub fn probe(head: &[u8], tail: &[u8]) -> Format {
    DRIVERS
        .iter()
        .find(|d| (d.probe)(head, tail))
        .map_or(Format::Raw, |d| d.format)
}

/// Recognises the format of a storage's contents (its head and tail).
pub fn probe_storage(storage: &dyn Storage) -> Result<Format> {
    let len = storage.len();
    let n = len.min(PROBE_LEN as u64) as usize;
    let mut head = vec![0u8; n];
    read(storage, &mut head, 0)?;
    let t = len.min(PROBE_TAIL_LEN as u64) as usize;
    let mut tail = vec![0u8; t];
    read(storage, &mut tail, len - t as u64)?;
    Ok(probe(&head, &tail))
}

fn read(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    storage
        .read_exact_at(buf, offset)
        .map_err(|e| match storage.path() {
            Some(p) => Error::io(p, e),
            None => Error::Stream(e),
        })
}

/// The error for an operation a format's driver does not offer.
pub fn unsupported(format: Format, operation: &str) -> Error {
    Error::unsupported(format.name(), operation.to_string())
}

/// The virtual size the first bytes of an image of `format` declare, if they say.
fn declared_size(format: Format, head: &[u8]) -> Option<u64> {
    match format {
        Format::Qcow2 => qcow2::header::Header::parse(head).ok().map(|h| h.size),
        Format::Vdi => head
            .get(..vdi::header::MAX_HEADER_BYTES)
            .and_then(|b| vdi::header::Header::parse(b).ok())
            .map(|h| h.disk_size),
        Format::Vmdk => head
            .get(..512)
            .and_then(|b| b.try_into().ok())
            .and_then(|b| vmdk::header::SparseHeader::parse(b, 0).ok())
            .map(|h| h.capacity.saturating_mul(512)),
        // A dynamic or differencing VHD starts with a copy of its footer; a fixed one
        // (footer at the end only) and VHDX (size in its metadata region) declare none
        // in their first bytes.
        Format::Vpc if vpc::header::Footer::has_cookie(head) => {
            Some(vpc::header::Footer::parse(head).current_size)
        }
        _ => None,
    }
}

/// Spooled bytes allowed beyond twice the declared virtual size, and for an input whose
/// first bytes declare none (a VMDK descriptor).
pub const SPOOL_SLACK: u64 = 64 << 20;

/// The cap on the temporary copy of an untrusted input that does not set one: twice the
/// virtual size its header declares (a complete image holds the disk's data and its
/// metadata, and internal snapshots rarely double it), plus [`SPOOL_SLACK`]. A stream
/// that goes on past that is not a complete image of that size: an error, not a bigger
/// temporary file. `head` is the image's first bytes.
///
/// `None` for a format whose first bytes cannot declare its size (a VHDX keeps it in its
/// metadata region, a fixed VHD in its footer at the end): no default cap, only
/// `--max-spool`.
pub fn default_spool_cap(format: Format, head: &[u8]) -> Option<u64> {
    if matches!(format, Format::Vhdx)
        || (format == Format::Vpc && declared_size(format, head).is_none())
    {
        return None;
    }
    Some(
        declared_size(format, head)
            .map_or(0, |v| v.saturating_mul(2))
            .saturating_add(SPOOL_SLACK),
    )
}

/// The cap on the temporary copy of an input of `format` that starts with `head`:
/// `--max-spool`; for a raw disk (its length recorded nowhere) also `--max-size`; for an
/// untrusted image of another format, [`default_spool_cap`].
pub fn spool_cap(format: Format, head: &[u8], ctx: &OpenContext) -> Option<SpoolCap> {
    let o = &ctx.options;
    let mut caps = Vec::new();
    if let Some(b) = o.max_spool {
        caps.push(SpoolCap {
            bytes: b,
            set_by: "temporary copy of a compressed or piped input (cap: --max-spool)",
        });
    }
    if format == Format::Raw {
        if let Some(b) = o.max_size {
            caps.push(SpoolCap {
                bytes: b,
                set_by: "raw disk read from a stream of unrecorded length (cap: --max-size)",
            });
        }
    } else if let Some(bytes) =
        default_spool_cap(format, head).filter(|_| o.untrusted && o.max_spool.is_none())
    {
        caps.push(SpoolCap {
            bytes,
            set_by: "temporary copy of an untrusted compressed or piped input (cap: twice the declared virtual size plus 64 MiB; --max-spool sets another)",
        });
    }
    caps.into_iter().min_by_key(|c| c.bytes)
}

/// Creates the writer for `format` that will write an image of `size` bytes to `target`.
pub fn create_writer(
    format: Format,
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let create = driver(format)
        .create
        .ok_or_else(|| unsupported(format, "writing images of this format"))?;
    create(target, size, opts, out)
}

/// Creates the writer for `format` for a source whose length is only known when it ends
/// (a raw disk on a stream that records its length nowhere): the engine tells the writer
/// the size with [`ImageWriter::set_size`] after the last run. Raw (file or stream) and
/// qcow2 can be written so; formats that place size-dependent tables before the data
/// refuse, as does writing into an existing image (`-n`).
pub fn create_writer_unsized(
    format: Format,
    target: &Path,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    if out.is_in_place() {
        return Err(unsupported(
            format,
            "writing into an existing image (-n) from a source of unknown length",
        ));
    }
    let create = driver(format).create_unsized.ok_or_else(|| {
        unsupported(
            format,
            "writing from a source of unknown length (spool it first: open it without OpenOptions::stream_unknown_length)",
        )
    })?;
    create(target, opts, out)
}

/// True when [`create_writer_unsized`] can make a writer for `format` (raw, qcow2), so
/// that a raw stream of unrecorded length need not be spooled before converting to it.
pub fn writes_unsized(format: Format) -> bool {
    driver(format).create_unsized.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_one_driver() {
        for f in Format::ALL {
            assert_eq!(DRIVERS.iter().filter(|d| d.format == f).count(), 1, "{f}");
        }
        assert_eq!(DRIVERS.last().map(|d| d.format), Some(Format::Raw));
    }

    #[test]
    fn probes_magics() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03", b""), Format::Qcow2);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01", b""), Format::Qcow);
        assert_eq!(probe(b"KDMV\x01\0\0\0", b""), Format::Vmdk);
        assert_eq!(probe(b"# Disk DescriptorFile\n", b""), Format::Vmdk);
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe(&vdi, b""), Format::Vdi);
        assert_eq!(probe(b"vhdxfile", b""), Format::Vhdx);
        assert_eq!(probe(b"conectix", b""), Format::Vpc);
        let mut footer = [0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(probe(&[0u8; 4096], &footer), Format::Vpc);
        assert_eq!(probe(b"QED\0", b""), Format::Qed);
        assert_eq!(probe(b"LUKS\xba\xbe\0\x01", b""), Format::Luks);
        assert_eq!(probe(b"", b""), Format::Raw);
        assert_eq!(probe(&[0u8; 512], &[0u8; 512]), Format::Raw);
    }
}
