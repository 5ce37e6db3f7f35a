//! `imgconv compare`: are two images' guest-visible contents the same?
//!
//! Walks both images as qemu-img does — by allocation status, reading 2 MiB at most at
//! a time — so that messages, offsets (the first differing 512-byte sector), strict
//! mode's allocation check and `-p` lines come out as qemu-img's.

use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::zero::is_zero;
use imgconv::{Format, Image};

use crate::common::{check_cache_mode, describe, open_spec, parse_format, CmdResult, InputArgs};
use crate::progress::Progress;
use crate::status::{StatusReader, ALLOCATED, ZERO};

/// Arguments of `imgconv compare`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', long = "a-format", value_parser = parse_format)]
    format_a: Option<Format>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', long = "b-format", value_parser = parse_format)]
    format_b: Option<Format>,
    /// The images are option strings (`driver=qcow2,file.filename=x`), not file names.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Strict: images of different sizes, or with different allocation, differ.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Print progress lines `    (NN.NN/100%)` on stdout, as qemu-img.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Cache mode (checked as qemu-img does, then irrelevant to imgconv).
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Refuse references to other files (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print nothing; the exit code tells.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// First image.
    a: String,
    /// Second image.
    b: String,
}

/// At most this much is read at once (qemu's IO_BUF_SIZE).
const CHUNK: u64 = 2 << 20;

/// Runs `imgconv compare`: exit 0 identical, 1 different, 2 error opening, 3 error
/// reading allocation, 4 error reading data.
pub fn run(a: Args) -> CmdResult {
    check_cache_mode(a.cache.as_deref(), true)?;
    crate::spec::check_objects(&a.objects).map_err(|e| (2, e))?;
    let open = |arg: &str, f| {
        open_spec(
            arg,
            f,
            a.image_opts,
            a.untrusted,
            &a.input,
            a.force_share,
            true,
        )
        .map_err(|(_, e)| (2, e))
    };
    let ia = open(&a.a, a.format_a)?;
    let ib = open(&a.b, a.format_b)?;
    let mut progress = Progress::new(a.progress && !a.quiet, 2.0);
    let r = compare(&a, &ia, &ib, &mut progress);
    progress.end();
    r
}

fn compare(a: &Args, ia: &Image, ib: &Image, progress: &mut Progress) -> CmdResult {
    let say = |s: &str| {
        if !a.quiet {
            println!("{s}");
        }
    };
    // Strict mode compares qemu's status answers, and -p advances as qemu's walk does:
    // both need its granularity. Otherwise answers as long as the library's extents
    // give the same verdict and offsets (the data is compared byte by byte) in far fewer
    // steps on a huge sparse image.
    let reader = |img: &Image| {
        let r = StatusReader::new(img);
        if a.strict || a.progress {
            r
        } else {
            r.coarse()
        }
    };
    let (sa, sb) = (reader(ia), reader(ib));
    // A raw disk on a stream of unrecorded length is compared in one pass: its size
    // (an upper bound until then) is exact once its end is reached, so a size mismatch
    // is then told after the common part.
    let known = sa.length_known() && sb.length_known();
    let (size1, size2) = (sa.size(), sb.size());
    let base = size1.max(size2);
    progress.advance(0.0, 100);
    if a.strict && known && size1 != size2 {
        say("Strict mode: Image size mismatch!");
        return Ok(ExitCode::from(1));
    }
    let step = |progress: &mut Progress, chunk: u64| {
        progress.advance((chunk as f32 / base as f32) * 100.0, 100);
    };
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let mut offset = 0;
    while offset < sa.size().min(sb.size()) {
        let s1 = sa
            .status(offset, sa.size() - offset)
            .map_err(|e| alloc_failed(&a.a, e))?;
        if offset >= sb.size() {
            break;
        }
        let s2 = sb
            .status(offset, sb.size() - offset)
            .map_err(|e| alloc_failed(&a.b, e))?;
        let mut chunk = s1.len.min(s2.len);
        // A stream of unrecorded length tells zeros by content, not by allocation: its
        // status is not comparable, and the strict verdict is on sizes and contents.
        if a.strict && known && s1.flags != s2.flags {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            return Ok(ExitCode::from(1));
        }
        let (alloc1, alloc2) = (s1.flags & ALLOCATED != 0, s2.flags & ALLOCATED != 0);
        if s1.flags & ZERO != 0 && s2.flags & ZERO != 0 {
            // Both read as zeros.
        } else if alloc1 == alloc2 {
            if alloc1 {
                chunk = chunk.min(CHUNK);
                read(ia, &a.a, offset, chunk, &mut buf1)?;
                read(ib, &a.b, offset, chunk, &mut buf2)?;
                if let Some(i) = first_difference(&buf1, &buf2) {
                    say(&format!("Content mismatch at offset {}!", offset + i));
                    return Ok(ExitCode::from(1));
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let (img, name) = if alloc1 { (ia, &a.a) } else { (ib, &a.b) };
            read(img, name, offset, chunk, &mut buf1)?;
            if let Some(i) = first_nonzero(&buf1) {
                say(&format!("Content mismatch at offset {}!", offset + i));
                return Ok(ExitCode::from(1));
            }
        }
        offset += chunk;
        step(progress, chunk);
    }
    let (size1, size2) = (sa.size(), sb.size());
    let base = size1.max(size2);
    if size1 != size2 {
        if a.strict {
            // Only known now (a stream of unrecorded length has ended).
            say("Strict mode: Image size mismatch!");
            return Ok(ExitCode::from(1));
        }
        say("Warning: Image size mismatch!");
        let (over, img, name) = if size1 > size2 {
            (&sa, ia, &a.a)
        } else {
            (&sb, ib, &a.b)
        };
        while offset < base {
            let s = over
                .status(offset, base - offset)
                .map_err(|e| alloc_failed(name, e))?;
            let mut chunk = s.len;
            if s.flags & ALLOCATED != 0 && s.flags & ZERO == 0 {
                chunk = chunk.min(CHUNK);
                read(img, name, offset, chunk, &mut buf1)?;
                if let Some(i) = first_nonzero(&buf1) {
                    say(&format!("Content mismatch at offset {}!", offset + i));
                    return Ok(ExitCode::from(1));
                }
            }
            offset += chunk;
            step(progress, chunk);
        }
    }
    say("Images are identical.");
    Ok(ExitCode::SUCCESS)
}

fn alloc_failed(name: &str, e: imgconv::Error) -> crate::common::CmdError {
    (
        3,
        imgconv::Error::Format(format!(
            "Sector allocation test failed for {name}: {}",
            describe(&e)
        )),
    )
}

fn read(
    img: &Image,
    name: &str,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), crate::common::CmdError> {
    buf.resize(len as usize, 0);
    img.device().read_at(buf, offset).map_err(|e| {
        (
            4,
            imgconv::Error::Format(format!(
                "Error while reading offset {offset} of {name}: {}",
                describe(&e)
            )),
        )
    })
}

/// Where the first differing 512-byte sector starts (qemu reports sectors).
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    Some((i as u64) & !511)
}

/// Where the first 512-byte sector holding a non-zero byte starts.
fn first_nonzero(a: &[u8]) -> Option<u64> {
    if is_zero(a) {
        return None;
    }
    let i = a.iter().position(|&x| x != 0).unwrap_or(0);
    Some((i as u64) & !511)
}
