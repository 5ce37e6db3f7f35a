//! `imgconv check`: verifies an image's metadata (qcow2, VMDK, VDI, VHD), as `qemu-img check`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args as ClapArgs;
use imgconv::driver::{CheckReport, CheckRequest};
use imgconv::io::inplace::InPlaceFile;
use imgconv::io::FileStorage;
use imgconv::{Format, OpenOptions};

use crate::common::{
    check_cache_mode, could_not_open, esc, fail, is_remote, parse_format, CmdResult, RemoteArgs,
};

/// Arguments of `imgconv check`.
#[derive(ClapArgs)]
pub struct Args {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// The image is an option string (`driver=qcow2,file.filename=x`), not a file name.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json.
    #[arg(long = "output", default_value = "human", value_parser = ["human", "json"])]
    output: String,
    /// Repair: `leaks` lowers the refcounts of leaked clusters; `all` does the same
    /// and refuses (changing nothing) an image with corruptions, which imgconv does
    /// not repair.
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    /// Cache mode (checked as qemu-img does, then irrelevant to imgconv).
    #[arg(short = 'T', long = "cache")]
    cache: Option<String>,
    /// QEMU objects (refused: see `convert --object`).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Print nothing; the exit code tells.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Read without QEMU's image locks (for an image another process is writing).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Refuse references to other files (VMDK extent files other than the image).
    #[arg(long)]
    untrusted: bool,
    #[command(flatten)]
    remote: RemoteArgs,
    /// The image (a file, or an http(s):// URL read with range requests).
    file: String,
}

/// Runs `imgconv check`.
pub fn run(a: Args) -> CmdResult {
    check_cache_mode(a.cache.as_deref(), true)?;
    crate::spec::check_objects(&a.objects).map_err(fail(1))?;
    if let Some(r) = a
        .repair
        .as_deref()
        .filter(|r| !matches!(*r, "leaks" | "all"))
    {
        return Err((
            1,
            imgconv::Error::invalid(format!("--repair (-r) expects 'leaks' or 'all' not '{r}'")),
        ));
    }
    let remote = is_remote(&a.file);
    if remote && a.repair.is_some() {
        return Err((
            1,
            imgconv::Error::invalid("check -r repairs local files, not a URL"),
        ));
    }
    let spec = crate::spec::parse(&a.file, a.format, a.image_opts).map_err(fail(1))?;
    let path = Path::new(&spec.filename);
    // Untrusted, any other file named is refused (extents; the parent too, as
    // everywhere).
    let mut options = if a.untrusted {
        OpenOptions::untrusted()
    } else {
        OpenOptions::trusted()
    };
    options.remote = a.remote.options();
    options.force_share = a.force_share;
    // With -r the image is opened once, for writing (QEMU's writer locks): a second,
    // read-only description would hold read locks that conflict with them.
    let writer = match a.repair {
        Some(_) => Some(InPlaceFile::open(path).map_err(|e| could_not_open(&a.file, e))?),
        None => None,
    };
    let storage: Arc<dyn imgconv::io::Storage> = match &writer {
        Some(w) => Arc::new(w.storage().map_err(fail(1))?),
        None if remote => {
            imgconv::remote::open_storage(&a.file, &options.remote).map_err(fail(1))?
        }
        None => Arc::new(
            FileStorage::open_image(path, a.force_share).map_err(|e| could_not_open(&a.file, e))?,
        ),
    };
    let format = match spec.format {
        Some(f) => f,
        None => imgconv::format::probe_storage(storage.as_ref())
            .map_err(|e| could_not_open(&a.file, e))?,
    };
    options.format = Some(format);
    let driver = imgconv::format::driver(format);
    let no_checks = || {
        // qemu-img's wording and exit code for formats without a check (or without
        // repairs, when -r was given).
        eprintln!("imgconv: This image format does not support checks");
        Ok(ExitCode::from(63))
    };
    let Some(check) = driver.check else {
        return no_checks();
    };
    if format == Format::Qcow2 && !remote {
        // As qemu-img, an image that cannot be opened (unknown incompatible features,
        // encryption) is not checked: its metadata means something imgconv cannot tell.
        // No locks of its own: the descriptions above hold them.
        let o = options.clone().metadata_only().force_share();
        imgconv::open(path, &o).map_err(|e| could_not_open(&a.file, e))?;
    }
    let ctx = if remote {
        let shown = imgconv::io::remote::redact(&a.file);
        imgconv::image::OpenContext::for_url(&a.file, &shown, &options)
            .with_opener(imgconv::open::open_storage)
    } else {
        imgconv::open::context_for_path(path, &options)
    };
    let req = CheckRequest { storage, ctx: &ctx };
    let could_not = |e| {
        (
            1,
            imgconv::Error::Format(format!("Could not check '{}': {e}", esc(&a.file))),
        )
    };
    if a.repair.is_some() && driver.repair.is_none() {
        return no_checks();
    }
    if a.repair.as_deref() == Some("all") {
        // Corruptions are not repaired: refuse before changing anything.
        let r = check(&req).map_err(could_not)?;
        if r.corruptions > 0 {
            print_messages(&r);
            return Err((
                1,
                imgconv::Error::unsupported(
                    format.name(),
                    format!(
                        "repairing {} corruptions (-r all); nothing was changed — imgconv convert writes a clean copy",
                        r.corruptions
                    ),
                ),
            ));
        }
    }
    let r = match (a.repair.as_deref(), driver.repair) {
        (None, _) | (_, None) => check(&req).map_err(could_not)?,
        (Some(_), Some(repair)) => {
            let file = writer.as_ref().expect("opened for writing with -r");
            let r = repair(&req, file).map_err(could_not)?;
            print_messages(&r);
            if r.repair_failed {
                return Err((
                    1,
                    imgconv::Error::Format("Check failed: Input/output error".into()),
                ));
            }
            if r.leaks_fixed == 0 {
                return finish(&r, &a, &spec.filename, format);
            }
            if a.output == "human" && !a.quiet {
                print!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\n",
                    r.leaks_fixed
                );
            }
            let mut again = check(&req).map_err(could_not)?;
            again.leaks_fixed = r.leaks_fixed;
            again
        }
    };
    print_messages(&r);
    finish(&r, &a, &spec.filename, format)
}

/// Prints each problem on stderr, as qemu-img does.
fn print_messages(r: &CheckReport) {
    for m in &r.messages {
        eprintln!("{m}");
    }
}

/// Prints the summary of a finished check (its messages already on stderr) and gives its
/// exit code.
fn finish(r: &CheckReport, a: &Args, path: &str, format: Format) -> CmdResult {
    if let Some(why) = &r.failed {
        return Err((1, imgconv::Error::Format(format!("Check failed: {why}"))));
    }
    if a.output == "json" {
        println!("{}", json(r, path, format));
    } else if !a.quiet {
        print!("{}", human(r));
    }
    Ok(ExitCode::from(r.exit_code()))
}

/// qemu-img's human summary.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's JSON (QAPI `ImageCheck`, printed in qemu's key order); zero optional
/// counters are left out as qemu does.
fn json(r: &CheckReport, filename: &str, format: Format) -> String {
    let mut m = serde_json::Map::new();
    // QAPI's insertion order (qemu's key order depends on it within a bucket).
    m.insert("filename".into(), filename.into());
    m.insert("format".into(), format.name().into());
    m.insert("check-errors".into(), r.check_errors.into());
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", 0),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (k, v) in optional {
        if v != 0 {
            m.insert(k.into(), v.into());
        }
    }
    crate::qjson::to_string(&serde_json::Value::Object(m))
}
