//! raw: the disk's bytes, nothing else.
//!
//! Reading reports holes of sparse files (`SEEK_DATA` / `SEEK_HOLE`) as zero extents.
//! Writing skips zero ranges, so the output is as sparse as the source or sparser. Sizes
//! are kept byte-exact (qemu-img rounds a raw size up to 512; imgconv does not).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::detect::Format;
use crate::device::{check_bounds, clamp_map_request, BlockDevice, Extent, ExtentKind};
use crate::driver::{Driver, StreamReader};
use crate::error::{Error, Result};
use crate::image::{ImageInfo, OpenContext, Opened};
use crate::io::stream::StreamDevice;
use crate::io::{fallocate, write_all_at, AllocateAhead, OutputSet, Storage};
use crate::limits::MAX_VIRTUAL_SIZE;
use crate::writer::{DataRun, ImageWriter, WriteOptions};

/// A raw image as a block device.
pub struct RawDevice {
    storage: Arc<dyn Storage>,
}

impl RawDevice {
    /// The device over `storage`.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        RawDevice { storage }
    }
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.storage.len()
    }

    fn plain_file(&self) -> Option<&File> {
        self.storage.plain_file()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_bounds(offset, buf.len() as u64, self.size())?;
        self.storage
            .read_exact_at(buf, offset)
            .map_err(|e| match self.storage.path() {
                Some(p) => Error::io(p, e),
                None => Error::Stream(e),
            })
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let len = clamp_map_request(offset, len, self.size())?;
        let (kind, end) = match self.storage.segment(offset) {
            Some((true, end)) => (ExtentKind::Data, end),
            Some((false, end)) => (ExtentKind::Zero, end),
            None => (ExtentKind::Data, offset + len),
        };
        let mut e = Extent::new(offset, (end - offset).clamp(1, len), kind);
        if kind == ExtentKind::Data {
            e.host_offset = Some(offset);
        }
        Ok(e)
    }
}

/// The raw driver: every file is a raw disk (probed last), read from storage or straight
/// from a stream, written to files or streams, of known or unknown size.
pub const DRIVER: Driver = Driver {
    format: Format::Raw,
    probe: |_, _| true,
    open: Some(open),
    open_stream: Some(StreamReader {
        accepts: |_, len, options| {
            len.is_some() || options.stream_unknown_length || options.metadata_only
        },
        open: open_stream,
    }),
    create: Some(create_writer),
    create_unsized: Some(create_writer_unsized),
    check: None,
    repair: None,
    resize: Some(|path, size, _shrink, _ctx| resize(path, size)),
    internal_snapshots: false,
    explicit_parent: false,
};

