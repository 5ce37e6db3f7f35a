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
    #[error("{0}")]
    Stream(#[from] io::Error),

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

    /// The input is not in the format that was asked for, or in no known format.
    #[error("{0}")]
    Format(String),

    /// A bad `-o` option, size or other user-given parameter.
    #[error("{0}")]
    InvalidArgument(String),

    /// The operation was interrupted (Ctrl-C / SIGTERM) or cancelled by the caller.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
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
