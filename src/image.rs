//! Opening images: options, the opened [`Image`], its [`ImageInfo`], and the context a
//! format reader uses to follow references to other files (backing files, extents).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::details::FormatDetails;
use crate::detect::{Compression, Format};
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
    /// decoding it, not kept. [`BlockDevice::map`] still describes the image itself
    /// (what falls through to an unopened backing file is `Unallocated`); a read that
    /// needs a reference fails with [`Error::NotOpened`], and so does reading such a disk.
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
    /// Makes every image readable in any order: a source that can only be read forward
    /// (a raw disk or a streamOptimized VMDK arriving through a pipe or a compressed
    /// file) is decoded once into a sparse, already unlinked temporary file in
    /// [`tmpdir`](Self::tmpdir) (else `$TMPDIR`), which is gone when the image is dropped.
    pub random_access: bool,
    /// The internal snapshot to read instead of the current state of the top image, as
    /// qemu-img's `convert -l`: `snapshot.id=ID`, `snapshot.name=NAME` (or both,
    /// comma-separated), or a bare ID or name (ID first). Formats without internal
    /// snapshots refuse it.
    pub snapshot: Option<String>,
    /// Opens image files without QEMU's read locks and without asking whether another
    /// process writes them (qemu-img's `-U` / `--force-share`); see [`crate::io::lock`].
    pub force_share: bool,
    /// The parent of a differencing image, instead of the one the image finds itself: a
    /// name resolved like the image's own references (against its folder) and refused in
    /// untrusted mode. For VDI, whose parent is otherwise looked for by UUID. Applies to
    /// the top image; formats that cannot take it refuse it at open.
    pub parent: Option<String>,
    /// How to reach an image that is a URL (`http(s)://`, `docker://`, `oci:`): headers,
    /// TLS roots, credentials, timeouts, platform.
    pub remote: crate::io::remote::RemoteOptions,
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

    /// Reads without taking or testing QEMU's image locks (`-U`, see the field).
    pub fn force_share(mut self) -> Self {
        self.force_share = true;
        self
    }

    /// Spools forward-only sources so that the image can be read in any order (see
    /// [`OpenOptions::random_access`]).
    pub fn random_access(mut self) -> Self {
        self.random_access = true;
        self
    }

    /// Opens a differencing image on the parent `name` (see [`OpenOptions::parent`]).
    pub fn parent(mut self, name: impl Into<String>) -> Self {
        self.parent = Some(name.into());
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
    /// Format-specific details (serialised in qemu-img's shape: `{"type": FMT, "data":
    /// {...}}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatDetails>,
    /// The compression wrapped around the image file (`gzip`, `bzip2`, `xz`, `zstd`), if
    /// any — not compressed clusters inside the image (`compression` in `info`'s JSON).
    #[serde(rename = "compression", skip_serializing_if = "Option::is_none")]
    pub wrapper: Option<Compression>,
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
            wrapper: None,
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
    ///
    /// An image read straight from a stream (a raw disk or a streamOptimized VMDK in a
    /// pipe or a compressed file: [`BlockDevice::sequential_only`] is true) can only be
    /// read forward, once: a backward seek then fails with
    /// [`Error::Unsupported`] (and so does a second
    /// conversion of it). Open it with [`OpenOptions::random_access`] to read it in any
    /// order, as often as you like. Errors come out as [`std::io::Error`]s that carry
    /// the crate's [`Error`]: `imgconv::Error::from(io_error)` gives it back.
    pub fn reader(&self) -> DeviceReader<Arc<dyn BlockDevice>> {
        DeviceReader::new(self.device.clone())
    }

    /// The extents of the virtual disk, from offset 0 to its end (data, zeros,
    /// unallocated), as [`BlockDevice::map`] describes them.
    pub fn extents(&self) -> crate::device::Extents<'_> {
        crate::device::extents(self.device.as_ref())
    }

    /// An image over any [`BlockDevice`] of your own (a raw disk, as far as `info` and
    /// the writers are concerned): to convert it, read it, or walk its extents.
    pub fn from_device(device: impl BlockDevice + 'static) -> Self {
        let size = device.size();
        Image {
            device: Arc::new(device),
            info: ImageInfo::new("(device)", Format::Raw, size),
        }
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
    /// Canonical paths of the images above this one (loop detection); URLs as given.
    pub chain: Vec<PathBuf>,
    /// The image's URL, when it was opened from a web server: references resolve
    /// against it (same origin only) instead of a folder.
    pub base_url: Option<String>,
    /// Opens the images this one refers to (backing files, parents): the front door's
    /// `open_storage`, handed down so that a format driver never calls the layer above
    /// it. `None` in a context made outside the front door: references are then refused.
    pub opener: Option<Opener>,
}

