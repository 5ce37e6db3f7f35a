//! `imgconv resize`: changes an image's virtual size (raw and qcow2).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use imgconv::io::FileStorage;
use imgconv::writer::parse_size;
use imgconv::Format;

use crate::common::{could_not_open, fail, parse_format, CmdResult};

/// Arguments of `imgconv resize`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The image is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Allow the image to become smaller; what lies past the new end is discarded.
    #[arg(long)]
    shrink: bool,
    /// How the new area is allocated: off, falloc or full (raw); qcow2 grows with off.
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Print nothing.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Refuse references to other files in the image.
    #[arg(long)]
    untrusted: bool,
    /// The image.
    file: String,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// How new space is allocated (`--preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prealloc {
    Off,
    Metadata,
    Falloc,
    Full,
}

/// Runs `imgconv resize`.
pub fn run(a: Args) -> CmdResult {
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    let invalid = |m: String| Err((1, imgconv::Error::invalid(m)));
    let prealloc = match a.preallocation.as_deref() {
        None | Some("off") => Prealloc::Off,
        Some("metadata") => Prealloc::Metadata,
        Some("falloc") => Prealloc::Falloc,
        Some("full") => Prealloc::Full,
        Some(p) => return invalid(format!("Invalid preallocation mode '{p}'")),
    };
    let spec = crate::spec::parse(&a.file, a.format, a.image_opts).map_err(fail(1))?;
    let path = Path::new(&spec.filename);
    // QEMU opens the image for writing first: its writer's locks decide whether another
    // process holds it. The probe below then reads without locks of its own (the
    // resize takes the writer's locks again).
    drop(imgconv::io::inplace::InPlaceFile::open(path).map_err(|e| could_not_open(&a.file, e))?);
    let storage = FileStorage::open_image(path, true).map_err(|e| could_not_open(&a.file, e))?;
    let format = match spec.format {
        Some(f) => f,
        None => imgconv::format::probe_storage(&storage).map_err(|e| could_not_open(&a.file, e))?,
    };
    let current = match format {
        Format::Raw => imgconv::io::Storage::len(&storage),
        _ => imgconv::open(
            path,
            &trust(a.untrusted)
                .format(format)
                .metadata_only()
                .force_share(),
        )
        .map_err(|e| could_not_open(&a.file, e))?
        .size(),
    };
    drop(storage);
    let s = a.size.trim();
    let new = if let Some(d) = s.strip_prefix('+') {
        current.checked_add(parse_size(d).map_err(fail(1))?)
    } else if let Some(d) = s.strip_prefix('-') {
        current.checked_sub(parse_size(d).map_err(fail(1))?)
    } else {
        Some(parse_size(s).map_err(fail(1))?)
    };
    let Some(new) = new else {
        return invalid("New image size must be positive".into());
    };
    if new < current && !a.shrink {
        return invalid("Use the --shrink option to perform a shrink operation.".into());
    }
    if new < current && prealloc != Prealloc::Off {
        return invalid("Preallocation can only be used for growing images".into());
    }
    if new < current && !a.quiet {
        eprintln!("imgconv: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    if prealloc == Prealloc::Metadata && format == Format::Raw {
        return invalid("Unsupported preallocation mode: metadata".into());
    }
    if prealloc != Prealloc::Off && format != Format::Raw {
        return Err((
            1,
            imgconv::Error::unsupported(
                format.name(),
                format!(
                    "resize --preallocation={} (the new area is left unallocated only)",
                    a.preallocation.as_deref().unwrap_or("")
                ),
            ),
        ));
    }
    let resize = imgconv::format::driver(format)
        .resize
        .ok_or_else(|| (1, imgconv::format::unsupported(format, "resize")))?;
    let ctx = imgconv::open::context_for_path(path, &trust(a.untrusted));
    resize(path, new, a.shrink, &ctx).map_err(fail(1))?;
    if format == Format::Raw && new > current && prealloc != Prealloc::Off {
        allocate(path, current, new, prealloc == Prealloc::Full).map_err(fail(1))?;
    }
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of the given trust.
fn trust(untrusted: bool) -> imgconv::OpenOptions {
    if untrusted {
        imgconv::OpenOptions::untrusted()
    } else {
        imgconv::OpenOptions::trusted()
    }
}

/// Allocates `[from, to)` of a raw file: reserved (`falloc`) or written with zeros
/// (`full`), as qemu's file driver does; under QEMU's writer locks.
fn allocate(path: &Path, from: u64, to: u64, write: bool) -> imgconv::Result<()> {
    let f = imgconv::io::inplace::InPlaceFile::open(path)?;
    if write {
        let zeros = vec![0u8; 1 << 20];
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(zeros.len() as u64) as usize;
            f.write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
    } else {
        // Reserving space changes no byte the image reads.
        imgconv::io::fallocate(f.file(), 0, from, to - from)
            .map_err(|e| imgconv::Error::io(path, e))?;
    }
    f.sync()
}
