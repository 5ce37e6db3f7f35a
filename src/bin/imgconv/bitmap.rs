//! `imgconv bitmap`: changes persistent dirty bitmaps of a qcow2 image (qemu-img's
//! syntax).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::ops::BitmapAction;
use imgconv::writer::parse_size;
use imgconv::Format;

use crate::common::{parse_format, CmdResult};
use crate::ops_common::Unsupported;

/// Arguments of `imgconv bitmap`.
///
/// The actions apply in the order given, to the bitmap BITMAP: `--add` creates it
/// (empty, recording writes; `-g` sets the bytes per bit, a power of two from 512 B to
/// 2 GiB), `--remove` deletes it, `--clear` clears its bits, `--enable`/`--disable`
/// start and stop its recording, `--merge SOURCE` adds the bits of bitmap SOURCE (of
/// this image, or of the qcow2 image `-b`). All happen in one crash-safe step.
#[derive(ClapArgs)]
pub struct Args {
    /// Create the bitmap.
    #[arg(long = "add")]
    add: bool,
    /// Remove the bitmap.
    #[arg(long = "remove")]
    remove: bool,
    /// Clear the bitmap's bits.
    #[arg(long = "clear")]
    clear: bool,
    /// Start recording writes.
    #[arg(long = "enable")]
    enable: bool,
    /// Stop recording writes.
    #[arg(long = "disable")]
    disable: bool,
    /// Merge the bits of bitmap SOURCE into the bitmap.
    #[arg(long = "merge", value_name = "SOURCE")]
    merge: Vec<String>,
    /// Bytes per bit of a new bitmap (with --add).
    #[arg(short = 'g', long = "granularity")]
    granularity: Option<String>,
    /// The image holding the --merge source bitmap.
    #[arg(short = 'b', long = "source-file")]
    source_file: Option<PathBuf>,
    /// Format of the -b image.
    #[arg(short = 'F', long = "source-format", value_parser = parse_format)]
    source_format: Option<Format>,
    /// Image format (probed when omitted; bitmaps exist in qcow2 version 3 images).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    #[command(flatten)]
    unsupported: Unsupported,
    /// The image and the bitmap's name.
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

/// The action flags in command-line order (clap keeps each flag's value, not the order
/// between different flags, which qemu-img follows).
fn ordered_actions(a: &Args) -> Vec<BitmapAction> {
    let mut merges = a.merge.iter();
    let mut out = Vec::new();
    let granularity = a.granularity.as_deref().and_then(|g| parse_size(g).ok());
    let args: Vec<String> = std::env::args().collect();
    let mut i = args.iter().position(|x| x == "bitmap").map_or(0, |p| p + 1);
    while i < args.len() {
        let arg = args[i].as_str();
        let action = match arg {
            "--add" => Some(BitmapAction::Add { granularity }),
            "--remove" => Some(BitmapAction::Remove),
            "--clear" => Some(BitmapAction::Clear),
            "--enable" => Some(BitmapAction::Enable),
            "--disable" => Some(BitmapAction::Disable),
            _ if arg == "--merge" || arg.starts_with("--merge=") => {
                merges.next().map(|s| BitmapAction::Merge {
                    source: s.clone(),
                    file: a.source_file.clone(),
                    format: a.source_format,
                })
            }
            "--" => break,
            _ => None,
        };
        if arg == "--merge" {
            i += 1;
        }
        out.extend(action);
        i += 1;
    }
    out
}

/// Runs `imgconv bitmap`.
pub fn run(a: Args) -> CmdResult {
    a.unsupported.refuse()?;
    let bad = |m: &str| (1, imgconv::Error::invalid(m.to_string()));
    let any = a.add || a.remove || a.clear || a.enable || a.disable || !a.merge.is_empty();
    if !any {
        return Err(bad(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    if a.granularity.is_some() && !a.add {
        return Err(bad("granularity only supported with --add"));
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return Err(bad("-F only supported with -b"));
    }
    if a.source_file.is_some() && a.merge.is_empty() {
        return Err(bad("Merge bitmap source file only supported with --merge"));
    }
    if a.rest.len() != 2 {
        return Err(bad("Expecting filename and bitmap name"));
    }
    if let Some(g) = &a.granularity {
        parse_size(g).map_err(|_| bad("Invalid granularity specified"))?;
    }
    let (file, name) = (&a.rest[0], &a.rest[1]);
    let actions = ordered_actions(&a);
    imgconv::ops::bitmap(Path::new(file), a.format, name, &actions).map_err(|e| {
        (
            1,
            imgconv::Error::Format(format!(
                "Operation {} on bitmap {name} failed: {}",
                e.action, e.error
            )),
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