/// Opens an image from storage in a given context: probes (or takes) its format and runs
/// that format's driver. The front door fills [`OpenContext::opener`] with it.
pub type Opener = fn(Arc<dyn Storage>, &OpenContext) -> Result<Image>;

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
            opener: None,
            base_url: None,
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
            opener: None,
            base_url: None,
        }
    }

    /// Context for the top image at `url` (a web server), `shown` without credentials:
    /// references resolve against the URL, same origin only.
    pub fn for_url(url: &str, shown: &str, options: &OpenOptions) -> Self {
        let mut ctx = Self::detached(shown, options);
        ctx.base_url = Some(url.to_string());
        ctx.chain.push(PathBuf::from(url));
        ctx
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
        if let Some(base) = &self.base_url {
            return crate::io::remote::resolve_url(base, name)
                .map(PathBuf::from)
                .map_err(|reason| Error::Format(format!("{format}: {field} {name:?}: {reason}")));
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
        if let Some(base) = &self.base_url {
            return path.to_str() == Some(base.as_str());
        }
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
        if self.base_url.is_some() {
            return self.open_url_storage(&path);
        }
        Ok(Arc::new(FileStorage::open_image(
            &path,
            self.options.force_share,
        )?))
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
        let canon = if self.base_url.is_some() {
            path.clone()
        } else {
            path.canonicalize().map_err(|e| Error::io(&path, e))?
        };
        if self.chain.contains(&canon) {
            return Err(Error::BackingChain {
                path: here,
                reason: format!("backing file {} loops back into the chain", path.display()),
            });
        }
        let mut ctx = if self.base_url.is_some() {
            let url = path.to_string_lossy();
            OpenContext::for_url(&url, &crate::io::remote::redact(&url), &self.options)
        } else {
            OpenContext::for_path(&path, &self.options)
        };
        ctx.options.format = fmt;
        if self.base_url.is_none() {
            // Named as qemu names it: the referring image's folder as written, then the
            // name (`base.qcow2`, `dir/base.qcow2`, never `./base.qcow2`).
            ctx.filename = match self.filename.rfind('/') {
                _ if Path::new(name).is_absolute() => name.to_string(),
                Some(i) => format!("{}{name}", &self.filename[..=i]),
                None => name.to_string(),
            };
        }
        ctx.depth = self.depth + 1;
        ctx.chain = self.chain.clone();
        ctx.chain.push(canon);
        ctx.opener = self.opener;
        let opener = self.opener.ok_or_else(|| {
            Error::Format(format!(
                "{format}: {field} {name:?} cannot be opened from this context (made outside imgconv::open)"
            ))
        })?;
        let storage: Arc<dyn Storage> = if self.base_url.is_some() {
            self.open_url_storage(&path)?
        } else {
            Arc::new(FileStorage::open_image(&path, self.options.force_share)?)
        };
        opener(storage, &ctx).map(Some)
    }

    /// Opens a file on the web server the image came from, with range requests.
    #[cfg(feature = "http")]
    fn open_url_storage(&self, url: &Path) -> Result<Arc<dyn Storage>> {
        crate::io::http::open_storage(&url.to_string_lossy(), &self.options.remote)
    }

    #[cfg(not(feature = "http"))]
    fn open_url_storage(&self, _url: &Path) -> Result<Arc<dyn Storage>> {
        Err(Error::unsupported(
            "http",
            "URLs (built without the `http` feature)",
        ))
    }

    /// This context with `opener` to follow references.
    pub fn with_opener(mut self, opener: Opener) -> Self {
        self.opener = Some(opener);
        self
    }
}
