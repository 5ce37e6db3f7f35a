//! `imgconv commit`: writes an overlay's data into its backing file (qemu-img's syntax).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::ops::CommitOptions;
use imgconv::Format;

use crate::common::{parse_format, CmdResult};
use crate::ops_common::{parse_cache, Progress, Unsupported};

/// Arguments of `imgconv commit`.
///
/// Everything the image defines above its base (its backing file, or the image of the
/// chain `-b` names) is written into the base, which may be raw, qcow2 or VDI; then the
/// image is emptied (unless `-d` or `-b`), so that it shows the base again. A qcow2
/// base changes in one crash-safe step; the image is emptied only once the base is on
/// disk.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted; the image must be qcow2).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode (checked, as qemu-img does).
    #[arg(short = 't', long = "cache", value_parser = parse_cache)]
    cache: Option<String>,
    /// The image of the backing chain to commit into (implies -d).
    #[arg(short = 'b', long = "base")]
    base: Option<String>,
    /// Do not empty the image afterwards.
    #[arg(short = 'd', long = "drop")]
    drop: bool,
    /// I/O rate limit (accepted, as qemu-img accepts it; imgconv does not throttle).
    #[arg(short = 'r', long = "rate")]
    rate: Option<String>,
    /// Print progress lines on standard output, as qemu-img does.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[command(flatten)]
    unsupported: Unsupported,
    /// The image.
    file: String,
}

/// Runs `imgconv commit`.
pub fn run(a: Args) -> CmdResult {
    let _ = &a.cache;
    a.unsupported.refuse()?;
    if let Some(r) = &a.rate {
        imgconv::writer::parse_size(r).map_err(|_| {
            (
                1,
                imgconv::Error::invalid(format!("Invalid rate limit specified: {r}")),
            )
        })?;
    }
    let progress = Progress::new(a.progress && !a.quiet);
    let o = CommitOptions {
        format: a.format,
        base: a.base.clone(),
        drop: a.drop,
        progress: progress.as_ref().map(|p| p.callback()),
    };
    let r = imgconv::ops::commit(Path::new(&a.file), &o);
    if let Some(p) = &progress {
        p.finish();
    }
    r.map_err(|e| (1, e))?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(ExitCode::SUCCESS)
}
