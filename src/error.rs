//! The one error type of the crate.
//!
//! Every error that comes from an image's bytes names the format, the structure and the
//! offset where the problem was found, so that a person (or an import service's log) can
//! tell what was wrong without a hex editor.

use std::io;
use std::path::PathBuf;

/// Result type of every fallible function in the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, reading, writing or converting an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file the error happened on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An operating-system error not tied to a named file (pipes, in-memory buffers).
    /// (An [`io::Error`] that carries an [`Error`], as [`crate::DeviceReader`] makes them,
    /// converts back to that error, not to this variant.)
    #[error("{0}")]
    Stream(io::Error),

    /// The image's metadata is malformed.
    #[error("{format}: invalid {structure} at offset {offset:#x}: {reason}")]
    Corrupt {
        /// Format name, e.g. `qcow2`.
        format: &'static str,
        /// The on-disk structure, e.g. `L2 table`.
        structure: &'static str,
        /// Byte offset of the structure (or of the bad field) in its file.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The image uses a feature this version of imgconv does not implement.
    #[error("{format}: unsupported feature: {feature}")]
    Unsupported {
        /// Format name.
        format: &'static str,
        /// The feature, e.g. `encryption (LUKS)`.
        feature: String,
    },

    /// In untrusted mode, the image refers to another file; nothing was read through it.
    #[error("{format}: refusing to follow {field} {reference:?} (untrusted input)")]
    UntrustedReference {
        /// Format name.
        format: &'static str,
        /// The header field or descriptor line the reference came from.
        field: &'static str,
        /// The file name as written in the image.
        reference: String,
    },

    /// A backing chain is longer than [`crate::limits::MAX_CHAIN_DEPTH`] or loops.
    #[error("backing chain error at {}: {reason}", path.display())]
    BackingChain {
        /// The image whose backing file could not be used.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// A metadata structure would need more memory than the file can justify.
    #[error("{format}: {structure} too large ({size} bytes, limit {limit})")]
    TooLarge {
        /// Format name.
        format: &'static str,
        /// The structure.
        structure: &'static str,
        /// Size it asked for.
        size: u64,
        /// The limit it exceeded.
        limit: u64,
    },

    /// A file to be read as an image (a backing file, an extent, a data file, a parent
    /// candidate) is not a regular file or a block device: FIFOs, sockets, character
    /// devices and directories are refused before a byte is read (a FIFO could hang the
    /// reader, a device could be anything).
    #[error("{}: is a {kind}, not a regular file or block device (refused)", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
        /// What it is instead: `FIFO`, `socket`, `character device`, `directory`.
        kind: &'static str,
    },

    /// A read or write outside the virtual disk.
    #[error("access at offset {offset:#x} length {len} is outside the {size}-byte disk")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual size.
        size: u64,
    },

    /// The input is not what was asked for or promised: not in the format asked for, a
    /// stream longer or shorter than declared, a device that broke its contract.
    #[error("{0}")]
    Format(String),

    /// A bad `-o` option, size or other user-given parameter.
    #[error("{0}")]
    InvalidArgument(String),

    /// A remote source or target (HTTP(S), a container registry) failed: a status the
    /// server answered with, or a transfer that could not be completed. The URL is
    /// printed without credentials or query string.
    #[error("{url}: {}{reason}", status.map(|s| format!("HTTP {s}: ")).unwrap_or_default())]
    Http {
        /// The URL (user, password and query removed).
        url: String,
        /// The HTTP status, when the server answered with one.
        status: Option<u16>,
        /// What went wrong.
        reason: String,
    },

    /// The operation was interrupted (Ctrl-C / SIGTERM) or cancelled by the caller.
    #[error("interrupted")]
    Interrupted,

    /// Another process holds the image in a conflicting way (QEMU's image locking);
    /// the message is QEMU's.
    #[error("Failed to get {what} lock\nIs another process using the image [{}]?", path.display())]
    Locked {
        /// The image file.
        path: PathBuf,
        /// The permission, as QEMU words it: `"write"` or `shared "write"`.
        what: String,
    },

    /// A read needs a file the image refers to (a backing file, an extent, a data file)
    /// that was not opened: the image was opened for its metadata only
    /// ([`crate::OpenOptions::metadata_only`]).
    #[error("{format}: {reference} was not opened (the image was opened for its metadata only)")]
    NotOpened {
        /// Format name.
        format: &'static str,
        /// The reference, e.g. `backing file "base.qcow2"`.
        reference: String,
    },

    /// The output format needs a seekable file (its tables come before, or point back
    /// into, the data), and the target is a stream (a pipe, stdout, any `Write`).
    #[error("{format}: {what} cannot be written to a stream; it needs a seekable file")]
    NeedsSeekableOutput {
        /// Format name.
        format: &'static str,
        /// What was asked for, e.g. `a monolithicSparse VMDK`.
        what: String,
    },
}

