//! `imgconv resize`: changes an image's virtual size (raw and qcow2).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::io::FileStorage;
use imgconv::writer::parse_size;
use imgconv::Format;

use crate::common::{fail, parse_format, CmdResult};

/// Arguments of `imgconv resize`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Allow the image to become smaller.
    #[arg(long)]
    shrink: bool,
    /// Print nothing.
    #[arg(short = 'q')]
    quiet: bool,
    /// Refuse references to other files in the image.
    #[arg(long)]
    untrusted: bool,
    /// The image.
    file: String,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Runs `imgconv resize`.
pub fn run(a: Args) -> CmdResult {
    let path = Path::new(&a.file);
    let storage = FileStorage::open(path).map_err(fail(1))?;
    let format = match a.format {
        Some(f) => f,
        None => imgconv::detect::probe(&storage).map_err(fail(1))?,
    };
    let current = match format {
        Format::Raw => imgconv::io::Storage::len(&storage),
        _ => imgconv::open(
            path,
            &if a.untrusted {
                imgconv::OpenOptions::untrusted()
            } else {
                imgconv::OpenOptions::trusted()
            }
            .format(format)
            .metadata_only(),
        )
        .map_err(fail(1))?
        .size(),
    };
    drop(storage);
    let s = a.size.trim();
    let new = if let Some(d) = s.strip_prefix('+') {
        current.checked_add(parse_size(d).map_err(fail(1))?)
    } else if let Some(d) = s.strip_prefix('-') {
        current.checked_sub(parse_size(d).map_err(fail(1))?)
    } else {
        Some(parse_size(s).map_err(fail(1))?)
    };
    let Some(new) = new else {
        return Err((1, imgconv::Error::invalid("the new size is out of range")));
    };
    if new < current && !a.shrink {
        return Err((
            1,
            imgconv::Error::invalid("Use the --shrink option to perform a shrink operation."),
        ));
    }
    match format {
        Format::Raw => imgconv::format::raw::resize(path, new).map_err(fail(1))?,
        Format::Qcow2 => {
            imgconv::format::qcow2::resize::resize(path, new, a.shrink).map_err(fail(1))?
        }
        other => return Err((1, imgconv::Error::unsupported(other.name(), "resize"))),
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(ExitCode::SUCCESS)
}
