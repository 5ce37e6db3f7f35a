//! Local images: paths, byte streams and storage, unwrapping compression and tar
//! archives on the way, then handing the bytes to the format's driver from the table.
//! (Remote locations come in through [`crate::open::open`], which sits above this.)
//!
//! Order of probing (magic bytes only, never file names): compression (gzip, bzip2, xz,
//! zstd) on the first bytes of the file, then a tar header on the first (decompressed)
//! bytes, then the disk format. A raw disk inside a compressed stream or a tar member is
//! read straight from the stream ([`StreamDevice`]) when its size is known: from the tar
//! header, or from the xz index or the zstd frame headers of a file. A raw disk whose
//! length is recorded nowhere — on a pipe, in a gzip or bzip2 file (gzip's ISIZE trailer
//! only gives the length modulo 4 GiB of the last member), in zstd frames without a
//! content size — is read straight from the stream too when
//! [`OpenOptions::stream_unknown_length`] asks for it (`convert` into raw or qcow2 does);
//! its size is then found at its end. Every other case is spooled to a sparse temporary
//! file by [`open_stream`]: random-access formats, and a raw disk of
//! unrecorded length otherwise. Either way the compressed data is decoded exactly once;
//! a spooled disk is then converted from the temporary file by all worker threads.
//!
//! `info` on a raw disk in a gzip or bzip2 file therefore decodes the whole file to
//! report the virtual size, counting it without a copy
//! ([`OpenOptions::metadata_only`]); for xz and zstd files it reads only the index or
//! frame headers. Other formats need only their headers, but are spooled whole too, as
//! their metadata may lie anywhere. (qemu-img cannot read compressed files.) A spooled
//! copy stops at `--max-spool` ([`OpenOptions::max_spool`]; untrusted inputs get a
//! default cap, see [`format::spool_cap`]), a raw stream of unrecorded length at
//! `--max-size` ([`OpenOptions::max_size`]).
//!
//! [`StreamDevice`]: crate::io::stream::StreamDevice

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use crate::detect::{probe_compression, probe_tar, Compression, Format, PROBE_LEN};
use crate::error::{Error, Result};
use crate::format;
use crate::image::{Image, OpenContext, OpenOptions, Opened};
use crate::io::compressed::{
    bzip2_file_decoder, decoder, from_io, peek, replay, to_io, uncompressed_size,
};
use crate::io::tar::{self, Entry, StorageInput, StreamInput};
use crate::io::{FileStorage, Storage};

/// How the length of a raw disk inside a stream is found.
enum RawLen {
    /// Recorded by the container.
    Known(u64),
    /// Not recorded (gzip, bzip2, a pipe): the raw disk is spooled, which decodes it
    /// once and learns its length at the end.
    Unknown,
}

fn storage_err(storage: &dyn Storage, e: io::Error) -> Error {
    match storage.path() {
        Some(p) => Error::io(p, e),
        None => Error::Stream(e),
    }
}

/// Opens an image from any byte stream: compressed or not, a tar archive or not. A raw
/// disk in a tar member is read straight from the stream, and so is a raw disk of
/// unknown length with [`OpenOptions::stream_unknown_length`]; otherwise raw disks of
/// unknown length, and formats that need random access, are spooled to a sparse
/// temporary file in `options.tmpdir` (else `$TMPDIR`), removed when the image is
/// dropped.
pub fn open_reader(reader: impl Read + Send + 'static, options: &OpenOptions) -> Result<Image> {
    open_stream_input(Box::new(reader), "(stream)", options)
}

/// The context in which `open` reads the image at `path`: references resolve against its
/// folder (or are refused, as `options` say) and are opened through [`open_storage`].
/// For calling a driver's entry points (check, resize) directly.
pub fn context_for_path(path: &Path, options: &OpenOptions) -> OpenContext {
    OpenContext::for_path(path, options).with_opener(open_storage)
}

