//! `imgconv dd`: copies a part of an image into a new image, as `qemu-img dd`.
//!
//! Operands `if=`, `of=`, `bs=` (default 512), `count=`, `skip=` (in blocks), with
//! qemu-img 10's arithmetic: the copy ends at `count × bs` from the start of the input
//! (or at its end), and starts `skip × bs` into it. Every block is written, zeros
//! included, so the output is fully allocated as qemu-img makes it. Runs through the
//! conversion engine, so any readable format goes into any writable one.
//!
//! Proxmox's qemu-img adds `-n` (write into an existing output), `osize=` (the
//! output's size: the copy stops there, or the output is padded with zeros to it) and
//! `-l SNAPSHOT`; Proxmox clones EFI disks with them (`dd -n -f raw -O raw bs=1M
//! osize=SIZE if=A of=B`). imgconv takes them too; upstream qemu-img refuses them.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;
use imgconv::device::ZeroDevice;
use imgconv::writer::parse_size;
use imgconv::{BlockDevice, ConvertOptions, Format};

use crate::common::{esc, fail, parse_format, CmdResult, InputArgs};
use crate::devices::{ConcatDevice, WindowDevice};

/// Arguments of `imgconv dd`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The input is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format (default raw).
    #[arg(short = 'O', long = "output-format", value_parser = parse_format)]
    out_format: Option<Format>,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Open the input in shared mode.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Refuse references to other files in the input (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Write into the existing output instead of creating it (Proxmox's qemu-img).
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// Copy an internal snapshot of the input (qcow2; Proxmox's qemu-img).
    #[arg(short = 'l', long = "snapshot")]
    snapshot: Option<String>,
    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS].
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The operands, checked as qemu-img checks them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    osize: Option<u64>,
}

fn parse_operands(ops: &[String]) -> imgconv::Result<Operands> {
    let mut o = Operands {
        bs: 512,
        ..Operands::default()
    };
    let number = |name: &str, v: &str| -> imgconv::Result<u64> {
        match parse_size(v) {
            Ok(n) if (1..=i32::MAX as u64).contains(&n) || (name != "bs" && n == 0) => Ok(n),
            _ => Err(imgconv::Error::invalid(format!(
                "Invalid {name} specified. Must be between {} and 2147483647.",
                u8::from(name == "bs")
            ))),
        }
    };
    for op in ops {
        let Some((k, v)) = op.split_once('=') else {
            return Err(imgconv::Error::invalid(format!(
                "unrecognized operand {op}"
            )));
        };
        match k {
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            "bs" => o.bs = number("bs", v)?,
            "count" => o.count = Some(number("count", v)?),
            "skip" => o.skip = Some(number("skip", v)?),
            "osize" => {
                o.osize =
                    Some(parse_size(v).map_err(|_| {
                        imgconv::Error::invalid(format!("invalid output size '{v}'"))
                    })?)
            }
            _ => return Err(imgconv::Error::invalid(format!("unrecognized operand {k}"))),
        }
    }
    Ok(o)
}

/// The part of an input of `size` bytes that is copied: `(start, length)`, or `None`
/// when `skip` lies past the end (the output is then empty).
fn window(size: u64, o: &Operands) -> Option<(u64, u64)> {
    let mut end = size;
    if let Some(c) = o.count {
        end = end.min(c.saturating_mul(o.bs));
    }
    let start = o.skip.unwrap_or(0).saturating_mul(o.bs);
    (start <= end).then(|| (start, end - start))
}

/// Runs `imgconv dd`.
pub fn run(a: Args) -> CmdResult {
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let o = parse_operands(&a.operands).map_err(fail(1))?;
    let (Some(input), Some(output)) = (&o.input, &o.output) else {
        return Err((
            1,
            imgconv::Error::invalid("Must specify both input and output files"),
        ));
    };
    let spec = crate::spec::parse(input, a.format, a.image_opts).map_err(fail(1))?;
    let mut oo = if a.untrusted {
        imgconv::OpenOptions::untrusted()
    } else {
        imgconv::OpenOptions::trusted()
    };
    oo.format = spec.format;
    oo.force_share = a.force_share;
    oo.snapshot = a.snapshot.clone();
    a.input.apply(&mut oo);
    let img = imgconv::open(Path::new(&spec.filename), &oo)
        .map_err(|e| crate::common::could_not_open(input, e))?;
    let (start, mut len) = window(img.size(), &o).unwrap_or_else(|| {
        // As dd(1) and qemu-img: a warning and an empty output, not a failure.
        eprintln!("imgconv: {}: cannot skip to specified offset", esc(input));
        (0, 0)
    });
    if let Some(osize) = o.osize {
        len = len.min(osize);
    }
    let part: Arc<dyn BlockDevice> =
        Arc::new(WindowDevice::new(Arc::clone(img.device()), start, len));
    // `osize=` past the copied part: the output goes on with zeros.
    let pad = o.osize.map_or(0, |s| s - len);
    let src: Arc<dyn BlockDevice> = if pad > 0 {
        Arc::new(ConcatDevice::new(vec![
            part,
            Arc::new(ZeroDevice::new(pad)),
        ]))
    } else {
        part
    };
    let mut opts = ConvertOptions::new(a.out_format.unwrap_or(Format::Raw));
    // Every block is written, as qemu-img dd writes them.
    opts.engine.min_sparse = 0;
    let out = if a.no_create {
        imgconv::io::OutputSet::in_place()
    } else {
        crate::release::output_set()
    };
    imgconv::convert::convert_to(src.as_ref(), Path::new(output), out, &opts).map_err(|e| {
        (
            1,
            imgconv::Error::Format(format!("{}: {}", esc(output), crate::common::describe(&e))),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(s: &str) -> imgconv::Result<Operands> {
        parse_operands(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn operands_and_window_as_qemu() {
        let o = ops("if=a of=b bs=1M count=8 skip=2").unwrap();
        assert_eq!((o.bs, o.count, o.skip), (1 << 20, Some(8), Some(2)));
        // count counts from the start of the input, skip moves the start.
        assert_eq!(window(64 << 20, &o), Some((2 << 20, 6 << 20)));
        let o = ops("if=a of=b").unwrap();
        assert_eq!(window(1000, &o), Some((0, 1000)));
        let o = ops("if=a of=b bs=1M skip=100").unwrap();
        assert_eq!(window(64 << 20, &o), None);
        assert!(ops("if=a of=b bs=0").is_err());
        assert_eq!(ops("if=a of=b osize=1M").unwrap().osize, Some(1 << 20));
        assert!(ops("if=a of=b isize=1M")
            .unwrap_err()
            .to_string()
            .contains("isize"));
        assert!(ops("if=a of=b junk").is_err());
    }
}
