//! `imgconv measure`: the size an image needs in a given format, as `qemu-img measure`.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::format::qcow2::measure::{measure, MeasureSource};
use imgconv::writer::{parse_size, WriteOptions};
use imgconv::Format;

use crate::common::{could_not_open, fail, parse_format, CmdResult, InputArgs};

/// Arguments of `imgconv measure`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The source is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Target format: raw or qcow2.
    #[arg(short = 'O', long = "target-format", value_parser = parse_format, default_value = "raw")]
    out_format: Format,
    /// Target options, qemu-img style (may be repeated).
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Measure an empty image of this size instead of a source image.
    #[arg(short = 's', long = "size")]
    size: Option<String>,
    /// Measure an internal snapshot of the source (qcow2).
    #[arg(short = 'l', long = "snapshot")]
    snapshot: Option<String>,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Refuse references to other files in the source.
    #[arg(long)]
    untrusted: bool,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image (when --size is not given).
    file: Option<String>,
}

/// Runs `imgconv measure`.
pub fn run(a: Args) -> CmdResult {
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let mut wo = WriteOptions::default();
    for o in &a.options {
        wo.parse_o(o).map_err(fail(1))?;
    }
    let m = match (&a.size, &a.file) {
        (Some(s), None) => {
            let size = parse_size(s).map_err(fail(1))?;
            measure(a.out_format, &wo, MeasureSource::Size(size)).map_err(fail(1))?
        }
        (None, Some(f)) => {
            let spec = crate::spec::parse(f, a.format, a.image_opts).map_err(fail(1))?;
            let mut o = if a.untrusted {
                imgconv::OpenOptions::untrusted()
            } else {
                imgconv::OpenOptions::trusted()
            };
            o.format = spec.format;
            o.force_share = a.force_share;
            o.snapshot = a.snapshot.clone();
            a.input.apply(&mut o);
            let img = imgconv::open(&spec.filename, &o).map_err(|e| could_not_open(f, e))?;
            measure(
                a.out_format,
                &wo,
                MeasureSource::Device(img.device().as_ref(), img.format()),
            )
            .map_err(fail(1))?
        }
        _ => {
            return Err((
                1,
                imgconv::Error::invalid("give either --size SIZE or a source image, not both"),
            ))
        }
    };
    if a.output == "json" {
        let b = m
            .bitmaps
            .map(|b| format!("    \"bitmaps\": {b},\n"))
            .unwrap_or_default();
        println!(
            "{{\n{b}    \"required\": {},\n    \"fully-allocated\": {}\n}}",
            m.required, m.fully_allocated
        );
    } else {
        println!("required size: {}", m.required);
        println!("fully allocated size: {}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
