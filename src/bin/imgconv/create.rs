//! `imgconv create`: a new, empty image in any format that has a writer.
//!
//! Implemented as a conversion of an all-zero device, so every writer option works.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::device::ZeroDevice;
use imgconv::io::OutputSet;
use imgconv::writer::parse_size;
use imgconv::{ConvertOptions, Format};

use crate::common::{fail, open_image, parse_format, CmdResult};

/// Arguments of `imgconv create`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', value_parser = parse_format, default_value = "raw")]
    format: Format,
    /// Options, qemu-img style (may be repeated).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file (qcow2, VMDK, VDI).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Do not open the backing file (its size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Print nothing.
    #[arg(short = 'q')]
    quiet: bool,
    /// Refuse references to other files in the backing image (`-b`).
    #[arg(long)]
    untrusted: bool,
    /// The new image.
    file: String,
    /// Virtual size (defaults to the backing file's size).
    size: Option<String>,
}

/// Runs `imgconv create`.
pub fn run(a: Args) -> CmdResult {
    let mut opts = ConvertOptions::new(a.format);
    for o in &a.options {
        opts.write.parse_o(o).map_err(fail(1))?;
    }
    if let Some(b) = &a.backing {
        opts.write.backing_file = Some(b.clone());
    }
    if let Some(f) = a.backing_format {
        opts.write.backing_format = Some(f);
    }
    let mut size = match &a.size {
        Some(s) => Some(parse_size(s).map_err(fail(1))?),
        None => None,
    };
    if let Some(b) = opts.write.backing_file.clone() {
        if !a.unsafe_backing {
            // Relative backing names are relative to the new image's folder.
            let p = Path::new(&b);
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                Path::new(&a.file)
                    .parent()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|| p.to_path_buf())
            };
            let backing = open_image(
                &path.to_string_lossy(),
                opts.write.backing_format,
                a.untrusted,
            )
            .map_err(fail(1))?;
            if opts.write.backing_format.is_none() {
                opts.write.backing_format = Some(backing.format());
            }
            size.get_or_insert(backing.size());
        }
    }
    let Some(size) = size else {
        return Err((
            1,
            imgconv::Error::invalid("image creation needs a size parameter"),
        ));
    };
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt={} size={size}", a.file, a.format);
        if let Some(b) = &opts.write.backing_file {
            line.push_str(&format!(" backing_file={b}"));
        }
        if let Some(f) = opts.write.backing_format {
            line.push_str(&format!(" backing_fmt={f}"));
        }
        for (k, v) in &opts.write.options {
            line.push_str(&format!(" {k}={v}"));
        }
        println!("{line}");
    }
    // A new image reads as zeros (or as its backing file): nothing to hide.
    opts.engine.target_is_zero = true;
    imgconv::convert::convert_to(
        &ZeroDevice::new(size),
        Path::new(&a.file),
        OutputSet::new(),
        &opts,
    )
    .map_err(fail(1))?;
    Ok(ExitCode::SUCCESS)
}
