//! `imgconv rebase`: changes the backing file of a qcow2 image (qemu-img's syntax).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::ops::RebaseOptions;
use imgconv::Format;

use crate::common::{parse_format, CmdResult};
use crate::ops_common::{parse_cache, Progress, Unsupported};

/// Arguments of `imgconv rebase`.
///
/// Safe mode (the default) copies into the image every cluster it does not hold itself
/// whose contents differ between the old backing chain and the new backing file, then
/// records the new backing file: what the image shows does not change. `-b ""` makes
/// the image stand alone. `-u` only rewrites the header (for a backing file that was
/// moved or renamed). The image is changed in one crash-safe step.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted; only qcow2 images can be rebased).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode for the image (checked, as qemu-img does; writes are flushed in the
    /// order crash safety needs in every mode).
    #[arg(short = 't', long = "cache", value_parser = parse_cache)]
    cache: Option<String>,
    /// Cache mode for the backing files (checked only).
    #[arg(short = 'T', long = "backing-cache", value_parser = parse_cache)]
    backing_cache: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Accepted as qemu-img accepts it (the image is opened for writing either way).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print progress lines on standard output, as qemu-img does.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// The new backing file ("" for none); a relative name is relative to the image's
    /// folder, and is recorded as given.
    #[arg(short = 'b', long = "backing", allow_hyphen_values = true)]
    backing: Option<String>,
    /// Format of the new backing file (required with a backing file).
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Unsafe mode: only change the backing file name and format in the header.
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    /// Compress the clusters copied into the image.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    #[command(flatten)]
    unsupported: Unsupported,
    /// The image.
    file: String,
}

/// Runs `imgconv rebase`.
pub fn run(a: Args) -> CmdResult {
    let _ = (&a.cache, &a.backing_cache, a.force_share);
    a.unsupported.refuse()?;
    if a.backing.is_none() && !a.unsafe_mode {
        return Err((
            1,
            imgconv::Error::invalid(
                "Must specify backing file (-b) or use unsafe mode (-u)\nTry 'imgconv rebase --help' for more info",
            ),
        ));
    }
    let progress = Progress::new(a.progress && !a.quiet);
    let o = RebaseOptions {
        format: a.format,
        backing: a.backing.clone(),
        backing_format: a.backing_format,
        unsafe_header_only: a.unsafe_mode,
        compress: a.compress,
        progress: progress.as_ref().map(|p| p.callback()),
    };
    let r = imgconv::ops::rebase(Path::new(&a.file), &o);
    if let Some(p) = &progress {
        p.finish();
    }
    r.map_err(|e| {
        let name = a.backing.clone().unwrap_or_default();
        let e = match e {
            imgconv::Error::Unsupported { feature, .. } if feature.contains("rebase") => {
                imgconv::Error::Format(format!(
                    "Could not change the backing file to '{name}': Operation not supported"
                ))
            }
            imgconv::Error::InvalidArgument(m) if m == "backing format must be specified" => {
                imgconv::Error::Format(format!(
                    "Could not change the backing file to '{name}': {m}"
                ))
            }
            other => other,
        };
        (1, e)
    })?;
    Ok(ExitCode::SUCCESS)
}