/// Opens `storage` as an image: probes (or takes) its format and runs that driver.
/// This is the [`crate::image::Opener`] every context made here carries.
pub fn open_storage(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Image> {
    let format = match ctx.options.format {
        Some(f) => f,
        None => format::probe_storage(storage.as_ref())?,
    };
    let driver = format::driver(format);
    refuse_top_options(format, ctx)?;
    let open = driver
        .open
        .ok_or_else(|| format::unsupported(format, "reading images of this format"))?;
    Ok(Image::from_opened(open(storage, ctx)?))
}

/// Opens an image of `format` from a byte stream (decompressor, pipe, tar member); `len`
/// is the stream's length when the container records it.
///
/// The format's driver reads it straight from the stream, in one pass, when it can
/// (a raw disk of known length, or of unknown length when
/// `ctx.options.stream_unknown_length` asks for it; a streamOptimized VMDK). Everything
/// else is spooled first to a sparse, already unlinked temporary file in
/// `ctx.options.tmpdir` (else `$TMPDIR`) and opened from there.
pub fn open_stream(
    format: Format,
    mut reader: Box<dyn Read + Send>,
    len: Option<u64>,
    ctx: &OpenContext,
) -> Result<Opened> {
    let driver = format::driver(format);
    refuse_top_options(format, ctx)?;
    let open = driver
        .open
        .ok_or_else(|| format::unsupported(format, "reading images of this format"))?;
    if let Some(stream) = driver.open_stream {
        let head = peek(&mut reader, 512).map_err(from_io)?;
        let accepts = (stream.accepts)(&head, len, &ctx.options) && !ctx.options.random_access;
        let reader = replay(head, reader);
        if accepts {
            return (stream.open)(reader, len, ctx);
        }
        return open(spool_stream(format, reader, ctx)?, ctx);
    }
    open(spool_stream(format, reader, ctx)?, ctx)
}

/// Refuses a snapshot selection (`convert -l`) for formats without internal snapshots;
/// it applies to the top image only.
fn refuse_top_options(format: Format, ctx: &OpenContext) -> Result<()> {
    if ctx.depth == 0
        && ctx.options.snapshot.is_some()
        && !format::driver(format).internal_snapshots
    {
        return Err(format::unsupported(format, "internal snapshots"));
    }
    Ok(())
}

/// Spools `reader`, an image of `format`, to a sparse, unlinked temporary file, within
/// the cap its options and its first bytes set ([`format::spool_cap`]).
fn spool_stream(
    format: Format,
    mut reader: Box<dyn Read + Send>,
    ctx: &OpenContext,
) -> Result<Arc<dyn Storage>> {
    let dir = crate::io::spool::spool_dir(ctx.options.tmpdir.as_deref());
    let name = ctx
        .path
        .clone()
        .unwrap_or_else(|| ctx.filename.clone().into());
    let head = peek(&mut reader, PROBE_LEN).map_err(from_io)?;
    let cap = format::spool_cap(format, &head, ctx);
    let mut reader = replay(head, reader);
    Ok(Arc::new(crate::io::spool::spool(
        &mut reader,
        &dir,
        &name,
        cap,
    )?))
}

/// Opens the file at `path`: compressed, tar, or a plain image.
pub fn open_path(path: &Path, options: &OpenOptions) -> Result<Image> {
    use std::os::unix::fs::FileTypeExt;
    let ft = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .file_type();
    if ft.is_fifo() || ft.is_char_device() || ft.is_socket() {
        // A named pipe (`<(curl …)`, /dev/stdin): read it as a stream.
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        return open_stream_input(Box::new(f), &path.display().to_string(), options);
    }
    let ctx = context_for_path(path, options);
    let storage = Arc::new(FileStorage::open_image(path, options.force_share)?);
    let n = storage.len().min(PROBE_LEN as u64) as usize;
    let mut head = vec![0u8; n];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(|e| storage_err(storage.as_ref(), e))?;
    if let Some(c) = probe_compression(&head) {
        let mut img = open_compressed_file(path, storage.file(), storage.len(), c, &ctx)?;
        let info = img.info_mut();
        info.wrapper = Some(c);
        info.actual_size = Some(storage.allocated_bytes());
        return Ok(img);
    }
    if probe_tar(&head) {
        return open_tar_storage(storage, &ctx);
    }
    open_storage(storage, &ctx)
}

fn open_compressed_file(
    path: &Path,
    file: &File,
    len: u64,
    c: Compression,
    ctx: &OpenContext,
) -> Result<Image> {
    let raw_len = match uncompressed_size(c, file, len)? {
        Some(n) => RawLen::Known(n),
        None => RawLen::Unknown,
    };
    // The file already open, not the name again (which may have been swapped since).
    let mut f = file.try_clone().map_err(|e| Error::io(path, e))?;
    {
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
    }
    let mut dec = match c {
        Compression::Bzip2 => bzip2_file_decoder(f, len)?,
        _ => decoder(c, Box::new(f))?,
    };
    let head = peek(&mut dec, PROBE_LEN).map_err(from_io)?;
    let stream = replay(head.clone(), Box::new(dec));
    open_decoded(stream, &head, raw_len, ctx)
}

/// Opens an image from a byte stream (a pipe, stdin, a network body): compressed or
/// not, tar or not, any format. Raw and tar members of known size are read in one pass;
/// other formats are spooled to a sparse temporary file.
pub fn open_stream_input(
    reader: Box<dyn Read + Send>,
    name: &str,
    options: &OpenOptions,
) -> Result<Image> {
    let ctx = OpenContext::detached(name, options).with_opener(open_storage);
    let mut reader = reader;
    let head = peek(&mut reader, PROBE_LEN).map_err(from_io)?;
    let reader = replay(head.clone(), reader);
    match probe_compression(&head) {
        Some(c) => {
            let mut dec = decoder(c, reader)?;
            let head = peek(&mut dec, PROBE_LEN).map_err(from_io)?;
            let stream = replay(head.clone(), Box::new(dec));
            let mut img = open_decoded(stream, &head, RawLen::Unknown, &ctx)?;
            img.info_mut().wrapper = Some(c);
            Ok(img)
        }
        None => open_decoded(reader, &head, RawLen::Unknown, &ctx),
    }
}

/// Opens decompressed bytes (`head` = their first bytes, already replayed in `stream`).
fn open_decoded(
    stream: Box<dyn Read + Send>,
    head: &[u8],
    raw_len: RawLen,
    ctx: &OpenContext,
) -> Result<Image> {
    if probe_tar(head) {
        return open_tar_stream(stream, ctx);
    }
    let format = ctx
        .options
        .format
        .unwrap_or_else(|| format::probe(head, b""));
    let len = match (format, raw_len) {
        (Format::Raw, RawLen::Known(n)) => Some(n),
        _ => None,
    };
    Ok(Image::from_opened(open_stream(format, stream, len, ctx)?))
}

/// Opens the chosen member of an uncompressed tar file in place (a window, no copy).
pub(crate) fn open_tar_storage(storage: Arc<dyn Storage>, ctx: &OpenContext) -> Result<Image> {
    let wanted = ctx.options.member.as_deref();
    let mut input = StorageInput {
        storage: storage.as_ref(),
        pos: 0,
    };
    let e = tar::find_member(&mut input, wanted)?;
    if wanted.is_none() {
        // Skipping is free here: make sure no other image follows.
        tar::skip_data(&mut input, &e, 0)?;
        tar::check_rest(&mut input, &e, false)?;
    }
    let member: Arc<dyn Storage> = if e.kind == tar::EntryKind::Sparse {
        Arc::new(tar::SparseWindow::new(storage.clone(), &e)?)
    } else {
        Arc::new(tar::Window::new(storage.clone(), e.data_offset, e.size)?)
    };
    let mut img = open_storage(member, ctx)?;
    let info = img.info_mut();
    info.archive_member = Some(e.name);
    info.actual_size = Some(storage.allocated_bytes());
    Ok(img)
}

/// Finds the member in a tar stream and opens it from the stream.
fn open_tar_stream(mut stream: Box<dyn Read + Send>, ctx: &OpenContext) -> Result<Image> {
    let wanted = ctx.options.member.clone();
    let mut input = StreamInput {
        reader: &mut stream,
        pos: 0,
    };
    let entry = tar::find_member(&mut input, wanted.as_deref())?;
    let pos = input.pos;
    let member = TarMember {
        inner: stream,
        remaining: entry.size,
        pos,
        entry: entry.clone(),
        check_others: wanted.is_none(),
        done: false,
    };
    let mut member: Box<dyn Read + Send> = if entry.kind == tar::EntryKind::Sparse {
        Box::new(tar::SparseExpand::new(member, &entry))
    } else {
        Box::new(member)
    };
    let head = peek(&mut member, PROBE_LEN).map_err(from_io)?;
    let reader = replay(head.clone(), member);
    let format = ctx
        .options
        .format
        .unwrap_or_else(|| format::probe(&head, b""));
    let len = (format == Format::Raw).then_some(entry.real_size);
    let mut img = Image::from_opened(open_stream(format, reader, len, ctx)?);
    img.info_mut().archive_member = Some(entry.name);
    Ok(img)
}

/// The data of one tar member in a stream. At its end it reads the rest of the archive:
/// another candidate image there is an error (unless the member was named), and the
/// stream is drained so that the decompressor checks its trailing checksums.
struct TarMember {
    inner: Box<dyn Read + Send>,
    remaining: u64,
    pos: u64,
    entry: Entry,
    check_others: bool,
    done: bool,
}

impl TarMember {
    fn finish(&mut self) -> Result<()> {
        let mut input = StreamInput {
            reader: &mut self.inner,
            pos: self.pos,
        };
        tar::skip_data(&mut input, &self.entry, self.entry.size)?;
        let rest = tar::check_rest(&mut input, &self.entry, !self.check_others);
        if matches!(rest, Err(Error::Format(_))) || rest.is_ok() {
            // Drained so that the decompressor checks its trailing checksums (before
            // naming the other images: a damaged stream is the bigger news).
            io::copy(&mut self.inner, &mut io::sink()).map_err(from_io)?;
        }
        rest
    }
}

impl Read for TarMember {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            if !self.done {
                self.done = true;
                self.finish().map_err(to_io)?;
            }
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.remaining) as usize;
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(to_io(Error::corrupt(
                "tar",
                "member data",
                self.pos,
                format!("the archive ends inside member '{}'", self.entry.name),
            )));
        }
        self.remaining -= got as u64;
        self.pos += got as u64;
        Ok(got)
    }
}

