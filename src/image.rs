//! Opening images: options, the opened [`Image`], its [`ImageInfo`], and the context a
//! format reader uses to follow references to other files (backing files, extents).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::detect::Format;
use crate::device::{BlockDevice, DeviceReader};
use crate::error::{Error, Result};
use crate::io::{FileStorage, Storage};
use crate::limits::MAX_CHAIN_DEPTH;

/// How to open an image.
///
/// The choice between trusting an image's references to other files and refusing them is
/// explicit: [`OpenOptions::trusted`] (the default, like qemu-img) follows backing files
/// and extent files, resolved against the image's folder; [`OpenOptions::untrusted`]
/// refuses every such reference before reading a byte through it.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, or `None` to probe by magic bytes.
    pub format: Option<Format>,
    /// Refuse references to other files.
    pub untrusted: bool,
    /// Read metadata only (for `info`): references are recorded in [`ImageInfo`] but
    /// not opened, and a raw disk on a stream of unrecorded length is measured by
    /// decoding it, not kept. Reads through a reference, or of such a disk, then fail.
    pub metadata_only: bool,
    /// Folder for spooling compressed inputs that need random access (`$TMPDIR` if unset).
    pub tmpdir: Option<PathBuf>,
    /// Reads a raw disk on a stream that records its length nowhere (gzip, bzip2, a zstd
    /// frame without content size, a pipe) in one pass instead of spooling it: the disk
    /// ends where the stream ends. Such an image is only good for [`crate::convert()`]
    /// into a format that [`crate::format::writes_unsized`] (raw, qcow2): until it has
    /// been read, its size is unknown ([`BlockDevice::length_known`] is false and
    /// [`Image::size`] an upper bound).
    pub stream_unknown_length: bool,
    /// The tar member to open, when the input is a tar archive holding several images.
    pub member: Option<String>,
    /// Most bytes a compressed or piped input may be spooled to a temporary file
    /// (`--max-spool`). Unset, untrusted inputs get twice the virtual size their header
    /// declares plus 64 MiB ([`crate::format::default_spool_cap`]): a stream that goes
    /// on past that is an error, not a bigger temporary file.
    pub max_spool: Option<u64>,
    /// Largest raw disk read from a stream that records its length nowhere
    /// (`--max-size`): decoding stops with an error past it.
    pub max_size: Option<u64>,
    /// The internal snapshot to read instead of the current state of the top image, as
    /// qemu-img's `convert -l`: `snapshot.id=ID`, `snapshot.name=NAME` (or both,
    /// comma-separated), or a bare ID or name (ID first). Formats without internal
    /// snapshots refuse it.
    pub snapshot: Option<String>,
}

impl OpenOptions {
    /// Follows references to other files (backing files, extents), as qemu-img does.
    pub fn trusted() -> Self {
        OpenOptions::default()
    }

    /// Refuses every reference to another file: for images from strangers.
    pub fn untrusted() -> Self {
        OpenOptions {
            untrusted: true,
            ..OpenOptions::default()
        }
    }

    /// Reads a raw stream of unrecorded length in one pass (see the field).
    pub fn stream_unknown_length(mut self) -> Self {
        self.stream_unknown_length = true;
        self
    }

    /// Sets the format instead of probing it.
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }

    /// Spools compressed inputs that need random access into `dir` (`--tmpdir`).
    pub fn tmpdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tmpdir = Some(dir.into());
        self
    }

    /// Caps the temporary copy of a compressed or piped input (`--max-spool`).
    pub fn max_spool(mut self, bytes: u64) -> Self {
        self.max_spool = Some(bytes);
        self
    }

    /// Caps a raw disk read from a stream of unrecorded length (`--max-size`).
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = Some(bytes);
        self
    }

    /// Opens the tar member `name` when the input is a tar archive (`--member`).
    pub fn member(mut self, name: impl Into<String>) -> Self {
        self.member = Some(name.into());
        self
    }

    /// Reads the internal snapshot `id_or_name` of the top image (`convert -l`).
    pub fn snapshot(mut self, id_or_name: impl Into<String>) -> Self {
        self.snapshot = Some(id_or_name.into());
        self
    }

    /// Records references without opening them (see [`OpenOptions::metadata_only`]).
    pub fn metadata_only(mut self) -> Self {
        self.metadata_only = true;
        self
    }
}

