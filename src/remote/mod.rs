//! The front door for images that are not local files: web servers (`http://`,
//! `https://`), container registries (`docker://`) and OCI image layouts (`oci:`), as
//! sources and as targets.
//!
//! A source on a web server that answers range requests is opened as random-access
//! storage ([`crate::io::http::HttpStorage`]) under the ordinary format readers: only
//! metadata and allocated data are fetched. A compressed download, and any object on a
//! server without ranges, is read as a stream ([`crate::io::http::ResumableBody`])
//! through the same path as a pipe. Registry images are streamed layer by layer
//! ([`registry`]).

#[cfg(feature = "http")]
pub mod container_disk;
#[cfg(feature = "http")]
pub mod registry;

#[cfg(feature = "http")]
use std::path::Path;
#[cfg(feature = "http")]
use std::sync::Arc;

use crate::convert::ConvertOptions;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::io::remote::Location;

/// Opens the remote image `loc` (see [`crate::io::remote::classify`]).
pub fn open(loc: Location<'_>, options: &OpenOptions) -> Result<Image> {
    #[cfg(feature = "http")]
    {
        match loc {
            Location::Http(url) => open_http(url, options),
            Location::Docker(reference) => registry::open_docker(reference, options),
            Location::Oci(layout) => registry::open_oci(layout, options),
        }
    }
    #[cfg(not(feature = "http"))]
    {
        let _ = (loc, options);
        Err(not_built())
    }
}

#[cfg(not(feature = "http"))]
fn not_built() -> Error {
    Error::unsupported(
        "http",
        "URLs, registries and OCI layouts (built without the `http` feature)",
    )
}

/// Opens the file at the `http(s)://` URL `url` as random-access storage (range
/// requests), e.g. for `check`.
pub fn open_storage(
    url: &str,
    remote: &crate::io::remote::RemoteOptions,
) -> Result<std::sync::Arc<dyn crate::io::Storage>> {
    #[cfg(feature = "http")]
    {
        match crate::io::remote::classify(url) {
            Some(Location::Http(url)) => crate::io::http::open_storage(url, remote),
            _ => Err(Error::invalid(format!(
                "{}: not an http(s):// URL",
                crate::io::remote::redact(url)
            ))),
        }
    }
    #[cfg(not(feature = "http"))]
    {
        let _ = (url, remote);
        Err(not_built())
    }
}

/// Opens an image on a web server.
#[cfg(feature = "http")]
fn open_http(url: &str, options: &OpenOptions) -> Result<Image> {
    use crate::detect::{probe_compression, probe_tar, PROBE_LEN};
    use crate::image::OpenContext;
    use crate::io::http::{storage::Probe, Client, HttpStorage, ResumableBody};
    use crate::io::remote::redact;
    use crate::io::Storage;

    let client = Arc::new(Client::new(&options.remote)?);
    let shown = redact(url);
    let storage = match HttpStorage::probe(client.clone(), url)? {
        Probe::Ranged(s) => Arc::new(s),
        Probe::Whole(body) => {
            // No ranges: read it as it comes, like a pipe.
            return crate::open::local::open_stream_input(Box::new(body), &shown, options);
        }
    };
    let mut head = vec![0u8; storage.len().min(PROBE_LEN as u64) as usize];
    storage
        .read_exact_at(&mut head, 0)
        .map_err(crate::io::compressed::from_io)?;
    if probe_compression(&head).is_some() {
        // A decoder reads forward: one GET for the whole object, resumed if it breaks.
        let body = ResumableBody::open(client, url)?;
        if body.validator() != storage.validator() {
            return Err(crate::io::http::changed_error(url));
        }
        if body.total() != Some(storage.len()) {
            return Err(crate::Error::Http {
                url: shown,
                status: None,
                reason: format!(
                    "the server gives two lengths: {} bytes in Content-Range, {} in Content-Length",
                    storage.len(),
                    body.total().map_or("none".into(), |n| n.to_string())
                ),
            });
        }
        let mut img = crate::open::local::open_stream_input(Box::new(body), &shown, options)?;
        img.info_mut().actual_size = Some(storage.len());
        return Ok(img);
    }
    let ctx =
        OpenContext::for_url(url, &shown, options).with_opener(crate::open::local::open_storage);
    if probe_tar(&head) {
        return crate::open::local::open_tar_storage(storage, &ctx);
    }
    crate::open::local::open_storage(storage, &ctx)
}

/// Where a converted image goes when the target is not a local file.
#[derive(Debug, Clone, Default)]
pub struct RemoteTarget {
    /// Folder for the temporary file of formats that cannot be uploaded as they are
    /// written (`--tmpdir`, else `$TMPDIR`).
    pub tmpdir: Option<std::path::PathBuf>,
    /// How to reach the target.
    pub remote: crate::io::remote::RemoteOptions,
}

