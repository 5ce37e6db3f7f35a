//! `imgconv create`: a new, empty image in any format that has a writer.
//!
//! Implemented as a conversion of an all-zero device, so every writer option works.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::device::ZeroDevice;
use imgconv::writer::{parse_size, WriteOptions};
use imgconv::{ConvertOptions, Format};

use crate::common::{could_not_open, esc, fail, open_image, parse_format, CmdResult};

/// Arguments of `imgconv create`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format.
    #[arg(short = 'f', long = "format", value_parser = parse_format, default_value = "raw")]
    format: Format,
    /// Options, qemu-img style (may be repeated); `-o help` lists them.
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Backing file (qcow2, VMDK).
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Do not open the backing file (its size must then be given).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Print nothing.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Refuse references to other files in the backing image (`-b`).
    #[arg(long)]
    untrusted: bool,
    /// The new image.
    file: Option<String>,
    /// Virtual size (defaults to `-o size=`, or the backing file's size).
    size: Option<String>,
}

/// Runs `imgconv create`.
pub fn run(a: Args) -> CmdResult {
    if crate::optionhelp::asks_for_help(&a.options) {
        print!("{}", crate::optionhelp::text(a.format, a.file.as_deref()));
        return Ok(ExitCode::SUCCESS);
    }
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let Some(file) = a.file.clone() else {
        return Err((1, imgconv::Error::invalid("Expecting image file name")));
    };
    let in_file = |e: imgconv::Error| {
        (
            1,
            imgconv::Error::Format(format!("{}: {}", esc(&file), crate::common::describe(&e))),
        )
    };
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
    let mut size = match (&a.size, opts.write.take("size")) {
        (Some(_), Some(_)) => {
            return Err(in_file(imgconv::Error::invalid(
                "The image size must be specified only once",
            )))
        }
        (Some(s), None) => Some(parse_size(s).map_err(fail(1))?),
        (None, Some(s)) => Some(parse_size(&s).map_err(fail(1))?),
        (None, None) => None,
    };
    if let Some(b) = opts.write.backing_file.clone() {
        if !a.unsafe_backing {
            // Relative backing names are relative to the new image's folder.
            let p = Path::new(&b);
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                Path::new(&file)
                    .parent()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|| p.to_path_buf())
            };
            let backing = open_image(
                &path.to_string_lossy(),
                opts.write.backing_format,
                a.untrusted,
                false,
            )
            .map_err(|e| could_not_open(&b, e))?;
            if opts.write.backing_format.is_none() {
                opts.write.backing_format = Some(backing.format());
            }
            size.get_or_insert(backing.size());
        }
    }
    let Some(size) = size else {
        return Err(in_file(imgconv::Error::invalid(
            "Image creation needs a size parameter",
        )));
    };
    if !a.quiet {
        println!("{}", formatting_line(&file, a.format, size, &opts.write));
    }
    // A new image reads as zeros (or as its backing file): nothing to hide.
    opts.engine.target_is_zero = true;
    imgconv::convert::convert_to(
        &ZeroDevice::new(size),
        Path::new(&file),
        crate::release::output_set(),
        &opts,
    )
    .map_err(in_file)?;
    Ok(ExitCode::SUCCESS)
}

/// qemu-img's `Formatting 'FILE', fmt=FMT …` line: each format's options in qemu's
/// order, the ones given and those with a default.
fn formatting_line(file: &str, format: Format, size: u64, w: &WriteOptions) -> String {
    let o = |k: &str| w.options.get(k).cloned();
    let num = |k: &str, def: Option<&str>| {
        o(k).map(|v| parse_size(&v).map(|n| n.to_string()).unwrap_or(v))
            .or(def.map(str::to_string))
    };
    let backing = w.backing_file.clone();
    let backing_fmt = w.backing_format.map(|f| f.name().to_string());
    let size = Some(size.to_string());
    let fields: Vec<(&str, Option<String>)> = match format {
        Format::Raw => vec![("size", size), ("preallocation", o("preallocation"))],
        Format::Qcow2 => vec![
            ("cluster_size", num("cluster_size", Some("65536"))),
            ("extended_l2", o("extended_l2").or(Some("off".into()))),
            ("preallocation", o("preallocation")),
            (
                "compression_type",
                o("compression_type").or(Some("zlib".into())),
            ),
            ("size", size),
            ("backing_file", backing),
            ("backing_fmt", backing_fmt),
            ("compat", o("compat")),
            ("lazy_refcounts", o("lazy_refcounts").or(Some("off".into()))),
            ("refcount_bits", num("refcount_bits", Some("16"))),
        ],
        Format::Vmdk => vec![
            ("size", size),
            ("adapter_type", o("adapter_type")),
            ("backing_file", backing),
            ("backing_fmt", backing_fmt),
            ("compat6", o("compat6").or(Some("off".into()))),
            ("hwversion", o("hwversion").or(Some("undefined".into()))),
            ("toolsversion", o("toolsversion")),
            ("subformat", o("subformat")),
            ("zeroed_grain", o("zeroed_grain")),
            ("preallocation", o("preallocation")),
        ],
        Format::Vdi => vec![
            ("size", size),
            ("static", o("static").or(Some("off".into()))),
            ("cluster_size", num("cluster_size", None)),
            ("uuid", o("uuid")),
            ("preallocation", o("preallocation")),
        ],
        // Formats qemu's order is not recorded for: the size, then the options given.
        _ => std::iter::once(("size", size))
            .chain(w.options.iter().map(|(k, v)| (k.as_str(), Some(v.clone()))))
            .collect(),
    };
    let mut line = format!("Formatting '{}', fmt={format}", esc(file));
    for (k, v) in fields {
        if let Some(v) = v {
            line.push_str(&format!(" {k}={}", esc(&v)));
        }
    }
    line
}