/// An internal snapshot, as `info` lists it (qemu-img's JSON names).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Snapshot ID.
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock when taken, seconds.
    pub vm_clock_sec: u64,
    /// Guest clock when taken, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// A reference from an image to another file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileReference {
    /// The header field or descriptor line it came from, e.g. `backing file`.
    pub field: String,
    /// The name as written in the image.
    pub name: String,
}

/// Everything `imgconv info` prints about an image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file name as given.
    pub filename: String,
    /// The (inner) format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the image occupies on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// Cluster, grain or block size, where the format has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// True when the image says it was not closed cleanly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_flag: Option<bool>,
    /// The backing file's name as written in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing file's path as resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing file's format as written in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Format-specific details in qemu-img's shape: `{"type": FMT, "data": {...}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<serde_json::Value>,
    /// Compression wrapping the image file (`gzip`, `xz`…), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// The tar archive member holding the image, when the input is a tar archive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_member: Option<String>,
    /// Every reference to another file found in the image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<FileReference>,
    /// The backing image's info, when it was opened.
    #[serde(skip)]
    pub backing: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// Info with only the basics filled in.
    pub fn new(filename: impl Into<String>, format: Format, virtual_size: u64) -> Self {
        ImageInfo {
            filename: filename.into(),
            format,
            virtual_size,
            actual_size: None,
            cluster_size: None,
            dirty_flag: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            format_specific: None,
            compression: None,
            archive_member: None,
            references: Vec::new(),
            backing: None,
        }
    }
}

/// What a format reader returns from its `open`.
pub struct Opened {
    /// The virtual disk (with any backing chain underneath).
    pub device: Arc<dyn BlockDevice>,
    /// What `info` shows.
    pub info: ImageInfo,
}

/// An open image: a [`BlockDevice`] plus what is known about it.
#[derive(Clone)]
pub struct Image {
    device: Arc<dyn BlockDevice>,
    info: ImageInfo,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("info", &self.info).finish()
    }
}

impl Image {
    /// Wraps an opened device.
    pub fn from_opened(o: Opened) -> Self {
        Image {
            device: o.device,
            info: o.info,
        }
    }

    /// The (inner) format.
    pub fn format(&self) -> Format {
        self.info.format
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// Everything `info` shows.
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// Mutable info (the compression layer adds its wrapper name).
    pub fn info_mut(&mut self) -> &mut ImageInfo {
        &mut self.info
    }

    /// The virtual disk.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// `Read + Seek` over the guest-visible bytes.
    pub fn reader(&self) -> DeviceReader<Arc<dyn BlockDevice>> {
        DeviceReader::new(self.device.clone())
    }
}

/// What a format reader knows while opening: the options, where the image lives, and
/// how deep in a backing chain it is.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The options the user gave.
    pub options: OpenOptions,
    /// The image's folder (references resolve against it), if it is a file.
    pub dir: Option<PathBuf>,
    /// The image's own path, if it is a file.
    pub path: Option<PathBuf>,
    /// The name as the user (or the referring image) gave it.
    pub filename: String,
    /// 0 for the top image, 1 for its backing file, and so on.
    pub depth: u32,
    /// Canonical paths of the images above this one (loop detection).
    pub chain: Vec<PathBuf>,
}