/// Called with the bytes uploaded so far.
pub type SentFn = dyn Fn(u64) + Send + Sync;

/// True when `format` with `opts` is written in one pass and can be uploaded while it
/// is written (raw, streamOptimized VMDK); other formats go through a temporary file.
pub fn streams(opts: &ConvertOptions) -> bool {
    use crate::detect::Format;
    match opts.format {
        Format::Raw => true,
        Format::Vmdk => opts
            .write
            .options
            .get("subformat")
            .is_some_and(|s| s.eq_ignore_ascii_case("streamOptimized")),
        _ => false,
    }
}

/// Converts `src` and uploads the result to `dst` (`http(s)://` with `PUT`, `oci:` or
/// `docker://` as a containerDisk). Returns the bytes sent (written, for `oci:`).
///
/// Raw and streamOptimized VMDK are sent while they are written (`Content-Length` for
/// raw, chunked for VMDK); other formats are written to a temporary file first, then
/// uploaded. A failed conversion never completes the upload.
pub fn convert_to_remote(
    src: &Image,
    dst: Location<'_>,
    opts: &ConvertOptions,
    target: &RemoteTarget,
    sent: Option<Arc<SentFn>>,
) -> Result<u64> {
    #[cfg(feature = "http")]
    {
        match dst {
            Location::Http(url) => upload_http(src, url, opts, target, sent),
            Location::Oci(layout) => registry::write_oci(src, layout, opts, target),
            Location::Docker(reference) => {
                registry::push_docker(src, reference, opts, target, sent)
            }
        }
    }
    #[cfg(not(feature = "http"))]
    {
        let _ = (src, dst, opts, target, sent);
        Err(not_built())
    }
}

#[cfg(not(feature = "http"))]
type Arc<T> = std::sync::Arc<T>;

#[cfg(feature = "http")]
fn upload_http(
    src: &Image,
    url: &str,
    opts: &ConvertOptions,
    target: &RemoteTarget,
    sent: Option<Arc<SentFn>>,
) -> Result<u64> {
    use crate::io::http::{upload, Client};
    if opts.no_create {
        return Err(Error::invalid(
            "-n (write into an existing image) cannot be used with a URL target",
        ));
    }
    let client = Arc::new(Client::new(&target.remote)?);
    if streams(opts) && opts.write.backing_file.is_none() {
        let len = (opts.format == crate::detect::Format::Raw && src.device().length_known())
            .then(|| src.size());
        let (pipe, up) = upload::put_stream(client, url, len, sent);
        let converted = crate::convert::convert_to_writer(src, Box::new(pipe), opts);
        return up.finish(converted.map(drop));
    }
    let tmp = temp_file(target.tmpdir.as_deref(), opts.format.name())?;
    let _guard = TempGuard(tmp.clone());
    check_single_file(opts)?;
    crate::convert::convert(src, &tmp, opts)?;
    crate::io::output::register_temporary(&tmp);
    upload::put_file(&client, url, &tmp, sent)
}

#[cfg(feature = "http")]
/// Refuses VMDK subformats whose extents are separate files: a URL holds one file.
pub(crate) fn check_single_file(opts: &ConvertOptions) -> Result<()> {
    let sub = opts
        .write
        .options
        .get("subformat")
        .map(|s| s.to_ascii_lowercase());
    match sub.as_deref() {
        Some("monolithicflat" | "twogbmaxextentsparse" | "twogbmaxextentflat")
            if opts.format == crate::detect::Format::Vmdk =>
        {
            Err(Error::unsupported(
                "vmdk",
                "subformats with separate extent files as a remote target (one URL holds one file)",
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(feature = "http")]
/// A fresh name for a temporary file in `dir` (else `$TMPDIR`).
pub(crate) fn temp_file(dir: Option<&Path>, ext: &str) -> Result<std::path::PathBuf> {
    let dir = crate::io::spool::spool_dir(dir);
    for _ in 0..100 {
        let p = dir.join(format!(
            ".imgconv-upload-{}-{:08x}.{ext}",
            std::process::id(),
            crate::random::u32()
        ));
        if !p.exists() {
            return Ok(p);
        }
    }
    Err(Error::invalid(format!(
        "{}: could not find a name for a temporary file",
        dir.display()
    )))
}

#[cfg(feature = "http")]
/// Removes a temporary file when dropped.
pub(crate) struct TempGuard(pub std::path::PathBuf);

#[cfg(feature = "http")]
impl Drop for TempGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        crate::io::output::unregister_temporary(&self.0);
    }
}