#[cfg(all(test, feature = "gzip", feature = "bzip2"))]
mod tests {
    use super::*;
    use crate::io::compressed::DECODERS_STARTED;
    use std::io::Write;

    /// A gzip or bzip2 raw disk is decoded once: spooled, then read from the spool.
    #[test]
    fn gzip_and_bzip2_raw_files_are_decoded_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let mut disk = vec![0u8; 3 << 20];
        for (i, b) in disk[100_000..300_000].iter_mut().enumerate() {
            *b = (i % 253) as u8 | 1;
        }
        disk[(3 << 20) - 1] = 7;
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&disk).unwrap();
            e.finish().unwrap()
        };
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            e.write_all(&disk).unwrap();
            e.finish().unwrap()
        };
        for (name, bytes) in [("d.raw.gz", gz), ("d.raw.bz2", bz)] {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            let options = OpenOptions {
                tmpdir: Some(spool.clone()),
                ..OpenOptions::default()
            };
            DECODERS_STARTED.with(|n| n.set(0));
            let img = open_path(&p, &options).unwrap();
            assert_eq!(DECODERS_STARTED.with(|n| n.get()), 1, "{name}");
            assert_eq!(img.info().virtual_size, disk.len() as u64);
            // Random access (not a sequential-only stream), and the spool is unlinked.
            assert!(!img.device().sequential_only());
            assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
            let mut back = vec![0u8; disk.len()];
            img.device().read_at(&mut back, 0).unwrap();
            assert_eq!(back, disk, "{name}");
            img.device().read_at(&mut back[..10], 5).unwrap();
            assert_eq!(&back[..10], &disk[5..15]);
        }
    }
}
