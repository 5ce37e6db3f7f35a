//! What a format driver is: the entry points one format folder offers to the format table
//! ([`crate::format::DRIVERS`]), and the plain types they take and give.
//!
//! A driver is one `pub const DRIVER: Driver` in its folder's `mod.rs`. Everything a driver
//! does not offer is `None`, and the front door turns that into a typed
//! [`Error::Unsupported`](crate::Error::Unsupported) naming the format and the operation.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use crate::detect::Format;
use crate::error::Result;
use crate::image::{OpenContext, OpenOptions, Opened};
use crate::io::inplace::InPlaceFile;
use crate::io::{OutputSet, Storage};
use crate::limits::MAX_CHECK_MESSAGES;
use crate::writer::{ImageWriter, WriteOptions};

/// Opens an image held in random-access storage.
pub type OpenFn = fn(Arc<dyn Storage>, &OpenContext) -> Result<Opened>;

/// Makes a writer for a new image of a known size (`target`, size, options, outputs).
pub type CreateFn = fn(&Path, u64, &WriteOptions, &mut OutputSet) -> Result<Box<dyn ImageWriter>>;

/// Makes a writer for a new image whose size is set at the end
/// ([`ImageWriter::set_size`]): for sources of unrecorded length.
pub type CreateUnsizedFn = fn(&Path, &WriteOptions, &mut OutputSet) -> Result<Box<dyn ImageWriter>>;

/// Checks an image's metadata.
pub type CheckFn = fn(&CheckRequest<'_>) -> Result<CheckReport>;

/// Checks an image's metadata and repairs what it can (`check -r leaks`) through `file`,
/// the image opened for writing in place (with QEMU's writer locks).
pub type RepairFn = fn(&CheckRequest<'_>, &InPlaceFile) -> Result<CheckReport>;

/// Changes an image's virtual size in place (`path`, new size, shrinking allowed).
pub type ResizeFn = fn(&Path, u64, bool, &OpenContext) -> Result<()>;

/// One format: how it is recognised, read, written, checked and resized.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    /// The format.
    pub format: Format,
    /// Recognises the format by magic bytes: `head` is the first bytes of the file (up to
    /// [`crate::detect::PROBE_LEN`]), `tail` its last bytes (up to 512; empty when the
    /// image is read from a stream, whose end is not known yet).
    pub probe: fn(head: &[u8], tail: &[u8]) -> bool,
    /// Opens the image from random-access storage. `None`: recognised, not read.
    pub open: Option<OpenFn>,
    /// Reads the image straight from a forward-only stream, when its first bytes allow
    /// it; otherwise the front door spools the stream to a temporary file first.
    pub open_stream: Option<StreamReader>,
    /// Writes a new image of a known size.
    pub create: Option<CreateFn>,
    /// Writes a new image whose size is only known at the end.
    pub create_unsized: Option<CreateUnsizedFn>,
    /// Checks the metadata (`check`).
    pub check: Option<CheckFn>,
    /// Checks and repairs (`check -r leaks`).
    pub repair: Option<RepairFn>,
    /// Changes the virtual size in place (`resize`).
    pub resize: Option<ResizeFn>,
    /// Reads internal snapshots ([`OpenOptions::snapshot`]); other drivers refuse the
    /// option at open.
    pub internal_snapshots: bool,
    /// Opens a differencing image on the parent the options name
    /// ([`OpenOptions::parent`]); other drivers refuse the option at open.
    pub explicit_parent: bool,
}

impl Driver {
    /// A driver that recognises `format` with `probe` and does nothing else: probing names
    /// the format (never "raw"), every operation is refused with a typed error.
    pub const fn recognised_only(format: Format, probe: fn(&[u8], &[u8]) -> bool) -> Driver {
        Driver {
            format,
            probe,
            open: None,
            open_stream: None,
            create: None,
            create_unsized: None,
            check: None,
            repair: None,
            resize: None,
            internal_snapshots: false,
            explicit_parent: false,
        }
    }
}

/// Opens an image from a forward-only stream that yields its bytes from the first one;
/// the stream's length when the container records it.
pub type OpenStreamFn = fn(Box<dyn Read + Send>, Option<u64>, &OpenContext) -> Result<Opened>;

/// Reading an image from a forward-only stream (a pipe, a decompressor) in one pass.
#[derive(Debug, Clone, Copy)]
pub struct StreamReader {
    /// True when an image whose first bytes are `head` (and whose decoded length the
    /// container records as `len`, if it does) can be read in one pass with `options`.
    pub accepts: fn(head: &[u8], len: Option<u64>, options: &OpenOptions) -> bool,
    /// Opens it.
    pub open: OpenStreamFn,
}

/// What `check` is asked to do.
pub struct CheckRequest<'a> {
    /// The image's bytes.
    pub storage: Arc<dyn Storage>,
    /// Where the image lives and how to treat its references (extents are opened as the
    /// context allows; backing files are not followed: a check covers one image).
    pub ctx: &'a OpenContext,
}

/// The outcome of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that may lose data (refcount too low, bad entries, metadata out of file).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references.
    pub leaks: u64,
    /// Internal errors while checking (unreadable metadata).
    pub check_errors: u64,
    /// Leaked clusters whose refcount was repaired (`-r leaks`).
    pub leaks_fixed: u64,
    /// A repair was asked for but the refcount structures need a rebuild (a cluster in
    /// use has refcount 0, or a refcount block is bad): nothing was changed.
    pub repair_failed: bool,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with data in this image (normal, compressed, preallocated zero).
    pub allocated_clusters: u64,
    /// Allocated clusters not following the previous one in the file.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, in qemu-img's wording.
    pub messages: Vec<String>,
    /// The check stopped early with this reason (qemu-img's "Check failed: …", exit 1):
    /// VMDK's check gives up at its first bad grain, as QEMU's does.
    pub failed: Option<String>,
}

impl CheckReport {
    /// Adds a problem's message; past [`MAX_CHECK_MESSAGES`] the problems are still
    /// counted (corruptions, leaks) but no longer listed, so that a crafted image with
    /// a billion bad entries cannot fill the memory with messages.
    pub fn message(&mut self, m: String) {
        match self.messages.len() {
            n if n < MAX_CHECK_MESSAGES => self.messages.push(m),
            n if n == MAX_CHECK_MESSAGES => self.messages.push(format!(
                "(more than {MAX_CHECK_MESSAGES} problems: the rest are counted, not listed)"
            )),
            _ => {}
        }
    }

    /// True while messages are still listed (so that a caller can skip formatting one).
    pub fn listing(&self) -> bool {
        self.messages.len() <= MAX_CHECK_MESSAGES
    }

    /// qemu-img's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}
