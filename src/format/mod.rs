//! The format table: one folder per format, dispatched from here and nowhere else.
//!
//! Each format module provides
//! - `open(storage, ctx) -> Result<Opened>`: parse and validate, expose a `BlockDevice`;
//! - `create_writer(target, size, opts, out) -> Result<Box<dyn ImageWriter>>`;
//! - raw and qcow2 also `create_writer_unsized(target, opts, out)`, for a source whose
//!   length is only known at its end.

pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vmdk;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::detect::{probe, Format};
use crate::error::Result;
use crate::image::ImageInfo;
use crate::image::{Image, OpenContext, Opened};
use crate::io::spool::SpoolCap;
use crate::io::{OutputSet, Storage};
use crate::writer::{ImageWriter, WriteOptions};

/// Opens `storage` as an image: probes (or takes) its format and runs that reader.
pub fn open_storage(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Image> {
    let format = match ctx.options.format {
        Some(f) => f,
        None => probe(storage.as_ref())?,
    };
    refuse_snapshot(format, ctx)?;
    let opened: Opened = match format {
        Format::Raw => raw::open(storage, ctx)?,
        Format::Qcow2 => qcow2::open(storage, ctx)?,
        Format::Vmdk => vmdk::open(storage, ctx)?,
        Format::Vdi => vdi::open(storage, ctx)?,
    };
    Ok(Image::from_opened(opened))
}

/// Opens an image of `format` from a byte stream (decompressor, pipe, tar member).
///
/// A raw disk of known length `len` is read straight from the stream, in one pass (a
/// sequential-only device), and so is a streamOptimized VMDK; so is a raw disk of
/// unknown length when `ctx.options.stream_unknown_length` asks for it. Everything else
/// — a raw disk of unknown length otherwise, and formats that need random access to
/// their metadata — is spooled first to a sparse, already unlinked temporary file in `ctx.options.tmpdir`
/// (else `$TMPDIR`).
pub fn open_stream(
    format: Format,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    ctx: &OpenContext,
) -> Result<Opened> {
    refuse_snapshot(format, ctx)?;
    if let (Format::Raw, Some(len)) = (format, len) {
        // The length comes from a header (tar, xz index, zstd frames): bound it before
        // a writer sizes its output after it.
        let limit = crate::limits::MAX_VIRTUAL_SIZE;
        if len > limit {
            return Err(crate::error::Error::TooLarge {
                format: "raw",
                structure: "disk size declared by the container",
                size: len,
                limit,
            });
        }
        let mut reader = reader;
        if len == 0 {
            // Nothing will ever be read: check now that the stream is empty and whole.
            let rest = crate::io::compressed::count(&mut reader)?;
            if rest != 0 {
                return Err(crate::error::Error::Format(format!(
                    "{}: {rest} bytes of data where none were declared",
                    ctx.filename
                )));
            }
        }
        let device = crate::io::stream::StreamDevice::new(reader, len, ctx.filename.clone());
        return Ok(Opened {
            device: Arc::new(device),
            info: ImageInfo::new(ctx.filename.clone(), Format::Raw, len),
        });
    }
    if format == Format::Raw && ctx.options.metadata_only {
        // `info`: the size is all that is needed — decoded and counted, not kept.
        return measured_raw_stream(reader, ctx);
    }
    if format == Format::Raw && ctx.options.stream_unknown_length {
        let device = crate::io::stream::StreamDevice::unknown_length_at_most(
            reader,
            ctx.filename.clone(),
            ctx.options.max_size,
        )?;
        return Ok(Opened {
            device: Arc::new(device),
            // The size is unknown until the stream has been read.
            info: ImageInfo::new(ctx.filename.clone(), Format::Raw, 0),
        });
    }
    let mut reader = reader;
    if format == Format::Vmdk {
        // streamOptimized VMDK is designed to be read in one pass; other VMDK
        // subformats need random access and are spooled.
        let head = crate::io::compressed::peek(&mut reader, 512)
            .map_err(crate::io::compressed::from_io)?;
        let streamable = is_stream_optimized(&head);
        let reader = crate::io::compressed::replay(head, reader);
        if streamable {
            return vmdk::open_stream(reader, ctx);
        }
        return spool_and_open(format, reader, ctx);
    }
    spool_and_open(format, reader, ctx)
}

/// A raw disk on a stream of unrecorded length, measured by decoding it to its end
/// (within `--max-size`): its size, and no data (nothing is written anywhere).
fn measured_raw_stream(mut reader: Box<dyn Read + Send>, ctx: &OpenContext) -> Result<Opened> {
    let limit = ctx
        .options
        .max_size
        .unwrap_or(crate::limits::MAX_VIRTUAL_SIZE);
    let n = crate::io::compressed::count(&mut (&mut reader).take(limit.saturating_add(1)))?;
    if n > limit {
        return Err(crate::error::Error::TooLarge {
            format: "raw",
            structure: if ctx.options.max_size.is_some() {
                "raw disk read from a stream of unrecorded length (cap: --max-size)"
            } else {
                "disk read from a stream"
            },
            size: n,
            limit,
        });
    }
    Ok(Opened {
        device: Arc::new(crate::io::stream::MeasuredDevice::new(
            n,
            ctx.filename.clone(),
        )),
        info: ImageInfo::new(ctx.filename.clone(), Format::Raw, n),
    })
}

/// Refuses a snapshot selection (`convert -l`) for formats without internal snapshots;
/// it applies to the top image only.
fn refuse_snapshot(format: Format, ctx: &OpenContext) -> Result<()> {
    if ctx.depth == 0 && ctx.options.snapshot.is_some() && format != Format::Qcow2 {
        return Err(crate::error::Error::unsupported(
            format.name(),
            "internal snapshots",
        ));
    }
    Ok(())
}

/// True when `head` is a VMDK sparse header with compressed grains and markers (the
/// streamOptimized layout).
fn is_stream_optimized(head: &[u8]) -> bool {
    const COMPRESSED: u32 = 1 << 16;
    const MARKERS: u32 = 1 << 17;
    head.len() >= 12 && head.starts_with(b"KDMV") && {
        let flags = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        flags & (COMPRESSED | MARKERS) == COMPRESSED | MARKERS
    }
}

/// Spools `reader` to a sparse temporary file and opens it as `format`.
fn spool_and_open(
    format: Format,
    reader: Box<dyn Read + Send>,
    ctx: &OpenContext,
) -> Result<Opened> {
    let dir = crate::io::spool::spool_dir(ctx.options.tmpdir.as_deref());
    let name = ctx
        .path
        .clone()
        .unwrap_or_else(|| ctx.filename.clone().into());
    let mut reader = reader;
    let head = crate::io::compressed::peek(&mut reader, crate::detect::PROBE_LEN)
        .map_err(crate::io::compressed::from_io)?;
    let cap = spool_cap(format, &head, ctx);
    let mut reader = crate::io::compressed::replay(head, reader);
    let storage: Arc<dyn Storage> =
        Arc::new(crate::io::spool::spool(&mut reader, &dir, &name, cap)?);
    match format {
        Format::Raw => raw::open(storage, ctx),
        Format::Qcow2 => qcow2::open(storage, ctx),
        Format::Vmdk => vmdk::open(storage, ctx),
        Format::Vdi => vdi::open(storage, ctx),
    }
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
        Format::Raw => None,
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
pub fn default_spool_cap(format: Format, head: &[u8]) -> u64 {
    declared_size(format, head)
        .map_or(0, |v| v.saturating_mul(2))
        .saturating_add(SPOOL_SLACK)
}

/// The cap on the temporary copy of an input of `format` that starts with `head`:
/// `--max-spool`; for a raw disk (its length recorded nowhere) also `--max-size`; for an
/// untrusted image of another format, [`default_spool_cap`].
fn spool_cap(format: Format, head: &[u8], ctx: &OpenContext) -> Option<SpoolCap> {
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
    } else if o.untrusted && o.max_spool.is_none() {
        caps.push(SpoolCap {
            bytes: default_spool_cap(format, head),
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
    match format {
        Format::Raw => raw::create_writer(target, size, opts, out),
        Format::Qcow2 => qcow2::create_writer(target, size, opts, out),
        Format::Vmdk => vmdk::create_writer(target, size, opts, out),
        Format::Vdi => vdi::create_writer(target, size, opts, out),
    }
}

/// Creates the writer for `format` for a source whose length is only known when it ends
/// (a raw disk on a stream that records its length nowhere): the engine tells the writer
/// the size with [`ImageWriter::set_size`] after the last run. Raw (file or stream) and
/// qcow2 can be written so; VMDK and VDI place size-dependent tables before the data and
/// refuse, as does writing into an existing image (`-n`).
pub fn create_writer_unsized(
    format: Format,
    target: &Path,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    if out.is_in_place() {
        return Err(crate::error::Error::unsupported(
            format.name(),
            "writing into an existing image (-n) from a source of unknown length",
        ));
    }
    match format {
        Format::Raw => raw::create_writer_unsized(target, opts, out),
        Format::Qcow2 => qcow2::writer::create_writer_unsized(target, opts, out),
        Format::Vmdk | Format::Vdi => Err(crate::error::Error::unsupported(
            format.name(),
            "writing from a source of unknown length (spool it first: open it without OpenOptions::stream_unknown_length)",
        )),
    }
}

/// True when [`create_writer_unsized`] can make a writer for `format` (raw, qcow2), so
/// that a raw stream of unrecorded length need not be spooled before converting to it.
pub fn writes_unsized(format: Format) -> bool {
    matches!(format, Format::Raw | Format::Qcow2)
}