/// Opens a raw image (any file is one).
pub fn open(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Opened> {
    let mut info = ImageInfo::new(ctx.filename.clone(), Format::Raw, storage.len());
    info.actual_size = Some(storage.allocated_bytes());
    Ok(Opened {
        device: Arc::new(RawDevice::new(storage)),
        info,
    })
}

/// Reads a raw disk straight from a stream, in one pass: of length `len` when the
/// container records it (tar, xz index, zstd frame headers), else (with
/// [`crate::image::OpenOptions::stream_unknown_length`]) until the stream ends, within
/// `--max-size`. For `info` ([`crate::image::OpenOptions::metadata_only`]) a stream of
/// unrecorded length is only measured: decoded to its end, its data not kept.
pub fn open_stream(
    mut reader: Box<dyn Read + Send>,
    len: Option<u64>,
    ctx: &OpenContext,
) -> Result<Opened> {
    let name = ctx.filename.clone();
    if len.is_none() && ctx.options.metadata_only {
        return measured_stream(reader, ctx);
    }
    let Some(len) = len else {
        let device =
            StreamDevice::unknown_length_at_most(reader, name.clone(), ctx.options.max_size)?;
        // The size is unknown until the stream has been read.
        let info = ImageInfo::new(name, Format::Raw, 0);
        return Ok(Opened {
            device: Arc::new(device),
            info,
        });
    };
    // The length comes from a header: bound it before a writer sizes its output after it.
    if len > MAX_VIRTUAL_SIZE {
        return Err(Error::TooLarge {
            format: "raw",
            structure: "disk size declared by the container",
            size: len,
            limit: MAX_VIRTUAL_SIZE,
        });
    }
    if len == 0 {
        // Nothing will ever be read: check now that the stream is empty and whole.
        let rest = crate::io::compressed::count(&mut reader)?;
        if rest != 0 {
            return Err(Error::Format(format!(
                "{name}: {rest} bytes of data where none were declared"
            )));
        }
    }
    Ok(Opened {
        device: Arc::new(StreamDevice::new(reader, len, name.clone())),
        info: ImageInfo::new(name, Format::Raw, len),
    })
}

/// A raw disk on a stream of unrecorded length, measured by decoding it to its end
/// (within `--max-size`): its size, and no data (nothing is written anywhere).
fn measured_stream(mut reader: Box<dyn Read + Send>, ctx: &OpenContext) -> Result<Opened> {
    let limit = ctx.options.max_size.unwrap_or(MAX_VIRTUAL_SIZE);
    let n = crate::io::compressed::count(&mut (&mut reader).take(limit.saturating_add(1)))?;
    if n > limit {
        return Err(Error::TooLarge {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Off,
    Falloc,
    Full,
}

enum Sink {
    File { file: File, path: PathBuf },
    Stream { w: Box<dyn Write + Send>, pos: u64 },
}

/// Writes raw images: sparse files, or a byte stream (stdout).
pub struct RawWriter {
    sink: Sink,
    size: u64,
    /// Made for a source of unknown length: `set_size` sets the file's length.
    size_pending: bool,
    in_place: bool,
    /// Data ranges are allocated just before they are written (a fresh file without
    /// preallocation).
    allocate_ahead: AllocateAhead,
    prealloc: Prealloc,
}

/// Creates a raw writer for `target` (or the output stream of `out`).
pub fn create_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(new_writer(target, size, opts, out)?))
}

/// Creates a raw writer whose size is set at the end ([`ImageWriter::set_size`]).
pub fn create_writer_unsized(
    target: &Path,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<Box<dyn ImageWriter>> {
    let mut w = new_writer(target, 0, opts, out)?;
    w.size_pending = true;
    Ok(Box::new(w))
}

fn new_writer(
    target: &Path,
    size: u64,
    opts: &WriteOptions,
    out: &mut OutputSet,
) -> Result<RawWriter> {
    let mut opts = opts.clone();
    let prealloc = match opts.take("preallocation").as_deref() {
        None | Some("off") => Prealloc::Off,
        Some("falloc") => Prealloc::Falloc,
        Some("full") => Prealloc::Full,
        Some(v) => {
            return Err(Error::invalid(format!(
                "raw: preallocation '{v}' is not one of off, falloc, full"
            )))
        }
    };
    opts.reject_unknown(Format::Raw)?;
    if opts.backing_file.is_some() {
        return Err(Error::invalid("raw images cannot have a backing file"));
    }
    if opts.compressed {
        return Err(Error::unsupported("raw", "compression (-c)"));
    }
    let in_place = out.is_in_place();
    let sink = match out.take_stream() {
        Some(w) => Sink::Stream { w, pos: 0 },
        None => {
            let file = out.create(target)?;
            let path = target.to_path_buf();
            if in_place {
                let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
                let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(true);
                if is_file && len < size {
                    return Err(Error::invalid(format!(
                        "{}: output file is smaller than input file ({len} < {size})",
                        path.display()
                    )));
                }
            } else {
                file.set_len(size).map_err(|e| Error::io(&path, e))?;
                if prealloc != Prealloc::Off && size > 0 {
                    fallocate(&file, 0, 0, size).map_err(|e| Error::io(&path, e))?;
                }
            }
            Sink::File { file, path }
        }
    };
    let allocate_ahead = AllocateAhead::new(
        matches!(sink, Sink::File { .. }) && !in_place && prealloc == Prealloc::Off,
    );
    Ok(RawWriter {
        sink,
        size,
        size_pending: false,
        in_place,
        prealloc,
        allocate_ahead,
    })
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

fn write_zero_bytes(
    w: &mut dyn FnMut(&[u8], u64) -> Result<()>,
    offset: u64,
    len: u64,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        w(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl RawWriter {
    fn stream_to(&mut self, offset: u64) -> Result<()> {
        if let Sink::Stream { w, pos } = &mut self.sink {
            while *pos < offset {
                let n = (offset - *pos).min(ZEROS.len() as u64) as usize;
                w.write_all(&ZEROS[..n])?;
                *pos += n as u64;
            }
        }
        Ok(())
    }
}

impl ImageWriter for RawWriter {
    fn grain_size(&self) -> u64 {
        512
    }

    fn write_data(&mut self, run: DataRun<'_>) -> Result<()> {
        match &mut self.sink {
            Sink::File { file, path } => {
                let len = run.data.len() as u64;
                self.allocate_ahead.before_write(file, run.offset, len);
                write_all_at(file, run.data, run.offset, path)
            }
            Sink::Stream { .. } => {
                self.stream_to(run.offset)?;
                if let Sink::Stream { w, pos } = &mut self.sink {
                    w.write_all(run.data)?;
                    *pos += run.data.len() as u64;
                }
                Ok(())
            }
        }
    }

    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()> {
        match &mut self.sink {
            Sink::File { file, path } => {
                if self.in_place {
                    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    if fallocate(file, PUNCH, offset, len).is_ok() {
                        return Ok(());
                    }
                } else if self.prealloc != Prealloc::Full {
                    return Ok(()); // a new file reads as zeros already
                }
                let (file, path) = (&*file, path.clone());
                write_zero_bytes(&mut |b, o| write_all_at(file, b, o, &path), offset, len)
            }
            Sink::Stream { .. } => Ok(()), // gaps are filled by the next write or finish
        }
    }

    fn copy_range_supported(&self) -> bool {
        matches!(self.sink, Sink::File { .. })
    }

    fn copy_range(&mut self, src: &File, src_offset: u64, offset: u64, len: u64) -> Result<()> {
        let Sink::File { file, path } = &mut self.sink else {
            return Err(Error::Format(
                "internal error: copy offloading into a stream".into(),
            ));
        };
        self.allocate_ahead.before_write(file, offset, len);
        crate::io::copy_range(src, src_offset, file, offset, len).map_err(|e| Error::io(&*path, e))
    }

    fn set_size(&mut self, size: u64) -> Result<()> {
        if !self.size_pending {
            return Err(Error::Format(
                "internal error: raw writer given its size twice".into(),
            ));
        }
        self.size_pending = false;
        self.size = size;
        if let Sink::File { file, path } = &self.sink {
            file.set_len(size).map_err(|e| Error::io(path, e))?;
            if self.prealloc != Prealloc::Off && size > 0 {
                fallocate(file, 0, 0, size).map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.size_pending {
            return Err(Error::Format(
                "internal error: raw writer finished without its size".into(),
            ));
        }
        let size = self.size;
        self.stream_to(size)?;
        match &mut self.sink {
            // No fdatasync, like `qemu-img convert` (cache=unsafe) and `cp`: it doubled the
            // time of a conversion. The rename on commit guards against interruption.
            Sink::File { .. } => Ok(()),
            Sink::Stream { w, .. } => Ok(w.flush()?),
        }
    }
}

/// Changes the size of the raw image at `path` to `new_size` bytes (a shrink cuts off
/// the data beyond the new end; the caller asks for consent first).
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    let f = crate::io::inplace::InPlaceFile::open(path)?;
    f.set_len(new_size)?;
    f.sync()
}

/// A raw image written in place (the base image of `commit`): writes go straight to
/// the file, which holds QEMU's writer locks; `finish` flushes them.
pub struct RawInPlace {
    file: crate::io::inplace::InPlaceFile,
    size: u64,
}

impl RawInPlace {
    /// Opens the raw image at `path` for writing in place.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::io::inplace::InPlaceFile::open(path)?;
        let size = file.file_len()?;
        Ok(RawInPlace { file, size })
    }
}

impl crate::writer::InPlaceWriter for RawInPlace {
    fn size(&self) -> u64 {
        self.size
    }

    fn grain_size(&self) -> u64 {
        512
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        if size > self.size {
            self.file.set_len(size)?;
            self.size = size;
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        crate::device::check_bounds(offset, data.len() as u64, self.size)?;
        self.file.write_at(data, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        crate::device::check_bounds(offset, len, self.size)?;
        self.file.zero_range(offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    #[test]
    fn reads_memory_as_raw() {
        let dev = RawDevice::new(Arc::new(MemStorage::new(vec![7u8; 1000])));
        assert_eq!(dev.size(), 1000);
        let mut b = [0u8; 10];
        dev.read_at(&mut b, 990).unwrap();
        assert_eq!(b, [7u8; 10]);
        assert!(dev.read_at(&mut b, 991).is_err());
        let e = dev.map(0, 5000).unwrap();
        assert_eq!((e.len, e.kind), (1000, ExtentKind::Data));
    }

    #[test]
    fn refuses_unknown_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = WriteOptions::default();
        o.parse_o("cluster_size=4k").unwrap();
        let mut out = OutputSet::new();
        assert!(create_writer(&dir.path().join("x"), 10, &o, &mut out).is_err());
    }
}
