//! `imgconv compare`: are two images' guest-visible contents the same?

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::convert::is_zero;
use imgconv::{BlockDevice, Format};

use crate::common::{open_input, parse_format, progress_bar, CmdResult, InputArgs};

/// Arguments of `imgconv compare`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format_a: Option<Format>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_parser = parse_format)]
    format_b: Option<Format>,
    /// Strict: images of different sizes are different.
    #[arg(short = 's')]
    strict: bool,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p')]
    progress: bool,
    /// Refuse references to other files (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility and ignored.
    #[arg(short = 'U', long = "force-share", hide = true)]
    force_share: bool,
    #[arg(short = 'q', hide = true)]
    quiet: bool,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

const CHUNK: u64 = 1 << 20;

/// Runs `imgconv compare`: exit 0 identical, 1 different, 2 error.
///
/// A raw disk on a stream of unrecorded length is compared in one pass: its size is
/// known when its end is reached, so a size mismatch is then told after the walk.
pub fn run(a: Args) -> CmdResult {
    let _ = a.force_share;
    let ia = open_input(&a.a, a.format_a, a.untrusted, &a.input).map_err(|e| (2, e))?;
    let ib = open_input(&a.b, a.format_b, a.untrusted, &a.input).map_err(|e| (2, e))?;
    let (da, db) = (ia.device().as_ref(), ib.device().as_ref());
    let known = da.length_known() && db.length_known();
    let mut warned = false;
    if known && da.size() != db.size() {
        if a.strict {
            println!("Strict mode: Image size mismatch!");
            return Ok(ExitCode::from(1));
        }
        if !a.quiet {
            println!("Warning: Image size mismatch!");
        }
        warned = true;
    }
    let pb = progress_bar(a.progress);
    if let Some(pb) = &pb {
        if known {
            pb.set_length(da.size().max(db.size()));
        }
    }
    let r = first_difference(da, db, &pb).map_err(|e| (2, e))?;
    let r = match r {
        Some(off) => Some(off),
        None => {
            // At the end of the shorter one (a stream's size is exact once its end is
            // reached; one that goes on is longer).
            if !known && da.size() != db.size() {
                if a.strict {
                    println!("Strict mode: Image size mismatch!");
                    return Ok(ExitCode::from(1));
                }
                if !a.quiet && !warned {
                    println!("Warning: Image size mismatch!");
                }
            }
            // The rest of the longer one must read as zeros.
            let common = da.size().min(db.size());
            let longer = if da.size() > common { da } else { db };
            first_nonzero(longer, common).map_err(|e| (2, e))?
        }
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    match r {
        Some(off) => {
            println!("Content mismatch at offset {off}!");
            Ok(ExitCode::from(1))
        }
        None => {
            if !a.quiet {
                println!("Images are identical.");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The first offset where `a` and `b` differ, up to the end of the shorter one (sizes
/// re-read as the walk goes: a stream's is exact once its end is reached).
fn first_difference(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    pb: &Option<indicatif::ProgressBar>,
) -> imgconv::Result<Option<u64>> {
    let mut pos = 0;
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    while pos < a.size().min(b.size()) {
        let len = a.size().min(b.size());
        let ea = a.map(pos, len - pos)?;
        let eb = b.map(pos, len - pos)?;
        let n = ea.len.min(eb.len).min(CHUNK);
        if ea.kind.reads_as_zero() && eb.kind.reads_as_zero() {
            pos += ea.len.min(eb.len);
        } else {
            let (xa, xb) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            if ea.kind.reads_as_zero() {
                xa.fill(0);
            } else {
                a.read_at(xa, pos)?;
            }
            if eb.kind.reads_as_zero() {
                xb.fill(0);
            } else {
                b.read_at(xb, pos)?;
            }
            if xa != xb {
                let i = xa
                    .iter()
                    .zip(xb.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(Some(pos + i as u64));
            }
            pos += n;
        }
        if let Some(pb) = pb {
            pb.set_position(pos);
        }
    }
    Ok(None)
}

fn first_nonzero(d: &dyn BlockDevice, from: u64) -> imgconv::Result<Option<u64>> {
    let mut pos = from;
    let mut buf = vec![0u8; CHUNK as usize];
    while pos < d.size() {
        let e = d.map(pos, d.size() - pos)?;
        if e.kind.reads_as_zero() {
            pos = e.end();
            continue;
        }
        let n = e.len.min(CHUNK) as usize;
        d.read_at(&mut buf[..n], pos)?;
        if !is_zero(&buf[..n]) {
            let i = buf[..n].iter().position(|&x| x != 0).unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}
