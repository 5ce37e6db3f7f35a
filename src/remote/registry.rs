//! Container images as sources and targets (in progress).

use super::{RemoteTarget, SentFn};
use crate::convert::ConvertOptions;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use std::sync::Arc;

/// Opens the disk of a registry image.
pub fn open_docker(_reference: &str, _options: &OpenOptions) -> Result<Image> {
    Err(Error::unsupported("registry", "docker:// sources"))
}

/// Opens the disk of an OCI layout.
pub fn open_oci(_layout: &str, _options: &OpenOptions) -> Result<Image> {
    Err(Error::unsupported("registry", "oci: sources"))
}

/// Writes a containerDisk layout.
pub fn write_oci(
    _src: &Image,
    _layout: &str,
    _opts: &ConvertOptions,
    _target: &RemoteTarget,
) -> Result<u64> {
    Err(Error::unsupported("registry", "oci: targets"))
}

/// Pushes a containerDisk.
pub fn push_docker(
    _src: &Image,
    _reference: &str,
    _opts: &ConvertOptions,
    _target: &RemoteTarget,
    _sent: Option<Arc<SentFn>>,
) -> Result<u64> {
    Err(Error::unsupported("registry", "docker:// targets"))
}
