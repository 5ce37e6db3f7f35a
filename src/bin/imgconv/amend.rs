//! `imgconv amend`: changes format-specific options of an existing image (qemu-img's
//! syntax).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::Format;

use crate::common::{parse_format, CmdResult};
use crate::ops_common::{parse_cache, Progress, Unsupported};

/// Arguments of `imgconv amend`.
///
/// qcow2 options that can change: `compat=0.10|1.1` (a downgrade refuses what version 2
/// cannot hold and turns zero clusters into plain ones), `lazy_refcounts=on|off`,
/// `refcount_bits=1..64` (the refcount structures are rewritten), `size=SIZE`,
/// `data_file=NAME` and `data_file_raw=off` for images with an external data file;
/// `backing_file`/`backing_fmt` only as they are (use `rebase`). Other formats cannot be
/// amended, as in qemu-img. The image is changed in one crash-safe step.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode (checked, as qemu-img does).
    #[arg(short = 't', long = "cache", value_parser = parse_cache)]
    cache: Option<String>,
    /// Options to change, `key=value[,key=value…]` (`help` lists them).
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Allow unsafe operations (qemu-img needs it only for encryption keys).
    #[arg(long = "force")]
    force: bool,
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

/// Runs `imgconv amend`.
pub fn run(a: Args) -> CmdResult {
    let _ = (&a.cache, a.force);
    a.unsupported.refuse()?;
    if a.options.is_empty() {
        return Err((
            1,
            imgconv::Error::invalid(
                "Must specify options (-o)\nTry 'imgconv amend --help' for more info",
            ),
        ));
    }
    let options = a.options.join(",");
    let path = Path::new(&a.file);
    if options.split(',').any(|o| o == "help" || o == "?") {
        let format = imgconv::ops::image_format(path, a.format).map_err(|e| (1, e))?;
        if format != Format::Qcow2 {
            return Err((
                1,
                imgconv::Error::Format(format!(
                    "Format driver '{}' does not support option amendment",
                    format.name()
                )),
            ));
        }
        print!("{}", imgconv::format::qcow2::amend::HELP);
        return Ok(ExitCode::SUCCESS);
    }
    let progress = Progress::new(a.progress && !a.quiet);
    if let Some(p) = &progress {
        p.update(0, 1);
    }
    let r = imgconv::ops::amend(path, a.format, &options);
    if let Some(p) = &progress {
        p.finish();
    }
    r.map_err(|e| (1, e))?;
    Ok(ExitCode::SUCCESS)
}
