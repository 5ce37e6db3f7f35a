//! `imgconv convert`: one image (or several, one after the other) into another format.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args as ClapArgs;
use imgconv::writer::parse_size;
use imgconv::{BlockDevice, ConvertOptions, Format, Image, OpenOptions};

use crate::common::{
    check_cache_mode, could_not_open, fail, open_image, parse_format, CmdResult, InputArgs,
};
use crate::devices::{ConcatDevice, RateLimitedDevice, SalvageDevice};
use crate::progress::{ConvertProgress, Progress};
use crate::status::StatusReader;

/// Arguments of `imgconv convert`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Source format (probed when omitted).
    #[arg(short = 'f', long = "source-format", value_parser = parse_format)]
    format: Option<Format>,
    /// The sources are option strings (`driver=qcow2,file.filename=x`), not file names.
    #[arg(long = "image-opts", visible_alias = "source-image-opts")]
    image_opts: bool,
    /// Output format: raw, qcow2, vmdk, vdi or vpc (VHD).
    #[arg(short = 'O', long = "target-format", value_parser = parse_format)]
    out_format: Option<Format>,
    /// The target is an option string; needs -n.
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Output options, qemu-img style: key=value[,key=value…] (may be repeated);
    /// `-o help` lists them. vpc (VHD): subformat=dynamic|fixed, force_size=on|off, and
    /// azure=on (a fixed VHD of the exact size, as Azure takes it; a size that is not a
    /// whole MiB is refused) or azure=round (the same, the size rounded up to the next MiB).
    #[arg(short = 'o', long = "target-options")]
    options: Vec<String>,
    /// Compress the output (qcow2, streamOptimized VMDK).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Print progress lines `    (NN.NN/100%)` on stdout, as qemu-img.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Smallest run of zeros left unwritten (default 4k; 0 writes everything, fully
    /// allocating the output).
    #[arg(short = 'S', long = "sparse-size", default_value = "4k")]
    sparse_size: String,
    /// Parallel workers, 1 to 16 (default: the number of cores).
    #[arg(short = 'm', long = "parallel")]
    threads: Option<usize>,
    /// Backing file of the output (only data that differs from it is written).
    #[arg(short = 'B', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Write into an existing target without creating or truncating it.
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// With -n: the target already reads as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Convert an internal snapshot of the source (qcow2): snapshot.id=ID,
    /// snapshot.name=NAME, or an ID or name.
    #[arg(short = 'l', long = "source-snapshot")]
    snapshot: Option<String>,
    /// Convert an internal snapshot (older spelling of -l, ID or name).
    #[arg(short = 's')]
    snapshot_old: Option<String>,
    /// Refuse references to other files in the source (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Limit the rate at which the source's data is read, in bytes per second (k, M, G…).
    #[arg(short = 'r', long = "rate")]
    rate: Option<String>,
    /// Read errors become zeros, with a warning per unreadable sector.
    #[arg(long)]
    salvage: bool,
    /// Copy the source's persistent bitmaps (qcow2 → qcow2).
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps: skip bitmaps that are in use (inconsistent).
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Copy offloading: a raw source's data is copied into a raw target by the kernel
    /// (copy_file_range), unscanned for zeros; other pairs are copied as usual, as
    /// qemu-img falls back when offloading is not possible.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// QEMU objects (refused: secrets are for encrypted images, which imgconv does not read).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Target cache mode: none, writeback, writethrough, directsync, unsafe (checked,
    /// then irrelevant: imgconv writes through the page cache and syncs at the end).
    #[arg(short = 't', long = "target-cache")]
    cache: Option<String>,
    /// Source cache mode (checked as -t).
    #[arg(short = 'T', long = "source-cache")]
    src_cache: Option<String>,
    /// Out-of-order writes: accepted; imgconv's writers write in order anyway.
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Source image(s), then the target ('-' = stdout, for raw and streamOptimized VMDK).
    #[arg(value_name = "FILE")]
    files: Vec<String>,
}

