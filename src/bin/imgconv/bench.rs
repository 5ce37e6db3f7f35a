//! `imgconv bench`: a simple sequential I/O benchmark, as `qemu-img bench`: COUNT
//! requests of BUFFER_SIZE bytes, DEPTH in flight, the first at OFFSET and each next
//! STEP_SIZE further on (wrapping at the end of the image), then the time taken.
//!
//! Reads go through the image's format (any format imgconv reads); writes are done in
//! place, which imgconv does for raw images only (other formats are refused).

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Args as ClapArgs;
use imgconv::writer::parse_size;
use imgconv::Format;

use crate::common::{
    check_cache_mode, describe, fail, open_spec, parse_format, CmdResult, InputArgs,
};

/// Arguments of `imgconv bench`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The image is an option string (`driver=raw,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Refuse references to other files.
    #[arg(long)]
    untrusted: bool,
    /// Number of requests (default 75000).
    #[arg(short = 'c', long = "count")]
    count: Option<String>,
    /// Requests in flight at once (default 64).
    #[arg(short = 'd', long = "depth")]
    depth: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset")]
    offset: Option<String>,
    /// Bytes per request (default 4096).
    #[arg(short = 's', long = "buffer-size")]
    buffer_size: Option<String>,
    /// Distance from one request to the next (default: the buffer size).
    #[arg(short = 'S', long = "step-size")]
    step_size: Option<String>,
    /// Cache mode (checked as qemu-img does; imgconv reads through the page cache).
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// AIO backend: threads, native or io_uring (checked; imgconv uses threads).
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO where possible (accepted; imgconv uses threads).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write instead of read (raw images).
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte written (default 0).
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Write tests: sync the image every this many requests.
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// With --flush-interval: flush without waiting for requests in flight.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Accepted as qemu-img does (it prints its two lines all the same).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Open the image in shared mode.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: String,
}

/// A number option as qemu-img checks it: between `min` and `INT_MAX`.
fn number(what: &str, v: &Option<String>, default: u64, min: u64) -> Result<u64, String> {
    let Some(s) = v else {
        return Ok(default);
    };
    match parse_size(s) {
        Ok(n) if n >= min && n <= i32::MAX as u64 => Ok(n),
        _ => Err(format!(
            "Invalid {what} specified. Must be between {min} and 2147483647."
        )),
    }
}

/// Runs `imgconv bench`.
pub fn run(a: Args) -> CmdResult {
    let _ = (a.native, a.quiet, a.no_drain);
    let invalid = |m: String| (1, imgconv::Error::invalid(m));
    check_cache_mode(a.cache.as_deref(), false)?;
    if let Some(aio) = a
        .aio
        .as_deref()
        .filter(|x| !matches!(*x, "threads" | "native" | "io_uring"))
    {
        return Err(invalid(format!("Invalid aio option: {aio}")));
    }
    let count = number("request count", &a.count, 75000, 1).map_err(invalid)?;
    let depth = number("queue depth", &a.depth, 64, 1).map_err(invalid)?;
    let bufsize = number("buffer size", &a.buffer_size, 4096, 1).map_err(invalid)?;
    let step = match number("step size", &a.step_size, 0, 0).map_err(invalid)? {
        0 => bufsize,
        s => s,
    };
    let offset = match &a.offset {
        Some(s) => {
            parse_size(s).map_err(|_| invalid(format!("Invalid offset specified: '{s}'")))?
        }
        None => 0,
    };
    let pattern = match &a.pattern {
        Some(p) => match p.parse::<u8>() {
            Ok(b) => b,
            Err(_) => {
                return Err(invalid(
                    "Invalid pattern byte specified. Must be between 0 and 255.".into(),
                ))
            }
        },
        None => 0,
    };
    let flush = number("flush interval", &a.flush_interval, 0, 0).map_err(invalid)?;
    if flush > 0 && !a.write {
        return Err(invalid(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    if flush > 0 && flush < depth {
        return Err(invalid("Flush interval can't be smaller than depth".into()));
    }
    if a.no_drain && flush == 0 {
        return Err(invalid("--no-drain requires --flush-interval".into()));
    }
    // -w: the file is opened for writing first, with QEMU's writer locks; the reading
    // side then takes no locks of its own (they would conflict with the writer's).
    let target = if a.write {
        let spec = crate::spec::parse(&a.file, a.format, a.image_opts).map_err(fail(1))?;
        Some(
            imgconv::io::inplace::InPlaceFile::open(Path::new(&spec.filename))
                .map_err(|e| crate::common::could_not_open(&a.file, e))?,
        )
    } else {
        None
    };
    let force_share = a.force_share || a.write;
    let img = open_spec(
        &a.file,
        a.format,
        a.image_opts,
        a.untrusted,
        &a.input,
        force_share,
        false,
    )?;
    if a.write && (img.format() != Format::Raw || img.info().wrapper.is_some()) {
        return Err((
            1,
            imgconv::Error::unsupported(
                img.format().name(),
                "bench -w (imgconv writes in place into raw files only)",
            ),
        ));
    }
    println!(
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
        if a.write { "write" } else { "read" }
    );
    if flush > 0 {
        println!("Sending flush every {flush} requests");
    }
    let size = img.size();
    let dev = img.device();
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let threads = depth.min(count).min(64) as usize;
    let failed = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    let mut buf = vec![pattern; bufsize as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        // The first request at OFFSET, then each STEP further, modulo
                        // the image's size.
                        let at = if i == 0 || size == 0 {
                            offset
                        } else {
                            ((offset as u128 + i as u128 * step as u128) % size as u128) as u64
                        };
                        if at.checked_add(bufsize).is_none_or(|end| end > size) {
                            return Err("Input/output error".into());
                        }
                        match &target {
                            Some(f) => {
                                f.write_at(&buf, at).map_err(|e| describe(&e))?;
                                if flush > 0 && (i + 1) % flush == 0 {
                                    f.sync().map_err(|e| describe(&e))?;
                                }
                            }
                            None => dev.read_at(&mut buf, at).map_err(|e| describe(&e))?,
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("internal error".into()))
                    .err()
            })
            .next()
    });
    if let Some(why) = failed {
        return Err((1, imgconv::Error::Format(format!("Failed request: {why}"))));
    }
    if let Some(f) = &target {
        f.sync().map_err(|e| {
            (
                1,
                imgconv::Error::Format(format!("Failed flush request: {}", describe(&e))),
            )
        })?;
    }
    println!(
        "Run completed in {:.3} seconds.",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