impl OpenContext {
    /// Context for the top image at `path`.
    pub fn for_path(path: &Path, options: &OpenOptions) -> Self {
        let dir = path.parent().map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        });
        OpenContext {
            options: options.clone(),
            dir,
            path: Some(path.to_path_buf()),
            filename: path.display().to_string(),
            depth: 0,
            chain: path.canonicalize().into_iter().collect(),
        }
    }

    /// Context for an image that is not a file (memory, a pipe): it has no folder, so any
    /// relative reference is refused.
    pub fn detached(name: &str, options: &OpenOptions) -> Self {
        OpenContext {
            options: options.clone(),
            dir: None,
            path: None,
            filename: name.to_string(),
            depth: 0,
            chain: Vec::new(),
        }
    }

    /// Resolves a reference to another file, or refuses it in untrusted mode.
    ///
    /// `format` and `field` name where the reference came from, for the error.
    pub fn resolve_reference(
        &self,
        format: &'static str,
        field: &'static str,
        name: &str,
    ) -> Result<PathBuf> {
        if self.options.untrusted {
            return Err(Error::UntrustedReference {
                format,
                field,
                reference: name.to_string(),
            });
        }
        if name.is_empty() {
            return Err(Error::corrupt(format, field, 0, "empty file name"));
        }
        let p = Path::new(name);
        if p.is_absolute() {
            return Ok(p.to_path_buf());
        }
        match &self.dir {
            Some(d) => Ok(d.join(p)),
            None => Err(Error::Format(format!(
                "{format}: {field} {name:?} is relative, but the image has no folder to resolve it against"
            ))),
        }
    }

    /// True when `path` is this image's own file (a monolithic VMDK names itself).
    pub fn is_self(&self, path: &Path) -> bool {
        match (&self.path, path.canonicalize()) {
            (Some(own), Ok(other)) => own.canonicalize().map(|o| o == other).unwrap_or(false),
            _ => false,
        }
    }

    /// Opens a file the image refers to (an extent, a data file) as storage.
    pub fn open_reference(
        &self,
        format: &'static str,
        field: &'static str,
        name: &str,
    ) -> Result<Arc<dyn Storage>> {
        let path = self.resolve_reference(format, field, name)?;
        Ok(Arc::new(FileStorage::open(&path)?))
    }

    /// Opens the backing image `name` (format `fmt`, or probed), one level deeper.
    ///
    /// Returns `None` in metadata-only mode, where references are recorded, not opened.
    pub fn open_backing(
        &self,
        format: &'static str,
        field: &'static str,
        name: &str,
        fmt: Option<Format>,
    ) -> Result<Option<Image>> {
        if self.options.metadata_only {
            return Ok(None);
        }
        let path = self.resolve_reference(format, field, name)?;
        let here = self.path.clone().unwrap_or_default();
        if self.depth + 1 >= MAX_CHAIN_DEPTH {
            return Err(Error::BackingChain {
                path: here,
                reason: format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
            });
        }
        let canon = path.canonicalize().map_err(|e| Error::io(&path, e))?;
        if self.chain.contains(&canon) {
            return Err(Error::BackingChain {
                path: here,
                reason: format!("backing file {} loops back into the chain", path.display()),
            });
        }
        let mut ctx = OpenContext::for_path(&path, &self.options);
        ctx.options.format = fmt;
        ctx.filename = path.display().to_string();
        ctx.depth = self.depth + 1;
        ctx.chain = self.chain.clone();
        ctx.chain.push(canon);
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&path)?);
        crate::format::open_storage(storage, &ctx).map(Some)
    }
}

/// Opens the image at `path`: finds its format (unless `options` names it) and returns the
/// virtual disk with its backing chain.
///
/// Compressed files (gzip, bzip2, xz, zstd) and tar archives are unwrapped first, found
/// by magic bytes; `options.format` then names the inner format. The path `-` reads
/// standard input (see [`open_reader`]).
pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image> {
    let path = path.as_ref();
    if path.as_os_str() == "-" {
        return crate::io::source::open_stream_input(Box::new(std::io::stdin()), "-", options);
    }
    crate::io::source::open_path(path, options)
}

/// Opens an image from any byte stream: compressed or not, a tar archive or not. A raw
/// disk in a tar member is read straight from the stream, and so is a raw disk of
/// unknown length with [`OpenOptions::stream_unknown_length`]; otherwise raw disks of
/// unknown length, and formats that need random access, are spooled to a sparse
/// temporary file in `options.tmpdir` (else `$TMPDIR`), removed when the image is
/// dropped.
pub fn open_reader(
    reader: impl std::io::Read + Send + 'static,
    options: &OpenOptions,
) -> Result<Image> {
    crate::io::source::open_stream_input(Box::new(reader), "(stream)", options)
}