/// Runs `imgconv convert`.
pub fn run(a: Args) -> CmdResult {
    let _ = a.out_of_order;
    let out_format = a.out_format.unwrap_or(Format::Raw);
    if crate::optionhelp::asks_for_help(&a.options) {
        let target = (a.files.len() >= 2).then(|| a.files[a.files.len() - 1].as_str());
        print!("{}", crate::optionhelp::text(out_format, target));
        return Ok(ExitCode::SUCCESS);
    }
    check_cache_mode(a.cache.as_deref(), false)?;
    check_cache_mode(a.src_cache.as_deref(), true)?;
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let invalid = |m: &str| Err((1, imgconv::Error::invalid(m)));
    if a.skip_broken_bitmaps && !a.bitmaps {
        return invalid("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if a.copy_range && a.compress {
        return invalid("Cannot enable copy offloading when -c is used");
    }
    if a.target_image_opts && !a.no_create {
        return invalid("--target-image-opts requires use of -n flag");
    }
    if a.target_is_zero && !a.no_create {
        return invalid("--target-is-zero requires use of -n flag");
    }
    if a.snapshot.is_some() && a.snapshot_old.is_some() {
        return invalid("-l and -s are exclusive");
    }
    if matches!(a.threads, Some(n) if !(1..=16).contains(&n)) {
        return invalid("Invalid number of coroutines specified. Must be between 1 and 16.");
    }
    let min_sparse = parse_size(&a.sparse_size).map_err(fail(1))?;
    if min_sparse % 512 != 0 || min_sparse > 16 << 20 {
        return invalid("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).");
    }
    let rate = match &a.rate {
        Some(r) => match parse_size(r) {
            Ok(n) if n > 0 => Some(n),
            _ => return invalid(&format!("Invalid rate limit specified: '{r}'")),
        },
        None => None,
    };
    if a.files.len() < 2 {
        return invalid("Must specify image file name");
    }
    let (sources, target) = a.files.split_at(a.files.len() - 1);
    let target = &target[0];
    if (a.snapshot.is_some() || a.snapshot_old.is_some()) && sources.len() > 1 {
        return invalid("No support for concatenating multiple snapshot");
    }
    // As qemu-img: the first progress line comes before the sources are opened, and
    // the line ends (with 100 % first on success) whatever happens next.
    let to_stdout = target == "-";
    let show = a.progress && !a.quiet;
    let mut printer = if to_stdout {
        Progress::on_stderr(show, 1.0)
    } else {
        Progress::new(show, 1.0)
    };
    printer.advance(0.0, 100);
    let printer = Arc::new(Mutex::new(printer));
    let r = convert_sources(&a, sources, target, out_format, min_sparse, rate, &printer);
    if let Ok(mut p) = printer.lock() {
        if r.is_ok() {
            p.set(100.0);
        }
        p.end();
    }
    r
}

/// Opens the sources and the target's backing file, and converts.
fn convert_sources(
    a: &Args,
    sources: &[String],
    target: &str,
    out_format: Format,
    min_sparse: u64,
    rate: Option<u64>,
    printer: &Arc<Mutex<Progress>>,
) -> CmdResult {
    let snapshot = a.snapshot.clone().or(a.snapshot_old.clone());
    let invalid = |m: &str| Err((1, imgconv::Error::invalid(m)));
    let (dst, out_format) = if a.target_image_opts {
        let spec = crate::spec::parse(target, None, true).map_err(fail(1))?;
        if a.out_format.is_some() && spec.format.is_some() && a.out_format != spec.format {
            return invalid("--target-image-opts and -O name different formats");
        }
        (
            spec.filename,
            spec.format.or(a.out_format).unwrap_or(Format::Raw),
        )
    } else {
        (target.to_string(), out_format)
    };

    // The sources.
    let mut imgs = Vec::with_capacity(sources.len());
    for s in sources {
        let spec = crate::spec::parse(s, a.format, a.image_opts).map_err(fail(1))?;
        let mut o = if a.untrusted {
            OpenOptions::untrusted()
        } else {
            OpenOptions::trusted()
        };
        o.format = spec.format;
        o.force_share = a.force_share;
        a.input.apply(&mut o);
        o.snapshot = snapshot.clone();
        // A raw stream of unrecorded length (gzip, bzip2, a pipe) goes straight into a
        // format that can learn its size at the end; other targets get it spooled.
        o.stream_unknown_length =
            imgconv::format::writes_unsized(out_format) && !a.no_create && sources.len() == 1;
        let img = imgconv::open(std::path::Path::new(&spec.filename), &o)
            .map_err(|e| could_not_open(s, e))?;
        imgs.push(img);
    }
    let mut src: Arc<dyn BlockDevice> = if imgs.len() == 1 {
        imgs[0].device().clone()
    } else {
        Arc::new(ConcatDevice::new(
            imgs.iter().map(|i| i.device().clone()).collect(),
        ))
    };
    if a.salvage {
        src = Arc::new(SalvageDevice::new(src, a.quiet));
    }
    if let Some(r) = rate {
        src = Arc::new(RateLimitedDevice::new(src, r));
    }

    let mut opts = ConvertOptions::new(out_format);
    for o in &a.options {
        opts.write.parse_o(o).map_err(fail(1))?;
    }
    opts.write.compressed = a.compress;
    if let Some(b) = &a.backing {
        opts.write.backing_file = Some(b.clone());
    }
    if let Some(f) = a.backing_format {
        opts.write.backing_format = Some(f);
    }
    opts.engine.min_sparse = min_sparse;
    opts.engine.threads = a.threads.unwrap_or(0);
    opts.engine.target_is_zero = a.target_is_zero;
    opts.engine.copy_offload = a.copy_range;
    opts.no_create = a.no_create;
    if a.bitmaps {
        check_bitmaps(a, sources, &imgs, out_format, &opts)?;
    }
    let remote_dst = imgconv::io::remote::classify(&dst);
    if remote_dst.is_some() && (opts.write.backing_file.is_some() || a.no_create) {
        return Err((
            1,
            imgconv::Error::invalid("-B and -n cannot be used with a remote target"),
        ));
    }
    if let Some(b) = &opts.write.backing_file {
        // The output stores only what differs from its backing image.
        let path = std::path::Path::new(&dst)
            .parent()
            .map(|d| d.join(b))
            .unwrap_or_else(|| b.into());
        let path = if std::path::Path::new(b).is_absolute() {
            b.into()
        } else {
            path
        };
        let backing = open_image(
            &path.to_string_lossy(),
            opts.write.backing_format,
            a.untrusted,
            false,
        )
        .map_err(|e| could_not_open(b, e))?;
        if opts.write.backing_format.is_none() {
            opts.write.backing_format = Some(backing.format());
        }
        opts.engine.target_backing = Some(backing.device().clone());
    }

    let to_stdout = dst == "-";
    if a.progress && !a.quiet {
        let status = StatusReader::concat(&imgs);
        let by_bytes = !src.length_known() || src.sequential_only();
        let cluster = a.compress.then(|| compressed_cluster(out_format, &opts));
        let p = ConvertProgress::new(
            printer.clone(),
            status,
            by_bytes,
            min_sparse == 0,
            opts.write.backing_file.is_some(),
            cluster,
        )
        .map_err(fail(1))?;
        let p = Mutex::new(p);
        opts.engine.progress = Some(Arc::new(move |done, _total| {
            if let Ok(mut p) = p.lock() {
                p.reached(done);
            }
        }));
    }

    if let Some(loc) = remote_dst {
        // An upload (PUT) or a containerDisk: the library converts and sends.
        let target = imgconv::remote::RemoteTarget {
            tmpdir: a.input.tmpdir.clone(),
            remote: a.input.remote.options(),
        };
        let img = imgconv::Image::from_device(src.clone());
        imgconv::remote::convert_to_remote(&img, loc, &opts, &target, None).map_err(fail(1))?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = if to_stdout {
        imgconv::io::OutputSet::to_stream(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )))
    } else if opts.no_create {
        imgconv::io::OutputSet::in_place()
    } else {
        crate::release::output_set()
    };
    let r = imgconv::convert::convert_to(src.as_ref(), std::path::Path::new(&dst), out, &opts);
    r.map_err(|e| match e {
        imgconv::Error::Io { .. } => (1, imgconv::Error::Format(crate::common::describe(&e))),
        other => (1, other),
    })?;
    if a.bitmaps {
        // As qemu-img: the bitmaps follow the data, into the finished target.
        let source = bitmap_source(a, &sources[0]);
        let done = imgconv::ops::copy_bitmaps(
            std::path::Path::new(&source),
            std::path::Path::new(&dst),
            a.skip_broken_bitmaps,
        )
        .map_err(fail(1))?;
        for name in &done.skipped {
            eprintln!("imgconv: warning: Skipping inconsistent bitmap '{name}'");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The cluster a compressing target writes whole (qemu makes progress units of it).
fn compressed_cluster(format: Format, opts: &ConvertOptions) -> u64 {
    match format {
        Format::Qcow2 => opts
            .write
            .options
            .get("cluster_size")
            .and_then(|c| parse_size(c).ok())
            .unwrap_or(65536),
        _ => 65536,
    }
}

/// `--bitmaps`, before anything is written: qemu-img copies the persistent bitmaps of
/// one qcow2 source file into a qcow2 (version 3) target, and refuses the rest.
fn check_bitmaps(
    a: &Args,
    sources: &[String],
    imgs: &[Image],
    out_format: Format,
    opts: &ConvertOptions,
) -> Result<(), crate::common::CmdError> {
    let invalid = |m: String| Err((1, imgconv::Error::invalid(m)));
    if sources.len() > 1 {
        return invalid("Copying bitmaps only possible with single source".into());
    }
    let v2 = opts
        .write
        .options
        .get("compat")
        .is_some_and(|c| c == "0.10" || c == "v2");
    if out_format != Format::Qcow2 || v2 {
        return invalid(format!(
            "Format driver '{out_format}' does not support bitmaps"
        ));
    }
    let img = &imgs[0];
    if img.info().wrapper.is_some()
        || img.info().archive_member.is_some()
        || imgconv::io::remote::classify(&sources[0]).is_some()
    {
        return invalid("Source lacks bitmap support".into());
    }
    imgconv::ops::check_bitmaps_copyable(
        std::path::Path::new(&bitmap_source(a, &sources[0])),
        img.format(),
        a.skip_broken_bitmaps,
    )
    .map_err(fail(1))
}

/// The file name of a source given as a plain name, `--image-opts` or `json:`.
fn bitmap_source(a: &Args, source: &str) -> String {
    crate::spec::parse(source, a.format, a.image_opts)
        .map(|s| s.filename)
        .unwrap_or_else(|_| source.to_string())
}
