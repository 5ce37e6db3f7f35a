//! `imgconv convert`: one image into another format.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;
use imgconv::writer::parse_size;
use imgconv::{ConvertOptions, Format, OpenOptions};

use crate::common::{
    fail, open_image, parse_format, progress_bar, progress_style_unknown_total, CmdResult,
    InputArgs,
};

/// Arguments of `imgconv convert`.
#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    input: InputArgs,
    /// Source format (probed when omitted).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: raw, qcow2, vmdk or vdi.
    #[arg(short = 'O', value_parser = parse_format, default_value = "raw")]
    out_format: Format,
    /// Output options, qemu-img style: key=value[,key=value…] (may be repeated).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (qcow2, streamOptimized VMDK).
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar (on a terminal).
    #[arg(short = 'p')]
    progress: bool,
    /// Smallest run of zeros left unwritten (default 4k; 0 writes everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse_size: String,
    /// Worker threads (default: the number of cores, at most 16).
    #[arg(short = 'm')]
    threads: Option<usize>,
    /// Backing file of the output (only data that differs from it is written).
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Write into an existing target without creating or truncating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the target already reads as zeros.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Convert an internal snapshot of the source (qcow2): snapshot.id=ID,
    /// snapshot.name=NAME, or an ID or name.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Convert an internal snapshot (older spelling of -l, ID or name).
    #[arg(short = 's')]
    snapshot_old: Option<String>,
    /// Refuse references to other files in the source (images from strangers).
    #[arg(long)]
    untrusted: bool,
    /// Accepted for qemu-img compatibility and ignored (cache modes, out-of-order writes).
    #[arg(short = 't', hide = true)]
    cache: Option<String>,
    #[arg(short = 'T', hide = true)]
    src_cache: Option<String>,
    #[arg(short = 'W', hide = true)]
    out_of_order: bool,
    #[arg(short = 'U', long = "force-share", hide = true)]
    force_share: bool,
    #[arg(short = 'q', hide = true)]
    quiet: bool,
    /// Source image.
    src: String,
    /// Destination image ('-' = stdout, for raw and streamOptimized VMDK).
    dst: String,
}

/// Runs `imgconv convert`.
pub fn run(a: Args) -> CmdResult {
    let _ = (
        &a.cache,
        &a.src_cache,
        a.out_of_order,
        a.force_share,
        a.quiet,
    );
    if a.target_is_zero && !a.no_create {
        return Err((1, imgconv::Error::invalid("--target-is-zero requires -n")));
    }
    if a.snapshot.is_some() && a.snapshot_old.is_some() {
        return Err((1, imgconv::Error::invalid("-l and -s are exclusive")));
    }
    let mut o = if a.untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    o.format = a.format;
    a.input.apply(&mut o);
    o.snapshot = a.snapshot.clone().or(a.snapshot_old.clone());
    // A raw stream of unrecorded length (gzip, bzip2, a pipe) goes straight into a
    // format that can learn its size at the end; other targets get it spooled.
    o.stream_unknown_length = imgconv::format::writes_unsized(a.out_format) && !a.no_create;
    let src = imgconv::open(std::path::Path::new(&a.src), &o).map_err(fail(1))?;
    let mut opts = ConvertOptions::new(a.out_format);
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
    opts.engine.min_sparse = parse_size(&a.sparse_size).map_err(fail(1))?;
    opts.engine.threads = a.threads.unwrap_or(0);
    opts.engine.target_is_zero = a.target_is_zero;
    opts.no_create = a.no_create;
    if let Some(b) = &opts.write.backing_file {
        // The output stores only what differs from its backing image.
        let path = std::path::Path::new(&a.dst)
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
        )
        .map_err(fail(1))?;
        if opts.write.backing_format.is_none() {
            opts.write.backing_format = Some(backing.format());
        }
        opts.engine.target_backing = Some(backing.device().clone());
    }
    let pb = progress_bar(a.progress);
    if let Some(pb) = &pb {
        let pb = pb.clone();
        if src.device().length_known() {
            pb.set_length(src.size());
        } else {
            // The size shows up when the stream ends; until then, bytes and speed.
            pb.set_style(progress_style_unknown_total());
        }
        opts.engine.progress = Some(Arc::new(move |done, total| {
            if total > 0 && pb.length() != Some(total) {
                pb.set_length(total);
            }
            pb.set_position(done)
        }));
    }
    let r = if a.dst == "-" {
        imgconv::convert_to_writer(
            &src,
            Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                std::io::stdout(),
            )),
            &opts,
        )
    } else {
        imgconv::convert(&src, &a.dst, &opts)
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    r.map_err(fail(1))?;
    Ok(ExitCode::SUCCESS)
}