impl From<io::Error> for Error {
    /// Unwraps an [`Error`] carried through `Read`/`Write` plumbing (see
    /// [`From<Error> for io::Error`](#impl-From%3CError%3E-for-Error)); any other I/O error
    /// becomes [`Error::Stream`].
    fn from(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(err) = inner.downcast::<Error>() {
                    return *err;
                }
            }
            return Error::Format("an error was lost on its way through an I/O layer".into());
        }
        Error::Stream(e)
    }
}

impl From<Error> for io::Error {
    /// Carries the error through `Read`/`Write` plumbing: the [`io::Error`] has the kind
    /// [`Error::kind`] gives and converts back to the same [`Error`].
    fn from(e: Error) -> Self {
        match e {
            // Already an I/O error with no more to say: keep it as it is.
            Error::Stream(inner) => inner,
            other => io::Error::new(other.kind(), other),
        }
    }
}

impl Error {
    /// The [`io::ErrorKind`] that best describes the error: `InvalidData` for malformed
    /// images, `Unsupported`, `PermissionDenied` for refused references, `InvalidInput`
    /// for bad arguments, the operating system's kind for I/O errors, and so on. An
    /// [`io::Error`] made from an [`Error`] has this kind.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { source, .. } => source.kind(),
            Error::Stream(e) => e.kind(),
            Error::Corrupt { .. } | Error::BackingChain { .. } | Error::Format(_) => {
                io::ErrorKind::InvalidData
            }
            Error::TooLarge { .. } => io::ErrorKind::InvalidData,
            Error::Unsupported { .. } | Error::NeedsSeekableOutput { .. } => {
                io::ErrorKind::Unsupported
            }
            Error::UntrustedReference { .. } => io::ErrorKind::PermissionDenied,
            Error::OutOfBounds { .. } => io::ErrorKind::UnexpectedEof,
            Error::InvalidArgument(_) | Error::NotAFile { .. } => io::ErrorKind::InvalidInput,
            Error::Interrupted => io::ErrorKind::Interrupted,
            Error::NotOpened { .. } => io::ErrorKind::NotFound,
            Error::Http { status, .. } => match status {
                Some(404 | 410) => io::ErrorKind::NotFound,
                Some(401 | 403) => io::ErrorKind::PermissionDenied,
                _ => io::ErrorKind::Other,
            },
            Error::Locked { .. } => io::ErrorKind::WouldBlock,
        }
    }

    /// True when the image's metadata is malformed ([`Error::Corrupt`]) or asks for more
    /// than the limits allow ([`Error::TooLarge`]): the image is bad, not the system.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. } | Error::TooLarge { .. })
    }

    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(
        format: &'static str,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            format,
            structure,
            offset,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(format: &'static str, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            format,
            feature: feature.into(),
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_io_plumbing() {
        let e = Error::corrupt("qcow2", "L2 table", 0x30000, "entry past the end");
        let io_err: io::Error = e.into();
        assert_eq!(io_err.kind(), io::ErrorKind::InvalidData);
        let back = Error::from(io_err);
        assert!(back.is_corrupt());
        assert!(matches!(
            back,
            Error::Corrupt {
                offset: 0x30000,
                ..
            }
        ));
        let plain = Error::from(io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
        assert!(matches!(plain, Error::Stream(_)));
        assert_eq!(plain.kind(), io::ErrorKind::BrokenPipe);
        let io_again: io::Error = plain.into();
        assert_eq!(io_again.kind(), io::ErrorKind::BrokenPipe);
    }
}
